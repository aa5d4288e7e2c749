//! Health, readiness, metrics, the audit log, the appliance's connection card (URL and CA
//! fingerprint for staff consoles, also as a QR code) and the static web UI.

use std::path::PathBuf;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::problem::Problem;
use crate::error::Error;
use labrack_provisioner::roles;

#[derive(Debug, Serialize, ToSchema)]
pub struct ApplianceCard {
    /// the URL this request reached the appliance at (from its Host header)
    pub url: Option<String>,
    /// the CA fingerprint staff consoles pin (`SHA256:AB:…`); null over plain HTTP
    pub ca_fingerprint: Option<String>,
    /// the URL and fingerprint as a QR code (SVG), to read off the screen with a phone
    pub qr_svg: Option<String>,
}

/// A Host header worth echoing: a host name or address with an optional port.
fn sane_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The text a console connection QR code carries.
pub fn card_text(url: &str, fingerprint: &str) -> String {
    format!("LabRack appliance\n{url}\n{fingerprint}")
}

/// A QR code of `text` as SVG.
pub fn qr_svg(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(220, 220)
            .quiet_zone(true)
            .build(),
    )
}

/// What a staff console needs to connect: this appliance's URL and CA fingerprint, also as
/// a QR code. Public: the fingerprint is a hash of the certificate every TLS client is sent.
#[utoipa::path(get, path = "/v1/appliance", tag = "auth", responses((status = 200, body = ApplianceCard)))]
pub async fn appliance_card(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Json<ApplianceCard> {
    let scheme = if state.ca_fingerprint.is_some() {
        "https"
    } else {
        "http"
    };
    // HTTP/2 carries the host in the request's authority, HTTP/1.1 in the Host header.
    let host = uri.authority().map(|a| a.as_str().to_owned()).or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let url = host
        .filter(|h| sane_host(h))
        .map(|host| format!("{scheme}://{host}"));
    let qr = match (&url, &state.ca_fingerprint) {
        (Some(url), Some(fingerprint)) => qr_svg(&card_text(url, fingerprint)),
        _ => None,
    };
    Json(ApplianceCard {
        url,
        ca_fingerprint: state.ca_fingerprint.clone(),
        qr_svg: qr,
    })
}

/// Liveness: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers reads and the writer commits.
pub async fn readyz(State(state): State<AppState>) -> Response {
    // One probe a second at most, whoever asks: a probe flood cannot fill the write queue.
    let mut last = state.readiness.lock().await;
    let ready = match *last {
        Some((at, ready)) if at.elapsed() < std::time::Duration::from_secs(1) => ready,
        _ => {
            let read = state
                .db
                .read(|conn| {
                    conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                        .map_err(Error::from)
                })
                .await;
            let write = state.db.writer().write(|_| Ok::<_, Error>(())).await;
            let ready = read.is_ok() && write.is_ok();
            *last = Some((std::time::Instant::now(), ready));
            ready
        }
    };
    drop(last);
    if ready {
        "ready".into_response()
    } else {
        Error::Unavailable.into_response()
    }
}

/// The metrics in the OpenMetrics text format (Prometheus scrapes it).
pub async fn metrics(State(state): State<AppState>) -> Response {
    state
        .metrics
        .note_connections(state.connections.open(), state.connections.refused());
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// at most this many entries (1–1000, default 100)
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// only entries with an id below this (paging backwards)
    #[param(minimum = 1)]
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
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, body = Problem)))]
pub async fn audit_log(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit", "limit must be between 1 and 1000"));
    }
    if query.before.is_some_and(|before| before < 1) {
        return Err(Error::invalid(
            "before",
            "before is an audit entry id, 1 or more",
        ));
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
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(AuditPage { entries }))
}

/// Checks the audit log's hash chain (admins): how many rows it holds and the first one
/// that was edited, removed or put out of order, if any.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", responses((status = 200, body = crate::audit::Verified), (status = 403, body = Problem)))]
pub async fn verify_audit(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<crate::audit::Verified>, Error> {
    caller.require_staff(&roles::ADMINS)?;
    Ok(Json(
        state
            .db
            .read(|conn| crate::audit::verify(conn).map_err(Error::from))
            .await?,
    ))
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

#[cfg(test)]
mod card_tests {
    use super::*;

    /// The QR code decodes (rqrr, an independent decoder) to the URL and the fingerprint.
    #[test]
    fn the_qr_code_reads_back_as_the_url_and_fingerprint() {
        let text = card_text("https://rack-1.local:8443", "SHA256:AB:CD:EF");
        let code = qrcode::QrCode::new(text.as_bytes()).expect("qr");
        let (width, scale, quiet) = (code.width(), 6, 4);
        let colors = code.to_colors();
        let side = (width + 2 * quiet) * scale;
        let mut image = rqrr::PreparedImage::prepare_from_greyscale(side, side, |x, y| {
            let (mx, my) = (
                (x / scale).wrapping_sub(quiet),
                (y / scale).wrapping_sub(quiet),
            );
            let dark = mx < width && my < width && colors[my * width + mx] == qrcode::Color::Dark;
            if dark { 0 } else { 255 }
        });
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1);
        let (_, content) = grids[0].decode().expect("decodes");
        assert_eq!(content, text);
        let svg = qr_svg(&text).expect("svg");
        assert!(
            svg.starts_with("<?xml") && svg.contains("<svg"),
            "{}",
            &svg[..80.min(svg.len())]
        );
    }

    #[test]
    fn only_plain_host_headers_are_echoed() {
        assert!(sane_host("rack-1.local:8443") && sane_host("10.0.0.2") && sane_host("[::1]:8443"));
        assert!(
            !sane_host("")
                && !sane_host("evil.example/<script>")
                && !sane_host(&"a".repeat(300))
                && !sane_host("a b")
        );
    }
}
