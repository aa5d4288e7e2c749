//! Running one of a template's checks against a lab, from the agent's side. The check runs
//! in a sandbox of its own (`isolation::sandbox`): its own cgroup below the lab's (memory,
//! pids, the lab's device rules), its own PID, mount, IPC and UTS namespaces, the lab's
//! network namespace or none at all, as the lab's checker user — never as the team, never
//! as root.
//!
//! The agent decides the outcome from what it sees itself: whether the sandbox said it was
//! ready before the script started (if not, the check *could not run*), the exit status of
//! the sandbox's init, and the wall clock — at the time-out it kills the check's whole
//! cgroup. Output is cut safely to a budget. Nothing the script prints or writes can turn
//! a result into "could not run" or the other way round.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_provisioner::check::{Captured, CheckResult, verdict};

use super::RuntimeSettings;
use super::accounts;
use crate::isolation::cgroup::Unit;
use crate::isolation::sandbox::{CheckRequest, InnerSpec, READY};
use crate::isolation::{self, devices};

/// Processes and threads one check may have at once (its lab's limit applies as well).
const CHECK_PIDS: u32 = 512;

/// Which check slots of each lab are in use. A check's cgroup is its slot's, reused by the
/// slot's next run: making and removing cgroups takes the kernel's global cgroup lock, and
/// checks running side by side would queue on it.
static SLOTS: std::sync::Mutex<Vec<(String, i64)>> = std::sync::Mutex::new(Vec::new());

/// A lab's check slot, given back when dropped.
struct Slot {
    lab: String,
    index: i64,
}

impl Slot {
    fn take(lab: &str) -> anyhow::Result<Self> {
        let mut slots = SLOTS
            .lock()
            .map_err(|_| anyhow::anyhow!("the check slots are poisoned"))?;
        let index = (0..)
            .find(|i| !slots.iter().any(|(l, s)| l == lab && s == i))
            .unwrap_or(0);
        slots.push((lab.to_owned(), index));
        Ok(Self {
            lab: lab.to_owned(),
            index,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut slots) = SLOTS.lock() {
            slots.retain(|(l, s)| !(l == &self.lab && *s == self.index));
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct CheckSpec<'a> {
    pub(crate) allocation_id: i64,
    pub(crate) check_run_id: i64,
    pub(crate) name: &'a str,
    pub(crate) script: &'a str,
    pub(crate) timeout_secs: u32,
    pub(crate) memory_mib: u32,
    pub(crate) network: bool,
}

/// Reads a stream; for stdout, first the sandbox's ready marker.
fn capture(
    mut stream: impl std::io::Read + Send + 'static,
    done: mpsc::Sender<(bool, bool, Captured)>,
    is_stdout: bool,
) {
    std::thread::spawn(move || {
        let mut captured = Captured::default();
        let mut ready = !is_stdout;
        let mut prefix = Vec::with_capacity(READY.len());
        let mut buffer = [0u8; 8192];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut bytes = &buffer[..n];
                    if !ready && prefix.len() < READY.len() {
                        let take = (READY.len() - prefix.len()).min(bytes.len());
                        prefix.extend_from_slice(&bytes[..take]);
                        bytes = &bytes[take..];
                        if prefix.len() == READY.len() {
                            ready = prefix == READY;
                        }
                        if !READY.starts_with(&prefix) {
                            // Not the marker: the sandbox never got as far as the script.
                            captured.push(&prefix);
                            prefix.clear();
                            prefix.extend_from_slice(b"-");
                        }
                    }
                    captured.push(bytes);
                }
            }
        }
        let _ = done.send((is_stdout, ready, captured));
    });
}

/// Runs the check and says how it went; an error means it could not be run at all.
pub(crate) fn run(settings: &RuntimeSettings, spec: &CheckSpec<'_>) -> anyhow::Result<CheckResult> {
    let user = accounts::lab_user(&settings.user_prefix, spec.allocation_id);
    let lab = accounts::lookup(&user)?
        .with_context(|| format!("the lab user {user} is not on this host"))?;
    let checker_name = accounts::checker_of(&user);
    let checker = accounts::lookup(&checker_name)?
        .with_context(|| format!("the checker {checker_name} of lab {user} is not on this host"))?;
    let record = isolation::load_record(&settings.state_dir, &user)?
        .with_context(|| format!("this host has no record of lab {user}"))?;
    let slot = Slot::take(&user)?;
    // systemd makes a scope per run (a stopping one keeps its name a moment): named by run.
    let unit = Unit::Check(
        if matches!(
            settings.cgroups,
            crate::isolation::cgroup::Cgroups::V2Systemd
        ) {
            spec.check_run_id
        } else {
            slot.index
        },
    );
    let rules = devices::lab_rules(
        &record.grants(),
        &std::fs::read_to_string("/proc/devices").unwrap_or_default(),
    );
    let joins = settings.cgroups.prepare_unit(
        &user,
        &unit,
        Some(spec.memory_mib),
        Some(CHECK_PIDS),
        &rules,
    )?;
    let netns = if spec.network {
        let path = std::path::PathBuf::from(crate::isolation::net::LabNet::new(&user).netns_path());
        if !path.exists() {
            bail!(
                "the lab's box is not running (no network namespace {}): the check cannot reach it",
                path.display()
            );
        }
        Some(path)
    } else {
        None
    };
    let request = CheckRequest {
        joins,
        netns,
        inner: InnerSpec {
            checker: checker.name.clone(),
            checker_uid: checker.uid,
            lab_gid: lab.gid,
            lab_user: user.clone(),
            home: lab.home.clone(),
            name: spec.name.to_owned(),
            run_id: spec.check_run_id,
            cpu_secs: spec.timeout_secs.saturating_add(1),
            visible_gpus: devices::visible_devices(&record.grants()),
            script_fd: -1,
        },
        script: spec.script.to_owned(),
    };
    let exe = std::env::current_exe().context("finding the labrack-host binary")?;
    let argv = settings.cgroups.wrap(
        &user,
        &unit,
        Some(spec.memory_mib),
        &rules,
        vec![exe.display().to_string(), "check-exec".to_owned()],
    );
    let started = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the check's sandbox")?;
    let (done_tx, done_rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        capture(stdout, done_tx.clone(), true);
    }
    if let Some(stderr) = child.stderr.take() {
        capture(stderr, done_tx, false);
    }
    if let Some(mut stdin) = child.stdin.take() {
        // The script travels on a pipe, never in an argument vector.
        let written = serde_json::to_vec(&request)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| stdin.write_all(&bytes).map_err(anyhow::Error::from));
        if let Err(error) = written {
            let _ = settings.cgroups.kill(&user, Some(&unit));
            let _ = child.kill();
            let _ = child.wait();
            return Err(error.context("handing the check to its sandbox"));
        }
    }
    let deadline = started + Duration::from_secs(u64::from(spec.timeout_secs));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the check")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // Everything of the run, wherever it went inside its cgroup.
            settings.cgroups.kill(&user, Some(&unit))?;
            let _ = child.kill();
            break child.wait().context("waiting for the killed check")?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Whatever is left (nothing can be: its PID namespace died with its init) goes too,
    // before the slot is anyone else's.
    settings.cgroups.kill(&user, Some(&unit))?;
    drop(slot);
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (mut stdout, mut stderr, mut ready) = (Captured::default(), Captured::default(), false);
    let read_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        match done_rx.recv_timeout(read_deadline.saturating_duration_since(Instant::now())) {
            Ok((true, was_ready, captured)) => {
                stdout = captured;
                ready = was_ready;
            }
            Ok((false, _, captured)) => stderr = captured,
            Err(_) => break,
        }
    }
    if !ready {
        let why = stderr.text();
        let why = why.trim().trim_start_matches("labrack-host: error: ");
        bail!(
            "the check's sandbox could not start: {}",
            if why.is_empty() {
                "no reason given"
            } else {
                why
            }
        );
    }
    use std::os::unix::process::ExitStatusExt as _;
    // The sandbox passes a signal that ended the script on as 128 + n.
    let exit_code = match status.code() {
        Some(code) if !timed_out && code < 128 => Some(code),
        _ => None,
    };
    let _ = status.signal();
    let (stdout_text, stderr_text) = (stdout.text(), stderr.text());
    let (passed, message) = verdict(
        exit_code,
        timed_out,
        spec.timeout_secs,
        &stdout_text,
        &stderr_text,
    );
    let mut output = stdout_text;
    if !stderr_text.is_empty() {
        output.push_str("--- stderr ---\n");
        output.push_str(&stderr_text);
    }
    Ok(CheckResult {
        passed,
        message,
        exit_code,
        timed_out,
        duration_ms,
        output,
    })
}
