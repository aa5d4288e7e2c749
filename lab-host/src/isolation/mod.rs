//! Each lab is a sealed box on its host:
//!
//! - its own **cgroup** (`cgroup.rs`): CPU quota and weight, memory, pids, IO weight and
//!   device rules from its template, GPUs only those assigned (`devices.rs`);
//! - its own **network namespace** (`net.rs`) with its policy and allowlist;
//! - its own **mount, PID, IPC and UTS namespaces** (`init.rs`): private `/tmp`,
//!   `/var/tmp`, `/dev/shm`, `/run` and pseudo-terminals, `/proc` with `hidepid`, no view
//!   of the host's cron spool;
//! - its **own sshd and xrdp** running inside all of that, so the desktop session and the
//!   shell live in the box, not only the checks. The appliance reaches them through the
//!   lab's two ports on the host, which the box's supervisor (`supervisor.rs`) forwards to
//!   the servers on the lab's own loopback.
//!
//! What stays shared, on purpose: the host's root filesystem (read-only to the lab user
//! but for its home), its kernel, and `/etc/passwd` (so the lab user exists inside).
//!
//! On disk (`--state-dir`, mode 0700): `labs/USER.json` (the lab's record: ports, limits,
//! GPUs; never a password) and `labs/USER/` (the box's configuration and logs).

pub(crate) mod cgroup;
pub(crate) mod devices;
pub(crate) mod gpus;
pub(crate) mod init;
pub(crate) mod net;
pub(crate) mod sandbox;
pub(crate) mod supervisor;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_provisioner::limits::LabLimits;
use serde::{Deserialize, Serialize};

use self::cgroup::Cgroups;
use self::net::LabNetwork;

/// How long a box may take to bring its servers up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the host knows of one lab, kept in `labs/USER.json` so a restarted agent (or a
/// rebooted host) brings the box back exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LabRecord {
    pub(crate) allocation_id: i64,
    /// the lab's Linux user (`{prefix}a{allocation}`)
    pub(crate) user: String,
    /// the user its checks run as (`{prefix}a{allocation}c`)
    pub(crate) checker: String,
    /// its place in the host's port range and lab network
    pub(crate) slot: u32,
    pub(crate) rdp_port: u16,
    pub(crate) ssh_port: u16,
    pub(crate) limits: LabLimits,
    /// the GPU indices it holds
    pub(crate) gpus: Vec<u32>,
    /// what those indices are on this host (device nodes, CUDA names); empty in records
    /// from before grants, whose indices are whole GPUs
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) gpu_grants: Vec<gpus::GpuGrant>,
}

impl LabRecord {
    /// The GPUs it was granted.
    pub(crate) fn grants(&self) -> Vec<gpus::GpuGrant> {
        if self.gpu_grants.is_empty() {
            self.gpus
                .iter()
                .map(|i| gpus::GpuGrant::whole(*i))
                .collect()
        } else {
            self.gpu_grants.clone()
        }
    }
}

/// The agent's settings every box needs, written once at start (`box-settings.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BoxSettings {
    pub(crate) state_dir: PathBuf,
    /// where the labs' forwarded ports listen (the host's address towards the appliance)
    pub(crate) listen: String,
    pub(crate) lab_network: String,
    /// the nftables table this agent owns on the host
    pub(crate) host_table: String,
    /// private host key of the labs' sshd (the host's own, which the appliance pins)
    pub(crate) ssh_host_key: PathBuf,
    /// certificate and key of the labs' xrdp (the host's own, which the appliance pins)
    pub(crate) rdp_cert: PathBuf,
    pub(crate) rdp_key: PathBuf,
}

impl BoxSettings {
    const FILE: &'static str = "box-settings.json";

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        crate::identity::write_private(
            &self.state_dir.join(Self::FILE),
            &serde_json::to_vec_pretty(self)?,
        )
    }

    pub(crate) fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(Self::FILE);
        let text = std::fs::read(&path).with_context(|| {
            format!("reading {} (written by `labrack-host run`)", path.display())
        })?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub(crate) fn network(&self) -> anyhow::Result<LabNetwork> {
        self.lab_network
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--lab-network: {e}"))
    }
}

pub(crate) fn labs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("labs")
}

/// The box's own directory (configuration, logs).
pub(crate) fn box_dir(state_dir: &Path, user: &str) -> PathBuf {
    labs_dir(state_dir).join(user)
}

fn record_path(state_dir: &Path, user: &str) -> PathBuf {
    labs_dir(state_dir).join(format!("{user}.json"))
}

pub(crate) fn save_record(state_dir: &Path, record: &LabRecord) -> anyhow::Result<()> {
    let dir = labs_dir(state_dir);
    crate::identity::private_dir(&dir)?;
    crate::identity::write_private(
        &record_path(state_dir, &record.user),
        &serde_json::to_vec_pretty(record)?,
    )
}

pub(crate) fn load_record(state_dir: &Path, user: &str) -> anyhow::Result<Option<LabRecord>> {
    match std::fs::read(record_path(state_dir, user)) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("parsing the record of lab {user}")
            })?))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading the record of lab {user}")),
    }
}

pub(crate) fn remove_record(state_dir: &Path, user: &str) {
    let _ = std::fs::remove_file(record_path(state_dir, user));
    let _ = std::fs::remove_dir_all(box_dir(state_dir, user));
}

/// Every lab this host holds.
pub(crate) fn records(state_dir: &Path) -> anyhow::Result<Vec<LabRecord>> {
    let mut records = Vec::new();
    let Ok(entries) = std::fs::read_dir(labs_dir(state_dir)) else {
        return Ok(records);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            records.push(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("parsing {}", path.display()))?,
            );
        }
    }
    records.sort_by_key(|r: &LabRecord| r.slot);
    Ok(records)
}

/// The pid of the lab's supervisor, if one is running (checked against its start time, so
/// a recycled pid is not mistaken for it).
pub(crate) fn supervisor_pid(state_dir: &Path, user: &str) -> Option<i32> {
    let text = std::fs::read_to_string(box_dir(state_dir, user).join("supervisor.pid")).ok()?;
    let (pid, started) = text.trim().split_once(' ')?;
    let pid: i32 = pid.parse().ok()?;
    (process_start_time(pid)? == started).then_some(pid)
}

/// Field 22 of `/proc/PID/stat`: when the process started (clock ticks since boot).
pub(crate) fn process_start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19).map(str::to_owned)
}

/// Starts the lab's box (its supervisor, detached from the agent) unless it runs, and
/// waits until its servers answer.
pub(crate) fn start(state_dir: &Path, user: &str) -> anyhow::Result<()> {
    if supervisor_pid(state_dir, user).is_some() {
        return Ok(());
    }
    let dir = box_dir(state_dir, user);
    crate::identity::private_dir(&dir)?;
    let _ = std::fs::remove_file(dir.join("ready"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("box.log"))
        .context("opening the box's log")?;
    let exe = std::env::current_exe().context("finding the labrack-host binary")?;
    // `setsid --fork`: the supervisor is nobody's child, so it outlives the agent and is
    // never left as its zombie.
    let status = Command::new("setsid")
        .arg("--fork")
        .arg(&exe)
        .arg("lab-box")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--lab")
        .arg(user)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("starting the lab's supervisor (setsid is in util-linux)")?;
    if !status.success() {
        bail!("could not start the supervisor of lab {user}: {status}");
    }
    wait_ready(state_dir, user)
}

fn wait_ready(state_dir: &Path, user: &str) -> anyhow::Result<()> {
    let dir = box_dir(state_dir, user);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("ready")) {
            if text.starts_with("ready") {
                return Ok(());
            }
            bail!("the box of lab {user} did not start: {}", text.trim());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("box.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "the box of lab {user} was not ready within {} s: {}",
                READY_TIMEOUT.as_secs(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the lab's box: its supervisor, then everything in its cgroup.
pub(crate) fn stop(state_dir: &Path, cgroups: &Cgroups, user: &str) -> anyhow::Result<()> {
    if let Some(pid) = supervisor_pid(state_dir, user) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_start_time(pid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    cgroups.kill(user, Some(&cgroup::Unit::Box))?;
    let _ = std::fs::remove_file(box_dir(state_dir, user).join("ready"));
    Ok(())
}

/// Removes everything of the box: processes, cgroups, network namespace and link.
pub(crate) fn remove(state_dir: &Path, cgroups: &Cgroups, user: &str) -> anyhow::Result<()> {
    stop(state_dir, cgroups, user)?;
    cgroups.remove_lab(user)?;
    net::teardown(&net::LabNet::new(user));
    Ok(())
}
