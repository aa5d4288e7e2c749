//! Teams, participants, roster import, join codes and the participant's own view.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Principal};
use super::events::{CODE_ALPHABET, EventState, load_event, random_code};
use super::extract::{ApiJson, ApiPath, CsvBody};
use super::problem::Problem;
use super::session::normalize_code;
use super::{AppState, validate};
use crate::audit;
use crate::error::{Error, RowError};
use crate::secrets::SecretBox;
use labrack_provisioner::roles;

#[derive(Debug, Serialize, ToSchema)]
pub struct Team {
    pub id: i64,
    pub event_id: i64,
    pub name: String,
    pub participant_count: i64,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamList {
    pub teams: Vec<Team>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Participant {
    pub id: i64,
    pub event_id: i64,
    pub team_id: i64,
    pub team_name: String,
    pub name: String,
    pub email: Option<String>,
    /// when the participant first joined with their code
    pub joined_at: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParticipantList {
    pub participants: Vec<Participant>,
}

/// A participant with its personal join code, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedCode {
    pub participant: Participant,
    pub join_code: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportResult {
    pub imported: usize,
    pub teams_created: usize,
    pub participants: Vec<IssuedCode>,
}

fn team_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Team> {
    Ok(Team {
        id: r.get(0)?,
        event_id: r.get(1)?,
        name: r.get(2)?,
        participant_count: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const TEAM_COLUMNS: &str = "t.id, t.event_id, t.name, (SELECT count(*) FROM participants p WHERE p.team_id = t.id), t.created_at";
const PARTICIPANT_COLUMNS: &str =
    "p.id, p.event_id, p.team_id, t.name, p.name, p.email, p.joined_at, p.created_at";

fn participant_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Participant> {
    Ok(Participant {
        id: r.get(0)?,
        event_id: r.get(1)?,
        team_id: r.get(2)?,
        team_name: r.get(3)?,
        name: r.get(4)?,
        email: r.get(5)?,
        joined_at: r.get(6)?,
        created_at: r.get(7)?,
    })
}

fn load_team(conn: &Connection, team_id: i64) -> Result<Team, Error> {
    conn.query_row(
        &format!("SELECT {TEAM_COLUMNS} FROM teams t WHERE t.id = ?1"),
        [team_id],
        team_from_row,
    )
    .optional()?
    .ok_or(Error::NotFound("team"))
}

fn load_participant(conn: &Connection, id: i64) -> Result<Participant, Error> {
    conn.query_row(
        &format!("SELECT {PARTICIPANT_COLUMNS} FROM participants p JOIN teams t ON t.id = p.team_id WHERE p.id = ?1"),
        [id],
        participant_from_row,
    )
    .optional()?
    .ok_or(Error::NotFound("participant"))
}

/// Refuses changes to an event that has ended. Reads only the state: this runs inside
/// every team and participant write, so it must not count rows.
pub(crate) fn open_event(conn: &Connection, event_id: i64) -> Result<(), Error> {
    let state: String = conn
        .prepare_cached("SELECT state FROM events WHERE id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()?
        .ok_or(Error::NotFound("event"))?;
    match EventState::parse(&state) {
        Some(state) if state.accepts_changes() => Ok(()),
        _ => Err(Error::conflict(
            None,
            format!("the event is {state}; teams and participants can no longer change"),
        )),
    }
}

/// The stored hash of a join code (as typed, normalised).
pub fn join_code_hash(secrets: &SecretBox, normalized: &str) -> String {
    secrets.code_hash("join code", normalized)
}

/// A fresh personal join code `XXXXX-XXXXX` (50 bits) and the hash stored for it.
fn new_join_code(conn: &Connection, secrets: &SecretBox) -> Result<(String, String), Error> {
    loop {
        let raw = random_code(10);
        let hash = join_code_hash(secrets, &raw);
        let taken: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM participants WHERE join_code_hash = ?1)",
            [&hash],
            |r| r.get(0),
        )?;
        if !taken {
            debug_assert!(raw.bytes().all(|b| CODE_ALPHABET.contains(&b)));
            return Ok((format!("{}-{}", &raw[..5], &raw[5..]), hash));
        }
    }
}

fn insert_participant(
    conn: &Connection,
    secrets: &SecretBox,
    event_id: i64,
    team_id: i64,
    name: &str,
    email: Option<&str>,
) -> Result<IssuedCode, Error> {
    let (join_code, hash) = new_join_code(conn, secrets)?;
    debug_assert_eq!(hash, join_code_hash(secrets, &normalize_code(&join_code)));
    conn.execute(
        "INSERT INTO participants (event_id, team_id, name, email, join_code_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![event_id, team_id, name, email, hash, crate::clock::now_rfc3339()],
    )?;
    let participant = load_participant(conn, conn.last_insert_rowid())?;
    Ok(IssuedCode {
        participant,
        join_code,
    })
}

/// Lists an event's teams.
#[utoipa::path(get, path = "/v1/events/{event_id}/teams", tag = "people", params(("event_id" = i64, Path)),
    responses((status = 200, body = TeamList), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_teams(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<TeamList>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let teams = state
        .db
        .read(move |conn| {
            load_event(conn, event_id)?;
            let mut stmt = conn.prepare(&format!("SELECT {TEAM_COLUMNS} FROM teams t WHERE t.event_id = ?1 ORDER BY t.name COLLATE NOCASE"))?;
            let rows = stmt.query_map([event_id], team_from_row)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(TeamList { teams }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    #[schema(max_length = 100)]
    pub name: String,
}

/// Creates a team.
#[utoipa::path(post, path = "/v1/events/{event_id}/teams", tag = "people", params(("event_id" = i64, Path)), request_body = NewTeam,
    responses((status = 201, body = Team), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_team(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(req): ApiJson<NewTeam>,
) -> Result<(StatusCode, Json<Team>), Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let name = validate::name("name", &req.name, 100)?;
    let team = state
        .db
        .writer()
        .write(move |conn| {
            open_event(conn, event_id)?;
            let taken: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM teams WHERE event_id = ?1 AND name = ?2 COLLATE NOCASE)",
                params![event_id, name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(Error::conflict(Some("name"), format!("a team named {name:?} already exists in this event")));
            }
            conn.execute("INSERT INTO teams (event_id, name, created_at) VALUES (?1, ?2, ?3)", params![event_id, name, crate::clock::now_rfc3339()])?;
            let id = conn.last_insert_rowid();
            audit::record(conn, &caller.actor(), &caller.meta, "team.created", Some(&format!("team:{id}")), serde_json::json!({"event_id": event_id, "name": name}))?;
            crate::outbox::append(conn, crate::outbox::Change::Team, &format!("team:{id}"), &serde_json::json!({"id": id, "event_id": event_id, "name": name}), crate::clock::now_ms())?;
            load_team(conn, id)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(team)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamDetail {
    pub team: Team,
    pub participants: Vec<Participant>,
}

/// One team with its participants. A participant may read only its own team.
#[utoipa::path(get, path = "/v1/teams/{team_id}", tag = "people", params(("team_id" = i64, Path)),
    responses((status = 200, body = TeamDetail), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_team(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
) -> Result<Json<TeamDetail>, Error> {
    let is_participant = match &caller.principal {
        Principal::Participant { team_id: own, .. } if *own == team_id => true,
        Principal::Participant { .. } => {
            return Err(Error::forbidden("participants may only see their own team"));
        }
        Principal::Staff { .. } => false,
    };
    let detail = state
        .db
        .read(move |conn| {
            let team = load_team(conn, team_id)?;
            let mut stmt = conn.prepare(&format!(
                "SELECT {PARTICIPANT_COLUMNS} FROM participants p JOIN teams t ON t.id = p.team_id WHERE p.team_id = ?1 ORDER BY p.name COLLATE NOCASE"
            ))?;
            let participants = stmt.query_map([team_id], participant_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok::<_, Error>(TeamDetail { team, participants })
        })
        .await?;
    let mut detail = detail;
    if is_participant {
        // Teammates see each other's names, not their contact details.
        detail.participants.iter_mut().for_each(|p| p.email = None);
    }
    Ok(Json(detail))
}

/// Lists an event's participants.
#[utoipa::path(get, path = "/v1/events/{event_id}/participants", tag = "people", params(("event_id" = i64, Path)),
    responses((status = 200, body = ParticipantList), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_participants(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<ParticipantList>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let participants = state
        .db
        .read(move |conn| {
            load_event(conn, event_id)?;
            let mut stmt = conn.prepare(&format!(
                "SELECT {PARTICIPANT_COLUMNS} FROM participants p JOIN teams t ON t.id = p.team_id WHERE p.event_id = ?1
                 ORDER BY t.name COLLATE NOCASE, p.name COLLATE NOCASE"
            ))?;
            let rows = stmt.query_map([event_id], participant_from_row)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(ParticipantList { participants }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewParticipant {
    pub team_id: i64,
    #[schema(max_length = 200)]
    pub name: String,
    pub email: Option<String>,
}

/// Adds a participant to a team; answers its join code once.
#[utoipa::path(post, path = "/v1/events/{event_id}/participants", tag = "people", params(("event_id" = i64, Path)), request_body = NewParticipant,
    responses((status = 201, body = IssuedCode), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_participant(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(req): ApiJson<NewParticipant>,
) -> Result<(StatusCode, Json<IssuedCode>), Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let name = validate::name("name", &req.name, 200)?;
    let email = validate::email("email", req.email.as_deref())?;
    let team_id = req.team_id;
    let secrets = state.secrets.clone();
    let issued = state
        .db
        .writer()
        .write(move |conn| {
            open_event(conn, event_id)?;
            let team_event: Option<i64> = conn.query_row("SELECT event_id FROM teams WHERE id = ?1", [team_id], |r| r.get(0)).optional()?;
            if team_event != Some(event_id) {
                return Err(Error::invalid("team_id", "no such team in this event"));
            }
            let taken: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM participants WHERE team_id = ?1 AND name = ?2 COLLATE NOCASE)",
                params![team_id, name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(Error::conflict(Some("name"), format!("{name:?} is already in this team")));
            }
            let issued = insert_participant(conn, &secrets, event_id, team_id, &name, email.as_deref())?;
            audit::record(conn, &caller.actor(), &caller.meta, "participant.created", Some(&format!("participant:{}", issued.participant.id)),
                serde_json::json!({"team_id": team_id, "name": name}))?;
            Ok(issued)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// Imports a roster CSV (`team,name,email`); teams are created as needed. All or nothing:
/// if any row is bad, every bad row is reported and nothing is imported.
#[utoipa::path(post, path = "/v1/events/{event_id}/participants/import", tag = "people", params(("event_id" = i64, Path)),
    request_body(content = String, content_type = "text/csv"),
    responses((status = 200, body = ImportResult), (status = 403, body = Problem), (status = 409, body = Problem), (status = 413, body = Problem), (status = 415, body = Problem), (status = 422, body = Problem)))]
pub async fn import_participants(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    CsvBody(text): CsvBody,
) -> Result<Json<ImportResult>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    // Off the async workers: a large file must not stall other requests.
    let rows = tokio::task::spawn_blocking(move || crate::roster::parse(&text))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(Error::BadRows)?;
    let secrets = state.secrets.clone();
    let result = state
        .db
        .writer()
        .write(move |conn| {
            open_event(conn, event_id)?;
            let mut teams: HashMap<String, i64> = HashMap::new();
            {
                let mut stmt = conn.prepare("SELECT id, name FROM teams WHERE event_id = ?1")?;
                let existing = stmt.query_map([event_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
                for team in existing {
                    let (id, name) = team?;
                    teams.insert(name.to_lowercase(), id);
                }
            }
            let mut errors = Vec::new();
            for row in &rows {
                if let Some(team_id) = teams.get(&row.team.to_lowercase()) {
                    let taken: bool = conn.query_row(
                        "SELECT EXISTS(SELECT 1 FROM participants WHERE team_id = ?1 AND name = ?2 COLLATE NOCASE)",
                        params![team_id, row.name],
                        |r| r.get(0),
                    )?;
                    if taken {
                        errors.push(RowError { line: row.line, reason: format!("{} is already in team {}", row.name, row.team) });
                    }
                }
            }
            if !errors.is_empty() {
                return Err(Error::BadRows(errors));
            }
            let mut teams_created = 0;
            let mut issued = Vec::with_capacity(rows.len());
            let now = crate::clock::now_rfc3339();
            for row in &rows {
                let team_id = match teams.get(&row.team.to_lowercase()) {
                    Some(id) => *id,
                    None => {
                        conn.execute("INSERT INTO teams (event_id, name, created_at) VALUES (?1, ?2, ?3)", params![event_id, row.team, now])?;
                        let id = conn.last_insert_rowid();
                        crate::outbox::append(conn, crate::outbox::Change::Team, &format!("team:{id}"),
                            &serde_json::json!({"id": id, "event_id": event_id, "name": row.team}), crate::clock::now_ms())?;
                        teams.insert(row.team.to_lowercase(), id);
                        teams_created += 1;
                        id
                    }
                };
                issued.push(insert_participant(conn, &secrets, event_id, team_id, &row.name, row.email.as_deref())?);
            }
            audit::record(conn, &caller.actor(), &caller.meta, "participants.imported", Some(&format!("event:{event_id}")),
                serde_json::json!({"participants": issued.len(), "teams_created": teams_created}))?;
            Ok(ImportResult { imported: issued.len(), teams_created, participants: issued })
        })
        .await?;
    Ok(Json(result))
}

/// Issues a new join code; the old one stops working and the participant's sessions end
/// (a leaked code must not leave a signed-in stranger behind).
#[utoipa::path(post, path = "/v1/participants/{participant_id}/join-code", tag = "people", params(("participant_id" = i64, Path)),
    responses((status = 200, body = IssuedCode), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn regenerate_join_code(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(participant_id): ApiPath<i64>,
) -> Result<Json<IssuedCode>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let secrets = state.secrets.clone();
    let issued = state
        .db
        .writer()
        .write(move |conn| {
            let participant = load_participant(conn, participant_id)?;
            open_event(conn, participant.event_id)?;
            let (join_code, hash) = new_join_code(conn, &secrets)?;
            conn.execute(
                "UPDATE participants SET join_code_hash = ?1 WHERE id = ?2",
                params![hash, participant_id],
            )?;
            let ended = end_sessions(conn, participant_id)?;
            audit::record(
                conn,
                &caller.actor(),
                &caller.meta,
                "participant.join_code_regenerated",
                Some(&format!("participant:{participant_id}")),
                serde_json::json!({"sessions_ended": ended}),
            )?;
            Ok(IssuedCode {
                participant,
                join_code,
            })
        })
        .await?;
    state.access_changed();
    Ok(Json(issued))
}

/// Ends every session of a participant; how many there were.
fn end_sessions(conn: &Connection, participant_id: i64) -> Result<usize, Error> {
    Ok(conn
        .prepare_cached("DELETE FROM sessions WHERE participant_id = ?1")?
        .execute([participant_id])?)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SignedOut {
    /// sessions that were ended
    pub sessions_ended: usize,
}

/// Signs a participant out everywhere (their join code keeps working).
#[utoipa::path(post, path = "/v1/participants/{participant_id}/sign-out", tag = "people", params(("participant_id" = i64, Path)),
    responses((status = 200, body = SignedOut), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn sign_out_participant(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(participant_id): ApiPath<i64>,
) -> Result<Json<SignedOut>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let signed_out = state
        .db
        .writer()
        .write(move |conn| {
            load_participant(conn, participant_id)?;
            let sessions_ended = end_sessions(conn, participant_id)?;
            audit::record(
                conn,
                &caller.actor(),
                &caller.meta,
                "participant.signed_out",
                Some(&format!("participant:{participant_id}")),
                serde_json::json!({"sessions_ended": sessions_ended}),
            )?;
            Ok(SignedOut { sessions_ended })
        })
        .await?;
    state.access_changed();
    Ok(Json(signed_out))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamRef {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventSummary {
    pub id: i64,
    pub name: String,
    pub code: String,
    pub state: EventState,
    pub starts_at: String,
    pub ends_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Teammate {
    pub id: i64,
    pub name: String,
    pub joined: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub participant: Participant,
    pub team: TeamRef,
    pub event: EventSummary,
    pub teammates: Vec<Teammate>,
}

/// The calling participant's own profile, team and event.
#[utoipa::path(get, path = "/v1/me", tag = "people", responses((status = 200, body = Me), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<Me>, Error> {
    let Principal::Participant { id, .. } = caller.principal else {
        return Err(Error::forbidden("only participants have a team page"));
    };
    let me = state
        .db
        .read(move |conn| {
            let participant = load_participant(conn, id)?;
            let event = load_event(conn, participant.event_id)?;
            let mut stmt = conn.prepare("SELECT id, name, joined_at IS NOT NULL FROM participants WHERE team_id = ?1 AND id <> ?2 ORDER BY name COLLATE NOCASE")?;
            let teammates = stmt
                .query_map(params![participant.team_id, id], |r| Ok(Teammate { id: r.get(0)?, name: r.get(1)?, joined: r.get(2)? }))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, Error>(Me {
                team: TeamRef { id: participant.team_id, name: participant.team_name.clone() },
                event: EventSummary { id: event.id, name: event.name, code: event.code, state: event.state, starts_at: event.starts_at, ends_at: event.ends_at },
                participant,
                teammates,
            })
        })
        .await?;
    Ok(Json(me))
}
