//! The transactional outbox: every change the cloud must see is written
//! here in the same SQLite transaction as the change itself, with a per-appliance sequence
//! number that has no gaps (`AUTOINCREMENT` never reuses a number, and a refused request's
//! savepoint takes its outbox row and its number back with it). The sync relay sends rows in
//! sequence order and prunes only what the receiver acknowledged.

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

/// What kind of change a row carries; the receiver applies each kind idempotently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Event,
    Team,
    Submission,
    CheckResult,
    JudgeScore,
    ScoreAdjustment,
    Ledger,
    /// an audit-log row (with its chain hash): the cloud keeps a copy
    Audit,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Team => "team",
            Self::Submission => "submission",
            Self::CheckResult => "check_result",
            Self::JudgeScore => "judge_score",
            Self::ScoreAdjustment => "score_adjustment",
            Self::Ledger => "ledger",
            Self::Audit => "audit",
        }
    }
}

/// Appends one change in the caller's transaction; returns its sequence number.
pub fn append(
    conn: &Connection,
    change: Change,
    entity: &str,
    body: &serde_json::Value,
    now_ms: i64,
) -> Result<i64, rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO outbox (kind, entity, body, created_ms) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![change.as_str(), entity, body.to_string(), now_ms])?;
    Ok(conn.last_insert_rowid())
}

/// The last sequence number written (0 before the first).
pub fn last_seq(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)",
        [],
        |r| r.get(0),
    )
}

/// Rows waiting for the receiver: how many, and the oldest one's time. Cheap at any size:
/// the sequence has no gaps, so the count is a subtraction and the oldest is one lookup.
pub fn lag(conn: &Connection, acked: i64) -> Result<(i64, Option<i64>), rusqlite::Error> {
    let last = last_seq(conn)?;
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT created_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT 1",
            [acked],
            |r| r.get(0),
        )
        .optional()?;
    Ok(((last - acked).max(0), oldest))
}

/// Deletes up to `limit` acknowledged rows older than `cutoff_ms`, oldest first; returns
/// how many went (call again while it returns `limit`). Remembers the highest pruned
/// sequence: a cloud acknowledging less than that has lost rows nobody holds any more.
pub fn prune(
    conn: &Connection,
    acked: i64,
    cutoff_ms: i64,
    limit: i64,
) -> Result<usize, rusqlite::Error> {
    let highest: Option<i64> = conn.query_row(
        "SELECT max(seq) FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE seq <= ?1 ORDER BY seq LIMIT ?3) AND created_ms <= ?2",
        params![acked, cutoff_ms, limit],
        |r| r.get(0),
    )?;
    let deleted = conn.execute(
        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE seq <= ?1 ORDER BY seq LIMIT ?3) AND created_ms <= ?2",
        params![acked, cutoff_ms, limit],
    )?;
    if let Some(highest) = highest.filter(|h| *h > pruned_through(conn).unwrap_or(0)) {
        conn.execute(
            "INSERT OR REPLACE INTO sync_state (key, value) VALUES ('pruned_through', ?1)",
            [highest.to_string()],
        )?;
    }
    Ok(deleted)
}

/// The highest sequence pruned from the outbox (0 before any).
pub fn pruned_through(conn: &Connection) -> Result<i64, rusqlite::Error> {
    let value: Option<String> = conn
        .query_row(
            "SELECT value FROM sync_state WHERE key = 'pruned_through'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The sync epoch rows are sent under now: (epoch, base).
pub fn current_epoch(conn: &Connection) -> Result<(String, i64), rusqlite::Error> {
    conn.query_row(
        "SELECT epoch, base FROM sync_epochs ORDER BY id DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Starts a new sync epoch (after the database went back, say from a backup): a new stream
/// for the cloud, from the oldest row the outbox still holds. Returns (epoch, base).
pub fn start_epoch(conn: &Connection, now_ms: i64) -> Result<(String, i64), rusqlite::Error> {
    let base: i64 = conn.query_row(
        "SELECT coalesce((SELECT min(seq) - 1 FROM outbox), ?1)",
        [last_seq(conn)?],
        |r| r.get(0),
    )?;
    conn.execute(
        "INSERT INTO sync_epochs (epoch, base, started_ms) VALUES (lower(hex(randomblob(16))), ?1, ?2)",
        params![base, now_ms],
    )?;
    current_epoch(conn)
}

/// The cloud database epoch last seen on the link, if any.
pub fn cloud_epoch(conn: &Connection) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row(
        "SELECT value FROM sync_state WHERE key = 'cloud_epoch'",
        [],
        |r| r.get(0),
    )
    .optional()
}

pub fn set_cloud_epoch(conn: &Connection, epoch: &str) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT OR REPLACE INTO sync_state (key, value) VALUES ('cloud_epoch', ?1)",
        [epoch],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_have_no_gaps_even_when_a_savepoint_rolls_back_or_rows_are_pruned() {
        let path =
            std::env::temp_dir().join(format!("labrack-outbox-{}.db", rand::random::<u32>()));
        let mut conn = crate::store::open_connection(&path, false).expect("open");
        crate::store::migrate(&mut conn).expect("migrate");
        let body = serde_json::json!({"x": 1});
        assert_eq!(
            append(&conn, Change::Event, "event:1", &body, 1).expect("append"),
            1
        );
        conn.execute_batch("SAVEPOINT refused").expect("savepoint");
        assert_eq!(
            append(&conn, Change::Team, "team:1", &body, 2).expect("append"),
            2
        );
        conn.execute_batch("ROLLBACK TO refused; RELEASE refused")
            .expect("rollback");
        assert_eq!(
            append(&conn, Change::Team, "team:2", &body, 3).expect("append"),
            2,
            "the refused request's number is reused"
        );
        conn.execute("DELETE FROM outbox", [])
            .expect("prune everything acknowledged");
        assert_eq!(
            append(&conn, Change::Ledger, "ledger:1", &body, 4).expect("append"),
            3,
            "pruning never restarts the sequence"
        );
        assert_eq!(lag(&conn, 2).expect("lag"), (1, Some(4)));
        assert_eq!(
            prune(&conn, 2, 10, 100).expect("prune"),
            0,
            "only acknowledged rows go"
        );
        assert_eq!(
            prune(&conn, 3, 3, 100).expect("prune"),
            0,
            "only rows older than the retention go"
        );
        assert_eq!(prune(&conn, 3, 4, 100).expect("prune"), 1);
        assert_eq!(last_seq(&conn).expect("last"), 3);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
