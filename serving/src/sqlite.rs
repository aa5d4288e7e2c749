//! SQLite connections as every LabRack database opens them, and the one migration runner
//! both the appliance and the cloud use: a list of SQL scripts, `PRAGMA user_version` the
//! number applied, each applied in its own transaction, and a database written by a newer
//! LabRack refused instead of guessed at.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// Opens a connection with the pragmas every LabRack connection needs.
pub fn open_connection(path: &Path, read_only: bool) -> Result<Connection, rusqlite::Error> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // WAL + FULL: a commit is on disk before we acknowledge it (survives kill -9 and power loss).
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;",
    )?;
    Ok(conn)
}

/// Why a database could not be brought to this build's schema.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the {database} database is at schema {found}, newer than this LabRack ({known})")]
    Newer {
        database: &'static str,
        found: i64,
        known: i64,
    },
    #[error("{database} migration {version}: {source}")]
    Failed {
        database: &'static str,
        version: usize,
        source: rusqlite::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Applies every script of `migrations` newer than the database's `user_version`, each in
/// its own transaction; `database` names it in errors and logs.
pub fn migrate(
    conn: &mut Connection,
    database: &'static str,
    migrations: &[&str],
) -> Result<(), MigrationError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let known = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    if found > known {
        return Err(MigrationError::Newer {
            database,
            found,
            known,
        });
    }
    for (index, sql) in migrations
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let version = index + 1;
        let failed = |source| MigrationError::Failed {
            database,
            version,
            source,
        };
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(failed)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(failed)?;
        tx.commit()?;
        tracing::info!(database, version, "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &[&str] = &[
        "CREATE TABLE a (x INTEGER);",
        "ALTER TABLE a ADD COLUMN y TEXT;",
    ];

    fn version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version")
    }

    #[test]
    fn applies_what_is_new_once() {
        let mut conn = Connection::open_in_memory().expect("db");
        migrate(&mut conn, "test", &TWO[..1]).expect("first");
        assert_eq!(version(&conn), 1);
        migrate(&mut conn, "test", TWO).expect("second");
        migrate(&mut conn, "test", TWO).expect("again: nothing to do");
        assert_eq!(version(&conn), 2);
        conn.execute("INSERT INTO a (x, y) VALUES (1, 'y')", [])
            .expect("both columns");
    }

    #[test]
    fn a_failing_script_leaves_the_database_at_the_last_good_version() {
        let mut conn = Connection::open_in_memory().expect("db");
        let broken: &[&str] = &[
            TWO[0],
            "ALTER TABLE a ADD COLUMN z TEXT; SELECT nope FROM nowhere;",
        ];
        let error = migrate(&mut conn, "test", broken).expect_err("broken");
        assert!(
            matches!(error, MigrationError::Failed { version: 2, .. }),
            "{error}"
        );
        assert_eq!(version(&conn), 1);
        let columns: i64 = conn
            .query_row("SELECT count(*) FROM pragma_table_info('a')", [], |r| {
                r.get(0)
            })
            .expect("columns");
        assert_eq!(columns, 1, "the half-applied script was rolled back");
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().expect("db");
        conn.pragma_update(None, "user_version", 9).expect("set");
        let error = migrate(&mut conn, "cloud", TWO).expect_err("newer");
        assert_eq!(
            error.to_string(),
            "the cloud database is at schema 9, newer than this LabRack (2)"
        );
    }
}
