//! Hints, the AI assistant and what the agents say: organizers write hints (free or
//! costing points); a team unlocks one with an entry in the score ledger (never reversed
//! silently: only a staff correction, audited, with a reason); teams ask the hint agent
//! and read its answers; staff read alerts, commentary and LLM use.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Caller, Principal};
use super::extract::{ApiJson, ApiPath};
use super::problem::Problem;
use crate::audit;
use crate::error::Error;
use crate::jobs::{self, NewJob};
use labrack_provisioner::roles;

fn participant(caller: &Caller) -> Result<(i64, i64), Error> {
    match &caller.principal {
        Principal::Participant {
            team_id, event_id, ..
        } => Ok((*team_id, *event_id)),
        Principal::Staff { .. } => {
            Err(Error::forbidden("only participants do this for their team"))
        }
    }
}

fn require_running(conn: &Connection, event_id: i64, what: &str) -> Result<(), Error> {
    let state: String = conn
        .query_row("SELECT state FROM events WHERE id = ?1", [event_id], |r| {
            r.get(0)
        })
        .optional()?
        .ok_or(Error::NotFound("event"))?;
    if !matches!(state.as_str(), "live" | "frozen") {
        return Err(Error::conflict(
            Some("state"),
            format!("{what} while the event is live; it is {state}"),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHint {
    #[schema(max_length = 120)]
    pub title: String,
    #[schema(max_length = 4000)]
    pub body: String,
    /// points it costs to unlock (0: free), at most 1000
    #[schema(maximum = 1000)]
    pub cost: u32,
    /// the check it helps with, if any
    #[schema(max_length = 128)]
    pub check: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HintView {
    pub id: i64,
    pub title: String,
    pub cost: u32,
    pub check: Option<String>,
    /// staff always; a team once it unlocked the hint
    pub body: Option<String>,
    /// for a team: whether it unlocked this hint; for staff: how many teams did
    pub unlocked: bool,
    pub unlocked_by_teams: Option<u32>,
}

/// Adds a hint to the event.
#[utoipa::path(post, path = "/v1/events/{event_id}/hints", tag = "assist", params(("event_id" = i64, Path)), request_body = NewHint,
    responses((status = 201, body = HintView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn create_hint(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(body): ApiJson<NewHint>,
) -> Result<(StatusCode, Json<HintView>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let title = super::validate::name("title", &body.title, 120)?;
    let text = super::validate::name("body", &body.body, 4000)?;
    if body.cost > 1000 {
        return Err(Error::invalid("cost", "at most 1000 points"));
    }
    let check = match body.check {
        Some(check) => Some(super::validate::name("check", &check, 128)?),
        None => None,
    };
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let exists: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1)", [event_id], |r| r.get(0))?;
            if !exists {
                return Err(Error::NotFound("event"));
            }
            conn.execute(
                "INSERT INTO hints (event_id, title, body, cost, check_name, created_by, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![event_id, title, text, body.cost, check, caller.actor(), crate::clock::now_ms()],
            )?;
            let id = conn.last_insert_rowid();
            audit::record(conn, &caller.actor(), &caller.meta, "hint.created", Some(&format!("hint:{id}")), serde_json::json!({"title": title, "cost": body.cost}))?;
            Ok(HintView { id, title, cost: body.cost, check, body: Some(text), unlocked: false, unlocked_by_teams: Some(0) })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The event's hints with how many teams unlocked each (staff and judges).
#[utoipa::path(get, path = "/v1/events/{event_id}/hints", tag = "assist", params(("event_id" = i64, Path)),
    responses((status = 200, body = [HintView]), (status = 403, body = Problem)))]
pub async fn list_hints(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Vec<HintView>>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let hints = state
        .db
        .read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT h.id, h.title, h.cost, h.check_name, h.body,
                        (SELECT count(*) FROM score_adjustments a WHERE a.hint_id = h.id AND a.kind = 'hint')
                 FROM hints h WHERE h.event_id = ?1 ORDER BY h.id",
            )?;
            let rows = statement.query_map([event_id], |r| {
                Ok(HintView {
                    id: r.get(0)?,
                    title: r.get(1)?,
                    cost: r.get(2)?,
                    check: r.get(3)?,
                    body: r.get(4)?,
                    unlocked: false,
                    unlocked_by_teams: r.get(5)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(hints))
}

fn team_hints(conn: &Connection, event_id: i64, team_id: i64) -> Result<Vec<HintView>, Error> {
    let mut statement = conn.prepare_cached(
        "SELECT h.id, h.title, h.cost, h.check_name, h.body,
                EXISTS(SELECT 1 FROM score_adjustments a WHERE a.hint_id = h.id AND a.team_id = ?2 AND a.kind = 'hint')
         FROM hints h WHERE h.event_id = ?1 ORDER BY h.id",
    )?;
    let rows = statement.query_map(params![event_id, team_id], |r| {
        let unlocked: bool = r.get(5)?;
        Ok(HintView {
            id: r.get(0)?,
            title: r.get(1)?,
            cost: r.get(2)?,
            check: r.get(3)?,
            body: if unlocked { r.get(4)? } else { None },
            unlocked,
            unlocked_by_teams: None,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
}

/// The team's hints: titles and costs, and the text of those it unlocked.
#[utoipa::path(get, path = "/v1/me/hints", tag = "assist", responses((status = 200, body = [HintView]), (status = 403, body = Problem)))]
pub async fn my_hints(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<HintView>>, Error> {
    let (team_id, event_id) = participant(&caller)?;
    Ok(Json(
        state
            .db
            .read(move |conn| team_hints(conn, event_id, team_id))
            .await?,
    ))
}

/// Unlocks a hint for the team: its cost goes into the score ledger once (unlocking again
/// changes nothing).
#[utoipa::path(post, path = "/v1/me/hints/{hint_id}/unlock", tag = "assist", params(("hint_id" = i64, Path)),
    responses((status = 200, body = HintView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn unlock_hint(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(hint_id): ApiPath<i64>,
) -> Result<Json<HintView>, Error> {
    let (team_id, event_id) = participant(&caller)?;
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let hint: Option<(String, u32)> = conn
                .query_row("SELECT title, cost FROM hints WHERE id = ?1 AND event_id = ?2", params![hint_id, event_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (title, cost) = hint.ok_or(Error::NotFound("hint"))?;
            let unlocked: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM score_adjustments WHERE hint_id = ?1 AND team_id = ?2 AND kind = 'hint')",
                params![hint_id, team_id],
                |r| r.get(0),
            )?;
            if !unlocked {
                require_running(conn, event_id, "hints are unlocked")?;
                conn.execute(
                    "INSERT INTO score_adjustments (event_id, team_id, points, kind, hint_id, reason, actor, created_ms) VALUES (?1, ?2, ?3, 'hint', ?4, ?5, ?6, ?7)",
                    params![event_id, team_id, -f64::from(cost), hint_id, format!("hint unlocked: {title}"), caller.actor(), crate::clock::now_ms()],
                )?;
                let adjustment = conn.last_insert_rowid();
                audit::record(conn, &caller.actor(), &caller.meta, "hint.unlocked", Some(&format!("hint:{hint_id}")), serde_json::json!({"team_id": team_id, "cost": cost}))?;
                let now = crate::clock::now_ms();
                crate::outbox::append(conn, crate::outbox::Change::ScoreAdjustment, &format!("score_adjustment:{adjustment}"),
                    &serde_json::json!({"id": adjustment, "event_id": event_id, "team_id": team_id, "points": -f64::from(cost), "kind": "hint", "at_ms": now}), now)?;
                // The billing ledger keeps hint unlocks too (points, no money).
                let actor = caller.actor();
                crate::billing::append(conn, &crate::billing::NewEntry {
                    event_id,
                    team_id: Some(team_id),
                    kind: "hint",
                    quantity: f64::from(cost),
                    unit: "points",
                    amount_cents: 0,
                    reference: Some(format!("hint:{hint_id}:team:{team_id}")),
                    note: format!("hint unlocked: {title}"),
                    actor: &actor,
                }, now)?;
            }
            team_hints(conn, event_id, team_id)?.into_iter().find(|h| h.id == hint_id).ok_or(Error::NotFound("hint"))
        })
        .await?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Correction {
    /// points added (negative: taken away), −1000 to 1000, not 0
    #[schema(minimum = -1000, maximum = 1000)]
    pub points: f64,
    /// why; shown in the ledger
    #[schema(max_length = 500)]
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEntry {
    pub id: i64,
    pub team_id: i64,
    pub points: f64,
    pub kind: String,
    pub reason: String,
    pub actor: String,
    pub at: String,
}

fn ledger(conn: &Connection, team_id: i64) -> Result<Vec<LedgerEntry>, Error> {
    let mut statement =
        conn.prepare_cached("SELECT id, team_id, points, kind, reason, actor, created_ms FROM score_adjustments WHERE team_id = ?1 ORDER BY id")?;
    let rows = statement.query_map([team_id], |r| {
        Ok(LedgerEntry {
            id: r.get(0)?,
            team_id: r.get(1)?,
            points: r.get(2)?,
            kind: r.get(3)?,
            reason: r.get(4)?,
            actor: r.get(5)?,
            at: crate::clock::format_ms_or_empty(r.get(6)?),
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
}

/// Adds a correction to a team's score ledger (the only way to undo a hint's cost).
#[utoipa::path(post, path = "/v1/teams/{team_id}/score-ledger", tag = "assist", params(("team_id" = i64, Path)), request_body = Correction,
    responses((status = 201, body = [LedgerEntry]), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn correct(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
    ApiJson(body): ApiJson<Correction>,
) -> Result<(StatusCode, Json<Vec<LedgerEntry>>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    if !body.points.is_finite() || body.points == 0.0 || body.points.abs() > 1000.0 {
        return Err(Error::invalid(
            "points",
            "must be between -1000 and 1000 and not 0",
        ));
    }
    let reason = super::validate::name("reason", &body.reason, 500)?;
    if reason.chars().count() < 3 {
        return Err(Error::invalid("reason", "say why (at least 3 characters)"));
    }
    let entries = state
        .db
        .writer()
        .write(move |conn| {
            let event_id: i64 =
                conn.query_row("SELECT event_id FROM teams WHERE id = ?1", [team_id], |r| r.get(0)).optional()?.ok_or(Error::NotFound("team"))?;
            conn.execute(
                "INSERT INTO score_adjustments (event_id, team_id, points, kind, reason, actor, created_ms) VALUES (?1, ?2, ?3, 'correction', ?4, ?5, ?6)",
                params![event_id, team_id, body.points, reason, caller.actor(), crate::clock::now_ms()],
            )?;
            let adjustment = conn.last_insert_rowid();
            audit::record(conn, &caller.actor(), &caller.meta, "score.corrected", Some(&format!("team:{team_id}")), serde_json::json!({"points": body.points, "reason": reason}))?;
            let now = crate::clock::now_ms();
            crate::outbox::append(conn, crate::outbox::Change::ScoreAdjustment, &format!("score_adjustment:{adjustment}"),
                &serde_json::json!({"id": adjustment, "event_id": event_id, "team_id": team_id, "points": body.points, "kind": "correction", "reason": reason, "at_ms": now}), now)?;
            ledger(conn, team_id)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(entries)))
}

/// A team's score ledger (hint costs and corrections).
#[utoipa::path(get, path = "/v1/teams/{team_id}/score-ledger", tag = "assist", params(("team_id" = i64, Path)),
    responses((status = 200, body = [LedgerEntry]), (status = 403, body = Problem)))]
pub async fn get_ledger(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
) -> Result<Json<Vec<LedgerEntry>>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    Ok(Json(
        state.db.read(move |conn| ledger(conn, team_id)).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// what the team wants help with, 1–1000 characters
    #[schema(max_length = 1000)]
    pub question: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QuestionQueued {
    pub job_id: i64,
}

/// The team asks the hint agent; the answer arrives in its messages.
#[utoipa::path(post, path = "/v1/me/assistant", tag = "assist", request_body = Question,
    responses((status = 202, body = QuestionQueued), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn ask(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Question>,
) -> Result<(StatusCode, Json<QuestionQueued>), Error> {
    let (team_id, event_id) = participant(&caller)?;
    let question = super::validate::name("question", &body.question, 1000)?;
    let attempts = state.queue.attempts_for(crate::jobs::Work::AGENT_HINT);
    let job_id = state
        .db
        .writer()
        .write(move |conn| {
            require_running(conn, event_id, "the assistant answers")?;
            let pending: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE kind = ?1 AND state IN ('queued', 'running') AND json_extract(payload, '$.team_id') = ?2)",
                params![crate::jobs::Work::AGENT_HINT, team_id],
                |r| r.get(0),
            )?;
            if pending {
                return Err(Error::conflict(None, "your previous question is still being answered"));
            }
            let job = NewJob {
                priority: 1,
                max_attempts: attempts,
                ..NewJob::work(&crate::jobs::Work::AgentHint(crate::jobs::AgentHint { event_id, team_id, question: question.clone() }))
                    .for_team(team_id)
            };
            let (id, _) = jobs::enqueue(conn, &job, crate::clock::now_ms())?;
            audit::record(conn, &caller.actor(), &caller.meta, "assistant.asked", Some(&format!("team:{team_id}")), serde_json::json!({"job_id": id}))?;
            Ok::<_, Error>(id)
        })
        .await?;
    state.wake_workers();
    Ok((StatusCode::ACCEPTED, Json(QuestionQueued { job_id })))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentMessage {
    pub id: i64,
    pub team_id: Option<i64>,
    pub agent: String,
    /// `llm` (a model wrote it) or `rules`
    pub source: String,
    pub body: String,
    pub at: String,
}

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentMessage> {
    Ok(AgentMessage {
        id: r.get(0)?,
        team_id: r.get(1)?,
        agent: r.get(2)?,
        source: r.get(3)?,
        body: r.get(4)?,
        at: crate::clock::format_ms_or_empty(r.get(5)?),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyMessages {
    pub messages: Vec<AgentMessage>,
    /// whether a language model is configured (else the agents answer by rule)
    pub model_configured: bool,
    pub token_budget: u64,
    pub tokens_used: u64,
}

/// The agents' messages to the team, newest first, and its AI budget.
#[utoipa::path(get, path = "/v1/me/messages", tag = "assist", responses((status = 200, body = MyMessages), (status = 403, body = Problem)))]
pub async fn my_messages(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<MyMessages>, Error> {
    let (team_id, _) = participant(&caller)?;
    let messages = state
        .db
        .read(move |conn| {
            conn.prepare_cached(
                "SELECT id, team_id, agent, source, body, created_ms FROM agent_messages WHERE team_id = ?1 ORDER BY id DESC LIMIT 100",
            )?
            .query_map([team_id], row_to_message)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::from)
        })
        .await?;
    let tokens_used = state
        .llm
        .used(&state.db, team_id)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Json(MyMessages {
        messages,
        model_configured: state.llm.configured(),
        token_budget: state.llm.team_budget(),
        tokens_used,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AgentQuery {
    /// hint, commentary
    #[param(pattern = "^(hint|commentary)$")]
    pub agent: Option<String>,
}

/// The agents' messages of an event, newest first (staff and judges).
#[utoipa::path(get, path = "/v1/events/{event_id}/agent-messages", tag = "assist", params(("event_id" = i64, Path), AgentQuery),
    responses((status = 200, body = [AgentMessage]), (status = 403, body = Problem)))]
pub async fn event_messages(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    query: Result<Query<AgentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AgentMessage>>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let Query(query) = query?;
    if query
        .agent
        .as_deref()
        .is_some_and(|agent| !matches!(agent, "hint" | "commentary"))
    {
        return Err(Error::invalid(
            "agent",
            "agent must be `hint` or `commentary`",
        ));
    }
    let messages = state
        .db
        .read(move |conn| {
            conn.prepare_cached(
                "SELECT id, team_id, agent, source, body, created_ms FROM agent_messages WHERE event_id = ?1 AND (?2 IS NULL OR agent = ?2)
                 ORDER BY id DESC LIMIT 200",
            )?
            .query_map(params![event_id, query.agent], row_to_message)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::from)
        })
        .await?;
    Ok(Json(messages))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Alert {
    pub id: i64,
    pub team_id: Option<i64>,
    pub kind: String,
    pub detail: String,
    pub at: String,
}

/// The live observer's alerts, newest first (staff).
#[utoipa::path(get, path = "/v1/events/{event_id}/alerts", tag = "assist", params(("event_id" = i64, Path)),
    responses((status = 200, body = [Alert]), (status = 403, body = Problem)))]
pub async fn alerts(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Vec<Alert>>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let alerts = state
        .db
        .read(move |conn| {
            conn.prepare_cached("SELECT id, team_id, kind, detail, created_ms FROM alerts WHERE event_id = ?1 ORDER BY id DESC LIMIT 200")?
                .query_map([event_id], |r| Ok(Alert { id: r.get(0)?, team_id: r.get(1)?, kind: r.get(2)?, detail: r.get(3)?, at: crate::clock::format_ms_or_empty(r.get(4)?) }))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::from)
        })
        .await?;
    Ok(Json(alerts))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenUse {
    /// none: the platform's own use (commentary)
    pub team_id: Option<i64>,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// LLM tokens used per team (for billing).
#[utoipa::path(get, path = "/v1/events/{event_id}/llm-usage", tag = "assist", params(("event_id" = i64, Path)),
    responses((status = 200, body = [TokenUse]), (status = 403, body = Problem)))]
pub async fn llm_usage(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Vec<TokenUse>>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let usage = state
        .db
        .read(move |conn| {
            conn.prepare_cached(
                "SELECT team_id, count(*), sum(prompt_tokens), sum(completion_tokens) FROM llm_usage WHERE event_id = ?1 GROUP BY team_id ORDER BY team_id",
            )?
            .query_map([event_id], |r| Ok(TokenUse { team_id: r.get(0)?, calls: r.get(1)?, prompt_tokens: r.get(2)?, completion_tokens: r.get(3)? }))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::from)
        })
        .await?;
    Ok(Json(usage))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAnnouncement {
    /// what every participant of the event sees, 1–1000 characters
    #[schema(max_length = 1000)]
    pub text: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Announcement {
    pub id: i64,
    pub text: String,
    pub author: String,
    pub at: String,
}

fn announcements_of(conn: &Connection, event_id: i64) -> Result<Vec<Announcement>, Error> {
    conn.prepare_cached("SELECT id, body, author, created_ms FROM announcements WHERE event_id = ?1 ORDER BY id DESC LIMIT 100")?
        .query_map([event_id], |r| Ok(Announcement { id: r.get(0)?, text: r.get(1)?, author: r.get(2)?, at: crate::clock::format_ms_or_empty(r.get(3)?) }))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)
}

/// Broadcasts an announcement to the event's participants (their team page shows it).
#[utoipa::path(post, path = "/v1/events/{event_id}/announcements", tag = "assist", params(("event_id" = i64, Path)), request_body = NewAnnouncement,
    responses((status = 201, body = Announcement), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn announce(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(body): ApiJson<NewAnnouncement>,
) -> Result<(StatusCode, Json<Announcement>), Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let text = super::validate::name("text", &body.text, 1000)?;
    let announcement = state
        .db
        .writer()
        .write(move |conn| {
            let exists: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1)", [event_id], |r| r.get(0))?;
            if !exists {
                return Err(Error::NotFound("event"));
            }
            let now = crate::clock::now_ms();
            let author = caller.actor();
            conn.execute("INSERT INTO announcements (event_id, body, author, created_ms) VALUES (?1, ?2, ?3, ?4)", params![event_id, text, author, now])?;
            let id = conn.last_insert_rowid();
            audit::record(conn, &author, &caller.meta, "announcement.sent", Some(&format!("event:{event_id}")), serde_json::json!({"id": id}))?;
            Ok(Announcement { id, text, author, at: crate::clock::format_ms_or_empty(now) })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(announcement)))
}

/// The event's announcements, newest first (staff and judges).
#[utoipa::path(get, path = "/v1/events/{event_id}/announcements", tag = "assist", params(("event_id" = i64, Path)),
    responses((status = 200, body = [Announcement]), (status = 403, body = Problem)))]
pub async fn list_announcements(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Vec<Announcement>>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    Ok(Json(
        state
            .db
            .read(move |conn| announcements_of(conn, event_id))
            .await?,
    ))
}

/// The announcements of the participant's event, newest first.
#[utoipa::path(get, path = "/v1/me/announcements", tag = "assist", responses((status = 200, body = [Announcement]), (status = 403, body = Problem)))]
pub async fn my_announcements(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Announcement>>, Error> {
    let (_, event_id) = participant(&caller)?;
    Ok(Json(
        state
            .db
            .read(move |conn| announcements_of(conn, event_id))
            .await?,
    ))
}
