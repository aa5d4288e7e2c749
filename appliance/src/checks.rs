//! Checks against team labs: queueing a batch of check runs (a rejudge
//! is one batch), the workers that run each as a `RunCheck` task on the lab's host, and
//! recording what the host reports.
//!
//! A run is a snapshot of the check as it was queued (script, limits, weight, dimension),
//! so editing templates never changes a run in flight. Each run is one job of kind
//! [`jobs::Work::RunCheck`] in the durable queue:
//!
//! 1. a worker claims the job and issues a host task `check-{run}-{n}` — unless the run
//!    already has a task in flight (the appliance restarted mid-check): then it waits for
//!    that one, so a check never runs twice because the appliance did;
//! 2. the host's report records the result in the same transaction that closes the task
//!    (so a result is never lost, even if no worker is waiting);
//! 3. the worker completes the job, or fails it when the check could not be run (host
//!    error, no report in time, lab gone): the queue's backoff retries it and dead letters
//!    mark the run `error`.
//!
//! A check that runs and fails is a result (`failed`), not a job failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use labrack_provisioner::protocol::{HostTask, PROTOCOL_VERSION, TaskId, TaskKind, TaskOutcome};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;
use crate::jobs::{self, Job, NewJob};

/// The job kind of a check run.
/// How long a worker's claim holds without renewal.
const LEASE_MS: i64 = 15_000;
/// How often a waiting worker renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a submission waits for its team's previous one's checks before looking again.
const SUBMISSION_WAIT_MS: i64 = 5_000;
/// How long past a check's own time-out the host gets to report it.
const REPORT_GRACE_MS: i64 = 60_000;
pub use labrack_wire::rubric::DEFAULT_DIMENSIONS;

/// Queue settings: attempts per job kind and how many check workers run.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub max_attempts: HashMap<String, u32>,
    pub check_workers: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_attempts: HashMap::new(),
            check_workers: 16,
        }
    }
}

impl QueueSettings {
    pub fn attempts_for(&self, kind: &str) -> u32 {
        self.max_attempts
            .get(kind)
            .copied()
            .unwrap_or(jobs::DEFAULT_MAX_ATTEMPTS)
    }
}

/// A template check as stored in `lab_templates.checks`.
#[derive(Debug, Clone, serde::Deserialize)]
struct StoredCheck {
    name: String,
    script: String,
    timeout_secs: u32,
    weight: u32,
    dimension: String,
    #[serde(default)]
    hidden: bool,
    #[serde(default)]
    network: bool,
    #[serde(default = "default_memory")]
    memory_mib: u32,
}

fn default_memory() -> u32 {
    labrack_provisioner::template::DEFAULT_CHECK_MEMORY_MIB
}

/// Which checks to run, for whom.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub event_id: i64,
    /// one team, or every team of the event
    pub team_id: Option<i64>,
    /// one check by name, or every check of each team's template
    pub check_name: Option<String>,
    pub reason: String,
    pub requested_by: String,
    pub max_attempts: u32,
    /// higher runs first (a participant's own request outranks a rejudge wave)
    pub priority: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SkippedTeam {
    pub team_id: i64,
    pub team: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchQueued {
    pub batch_id: i64,
    /// check runs queued
    pub queued: u32,
    /// teams that got no run, and why
    pub skipped: Vec<SkippedTeam>,
}

/// Queues one run per (team, check) as one batch, in the caller's write. Teams without an
/// active lab are skipped and named. An unknown team or check changes nothing.
pub fn queue_batch(
    conn: &Connection,
    request: &BatchRequest,
    now_ms: i64,
) -> Result<BatchQueued, Error> {
    let event_state: Option<String> = conn
        .query_row(
            "SELECT state FROM events WHERE id = ?1",
            [request.event_id],
            |r| r.get(0),
        )
        .optional()?;
    let event_state = event_state.ok_or(Error::NotFound("event"))?;
    if matches!(event_state.as_str(), "ended" | "archived") {
        return Err(Error::conflict(
            Some("state"),
            format!("the event is {event_state}: checks no longer run"),
        ));
    }
    #[allow(clippy::type_complexity)]
    let teams: Vec<(i64, String, Option<i64>, Option<String>, Option<String>)> = conn
        .prepare_cached(
            "SELECT t.id, t.name, a.id, a.state, a.template FROM teams t
             LEFT JOIN allocations a ON a.team_id = t.id AND a.state <> 'released'
             WHERE t.event_id = ?1 AND (?2 IS NULL OR t.id = ?2) ORDER BY t.id",
        )?
        .query_map(params![request.event_id, request.team_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<_, _>>()?;
    if request.team_id.is_some() && teams.is_empty() {
        return Err(Error::NotFound("team"));
    }
    let mut templates: HashMap<String, Vec<StoredCheck>> = HashMap::new();
    let mut planned = Vec::new();
    let mut skipped = Vec::new();
    let mut check_known = request.check_name.is_none();
    for (team_id, team, allocation, state, template) in teams {
        let (Some(allocation_id), Some("active"), Some(template)) =
            (allocation, state.as_deref(), template)
        else {
            let reason = match state {
                None => "the team has no lab".to_owned(),
                Some(state) => format!("the team's lab is {state}, not active"),
            };
            skipped.push(SkippedTeam {
                team_id,
                team,
                reason,
            });
            continue;
        };
        if !templates.contains_key(&template) {
            let stored: Option<String> = conn
                .query_row(
                    "SELECT checks FROM lab_templates WHERE name = ?1",
                    [&template],
                    |r| r.get(0),
                )
                .optional()?;
            let checks: Vec<StoredCheck> = stored
                .and_then(|json| serde_json::from_str(&json).ok())
                .unwrap_or_default();
            templates.insert(template.clone(), checks);
        }
        let checks = templates
            .get(&template)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let chosen: Vec<&StoredCheck> = checks
            .iter()
            .filter(|c| {
                request
                    .check_name
                    .as_ref()
                    .is_none_or(|name| c.name.eq_ignore_ascii_case(name))
            })
            .collect();
        if chosen.is_empty() {
            let reason = match &request.check_name {
                Some(name) => format!("its template {template:?} has no check named {name:?}"),
                None => format!("its template {template:?} has no checks"),
            };
            skipped.push(SkippedTeam {
                team_id,
                team,
                reason,
            });
            continue;
        }
        check_known = true;
        for check in chosen {
            planned.push((team_id, allocation_id, check.clone()));
        }
    }
    if !check_known {
        let name = request.check_name.clone().unwrap_or_default();
        return Err(Error::invalid(
            "check",
            format!("no lab template of these teams has a check named {name:?}"),
        ));
    }
    conn.execute(
        "INSERT INTO check_batches (event_id, reason, requested_by, team_id, check_name, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![request.event_id, request.reason, request.requested_by, request.team_id, request.check_name, now_ms],
    )?;
    let batch_id = conn.last_insert_rowid();
    let mut queued = 0u32;
    for (team_id, allocation_id, check) in planned {
        conn.prepare_cached(
            "INSERT INTO check_runs (batch_id, event_id, team_id, allocation_id, check_name, script, timeout_secs, memory_mib, network,
                                     weight, dimension, hidden, state, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'queued', ?13)",
        )?
        .execute(params![
            batch_id,
            request.event_id,
            team_id,
            allocation_id,
            check.name,
            check.script,
            check.timeout_secs,
            check.memory_mib,
            check.network,
            check.weight,
            check.dimension,
            check.hidden,
            now_ms
        ])?;
        let run_id = conn.last_insert_rowid();
        let job = NewJob {
            idempotency_key: Some(format!("check-run-{run_id}")),
            priority: request.priority,
            max_attempts: request.max_attempts,
            ..NewJob::work(&jobs::Work::RunCheck(jobs::RunCheck {
                check_run_id: run_id,
            }))
            .for_team(team_id)
        };
        let (job_id, _) = jobs::enqueue(conn, &job, now_ms)?;
        conn.prepare_cached("UPDATE check_runs SET job_id = ?2 WHERE id = ?1")?
            .execute(params![run_id, job_id])?;
        queued += 1;
    }
    Ok(BatchQueued {
        batch_id,
        queued,
        skipped,
    })
}

/// Records a host's report of a check task, in the report's write. Only a check that ran
/// gives the run a result; a task that could not run is the worker's to retry.
pub fn record_report(
    conn: &Connection,
    check_run_id: i64,
    outcome: &TaskOutcome,
    now_ms: i64,
) -> Result<(), Error> {
    let TaskOutcome::Checked { check } = outcome else {
        return Ok(());
    };
    let recorded = conn.prepare_cached(
        "UPDATE check_runs SET state = ?2, message = ?3, output = ?4, exit_code = ?5, timed_out = ?6, duration_ms = ?7, finished_ms = ?8
         WHERE id = ?1 AND state IN ('queued', 'running')",
    )?
    .execute(params![
        check_run_id,
        if check.passed { "passed" } else { "failed" },
        check.message,
        check.output,
        check.exit_code,
        check.timed_out,
        i64::try_from(check.duration_ms).unwrap_or(i64::MAX),
        now_ms
    ])?;
    if recorded > 0 {
        let (event_id, team_id, name, dimension, weight): (i64, i64, String, String, u32) = conn.query_row(
            "SELECT event_id, team_id, check_name, dimension, weight FROM check_runs WHERE id = ?1",
            [check_run_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        crate::outbox::append(
            conn,
            crate::outbox::Change::CheckResult,
            &format!("check_run:{check_run_id}"),
            &serde_json::json!({"id": check_run_id, "event_id": event_id, "team_id": team_id, "check": name, "dimension": dimension,
                "weight": weight, "passed": check.passed, "at_ms": now_ms}),
            now_ms,
        )?;
    }
    Ok(())
}

/// Runs whose job ended without a result (dead after its attempts, or cancelled) say so.
pub fn settle_ended_jobs(conn: &Connection, now_ms: i64) -> Result<usize, rusqlite::Error> {
    let dead = conn.execute(
        "UPDATE check_runs SET state = 'error', finished_ms = ?1,
             message = 'the check could not be run: ' || coalesce((SELECT last_error FROM jobs WHERE jobs.id = check_runs.job_id), 'unknown error')
         WHERE state IN ('queued', 'running') AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = check_runs.job_id AND jobs.state = 'dead')",
        [now_ms],
    )?;
    let cancelled = conn.execute(
        "UPDATE check_runs SET state = 'cancelled', finished_ms = ?1
         WHERE state IN ('queued', 'running') AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = check_runs.job_id AND jobs.state = 'cancelled')",
        [now_ms],
    )?;
    // Withdraw the host task of a cancelled run so the host does not start it.
    conn.execute(
        "UPDATE host_tasks SET done_ms = ?1, outcome = '{\"result\":\"cancelled\"}'
         WHERE done_ms IS NULL AND check_run_id IN (SELECT id FROM check_runs WHERE state IN ('cancelled', 'error'))",
        [now_ms],
    )?;
    Ok(dead + cancelled)
}

/// A requeued job's run waits for its result again.
pub fn on_requeue(conn: &Connection, job_id: i64) -> Result<(), rusqlite::Error> {
    conn.execute(
        "UPDATE check_runs SET state = 'queued', message = NULL, finished_ms = NULL WHERE job_id = ?1 AND state IN ('error', 'cancelled')",
        [job_id],
    )?;
    Ok(())
}

/// A check to run over SSH on a host without the agent.
#[derive(Debug, Clone)]
pub struct SshCheck {
    pub run_id: i64,
    /// random per run, kept with it: names the run's directory on the host and marks every
    /// line the appliance reads, so a retry finds the first attempt's result and nothing
    /// else can pass for it
    pub nonce: String,
    /// the team's account on the host (the check reads its home)
    pub lab_user: String,
    pub name: String,
    pub script: String,
    pub timeout_secs: u32,
    pub memory_mib: u32,
    pub network: bool,
}

fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The command the appliance asks the checker account's SSH server for. The host's admin
/// forces the same with `ForceCommand` (see the README): the program arrives on stdin.
pub const REMOTE_COMMAND: &str = "/bin/bash --noprofile --norc -s";

/// The program an SSH check sends on stdin, run by the host's *checker* account — never
/// the team's, so nothing the team writes (its `.bashrc`, a pre-made result, its PATH) is
/// read: every tool is named by its absolute path, results live in the checker's own home,
/// in a directory named by run and nonce. It runs the check at most once per run: the
/// directory is made atomically by the first attempt; a later attempt (after an appliance
/// restart) waits for and reads that status. Whether the check *could* run (the lab's
/// account and home, the sandbox) is decided before the script starts, and said with its
/// own marker. The check runs in the team's home, in new user and PID namespaces (so
/// nothing it starts outlives it) and, unless the template allows network, a network
/// namespace of its own; limits from `prlimit`, a wall-clock kill from `timeout`.
/// Directories older than a day are removed.
pub fn remote_program(check: &SshCheck) -> String {
    use base64::Engine as _;
    let net = if check.network { "" } else { "--net " };
    let memory = u64::from(check.memory_mib) * 1024 * 1024;
    let limit = labrack_provisioner::check::MAX_OUTPUT_BYTES;
    let script = base64::engine::general_purpose::STANDARD.encode(check.script.as_bytes());
    format!(
        r#"set -u
n={nonce}
say() {{ printf 'LABRACK-%s %s\n' "$n" "$*"; }}
home=$(/usr/bin/getent passwd {user} | /usr/bin/cut -d: -f6)
[ -n "$home" ] && [ -d "$home" ] || {{ say CANNOT "the lab account {user} or its home is missing on this host"; exit 0; }}
[ -r "$home" ] && [ -x "$home" ] || {{ say CANNOT "the checker account cannot read $home: add it to the lab account's group"; exit 0; }}
base="$HOME/.labrack/runs"
/usr/bin/mkdir -p -m 0700 "$HOME/.labrack" "$base" || {{ say CANNOT "cannot make $base"; exit 0; }}
/usr/bin/find "$base" -mindepth 1 -maxdepth 1 -mmin +1440 -exec /usr/bin/rm -rf {{}} + 2>/dev/null
d="$base/run-{run}-$n"
if /usr/bin/mkdir -m 0700 "$d" 2>/dev/null; then
  printf '%s' {script} | /usr/bin/base64 -d >"$d/script" || {{ /usr/bin/rm -rf "$d"; say CANNOT "cannot write the script"; exit 0; }}
  if ! /usr/bin/unshare --user --map-current-user --pid --fork {net}/bin/true 2>"$d/probe"; then
    why=$(/usr/bin/head -c 200 "$d/probe"); /usr/bin/rm -rf "$d"; say CANNOT "no sandbox on this host: $why"; exit 0
  fi
  ( cd "$home" && exec /usr/bin/timeout -s KILL {timeout} /usr/bin/unshare --user --map-current-user --pid --fork --kill-child {net}-- /usr/bin/prlimit --as={memory} --cpu={cpu} --core=0 -- /usr/bin/env -i HOME="$home" USER="$(/usr/bin/id -un)" LOGNAME="$(/usr/bin/id -un)" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 LABRACK_CHECK={name} LABRACK_CHECK_RUN={run} LABRACK_LAB_USER={user} /bin/bash --noprofile --norc "$d/script" ) >"$d/out" 2>"$d/err" </dev/null
  echo $? >"$d/status.tmp" && /usr/bin/mv "$d/status.tmp" "$d/status"
fi
waited=0
while [ ! -f "$d/status" ] && [ "$waited" -lt {wait} ]; do /usr/bin/sleep 1; waited=$((waited + 1)); done
[ -f "$d/status" ] || {{ say PENDING; exit 0; }}
say STATUS "$(/usr/bin/cat "$d/status") $(/usr/bin/wc -c <"$d/out") $(/usr/bin/wc -c <"$d/err")"
/usr/bin/head -c {limit} "$d/out" | /usr/bin/base64 -w0; echo
/usr/bin/head -c {limit} "$d/err" | /usr/bin/base64 -w0; echo
"#,
        nonce = check.nonce,
        run = check.run_id,
        user = sh_quote(&check.lab_user),
        timeout = check.timeout_secs,
        cpu = check.timeout_secs.saturating_add(1),
        name = sh_quote(&check.name),
        wait = check.timeout_secs.saturating_add(30),
    )
}

/// Reads what [`remote_program`] printed into a check result; an error means the check
/// could not be run (or is still running elsewhere) and the job should retry. Only lines
/// with the run's nonce count.
pub fn parse_remote(
    printed: &str,
    check: &SshCheck,
    duration_ms: u64,
) -> Result<labrack_provisioner::check::CheckResult, String> {
    use base64::Engine as _;
    use labrack_provisioner::check::{Captured, CheckResult, verdict};
    let marker = format!("LABRACK-{} ", check.nonce);
    let mut lines = printed.lines();
    let first = lines.next().unwrap_or_default();
    let said = first.strip_prefix(&marker).ok_or_else(|| {
        format!(
            "unexpected answer from the host: {:?}",
            first.chars().take(120).collect::<String>()
        )
    })?;
    if said == "PENDING" {
        return Err("an earlier attempt of this check is still running on the host".into());
    }
    if let Some(why) = said.strip_prefix("CANNOT ") {
        return Err(format!("the check could not run on this host: {why}"));
    }
    let fields: Vec<&str> = said
        .strip_prefix("STATUS ")
        .ok_or_else(|| format!("unexpected answer from the host: {said:?}"))?
        .split(' ')
        .collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.trim().parse::<u64>().ok());
    let (Some(status), Some(out_len), Some(err_len)) = (number(0), number(1), number(2)) else {
        return Err(format!("unexpected status line from the host: {said:?}"));
    };
    let decode = |line: Option<&str>| {
        base64::engine::general_purpose::STANDARD
            .decode(line.unwrap_or_default().trim())
            .unwrap_or_default()
    };
    let (out, err) = (decode(lines.next()), decode(lines.next()));
    let captured = |bytes: Vec<u8>, total: u64| Captured {
        dropped: total.saturating_sub(bytes.len() as u64),
        head: bytes,
    };
    let (stdout, stderr) = (captured(out, out_len).text(), captured(err, err_len).text());
    // `timeout -s KILL` ends a check that ran out of time with 128 + 9.
    let timed_out = status == 137;
    let exit_code = if status < 128 {
        i32::try_from(status).ok()
    } else {
        None
    };
    let (passed, message) = verdict(exit_code, timed_out, check.timeout_secs, &stdout, &stderr);
    let mut output = stdout;
    if !stderr.is_empty() {
        output.push_str("--- stderr ---\n");
        output.push_str(&stderr);
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

/// What a worker found when it took a job.
#[derive(Debug)]
enum Begin {
    /// the run already has its result (reported while nobody waited)
    Finished,
    /// a host task is out: wait for its report
    Waiting {
        task_id: String,
        deadline_ms: i64,
        issued: bool,
    },
    /// the run cannot proceed now (the job fails and backs off)
    CannotRun(String),
    /// the lab's host has no agent: run the check over SSH from here
    OverSsh {
        target: labrack_streamer::terminal::TerminalTarget,
        check: SshCheck,
    },
}

fn begin(
    conn: &Connection,
    secrets: &crate::secrets::SecretBox,
    job: &Job,
    now_ms: i64,
) -> Result<Begin, Error> {
    let run_id = match jobs::Work::of(job) {
        Ok(jobs::Work::RunCheck(work)) => work.check_run_id,
        Ok(other) => {
            return Ok(Begin::CannotRun(format!(
                "a {} job is no check",
                other.kind()
            )));
        }
        Err(why) => return Ok(Begin::CannotRun(why)),
    };
    #[allow(clippy::type_complexity)]
    let run: Option<(String, i64, String, String, u32, u32, bool)> = conn
        .query_row(
            "SELECT state, allocation_id, check_name, script, timeout_secs, memory_mib, network FROM check_runs WHERE id = ?1",
            [run_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((state, allocation_id, name, script, timeout_secs, memory_mib, network)) = run else {
        return Ok(Begin::CannotRun(format!(
            "check run {run_id} does not exist"
        )));
    };
    if matches!(state.as_str(), "passed" | "failed" | "cancelled") {
        return Ok(Begin::Finished);
    }
    let deadline_from = |created: i64| created + i64::from(timeout_secs) * 1000 + REPORT_GRACE_MS;
    let latest: Option<(String, i64, Option<i64>)> = conn
        .query_row(
            "SELECT id, created_ms, done_ms FROM host_tasks WHERE check_run_id = ?1 ORDER BY created_ms DESC, rowid DESC LIMIT 1",
            [run_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((task_id, created_ms, None)) = latest {
        return Ok(Begin::Waiting {
            task_id,
            deadline_ms: deadline_from(created_ms),
            issued: false,
        });
    }
    let lab: Option<(i64, String, bool)> = conn
        .query_row("SELECT a.host_id, a.state, h.agent FROM allocations a JOIN hosts h ON h.id = a.host_id WHERE a.id = ?1", [allocation_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let (host_id, agent) = match lab {
        Some((host_id, lab_state, agent)) if lab_state == "active" => (host_id, agent),
        Some((_, lab_state, _)) => {
            return Ok(Begin::CannotRun(format!(
                "the team's lab is {lab_state}, not active"
            )));
        }
        None => return Ok(Begin::CannotRun("the team's lab no longer exists".into())),
    };
    if !agent {
        let Some(desktop) = crate::labs::desktop_secret(conn, secrets, allocation_id)? else {
            return Ok(Begin::CannotRun(
                "the lab has no login for its SSH server".into(),
            ));
        };
        let Some(host_key) = desktop.ssh_host_key else {
            return Ok(Begin::CannotRun(
                "the host's SSH key is not known: it cannot be verified".into(),
            ));
        };
        // Checks run as the host's checker account, never as the team.
        let Some((checker, checker_password)) = crate::labs::checker_login(conn, secrets, host_id)?
        else {
            return Ok(Begin::CannotRun(
                "the host has no checker account: checks never run as the team".into(),
            ));
        };
        let stored: Option<String> = conn.query_row(
            "SELECT ssh_nonce FROM check_runs WHERE id = ?1",
            [run_id],
            |r| r.get(0),
        )?;
        let nonce = match stored {
            Some(nonce) => nonce,
            None => {
                let nonce = format!("{:016x}", rand::random::<u64>());
                conn.execute(
                    "UPDATE check_runs SET ssh_nonce = ?2 WHERE id = ?1",
                    params![run_id, nonce],
                )?;
                nonce
            }
        };
        let target = labrack_streamer::terminal::TerminalTarget {
            host: desktop.host_address,
            port: desktop.ssh_port,
            username: checker,
            password: checker_password,
            host_key,
        };
        conn.execute(
            "UPDATE check_runs SET state = 'running' WHERE id = ?1",
            [run_id],
        )?;
        let check = SshCheck {
            run_id,
            nonce,
            lab_user: desktop.username,
            name,
            script,
            timeout_secs,
            memory_mib,
            network,
        };
        return Ok(Begin::OverSsh { target, check });
    }
    let issued_before: u32 = conn.query_row(
        "SELECT count(*) FROM host_tasks WHERE check_run_id = ?1",
        [run_id],
        |r| r.get(0),
    )?;
    let task = HostTask {
        version: PROTOCOL_VERSION,
        id: TaskId::check(run_id, issued_before + 1),
        host_id,
        kind: TaskKind::RunCheck {
            allocation_id,
            check_run_id: run_id,
            name,
            script,
            timeout_secs,
            memory_mib,
            network,
        },
    };
    let body = serde_json::to_string(&task).map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute(
        "INSERT INTO host_tasks (id, host_id, allocation_id, body, created_ms, check_run_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![task.id.0, host_id, allocation_id, body, now_ms, run_id],
    )?;
    conn.execute(
        "UPDATE check_runs SET state = 'running' WHERE id = ?1",
        [run_id],
    )?;
    Ok(Begin::Waiting {
        task_id: task.id.0,
        deadline_ms: deadline_from(now_ms),
        issued: true,
    })
}

/// Fails the job's attempt; the run waits for the retry, or is `error` once the job is dead.
fn fail_attempt(
    conn: &Connection,
    job: &Job,
    worker: &str,
    error: &str,
    now_ms: i64,
) -> Result<(), Error> {
    let state = jobs::fail(conn, job.id, worker, error, now_ms)?;
    if state == "dead" {
        settle_ended_jobs(conn, now_ms)?;
    } else {
        conn.execute(
            "UPDATE check_runs SET state = 'queued' WHERE job_id = ?1 AND state = 'running'",
            [job.id],
        )?;
    }
    Ok(())
}

/// What the queue's workers run with (check runs, scoring, hints): not the HTTP layer's
/// state, only these.
#[derive(Clone)]
pub struct Workers {
    pub db: crate::store::Db,
    /// opens lab credentials for checks run over SSH
    pub secrets: Arc<crate::secrets::SecretBox>,
    /// attempts per job kind, number of check workers
    pub queue: Arc<QueueSettings>,
    /// the agents' way to a language model (hint jobs)
    pub llm: Arc<crate::llm::Gateway>,
    /// bumped when host tasks are issued: wakes long polls
    pub host_wake: Arc<tokio::sync::watch::Sender<u64>>,
    /// bumped when jobs are queued or end: wakes idle workers
    pub jobs_wake: Arc<tokio::sync::watch::Sender<u64>>,
    /// bumped when a host reports a check: wakes the worker waiting for it
    pub check_reported: Arc<tokio::sync::watch::Sender<u64>>,
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Workers {
    fn wake_hosts(&self) {
        self.host_wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn wake_workers(&self) {
        self.jobs_wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Renews `worker`'s lease on `job_id`; an error when the job is no longer ours (staff
    /// cancelled it, or the lease was lost).
    async fn extend_lease(&self, job_id: i64, worker: &str) -> Result<(), Error> {
        let worker = worker.to_owned();
        self.db
            .writer()
            .write(move |conn| {
                Ok::<_, Error>(jobs::extend(
                    conn,
                    job_id,
                    &worker,
                    LEASE_MS,
                    crate::clock::now_ms(),
                )?)
            })
            .await
            .map_err(Error::from)
    }

    /// Hands `job_id` back to the queue at shutdown, so the next start picks it up at once.
    async fn hand_back(&self, job_id: i64, worker: &str) {
        let worker = worker.to_owned();
        let handed = self
            .db
            .writer()
            .write(move |conn| {
                Ok::<_, Error>(jobs::abandon(
                    conn,
                    job_id,
                    &worker,
                    crate::clock::now_ms(),
                )?)
            })
            .await;
        if let Err(error) = handed {
            tracing::info!(job = job_id, error = ?Error::from(error), "could not hand a job back");
        }
    }

    fn agents(&self) -> crate::agents::AgentContext {
        crate::agents::AgentContext {
            db: self.db.clone(),
            llm: self.llm.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// Starts the queue's dispatcher with `slots` jobs at once (check runs over SSH, scoring,
/// hints); it stops at shutdown once its jobs have stopped. A check that runs on a lab
/// host's agent gives its slot back as soon as the host has it: waiting for a report costs
/// nothing, so a slow check never holds a slot. A team holds at most
/// [`jobs::PER_KEY_RUNNING`] running jobs (see [`jobs::claim`]).
pub fn spawn_workers(state: &Workers, slots: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let name = format!("queue-{:x}", rand::random::<u32>());
    vec![tokio::spawn(dispatch(state.clone(), name, slots.max(1)))]
}

async fn dispatch(state: Workers, name: String, slots: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(slots));
    let mut shutdown = state.shutdown.subscribe();
    let mut jobs_added = state.jobs_wake.subscribe();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Ok(slot) = slot else { break };
        let worker = name.clone();
        let claimed = state
            .db
            .writer()
            .write(move |conn| {
                let job = jobs::claim(
                    conn,
                    &worker,
                    &jobs::Work::KINDS,
                    LEASE_MS,
                    crate::clock::now_ms(),
                )?;
                if job.is_none() {
                    settle_ended_jobs(conn, crate::clock::now_ms())?;
                }
                Ok::<_, Error>(job)
            })
            .await;
        match claimed {
            Ok(Some(job)) => {
                running.spawn(run_claimed(state.clone(), name.clone(), job, slot));
            }
            Ok(None) => {
                drop(slot);
                // Idle: wake when jobs are added or one ends (a team's share frees up), and
                // look again now and then (backoffs end).
                jobs_added.borrow_and_update();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = jobs_added.changed() => {}
                    Some(_) = running.join_next() => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
            Err(error) => {
                drop(slot);
                tracing::error!(worker = %name, error = ?Error::from(error), "claiming a queue job failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    // Jobs hand themselves back at shutdown (see `run_job`); wait for them to do so.
    while running.join_next().await.is_some() {}
}

/// Runs `work` while renewing `job_id`'s lease; `None` when the lease was lost (staff
/// cancelled the job) or the appliance shuts down, and the job was handed back.
async fn renewing<T>(
    state: &Workers,
    job_id: i64,
    worker: &str,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.tick().await;
    let mut shutdown = state.shutdown.subscribe();
    tokio::pin!(work);
    enum Wake<T> {
        Done(T),
        Renew,
        Stop,
    }
    loop {
        let wake = tokio::select! {
            done = &mut work => Wake::Done(done),
            _ = renew.tick() => Wake::Renew,
            _ = shutdown.wait_for(|stop| *stop) => Wake::Stop,
        };
        match wake {
            Wake::Done(done) => return Some(done),
            Wake::Renew => {
                let renewed = state.extend_lease(job_id, worker).await;
                if let Err(error) = renewed {
                    tracing::info!(job = job_id, ?error, "stopped a job that is no longer ours");
                    return None;
                }
            }
            Wake::Stop => {
                state.hand_back(job_id, worker).await;
                return None;
            }
        }
    }
}

async fn run_claimed(
    state: Workers,
    name: String,
    job: Job,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let work = jobs::Work::of(&job);
    if let Ok(jobs::Work::ScoreSubmission(scoring)) = &work {
        let submission = scoring.submission_id;
        let (worker, attempts) = (
            name.clone(),
            state.queue.attempts_for(jobs::Work::RUN_CHECK),
        );
        let expanded = state
            .db
            .writer()
            .write(move |conn| {
                use crate::scores::Scoring;
                match crate::scores::expand_submission(
                    conn,
                    submission,
                    attempts,
                    crate::clock::now_ms(),
                ) {
                    Ok(Scoring::Wait) => jobs::defer(
                        conn,
                        job.id,
                        &worker,
                        SUBMISSION_WAIT_MS,
                        "waiting for the team's previous submission's checks",
                        crate::clock::now_ms(),
                    )?,
                    Ok(Scoring::Queued(_) | Scoring::Superseded | Scoring::Unscored) => {
                        jobs::complete(conn, job.id, &worker, crate::clock::now_ms())?
                    }
                    Err(error) => fail_attempt(
                        conn,
                        &job,
                        &worker,
                        &format!("{error}"),
                        crate::clock::now_ms(),
                    )?,
                }
                Ok::<_, Error>(())
            })
            .await;
        match expanded {
            Ok(()) => state.wake_workers(),
            Err(error) => {
                tracing::warn!(worker = %name, error = ?Error::from(error), "scoring a submission failed")
            }
        }
    } else if let Ok(jobs::Work::AgentHint(hint)) = &work {
        let Some(answered) = renewing(
            &state,
            job.id,
            &name,
            crate::agents::answer_question(&state.agents(), job.id, hint),
        )
        .await
        else {
            return;
        };
        let worker = name.clone();
        let finished = state
            .db
            .writer()
            .write(move |conn| match answered {
                // Posted and completed in one write: a job cannot post twice.
                Ok(answer) => {
                    crate::agents::post_answer(conn, job.id, &answer, crate::clock::now_ms())?;
                    Ok::<_, Error>(jobs::complete(
                        conn,
                        job.id,
                        &worker,
                        crate::clock::now_ms(),
                    )?)
                }
                Err(error) => fail_attempt(
                    conn,
                    &job,
                    &worker,
                    &format!("{error}"),
                    crate::clock::now_ms(),
                ),
            })
            .await;
        if let Err(error) = finished {
            tracing::warn!(worker = %name, error = ?Error::from(error), "answering a question failed");
        }
    } else if let Err(error) = run_job(&state, &name, job, slot).await {
        tracing::warn!(worker = %name, ?error, "check job step failed");
    }
    // A finished job frees its team's share: look for work again.
    state.wake_workers();
}

async fn run_job(
    state: &Workers,
    worker: &str,
    job: Job,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), Error> {
    let started = {
        let (job, secrets) = (job.clone(), state.secrets.clone());
        state
            .db
            .writer()
            .write(move |conn| begin(conn, &secrets, &job, crate::clock::now_ms()))
            .await?
    };
    let (task_id, deadline_ms) = match started {
        Begin::Finished => {
            let (job_id, worker) = (job.id, worker.to_owned());
            return Ok(state
                .db
                .writer()
                .write(move |conn| {
                    Ok::<_, Error>(jobs::complete(
                        conn,
                        job_id,
                        &worker,
                        crate::clock::now_ms(),
                    )?)
                })
                .await?);
        }
        Begin::CannotRun(reason) => {
            let worker = worker.to_owned();
            return Ok(state
                .db
                .writer()
                .write(move |conn| {
                    fail_attempt(conn, &job, &worker, &reason, crate::clock::now_ms())
                })
                .await?);
        }
        Begin::OverSsh { target, check } => {
            return run_over_ssh(state, worker, job, target, check).await;
        }
        Begin::Waiting {
            task_id,
            deadline_ms,
            issued,
        } => {
            if issued {
                state.wake_hosts();
            }
            // The host runs it; waiting for its report holds no slot.
            drop(slot);
            (task_id, deadline_ms)
        }
    };
    let mut reported = state.check_reported.subscribe();
    let mut shutdown = state.shutdown.subscribe();
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.tick().await;
    loop {
        reported.borrow_and_update();
        let id = task_id.clone();
        let done: Option<(Option<i64>, Option<String>)> = state
            .db
            .read(move |conn| {
                conn.query_row(
                    "SELECT done_ms, outcome FROM host_tasks WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(Error::from)
            })
            .await?;
        let worker_name = worker.to_owned();
        let job_for_write = job.clone();
        match done {
            Some((Some(_), outcome)) => {
                let outcome: Option<TaskOutcome> = outcome
                    .as_deref()
                    .and_then(|o| serde_json::from_str(o).ok());
                return Ok(state
                    .db
                    .writer()
                    .write(move |conn| match outcome {
                        Some(TaskOutcome::Checked { .. }) => Ok(jobs::complete(
                            conn,
                            job_for_write.id,
                            &worker_name,
                            crate::clock::now_ms(),
                        )?),
                        Some(TaskOutcome::Failed { error }) => fail_attempt(
                            conn,
                            &job_for_write,
                            &worker_name,
                            &format!("the host could not run the check: {error}"),
                            crate::clock::now_ms(),
                        ),
                        _ => fail_attempt(
                            conn,
                            &job_for_write,
                            &worker_name,
                            "the check's task was withdrawn (the lab changed)",
                            crate::clock::now_ms(),
                        ),
                    })
                    .await?);
            }
            None => return Err(Error::Internal(format!("host task {task_id} vanished"))),
            Some((None, _)) if crate::clock::now_ms() >= deadline_ms => {
                let id = task_id.clone();
                return Ok(state
                    .db
                    .writer()
                    .write(move |conn| {
                        conn.execute(
                            "UPDATE host_tasks SET done_ms = ?2, outcome = '{\"result\":\"cancelled\"}' WHERE id = ?1 AND done_ms IS NULL",
                            params![id, crate::clock::now_ms()],
                        )?;
                        fail_attempt(conn, &job_for_write, &worker_name, "the lab host did not report the check in time", crate::clock::now_ms())
                    })
                    .await?);
            }
            Some((None, _)) => {}
        }
        enum Wake {
            Look,
            Renew,
            Stop,
        }
        let wake = tokio::select! {
            _ = reported.changed() => Wake::Look,
            _ = tokio::time::sleep(Duration::from_millis(500)) => Wake::Look,
            _ = renew.tick() => Wake::Renew,
            _ = shutdown.wait_for(|stop| *stop) => Wake::Stop,
        };
        match wake {
            Wake::Look => {}
            Wake::Renew => {
                let renewed = state.extend_lease(job.id, worker).await;
                if let Err(error) = renewed {
                    // Cancelled by staff, or the lease was lost: the job is no longer ours.
                    tracing::info!(job = job.id, ?error, "stopped waiting for a check");
                    return Ok(());
                }
            }
            Wake::Stop => {
                // Hand the job back so the next start picks it up at once; its host task
                // stays out and the next worker waits for that one instead of a new one.
                state.hand_back(job.id, worker).await;
                return Ok(());
            }
        }
    }
}

/// Runs an SSH check from the appliance while renewing the job's lease, then records it.
async fn run_over_ssh(
    state: &Workers,
    worker: &str,
    job: Job,
    target: labrack_streamer::terminal::TerminalTarget,
    check: SshCheck,
) -> Result<(), Error> {
    let program = remote_program(&check);
    let wait = Duration::from_secs(u64::from(check.timeout_secs) + 60);
    let started = std::time::Instant::now();
    let mut ssh = tokio::task::spawn_blocking(move || {
        labrack_streamer::terminal::run_command(
            &target,
            REMOTE_COMMAND,
            program.as_bytes(),
            wait,
            256 * 1024,
        )
    });
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.tick().await;
    let ran = loop {
        tokio::select! {
            done = &mut ssh => break done,
            _ = renew.tick() => {
                let renewed = state.extend_lease(job.id, worker).await;
                if renewed.is_err() {
                    // Cancelled or lost: the check's result, if it comes, is not ours to record.
                    return Ok(());
                }
            }
        }
    };
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let result = match ran {
        Ok(Ok(output)) => {
            let printed = String::from_utf8_lossy(&output.stdout).into_owned();
            if printed.starts_with(&format!("LABRACK-{} ", check.nonce)) {
                parse_remote(&printed, &check, duration_ms)
            } else {
                Err(format!(
                    "the host's shell failed ({:?}): {}",
                    output.exit_code,
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(format!("the SSH check panicked: {error}")),
    };
    let worker = worker.to_owned();
    state
        .db
        .writer()
        .write(move |conn| match result {
            Ok(checked) => {
                record_report(
                    conn,
                    check.run_id,
                    &TaskOutcome::Checked { check: checked },
                    crate::clock::now_ms(),
                )?;
                Ok::<_, Error>(jobs::complete(
                    conn,
                    job.id,
                    &worker,
                    crate::clock::now_ms(),
                )?)
            }
            Err(error) => fail_attempt(
                conn,
                &job,
                &worker,
                &format!("over SSH: {error}"),
                crate::clock::now_ms(),
            ),
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(script: &str, timeout_secs: u32, network: bool) -> SshCheck {
        SshCheck {
            run_id: 41,
            nonce: "0123456789abcdef".into(),
            lab_user: "root".into(),
            name: "it's a check".into(),
            script: script.into(),
            timeout_secs,
            memory_mib: 256,
            network,
        }
    }

    /// Runs the remote program here with `bash` reading it on stdin, as the forced command
    /// would on the host; the "checker" is whoever runs the test, its home `checker`.
    fn run_here(checker: &std::path::Path, check: &SshCheck) -> (String, u64) {
        use std::io::Write as _;
        let started = std::time::Instant::now();
        let mut child = std::process::Command::new("/bin/bash")
            .args(["--noprofile", "--norc", "-s"])
            .env_clear()
            .env("HOME", checker)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("bash runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(remote_program(check).as_bytes())
            .expect("program");
        let output = child.wait_with_output().expect("bash ends");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            u64::try_from(started.elapsed().as_millis()).unwrap_or(0),
        )
    }

    #[test]
    fn an_ssh_check_runs_once_per_run_and_reports_like_an_agent() {
        let checker =
            std::env::temp_dir().join(format!("labrack-ssh-check-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&checker).expect("checker's home");
        let marks = checker.join("runs.log");
        let counting = check(
            &format!(
                "echo \"$LABRACK_CHECK_RUN $LABRACK_CHECK\" >> {}; echo 'FAIL: not yet'; exit 3",
                marks.display()
            ),
            10,
            true,
        );
        let (first, ms) = run_here(&checker, &counting);
        let result = parse_remote(&first, &counting, ms).expect("ran");
        assert_eq!(
            (result.passed, result.exit_code, result.message.as_deref()),
            (false, Some(3), Some("not yet"))
        );
        // A retry of the same run (the appliance restarted) reads the result; it does not run again.
        let (again, ms) = run_here(&checker, &counting);
        assert_eq!(
            parse_remote(&again, &counting, ms)
                .expect("read back")
                .message
                .as_deref(),
            Some("not yet")
        );
        assert_eq!(
            std::fs::read_to_string(&marks).expect("log"),
            "41 it's a check\n",
            "ran exactly once, quoting intact"
        );
        // A run with another nonce is another run: the result of one never answers the other.
        let other = SshCheck {
            nonce: "fedcba9876543210".into(),
            ..counting.clone()
        };
        assert!(
            parse_remote(&again, &other, 1).is_err(),
            "lines without the run's nonce are not its answer"
        );

        // Without network the check sits in an empty namespace: even loopback is unreachable
        // (with network, the same connect is refused by the closed port instead).
        let isolated = SshCheck {
            run_id: 42,
            ..check("(exec 3<>/dev/tcp/127.0.0.1/9) 2>&1", 10, false)
        };
        let (printed, ms) = run_here(&checker, &isolated);
        let result = parse_remote(&printed, &isolated, ms).expect("ran");
        assert!(
            result.output.contains("Network is unreachable"),
            "{}",
            result.output
        );
        let open = SshCheck {
            run_id: 44,
            ..check("(exec 3<>/dev/tcp/127.0.0.1/9) 2>&1", 10, true)
        };
        let (printed, ms) = run_here(&checker, &open);
        assert!(
            parse_remote(&printed, &open, ms)
                .expect("ran")
                .output
                .contains("Connection refused")
        );
        let slow = SshCheck {
            run_id: 43,
            ..check("sleep 30", 1, true)
        };
        let (printed, ms) = run_here(&checker, &slow);
        let result = parse_remote(&printed, &slow, ms).expect("ran");
        assert_eq!(
            (result.timed_out, result.message.as_deref()),
            (true, Some("the check did not finish within 1 s"))
        );
        // A check's own stderr cannot say "could not run": only the program's marker can.
        let faked = SshCheck {
            run_id: 45,
            ..check(
                "echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1",
                10,
                false,
            )
        };
        let (printed, ms) = run_here(&checker, &faked);
        let result = parse_remote(&printed, &faked, ms).expect("a result, not an error");
        assert_eq!((result.passed, result.exit_code), (false, Some(1)));
        // A missing lab account is decided before the script starts.
        let nobody = SshCheck {
            run_id: 46,
            lab_user: "no-such-lab-user".into(),
            ..check("true", 5, true)
        };
        let (printed, ms) = run_here(&checker, &nobody);
        assert!(
            parse_remote(&printed, &nobody, ms)
                .is_err_and(|e| e.contains("could not run") && e.contains("no-such-lab-user")),
            "{printed}"
        );
        let _ = std::fs::remove_dir_all(&checker);
    }

    #[test]
    fn odd_answers_are_errors_not_results() {
        let c = check("true", 5, true);
        assert!(
            parse_remote("LABRACK-0123456789abcdef PENDING\n", &c, 1)
                .is_err_and(|e| e.contains("still running"))
        );
        assert!(
            parse_remote("LABRACK-0123456789abcdef CANNOT no sandbox\n", &c, 1)
                .is_err_and(|e| e.contains("no sandbox"))
        );
        assert!(parse_remote("hello\n", &c, 1).is_err());
        assert!(parse_remote("LABRACK-0123456789abcdef STATUS x y z\n", &c, 1).is_err());
        assert!(
            parse_remote("LABRACK-ffffffffffffffff STATUS 0 0 0\n\n\n", &c, 1).is_err(),
            "another nonce"
        );
        assert!(
            parse_remote("LABRACK-STATUS 0 0 0\n\n\n", &c, 1).is_err(),
            "the old unmarked format"
        );
    }
}
