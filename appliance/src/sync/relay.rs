//! The appliance's side of the sync link: connect to the cloud over QUIC (mutual TLS), say
//! hello (with the enrolment token until the cloud knows us), learn the cloud's
//! acknowledged sequence, then stream outbox rows after it in order, several batches in
//! flight (backpressure: at most [`WINDOW`] unacknowledged), and prune what the cloud
//! acknowledged once it is older than the retention. Any failure — no link, a partition, a
//! restart on either side — ends the session; the next one resumes from the cloud's ack.

use std::net::ToSocketAddrs as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::params;
use serde::Serialize;
use utoipa::ToSchema;

use super::protocol::{self, Batch, Frame, Hello, Row};
use crate::api::AppState;
use crate::api::error::ApiError;

/// Batches in flight before the relay waits for acknowledgements.
pub const WINDOW: usize = 8;

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// `host:port` of `labrack cloud`'s QUIC listener
    pub cloud: String,
    /// the cloud's CA certificate (PEM): the only certificate the link trusts
    pub cloud_ca: PathBuf,
    /// the one-time enrolment token; unused once the cloud knows this appliance
    pub token: Option<String>,
    /// how this appliance is named in the cloud
    pub name: String,
    pub batch_rows: usize,
    /// acknowledged rows stay this long (for inspection), then are pruned
    pub retention: Duration,
}

/// What staff see of the link.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct LinkStatus {
    pub configured: bool,
    /// `off`, `connecting`, `linked`, `down` or `refused`
    pub state: String,
    pub cloud: Option<String>,
    /// the highest sequence the cloud acknowledged
    pub acked: i64,
    pub last_error: Option<String>,
    pub linked_since_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Link {
    status: Mutex<LinkStatus>,
}

impl Link {
    pub fn status(&self) -> LinkStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut LinkStatus)) {
        if let Ok(mut status) = self.status.lock() {
            f(&mut status);
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(crate::labs::unix_ms()).unwrap_or(i64::MAX)
}

/// Runs the relay until shutdown, reconnecting with backoff (0.5 s doubling to 5 s: a venue
/// link that comes back should be used at once).
pub async fn run(state: AppState, settings: SyncSettings) {
    state.link.update(|s| {
        s.configured = true;
        s.state = "connecting".into();
        s.cloud = Some(settings.cloud.clone());
    });
    let mut shutdown = state.shutdown.subscribe();
    let mut failures = 0u32;
    loop {
        let session = tokio::select! {
            result = session(&state, &settings) => result,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let refused = matches!(&session, Err(e) if e.to_string().starts_with("refused by the cloud"));
        if let Err(error) = &session {
            let text = format!("{error:#}");
            tracing::warn!(error = %text, "sync link down");
            state.link.update(|s| {
                s.state = if refused { "refused".into() } else { "down".into() };
                s.last_error = Some(text);
                s.linked_since_ms = None;
            });
        } else {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let wait = Duration::from_millis(500).saturating_mul(1 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn read_rows(state: &AppState, after: i64, limit: usize) -> Result<Vec<Row>, ApiError> {
    state
        .db
        .read(move |conn| {
            let mut statement = conn.prepare_cached("SELECT seq, kind, entity, body, created_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
            let rows = statement.query_map(params![after, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(Row { seq: r.get(0)?, kind: r.get(1)?, entity: r.get(2)?, body: r.get(3)?, created_ms: r.get(4)? })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(ApiError::from)
        })
        .await
}

async fn session(state: &AppState, settings: &SyncSettings) -> anyhow::Result<()> {
    let ca = std::fs::read(&settings.cloud_ca).with_context(|| format!("reading the cloud CA {}", settings.cloud_ca.display()))?;
    let data_dir = state.data_dir.clone().context("the appliance has no data directory for its sync identity")?;
    let (chain, key) = crate::tls::client_identity(&data_dir, "sync-client")?;
    let client = super::tls::client_config(&ca, chain, key)?;
    let address = settings.cloud.to_socket_addrs().with_context(|| format!("resolving {}", settings.cloud))?.next().context("no address")?;
    let host = settings.cloud.rsplit_once(':').map_or(settings.cloud.as_str(), |(h, _)| h).trim_matches(['[', ']']).to_owned();
    let bind: std::net::SocketAddr = if address.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(client);
    let connection = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(address, &host)?)
        .await
        .context("the cloud did not answer within 10 s")?
        .context("connecting to the cloud")?;
    let (mut send, mut recv) = connection.open_bi().await?;
    protocol::write_frame(&mut send, &Frame::Hello(Hello { version: protocol::VERSION, name: settings.name.clone(), token: settings.token.clone() })).await?;
    let welcome = match protocol::read_frame(&mut recv).await? {
        Frame::Welcome(welcome) => welcome,
        Frame::Refused(refused) => anyhow::bail!("refused by the cloud: {}", refused.reason),
        other => anyhow::bail!("unexpected answer {other:?}"),
    };
    tracing::info!(appliance_id = welcome.appliance_id, acked = welcome.acked, "sync link up");
    state.link.update(|s| {
        s.state = "linked".into();
        s.acked = welcome.acked;
        s.last_error = None;
        s.linked_since_ms = Some(now_ms());
    });
    let acked = std::sync::Arc::new(tokio::sync::watch::Sender::new(welcome.acked));
    // Acknowledgements arrive on their own task, so sending never waits on them.
    let reader = {
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                let frame: Result<Frame, protocol::FrameError> = protocol::read_frame(&mut recv).await;
                match frame {
                    Ok(Frame::Ack(ack)) => {
                        acked.send_modify(|value| *value = (*value).max(ack.acked));
                    }
                    Ok(other) => return Err::<(), anyhow::Error>(anyhow::anyhow!("unexpected frame {other:?}")),
                    Err(error) => return Err(anyhow::Error::from(error)),
                }
            }
        })
    };
    let mut acked_rx = acked.subscribe();
    let mut sent = welcome.acked;
    let mut in_flight: std::collections::VecDeque<i64> = std::collections::VecDeque::new();
    let mut last_prune_seq = 0i64;
    let mut last_prune_at = std::time::Instant::now() - Duration::from_secs(60);
    let result: anyhow::Result<()> = async {
        loop {
            if reader.is_finished() {
                anyhow::bail!("the cloud closed the link");
            }
            let confirmed = *acked_rx.borrow_and_update();
            while in_flight.front().is_some_and(|last| *last <= confirmed) {
                in_flight.pop_front();
            }
            state.link.update(|s| s.acked = confirmed);
            // Pruning looks at most every 10 s: acknowledged rows stay for the retention anyway.
            if confirmed > last_prune_seq && last_prune_at.elapsed() >= Duration::from_secs(10) {
                prune(state, confirmed, settings.retention).await?;
                last_prune_seq = confirmed;
                last_prune_at = std::time::Instant::now();
            }
            if in_flight.len() < WINDOW {
                let rows = read_rows(state, sent, settings.batch_rows).await?;
                if let Some(last) = rows.last().map(|r| r.seq) {
                    protocol::write_frame(&mut send, &Frame::Batch(Batch { rows })).await?;
                    in_flight.push_back(last);
                    sent = last;
                    continue;
                }
            }
            tokio::select! {
                _ = acked_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
    .await;
    reader.abort();
    connection.close(0u32.into(), b"bye");
    result
}

/// Drops acknowledged rows older than the retention, a slice per write so other writers
/// are not held up.
async fn prune(state: &AppState, acked: i64, retention: Duration) -> Result<(), ApiError> {
    const SLICE: i64 = 5_000;
    let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let deleted = state.db.writer().write(move |conn| Ok::<_, ApiError>(crate::outbox::prune(conn, acked, cutoff, SLICE)?)).await?;
        if i64::try_from(deleted).unwrap_or(0) < SLICE {
            return Ok(());
        }
    }
}
