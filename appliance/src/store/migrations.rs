//! Versioned schema migrations, applied in order at start; `PRAGMA user_version` records
//! the last one applied. Never edit a released migration: add a new one.

use rusqlite::Connection;

use super::StoreError;

/// The migrations, in order. Index + 1 is the schema version it produces.
pub const MIGRATIONS: &[&str] = &[
    // 1: staff, events, teams, participants, sessions, audit log
    r#"
CREATE TABLE staff (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'organizer', 'staff', 'judge')),
    must_change_password INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    code TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('draft', 'live', 'frozen', 'ended', 'archived')),
    starts_at TEXT NOT NULL,
    ends_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE teams (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (event_id, name COLLATE NOCASE)
);
CREATE TABLE participants (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER NOT NULL REFERENCES teams(id),
    name TEXT NOT NULL,
    email TEXT,
    join_code_hash TEXT NOT NULL UNIQUE,
    joined_at TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX participants_by_event ON participants(event_id);
CREATE INDEX participants_by_team ON participants(team_id);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    staff_id INTEGER REFERENCES staff(id),
    participant_id INTEGER REFERENCES participants(id),
    csrf_token TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    CHECK ((staff_id IS NULL) <> (participant_id IS NULL))
);
CREATE INDEX sessions_by_expiry ON sessions(expires_at);
CREATE INDEX sessions_by_staff ON sessions(staff_id);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    remote_addr TEXT,
    request_id TEXT,
    detail TEXT
);
CREATE TRIGGER audit_log_is_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_log_is_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"#,
    // 2: lab hosts, enrolment tokens, lab templates, allocations, host tasks
    r#"
CREATE TABLE hosts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key BLOB NOT NULL,
    address TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    capacity INTEGER NOT NULL,
    enrolled_at TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    healthy INTEGER NOT NULL DEFAULT 1,
    telemetry TEXT
);
CREATE TABLE enrolment_tokens (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    note TEXT,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at TEXT,
    host_id INTEGER REFERENCES hosts(id)
);
CREATE TABLE lab_templates (
    name TEXT PRIMARY KEY,
    runtime TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    gpu_memory_mib INTEGER,
    skeleton TEXT NOT NULL,
    checks TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE lab_template_source (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    toml TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE allocations (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER NOT NULL REFERENCES teams(id),
    host_id INTEGER NOT NULL REFERENCES hosts(id),
    template TEXT NOT NULL,
    runtime TEXT NOT NULL,
    skeleton TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    tasks_issued INTEGER NOT NULL DEFAULT 0,
    in_flight TEXT,
    retry_at_ms INTEGER,
    reason TEXT,
    desktop_user TEXT,
    desktop_secret BLOB,
    rdp_port INTEGER,
    ssh_port INTEGER,
    ssh_host_key TEXT,
    rdp_cert_sha256 TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX allocations_one_live_per_team ON allocations(team_id) WHERE state <> 'released';
CREATE INDEX allocations_by_host ON allocations(host_id, state);
CREATE INDEX allocations_retry ON allocations(retry_at_ms) WHERE retry_at_ms IS NOT NULL;
CREATE TABLE host_tasks (
    id TEXT PRIMARY KEY,
    host_id INTEGER NOT NULL REFERENCES hosts(id),
    allocation_id INTEGER NOT NULL REFERENCES allocations(id),
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    done_ms INTEGER,
    outcome TEXT
);
CREATE INDEX host_tasks_pending ON host_tasks(host_id, created_ms) WHERE done_ms IS NULL;
"#,
    // 3: the durable job queue (jobs.rs)
    r#"
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    run_after_ms INTEGER NOT NULL,
    lease_owner TEXT,
    lease_expires_ms INTEGER,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs(kind, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_ready ON jobs(state, priority DESC, run_after_ms, id);
CREATE INDEX jobs_leases ON jobs(lease_expires_ms) WHERE state = 'running';
"#,
    // 4: checks run against team labs (checks.rs): batches (a rejudge is one set), runs
    // with a snapshot of the check as it was queued, and the host task of each attempt
    r#"
CREATE TABLE check_batches (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    reason TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    team_id INTEGER REFERENCES teams(id),
    check_name TEXT,
    created_ms INTEGER NOT NULL
);
CREATE TABLE check_runs (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES check_batches(id),
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER NOT NULL REFERENCES teams(id),
    allocation_id INTEGER NOT NULL REFERENCES allocations(id),
    check_name TEXT NOT NULL,
    script TEXT NOT NULL,
    timeout_secs INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    network INTEGER NOT NULL,
    weight INTEGER NOT NULL,
    dimension TEXT NOT NULL,
    hidden INTEGER NOT NULL,
    job_id INTEGER REFERENCES jobs(id),
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'passed', 'failed', 'error', 'cancelled')),
    message TEXT,
    output TEXT,
    exit_code INTEGER,
    timed_out INTEGER,
    duration_ms INTEGER,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX check_runs_by_team ON check_runs(team_id, check_name, id);
CREATE INDEX check_runs_by_event ON check_runs(event_id, id);
CREATE INDEX check_runs_by_batch ON check_runs(batch_id);
ALTER TABLE host_tasks ADD COLUMN check_run_id INTEGER REFERENCES check_runs(id);
CREATE INDEX host_tasks_by_check_run ON host_tasks(check_run_id) WHERE check_run_id IS NOT NULL;
CREATE INDEX check_runs_open ON check_runs(state) WHERE state IN ('queued', 'running');
"#,
    // 5: rubrics, judges' scores (append-only: the latest row per judge, team and dimension
    // counts, so a frozen board can be rebuilt as of its freeze), submissions, freeze time
    r#"
CREATE TABLE rubrics (
    event_id INTEGER PRIMARY KEY REFERENCES events(id),
    toml TEXT NOT NULL,
    rubric TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE judge_scores (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER NOT NULL REFERENCES teams(id),
    judge_id INTEGER NOT NULL REFERENCES staff(id),
    dimension TEXT NOT NULL,
    points INTEGER NOT NULL,
    comment TEXT,
    created_ms INTEGER NOT NULL
);
CREATE INDEX judge_scores_latest ON judge_scores(event_id, team_id, judge_id, dimension, id);
CREATE TRIGGER judge_scores_append_only_update BEFORE UPDATE ON judge_scores
BEGIN SELECT RAISE(ABORT, 'judge scores are append-only'); END;
CREATE TRIGGER judge_scores_append_only_delete BEFORE DELETE ON judge_scores
BEGIN SELECT RAISE(ABORT, 'judge scores are append-only'); END;
CREATE TABLE submissions (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER NOT NULL REFERENCES teams(id),
    participant_id INTEGER NOT NULL REFERENCES participants(id),
    version TEXT NOT NULL,
    note TEXT,
    created_ms INTEGER NOT NULL,
    UNIQUE (team_id, version)
);
CREATE INDEX submissions_by_event ON submissions(event_id, id);
ALTER TABLE events ADD COLUMN frozen_at_ms INTEGER;
"#,
    // 6: hints and the score ledger (append-only: a hint's cost is reversed only by a new,
    // audited correction), LLM use for billing, agents' messages and staff alerts
    r#"
CREATE TABLE hints (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    cost INTEGER NOT NULL CHECK (cost >= 0),
    check_name TEXT,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE score_adjustments (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER NOT NULL REFERENCES teams(id),
    points REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('hint', 'correction')),
    hint_id INTEGER REFERENCES hints(id),
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX score_adjustments_one_unlock ON score_adjustments(team_id, hint_id) WHERE kind = 'hint';
CREATE INDEX score_adjustments_by_event ON score_adjustments(event_id, created_ms);
CREATE TRIGGER score_adjustments_append_only_update BEFORE UPDATE ON score_adjustments
BEGIN SELECT RAISE(ABORT, 'the score ledger is append-only'); END;
CREATE TRIGGER score_adjustments_append_only_delete BEFORE DELETE ON score_adjustments
BEGIN SELECT RAISE(ABORT, 'the score ledger is append-only'); END;
CREATE TABLE llm_usage (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER REFERENCES teams(id),
    agent TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX llm_usage_by_team ON llm_usage(team_id);
CREATE TRIGGER llm_usage_append_only_update BEFORE UPDATE ON llm_usage
BEGIN SELECT RAISE(ABORT, 'LLM usage is append-only'); END;
CREATE TRIGGER llm_usage_append_only_delete BEFORE DELETE ON llm_usage
BEGIN SELECT RAISE(ABORT, 'LLM usage is append-only'); END;
CREATE TABLE agent_messages (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER REFERENCES teams(id),
    agent TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('llm', 'rules')),
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX agent_messages_by_team ON agent_messages(team_id, id);
CREATE INDEX agent_messages_by_event ON agent_messages(event_id, agent, id);
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER REFERENCES teams(id),
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX alerts_by_event ON alerts(event_id, id);
"#,
    // 7: hosts without the labrack-host agent (checks reach their labs over SSH)
    r#"
ALTER TABLE hosts ADD COLUMN agent INTEGER NOT NULL DEFAULT 1;
ALTER TABLE hosts ADD COLUMN ssh_port INTEGER;
ALTER TABLE hosts ADD COLUMN ssh_host_key TEXT;
"#,
    // 8: the outbox for the cloud (gap-free sequence) and the billing ledger (append-only)
    r#"
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    entity TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE billing_ledger (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    team_id INTEGER REFERENCES teams(id),
    kind TEXT NOT NULL CHECK (kind IN ('credit', 'gpu_hours', 'llm_tokens', 'hint', 'correction')),
    quantity REAL NOT NULL,
    unit TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    reference TEXT UNIQUE,
    note TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX billing_ledger_by_event ON billing_ledger(event_id, id);
CREATE TRIGGER billing_ledger_append_only_update BEFORE UPDATE ON billing_ledger
BEGIN SELECT RAISE(ABORT, 'the billing ledger is append-only'); END;
CREATE TRIGGER billing_ledger_append_only_delete BEFORE DELETE ON billing_ledger
BEGIN SELECT RAISE(ABORT, 'the billing ledger is append-only'); END;
ALTER TABLE allocations ADD COLUMN billed_until_ms INTEGER;
"#,
    // 9: announcements staff broadcast to an event's participants
    r#"
CREATE TABLE announcements (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    body TEXT NOT NULL,
    author TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX announcements_by_event ON announcements(event_id, id);
"#,
    // 10: sealed labs — template limits and GPU indices per lab; task passwords sealed and
    // never in a task body; cleanup tasks for force-released labs; what hosts can enforce;
    // the signed-call instance and counter (replays, one identity on two machines); the
    // checker account of hosts without an agent; the per-run nonce of SSH checks
    r#"
ALTER TABLE lab_templates ADD COLUMN limits TEXT;
ALTER TABLE allocations ADD COLUMN limits TEXT;
ALTER TABLE allocations ADD COLUMN gpu_indices TEXT NOT NULL DEFAULT '[]';
ALTER TABLE host_tasks ADD COLUMN secret BLOB;
ALTER TABLE host_tasks ADD COLUMN cleanup INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN resources TEXT;
ALTER TABLE hosts ADD COLUMN instance TEXT;
ALTER TABLE hosts ADD COLUMN instance_counter INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN identity_conflict_ms INTEGER;
ALTER TABLE hosts ADD COLUMN checker_user TEXT;
ALTER TABLE hosts ADD COLUMN checker_secret BLOB;
ALTER TABLE check_runs ADD COLUMN ssh_nonce TEXT;
"#,
    // 11: fair queue (a job's team holds a bounded share of the workers); side effects of a
    // job keyed by its id, so a retried job cannot repeat them (an LLM reply is billed and
    // posted once per job); labs of a silent host wait (unreachable) to resume; the sync
    // epoch (a database that was sending before epochs continues the cloud's '' stream)
    r#"
ALTER TABLE jobs ADD COLUMN fair_key TEXT;
CREATE INDEX jobs_running_by_key ON jobs(fair_key) WHERE state = 'running' AND fair_key IS NOT NULL;
ALTER TABLE llm_usage ADD COLUMN job_id INTEGER;
ALTER TABLE llm_usage ADD COLUMN reply TEXT;
CREATE UNIQUE INDEX llm_usage_by_job ON llm_usage(job_id) WHERE job_id IS NOT NULL;
ALTER TABLE agent_messages ADD COLUMN job_id INTEGER;
CREATE UNIQUE INDEX agent_messages_by_job ON agent_messages(job_id) WHERE job_id IS NOT NULL;
ALTER TABLE allocations ADD COLUMN resume_to TEXT;
ALTER TABLE allocations ADD COLUMN unreachable_since_ms INTEGER;
CREATE TABLE sync_epochs (
    id INTEGER PRIMARY KEY,
    epoch TEXT NOT NULL UNIQUE,
    base INTEGER NOT NULL,
    started_ms INTEGER NOT NULL
);
INSERT INTO sync_epochs (epoch, base, started_ms)
    SELECT CASE WHEN EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox' AND seq > 0) THEN '' ELSE lower(hex(randomblob(16))) END, 0, 0;
CREATE TABLE sync_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#,
    // 12: the audit log as a hash chain (rows before it have no hash)
    r#"
ALTER TABLE audit_log ADD COLUMN hash TEXT;
"#,
];

/// Applies every migration newer than the database's `user_version`, each in its own
/// transaction. Refuses a database written by a newer LabRack.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    Ok(labrack_serving::sqlite::migrate(
        conn,
        "appliance",
        MIGRATIONS,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_from_empty_and_are_idempotent() {
        let mut conn = Connection::open_in_memory().expect("in-memory db");
        migrate(&mut conn).expect("first run");
        migrate(&mut conn).expect("second run is a no-op");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).expect("fits"));
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(tables, 29);
    }

    #[test]
    fn audit_log_rejects_update_and_delete() {
        let mut conn = Connection::open_in_memory().expect("in-memory db");
        migrate(&mut conn).expect("migrate");
        conn.execute(
            "INSERT INTO audit_log (at, actor, action) VALUES ('t', 'a', 'x')",
            [],
        )
        .expect("insert");
        assert!(
            conn.execute("UPDATE audit_log SET action = 'y'", [])
                .is_err()
        );
        assert!(conn.execute("DELETE FROM audit_log", []).is_err());
    }

    #[test]
    fn newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().expect("in-memory db");
        conn.pragma_update(None, "user_version", 999)
            .expect("set version");
        assert!(migrate(&mut conn).is_err());
    }
}
