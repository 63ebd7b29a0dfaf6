//! Every directory and file maqet uses, derived in one place.
//!
//! Nothing else in the crate builds a path from an environment variable or joins a
//! well-known file name: the service, the CLI and the tests all ask this module, so a
//! path can never be computed two different ways (a finding against the Python tool).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The XDG base directories maqet works under, for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Home directory: `~` in configs, and the base of XDG defaults.
    pub home: PathBuf,
    /// `$XDG_DATA_HOME/maqet`: the database and per-VM data (disks created from inline configs).
    pub data_dir: PathBuf,
    /// `$XDG_STATE_HOME/maqet`: QEMU logs.
    pub state_dir: PathBuf,
    /// `$XDG_CONFIG_HOME/maqet`: policy and service settings.
    pub config_dir: PathBuf,
    /// `$XDG_RUNTIME_DIR/maqet`: QMP sockets (0700).
    pub runtime_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(
        "cannot find the home directory: $HOME is not set and the password database has no entry for uid {0}"
    )]
    NoHome(u32),
    #[error(
        "$XDG_RUNTIME_DIR is not set and /run/user/{0} does not exist: maqet needs a per-user runtime directory for its QMP sockets (log in through a session manager, or export XDG_RUNTIME_DIR=/run/user/{0})"
    )]
    NoRuntimeDir(u32),
    #[error(
        "{path} is not safe to use: {reason}. Fix its ownership/permissions (chmod 700 {path}) and try again"
    )]
    Unsafe { path: PathBuf, reason: String },
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// Reads one environment variable as an absolute path; XDG says relative values are ignored.
fn absolute_env(get: &dyn Fn(&str) -> Option<OsString>, key: &str) -> Option<PathBuf> {
    get(key).map(PathBuf::from).filter(|p| p.is_absolute())
}

impl Paths {
    /// Derives every path from the process environment.
    pub fn from_env() -> Result<Paths, PathsError> {
        Self::from_lookup(&|key| std::env::var_os(key))
    }

    /// Derives every path from an environment lookup (the seam tests use).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<OsString>) -> Result<Paths, PathsError> {
        let uid = rustix::process::getuid().as_raw();
        let home = home_dir(get, uid)?;
        let xdg = |key: &str, default: &str| xdg_base(get, &home, key, default).join("maqet");
        let runtime_base = absolute_env(get, "XDG_RUNTIME_DIR")
            .or_else(|| {
                let p = PathBuf::from(format!("/run/user/{uid}"));
                p.is_dir().then_some(p)
            })
            .ok_or(PathsError::NoRuntimeDir(uid))?;
        Ok(Paths {
            data_dir: xdg("XDG_DATA_HOME", ".local/share"),
            state_dir: xdg("XDG_STATE_HOME", ".local/state"),
            config_dir: xdg("XDG_CONFIG_HOME", ".config"),
            runtime_dir: runtime_base.join("maqet"),
            home,
        })
    }

    /// The notification cards maqetd has on the screen (docs/desktop.md): in the runtime
    /// directory because their ids mean something only to this session's server.
    pub fn notification_cards(&self) -> PathBuf {
        self.runtime_dir.join("notifications.json")
    }

    /// The SQLite database: definitions, history, audit.
    pub fn database(&self) -> PathBuf {
        self.data_dir.join("maqet.db")
    }

    /// Per-VM data directory: relative paths of inline (`AddVM`) configs resolve here,
    /// and disks declared without `file` are created here.
    pub fn vm_data_dir(&self, vm_id: &str) -> PathBuf {
        self.data_dir.join("vms").join(vm_id)
    }

    /// The image store (`maqet image import|ls|rm`): one file per image.
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// Removes a VM's data directory if nothing is left in it (after its disks were
    /// deleted): files the user put there are never touched.
    pub fn remove_vm_data_dir_if_empty(&self, vm_id: &str) {
        let _ = fs::remove_dir(self.vm_data_dir(vm_id));
    }

    /// Per-VM runtime directory holding its QMP socket.
    pub fn vm_runtime_dir(&self, vm_id: &str) -> PathBuf {
        self.runtime_dir.join("vms").join(vm_id)
    }

    /// The listening QMP socket maqetd creates and passes to QEMU.
    pub fn qmp_socket(&self, vm_id: &str) -> PathBuf {
        self.vm_runtime_dir(vm_id).join("qmp.sock")
    }

    /// The serial console's listening socket (when maqet provides the console).
    pub fn console_socket(&self, vm_id: &str) -> PathBuf {
        self.vm_runtime_dir(vm_id).join("console.sock")
    }

    /// The host end of the guest agent's virtio-serial channel (`guest_agent: true`).
    pub fn agent_socket(&self, vm_id: &str) -> PathBuf {
        self.vm_runtime_dir(vm_id).join("agent.sock")
    }

    /// The SPICE or VNC server QEMU listens on (`display: spice | vnc`).
    pub fn display_socket(&self, vm_id: &str) -> PathBuf {
        self.vm_runtime_dir(vm_id).join("display.sock")
    }

    /// Directory of QEMU logs.
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }

    /// QEMU's stdout/stderr for one VM (named by id: names can change).
    pub fn vm_log(&self, vm_id: &str) -> PathBuf {
        self.log_dir().join(format!("{vm_id}.log"))
    }

    /// Access policy overrides.
    pub fn policy_file(&self) -> PathBuf {
        self.config_dir.join("policy.yaml")
    }

    /// maqetd settings (idle exit, notifications).
    pub fn settings_file(&self) -> PathBuf {
        self.config_dir.join("maqetd.yaml")
    }

    /// Removes a VM's runtime directory and what maqet keeps in it (sockets, screendumps
    /// in the making): only for a VM without a QEMU. Returns whether it is gone.
    pub fn remove_vm_runtime_dir(&self, vm_id: &str) -> bool {
        let dir = self.vm_runtime_dir(vm_id);
        // remove_dir_all does not follow symlinks; the directory is ours and 0700.
        match fs::remove_dir_all(&dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Creates the data directory (for the database) if missing.
    pub fn ensure_data_dir(&self) -> Result<(), PathsError> {
        create_private_dir(&self.data_dir)
    }

    /// Creates the log directory if missing.
    pub fn ensure_log_dir(&self) -> Result<(), PathsError> {
        create_private_dir(&self.log_dir())
    }

    /// Creates (or checks) a VM's runtime directory: owned by us and 0700 at every level
    /// maqet owns, so no other user can reach the QMP socket inside.
    pub fn ensure_vm_runtime_dir(&self, vm_id: &str) -> Result<PathBuf, PathsError> {
        create_private_dir(&self.runtime_dir)?;
        create_private_dir(&self.runtime_dir.join("vms"))?;
        let dir = self.vm_runtime_dir(vm_id);
        create_private_dir(&dir)?;
        Ok(dir)
    }
}

fn home_dir(get: &dyn Fn(&str) -> Option<OsString>, uid: u32) -> Result<PathBuf, PathsError> {
    absolute_env(get, "HOME")
        .or_else(|| home_from_passwd(uid))
        .ok_or(PathsError::NoHome(uid))
}

/// An XDG base directory: the variable when absolute, else `~/<default>`.
fn xdg_base(
    get: &dyn Fn(&str) -> Option<OsString>,
    home: &Path,
    key: &str,
    default: &str,
) -> PathBuf {
    absolute_env(get, key).unwrap_or_else(|| home.join(default))
}

/// Where `maqet setup --user` installs maqet for a desktop session: the files systemd,
/// the session bus, GNOME/KDE and D-Bus tools look for under the user's XDG
/// directories (no runtime directory needed, unlike [`Paths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInstall {
    /// `$XDG_DATA_HOME` (`~/.local/share`).
    pub data_home: PathBuf,
    /// `$XDG_CONFIG_HOME` (`~/.config`).
    pub config_home: PathBuf,
}

impl UserInstall {
    pub fn from_env() -> Result<UserInstall, PathsError> {
        Self::from_lookup(&|key| std::env::var_os(key))
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<OsString>) -> Result<UserInstall, PathsError> {
        let home = home_dir(get, rustix::process::getuid().as_raw())?;
        Ok(UserInstall {
            data_home: xdg_base(get, &home, "XDG_DATA_HOME", ".local/share"),
            config_home: xdg_base(get, &home, "XDG_CONFIG_HOME", ".config"),
        })
    }

    /// The systemd user unit.
    pub fn systemd_unit(&self) -> PathBuf {
        self.config_home.join("systemd/user/maqetd.service")
    }

    /// The link that makes the user manager start maqetd at login (what
    /// `systemctl --user enable maqetd` makes from the unit's `WantedBy=default.target`).
    pub fn autostart_link(&self) -> PathBuf {
        self.config_home
            .join("systemd/user/default.target.wants/maqetd.service")
    }

    /// The session bus's activation file for `org.maqet.Maqet1`.
    pub fn dbus_service(&self) -> PathBuf {
        self.data_home
            .join("dbus-1/services/org.maqet.Maqet1.service")
    }

    /// Introspection XML of one interface (`org.maqet.Maqet1.VM.xml`), for D-Bus tools.
    pub fn dbus_interface(&self, file_name: &str) -> PathBuf {
        self.data_home.join("dbus-1/interfaces").join(file_name)
    }

    /// The desktop entry notifications name in their `desktop-entry` hint.
    pub fn desktop_entry(&self) -> PathBuf {
        self.data_home.join("applications/org.maqet.Maqet.desktop")
    }

    pub fn icon(&self) -> PathBuf {
        self.data_home
            .join("icons/hicolor/scalable/apps/org.maqet.Maqet.svg")
    }

    /// The icon rendered at `size`×`size` pixels, for what cannot draw SVG.
    pub fn png_icon(&self, size: u32) -> PathBuf {
        self.data_home.join(format!(
            "icons/hicolor/{size}x{size}/apps/org.maqet.Maqet.png"
        ))
    }

    /// GNOME Shell's registration of maqetd's search provider.
    pub fn search_provider(&self) -> PathBuf {
        self.data_home
            .join("gnome-shell/search-providers/org.maqet.Maqet1.search-provider.ini")
    }

    /// KRunner's (Plasma's) registration of maqetd's D-Bus runner.
    pub fn krunner_plugin(&self) -> PathBuf {
        self.data_home
            .join("krunner/dbusplugins/org.maqet.Maqet1.desktop")
    }

    /// Where bash-completion, zsh and fish look for `maqet`'s completion script (zsh
    /// only once the directory is on `fpath`; `setup` says so).
    pub fn completion(&self, shell: &str) -> PathBuf {
        match shell {
            "bash" => self.data_home.join("bash-completion/completions/maqet"),
            "zsh" => self.data_home.join("zsh/site-functions/_maqet"),
            _ => self.config_home.join("fish/completions/maqet.fish"),
        }
    }

    /// A man page of section 1 (`man` finds `~/.local/share/man` through `~/.local/bin`
    /// on `PATH`).
    pub fn man_page(&self, file_name: &str) -> PathBuf {
        self.data_home.join("man/man1").join(file_name)
    }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks an existing one is a
/// directory we own that nobody else can enter. Never follows a symlink at the last step.
pub fn create_private_dir(dir: &Path) -> Result<(), PathsError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(source) => {
            return Err(PathsError::Create {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|source| PathsError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    let unsafe_dir = |reason: String| PathsError::Unsafe {
        path: dir.to_path_buf(),
        reason,
    };
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory (a symlink?)".into()));
    }
    let uid = rustix::process::getuid().as_raw();
    if meta.uid() != uid {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by you (uid {uid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        // Ours, but too open (e.g. made by an old version): tighten rather than refuse.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            PathsError::Create {
                path: dir.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

fn home_from_passwd(uid: u32) -> Option<PathBuf> {
    // getpwuid_r is the only portable source when $HOME is unset (e.g. some activations).
    let mut buf = vec![0u8; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call; buf outlives pwd's strings' use.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir points into buf and is NUL-terminated.
    let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
    use std::os::unix::ffi::OsStrExt;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn xdg_variables_win_and_defaults_follow_home() {
        let p = Paths::from_lookup(&lookup(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "/d"),
            ("XDG_RUNTIME_DIR", "/r"),
        ]))
        .unwrap();
        assert_eq!(p.data_dir, Path::new("/d/maqet"));
        assert_eq!(p.state_dir, Path::new("/home/u/.local/state/maqet"));
        assert_eq!(p.config_dir, Path::new("/home/u/.config/maqet"));
        assert_eq!(p.database(), Path::new("/d/maqet/maqet.db"));
        assert_eq!(p.qmp_socket("abc"), Path::new("/r/maqet/vms/abc/qmp.sock"));
        assert_eq!(
            p.vm_log("abc"),
            Path::new("/home/u/.local/state/maqet/logs/abc.log")
        );
    }

    #[test]
    fn install_locations_follow_xdg() {
        let i =
            UserInstall::from_lookup(&lookup(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "/c")]))
                .unwrap();
        assert_eq!(
            i.systemd_unit(),
            Path::new("/c/systemd/user/maqetd.service")
        );
        assert_eq!(
            i.dbus_service(),
            Path::new("/home/u/.local/share/dbus-1/services/org.maqet.Maqet1.service")
        );
        assert_eq!(
            i.icon(),
            Path::new("/home/u/.local/share/icons/hicolor/scalable/apps/org.maqet.Maqet.svg")
        );
    }

    #[test]
    fn relative_xdg_values_are_ignored() {
        let p = Paths::from_lookup(&lookup(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "relative/dir"),
            ("XDG_RUNTIME_DIR", "/r"),
        ]))
        .unwrap();
        assert_eq!(p.data_dir, Path::new("/home/u/.local/share/maqet"));
    }

    #[test]
    fn runtime_dirs_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        fs::create_dir(&run).unwrap();
        let p = Paths::from_lookup(&lookup(&[
            ("HOME", tmp.path().to_str().unwrap()),
            ("XDG_RUNTIME_DIR", run.to_str().unwrap()),
        ]))
        .unwrap();
        let dir = p.ensure_vm_runtime_dir("vm1").unwrap();
        for d in [&p.runtime_dir, &dir] {
            let mode = fs::metadata(d).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // A loosened directory is tightened again.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        p.ensure_vm_runtime_dir("vm1").unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_symlink_is_not_accepted_as_a_private_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            create_private_dir(&link),
            Err(PathsError::Unsafe { .. })
        ));
    }
}
