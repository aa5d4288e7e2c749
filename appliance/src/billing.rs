//! The billing ledger: append-only entries in cents, per event and
//! optionally per team — credits (top-ups), GPU-hours of active labs × the rate, LLM tokens
//! × the rate, hint unlocks (points, no money), corrections. There is no update or delete
//! path in the code, and triggers refuse them in the database. Balances are sums of entries.
//! Every entry is also an outbox row in the same transaction, for the cloud.
//!
//! A lab is billed in windows: the reconciler closes a window every [`BillingSettings::window`]
//! while the lab is active, and the last window when it stops being active. Each window's
//! reference (`allocation:{id}:{from}-{to}`) is unique, so a window is never billed twice.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use utoipa::ToSchema;

use crate::outbox::{self, Change};

#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// cents per GPU-hour
    pub gpu_hour_cents: u32,
    /// cents per 1,000 LLM tokens
    pub llm_1k_tokens_cents: u32,
    /// how often an active lab's usage becomes an entry
    pub window: Duration,
}

impl Default for BillingSettings {
    fn default() -> Self {
        Self {
            gpu_hour_cents: 100,
            llm_1k_tokens_cents: 0,
            window: Duration::from_secs(900),
        }
    }
}

/// What kind of entry.
pub const KINDS: [&str; 5] = ["credit", "gpu_hours", "llm_tokens", "hint", "correction"];

/// One entry to append.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    pub event_id: i64,
    pub team_id: Option<i64>,
    pub kind: &'a str,
    pub quantity: f64,
    pub unit: &'a str,
    /// positive: credit; negative: a charge
    pub amount_cents: i64,
    /// unique where given: the same reference is never entered twice
    pub reference: Option<String>,
    pub note: String,
    pub actor: &'a str,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Entry {
    pub id: i64,
    pub event_id: i64,
    pub team_id: Option<i64>,
    pub kind: String,
    pub quantity: f64,
    pub unit: String,
    pub amount_cents: i64,
    pub reference: Option<String>,
    pub note: String,
    pub actor: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Balance {
    pub credits_cents: i64,
    pub charges_cents: i64,
    /// credits minus charges
    pub balance_cents: i64,
    /// `ok`, `low` (under a fifth of the credits left) or `depleted` (nothing left)
    pub status: String,
}

fn status(credits: i64, balance: i64) -> &'static str {
    if credits <= 0 && balance >= 0 {
        "ok"
    } else if balance <= 0 {
        "depleted"
    } else if balance * 5 < credits {
        "low"
    } else {
        "ok"
    }
}

/// The event's balance from its entries.
pub fn balance(conn: &Connection, event_id: i64) -> Result<Balance, rusqlite::Error> {
    let (credits, charges): (i64, i64) = conn.query_row(
        "SELECT coalesce(sum(CASE WHEN amount_cents > 0 THEN amount_cents END), 0), coalesce(-sum(CASE WHEN amount_cents < 0 THEN amount_cents END), 0)
         FROM billing_ledger WHERE event_id = ?1",
        [event_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let balance = credits - charges;
    Ok(Balance {
        credits_cents: credits,
        charges_cents: charges,
        balance_cents: balance,
        status: status(credits, balance).to_owned(),
    })
}

/// Appends an entry (and its outbox row) in the caller's transaction. An entry whose
/// reference is already there is not entered again: `Ok(None)`. When the entry moves the
/// event's balance to low or depleted, a staff alert says so in the same transaction.
pub fn append(
    conn: &Connection,
    entry: &NewEntry<'_>,
    now_ms: i64,
) -> Result<Option<i64>, rusqlite::Error> {
    if let Some(reference) = &entry.reference {
        let seen: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM billing_ledger WHERE reference = ?1)",
            [reference],
            |r| r.get(0),
        )?;
        if seen {
            return Ok(None);
        }
    }
    let before = balance(conn, entry.event_id)?;
    conn.prepare_cached(
        "INSERT INTO billing_ledger (event_id, team_id, kind, quantity, unit, amount_cents, reference, note, actor, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        entry.event_id,
        entry.team_id,
        entry.kind,
        entry.quantity,
        entry.unit,
        entry.amount_cents,
        entry.reference,
        entry.note,
        entry.actor,
        now_ms
    ])?;
    let id = conn.last_insert_rowid();
    outbox::append(
        conn,
        Change::Ledger,
        &format!("ledger:{id}"),
        &serde_json::json!({"id": id, "event_id": entry.event_id, "team_id": entry.team_id, "kind": entry.kind, "quantity": entry.quantity,
            "unit": entry.unit, "amount_cents": entry.amount_cents, "reference": entry.reference, "note": entry.note, "at_ms": now_ms}),
        now_ms,
    )?;
    let after = balance(conn, entry.event_id)?;
    if after.status != before.status && after.status != "ok" {
        conn.execute(
            "INSERT INTO alerts (event_id, team_id, kind, detail, created_ms) VALUES (?1, NULL, ?2, ?3, ?4)",
            params![
                entry.event_id,
                format!("billing_{}", after.status),
                format!("balance {:.2} of {:.2} credited", after.balance_cents as f64 / 100.0, after.credits_cents as f64 / 100.0),
                now_ms
            ],
        )?;
    }
    Ok(Some(id))
}

/// Bills an allocation's usage from where its last window ended up to `now_ms` (if it has
/// GPUs), and moves its window on. `closing`: the lab stops being active now.
pub fn bill_window(
    conn: &Connection,
    settings: &BillingSettings,
    allocation_id: i64,
    now_ms: i64,
    closing: bool,
) -> Result<(), rusqlite::Error> {
    let row: Option<(i64, i64, u32, Option<i64>)> = conn
        .query_row(
            "SELECT event_id, team_id, gpus, billed_until_ms FROM allocations WHERE id = ?1",
            [allocation_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((event_id, team_id, gpus, billed_until)) = row else {
        return Ok(());
    };
    let Some(from) = billed_until else {
        // The lab just became active: its first window starts now.
        if !closing {
            conn.execute(
                "UPDATE allocations SET billed_until_ms = ?2 WHERE id = ?1",
                params![allocation_id, now_ms],
            )?;
        }
        return Ok(());
    };
    if now_ms <= from {
        return Ok(());
    }
    if gpus > 0 {
        let hours = (now_ms - from) as f64 / 3_600_000.0;
        let gpu_hours = hours * f64::from(gpus);
        let cents = (gpu_hours * f64::from(settings.gpu_hour_cents)).round() as i64;
        append(
            conn,
            &NewEntry {
                event_id,
                team_id: Some(team_id),
                kind: "gpu_hours",
                quantity: gpu_hours,
                unit: "GPU-hours",
                amount_cents: -cents,
                reference: Some(format!("allocation:{allocation_id}:{from}-{now_ms}")),
                note: format!("lab {allocation_id}: {gpus} GPU(s) for {:.2} h", hours),
                actor: "system:billing",
            },
            now_ms,
        )?;
    }
    let next = if closing { None } else { Some(now_ms) };
    conn.execute(
        "UPDATE allocations SET billed_until_ms = ?2 WHERE id = ?1",
        params![allocation_id, next],
    )?;
    Ok(())
}

/// The reconciler's pass (every second): active labs open or close a window when one is
/// due; labs that stopped being active get their last window (at most a pass late).
pub fn bill_active(
    conn: &Connection,
    settings: &BillingSettings,
    now_ms: i64,
) -> Result<(), rusqlite::Error> {
    let window = i64::try_from(settings.window.as_millis()).unwrap_or(i64::MAX);
    let due: Vec<i64> = conn
        .prepare_cached("SELECT id FROM allocations WHERE state = 'active' AND (billed_until_ms IS NULL OR billed_until_ms <= ?1)")?
        .query_map([now_ms - window], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in due {
        bill_window(conn, settings, id, now_ms, false)?;
    }
    let stopped: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM allocations WHERE state <> 'active' AND billed_until_ms IS NOT NULL",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in stopped {
        bill_window(conn, settings, id, now_ms, true)?;
    }
    Ok(())
}

pub fn entries(
    conn: &Connection,
    event_id: i64,
    team_id: Option<i64>,
) -> Result<Vec<Entry>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(
        "SELECT id, event_id, team_id, kind, quantity, unit, amount_cents, reference, note, actor, created_ms FROM billing_ledger
         WHERE event_id = ?1 AND (?2 IS NULL OR team_id = ?2) ORDER BY id",
    )?;
    let rows = statement.query_map(params![event_id, team_id], |r| {
        Ok(Entry {
            id: r.get(0)?,
            event_id: r.get(1)?,
            team_id: r.get(2)?,
            kind: r.get(3)?,
            quantity: r.get(4)?,
            unit: r.get(5)?,
            amount_cents: r.get(6)?,
            reference: r.get(7)?,
            note: r.get(8)?,
            actor: r.get(9)?,
            created_ms: r.get(10)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (Connection, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("labrack-billing-{}.db", rand::random::<u32>()));
        let mut conn = crate::store::open_connection(&path, false).expect("open");
        crate::store::migrate(&mut conn).expect("migrate");
        conn.execute_batch(
            "INSERT INTO events (name, code, state, starts_at, ends_at, created_at, updated_at) VALUES ('e', 'C', 'live', 'a', 'b', 'c', 'd');
             INSERT INTO teams (event_id, name, created_at) VALUES (1, 'Red', 'now');
             INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms) VALUES ('h', x'00', 'x', 2, 1, 'now', 0);
             INSERT INTO allocations (event_id, team_id, host_id, template, runtime, skeleton, gpus, state, created_at, updated_at)
             VALUES (1, 1, 1, 't', 'local-user', '/s', 2, 'active', 'now', 'now');",
        )
        .expect("seed");
        (conn, path)
    }

    #[test]
    fn windows_bill_gpu_hours_once_and_the_ledger_cannot_change() {
        let (conn, path) = db();
        let settings = BillingSettings {
            gpu_hour_cents: 250,
            llm_1k_tokens_cents: 0,
            window: Duration::from_secs(900),
        };
        let credit = NewEntry {
            event_id: 1,
            team_id: None,
            kind: "credit",
            quantity: 1.0,
            unit: "top-up",
            amount_cents: 1000,
            reference: None,
            note: "prepaid".into(),
            actor: "staff:org",
        };
        append(&conn, &credit, 0).expect("credit");
        bill_active(&conn, &settings, 1_000).expect("window opens");
        bill_active(&conn, &settings, 1_000 + 899_999).expect("not yet a window");
        assert!(
            entries(&conn, 1, None).expect("entries").len() == 1,
            "no charge before a window closes"
        );
        bill_active(&conn, &settings, 1_000 + 3_600_000).expect("an hour");
        bill_window(&conn, &settings, 1, 1_000 + 3_600_000, true)
            .expect("closing at the same moment adds nothing");
        let all = entries(&conn, 1, None).expect("entries");
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(
            (all[1].quantity, all[1].amount_cents),
            (2.0, -500),
            "2 GPUs for 1 h at 2.50"
        );
        // Another 1.5 h later the lab is released: the last window is billed and closed.
        bill_window(&conn, &settings, 1, 1_000 + 9_000_000, true).expect("closing");
        let balance = balance(&conn, 1).expect("balance");
        assert_eq!(
            (
                balance.charges_cents,
                balance.balance_cents,
                balance.status.as_str()
            ),
            (1250, -250, "depleted")
        );
        let alerts: Vec<String> = conn
            .prepare("SELECT kind FROM alerts ORDER BY id")
            .expect("q")
            .query_map([], |r| r.get(0))
            .expect("q")
            .collect::<Result<_, _>>()
            .expect("alerts");
        assert_eq!(
            alerts,
            ["billing_depleted"],
            "low is skipped when one entry goes straight to depleted"
        );
        assert!(
            conn.execute("UPDATE billing_ledger SET amount_cents = 0", [])
                .is_err(),
            "append-only"
        );
        assert!(
            conn.execute("DELETE FROM billing_ledger", []).is_err(),
            "append-only"
        );
        let outboxed: i64 = conn
            .query_row(
                "SELECT count(*) FROM outbox WHERE kind = 'ledger'",
                [],
                |r| r.get(0),
            )
            .expect("outbox");
        assert_eq!(outboxed, 3, "every entry is in the outbox");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[test]
    fn balance_states() {
        assert_eq!(status(0, 0), "ok");
        assert_eq!(status(1000, 1000), "ok");
        assert_eq!(status(1000, 199), "low");
        assert_eq!(status(1000, 0), "depleted");
        assert_eq!(status(0, -5), "depleted");
    }
}
