//! `labrack cloud`: the central-cloud receiver. A QUIC server that enrols appliances with
//! one-time tokens (their client certificate's fingerprint is their identity from then on),
//! applies their outbox rows idempotently by (appliance, sequence), acknowledges the highest
//! contiguous sequence, and keeps everything in its own SQLite file. A small HTTPS read API
//! (bearer admin token) serves rows, ledgers and scores per appliance and event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use sha2::Digest as _;

use super::protocol::{self, Ack, Batch, Frame, Refused, Welcome};

pub const DB_FILE: &str = "cloud.db";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS appliances (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL UNIQUE,
    acked INTEGER NOT NULL DEFAULT 0,
    enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL,
    used_by INTEGER REFERENCES appliances(id)
);
CREATE TABLE IF NOT EXISTS admin_tokens (token_sha256 TEXT PRIMARY KEY, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS received (
    appliance_id INTEGER NOT NULL REFERENCES appliances(id),
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    entity TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (appliance_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS received_by_kind ON received(appliance_id, kind, seq);
"#;

fn now_ms() -> i64 {
    i64::try_from(crate::labs::unix_ms()).unwrap_or(i64::MAX)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

pub fn open(data_dir: &Path) -> anyhow::Result<Connection> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let conn = crate::db::open_connection(&data_dir.join(DB_FILE), false).context("opening the cloud database")?;
    conn.execute_batch(SCHEMA).context("the cloud schema")?;
    Ok(conn)
}

/// A new one-time enrolment token (printed once; stored hashed).
pub fn new_enrolment_token(conn: &Connection, ttl_secs: u64) -> anyhow::Result<String> {
    let token = format!("lrc_{}", crate::api::auth::random_token());
    conn.execute(
        "INSERT INTO enrolment_tokens (token_sha256, expires_ms) VALUES (?1, ?2)",
        params![sha256_hex(&token), now_ms().saturating_add(i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX))],
    )?;
    Ok(token)
}

/// Who is calling: an enrolled appliance, one enrolled now, or a refusal.
fn admit(conn: &Connection, fingerprint: &str, name: &str, token: Option<&str>) -> Result<(i64, i64), String> {
    let known: Option<(i64, i64)> = conn
        .query_row("SELECT id, acked FROM appliances WHERE cert_sha256 = ?1", [fingerprint], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(|e| e.to_string())?;
    if let Some((id, acked)) = known {
        conn.execute("UPDATE appliances SET last_seen_ms = ?2 WHERE id = ?1", params![id, now_ms()]).map_err(|e| e.to_string())?;
        return Ok((id, acked));
    }
    let Some(token) = token else { return Err("this appliance is not enrolled: give it an enrolment token from `labrack cloud enrol-token`".into()) };
    let row: Option<(i64, Option<i64>)> = conn
        .query_row("SELECT expires_ms, used_by FROM enrolment_tokens WHERE token_sha256 = ?1", [sha256_hex(token)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(|e| e.to_string())?;
    match row {
        None => Err("unknown enrolment token".into()),
        Some((_, Some(_))) => Err("this enrolment token was already used".into()),
        Some((expires, None)) if expires <= now_ms() => Err("this enrolment token has expired".into()),
        Some(_) => {
            let name: String = name.chars().filter(|c| !c.is_control()).take(100).collect();
            conn.execute(
                "INSERT INTO appliances (name, cert_sha256, enrolled_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?3)",
                params![name, fingerprint, now_ms()],
            )
            .map_err(|e| e.to_string())?;
            let id = conn.last_insert_rowid();
            conn.execute("UPDATE enrolment_tokens SET used_by = ?2 WHERE token_sha256 = ?1", params![sha256_hex(token), id]).map_err(|e| e.to_string())?;
            tracing::info!(appliance = id, %name, "appliance enrolled");
            Ok((id, 0))
        }
    }
}

/// Applies a batch in one transaction: rows already held change nothing; returns the
/// highest contiguous sequence now held.
pub fn apply(conn: &mut Connection, appliance_id: i64, batch: &Batch) -> Result<i64, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut acked: i64 = tx.query_row("SELECT acked FROM appliances WHERE id = ?1", [appliance_id], |r| r.get(0))?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO received (appliance_id, seq, kind, entity, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for row in &batch.rows {
            insert.execute(params![appliance_id, row.seq, row.kind, row.entity, row.body, row.created_ms])?;
        }
        let mut held = tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM received WHERE appliance_id = ?1 AND seq = ?2)")?;
        loop {
            let next: bool = held.query_row(params![appliance_id, acked + 1], |r| r.get(0))?;
            if !next {
                break;
            }
            acked += 1;
        }
    }
    tx.execute("UPDATE appliances SET acked = ?2, last_seen_ms = ?3 WHERE id = ?1", params![appliance_id, acked, now_ms()])?;
    tx.commit()?;
    Ok(acked)
}

async fn serve_connection(incoming: quinn::Incoming, db: Arc<Mutex<Connection>>) -> anyhow::Result<()> {
    let connection = incoming.await.context("handshake")?;
    let fingerprint = super::tls::peer_fingerprint(&connection).context("no client certificate")?;
    let (mut send, mut recv) = connection.accept_bi().await.context("opening the stream")?;
    let Frame::Hello(hello) = protocol::read_frame(&mut recv).await? else { anyhow::bail!("expected hello") };
    if hello.version != protocol::VERSION {
        let refusal = Frame::Refused(Refused { reason: format!("protocol version {} is not supported (this cloud speaks {})", hello.version, protocol::VERSION) });
        protocol::write_frame(&mut send, &refusal).await?;
        let _ = send.finish();
        connection.closed().await;
        return Ok(());
    }
    let admitted = {
        let db = db.clone();
        let (fingerprint, name, token) = (fingerprint.clone(), hello.name.clone(), hello.token.clone());
        tokio::task::spawn_blocking(move || {
            let conn = db.lock().map_err(|_| "database lock poisoned".to_owned())?;
            admit(&conn, &fingerprint, &name, token.as_deref())
        })
        .await?
    };
    let (appliance_id, acked) = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => {
            tracing::warn!(%fingerprint, name = %hello.name, %reason, "refused an appliance");
            protocol::write_frame(&mut send, &Frame::Refused(Refused { reason })).await?;
            let _ = send.finish();
            // Let the refusal arrive before the connection goes.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connection.closed()).await;
            return Ok(());
        }
    };
    protocol::write_frame(&mut send, &Frame::Welcome(Welcome { appliance_id, acked })).await?;
    loop {
        let frame = match protocol::read_frame(&mut recv).await {
            Ok(frame) => frame,
            Err(protocol::FrameError::Closed) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        let Frame::Batch(batch) = frame else { anyhow::bail!("expected a batch") };
        let db = db.clone();
        let acked = tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().map_err(|_| anyhow::anyhow!("database lock poisoned"))?;
            apply(&mut conn, appliance_id, &batch).map_err(anyhow::Error::from)
        })
        .await??;
        protocol::write_frame(&mut send, &Frame::Ack(Ack { acked })).await?;
    }
}

#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub tls_names: Vec<String>,
}

/// Runs the receiver until SIGTERM/SIGINT.
pub fn serve(config: CloudConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(config))
}

async fn run(config: CloudConfig) -> anyhow::Result<()> {
    let conn = open(&config.data_dir)?;
    let fresh: bool = conn.query_row("SELECT NOT EXISTS(SELECT 1 FROM admin_tokens)", [], |r| r.get(0))?;
    if fresh {
        let token = format!("lrca_{}", crate::api::auth::random_token());
        conn.execute("INSERT INTO admin_tokens (token_sha256, created_ms) VALUES (?1, ?2)", params![sha256_hex(&token), now_ms()])?;
        println!("labrack cloud: admin token for the read API (shown once): {token}");
    }
    let material = crate::tls::server_material(&config.data_dir, &config.tls_names)?;
    let server = super::tls::server_config(material.chain.clone(), material.key.clone_key())?;
    let endpoint = quinn::Endpoint::server(server, config.listen).with_context(|| format!("binding UDP {}", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let db = Arc::new(Mutex::new(conn));

    let http = crate::sync::read_api::router(db.clone());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(material.chain, material.key)?;
    let listener = std::net::TcpListener::bind(config.http_listen).with_context(|| format!("binding {}", config.http_listen))?;
    listener.set_nonblocking(true)?;
    let http_addr = listener.local_addr()?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let http_server = axum_server::from_tcp_rustls(listener, axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)))?
        .handle(handle.clone())
        .serve(http.into_make_service());
    println!("labrack cloud: ca certificate {}", material.files.ca_cert.display());
    println!("labrack cloud: ca fingerprint SHA256:{}", material.ca_fingerprint);
    println!("labrack cloud: sync (QUIC) on {quic_addr}");
    println!("labrack cloud: read API on https://{http_addr}/");
    let http_task = tokio::spawn(http_server);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let db = db.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_connection(incoming, db).await {
                        tracing::warn!(error = %format!("{error:#}"), "sync connection ended");
                    }
                });
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
    handle.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    let _ = http_task.await;
    Ok(())
}

/// `labrack cloud enrol-token`: works while the receiver runs (SQLite serialises writers).
pub fn enrol_token(data_dir: &Path, ttl_secs: u64) -> anyhow::Result<String> {
    anyhow::ensure!((60..=30 * 86_400).contains(&ttl_secs), "--ttl-secs must be between 60 and 2592000");
    let conn = open(data_dir)?;
    new_enrolment_token(&conn, ttl_secs)
}
