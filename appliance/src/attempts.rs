//! Limits on guessing: logins, joins and host enrolments. Every attempt is counted *before*
//! the expensive or revealing work (argon2, a database lookup), so a burst of concurrent
//! attempts cannot all slip past the check together. After a few free failures a key must
//! wait, and the wait doubles with each further failure up to a cap: a backoff, never a
//! hard lock, so a stranger who guesses at `admin` slows the account down but cannot lock
//! it out for long. A success forgets the key.
//!
//! Keys are strings chosen by the caller (`ip:…`, `user:…`); [`client_key`] keys an IPv6
//! client by its /64, since one machine is usually given a whole /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How one kind of key backs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// failures allowed back to back; after that many the next attempt must wait
    pub free: u32,
    /// the first wait; each further failure doubles it
    pub first_wait: Duration,
    /// the longest wait
    pub max_wait: Duration,
    /// a key with no attempt for this long is forgotten
    pub forget_after: Duration,
}

impl Backoff {
    /// The wait after `failures` failures.
    pub fn wait(&self, failures: u32) -> Duration {
        let Some(over) = failures.checked_sub(self.free) else {
            return Duration::ZERO;
        };
        self.first_wait
            .saturating_mul(1 << over.min(20))
            .min(self.max_wait)
    }
}

/// A stranger's guesses from one client (an IPv4 address or an IPv6 /64).
pub const CLIENT: Backoff = Backoff {
    free: 10,
    first_wait: Duration::from_secs(1),
    max_wait: Duration::from_secs(15 * 60),
    forget_after: Duration::from_secs(30 * 60),
};
/// Guesses at one account from one client.
pub const ACCOUNT_FROM_CLIENT: Backoff = Backoff {
    free: 5,
    first_wait: Duration::from_secs(1),
    max_wait: Duration::from_secs(15 * 60),
    forget_after: Duration::from_secs(30 * 60),
};
/// Guesses at one account from anywhere: many free and a short cap, so strangers on many
/// addresses slow `admin` down for seconds, never lock it.
pub const ACCOUNT: Backoff = Backoff {
    free: 50,
    first_wait: Duration::from_secs(1),
    max_wait: Duration::from_secs(30),
    forget_after: Duration::from_secs(30 * 60),
};
/// Join codes from one client: a classroom shares little, so more are free.
pub const JOIN_CLIENT: Backoff = Backoff {
    free: 30,
    first_wait: Duration::from_secs(1),
    max_wait: Duration::from_secs(15 * 60),
    forget_after: Duration::from_secs(30 * 60),
};
/// Enrolment tokens from one client.
pub const ENROL_CLIENT: Backoff = Backoff {
    free: 20,
    first_wait: Duration::from_secs(1),
    max_wait: Duration::from_secs(15 * 60),
    forget_after: Duration::from_secs(30 * 60),
};

/// Refused: try again in this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many attempts; retry in {} s", retry_after.as_secs().max(1))]
pub struct TooManyAttempts {
    pub retry_after: Duration,
    /// the first refusal since the last counted attempt: the start of a lockout, worth one
    /// audit row (the refusals after it are not)
    pub first: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    blocked_until: Instant,
    last: Instant,
    /// a refusal was reported since the last counted attempt
    refused: bool,
}

/// Counts attempts per key, each key with the backoff of its kind.
#[derive(Debug)]
pub struct AttemptLimiter {
    entries: Mutex<HashMap<String, Entry>>,
    /// above this many keys, forgotten ones are swept before a new one is added
    max_keys: usize,
}

impl Default for AttemptLimiter {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_keys: 200_000,
        }
    }
}

impl AttemptLimiter {
    /// Counts one attempt for every key (as a failure, until [`Self::succeeded`] says
    /// otherwise), or refuses if any key must still wait; a refused attempt counts nothing.
    pub fn begin(&self, keys: &[(String, Backoff)]) -> Result<(), TooManyAttempts> {
        self.begin_at(keys, Instant::now())
    }

    fn begin_at(&self, keys: &[(String, Backoff)], now: Instant) -> Result<(), TooManyAttempts> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut longest_wait = Duration::ZERO;
        let mut first = false;
        for (key, backoff) in keys {
            if let Some(entry) = entries
                .get_mut(key)
                .filter(|e| now.duration_since(e.last) < backoff.forget_after)
            {
                let wait = entry.blocked_until.saturating_duration_since(now);
                if !wait.is_zero() {
                    first |= !entry.refused;
                    entry.refused = true;
                    longest_wait = longest_wait.max(wait);
                }
            }
        }
        if !longest_wait.is_zero() {
            return Err(TooManyAttempts {
                retry_after: longest_wait,
                first,
            });
        }
        if entries.len() >= self.max_keys {
            let forget = keys
                .iter()
                .map(|(_, b)| b.forget_after)
                .max()
                .unwrap_or_default();
            entries.retain(|_, e| now.duration_since(e.last) < forget && e.blocked_until > now);
            if entries.len() >= self.max_keys {
                // a flood from many addresses: keep the newer half, so memory stays bounded
                let mut lasts: Vec<Instant> = entries.values().map(|e| e.last).collect();
                let middle = lasts.len() / 2;
                let (_, cut, _) = lasts.select_nth_unstable(middle);
                let cut = *cut;
                entries.retain(|_, e| e.last > cut);
            }
        }
        for (key, backoff) in keys {
            let entry = entries.entry(key.clone()).or_insert(Entry {
                failures: 0,
                blocked_until: now,
                last: now,
                refused: false,
            });
            entry.refused = false;
            if now.duration_since(entry.last) >= backoff.forget_after {
                entry.failures = 0;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last = now;
            entry.blocked_until = now + backoff.wait(entry.failures);
        }
        Ok(())
    }

    /// The attempt was not a guess after all (it failed for another reason, or succeeded
    /// and the key should keep its history): take back the one it counted.
    pub fn refund(&self, keys: &[(String, Backoff)]) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, backoff) in keys {
            if let Some(entry) = entries.get_mut(key) {
                entry.failures = entry.failures.saturating_sub(1);
                entry.blocked_until = entry.last + backoff.wait(entry.failures);
            }
        }
    }

    /// The attempt succeeded: forget these keys.
    pub fn succeeded(&self, keys: &[String]) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for key in keys {
            entries.remove(key);
        }
    }

    /// How many keys are remembered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of a client address: an IPv4 address as it is, an IPv6 one by its /64 (an
/// IPv4-mapped IPv6 address as the IPv4 address).
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Backoff = Backoff {
        free: 3,
        first_wait: Duration::from_secs(1),
        max_wait: Duration::from_secs(60),
        forget_after: Duration::from_secs(600),
    };

    fn keys(names: &[&str]) -> Vec<(String, Backoff)> {
        names.iter().map(|n| ((*n).to_owned(), IP)).collect()
    }

    #[test]
    fn waits_double_after_the_free_failures_up_to_the_cap() {
        let waits: Vec<u64> = (0..12).map(|f| IP.wait(f).as_secs()).collect();
        assert_eq!(waits, vec![0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(IP.wait(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn attempts_count_before_the_work_so_a_burst_cannot_pass_together() {
        let limiter = AttemptLimiter::default();
        let now = Instant::now();
        let burst: Vec<Result<(), TooManyAttempts>> = (0..100)
            .map(|_| limiter.begin_at(&keys(&["ip:1"]), now))
            .collect();
        assert_eq!(
            burst.iter().filter(|r| r.is_ok()).count(),
            3,
            "three free, then a wait"
        );
        let lockouts = burst
            .iter()
            .filter(|r| r.as_ref().is_err_and(|e| e.first))
            .count();
        assert_eq!(
            lockouts, 1,
            "only the first refusal starts a lockout (one audit row, not 97)"
        );
        let refused = limiter
            .begin_at(&keys(&["ip:1"]), now)
            .expect_err("waiting");
        assert_eq!(
            (refused.retry_after, refused.first),
            (Duration::from_secs(1), false)
        );
        assert!(
            limiter.begin_at(&keys(&["ip:2"]), now).is_ok(),
            "another client is not slowed"
        );
        // after the wait one more attempt, then a longer wait
        let later = now + Duration::from_secs(1);
        assert!(limiter.begin_at(&keys(&["ip:1"]), later).is_ok());
        assert_eq!(
            limiter
                .begin_at(&keys(&["ip:1"]), later)
                .map_err(|e| (e.retry_after, e.first)),
            Err((Duration::from_secs(2), true)),
            "a new lockout"
        );
        limiter.refund(&keys(&["ip:1"]));
        assert_eq!(
            limiter
                .begin_at(&keys(&["ip:1"]), later)
                .map_err(|e| e.retry_after),
            Err(Duration::from_secs(1)),
            "refunded one"
        );
        limiter.succeeded(&["ip:1".to_owned()]);
        assert!(
            limiter.begin_at(&keys(&["ip:1"]), later).is_ok(),
            "a success forgets"
        );
    }

    #[test]
    fn a_refusal_counts_nothing_and_old_failures_are_forgotten() {
        let limiter = AttemptLimiter::default();
        let now = Instant::now();
        for _ in 0..3 {
            limiter.begin_at(&keys(&["ip:1"]), now).expect("free");
        }
        for _ in 0..50 {
            assert!(
                limiter
                    .begin_at(&keys(&["ip:1", "user:admin"]), now)
                    .is_err()
            );
        }
        assert!(
            limiter.begin_at(&keys(&["user:admin"]), now).is_ok(),
            "the refused ones did not count for user:admin"
        );
        let much_later = now + Duration::from_secs(601);
        for _ in 0..3 {
            assert!(
                limiter.begin_at(&keys(&["ip:1"]), much_later).is_ok(),
                "forgotten after ten quiet minutes"
            );
        }
    }

    #[test]
    fn the_key_map_is_bounded() {
        let limiter = AttemptLimiter {
            max_keys: 100,
            ..AttemptLimiter::default()
        };
        let now = Instant::now();
        for i in 0..1_000 {
            let _ = limiter.begin_at(&keys(&[&format!("ip:{i}")]), now);
        }
        assert!(limiter.len() <= 101, "{}", limiter.len());
        // keys that are all waiting cannot be swept as forgotten: the older half goes
        let strict = Backoff { free: 0, ..IP };
        for i in 0..1_000u64 {
            let _ = limiter.begin_at(
                &[(format!("ip:w{i}"), strict)],
                now + Duration::from_millis(i),
            );
        }
        assert!(limiter.len() <= 101, "{}", limiter.len());
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        assert_eq!(
            client_key("::ffff:10.0.0.7".parse().expect("ip")),
            "ip:10.0.0.7"
        );
        assert_eq!(client_key("10.0.0.7".parse().expect("ip")), "ip:10.0.0.7");
    }
}
