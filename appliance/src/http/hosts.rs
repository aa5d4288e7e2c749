//! Lab hosts: enrolment tokens (staff), enrolment (token), and the host protocol —
//! long-polled tasks, task reports and heartbeats — where every call is signed with the
//! host's Ed25519 key.

use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, OriginalUri, Request, State};
use axum::http::{StatusCode, header};
use base64::Engine as _;
use labrack_provisioner::allocation::Input;
use labrack_provisioner::protocol::{
    self, EnrolRequest, EnrolResponse, HostTask, PROTOCOL_VERSION, PollRequest, PollResponse,
    TaskReport, Telemetry,
};
use labrack_provisioner::replay::{ReplayGuard, Verdict};
use ring::signature::{ED25519, UnparsedPublicKey};
use rusqlite::{OptionalExtension as _, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Caller, hash_secret, random_token};
use super::extract::{ApiJson, RequestMeta, parse_json, read_limited, require_content_type};
use super::problem::Problem;
use crate::audit;
use crate::clock::unix_ms;
use crate::clock::{format_time, now_rfc3339};
use crate::error::Error;
use crate::labs;
use labrack_provisioner::roles;

/// Largest body a host may send (telemetry of a many-GPU host fits easily).
const HOST_BODY_LIMIT: usize = 256 * 1024;
/// Longest a poll may wait.
const MAX_POLL_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnrolmentToken {
    /// lifetime in seconds, 60 to 604800 (a week); default 3600
    #[schema(minimum = 60, maximum = 604_800)]
    pub ttl_secs: Option<u64>,
    /// what the token is for, e.g. the rack slot
    #[schema(max_length = 200)]
    pub note: Option<String>,
}

/// A one-time enrolment token, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedEnrolmentToken {
    pub token: String,
    pub expires_at: String,
}

/// Creates a one-time, expiring enrolment token for `labrack-host enrol`.
#[utoipa::path(post, path = "/v1/hosts/enrolment-tokens", tag = "hosts", request_body = NewEnrolmentToken,
    responses((status = 201, body = IssuedEnrolmentToken), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn create_enrolment_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewEnrolmentToken>,
) -> Result<(StatusCode, Json<IssuedEnrolmentToken>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let ttl = req.ttl_secs.unwrap_or(3600);
    if !(60..=604_800).contains(&ttl) {
        return Err(Error::invalid(
            "ttl_secs",
            "must be between 60 and 604800 seconds",
        ));
    }
    let note = match req.note {
        Some(note) => Some(super::validate::name("note", &note, 200)?),
        None => None,
    };
    let token = format!("lrh_{}", random_token());
    let hash = enrolment_token_hash(&state.secrets, &token);
    let expires_ms = unix_ms().saturating_add(ttl * 1000);
    let expires_at = format_time(
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(expires_ms / 1000).unwrap_or(0))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    );
    state
        .db
        .writer()
        .write(move |conn| {
            conn.execute(
                "INSERT INTO enrolment_tokens (token_hash, note, created_by, created_at, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, note, caller.actor(), now_rfc3339(), i64::try_from(expires_ms).unwrap_or(i64::MAX)],
            )?;
            let id = conn.last_insert_rowid();
            audit::record(conn, &caller.actor(), &caller.meta, "host.enrolment_token_created", Some(&format!("enrolment_token:{id}")), serde_json::json!({"ttl_secs": ttl, "note": note}))?;
            Ok::<_, Error>(())
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedEnrolmentToken { token, expires_at }),
    ))
}

/// An enrolled host as staff see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HostView {
    pub id: i64,
    pub name: String,
    pub address: String,
    pub gpus: u32,
    pub capacity: u32,
    /// labs on it that are not released
    pub labs_in_use: u32,
    pub healthy: bool,
    pub last_seen_at: String,
    pub enrolled_at: String,
    /// false for a host registered without the labrack-host agent (checks reach it over SSH)
    pub agent: bool,
    /// the last telemetry sample (CPU, memory, disks, GPUs), as the host sent it
    #[schema(value_type = Object)]
    pub telemetry: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<HostView>,
    /// hosts send telemetry this often; three missed beats mark one unhealthy
    pub heartbeat_secs: u64,
}

/// Lists enrolled hosts with health, capacity and telemetry.
#[utoipa::path(get, operation_id = "list_hosts", path = "/v1/hosts", tag = "hosts", responses((status = 200, body = HostList), (status = 403, body = Problem)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<HostList>, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let hosts = state
        .db
        .read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT h.id, h.name, h.address, h.gpus, h.capacity,
                        (SELECT count(*) FROM allocations a WHERE a.host_id = h.id AND a.state <> 'released'),
                        h.healthy, h.last_seen_ms, h.enrolled_at, h.telemetry, h.agent
                 FROM hosts h ORDER BY h.name",
            )?;
            let rows = stmt.query_map([], |r| {
                let last_seen: i64 = r.get(7)?;
                let telemetry: Option<String> = r.get(9)?;
                Ok(HostView {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    address: r.get(2)?,
                    gpus: r.get(3)?,
                    capacity: r.get(4)?,
                    labs_in_use: r.get(5)?,
                    healthy: r.get(6)?,
                    last_seen_at: format_time(
                        time::OffsetDateTime::from_unix_timestamp(last_seen / 1000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                    ),
                    enrolled_at: r.get(8)?,
                    agent: r.get(10)?,
                    telemetry: telemetry.and_then(|t| serde_json::from_str(&t).ok()),
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(HostList {
        hosts,
        heartbeat_secs: state.heartbeat.as_secs(),
    }))
}

/// The stored hash of an enrolment token: keyed, like join codes (tokens made before that
/// are plain SHA-256 and still accepted until they expire).
fn enrolment_token_hash(secrets: &crate::secrets::SecretBox, token: &str) -> String {
    secrets.code_hash("enrolment token", token)
}

/// Trades a one-time enrolment token for a host identity (its public key).
#[utoipa::path(post, path = "/v1/hosts/enrol", tag = "hosts", request_body(content = Object, content_type = "application/json", description = "EnrolRequest of the host protocol"),
    responses((status = 201, description = "EnrolResponse"), (status = 401, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn enrol(
    State(state): State<AppState>,
    meta: RequestMeta,
    ApiJson(req): ApiJson<EnrolRequest>,
) -> Result<(StatusCode, Json<EnrolResponse>), Error> {
    let keys = [(meta.client_key(), crate::attempts::ENROL_CLIENT)];
    if let Err(refused) = state.attempts.begin(&keys) {
        if refused.first {
            let detail =
                serde_json::json!({"retry_after_secs": refused.retry_after.as_secs().max(1)});
            super::session::audit_refused(&state, &meta, "host.enrol_lockout", None, detail).await;
        }
        return Err(refused.into());
    }
    let name: String = req.name.chars().take(64).collect();
    let result = enrol_counted(&state, meta.clone(), req).await;
    // only a wrong token is a guess
    match &result {
        Ok(_) => state.attempts.succeeded(&[keys[0].0.clone()]),
        Err(Error::Unauthenticated(_)) => {
            super::session::audit_refused(
                &state,
                &meta,
                "host.enrol_failed",
                None,
                serde_json::json!({"name": name}),
            )
            .await;
        }
        Err(_) => state.attempts.refund(&keys),
    }
    result
}

async fn enrol_counted(
    state: &AppState,
    meta: RequestMeta,
    req: EnrolRequest,
) -> Result<(StatusCode, Json<EnrolResponse>), Error> {
    if req.version != PROTOCOL_VERSION {
        return Err(Error::invalid(
            "version",
            format!(
                "protocol version {} is not supported (this appliance speaks {PROTOCOL_VERSION})",
                req.version
            ),
        ));
    }
    let name = super::validate::name("name", &req.name, 64)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(Error::invalid(
            "name",
            "use letters, digits, '-', '_' and '.' only",
        ));
    }
    let public_key = base64::engine::general_purpose::STANDARD
        .decode(req.public_key.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            Error::invalid(
                "public_key",
                "must be a base64 Ed25519 public key (32 bytes)",
            )
        })?;
    let address = super::validate::name("address", &req.address, 253)?;
    if !address
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err(Error::invalid(
            "address",
            "must be a host name or IP address",
        ));
    }
    check_resources(&req.resources)?;
    if !(1..=256).contains(&req.capacity) {
        return Err(Error::invalid("capacity", "must be between 1 and 256"));
    }
    let token_hash = enrolment_token_hash(&state.secrets, req.token.trim());
    let legacy_hash = hash_secret(req.token.trim());
    let now = unix_ms();
    let (gpus, capacity) = (req.resources.gpus, req.capacity);
    let resources =
        serde_json::to_string(&req.resources).map_err(|e| Error::Internal(e.to_string()))?;
    let result = state
        .db
        .writer()
        .write(move |conn| {
            let token: Option<(i64, i64, Option<String>)> = conn
                .query_row("SELECT id, expires_at_ms, used_at FROM enrolment_tokens WHERE token_hash IN (?1, ?2)", [&token_hash, &legacy_hash], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let token_id = match token {
                None => return Err(Error::Unauthenticated("unknown enrolment token".into())),
                Some((_, _, Some(_))) => return Err(Error::Unauthenticated("this enrolment token was already used".into())),
                Some((_, expires, None)) if expires <= i64::try_from(now).unwrap_or(i64::MAX) => {
                    return Err(Error::Unauthenticated("this enrolment token has expired".into()));
                }
                Some((id, _, None)) => id,
            };
            let taken: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM hosts WHERE name = ?1)", [&name], |r| r.get(0))?;
            if taken {
                return Err(Error::conflict(Some("name"), format!("a host named {name:?} is already enrolled")));
            }
            conn.execute(
                "INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms, resources) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![name, public_key, address, gpus, capacity, now_rfc3339(), i64::try_from(now).unwrap_or(i64::MAX), resources],
            )?;
            let host_id = conn.last_insert_rowid();
            conn.execute("UPDATE enrolment_tokens SET used_at = ?2, host_id = ?3 WHERE id = ?1", params![token_id, now_rfc3339(), host_id])?;
            audit::record(conn, &format!("host:{host_id}"), &meta, "host.enrolled", Some(&format!("host:{host_id}")), serde_json::json!({"name": name, "address": address, "gpus": gpus, "capacity": capacity}))?;
            Ok(host_id)
        })
        .await
        .map_err(Error::from);
    let host_id = result?;
    Ok((
        StatusCode::CREATED,
        Json(EnrolResponse {
            host_id,
            heartbeat_secs: u32::try_from(state.heartbeat.as_secs()).unwrap_or(5),
        }),
    ))
}

/// What a host says it has: sane numbers only.
fn check_resources(resources: &labrack_provisioner::limits::HostResources) -> Result<(), Error> {
    if !(1..=4096).contains(&resources.cpus) {
        return Err(Error::invalid(
            "resources.cpus",
            "must be between 1 and 4096",
        ));
    }
    if !(64..=64 * 1024 * 1024).contains(&resources.memory_mib) {
        return Err(Error::invalid(
            "resources.memory_mib",
            "must be between 64 MiB and 64 TiB",
        ));
    }
    if resources.gpus > 64 {
        return Err(Error::invalid("resources.gpus", "at most 64"));
    }
    if resources.isolation.is_empty()
        || resources.isolation.len() > 40
        || !resources
            .isolation
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(Error::invalid(
            "resources.isolation",
            "a short name such as cgroup-v1",
        ));
    }
    if resources.enforces.len() > 16 {
        return Err(Error::invalid("resources.enforces", "at most 16 entries"));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgentlessHost {
    /// the host's name in the inventory (unique)
    #[schema(max_length = 64)]
    pub name: String,
    /// where the appliance reaches its SSH server
    #[schema(max_length = 253)]
    pub address: String,
    /// default 22
    #[schema(minimum = 1)]
    pub ssh_port: Option<u16>,
    /// the SSH server's public host key (an OpenSSH line, e.g. from `ssh-keyscan`): every
    /// connection is checked against it
    pub ssh_host_key: String,
    /// how many labs it holds; default 1
    #[schema(minimum = 1, maximum = 256)]
    pub capacity: Option<u32>,
    /// the account checks run as (never the team's): a user of its own with a forced
    /// command (see the README); without one, labs whose template has checks are refused
    #[serde(default)]
    pub checker: Option<CheckerAccount>,
}

/// A host's checker account; its password is stored encrypted and used by the appliance only.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckerAccount {
    #[schema(pattern = "^\\s*[a-z_][a-z0-9_-]{0,31}\\s*$")]
    pub username: String,
    #[schema(min_length = 1, max_length = 256)]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentlessHost {
    pub id: i64,
    pub name: String,
    /// whether checks can run there
    pub checker: bool,
}

/// Registers a host that runs no labrack-host agent: its labs are registered by staff and
/// their checks run over SSH from the appliance.
#[utoipa::path(post, path = "/v1/hosts/agentless", tag = "hosts", request_body = NewAgentlessHost,
    responses((status = 201, body = AgentlessHost), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn register_agentless(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewAgentlessHost>,
) -> Result<(StatusCode, Json<AgentlessHost>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    let name = super::validate::name("name", &req.name, 64)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(Error::invalid(
            "name",
            "use letters, digits, '-', '_' and '.' only",
        ));
    }
    let address = super::validate::name("address", &req.address, 253)?;
    if !address
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err(Error::invalid(
            "address",
            "must be a host name or IP address",
        ));
    }
    let key = req.ssh_host_key.trim().to_owned();
    let mut parts = key.split_whitespace();
    let valid_key = matches!(parts.next(), Some(kind) if kind.starts_with("ssh-") || kind.starts_with("ecdsa-"))
        && parts.next().is_some_and(|blob| {
            base64::engine::general_purpose::STANDARD
                .decode(blob)
                .is_ok_and(|b| b.len() >= 32)
        });
    if !valid_key || key.len() > 4096 {
        return Err(Error::invalid(
            "ssh_host_key",
            "must be an OpenSSH public key line, e.g. `ssh-ed25519 AAAA…`",
        ));
    }
    let port = req.ssh_port.unwrap_or(22);
    if port == 0 {
        return Err(Error::invalid("ssh_port", "must be 1–65535"));
    }
    let capacity = req.capacity.unwrap_or(1);
    if !(1..=256).contains(&capacity) {
        return Err(Error::invalid("capacity", "must be between 1 and 256"));
    }
    let checker = match req.checker {
        Some(account) => {
            let user = super::labs::unix_user("checker.username", &account.username)?;
            if account.password.is_empty() || account.password.len() > 256 {
                return Err(Error::invalid("checker.password", "1–256 characters"));
            }
            Some((user, account.password))
        }
        None => None,
    };
    let secrets = state.secrets.clone();
    let view = state
        .db
        .writer()
        .write(move |conn| {
            let taken: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM hosts WHERE name = ?1)", [&name], |r| r.get(0))?;
            if taken {
                return Err(Error::conflict(Some("name"), format!("a host named {name:?} is already registered")));
            }
            // No heartbeat comes from such a host: it counts as seen now and is never aged out.
            conn.execute(
                "INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms, agent, ssh_port, ssh_host_key)
                 VALUES (?1, x'', ?2, 0, ?3, ?4, ?5, 0, ?6, ?7)",
                params![name, address, capacity, now_rfc3339(), crate::clock::now_ms(), port, key],
            )?;
            let id = conn.last_insert_rowid();
            if let Some((user, password)) = &checker {
                let sealed = secrets.seal(&labs::checker_context(id), password.as_bytes()).map_err(|e| Error::Internal(e.to_string()))?;
                conn.execute("UPDATE hosts SET checker_user = ?2, checker_secret = ?3 WHERE id = ?1", params![id, user, sealed])?;
            }
            let checker_user = checker.as_ref().map(|(user, _)| user.clone());
            audit::record(conn, &caller.actor(), &caller.meta, "host.registered_agentless", Some(&format!("host:{id}")), serde_json::json!({"name": name, "address": address, "checker": checker_user}))?;
            Ok(AgentlessHost { id, name, checker: checker.is_some() })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// A call signed by an enrolled host, with its JSON body parsed strictly. Every call is
/// taken once: a replay is refused, and an identity used from two machines at once is
/// refused and reported to staff.
#[derive(Debug)]
pub struct HostCall<T> {
    pub host_id: i64,
    pub body: T,
    pub meta: RequestMeta,
    /// the calling agent's instance and the highest counter taken from it, to store
    pub position: (String, u64),
}

impl<T: DeserializeOwned> FromRequest<AppState> for HostCall<T> {
    type Rejection = super::problem::Rejection;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let meta = super::extract::request_meta(&parts);
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(protocol::parse_host_auth)
            .ok_or_else(|| {
                Error::Unauthenticated(format!(
                    "host calls need `Authorization: {} host=ID,ts=MS,sig=BASE64`",
                    protocol::HOST_AUTH_SCHEME
                ))
            })?;
        let protocol::HostAuth {
            host_id,
            timestamp_ms,
            instance,
            counter,
            signature,
        } = auth;
        if unix_ms().abs_diff(timestamp_ms) > protocol::HOST_CLOCK_SKEW_MS {
            return Err(Error::Unauthenticated(
                "the signed timestamp is too far from the appliance's clock".into(),
            )
            .into());
        }
        let path = parts
            .extensions
            .get::<OriginalUri>()
            .map_or_else(|| parts.uri.path().to_owned(), |u| u.path().to_owned());
        let method = parts.method.as_str().to_owned();
        require_content_type(&parts.headers, "application/json")?;
        let bytes = read_limited(Request::from_parts(parts, body), HOST_BODY_LIMIT).await?;
        // A host registered without an agent has no key: it can never sign a call.
        let known: Option<(Vec<u8>, Option<String>, i64)> = state
            .db
            .read(move |conn| {
                conn.query_row("SELECT public_key, instance, instance_counter FROM hosts WHERE id = ?1 AND agent = 1", [host_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(Error::from)
            })
            .await?;
        let (public_key, stored_instance, stored_counter) =
            known.ok_or_else(|| Error::Unauthenticated("unknown host: enrol first".into()))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| Error::Unauthenticated("the signature is not base64".into()))?;
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        let message =
            protocol::signing_message(&method, &path, timestamp_ms, &instance, counter, &digest);
        UnparsedPublicKey::new(&ED25519, &public_key)
            .verify(&message, &signature)
            .map_err(|_| Error::Unauthenticated("bad host signature".into()))?;
        let (verdict, position) = {
            let mut guards = state
                .host_calls
                .lock()
                .map_err(|_| Error::Internal("the host-call guard is poisoned".into()))?;
            let guard = guards.entry(host_id).or_insert_with(|| {
                ReplayGuard::resume(stored_instance, u64::try_from(stored_counter).unwrap_or(0))
            });
            let verdict = guard.check(&instance, counter);
            let (current, highest) = guard.position();
            (verdict, (current.unwrap_or_default().to_owned(), highest))
        };
        match verdict {
            Verdict::Accept => {}
            Verdict::Replay => {
                return Err(Error::Unauthenticated(
                    "this signed call was taken before: a replay is refused".into(),
                )
                .into());
            }
            Verdict::TwoMachines { other } => {
                record_identity_conflict(state, host_id, &instance, &other, &meta).await;
                return Err(Error::conflict(
                    None,
                    format!(
                        "this host identity is in use by another machine (agent {other}); staff have been alerted — enrol this machine with a token of its own"
                    ),
                ).into());
            }
        }
        if let Ok(ip) = meta.remote_addr.parse() {
            // its connections now draw on the capacity kept for lab hosts
            state.connections.note_host(ip);
        }
        let body = parse_json(&bytes)?;
        Ok(Self {
            host_id,
            body,
            meta,
            position,
        })
    }
}

/// Marks the host as used by two machines (once a minute at most) for staff to see.
async fn record_identity_conflict(
    state: &AppState,
    host_id: i64,
    instance: &str,
    other: &str,
    meta: &RequestMeta,
) {
    let (instance, other, meta) = (instance.to_owned(), other.to_owned(), meta.clone());
    let now = crate::clock::now_ms();
    let recorded = state
        .db
        .writer()
        .write(move |conn| {
            let last: Option<i64> = conn.query_row(
                "SELECT identity_conflict_ms FROM hosts WHERE id = ?1",
                [host_id],
                |r| r.get(0),
            )?;
            if last.is_some_and(|at| now - at < 60_000) {
                return Ok::<_, Error>(());
            }
            conn.execute(
                "UPDATE hosts SET identity_conflict_ms = ?2 WHERE id = ?1",
                params![host_id, now],
            )?;
            audit::record(
                conn,
                &format!("host:{host_id}"),
                &meta,
                "host.identity_conflict",
                Some(&format!("host:{host_id}")),
                serde_json::json!({"instance": instance, "current": other}),
            )?;
            Ok(())
        })
        .await;
    tracing::error!(
        host_id,
        "one lab-host identity is used from two machines at once"
    );
    if let Err(error) = recorded {
        tracing::error!(host_id, error = ?Error::from(error), "could not record the identity conflict");
    }
}

/// Stores the instance and counter a host's calls reached, so a restarted appliance still
/// refuses their replays. In the caller's write.
fn store_position(
    conn: &rusqlite::Connection,
    host_id: i64,
    position: &(String, u64),
) -> Result<(), Error> {
    conn.prepare_cached("UPDATE hosts SET instance = ?2, instance_counter = max(CASE WHEN instance IS ?2 THEN instance_counter ELSE 0 END, ?3) WHERE id = ?1")?
        .execute(params![host_id, position.0, i64::try_from(position.1).unwrap_or(i64::MAX)])?;
    Ok(())
}

fn pending_tasks(
    conn: &rusqlite::Connection,
    secrets: &crate::secrets::SecretBox,
    host_id: i64,
) -> Result<Vec<HostTask>, Error> {
    let rows: Vec<(String, String)> = conn
        .prepare_cached("SELECT id, body FROM host_tasks WHERE host_id = ?1 AND done_ms IS NULL ORDER BY created_ms, id")?
        .query_map([host_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut tasks = Vec::with_capacity(rows.len());
    for (id, body) in rows {
        let mut task: HostTask =
            serde_json::from_str(&body).map_err(|e| Error::Internal(e.to_string()))?;
        // The password a task sets travels only in the answer to its own host.
        if let Some(slot) = task.kind.password_mut() {
            slot.0 = labs::task_password(conn, secrets, &id)?.unwrap_or_default();
        }
        tasks.push(task);
    }
    Ok(tasks)
}

/// Long poll: the host's pending tasks, as soon as there is one or after `wait_ms`.
#[utoipa::path(post, path = "/v1/host/poll", tag = "hosts", request_body(content = Object, description = "PollRequest (signed)"),
    responses((status = 200, description = "PollResponse"), (status = 401, body = Problem)))]
pub async fn poll(
    State(state): State<AppState>,
    call: HostCall<PollRequest>,
) -> Result<Json<PollResponse>, Error> {
    if call.body.version != PROTOCOL_VERSION {
        return Err(Error::invalid(
            "version",
            format!("this appliance speaks protocol version {PROTOCOL_VERSION}"),
        ));
    }
    let wait = Duration::from_millis(call.body.wait_ms).min(MAX_POLL_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut wake = state.host_wake.subscribe();
    let mut shutdown = state.shutdown.subscribe();
    let host_id = call.host_id;
    let running = std::sync::Arc::new(call.body.running);
    loop {
        wake.borrow_and_update();
        let secrets = state.secrets.clone();
        let mut tasks = state
            .db
            .read(move |conn| pending_tasks(conn, &secrets, host_id))
            .await?;
        // Checks the host is running now are not news to it.
        tasks.retain(|task| !running.contains(&task.id));
        if !tasks.is_empty() || tokio::time::Instant::now() >= deadline || *shutdown.borrow() {
            return Ok(Json(PollResponse { tasks }));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = wake.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }
}

/// A host task's row, as a report needs it.
struct StoredTask {
    host_id: i64,
    allocation_id: i64,
    done: bool,
    check_run_id: Option<i64>,
    /// a release waiting for a force-released lab's host to come back
    cleanup: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReportAck {
    /// false when the report was a duplicate or the task had been withdrawn
    pub applied: bool,
}

/// A host reports how one of its tasks ended. Idempotent: a repeated report is
/// acknowledged and changes nothing.
#[utoipa::path(post, path = "/v1/host/report", tag = "hosts", request_body(content = Object, description = "TaskReport (signed)"),
    responses((status = 200, body = ReportAck), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn report(
    State(state): State<AppState>,
    call: HostCall<TaskReport>,
) -> Result<Json<ReportAck>, Error> {
    let report = call.body;
    if report.version != PROTOCOL_VERSION {
        return Err(Error::invalid(
            "version",
            format!("this appliance speaks protocol version {PROTOCOL_VERSION}"),
        ));
    }
    let host_id = call.host_id;
    let meta = call.meta;
    let position = call.position;
    let secrets = state.secrets.clone();
    let (applied, issued, checked) = state
        .db
        .writer()
        .write(move |conn| {
            let task = conn
                .query_row("SELECT host_id, allocation_id, done_ms, check_run_id, cleanup FROM host_tasks WHERE id = ?1", [&report.id.0], |r| {
                    Ok(StoredTask { host_id: r.get(0)?, allocation_id: r.get(1)?, done: r.get::<_, Option<i64>>(2)?.is_some(), check_run_id: r.get(3)?, cleanup: r.get(4)? })
                })
                .optional()?;
            // Another host's task looks exactly like a missing one.
            let StoredTask { allocation_id, done, check_run_id, cleanup, .. } = match task {
                Some(task) if task.host_id == host_id => task,
                _ => return Err(Error::NotFound("task")),
            };
            store_position(conn, host_id, &position)?;
            if done {
                return Ok((false, false, false));
            }
            let now = unix_ms();
            let mut recorded = report.outcome.clone();
            match &mut recorded {
                // the password goes only into the sealed column
                protocol::TaskOutcome::Succeeded { desktop } => *desktop = None,
                // the output is kept once, with the check run
                protocol::TaskOutcome::Checked { check } => check.output.clear(),
                protocol::TaskOutcome::Failed { .. } => {}
            }
            let now_i64 = i64::try_from(now).unwrap_or(i64::MAX);
            conn.execute(
                "UPDATE host_tasks SET done_ms = ?2, outcome = ?3 WHERE id = ?1",
                params![report.id.0, now_i64, serde_json::to_string(&recorded).unwrap_or_default()],
            )?;
            if let Some(run_id) = check_run_id {
                crate::checks::record_report(conn, run_id, &report.outcome, now_i64)?;
                return Ok((true, false, true));
            }
            if cleanup {
                // The host came back and removed a force-released lab; a failure is retried
                // by the host's next start (it reports every lab it still holds).
                let outcome = serde_json::to_value(&recorded).unwrap_or_default();
                audit::record(conn, &format!("host:{host_id}"), &meta, "allocation.cleaned_up", Some(&format!("allocation:{allocation_id}")), serde_json::json!({"outcome": outcome}))?;
                return Ok((true, false, false));
            }
            let applied = labs::apply(conn, &secrets, allocation_id, Input::Report { id: report.id, outcome: report.outcome }, now, &format!("host:{host_id}"), &meta)?;
            Ok::<_, Error>((applied.ignored.is_none(), applied.issued, false))
        })
        .await?;
    if issued {
        state.wake_hosts();
    }
    if checked {
        state.check_reported.send_modify(|n| *n = n.wrapping_add(1));
    }
    Ok(Json(ReportAck { applied }))
}

/// How often one lab's GPU memory alert may repeat while it stays over its limit.
const GPU_ALERT_EVERY_MS: i64 = 10 * 60 * 1000;

/// Raises a staff alert for each lab of this host whose GPU memory is over its template's
/// `gpu_memory_mib` (where MIG cannot enforce it, NVML watches it). A host speaks only for
/// its own active labs.
fn watch_gpu_memory(
    conn: &rusqlite::Connection,
    host_id: i64,
    usage: &[protocol::LabUsage],
    now: i64,
) -> Result<(), Error> {
    for lab in usage.iter().take(256) {
        let limit: Option<(i64, i64, Option<i64>)> = conn
            .query_row(
                "SELECT a.event_id, a.team_id, t.gpu_memory_mib FROM allocations a LEFT JOIN lab_templates t ON t.name = a.template
                 WHERE a.id = ?1 AND a.host_id = ?2 AND a.state = 'active'",
                params![lab.allocation_id, host_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((event_id, team_id, Some(limit_mib))) = limit else {
            continue;
        };
        let used_mib = i64::try_from(lab.gpu_memory_bytes / (1024 * 1024)).unwrap_or(i64::MAX);
        if used_mib <= limit_mib {
            continue;
        }
        let recent: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM alerts WHERE kind = 'gpu_memory_over_limit' AND team_id = ?1 AND created_ms > ?2)",
            params![team_id, now - GPU_ALERT_EVERY_MS],
            |r| r.get(0),
        )?;
        if recent {
            continue;
        }
        let detail = serde_json::json!({"allocation_id": lab.allocation_id, "used_mib": used_mib, "limit_mib": limit_mib, "gpus": lab.gpus,
            "message": format!("lab {} uses {used_mib} MiB of GPU memory; its template allows {limit_mib} MiB", lab.allocation_id)});
        conn.execute(
            "INSERT INTO alerts (event_id, team_id, kind, detail, created_ms) VALUES (?1, ?2, 'gpu_memory_over_limit', ?3, ?4)",
            params![event_id, team_id, detail.to_string(), now],
        )?;
    }
    Ok(())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatAck {
    pub heartbeat_secs: u64,
}

/// Heartbeat with a telemetry sample.
#[utoipa::path(post, path = "/v1/host/heartbeat", tag = "hosts", request_body(content = Object, description = "Telemetry (signed)"),
    responses((status = 200, body = HeartbeatAck), (status = 401, body = Problem)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    call: HostCall<Telemetry>,
) -> Result<Json<HeartbeatAck>, Error> {
    if call.body.version != PROTOCOL_VERSION {
        return Err(Error::invalid(
            "version",
            format!("this appliance speaks protocol version {PROTOCOL_VERSION}"),
        ));
    }
    check_resources(&call.body.resources)?;
    let host_id = call.host_id;
    let meta = call.meta;
    let position = call.position;
    let sample = serde_json::to_string(&call.body).map_err(|e| Error::Internal(e.to_string()))?;
    let resources =
        serde_json::to_string(&call.body.resources).map_err(|e| Error::Internal(e.to_string()))?;
    let gpus = call.body.resources.gpus;
    let usage = call.body.labs;
    state
        .db
        .writer()
        .write(move |conn| {
            let was_healthy: bool = conn.query_row("SELECT healthy FROM hosts WHERE id = ?1", [host_id], |r| r.get(0))?;
            let now = crate::clock::now_ms();
            conn.execute(
                "UPDATE hosts SET last_seen_ms = ?2, healthy = 1, telemetry = ?3, resources = ?4, gpus = ?5 WHERE id = ?1",
                params![host_id, now, sample, resources, gpus],
            )?;
            store_position(conn, host_id, &position)?;
            watch_gpu_memory(conn, host_id, &usage, now)?;
            if !was_healthy {
                audit::record(conn, &format!("host:{host_id}"), &meta, "host.recovered", Some(&format!("host:{host_id}")), serde_json::json!({}))?;
            }
            Ok::<_, Error>(())
        })
        .await?;
    Ok(Json(HeartbeatAck {
        heartbeat_secs: state.heartbeat.as_secs(),
    }))
}
