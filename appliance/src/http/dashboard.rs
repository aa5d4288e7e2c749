//! `GET /api/v1/events/{event_id}/dashboard`: one read that gives staff the state of an
//! event at a glance — its clock, who is here, labs by state, the job queue, the sync link,
//! lab hosts and the observer's alerts — plus `problems`, the conditions someone should act
//! on now (a host down, dead-letter jobs, a stalled sync link). The console polls it, shows
//! it, and raises a desktop notification when a problem's `key` first appears.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use rusqlite::OptionalExtension as _;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::assist::Alert;
use super::auth::Caller;
use super::extract::ApiPath;
use super::problem::Problem;
use crate::clock::format_time;
use crate::error::Error;
use labrack_provisioner::roles;

/// Unacknowledged sync rows older than this mean the link is stalled.
pub const SYNC_STALL_MS: i64 = 120_000;

#[derive(Debug, Serialize, ToSchema)]
pub struct Clock {
    pub now: String,
    /// `before_start`, `running` or `after_end` by the event's times (its state is separate)
    pub phase: String,
    /// seconds until the start (before it) or the end (while running); 0 after the end
    pub seconds_left: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct People {
    pub teams: i64,
    pub participants: i64,
    /// participants who have joined with their code
    pub joined: i64,
    /// participants with a live session now
    pub signed_in: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Queue {
    /// the appliance's whole job queue (checks, scoring, provisioning)
    pub queued: i64,
    pub running: i64,
    /// dead letters: jobs that failed every attempt and wait for staff
    pub dead: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncSummary {
    /// `off` (no cloud configured), `connecting`, `linked`, `down` or `refused`
    pub state: String,
    pub pending_rows: i64,
    pub pending_age_ms: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostSummary {
    pub total: i64,
    pub unhealthy: Vec<String>,
    /// hosts whose identity was used from two machines at once in the last hour
    pub identity_conflicts: Vec<String>,
}

/// Something to act on now. `key` stays the same while the condition lasts.
#[derive(Debug, Serialize, ToSchema, PartialEq, Eq)]
pub struct Trouble {
    /// `host_down`, `host_identity_conflict`, `dead_letters` or `sync_stalled`
    pub kind: String,
    pub key: String,
    pub detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Dashboard {
    pub event_id: i64,
    pub name: String,
    pub state: String,
    pub starts_at: String,
    pub ends_at: String,
    pub clock: Clock,
    pub people: People,
    /// allocations of this event by state (requested, provisioning, active, …)
    pub labs: BTreeMap<String, i64>,
    pub queue: Queue,
    pub sync: SyncSummary,
    pub hosts: HostSummary,
    pub alerts_total: i64,
    /// the observer's five newest alerts
    pub alerts: Vec<Alert>,
    pub problems: Vec<Trouble>,
}

/// Where `now` stands against the event's times.
fn clock(now: time::OffsetDateTime, starts_at: &str, ends_at: &str) -> Clock {
    let parse = |text: &str| {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
    };
    let (phase, left) = match (parse(starts_at), parse(ends_at)) {
        (Some(start), _) if now < start => ("before_start", (start - now).whole_seconds()),
        (_, Some(end)) if now < end => ("running", (end - now).whole_seconds()),
        _ => ("after_end", 0),
    };
    Clock {
        now: format_time(now),
        phase: phase.into(),
        seconds_left: left,
    }
}

/// The conditions staff should hear about, from the summary's numbers.
fn problems(hosts: &HostSummary, queue: &Queue, sync: &SyncSummary) -> Vec<Trouble> {
    let mut found: Vec<Trouble> = hosts
        .unhealthy
        .iter()
        .map(|name| Trouble {
            kind: "host_down".into(),
            key: format!("host_down:{name}"),
            detail: format!("lab host {name} stopped answering"),
        })
        .collect();
    found.extend(hosts.identity_conflicts.iter().map(|name| Trouble {
        kind: "host_identity_conflict".into(),
        key: format!("host_identity_conflict:{name}"),
        detail: format!("lab host {name}'s identity is used by two machines at once: one of them is a copy; re-enrol it with a token of its own"),
    }));
    if queue.dead > 0 {
        found.push(Trouble {
            kind: "dead_letters".into(),
            key: format!("dead_letters:{}", queue.dead),
            detail: format!(
                "{} job(s) failed every attempt and wait in the dead-letter list",
                queue.dead
            ),
        });
    }
    if sync.state == "mismatch" {
        found.push(Trouble {
            kind: "sync_mismatch".into(),
            key: "sync_mismatch".into(),
            detail: format!(
                "the cloud link stopped: {} (an admin decides; see the README's Sync section)",
                sync.last_error
                    .as_deref()
                    .unwrap_or("this database and the cloud disagree")
            ),
        });
    } else if sync.state != "off" && sync.pending_age_ms.is_some_and(|age| age > SYNC_STALL_MS) {
        found.push(Trouble {
            kind: "sync_stalled".into(),
            key: "sync_stalled".into(),
            detail: format!(
                "{} row(s) have waited {} s for the cloud (link {}{})",
                sync.pending_rows,
                sync.pending_age_ms.unwrap_or(0) / 1000,
                sync.state,
                sync.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        });
    }
    found
}

/// An event at a glance, with the problems to act on (staff).
#[utoipa::path(get, path = "/v1/events/{event_id}/dashboard", tag = "events", params(("event_id" = i64, Path)),
    responses((status = 200, body = Dashboard), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn dashboard(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<Json<Dashboard>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let mut link = state.link.status();
    if !link.configured {
        link.state = "off".into();
    }
    let acked = link.acked;
    let now_ms = crate::clock::now_ms();
    let mut board = state
        .db
        .read(move |conn| {
            let (name, event_state, starts_at, ends_at): (String, String, String, String) = conn
                .query_row("SELECT name, state, starts_at, ends_at FROM events WHERE id = ?1", [event_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?
                .ok_or(Error::NotFound("event"))?;
            let count = |sql: &str| conn.query_row(sql, [event_id], |r| r.get::<_, i64>(0));
            let people = People {
                teams: count("SELECT count(*) FROM teams WHERE event_id = ?1")?,
                participants: count("SELECT count(*) FROM participants WHERE event_id = ?1")?,
                joined: count("SELECT count(*) FROM participants WHERE event_id = ?1 AND joined_at IS NOT NULL")?,
                signed_in: conn.query_row(
                    "SELECT count(DISTINCT s.participant_id) FROM sessions s JOIN participants p ON p.id = s.participant_id
                     WHERE p.event_id = ?1 AND s.expires_at > ?2",
                    rusqlite::params![event_id, now_ms / 1000],
                    |r| r.get(0),
                )?,
            };
            let labs = conn
                .prepare_cached("SELECT state, count(*) FROM allocations WHERE event_id = ?1 GROUP BY state")?
                .query_map([event_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            let jobs = |wanted: &str| conn.query_row("SELECT count(*) FROM jobs WHERE state = ?1", [wanted], |r| r.get::<_, i64>(0));
            let queue = Queue { queued: jobs("queued")?, running: jobs("running")?, dead: jobs("dead")? };
            let hosts = HostSummary {
                total: conn.query_row("SELECT count(*) FROM hosts", [], |r| r.get(0))?,
                unhealthy: conn.prepare_cached("SELECT name FROM hosts WHERE healthy = 0 ORDER BY name")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?,
                identity_conflicts: conn
                    .prepare_cached("SELECT name FROM hosts WHERE identity_conflict_ms > ?1 ORDER BY name")?
                    .query_map([now_ms - 3_600_000], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            };
            let alerts_total = count("SELECT count(*) FROM alerts WHERE event_id = ?1")?;
            let alerts = conn
                .prepare_cached("SELECT id, team_id, kind, detail, created_ms FROM alerts WHERE event_id = ?1 ORDER BY id DESC LIMIT 5")?
                .query_map([event_id], |r| {
                    let ms: i64 = r.get(4)?;
                    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map(format_time).unwrap_or_default();
                    Ok(Alert { id: r.get(0)?, team_id: r.get(1)?, kind: r.get(2)?, detail: r.get(3)?, at })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let (pending_rows, oldest) = crate::outbox::lag(conn, acked)?;
            Ok::<_, Error>(Dashboard {
                event_id,
                clock: clock(crate::clock::now_utc(), &starts_at, &ends_at),
                name,
                state: event_state,
                starts_at,
                ends_at,
                people,
                labs,
                queue,
                sync: SyncSummary { state: String::new(), pending_rows, pending_age_ms: oldest.map(|at| now_ms - at), last_error: None },
                hosts,
                alerts_total,
                alerts,
                problems: Vec::new(),
            })
        })
        .await?;
    board.sync.state = link.state;
    board.sync.last_error = link.last_error;
    board.problems = problems(&board.hosts, &board.queue, &board.sync);
    Ok(Json(board))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_counts_down_to_the_start_then_the_end() {
        let at = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .expect("time")
        };
        let (start, end) = ("2026-12-01T09:00:00Z", "2026-12-01T18:00:00Z");
        let before = clock(at("2026-12-01T08:59:00Z"), start, end);
        assert_eq!(
            (before.phase.as_str(), before.seconds_left),
            ("before_start", 60)
        );
        let during = clock(at("2026-12-01T17:00:00Z"), start, end);
        assert_eq!(
            (during.phase.as_str(), during.seconds_left),
            ("running", 3600)
        );
        let after = clock(at("2026-12-01T18:00:00Z"), start, end);
        assert_eq!((after.phase.as_str(), after.seconds_left), ("after_end", 0));
    }

    #[test]
    fn problems_name_down_hosts_dead_letters_and_a_stalled_link_only() {
        let hosts = HostSummary {
            total: 2,
            unhealthy: vec!["rack-b".into()],
            identity_conflicts: vec!["rack-c".into()],
        };
        let queue = Queue {
            queued: 3,
            running: 1,
            dead: 2,
        };
        let mut sync = SyncSummary {
            state: "down".into(),
            pending_rows: 10,
            pending_age_ms: Some(SYNC_STALL_MS + 1),
            last_error: Some("timed out".into()),
        };
        let found = problems(&hosts, &queue, &sync);
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "host_down:rack-b",
                "host_identity_conflict:rack-c",
                "dead_letters:2",
                "sync_stalled"
            ]
        );
        assert!(
            found[3].detail.contains("link down: timed out"),
            "{}",
            found[3].detail
        );
        // Young pending rows, or no cloud at all, are not a stall.
        sync.pending_age_ms = Some(5_000);
        assert_eq!(
            problems(
                &HostSummary {
                    total: 1,
                    unhealthy: vec![],
                    identity_conflicts: vec![]
                },
                &Queue {
                    queued: 0,
                    running: 0,
                    dead: 0
                },
                &sync
            ),
            vec![]
        );
        sync.pending_age_ms = Some(SYNC_STALL_MS * 10);
        sync.state = "off".into();
        assert_eq!(
            problems(
                &HostSummary {
                    total: 1,
                    unhealthy: vec![],
                    identity_conflicts: vec![]
                },
                &Queue {
                    queued: 0,
                    running: 0,
                    dead: 0
                },
                &sync
            ),
            vec![]
        );
    }
}
