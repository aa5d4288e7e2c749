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
use axum::routing::{get, post};
use tracing::Instrument as _;

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

/// Builds the whole application: API, ops endpoints and the web UI.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/appliance", get(ops::appliance_card))
        .route("/v1/auth/login", post(session::login))
        .route("/v1/auth/logout", post(session::logout))
        .route("/v1/auth/session", get(session::current))
        .route("/v1/auth/password", post(session::change_password))
        .route("/v1/join", post(session::join))
        .route("/v1/staff", get(staff::list).post(staff::create))
        .route("/v1/events", get(events::list).post(events::create))
        .route(
            "/v1/events/{event_id}",
            get(events::get_one).patch(events::update),
        )
        .route("/v1/events/{event_id}/transition", post(events::transition))
        .route("/v1/events/{event_id}/dashboard", get(dashboard::dashboard))
        .route(
            "/v1/events/{event_id}/teams",
            get(people::list_teams).post(people::create_team),
        )
        .route(
            "/v1/events/{event_id}/participants",
            get(people::list_participants).post(people::create_participant),
        )
        .route(
            "/v1/events/{event_id}/participants/import",
            post(people::import_participants),
        )
        .route("/v1/teams/{team_id}", get(people::get_team))
        .route(
            "/v1/participants/{participant_id}/join-code",
            post(people::regenerate_join_code),
        )
        .route(
            "/v1/participants/{participant_id}/sign-out",
            post(people::sign_out_participant),
        )
        .route("/v1/me", get(people::me))
        .route("/v1/audit", get(ops::audit_log))
        .route("/v1/audit/verify", get(ops::verify_audit))
        .route("/v1/hosts", get(hosts::list))
        .route(
            "/v1/hosts/enrolment-tokens",
            post(hosts::create_enrolment_token),
        )
        .route("/v1/hosts/enrol", post(hosts::enrol))
        .route("/v1/hosts/agentless", post(hosts::register_agentless))
        .route(
            "/v1/teams/{team_id}/agentless-lab",
            post(labs::register_agentless_lab),
        )
        .route("/v1/host/poll", post(hosts::poll))
        .route("/v1/host/report", post(hosts::report))
        .route("/v1/host/heartbeat", post(hosts::heartbeat))
        .route(
            "/v1/templates",
            get(labs::list_templates).put(labs::put_templates),
        )
        .route(
            "/v1/events/{event_id}/allocations",
            get(labs::list_allocations),
        )
        .route("/v1/teams/{team_id}/allocation", post(labs::allocate))
        .route("/v1/allocations/{allocation_id}", get(labs::get_allocation))
        .route("/v1/allocations/{allocation_id}/reset", post(labs::reset))
        .route(
            "/v1/allocations/{allocation_id}/release",
            post(labs::release),
        )
        .route(
            "/v1/allocations/{allocation_id}/force-release",
            post(labs::force_release),
        )
        .route("/v1/allocations/{allocation_id}/resume", post(labs::resume))
        .route(
            "/v1/allocations/{allocation_id}/reassign",
            post(labs::reassign),
        )
        .route("/v1/me/allocation", get(labs::my_allocation))
        .route(
            "/v1/allocations/{allocation_id}/terminal-ticket",
            post(terminal::ticket),
        )
        .route("/v1/terminal", get(terminal::socket))
        .route(
            "/v1/allocations/{allocation_id}/desktop-ticket",
            post(desktop::ticket),
        )
        .route("/v1/desktop", get(desktop::socket))
        .route(
            "/v1/allocations/{allocation_id}/thumbnail",
            get(desktop::thumbnail),
        )
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{job_id}", get(jobs::get_one))
        .route("/v1/jobs/{job_id}/requeue", post(jobs::requeue))
        .route("/v1/jobs/{job_id}/cancel", post(jobs::cancel))
        .route(
            "/v1/events/{event_id}/check-batches",
            post(checks::queue_batch),
        )
        .route("/v1/check-batches/{batch_id}", get(checks::get_batch))
        .route("/v1/events/{event_id}/check-runs", get(checks::list_runs))
        .route(
            "/v1/events/{event_id}/leaderboard",
            get(scores::leaderboard),
        )
        .route(
            "/v1/events/{event_id}/rubric",
            get(scores::get_rubric).put(scores::put_rubric),
        )
        .route(
            "/v1/teams/{team_id}/judge-scores",
            get(scores::get_judge_scores).post(scores::put_judge_scores),
        )
        .route("/v1/events/{event_id}/scoreboard", get(scores::scoreboard))
        .route(
            "/v1/events/{event_id}/scoreboard/stream",
            get(scores::scoreboard_stream),
        )
        .route(
            "/v1/me/submissions",
            get(scores::my_submissions).post(scores::submit),
        )
        .route(
            "/v1/events/{event_id}/hints",
            get(assist::list_hints).post(assist::create_hint),
        )
        .route("/v1/me/hints", get(assist::my_hints))
        .route("/v1/me/hints/{hint_id}/unlock", post(assist::unlock_hint))
        .route(
            "/v1/teams/{team_id}/score-ledger",
            get(assist::get_ledger).post(assist::correct),
        )
        .route("/v1/me/assistant", post(assist::ask))
        .route("/v1/me/messages", get(assist::my_messages))
        .route(
            "/v1/events/{event_id}/agent-messages",
            get(assist::event_messages),
        )
        .route("/v1/events/{event_id}/alerts", get(assist::alerts))
        .route(
            "/v1/events/{event_id}/announcements",
            get(assist::list_announcements).post(assist::announce),
        )
        .route("/v1/me/announcements", get(assist::my_announcements))
        .route("/v1/events/{event_id}/llm-usage", get(assist::llm_usage))
        .route(
            "/v1/events/{event_id}/ledger",
            get(billing::ledger).post(billing::add_entry),
        )
        .route("/v1/events/{event_id}/ledger.csv", get(billing::ledger_csv))
        .route("/v1/sync", get(billing::sync_status))
        .route("/v1/sync/epoch", post(billing::start_sync_epoch))
        .route("/v1/me/checks", get(checks::my_checks))
        .route("/v1/me/checks/run", post(checks::run_mine))
        .route("/openapi.json", get(openapi::document))
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
