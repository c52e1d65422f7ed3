//! The on-disk format version and the ordered upgrade steps between versions.
//!
//! Each version is described in `migrations/NNNN-*.md` at the repository root. A new
//! version adds a file there, a `Step` here, and bumps `CURRENT_FORMAT`.

use std::path::Path;

use super::record::META_FORMAT_VERSION;
use super::StoreError;

/// The format this binary writes.
pub const CURRENT_FORMAT: u32 = 4;

/// One upgrade: turns a store at version `from` into version `from + 1`.
struct Step {
    from: u32,
    apply: fn(&sled::Tree) -> Result<(), String>,
}

/// In order of `from`.
const STEPS: &[Step] = &[
    // 2: the indicator catalog (migrations/0002-indicator-catalog.md).
    Step {
        from: 1,
        apply: super::catalog::seed_from_queue,
    },
    // 3: the import queue (migrations/0003-import-queue.md): new keys only, nothing to
    // convert; the version bump is what keeps a format-2 binary from misreading them.
    Step {
        from: 2,
        apply: |_| Ok(()),
    },
    // 4: the catalog is written at delivery; conditions of reconciliation REMOVEs
    // (migrations/0004-catalog-at-delivery.md). A format-3 catalog already holds every
    // queued indicator (written with it), which the drainer records again, identically,
    // when it sends them: nothing to convert. The bump keeps a format-3 binary, which
    // never records at delivery, from leaving the catalog behind.
    Step {
        from: 3,
        apply: |_| Ok(()),
    },
];

/// Reads the format version, initializes a new store, upgrades an older one in place and
/// refuses a newer one. Returns the version found on disk (0 for a new store).
pub(crate) fn check_and_upgrade(tree: &sled::Tree, path: &Path) -> Result<u32, StoreError> {
    let found = match tree.get(META_FORMAT_VERSION)? {
        Some(raw) => parse_version(&raw, path)?,
        None if tree.is_empty() => {
            write_version(tree, CURRENT_FORMAT)?;
            return Ok(0);
        }
        None => {
            return Err(StoreError::Foreign {
                path: path.to_path_buf(),
                detail: "it holds data but no format version".into(),
            })
        }
    };
    if found > CURRENT_FORMAT {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
            supported: CURRENT_FORMAT,
        });
    }
    upgrade(tree, found, STEPS)?;
    Ok(found)
}

fn upgrade(tree: &sled::Tree, mut version: u32, steps: &[Step]) -> Result<(), StoreError> {
    while version < CURRENT_FORMAT {
        let step =
            steps
                .iter()
                .find(|s| s.from == version)
                .ok_or_else(|| StoreError::Migration {
                    from: version,
                    detail: "no upgrade step is known for this version".into(),
                })?;
        (step.apply)(tree).map_err(|detail| StoreError::Migration {
            from: version,
            detail,
        })?;
        version += 1;
        write_version(tree, version)?;
        tree.flush()?;
        tracing::info!(version, "store upgraded");
    }
    Ok(())
}

fn parse_version(raw: &[u8], path: &Path) -> Result<u32, StoreError> {
    let bytes: [u8; 4] = raw.try_into().map_err(|_| StoreError::Foreign {
        path: path.to_path_buf(),
        detail: format!("its format version record has {} bytes, not 4", raw.len()),
    })?;
    Ok(u32::from_be_bytes(bytes))
}

pub(crate) fn write_version(tree: &sled::Tree, version: u32) -> Result<(), StoreError> {
    tree.insert(META_FORMAT_VERSION, &version.to_be_bytes())?;
    Ok(())
}
