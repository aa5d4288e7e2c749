//! The audit log as a hash chain: each row's `hash` is SHA-256 over the previous row's hash
//! and its own fields, so editing, removing or reordering any row breaks every hash after
//! it — even for someone who can open the database file and drop the append-only triggers.
//! Each row also goes to the outbox, so the cloud holds a copy a local attacker cannot reach.
//! Rows written before the chain existed have no hash; the chain starts after them.

use rusqlite::{Connection, OptionalExtension as _, params};
use sha2::Digest as _;

/// Where a request came from and its id: what the audit log records.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub remote_addr: String,
    pub request_id: String,
}

impl RequestMeta {
    /// The key guesses from this client are counted under (an IPv6 client by its /64).
    pub fn client_key(&self) -> String {
        match self.remote_addr.parse::<std::net::IpAddr>() {
            Ok(ip) => crate::attempts::client_key(ip),
            Err(_) => format!("ip:{}", self.remote_addr),
        }
    }
}

/// Audit actions that record a refused attempt: the one trace a refused request leaves.
pub const REFUSAL_AUDITS: &[&str] = &[
    "auth.login_failed",
    "auth.lockout",
    "participant.join_failed",
    "participant.join_lockout",
    "host.enrol_failed",
    "host.enrol_lockout",
    "terminal.ticket_refused",
    "desktop.ticket_refused",
];

/// Appends one audit row for a change made on `meta`'s request by `actor`. Call inside the same write as the change it records.
pub fn record(
    conn: &Connection,
    actor: &str,
    meta: &RequestMeta,
    action: &str,
    target: Option<&str>,
    detail: serde_json::Value,
) -> Result<(), crate::error::Error> {
    let (at, detail) = (crate::clock::now_rfc3339(), detail.to_string());
    let entry = Entry {
        at: &at,
        actor,
        action,
        target,
        remote_addr: Some(&meta.remote_addr),
        request_id: Some(&meta.request_id),
        detail: &detail,
    };
    append(conn, &entry, crate::clock::now_ms())?;
    Ok(())
}

/// One row to append.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub at: &'a str,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub remote_addr: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub detail: &'a str,
}

/// The hash of `entry` after `previous` (empty for the first row of the chain). JSON keeps
/// the fields apart unambiguously.
pub fn chain_hash(previous: &str, entry: &Entry<'_>) -> String {
    let fields = serde_json::json!([
        previous,
        entry.at,
        entry.actor,
        entry.action,
        entry.target,
        entry.remote_addr,
        entry.request_id,
        entry.detail
    ]);
    hex::encode(sha2::Sha256::digest(fields.to_string().as_bytes()))
}

/// Appends `entry` to the chain (and the outbox) in the caller's transaction; its id.
pub fn append(conn: &Connection, entry: &Entry<'_>, now_ms: i64) -> Result<i64, rusqlite::Error> {
    let previous: Option<String> = conn
        .query_row(
            "SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let hash = chain_hash(previous.as_deref().unwrap_or(""), entry);
    conn.prepare_cached("INSERT INTO audit_log (at, actor, action, target, remote_addr, request_id, detail, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?
        .execute(params![entry.at, entry.actor, entry.action, entry.target, entry.remote_addr, entry.request_id, entry.detail, hash])?;
    let id = conn.last_insert_rowid();
    let body = serde_json::json!({
        "id": id, "at": entry.at, "actor": entry.actor, "action": entry.action, "target": entry.target,
        "remote_addr": entry.remote_addr, "request_id": entry.request_id, "detail": entry.detail,
        "previous": previous, "hash": hash,
    });
    crate::outbox::append(
        conn,
        crate::outbox::Change::Audit,
        &format!("audit:{id}"),
        &body,
        now_ms,
    )?;
    Ok(id)
}

/// What checking the chain found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Verified {
    /// rows checked (those in the chain)
    pub rows: i64,
    /// the first row whose hash does not follow from the one before (edited, inserted or
    /// reordered), if any
    pub first_broken: Option<i64>,
}

/// Walks the chain from its first hashed row.
pub fn verify(conn: &Connection) -> Result<Verified, rusqlite::Error> {
    let mut statement = conn.prepare(
        "SELECT id, at, actor, action, target, remote_addr, request_id, coalesce(detail, ''), hash FROM audit_log
         WHERE id >= coalesce((SELECT min(id) FROM audit_log WHERE hash IS NOT NULL), 9223372036854775807) ORDER BY id",
    )?;
    let mut rows = statement.query([])?;
    let (mut previous, mut checked) = (String::new(), 0_i64);
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let (at, actor, action, target, remote, request, detail): (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            String,
        ) = (
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
            row.get(6)?,
            row.get(7)?,
        );
        let stored: Option<String> = row.get(8)?;
        let entry = Entry {
            at: &at,
            actor: &actor,
            action: &action,
            target: target.as_deref(),
            remote_addr: remote.as_deref(),
            request_id: request.as_deref(),
            detail: &detail,
        };
        let expected = chain_hash(&previous, &entry);
        if stored.as_deref() != Some(expected.as_str()) {
            return Ok(Verified {
                rows: checked,
                first_broken: Some(id),
            });
        }
        checked += 1;
        previous = expected;
    }
    Ok(Verified {
        rows: checked,
        first_broken: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(action: &'a str, detail: &'a str) -> Entry<'a> {
        Entry {
            at: "2026-12-02T10:00:00Z",
            actor: "staff:org",
            action,
            target: Some("event:1"),
            remote_addr: Some("10.0.0.1"),
            request_id: Some("r1"),
            detail,
        }
    }

    #[test]
    fn an_edited_inserted_or_removed_row_breaks_the_chain_from_there()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut conn = Connection::open_in_memory()?;
        crate::store::migrate(&mut conn)?;
        // A row from before the chain: not checked, not a break.
        conn.execute("INSERT INTO audit_log (at, actor, action, detail) VALUES ('2026-01-01T00:00:00Z', 'system', 'old', '{}')", [])?;
        for n in 0..5 {
            append(&conn, &entry("event.updated", &format!("{{\"n\":{n}}}")), 1)?;
        }
        assert_eq!(
            verify(&conn)?,
            Verified {
                rows: 5,
                first_broken: None
            }
        );
        let sent: i64 = conn.query_row(
            "SELECT count(*) FROM outbox WHERE kind = 'audit'",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(sent, 5, "every chained row goes to the cloud");
        // Someone with the file drops the triggers and edits row 4.
        conn.execute_batch("DROP TRIGGER audit_log_is_append_only_update; DROP TRIGGER audit_log_is_append_only_delete;")?;
        conn.execute(
            "UPDATE audit_log SET detail = '{\"n\":99}' WHERE id = 4",
            [],
        )?;
        assert_eq!(verify(&conn)?.first_broken, Some(4));
        conn.execute("UPDATE audit_log SET detail = '{\"n\":2}' WHERE id = 4", [])?;
        assert_eq!(
            verify(&conn)?.first_broken,
            None,
            "restored, it verifies again"
        );
        conn.execute("DELETE FROM audit_log WHERE id = 3", [])?;
        assert_eq!(
            verify(&conn)?.first_broken,
            Some(4),
            "a removed row breaks the next one"
        );
        Ok(())
    }
}
