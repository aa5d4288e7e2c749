//! The durable job queue: jobs live in the appliance's SQLite file, so an
//! acknowledged job survives `kill -9`.
//!
//! - **Enqueue** with a kind, a JSON payload, a priority and an optional idempotency key:
//!   the same (kind, key) twice gives the first job back, never a second one.
//! - **Claim** takes the most urgent ready job under a lease (visibility timeout) in one
//!   atomic statement, so no job runs twice at once. Jobs may carry a fairness key (a
//!   team): a key holds at most [`PER_KEY_RUNNING`] running jobs, and among jobs of equal
//!   priority the key with fewer running goes first, so one team cannot fill the workers. A job whose worker died (its lease ran
//!   out) is ready again; the lost run counts as an attempt.
//! - **Fail** retries with exponential backoff (2, 4, 8, 16 s …) until `max_attempts`, then
//!   the job is **dead** with its last error. Staff **requeue** dead or cancelled jobs
//!   (attempts start over) and **cancel** queued or running ones.
//!
//! Every function takes the time as an argument: the queue's behaviour is tested without
//! sleeping. Times are Unix milliseconds.

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

/// Attempts a job gets unless its kind says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The longest kind name and idempotency key accepted.
pub const MAX_NAME_LEN: usize = 128;
/// The largest payload accepted (bytes of JSON).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// How many jobs with the same fairness key (one team's) run at once.
pub const PER_KEY_RUNNING: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("no job {0}")]
    NotFound(i64),
    #[error("job {id} is {state}; {action} needs it {needs}")]
    WrongState {
        id: i64,
        state: String,
        action: &'static str,
        needs: &'static str,
    },
    #[error("job {0} is no longer leased to this worker (its lease ran out)")]
    LeaseLost(i64),
}

/// The appliance's kinds of work, each with what it needs: the one list of job kinds and
/// their payloads (stored as the JSON of the variant's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// run one check run (a host task, or over SSH)
    RunCheck(RunCheck),
    /// turn a team's submission into a check batch
    ScoreSubmission(ScoreSubmission),
    /// answer a team's question with the hint agent
    AgentHint(AgentHint),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCheck {
    pub check_run_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSubmission {
    pub submission_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHint {
    pub event_id: i64,
    pub team_id: i64,
    pub question: String,
}

impl Work {
    pub const RUN_CHECK: &str = "run_check";
    pub const SCORE_SUBMISSION: &str = "score_submission";
    pub const AGENT_HINT: &str = "agent_hint";
    /// Every kind the workers claim.
    pub const KINDS: [&str; 3] = [Self::RUN_CHECK, Self::SCORE_SUBMISSION, Self::AGENT_HINT];

    pub fn kind(&self) -> &'static str {
        match self {
            Self::RunCheck(_) => Self::RUN_CHECK,
            Self::ScoreSubmission(_) => Self::SCORE_SUBMISSION,
            Self::AgentHint(_) => Self::AGENT_HINT,
        }
    }

    /// The payload as stored.
    pub fn payload(&self) -> serde_json::Value {
        let value = match self {
            Self::RunCheck(work) => serde_json::to_value(work),
            Self::ScoreSubmission(work) => serde_json::to_value(work),
            Self::AgentHint(work) => serde_json::to_value(work),
        };
        // Plain structs of integers and strings always serialize.
        value.unwrap_or_default()
    }

    /// A claimed job's work; why not, for a kind or payload this appliance does not know.
    pub fn of(job: &Job) -> Result<Self, String> {
        let payload = job.payload.clone();
        let parsed = match job.kind.as_str() {
            Self::RUN_CHECK => serde_json::from_value(payload).map(Self::RunCheck),
            Self::SCORE_SUBMISSION => serde_json::from_value(payload).map(Self::ScoreSubmission),
            Self::AGENT_HINT => serde_json::from_value(payload).map(Self::AgentHint),
            other => return Err(format!("no worker does jobs of kind {other:?}")),
        };
        parsed.map_err(|e| format!("the {} job's payload: {e}", job.kind))
    }
}

/// A job to add.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    pub payload: serde_json::Value,
    pub idempotency_key: Option<String>,
    /// higher runs first
    pub priority: i64,
    pub max_attempts: u32,
    /// who the job works for (`team:7`): one key's jobs take at most [`PER_KEY_RUNNING`]
    /// workers at once
    pub fair_key: Option<String>,
}

impl NewJob {
    /// A job for `work`, with the defaults.
    pub fn work(work: &Work) -> Self {
        Self::new(work.kind(), work.payload())
    }

    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            payload,
            idempotency_key: None,
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            fair_key: None,
        }
    }

    /// The job works for `team_id` (see [`NewJob::fair_key`]).
    pub fn for_team(mut self, team_id: i64) -> Self {
        self.fair_key = Some(format!("team:{team_id}"));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub priority: i64,
    /// queued, running, succeeded, dead or cancelled
    pub state: String,
    pub attempts: u32,
    pub max_attempts: u32,
    pub run_after_ms: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// whom the job works for (`team:7`), if anyone
    pub fair_key: Option<String>,
}

impl Job {
    pub fn fair_key_is(&self, key: &str) -> bool {
        self.fair_key.as_deref() == Some(key)
    }
}

const COLUMNS: &str = "id, kind, payload, idempotency_key, priority, state, attempts, max_attempts, run_after_ms, lease_owner, lease_expires_ms, last_error, created_ms, updated_ms, fair_key";

fn row_to_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let payload: String = row.get(2)?;
    Ok(Job {
        id: row.get(0)?,
        kind: row.get(1)?,
        payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
        idempotency_key: row.get(3)?,
        priority: row.get(4)?,
        state: row.get(5)?,
        attempts: row.get(6)?,
        max_attempts: row.get(7)?,
        run_after_ms: row.get(8)?,
        lease_owner: row.get(9)?,
        lease_expires_ms: row.get(10)?,
        last_error: row.get(11)?,
        created_ms: row.get(12)?,
        updated_ms: row.get(13)?,
        fair_key: row.get(14)?,
    })
}

/// The wait before attempt `attempts + 1` after `attempts` failed ones: 2, 4, 8, 16 s …
/// (capped at about an hour).
pub fn backoff_ms(attempts: u32) -> i64 {
    1000_i64 << attempts.clamp(1, 12)
}

fn check_name(what: &str, value: &str) -> Result<(), JobError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN || value.chars().any(char::is_control) {
        return Err(JobError::Invalid(format!(
            "{what} must be 1–{MAX_NAME_LEN} printable characters"
        )));
    }
    Ok(())
}

/// Adds a job, or returns the existing one with the same kind and idempotency key.
/// The boolean says whether a new job was created.
pub fn enqueue(conn: &Connection, job: &NewJob, now_ms: i64) -> Result<(i64, bool), JobError> {
    check_name("the job kind", &job.kind)?;
    if let Some(key) = &job.idempotency_key {
        check_name("the idempotency key", key)?;
    }
    if let Some(key) = &job.fair_key {
        check_name("the fairness key", key)?;
    }
    if !(1..=100).contains(&job.max_attempts) {
        return Err(JobError::Invalid("max_attempts must be 1–100".into()));
    }
    let payload = job.payload.to_string();
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(JobError::Invalid(format!(
            "the payload is {} bytes; at most {MAX_PAYLOAD_BYTES} are accepted",
            payload.len()
        )));
    }
    if let Some(key) = &job.idempotency_key {
        let existing: Option<i64> = conn
            .query_row(
                "SELECT id FROM jobs WHERE kind = ?1 AND idempotency_key = ?2",
                params![job.kind, key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            return Ok((id, false));
        }
    }
    conn.execute(
        "INSERT INTO jobs (kind, payload, idempotency_key, priority, state, attempts, max_attempts, run_after_ms, created_ms, updated_ms, fair_key)
         VALUES (?1, ?2, ?3, ?4, 'queued', 0, ?5, ?6, ?6, ?6, ?7)",
        params![job.kind, payload, job.idempotency_key, job.priority, job.max_attempts, now_ms, job.fair_key],
    )?;
    Ok((conn.last_insert_rowid(), true))
}

/// Takes the most urgent ready job (highest priority, then the fairness key with the fewest
/// running jobs, then oldest) for `worker` until `now + lease_ms`. Ready: queued and due, or
/// running with a lapsed lease (its worker died), and its key below [`PER_KEY_RUNNING`]
/// running jobs. A lapsed job that has used all its attempts is dead instead.
pub fn claim(
    conn: &Connection,
    worker: &str,
    kinds: &[&str],
    lease_ms: i64,
    now_ms: i64,
) -> Result<Option<Job>, JobError> {
    check_name("the worker name", worker)?;
    // Lapsed leases on jobs with no attempts left: dead, with the reason.
    conn.execute(
        "UPDATE jobs SET state = 'dead', last_error = 'the worker stopped answering (lease expired) on the last attempt', lease_owner = NULL, lease_expires_ms = NULL, updated_ms = ?1
         WHERE state = 'running' AND lease_expires_ms <= ?1 AND attempts >= max_attempts",
        params![now_ms],
    )?;
    let kinds_json = serde_json::to_string(kinds).unwrap_or_else(|_| "[]".into());
    let sql = format!(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?1, lease_expires_ms = ?2, updated_ms = ?3,
             last_error = CASE WHEN state = 'running' THEN 'the worker stopped answering (lease expired)' ELSE last_error END
         WHERE id = (
             SELECT j.id FROM jobs j
             LEFT JOIN (SELECT fair_key, count(*) AS running FROM jobs
                        WHERE state = 'running' AND lease_expires_ms > ?3 AND fair_key IS NOT NULL GROUP BY fair_key) busy
               ON busy.fair_key = j.fair_key
             WHERE ((j.state = 'queued' AND j.run_after_ms <= ?3) OR (j.state = 'running' AND j.lease_expires_ms <= ?3))
               AND (json_array_length(?4) = 0 OR j.kind IN (SELECT value FROM json_each(?4)))
               AND coalesce(busy.running, 0) < ?5
             ORDER BY j.priority DESC, coalesce(busy.running, 0), j.run_after_ms, j.id
             LIMIT 1)
         RETURNING {COLUMNS}"
    );
    Ok(conn
        .query_row(
            &sql,
            params![
                worker,
                now_ms + lease_ms.max(1),
                now_ms,
                kinds_json,
                PER_KEY_RUNNING
            ],
            row_to_job,
        )
        .optional()?)
}

fn leased(conn: &Connection, id: i64, worker: &str, now_ms: i64) -> Result<Job, JobError> {
    let job = get(conn, id)?.ok_or(JobError::NotFound(id))?;
    if job.state != "running"
        || job.lease_owner.as_deref() != Some(worker)
        || job.lease_expires_ms.is_none_or(|at| at <= now_ms)
    {
        return Err(JobError::LeaseLost(id));
    }
    Ok(job)
}

/// The worker finished the job.
pub fn complete(conn: &Connection, id: i64, worker: &str, now_ms: i64) -> Result<(), JobError> {
    leased(conn, id, worker, now_ms)?;
    conn.execute(
        "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, lease_expires_ms = NULL, last_error = NULL, updated_ms = ?2 WHERE id = ?1",
        params![id, now_ms],
    )?;
    Ok(())
}

/// The attempt failed: the job waits its backoff and runs again, or is dead when it has no
/// attempts left. Returns the job's new state.
pub fn fail(
    conn: &Connection,
    id: i64,
    worker: &str,
    error: &str,
    now_ms: i64,
) -> Result<String, JobError> {
    let job = leased(conn, id, worker, now_ms)?;
    let error: String = error.chars().take(4000).collect();
    let state = if job.attempts >= job.max_attempts {
        "dead"
    } else {
        "queued"
    };
    conn.execute(
        "UPDATE jobs SET state = ?2, run_after_ms = ?3, lease_owner = NULL, lease_expires_ms = NULL, last_error = ?4, updated_ms = ?5 WHERE id = ?1",
        params![id, state, now_ms + backoff_ms(job.attempts), error, now_ms],
    )?;
    Ok(state.to_owned())
}

/// The worker is still on the job: its lease runs until `now + lease_ms`.
pub fn extend(
    conn: &Connection,
    id: i64,
    worker: &str,
    lease_ms: i64,
    now_ms: i64,
) -> Result<(), JobError> {
    leased(conn, id, worker, now_ms)?;
    conn.execute(
        "UPDATE jobs SET lease_expires_ms = ?2, updated_ms = ?3 WHERE id = ?1",
        params![id, now_ms + lease_ms.max(1), now_ms],
    )?;
    Ok(())
}

/// The worker stops (the appliance shuts down) before the job ended: the job is ready
/// again at once and the interrupted attempt is not counted.
pub fn abandon(conn: &Connection, id: i64, worker: &str, now_ms: i64) -> Result<(), JobError> {
    leased(conn, id, worker, now_ms)?;
    conn.execute(
        "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), run_after_ms = ?2, lease_owner = NULL, lease_expires_ms = NULL, updated_ms = ?2
         WHERE id = ?1",
        params![id, now_ms],
    )?;
    Ok(())
}

/// The job cannot start yet for a reason that is not a failure (the team's previous batch
/// still runs): it waits `delay_ms` and the attempt is not counted.
pub fn defer(
    conn: &Connection,
    id: i64,
    worker: &str,
    delay_ms: i64,
    reason: &str,
    now_ms: i64,
) -> Result<(), JobError> {
    leased(conn, id, worker, now_ms)?;
    conn.execute(
        "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), run_after_ms = ?2, lease_owner = NULL, lease_expires_ms = NULL,
                         last_error = ?3, updated_ms = ?4
         WHERE id = ?1",
        params![id, now_ms + delay_ms.max(1), reason, now_ms],
    )?;
    Ok(())
}

/// Staff put a dead or cancelled job back in the queue, with its attempts starting over.
pub fn requeue(conn: &Connection, id: i64, now_ms: i64) -> Result<(), JobError> {
    let job = get(conn, id)?.ok_or(JobError::NotFound(id))?;
    if !matches!(job.state.as_str(), "dead" | "cancelled") {
        return Err(JobError::WrongState {
            id,
            state: job.state,
            action: "requeue",
            needs: "dead or cancelled",
        });
    }
    conn.execute("UPDATE jobs SET state = 'queued', attempts = 0, run_after_ms = ?2, updated_ms = ?2 WHERE id = ?1", params![id, now_ms])?;
    Ok(())
}

/// Staff stop a queued or running job (a running worker's later `complete`/`fail` is refused).
pub fn cancel(conn: &Connection, id: i64, now_ms: i64) -> Result<(), JobError> {
    let job = get(conn, id)?.ok_or(JobError::NotFound(id))?;
    if !matches!(job.state.as_str(), "queued" | "running") {
        return Err(JobError::WrongState {
            id,
            state: job.state,
            action: "cancel",
            needs: "queued or running",
        });
    }
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, lease_expires_ms = NULL, updated_ms = ?2 WHERE id = ?1",
        params![id, now_ms],
    )?;
    Ok(())
}

pub fn get(conn: &Connection, id: i64) -> Result<Option<Job>, JobError> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
            row_to_job,
        )
        .optional()?)
}

/// Jobs in a state (all states when `None`), most recently changed first.
pub fn list(conn: &Connection, state: Option<&str>, limit: u32) -> Result<Vec<Job>, JobError> {
    let mut statement =
        conn.prepare(&format!("SELECT {COLUMNS} FROM jobs WHERE ?1 IS NULL OR state = ?1 ORDER BY updated_ms DESC, id DESC LIMIT ?2"))?;
    let jobs = statement
        .query_map(params![state, limit.min(1000)], row_to_job)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A real SQLite file with the appliance's schema.
    fn db() -> (Connection, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "labrack-jobs-{}-{}.db",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut conn = crate::store::open_connection(&path, false).expect("open");
        crate::store::migrate(&mut conn).expect("migrate");
        (conn, path)
    }

    fn cleanup(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[test]
    fn work_round_trips_through_its_stored_form_and_odd_jobs_are_named() {
        let all = [
            Work::RunCheck(RunCheck { check_run_id: 7 }),
            Work::ScoreSubmission(ScoreSubmission { submission_id: 3 }),
            Work::AgentHint(AgentHint {
                event_id: 1,
                team_id: 2,
                question: "why?".into(),
            }),
        ];
        for work in all {
            let new = NewJob::work(&work);
            assert_eq!(new.kind, work.kind());
            let job = Job {
                kind: new.kind.clone(),
                payload: new.payload.clone(),
                ..job_of_kind("")
            };
            assert_eq!(Work::of(&job), Ok(work));
        }
        assert_eq!(
            NewJob::work(&Work::RunCheck(RunCheck { check_run_id: 7 })).payload,
            json!({"check_run_id": 7}),
            "the stored form is the fields"
        );
        let odd = Job {
            kind: Work::AGENT_HINT.into(),
            payload: json!({"team_id": 2}),
            ..job_of_kind("x")
        };
        assert!(Work::of(&odd).is_err_and(|e| e.contains("event_id")));
        assert!(Work::of(&job_of_kind("mystery")).is_err_and(|e| e.contains("mystery")));
    }

    fn job_of_kind(kind: &str) -> Job {
        Job {
            id: 1,
            kind: kind.into(),
            payload: json!({}),
            idempotency_key: None,
            priority: 0,
            state: "running".into(),
            attempts: 1,
            max_attempts: 5,
            run_after_ms: 0,
            lease_owner: None,
            lease_expires_ms: None,
            last_error: None,
            created_ms: 0,
            updated_ms: 0,
            fair_key: None,
        }
    }

    #[test]
    fn idempotent_enqueue_and_priority_order() {
        let (conn, path) = db();
        let mut job = NewJob::new("check", json!({"team": 1}));
        job.idempotency_key = Some("team-1-v3".into());
        let (first, created) = enqueue(&conn, &job, 1_000).expect("enqueue");
        assert!(created);
        assert_eq!(
            enqueue(&conn, &job, 2_000).expect("again"),
            (first, false),
            "the same key gives the same job"
        );
        let mut urgent = NewJob::new("check", json!({"team": 2}));
        urgent.priority = 10;
        let (urgent_id, _) = enqueue(&conn, &urgent, 3_000).expect("enqueue");
        let claimed = claim(&conn, "w1", &[], 30_000, 4_000)
            .expect("claim")
            .expect("a job");
        assert_eq!(claimed.id, urgent_id, "higher priority first");
        assert_eq!(
            (
                claimed.state.as_str(),
                claimed.attempts,
                claimed.lease_expires_ms
            ),
            ("running", 1, Some(34_000))
        );
        let next = claim(&conn, "w2", &[], 30_000, 4_000)
            .expect("claim")
            .expect("a job");
        assert_eq!(next.id, first);
        assert!(
            claim(&conn, "w3", &[], 30_000, 4_000)
                .expect("claim")
                .is_none(),
            "no job is handed out twice while leased"
        );
        cleanup(&path);
    }

    #[test]
    fn failures_back_off_then_die_and_staff_requeue() {
        let (conn, path) = db();
        let (id, _) = enqueue(&conn, &NewJob::new("check", json!({})), 0).expect("enqueue");
        let mut now = 0;
        let mut waits = Vec::new();
        for attempt in 1..=5 {
            let job = claim(&conn, "w", &[], 10_000, now)
                .expect("claim")
                .expect("due");
            assert_eq!(job.attempts, attempt);
            let state =
                fail(&conn, id, "w", &format!("FAIL: attempt {attempt}"), now).expect("fail");
            let job = get(&conn, id).expect("get").expect("job");
            if attempt < 5 {
                assert_eq!(state, "queued");
                waits.push(job.run_after_ms - now);
                assert!(
                    claim(&conn, "w", &[], 10_000, job.run_after_ms - 1)
                        .expect("claim")
                        .is_none(),
                    "not before its backoff"
                );
                now = job.run_after_ms;
            } else {
                assert_eq!(state, "dead");
                assert_eq!(job.last_error.as_deref(), Some("FAIL: attempt 5"));
            }
        }
        assert_eq!(waits, [2_000, 4_000, 8_000, 16_000]);
        assert!(
            claim(&conn, "w", &[], 10_000, now + 1_000_000)
                .expect("claim")
                .is_none(),
            "dead jobs do not run"
        );
        assert!(matches!(
            cancel(&conn, id, now),
            Err(JobError::WrongState { .. })
        ));
        requeue(&conn, id, now).expect("requeue");
        let job = claim(&conn, "w", &[], 10_000, now)
            .expect("claim")
            .expect("requeued");
        assert_eq!(job.attempts, 1, "attempts start over");
        cleanup(&path);
    }

    #[test]
    fn a_dead_workers_job_is_retried_after_its_lease_and_its_late_answer_is_refused() {
        let (conn, path) = db();
        let mut job = NewJob::new("check", json!({}));
        job.max_attempts = 2;
        let (id, _) = enqueue(&conn, &job, 0).expect("enqueue");
        claim(&conn, "dies", &[], 5_000, 0)
            .expect("claim")
            .expect("job");
        assert!(
            claim(&conn, "other", &[], 5_000, 4_999)
                .expect("claim")
                .is_none(),
            "still leased"
        );
        let retried = claim(&conn, "other", &[], 5_000, 5_000)
            .expect("claim")
            .expect("lease lapsed");
        assert_eq!(
            (retried.id, retried.attempts, retried.lease_owner.as_deref()),
            (id, 2, Some("other"))
        );
        assert!(
            retried
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("lease expired"))
        );
        assert!(
            matches!(
                complete(&conn, id, "dies", 5_001),
                Err(JobError::LeaseLost(_))
            ),
            "the first worker's late answer changes nothing"
        );
        // The second worker dies too, on the last attempt: dead, not retried.
        assert!(
            claim(&conn, "third", &[], 5_000, 10_000)
                .expect("claim")
                .is_none()
        );
        assert_eq!(get(&conn, id).expect("get").expect("job").state, "dead");
        cleanup(&path);
    }

    #[test]
    fn kinds_filter_cancel_and_bad_input() {
        let (conn, path) = db();
        let (check, _) = enqueue(&conn, &NewJob::new("check", json!({})), 0).expect("enqueue");
        let (hint, _) = enqueue(&conn, &NewJob::new("agent", json!({})), 0).expect("enqueue");
        assert_eq!(
            claim(&conn, "w", &["agent"], 1_000, 0)
                .expect("claim")
                .map(|j| j.id),
            Some(hint)
        );
        cancel(&conn, check, 0).expect("cancel");
        assert!(
            claim(&conn, "w", &[], 1_000, 0).expect("claim").is_none(),
            "cancelled jobs do not run"
        );
        assert_eq!(list(&conn, Some("cancelled"), 10).expect("list").len(), 1);
        assert_eq!(list(&conn, None, 10).expect("list").len(), 2);
        let bad = [
            NewJob::new("", json!({})),
            NewJob::new("x".repeat(MAX_NAME_LEN + 1), json!({})),
            NewJob::new("bad\nkind", json!({})),
            NewJob::new("big", json!("x".repeat(MAX_PAYLOAD_BYTES))),
            NewJob {
                max_attempts: 0,
                ..NewJob::new("check", json!({}))
            },
        ];
        for job in bad {
            assert!(
                matches!(enqueue(&conn, &job, 0), Err(JobError::Invalid(_))),
                "{job:?}"
            );
        }
        assert_eq!(
            list(&conn, None, 10).expect("list").len(),
            2,
            "refused jobs change nothing"
        );
        assert!(matches!(
            requeue(&conn, 999, 0),
            Err(JobError::NotFound(999))
        ));
        cleanup(&path);
    }

    #[test]
    fn a_worker_extends_its_lease_or_hands_the_job_back() {
        let (conn, path) = db();
        let (id, _) = enqueue(&conn, &NewJob::new("check", json!({})), 0).expect("enqueue");
        claim(&conn, "w", &[], 1_000, 0)
            .expect("claim")
            .expect("job");
        extend(&conn, id, "w", 1_000, 900).expect("extend");
        assert!(
            claim(&conn, "other", &[], 1_000, 1_500)
                .expect("claim")
                .is_none(),
            "the extended lease holds"
        );
        assert!(matches!(
            extend(&conn, id, "other", 1_000, 1_500),
            Err(JobError::LeaseLost(_))
        ));
        abandon(&conn, id, "w", 1_600).expect("abandon");
        let again = claim(&conn, "other", &[], 1_000, 1_600)
            .expect("claim")
            .expect("ready at once");
        assert_eq!(again.attempts, 1, "the abandoned attempt does not count");
        cleanup(&path);
    }

    #[test]
    fn one_team_holds_a_bounded_share_and_the_least_busy_team_goes_first() {
        let (conn, path) = db();
        // Team 1 floods the queue first; team 2 asks once, later.
        for n in 0..10 {
            enqueue(&conn, &NewJob::new("check", json!({"n": n})).for_team(1), n).expect("enqueue");
        }
        let (second_team, _) =
            enqueue(&conn, &NewJob::new("check", json!({})).for_team(2), 100).expect("enqueue");
        let (unkeyed, _) = enqueue(&conn, &NewJob::new("check", json!({})), 200).expect("enqueue");
        let mut claimed = Vec::new();
        while let Some(job) = claim(&conn, "w", &[], 60_000, 1_000).expect("claim") {
            claimed.push(job);
        }
        let team_one = claimed.iter().filter(|j| j.fair_key_is("team:1")).count();
        assert_eq!(
            team_one, PER_KEY_RUNNING as usize,
            "team 1 runs at most its share"
        );
        assert_eq!(
            claimed.len(),
            PER_KEY_RUNNING as usize + 2,
            "the other team and the unkeyed job run beside it"
        );
        let position = |id| claimed.iter().position(|j| j.id == id).expect("claimed");
        assert!(
            position(second_team) <= 1,
            "the idle team goes before the busy team's second job: {:?}",
            claimed.iter().map(|j| j.id).collect::<Vec<_>>()
        );
        assert!(position(unkeyed) <= 2);
        // One of team 1's jobs ends: the next of its jobs may run.
        let first = claimed
            .iter()
            .find(|j| j.fair_key_is("team:1"))
            .expect("team 1 job")
            .id;
        complete(&conn, first, "w", 2_000).expect("complete");
        assert!(
            claim(&conn, "w", &[], 60_000, 2_000)
                .expect("claim")
                .is_some_and(|j| j.fair_key_is("team:1"))
        );
        assert!(
            claim(&conn, "w", &[], 60_000, 2_000)
                .expect("claim")
                .is_none()
        );
        // A lapsed lease does not count against the team (its worker died).
        let next = claim(&conn, "w2", &[], 60_000, 70_000)
            .expect("claim")
            .expect("lapsed jobs are ready again");
        assert!(next.attempts >= 1);
        cleanup(&path);
    }

    #[test]
    fn a_deferred_job_waits_without_using_an_attempt() {
        let (conn, path) = db();
        let mut job = NewJob::new("score", json!({}));
        job.max_attempts = 1;
        let (id, _) = enqueue(&conn, &job, 0).expect("enqueue");
        for round in 0..5 {
            let now = round * 10_000;
            claim(&conn, "w", &[], 1_000, now)
                .expect("claim")
                .expect("due");
            defer(&conn, id, "w", 5_000, "the team's previous batch runs", now).expect("defer");
            assert!(
                claim(&conn, "w", &[], 1_000, now + 4_999)
                    .expect("claim")
                    .is_none(),
                "not before the delay"
            );
        }
        let job = get(&conn, id).expect("get").expect("job");
        assert_eq!(
            (job.state.as_str(), job.attempts),
            ("queued", 0),
            "deferring is no failure, whatever max_attempts"
        );
        assert!(
            matches!(
                defer(&conn, id, "w", 5_000, "x", 60_000),
                Err(JobError::LeaseLost(_))
            ),
            "only the lease holder defers"
        );
        cleanup(&path);
    }

    #[test]
    fn backoff_doubles_from_two_seconds() {
        assert_eq!([1, 2, 3, 4].map(backoff_ms), [2_000, 4_000, 8_000, 16_000]);
        assert_eq!(backoff_ms(0), 2_000);
        assert_eq!(backoff_ms(99), 4_096_000);
    }
}
