//! `labrack cloud`: the central-cloud receiver. A QUIC server that enrols appliances with
//! one-time tokens (their client certificate's fingerprint is their identity from then on),
//! applies their outbox rows idempotently by (appliance, epoch, sequence), acknowledges the
//! highest contiguous sequence, and keeps everything in its own SQLite file. An appliance's
//! rows form streams, one per epoch of its database: a new epoch (after a restore from a
//! backup) continues the previous one from its `base`, and the read API sees the rows of
//! each stream up to where the next one takes over (the `effective` view). A small HTTPS read API
//! (bearer admin token) serves rows, ledgers and scores per appliance and event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use sha2::Digest as _;

use super::protocol::{self, Ack, Batch, Frame, Refused, Welcome};

pub const DB_FILE: &str = "cloud.db";
/// QUIC handshakes waiting to be accepted.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Connections that have not yet said who they are (handshake to hello): a stranger on the
/// internet holds at most these, each for at most [`HELLO_WAIT`].
pub const MAX_UNIDENTIFIED: usize = 64;
/// Of those, from one address.
pub const MAX_UNIDENTIFIED_PER_ADDRESS: usize = 8;
/// How long a connection may take from its first packet to its hello.
pub const HELLO_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Appliance links held at once.
pub const MAX_LINKS: usize = 1024;

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

/// Versioned migrations after [`SCHEMA`] (the first cloud databases had none);
/// `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: database epochs and one stream of rows per (appliance, epoch); rows received before
    // epochs existed are the stream with the empty epoch
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('epoch', lower(hex(randomblob(16))));
CREATE TABLE streams (
    id INTEGER PRIMARY KEY,
    appliance_id INTEGER NOT NULL REFERENCES appliances(id),
    epoch TEXT NOT NULL,
    base INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    UNIQUE (appliance_id, epoch)
);
INSERT INTO streams (appliance_id, epoch, base, acked, started_ms) SELECT id, '', 0, acked, enrolled_ms FROM appliances;
CREATE TABLE received_v2 (
    appliance_id INTEGER NOT NULL REFERENCES appliances(id),
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    entity TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (appliance_id, epoch, seq)
) WITHOUT ROWID;
INSERT INTO received_v2 SELECT appliance_id, '', seq, kind, entity, body, created_ms FROM received;
DROP TABLE received;
ALTER TABLE received_v2 RENAME TO received;
CREATE INDEX received_by_kind ON received(appliance_id, kind, seq);
ALTER TABLE appliances ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
CREATE VIEW effective AS
    SELECT r.appliance_id, r.epoch, r.seq, r.kind, r.entity, r.body, r.created_ms
    FROM received r JOIN streams s ON s.appliance_id = r.appliance_id AND s.epoch = r.epoch
    WHERE r.seq <= coalesce((SELECT min(n.base) FROM streams n WHERE n.appliance_id = s.appliance_id AND n.id > s.id), 9223372036854775807);
"#,
];

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute_batch(SCHEMA).context("the cloud schema")?;
    let applied: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        applied <= MIGRATIONS.len(),
        "the cloud database is at schema {applied}, newer than this labrack ({})",
        MIGRATIONS.len()
    );
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("cloud migration {}", index + 1))?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn now_ms() -> i64 {
    i64::try_from(crate::labs::unix_ms()).unwrap_or(i64::MAX)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

pub fn open(data_dir: &Path) -> anyhow::Result<Connection> {
    crate::data_dir::prepare(data_dir)?;
    let mut conn = crate::db::open_connection(&data_dir.join(DB_FILE), false)
        .context("opening the cloud database")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// A new one-time enrolment token (printed once; stored hashed).
pub fn new_enrolment_token(conn: &Connection, ttl_secs: u64) -> anyhow::Result<String> {
    let token = format!("lrc_{}", crate::api::auth::random_token());
    conn.execute(
        "INSERT INTO enrolment_tokens (token_sha256, expires_ms) VALUES (?1, ?2)",
        params![
            sha256_hex(&token),
            now_ms()
                .saturating_add(i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX))
        ],
    )?;
    Ok(token)
}

/// A refusal: what to tell the appliance, and a code it may act on.
type Refusal = (String, Option<String>);

/// Who is calling — an enrolled appliance, or one enrolled now — and where its stream for
/// `hello.epoch` stands: `(appliance id, acked)`. A new epoch starts a stream at its base;
/// an epoch whose stream holds more than the appliance ever wrote is refused.
fn admit(
    conn: &Connection,
    fingerprint: &str,
    hello: &protocol::Hello,
) -> Result<(i64, i64), Refusal> {
    let id = enrolled(conn, fingerprint, &hello.name, hello.token.as_deref())
        .map_err(|reason| (reason, None))?;
    let stream: Option<i64> = conn
        .query_row(
            "SELECT acked FROM streams WHERE appliance_id = ?1 AND epoch = ?2",
            params![id, hello.epoch],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| (e.to_string(), None))?;
    let acked = match stream {
        Some(acked) if acked > hello.last_seq => {
            return Err((
                format!(
                    "epoch {:?}: this cloud holds the appliance's rows up to {acked}, but the appliance has written only up to {}: its database went back (restored from a backup?). Nothing was applied; on the appliance, an admin starts a new sync epoch to send what it holds.",
                    hello.epoch, hello.last_seq
                ),
                Some(protocol::EPOCH_MISMATCH.to_owned()),
            ));
        }
        Some(acked) => acked,
        None => {
            if hello.base < 0 || hello.base > hello.last_seq {
                return Err((
                    format!(
                        "epoch {:?} starts after {} but the appliance wrote only {}",
                        hello.epoch, hello.base, hello.last_seq
                    ),
                    None,
                ));
            }
            conn.execute(
                "INSERT INTO streams (appliance_id, epoch, base, acked, started_ms) VALUES (?1, ?2, ?3, ?3, ?4)",
                params![id, hello.epoch, hello.base, now_ms()],
            )
            .map_err(|e| (e.to_string(), None))?;
            tracing::info!(appliance = id, epoch = %hello.epoch, base = hello.base, "a new sync epoch");
            hello.base
        }
    };
    conn.execute(
        "UPDATE appliances SET epoch = ?2, acked = ?3 WHERE id = ?1",
        params![id, hello.epoch, acked],
    )
    .map_err(|e| (e.to_string(), None))?;
    Ok((id, acked))
}

/// The enrolled appliance with this certificate, or one enrolled now with `token`.
fn enrolled(
    conn: &Connection,
    fingerprint: &str,
    name: &str,
    token: Option<&str>,
) -> Result<i64, String> {
    let known: Option<i64> = conn
        .query_row(
            "SELECT id FROM appliances WHERE cert_sha256 = ?1",
            [fingerprint],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    if let Some(id) = known {
        conn.execute(
            "UPDATE appliances SET last_seen_ms = ?2 WHERE id = ?1",
            params![id, now_ms()],
        )
        .map_err(|e| e.to_string())?;
        return Ok(id);
    }
    let Some(token) = token else {
        return Err("this appliance is not enrolled: give it an enrolment token from `labrack cloud enrol-token`".into());
    };
    let row: Option<(i64, Option<i64>)> = conn
        .query_row(
            "SELECT expires_ms, used_by FROM enrolment_tokens WHERE token_sha256 = ?1",
            [sha256_hex(token)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    match row {
        None => Err("unknown enrolment token".into()),
        Some((_, Some(_))) => Err("this enrolment token was already used".into()),
        Some((expires, None)) if expires <= now_ms() => {
            Err("this enrolment token has expired".into())
        }
        Some(_) => {
            let name: String = name.chars().filter(|c| !c.is_control()).take(100).collect();
            conn.execute(
                "INSERT INTO appliances (name, cert_sha256, enrolled_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?3)",
                params![name, fingerprint, now_ms()],
            )
            .map_err(|e| e.to_string())?;
            let id = conn.last_insert_rowid();
            conn.execute(
                "UPDATE enrolment_tokens SET used_by = ?2 WHERE token_sha256 = ?1",
                params![sha256_hex(token), id],
            )
            .map_err(|e| e.to_string())?;
            tracing::info!(appliance = id, %name, "appliance enrolled");
            Ok(id)
        }
    }
}

/// Applies a batch to the appliance's stream for `epoch` in one transaction: rows already
/// held (and rows at or below the stream's base) change nothing; returns the highest
/// contiguous sequence now held.
pub fn apply(
    conn: &mut Connection,
    appliance_id: i64,
    epoch: &str,
    batch: &Batch,
) -> Result<i64, rusqlite::Error> {
    let tx = conn.transaction()?;
    let (base, mut acked): (i64, i64) = tx.query_row(
        "SELECT base, acked FROM streams WHERE appliance_id = ?1 AND epoch = ?2",
        params![appliance_id, epoch],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO received (appliance_id, epoch, seq, kind, entity, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for row in batch.rows.iter().filter(|row| row.seq > base) {
            insert.execute(params![
                appliance_id,
                epoch,
                row.seq,
                row.kind,
                row.entity,
                row.body,
                row.created_ms
            ])?;
        }
        let mut held = tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM received WHERE appliance_id = ?1 AND epoch = ?2 AND seq = ?3)")?;
        loop {
            let next: bool =
                held.query_row(params![appliance_id, epoch, acked + 1], |r| r.get(0))?;
            if !next {
                break;
            }
            acked += 1;
        }
    }
    tx.execute(
        "UPDATE streams SET acked = ?3 WHERE appliance_id = ?1 AND epoch = ?2",
        params![appliance_id, epoch, acked],
    )?;
    tx.execute(
        "UPDATE appliances SET acked = ?2, last_seen_ms = ?3 WHERE id = ?1 AND epoch = ?4",
        params![appliance_id, acked, now_ms(), epoch],
    )?;
    tx.commit()?;
    Ok(acked)
}

/// This cloud database's epoch.
fn epoch(conn: &Connection) -> Result<String, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
        r.get(0)
    })
}

/// Connections not yet identified, per source address (see [`MAX_UNIDENTIFIED_PER_ADDRESS`]).
#[derive(Debug, Default)]
struct Strangers(Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One counted stranger; uncounted when dropped.
struct Stranger {
    strangers: Arc<Strangers>,
    address: std::net::IpAddr,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Strangers {
    fn admit(
        self: &Arc<Self>,
        address: std::net::IpAddr,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<Stranger> {
        let mut counts = self.0.lock().ok()?;
        let count = counts.entry(address).or_default();
        if *count >= MAX_UNIDENTIFIED_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(Stranger {
            strangers: self.clone(),
            address,
            _slot: slot,
        })
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.strangers.0.lock()
            && let Some(count) = counts.get_mut(&self.address)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    db: Arc<Mutex<Connection>>,
    unidentified: Stranger,
) -> anyhow::Result<()> {
    // Handshake, stream and hello within one deadline, under the unidentified cap.
    let identified = tokio::time::timeout(HELLO_WAIT, async {
        let connection = incoming.await.context("handshake")?;
        let fingerprint =
            super::tls::peer_fingerprint(&connection).context("no client certificate")?;
        let (send, mut recv) = connection.accept_bi().await.context("opening the stream")?;
        let Frame::Hello(hello) = protocol::read_frame(&mut recv).await? else {
            anyhow::bail!("expected hello")
        };
        Ok::<_, anyhow::Error>((connection, fingerprint, send, recv, hello))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no hello within {} s", HELLO_WAIT.as_secs()))?;
    let (connection, fingerprint, mut send, mut recv, hello) = match identified {
        Ok(identified) => identified,
        Err(error) => return Err(error),
    };
    drop(unidentified);
    if hello.version != protocol::VERSION {
        let refusal = Frame::Refused(Refused {
            reason: format!(
                "protocol version {} is not supported (this cloud speaks {})",
                hello.version,
                protocol::VERSION
            ),
            code: None,
        });
        protocol::write_frame(&mut send, &refusal).await?;
        let _ = send.finish();
        connection.closed().await;
        return Ok(());
    }
    let admitted = {
        let db = db.clone();
        let (fingerprint, hello) = (fingerprint.clone(), hello.clone());
        tokio::task::spawn_blocking(move || {
            let conn = db
                .lock()
                .map_err(|_| ("database lock poisoned".to_owned(), None))?;
            let admitted = admit(&conn, &fingerprint, &hello)?;
            Ok::<_, Refusal>((admitted, epoch(&conn).map_err(|e| (e.to_string(), None))?))
        })
        .await?
    };
    let ((appliance_id, acked), cloud_epoch) = match admitted {
        Ok(admitted) => admitted,
        Err((reason, code)) => {
            tracing::warn!(%fingerprint, name = %hello.name, %reason, "refused an appliance");
            protocol::write_frame(&mut send, &Frame::Refused(Refused { reason, code })).await?;
            let _ = send.finish();
            // Let the refusal arrive before the connection goes.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), connection.closed()).await;
            return Ok(());
        }
    };
    protocol::write_frame(
        &mut send,
        &Frame::Welcome(Welcome {
            appliance_id,
            acked,
            epoch: cloud_epoch,
        }),
    )
    .await?;
    let stream_epoch = hello.epoch.clone();
    loop {
        let frame = match protocol::read_frame(&mut recv).await {
            Ok(frame) => frame,
            Err(protocol::FrameError::Closed) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        let Frame::Batch(batch) = frame else {
            anyhow::bail!("expected a batch")
        };
        let (db, epoch) = (db.clone(), stream_epoch.clone());
        let acked = tokio::task::spawn_blocking(move || {
            let mut conn = db
                .lock()
                .map_err(|_| anyhow::anyhow!("database lock poisoned"))?;
            apply(&mut conn, appliance_id, &epoch, &batch).map_err(anyhow::Error::from)
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(config))
}

async fn run(config: CloudConfig) -> anyhow::Result<()> {
    let conn = open(&config.data_dir)?;
    let fresh: bool = conn.query_row("SELECT NOT EXISTS(SELECT 1 FROM admin_tokens)", [], |r| {
        r.get(0)
    })?;
    if fresh {
        let token = format!("lrca_{}", crate::api::auth::random_token());
        conn.execute(
            "INSERT INTO admin_tokens (token_sha256, created_ms) VALUES (?1, ?2)",
            params![sha256_hex(&token), now_ms()],
        )?;
        println!("labrack cloud: admin token for the read API (shown once): {token}");
    }
    let material = crate::tls::server_material(&config.data_dir, &config.tls_names)?;
    let server = super::tls::server_config(material.chain.clone(), material.key.clone_key())?;
    let endpoint = quinn::Endpoint::server(server, config.listen)
        .with_context(|| format!("binding UDP {}", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let db = Arc::new(Mutex::new(conn));
    let unidentified = Arc::new(tokio::sync::Semaphore::new(MAX_UNIDENTIFIED));
    let strangers = Arc::new(Strangers::default());
    let links = Arc::new(tokio::sync::Semaphore::new(MAX_LINKS));

    let http = crate::sync::read_api::router(db.clone());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(material.chain, material.key)?;
    let listener = std::net::TcpListener::bind(config.http_listen)
        .with_context(|| format!("binding {}", config.http_listen))?;
    listener.set_nonblocking(true)?;
    let http_addr = listener.local_addr()?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let http_server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )?
    .handle(handle.clone())
    .serve(http.into_make_service());
    println!(
        "labrack cloud: ca certificate {}",
        material.files.ca_cert.display()
    );
    println!(
        "labrack cloud: ca fingerprint SHA256:{}",
        material.ca_fingerprint
    );
    println!("labrack cloud: sync (QUIC) on {quic_addr}");
    println!("labrack cloud: read API on https://{http_addr}/");
    let http_task = tokio::spawn(http_server);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Over either cap the connection is refused before any crypto work.
                let address = incoming.remote_address().ip();
                let stranger = unidentified.clone().try_acquire_owned().ok().and_then(|slot| strangers.admit(address, slot));
                let (Some(stranger), Ok(link)) = (stranger, links.clone().try_acquire_owned()) else {
                    tracing::warn!(remote = %incoming.remote_address(), "refused a sync connection: too many at once");
                    incoming.refuse();
                    continue;
                };
                let db = db.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_connection(incoming, db, stranger).await {
                        tracing::warn!(error = %format!("{error:#}"), "sync connection ended");
                    }
                    drop(link);
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
    anyhow::ensure!(
        (60..=30 * 86_400).contains(&ttl_secs),
        "--ttl-secs must be between 60 and 2592000"
    );
    let conn = open(data_dir)?;
    new_enrolment_token(&conn, ttl_secs)
}
