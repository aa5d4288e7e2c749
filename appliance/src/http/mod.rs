//! The HTTP API (v1), its middleware and the static web UI.
//!
//! Architecture invariant: handlers never write to SQLite directly; they hand a closure
//! to the group-commit writer, and every state-changing closure appends its audit row in
//! the same savepoint as the change, so the audit log and the state never disagree.

pub mod assist;
pub mod auth;
pub mod billing;
pub mod checks;
pub mod connections;
pub mod dashboard;
pub mod desktop;
pub mod extract;
pub mod problem;
pub use validate::{email as validate_email, name as validate_name};
pub mod boards;
pub mod events;
pub mod hosts;
pub mod jobs;
pub mod labs;
pub mod openapi;
pub mod ops;
pub mod people;
pub mod scores;
pub mod serve;
pub mod session;
pub mod staff;
pub mod terminal;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tracing::Instrument as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::metrics::Metrics;
use crate::secrets::SecretBox;
use crate::store::Db;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// failed logins per IP and per username
    /// guesses at passwords, join codes and enrolment tokens, counted before the work
    pub attempts: Arc<crate::attempts::AttemptLimiter>,
    /// argon2 on threads of its own behind a bounded queue
    pub passwords: crate::passwords::PasswordPool,
    /// open connections, capped in all and per client, with room kept for lab hosts
    pub connections: Arc<crate::http::connections::ConnectionGate>,
    /// the last readiness probe (when, and whether it passed)
    pub readiness: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    /// whether cookies get the Secure attribute (false only in the plain-HTTP dev mode)
    pub secure_cookies: bool,
    /// where the built web UI lives
    pub web_dir: Option<PathBuf>,
    /// seals lab desktop credentials at rest
    pub secrets: Arc<SecretBox>,
    /// bumped whenever host tasks are issued: wakes long polls
    pub host_wake: Arc<tokio::sync::watch::Sender<u64>>,
    /// set once at shutdown: ends long polls and background loops
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// how often hosts send heartbeats; three missed mark a host unhealthy
    pub heartbeat: Duration,
    /// how long the labs of an unhealthy host wait for it before they fail
    pub host_grace: Duration,
    /// single-use tickets for browser terminals and desktops
    pub terminal_tickets: Arc<terminal::TicketStore>,
    /// running desktop streams, one per watched lab
    pub desktops: Arc<desktop::DesktopRegistry>,
    /// where each desktop viewer's WebRTC UDP socket binds (`0.0.0.0:0`: every LAN interface)
    pub webrtc_bind: String,
    /// the public scoreboard, computed once a second per event and shared; stream caps
    pub boards: Arc<boards::Boards>,
    /// bumped when jobs are queued: wakes idle workers
    pub jobs_wake: Arc<tokio::sync::watch::Sender<u64>>,
    /// bumped when sessions end or an event changes state: open terminals and desktops look
    /// again whether their session may go on (see [`auth::until_revoked`])
    pub access: Arc<tokio::sync::watch::Sender<u64>>,
    /// bumped when a host reports a check: wakes the worker waiting for it
    pub check_reported: Arc<tokio::sync::watch::Sender<u64>>,
    /// attempts per job kind, number of check workers
    pub queue: Arc<crate::checks::QueueSettings>,
    /// the agents' way to a language model (budgets, failover, breakers)
    pub llm: Arc<crate::llm::Gateway>,
    /// rates and window of the billing ledger
    pub billing: Arc<crate::billing::BillingSettings>,
    /// the sync link's state, for staff
    pub link: Arc<crate::sync::relay::Link>,
    /// where the appliance keeps its files (TLS identities); none in some tests
    pub data_dir: Option<PathBuf>,
    /// the appliance CA's fingerprint (`SHA256:AB:…`) consoles pin; None over plain HTTP
    pub ca_fingerprint: Option<String>,
    /// per host: the signed calls taken (replays refused, one identity on two machines seen)
    pub host_calls: Arc<
        std::sync::Mutex<std::collections::HashMap<i64, labrack_provisioner::replay::ReplayGuard>>,
    >,
}

impl AppState {
    pub fn new(
        db: Db,
        metrics: Arc<Metrics>,
        secure_cookies: bool,
        web_dir: Option<PathBuf>,
        secrets: SecretBox,
    ) -> Self {
        Self {
            secrets: Arc::new(secrets),
            host_wake: Arc::new(tokio::sync::watch::Sender::new(0)),
            shutdown: Arc::new(tokio::sync::watch::Sender::new(false)),
            heartbeat: Duration::from_secs(5),
            host_grace: Duration::from_secs(900),
            terminal_tickets: Arc::new(terminal::TicketStore::default()),
            desktops: Arc::new(desktop::DesktopRegistry::default()),
            webrtc_bind: "0.0.0.0:0".into(),
            jobs_wake: Arc::new(tokio::sync::watch::Sender::new(0)),
            access: Arc::new(tokio::sync::watch::Sender::new(0)),
            boards: Arc::default(),
            check_reported: Arc::new(tokio::sync::watch::Sender::new(0)),
            queue: Arc::new(crate::checks::QueueSettings::default()),
            llm: Arc::new(crate::llm::Gateway::new(crate::llm::LlmSettings::default())),
            billing: Arc::new(crate::billing::BillingSettings::default()),
            link: Arc::new(crate::sync::relay::Link::default()),
            data_dir: None,
            ca_fingerprint: None,
            host_calls: Arc::default(),
            db,
            metrics,
            attempts: Arc::default(),
            passwords: crate::passwords::PasswordPool::for_this_machine(),
            readiness: Arc::default(),
            connections: Arc::new(crate::http::connections::ConnectionGate::new(
                crate::http::connections::ConnectionLimits::default(),
            )),
            secure_cookies,
            web_dir,
        }
    }

    /// Wakes every host long poll to look for new tasks.
    pub fn wake_hosts(&self) {
        self.host_wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes idle job workers to claim new jobs.
    pub fn wake_workers(&self) {
        self.jobs_wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The job queue's workers' context.
    pub fn workers(&self) -> crate::checks::Workers {
        crate::checks::Workers {
            db: self.db.clone(),
            secrets: self.secrets.clone(),
            queue: self.queue.clone(),
            llm: self.llm.clone(),
            host_wake: self.host_wake.clone(),
            jobs_wake: self.jobs_wake.clone(),
            check_reported: self.check_reported.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// The lab reconciler's context.
    pub fn reconciler(&self) -> crate::labs::Reconciler {
        crate::labs::Reconciler {
            db: self.db.clone(),
            secrets: self.secrets.clone(),
            billing: self.billing.clone(),
            heartbeat: self.heartbeat,
            host_grace: self.host_grace,
            host_wake: self.host_wake.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// The agents' context (observer, commentary, hints).
    pub fn agents(&self) -> crate::agents::AgentContext {
        crate::agents::AgentContext {
            db: self.db.clone(),
            llm: self.llm.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// The sync relay's context.
    pub fn relay(&self) -> crate::sync::relay::Relay {
        crate::sync::relay::Relay {
            db: self.db.clone(),
            link: self.link.clone(),
            data_dir: self.data_dir.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Sessions ended or an event changed state: open terminals and desktops check theirs.
    pub fn access_changed(&self) {
        self.access.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Every API route, in one list: each documented handler is registered with the path and
/// method its `#[utoipa::path]` names, so the router and `/api/openapi.json` cannot
/// disagree. Paths are relative to `/api`.
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ops::appliance_card))
        .routes(routes!(session::login))
        .routes(routes!(session::logout))
        .routes(routes!(session::current))
        .routes(routes!(session::change_password))
        .routes(routes!(session::join))
        .routes(routes!(staff::list, staff::create))
        .routes(routes!(events::list, events::create))
        .routes(routes!(events::get_one, events::update))
        .routes(routes!(events::transition))
        .routes(routes!(dashboard::dashboard))
        .routes(routes!(people::list_teams, people::create_team))
        .routes(routes!(
            people::list_participants,
            people::create_participant
        ))
        .routes(routes!(people::import_participants))
        .routes(routes!(people::get_team))
        .routes(routes!(people::regenerate_join_code))
        .routes(routes!(people::sign_out_participant))
        .routes(routes!(people::me))
        .routes(routes!(ops::audit_log))
        .routes(routes!(ops::verify_audit))
        .routes(routes!(hosts::list))
        .routes(routes!(hosts::create_enrolment_token))
        .routes(routes!(hosts::enrol))
        .routes(routes!(hosts::register_agentless))
        .routes(routes!(labs::register_agentless_lab))
        .routes(routes!(hosts::poll))
        .routes(routes!(hosts::report))
        .routes(routes!(hosts::heartbeat))
        .routes(routes!(labs::list_templates, labs::put_templates))
        .routes(routes!(labs::list_allocations))
        .routes(routes!(labs::allocate))
        .routes(routes!(labs::get_allocation))
        .routes(routes!(labs::reset))
        .routes(routes!(labs::release))
        .routes(routes!(labs::force_release))
        .routes(routes!(labs::resume))
        .routes(routes!(labs::reassign))
        .routes(routes!(labs::my_allocation))
        .routes(routes!(terminal::ticket))
        .route("/v1/terminal", get(terminal::socket))
        .routes(routes!(desktop::ticket))
        .route("/v1/desktop", get(desktop::socket))
        .routes(routes!(desktop::thumbnail))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::get_one))
        .routes(routes!(jobs::requeue))
        .routes(routes!(jobs::cancel))
        .routes(routes!(checks::queue_batch))
        .routes(routes!(checks::get_batch))
        .routes(routes!(checks::list_runs))
        .routes(routes!(scores::leaderboard))
        .routes(routes!(scores::get_rubric, scores::put_rubric))
        .routes(routes!(scores::get_judge_scores, scores::put_judge_scores))
        .routes(routes!(scores::scoreboard))
        .routes(routes!(scores::scoreboard_stream))
        .routes(routes!(scores::my_submissions, scores::submit))
        .routes(routes!(assist::list_hints, assist::create_hint))
        .routes(routes!(assist::my_hints))
        .routes(routes!(assist::unlock_hint))
        .routes(routes!(assist::get_ledger, assist::correct))
        .routes(routes!(assist::ask))
        .routes(routes!(assist::my_messages))
        .routes(routes!(assist::event_messages))
        .routes(routes!(assist::alerts))
        .routes(routes!(assist::list_announcements, assist::announce))
        .routes(routes!(assist::my_announcements))
        .routes(routes!(assist::llm_usage))
        .routes(routes!(billing::ledger, billing::add_entry))
        .routes(routes!(billing::ledger_csv))
        .routes(routes!(billing::sync_status))
        .routes(routes!(billing::start_sync_epoch))
        .routes(routes!(checks::my_checks))
        .routes(routes!(checks::run_mine))
        .route("/openapi.json", get(openapi::document))
}

/// Builds the whole application: API, ops endpoints and the web UI.
pub fn app(state: AppState) -> Router {
    let (api, _) = api_routes().split_for_parts();
    let api = api
        .fallback(|| async { problem::no_route("no such API endpoint") })
        .method_not_allowed_fallback(|| async { problem::method_not_allowed() })
        .layer(middleware::map_response(no_store));

    let web = ops::web_ui(state.web_dir.clone());
    Router::new()
        .nest("/api", api)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(web)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request id, tracing span, security headers and metrics for every request.
async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let incoming = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    let request_id = match incoming {
        Some(id) => id.to_owned(),
        None => format!(
            "{:08x}-{:06x}",
            std::process::id(),
            REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed)
        ),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        request.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| {
            if request.uri().path().starts_with("/api/") {
                "/api/*".into()
            } else {
                "/*".into()
            }
        });
    let span = tracing::info_span!("request", %request_id, %method, %route);
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state.metrics.observe(&method, &route, status, elapsed);
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        )
    });
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(X_REQUEST_ID.clone(), value);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
    );
    response
}

pub use events::random_code as events_random_code;
