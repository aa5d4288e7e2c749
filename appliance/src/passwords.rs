//! Password hashing on a pool of its own. Each argon2id verification takes about 19 MiB
//! and tens of milliseconds of a core; run on the shared blocking pool, a login flood used
//! gigabytes and starved every database read. Here a fixed number of threads verify, at
//! most `queue` more wait, and the rest are refused at once ([`Busy`]), so memory stays
//! near `threads × 19 MiB` and the database's threads are never taken. The threads run at a
//! lower CPU priority than the rest of the process, so a storm of guesses slows logins, not
//! the API.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};

/// The pool is full: the caller should retry after a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the appliance is busy checking passwords; retry in {} s", retry_after.as_secs().max(1))]
pub struct Busy {
    pub retry_after: Duration,
}

/// Hashing failed (a broken stored hash is a failed verification, not this).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("argon2: {0}")]
    Argon2(String),
    #[error("the password pool stopped")]
    Stopped,
}

enum Work {
    Verify {
        password: String,
        stored: Option<String>,
        reply: tokio::sync::oneshot::Sender<bool>,
    },
    Hash {
        password: String,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
}

/// How much lower than request handling a password thread runs (a nice value): during a
/// login storm the verifications take the CPU the API leaves, instead of an equal share of
/// a two-core box (about a tenth when the API wants it all, so logins still finish).
const PASSWORD_NICE: i32 = 10;

/// A few threads that hash and verify passwords, behind a bounded queue.
#[derive(Debug, Clone)]
pub struct PasswordPool {
    sender: mpsc::SyncSender<WorkBox>,
    threads: usize,
}

/// `Work` behind a box with a Debug impl, so the pool can derive Debug.
struct WorkBox(Work);

impl std::fmt::Debug for WorkBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("password work")
    }
}

impl PasswordPool {
    /// `threads` verifying at once, `queue` waiting.
    pub fn new(threads: usize, queue: usize) -> Self {
        let threads = threads.max(1);
        let (sender, receiver) = mpsc::sync_channel::<WorkBox>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-{n}"))
                .spawn(move || {
                    labrack_serving::priority::lower_this_threads_priority(
                        PASSWORD_NICE,
                        "password",
                    );
                    loop {
                        let next = match receiver.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        let Ok(WorkBox(work)) = next else { return };
                        match work {
                            Work::Verify {
                                password,
                                stored,
                                reply,
                            } => {
                                let _ = reply.send(verify_password(&password, stored.as_deref()));
                            }
                            Work::Hash { password, reply } => {
                                let _ = reply.send(hash_password(&password));
                            }
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start a password thread");
            }
        }
        Self { sender, threads }
    }

    /// The default: half the cores (at least one) verifying, 16 waiting.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self::new(cores.div_ceil(2), 16)
    }

    fn submit(&self, work: Work) -> Result<(), HashError> {
        match self.sender.try_send(WorkBox(work)) {
            Ok(()) => Ok(()),
            // each verification is ~50 ms: a full queue drains within a second or so
            Err(mpsc::TrySendError::Full(_)) => Err(Busy {
                retry_after: Duration::from_secs(1),
            }
            .into()),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(HashError::Stopped),
        }
    }

    /// Whether `password` matches `stored`; `None` burns the same time against a dummy.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, HashError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.submit(Work::Verify {
            password,
            stored,
            reply,
        })?;
        answer.await.map_err(|_| HashError::Stopped)
    }

    /// A new argon2id hash of `password`.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.submit(Work::Hash { password, reply })?;
        answer
            .await
            .map_err(|_| HashError::Stopped)?
            .map_err(HashError::Argon2)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// An argon2id hash with a fresh salt (blocking: call from the pool or at start-up).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Verifies against a stored argon2id hash; `None` burns the same time against a dummy
/// (blocking: call from the pool).
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("labrack-dummy-password").unwrap_or_default());
    let target = stored.unwrap_or(dummy);
    let Ok(parsed) = PasswordHash::new(target) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
        && stored.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pool_verifies_and_refuses_beyond_its_queue() {
        let pool = PasswordPool::new(1, 2);
        let hash = pool
            .hash("correct horse battery".into())
            .await
            .expect("hash");
        assert!(
            pool.verify("correct horse battery".into(), Some(hash.clone()))
                .await
                .expect("verify")
        );
        assert!(
            !pool
                .verify("wrong".into(), Some(hash.clone()))
                .await
                .expect("verify")
        );
        assert!(
            !pool
                .verify("correct horse battery".into(), None)
                .await
                .expect("verify")
        );
        // one thread busy, two waiting: of 20 at once, most are refused straight away
        let attempts: Vec<_> = (0..20)
            .map(|_| pool.verify("x".into(), Some(hash.clone())))
            .collect();
        let results = futures_util::future::join_all(attempts).await;
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(HashError::Busy(_))))
            .count();
        let done = results.iter().filter(|r| matches!(r, Ok(false))).count();
        assert!(
            (2..=4).contains(&done) && busy == 20 - done,
            "busy {busy}, done {done}"
        );
    }
}
