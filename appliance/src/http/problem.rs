//! Every failure as an RFC 9457 problem document (`application/problem+json`) naming the
//! field or rule at fault; internal causes are logged, never sent. Domain errors get their
//! status here and nowhere else; the few refusals only HTTP knows (no route, wrong method,
//! wrong content type) are made here too.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{Error, RowError};

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

/// The one place a domain error becomes an HTTP status (and the problem's slug and title).
fn parts(error: &Error) -> (StatusCode, &'static str, &'static str) {
    match error {
        Error::Malformed { .. } => (
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
        ),
        Error::Invalid { .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation-failed",
            "Validation failed",
        ),
        Error::BadRows(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad-rows",
            "The file has bad rows; nothing was imported",
        ),
        Error::BadFile(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad-file",
            "The file has errors; nothing was changed",
        ),
        Error::Unauthenticated(_) => (
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
        ),
        Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
        Error::Conflict { .. } => (StatusCode::CONFLICT, "conflict", "Conflict"),
        Error::TooLarge { .. } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request body too large",
        ),
        Error::RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many attempts",
        ),
        Error::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
        ),
        Error::Busy { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "Busy; retry shortly",
        ),
        Error::NotReady { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready yet",
        ),
        Error::Upstream(_) => (
            StatusCode::BAD_GATEWAY,
            "upstream-failed",
            "A lab machine did not answer",
        ),
        Error::Internal(_) | Error::Storage(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
        ),
    }
}

/// The response for `problem`, with `Retry-After` when the caller should come back.
fn respond(status: StatusCode, problem: &Problem, retry_after_secs: Option<u64>) -> Response {
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(secs) = retry_after_secs
        && let Ok(value) = HeaderValue::from_str(&secs.to_string())
    {
        headers.insert(header::RETRY_AFTER, value);
    }
    response
}

/// A refusal with no domain meaning, answered as a problem document.
fn refusal(status: StatusCode, slug: &str, title: &str, detail: String) -> Response {
    let problem = Problem {
        kind: format!("urn:labrack:problem:{slug}"),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
        field: None,
        errors: None,
    };
    respond(status, &problem, None)
}

/// No route has this path.
pub fn no_route(detail: &str) -> Response {
    refusal(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        detail.to_owned(),
    )
}

/// The route exists, not with this method.
pub fn method_not_allowed() -> Response {
    refusal(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "method not allowed".to_owned(),
    )
}

/// The body's content type is not the one this endpoint reads.
fn unsupported_media_type(expected: &str) -> Response {
    refusal(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        format!("expected content type {expected}"),
    )
}

/// Why a body extractor refused a request: a domain error (malformed, too large), or a
/// content type other than the endpoint reads, which only HTTP knows about.
#[derive(Debug)]
pub enum Rejection {
    Domain(Error),
    UnsupportedMediaType { expected: &'static str },
}

impl From<Error> for Rejection {
    fn from(error: Error) -> Self {
        Self::Domain(error)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Self::Domain(error) => error.into_response(),
            Self::UnsupportedMediaType { expected } => unsupported_media_type(expected),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, slug, title) = parts(&self);
        match &self {
            Self::Internal(cause) => tracing::error!(error = %cause, "internal error"),
            Self::Storage(cause) => tracing::error!(error = %cause, "storage failed"),
            _ => {}
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
        let retry_after_secs = match self {
            Self::RateLimited { retry_after_secs }
            | Self::NotReady {
                retry_after_secs, ..
            }
            | Self::Busy {
                retry_after_secs, ..
            } => Some(retry_after_secs),
            _ => None,
        };
        let problem = Problem {
            kind: format!("urn:labrack:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            field,
            errors,
        };
        respond(status, &problem, retry_after_secs)
    }
}

impl From<BytesRejection> for Error {
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

impl From<PathRejection> for Error {
    fn from(rejection: PathRejection) -> Self {
        Self::Malformed {
            detail: rejection.body_text(),
            field: Some("path".into()),
        }
    }
}

impl From<QueryRejection> for Error {
    fn from(rejection: QueryRejection) -> Self {
        Self::Malformed {
            detail: rejection.body_text(),
            field: Some("query".into()),
        }
    }
}
