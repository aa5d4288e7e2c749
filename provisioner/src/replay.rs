//! Which signed host calls to take: every call carries the agent process's random
//! instance id and a counter (see [`crate::protocol::HostAuth`]). No I/O, no clock.
//!
//! - A counter seen before for the current instance is a **replay**: refused. Counters may
//!   arrive out of order (the agent's long poll, reports and heartbeats run side by side),
//!   so a window of the last [`WINDOW`] counters is remembered, as IPsec does.
//! - A new instance replaces the current one (the agent restarted). The old one is kept
//!   as **superseded**: a call from it afterwards means two machines are using the same
//!   identity (a copied disk, a cloned VM) — refused, and staff are alerted.

/// How many counters below the highest are still accepted (once each).
pub const WINDOW: u64 = 64;
/// Superseded instances remembered per host.
const SUPERSEDED_KEPT: usize = 8;

/// What to do with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// the same instance and counter came before, or it is too old to tell
    Replay,
    /// an instance that another one has replaced spoke again: two machines, one identity
    TwoMachines {
        other: String,
    },
}

/// One host's calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplayGuard {
    current: Option<String>,
    highest: u64,
    /// bit i set: counter `highest - i` was seen
    seen: u64,
    superseded: Vec<String>,
}

impl ReplayGuard {
    /// A guard that knows `instance` already sent every counter up to `highest` (as stored
    /// before an appliance restart).
    pub fn resume(instance: Option<String>, highest: u64) -> Self {
        Self {
            current: instance,
            highest,
            seen: u64::MAX,
            superseded: Vec::new(),
        }
    }

    /// The instance and highest counter to store.
    pub fn position(&self) -> (Option<&str>, u64) {
        (self.current.as_deref(), self.highest)
    }

    pub fn check(&mut self, instance: &str, counter: u64) -> Verdict {
        match &self.current {
            Some(current) if current == instance => self.advance(counter),
            Some(_) if self.superseded.iter().any(|old| old == instance) => Verdict::TwoMachines {
                other: self.current.clone().unwrap_or_default(),
            },
            previous => {
                if let Some(previous) = previous.clone() {
                    self.superseded.push(previous);
                    if self.superseded.len() > SUPERSEDED_KEPT {
                        self.superseded.remove(0);
                    }
                }
                self.current = Some(instance.to_owned());
                self.highest = counter;
                self.seen = 1;
                Verdict::Accept
            }
        }
    }

    fn advance(&mut self, counter: u64) -> Verdict {
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = counter;
            return Verdict::Accept;
        }
        let age = self.highest - counter;
        if age >= WINDOW {
            return Verdict::Replay;
        }
        let bit = 1u64 << age;
        if self.seen & bit != 0 {
            return Verdict::Replay;
        }
        self.seen |= bit;
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_taken_once_even_out_of_order() {
        let mut guard = ReplayGuard::default();
        assert_eq!(guard.check("a", 1), Verdict::Accept);
        assert_eq!(guard.check("a", 3), Verdict::Accept);
        assert_eq!(guard.check("a", 2), Verdict::Accept, "late but unseen");
        for replayed in [1, 2, 3] {
            assert_eq!(guard.check("a", replayed), Verdict::Replay, "{replayed}");
        }
        assert_eq!(guard.check("a", 100), Verdict::Accept);
        assert_eq!(
            guard.check("a", 36),
            Verdict::Replay,
            "older than the window"
        );
        assert_eq!(
            guard.check("a", 37),
            Verdict::Accept,
            "inside the window, unseen"
        );
        assert_eq!(guard.position(), (Some("a"), 100));
    }

    #[test]
    fn a_restart_replaces_the_instance_and_its_return_means_two_machines() {
        let mut guard = ReplayGuard::default();
        guard.check("a", 1);
        guard.check("a", 2);
        assert_eq!(guard.check("b", 1), Verdict::Accept, "the agent restarted");
        assert_eq!(guard.check("b", 2), Verdict::Accept);
        assert_eq!(
            guard.check("a", 3),
            Verdict::TwoMachines { other: "b".into() },
            "the old instance is still alive somewhere"
        );
        assert_eq!(
            guard.check("b", 3),
            Verdict::Accept,
            "the current one goes on"
        );
    }

    #[test]
    fn after_an_appliance_restart_old_counters_stay_refused() {
        let mut guard = ReplayGuard::resume(Some("a".into()), 50);
        assert_eq!(guard.check("a", 50), Verdict::Replay);
        assert_eq!(guard.check("a", 20), Verdict::Replay);
        assert_eq!(guard.check("a", 51), Verdict::Accept);
        let mut fresh = ReplayGuard::resume(None, 0);
        assert_eq!(fresh.check("c", 9), Verdict::Accept);
    }
}
