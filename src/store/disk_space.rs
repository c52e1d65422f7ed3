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
//! Since format 4 the catalog entry of an indicator is written when it is told to Threat
//! Bus, not when it is queued: every queued indicator will still take disk space when it is
//! delivered, although the reader has long paused. So both watermarks compare the free space
//! *minus a reserve* for the catalog entries of what is queued ([`DiskSpace::set_reserve`],
//! kept current by the stream reader; [`CATALOG_DISK_FACTOR`]), not the free space itself.
//!
//! Readings are cached for [`REFRESH`] for the metrics, health and the intake; the stream
//! reader reads afresh between bursts (one `statvfs` per burst of up to 512 events), since
//! it can fill tens of MB in one cached second (seen: 40 MB in under 2 s).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Disk bytes a catalog entry takes per byte of the queued item it comes from. The entry holds
/// the object as sent (no more than the queued envelope), and sled's log needs about twice a
/// value's size on disk: measured 1,966 B of disk per entry of 1 KiB items
/// (`cargo bench --bench store`, catalog size). Overestimating only pauses the reader early.
pub const CATALOG_DISK_FACTOR: u64 = 2;

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
    /// Below `min_free`: the stream reader pauses. `free` is what is left after the reserve.
    Low { free: u64 },
    /// Below the sighting floor too: sightings and imports are dropped.
    Critical { free: u64 },
}

/// The cached free-space reading of one directory.
pub struct DiskSpace {
    dir: PathBuf,
    min_free: u64,
    /// Bytes the catalog entries of the queued indicators will take (see the module doc).
    reserve: AtomicU64,
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl DiskSpace {
    /// Watches the filesystem of `dir`; `min_free` 0 turns the watermarks off.
    pub fn new(dir: impl Into<PathBuf>, min_free: u64) -> Self {
        DiskSpace {
            dir: dir.into(),
            min_free,
            reserve: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    pub fn min_free(&self) -> u64 {
        self.min_free
    }

    /// Keeps `bytes` out of the free space the watermarks see: what the queued indicators'
    /// catalog entries will take once delivered. Set by the stream reader whenever it checks
    /// the disk; between its checks the drainer only lowers the true need, so a stale value
    /// errs on the safe side.
    pub fn set_reserve(&self, bytes: u64) {
        self.reserve.store(bytes, Ordering::Relaxed);
    }

    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
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
        if self.min_free == 0 {
            return Room::Enough;
        }
        match free.map(|free| free.saturating_sub(self.reserve())) {
            Some(free) if free < self.sighting_floor() => Room::Critical { free },
            Some(free) if free < self.min_free => Room::Low { free },
            _ => Room::Enough,
        }
    }

    /// The reader's status line while paused: `disk nearly full (N MB free < M MB)`, with
    /// the reserve for the catalog said when there is one (`free` is after it).
    pub fn describe_low(&self, free: u64) -> String {
        let mb = crate::config::MB;
        match self.reserve() {
            0 => format!(
                "disk nearly full ({} MB free < {} MB)",
                free / mb,
                self.min_free / mb
            ),
            reserve => format!(
                "disk nearly full ({} MB free after {} MB kept for the catalog entries of the queued indicators < {} MB)",
                free / mb,
                reserve.div_ceil(mb),
                self.min_free / mb
            ),
        }
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

    #[test]
    fn the_catalog_reserve_counts_as_used() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        // Comfortably above the watermark (a little free space may come and go meanwhile).
        let disk = DiskSpace::new(dir.path(), free / 4);
        assert_eq!(disk.room_now(), Room::Enough);
        // The floor is free / 16: a reserve of 31/32 of the free space leaves less.
        disk.set_reserve(free - free / 32);
        let Room::Critical { free: left } = disk.room_now() else {
            panic!("a reserve of 31/32 of the free space leaves less than the floor");
        };
        assert!(left < free / 16);
        assert!(disk.describe_low(left).contains("kept for the catalog"));
        disk.set_reserve(0);
        assert_eq!(disk.room_now(), Room::Enough);
        // Off means off, whatever is reserved.
        let off = DiskSpace::new(dir.path(), 0);
        off.set_reserve(u64::MAX);
        assert_eq!(off.room_now(), Room::Enough);
    }
}
