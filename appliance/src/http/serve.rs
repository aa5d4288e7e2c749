//! `labrack serve`: opens the data directory, bootstraps the first admin, serves HTTPS
//! and shuts down cleanly on SIGTERM/SIGINT (stop accepting, finish in-flight requests
//! and queued writes, exit 0).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::params;

use crate::cli::{LogFormat, ServeConfig};
use crate::http::{self, AppState, auth};
use crate::metrics::Metrics;
use crate::store::{self, Db};

/// After its first request (bounded by `first_request_timeout`), a kept-alive HTTP/1
/// connection must send each next request's headers within `idle` (hyper's timer runs while
/// the connection waits too: it is also the idle timeout); HTTP/2 clients must answer pings
/// within `header`. A slow or silent client cannot hold a connection for long.
fn bound_slow_clients(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    header: Duration,
    idle: Duration,
) {
    builder.http1().header_read_timeout(Some(idle));
    builder
        .http2()
        .keep_alive_interval(Some(header))
        .keep_alive_timeout(header)
        .max_concurrent_streams(256);
}

/// Lab hosts whose address is an IP get the connections kept for hosts from the start,
/// before their first signed call.
async fn note_host_addresses(state: &AppState) {
    let addresses: Vec<String> = state
        .db
        .read(|conn| {
            let mut stmt = conn.prepare("SELECT address FROM hosts")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(crate::error::Error::from)
        })
        .await
        .unwrap_or_default();
    for address in addresses {
        if let Ok(ip) = address.trim_matches(['[', ']']).parse() {
            state.connections.note_host(ip);
        }
    }
}

pub fn serve(config: ServeConfig) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(config))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LABRACK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .flatten_event(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    labrack_serving::data_dir::prepare(&config.data_dir)?;
    let metrics = Arc::new(Metrics::default());
    let db = Db::open(
        &config.data_dir.join(crate::store::DB_FILE),
        metrics.clone(),
    )
    .context("opening the database")?;
    let first_admin_password = bootstrap_first_admin(&db).await?;

    let nofile = crate::http::connections::raise_nofile_limit();
    let limits = config.connections.within_nofile(nofile);
    if limits != config.connections {
        tracing::warn!(
            nofile,
            max = limits.max,
            "the open-file limit lowers the connection cap"
        );
    }
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let signals = ShutdownSignals::register()?;
    let secrets = crate::secrets::SecretBox::load_or_create(&config.secret_key_file)
        .context("loading the secret key")?;
    let mut state = AppState::new(
        db.clone(),
        metrics,
        !config.dev_http,
        Some(config.web_dir.clone()),
        secrets,
    );
    state.heartbeat = Duration::from_secs(config.host_heartbeat_secs);
    state.host_grace = Duration::from_secs(config.host_grace_secs);
    state.webrtc_bind = config.webrtc_bind.clone();
    state.queue = Arc::new(config.queue.clone());
    state.connections = Arc::new(crate::http::connections::ConnectionGate::new(limits));
    note_host_addresses(&state).await;
    if config.llm.endpoints.is_empty() {
        tracing::info!("no language model configured: the agents use their rules");
    } else {
        let urls: Vec<&str> = config
            .llm
            .endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect();
        tracing::info!(endpoints = ?urls, budget = config.llm.team_token_budget, "agents use a language model");
    }
    state.llm = Arc::new(crate::llm::Gateway::new(config.llm.clone()));
    state.billing = Arc::new(config.billing.clone());
    state.data_dir = Some(config.data_dir.clone());
    let relay = config.sync.clone().map(|settings| {
        println!("labrack: syncing to the cloud at {}", settings.cloud);
        tokio::spawn(crate::sync::relay::run(state.relay(), settings))
    });
    let observer = tokio::spawn(crate::agents::run_observer(
        state.agents(),
        config.observer_every,
        config.idle_after,
    ));
    let reconciler = tokio::spawn(crate::labs::run_reconciler(state.reconciler()));
    let reaper = tokio::spawn(super::desktop::run_reaper(
        state.desktops.clone(),
        state.shutdown.clone(),
    ));
    let workers = crate::checks::spawn_workers(&state.workers(), config.queue.check_workers);
    let shutdown = state.shutdown.clone();
    // The TLS identity first: the appliance page shows its CA fingerprint for consoles.
    let identity = if config.dev_http {
        None
    } else {
        Some(labrack_serving::certificates::load_or_create(
            &config.data_dir,
            &config.tls_names,
        )?)
    };
    state.ca_fingerprint = identity
        .as_ref()
        .map(|identity| format!("SHA256:{}", identity.ca_fingerprint));
    let gate = crate::http::connections::GateAcceptor::new(state.connections.clone());
    let app = http::app(state).into_make_service_with_connect_info::<SocketAddr>();

    let shown_host = if local.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        local.ip().to_string()
    };
    let scheme = if identity.is_some() { "https" } else { "http" };
    let url = format!(
        "{scheme}://{}/",
        SocketAddr::new(shown_host.parse()?, local.port())
    );
    // Withdrawn (dropped) when the server stops.
    let mut announcement = None;
    // Kept until the server stops.
    let handshakes = identity
        .as_ref()
        .map(|_| {
            crate::http::connections::HandshakeThreads::start(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )
        })
        .transpose()
        .context("starting the TLS handshake threads")?;
    let server = if let Some(identity) = identity {
        println!(
            "labrack: ca certificate {}",
            identity.files.ca_cert.display()
        );
        println!("labrack: ca fingerprint SHA256:{}", identity.ca_fingerprint);
        announcement = announce(&config, local, &identity.ca_fingerprint);
        let handshake_threads = handshakes
            .as_ref()
            .context("no threads for TLS handshakes")?;
        let acceptor = crate::http::connections::GatedTlsAcceptor::new(
            gate,
            identity.server_config,
            handshake_threads,
            config.header_timeout,
        )?;
        let mut server = axum_server::from_tcp(listener)?
            .acceptor(acceptor)
            .handle(handle.clone())
            .first_request_timeout(config.header_timeout);
        bound_slow_clients(
            server.http_builder(),
            config.header_timeout,
            config.idle_timeout,
        );
        tokio::spawn(async move { server.serve(app).await })
    } else {
        tracing::warn!("serving plain HTTP (--dev-http): for development only");
        let mut server = axum_server::from_tcp(listener)?
            .acceptor(gate)
            .handle(handle.clone())
            .first_request_timeout(config.header_timeout);
        bound_slow_clients(
            server.http_builder(),
            config.header_timeout,
            config.idle_timeout,
        );
        tokio::spawn(async move { server.serve(app).await })
    };
    if let Some(password) = first_admin_password {
        println!("labrack: one-time password for admin: {password}");
        println!("labrack: log in as admin with it; you will be asked to choose a new password");
    }
    println!("labrack: listening on {url}");
    tracing::info!(%url, data_dir = %config.data_dir.display(), startup_ms = started.elapsed().as_millis(), "labrack serving");

    tokio::spawn(signals.shutdown(handle, shutdown.clone()));
    server.await.context("server task")?.context("server")?;
    drop(announcement);
    shutdown.send_replace(true);
    let _ = reconciler.await;
    let _ = reaper.await;
    let _ = observer.await;
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    for worker in workers {
        let _ = worker.await;
    }
    // Everything accepted has been answered; let the writer finish what is queued.
    db.writer().shutdown();
    tracing::info!("labrack stopped");
    Ok(())
}

/// Announces the appliance on the LAN (mDNS) unless turned off or listening on loopback only.
/// The name announced is one the server certificate holds: the first `--tls-names` entry, else
/// the machine's host name. Failing to announce is logged, never fatal.
fn announce(
    config: &crate::cli::ServeConfig,
    local: SocketAddr,
    fingerprint: &str,
) -> Option<labrack_discovery::Announcement> {
    if !config.mdns || local.ip().is_loopback() {
        return None;
    }
    let machine = labrack_serving::certificates::host_name();
    let cert_host = config
        .tls_names
        .first()
        .cloned()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| machine.clone());
    if cert_host.is_empty() {
        tracing::warn!("not announcing on the LAN: no host name (set --tls-names)");
        return None;
    }
    match labrack_discovery::Announcement::start(
        &machine,
        &cert_host,
        local.port(),
        &format!("SHA256:{fingerprint}"),
    ) {
        Ok(announcement) => {
            println!(
                "labrack: announced on the LAN as {} (mDNS)",
                announcement.fullname()
            );
            Some(announcement)
        }
        Err(error) => {
            tracing::warn!(%error, "could not announce the appliance on the LAN (mDNS); consoles can still connect by URL");
            None
        }
    }
}

/// Signal streams registered before the server says it listens, so a SIGTERM sent the
/// moment after start-up is already handled gracefully (not the default kill).
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn register() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    async fn shutdown(
        mut self,
        handle: axum_server::Handle<SocketAddr>,
        stop: Arc<tokio::sync::watch::Sender<bool>>,
    ) {
        tokio::select! {
            _ = self.terminate.recv() => {},
            _ = self.interrupt.recv() => {},
        }
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        // Long polls answer at once; the reconciler stops after its current pass.
        stop.send_replace(true);
        handle.graceful_shutdown(Some(Duration::from_secs(10)));
    }
}

/// A readable one-time password: 4 groups of 4 from the unambiguous alphabet (80 bits).
fn one_time_password() -> String {
    let raw = http::events_random_code(16);
    format!(
        "{}-{}-{}-{}",
        &raw[..4],
        &raw[4..8],
        &raw[8..12],
        &raw[12..]
    )
}

/// Creates `admin` with a one-time password when there is no staff account yet.
async fn bootstrap_first_admin(db: &Db) -> anyhow::Result<Option<String>> {
    let password = one_time_password();
    let hash = auth::hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
    let created = db
        .writer()
        .write(move |conn| {
            let any: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM staff)", [], |r| r.get(0))?;
            if any {
                return Ok(false);
            }
            conn.execute(
                "INSERT INTO staff (username, password_hash, role, must_change_password, created_at) VALUES ('admin', ?1, 'admin', 1, ?2)",
                params![hash, crate::clock::now_rfc3339()],
            )?;
            let at = crate::clock::now_rfc3339();
            let entry = crate::audit::Entry { at: &at, actor: "system", action: "staff.bootstrap_admin", target: Some("staff:admin"), remote_addr: None, request_id: None, detail: "{}" };
            crate::audit::append(conn, &entry, crate::clock::now_ms())?;
            Ok::<_, rusqlite::Error>(true)
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the first admin: {e:?}"))?;
    Ok(created.then_some(password))
}

/// `labrack admin reset-password`: works while the server runs (SQLite serialises writers).
pub fn reset_password(data_dir: &Path, username: &str) -> anyhow::Result<String> {
    let path = data_dir.join(crate::store::DB_FILE);
    anyhow::ensure!(path.exists(), "no database at {}", path.display());
    let mut conn = store::open_connection(&path, false)?;
    store::migrate(&mut conn)?;
    let password = one_time_password();
    let hash = auth::hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tx = conn.transaction()?;
    let id: i64 = tx
        .query_row(
            "SELECT id FROM staff WHERE username = ?1",
            [username],
            |r| r.get(0),
        )
        .with_context(|| format!("no staff account named {username:?}"))?;
    tx.execute(
        "UPDATE staff SET password_hash = ?1, must_change_password = 1 WHERE id = ?2",
        params![hash, id],
    )?;
    tx.execute("DELETE FROM sessions WHERE staff_id = ?1", [id])?;
    let (at, target) = (crate::clock::now_rfc3339(), format!("staff:{id}"));
    let entry = crate::audit::Entry {
        at: &at,
        actor: "system:cli",
        action: "auth.password_reset",
        target: Some(&target),
        remote_addr: None,
        request_id: None,
        detail: "{}",
    };
    crate::audit::append(&tx, &entry, crate::clock::now_ms())?;
    tx.commit()?;
    Ok(password)
}
