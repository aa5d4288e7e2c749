//! Bitrate from receiver feedback, per viewer: loss from RTCP receiver reports (the part of
//! Google congestion control that needs no extra header extensions) and, where the browser
//! sends one, its REMB estimate as a ceiling. Pure logic; the viewer feeds it RTCP and the
//! desktop stream encodes at the lowest target of its viewers.

use std::time::{Duration, Instant};

/// The encoder's bitrate bounds and start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub min_bps: u32,
    pub start_bps: u32,
    pub max_bps: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            min_bps: 300_000,
            start_bps: 4_000_000,
            max_bps: 8_000_000,
        }
    }
}

/// A REMB older than this no longer caps the rate.
const REMB_FRESH: Duration = Duration::from_secs(5);
/// Increase at most this often (loss reports come about every second).
const INCREASE_EVERY: Duration = Duration::from_millis(900);

#[derive(Debug, Clone)]
pub struct RateController {
    limits: RateLimits,
    loss_based_bps: u32,
    remb: Option<(u32, Instant)>,
    last_increase: Option<Instant>,
    /// the last receiver report showed at least 2 % loss
    lossy: bool,
}

impl RateController {
    pub fn new(limits: RateLimits) -> Self {
        let start = limits.start_bps.clamp(limits.min_bps, limits.max_bps);
        Self {
            limits,
            loss_based_bps: start,
            remb: None,
            last_increase: None,
            lossy: false,
        }
    }

    /// The bitrate to encode at for this viewer now.
    pub fn target(&self, now: Instant) -> u32 {
        let cap = match self.remb {
            Some((bps, at)) if now.duration_since(at) < REMB_FRESH => bps,
            _ => u32::MAX,
        };
        self.loss_based_bps
            .min(cap)
            .clamp(self.limits.min_bps, self.limits.max_bps)
    }

    /// A receiver report's loss for our stream (`fraction_lost` in 1/256 units).
    /// Over 10 % loss cuts the rate by half the loss; under 2 % grows it by 8 %.
    pub fn on_loss(&mut self, fraction_lost: u8, now: Instant) -> u32 {
        let loss = f64::from(fraction_lost) / 256.0;
        self.lossy = loss >= 0.02;
        if !self.lossy {
            self.remb = None;
        }
        let current = f64::from(self.loss_based_bps);
        if loss > 0.10 {
            self.loss_based_bps = (current * (1.0 - 0.5 * loss)) as u32;
        } else if loss < 0.02
            && self
                .last_increase
                .is_none_or(|at| now.duration_since(at) >= INCREASE_EVERY)
        {
            self.loss_based_bps = (current * 1.08) as u32 + 1_000;
            self.last_increase = Some(now);
        }
        self.loss_based_bps = self
            .loss_based_bps
            .clamp(self.limits.min_bps, self.limits.max_bps);
        self.target(now)
    }

    /// The browser's own estimate of what it can receive (REMB). A desktop is usually
    /// app-limited (idle, typing), and the browser's estimate then just follows the little it
    /// receives: measured with Chromium on loopback, it pulled the rate to the floor with no
    /// loss at all. So it caps the rate only while receiver reports show loss (≥ 2 %): then
    /// the link is the limit and the estimate says by how much.
    pub fn on_remb(&mut self, bitrate_bps: f32, now: Instant) -> u32 {
        if bitrate_bps.is_finite() && bitrate_bps > 0.0 && self.lossy {
            // 95 %: leave the estimate some headroom, as GCC does.
            self.remb = Some(((bitrate_bps * 0.95).min(u32::MAX as f32) as u32, now));
        }
        self.target(now)
    }
}

/// Whether the encoder should be rebuilt for `wanted`: a change of at least 15 %, at most
/// once per `min_gap` (a new encoder starts with a keyframe, which costs bandwidth itself).
pub fn worth_rebuilding(
    current_bps: u32,
    wanted_bps: u32,
    since_last: Duration,
    min_gap: Duration,
) -> bool {
    let change =
        (f64::from(wanted_bps) - f64::from(current_bps)).abs() / f64::from(current_bps.max(1));
    change >= 0.15 && since_last >= min_gap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (RateController, Instant) {
        (
            RateController::new(RateLimits {
                min_bps: 300_000,
                start_bps: 4_000_000,
                max_bps: 8_000_000,
            }),
            Instant::now(),
        )
    }

    #[test]
    fn heavy_loss_cuts_the_rate_and_clean_reports_restore_it() {
        let (mut rate, t0) = controller();
        // 25 % loss: −12.5 % per report.
        let after_loss = rate.on_loss(64, t0);
        assert_eq!(after_loss, 3_500_000);
        for i in 1..20 {
            rate.on_loss(64, t0 + Duration::from_secs(i));
        }
        assert_eq!(
            rate.target(t0 + Duration::from_secs(20)),
            300_000,
            "sustained loss reaches the floor, not zero"
        );
        // Clean reports climb back, 8 % a second, up to the ceiling.
        let mut now = t0 + Duration::from_secs(20);
        let mut previous = rate.target(now);
        for _ in 0..10 {
            now += Duration::from_secs(1);
            let next = rate.on_loss(0, now);
            assert!(
                next > previous,
                "grows on a clean report: {next} after {previous}"
            );
            previous = next;
        }
        for _ in 0..100 {
            now += Duration::from_secs(1);
            rate.on_loss(0, now);
        }
        assert_eq!(rate.target(now), 8_000_000);
    }

    #[test]
    fn moderate_loss_holds_and_bursts_of_reports_do_not_grow_faster() {
        let (mut rate, t0) = controller();
        assert_eq!(
            rate.on_loss(12, t0),
            4_000_000,
            "about 5 % loss holds the rate"
        );
        let grown = rate.on_loss(0, t0);
        assert_eq!(
            rate.on_loss(0, t0 + Duration::from_millis(100)),
            grown,
            "a second clean report right after changes nothing"
        );
    }

    #[test]
    fn remb_caps_while_the_link_loses_packets() {
        let (mut rate, t0) = controller();
        rate.on_loss(12, t0); // ~5 % loss
        assert_eq!(rate.on_remb(1_000_000.0, t0), 950_000);
        assert_eq!(
            rate.on_loss(12, t0 + Duration::from_secs(1)),
            950_000,
            "held under the receiver's estimate while lossy"
        );
        assert!(
            rate.target(t0 + Duration::from_secs(6)) > 900_000,
            "a stale estimate no longer caps"
        );
        assert_eq!(
            rate.on_remb(f32::NAN, t0),
            rate.target(t0),
            "nonsense estimates are ignored"
        );
        assert_eq!(
            rate.on_remb(10.0, t0 + Duration::from_secs(7)),
            300_000,
            "never below the floor"
        );
    }

    #[test]
    fn an_idle_desktops_low_remb_does_not_starve_the_next_burst() {
        let (mut rate, t0) = controller();
        rate.on_loss(0, t0);
        // Typing sends ~100 kbit/s; the browser estimates a little above that, with no loss.
        assert!(rate.on_remb(250_000.0, t0) > 4_000_000);
        // Loss ends: an estimate taken during it stops capping.
        rate.on_loss(12, t0 + Duration::from_secs(1));
        rate.on_remb(1_000_000.0, t0 + Duration::from_secs(1));
        assert!(rate.on_loss(0, t0 + Duration::from_secs(2)) > 1_000_000);
    }

    #[test]
    fn rebuilds_only_for_real_changes_and_not_too_often() {
        let gap = Duration::from_secs(2);
        assert!(worth_rebuilding(
            4_000_000,
            3_000_000,
            Duration::from_secs(3),
            gap
        ));
        assert!(
            !worth_rebuilding(4_000_000, 3_700_000, Duration::from_secs(3), gap),
            "7 % is not worth a keyframe"
        );
        assert!(
            !worth_rebuilding(4_000_000, 1_000_000, Duration::from_secs(1), gap),
            "too soon after the last"
        );
    }
}
