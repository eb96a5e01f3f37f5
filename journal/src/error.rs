//! The journal's error type.
//!
//! One enum, so callers (the IO modes, the daemon) can tell the cases apart:
//! a corrupt segment is handled differently from a full disk or a point the
//! user asked for that is no longer retained. Every variant carries what an
//! operator needs to act on it: the file and offset, the volume and point.

use std::path::PathBuf;

/// Result with the journal's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the journal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system IO error on a named file.
    #[error("{op} {path}{}: {source}", at.map(|o| format!(" at offset {o}")).unwrap_or_default())]
    Io {
        /// What the journal was doing (`"open"`, `"write"`, `"fsync"`, …).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// Where in the file, for reads and writes.
        at: Option<u64>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Bytes on disk that do not decode: bad magic, unknown version, failed
    /// CRC, impossible lengths, out-of-order sequence numbers.
    #[error("corruption in {path} at offset {offset}: {reason}")]
    Corruption {
        /// The segment, manifest or base image file.
        path: PathBuf,
        /// Byte offset of the damaged structure within that file.
        offset: u64,
        /// What was wrong with it.
        reason: String,
    },

    /// An error from the embedded RocksDB index.
    #[error("index {path}: {source}")]
    Index {
        /// The index directory.
        path: PathBuf,
        /// The RocksDB error.
        #[source]
        source: rocksdb::Error,
    },

    /// A point that lies outside the retained history.
    #[error(
        "volume {volume}: point {point} is outside the retained history; available: {available}"
    )]
    PointOutOfRange {
        /// The volume that was asked about.
        volume: String,
        /// The point as the caller gave it.
        point: String,
        /// The range that can be read, as seqs and times.
        available: String,
    },

    /// A volume name that the consistency group does not hold.
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),

    /// A volume name that is already taken.
    #[error("volume {0:?} already exists")]
    VolumeExists(String),

    /// A byte range that does not lie within the volume.
    #[error(
        "volume {volume}: range offset {offset} length {len} is outside the volume (size {size})"
    )]
    OutOfBounds {
        /// The volume.
        volume: String,
        /// First byte of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the volume.
        size: u64,
    },

    /// A caller-supplied value the journal cannot accept.
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// Appending failed; the record was not journalled and was not
    /// acknowledged. Carries the cause as text because one failed group
    /// commit fails every record in it.
    #[error("append to {path} at offset {offset} failed: {reason}")]
    AppendFailed {
        /// The segment being written.
        path: PathBuf,
        /// Where the batch was to go.
        offset: u64,
        /// The underlying error.
        reason: String,
        /// Whether it was the disk running out of space.
        disk_full: bool,
    },

    /// The journal has been closed, or its writer stopped.
    #[error("journal {0} is closed")]
    Closed(PathBuf),

    /// An fsync failed earlier. After a failed fsync the page cache may no
    /// longer match the disk, so the writer refuses further appends until
    /// the journal is reopened and recovered from what is really on disk.
    #[error(
        "journal {path} refuses appends after an earlier failure ({reason}); reopen it to recover"
    )]
    Poisoned {
        /// The journal directory.
        path: PathBuf,
        /// The original failure.
        reason: String,
    },

    /// Records durable in a segment that the index could not take: reads
    /// do not see them (nor anything after them) until a reopen indexes
    /// them from the segment.
    #[error("records up to seq {seq} are durable in {segment} but the index {index} could not take them ({reason}); reopen the journal to index them")]
    NotIndexed {
        /// The newest record of the batch.
        seq: u64,
        /// The segment holding it.
        segment: PathBuf,
        /// The index directory.
        index: PathBuf,
        /// The index's error.
        reason: String,
    },

    /// The memory cache had no room for a record (in time).
    #[error("volume {volume}: the memory cache ({limit} bytes) has no room for a {bytes}-byte record; the journal is behind")]
    CacheFull {
        /// The volume written to.
        volume: String,
        /// The record's size.
        bytes: u64,
        /// The cache's bound.
        limit: u64,
    },

    /// A flush point (and so a tag) could not be placed after every
    /// acknowledged write in time: writes left to a resync could not be
    /// journalled first.
    #[error("volume {volume}: the flush point cannot be placed after every acknowledged write yet ({reason}); the journal is behind: retry in a moment")]
    Behind {
        /// The volume.
        volume: String,
        /// What stood in the way.
        reason: String,
    },

    /// A record did not become durable in time: the journal's disk is full
    /// or too slow.
    #[error("record seq {seq} was not durable after {waited:?}; the journal is stalled (disk full or too slow)")]
    NotDurable {
        /// The record.
        seq: u64,
        /// How long was waited.
        waited: std::time::Duration,
    },

    /// Writes on the production volumes whose changes are not durable in
    /// the journal as the write path closes (its disk full or failing).
    /// Not lost: the dirty maps keep their regions marked, and the next
    /// attach resyncs them from the production volumes.
    #[error("writes not durable in the journal: {regions} ({reason}); the dirty map keeps their regions marked for a resync")]
    NotJournalled {
        /// The regions, per volume, as byte ranges.
        regions: String,
        /// Why: the first error met, or how far the journal is durable.
        reason: String,
    },

    /// The journal's history is being replaced by another site's (a
    /// replica catching up); no point is real until that finishes.
    #[error("journal {0} is being rebased onto another site's history; no point can be read until that finishes")]
    Rebasing(PathBuf),

    /// A sync write durable here that a sync replica did not take.
    #[error("seq {seq} is durable here but not on the replica: {reason}")]
    NotReplicated {
        /// The record.
        seq: u64,
        /// Why.
        reason: String,
    },

    /// Another process holds the journal directory open.
    #[error("journal {0} is locked by another process")]
    Locked(PathBuf),
}

impl Error {
    /// Wraps an IO error with the operation and the path it concerned.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            at: None,
            source,
        }
    }

    /// Wraps an IO error of a read or write at `offset` of `path`.
    pub fn io_at(
        op: &'static str,
        path: impl Into<PathBuf>,
        offset: u64,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            op,
            path: path.into(),
            at: Some(offset),
            source,
        }
    }

    /// A corruption error at `offset` of `path`.
    pub fn corruption(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corruption {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// True when the error is the disk running out of space, which the IO
    /// modes treat as a condition to wait out rather than a failure.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => {
                source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
            }
            Error::AppendFailed { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}
