//! Lab templates (a declarative TOML file) and lab allocations: placing a team's lab on a
//! host, resetting and releasing it, and what a team may see of its own lab (never the
//! desktop credentials).

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use labrack_provisioner::allocation::{Allocation, AllocationState, Input};
use labrack_provisioner::inventory::{self, HostSlot};
use labrack_provisioner::limits::{HostResources, LabLimits};
use labrack_provisioner::template;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Caller, Principal};
use super::extract::{ApiJson, ApiPath, read_limited, require_content_type};
use super::problem::Problem;
use crate::audit;
use crate::clock::now_rfc3339;
use crate::clock::unix_ms;
use crate::error::{Error, RowError};
use crate::labs;
use labrack_provisioner::roles;

const TEMPLATE_LIMIT: usize = 256 * 1024;

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckView {
    pub name: String,
    pub script: String,
    pub timeout_secs: u32,
    pub weight: u32,
    pub dimension: String,
    pub hidden: bool,
    pub network: bool,
    pub memory_mib: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateView {
    pub name: String,
    pub runtime: String,
    pub gpus: u32,
    pub gpu_memory_mib: Option<u64>,
    pub skeleton: String,
    pub checks: Vec<CheckView>,
    /// what each lab may use of its host and reach: cpu_millicores, cpu_weight, memory_mib,
    /// pids, io_weight, disk_mib, network (none | venue | internet), allow
    #[schema(value_type = Object)]
    pub limits: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateSet {
    pub templates: Vec<TemplateView>,
    /// the TOML file as last uploaded (empty before the first upload)
    pub source: String,
    pub updated_at: Option<String>,
}

/// A TOML body (`application/toml`).
#[derive(Debug)]
pub struct TomlBody(pub String);

impl<S: Send + Sync> FromRequest<S> for TomlBody {
    type Rejection = super::problem::Rejection;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        require_content_type(req.headers(), "application/toml")?;
        let body = read_limited(req, TEMPLATE_LIMIT).await?;
        let text = String::from_utf8(body.to_vec()).map_err(|e| Error::Malformed {
            detail: format!(
                "the file is not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            ),
            field: None,
        })?;
        Ok(Self(text))
    }
}

fn load_templates(conn: &Connection) -> Result<TemplateSet, Error> {
    let mut stmt = conn.prepare("SELECT name, runtime, gpus, gpu_memory_mib, skeleton, checks, limits FROM lab_templates ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        let checks: String = r.get(5)?;
        let limits: Option<String> = r.get(6)?;
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u32>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, String>(4)?,
            checks,
            limits,
        ))
    })?;
    let mut templates = Vec::new();
    for row in rows {
        let (name, runtime, gpus, gpu_memory_mib, skeleton, checks, limits) = row?;
        let limits: LabLimits = limits
            .and_then(|l| serde_json::from_str(&l).ok())
            .unwrap_or_default();
        let checks: Vec<serde_json::Value> = serde_json::from_str(&checks).unwrap_or_default();
        let checks = checks
            .into_iter()
            .map(|c| CheckView {
                name: c["name"].as_str().unwrap_or_default().to_owned(),
                script: c["script"].as_str().unwrap_or_default().to_owned(),
                timeout_secs: u32::try_from(c["timeout_secs"].as_u64().unwrap_or(0)).unwrap_or(0),
                weight: u32::try_from(c["weight"].as_u64().unwrap_or(0)).unwrap_or(0),
                dimension: c["dimension"].as_str().unwrap_or_default().to_owned(),
                hidden: c["hidden"].as_bool().unwrap_or(false),
                network: c["network"].as_bool().unwrap_or(false),
                memory_mib: c["memory_mib"]
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(labrack_provisioner::template::DEFAULT_CHECK_MEMORY_MIB),
            })
            .collect();
        templates.push(TemplateView {
            name,
            runtime,
            gpus,
            gpu_memory_mib: gpu_memory_mib.and_then(|v| u64::try_from(v).ok()),
            skeleton,
            checks,
            limits: serde_json::to_value(&limits).unwrap_or_default(),
        });
    }
    let source: Option<(String, String)> = conn
        .query_row(
            "SELECT toml, updated_at FROM lab_template_source WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (source, updated_at) = match source {
        Some((text, at)) => (text, Some(at)),
        None => (String::new(), None),
    };
    Ok(TemplateSet {
        templates,
        source,
        updated_at,
    })
}

/// The lab templates.
#[utoipa::path(get, path = "/v1/templates", tag = "labs", responses((status = 200, body = TemplateSet), (status = 403, body = Problem)))]
pub async fn list_templates(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<TemplateSet>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    Ok(Json(state.db.read(load_templates).await?))
}

/// What the enrolled hosts with an agent last said they have and can enforce.
fn host_resources(conn: &Connection) -> Result<Vec<HostResources>, Error> {
    let rows: Vec<Option<String>> = conn
        .prepare_cached("SELECT resources FROM hosts WHERE agent = 1")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .flatten()
        .filter_map(|text| serde_json::from_str(&text).ok())
        .collect())
}

/// Replaces every lab template with the uploaded TOML file. A file with any error changes
/// nothing; the problem lists every error with its line — including a template no enrolled
/// host could ever run (more CPU, memory, pids or GPUs than any has, or a limit none can
/// enforce), on the line of the field at fault.
#[utoipa::path(put, path = "/v1/templates", tag = "labs", request_body(content = String, content_type = "application/toml"),
    responses((status = 200, body = TemplateSet), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn put_templates(
    State(state): State<AppState>,
    caller: Caller,
    TomlBody(text): TomlBody,
) -> Result<Json<TemplateSet>, Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let parsed = template::parse(&text).map_err(|errors| {
        Error::BadFile(
            errors
                .into_iter()
                .map(|e| RowError {
                    line: u64::try_from(e.line).unwrap_or(0),
                    reason: e.message,
                })
                .collect(),
        )
    })?;
    let set = state
        .db
        .writer()
        .write(move |conn| {
            let unfit = template::unfit_for_hosts(&parsed, &host_resources(conn)?);
            if !unfit.is_empty() {
                return Err(Error::BadFile(unfit.into_iter().map(|e| RowError { line: u64::try_from(e.line).unwrap_or(0), reason: e.message }).collect()));
            }
            conn.execute("DELETE FROM lab_templates", [])?;
            let now = now_rfc3339();
            for t in &parsed {
                let checks: Vec<serde_json::Value> = t
                    .checks
                    .iter()
                    .map(|c| {
                        serde_json::json!({"name": c.name, "script": c.script, "timeout_secs": c.timeout_secs,
                            "weight": c.weight, "dimension": c.dimension, "hidden": c.hidden,
                            "network": c.network, "memory_mib": c.memory_mib})
                    })
                    .collect();
                conn.execute(
                    "INSERT INTO lab_templates (name, runtime, gpus, gpu_memory_mib, skeleton, checks, updated_at, limits) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        t.name,
                        t.runtime,
                        t.gpus,
                        t.gpu_memory_mib.and_then(|v| i64::try_from(v).ok()),
                        t.skeleton,
                        serde_json::Value::Array(checks).to_string(),
                        now,
                        serde_json::to_string(&t.limits).map_err(|e| Error::Internal(e.to_string()))?
                    ],
                )?;
            }
            conn.execute(
                "INSERT INTO lab_template_source (id, toml, updated_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET toml = excluded.toml, updated_at = excluded.updated_at",
                params![text, now],
            )?;
            let names: Vec<&str> = parsed.iter().map(|t| t.name.as_str()).collect();
            audit::record(conn, &caller.actor(), &caller.meta, "templates.replaced", None, serde_json::json!({"templates": names}))?;
            load_templates(conn)
        })
        .await?;
    Ok(Json(set))
}

/// A lab allocation as staff and its own team see it: state and placement, never the
/// desktop credentials.
#[derive(Debug, Serialize, ToSchema)]
pub struct AllocationView {
    pub id: i64,
    pub event_id: i64,
    pub team_id: i64,
    pub team_name: String,
    pub host_id: i64,
    pub host_name: String,
    pub template: String,
    /// requested, provisioning, active, releasing, released, failed, release_failed, or
    /// unreachable (its host went silent; the lab waits for it)
    pub state: String,
    /// a reset (or a retry) is under way
    pub busy: bool,
    /// why the lab failed or what the last attempt hit
    pub reason: Option<String>,
    /// the desktop is ready to open (terminal, stream)
    pub desktop_ready: bool,
    pub created_at: String,
    pub updated_at: String,
    /// the GPU indices the lab holds on its host
    pub gpus: Vec<u32>,
    /// it failed because its host stayed silent past the grace: staff may resume it
    /// (`POST …/resume`) once the host is back
    pub resumable: bool,
}

const VIEW_COLUMNS: &str = "a.id, a.event_id, a.team_id, t.name, a.host_id, h.name, a.template, a.state,
    (a.in_flight IS NOT NULL OR a.retry_at_ms IS NOT NULL), a.reason,
    (a.state = 'active' AND a.desktop_secret IS NOT NULL), a.created_at, a.updated_at, a.gpu_indices,
    (a.state = 'failed' AND a.resume_to IS 'active')";
const VIEW_FROM: &str =
    "allocations a JOIN teams t ON t.id = a.team_id JOIN hosts h ON h.id = a.host_id";

fn view_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AllocationView> {
    Ok(AllocationView {
        id: r.get(0)?,
        event_id: r.get(1)?,
        team_id: r.get(2)?,
        team_name: r.get(3)?,
        host_id: r.get(4)?,
        host_name: r.get(5)?,
        template: r.get(6)?,
        state: r.get(7)?,
        busy: r.get(8)?,
        reason: r.get(9)?,
        desktop_ready: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
        gpus: serde_json::from_str(&r.get::<_, String>(13)?).unwrap_or_default(),
        resumable: r.get(14)?,
    })
}

pub fn load_view(conn: &Connection, id: i64) -> Result<AllocationView, Error> {
    conn.query_row(
        &format!("SELECT {VIEW_COLUMNS} FROM {VIEW_FROM} WHERE a.id = ?1"),
        [id],
        view_from_row,
    )
    .optional()?
    .ok_or(Error::NotFound("allocation"))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AllocationList {
    pub allocations: Vec<AllocationView>,
}

/// An event's lab allocations (released ones included).
#[utoipa::path(get, path = "/v1/events/{event_id}/allocations", tag = "labs", params(("event_id" = i64, Path)),
    responses((status = 200, body = AllocationList), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn list_allocations(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<AllocationList>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let allocations = state
        .db
        .read(move |conn| {
            super::events::load_event(conn, event_id)?;
            let mut stmt = conn.prepare(&format!(
                "SELECT {VIEW_COLUMNS} FROM {VIEW_FROM} WHERE a.event_id = ?1 ORDER BY a.id"
            ))?;
            let rows = stmt.query_map([event_id], view_from_row)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(AllocationList { allocations }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAllocation {
    /// the lab template's name
    pub template: String,
}

fn host_slots(conn: &Connection) -> Result<Vec<HostSlot>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT h.id, h.healthy, h.capacity, h.gpus,
                (SELECT count(*) FROM allocations a WHERE a.host_id = h.id AND a.state <> 'released'),
                (SELECT json_group_array(g.value) FROM allocations a, json_each(a.gpu_indices) g WHERE a.host_id = h.id AND a.state <> 'released'),
                h.resources
         FROM hosts h WHERE h.agent = 1",
    )?;
    let rows = stmt.query_map([], |r| {
        let held: Option<String> = r.get(5)?;
        let resources: Option<String> = r.get(6)?;
        Ok(HostSlot {
            host_id: r.get(0)?,
            healthy: r.get(1)?,
            capacity: r.get(2)?,
            gpus: r.get(3)?,
            labs_in_use: r.get(4)?,
            gpus_held: held
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or_default(),
            resources: resources.and_then(|text| serde_json::from_str(&text).ok()),
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
}

/// A lab to create for a team on a chosen host.
struct NewLab<'a> {
    event_id: i64,
    team_id: i64,
    host_id: i64,
    template: &'a str,
    runtime: &'a str,
    skeleton: &'a str,
    limits: &'a LabLimits,
    /// the GPU indices it holds on its host
    gpu_indices: &'a [u32],
}

/// Inserts a requested allocation, audits it (with `extra` in the detail) and lets the state
/// machine issue its first task; returns its id. Call inside the write that placed it.
fn create_lab(
    conn: &Connection,
    secrets: &crate::secrets::SecretBox,
    caller: &Caller,
    lab: &NewLab<'_>,
    extra: serde_json::Value,
) -> Result<i64, Error> {
    let limits = serde_json::to_string(lab.limits).map_err(|e| Error::Internal(e.to_string()))?;
    let gpu_indices =
        serde_json::to_string(lab.gpu_indices).map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute(
        "INSERT INTO allocations (event_id, team_id, host_id, template, runtime, skeleton, gpus, state, created_at, updated_at, limits, gpu_indices)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'requested', ?8, ?8, ?9, ?10)",
        params![lab.event_id, lab.team_id, lab.host_id, lab.template, lab.runtime, lab.skeleton, lab.gpu_indices.len(), now_rfc3339(), limits, gpu_indices],
    )?;
    let id = conn.last_insert_rowid();
    let mut detail = serde_json::json!({"team_id": lab.team_id, "host_id": lab.host_id, "template": lab.template, "gpus": lab.gpu_indices});
    if let (Some(detail), serde_json::Value::Object(extra)) = (detail.as_object_mut(), extra) {
        detail.extend(extra);
    }
    audit::record(
        conn,
        &caller.actor(),
        &caller.meta,
        "allocation.created",
        Some(&format!("allocation:{id}")),
        detail,
    )?;
    labs::apply(
        conn,
        secrets,
        id,
        Input::Tick,
        unix_ms(),
        &caller.actor(),
        &caller.meta,
    )?;
    Ok(id)
}

/// Placement's refusal as a problem: a template no host can run names the field at fault.
fn placement_refused(default_field: &'static str, error: &inventory::PlacementError) -> Error {
    match error {
        inventory::PlacementError::Unfit(unfit) if unfit.field != "host" => {
            Error::conflict(Some(unfit.field), error.to_string())
        }
        _ => Error::conflict(Some(default_field), error.to_string()),
    }
}

/// A 409 naming why, when the state machine would ignore `input` in the lab's current state.
fn refuse_if_ignored(alloc: &Allocation, input: &Input) -> Result<(), Error> {
    let mut probe = alloc.clone();
    let outputs = labrack_provisioner::allocation::step(
        &mut probe,
        input.clone(),
        unix_ms(),
        &Default::default(),
    );
    match outputs.iter().find_map(|o| match o {
        labrack_provisioner::allocation::Output::Ignored { why } => Some(*why),
        _ => None,
    }) {
        Some(why) => Err(Error::conflict(
            None,
            format!("the lab is {}: {why}", labs::state_name(alloc.state)),
        )),
        None => Ok(()),
    }
}

/// Allocates a lab to a team: placed automatically on the healthy host with room and the
/// GPUs the template needs, then provisioned by that host.
#[utoipa::path(post, path = "/v1/teams/{team_id}/allocation", tag = "labs", params(("team_id" = i64, Path)), request_body = NewAllocation,
    responses((status = 201, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn allocate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
    ApiJson(req): ApiJson<NewAllocation>,
) -> Result<(StatusCode, Json<AllocationView>), Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let secrets = state.secrets.clone();
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let event_id: i64 = conn
                .query_row("SELECT event_id FROM teams WHERE id = ?1", [team_id], |r| r.get(0))
                .optional()?
                .ok_or(Error::NotFound("team"))?;
            super::people::open_event(conn, event_id)?;
            type TemplateRow = (String, String, u32, String, Option<String>, Option<i64>);
            let template: Option<TemplateRow> = conn
                .query_row("SELECT name, runtime, gpus, skeleton, limits, gpu_memory_mib FROM lab_templates WHERE name = ?1", [&req.template], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })
                .optional()?;
            let Some((name, runtime, gpus, skeleton, limits, gpu_memory_mib)) = template else {
                return Err(Error::invalid("template", format!("no lab template named {:?}", req.template)));
            };
            let live: Option<i64> = conn
                .query_row("SELECT id FROM allocations WHERE team_id = ?1 AND state <> 'released'", [team_id], |r| r.get(0))
                .optional()?;
            if let Some(existing) = live {
                return Err(Error::conflict(None, format!("the team already has lab allocation {existing}; release it first")));
            }
            let limits: LabLimits = limits.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default();
            let gpu_memory_mib = gpu_memory_mib.and_then(|m| u64::try_from(m).ok());
            let placed = inventory::place(&host_slots(conn)?, &limits, gpus, gpu_memory_mib).map_err(|e| placement_refused("template", &e))?;
            let lab = NewLab { event_id, team_id, host_id: placed.host_id, template: &name, runtime: &runtime, skeleton: &skeleton, limits: &limits, gpu_indices: &placed.gpus };
            let id = create_lab(conn, &secrets, &caller, &lab, serde_json::json!({}))?;
            load_view(conn, id)
        })
        .await?;
    state.wake_hosts();
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgentlessLab {
    /// a host registered without an agent (`POST /api/v1/hosts/agentless`)
    pub host_id: i64,
    /// the lab template whose checks apply
    pub template: String,
    /// the team's account on that host
    #[schema(pattern = "^\\s*[a-z_][a-z0-9_-]{0,31}\\s*$")]
    pub username: String,
    /// its password: stored encrypted, used only by the appliance
    #[schema(min_length = 1, max_length = 256)]
    pub password: String,
}

/// A host as registering an agentless lab on it needs it.
struct AgentlessHostRow {
    agent: bool,
    capacity: u32,
    ssh_port: Option<u16>,
    ssh_host_key: Option<String>,
    /// its checker account, if it offers one
    checker: Option<String>,
}

/// A Unix user name, or a problem naming `field`.
pub fn unix_user(field: &'static str, name: &str) -> Result<String, Error> {
    let name = name.trim();
    let valid = (1..=32).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        return Err(Error::invalid(
            field,
            "a Unix user name: 1–32 characters of a–z, 0–9, '_' and '-'",
        ));
    }
    Ok(name.to_owned())
}

/// Registers a team's lab on a host without an agent: the account exists already; the
/// appliance keeps its login (encrypted) for the browser terminal over SSH. Its checks run
/// as the host's checker account: a template with checks on a host without one is refused.
#[utoipa::path(post, path = "/v1/teams/{team_id}/agentless-lab", tag = "labs", params(("team_id" = i64, Path)), request_body = NewAgentlessLab,
    responses((status = 201, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn register_agentless_lab(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(team_id): ApiPath<i64>,
    ApiJson(req): ApiJson<NewAgentlessLab>,
) -> Result<(StatusCode, Json<AllocationView>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let username = unix_user("username", &req.username)?;
    if req.password.is_empty() || req.password.len() > 256 {
        return Err(Error::invalid("password", "1–256 characters"));
    }
    let secrets = state.secrets.clone();
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let event_id: i64 =
                conn.query_row("SELECT event_id FROM teams WHERE id = ?1", [team_id], |r| r.get(0)).optional()?.ok_or(Error::NotFound("team"))?;
            super::people::open_event(conn, event_id)?;
            let host = conn
                .query_row("SELECT agent, capacity, ssh_port, ssh_host_key, checker_user FROM hosts WHERE id = ?1", [req.host_id], |r| {
                    Ok(AgentlessHostRow { agent: r.get(0)?, capacity: r.get(1)?, ssh_port: r.get(2)?, ssh_host_key: r.get(3)?, checker: r.get(4)? })
                })
                .optional()?;
            let Some(AgentlessHostRow { agent, capacity, ssh_port, ssh_host_key, checker }) = host else {
                return Err(Error::invalid("host_id", "no such host"));
            };
            if agent {
                return Err(Error::invalid("host_id", "that host runs the agent: allocate a lab on it instead"));
            }
            let in_use: u32 = conn.query_row("SELECT count(*) FROM allocations WHERE host_id = ?1 AND state <> 'released'", [req.host_id], |r| r.get(0))?;
            if in_use >= capacity {
                return Err(Error::conflict(Some("host_id"), format!("the host holds {capacity} lab(s) and all are in use")));
            }
            let template: Option<(String, String, String, String)> = conn
                .query_row("SELECT name, runtime, skeleton, checks FROM lab_templates WHERE name = ?1", [&req.template], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            let Some((name, runtime, skeleton, checks)) = template else {
                return Err(Error::invalid("template", format!("no lab template named {:?}", req.template)));
            };
            let scored = serde_json::from_str::<Vec<serde_json::Value>>(&checks).is_ok_and(|c| !c.is_empty());
            if scored && checker.is_none() {
                return Err(Error::invalid(
                    "host_id",
                    format!("template {name:?} has scored checks, and that host offers no checker account: checks never run as the team — register the host with one"),
                ));
            }
            if checker.as_deref() == Some(username.as_str()) {
                return Err(Error::invalid("username", "that is the host's checker account, not a team's"));
            }
            let live: Option<i64> =
                conn.query_row("SELECT id FROM allocations WHERE team_id = ?1 AND state <> 'released'", [team_id], |r| r.get(0)).optional()?;
            if let Some(existing) = live {
                return Err(Error::conflict(None, format!("the team already has lab allocation {existing}; release it first")));
            }
            let now = now_rfc3339();
            conn.execute(
                "INSERT INTO allocations (event_id, team_id, host_id, template, runtime, skeleton, gpus, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 'active', ?7, ?7)",
                params![event_id, team_id, req.host_id, name, runtime, skeleton, now],
            )?;
            let id = conn.last_insert_rowid();
            let access = labrack_provisioner::protocol::DesktopAccess {
                username: username.clone(),
                rdp_port: 0,
                ssh_port: ssh_port.unwrap_or(22),
                ssh_host_key,
                rdp_cert_sha256: None,
            };
            labs::store_desktop(conn, &secrets, id, &access, &req.password)?;
            audit::record(conn, &caller.actor(), &caller.meta, "allocation.registered_agentless", Some(&format!("allocation:{id}")),
                serde_json::json!({"team_id": team_id, "host_id": req.host_id, "template": name, "username": username}))?;
            load_view(conn, id)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Whether the caller may see this allocation: staff, or a participant of its team.
fn may_read(caller: &Caller, team_id: i64) -> Result<(), Error> {
    match &caller.principal {
        Principal::Staff { .. } => caller.require_staff(&roles::ALL_STAFF).map(|_| ()),
        Principal::Participant { team_id: own, .. } if *own == team_id => Ok(()),
        // Another team's lab looks exactly like a missing one.
        Principal::Participant { .. } => Err(Error::NotFound("allocation")),
    }
}

/// One allocation (staff, or its own team).
#[utoipa::path(get, path = "/v1/allocations/{allocation_id}", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 200, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_allocation(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<AllocationView>, Error> {
    let view = state.db.read(move |conn| load_view(conn, id)).await?;
    may_read(&caller, view.team_id)?;
    Ok(Json(view))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyAllocation {
    /// the team's current lab, if it has one that is not released
    pub allocation: Option<AllocationView>,
}

/// The participant's team's current lab.
#[utoipa::path(get, path = "/v1/me/allocation", tag = "labs", responses((status = 200, body = MyAllocation), (status = 403, body = Problem)))]
pub async fn my_allocation(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<MyAllocation>, Error> {
    let Principal::Participant { team_id, .. } = caller.principal else {
        return Err(Error::forbidden("only participants have a team lab"));
    };
    let allocation = state
        .db
        .read(move |conn| {
            let id: Option<i64> = conn
                .query_row(
                    "SELECT id FROM allocations WHERE team_id = ?1 AND state <> 'released'",
                    [team_id],
                    |r| r.get(0),
                )
                .optional()?;
            id.map(|id| load_view(conn, id)).transpose()
        })
        .await?;
    Ok(Json(MyAllocation { allocation }))
}

/// Which staff action on an allocation.
#[derive(Debug, Clone, Copy)]
enum Action {
    Reset,
    Release,
    ForceRelease,
    Resume,
}

async fn act(
    state: AppState,
    caller: Caller,
    id: i64,
    action: Action,
) -> Result<Json<AllocationView>, Error> {
    match action {
        // A team may reset its own lab; staff any.
        Action::Reset => {
            if let Principal::Participant { .. } = caller.principal {
            } else {
                caller.require_staff(&roles::OPERATORS)?;
            }
        }
        Action::Release | Action::Resume => {
            caller.require_staff(&roles::OPERATORS)?;
        }
        Action::ForceRelease => {
            caller.require_staff(&roles::ORGANIZERS)?;
        }
    }
    let secrets = state.secrets.clone();
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let stored = labs::load(conn, id)?.ok_or(Error::NotFound("allocation"))?;
            if let Principal::Participant { team_id, event_id, .. } = &caller.principal {
                if *team_id != stored.team_id {
                    return Err(Error::NotFound("allocation"));
                }
                crate::events::require_participants_work(conn, *event_id, "resetting the lab")?;
            }
            let agent: bool = conn.query_row("SELECT agent FROM hosts WHERE id = ?1", [stored.alloc.host_id], |r| r.get(0))?;
            let (input, verb) = match action {
                Action::Reset if !agent => {
                    return Err(Error::conflict(None, "this lab's host has no agent: reset the lab on the host itself"));
                }
                Action::Reset => (Input::ResetRequested, "allocation.reset_requested"),
                // No agent will remove anything: the appliance forgets the lab and its login.
                Action::Release if !agent => (Input::ForceRelease, "allocation.release_requested"),
                Action::Release => (Input::ReleaseRequested, "allocation.release_requested"),
                Action::ForceRelease => (Input::ForceRelease, "allocation.force_released"),
                Action::Resume => {
                    let healthy: bool = conn.query_row("SELECT healthy FROM hosts WHERE id = ?1", [stored.alloc.host_id], |r| r.get(0))?;
                    if !healthy {
                        return Err(Error::conflict(None, "the lab's host is still silent; resume the lab once it sends heartbeats again"));
                    }
                    (Input::Resume, "allocation.resumed")
                }
            };
            // Dry-run first so a refused action leaves no audit row behind.
            refuse_if_ignored(&stored.alloc, &input)?;
            audit::record(conn, &caller.actor(), &caller.meta, verb, Some(&format!("allocation:{id}")), serde_json::json!({}))?;
            labs::apply(conn, &secrets, id, input, unix_ms(), &caller.actor(), &caller.meta)?;
            load_view(conn, id)
        })
        .await?;
    // The desktop's session and password are about to change: new viewers start afresh.
    state.desktops.forget(id);
    state.wake_hosts();
    Ok(Json(view))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reassignment {
    /// the host to move to; when absent, the healthy host with the most room (never the
    /// lab's current host)
    #[serde(default)]
    pub host_id: Option<i64>,
}

/// Moves a team off a dead lab host (or out of a failed lab) in one step: the old lab is let
/// go without its host's help, as force-release does, and a fresh lab from the same template
/// is placed on another healthy host. A lab on a healthy host is reset or released instead.
#[utoipa::path(post, path = "/v1/allocations/{allocation_id}/reassign", tag = "labs", params(("allocation_id" = i64, Path)), request_body = Reassignment,
    responses((status = 201, body = AllocationView, description = "the team's new lab"), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn reassign(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<Reassignment>,
) -> Result<(StatusCode, Json<AllocationView>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let secrets = state.secrets.clone();
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let stored = labs::load(conn, id)?.ok_or(Error::NotFound("allocation"))?;
            super::people::open_event(conn, stored.event_id)?;
            let old_host = stored.alloc.host_id;
            let (host_name, host_healthy): (String, bool) = conn.query_row("SELECT name, healthy FROM hosts WHERE id = ?1", [old_host], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let state_now = labs::state_name(stored.alloc.state);
            let failed = matches!(stored.alloc.state, AllocationState::Failed | AllocationState::ReleaseFailed);
            if host_healthy && !failed {
                return Err(Error::conflict(None, format!("lab host {host_name} is healthy and the lab is {state_now}: reset it, or release it and allocate again")));
            }
            refuse_if_ignored(&stored.alloc, &Input::ForceRelease)?;
            let others: Vec<HostSlot> = host_slots(conn)?.into_iter().filter(|slot| slot.host_id != old_host).collect();
            let candidates: Vec<HostSlot> = match req.host_id {
                Some(wanted) if wanted == old_host => return Err(Error::invalid("host_id", "that is the lab's current host; choose another")),
                Some(wanted) => {
                    let slot = others.into_iter().find(|slot| slot.host_id == wanted).ok_or_else(|| Error::invalid("host_id", format!("no lab host {wanted} with an agent")))?;
                    vec![slot]
                }
                None => others,
            };
            let gpu_memory_mib: Option<i64> =
                conn.query_row("SELECT gpu_memory_mib FROM lab_templates WHERE name = ?1", [&stored.alloc.template], |r| r.get(0)).optional()?.flatten();
            let placed = inventory::place(&candidates, &stored.alloc.limits, stored.gpus, gpu_memory_mib.and_then(|m| u64::try_from(m).ok()))
                .map_err(|e| Error::conflict(Some("host_id"), format!("no other host can take the lab: {e}")))?;
            let new_host = placed.host_id;
            audit::record(conn, &caller.actor(), &caller.meta, "allocation.reassigned", Some(&format!("allocation:{id}")), serde_json::json!({"from_host": old_host, "to_host": new_host}))?;
            labs::apply(conn, &secrets, id, Input::ForceRelease, unix_ms(), &caller.actor(), &caller.meta)?;
            let a = &stored.alloc;
            let lab = NewLab {
                event_id: stored.event_id,
                team_id: stored.team_id,
                host_id: new_host,
                template: &a.template,
                runtime: &a.runtime,
                skeleton: &a.skeleton,
                limits: &a.limits,
                gpu_indices: &placed.gpus,
            };
            let fresh = create_lab(conn, &secrets, &caller, &lab, serde_json::json!({"reassigned_from": id}))?;
            load_view(conn, fresh)
        })
        .await?;
    state.desktops.forget(id);
    state.wake_hosts();
    Ok((StatusCode::CREATED, Json(view)))
}

/// Restores the lab from its template (ends the session, rotates the password).
#[utoipa::path(post, path = "/v1/allocations/{allocation_id}/reset", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 200, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn reset(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<AllocationView>, Error> {
    act(state, caller, id, Action::Reset).await
}

/// Releases the lab: the host removes its user and everything it owned.
#[utoipa::path(post, path = "/v1/allocations/{allocation_id}/release", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 200, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<AllocationView>, Error> {
    act(state, caller, id, Action::Release).await
}

/// Takes back a lab that failed because its host stayed silent past the grace, once the
/// host is heard again: the lab is active as it was (nothing was removed).
#[utoipa::path(post, path = "/v1/allocations/{allocation_id}/resume", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 200, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<AllocationView>, Error> {
    act(state, caller, id, Action::Resume).await
}

/// Marks the lab released without the host's help (the host is gone for good).
#[utoipa::path(post, path = "/v1/allocations/{allocation_id}/force-release", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 200, body = AllocationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn force_release(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<AllocationView>, Error> {
    act(state, caller, id, Action::ForceRelease).await
}
