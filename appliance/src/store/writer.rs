//! The single writer: requests queue closures; one thread runs a batch of them in one
//! transaction (each inside its own savepoint) and commits once (group commit), then
//! answers every request. A request that fails rolls back only its own savepoint.
//!
//! No closure ever runs outside the batch's transaction: if `BEGIN` fails nobody runs and
//! everyone is told; if SQLite drops the whole transaction mid-batch (a full disk, an I/O
//! error, a request that ran `COMMIT` or `ROLLBACK` itself), the requests that already ran
//! are told they failed (their changes are gone with it) and the rest run in a new batch.
//! The queue is bounded: when it is full a write is refused at once ([`StoreError::Busy`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use crate::metrics::Metrics;

/// Most requests folded into one transaction.
const MAX_BATCH: usize = 512;
/// Writes that may wait for the writer; more are refused with [`StoreError::Busy`]. At the
/// benchmarked 7,000 writes/s this is about a second of work.
pub(super) const QUEUE_CAPACITY: usize = 8_192;

/// Why a write did not happen.
#[derive(Debug)]
pub enum WriteError<E> {
    /// the request's own logic refused it (its savepoint was rolled back)
    Rejected(E),
    /// storage failed (the whole batch was rolled back)
    Store(StoreError),
}

/// A queued request: run inside the batch, or answered without running.
trait Pending: Send {
    /// Runs the closure in the open transaction; `true` if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers with the batch's outcome (`None`: committed).
    fn finish(self: Box<Self>, failure: Option<StoreError>);
}

struct PendingWrite<F, T, E> {
    f: Option<F>,
    outcome: Option<Result<T, WriteError<E>>>,
    reply: oneshot::Sender<Result<T, WriteError<E>>>,
}

impl<T, E, F> Pending for PendingWrite<F, T, E>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else { return false };
        let outcome = match catch_unwind(AssertUnwindSafe(|| f(conn))) {
            Ok(result) => result.map_err(WriteError::Rejected),
            Err(_) => Err(WriteError::Store(StoreError::Join(
                "write job panicked".into(),
            ))),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, failure: Option<StoreError>) {
        let answer = match (self.outcome, failure) {
            // refused by its own logic: that is the answer, whatever happened to the batch
            (Some(Err(WriteError::Rejected(e))), _) => Err(WriteError::Rejected(e)),
            (_, Some(error)) => Err(WriteError::Store(error)),
            (Some(outcome), None) => outcome,
            (None, None) => Err(WriteError::Store(StoreError::Join(
                "the write was never run".into(),
            ))),
        };
        let _ = self.reply.send(answer);
    }
}

enum Message {
    Job(Box<dyn Pending>),
    /// finish what is queued, then stop
    Shutdown,
}

/// Cloneable handle that queues writes.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Message>,
    metrics: Arc<Metrics>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Writer {
    pub(super) fn start(conn: Connection, metrics: Arc<Metrics>) -> Self {
        Self::start_with_capacity(conn, metrics, QUEUE_CAPACITY)
    }

    fn start_with_capacity(conn: Connection, metrics: Arc<Metrics>, capacity: usize) -> Self {
        let (queue, jobs) = mpsc::channel(capacity.max(1));
        let thread_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, jobs, &thread_metrics))
            .ok();
        Self {
            queue,
            metrics,
            thread: Arc::new(std::sync::Mutex::new(thread)),
        }
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
        let job: Box<dyn Pending> = Box::new(PendingWrite {
            f: Some(f),
            outcome: None,
            reply,
        });
        self.metrics.writer_queue_depth.inc();
        match self.queue.try_send(Message::Job(job)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.writer_queue_depth.dec();
                return Err(WriteError::Store(StoreError::Busy));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.writer_queue_depth.dec();
                return Err(WriteError::Store(StoreError::WriterClosed));
            }
        }
        answer
            .await
            .unwrap_or(Err(WriteError::Store(StoreError::WriterClosed)))
    }

    /// Lets the writer finish every write queued so far, then stops it and waits. Writes
    /// queued afterwards fail with [`StoreError::WriterClosed`].
    pub fn shutdown(&self) {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        // the queue may be full: the writer drains it, so a slot comes
        let mut message = Message::Shutdown;
        for _ in 0..60_000 {
            match self.queue.try_send(message) {
                Err(mpsc::error::TrySendError::Full(back)) => {
                    message = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                _ => break,
            }
        }
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

fn run(conn: Connection, mut jobs: mpsc::Receiver<Message>, metrics: &Metrics) {
    let mut batch: Vec<Box<dyn Pending>> = Vec::with_capacity(MAX_BATCH);
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
        metrics.writer_queue_depth.dec_by(taken);
        metrics.writer_jobs.inc_by(taken.unsigned_abs());
        let mut pending: std::collections::VecDeque<Box<dyn Pending>> = batch.drain(..).collect();
        while !pending.is_empty() {
            metrics.writer_batches.inc();
            run_batch(&conn, &mut pending);
        }
    }
    jobs.close();
    tracing::info!("database writer stopped");
}

fn sqlite_failure(error: &rusqlite::Error) -> StoreError {
    StoreError::Join(format!("the write was not stored: {error}"))
}

/// Runs requests from the front of `pending` in one transaction until it is empty or the
/// transaction is lost; what was not run stays in `pending` for the next batch.
fn run_batch(conn: &Connection, pending: &mut std::collections::VecDeque<Box<dyn Pending>>) {
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(%error, "could not begin a write transaction");
        // nothing runs outside a transaction: answer everyone waiting
        for job in pending.drain(..) {
            job.finish(Some(sqlite_failure(&error)));
        }
        return;
    }
    let mut ran: Vec<Box<dyn Pending>> = Vec::new();
    let mut lost = None;
    while let Some(mut job) = pending.pop_front() {
        if let Err(error) = conn
            .prepare_cached("SAVEPOINT request")
            .and_then(|mut s| s.execute([]))
        {
            pending.push_front(job);
            lost = Some(error.to_string());
            break;
        }
        let ok = job.run(conn);
        ran.push(job);
        // a request (or SQLite, after a full disk or an I/O error) may have ended the
        // transaction: then everything this batch ran is gone, and nothing more may run
        if conn.is_autocommit() {
            lost = Some("the transaction was rolled back by SQLite".to_owned());
            break;
        }
        let closing = if ok {
            conn.prepare_cached("RELEASE request")
                .and_then(|mut s| s.execute([]))
                .map(drop)
        } else {
            conn.execute_batch("ROLLBACK TO request; RELEASE request")
        };
        if let Err(error) = closing {
            lost = Some(format!("closing a savepoint failed: {error}"));
            break;
        }
    }
    if let Some(why) = lost {
        tracing::error!(
            why,
            ran = ran.len(),
            retried = pending.len(),
            "write batch lost; the requests it ran failed, the rest go in a new batch"
        );
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for job in ran {
            job.finish(Some(StoreError::Join(format!(
                "the write was not stored: {why}"
            ))));
        }
        return;
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            for job in ran {
                job.finish(None);
            }
        }
        Err(error) => {
            tracing::error!(%error, "group commit failed");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            for job in ran {
                job.finish(Some(sqlite_failure(&error)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn writer() -> (Writer, tempfile_path::TempPath) {
        let path = tempfile_path::TempPath::new();
        let conn = super::super::open_connection(&path.0, false).expect("open");
        conn.execute_batch("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
            .expect("schema");
        (Writer::start(conn, Arc::new(Metrics::default())), path)
    }

    mod tempfile_path {
        pub(crate) struct TempPath(pub(crate) std::path::PathBuf);
        impl TempPath {
            pub(crate) fn new() -> Self {
                let name = format!(
                    "labrack-writer-test-{}-{}.db",
                    std::process::id(),
                    rand::random::<u64>()
                );
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
                    c.execute("INSERT INTO t (v) VALUES (?1)", [v])
                        .map_err(|e| e.to_string())?;
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
        let stored: i64 = reader
            .query_row("SELECT count(*) FROM t WHERE v % 10 = 0", [], |r| r.get(0))
            .expect("q");
        assert_eq!(stored, 0, "rolled-back savepoints left rows");
        let total: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("q");
        assert_eq!(total, 180);
        writer.shutdown();
    }

    #[tokio::test]
    async fn a_panicking_request_is_reported_and_rolled_back() {
        let (writer, path) = writer();
        let result: Result<(), WriteError<String>> = writer
            .write(|c| {
                c.execute("INSERT INTO t (v) VALUES (1)", [])
                    .map_err(|e| e.to_string())?;
                panic!("boom")
            })
            .await;
        assert!(matches!(result, Err(WriteError::Store(_))));
        let ok: Result<i64, WriteError<String>> = writer.write(|_| Ok(7)).await;
        assert_eq!(ok.ok(), Some(7));
        let reader = rusqlite::Connection::open(&path.0).expect("open reader");
        let total: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("q");
        assert_eq!(total, 0);
        writer.shutdown();
    }

    /// Holds the writer thread for a moment, so the next writes queue into one batch.
    fn hold_writer(writer: &Writer) -> tokio::task::JoinHandle<Result<(), WriteError<String>>> {
        let w = writer.clone();
        tokio::spawn(async move {
            w.write(|_| {
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(())
            })
            .await
        })
    }

    #[tokio::test]
    async fn a_lost_transaction_fails_what_ran_and_runs_the_rest_in_a_new_batch() {
        let (writer, path) = writer();
        let held = hold_writer(&writer);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let insert = |v: i64| {
            move |c: &Connection| {
                c.execute("INSERT INTO t (v) VALUES (?1)", [v])
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        };
        let (first, breaker, after) = tokio::join!(
            writer.write(insert(1)),
            // ends the outer transaction itself, as SQLite does after a full disk
            writer.write(|c: &Connection| c
                .execute_batch("INSERT INTO t (v) VALUES (2); ROLLBACK")
                .map_err(|e| e.to_string())),
            writer.write(insert(3)),
        );
        held.await.expect("join").expect("held");
        assert!(
            matches!(first, Err(WriteError::Store(_))),
            "its changes went with the transaction: {first:?}"
        );
        assert!(matches!(breaker, Err(WriteError::Store(_))), "{breaker:?}");
        assert!(after.is_ok(), "the rest ran in a new batch: {after:?}");
        let reader = rusqlite::Connection::open(&path.0).expect("open reader");
        let stored: Vec<i64> = reader
            .prepare("SELECT v FROM t ORDER BY v")
            .expect("q")
            .query_map([], |r| r.get(0))
            .expect("q")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            stored,
            vec![3],
            "what callers were told failed is not stored, nothing ran in autocommit"
        );
        writer.shutdown();
    }

    #[tokio::test]
    async fn nothing_runs_when_the_transaction_cannot_begin() {
        let path = tempfile_path::TempPath::new();
        let conn = super::super::open_connection(&path.0, false).expect("open");
        conn.busy_timeout(std::time::Duration::from_millis(50))
            .expect("timeout");
        // another process holds the write lock: BEGIN IMMEDIATE fails as busy
        let other = super::super::open_connection(&path.0, false).expect("open other");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let writer = Writer::start(conn, Arc::new(Metrics::default()));
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let result: Result<(), WriteError<String>> = writer
            .write(move |_| {
                flag.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(result, Err(WriteError::Store(_))), "{result:?}");
        assert!(
            !ran.load(Ordering::SeqCst),
            "the closure must not run outside a transaction"
        );
        other.execute_batch("ROLLBACK").expect("unlock");
        let again: Result<i64, WriteError<String>> = writer.write(|_| Ok(1)).await;
        assert_eq!(again.ok(), Some(1), "the next batch begins normally");
        writer.shutdown();
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let path = tempfile_path::TempPath::new();
        let conn = super::super::open_connection(&path.0, false).expect("open");
        let writer = Writer::start_with_capacity(conn, Arc::new(Metrics::default()), 4);
        let held = hold_writer(&writer);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let writes: Vec<_> = (0..10)
            .map(|_| writer.write(|_| Ok::<_, String>(())))
            .collect();
        let results = futures_util::future::join_all(writes).await;
        held.await.expect("join").expect("held");
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(WriteError::Store(StoreError::Busy))))
            .count();
        assert_eq!(busy, 6, "four queued, six refused: {results:?}");
        assert!(results.iter().filter(|r| r.is_ok()).count() == 4);
        writer.shutdown();
    }
}
