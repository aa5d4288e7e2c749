//! The host's durable memory, in sled:
//!
//! - `tasks`: task id → `started` or `done`. A task is marked `started` (and flushed)
//!   before it runs, so a task id never runs twice, even across a crash or restart;
//! - `outbox`: messages for the appliance (task reports, telemetry) under a monotonic key,
//!   delivered in order and removed only once the appliance acknowledged them.
//!
//! A task's `done` mark and its report enter the spool in one sled transaction.
//!
//! The agent sees only [`HostMemory`] and [`OutboxKey`]: sled, its trees and the bytes
//! stored in them are this module's business, so the file format can change here alone.

use std::path::Path;

use labrack_provisioner::protocol::{TaskId, TaskReport, Telemetry};
use serde::{Deserialize, Serialize};
use sled::Transactional as _;

/// Telemetry is dropped (reports never are) once this many messages wait.
const TELEMETRY_SPOOL_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Message {
    Report(TaskReport),
    Telemetry(Telemetry),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskMark {
    Started,
    Done,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool: {0}")]
    Sled(#[from] sled::Error),
    #[error("spool: {0}")]
    Transaction(String),
    #[error("spool entry is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// Where a waiting message sits in the outbox, to acknowledge it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxKey(Vec<u8>);

/// What the agent keeps across crashes and restarts: which tasks ran, and the messages the
/// appliance has not acknowledged yet.
pub(crate) trait HostMemory: Send + Sync {
    /// How far `id` got: never seen, started, or done.
    fn mark(&self, id: &TaskId) -> Result<Option<TaskMark>, SpoolError>;
    /// Tasks marked started but never finished: the agent died while running them.
    fn interrupted(&self) -> Result<Vec<TaskId>, SpoolError>;
    /// Durably records that `id` is about to run. Returns false if it was seen before.
    fn start(&self, id: &TaskId) -> Result<bool, SpoolError>;
    /// Marks the task done and queues its report, atomically and durably.
    fn finish(&self, report: &TaskReport) -> Result<(), SpoolError>;
    /// Queues a telemetry sample unless the outbox is long; whether it was kept.
    fn push_telemetry(&self, sample: &Telemetry) -> Result<bool, SpoolError>;
    /// The oldest waiting message.
    fn peek(&self) -> Result<Option<(OutboxKey, Message)>, SpoolError>;
    /// Removes a delivered message.
    fn ack(&self, key: &OutboxKey) -> Result<(), SpoolError>;
    /// How many messages wait.
    fn waiting(&self) -> usize;
}

/// [`HostMemory`] in a sled database.
pub(crate) struct Spool {
    db: sled::Db,
    tasks: sled::Tree,
    outbox: sled::Tree,
}

impl Spool {
    pub(crate) fn open(path: &Path) -> Result<Self, SpoolError> {
        let db = sled::open(path)?;
        let tasks = db.open_tree("tasks")?;
        let outbox = db.open_tree("outbox")?;
        Ok(Self { db, tasks, outbox })
    }
}

impl HostMemory for Spool {
    fn mark(&self, id: &TaskId) -> Result<Option<TaskMark>, SpoolError> {
        Ok(self.tasks.get(id.0.as_bytes())?.map(|v| {
            if v.as_ref() == b"done" {
                TaskMark::Done
            } else {
                TaskMark::Started
            }
        }))
    }

    /// Tasks marked started but never finished: the agent died while running them.
    fn interrupted(&self) -> Result<Vec<TaskId>, SpoolError> {
        let mut ids = Vec::new();
        for entry in self.tasks.iter() {
            let (key, value) = entry?;
            if value.as_ref() == b"started" {
                ids.push(TaskId(String::from_utf8_lossy(&key).into_owned()));
            }
        }
        Ok(ids)
    }

    /// Durably records that `id` is about to run. Returns false if it was seen before.
    fn start(&self, id: &TaskId) -> Result<bool, SpoolError> {
        let fresh = self
            .tasks
            .compare_and_swap(
                id.0.as_bytes(),
                None as Option<&[u8]>,
                Some(&b"started"[..]),
            )?
            .is_ok();
        self.db.flush()?;
        Ok(fresh)
    }

    /// Marks the task done and queues its report, atomically and durably.
    fn finish(&self, report: &TaskReport) -> Result<(), SpoolError> {
        let body = serde_json::to_vec(&Message::Report(report.clone()))?;
        let key = self.db.generate_id()?.to_be_bytes();
        (&self.tasks, &self.outbox)
            .transaction(|(tasks, outbox)| {
                tasks.insert(report.id.0.as_bytes(), &b"done"[..])?;
                outbox.insert(&key[..], body.as_slice())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| SpoolError::Transaction(format!("{e:?}")))?;
        self.db.flush()?;
        Ok(())
    }

    /// Queues a telemetry sample, unless the spool is already long (then it is dropped:
    /// old telemetry is worth less than room for reports).
    fn push_telemetry(&self, sample: &Telemetry) -> Result<bool, SpoolError> {
        if self.outbox.len() >= TELEMETRY_SPOOL_LIMIT {
            return Ok(false);
        }
        let key = self.db.generate_id()?.to_be_bytes();
        self.outbox.insert(
            &key[..],
            serde_json::to_vec(&Message::Telemetry(sample.clone()))?,
        )?;
        self.db.flush()?;
        Ok(true)
    }

    /// The oldest waiting message.
    fn peek(&self) -> Result<Option<(OutboxKey, Message)>, SpoolError> {
        match self.outbox.first()? {
            Some((key, value)) => Ok(Some((
                OutboxKey(key.to_vec()),
                serde_json::from_slice(&value)?,
            ))),
            None => Ok(None),
        }
    }

    /// Removes a delivered message.
    fn ack(&self, key: &OutboxKey) -> Result<(), SpoolError> {
        self.outbox.remove(&key.0)?;
        self.db.flush()?;
        Ok(())
    }

    fn waiting(&self) -> usize {
        self.outbox.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labrack_provisioner::protocol::{PROTOCOL_VERSION, TaskOutcome};

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("labrack-spool-{tag}-{}", rand::random::<u64>()))
    }

    fn report(id: &str) -> TaskReport {
        TaskReport {
            version: PROTOCOL_VERSION,
            id: TaskId(id.into()),
            outcome: TaskOutcome::done(),
        }
    }

    #[test]
    fn a_task_starts_once_and_survives_reopening() {
        let dir = temp_dir("once");
        {
            let spool = Spool::open(&dir).expect("open");
            let id = TaskId("alloc-1-provision-1".into());
            assert!(spool.start(&id).expect("start"));
            assert!(
                !spool.start(&id).expect("again"),
                "a second start is refused"
            );
            assert_eq!(spool.interrupted().expect("scan"), vec![id]);
        }
        let spool = Spool::open(&dir).expect("reopen");
        let id = TaskId("alloc-1-provision-1".into());
        assert_eq!(spool.mark(&id).expect("mark"), Some(TaskMark::Started));
        assert!(
            !spool.start(&id).expect("after restart"),
            "still refused after a restart"
        );
        spool
            .finish(&report("alloc-1-provision-1"))
            .expect("finish");
        assert_eq!(spool.mark(&id).expect("mark"), Some(TaskMark::Done));
        assert!(spool.interrupted().expect("scan").is_empty());
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn messages_come_out_in_order_until_acknowledged() {
        let dir = temp_dir("order");
        {
            let spool = Spool::open(&dir).expect("open");
            for n in 0..5 {
                spool.start(&TaskId(format!("t{n}"))).expect("start");
                spool.finish(&report(&format!("t{n}"))).expect("finish");
            }
        }
        let spool = Spool::open(&dir).expect("reopen");
        let mut seen = Vec::new();
        while let Some((key, message)) = spool.peek().expect("peek") {
            let Message::Report(r) = message else {
                panic!("only reports queued")
            };
            seen.push(r.id.0);
            spool.ack(&key).expect("ack");
        }
        assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4"]);
        assert_eq!(spool.waiting(), 0);
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }
}
