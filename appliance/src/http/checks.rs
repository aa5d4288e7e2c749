//! Checks and scores over HTTP: staff queue a batch of check runs (a rejudge of a team, a
//! check or the whole event is one batch) and follow it; participants run their own
//! team's checks and see the visible ones; staff and judges see the live leaderboard.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Caller, Principal};
use super::extract::{ApiJson, ApiPath};
use super::problem::Problem;
use crate::audit;
use crate::checks::{self, BatchQueued, BatchRequest};
use crate::error::Error;
use labrack_provisioner::roles;

/// A team may ask for its checks again this often.
const TEAM_RUN_INTERVAL_MS: i64 = 30_000;
/// A team's own request runs before a staff rejudge wave.
const TEAM_PRIORITY: i64 = 10;
const RUN_STATES: [&str; 6] = [
    "queued",
    "running",
    "passed",
    "failed",
    "error",
    "cancelled",
];

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunChecks {
    /// one team of the event; every team when absent
    pub team_id: Option<i64>,
    /// one check by name; every check of each team's template when absent
    #[schema(max_length = 128)]
    pub check: Option<String>,
    /// why (shown in the queue), e.g. "rejudge after fixing the script"; default "rejudge"
    #[schema(max_length = 200)]
    pub reason: Option<String>,
}

/// Queues a batch of check runs for the event's teams (a rejudge is one batch).
#[utoipa::path(post, path = "/v1/events/{event_id}/check-batches", tag = "checks", params(("event_id" = i64, Path)), request_body = RunChecks,
    responses((status = 201, body = BatchQueued), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn queue_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(body): ApiJson<RunChecks>,
) -> Result<(StatusCode, Json<BatchQueued>), Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let reason = match body.reason {
        Some(reason) => super::validate::name("reason", &reason, 200)?,
        None => "rejudge".to_owned(),
    };
    let check_name = match body.check {
        Some(name) => Some(super::validate::name("check", &name, 128)?),
        None => None,
    };
    let request = BatchRequest {
        event_id,
        team_id: body.team_id,
        check_name,
        reason,
        requested_by: caller.actor(),
        max_attempts: state.queue.attempts_for(crate::jobs::Work::RUN_CHECK),
        priority: 0,
    };
    let queued = state
        .db
        .writer()
        .write(move |conn| {
            let queued = checks::queue_batch(conn, &request, crate::clock::now_ms())?;
            let detail = serde_json::json!({"team_id": request.team_id, "check": request.check_name, "reason": request.reason,
                "queued": queued.queued, "skipped": queued.skipped.len()});
            audit::record(conn, &caller.actor(), &caller.meta, "checks.queued", Some(&format!("check_batch:{}", queued.batch_id)), detail)?;
            Ok::<_, Error>(queued)
        })
        .await?;
    state.wake_workers();
    Ok((StatusCode::CREATED, Json(queued)))
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct RunCounts {
    pub queued: u32,
    pub running: u32,
    pub passed: u32,
    pub failed: u32,
    pub error: u32,
    pub cancelled: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchView {
    pub id: i64,
    pub event_id: i64,
    pub reason: String,
    pub requested_by: String,
    pub team_id: Option<i64>,
    pub check: Option<String>,
    pub created_at: Option<String>,
    pub counts: RunCounts,
    /// every run has ended (with a result, an error or cancelled)
    pub done: bool,
}

/// A batch's progress.
#[utoipa::path(get, path = "/v1/check-batches/{batch_id}", tag = "checks", params(("batch_id" = i64, Path)),
    responses((status = 200, body = BatchView), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(batch_id): ApiPath<i64>,
) -> Result<Json<BatchView>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let view = state
        .db
        .read(move |conn| {
            #[allow(clippy::type_complexity)]
            let batch: Option<(i64, String, String, Option<i64>, Option<String>, i64)> = conn
                .query_row(
                    "SELECT event_id, reason, requested_by, team_id, check_name, created_ms FROM check_batches WHERE id = ?1",
                    [batch_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .optional()?;
            let Some((event_id, reason, requested_by, team_id, check, created_ms)) = batch else { return Err(Error::NotFound("check batch")) };
            let mut counts = RunCounts::default();
            let mut statement = conn.prepare_cached("SELECT state, count(*) FROM check_runs WHERE batch_id = ?1 GROUP BY state")?;
            let rows = statement.query_map([batch_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                match state.as_str() {
                    "queued" => counts.queued = n,
                    "running" => counts.running = n,
                    "passed" => counts.passed = n,
                    "failed" => counts.failed = n,
                    "error" => counts.error = n,
                    _ => counts.cancelled = n,
                }
            }
            let done = counts.queued == 0 && counts.running == 0;
            Ok(BatchView { id: batch_id, event_id, reason, requested_by, team_id, check, created_at: crate::clock::format_ms_opt(Some(created_ms)), counts, done })
        })
        .await?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    pub team_id: Option<i64>,
    pub batch_id: Option<i64>,
    /// queued, running, passed, failed, error or cancelled
    #[param(pattern = "^(queued|running|passed|failed|error|cancelled)$")]
    pub state: Option<String>,
    /// 1–1000, default 200; newest first
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    pub id: i64,
    pub batch_id: i64,
    pub team_id: i64,
    pub check: String,
    pub dimension: String,
    pub weight: u32,
    pub hidden: bool,
    pub state: String,
    /// the participant-facing reason when it did not pass
    pub message: Option<String>,
    /// captured output (staff and judges only; truncated on the host)
    pub output: Option<String>,
    pub exit_code: Option<i32>,
    pub timed_out: Option<bool>,
    pub duration_ms: Option<i64>,
    pub job_id: Option<i64>,
    pub created_at: Option<String>,
    pub finished_at: Option<String>,
}

/// Check runs of an event, newest first, with output.
#[utoipa::path(get, path = "/v1/events/{event_id}/check-runs", tag = "checks", params(("event_id" = i64, Path), RunsQuery),
    responses((status = 200, body = [RunView]), (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<RunView>>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(200);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit", "limit must be between 1 and 1000"));
    }
    if let Some(wanted) = &query.state
        && !RUN_STATES.contains(&wanted.as_str())
    {
        return Err(Error::invalid(
            "state",
            format!("state must be one of {}", RUN_STATES.join(", ")),
        ));
    }
    let runs = state
        .db
        .read(move |conn| {
            let exists: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1)", [event_id], |r| r.get(0))?;
            if !exists {
                return Err(Error::NotFound("event"));
            }
            let mut statement = conn.prepare_cached(
                "SELECT id, batch_id, team_id, check_name, dimension, weight, hidden, state, message, output, exit_code, timed_out,
                        duration_ms, job_id, created_ms, finished_ms
                 FROM check_runs WHERE event_id = ?1 AND (?2 IS NULL OR team_id = ?2) AND (?3 IS NULL OR batch_id = ?3)
                   AND (?4 IS NULL OR state = ?4)
                 ORDER BY id DESC LIMIT ?5",
            )?;
            let rows = statement.query_map(params![event_id, query.team_id, query.batch_id, query.state, limit], |r| {
                Ok(RunView {
                    id: r.get(0)?,
                    batch_id: r.get(1)?,
                    team_id: r.get(2)?,
                    check: r.get(3)?,
                    dimension: r.get(4)?,
                    weight: r.get(5)?,
                    hidden: r.get(6)?,
                    state: r.get(7)?,
                    message: r.get(8)?,
                    output: r.get(9)?,
                    exit_code: r.get(10)?,
                    timed_out: r.get(11)?,
                    duration_ms: r.get(12)?,
                    job_id: r.get(13)?,
                    created_at: crate::clock::format_ms_opt(r.get(14)?),
                    finished_at: crate::clock::format_ms_opt(r.get(15)?),
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(runs))
}

fn participant(caller: &Caller) -> Result<(i64, i64), Error> {
    match &caller.principal {
        Principal::Participant {
            team_id, event_id, ..
        } => Ok((*team_id, *event_id)),
        Principal::Staff { .. } => Err(Error::forbidden(
            "only participants have team checks; staff queue check batches",
        )),
    }
}

/// A team runs its own lab's checks (at most every 30 s, and not while some still run).
#[utoipa::path(post, path = "/v1/me/checks/run", tag = "checks",
    responses((status = 201, body = BatchQueued), (status = 403, body = Problem), (status = 409, body = Problem), (status = 429, body = Problem)))]
pub async fn run_mine(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<(StatusCode, Json<BatchQueued>), Error> {
    let (team_id, event_id) = participant(&caller)?;
    let max_attempts = state.queue.attempts_for(crate::jobs::Work::RUN_CHECK);
    let queued = state
        .db
        .writer()
        .write(move |conn| {
            let now = crate::clock::now_ms();
            let event_state: String = conn.query_row("SELECT state FROM events WHERE id = ?1", [event_id], |r| r.get(0))?;
            if !matches!(event_state.as_str(), "live" | "frozen") {
                return Err(Error::conflict(Some("state"), format!("checks run while the event is live; it is {event_state}")));
            }
            let busy: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM check_runs WHERE team_id = ?1 AND state IN ('queued', 'running'))",
                [team_id],
                |r| r.get(0),
            )?;
            if busy {
                return Err(Error::conflict(None, "your checks are still running; wait for their results"));
            }
            let last: Option<i64> =
                conn.query_row("SELECT max(created_ms) FROM check_batches WHERE team_id = ?1 AND reason = 'team request'", [team_id], |r| r.get(0))?;
            if let Some(last) = last.filter(|at| now - at < TEAM_RUN_INTERVAL_MS) {
                let wait = (TEAM_RUN_INTERVAL_MS - (now - last)).max(1000) / 1000;
                return Err(Error::RateLimited { retry_after_secs: u64::try_from(wait).unwrap_or(30) });
            }
            let request = BatchRequest {
                event_id,
                team_id: Some(team_id),
                check_name: None,
                reason: "team request".into(),
                requested_by: caller.actor(),
                max_attempts,
                priority: TEAM_PRIORITY,
            };
            let queued = checks::queue_batch(conn, &request, now)?;
            if queued.queued == 0 {
                let why = queued.skipped.first().map_or_else(|| "nothing to run".to_owned(), |s| s.reason.clone());
                return Err(Error::conflict(None, format!("no checks to run: {why}")));
            }
            audit::record(conn, &caller.actor(), &caller.meta, "checks.queued", Some(&format!("check_batch:{}", queued.batch_id)),
                serde_json::json!({"team_id": team_id, "reason": "team request", "queued": queued.queued}))?;
            Ok(queued)
        })
        .await?;
    state.wake_workers();
    Ok((StatusCode::CREATED, Json(queued)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyCheck {
    pub name: String,
    pub dimension: String,
    pub weight: u32,
    /// the latest run's state; `not_run` before the first
    pub state: String,
    /// why it did not pass (the script's `FAIL:` line)
    pub message: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyChecks {
    pub checks: Vec<MyCheck>,
    /// hidden checks also count; their names and results are not shown
    pub hidden_checks: u32,
    /// points from the visible checks that passed
    pub visible_points: u64,
    /// some of the team's checks are queued or running
    pub running: bool,
}

/// The team's visible checks with their latest results.
#[utoipa::path(get, path = "/v1/me/checks", tag = "checks", responses((status = 200, body = MyChecks), (status = 403, body = Problem)))]
pub async fn my_checks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<MyChecks>, Error> {
    let (team_id, _) = participant(&caller)?;
    let view = state
        .db
        .read(move |conn| {
            let template: Option<String> = conn
                .query_row("SELECT template FROM allocations WHERE team_id = ?1 AND state <> 'released'", [team_id], |r| r.get(0))
                .optional()?;
            let stored: Option<String> = match &template {
                Some(name) => conn.query_row("SELECT checks FROM lab_templates WHERE name = ?1", [name], |r| r.get(0)).optional()?,
                None => None,
            };
            let defined: Vec<serde_json::Value> = stored.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
            let mut checks = Vec::new();
            let mut hidden_checks = 0;
            let mut visible_points = 0;
            for check in &defined {
                if check["hidden"].as_bool().unwrap_or(false) {
                    hidden_checks += 1;
                    continue;
                }
                let name = check["name"].as_str().unwrap_or_default().to_owned();
                let latest: Option<(String, Option<String>, Option<i64>)> = conn
                    .query_row(
                        "SELECT state, message, finished_ms FROM check_runs WHERE team_id = ?1 AND check_name = ?2 COLLATE NOCASE
                         ORDER BY id DESC LIMIT 1",
                        params![team_id, name],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let weight = u32::try_from(check["weight"].as_u64().unwrap_or(0)).unwrap_or(0);
                let (state, message, finished) = latest.unwrap_or_else(|| ("not_run".into(), None, None));
                if state == "passed" {
                    visible_points += u64::from(weight);
                }
                checks.push(MyCheck {
                    name,
                    dimension: check["dimension"].as_str().unwrap_or_default().to_owned(),
                    weight,
                    state,
                    message,
                    finished_at: crate::clock::format_ms_opt(finished),
                });
            }
            let running: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM check_runs WHERE team_id = ?1 AND state IN ('queued', 'running'))",
                [team_id],
                |r| r.get(0),
            )?;
            Ok::<_, Error>(MyChecks { checks, hidden_checks, visible_points, running })
        })
        .await?;
    Ok(Json(view))
}
