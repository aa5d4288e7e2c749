//! One error type for the whole API. Every failure becomes an RFC 9457 problem document
//! (`application/problem+json`) naming the field or rule at fault; internal causes are
//! logged, never sent.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::{StoreError, WriteError};

pub use labrack_wire::RowError;

/// The problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// a URI naming the kind of problem
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// the request field at fault, when one is
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// per-row errors of an uploaded file
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<RowError>>,
}

/// Everything an API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
    /// wrong content type for this endpoint
    #[error("expected content type {expected}")]
    UnsupportedMediaType { expected: &'static str },
    /// too many attempts
    #[error("too many attempts; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// no route for this path or method
    #[error("{0}")]
    NoRoute(String),
    /// wrong method for the route
    #[error("method not allowed")]
    MethodNotAllowed,
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
}

impl ApiError {
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

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Malformed { .. } => (
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "Malformed request",
            ),
            Self::Invalid { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation-failed",
                "Validation failed",
            ),
            Self::BadRows(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad-rows",
                "The file has bad rows; nothing was imported",
            ),
            Self::BadFile(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad-file",
                "The file has errors; nothing was changed",
            ),
            Self::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            Self::NotFound(_) | Self::NoRoute(_) => {
                (StatusCode::NOT_FOUND, "not-found", "Not found")
            }
            Self::Conflict { .. } => (StatusCode::CONFLICT, "conflict", "Conflict"),
            Self::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Request body too large",
            ),
            Self::UnsupportedMediaType { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many attempts",
            ),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            Self::Busy { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "Busy; retry shortly",
            ),
            Self::NotReady { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "Not ready yet",
            ),
            Self::Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "A lab machine did not answer",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        if let Self::Internal(cause) = &self {
            tracing::error!(error = %cause, "internal error");
        }
        let (field, errors) = match &self {
            Self::Malformed { field, .. }
            | Self::Invalid { field, .. }
            | Self::Conflict { field, .. } => (field.clone(), None),
            Self::BadRows(rows) | Self::BadFile(rows) => (None, Some(rows.clone())),
            _ => (None, None),
        };
        let detail = match &self {
            Self::BadRows(rows) => format!("{} row(s) are invalid; see errors", rows.len()),
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("urn:labrack:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            field,
            errors,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Self::RateLimited { retry_after_secs }
        | Self::NotReady {
            retry_after_secs, ..
        }
        | Self::Busy {
            retry_after_secs, ..
        } = self
            && let Ok(value) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<crate::attempts::TooManyAttempts> for ApiError {
    fn from(refused: crate::attempts::TooManyAttempts) -> Self {
        Self::RateLimited {
            retry_after_secs: refused.retry_after.as_secs().max(1),
        }
    }
}

impl From<crate::passwords::HashError> for ApiError {
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

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::WriterClosed => Self::Unavailable,
            StoreError::Busy => Self::Busy {
                detail: "the appliance is busy writing; retry shortly".into(),
                retry_after_secs: 1,
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Internal(format!("sqlite: {error}"))
    }
}

impl From<WriteError<ApiError>> for ApiError {
    fn from(error: WriteError<ApiError>) -> Self {
        match error {
            WriteError::Rejected(e) => e,
            WriteError::Store(e) => e.into(),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        // The only interesting Bytes rejection is the body limit; the status says which.
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::TooLarge { limit: 0 }
        } else {
            Self::Malformed {
                detail: rejection.body_text(),
                field: None,
            }
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::Malformed {
            detail: rejection.body_text(),
            field: Some("path".into()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::Malformed {
            detail: rejection.body_text(),
            field: Some("query".into()),
        }
    }
}
