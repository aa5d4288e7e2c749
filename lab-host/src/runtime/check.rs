//! Running one of a template's checks against a lab, sandboxed on the host:
//!
//! - as the lab's own user (`setpriv`, no new privileges, a clean environment, its home as
//!   the working directory), never as the agent's root;
//! - in an empty network namespace (`unshare --net`: not even loopback) unless the
//!   template allows network;
//! - with an address-space limit and a CPU-time limit (`prlimit`), and a wall-clock
//!   time-out after which the whole process group is killed;
//! - with stdout and stderr captured up to a budget (the rest is counted, not kept).
//!
//! The verdict rules live in `labrack_provisioner::check`.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_provisioner::check::{CheckResult, Captured, verdict};

use super::RuntimeSettings;
use super::local_user;

/// PATH inside a check.
const CHECK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

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

/// The command line that runs `script` as `user` inside the sandbox.
fn sandboxed(spec: &CheckSpec<'_>, user: &str, uid: u32, gid: u32, home: &str) -> Command {
    let mut argv: Vec<String> = Vec::new();
    if !spec.network {
        argv.extend(["unshare", "--net", "--"].map(str::to_owned));
    }
    let memory_bytes = u64::from(spec.memory_mib) * 1024 * 1024;
    argv.extend([
        "prlimit".to_owned(),
        format!("--as={memory_bytes}"),
        format!("--cpu={}", spec.timeout_secs.saturating_add(1)),
        "--core=0".to_owned(),
        "--".to_owned(),
        "setpriv".to_owned(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--init-groups".to_owned(),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
        "env".to_owned(),
        "-i".to_owned(),
        format!("HOME={home}"),
        format!("USER={user}"),
        format!("LOGNAME={user}"),
        format!("PATH={CHECK_PATH}"),
        "LANG=C.UTF-8".to_owned(),
        format!("LABRACK_CHECK={}", spec.name),
        format!("LABRACK_CHECK_RUN={}", spec.check_run_id),
        "/bin/bash".to_owned(),
        "--noprofile".to_owned(),
        "--norc".to_owned(),
        "-c".to_owned(),
        spec.script.to_owned(),
    ]);
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // its own process group, so a time-out kills everything it started
        .process_group(0);
    command
}

fn capture(mut stream: impl std::io::Read + Send + 'static, done: mpsc::Sender<(bool, Captured)>, is_stdout: bool) {
    std::thread::spawn(move || {
        let mut captured = Captured::default();
        let mut buffer = [0u8; 8192];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => captured.push(&buffer[..n]),
            }
        }
        let _ = done.send((is_stdout, captured));
    });
}

fn kill_group(pgid: u32) {
    // `kill` exits non-zero when the group is already gone: that is fine.
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Runs the check and says how it went; an error means it could not be run at all.
pub(crate) fn run(settings: &RuntimeSettings, spec: &CheckSpec<'_>) -> anyhow::Result<CheckResult> {
    let user = local_user::username(settings, spec.allocation_id);
    let (uid, gid, home) = local_user::identity(&user).with_context(|| format!("the lab user {user} is not on this host"))?;
    let started = Instant::now();
    let mut child = sandboxed(spec, &user, uid, gid, &home).spawn().context("starting the check (unshare, prlimit and setpriv are in util-linux)")?;
    let pgid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        capture(stdout, done_tx.clone(), true);
    }
    if let Some(stderr) = child.stderr.take() {
        capture(stderr, done_tx, false);
    }
    let deadline = started + Duration::from_secs(u64::from(spec.timeout_secs));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the check")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            kill_group(pgid);
            break child.wait().context("waiting for the killed check")?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Anything it left running in its group (a server started with `&`) goes too, which
    // also closes the pipes the readers wait on.
    kill_group(pgid);
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (mut stdout, mut stderr) = (Captured::default(), Captured::default());
    let read_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        // A process that left the group (setsid) may hold a pipe open: do not wait forever.
        match done_rx.recv_timeout(read_deadline.saturating_duration_since(Instant::now())) {
            Ok((true, captured)) => stdout = captured,
            Ok((false, captured)) => stderr = captured,
            Err(_) => break,
        }
    }
    let exit_code = status.code();
    if !spec.network && exit_code == Some(1) && stderr.text().starts_with("unshare: ") {
        bail!("could not make the check's network namespace: {}", stderr.text().trim());
    }
    let (stdout_text, stderr_text) = (stdout.text(), stderr.text());
    let (passed, message) = verdict(exit_code, timed_out, spec.timeout_secs, &stdout_text, &stderr_text);
    let mut output = stdout_text;
    if !stderr_text.is_empty() {
        output.push_str("--- stderr ---\n");
        output.push_str(&stderr_text);
    }
    Ok(CheckResult { passed, message, exit_code, timed_out, duration_ms, output })
}
