//! `maqet setup --user`: installs maqetd for this user's desktop session (the systemd
//! user unit, the D-Bus activation file, the desktop entry and its icons, the GNOME
//! Shell search provider and KRunner registrations, the interface XML, shell completions,
//! the man pages) and `--uninstall` removes them. Needs no maqetd: it is what makes
//! maqetd reachable. The files are built into the binary, so no source tree is needed.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::ExitCode;
use super::output::print_json;
use crate::error::MaqetError;
use crate::paths::UserInstall;

const UNIT: &str = include_str!("../../systemd/maqetd.service");
const DBUS_SERVICE: &str = include_str!("../../data/dbus-1/services/org.maqet.Maqet1.service");
const DESKTOP_ENTRY: &str = include_str!("../../data/applications/org.maqet.Maqet.desktop");
const ICON: &str = include_str!("../../data/icons/hicolor/scalable/apps/org.maqet.Maqet.svg");
const SEARCH_PROVIDER: &str =
    include_str!("../../data/gnome-shell/search-providers/org.maqet.Maqet1.search-provider.ini");
const KRUNNER_PLUGIN: &str =
    include_str!("../../data/krunner/dbusplugins/org.maqet.Maqet1.desktop");

macro_rules! pngs {
    ($($size:literal),*) => {
        [$(($size, include_bytes!(concat!(
            "../../data/icons/hicolor/", $size, "x", $size, "/apps/org.maqet.Maqet.png"
        )) as &[u8])),*]
    };
}
/// The icon in the hicolor sizes (rendered by `scripts/render-icons`).
const PNG_ICONS: [(u32, &[u8]); 8] = pngs!(16, 22, 24, 32, 48, 64, 128, 256);

macro_rules! interfaces {
    ($($name:literal),*) => {
        [$(($name, include_str!(concat!("../../dbus-interfaces/", $name)))),*]
    };
}
/// maqet's own interfaces (the shells' interfaces in `dbus-interfaces/` come with the
/// shells).
const INTERFACES: [(&str, &str); 8] = interfaces!(
    "org.maqet.Maqet1.Manager.xml",
    "org.maqet.Maqet1.Images.xml",
    "org.maqet.Maqet1.VM.xml",
    "org.maqet.Maqet1.QMP.xml",
    "org.maqet.Maqet1.Snapshots.xml",
    "org.maqet.Maqet1.Storage.xml",
    "org.maqet.Maqet1.Guest.xml",
    "org.maqet.Maqet1.Job.xml"
);

/// The shells whose completion `setup` installs (all three complete VM names).
const COMPLETION_SHELLS: [clap_complete::Shell; 3] = [
    clap_complete::Shell::Bash,
    clap_complete::Shell::Zsh,
    clap_complete::Shell::Fish,
];

/// Every file setup writes, with its content for these binaries.
fn files(at: &UserInstall, maqetd: &str, maqet: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fill = |t: &str| {
        t.replace("@MAQETD@", maqetd)
            .replace("@MAQET@", maqet)
            .into_bytes()
    };
    let mut out = vec![
        (at.systemd_unit(), fill(UNIT)),
        (at.dbus_service(), fill(DBUS_SERVICE)),
        (at.desktop_entry(), fill(DESKTOP_ENTRY)),
        (at.icon(), ICON.as_bytes().to_vec()),
        (at.search_provider(), SEARCH_PROVIDER.as_bytes().to_vec()),
        (at.krunner_plugin(), KRUNNER_PLUGIN.as_bytes().to_vec()),
    ];
    for (size, png) in PNG_ICONS {
        out.push((at.png_icon(size), png.to_vec()));
    }
    for (name, xml) in INTERFACES {
        out.push((at.dbus_interface(name), xml.as_bytes().to_vec()));
    }
    for shell in COMPLETION_SHELLS {
        let dynamic = super::complete::dynamic_shell(shell).expect("a dynamic shell");
        out.push((
            at.completion(&shell.to_string()),
            super::complete::registration(dynamic, maqet),
        ));
    }
    for (name, page) in super::man_pages() {
        out.push((at.man_page(&name), page));
    }
    out
}

pub async fn run(
    json: bool,
    uninstall: bool,
    maqetd: Option<PathBuf>,
    autostart: bool,
) -> Result<ExitCode, MaqetError> {
    let at = UserInstall::from_env().map_err(|e| MaqetError::InvalidArgument(e.to_string()))?;
    let (action, maqetd_text, touched) = if uninstall {
        let mut removed = Vec::new();
        for (path, _) in files(&at, "", "") {
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &path, e)),
            }
        }
        if disable_autostart(&at)? {
            removed.push(at.autostart_link());
        }
        ("removed", None, removed)
    } else {
        let maqet = std::env::current_exe()
            .map_err(|e| MaqetError::Internal(format!("cannot find this maqet binary: {e}")))?;
        let maqetd = find_maqetd(maqetd, &maqet)?;
        let (maqetd, maqet) = (exec_path(&maqetd)?, exec_path(&maqet)?);
        let mut written = Vec::new();
        for (path, content) in files(&at, &maqetd, &maqet) {
            write_file(&path, &content)?;
            written.push(path);
        }
        if autostart {
            enable_autostart(&at)?;
            written.push(at.autostart_link());
        }
        ("installed", Some(maqetd), written)
    };
    let systemd = reload_systemd().await;
    let bus = reload_bus().await;
    if json {
        print_json(&json!({
            "action": action,
            "maqetd": maqetd_text,
            "files": touched,
            "autostart": at.autostart_link().symlink_metadata().is_ok(),
            "systemd_user": systemd,
            "session_bus": bus,
        }));
    } else {
        if touched.is_empty() {
            println!("nothing to remove: maqet was not set up for this user");
        }
        for p in &touched {
            println!("{action} {}", p.display());
        }
        if let Some(d) = maqetd_text {
            println!("maqetd: {d}");
        }
        println!("systemd --user: {systemd}");
        println!("session bus: {bus}");
        if action == "installed" {
            println!(
                "zsh: add {} to fpath (before compinit) for completion",
                at.completion("zsh")
                    .parent()
                    .unwrap_or(Path::new(""))
                    .display()
            );
            println!(
                "polkit (only for policy answers of `auth`): as root, install data/polkit-1/actions/org.maqet.policy into /usr/share/polkit-1/actions/"
            );
        }
    }
    Ok(ExitCode::Ok)
}

/// `--maqetd`, else the `maqetd` next to this `maqet` (both come from one build).
fn find_maqetd(given: Option<PathBuf>, maqet: &Path) -> Result<PathBuf, MaqetError> {
    let path = match given {
        Some(p) => std::path::absolute(&p)
            .map_err(|e| MaqetError::InvalidArgument(format!("bad path {}: {e}", p.display())))?,
        None => maqet.with_file_name("maqetd"),
    };
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
        _ => Err(MaqetError::InvalidArgument(format!(
            "no executable maqetd at {}: build it (cargo build --release) or name it with --maqetd PATH",
            path.display()
        ))),
    }
}

/// A path as unit, activation and desktop files can carry it unquoted.
fn exec_path(p: &Path) -> Result<String, MaqetError> {
    let s = p.to_str().unwrap_or("");
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+@,:~".contains(c));
    if plain {
        Ok(s.to_string())
    } else {
        Err(MaqetError::InvalidArgument(format!(
            "{} contains characters systemd, D-Bus and desktop files would need quoted (spaces, quotes, %, $, …); put maqet somewhere plainer, e.g. ~/.local/bin",
            p.display()
        )))
    }
}

/// Writes `content` to `path` whole or not at all (a temporary file, then a rename).
fn write_file(path: &Path, content: &[u8]) -> Result<(), MaqetError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".maqet-tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, content).map_err(|e| io_error("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error("write", path, e))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> MaqetError {
    MaqetError::Storage(format!("cannot {what} {}: {e}", path.display()))
}

/// `--autostart`: what `systemctl --user enable maqetd` does with the unit's
/// `WantedBy=default.target`, done directly so it works before the user manager runs.
fn enable_autostart(at: &UserInstall) -> Result<(), MaqetError> {
    let link = at.autostart_link();
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    }
    match std::fs::read_link(&link) {
        Ok(target) if target == at.systemd_unit() => return Ok(()),
        Ok(_) => std::fs::remove_file(&link).map_err(|e| io_error("replace", &link, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Something that is not a link: not ours to replace.
        Err(e) => return Err(io_error("replace (it is not a symlink)", &link, e)),
    }
    std::os::unix::fs::symlink(at.systemd_unit(), &link).map_err(|e| io_error("create", &link, e))
}

/// Removes the login link if it is one (true when it was there).
fn disable_autostart(at: &UserInstall) -> Result<bool, MaqetError> {
    let link = at.autostart_link();
    match std::fs::read_link(&link) {
        Ok(_) => std::fs::remove_file(&link)
            .map(|()| true)
            .map_err(|e| io_error("remove", &link, e)),
        Err(_) => Ok(false),
    }
}

/// Tells a running systemd user manager about the unit (absent: nothing to tell).
async fn reload_systemd() -> &'static str {
    let out = tokio::process::Command::new("systemctl")
        .args(["--user", "daemon-reload"])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => "reloaded",
        Ok(_) => "not running (nothing to reload)",
        Err(_) => "not installed (nothing to reload)",
    }
}

/// Asks the session bus to re-read its activation files.
async fn reload_bus() -> &'static str {
    let Ok(conn) = zbus::Connection::session().await else {
        return "not reachable (it reads the file when it starts)";
    };
    let reloaded = match zbus::fdo::DBusProxy::new(&conn).await {
        Ok(dbus) => dbus.reload_config().await.is_ok(),
        Err(_) => false,
    };
    if reloaded {
        "reloaded"
    } else {
        "did not reload (it reads the file when it starts)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_the_binaries() {
        let at = UserInstall {
            data_home: "/d".into(),
            config_home: "/c".into(),
        };
        let f = files(&at, "/opt/m/maqetd", "/opt/m/maqet");
        let get = |p: &str| {
            let bytes = &f.iter().find(|(path, _)| path == Path::new(p)).unwrap().1;
            String::from_utf8_lossy(bytes).into_owned()
        };
        assert!(get("/c/systemd/user/maqetd.service").contains("ExecStart=/opt/m/maqetd\n"));
        assert!(
            get("/d/dbus-1/services/org.maqet.Maqet1.service").contains("Exec=/opt/m/maqetd\n")
        );
        let entry = get("/d/applications/org.maqet.Maqet.desktop");
        assert!(entry.contains("Exec=sh -c \"/opt/m/maqet ls; exec /opt/m/maqet events\"\n"));
        assert!(get("/d/bash-completion/completions/maqet").contains("/opt/m/maqet"));
        assert!(get("/c/fish/completions/maqet.fish").contains("/opt/m/maqet"));
        assert!(get("/d/zsh/site-functions/_maqet").contains("/opt/m/maqet"));
        assert!(get("/d/man/man1/maqet.1").contains(".TH maqet 1"));
        assert!(
            f.iter()
                .all(|(_, c)| !String::from_utf8_lossy(c).contains("@MAQET"))
        );
    }

    /// Every interface of the contract is installed.
    #[test]
    fn every_interface_file_is_built_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dbus-interfaces");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("org.maqet."))
            .collect();
        let mut built_in: Vec<String> = INTERFACES.iter().map(|i| i.0.to_string()).collect();
        on_disk.sort();
        built_in.sort();
        assert_eq!(on_disk, built_in);
    }

    #[test]
    fn awkward_paths_are_refused() {
        assert!(exec_path(Path::new("/home/u/.local/bin/maqetd")).is_ok());
        assert!(exec_path(Path::new("/home/u/my bin/maqetd")).is_err());
        assert!(exec_path(Path::new("/home/u/100%/maqetd")).is_err());
    }
}
