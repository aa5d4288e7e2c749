//! The billing ledger over HTTP: staff read an event's entries and balance (JSON or CSV);
//! organizers add credits and corrections — new entries, never edits.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::extract::{ApiJson, ApiPath};
use super::problem::Problem;
use crate::audit;
use crate::billing::{self, Balance, Entry, NewEntry};
use crate::clock::format_time;
use crate::error::Error;
use labrack_provisioner::roles;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LedgerQuery {
    /// one team's entries only
    pub team_id: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerView {
    pub entries: Vec<Entry>,
    /// of the whole event
    pub balance: Balance,
}

fn exists(conn: &rusqlite::Connection, event_id: i64) -> Result<(), Error> {
    let found: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1)",
        [event_id],
        |r| r.get(0),
    )?;
    if found {
        Ok(())
    } else {
        Err(Error::NotFound("event"))
    }
}

/// The event's ledger and balance.
#[utoipa::path(get, path = "/v1/events/{event_id}/ledger", tag = "billing", params(("event_id" = i64, Path), LedgerQuery),
    responses((status = 200, body = LedgerView), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn ledger(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    query: Result<Query<LedgerQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LedgerView>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let Query(query) = query?;
    let view = state
        .db
        .read(move |conn| {
            exists(conn, event_id)?;
            Ok::<_, Error>(LedgerView {
                entries: billing::entries(conn, event_id, query.team_id)?,
                balance: billing::balance(conn, event_id)?,
            })
        })
        .await?;
    Ok(Json(view))
}

/// A cell a spreadsheet will not run: text starting with `=`, `+`, `-`, `@`, a tab or a
/// carriage return would be read as a formula, so it gets a leading `'`.
fn defused(text: &str) -> std::borrow::Cow<'_, str> {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{text}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The event's ledger as CSV (one row per entry; amounts in cents and currency units).
#[utoipa::path(get, path = "/v1/events/{event_id}/ledger.csv", tag = "billing", params(("event_id" = i64, Path)),
    responses((status = 200, description = "text/csv"), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn ledger_csv(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
) -> Result<impl IntoResponse, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let entries = state
        .db
        .read(move |conn| {
            exists(conn, event_id)?;
            Ok::<_, Error>(billing::entries(conn, event_id, None)?)
        })
        .await?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let failed = |error: csv::Error| Error::Internal(format!("writing the ledger CSV: {error}"));
    csv.write_record([
        "id",
        "at",
        "team_id",
        "kind",
        "quantity",
        "unit",
        "amount_cents",
        "amount",
        "reference",
        "note",
        "actor",
    ])
    .map_err(failed)?;
    for e in entries {
        let at =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.created_ms) * 1_000_000)
                .map(format_time)
                .unwrap_or_default();
        csv.write_record([
            e.id.to_string().as_str(),
            &at,
            &e.team_id.map(|t| t.to_string()).unwrap_or_default(),
            &defused(&e.kind),
            &e.quantity.to_string(),
            &defused(&e.unit),
            &e.amount_cents.to_string(),
            &format!("{:.2}", e.amount_cents as f64 / 100.0),
            &defused(e.reference.as_deref().unwrap_or("")),
            &defused(&e.note),
            &defused(&e.actor),
        ])
        .map_err(failed)?;
    }
    let csv = csv
        .into_inner()
        .map_err(|error| Error::Internal(format!("writing the ledger CSV: {error}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"ledger-event-{event_id}.csv\""),
            ),
        ],
        csv,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewLedgerEntry {
    /// `credit` (a top-up, positive) or `correction` (either sign)
    #[schema(pattern = "^(credit|correction)$")]
    pub kind: String,
    pub team_id: Option<i64>,
    /// cents; not 0, at most 100,000,000 either way
    #[schema(minimum = -100_000_000, maximum = 100_000_000)]
    pub amount_cents: i64,
    /// why; shown in the ledger
    #[schema(max_length = 500)]
    pub note: String,
}

/// Adds a credit or a correction to the event's ledger.
#[utoipa::path(post, path = "/v1/events/{event_id}/ledger", tag = "billing", params(("event_id" = i64, Path)), request_body = NewLedgerEntry,
    responses((status = 201, body = LedgerView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn add_entry(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(event_id): ApiPath<i64>,
    ApiJson(body): ApiJson<NewLedgerEntry>,
) -> Result<(StatusCode, Json<LedgerView>), Error> {
    caller.require_staff(&roles::ORGANIZERS)?;
    if !matches!(body.kind.as_str(), "credit" | "correction") {
        return Err(Error::invalid(
            "kind",
            "staff add `credit` or `correction` entries; usage is entered by the appliance",
        ));
    }
    if body.amount_cents == 0 || body.amount_cents.abs() > 100_000_000 {
        return Err(Error::invalid(
            "amount_cents",
            "must be non-zero and at most 100,000,000 either way",
        ));
    }
    if body.kind == "credit" && body.amount_cents < 0 {
        return Err(Error::invalid(
            "amount_cents",
            "a credit is positive; take money back with a correction",
        ));
    }
    let note = super::validate::name("note", &body.note, 500)?;
    if note.chars().count() < 3 {
        return Err(Error::invalid("note", "say why (at least 3 characters)"));
    }
    let now = crate::clock::now_ms();
    let view = state
        .db
        .writer()
        .write(move |conn| {
            exists(conn, event_id)?;
            if let Some(team_id) = body.team_id {
                let owned: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM teams WHERE id = ?1 AND event_id = ?2)", [team_id, event_id], |r| r.get(0))?;
                if !owned {
                    return Err(Error::invalid("team_id", "no such team in this event"));
                }
            }
            let actor = caller.actor();
            let entry = NewEntry {
                event_id,
                team_id: body.team_id,
                kind: &body.kind,
                quantity: 1.0,
                unit: "entry",
                amount_cents: body.amount_cents,
                reference: None,
                note: note.clone(),
                actor: &actor,
            };
            let id = billing::append(conn, &entry, now)?;
            audit::record(conn, &actor, &caller.meta, "ledger.entry_added", Some(&format!("event:{event_id}")),
                serde_json::json!({"id": id, "kind": body.kind, "amount_cents": body.amount_cents, "note": note}))?;
            Ok(LedgerView { entries: billing::entries(conn, event_id, None)?, balance: billing::balance(conn, event_id)? })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncView {
    pub link: crate::sync::relay::LinkStatus,
    /// outbox rows the cloud has not acknowledged
    pub pending_rows: i64,
    /// how old the oldest of them is
    pub pending_age_ms: Option<i64>,
    /// the last sequence number written
    pub last_seq: i64,
}

/// The sync link: state, lag (count and age of unacknowledged rows) and the last error.
#[utoipa::path(get, path = "/v1/sync", tag = "billing", responses((status = 200, body = SyncView), (status = 403, body = Problem)))]
pub async fn sync_status(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SyncView>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let mut link = state.link.status();
    if !link.configured {
        link.state = "off".into();
    }
    let acked = link.acked;
    let (pending_rows, oldest, last_seq) = state
        .db
        .read(move |conn| {
            let (count, oldest) = crate::outbox::lag(conn, acked)?;
            let last = crate::outbox::last_seq(conn)?;
            Ok::<_, Error>((count, oldest, last))
        })
        .await?;
    let now = crate::clock::now_ms();
    Ok(Json(SyncView {
        link,
        pending_rows,
        pending_age_ms: oldest.map(|at| now - at),
        last_seq,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncEpoch {
    /// the new epoch's id
    pub epoch: String,
    /// its first row is `base + 1`: the oldest row the outbox still holds
    pub base: i64,
}

/// Starts a new sync epoch (admins): after this appliance's database went back (restored
/// from a backup) the cloud refuses the old epoch (`mismatch`); a new one sends what the
/// outbox holds as a new stream that continues the old one from `base`.
#[utoipa::path(post, path = "/v1/sync/epoch", tag = "billing", responses((status = 201, body = SyncEpoch), (status = 403, body = Problem)))]
pub async fn start_sync_epoch(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<(StatusCode, Json<SyncEpoch>), Error> {
    caller.require_staff(&roles::ADMINS)?;
    let started = state
        .db
        .writer()
        .write(move |conn| {
            let now = crate::clock::now_ms();
            let (epoch, base) = crate::outbox::start_epoch(conn, now)?;
            audit::record(
                conn,
                &caller.actor(),
                &caller.meta,
                "sync.epoch_started",
                None,
                serde_json::json!({"epoch": epoch, "base": base}),
            )?;
            Ok::<_, Error>(SyncEpoch { epoch, base })
        })
        .await?;
    state.link.reconnect();
    Ok((StatusCode::CREATED, Json(started)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_a_spreadsheet_would_run_are_defused_and_others_kept() {
        for formula in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\r=1"] {
            assert_eq!(defused(formula), format!("'{formula}"), "{formula:?}");
        }
        for plain in ["gpu-hour", "a = b", "", "1-2"] {
            assert_eq!(defused(plain), plain);
        }
    }
}
