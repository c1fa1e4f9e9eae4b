//! The error every service returns: a wire [`ErrorKind`] plus the full context chain.

use banger_api::ErrorKind;

/// What every service method returns.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// A failed service call.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct ServiceError {
    /// How the failure is reported on the wire.
    pub kind: ErrorKind,
    /// What went wrong, with context.
    pub error: anyhow::Error,
}

impl ServiceError {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, error: impl Into<anyhow::Error>) -> Self {
        ServiceError {
            kind,
            error: error.into(),
        }
    }
    /// The request could not be understood.
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::BadRequest, anyhow::anyhow!("{message}"))
    }
    /// The named thing does not exist.
    pub fn not_found(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, anyhow::anyhow!("{message}"))
    }
    /// The named thing exists already.
    pub fn already_exists(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::AlreadyExists, anyhow::anyhow!("{message}"))
    }
}

impl From<anyhow::Error> for ServiceError {
    fn from(error: anyhow::Error) -> Self {
        // A store refusing a newer schema keeps its kind through any added context.
        let kind = if error.chain().any(|e| e.is::<crate::store::NewerSchema>()) {
            ErrorKind::BadVersion
        } else {
            ErrorKind::OperationFailed
        };
        ServiceError { kind, error }
    }
}
