//! How the read API fails: a problem document (RFC 9457, `application/problem+json`) with
//! the same `urn:labrack:problem:…` kinds the appliance uses, mapped to a status here only.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Everything a read API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ReadApiError {
    /// no or an unknown admin token
    #[error("{0}")]
    Unauthenticated(String),
    /// the named thing does not exist
    #[error("{0} not found")]
    NotFound(&'static str),
    /// no such endpoint
    #[error("{0}")]
    NoRoute(String),
    /// the database failed; logged, not shown in detail
    #[error("{0}")]
    Internal(String),
}

#[derive(Debug, Serialize)]
struct Problem {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
}

impl ReadApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            Self::NotFound(_) | Self::NoRoute(_) => {
                (StatusCode::NOT_FOUND, "not-found", "Not found")
            }
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl IntoResponse for ReadApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        let detail = match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                "the cloud's database failed; see its log".to_owned()
            }
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("urn:labrack:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

impl From<rusqlite::Error> for ReadApiError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Internal(format!("sqlite: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_is_a_problem_document_and_hides_internal_causes() {
        let response =
            ReadApiError::Internal("sqlite: disk I/O error at /secret".into()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .expect("body");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(problem["type"], "urn:labrack:problem:internal");
        assert_eq!(problem["status"], 500);
        assert!(!problem["detail"].as_str().unwrap_or("").contains("/secret"));
    }
}
