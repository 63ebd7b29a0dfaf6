//! Host files QEMU uses (disks, firmware, kernels, ISOs, shares), as the argv names
//! them.
//!
//! QEMU must never open these by name: a path component swapped for a symlink between
//! maqetd's check and QEMU's open would redirect it. So the argv keeps each such path as
//! a slot ([`Seg::File`]); maqetd opens the file itself at start (`storage::hostfiles`)
//! and fills the slot with what QEMU resolves to the already-open fd: `/dev/fdset/<S>`
//! (block layer, with `-add-fd`) or `/proc/self/fd/<N>` (options that take a plain
//! path). [`VmConfig::qemu_args`](super::VmConfig::qemu_args) fills the slots with the
//! paths themselves, for people and logs.

use std::path::PathBuf;

/// How QEMU will use the file, so maqetd opens it with matching access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Opened read-only (`readonly` disks, ISOs, backing images, kernels, firmware).
    Read,
    /// Opened read-write (a writable disk, a pflash).
    ReadWrite,
    /// A directory (a virtfs share root).
    Directory,
}

/// How the slot is filled at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassAs {
    /// `/dev/fdset/<S>` with `-add-fd fd=N,set=S`: QEMU's block layer dups the fd of
    /// the set whose access mode matches the one it wants.
    FdSet,
    /// `/proc/self/fd/<N>`: for options QEMU opens with a plain `open()`; in the QEMU
    /// process that path is the fd maqetd placed there.
    ProcFd,
}

/// One host file of a VM's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    /// Absolute, resolved (no symlinks, no `..`): what maqetd opens with no symlinks
    /// allowed.
    pub path: PathBuf,
    pub access: Access,
    pub pass: PassAs,
    /// QEMU may read it as qcow2 (format `qcow2`, or probed), whose header can name a
    /// backing file: maqetd checks that name at start.
    pub qcow2: bool,
    /// For a qcow2 `-drive` image: the option prefix (`backing.`) under which maqetd
    /// adds the fd-passed backing chain to the drive's word (a [`Seg::Chain`] slot).
    /// `None`: a backing named in the header is opened by QEMU by name.
    pub chain: Option<String>,
}

/// A piece of one argv word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Text(String),
    /// `host_files[index]`; `escaped`: inside a suboption list, where QEMU doubles commas.
    File {
        index: usize,
        escaped: bool,
    },
    /// The backing chain options of `host_files[index]` (`,backing.driver=…`), filled at
    /// start; empty when named by path.
    Chain {
        index: usize,
    },
}

/// Stands in for a host file while the argv is built as plain strings. The nonce is
/// random per validation, so no text from a config can forge a slot.
pub(crate) struct Markers {
    prefix: String,
}

const DELIM: char = '\u{1f}';

impl Markers {
    pub fn new() -> Markers {
        Markers {
            prefix: format!("{DELIM}maqet-{}#", uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn marker(&self, index: usize, escaped: bool) -> String {
        format!("{}{index}:{}{DELIM}", self.prefix, u8::from(escaped))
    }

    pub fn chain_marker(&self, index: usize) -> String {
        format!("{}{index}:c{DELIM}", self.prefix)
    }

    /// Splits a built word back into text and slots.
    pub fn split(&self, word: &str) -> Vec<Seg> {
        let mut segs = Vec::new();
        let mut rest = word;
        while let Some(at) = rest.find(&self.prefix) {
            if at > 0 {
                segs.push(Seg::Text(rest[..at].to_owned()));
            }
            let after = &rest[at + self.prefix.len()..];
            let end = after.find(DELIM).expect("markers are well formed");
            let (index, kind) = after[..end].split_once(':').expect("index:kind");
            let index = index.parse().expect("marker index");
            segs.push(match kind {
                "c" => Seg::Chain { index },
                _ => Seg::File {
                    index,
                    escaped: kind == "1",
                },
            });
            rest = &after[end + DELIM.len_utf8()..];
        }
        if !rest.is_empty() || segs.is_empty() {
            segs.push(Seg::Text(rest.to_owned()));
        }
        segs
    }
}

/// Joins a word's pieces, filling each file slot with `fill(index)` (escaped where
/// needed) and each chain slot with `chain(index)`.
pub(crate) fn render(
    word: &[Seg],
    fill: &dyn Fn(usize) -> String,
    chain: &dyn Fn(usize) -> String,
) -> String {
    let mut out = String::new();
    for seg in word {
        match seg {
            Seg::Text(t) => out.push_str(t),
            Seg::File { index, escaped } => {
                let text = fill(*index);
                if *escaped {
                    out.push_str(&super::escape_commas(&text));
                } else {
                    out.push_str(&text);
                }
            }
            Seg::Chain { index } => out.push_str(&chain(*index)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_cannot_be_forged() {
        let m = Markers::new();
        let word = format!("file={},format=raw,serial=x", m.marker(3, true));
        assert_eq!(
            m.split(&word),
            [
                Seg::Text("file=".into()),
                Seg::File {
                    index: 3,
                    escaped: true
                },
                Seg::Text(",format=raw,serial=x".into()),
            ]
        );
        // Another validation's markers are plain text here.
        let other = Markers::new().marker(0, false);
        assert_eq!(m.split(&other), [Seg::Text(other.clone())]);
        let filled = render(&m.split(&word), &|_| "/a,b".to_owned(), &|_| String::new());
        assert_eq!(filled, "file=/a,,b,format=raw,serial=x");
        let word = format!("file={},id=d{}", m.marker(0, true), m.chain_marker(0));
        let filled = render(&m.split(&word), &|_| "/x".into(), &|i| format!(",c{i}"));
        assert_eq!(filled, "file=/x,id=d,c0");
    }
}
