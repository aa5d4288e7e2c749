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
//!
//! Every decision (what fits, what goes next, the window, which acks to believe, when to
//! prune, how long to wait) is `super::session`'s, with no I/O; this module only moves bytes
//! and rows.

use std::net::ToSocketAddrs as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::params;
use serde::Serialize;
use utoipa::ToSchema;

use super::protocol::{self, Batch, Frame, Hello, Row};
use super::session::{Backoff, Ended, Outbox, Session, WINDOW};
use crate::error::Error;

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// `host:port` of `labrack-cloud`'s QUIC listener
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

/// What the relay runs with.
#[derive(Clone)]
pub struct Relay {
    pub db: crate::store::Db,
    /// the link's state, for staff
    pub link: std::sync::Arc<Link>,
    /// where the sync identity lives; none in some tests
    pub data_dir: Option<PathBuf>,
    pub shutdown: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

/// Runs the relay until shutdown, reconnecting with backoff (0.5 s doubling to 5 s: a venue
/// link that comes back should be used at once).
pub async fn run(state: Relay, settings: SyncSettings) {
    state.link.update(|s| {
        s.configured = true;
        s.state = "connecting".into();
        s.cloud = Some(settings.cloud.clone());
    });
    let mut shutdown = state.shutdown.subscribe();
    let mut backoff = Backoff::default();
    let mut mismatched = false;
    loop {
        let session = tokio::select! {
            result = session(&state, &settings, &mut backoff) => result,
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
        let ended = if mismatch {
            Ended::Mismatch
        } else if refused {
            Ended::Refused
        } else {
            Ended::Down
        };
        if let Err(error) = &session {
            let text = format!("{error:#}");
            tracing::warn!(error = %text, "sync link down");
            if mismatch && !mismatched {
                // Loudly, once: staff must decide (it will not heal by waiting).
                tracing::error!(error = %text, "sync mismatch: the link stops until staff act");
                let detail = serde_json::json!({"detail": text});
                let meta = crate::audit::RequestMeta {
                    remote_addr: "local".into(),
                    request_id: String::new(),
                };
                let _ = state
                    .db
                    .writer()
                    .write(move |conn| {
                        crate::audit::record(
                            conn,
                            "system:sync",
                            &meta,
                            "sync.mismatch",
                            None,
                            detail,
                        )
                    })
                    .await;
            }
            state.link.update(|s| {
                s.state = match ended {
                    Ended::Mismatch => "mismatch".into(),
                    Ended::Refused => "refused".into(),
                    Ended::Down => "down".into(),
                };
                s.last_error = Some(text);
                s.linked_since_ms = None;
            });
        }
        mismatched = mismatch;
        let wait = backoff.after(ended);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.link.restart.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn read_rows(state: &Relay, after: i64, limit: usize) -> Result<Vec<Row>, Error> {
    state
        .db
        .read(move |conn| {
            let mut statement = conn.prepare_cached("SELECT seq, kind, entity, body, created_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
            let rows = statement.query_map(params![after, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(Row { seq: r.get(0)?, kind: r.get(1)?, entity: r.get(2)?, body: r.get(3)?, created_ms: r.get(4)? })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await
}

async fn session(
    state: &Relay,
    settings: &SyncSettings,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let ca = std::fs::read(&settings.cloud_ca)
        .with_context(|| format!("reading the cloud CA {}", settings.cloud_ca.display()))?;
    let data_dir = state
        .data_dir
        .clone()
        .context("the appliance has no data directory for its sync identity")?;
    let (chain, key) = labrack_serving::certificates::client_identity(&data_dir, "sync-client")?;
    let client = labrack_serving::sync_link::client_config(&ca, chain, key)?;
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
            Ok::<_, Error>((
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
    let outbox = Outbox {
        epoch,
        last_seq,
        pruned,
    };
    let core = Session::start(welcome.acked, &outbox, WINDOW)
        .map_err(|mismatch| Stop::Mismatch(mismatch.0))?;
    backoff.linked();
    let cloud_epoch = welcome.epoch.clone();
    let previous = state
        .db
        .writer()
        .write(move |conn| {
            let previous = crate::outbox::cloud_epoch(conn)?;
            crate::outbox::set_cloud_epoch(conn, &cloud_epoch)?;
            Ok::<_, Error>(previous)
        })
        .await
        .map_err(Error::from)?;
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
        s.linked_since_ms = Some(crate::clock::now_ms());
    });
    let core = std::sync::Arc::new(Mutex::new(core));
    let acks = std::sync::Arc::new(tokio::sync::Notify::new());
    // Acknowledgements arrive on their own task, so sending never waits on them.
    let reader = {
        let (core, acks) = (core.clone(), acks.clone());
        tokio::spawn(async move {
            loop {
                match protocol::read_frame(&mut recv).await {
                    Ok(Frame::Ack(ack)) => {
                        lock(&core)?
                            .ack(ack.acked)
                            .map_err(|mismatch| Stop::Mismatch(mismatch.0))?;
                        acks.notify_one();
                    }
                    Ok(other) => anyhow::bail!("unexpected frame {other:?}"),
                    Err(error) => return Err::<(), anyhow::Error>(error.into()),
                }
            }
        })
    };
    let result: anyhow::Result<()> = async {
        loop {
            if reader.is_finished() {
                break;
            }
            let (confirmed, prune_through) = {
                let core = lock(&core)?;
                (core.confirmed(), core.prune_due(std::time::Instant::now()))
            };
            state.link.update(|s| s.acked = confirmed);
            if let Some(through) = prune_through {
                prune(state, through, settings.retention).await?;
                lock(&core)?.pruned(through, std::time::Instant::now());
            }
            let next_after = {
                let core = lock(&core)?;
                core.may_send().then(|| core.next_after())
            };
            if let Some(after) = next_after {
                let rows = read_rows(state, after, settings.batch_rows).await?;
                if let Some(last) = rows.last().map(|r| r.seq) {
                    // Counted as sent before it goes, so its acknowledgement is never early.
                    lock(&core)?.sending(last);
                    protocol::write_frame(&mut send, &Frame::Batch(Batch { rows })).await?;
                    continue;
                }
            }
            tokio::select! {
                _ = acks.notified() => {}
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

/// The session's decisions, shared by the sender and the acknowledgement reader; never
/// held across an await.
fn lock(core: &Mutex<Session>) -> anyhow::Result<std::sync::MutexGuard<'_, Session>> {
    core.lock()
        .map_err(|_| anyhow::anyhow!("the sync session's state was poisoned"))
}

/// Drops acknowledged rows older than the retention, a slice per write so other writers
/// are not held up.
async fn prune(state: &Relay, acked: i64, retention: Duration) -> Result<(), Error> {
    const SLICE: i64 = 5_000;
    let cutoff = crate::clock::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let deleted = state
            .db
            .writer()
            .write(move |conn| Ok::<_, Error>(crate::outbox::prune(conn, acked, cutoff, SLICE)?))
            .await?;
        if i64::try_from(deleted).unwrap_or(0) < SLICE {
            return Ok(());
        }
    }
}
