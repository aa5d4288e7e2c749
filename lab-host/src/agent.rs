//! `enrol` and `run`: the agent's life.
//!
//! `run` is three loops sharing the spool: the poller long-polls for tasks and runs each
//! new task id once; the heartbeat queues a telemetry sample every few seconds; the sender
//! delivers queued reports and samples in order, retrying with backoff while the
//! appliance is unreachable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use labrack_provisioner::protocol::{
    EnrolRequest, EnrolResponse, HostTask, PROTOCOL_VERSION, PollRequest, PollResponse, TaskId,
    TaskKind, TaskOutcome, TaskReport,
};
use tokio::sync::Notify;

use crate::client::{CallError, HostClient, decode, http_client};
use crate::identity::{self, HostConfig};
use crate::runtime::{self, RuntimeSettings};
use crate::spool::{HostMemory, Message, Spool, TaskMark};
use crate::telemetry;

pub(crate) struct EnrolOptions {
    pub(crate) appliance: String,
    pub(crate) token: String,
    pub(crate) ca: PathBuf,
    pub(crate) name: Option<String>,
    pub(crate) address: Option<String>,
    pub(crate) capacity: u32,
    pub(crate) state_dir: PathBuf,
    pub(crate) force: bool,
}

/// The local address this machine uses to reach `url`'s host: what the appliance will
/// most likely reach it by.
fn address_towards(url: &reqwest::Url) -> Option<String> {
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    let target = std::net::ToSocketAddrs::to_socket_addrs(&(host.trim_matches(['[', ']']), port))
        .ok()?
        .next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

pub(crate) async fn enrol(options: EnrolOptions) -> anyhow::Result<HostConfig> {
    if options.state_dir.join(identity::CONFIG_FILE).exists() && !options.force {
        anyhow::bail!(
            "this host is already enrolled ({}); pass --force to enrol again with a new token",
            options.state_dir.join(identity::CONFIG_FILE).display()
        );
    }
    let url = reqwest::Url::parse(&options.appliance)
        .with_context(|| format!("--appliance {:?} is not a URL", options.appliance))?;
    anyhow::ensure!(
        url.scheme() == "https",
        "--appliance must be an https:// URL"
    );
    let ca_pem = std::fs::read(&options.ca)
        .with_context(|| format!("reading --ca {}", options.ca.display()))?;
    let http = http_client(&ca_pem, Duration::from_secs(30))?;
    let name = match options.name {
        Some(name) => name,
        None => sysinfo::System::host_name().context("the host has no name; pass --name")?,
    };
    let address = match options.address {
        Some(address) => address,
        None => address_towards(&url)
            .context("could not work out this host's address; pass --address")?,
    };
    let resources = runtime::host_resources(
        &crate::isolation::cgroup::Cgroups::detect()?,
        &crate::isolation::gpus::GpuInventory::discover(),
    );
    let (pkcs8, public_key) = identity::generate_key()?;
    let request = EnrolRequest {
        version: PROTOCOL_VERSION,
        token: options.token,
        name: name.clone(),
        public_key,
        address,
        capacity: options.capacity,
        resources,
    };
    let base = options.appliance.trim_end_matches('/');
    let response = http
        .post(format!("{base}/api/v1/hosts/enrol"))
        .json(&request)
        .send()
        .await
        .with_context(|| format!("reaching the appliance at {base}"))?;
    let enrolled: EnrolResponse = decode(response)
        .await
        .map_err(|e| anyhow::anyhow!("enrolment failed: {e}"))?;
    let config = HostConfig {
        appliance: base.to_owned(),
        host_id: enrolled.host_id,
        name,
        heartbeat_secs: enrolled.heartbeat_secs,
    };
    identity::save(&options.state_dir, &config, &pkcs8, &ca_pem)?;
    Ok(config)
}

pub(crate) struct RunOptions {
    pub(crate) state_dir: PathBuf,
    pub(crate) runtime: RuntimeSettings,
    /// what every lab's box needs (written to the state dir for the supervisors)
    pub(crate) boxes: crate::isolation::BoxSettings,
    /// test-only fault injection: pause this long after marking a task started
    pub(crate) pause_in_task: Option<Duration>,
    /// how many checks may run at once
    pub(crate) check_concurrency: usize,
}

struct Shared {
    client: HostClient,
    spool: Box<dyn HostMemory>,
    wake_sender: Notify,
    host_id: i64,
    /// checks running now, side by side (lab tasks run one at a time in the poll loop)
    running_checks: std::sync::Mutex<std::collections::HashSet<TaskId>>,
    check_slots: CheckSlots,
}

/// Slots for checks running side by side: `total` at once, and one lab at most half of them
/// (rounded up), so a team whose checks all run to their timeout cannot hold up another
/// team's checks on the same host. A lab's extra checks wait on its own queue, not in the
/// shared one.
pub(crate) struct CheckSlots {
    total: Arc<tokio::sync::Semaphore>,
    per_lab: usize,
    labs: std::sync::Mutex<std::collections::HashMap<i64, Arc<tokio::sync::Semaphore>>>,
}

impl CheckSlots {
    pub(crate) fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            total: Arc::new(tokio::sync::Semaphore::new(total)),
            per_lab: total.div_ceil(2),
            labs: std::sync::Mutex::new(Default::default()),
        }
    }

    /// Waits for a slot for a check of `allocation_id`; held until dropped.
    pub(crate) async fn acquire(
        &self,
        allocation_id: i64,
    ) -> Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let lab = {
            let mut labs = self.labs.lock().ok()?;
            // Forget labs with nothing running or waiting (nobody else holds their Arc).
            // (a held permit keeps its semaphore's Arc too)
            labs.retain(|_, slots| Arc::strong_count(slots) > 1);
            labs.entry(allocation_id)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_lab)))
                .clone()
        };
        let mine = lab.acquire_owned().await.ok()?;
        let shared = self.total.clone().acquire_owned().await.ok()?;
        Some((mine, shared))
    }
}

pub(crate) async fn run(options: RunOptions) -> anyhow::Result<()> {
    // Nothing this agent writes (spool, records, disk images) is for anyone but root.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    identity::secure_state_dir(&options.state_dir)?;
    options.boxes.save()?;
    let identity = identity::load(&options.state_dir)?;
    let spool: Box<dyn HostMemory> =
        Box::new(Spool::open(&options.state_dir.join("spool")).context("opening the spool")?);
    // A task marked started but never finished died with the previous agent: report it
    // failed instead of running it again (the appliance retries under a new task id).
    for id in spool.interrupted()? {
        tracing::warn!(task = %id.0, "task was interrupted by an agent restart; reporting it failed, not running it again");
        let outcome = TaskOutcome::Failed {
            error: "the lab-host agent stopped while this task ran; it is not run twice".into(),
        };
        spool.finish(&TaskReport {
            version: PROTOCOL_VERSION,
            id,
            outcome,
        })?;
    }
    let http = http_client(&identity.ca_pem, Duration::from_secs(45))?;
    let config = identity.config;
    let shared = Arc::new(Shared {
        client: HostClient::new(http, &config.appliance, config.host_id, identity.key),
        spool,
        wake_sender: Notify::new(),
        host_id: config.host_id,
        running_checks: std::sync::Mutex::new(std::collections::HashSet::new()),
        check_slots: CheckSlots::new(options.check_concurrency),
    });
    tracing::info!(host_id = config.host_id, name = %config.name, appliance = %config.appliance, "labrack-host running");
    println!(
        "labrack-host: running as host {} ({})",
        config.host_id, config.name
    );

    // Labs this host holds run again (after an agent restart, a host reboot, a box that
    // died), on their own loop: starting a box must never hold up heartbeats.
    let keeper = tokio::spawn(keep_boxes(options.runtime.clone()));
    let sender = tokio::spawn(send_loop(shared.clone()));
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        options.runtime.clone(),
        Duration::from_secs(u64::from(config.heartbeat_secs.max(1))),
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut backoff = Backoff::default();
    loop {
        let running: Vec<TaskId> = shared
            .running_checks
            .lock()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        let request = PollRequest {
            version: PROTOCOL_VERSION,
            wait_ms: 25_000,
            running,
        };
        let polled = tokio::select! {
            polled = shared.client.call::<_, PollResponse>("/api/v1/host/poll", &request) => polled,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        match polled {
            Ok(response) => {
                backoff.reset();
                let mut ran = false;
                for task in response.tasks {
                    // A task runs to the end even if a signal arrives meanwhile.
                    ran |= run_one(&shared, &options, task).await?;
                }
                if !ran {
                    // Everything offered is already done here and its report on its way:
                    // do not spin on the same answer while the report is delivered.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(error) => {
                let wait = backoff.next();
                tracing::warn!(%error, retry_in_ms = wait.as_millis(), "poll failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                }
            }
        }
    }
    tracing::info!(
        waiting = shared.spool.waiting(),
        "labrack-host stopping; spooled messages are kept for the next start"
    );
    sender.abort();
    heartbeat.abort();
    keeper.abort();
    Ok(())
}

/// Every few seconds, starts the box of every lab whose supervisor is gone.
async fn keep_boxes(settings: RuntimeSettings) {
    loop {
        let pass = settings.clone();
        if let Err(error) =
            tokio::task::spawn_blocking(move || runtime::local_user::ensure_boxes(&pass)).await
        {
            tracing::error!(%error, "keeping the labs' boxes up failed");
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Runs a task unless this host has seen its id before; says whether it ran (or, for a
/// check, started: checks run side by side and report when they end).
async fn run_one(
    shared: &Arc<Shared>,
    options: &RunOptions,
    task: HostTask,
) -> anyhow::Result<bool> {
    if task.host_id != shared.host_id {
        tracing::error!(task = %task.id.0, for_host = task.host_id, "got another host's task; ignoring it");
        return Ok(false);
    }
    match shared.spool.mark(&task.id)? {
        Some(TaskMark::Done) => {
            // Its report is queued or delivered; the appliance will stop re-sending it.
            shared.wake_sender.notify_one();
            return Ok(false);
        }
        Some(TaskMark::Started) => return Ok(false),
        None => {}
    }
    if !shared.spool.start(&task.id)? {
        return Ok(false);
    }
    tracing::info!(task = %task.id.0, kind = task.kind.name(), "running task");
    if matches!(task.kind, TaskKind::RunCheck { .. }) {
        if let Ok(mut running) = shared.running_checks.lock() {
            running.insert(task.id.clone());
        }
        let (shared, settings, pause) = (
            shared.clone(),
            options.runtime.clone(),
            options.pause_in_task,
        );
        let lab = match &task.kind {
            TaskKind::RunCheck { allocation_id, .. } => *allocation_id,
            _ => 0,
        };
        tokio::spawn(async move {
            let slot = shared.check_slots.acquire(lab).await;
            let id = task.id.clone();
            if let Err(error) = execute(&shared, settings, pause, task).await {
                tracing::error!(task = %id.0, %error, "could not record a check's result");
            }
            drop(slot);
            if let Ok(mut running) = shared.running_checks.lock() {
                running.remove(&id);
            }
        });
        return Ok(true);
    }
    execute(shared, options.runtime.clone(), options.pause_in_task, task).await?;
    Ok(true)
}

/// Runs a started task and spools its report.
async fn execute(
    shared: &Arc<Shared>,
    settings: RuntimeSettings,
    pause: Option<Duration>,
    task: HostTask,
) -> anyhow::Result<()> {
    if let Some(pause) = pause {
        tokio::time::sleep(pause).await;
    }
    let started = std::time::Instant::now();
    let kind = task.kind.clone();
    let outcome = tokio::task::spawn_blocking(move || runtime::run_task(&settings, &kind))
        .await
        .unwrap_or_else(|e| TaskOutcome::Failed {
            error: format!("the task panicked: {e}"),
        });
    match &outcome {
        TaskOutcome::Succeeded { .. } => {
            tracing::info!(task = %task.id.0, ms = started.elapsed().as_millis(), "task succeeded")
        }
        TaskOutcome::Checked { check } => {
            tracing::info!(task = %task.id.0, ms = check.duration_ms, passed = check.passed, message = check.message.as_deref().unwrap_or(""), "check ran");
        }
        TaskOutcome::Failed { error } => tracing::warn!(task = %task.id.0, %error, "task failed"),
    }
    shared.spool.finish(&TaskReport {
        version: PROTOCOL_VERSION,
        id: task.id,
        outcome,
    })?;
    shared.wake_sender.notify_one();
    Ok(())
}

async fn heartbeat_loop(shared: Arc<Shared>, settings: RuntimeSettings, every: Duration) {
    loop {
        let settings = settings.clone();
        let sample = tokio::task::spawn_blocking(move || {
            let labs = crate::isolation::records(&settings.state_dir).unwrap_or_default();
            telemetry::sample(
                Duration::from_millis(200),
                settings.resources(),
                &labs,
                |pid| settings.cgroups.lab_of(pid),
            )
        })
        .await;
        match sample {
            Ok(sample) => match shared.spool.push_telemetry(&sample) {
                Ok(true) => shared.wake_sender.notify_one(),
                Ok(false) => tracing::warn!("spool is full: telemetry sample dropped"),
                Err(error) => tracing::error!(%error, "could not spool telemetry"),
            },
            Err(error) => tracing::error!(%error, "telemetry sampling failed"),
        }
        tokio::time::sleep(every).await;
    }
}

async fn send_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::default();
    loop {
        let next = match shared.spool.peek() {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, "spool unreadable");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some((key, message)) = next else {
            // Wake on new messages, and look again now and then regardless.
            let _ =
                tokio::time::timeout(Duration::from_secs(1), shared.wake_sender.notified()).await;
            continue;
        };
        let result = match &message {
            Message::Report(report) => shared
                .client
                .call::<_, serde_json::Value>("/api/v1/host/report", report)
                .await
                .map(|_| ()),
            Message::Telemetry(sample) => shared
                .client
                .call::<_, serde_json::Value>("/api/v1/host/heartbeat", sample)
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                backoff.reset();
                if let Err(error) = shared.spool.ack(&key) {
                    tracing::error!(%error, "could not remove a delivered message");
                }
            }
            Err(CallError::Refused { status, detail }) if status != 401 => {
                // The appliance will never take it (e.g. a report for a withdrawn task).
                tracing::warn!(status, %detail, "appliance refused a spooled message; dropping it");
                let _ = shared.spool.ack(&key);
            }
            Err(error) => {
                let wait = backoff.next();
                tracing::warn!(%error, waiting = shared.spool.waiting(), retry_in_ms = wait.as_millis(), "delivery failed; kept in the spool");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// 0.5 s, 1 s, 2 s … capped at 10 s.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(500)
            .saturating_mul(1 << self.failures.saturating_sub(1).min(5))
            .min(Duration::from_secs(10))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Removes every lab of the state dir's host; returns how many.
pub(crate) fn clear_labs(state_dir: &Path) -> anyhow::Result<usize> {
    let cgroups = crate::isolation::cgroup::Cgroups::detect()?;
    let records = crate::isolation::records(state_dir)?;
    for record in &records {
        runtime::local_user::remove_lab(state_dir, &cgroups, &record.user)?;
        tracing::info!(lab = %record.user, "lab removed");
    }
    Ok(records.len())
}

pub(crate) fn default_state_dir() -> &'static Path {
    Path::new("/var/lib/labrack-host")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_lab_takes_at_most_half_the_check_slots() {
        let slots = CheckSlots::new(4);
        let a1 = slots.acquire(1).await.expect("slot");
        let a2 = slots.acquire(1).await.expect("slot");
        let third = tokio::time::timeout(Duration::from_millis(100), slots.acquire(1)).await;
        assert!(third.is_err(), "lab 1's third check waits");
        let b1 = slots.acquire(2).await.expect("another lab runs beside it");
        let b2 = slots.acquire(2).await.expect("another lab runs beside it");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), slots.acquire(3))
                .await
                .is_err(),
            "four at most"
        );
        drop(a1);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), slots.acquire(3))
                .await
                .is_ok_and(|s| s.is_some())
        );
        drop((a2, b1, b2));
        assert_eq!(
            CheckSlots::new(1).per_lab,
            1,
            "a one-slot host still runs checks"
        );
    }
}
