//! SQLite storage: versioned migrations, one group-commit writer, a pool of read connections.
//!
//! Architecture invariant: every write goes through [`Writer`]; nothing else opens a
//! connection that writes. Readers never see a half-applied request because each request's
//! writes run inside one savepoint of one committed transaction.

mod migrations;
mod writer;

pub use migrations::{MIGRATIONS, migrate};
pub use writer::{WriteError, Writer};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

/// The database file in the data directory.
pub const DB_FILE: &str = "labrack.db";

/// Errors from the storage layer itself (not from the domain rules run inside it).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sqlite reported an error
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// the writer thread has stopped (shutdown in progress)
    #[error("the database writer has stopped")]
    WriterClosed,
    /// the write queue is full: retry in a moment
    #[error("the database is busy; retry shortly")]
    Busy,
    /// a blocking read task failed to run
    #[error("read task failed: {0}")]
    Join(String),
    /// the schema could not be brought up to date
    #[error(transparent)]
    Migration(#[from] labrack_serving::sqlite::MigrationError),
}

/// Opens a connection with the pragmas every LabRack connection needs.
pub fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    Ok(labrack_serving::sqlite::open_connection(path, read_only)?)
}

/// Handle to the database: the writer and a small pool of read connections.
#[derive(Clone)]
pub struct Db {
    path: PathBuf,
    writer: Writer,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl Db {
    /// Opens (creating if needed) the database, runs migrations and starts the writer thread.
    pub fn open(path: &Path, metrics: Arc<crate::metrics::Metrics>) -> Result<Self, StoreError> {
        let mut conn = open_connection(path, false)?;
        migrate(&mut conn)?;
        let writer = Writer::start(conn, metrics);
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The group-commit writer.
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Runs `f` on a read connection on the blocking pool.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.take_reader()?;
            let result = f(&conn);
            this.put_reader(conn);
            result
        })
        .await
        .map_err(|e| E::from(StoreError::Join(e.to_string())))?
    }

    fn take_reader(&self) -> Result<Connection, StoreError> {
        let pooled = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        match pooled {
            Some(conn) => Ok(conn),
            None => {
                let conn = open_connection(&self.path, true)?;
                conn.execute_batch("PRAGMA query_only=ON;")?;
                Ok(conn)
            }
        }
    }

    fn put_reader(&self, conn: Connection) {
        if let Ok(mut pool) = self.readers.lock()
            && pool.len() < 16
        {
            pool.push(conn);
        }
    }
}
