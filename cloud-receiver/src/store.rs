//! The cloud's database: enrolled appliances, their enrolment and admin tokens, and the
//! rows each sent, one stream per epoch of the appliance's database. A new epoch (after a
//! restore from a backup) continues the previous one from its `base`; the `effective` view
//! holds the rows of each stream up to where the next one takes over. Batches are applied
//! idempotently by (appliance, epoch, sequence) in one transaction each.

use std::path::Path;

use anyhow::Context as _;
use labrack_serving::tokens::{hash_secret, random_token};
use labrack_wire::sync::{self as protocol, Batch};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::clock::now_ms;

/// The database file in the cloud's data directory.
pub const DB_FILE: &str = "cloud.db";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS appliances (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL UNIQUE,
    acked INTEGER NOT NULL DEFAULT 0,
    enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL,
    used_by INTEGER REFERENCES appliances(id)
);
CREATE TABLE IF NOT EXISTS admin_tokens (token_sha256 TEXT PRIMARY KEY, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS received (
    appliance_id INTEGER NOT NULL REFERENCES appliances(id),
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    entity TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (appliance_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS received_by_kind ON received(appliance_id, kind, seq);
"#;

/// Versioned migrations after [`SCHEMA`] (the first cloud databases had none);
/// `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: database epochs and one stream of rows per (appliance, epoch); rows received before
    // epochs existed are the stream with the empty epoch
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('epoch', lower(hex(randomblob(16))));
CREATE TABLE streams (
    id INTEGER PRIMARY KEY,
    appliance_id INTEGER NOT NULL REFERENCES appliances(id),
    epoch TEXT NOT NULL,
    base INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    UNIQUE (appliance_id, epoch)
);
INSERT INTO streams (appliance_id, epoch, base, acked, started_ms) SELECT id, '', 0, acked, enrolled_ms FROM appliances;
CREATE TABLE received_v2 (
    appliance_id INTEGER NOT NULL REFERENCES appliances(id),
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    entity TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (appliance_id, epoch, seq)
) WITHOUT ROWID;
INSERT INTO received_v2 SELECT appliance_id, '', seq, kind, entity, body, created_ms FROM received;
DROP TABLE received;
ALTER TABLE received_v2 RENAME TO received;
CREATE INDEX received_by_kind ON received(appliance_id, kind, seq);
ALTER TABLE appliances ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
CREATE VIEW effective AS
    SELECT r.appliance_id, r.epoch, r.seq, r.kind, r.entity, r.body, r.created_ms
    FROM received r JOIN streams s ON s.appliance_id = r.appliance_id AND s.epoch = r.epoch
    WHERE r.seq <= coalesce((SELECT min(n.base) FROM streams n WHERE n.appliance_id = s.appliance_id AND n.id > s.id), 9223372036854775807);
"#,
];

/// The base schema (`CREATE … IF NOT EXISTS`, so it is a no-op on any cloud database),
/// then [`MIGRATIONS`] through the shared runner.
fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute_batch(SCHEMA).context("the cloud schema")?;
    labrack_serving::sqlite::migrate(conn, "cloud", MIGRATIONS)?;
    Ok(())
}

/// Opens (creating and migrating) the cloud database in `data_dir`.
pub fn open(data_dir: &Path) -> anyhow::Result<Connection> {
    labrack_serving::data_dir::prepare(data_dir)?;
    let mut conn = labrack_serving::sqlite::open_connection(&data_dir.join(DB_FILE), false)
        .context("opening the cloud database")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// A new admin token for the read API when the database has none yet (its first start):
/// printed once, stored hashed.
pub fn first_admin_token(conn: &Connection) -> anyhow::Result<Option<String>> {
    let fresh: bool = conn.query_row("SELECT NOT EXISTS(SELECT 1 FROM admin_tokens)", [], |r| {
        r.get(0)
    })?;
    if !fresh {
        return Ok(None);
    }
    let token = format!("lrca_{}", random_token());
    conn.execute(
        "INSERT INTO admin_tokens (token_sha256, created_ms) VALUES (?1, ?2)",
        params![hash_secret(&token), now_ms()],
    )?;
    Ok(Some(token))
}

/// A new one-time enrolment token (printed once; stored hashed).
pub fn new_enrolment_token(conn: &Connection, ttl_secs: u64) -> anyhow::Result<String> {
    let token = format!("lrc_{}", random_token());
    conn.execute(
        "INSERT INTO enrolment_tokens (token_sha256, expires_ms) VALUES (?1, ?2)",
        params![
            hash_secret(&token),
            now_ms()
                .saturating_add(i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX))
        ],
    )?;
    Ok(token)
}

/// A refusal: what to tell the appliance, and a code it may act on.
pub type Refusal = (String, Option<String>);

/// Who is calling — an enrolled appliance, or one enrolled now — and where its stream for
/// `hello.epoch` stands: `(appliance id, acked)`. A new epoch starts a stream at its base;
/// an epoch whose stream holds more than the appliance ever wrote is refused.
pub fn admit(
    conn: &Connection,
    fingerprint: &str,
    hello: &protocol::Hello,
) -> Result<(i64, i64), Refusal> {
    let id = enrolled(conn, fingerprint, &hello.name, hello.token.as_deref())
        .map_err(|reason| (reason, None))?;
    let stream: Option<i64> = conn
        .query_row(
            "SELECT acked FROM streams WHERE appliance_id = ?1 AND epoch = ?2",
            params![id, hello.epoch],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| (e.to_string(), None))?;
    let acked = match stream {
        Some(acked) if acked > hello.last_seq => {
            return Err((
                format!(
                    "epoch {:?}: this cloud holds the appliance's rows up to {acked}, but the appliance has written only up to {}: its database went back (restored from a backup?). Nothing was applied; on the appliance, an admin starts a new sync epoch to send what it holds.",
                    hello.epoch, hello.last_seq
                ),
                Some(protocol::EPOCH_MISMATCH.to_owned()),
            ));
        }
        Some(acked) => acked,
        None => {
            if hello.base < 0 || hello.base > hello.last_seq {
                return Err((
                    format!(
                        "epoch {:?} starts after {} but the appliance wrote only {}",
                        hello.epoch, hello.base, hello.last_seq
                    ),
                    None,
                ));
            }
            conn.execute(
                "INSERT INTO streams (appliance_id, epoch, base, acked, started_ms) VALUES (?1, ?2, ?3, ?3, ?4)",
                params![id, hello.epoch, hello.base, now_ms()],
            )
            .map_err(|e| (e.to_string(), None))?;
            tracing::info!(appliance = id, epoch = %hello.epoch, base = hello.base, "a new sync epoch");
            hello.base
        }
    };
    conn.execute(
        "UPDATE appliances SET epoch = ?2, acked = ?3 WHERE id = ?1",
        params![id, hello.epoch, acked],
    )
    .map_err(|e| (e.to_string(), None))?;
    Ok((id, acked))
}

/// The enrolled appliance with this certificate, or one enrolled now with `token`.
fn enrolled(
    conn: &Connection,
    fingerprint: &str,
    name: &str,
    token: Option<&str>,
) -> Result<i64, String> {
    let known: Option<i64> = conn
        .query_row(
            "SELECT id FROM appliances WHERE cert_sha256 = ?1",
            [fingerprint],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    if let Some(id) = known {
        conn.execute(
            "UPDATE appliances SET last_seen_ms = ?2 WHERE id = ?1",
            params![id, now_ms()],
        )
        .map_err(|e| e.to_string())?;
        return Ok(id);
    }
    let Some(token) = token else {
        return Err("this appliance is not enrolled: give it an enrolment token from `labrack-cloud enrol-token`".into());
    };
    let row: Option<(i64, Option<i64>)> = conn
        .query_row(
            "SELECT expires_ms, used_by FROM enrolment_tokens WHERE token_sha256 = ?1",
            [hash_secret(token)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    match row {
        None => Err("unknown enrolment token".into()),
        Some((_, Some(_))) => Err("this enrolment token was already used".into()),
        Some((expires, None)) if expires <= now_ms() => {
            Err("this enrolment token has expired".into())
        }
        Some(_) => {
            let name: String = name.chars().filter(|c| !c.is_control()).take(100).collect();
            conn.execute(
                "INSERT INTO appliances (name, cert_sha256, enrolled_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?3)",
                params![name, fingerprint, now_ms()],
            )
            .map_err(|e| e.to_string())?;
            let id = conn.last_insert_rowid();
            conn.execute(
                "UPDATE enrolment_tokens SET used_by = ?2 WHERE token_sha256 = ?1",
                params![hash_secret(token), id],
            )
            .map_err(|e| e.to_string())?;
            tracing::info!(appliance = id, %name, "appliance enrolled");
            Ok(id)
        }
    }
}

/// Applies a batch to the appliance's stream for `epoch` in one transaction: rows already
/// held (and rows at or below the stream's base) change nothing; returns the highest
/// contiguous sequence now held.
pub fn apply(
    conn: &mut Connection,
    appliance_id: i64,
    epoch: &str,
    batch: &Batch,
) -> Result<i64, rusqlite::Error> {
    let tx = conn.transaction()?;
    let (base, mut acked): (i64, i64) = tx.query_row(
        "SELECT base, acked FROM streams WHERE appliance_id = ?1 AND epoch = ?2",
        params![appliance_id, epoch],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO received (appliance_id, epoch, seq, kind, entity, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for row in batch.rows.iter().filter(|row| row.seq > base) {
            insert.execute(params![
                appliance_id,
                epoch,
                row.seq,
                row.kind,
                row.entity,
                row.body,
                row.created_ms
            ])?;
        }
        let mut held = tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM received WHERE appliance_id = ?1 AND epoch = ?2 AND seq = ?3)")?;
        loop {
            let next: bool =
                held.query_row(params![appliance_id, epoch, acked + 1], |r| r.get(0))?;
            if !next {
                break;
            }
            acked += 1;
        }
    }
    tx.execute(
        "UPDATE streams SET acked = ?3 WHERE appliance_id = ?1 AND epoch = ?2",
        params![appliance_id, epoch, acked],
    )?;
    tx.execute(
        "UPDATE appliances SET acked = ?2, last_seen_ms = ?3 WHERE id = ?1 AND epoch = ?4",
        params![appliance_id, acked, now_ms(), epoch],
    )?;
    tx.commit()?;
    Ok(acked)
}

/// This cloud database's epoch.
pub fn epoch(conn: &Connection) -> Result<String, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
        r.get(0)
    })
}
