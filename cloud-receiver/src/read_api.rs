//! The cloud's read API (bearer admin token): appliances, a checksum of what each sent,
//! and per event the ledger and the scores rebuilt from the received rows with the
//! appliance's own ranking (`labrack_provisioner::ranking`).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::routing::get;
use axum::{Json, Router};
use rusqlite::{Connection, params};
use serde::Serialize;
use sha2::Digest as _;

use labrack_provisioner::ranking::{self, BoardRow, JudgedPoints, LatestResult};

use crate::error::ReadApiError;

type Db = Arc<Mutex<Connection>>;

fn authorize(db: &Db, headers: &HeaderMap) -> Result<(), ReadApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ReadApiError::Unauthenticated("send `Authorization: Bearer <admin token>`".into())
        })?;
    let hash = hex::encode(sha2::Sha256::digest(token.trim().as_bytes()));
    let conn = db
        .lock()
        .map_err(|_| ReadApiError::Internal("database lock poisoned".into()))?;
    let known: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM admin_tokens WHERE token_sha256 = ?1)",
        [hash],
        |r| r.get(0),
    )?;
    if known {
        Ok(())
    } else {
        Err(ReadApiError::Unauthenticated("unknown admin token".into()))
    }
}

fn with_db<T>(
    db: &Db,
    f: impl FnOnce(&Connection) -> Result<T, ReadApiError>,
) -> Result<T, ReadApiError> {
    let conn = db
        .lock()
        .map_err(|_| ReadApiError::Internal("database lock poisoned".into()))?;
    f(&conn)
}

#[derive(Debug, Serialize)]
struct ApplianceView {
    id: i64,
    name: String,
    acked: i64,
    rows: i64,
    enrolled_ms: i64,
    last_seen_ms: i64,
}

async fn appliances(
    State(db): State<Db>,
    headers: HeaderMap,
) -> Result<Json<Vec<ApplianceView>>, ReadApiError> {
    authorize(&db, &headers)?;
    with_db(&db, |conn| {
        let mut statement = conn.prepare(
            "SELECT a.id, a.name, a.acked, (SELECT count(*) FROM effective r WHERE r.appliance_id = a.id), a.enrolled_ms, a.last_seen_ms FROM appliances a ORDER BY a.id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(ApplianceView {
                id: r.get(0)?,
                name: r.get(1)?,
                acked: r.get(2)?,
                rows: r.get(3)?,
                enrolled_ms: r.get(4)?,
                last_seen_ms: r.get(5)?,
            })
        })?;
        Ok(Json(rows.collect::<Result<Vec<_>, _>>()?))
    })
}

#[derive(Debug, Serialize)]
struct Summary {
    rows: i64,
    max_seq: i64,
    acked: i64,
    /// SHA-256 over `seq \t kind \t entity \t body \n` of every row in sequence order
    checksum: String,
}

/// The checksum both sides can compute over the same rows.
pub fn checksum<'a>(rows: impl Iterator<Item = (i64, &'a str, &'a str, &'a str)>) -> String {
    let mut hasher = sha2::Sha256::new();
    for (seq, kind, entity, body) in rows {
        hasher.update(format!("{seq}\t{kind}\t{entity}\t{body}\n").as_bytes());
    }
    hex::encode(hasher.finalize())
}

async fn summary(
    State(db): State<Db>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Summary>, ReadApiError> {
    authorize(&db, &headers)?;
    with_db(&db, |conn| {
        let acked: i64 = conn
            .query_row("SELECT acked FROM appliances WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .map_err(|_| ReadApiError::NotFound("appliance"))?;
        let mut statement = conn.prepare(
            "SELECT seq, kind, entity, body FROM effective WHERE appliance_id = ?1 ORDER BY seq",
        )?;
        let rows: Vec<(i64, String, String, String)> = statement
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        let max_seq = rows.last().map_or(0, |r| r.0);
        let checksum = checksum(
            rows.iter()
                .map(|(s, k, e, b)| (*s, k.as_str(), e.as_str(), b.as_str())),
        );
        Ok(Json(Summary {
            rows: i64::try_from(rows.len()).unwrap_or(i64::MAX),
            max_seq,
            acked,
            checksum,
        }))
    })
}

fn bodies(
    conn: &Connection,
    appliance: i64,
    kind: &str,
    event_id: i64,
) -> Result<Vec<serde_json::Value>, ReadApiError> {
    let mut statement = conn.prepare_cached(
        "SELECT body FROM effective WHERE appliance_id = ?1 AND kind = ?2 ORDER BY seq",
    )?;
    let rows = statement.query_map(params![appliance, kind], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        let value: serde_json::Value = serde_json::from_str(&row?).unwrap_or_default();
        if value["event_id"].as_i64() == Some(event_id)
            || (kind == "event" && value["id"].as_i64() == Some(event_id))
        {
            out.push(value);
        }
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct CloudLedger {
    entries: Vec<serde_json::Value>,
    balance_cents: i64,
}

async fn ledger(
    State(db): State<Db>,
    headers: HeaderMap,
    Path((id, event_id)): Path<(i64, i64)>,
) -> Result<Json<CloudLedger>, ReadApiError> {
    authorize(&db, &headers)?;
    with_db(&db, |conn| {
        let entries = bodies(conn, id, "ledger", event_id)?;
        let balance_cents = entries
            .iter()
            .filter_map(|e| e["amount_cents"].as_i64())
            .sum();
        Ok(Json(CloudLedger {
            entries,
            balance_cents,
        }))
    })
}

/// The event's board as the cloud sees it: the same ranking the appliance uses, rebuilt
/// from teams, check results, judges' scores and score adjustments received.
async fn event_scores(
    State(db): State<Db>,
    headers: HeaderMap,
    Path((id, event_id)): Path<(i64, i64)>,
) -> Result<Json<Vec<BoardRow>>, ReadApiError> {
    authorize(&db, &headers)?;
    with_db(&db, |conn| {
        let teams: Vec<(i64, String)> = bodies(conn, id, "team", event_id)?
            .iter()
            .filter_map(|t| Some((t["id"].as_i64()?, t["name"].as_str()?.to_owned())))
            .collect();
        let mut latest: std::collections::HashMap<(i64, String), LatestResult> =
            std::collections::HashMap::new();
        for r in bodies(conn, id, "check_result", event_id)? {
            let (Some(team_id), Some(check)) = (r["team_id"].as_i64(), r["check"].as_str()) else {
                continue;
            };
            latest.insert(
                (team_id, check.to_lowercase()),
                LatestResult {
                    team_id,
                    dimension: r["dimension"].as_str().unwrap_or_default().to_owned(),
                    weight: u32::try_from(r["weight"].as_u64().unwrap_or(0)).unwrap_or(0),
                    passed: r["passed"].as_bool().unwrap_or(false),
                    finished_ms: r["at_ms"].as_i64().unwrap_or(0),
                },
            );
        }
        let mut judged: std::collections::HashMap<(i64, i64, String), (f64, i64)> =
            std::collections::HashMap::new();
        for j in bodies(conn, id, "judge_score", event_id)? {
            let (Some(team_id), Some(judge), Some(dimension)) = (
                j["team_id"].as_i64(),
                j["judge_id"].as_i64(),
                j["dimension"].as_str(),
            ) else {
                continue;
            };
            judged.insert(
                (team_id, judge, dimension.to_owned()),
                (
                    j["points"].as_f64().unwrap_or(0.0),
                    j["at_ms"].as_i64().unwrap_or(0),
                ),
            );
        }
        let mut per_dimension: std::collections::HashMap<(i64, String), (f64, u32, i64)> =
            std::collections::HashMap::new();
        for ((team_id, _, dimension), (points, at)) in judged {
            let entry = per_dimension
                .entry((team_id, dimension))
                .or_insert((0.0, 0, 0));
            entry.0 += points;
            entry.1 += 1;
            entry.2 = entry.2.max(at);
        }
        let judged: Vec<JudgedPoints> = per_dimension
            .into_iter()
            .map(|((team_id, dimension), (sum, n, at_ms))| JudgedPoints {
                team_id,
                dimension,
                points: sum / f64::from(n.max(1)),
                at_ms,
            })
            .collect();
        let mut adjustments: std::collections::HashMap<i64, f64> = std::collections::HashMap::new();
        for a in bodies(conn, id, "score_adjustment", event_id)? {
            if let Some(team_id) = a["team_id"].as_i64() {
                *adjustments.entry(team_id).or_default() += a["points"].as_f64().unwrap_or(0.0);
            }
        }
        let results: Vec<LatestResult> = latest.into_values().collect();
        let adjustments: Vec<(i64, f64)> = adjustments.into_iter().collect();
        Ok(Json(ranking::rank(&teams, &results, &judged, &adjustments)))
    })
}

pub fn router(db: Db) -> Router {
    Router::new()
        .route("/api/v1/appliances", get(appliances))
        .route("/api/v1/appliances/{id}/summary", get(summary))
        .route(
            "/api/v1/appliances/{id}/events/{event_id}/ledger",
            get(ledger),
        )
        .route(
            "/api/v1/appliances/{id}/events/{event_id}/scores",
            get(event_scores),
        )
        .fallback(|| async { ReadApiError::NoRoute("no such API endpoint".into()) })
        .with_state(db)
}
