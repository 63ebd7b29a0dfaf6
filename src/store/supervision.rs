//! What maqetd must find again after a restart besides the VM rows: the swtpm of a
//! running VM with `tpm: true` (`tpm_processes`) and the recent crashes its restart
//! policy counts (`restart_crashes`).

use rusqlite::{OptionalExtension, params};

use super::error::vm_row_error;
use super::{Database, StoreError, get_u64, to_i64};

impl Database {
    /// Records the VM's swtpm (pid and start time). [`StoreError::NotFound`] if the VM
    /// does not exist.
    pub fn record_tpm_process(
        &self,
        vm_id: &str,
        pid: u32,
        start_time: u64,
    ) -> Result<(), StoreError> {
        let start = to_i64(start_time, "pid_start_time")?;
        self.with_conn(|conn| {
            conn.prepare_cached(
                "INSERT INTO tpm_processes (vm_id, pid, pid_start_time) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (vm_id) DO UPDATE \
                 SET pid = excluded.pid, pid_start_time = excluded.pid_start_time",
            )?
            .execute(params![vm_id, pid, start])
            .map_err(vm_row_error(vm_id))?;
            Ok(())
        })
    }

    /// The VM's recorded swtpm: `(pid, start time)`.
    pub fn tpm_process(&self, vm_id: &str) -> Result<Option<(u32, u64)>, StoreError> {
        self.with_conn(|conn| {
            Ok(conn
                .prepare_cached("SELECT pid, pid_start_time FROM tpm_processes WHERE vm_id = ?1")?
                .query_row([vm_id], |r| Ok((r.get(0)?, get_u64(r, 1)?)))
                .optional()?)
        })
    }

    /// Forgets the VM's swtpm (it ended); returns whether one was recorded.
    pub fn forget_tpm_process(&self, vm_id: &str) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let n = conn
                .prepare_cached("DELETE FROM tpm_processes WHERE vm_id = ?1")?
                .execute([vm_id])?;
            Ok(n > 0)
        })
    }

    /// Records a crash of the VM at `now` (µs) and forgets its crashes older than
    /// `window_us`; returns the crashes within the window, this one included, oldest
    /// first. One savepoint: the count is read with the insert.
    pub fn record_crash(
        &self,
        vm_id: &str,
        now: u64,
        window_us: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let now_i = to_i64(now, "time")?;
        let oldest = to_i64(now.saturating_sub(window_us), "time")?;
        self.with_conn(|conn| {
            let tx = conn.savepoint()?;
            tx.prepare_cached("DELETE FROM restart_crashes WHERE vm_id = ?1 AND time <= ?2")?
                .execute(params![vm_id, oldest])?;
            tx.prepare_cached("INSERT INTO restart_crashes (vm_id, time) VALUES (?1, ?2)")?
                .execute(params![vm_id, now_i])
                .map_err(vm_row_error(vm_id))?;
            let times = tx
                .prepare_cached("SELECT time FROM restart_crashes WHERE vm_id = ?1 ORDER BY time")?
                .query_map([vm_id], |r| get_u64(r, 0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(times)
        })
    }

    /// The VM's recorded crashes, oldest first.
    pub fn crashes(&self, vm_id: &str) -> Result<Vec<u64>, StoreError> {
        self.with_conn(|conn| {
            Ok(conn
                .prepare_cached("SELECT time FROM restart_crashes WHERE vm_id = ?1 ORDER BY time")?
                .query_map([vm_id], |r| get_u64(r, 0))?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Forgets the VM's crashes (a fresh budget after giving up).
    pub fn clear_crashes(&self, vm_id: &str) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.prepare_cached("DELETE FROM restart_crashes WHERE vm_id = ?1")?
                .execute([vm_id])?;
            Ok(())
        })
    }
}
