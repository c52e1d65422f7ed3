use std::path::PathBuf;

/// Everything that can go wrong in the outbox store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (usually the running daemon) holds sled's lock on the store.
    #[error(
        "the store at {path} is in use by another process (is the daemon running? \
         inspect-queue asks it through its admin socket)"
    )]
    Locked { path: PathBuf },

    /// The store was written by a newer version of the bridge; reading it could misread data.
    #[error(
        "the store at {path} has format version {found}, but this binary supports up to \
         version {supported}: upgrade opencti-threatbus or point bridge.data_dir elsewhere"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The directory holds a sled database that this program did not write.
    #[error("the store at {path} is not an opencti-threatbus store: {detail}")]
    Foreign { path: PathBuf, detail: String },

    /// An upgrade step from an older format failed; the store is left at the older version.
    #[error("migrating the store from format version {from} failed: {detail}")]
    Migration { from: u32, detail: String },

    /// sled reported an I/O or corruption error.
    #[error("store I/O failed: {0}")]
    Sled(#[from] sled::Error),

    /// A group-commit flush failed; the writes it covered may not be durable.
    #[error("flushing the store to disk failed: {0}")]
    Flush(String),

    /// The store was closed while a writer waited for durability.
    #[error("the store was closed before the write was confirmed durable")]
    Closed,

    /// A record could not be encoded (bincode fails only on unsupported types or limits).
    #[error("encoding a store record failed: {0}")]
    Encode(#[from] bincode::Error),

    /// Only the indicator queue carries the stream position.
    #[error("a stream position can only be stored with the indicator queue")]
    PositionOnSightings,

    /// The checkpoint file beside the store could not be written.
    #[error("writing the checkpoint file {path} failed: {source}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A record that must be read whole cannot be decoded (damaged, or a format bug).
    #[error("the {what} record cannot be decoded: {error}")]
    Undecodable {
        what: String,
        #[source]
        error: bincode::Error,
    },
}

impl StoreError {
    /// Whether the filesystem of the store is full (ENOSPC). sled 0.34 then refuses every
    /// later write of this `Db` with the same error, until the store is opened again.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sled(sled::Error::Io(io)) => is_enospc(io),
            StoreError::Checkpoint { source, .. } => is_enospc(source),
            // The flusher reports sled's error as text.
            StoreError::Flush(text) => text.contains("No space left on device"),
            _ => false,
        }
    }

    /// Maps sled's open errors to the precise cases an operator can act on.
    pub(crate) fn from_open(path: PathBuf, err: sled::Error) -> Self {
        // sled 0.34 reports a held lock as a plain `Other` I/O error with this text.
        match &err {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked { path }
            }
            _ => StoreError::Sled(err),
        }
    }
}

fn is_enospc(error: &std::io::Error) -> bool {
    error.raw_os_error() == Some(libc::ENOSPC)
        || error.to_string().contains("No space left on device")
}
