"""Schemathesis hooks for `cargo xtask test`'s API fuzzing of a running `labrack serve`.

Two checks of our own run beside schemathesis's:

- every refused request (4xx) changed nothing: the database is read before and right after
  each call, and the two must be equal outside the audit rows that record refusals;
- every error is an RFC 9457 problem document naming its status.

The run uses one worker, so no other request writes between the two reads; the appliance's
own job workers may (a queued job leased, retried or finished, for a request accepted
earlier), so a job's progress columns are not compared, only that no job was added or
removed; and what a job writes as its result (an agent's answer, its model use) is the
job's, so rows with a job_id are left out (a refused request that queued a job shows as
that job). Set LABRACK_DB to the appliance's database file (opened read-only; the appliance
keeps it in WAL mode).
"""

import json
import os
import sqlite3

import schemathesis

DB_PATH = os.environ["LABRACK_DB"]

# lab templates and rubrics are TOML files: send the generated text as it is
schemathesis.serializer.alias("application/toml", "text/plain")

# What a refused request may still write: the audit rows recording the refusal (and their
# copies on the way to the cloud). `labrack::audit::REFUSAL_AUDITS`; a test there keeps the two
# lists equal.
REFUSAL_AUDITS = [
    "auth.login_failed",
    "auth.lockout",
    "participant.join_failed",
    "participant.join_lockout",
    "host.enrol_failed",
    "host.enrol_lockout",
    "terminal.ticket_refused",
    "desktop.ticket_refused",
]

# The tables holding what users made. Sessions are left out on purpose: reading a session
# refreshes its last-seen time.
TABLES = [
    "staff", "events", "teams", "participants", "audit_log", "hosts", "enrolment_tokens",
    "lab_templates", "lab_template_source", "allocations", "host_tasks", "jobs", "check_batches",
    "check_runs", "rubrics", "judge_scores", "submissions", "hints", "score_adjustments",
    "llm_usage", "agent_messages", "alerts", "outbox", "billing_ledger", "announcements",
    "sync_epochs", "sync_state",
]


# Columns a job worker changes as it works through a queued job: not the request's doing.
JOB_COLUMNS = "id, kind, payload, idempotency_key, priority, max_attempts, created_ms"


def snapshot():
    refusals = ", ".join("'" + a.replace("'", "''") + "'" for a in REFUSAL_AUDITS) or "''"
    connection = sqlite3.connect(f"file:{DB_PATH}?mode=ro", uri=True, timeout=30)
    try:
        rows = []
        for table in TABLES:
            where = ""
            if table == "audit_log":
                where = f"WHERE action NOT IN ({refusals})"
            elif table in ("agent_messages", "llm_usage"):
                where = "WHERE job_id IS NULL"
            elif table == "outbox":
                where = f"WHERE NOT (kind = 'audit' AND json_extract(body, '$.action') IN ({refusals}))"
            columns = JOB_COLUMNS if table == "jobs" else "*"
            for row in connection.execute(f"SELECT {columns} FROM {table} {where} ORDER BY rowid"):
                rows.append((table, row))
        return rows
    finally:
        connection.close()


_BEFORE = {}
_AFTER = {}


@schemathesis.hook
def before_call(context, case, kwargs):
    _BEFORE[id(case)] = snapshot()


@schemathesis.hook
def after_call(context, case, response):
    # read right away: checks that run next may send requests of their own
    if id(case) in _BEFORE:
        _AFTER[id(case)] = snapshot()


def _describe(before, after):
    gone = [r for r in before if r not in after]
    new = [r for r in after if r not in before]
    return f"rows removed or changed: {gone[:3]}; rows added or changed: {new[:3]}"


@schemathesis.check
def refused_requests_change_nothing(ctx, response, case):
    before = _BEFORE.pop(id(case), None)
    after = _AFTER.pop(id(case), None)
    if response.status_code < 400 or response.status_code >= 500 or before is None or after is None:
        return None
    if before != after:
        raise AssertionError(
            f"{case.method} {case.formatted_path} was refused with {response.status_code} "
            f"but changed the database: {_describe(before, after)}"
        )
    return None


@schemathesis.check
def errors_are_problem_documents(ctx, response, case):
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    if content_type.split(";")[0].strip().lower() != "application/problem+json":
        raise AssertionError(f"a {response.status_code} answered {content_type!r}, not application/problem+json")
    try:
        body = json.loads(response.content)
    except ValueError as error:
        raise AssertionError(f"a {response.status_code} problem document is not JSON: {error}") from error
    if body.get("status") != response.status_code:
        raise AssertionError(f"the problem document says status {body.get('status')!r}, the response {response.status_code}")
    for member in ("type", "title", "detail"):
        if not isinstance(body.get(member), str) or not body[member]:
            raise AssertionError(f"the problem document has no {member!r}: {body}")
    return None
