//! The receiver: a QUIC server that enrols appliances with one-time tokens (their client
//! certificate's fingerprint is their identity from then on), applies their outbox rows
//! through [`crate::store`], acknowledges the highest contiguous sequence, and serves the
//! read API beside it. Strangers are held to a few unidentified connections each, for at
//! most [`HELLO_WAIT`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use labrack_wire::sync::{self as protocol, Ack, Frame, Refused, Welcome};
use rusqlite::Connection;

use crate::store;

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
        let fingerprint = labrack_serving::sync_link::peer_fingerprint(&connection)
            .context("no client certificate")?;
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
            let admitted = store::admit(&conn, &fingerprint, &hello)?;
            Ok::<_, store::Refusal>((
                admitted,
                store::epoch(&conn).map_err(|e| (e.to_string(), None))?,
            ))
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
            store::apply(&mut conn, appliance_id, &epoch, &batch).map_err(anyhow::Error::from)
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
    let conn = store::open(&config.data_dir)?;
    if let Some(token) = store::first_admin_token(&conn)? {
        println!("labrack-cloud: admin token for the read API (shown once): {token}");
    }
    let material =
        labrack_serving::certificates::server_material(&config.data_dir, &config.tls_names)?;
    let server = labrack_serving::sync_link::server_config(
        material.chain.clone(),
        material.key.clone_key(),
        MAX_PENDING_HANDSHAKES,
    )?;
    let endpoint = quinn::Endpoint::server(server, config.listen)
        .with_context(|| format!("binding UDP {}", config.listen))?;
    let quic_addr = endpoint.local_addr()?;
    let db = Arc::new(Mutex::new(conn));
    let unidentified = Arc::new(tokio::sync::Semaphore::new(MAX_UNIDENTIFIED));
    let strangers = Arc::new(Strangers::default());
    let links = Arc::new(tokio::sync::Semaphore::new(MAX_LINKS));

    let http = crate::read_api::router(db.clone());
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
        "labrack-cloud: ca certificate {}",
        material.files.ca_cert.display()
    );
    println!(
        "labrack-cloud: ca fingerprint SHA256:{}",
        material.ca_fingerprint
    );
    println!("labrack-cloud: sync (QUIC) on {quic_addr}");
    println!("labrack-cloud: read API on https://{http_addr}/");
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

/// `labrack-cloud enrol-token`: works while the receiver runs (SQLite serialises writers).
pub fn enrol_token(data_dir: &Path, ttl_secs: u64) -> anyhow::Result<String> {
    anyhow::ensure!(
        (60..=30 * 86_400).contains(&ttl_secs),
        "--ttl-secs must be between 60 and 2592000"
    );
    let conn = store::open(data_dir)?;
    store::new_enrolment_token(&conn, ttl_secs)
}
