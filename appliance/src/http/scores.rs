//! Rubrics, judges' scores, submissions and the boards: the live leaderboard for staff and
//! judges, and the public scoreboard for the venue's projector (frozen during a freeze,
//! live over server-sent events).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Caller, Principal};
use super::extract::{ApiJson, ApiPath};
use super::labs::TomlBody;
use super::problem::Problem;
use crate::audit;
use crate::clock::now_rfc3339;
use crate::error::{Error, RowError};
use crate::jobs::{self, NewJob};
use crate::rubric::{self, Rubric};
use crate::scores::{self, BoardError, Leaderboard};
use labrack_provisioner::roles;

/// The job that turns a submission into check runs.
/// A team submits a new version at most this often.
const SUBMISSION_INTERVAL_MS: i64 = 10_000;

impl From<BoardError> for Error {
    fn from(error: BoardError) -> Self {
        match error {
            BoardError::Sqlite(e) => e.into(),
            unknown @ BoardError::UnknownBracket(_) => {
                Error::invalid("bracket", unknown.to_string())
            }
        }
    }
}

fn event_state(conn: &Connection, event_id: i64) -> Result<(String, Option<i64>, String), Error> {
    conn.query_row(
        "SELECT state, frozen_at_ms, ends_at FROM events WHERE id = ?1",
        [event_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()?
    .ok_or(Error::NotFound("event"))
}

/// The event's rubric (the default five dimensions until one is uploaded).
#[utoipa::path(get, path = "/v1/events/{event_id}/rubric", tag = "scores", params(("event_id" = i64, Path)),
    responses((status = 200, body = Rubric), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_rubric(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Rubric>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let rubric = state
        .db
        .read(move |conn| {
            event_state(conn, event_id)?;
            Ok::<_, Error>(scores::rubric(conn, event_id)?)
        })
        .await?;
    Ok(Json(rubric))
}

/// Replaces the event's rubric with the uploaded TOML; a file with any error changes
/// nothing and every error names its line.
#[utoipa::path(put, path = "/v1/events/{event_id}/rubric", tag = "scores", params(("event_id" = i64, Path)),
    request_body(content = String, content_type = "application/toml"),
    responses((status = 200, body = Rubric), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn put_rubric(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    TomlBody(text): TomlBody,
) -> Result<Json<Rubric>, Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let rubric = state
        .db
        .writer()
        .write(move |conn| {
            event_state(conn, event_id)?;
            let teams: Vec<String> = conn
                .prepare_cached("SELECT lower(name) FROM teams WHERE event_id = ?1")?
                .query_map([event_id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let rubric = rubric::parse(&text, |name| teams.contains(&name.to_lowercase())).map_err(|errors| {
                Error::BadFile(errors.into_iter().map(|e| RowError { line: u64::try_from(e.line).unwrap_or(0), reason: e.message }).collect())
            })?;
            let json = serde_json::to_string(&rubric).map_err(|e| Error::Internal(e.to_string()))?;
            conn.execute(
                "INSERT INTO rubrics (event_id, toml, rubric, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (event_id) DO UPDATE SET toml = excluded.toml, rubric = excluded.rubric, updated_at = excluded.updated_at",
                params![event_id, text, json, now_rfc3339()],
            )?;
            let names: Vec<&str> = rubric.dimensions.iter().map(|d| d.name.as_str()).collect();
            audit::record(conn, &caller.actor(), &caller.meta, "rubric.replaced", Some(&format!("event:{event_id}")),
                serde_json::json!({"dimensions": names, "brackets": rubric.brackets.len()}))?;
            Ok::<_, Error>(rubric)
        })
        .await?;
    Ok(Json(rubric))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeScores {
    /// points per rubric dimension, 0 to the dimension's judge_max
    pub scores: BTreeMap<String, u32>,
    #[schema(max_length = 2000)]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JudgeScoreView {
    pub judge: String,
    pub dimension: String,
    pub points: u32,
    pub comment: Option<String>,
    pub at: String,
}

fn latest_judge_scores(conn: &Connection, team_id: i64) -> Result<Vec<JudgeScoreView>, Error> {
    let mut statement = conn.prepare_cached(
        "SELECT st.username, s.dimension, s.points, s.comment, s.created_ms FROM judge_scores s
         JOIN (SELECT max(id) AS id FROM judge_scores WHERE team_id = ?1 GROUP BY judge_id, dimension) latest ON latest.id = s.id
         JOIN staff st ON st.id = s.judge_id ORDER BY st.username, s.dimension",
    )?;
    let rows = statement.query_map([team_id], |r| {
        Ok(JudgeScoreView {
            judge: r.get(0)?,
            dimension: r.get(1)?,
            points: r.get(2)?,
            comment: r.get(3)?,
            at: crate::clock::format_ms_or_empty(r.get(4)?),
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
}

/// A judge scores a team in some of the rubric's dimensions (a later score replaces the
/// judge's earlier one; history is kept).
#[utoipa::path(post, path = "/v1/teams/{team_id}/judge-scores", tag = "scores", params(("team_id" = i64, Path)), request_body = JudgeScores,
    responses((status = 200, body = [JudgeScoreView]), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn put_judge_scores(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
    ApiJson(body): ApiJson<JudgeScores>,
) -> Result<Json<Vec<JudgeScoreView>>, Error> {
    let (judge_id, _) = caller.require_staff(&roles::JUDGES)?;
    if body.scores.is_empty() {
        return Err(Error::invalid(
            "scores",
            "give at least one dimension's points",
        ));
    }
    let comment = match body.comment {
        Some(comment) => Some(super::validate::name("comment", &comment, 2000)?),
        None => None,
    };
    let views = state
        .db
        .writer()
        .write(move |conn| {
            let event_id: i64 =
                conn.query_row("SELECT event_id FROM teams WHERE id = ?1", [team_id], |r| r.get(0)).optional()?.ok_or(Error::NotFound("team"))?;
            let (event, _, _) = event_state(conn, event_id)?;
            if matches!(event.as_str(), "draft" | "archived") {
                return Err(Error::conflict(Some("state"), format!("judges score while the event runs or has ended; it is {event}")));
            }
            let rubric = scores::rubric(conn, event_id)?;
            for (dimension, points) in &body.scores {
                let Some(rule) = rubric.dimension(dimension) else {
                    let known: Vec<&str> = rubric.dimensions.iter().map(|d| d.name.as_str()).collect();
                    return Err(Error::invalid("scores", format!("{dimension:?} is not a dimension of this event's rubric ({})", known.join(", "))));
                };
                if rule.judge_max == 0 {
                    return Err(Error::invalid("scores", format!("{dimension:?} is scored by checks only")));
                }
                if *points > rule.judge_max {
                    return Err(Error::invalid("scores", format!("{dimension:?} takes 0 to {} points; got {points}", rule.judge_max)));
                }
            }
            let now = crate::clock::now_ms();
            for (dimension, points) in &body.scores {
                conn.prepare_cached(
                    "INSERT INTO judge_scores (event_id, team_id, judge_id, dimension, points, comment, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![event_id, team_id, judge_id, dimension, points, comment, now])?;
                let id = conn.last_insert_rowid();
                crate::outbox::append(conn, crate::outbox::Change::JudgeScore, &format!("judge_score:{id}"),
                    &serde_json::json!({"id": id, "event_id": event_id, "team_id": team_id, "judge_id": judge_id, "dimension": dimension, "points": points, "at_ms": now}), now)?;
            }
            audit::record(conn, &caller.actor(), &caller.meta, "score.judged", Some(&format!("team:{team_id}")),
                serde_json::json!({"scores": body.scores, "comment": comment}))?;
            latest_judge_scores(conn, team_id)
        })
        .await?;
    Ok(Json(views))
}

/// Every judge's latest scores for a team.
#[utoipa::path(get, path = "/v1/teams/{team_id}/judge-scores", tag = "scores", params(("team_id" = i64, Path)),
    responses((status = 200, body = [JudgeScoreView]), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_judge_scores(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
) -> Result<Json<Vec<JudgeScoreView>>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let views = state
        .db
        .read(move |conn| {
            let exists: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM teams WHERE id = ?1)",
                [team_id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(Error::NotFound("team"));
            }
            latest_judge_scores(conn, team_id)
        })
        .await?;
    Ok(Json(views))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BoardQuery {
    /// a bracket of the rubric: its teams only, ranked among themselves
    pub bracket: Option<String>,
}

/// The live leaderboard (staff and judges see it live even during a freeze).
#[utoipa::path(get, path = "/v1/events/{event_id}/leaderboard", tag = "scores", params(("event_id" = i64, Path), BoardQuery),
    responses((status = 200, body = Leaderboard), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn leaderboard(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    query: Result<Query<BoardQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Leaderboard>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let Query(query) = query?;
    let board = state
        .db
        .read(move |conn| {
            event_state(conn, event_id)?;
            scores::leaderboard(conn, event_id, None, query.bracket.as_deref()).map_err(Error::from)
        })
        .await?;
    Ok(Json(board))
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PublicBoard {
    pub event: String,
    pub state: String,
    /// the board stopped changing at this moment (a freeze); null when live
    pub frozen_at: Option<String>,
    pub board: Leaderboard,
}

fn public_board(
    conn: &Connection,
    event_id: i64,
    bracket: Option<&str>,
) -> Result<PublicBoard, Error> {
    let (state, frozen_at_ms, _) = event_state(conn, event_id)?;
    if state == "draft" {
        // Not published yet: look exactly like a missing event.
        return Err(Error::NotFound("event"));
    }
    let name: String =
        conn.query_row("SELECT name FROM events WHERE id = ?1", [event_id], |r| {
            r.get(0)
        })?;
    let as_of = frozen_at_ms.filter(|_| state == "frozen");
    let board = scores::leaderboard(conn, event_id, as_of, bracket)?;
    Ok(PublicBoard {
        event: name,
        state,
        frozen_at: as_of.map(crate::clock::format_ms_or_empty),
        board,
    })
}

/// The public board for (event, bracket), computed at most once a second for everyone.
async fn shared_board(
    state: &AppState,
    event_id: i64,
    bracket: Option<String>,
) -> Result<Arc<super::boards::Computed>, Error> {
    let wanted = bracket.clone();
    let db = state.db.clone();
    state
        .boards
        .get(event_id, bracket, move || async move {
            db.read(move |conn| public_board(conn, event_id, wanted.as_deref()))
                .await
        })
        .await
}

/// The public scoreboard for the venue's projector: no login; during a freeze it shows
/// the board as it was when the freeze began. Computed at most once a second.
#[utoipa::path(get, path = "/v1/events/{event_id}/scoreboard", tag = "scores", params(("event_id" = i64, Path), BoardQuery),
    responses((status = 200, body = PublicBoard), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn scoreboard(
    State(state): State<AppState>,
    ApiPath(event_id): ApiPath<i64>,
    query: Result<Query<BoardQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, Error> {
    use axum::response::IntoResponse as _;
    let Query(query) = query?;
    let computed = shared_board(&state, event_id, query.bracket).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        computed.json.to_string(),
    )
        .into_response())
}

/// The public scoreboard as server-sent events: `board` with the whole board at once and
/// whenever it changes. Each stream looks once a second at the shared board; at most
/// 3,000 streams in all and 16 per client (429 / 503 with `Retry-After` beyond).
#[utoipa::path(get, path = "/v1/events/{event_id}/scoreboard/stream", tag = "scores", params(("event_id" = i64, Path), BoardQuery),
    responses((status = 200, description = "text/event-stream of `board` events"), (status = 404, body = Problem), (status = 429, body = Problem), (status = 503, body = Problem)))]
pub async fn scoreboard_stream(
    State(state): State<AppState>,
    meta: super::extract::RequestMeta,
    ApiPath(event_id): ApiPath<i64>,
    query: Result<Query<BoardQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, Error> {
    let Query(query) = query?;
    let bracket = query.bracket;
    // Refuse a draft, unknown event or bracket up front with a problem document.
    let first = shared_board(&state, event_id, bracket.clone()).await?;
    let slot = state.boards.open_stream(&meta.client_key())?;
    let stream = futures_util::stream::unfold(
        (state, Some(first), 0_u64, bracket, slot),
        move |(state, mut next, last, bracket, slot)| async move {
            loop {
                let computed = match next.take() {
                    Some(computed) => computed,
                    None => {
                        let mut shutdown = state.shutdown.subscribe();
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.wait_for(|stop| *stop) => return None,
                        }
                        match shared_board(&state, event_id, bracket.clone()).await {
                            Ok(computed) => computed,
                            Err(_) => return None,
                        }
                    }
                };
                if computed.version != last {
                    let event = SseEvent::default().event("board").data(&*computed.json);
                    return Some((Ok(event), (state, None, computed.version, bracket, slot)));
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubmission {
    /// what is submitted: a commit, a tag or a label, 1–100 characters; submitting the
    /// same version again returns the first submission
    #[schema(max_length = 100)]
    pub version: String,
    #[schema(max_length = 500)]
    pub note: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Submission {
    pub id: i64,
    pub team_id: i64,
    pub version: String,
    pub note: Option<String>,
    pub submitted_at: String,
    pub submitted_by: i64,
}

fn row_to_submission(r: &rusqlite::Row<'_>) -> rusqlite::Result<Submission> {
    Ok(Submission {
        id: r.get(0)?,
        team_id: r.get(1)?,
        version: r.get(2)?,
        note: r.get(3)?,
        submitted_at: crate::clock::format_ms_or_empty(r.get(4)?),
        submitted_by: r.get(5)?,
    })
}

/// The team submits a version before the deadline (the event's end); its checks run.
#[utoipa::path(post, path = "/v1/me/submissions", tag = "scores", request_body = NewSubmission,
    responses((status = 201, body = Submission), (status = 200, body = Submission, description = "this version was already submitted"),
        (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem),
        (status = 429, body = Problem, description = "the team submitted less than 10 s ago")))]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewSubmission>,
) -> Result<(StatusCode, Json<Submission>), Error> {
    let Principal::Participant {
        id: participant_id,
        team_id,
        event_id,
        ..
    } = caller.principal
    else {
        return Err(Error::forbidden("only participants submit for their team"));
    };
    let version = super::validate::name("version", &body.version, 100)?;
    let note = match body.note {
        Some(note) => Some(super::validate::name("note", &note, 500)?),
        None => None,
    };
    let attempts = state
        .queue
        .attempts_for(crate::jobs::Work::SCORE_SUBMISSION);
    let (created, submission) = state
        .db
        .writer()
        .write(move |conn| {
            let existing = conn
                .prepare_cached("SELECT id, team_id, version, note, created_ms, participant_id FROM submissions WHERE team_id = ?1 AND version = ?2")?
                .query_row(params![team_id, version], row_to_submission)
                .optional()?;
            if let Some(existing) = existing {
                return Ok((false, existing));
            }
            let (event, _, ends_at) = event_state(conn, event_id)?;
            if !matches!(event.as_str(), "live" | "frozen") {
                return Err(Error::conflict(Some("state"), format!("submissions are accepted while the event is live; it is {event}")));
            }
            let deadline = time::OffsetDateTime::parse(&ends_at, &time::format_description::well_known::Rfc3339)
                .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
                .unwrap_or(i64::MAX);
            let now = crate::clock::now_ms();
            if now > deadline {
                return Err(Error::conflict(Some("version"), format!("the deadline passed at {ends_at}; late submissions are refused")));
            }
            let last: Option<i64> = conn.query_row("SELECT max(created_ms) FROM submissions WHERE team_id = ?1", [team_id], |r| r.get(0))?;
            if let Some(last) = last.filter(|at| now - at < SUBMISSION_INTERVAL_MS) {
                let wait = ((SUBMISSION_INTERVAL_MS - (now - last)).max(1000) + 999) / 1000;
                return Err(Error::RateLimited { retry_after_secs: u64::try_from(wait).unwrap_or(10) });
            }
            conn.prepare_cached("INSERT INTO submissions (event_id, team_id, participant_id, version, note, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
                .execute(params![event_id, team_id, participant_id, version, note, now])?;
            let id = conn.last_insert_rowid();
            let job = NewJob {
                idempotency_key: Some(format!("submission-{id}")),
                max_attempts: attempts,
                ..NewJob::work(&crate::jobs::Work::ScoreSubmission(crate::jobs::ScoreSubmission { submission_id: id })).for_team(team_id)
            };
            jobs::enqueue(conn, &job, now)?;
            audit::record(conn, &caller.actor(), &caller.meta, "submission.created", Some(&format!("submission:{id}")),
                serde_json::json!({"team_id": team_id, "version": version}))?;
            crate::outbox::append(conn, crate::outbox::Change::Submission, &format!("submission:{id}"),
                &serde_json::json!({"id": id, "event_id": event_id, "team_id": team_id, "version": version, "note": note, "at_ms": now}), now)?;
            Ok((true, Submission { id, team_id, version, note, submitted_at: crate::clock::format_ms_or_empty(now), submitted_by: participant_id }))
        })
        .await?;
    if created {
        state.wake_workers();
    }
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(submission),
    ))
}

/// The team's submissions, newest first.
#[utoipa::path(get, path = "/v1/me/submissions", tag = "scores", responses((status = 200, body = [Submission]), (status = 403, body = Problem)))]
pub async fn my_submissions(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Submission>>, Error> {
    let Principal::Participant { team_id, .. } = caller.principal else {
        return Err(Error::forbidden("only participants have team submissions"));
    };
    let list = state
        .db
        .read(move |conn| {
            conn.prepare_cached("SELECT id, team_id, version, note, created_ms, participant_id FROM submissions WHERE team_id = ?1 ORDER BY id DESC")?
                .query_map([team_id], row_to_submission)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::from)
        })
        .await?;
    Ok(Json(list))
}
