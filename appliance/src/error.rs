//! The domain's error: what went wrong, in terms a caller can act on (a field breaks a rule,
//! the thing conflicts with the current state, the store is busy), with the cause kept for
//! the log. Nothing here knows HTTP; `http::problem` maps each variant to a status.

use crate::store::{StoreError, WriteError};

pub use labrack_wire::RowError;

/// Everything a domain operation can fail with, by what it means to the caller. The HTTP
/// layer turns each variant into a status and problem document in one place
/// (`http::problem`); background loops log them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// the body or a parameter could not be parsed
    #[error("{detail}")]
    Malformed {
        detail: String,
        field: Option<String>,
    },
    /// parsed, but a field breaks a rule
    #[error("{detail}")]
    Invalid {
        detail: String,
        field: Option<String>,
    },
    /// an uploaded file has bad rows; nothing was imported
    #[error("{} bad rows", .0.len())]
    BadRows(Vec<RowError>),
    /// an uploaded file has errors; nothing was changed
    #[error("{} errors in the file", .0.len())]
    BadFile(Vec<RowError>),
    /// no valid session
    #[error("{0}")]
    Unauthenticated(String),
    /// authenticated, but not allowed to do this
    #[error("{0}")]
    Forbidden(String),
    /// the thing does not exist (or the caller may not know it exists)
    #[error("{0} not found")]
    NotFound(&'static str),
    /// the request conflicts with the current state
    #[error("{detail}")]
    Conflict {
        detail: String,
        field: Option<String>,
    },
    /// the body is larger than this endpoint accepts
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// too many attempts
    #[error("too many attempts; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// a bounded resource is full (password checks, the write queue); retry shortly
    #[error("{detail}")]
    Busy {
        detail: String,
        retry_after_secs: u64,
    },
    /// the server is shutting down or its storage failed
    #[error("service unavailable")]
    Unavailable,
    /// the thing is being prepared (a desktop connecting); ask again in a moment
    #[error("{detail}")]
    NotReady {
        detail: String,
        retry_after_secs: u64,
    },
    /// a machine the appliance talks to on the caller's behalf (a lab desktop) failed
    #[error("{0}")]
    Upstream(String),
    /// a bug or an unexpected failure; the cause is logged
    #[error("internal error")]
    Internal(String),
    /// the database failed under the request (not busy, not shutting down); the cause is
    /// kept as the source and logged
    #[error("internal error")]
    Storage(#[source] StoreError),
}

impl Error {
    pub fn invalid(field: &str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            detail: detail.into(),
            field: Some(field.to_owned()),
        }
    }

    pub fn conflict(field: Option<&str>, detail: impl Into<String>) -> Self {
        Self::Conflict {
            detail: detail.into(),
            field: field.map(str::to_owned),
        }
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::Forbidden(detail.into())
    }
}

impl From<crate::attempts::TooManyAttempts> for Error {
    fn from(refused: crate::attempts::TooManyAttempts) -> Self {
        Self::RateLimited {
            retry_after_secs: refused.retry_after.as_secs().max(1),
        }
    }
}

impl From<crate::passwords::HashError> for Error {
    fn from(error: crate::passwords::HashError) -> Self {
        match error {
            crate::passwords::HashError::Busy(busy) => Self::Busy {
                detail: busy.to_string(),
                retry_after_secs: busy.retry_after.as_secs().max(1),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::WriterClosed => Self::Unavailable,
            StoreError::Busy => Self::Busy {
                detail: "the appliance is busy writing; retry shortly".into(),
                retry_after_secs: 1,
            },
            other => Self::Storage(other),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Self {
        Self::Storage(StoreError::Sqlite(error))
    }
}

impl From<WriteError<Error>> for Error {
    fn from(error: WriteError<Error>) -> Self {
        match error {
            WriteError::Rejected(e) => e,
            WriteError::Store(e) => e.into(),
        }
    }
}
