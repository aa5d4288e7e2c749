//! Health, readiness, metrics, the audit log and the static web UI.

use std::path::PathBuf;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};

/// Liveness: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers reads and the writer commits.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let read = state.db.read(|conn| conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).map_err(ApiError::from)).await;
    let write = state.db.writer().write(|_| Ok::<_, ApiError>(())).await;
    match (read, write) {
        (Ok(_), Ok(())) => "ready".into_response(),
        _ => ApiError::Unavailable.into_response(),
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// at most this many entries (1–1000, default 100)
    pub limit: Option<u32>,
    /// only entries with an id below this (paging backwards)
    pub before: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    /// `staff:NAME`, `participant:ID` or `system`
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub remote_addr: Option<String>,
    pub request_id: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
}

/// The append-only audit log, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, body = Problem)))]
pub async fn audit_log(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    caller.require_staff(&[Role::Admin, Role::Organizer])?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "limit must be between 1 and 1000"));
    }
    let before = query.before.unwrap_or(i64::MAX);
    let entries = state
        .db
        .read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, at, actor, action, target, remote_addr, request_id, detail FROM audit_log WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(rusqlite::params![before, limit], |r| {
                let detail: Option<String> = r.get(7)?;
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    remote_addr: r.get(5)?,
                    request_id: r.get(6)?,
                    detail: detail.and_then(|d| serde_json::from_str(&d).ok()).unwrap_or(serde_json::Value::Null),
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(ApiError::from)
        })
        .await?;
    Ok(Json(AuditPage { entries }))
}

const NOT_BUILT: &str = "<!doctype html><meta charset=utf-8><title>LabRack</title>\
<h1>LabRack</h1><p>The API is up, but the web UI has not been built. Run <code>cargo xtask run</code> \
(or <code>npm ci &amp;&amp; npm run build</code> in <code>web/</code>) and restart.</p>";

/// Serves the built web UI, or a page that says how to build it.
pub fn web_ui(dir: Option<PathBuf>) -> MethodRouter<AppState> {
    match dir.filter(|d| d.join("index.html").is_file()) {
        Some(dir) => axum::routing::get_service(tower_http::services::ServeDir::new(dir)),
        None => get(|| async { (StatusCode::OK, Html(NOT_BUILT)) }),
    }
}
