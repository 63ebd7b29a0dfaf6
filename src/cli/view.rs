//! `maqet view VM`: the user's viewer (remote-viewer by default) on the VM's SPICE or
//! VNC display.
//!
//! Viewers take an address, not a file descriptor, so maqet bridges: it listens, points
//! the viewer at its address and joins every connection the viewer makes to a fresh
//! `VM.OpenDisplay` socket (SPICE opens one per channel). SPICE gets a unix socket in a
//! private (0700) directory (`spice+unix://…`). remote-viewer cannot open VNC on a unix
//! socket, so VNC gets a loopback TCP port (`vnc://127.0.0.1:N`) that accepts only
//! connections from this user's own sockets (checked in `/proc/net/tcp`); anyone else's
//! is closed unanswered. With `--host`, each
//! connection is carried by `ssh HOST maqet display-stdio VM` instead, which opens the
//! display on the far side: the file descriptor never has to cross ssh.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::session::{Session, vm};
use crate::config::DisplayServer;
use crate::error::MaqetError;

/// The viewer when none is configured.
const DEFAULT_VIEWER: &str = "remote-viewer";
/// Names the viewer command (split on spaces; the address is appended).
pub const VIEWER_ENV: &str = "MAQET_VIEWER";

/// How each of the viewer's connections reaches the display.
enum Connector {
    Local(crate::client::VmProxy<'static>),
    /// `(program, args)` of the ssh command that relays one connection.
    Ssh(String, Vec<std::ffi::OsString>),
}

pub(super) async fn run(s: &Session, name: &str, host: Option<&str>) -> Result<(), MaqetError> {
    if s.json {
        return Err(MaqetError::InvalidArgument(
            "view opens a window: --json does not apply".into(),
        ));
    }
    let viewer = viewer_command()?;
    let (_, proxy) = vm(s, name).await?;
    let (server, first, connector) = match host {
        None => {
            // Asked first: the service's own refusal (stopped, no display) is the answer.
            let first: OwnedFd = proxy.open_display().await?.into();
            let server = display_server(&proxy.config().await?).ok_or_else(|| {
                MaqetError::InvalidArgument(format!(
                    "VM '{name}' serves a display from its own QEMU arguments; maqet view opens \
                     the one `display: spice` (or `display: vnc`) gives it"
                ))
            })?;
            (server, Some(first), Connector::Local(proxy))
        }
        Some(host) => {
            let server = remote_display(&proxy, name, host).await?;
            let (program, args) = super::remote::ssh_command(
                host,
                &format!("maqet display-stdio {}", remote_vm_name(name)?),
            )?;
            (server, None, Connector::Ssh(program, args))
        }
    };
    let dir = private_dir()?;
    let listener = Listener::bind(server, dir.path()).await?;
    let mut child = spawn_viewer(&viewer, name, &listener.address()?)?;
    let mut first = first;
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let status = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Some(conn) = accepted else { continue };
                let display = match first.take() {
                    Some(fd) => Display::Fd(fd),
                    None => match connect(&connector).await {
                        Ok(d) => d,
                        Err(e) => {
                            eprintln!("maqet: cannot open another connection to the display of {name}: {e}");
                            continue;
                        }
                    },
                };
                tokio::spawn(relay(conn, display));
            }
            status = child.wait() => break Some(status),
            _ = term.recv() => break None,
            _ = int.recv() => break None,
        }
    };
    drop(listener);
    drop(dir);
    match status {
        Some(Ok(st)) if st.success() => Ok(()),
        Some(Ok(st)) => Err(MaqetError::Internal(format!(
            "the viewer ({}) exited with {st}",
            viewer[0]
        ))),
        Some(Err(e)) => Err(io_error("waiting for the viewer", e)),
        // kill_on_drop closes the viewer with us.
        None => Ok(()),
    }
}

/// The viewer command: `MAQET_VIEWER`, else `viewer:` in maqetd.yaml, else remote-viewer;
/// refused with what to install when it is not on PATH.
fn viewer_command() -> Result<Vec<String>, MaqetError> {
    let configured = match std::env::var(VIEWER_ENV) {
        Ok(v) if !v.trim().is_empty() => v.split_whitespace().map(str::to_owned).collect(),
        _ => crate::paths::Paths::from_env()
            .map(|p| crate::settings::Settings::load(&p.settings_file()).0.viewer)
            .unwrap_or_default(),
    };
    let custom = !configured.is_empty();
    let command = if custom {
        configured
    } else {
        vec![DEFAULT_VIEWER.to_owned()]
    };
    if let Err(e) = crate::config::find_binary(&command[0], std::env::var_os("PATH").as_deref()) {
        let message = if custom {
            format!(
                "the display viewer `{}` (from {VIEWER_ENV} or `viewer:` in maqetd.yaml) cannot be run: {}",
                command[0], e.message
            )
        } else {
            format!(
                "no display viewer: {DEFAULT_VIEWER} is not installed. Install virt-viewer \
                 (Debian/Ubuntu: apt install virt-viewer; Fedora: dnf install virt-viewer), or \
                 name another viewer in {VIEWER_ENV} or `viewer:` in ~/.config/maqet/maqetd.yaml \
                 (it gets a spice+unix:// or vnc://127.0.0.1 address)"
            )
        };
        return Err(MaqetError::NotFound(message));
    }
    Ok(command)
}

/// Where the viewer connects.
enum Listener {
    Unix(UnixListener, PathBuf),
    /// Loopback only, and only this user's connections are served.
    Tcp(tokio::net::TcpListener),
}

/// A viewer connection.
type Conn = Box<dyn AsyncStream>;
trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AsyncStream for T {}

impl Listener {
    async fn bind(server: DisplayServer, dir: &Path) -> Result<Listener, MaqetError> {
        match server {
            DisplayServer::Spice => {
                let socket = dir.join("spice.sock");
                let listener = UnixListener::bind(&socket)
                    .map_err(|e| io_error(&format!("cannot listen on {}", socket.display()), e))?;
                Ok(Listener::Unix(listener, socket))
            }
            DisplayServer::Vnc => tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .map(Listener::Tcp)
                .map_err(|e| io_error("cannot listen on a loopback port", e)),
        }
    }

    fn address(&self) -> Result<String, MaqetError> {
        match self {
            Listener::Unix(_, path) => Ok(format!("spice+unix://{}", path.display())),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("vnc://{a}"))
                .map_err(|e| io_error("loopback port", e)),
        }
    }

    /// The next connection worth serving (`None`: refused or failed, keep going).
    async fn accept(&self) -> Option<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().await.ok().map(|(c, _)| Box::new(c) as Conn),
            Listener::Tcp(l) => {
                let (conn, peer) = l.accept().await.ok()?;
                let local = conn.local_addr().ok()?;
                let me = rustix::process::getuid().as_raw();
                match tcp_peer_uid(&std::fs::read_to_string("/proc/net/tcp").ok()?, peer, local) {
                    Some(uid) if uid == me => Some(Box::new(conn)),
                    other => {
                        eprintln!(
                            "maqet: refused a display connection from {peer} (owner uid {other:?}, not {me})"
                        );
                        None
                    }
                }
            }
        }
    }
}

/// The uid owning the socket at `peer` connected to `local`, from `/proc/net/tcp`'s text
/// (hex `ADDR:PORT` columns, the address in the kernel's byte order).
fn tcp_peer_uid(
    table: &str,
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
) -> Option<u32> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        )),
        std::net::SocketAddr::V6(_) => None,
    };
    let (peer, local) = (hex(peer)?, hex(local)?);
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 7 && cols[1] == peer && cols[2] == local)
            .then(|| cols[7].parse().ok())
            .flatten()
    })
}

fn spawn_viewer(
    viewer: &[String],
    name: &str,
    address: &str,
) -> Result<tokio::process::Child, MaqetError> {
    let mut cmd = tokio::process::Command::new(&viewer[0]);
    cmd.args(&viewer[1..]);
    if viewer[0] == DEFAULT_VIEWER {
        cmd.arg(format!("--title={name} (maqet)"));
    }
    cmd.arg(address)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| io_error(&format!("cannot run the viewer {}", viewer[0]), e))
}

/// `display:` of a VM's merged config, when it is one of maqet's servers.
fn display_server(config_yaml: &str) -> Option<DisplayServer> {
    let doc: serde_yaml::Value = serde_yaml::from_str(config_yaml).ok()?;
    DisplayServer::parse(doc.get("display")?.as_str()?)
}

/// Over ssh the display cannot be asked for up front (no fd crosses), so the same
/// refusals are worked out from the VM's status and config.
async fn remote_display(
    proxy: &crate::client::VmProxy<'static>,
    name: &str,
    host: &str,
) -> Result<DisplayServer, MaqetError> {
    let status = proxy.status().await?;
    if !matches!(status.as_str(), "running" | "paused") {
        return Err(MaqetError::InvalidState(format!(
            "VM '{name}' on {host} is {status}: start it first (maqet --host {host} start {name})"
        )));
    }
    display_server(&proxy.config().await?).ok_or_else(|| {
        MaqetError::InvalidArgument(format!(
            "VM '{name}' on {host} has no SPICE or VNC display: set `display: spice` (or \
             `display: vnc`) in its config (maqet apply) and restart it"
        ))
    })
}

/// The VM's name as a word of the remote shell command: only characters that need no
/// quoting (every VM name and UUID qualifies).
fn remote_vm_name(name: &str) -> Result<&str, MaqetError> {
    let plain = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if plain {
        Ok(name)
    } else {
        Err(MaqetError::InvalidArgument(format!(
            "invalid VM name '{name}': use the VM's name or UUID"
        )))
    }
}

/// One connection to the display.
enum Display {
    Fd(OwnedFd),
    Ssh(tokio::process::Child),
}

async fn connect(connector: &Connector) -> Result<Display, MaqetError> {
    match connector {
        Connector::Local(proxy) => Ok(Display::Fd(proxy.open_display().await?.into())),
        Connector::Ssh(program, args) => {
            let child = tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| io_error(&format!("cannot run {program}"), e))?;
            Ok(Display::Ssh(child))
        }
    }
}

/// Copies bytes both ways between a viewer connection and the display until either
/// side closes.
async fn relay(viewer: Conn, display: Display) {
    let (mut from_viewer, mut to_viewer) = tokio::io::split(viewer);
    match display {
        Display::Fd(fd) => {
            let Ok(display) = to_tokio(fd) else { return };
            let (mut from_display, mut to_display) = display.into_split();
            join_copies(
                &mut from_viewer,
                &mut to_display,
                &mut from_display,
                &mut to_viewer,
            )
            .await;
        }
        Display::Ssh(mut child) => {
            let (Some(mut to_display), Some(mut from_display)) =
                (child.stdin.take(), child.stdout.take())
            else {
                return;
            };
            join_copies(
                &mut from_viewer,
                &mut to_display,
                &mut from_display,
                &mut to_viewer,
            )
            .await;
        }
    }
}

/// Runs both directions until one ends (its reader closed or a write failed).
async fn join_copies<A, B, C, D>(a_in: &mut A, a_out: &mut B, b_in: &mut C, b_out: &mut D)
where
    A: tokio::io::AsyncRead + Unpin,
    B: tokio::io::AsyncWrite + Unpin,
    C: tokio::io::AsyncRead + Unpin,
    D: tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy(a_in, a_out) => {}
        _ = tokio::io::copy(b_in, b_out) => {}
    }
}

fn to_tokio(fd: OwnedFd) -> std::io::Result<UnixStream> {
    let socket = std::os::unix::net::UnixStream::from(fd);
    socket.set_nonblocking(true)?;
    UnixStream::from_std(socket)
}

/// `maqet display-stdio VM` (run by `maqet --host … view` through ssh): this machine's
/// display of the VM on standard input and output, for one connection.
pub(super) async fn stdio(s: &Session, name: &str) -> Result<(), MaqetError> {
    s.need_fd_passing("display-stdio")?;
    let (_, proxy) = vm(s, name).await?;
    let fd: OwnedFd = proxy.open_display().await?.into();
    let display = std::os::unix::net::UnixStream::from(fd);
    let to_display = display
        .try_clone()
        .map_err(|e| io_error("cannot use the display socket", e))?;
    // Blocking copies on threads of their own: stdin and stdout are whatever ssh gave us.
    std::thread::spawn(move || {
        let mut to_display = to_display;
        pump(&mut std::io::stdin().lock(), &mut to_display);
        // The viewer's side closed: so does ours, and QEMU closes its end in turn.
        let _ = to_display.shutdown(std::net::Shutdown::Write);
    });
    tokio::task::spawn_blocking(move || {
        let mut display = display;
        pump(&mut display, &mut std::io::stdout().lock());
    })
    .await
    .map_err(|e| MaqetError::Internal(format!("display relay: {e}")))?;
    Ok(())
}

/// Copies until end of input or a failed write. A plain read/write loop, not
/// `std::io::copy`: that splices pipe to socket, holding the pipe's lock while it waits,
/// so the other end closing the pipe hung in the kernel (Linux 6.18).
fn pump(from: &mut impl std::io::Read, to: &mut impl std::io::Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// A directory only this user can enter, removed when dropped: under
/// `$XDG_RUNTIME_DIR` (a tmpfs of the user's own), else the temp directory.
fn private_dir() -> Result<TempDir, MaqetError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let path = base.join(format!("maqet-view-{}", uuid::Uuid::new_v4().simple()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|e| io_error(&format!("cannot create {}", path.display()), e))?;
    Ok(TempDir(path))
}

use std::os::unix::fs::DirBuilderExt;

struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn signal(
    kind: tokio::signal::unix::SignalKind,
) -> Result<tokio::signal::unix::Signal, MaqetError> {
    tokio::signal::unix::signal(kind).map_err(|e| io_error("cannot watch signals", e))
}

fn io_error(what: &str, e: std::io::Error) -> MaqetError {
    MaqetError::Internal(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_display_key_names_the_protocol() {
        assert_eq!(
            display_server("name: a\ndisplay: spice\n"),
            Some(DisplayServer::Spice)
        );
        assert_eq!(display_server("display: vnc\n"), Some(DisplayServer::Vnc));
        assert_eq!(display_server("display: gtk\n"), None);
        assert_eq!(display_server("memory: 1\n"), None);
        assert_eq!(display_server(": not yaml ["), None);
    }

    #[test]
    fn the_peer_uid_comes_from_the_matching_row() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:A000 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n\
   1: 0100007F:B000 0100007F:A000 01 00000000:00000000 00:00000000 00000000  1001        0 2 1\n\
   2: 0100007F:A000 0100007F:B000 01 00000000:00000000 00:00000000 00000000  1000        0 3 1\n";
        let listener: std::net::SocketAddr = "127.0.0.1:40960".parse().unwrap();
        let peer: std::net::SocketAddr = "127.0.0.1:45056".parse().unwrap();
        assert_eq!(tcp_peer_uid(table, peer, listener), Some(1001));
        let stranger: std::net::SocketAddr = "127.0.0.1:45057".parse().unwrap();
        assert_eq!(tcp_peer_uid(table, stranger, listener), None);
    }

    #[test]
    fn only_plain_names_reach_the_remote_shell() {
        assert!(remote_vm_name("web-1.test_x").is_ok());
        assert!(remote_vm_name("a;rm -rf ~").is_err());
        assert!(remote_vm_name("$(id)").is_err());
        assert!(remote_vm_name("-oProxyCommand").is_err());
        assert!(remote_vm_name("").is_err());
    }
}
