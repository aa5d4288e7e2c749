//! The relay's decisions with no I/O and no clock: whether a cloud's welcome fits this
//! database, which rows go next, how many batches may be in flight, which acknowledgements
//! to believe, when to prune, and how long to wait before the next session. `relay.rs`
//! drives it with quinn and SQLite; the tests here drive it with a scripted cloud.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Batches in flight before the relay waits for acknowledgements.
pub const WINDOW: usize = 8;

/// How often pruning looks at most: acknowledged rows stay for the retention anyway.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// A cloud whose acknowledgements do not fit this database: the link must stop and say so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// Where this database's outbox stands when a session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    pub epoch: String,
    /// the highest sequence written
    pub last_seq: i64,
    /// the highest sequence pruned (acknowledged before, and gone from the outbox)
    pub pruned: i64,
}

/// One session of the link, from the cloud's welcome on.
#[derive(Debug)]
pub struct Session {
    /// the highest sequence handed to the link (counted before it goes, so its
    /// acknowledgement is never early)
    sent: i64,
    /// the highest sequence the cloud acknowledged
    confirmed: i64,
    /// the last sequence of each batch not yet acknowledged
    in_flight: VecDeque<i64>,
    window: usize,
    last_prune_seq: i64,
    last_prune_at: Option<Instant>,
}

impl Session {
    /// Starts from the cloud's acknowledged sequence, or refuses a cloud that acknowledges
    /// more than was written or less than was already pruned.
    pub fn start(acked: i64, outbox: &Outbox, window: usize) -> Result<Self, Mismatch> {
        if acked > outbox.last_seq {
            return Err(Mismatch(format!(
                "the cloud acknowledges rows up to {acked} of epoch {:?}, but this appliance has written only up to {}",
                outbox.epoch, outbox.last_seq
            )));
        }
        if acked < outbox.pruned {
            return Err(Mismatch(format!(
                "the cloud holds rows only up to {acked}, but this appliance already pruned rows up to {pruned} once the cloud had acknowledged them: the cloud's database went back (restored from a backup?) and rows {}–{pruned} are no longer anywhere this link can send from. Restore the cloud's newer data, or start a new epoch to send the rest",
                acked + 1,
                pruned = outbox.pruned
            )));
        }
        Ok(Self {
            sent: acked,
            confirmed: acked,
            in_flight: VecDeque::new(),
            window: window.max(1),
            last_prune_seq: 0,
            last_prune_at: None,
        })
    }

    /// Rows after this sequence go next.
    pub fn next_after(&self) -> i64 {
        self.sent
    }

    /// Whether another batch may go now (fewer than the window in flight).
    pub fn may_send(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// A batch ending at `last` is about to be sent.
    pub fn sending(&mut self, last: i64) {
        debug_assert!(last > self.sent, "batches go in order");
        self.sent = last;
        self.in_flight.push_back(last);
    }

    /// An acknowledgement from the cloud: never believed beyond what was sent (that would
    /// prune rows the cloud does not hold); one lower than an earlier one changes nothing.
    pub fn ack(&mut self, acked: i64) -> Result<(), Mismatch> {
        if acked > self.sent {
            return Err(Mismatch(format!(
                "the cloud acknowledged rows up to {acked} but only {} were sent",
                self.sent
            )));
        }
        self.confirmed = self.confirmed.max(acked);
        while self
            .in_flight
            .front()
            .is_some_and(|last| *last <= self.confirmed)
        {
            self.in_flight.pop_front();
        }
        Ok(())
    }

    /// The highest acknowledged sequence.
    pub fn confirmed(&self) -> i64 {
        self.confirmed
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Up to which sequence to prune now, if it is time: something new was acknowledged
    /// and the last look was [`PRUNE_EVERY`] ago or more.
    pub fn prune_due(&self, now: Instant) -> Option<i64> {
        let waited = self
            .last_prune_at
            .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY);
        (self.confirmed > self.last_prune_seq && waited).then_some(self.confirmed)
    }

    /// Pruning up to `through` was done at `now`.
    pub fn pruned(&mut self, through: i64, now: Instant) {
        self.last_prune_seq = self.last_prune_seq.max(through);
        self.last_prune_at = Some(now);
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// the link went (no cloud, a partition, a restart): try again soon
    Down,
    /// the cloud refused this appliance (not enrolled, a bad token)
    Refused,
    /// the cloud's acknowledgements do not fit this database
    Mismatch,
}

/// The wait before the next session: 0.5 s doubling to 5 s while the link is down (a venue
/// link that comes back should be used at once), 30 s after a refusal or a mismatch (it will
/// not heal by retrying); a session that got linked starts the doubling again.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The session reached the linked state.
    pub fn linked(&mut self) {
        self.failures = 0;
    }

    /// The session ended so; how long to wait.
    pub fn after(&mut self, ended: Ended) -> Duration {
        self.failures = self.failures.saturating_add(1);
        match ended {
            Ended::Refused | Ended::Mismatch => Duration::from_secs(30),
            Ended::Down => Duration::from_millis(500)
                .saturating_mul(1 << self.failures.saturating_sub(1).min(6))
                .min(Duration::from_secs(5)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn outbox(last_seq: i64, pruned: i64) -> Outbox {
        Outbox {
            epoch: "e1".into(),
            last_seq,
            pruned,
        }
    }

    #[test]
    fn a_welcome_that_does_not_fit_the_database_is_a_mismatch() {
        let ahead = Session::start(11, &outbox(10, 0), WINDOW).expect_err("ahead");
        assert!(ahead.0.contains("written only up to 10"), "{ahead}");
        let behind = Session::start(3, &outbox(10, 5), WINDOW).expect_err("behind");
        assert!(behind.0.contains("rows 4–5"), "{behind}");
        let session = Session::start(5, &outbox(10, 5), WINDOW).expect("fits");
        assert_eq!(session.next_after(), 5);
    }

    #[test]
    fn the_window_holds_and_acks_open_it() {
        let mut session = Session::start(0, &outbox(100, 0), 3).expect("start");
        for last in [10, 20, 30] {
            assert!(session.may_send());
            session.sending(last);
        }
        assert!(!session.may_send(), "three in flight");
        session.ack(15).expect("ack");
        assert_eq!(session.in_flight(), 2, "a batch counts as acked only whole");
        assert!(session.may_send());
        session.sending(40);
        assert!(!session.may_send());
        session.ack(12).expect("an older ack is harmless");
        assert_eq!(session.confirmed(), 15);
        let early = session.ack(41).expect_err("beyond what was sent");
        assert!(early.0.contains("only 40 were sent"), "{early}");
        assert_eq!(session.confirmed(), 15, "a refused ack changes nothing");
        assert_eq!(session.in_flight(), 3);
    }

    #[test]
    fn pruning_waits_for_new_acks_and_for_its_interval() {
        let t0 = Instant::now();
        let mut session = Session::start(0, &outbox(100, 0), WINDOW).expect("start");
        assert_eq!(session.prune_due(t0), None, "nothing acknowledged");
        session.sending(50);
        session.ack(50).expect("ack");
        assert_eq!(session.prune_due(t0), Some(50));
        session.pruned(50, t0);
        session.sending(60);
        session.ack(60).expect("ack");
        assert_eq!(session.prune_due(t0 + Duration::from_secs(9)), None);
        assert_eq!(session.prune_due(t0 + PRUNE_EVERY), Some(60));
    }

    #[test]
    fn backoff_doubles_to_five_seconds_and_starts_over_once_linked() {
        let mut backoff = Backoff::default();
        let waits: Vec<u128> = (0..6)
            .map(|_| backoff.after(Ended::Down).as_millis())
            .collect();
        assert_eq!(waits, vec![500, 1_000, 2_000, 4_000, 5_000, 5_000]);
        backoff.linked();
        assert_eq!(backoff.after(Ended::Down), Duration::from_millis(500));
        assert_eq!(backoff.after(Ended::Refused), Duration::from_secs(30));
        assert_eq!(backoff.after(Ended::Mismatch), Duration::from_secs(30));
    }

    /// A cloud as `labrack-cloud` behaves: it keeps every row it gets (a row sent again
    /// after a lost acknowledgement changes nothing) and acknowledges the highest contiguous
    /// sequence; a restarted cloud keeps what it had committed.
    #[derive(Default)]
    struct ScriptedCloud {
        held: BTreeSet<i64>,
        acked: i64,
    }

    impl ScriptedCloud {
        fn receive(&mut self, rows: std::ops::RangeInclusive<i64>) -> i64 {
            self.held.extend(rows);
            while self.held.contains(&(self.acked + 1)) {
                self.acked += 1;
            }
            self.acked
        }
    }

    /// A small deterministic generator, so a failing script can be replayed from its seed.
    struct Script(u64);

    impl Script {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    /// The link cut at random moments (partitions, restarts of either side), taking the
    /// batches and acknowledgements on the way with it; acknowledgements late; pruning as
    /// it goes. Frames on one QUIC stream arrive in order or not at all, so a cut is the
    /// only loss. Every row reaches the cloud, the relay never believes an ack beyond what
    /// it sent, never prunes a row the cloud lacks, and every session's welcome fits.
    #[test]
    fn cuts_restarts_and_late_acks_deliver_every_row_and_prune_only_what_the_cloud_holds() {
        for seed in 1..=200u64 {
            let mut script = Script(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut cloud = ScriptedCloud::default();
            let mut written = 0i64;
            let mut pruned = 0i64;
            let mut now = Instant::now();
            let mut sessions = 0;
            while cloud.acked < 2_000 && sessions < 10_000 {
                sessions += 1;
                written = (written + i64::try_from(script.next(300)).unwrap_or(0)).min(2_000);
                let mut session = Session::start(cloud.acked, &outbox(written, pruned), 4)
                    .unwrap_or_else(|m| panic!("seed {seed}: {m}"));
                let mut acks_on_the_way: VecDeque<i64> = VecDeque::new();
                for _ in 0..script.next(40) {
                    now += Duration::from_secs(script.next(4));
                    let roll = script.next(10);
                    if roll == 0 {
                        break; // the link is cut
                    }
                    if roll <= 3
                        && let Some(acked) = acks_on_the_way.pop_front()
                    {
                        session
                            .ack(acked)
                            .unwrap_or_else(|m| panic!("seed {seed}: {m}"));
                    } else if session.may_send() && session.next_after() < written {
                        let first = session.next_after() + 1;
                        let last =
                            (first + i64::try_from(script.next(50)).unwrap_or(0)).min(written);
                        session.sending(last);
                        acks_on_the_way.push_back(cloud.receive(first..=last));
                    } else if let Some(through) = session.prune_due(now) {
                        assert!(
                            (1..=through).all(|seq| cloud.held.contains(&seq)),
                            "seed {seed}: pruning {through} while the cloud lacks a row"
                        );
                        pruned = pruned.max(through);
                        session.pruned(through, now);
                    } else if let Some(acked) = acks_on_the_way.pop_front() {
                        session
                            .ack(acked)
                            .unwrap_or_else(|m| panic!("seed {seed}: {m}"));
                    }
                }
            }
            assert_eq!(cloud.acked, 2_000, "seed {seed}: not everything arrived");
            assert_eq!(cloud.held.len(), 2_000, "seed {seed}");
            assert!(pruned <= cloud.acked, "seed {seed}");
        }
    }

    /// A cloud that acknowledges what it never got (a bug, or a cloud restored from a newer
    /// backup than this stream) is caught at once, whatever the session did before.
    #[test]
    fn an_ack_beyond_anything_sent_stops_the_session_in_any_script() {
        for seed in 1..=50u64 {
            let mut script = Script(seed | 1);
            let mut session = Session::start(0, &outbox(1_000, 0), WINDOW).expect("start");
            for _ in 0..script.next(20) {
                if session.may_send() {
                    let last =
                        session.next_after() + 1 + i64::try_from(script.next(30)).unwrap_or(0);
                    session.sending(last);
                }
            }
            let sent = session.next_after();
            assert!(session.ack(sent).is_ok());
            let refused = session.ack(sent + 1).expect_err("beyond");
            assert!(
                refused.0.contains(&format!("only {sent} were sent")),
                "{refused}"
            );
        }
    }
}
