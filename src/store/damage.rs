//! A damaged store: found at open, moved aside, rebuilt from the stream.
//!
//! Damaged means sled cannot open or read it (corrupted data, an internal error, a panic),
//! or it opens but holds less than the checkpoint file ([`super::sidecar`]) says it held:
//! sled recovers a cut file to an earlier state without an error. What is not damage: a
//! locked store, a newer format, a failed upgrade, an I/O error such as a permission
//! denied (moving the store aside would not help; the operator must act).
//!
//! On damage, with `rebuild`, the store directory is renamed `store.damaged-<UTC time>`
//! (never deleted: someone may want to salvage it), a fresh store starts at the checkpoint
//! file's low watermark, so every indicator not yet delivered is read from the stream again.
//! What the stream cannot give back (sightings waiting for OpenCTI, dead letters) is gone
//! from the running bridge, and said so once, loudly.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use super::sidecar::{self, Checkpoint, Held};
use super::{Resume, Store, StoreError, StoreOptions, CURRENT_FORMAT, STORE_SUBDIR};
use crate::pipeline::stream::{META_RECOVER_STARTED, META_RECOVER_UNTIL};

/// `bridge.on_damaged_store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamagedStore {
    /// Move the store aside, start a fresh one, read the stream again from the watermark.
    Rebuild,
    /// Exit 1 with what to do, touching nothing.
    Stop,
}

/// What was found and done about a damaged store.
#[derive(Debug, Clone)]
pub struct DamageReport {
    /// Why the store counts as damaged.
    pub reason: String,
    /// Where the damaged store now lies.
    pub moved_to: PathBuf,
    /// Where the stream resumes.
    pub resume: Resume,
    /// What the store held at the last checkpoint (zero without one), and when that was.
    pub held: Held,
    pub as_of: Option<String>,
}

impl DamageReport {
    /// Items the stream cannot give back: queued sightings, imports and dead letters.
    pub fn lost(&self) -> u64 {
        self.held.sightings + self.held.imports.unwrap_or(0) + self.held.dead
    }
}

/// An open store, and the damage report if it had to be rebuilt.
pub struct Opened {
    pub store: Store,
    pub damage: Option<DamageReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum DamageError {
    /// The store cannot be opened for a reason that is not damage (locked, newer format...).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The store is damaged and `bridge.on_damaged_store` is `stop`: it was left as it is.
    #[error(
        "the store at {path} is damaged: {reason}. It was left untouched \
         (bridge.on_damaged_store: stop). To recover: stop every bridge using it, move it aside \
         (mv {path} {path}.damaged) and start again: a fresh store resumes the stream from {resume} \
         so every undelivered indicator is read again; {lost}. Or set bridge.on_damaged_store: \
         rebuild (BRIDGE_ON_DAMAGED_STORE=rebuild) to do this automatically"
    )]
    Stopped {
        path: PathBuf,
        reason: String,
        resume: String,
        lost: String,
    },

    /// Moving the damaged store aside failed; nothing was deleted.
    #[error("moving the damaged store {from} aside to {to} failed: {source}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store in `data_dir`, checking it against the checkpoint file, and handles a
/// damaged one as `policy` says.
pub fn open_checked(
    data_dir: &Path,
    options: &StoreOptions,
    policy: OnDamagedStore,
) -> Result<Opened, DamageError> {
    let checkpoint = sidecar::read(data_dir);
    let path = data_dir.join(STORE_SUBDIR);
    let existed = path.exists();
    let reason = match open_catching(data_dir, options) {
        Ok(store) => match find_damage(&store, checkpoint.as_ref(), existed)? {
            None => {
                store.forget_closed()?;
                return Ok(Opened {
                    store,
                    damage: None,
                });
            }
            Some(reason) => {
                // Released before the directory moves (sled's lock, its threads).
                drop(store);
                reason
            }
        },
        Err(Opened2::Damaged(reason)) => reason,
        Err(Opened2::Foreign(e)) if checkpoint.is_some() => {
            // This data directory had a store of ours: a missing format version is damage.
            e.to_string()
        }
        Err(Opened2::Foreign(e)) | Err(Opened2::Other(e)) => return Err(e.into()),
    };
    let resume = checkpoint
        .as_ref()
        .map(|c| c.watermark.clone())
        .unwrap_or_default();
    let held = checkpoint.as_ref().map(|c| c.held).unwrap_or_default();
    if policy == OnDamagedStore::Stop {
        return Err(DamageError::Stopped {
            path,
            reason,
            resume: describe(&resume),
            lost: describe_lost(held, checkpoint.as_ref()),
        });
    }
    let moved_to = move_aside(data_dir, &path)?;
    let store = Store::open(data_dir, options)?;
    start_at(&store, &resume)?;
    // The fresh store's claims, with the watermark it starts from.
    store.write_checkpoint(None)?;
    Ok(Opened {
        store,
        damage: Some(DamageReport {
            reason,
            moved_to,
            resume,
            held,
            as_of: checkpoint.map(|c| c.written_at),
        }),
    })
}

enum Opened2 {
    Damaged(String),
    Foreign(StoreError),
    Other(StoreError),
}

/// Opens the store; sled may panic on some damage, which counts as damage too.
fn open_catching(data_dir: &Path, options: &StoreOptions) -> Result<Store, Opened2> {
    let open = || Store::open_unverified(data_dir, options);
    match std::panic::catch_unwind(AssertUnwindSafe(open)) {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) if is_damage(&e) => Err(Opened2::Damaged(e.to_string())),
        Ok(Err(e @ StoreError::Foreign { .. })) => Err(Opened2::Foreign(e)),
        Ok(Err(e)) => Err(Opened2::Other(e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(Opened2::Damaged(format!("sled failed reading it: {what}")))
        }
    }
}

/// Errors that say the data is bad, not that the store is unreachable.
fn is_damage(error: &StoreError) -> bool {
    use std::io::ErrorKind;
    match error {
        StoreError::Sled(sled::Error::Corruption { .. })
        | StoreError::Sled(sled::Error::ReportableBug(_))
        | StoreError::Sled(sled::Error::Unsupported(_))
        | StoreError::Undecodable { .. } => true,
        StoreError::Sled(sled::Error::Io(io)) => {
            matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof)
        }
        _ => false,
    }
}

/// Compares an open store with the checkpoint file. `None`: sound.
fn find_damage(
    store: &Store,
    checkpoint: Option<&Checkpoint>,
    existed: bool,
) -> Result<Option<String>, StoreError> {
    let Some(checkpoint) = checkpoint else {
        return Ok(None);
    };
    if !existed || store.format_found() == 0 {
        // The directory was gone or empty: whatever it held is lost, and the position too.
        return Ok(Some(format!(
            "the store is gone or empty, but the checkpoint file of {} describes one",
            checkpoint.written_at
        )));
    }
    let catalog = store.catalog_size().total;
    if catalog < checkpoint.catalog_at_least {
        return Ok(Some(format!(
            "it holds {catalog} catalog entries, but held {} at {} (entries are never removed): \
             sled gave back an earlier state",
            checkpoint.catalog_at_least, checkpoint.written_at
        )));
    }
    // Exact claims only when the format is the one they were made in (an upgrade may
    // rewrite what they count).
    if let Some(closed) = &checkpoint.closed {
        if store.format_found() == CURRENT_FORMAT {
            let mut found = store.closed_state()?;
            if closed.held.imports.is_none() {
                // Written before imports were counted: nothing to compare them with.
                found.held.imports = None;
            }
            if &found != closed {
                return Ok(Some(format!(
                    "it was closed cleanly at {} holding {:?}, but opens holding {:?}: \
                     sled gave back an earlier state",
                    checkpoint.written_at, closed, found
                )));
            }
        }
    }
    Ok(None)
}

/// Renames the store directory `store.damaged-<UTC time>` (a suffix if that exists).
fn move_aside(data_dir: &Path, path: &Path) -> Result<PathBuf, DamageError> {
    let stamp = sidecar::now_iso().replace([':', '.'], "");
    let mut target = data_dir.join(format!("{STORE_SUBDIR}.damaged-{stamp}"));
    let mut n = 1;
    while target.exists() {
        target = data_dir.join(format!("{STORE_SUBDIR}.damaged-{stamp}-{n}"));
        n += 1;
    }
    if path.exists() {
        std::fs::rename(path, &target)
            .and_then(|()| sidecar::sync_dir(data_dir))
            .map_err(|source| DamageError::MoveAside {
                from: path.to_path_buf(),
                to: target.clone(),
                source,
            })?;
    }
    Ok(target)
}

/// Makes a fresh store resume the stream at `resume`, durably, before anything reads it.
fn start_at(store: &Store, resume: &Resume) -> Result<(), StoreError> {
    if let Some(until) = &resume.recover_until {
        let started = super::now_ms().to_string();
        drop(store.update_meta(&[
            (META_RECOVER_UNTIL, Some(until.as_str())),
            (META_RECOVER_STARTED, Some(started.as_str())),
        ])?);
    }
    if let Some(position) = &resume.position {
        drop(store.set_position(position)?);
    }
    store.flush()
}

fn describe(resume: &Resume) -> String {
    match (&resume.position, &resume.recover_until) {
        (Some(p), None) => format!("stream position {p}"),
        (Some(p), Some(r)) => format!("stream position {p}, replaying up to {r}"),
        (None, _) => "the first-start position (a full replay)".into(),
    }
}

fn describe_lost(held: Held, checkpoint: Option<&Checkpoint>) -> String {
    match checkpoint {
        Some(c) => format!(
            "lost with it: {} queued sightings, {} queued imports and {} dead letters (as of {})",
            held.sightings,
            held.imports
                .map_or_else(|| "an unknown number of".into(), |n| n.to_string()),
            held.dead,
            c.written_at
        ),
        None => "what it held besides indicators is unknown (no checkpoint file)".into(),
    }
}

impl DamageReport {
    /// Where the stream resumes, in words.
    pub fn resume_text(&self) -> String {
        describe(&self.resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Commit, Queue};

    /// A store closed cleanly holding `imports` queued imports, its closed checkpoint
    /// written as the daemon writes it.
    fn closed_with_imports(data_dir: &Path, imports: usize) {
        let store = Store::open(data_dir, &StoreOptions::default()).unwrap();
        let commit = Commit {
            items: (0..imports)
                .map(|i| format!("import {i}").into_bytes())
                .collect(),
            ..Commit::default()
        };
        drop(store.commit(Queue::Imports, commit).unwrap());
        store.close().unwrap();
        store.write_closed_checkpoint().unwrap();
    }

    /// Rewrites the checkpoint file's JSON.
    fn edit_checkpoint(data_dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = sidecar::path(data_dir);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
    }

    fn open(data_dir: &Path) -> Opened {
        open_checked(data_dir, &StoreOptions::default(), OnDamagedStore::Rebuild).unwrap()
    }

    #[test]
    fn a_store_that_lost_queued_imports_is_damaged_and_they_are_counted_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        closed_with_imports(dir.path(), 3);
        // The file claims 5: the store gives back less than it held.
        edit_checkpoint(dir.path(), |json| {
            json["held"]["imports"] = 5.into();
            json["closed"]["held"]["imports"] = 5.into();
        });
        let opened = open(dir.path());
        let report = opened.damage.expect("damage found");
        assert_eq!(report.held.imports, Some(5));
        assert_eq!(report.lost(), 5, "{report:?}");
    }

    #[test]
    fn imports_are_checked_only_where_the_checkpoint_counted_them() {
        let dir = tempfile::tempdir().unwrap();
        closed_with_imports(dir.path(), 3);
        let opened = open(dir.path());
        assert!(opened.damage.is_none(), "a clean close is not damage");
        assert_eq!(opened.store.len(Queue::Imports), 3);
        opened.store.close().unwrap();
        opened.store.write_closed_checkpoint().unwrap();
        drop(opened);
        // A file written before imports were counted claims nothing about them.
        edit_checkpoint(dir.path(), |json| {
            json["held"].as_object_mut().unwrap().remove("imports");
            json["closed"]["held"]
                .as_object_mut()
                .unwrap()
                .remove("imports");
        });
        let opened = open(dir.path());
        assert!(
            opened.damage.is_none(),
            "an older checkpoint file is not damage"
        );
        assert_eq!(opened.store.len(Queue::Imports), 3);
    }
}
