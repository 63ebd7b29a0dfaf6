use super::*;

fn keys_only() -> CloudInit {
    CloudInit {
        hostname: Some("web".into()),
        user: Some("alice".into()),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nz alice@host".into()],
        ..CloudInit::default()
    }
}

fn file<'a>(files: &'a [(&str, Vec<u8>)], name: &str) -> &'a str {
    let (_, data) = files.iter().find(|(n, _)| *n == name).expect(name);
    std::str::from_utf8(data).unwrap()
}

fn parse(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn convenience_keys_make_cloud_config_and_meta_data() {
    let files = compose(&keys_only(), "id1").unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["meta-data", "user-data"]);
    let user = file(&files, "user-data");
    assert!(user.starts_with("#cloud-config\n"), "{user}");
    let user = parse(user);
    assert_eq!(user["hostname"], "web");
    assert_eq!(user["users"][0], "default");
    assert_eq!(user["users"][1]["name"], "alice");
    assert_eq!(
        user["users"][1]["ssh_authorized_keys"][0],
        "ssh-ed25519 AAAAC3Nz alice@host"
    );
    let meta = parse(file(&files, "meta-data"));
    assert_eq!(meta["local-hostname"], "web");
    assert_eq!(meta["public-keys"][0], "ssh-ed25519 AAAAC3Nz alice@host");
    let id = meta["instance-id"].as_str().unwrap();
    assert!(id.starts_with("maqet-id1-"), "{id}");

    // Same inputs, same instance-id; a change makes a new one (cloud-init re-applies).
    let again = parse(file(&compose(&keys_only(), "id1").unwrap(), "meta-data"));
    assert_eq!(again["instance-id"], meta["instance-id"]);
    let mut changed = keys_only();
    changed.hostname = Some("db".into());
    let other = parse(file(&compose(&changed, "id1").unwrap(), "meta-data"));
    assert_ne!(other["instance-id"], meta["instance-id"]);
}

#[test]
fn inline_documents_win_over_the_convenience_keys() {
    let mut seed = keys_only();
    let user: Mapping = serde_yaml::from_str("hostname: own\npackages: [htop]\n").unwrap();
    let meta: Mapping = serde_yaml::from_str("instance-id: fixed\n").unwrap();
    let net: Mapping = serde_yaml::from_str("version: 2\n").unwrap();
    seed.user_data = Some(SeedDoc::Inline(user));
    seed.meta_data = Some(SeedDoc::Inline(meta));
    seed.network_config = Some(SeedDoc::Inline(net));
    let files = compose(&seed, "id1").unwrap();
    let user = parse(file(&files, "user-data"));
    assert_eq!(user["hostname"], "own");
    assert_eq!(user["packages"][0], "htop");
    assert_eq!(user["users"][1]["name"], "alice");
    let meta = parse(file(&files, "meta-data"));
    assert_eq!(meta["instance-id"], "fixed");
    assert_eq!(meta["local-hostname"], "web");
    assert_eq!(parse(file(&files, "network-config"))["version"], 2);
}

#[test]
fn documents_from_files_are_taken_as_they_are_and_only_from_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("user-data");
    std::fs::write(&doc, "#cloud-config\nruncmd: [true]\n").unwrap();
    let seed = CloudInit {
        user_data: Some(SeedDoc::File(doc.clone())),
        ..CloudInit::default()
    };
    let files = compose(&seed, "x").unwrap();
    assert_eq!(file(&files, "user-data"), "#cloud-config\nruncmd: [true]\n");

    let fifo = dir.path().join("fifo");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o600)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&doc, &link).unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'#'; (MAX_DOC_BYTES + 1) as usize]).unwrap();
    for (path, why) in [
        (fifo, "not a regular file"),
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (link, "link"),
        (big, "larger than"),
        (dir.path().join("missing"), "No such file"),
    ] {
        let seed = CloudInit {
            user_data: Some(SeedDoc::File(path.clone())),
            ..CloudInit::default()
        };
        let e = compose(&seed, "x").unwrap_err();
        assert!(e.contains(why), "{}: {e}", path.display());
    }
}

/// The volume: ISO 9660 labelled `cidata`, the files under their NoCloud names (Joliet),
/// byte for byte, replacing an older seed.
#[test]
fn the_seed_volume_is_iso9660_labelled_cidata() {
    if TOOLS
        .iter()
        .all(|(t, _)| crate::config::find_binary(t, None).is_err())
    {
        let why = "no xorriso or genisoimage (scripts/setup-deps installs genisoimage)";
        if std::env::var("MAQET_TEST_REQUIRE_ALL").is_ok_and(|v| !v.is_empty() && v != "0") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("vm").join(FILE_NAME);
    let files = compose(&keys_only(), "id1").unwrap();
    write_iso(&files, &dest, None).unwrap();
    let iso = std::fs::read(&dest).unwrap();
    let (label, mut found) = read_iso(&iso).unwrap();
    assert_eq!(label, LABEL);
    found.sort();
    let mut want: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(n, d)| ((*n).to_owned(), d.clone()))
        .collect();
    want.sort();
    assert_eq!(found, want);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let newer = vec![("meta-data", b"instance-id: two\n".to_vec())];
    write_iso(&newer, &dest, None).unwrap();
    let (_, found) = read_iso(&std::fs::read(&dest).unwrap()).unwrap();
    assert_eq!(
        found,
        [("meta-data".to_owned(), b"instance-id: two\n".to_vec())]
    );
    // Nothing staged is left behind.
    let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from(FILE_NAME)]);
    assert!(read_iso(&iso[..4096]).is_err());
    assert!(read_iso(&vec![0u8; 40 * 2048]).is_err());
}
