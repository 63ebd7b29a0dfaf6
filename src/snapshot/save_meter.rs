//! How far a live save has got, observed from outside QEMU.
//!
//! QEMU's `snapshot-save` job reports nothing while it writes the VM state: the save
//! runs as one bottom half of QEMU's main loop (`snapshot_save_job_bh` →
//! `save_snapshot` in `migration/savevm.c`), so no event is sent and no QMP command
//! (`query-jobs`, `query-migrate`) is answered until it ends. What can be seen from
//! outside is the writing itself. maqet measures the bytes written since the save
//! began in two ways and takes the larger:
//! - the growth of the disk file that receives the VM state (size and allocated
//!   blocks, by `fstat` of maqet's own `O_PATH` descriptor of it): the vmstate is
//!   appended to the qcow2 file;
//! - QEMU's `wchar` (bytes passed to `write`-family calls, `/proc/<pid>/io`): this
//!   also counts a vmstate written into clusters freed by a deleted snapshot, which
//!   does not grow the file.
//!
//! The expected total is the RAM QEMU can have to write: the guest's RAM, or QEMU's
//! resident memory when that is smaller (RAM the guest never touched is not resident,
//! and saves as a few bytes a page). Zero pages the guest did touch save small too, so
//! the total is an upper bound and the fraction may stop short before the save ends;
//! it is capped at [`CAP`] until the job's outcome sets 1.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// How often a running save is measured (only while a save runs; 5 Hz bounds the
/// `PropertiesChanged` rate).
pub const INTERVAL: Duration = Duration::from_millis(200);

/// The least measured progress reported: smaller values are QEMU's other writes.
pub const FIRST_STEP: f64 = 0.01;

/// The most a save's measured progress may show: 1 is the job's end, not the last write.
pub const CAP: f64 = 0.95;

/// Device state and format metadata beyond the RAM (video RAM, qcow2 tables).
const MARGIN: u64 = 16 << 20;

/// One save being measured.
pub(super) struct SaveMeter {
    disk: Option<File>,
    pid: Option<u32>,
    base_file: u64,
    base_wchar: Option<u64>,
    total: u64,
    best: f64,
}

impl SaveMeter {
    /// Starts measuring just before the save is sent: the VM state goes to
    /// `state_disk`; `pid` is QEMU's; `guest_ram` from `query-memory-size-summary`.
    pub fn start(state_disk: &Path, pid: Option<u32>, guest_ram: u64) -> SaveMeter {
        // O_PATH: never blocks (the path could name a FIFO) and reads nothing.
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(state_disk)
            .ok();
        SaveMeter {
            base_file: disk.as_ref().map_or(0, file_bytes),
            disk,
            pid,
            base_wchar: pid.and_then(wchar),
            total: expected_total(guest_ram, pid.and_then(resident_bytes)),
            best: 0.0,
        }
    }

    /// Bytes written since the start (the larger of the two measures).
    pub fn written(&self) -> u64 {
        let grown = self
            .disk
            .as_ref()
            .map_or(0, |f| file_bytes(f).saturating_sub(self.base_file));
        let wrote = match (self.base_wchar, self.pid.and_then(wchar)) {
            (Some(base), Some(now)) => now.saturating_sub(base),
            _ => 0,
        };
        grown.max(wrote)
    }

    /// The expected total in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Measures again: the fraction done, never lower than the one before, at most [`CAP`].
    pub fn measure(&mut self) -> (f64, u64) {
        let written = self.written();
        self.best = self.best.max(fraction(written, self.total));
        (self.best, written)
    }
}

/// `written / total`, capped at [`CAP`].
fn fraction(written: u64, total: u64) -> f64 {
    (written as f64 / total.max(1) as f64).min(CAP)
}

/// What a save of a guest with `guest_ram` can write, given QEMU's resident memory.
fn expected_total(guest_ram: u64, resident: Option<u64>) -> u64 {
    let ram = match (guest_ram, resident) {
        (0, Some(r)) => r,
        (g, Some(r)) => g.min(r),
        (g, None) => g,
    };
    ram.saturating_add(MARGIN)
}

/// The larger of the file's size and its allocated bytes.
fn file_bytes(f: &File) -> u64 {
    f.metadata()
        .map(|m| m.size().max(m.blocks().saturating_mul(512)))
        .unwrap_or(0)
}

/// `wchar` of `/proc/<pid>/io`.
fn wchar(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    field(&text, "wchar:")
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field(&text, "VmRSS:").map(|kib| kib.saturating_mul(1024))
}

/// The number after `key` on the line that starts with it.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_the_smaller_of_guest_ram_and_resident_memory_plus_a_margin() {
        assert_eq!(
            expected_total(1 << 30, Some(300 << 20)),
            (300 << 20) + MARGIN
        );
        assert_eq!(expected_total(1 << 30, Some(2 << 30)), (1 << 30) + MARGIN);
        assert_eq!(expected_total(1 << 30, None), (1 << 30) + MARGIN);
        assert_eq!(expected_total(0, Some(5 << 20)), (5 << 20) + MARGIN);
        assert_eq!(expected_total(0, None), MARGIN);
    }

    #[test]
    fn the_fraction_is_capped_below_one() {
        assert_eq!(fraction(0, 100), 0.0);
        assert_eq!(fraction(50, 100), 0.5);
        assert_eq!(fraction(500, 100), CAP);
        assert_eq!(fraction(5, 0), CAP);
    }

    #[test]
    fn proc_fields_are_parsed_by_key() {
        let io = "rchar: 10\nwchar: 4096\nsyscr: 1\n";
        assert_eq!(field(io, "wchar:"), Some(4096));
        assert_eq!(field(io, "rchar:"), Some(10));
        assert_eq!(field(io, "nope:"), None);
        assert_eq!(field("VmRSS:\t  2048 kB\n", "VmRSS:"), Some(2048));
        assert_eq!(field("wchar: x\n", "wchar:"), None);
    }

    #[test]
    fn a_growing_file_and_this_process_writes_are_measured_and_never_go_back() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("maqet-meter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.qcow2");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        let mut m = SaveMeter::start(&path, Some(std::process::id()), 64 << 20);
        // The test process is not a guest: its resident memory bounds the total.
        assert!(m.total() > MARGIN && m.total() <= (64 << 20) + MARGIN);
        let (p0, _) = m.measure();
        f.write_all(&vec![2u8; 4 << 20]).unwrap();
        let (p1, written) = m.measure();
        assert!(written >= 4 << 20, "{written}");
        assert!(p1 > p0, "{p0} → {p1}");
        f.set_len(0).unwrap();
        let (p2, _) = m.measure();
        assert!(p2 >= p1, "progress went back: {p1} → {p2}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_or_missing_disk_and_no_pid_measure_nothing_without_blocking() {
        let dir = std::env::temp_dir().join(format!("maqet-meter-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for path in [fifo.as_path(), &dir.join("missing")] {
            let mut m = SaveMeter::start(path, None, 1 << 30);
            assert_eq!(m.measure(), (0.0, 0));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
