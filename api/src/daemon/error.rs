//! Errors of daemon operations, as API clients see them: one sentence
//! naming what was wrong, and a kind that picks the gRPC status.

use tidemark_journal::Error as JournalError;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A volume, tag or export that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something that already exists.
    #[error("{0}")]
    Exists(String),
    /// A request that can never succeed as given.
    #[error("{0}")]
    Invalid(String),
    /// A point outside the retained history.
    #[error("{0}")]
    OutOfRange(String),
    /// Refused now, but may succeed later (clients connected, …).
    #[error("{0}")]
    Busy(String),
    /// The operation failed.
    #[error("{0}")]
    Failed(String),
}

/// Result of daemon operations.
pub type ApiResult<T> = Result<T, ApiError>;

impl From<JournalError> for ApiError {
    fn from(e: JournalError) -> Self {
        let text = e.to_string();
        match e {
            JournalError::UnknownVolume(_) => ApiError::NotFound(text),
            JournalError::VolumeExists(_) => ApiError::Exists(text),
            JournalError::PointOutOfRange { .. } => ApiError::OutOfRange(text),
            JournalError::OutOfBounds { .. } | JournalError::Invalid(_) => ApiError::Invalid(text),
            JournalError::CacheFull { .. }
            | JournalError::NotDurable { .. }
            | JournalError::Behind { .. }
            | JournalError::NotReplicated { .. } => ApiError::Busy(text),
            _ => ApiError::Failed(text),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(m) => tonic::Status::not_found(m),
            ApiError::Exists(m) => tonic::Status::already_exists(m),
            ApiError::Invalid(m) => tonic::Status::invalid_argument(m),
            ApiError::OutOfRange(m) => tonic::Status::out_of_range(m),
            ApiError::Busy(m) => tonic::Status::failed_precondition(m),
            ApiError::Failed(m) => tonic::Status::internal(m),
        }
    }
}
