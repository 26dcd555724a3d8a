//! The per-device rate limit on updates (pure): a token bucket per device,
//! `per_minute` tokens deep, refilled at `per_minute` a minute by the
//! intake's timer. An update over the limit is not recorded and not acked:
//! the edge keeps it and sends it again after its ack timeout (doubling up
//! to 64x), so an honest device that bursts loses nothing, and a flooding
//! one costs the aggregator a signature check per message, never a
//! database write or a place in the round.

use std::collections::HashMap;
use std::time::Instant;

/// Most devices tracked at once; beyond it updates pass unlimited (and a
/// warning says so). Authenticated fleets have one entry per enrolled
/// device that sent recently, far fewer.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub(super) struct RateLimit {
    per_minute: u32,
    /// Devices below a full bucket: tokens left.
    tokens: HashMap<String, f64>,
    last_refill: Option<Instant>,
}

impl RateLimit {
    /// `per_minute == 0`: no limit.
    pub(super) fn new(per_minute: u32) -> RateLimit {
        RateLimit {
            per_minute,
            tokens: HashMap::new(),
            last_refill: None,
        }
    }

    /// Take a token for one update from `device`; `false`: over the limit.
    pub(super) fn allow(&mut self, device: &str) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let full = f64::from(self.per_minute);
        if !self.tokens.contains_key(device) && self.tokens.len() >= MAX_TRACKED {
            tracing::warn!(
                tracked = MAX_TRACKED,
                "rate limit table full; update passes unlimited"
            );
            return true;
        }
        let t = self.tokens.entry(device.to_string()).or_insert(full);
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }

    /// The timer: every bucket gains `per_minute` per minute since the
    /// last refill; full ones are forgotten.
    pub(super) fn refill(&mut self, now: Instant) {
        let elapsed = self
            .last_refill
            .map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f64());
        self.last_refill = Some(now);
        let full = f64::from(self.per_minute);
        let gain = full * elapsed / 60.0;
        self.tokens.retain(|_, t| {
            *t += gain;
            *t < full
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_up_to_the_limit_then_refills_with_time() {
        let mut r = RateLimit::new(3);
        let t0 = Instant::now();
        r.refill(t0);
        assert!((0..3).all(|_| r.allow("a")));
        assert!(!r.allow("a"), "the fourth in a minute is over");
        assert!(r.allow("b"), "buckets are per device");
        r.refill(t0 + Duration::from_secs(20));
        assert!(r.allow("a"), "a third of a minute gives one token");
        assert!(!r.allow("a"));
        r.refill(t0 + Duration::from_secs(200));
        assert!(r.tokens.is_empty(), "full buckets are forgotten");
        assert!((0..3).all(|_| r.allow("a")));
        let mut off = RateLimit::new(0);
        assert!((0..1000).all(|_| off.allow("a")));
    }
}
