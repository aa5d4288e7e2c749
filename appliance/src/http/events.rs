//! Events: schedule, code and the state machine draft → live ⇄ frozen → ended → archived.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use rand::Rng as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath};
use super::problem::Problem;
use super::{AppState, validate};
use crate::audit;
use crate::clock::format_time;
use crate::error::Error;
pub use labrack_provisioner::event::EventState;
use labrack_provisioner::roles;

#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub name: String,
    /// short code participants type to join
    pub code: String,
    pub state: EventState,
    /// the states staff may move the event to now (`POST …/transition`); the UIs offer
    /// these and keep no table of their own
    pub next_states: Vec<EventState>,
    pub starts_at: String,
    pub ends_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub team_count: i64,
    pub participant_count: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<Event>,
}

const EVENT_COLUMNS: &str = "e.id, e.name, e.code, e.state, e.starts_at, e.ends_at, e.created_at, e.updated_at,
    (SELECT count(*) FROM teams t WHERE t.event_id = e.id), (SELECT count(*) FROM participants p WHERE p.event_id = e.id)";

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let state: String = r.get(3)?;
    let state = EventState::parse(&state).unwrap_or(EventState::Draft);
    Ok(Event {
        id: r.get(0)?,
        name: r.get(1)?,
        code: r.get(2)?,
        state,
        next_states: state.next_states(),
        starts_at: r.get(4)?,
        ends_at: r.get(5)?,
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
        team_count: r.get(8)?,
        participant_count: r.get(9)?,
    })
}

pub fn load_event(conn: &Connection, id: i64) -> Result<Event, Error> {
    conn.query_row(
        &format!("SELECT {EVENT_COLUMNS} FROM events e WHERE e.id = ?1"),
        [id],
        event_from_row,
    )
    .optional()?
    .ok_or(Error::NotFound("event"))
}

/// Lists events, newest first.
#[utoipa::path(get, operation_id = "list_events", path = "/v1/events", tag = "events", responses((status = 200, body = EventList), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<EventList>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let events = state
        .db
        .read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM events e ORDER BY e.id DESC"
            ))?;
            let rows = stmt.query_map([], event_from_row)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(EventList { events }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    #[schema(max_length = 200)]
    pub name: String,
    /// RFC 3339
    #[schema(format = DateTime)]
    pub starts_at: String,
    /// RFC 3339, after `starts_at`
    #[schema(format = DateTime)]
    pub ends_at: String,
}

fn schedule(starts_at: &str, ends_at: &str) -> Result<(String, String), Error> {
    let start = validate::timestamp("starts_at", starts_at)?;
    let end = validate::timestamp("ends_at", ends_at)?;
    if end <= start {
        return Err(Error::invalid("ends_at", "ends_at must be after starts_at"));
    }
    Ok((format_time(start), format_time(end)))
}

/// Event codes avoid look-alike characters (0/O, 1/I).
pub const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

pub fn random_code(len: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| char::from(CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())]))
        .collect()
}

/// Creates an event in `draft`.
#[utoipa::path(post, operation_id = "create_event", path = "/v1/events", tag = "events", request_body = NewEvent,
    responses((status = 201, body = Event), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewEvent>,
) -> Result<(StatusCode, Json<Event>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let name = validate::name("name", &req.name, 200)?;
    let (starts_at, ends_at) = schedule(&req.starts_at, &req.ends_at)?;
    let event = state
        .db
        .writer()
        .write(move |conn| {
            let now = crate::clock::now_rfc3339();
            let mut code = random_code(6);
            while conn.query_row("SELECT EXISTS(SELECT 1 FROM events WHERE code = ?1)", [&code], |r| r.get::<_, bool>(0))? {
                code = random_code(6);
            }
            conn.execute(
                "INSERT INTO events (name, code, state, starts_at, ends_at, created_at, updated_at) VALUES (?1, ?2, 'draft', ?3, ?4, ?5, ?5)",
                params![name, code, starts_at, ends_at, now],
            )?;
            let id = conn.last_insert_rowid();
            audit::record(conn, &caller.actor(), &caller.meta, "event.created", Some(&format!("event:{id}")), serde_json::json!({"name": name}))?;
            to_outbox(conn, id)?;
            load_event(conn, id)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(event)))
}

/// One event.
#[utoipa::path(get, operation_id = "get_event", path = "/v1/events/{event_id}", tag = "events", params(("event_id" = i64, Path)),
    responses((status = 200, body = Event), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Event>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    Ok(Json(
        state
            .db
            .read(move |conn| load_event(conn, event_id))
            .await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventUpdate {
    #[schema(max_length = 200)]
    pub name: Option<String>,
    #[schema(format = DateTime)]
    pub starts_at: Option<String>,
    #[schema(format = DateTime)]
    pub ends_at: Option<String>,
}

/// Renames or reschedules an event (not once it has ended).
#[utoipa::path(patch, path = "/v1/events/{event_id}", tag = "events", params(("event_id" = i64, Path)), request_body = EventUpdate,
    responses((status = 200, body = Event), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(req): ApiJson<EventUpdate>,
) -> Result<Json<Event>, Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    if req.name.is_none() && req.starts_at.is_none() && req.ends_at.is_none() {
        return Err(Error::invalid(
            "body",
            "give at least one of name, starts_at, ends_at",
        ));
    }
    let name = req
        .name
        .as_deref()
        .map(|n| validate::name("name", n, 200))
        .transpose()?;
    let event = state
        .db
        .writer()
        .write(move |conn| {
            let current = load_event(conn, event_id)?;
            if !current.state.accepts_changes() {
                return Err(Error::conflict(Some("state"), format!("the event is {}; it can no longer be changed", current.state.as_str())));
            }
            let (starts_at, ends_at) = schedule(
                req.starts_at.as_deref().unwrap_or(&current.starts_at),
                req.ends_at.as_deref().unwrap_or(&current.ends_at),
            )?;
            let name = name.unwrap_or(current.name);
            conn.execute(
                "UPDATE events SET name = ?1, starts_at = ?2, ends_at = ?3, updated_at = ?4 WHERE id = ?5",
                params![name, starts_at, ends_at, crate::clock::now_rfc3339(), event_id],
            )?;
            audit::record(conn, &caller.actor(), &caller.meta, "event.updated", Some(&format!("event:{event_id}")),
                serde_json::json!({"name": name, "starts_at": starts_at, "ends_at": ends_at}))?;
            to_outbox(conn, event_id)
        })
        .await?;
    state.boards.forget(event_id);
    Ok(Json(event))
}

/// Records the event as it now is for the cloud, in the caller's write; returns it.
fn to_outbox(conn: &Connection, event_id: i64) -> Result<Event, Error> {
    let event = load_event(conn, event_id)?;
    let body = serde_json::json!({"id": event.id, "name": event.name, "code": event.code, "state": event.state.as_str(),
        "starts_at": event.starts_at, "ends_at": event.ends_at});
    crate::outbox::append(
        conn,
        crate::outbox::Change::Event,
        &format!("event:{event_id}"),
        &body,
        crate::clock::now_ms(),
    )?;
    Ok(event)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    /// the state to move to
    pub to: EventState,
    /// if given, the state the caller believes the event is in; refused with 409 if not
    pub from: Option<EventState>,
}

/// Moves an event to another state; illegal or stale transitions are refused.
#[utoipa::path(post, path = "/v1/events/{event_id}/transition", tag = "events", params(("event_id" = i64, Path)), request_body = Transition,
    responses((status = 200, body = Event), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn transition(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(req): ApiJson<Transition>,
) -> Result<Json<Event>, Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let event = state
        .db
        .writer()
        .write(move |conn| {
            let current = load_event(conn, event_id)?;
            if let Some(expected) = req.from
                && expected != current.state
            {
                return Err(Error::conflict(
                    Some("from"),
                    format!(
                        "the event is {}, not {}",
                        current.state.as_str(),
                        expected.as_str()
                    ),
                ));
            }
            if !current.state.can_become(req.to) {
                return Err(Error::conflict(
                    Some("to"),
                    format!(
                        "an event cannot go from {} to {}",
                        current.state.as_str(),
                        req.to.as_str()
                    ),
                ));
            }
            conn.execute(
                "UPDATE events SET state = ?1, updated_at = ?2 WHERE id = ?3",
                params![req.to.as_str(), crate::clock::now_rfc3339(), event_id],
            )?;
            // The public scoreboard shows the board as it was when the freeze began.
            if req.to == EventState::Frozen {
                let now = crate::clock::now_ms();
                conn.execute(
                    "UPDATE events SET frozen_at_ms = ?1 WHERE id = ?2",
                    params![now, event_id],
                )?;
            }
            audit::record(
                conn,
                &caller.actor(),
                &caller.meta,
                "event.transition",
                Some(&format!("event:{event_id}")),
                serde_json::json!({"from": current.state.as_str(), "to": req.to.as_str()}),
            )?;
            to_outbox(conn, event_id)
        })
        .await?;
    // Open terminals and desktops look again (the end makes labs view-only); the public
    // board shows the new state (a freeze) at once.
    state.access_changed();
    state.boards.forget(event_id);
    Ok(Json(event))
}
