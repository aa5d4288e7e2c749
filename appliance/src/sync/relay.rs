//! The appliance's side of the sync link: connect to the cloud over QUIC (mutual TLS), say
//! hello (with the enrolment token until the cloud knows us), learn the cloud's
//! acknowledged sequence, then stream outbox rows after it in order, several batches in
//! flight (backpressure: at most [`WINDOW`] unacknowledged), and prune what the cloud
//! acknowledged once it is older than the retention. Any failure — no link, a partition, a
//! restart on either side — ends the session; the next one resumes from the cloud's ack.
//!
//! A cloud whose acknowledgements do not fit this database — more than was written or sent,
//! or less than was already pruned — or that refuses this database's epoch is a *mismatch*:
//! the link stops, says why (state `mismatch`, an audit row, a dashboard problem) and waits
//! for staff (`POST /api/v1/sync/epoch` starts a new epoch) instead of lagging silently.

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
    /// wakes the relay to connect again at once (a new epoch was started)
    restart: tokio::sync::Notify,
}

/// Why a session ended that a retry alone will not fix.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("refused by the cloud: {0}")]
    Refused(String),
    #[error("sync mismatch: {0}")]
    Mismatch(String),
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

    /// Connect again now (staff started a new epoch).
    pub fn reconnect(&self) {
        self.restart.notify_one();
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
    let mut mismatched = false;
    loop {
        let session = tokio::select! {
            result = session(&state, &settings) => result,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stop = session
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<Stop>());
        let (refused, mismatch) = (
            matches!(stop, Some(Stop::Refused(_))),
            matches!(stop, Some(Stop::Mismatch(_))),
        );
        if let Err(error) = &session {
            let text = format!("{error:#}");
            tracing::warn!(error = %text, "sync link down");
            if mismatch && !mismatched {
                // Loudly, once: staff must decide (it will not heal by waiting).
                tracing::error!(error = %text, "sync mismatch: the link stops until staff act");
                let detail = serde_json::json!({"detail": text});
                let meta = crate::api::extract::RequestMeta {
                    remote_addr: "local".into(),
                    request_id: String::new(),
                };
                let _ = state
                    .db
                    .writer()
                    .write(move |conn| {
                        crate::api::audit(conn, "system:sync", &meta, "sync.mismatch", None, detail)
                    })
                    .await;
            }
            state.link.update(|s| {
                s.state = if mismatch {
                    "mismatch".into()
                } else if refused {
                    "refused".into()
                } else {
                    "down".into()
                };
                s.last_error = Some(text);
                s.linked_since_ms = None;
            });
        } else {
            failures = 0;
        }
        mismatched = mismatch;
        failures = failures.saturating_add(1);
        let wait = if mismatch || refused {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(500)
                .saturating_mul(1 << failures.saturating_sub(1).min(6))
                .min(Duration::from_secs(5))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.link.restart.notified() => {}
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
    let ca = std::fs::read(&settings.cloud_ca)
        .with_context(|| format!("reading the cloud CA {}", settings.cloud_ca.display()))?;
    let data_dir = state
        .data_dir
        .clone()
        .context("the appliance has no data directory for its sync identity")?;
    let (chain, key) = crate::tls::client_identity(&data_dir, "sync-client")?;
    let client = super::tls::client_config(&ca, chain, key)?;
    let address = settings
        .cloud
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", settings.cloud))?
        .next()
        .context("no address")?;
    let host = settings
        .cloud
        .rsplit_once(':')
        .map_or(settings.cloud.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_owned();
    let bind: std::net::SocketAddr = if address.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(client);
    let connection =
        tokio::time::timeout(Duration::from_secs(10), endpoint.connect(address, &host)?)
            .await
            .context("the cloud did not answer within 10 s")?
            .context("connecting to the cloud")?;
    let (epoch, base, last_seq, pruned) = state
        .db
        .read(|conn| {
            let (epoch, base) = crate::outbox::current_epoch(conn)?;
            Ok::<_, ApiError>((
                epoch,
                base,
                crate::outbox::last_seq(conn)?,
                crate::outbox::pruned_through(conn)?,
            ))
        })
        .await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = Hello {
        version: protocol::VERSION,
        name: settings.name.clone(),
        token: settings.token.clone(),
        epoch: epoch.clone(),
        base,
        last_seq,
    };
    protocol::write_frame(&mut send, &Frame::Hello(hello)).await?;
    let welcome = match protocol::read_frame(&mut recv).await? {
        Frame::Welcome(welcome) => welcome,
        Frame::Refused(refused) if refused.code.as_deref() == Some(protocol::EPOCH_MISMATCH) => {
            return Err(Stop::Mismatch(refused.reason).into());
        }
        Frame::Refused(refused) => return Err(Stop::Refused(refused.reason).into()),
        other => anyhow::bail!("unexpected answer {other:?}"),
    };
    if welcome.acked > last_seq {
        return Err(Stop::Mismatch(format!(
            "the cloud acknowledges rows up to {} of epoch {epoch:?}, but this appliance has written only up to {last_seq}",
            welcome.acked
        ))
        .into());
    }
    if welcome.acked < pruned {
        return Err(Stop::Mismatch(format!(
            "the cloud holds rows only up to {}, but this appliance already pruned rows up to {pruned} once the cloud had acknowledged them: the cloud's database went back (restored from a backup?) and rows {}–{pruned} are no longer anywhere this link can send from. Restore the cloud's newer data, or start a new epoch to send the rest",
            welcome.acked,
            welcome.acked + 1
        ))
        .into());
    }
    let cloud_epoch = welcome.epoch.clone();
    let previous = state
        .db
        .writer()
        .write(move |conn| {
            let previous = crate::outbox::cloud_epoch(conn)?;
            crate::outbox::set_cloud_epoch(conn, &cloud_epoch)?;
            Ok::<_, ApiError>(previous)
        })
        .await
        .map_err(ApiError::from)?;
    if previous.as_ref().is_some_and(|p| *p != welcome.epoch) {
        tracing::warn!(previous = ?previous, now = %welcome.epoch, "the cloud's database changed (replaced or restored); its acknowledgement fits, so the link goes on");
    }
    tracing::info!(
        appliance_id = welcome.appliance_id,
        acked = welcome.acked,
        "sync link up"
    );
    state.link.update(|s| {
        s.state = "linked".into();
        s.acked = welcome.acked;
        s.last_error = None;
        s.linked_since_ms = Some(now_ms());
    });
    let acked = std::sync::Arc::new(tokio::sync::watch::Sender::new(welcome.acked));
    let sent_so_far = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(welcome.acked));
    // Acknowledgements arrive on their own task, so sending never waits on them.
    let reader = {
        let (acked, sent_so_far) = (acked.clone(), sent_so_far.clone());
        tokio::spawn(async move {
            loop {
                let frame: Result<Frame, protocol::FrameError> =
                    protocol::read_frame(&mut recv).await;
                match frame {
                    Ok(Frame::Ack(ack)) => {
                        let sent = sent_so_far.load(std::sync::atomic::Ordering::SeqCst);
                        if ack.acked > sent {
                            // Never believed: that would prune rows the cloud does not hold.
                            return Err(Stop::Mismatch(format!(
                                "the cloud acknowledged rows up to {} but only {sent} were sent",
                                ack.acked
                            ))
                            .into());
                        }
                        acked.send_modify(|value| *value = (*value).max(ack.acked));
                    }
                    Ok(other) => {
                        return Err::<(), anyhow::Error>(anyhow::anyhow!(
                            "unexpected frame {other:?}"
                        ));
                    }
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
                break;
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
                    // Counted as sent before it goes, so its acknowledgement is never early.
                    sent_so_far.store(last, std::sync::atomic::Ordering::SeqCst);
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
        Ok(())
    }
    .await;
    // The reader's reason, if it stopped first, says more than "the link closed".
    let result = match result {
        Ok(()) => match reader.await {
            Ok(Err(error)) => Err(error),
            _ => Err(anyhow::anyhow!("the cloud closed the link")),
        },
        Err(error) => {
            reader.abort();
            Err(error)
        }
    };
    connection.close(0u32.into(), b"bye");
    result
}

/// Drops acknowledged rows older than the retention, a slice per write so other writers
/// are not held up.
async fn prune(state: &AppState, acked: i64, retention: Duration) -> Result<(), ApiError> {
    const SLICE: i64 = 5_000;
    let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let deleted = state
            .db
            .writer()
            .write(move |conn| Ok::<_, ApiError>(crate::outbox::prune(conn, acked, cutoff, SLICE)?))
            .await?;
        if i64::try_from(deleted).unwrap_or(0) < SLICE {
            return Ok(());
        }
    }
}
