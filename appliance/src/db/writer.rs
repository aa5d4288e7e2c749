//! The single writer: requests queue closures; one thread runs a batch of them in one
//! transaction (each inside its own savepoint) and commits once (group commit), then
//! answers every request. A request that fails rolls back only its own savepoint.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use crate::metrics::Metrics;

/// Most requests folded into one transaction.
const MAX_BATCH: usize = 512;

/// Why a write did not happen.
#[derive(Debug)]
pub enum WriteError<E> {
    /// the request's own logic refused it (its savepoint was rolled back)
    Rejected(E),
    /// storage failed (the whole batch was rolled back)
    Store(StoreError),
}

/// Answers the request once the batch's commit outcome is known (`Some` = commit failed).
type Finish = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// What a queued job hands back once it ran inside the batch.
struct Ran {
    ok: bool,
    finish: Finish,
}

type Job = Box<dyn FnOnce(&Connection) -> Ran + Send>;

enum Message {
    Job(Job),
    /// finish what is queued, then stop
    Shutdown,
}

/// Cloneable handle that queues writes.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::UnboundedSender<Message>,
    metrics: Arc<Metrics>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Writer {
    pub(super) fn start(conn: Connection, metrics: Arc<Metrics>) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        let thread_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, jobs, &thread_metrics))
            .ok();
        Self { queue, metrics, thread: Arc::new(std::sync::Mutex::new(thread)) }
    }

    /// Runs `f` inside the next group-committed transaction and resolves once the commit is
    /// durable. If `f` returns an error its changes are rolled back and nothing is stored.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, WriteError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, WriteError<E>>>();
        let job: Job = Box::new(move |conn: &Connection| {
            let outcome = match catch_unwind(AssertUnwindSafe(|| f(conn))) {
                Ok(result) => result.map_err(WriteError::Rejected),
                Err(_) => Err(WriteError::Store(StoreError::Join("write job panicked".into()))),
            };
            Ran {
                ok: outcome.is_ok(),
                finish: Box::new(move |commit_error| {
                    let answer = match (outcome, commit_error) {
                        (Ok(_), Some(error)) => Err(WriteError::Store(StoreError::Join(format!("commit failed: {error}")))),
                        (outcome, _) => outcome,
                    };
                    let _ = reply.send(answer);
                }),
            }
        });
        self.metrics.writer_queue_depth.fetch_add(1, Ordering::Relaxed);
        if self.queue.send(Message::Job(job)).is_err() {
            self.metrics.writer_queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(WriteError::Store(StoreError::WriterClosed));
        }
        answer.await.unwrap_or(Err(WriteError::Store(StoreError::WriterClosed)))
    }

    /// Lets the writer finish every write queued so far, then stops it and waits. Writes
    /// queued afterwards fail with [`StoreError::WriterClosed`].
    pub fn shutdown(&self) {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        let _ = self.queue.send(Message::Shutdown);
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

fn run(conn: Connection, mut jobs: mpsc::UnboundedReceiver<Message>, metrics: &Metrics) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    while !stopping {
        match jobs.blocking_recv() {
            Some(Message::Job(first)) => batch.push(first),
            Some(Message::Shutdown) => stopping = true,
            None => break,
        }
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Shutdown) => stopping = true,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let taken = i64::try_from(batch.len()).unwrap_or(i64::MAX);
        metrics.writer_queue_depth.fetch_sub(taken, Ordering::Relaxed);
        metrics.writer_batches.fetch_add(1, Ordering::Relaxed);
        metrics.writer_jobs.fetch_add(taken.unsigned_abs(), Ordering::Relaxed);
        run_batch(&conn, batch.drain(..));
    }
    jobs.close();
    tracing::info!("database writer stopped");
}

fn run_batch(conn: &Connection, batch: impl Iterator<Item = Job>) {
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        for job in batch {
            // Run nothing; answer everyone with the error.
            let ran = job(conn);
            (ran.finish)(Some(&error));
        }
        return;
    }
    let mut finished = Vec::new();
    for job in batch {
        if let Err(error) = conn.prepare_cached("SAVEPOINT request").and_then(|mut s| s.execute([])) {
            finished.push(Ran { ok: false, finish: Box::new(move |_| drop(error)) });
            continue;
        }
        let ran = job(conn);
        let closing = if ran.ok { conn.prepare_cached("RELEASE request").and_then(|mut s| s.execute([])).map(drop) } else { conn.execute_batch("ROLLBACK TO request; RELEASE request") };
        if let Err(error) = closing {
            tracing::error!(%error, "savepoint close failed");
        }
        finished.push(ran);
    }
    let commit = conn.execute_batch("COMMIT");
    if let Err(error) = &commit {
        tracing::error!(%error, "group commit failed");
        let _ = conn.execute_batch("ROLLBACK");
    }
    for ran in finished {
        (ran.finish)(commit.as_ref().err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> (Writer, tempfile_path::TempPath) {
        let path = tempfile_path::TempPath::new();
        let conn = super::super::open_connection(&path.0, false).expect("open");
        conn.execute_batch("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)").expect("schema");
        (Writer::start(conn, Arc::new(Metrics::default())), path)
    }

    mod tempfile_path {
        pub(crate) struct TempPath(pub(crate) std::path::PathBuf);
        impl TempPath {
            pub(crate) fn new() -> Self {
                let name = format!("labrack-writer-test-{}-{}.db", std::process::id(), rand::random::<u64>());
                Self(std::env::temp_dir().join(name))
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
                }
            }
        }
    }

    #[tokio::test]
    async fn a_rejected_request_changes_nothing_while_its_batch_mates_commit() {
        let (writer, path) = writer();
        let mut tasks = Vec::new();
        for v in 0..200_i64 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                w.write(move |c| {
                    c.execute("INSERT INTO t (v) VALUES (?1)", [v]).map_err(|e| e.to_string())?;
                    if v % 10 == 0 {
                        return Err("refused".to_string());
                    }
                    Ok(v)
                })
                .await
            }));
        }
        let mut accepted = 0;
        for task in tasks {
            match task.await.expect("join") {
                Ok(_) => accepted += 1,
                Err(WriteError::Rejected(reason)) => assert_eq!(reason, "refused"),
                Err(WriteError::Store(e)) => panic!("store error {e}"),
            }
        }
        assert_eq!(accepted, 180);
        let reader = rusqlite::Connection::open(&path.0).expect("open reader");
        let stored: i64 = reader.query_row("SELECT count(*) FROM t WHERE v % 10 = 0", [], |r| r.get(0)).expect("q");
        assert_eq!(stored, 0, "rolled-back savepoints left rows");
        let total: i64 = reader.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("q");
        assert_eq!(total, 180);
        writer.shutdown();
    }

    #[tokio::test]
    async fn a_panicking_request_is_reported_and_rolled_back() {
        let (writer, path) = writer();
        let result: Result<(), WriteError<String>> = writer
            .write(|c| {
                c.execute("INSERT INTO t (v) VALUES (1)", []).map_err(|e| e.to_string())?;
                panic!("boom")
            })
            .await;
        assert!(matches!(result, Err(WriteError::Store(_))));
        let ok: Result<i64, WriteError<String>> = writer.write(|_| Ok(7)).await;
        assert_eq!(ok.ok(), Some(7));
        let reader = rusqlite::Connection::open(&path.0).expect("open reader");
        let total: i64 = reader.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("q");
        assert_eq!(total, 0);
        writer.shutdown();
    }
}
