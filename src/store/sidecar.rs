//! The checkpoint file `{data_dir}/checkpoint.json`: what survives the store.
//!
//! A small JSON file beside the sled database, replaced atomically (write a temporary
//! file, fsync, rename, fsync the directory). It holds the low watermark ([`Resume`]), so
//! that a store that is lost can be rebuilt by reading the stream again from there, and
//! claims about the store that let the next open tell whether sled gave back less than it
//! held (sled recovers a cut file to an earlier state without an error).
//!
//! Every claim is only ever about writes that are already durable in the store: the
//! values are read first, the store is flushed, then the file is written. A crash between
//! the flush and the file write leaves an older file, whose claims the store still meets.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::watermark::Resume;
use super::StoreError;

/// The file name, in `bridge.data_dir`.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// The layout of the file; a different one is ignored (never taken for damage).
const VERSION: u32 = 1;

/// What the checkpoint file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// When it was written (RFC 3339, UTC), for the operator.
    pub written_at: String,
    /// Where the stream must resume for every undelivered indicator to be read again.
    pub watermark: Resume,
    /// Catalog entries (tombstones included) the store holds at least: the catalog never
    /// loses an entry, so a store with fewer has lost writes.
    pub catalog_at_least: u64,
    /// What the store held when the file was written: what a lost store takes with it.
    pub held: Held,
    /// Exact claims, present only when the daemon closed the store cleanly and nothing
    /// has opened it since (every open clears them before it can change anything).
    pub closed: Option<Closed>,
}

/// Counts of what the store held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub indicators: u64,
    pub sightings: u64,
    pub dead: u64,
    /// Queued imports: from Threat Bus like sightings, so lost with the store. Absent from
    /// files written before they were counted (such a file claims nothing about them);
    /// the layout stays version 1, since an older binary ignores the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imports: Option<u64>,
}

/// The store's state after a clean close, exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub held: Held,
    pub catalog: u64,
    /// The newest key of the indicator queue.
    pub newest_indicator: Option<u64>,
    pub position: Option<String>,
}

impl Checkpoint {
    pub(crate) fn new(watermark: Resume, catalog_at_least: u64, held: Held) -> Self {
        Checkpoint {
            version: VERSION,
            written_at: now_iso(),
            watermark,
            catalog_at_least,
            held,
            closed: None,
        }
    }

    /// The same claims, ignoring when they were made (to skip rewriting an unchanged file).
    pub(crate) fn same_claims(&self, other: &Checkpoint) -> bool {
        (
            &self.watermark,
            self.catalog_at_least,
            self.held,
            &self.closed,
        ) == (
            &other.watermark,
            other.catalog_at_least,
            other.held,
            &other.closed,
        )
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(CHECKPOINT_FILE)
}

/// Reads the checkpoint file. Absent, unreadable or of another layout: `None` (logged), as
/// if the feature were new: a damaged *file* must never make a sound store look damaged.
pub fn read(data_dir: &Path) -> Option<Checkpoint> {
    let path = path(data_dir);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the checkpoint file; ignored");
            return None;
        }
    };
    match serde_json::from_slice::<Checkpoint>(&text) {
        Ok(checkpoint) if checkpoint.version == VERSION => Some(checkpoint),
        Ok(checkpoint) => {
            tracing::warn!(path = %path.display(), version = checkpoint.version, "checkpoint file of another layout; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable checkpoint file; ignored");
            None
        }
    }
}

/// Replaces the checkpoint file atomically: after a crash it is the old or the new one.
pub fn write(data_dir: &Path, checkpoint: &Checkpoint) -> Result<(), StoreError> {
    let path = path(data_dir);
    let io = |source| StoreError::Checkpoint {
        path: path.clone(),
        source,
    };
    let json = serde_json::to_vec_pretty(checkpoint)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    let tmp = data_dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(data_dir).map_err(io)
}

/// Drops the exact claims of a clean close, before the store can change: any open does,
/// so that a maintenance command or a tool writing to the store is never taken for damage.
pub(crate) fn forget_closed(data_dir: &Path) -> Result<(), StoreError> {
    match read(data_dir) {
        Some(mut checkpoint) if checkpoint.closed.is_some() => {
            checkpoint.closed = None;
            write(data_dir, &checkpoint)
        }
        _ => Ok(()),
    }
}

/// Makes a rename or a new file in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn now_iso() -> String {
    crate::stix::Timestamp::from_system_time(std::time::SystemTime::now())
        .map(|t| t.to_rfc3339_millis())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let mut checkpoint = Checkpoint::new(
            Resume {
                position: Some("5-0".into()),
                recover_until: None,
            },
            3,
            Held {
                indicators: 2,
                sightings: 1,
                dead: 0,
                imports: Some(4),
            },
        );
        checkpoint.closed = Some(Closed {
            held: checkpoint.held,
            catalog: 3,
            newest_indicator: Some(9),
            position: Some("6-0".into()),
        });
        write(dir.path(), &checkpoint).unwrap();
        assert_eq!(read(dir.path()), Some(checkpoint.clone()));
        forget_closed(dir.path()).unwrap();
        let forgotten = read(dir.path()).unwrap();
        assert_eq!(forgotten.closed, None);
        assert_eq!(forgotten.watermark, checkpoint.watermark);
        // A file from before imports were counted reads as claiming nothing about them.
        let mut old: serde_json::Value =
            serde_json::from_slice(&fs::read(path(dir.path())).unwrap()).unwrap();
        assert_eq!(old["held"]["imports"], 4);
        old["held"].as_object_mut().unwrap().remove("imports");
        fs::write(path(dir.path()), old.to_string()).unwrap();
        assert_eq!(read(dir.path()).unwrap().held.imports, None);
        fs::write(path(dir.path()), b"{\"version\": 1, garbage").unwrap();
        assert_eq!(read(dir.path()), None);
    }
}
