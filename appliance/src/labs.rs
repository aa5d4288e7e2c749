//! Lab allocations in SQLite: loading and saving the provisioner's pure state machine,
//! turning its outputs into host-task rows, sealed credentials and audit rows, and the
//! reconciler loop that drives time (retries) and host health.
//!
//! Architecture invariant: an allocation changes only through [`apply`], inside a writer
//! closure, so its state, its tasks and its audit rows always commit together.

use std::time::Duration;

use labrack_provisioner::allocation::{
    self, Allocation, AllocationState, Input, Output, RetryPolicy,
};
use labrack_provisioner::limits::LabLimits;
use labrack_provisioner::protocol::{DesktopAccess, HostTask, Password, TaskId};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::audit;
use crate::audit::RequestMeta;
use crate::error::Error;
use crate::secrets::SecretBox;

/// How the reconciler signs its audit rows.
pub const RECONCILER: &str = "system:reconciler";

/// The allocation as stored, with what the state machine does not need.
#[derive(Debug, Clone)]
pub struct StoredAllocation {
    pub alloc: Allocation,
    pub event_id: i64,
    pub team_id: i64,
    pub gpus: u32,
}

pub fn state_name(state: AllocationState) -> &'static str {
    match state {
        AllocationState::Requested => "requested",
        AllocationState::Provisioning => "provisioning",
        AllocationState::Active => "active",
        AllocationState::Releasing => "releasing",
        AllocationState::Released => "released",
        AllocationState::Failed => "failed",
        AllocationState::ReleaseFailed => "release_failed",
        AllocationState::Unreachable => "unreachable",
    }
}

pub fn parse_state(text: &str) -> Option<AllocationState> {
    Some(match text {
        "requested" => AllocationState::Requested,
        "provisioning" => AllocationState::Provisioning,
        "active" => AllocationState::Active,
        "releasing" => AllocationState::Releasing,
        "released" => AllocationState::Released,
        "failed" => AllocationState::Failed,
        "release_failed" => AllocationState::ReleaseFailed,
        "unreachable" => AllocationState::Unreachable,
        _ => return None,
    })
}

pub fn load(conn: &Connection, id: i64) -> Result<Option<StoredAllocation>, Error> {
    let row = conn
        .prepare_cached(
            "SELECT id, host_id, template, runtime, skeleton, state, attempt, in_flight, retry_at_ms, reason, event_id, team_id, gpus,
                    tasks_issued, limits, gpu_indices, resume_to, unreachable_since_ms
             FROM allocations WHERE id = ?1",
        )?
        .query_row([id], |r| {
            let state: String = r.get(5)?;
            let attempt: i64 = r.get(6)?;
            let retry_at: Option<i64> = r.get(8)?;
            let gpus: i64 = r.get(12)?;
            let tasks_issued: i64 = r.get(13)?;
            // Labs made before templates had limits run with the defaults.
            let limits: Option<String> = r.get(14)?;
            let limits: LabLimits = limits.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default();
            let gpu_indices: String = r.get(15)?;
            let resume_to: Option<String> = r.get(16)?;
            let unreachable_since: Option<i64> = r.get(17)?;
            Ok((
                Allocation {
                    id: r.get(0)?,
                    host_id: r.get(1)?,
                    template: r.get(2)?,
                    runtime: r.get(3)?,
                    skeleton: r.get(4)?,
                    limits,
                    gpu_indices: serde_json::from_str(&gpu_indices).unwrap_or_default(),
                    state: parse_state(&state).unwrap_or(AllocationState::Failed),
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    tasks_issued: u32::try_from(tasks_issued).unwrap_or(0),
                    in_flight: r.get::<_, Option<String>>(7)?.map(TaskId),
                    retry_at_ms: retry_at.and_then(|v| u64::try_from(v).ok()),
                    reason: r.get(9)?,
                    resume_to: resume_to.as_deref().and_then(parse_state),
                    unreachable_since_ms: unreachable_since.and_then(|v| u64::try_from(v).ok()),
                },
                r.get(10)?,
                r.get(11)?,
                u32::try_from(gpus).unwrap_or(0),
            ))
        })
        .optional()?;
    Ok(
        row.map(|(alloc, event_id, team_id, gpus)| StoredAllocation {
            alloc,
            event_id,
            team_id,
            gpus,
        }),
    )
}

fn save(conn: &Connection, alloc: &Allocation) -> Result<(), Error> {
    conn.prepare_cached(
        "UPDATE allocations SET state = ?2, attempt = ?3, in_flight = ?4, retry_at_ms = ?5, reason = ?6, updated_at = ?7, tasks_issued = ?8,
                                resume_to = ?9, unreachable_since_ms = ?10
         WHERE id = ?1",
    )?
    .execute(params![
        alloc.id,
        state_name(alloc.state),
        alloc.attempt,
        alloc.in_flight.as_ref().map(|t| t.0.as_str()),
        alloc.retry_at_ms.and_then(|v| i64::try_from(v).ok()),
        alloc.reason,
        crate::clock::now_rfc3339(),
        alloc.tasks_issued,
        alloc.resume_to.map(state_name),
        alloc.unreachable_since_ms.and_then(|v| i64::try_from(v).ok()),
    ])?;
    Ok(())
}

/// The associated data a desktop password is sealed with.
pub fn secret_context(allocation_id: i64) -> String {
    format!("allocation:{allocation_id}:desktop-password")
}

/// The associated data of the password a host task carries, sealed in its row until the
/// host reports the task.
pub fn task_secret_context(task_id: &str) -> String {
    format!("host_task:{task_id}:password")
}

/// A fresh desktop password: 20 characters without look-alikes (about 116 bits).
pub fn generate_password() -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..20)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// Stores a host task: a password it carries is sealed into its own column and left out
/// of the body, so no task body in the database holds a secret.
pub fn insert_task(
    conn: &Connection,
    secrets: &SecretBox,
    task: &HostTask,
    allocation_id: i64,
    cleanup: bool,
    now_ms: i64,
) -> Result<(), Error> {
    let mut stored = task.clone();
    let secret = match stored.kind.password_mut() {
        Some(password) if !password.0.is_empty() => {
            let sealed = secrets
                .seal(&task_secret_context(&task.id.0), password.0.as_bytes())
                .map_err(|e| Error::Internal(e.to_string()))?;
            *password = Password::default();
            Some(sealed)
        }
        _ => None,
    };
    let body = serde_json::to_string(&stored).map_err(|e| Error::Internal(e.to_string()))?;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO host_tasks (id, host_id, allocation_id, body, created_ms, secret, cleanup) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![task.id.0, task.host_id, allocation_id, body, now_ms, secret, cleanup])?;
    Ok(())
}

/// The password a stored task carries, unsealed (for delivery to its host).
pub fn task_password(
    conn: &Connection,
    secrets: &SecretBox,
    task_id: &str,
) -> Result<Option<String>, Error> {
    let sealed: Option<Vec<u8>> = conn
        .query_row(
            "SELECT secret FROM host_tasks WHERE id = ?1",
            [task_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let Some(sealed) = sealed else {
        return Ok(None);
    };
    let password = secrets
        .open(&task_secret_context(task_id), &sealed)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Some(
        String::from_utf8(password).map_err(|e| Error::Internal(e.to_string()))?,
    ))
}

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// a task was issued: wake the host's long poll
    pub issued: bool,
    pub ignored: Option<&'static str>,
}

/// Feeds one input to an allocation's state machine and persists everything it says, in
/// the caller's (writer) transaction.
pub fn apply(
    conn: &Connection,
    secrets: &SecretBox,
    id: i64,
    input: Input,
    now_ms: u64,
    actor: &str,
    meta: &RequestMeta,
) -> Result<Applied, Error> {
    let mut stored = load(conn, id)?.ok_or(Error::NotFound("allocation"))?;
    let reported = match &input {
        Input::Report { id, .. } => Some(id.0.clone()),
        _ => None,
    };
    let forced = matches!(input, Input::ForceRelease);
    let outputs = allocation::step(&mut stored.alloc, input, now_ms, &RetryPolicy::default());
    let alloc = &stored.alloc;
    let mut applied = Applied::default();
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    for output in outputs {
        match output {
            Output::Issue(mut task) => {
                // A provision or reset sets a password: the appliance chooses it, so the
                // host never has to send one back (or keep it anywhere).
                if let Some(password) = task.kind.password_mut() {
                    *password = Password(generate_password());
                }
                insert_task(conn, secrets, &task, alloc.id, false, now)?;
                applied.issued = true;
            }
            Output::Desktop(desktop) => {
                let task_id = reported
                    .as_deref()
                    .ok_or_else(|| Error::Internal("desktop details without a report".into()))?;
                let password = task_password(conn, secrets, task_id)?.ok_or_else(|| {
                    Error::Internal(format!(
                        "task {task_id} set a password the appliance never sealed"
                    ))
                })?;
                store_desktop(conn, secrets, alloc.id, &desktop, &password)?;
            }
            Output::Changed { from, to } => {
                let detail = serde_json::json!({"from": state_name(from), "to": state_name(to), "reason": alloc.reason});
                audit::record(
                    conn,
                    actor,
                    meta,
                    "allocation.state",
                    Some(&format!("allocation:{}", alloc.id)),
                    detail,
                )?;
            }
            Output::ResetDone => {
                audit::record(
                    conn,
                    actor,
                    meta,
                    "allocation.reset_done",
                    Some(&format!("allocation:{}", alloc.id)),
                    serde_json::json!({}),
                )?;
            }
            Output::Ignored { why } => applied.ignored = Some(why),
        }
    }
    // A task that is no longer awaited (force-release, unhealthy host, release during a
    // reset) is withdrawn so the host stops seeing it. Checks stay while the lab is active
    // and untouched; a reset or release withdraws them too (their workers retry).
    // (An unreachable lab keeps them too: its host runs them when it is back.)
    let keep_checks = matches!(
        alloc.state,
        AllocationState::Active | AllocationState::Unreachable
    ) && alloc.in_flight.is_none();
    // Cleanup tasks of a force-released lab stay until its host comes back for them.
    conn.prepare_cached(
        "UPDATE host_tasks SET done_ms = ?2, outcome = '{\"result\":\"cancelled\"}', secret = NULL
         WHERE allocation_id = ?1 AND done_ms IS NULL AND id IS NOT ?3 AND (check_run_id IS NULL OR NOT ?4) AND cleanup = 0",
    )?
    .execute(params![alloc.id, now, alloc.in_flight.as_ref().map(|t| t.0.as_str()), keep_checks])?;
    // A reported task's password has done its job (it is sealed with the lab, if set).
    if let Some(task_id) = &reported {
        conn.execute(
            "UPDATE host_tasks SET secret = NULL WHERE id = ?1",
            [task_id],
        )?;
    }
    if alloc.state == AllocationState::Released {
        // The desktop is gone; so are its credentials.
        conn.execute(
            "UPDATE allocations SET desktop_secret = NULL WHERE id = ?1",
            [alloc.id],
        )?;
    }
    if forced && alloc.state == AllocationState::Released && alloc.tasks_issued > 0 {
        // Let go without the host's help, but the host may come back with the lab's account
        // and processes still there: a release task waits for it, outside the state machine.
        let agent: bool = conn.query_row(
            "SELECT agent FROM hosts WHERE id = ?1",
            [alloc.host_id],
            |r| r.get(0),
        )?;
        if agent {
            stored.alloc.tasks_issued = stored.alloc.tasks_issued.saturating_add(1);
            let alloc = &stored.alloc;
            let task = HostTask {
                version: labrack_provisioner::protocol::PROTOCOL_VERSION,
                id: TaskId::new(alloc.id, "cleanup", alloc.tasks_issued),
                host_id: alloc.host_id,
                kind: labrack_provisioner::protocol::TaskKind::Release {
                    allocation_id: alloc.id,
                },
            };
            insert_task(conn, secrets, &task, alloc.id, true, now)?;
            audit::record(
                conn,
                actor,
                meta,
                "allocation.cleanup_queued",
                Some(&format!("allocation:{}", alloc.id)),
                serde_json::json!({"host_id": alloc.host_id, "task": task.id.0}),
            )?;
            applied.issued = true;
        }
    }
    let alloc = &stored.alloc;
    save(conn, alloc)?;
    Ok(applied)
}

pub fn store_desktop(
    conn: &Connection,
    secrets: &SecretBox,
    id: i64,
    desktop: &DesktopAccess,
    password: &str,
) -> Result<(), Error> {
    let sealed = secrets
        .seal(&secret_context(id), password.as_bytes())
        .map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute(
        "UPDATE allocations SET desktop_user = ?2, desktop_secret = ?3, rdp_port = ?4, ssh_port = ?5, ssh_host_key = ?6, rdp_cert_sha256 = ?7
         WHERE id = ?1",
        params![id, desktop.username, sealed, desktop.rdp_port, desktop.ssh_port, desktop.ssh_host_key, desktop.rdp_cert_sha256],
    )?;
    Ok(())
}

/// The desktop's address and credentials, decrypted, for the appliance's own use (the
/// terminal bridge and the streamer). Never serialised to a client.
pub struct DesktopSecret {
    pub host_address: String,
    pub username: String,
    pub password: String,
    pub rdp_port: u16,
    pub ssh_port: u16,
    pub ssh_host_key: Option<String>,
    pub rdp_cert_sha256: Option<String>,
}

impl DesktopSecret {
    /// The RDP login the streamer makes, at `width`×`height`; fails when the host did not
    /// report its RDP certificate (the connection could not be verified).
    pub fn rdp_target(
        self,
        width: u16,
        height: u16,
    ) -> Result<labrack_streamer::rdp::DesktopTarget, &'static str> {
        let cert_sha256 = self.rdp_cert_sha256.ok_or(
            "the lab host did not report its RDP certificate; the desktop cannot be verified",
        )?;
        Ok(labrack_streamer::rdp::DesktopTarget {
            host: self.host_address,
            port: self.rdp_port,
            username: self.username,
            password: self.password,
            cert_sha256,
            width,
            height,
        })
    }
}

pub fn desktop_secret(
    conn: &Connection,
    secrets: &SecretBox,
    id: i64,
) -> Result<Option<DesktopSecret>, Error> {
    let row = conn
        .query_row(
            "SELECT h.address, a.desktop_user, a.desktop_secret, a.rdp_port, a.ssh_port, a.ssh_host_key, a.rdp_cert_sha256 FROM allocations a
             JOIN hosts h ON h.id = a.host_id WHERE a.id = ?1 AND a.state = 'active' AND a.desktop_secret IS NOT NULL",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, u16>(3)?,
                    r.get::<_, u16>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            },
        )
        .optional()?;
    let Some((host_address, username, sealed, rdp_port, ssh_port, ssh_host_key, rdp_cert_sha256)) =
        row
    else {
        return Ok(None);
    };
    let password = secrets
        .open(&secret_context(id), &sealed)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let password = String::from_utf8(password).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Some(DesktopSecret {
        host_address,
        username,
        password,
        rdp_port,
        ssh_port,
        ssh_host_key,
        rdp_cert_sha256,
    }))
}

/// The associated data a host's checker password is sealed with.
pub fn checker_context(host_id: i64) -> String {
    format!("host:{host_id}:checker-password")
}

/// The checker account of a host without an agent (user name and password, decrypted), if
/// it has one. For the appliance's own use; never serialised to a client.
pub fn checker_login(
    conn: &Connection,
    secrets: &SecretBox,
    host_id: i64,
) -> Result<Option<(String, String)>, Error> {
    let row: Option<(Option<String>, Option<Vec<u8>>)> = conn
        .query_row(
            "SELECT checker_user, checker_secret FROM hosts WHERE id = ?1",
            [host_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((Some(user), Some(sealed))) = row else {
        return Ok(None);
    };
    let password = secrets
        .open(&checker_context(host_id), &sealed)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Some((
        user,
        String::from_utf8(password).map_err(|e| Error::Internal(e.to_string()))?,
    )))
}

/// One reconciler pass: hosts that missed three heartbeats become unhealthy (and their
/// labs unreachable); labs of a host heard again go back to where they were, and labs whose
/// host stayed silent past `grace` fail (staff decide); allocations whose backoff has elapsed
/// get their retry. Silence is counted from `listening_since_ms` at the earliest: while the
/// appliance itself was down no host could reach it, so a restart gives every host three
/// beats to be heard again.
pub fn reconcile(
    conn: &Connection,
    secrets: &SecretBox,
    now_ms: u64,
    listening_since_ms: u64,
    heartbeat: Duration,
    grace: Duration,
) -> Result<bool, Error> {
    let meta = RequestMeta {
        remote_addr: "local".into(),
        request_id: String::new(),
    };
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let silence = i64::try_from(heartbeat.as_millis().saturating_mul(3)).unwrap_or(i64::MAX);
    let mut issued = false;
    let lost: Vec<(i64, String)> = conn
        .prepare_cached("SELECT id, name FROM hosts WHERE healthy = 1 AND agent = 1 AND max(last_seen_ms, ?2) < ?1")?
        .query_map([now.saturating_sub(silence), i64::try_from(listening_since_ms).unwrap_or(i64::MAX)], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (host_id, name) in lost {
        conn.execute("UPDATE hosts SET healthy = 0 WHERE id = ?1", [host_id])?;
        audit::record(
            conn,
            RECONCILER,
            &meta,
            "host.unhealthy",
            Some(&format!("host:{host_id}")),
            serde_json::json!({"name": name}),
        )?;
        tracing::warn!(host_id, %name, "lab host missed its heartbeats: marked unhealthy");
        let labs: Vec<i64> = conn
            .prepare_cached("SELECT id FROM allocations WHERE host_id = ?1 AND state IN ('provisioning', 'active', 'releasing')")?
            .query_map([host_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in labs {
            apply(
                conn,
                secrets,
                id,
                Input::HostUnhealthy,
                now_ms,
                RECONCILER,
                &meta,
            )?;
        }
    }
    let back: Vec<i64> = conn
        .prepare_cached("SELECT a.id FROM allocations a JOIN hosts h ON h.id = a.host_id WHERE a.state = 'unreachable' AND h.healthy = 1")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in back {
        issued |= apply(
            conn,
            secrets,
            id,
            Input::HostBack,
            now_ms,
            RECONCILER,
            &meta,
        )?
        .issued;
    }
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let over: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM allocations WHERE state = 'unreachable' AND unreachable_since_ms <= ?1",
        )?
        .query_map([now.saturating_sub(grace_ms)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in over {
        apply(
            conn,
            secrets,
            id,
            Input::GraceOver,
            now_ms,
            RECONCILER,
            &meta,
        )?;
    }
    let due: Vec<i64> = conn
        .prepare_cached("SELECT id FROM allocations WHERE retry_at_ms IS NOT NULL AND retry_at_ms <= ?1 AND state <> 'unreachable'")?
        .query_map([now], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in due {
        issued |= apply(conn, secrets, id, Input::Tick, now_ms, RECONCILER, &meta)?.issued;
    }
    Ok(issued)
}

/// What the reconciler runs with.
#[derive(Clone)]
pub struct Reconciler {
    pub db: crate::store::Db,
    pub secrets: std::sync::Arc<SecretBox>,
    pub billing: std::sync::Arc<crate::billing::BillingSettings>,
    /// how often hosts send heartbeats; three missed mark a host unhealthy
    pub heartbeat: Duration,
    /// how long the labs of an unhealthy host wait for it before they fail
    pub host_grace: Duration,
    /// bumped when host tasks are issued: wakes long polls
    pub host_wake: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    pub shutdown: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

/// Runs [`reconcile`] every second until shutdown.
pub async fn run_reconciler(state: Reconciler) {
    let mut shutdown = state.shutdown.subscribe();
    let started_ms = crate::clock::unix_ms();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let secrets = state.secrets.clone();
        let (heartbeat, grace) = (state.heartbeat, state.host_grace);
        let billing = state.billing.clone();
        let result = state
            .db
            .writer()
            .write(move |conn| {
                let issued = reconcile(
                    conn,
                    &secrets,
                    crate::clock::unix_ms(),
                    started_ms,
                    heartbeat,
                    grace,
                )?;
                crate::billing::bill_active(conn, &billing, crate::clock::now_ms())?;
                Ok::<_, Error>(issued)
            })
            .await;
        match result {
            Ok(true) => state.host_wake.send_modify(|n| *n = n.wrapping_add(1)),
            Ok(false) => {}
            Err(error) => tracing::error!(error = ?Error::from(error), "reconciler pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_appliance_s_own_downtime_does_not_count_as_a_host_s_silence()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut conn = Connection::open_in_memory()?;
        crate::store::migrate(&mut conn)?;
        let secrets = SecretBox::from_key(&[9; 32]);
        // Last heard from an hour ago, before the appliance went down.
        let now: u64 = 10_000_000;
        conn.execute(
            "INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms) VALUES ('rack-1', zeroblob(32), '127.0.0.1', 0, 4, 'now', ?1)",
            [i64::try_from(now - 3_600_000)?],
        )?;
        let healthy = |conn: &Connection| {
            conn.query_row("SELECT healthy FROM hosts", [], |r| r.get::<_, bool>(0))
        };
        let beat = Duration::from_secs(5);
        // Up for 2 s: the host has three beats (15 s) to be heard again.
        let grace = Duration::from_secs(900);
        reconcile(&conn, &secrets, now, now - 2_000, beat, grace)?;
        assert!(
            healthy(&conn)?,
            "no host is blamed for the appliance's own restart"
        );
        // Up for 16 s and still nothing from it: now it is silent.
        reconcile(&conn, &secrets, now, now - 16_000, beat, grace)?;
        assert!(
            !healthy(&conn)?,
            "a host silent for three beats after the restart is unhealthy"
        );
        Ok(())
    }
}
