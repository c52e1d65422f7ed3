//! Free space on the data directory's filesystem, and the two watermarks derived from it.
//!
//! sled 0.34 cannot survive a full disk: the first failed write to its log sets a global
//! error, and every later operation of that `Db` fails with it until the process opens the
//! store again. So the bridge must stop writing *before* the filesystem fills:
//!
//! - below `bridge.min_free_mb` the stream reader pauses (the stream can be replayed, so
//!   nothing is lost; the drainers keep delivering, and the space of delivered items is
//!   reused by sled);
//! - below a quarter of it ([`SIGHTING_FLOOR_DIVISOR`]) sightings and imports are dropped
//!   and counted, like beyond the queue limit: Threat Bus cannot be paused, and the
//!   space left is kept for the drainers' own writes (acknowledgements are writes too).
//!
//! Readings are cached for [`REFRESH`] for the metrics, health and the intake; the stream
//! reader reads afresh between bursts (one `statvfs` per burst of up to 512 events), since
//! it can fill tens of MB in one cached second (seen: 40 MB in under 2 s).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default of `bridge.min_free_mb`. sled grows its file by segments and writes a snapshot
/// beside it from time to time (several MiB on a large store); 256 MiB leaves room for a
/// burst in flight, the drainers' acknowledgements, the checkpoint file and the logs of
/// others on a shared volume, and is small next to any real data volume.
pub const DEFAULT_MIN_FREE_MB: u64 = 256;

/// Sightings and imports are accepted down to `min_free / SIGHTING_FLOOR_DIVISOR`. They cannot
/// be paused, so they keep flowing after the reader pauses; but below this floor a write
/// could be the one that fills the disk and poisons sled, which would stop *every*
/// delivery. A quarter keeps most of the headroom for sightings while leaving the last
/// part to the drainers, whose acknowledgements free space.
pub const SIGHTING_FLOOR_DIVISOR: u64 = 4;

/// How long a reading is reused.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c_path` is a valid NUL-terminated string; `stat` is a plain C struct that
    // statvfs fills in, all-zero being a valid value for it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field widths differ between platforms: widen both to u64.
    #[allow(clippy::unnecessary_cast)]
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// How the free space compares with the watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// At or above `min_free` (or the watermark is off, or free space cannot be read).
    Enough,
    /// Below `min_free`: the stream reader pauses.
    Low { free: u64 },
    /// Below the sighting floor too: sightings and imports are dropped.
    Critical { free: u64 },
}

/// The cached free-space reading of one directory.
pub struct DiskSpace {
    dir: PathBuf,
    min_free: u64,
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl DiskSpace {
    /// Watches the filesystem of `dir`; `min_free` 0 turns the watermarks off.
    pub fn new(dir: impl Into<PathBuf>, min_free: u64) -> Self {
        DiskSpace {
            dir: dir.into(),
            min_free,
            last: Mutex::new(None),
        }
    }

    pub fn min_free(&self) -> u64 {
        self.min_free
    }

    /// Below this, sightings and imports are dropped.
    pub fn sighting_floor(&self) -> u64 {
        self.min_free / SIGHTING_FLOOR_DIVISOR
    }

    /// Free bytes, at most [`REFRESH`] old; `None` if `statvfs` fails (logged once per
    /// reading; the watermarks then do not apply rather than stop the bridge on a guess).
    pub fn free(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = *last {
            if at.elapsed() < REFRESH {
                return value;
            }
        }
        let value = match free_bytes(&self.dir) {
            Ok(free) => Some(free),
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), %error, "cannot read the free space of the data directory");
                None
            }
        };
        *last = Some((Instant::now(), value));
        value
    }

    pub fn room(&self) -> Room {
        self.classify(self.free())
    }

    /// [`DiskSpace::room`] from a fresh reading. The stream reader checks this between
    /// bursts: it can write tens of MB per second, far more than a cached reading allows.
    pub fn room_now(&self) -> Room {
        let value = free_bytes(&self.dir).ok();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((Instant::now(), value));
        drop(last);
        self.classify(value)
    }

    fn classify(&self, free: Option<u64>) -> Room {
        match free {
            Some(free) if free < self.sighting_floor() => Room::Critical { free },
            Some(free) if free < self.min_free => Room::Low { free },
            _ => Room::Enough,
        }
    }

    /// The reader's status line while paused: `disk nearly full (N MB free < M MB)`.
    pub fn describe_low(&self, free: u64) -> String {
        format!(
            "disk nearly full ({} MB free < {} MB)",
            free / crate::config::MB,
            self.min_free / crate::config::MB
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn watermarks_follow_min_free() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DiskSpace::new(dir.path(), 0).room(), Room::Enough);
        // More than any test machine has: below both watermarks.
        let huge = DiskSpace::new(dir.path(), u64::MAX);
        assert!(matches!(huge.room(), Room::Critical { .. }));
        let free = huge.free().unwrap();
        // Between the floor and min_free.
        let low = DiskSpace::new(dir.path(), free.saturating_mul(2));
        assert!(matches!(
            low.room(),
            Room::Low { .. } | Room::Critical { .. }
        ));
        assert_eq!(
            low.sighting_floor(),
            low.min_free() / SIGHTING_FLOOR_DIVISOR
        );
    }
}
