//! The image store's rows (`images`): what was imported, under which name, with which
//! checksum. The files themselves belong to [`crate::images`].

use rusqlite::{OptionalExtension, Row, ffi, params};
use serde::{Deserialize, Serialize};

use super::error::{constraint_to_invalid, sqlite_failure};
use super::{Database, StoreError, get_u64, to_i64};

/// One stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// The file's name inside the store directory (no `/`).
    pub file: String,
    /// `qcow2` (disk images, converted on import) or `iso` (stored as it was).
    pub format: String,
    pub virtual_size: u64,
    /// Bytes of the stored file.
    pub file_size: u64,
    /// SHA-256 of the stored file, lowercase hex.
    pub sha256: String,
    /// The imported file's name as the caller's system showed it (informational).
    pub source: String,
    pub imported_at: u64,
}

const COLUMNS: &str = "name, file, format, virtual_size, file_size, sha256, source, imported_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: r.get(0)?,
        file: r.get(1)?,
        format: r.get(2)?,
        virtual_size: get_u64(r, 3)?,
        file_size: get_u64(r, 4)?,
        sha256: r.get(5)?,
        source: r.get(6)?,
        imported_at: get_u64(r, 7)?,
    })
}

impl Database {
    /// Records an imported image. [`StoreError::NameTaken`] if the name (or file) is
    /// already in the store.
    pub fn insert_image(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        let (virtual_size, file_size) = (
            to_i64(rec.virtual_size, "virtual_size")?,
            to_i64(rec.file_size, "file_size")?,
        );
        let at = to_i64(rec.imported_at, "imported_at")?;
        self.with_conn(|conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO images ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))?
            .execute(params![
                rec.name,
                rec.file,
                rec.format,
                virtual_size,
                file_size,
                rec.sha256,
                rec.source,
                at
            ])
            .map_err(|e| match sqlite_failure(&e) {
                Some((ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE, _)) => {
                    StoreError::NameTaken(rec.name.clone())
                }
                _ => constraint_to_invalid(e),
            })?;
            Ok(())
        })
    }

    /// Every stored image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM images ORDER BY name"))?;
            let rows = stmt.query_map([], from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.with_conn(|conn| {
            Ok(conn
                .prepare_cached(&format!("SELECT {COLUMNS} FROM images WHERE name = ?1"))?
                .query_row([name], from_row)
                .optional()?)
        })
    }

    /// Forgets an image; returns whether it was recorded.
    pub fn remove_image(&self, name: &str) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let n = conn
                .prepare_cached("DELETE FROM images WHERE name = ?1")?
                .execute([name])?;
            Ok(n > 0)
        })
    }
}
