//! The notification cards on the screen, remembered across maqetd restarts so a later
//! maqetd can still withdraw (`CloseNotification`) or replace (`replaces_id`) a card an
//! earlier one sent. Kept in `$XDG_RUNTIME_DIR/maqet/notifications.json`: a server's ids
//! mean something only to that server in this session, and the runtime directory ends
//! with the session. The file names the bus and the server's connection that handed out
//! the ids; under another bus or another server (GNOME Shell restarted) they are
//! another application's, so they are forgotten instead of closed. See docs/desktop.md.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::notice::Kind;

/// More than a file of 64 cards can hold: anything larger is not ours.
const MAX_FILE: u64 = 64 * 1024;

/// One card: the server's id, for which VM and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub id: u32,
    pub vm: String,
    pub kind: Kind,
}

/// Whose ids they are: the bus (`org.freedesktop.DBus.GetId`) and the notification
/// server's unique name on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub bus: String,
    pub server: String,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    owner: Owner,
    cards: Vec<Card>,
}

/// The file and what it holds.
pub struct CardFile {
    path: PathBuf,
}

impl CardFile {
    pub fn new(path: PathBuf) -> CardFile {
        CardFile { path }
    }

    /// The cards `owner` handed out, as an earlier maqetd left them (none when the file
    /// is missing, unreadable, or another server's).
    pub fn load(&self, owner: &Owner) -> Vec<Card> {
        match read_small(&self.path) {
            Ok(Some(text)) => match serde_json::from_str::<Saved>(&text) {
                Ok(saved) if saved.owner == *owner => saved.cards,
                Ok(_) => {
                    tracing::debug!("notification cards of another bus or server: forgotten");
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "ignoring an unreadable notification card file");
                    Vec::new()
                }
            },
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "ignoring the notification card file");
                Vec::new()
            }
        }
    }

    /// Replaces the file with these cards (removes it when there are none). Written
    /// beside it and renamed, so a crash leaves the old file or the new, never half.
    pub fn save(&self, owner: &Owner, cards: Vec<Card>) {
        let result = if cards.is_empty() {
            match fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let saved = Saved {
                owner: owner.clone(),
                cards,
            };
            write_replacing(&self.path, &serde_json::to_vec(&saved).unwrap_or_default())
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remember the notification cards: a later maqetd will not withdraw them");
        }
    }
}

/// The file's text: `None` when it does not exist. Never follows a symlink, never
/// blocks on a FIFO, refuses what is not a small regular file.
fn read_small(path: &Path) -> std::io::Result<Option<String>> {
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(std::io::Error::other("not a small regular file"));
    }
    let mut text = String::new();
    f.take(MAX_FILE).read_to_string(&mut text)?;
    Ok(Some(text))
}

fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::paths::create_private_dir(dir).map_err(std::io::Error::other)?;
    }
    let tmp = path.with_extension("json.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(server: &str) -> Owner {
        Owner {
            bus: "b1".into(),
            server: server.into(),
        }
    }

    #[test]
    fn cards_come_back_only_for_the_server_that_gave_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let file = CardFile::new(dir.path().join("maqet/notifications.json"));
        assert!(file.load(&owner(":1.5")).is_empty());
        let cards = vec![Card {
            id: 7,
            vm: "0b7c3f4e-1d2a-4c5b-9e8f-123456789abc".into(),
            kind: Kind::Crashed,
        }];
        file.save(&owner(":1.5"), cards.clone());
        assert_eq!(file.load(&owner(":1.5")), cards);
        assert!(file.load(&owner(":1.6")).is_empty(), "another server's ids");
        file.save(&owner(":1.5"), Vec::new());
        assert!(!dir.path().join("maqet/notifications.json").exists());
    }

    #[test]
    fn garbage_a_fifo_or_a_symlink_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notifications.json");
        let file = CardFile::new(path.clone());
        fs::write(&path, b"\0\0not json").unwrap();
        assert!(file.load(&owner(":1.5")).is_empty());
        fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(
            file.load(&owner(":1.5")).is_empty(),
            "a FIFO does not block"
        );
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(file.load(&owner(":1.5")).is_empty());
        // Saving replaces the symlink itself, never writes through it.
        file.save(
            &owner(":1.5"),
            vec![Card {
                id: 1,
                vm: "v".into(),
                kind: Kind::Stopped,
            }],
        );
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
    }
}
