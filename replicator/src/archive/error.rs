//! Errors of the archive: each names the archive, the object and what was
//! being done, so an operator can act on it.

/// An archive error.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A request the caller got wrong (a bad URL, a point outside the
    /// archive window).
    #[error("{0}")]
    Invalid(String),
    /// The object store refused or failed an operation.
    #[error("archive {location}: {op} of {key:?} failed: {detail}")]
    Store {
        /// `s3://bucket/prefix` (or `file://…`).
        location: String,
        /// The S3 operation, e.g. `PutObject`.
        op: &'static str,
        /// The object key, relative to the archive's prefix.
        key: String,
        /// What the store said.
        detail: String,
    },
    /// The object does not exist.
    #[error("archive {location}: no object {key:?}")]
    NotFound {
        /// The archive.
        location: String,
        /// The missing key.
        key: String,
    },
    /// An object whose checksum or structure does not verify.
    #[error("archive {location}: object {key:?} is corrupt: {reason}")]
    Corrupt {
        /// The archive.
        location: String,
        /// The object.
        key: String,
        /// What failed to verify.
        reason: String,
    },
    /// The local journal.
    #[error(transparent)]
    Journal(#[from] tidemark_journal::Error),
    /// A local file (a restore target, the cache).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// An I/O error on a local file.
    pub fn io(
        what: &'static str,
        path: impl AsRef<std::path::Path>,
        source: std::io::Error,
    ) -> Self {
        ArchiveError::Io {
            what,
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// True when the object was missing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ArchiveError::NotFound { .. })
    }
}

/// Archive results.
pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
