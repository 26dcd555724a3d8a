//! Supervised reads: every fault is classified and counted, the sensor is
//! marked degraded with the reason, retried with exponential backoff and
//! re-initialised (identity check included) before the next read, so a
//! sensor unplugged and plugged back in recovers on its own. A read that
//! returns but took longer than the deadline counts as a bus timeout and
//! its value is dropped. Nothing here panics.

use crate::{Sensor, SensorError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Health as shown on the status page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not initialised yet (or re-initialising after a fault).
    Init,
    Ok,
    /// The last attempt failed; `reason` says why.
    Degraded,
}

/// What the page and metrics show about one sensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SensorStatus {
    pub part: &'static str,
    pub simulated: bool,
    pub health: Health,
    pub last_error: Option<String>,
    /// Faults by kind (nack, timeout, wrong_chip, bus).
    pub faults: BTreeMap<&'static str, u64>,
    pub reads: u64,
    pub consecutive_failures: u32,
    /// Milliseconds until the next attempt while backing off.
    pub retry_in_ms: Option<u64>,
}

/// Backoff bounds.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

/// A sensor with fault handling.
pub struct Supervised {
    inner: Box<dyn Sensor>,
    backoff: Backoff,
    deadline: Duration,
    needs_init: bool,
    next_try: Option<Instant>,
    status: SensorStatus,
}

/// The outcome of one scheduled read.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Sample(Vec<f32>),
    /// Backing off after a fault: nothing was tried.
    Skipped,
    Failed(SensorError),
}

impl Supervised {
    pub fn new(inner: Box<dyn Sensor>, backoff: Backoff, deadline: Duration) -> Supervised {
        let status = SensorStatus {
            part: inner.part(),
            simulated: inner.simulated(),
            health: Health::Init,
            last_error: None,
            faults: BTreeMap::new(),
            reads: 0,
            consecutive_failures: 0,
            retry_in_ms: None,
        };
        Supervised {
            inner,
            backoff,
            deadline,
            needs_init: true,
            next_try: None,
            status,
        }
    }

    pub fn channels(&self) -> &'static [&'static str] {
        self.inner.channels()
    }

    pub fn status(&self) -> SensorStatus {
        let mut s = self.status.clone();
        s.retry_in_ms = self
            .next_try
            .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64);
        s
    }

    /// Try one read now (initialising first if needed).
    pub fn attempt(&mut self, now: Instant) -> Attempt {
        if let Some(t) = self.next_try
            && now < t
        {
            return Attempt::Skipped;
        }
        let result = (|| {
            if self.needs_init {
                self.inner.init()?;
                self.needs_init = false;
            }
            // The deadline covers the read, not a (re)initialisation.
            let started = Instant::now();
            let v = self.inner.read()?;
            let took = started.elapsed();
            if took > self.deadline {
                return Err(SensorError::Timeout {
                    ms: took.as_millis() as u64,
                });
            }
            Ok(v)
        })();
        match result {
            Ok(v) => {
                self.status.health = Health::Ok;
                self.status.reads += 1;
                self.status.consecutive_failures = 0;
                self.next_try = None;
                Attempt::Sample(v)
            }
            Err(e) => {
                *self.status.faults.entry(e.kind()).or_insert(0) += 1;
                self.status.consecutive_failures =
                    self.status.consecutive_failures.saturating_add(1);
                self.status.health = Health::Degraded;
                self.status.last_error = Some(e.to_string());
                let exp = self.status.consecutive_failures.saturating_sub(1).min(16);
                let wait = self
                    .backoff
                    .initial
                    .saturating_mul(1u32 << exp)
                    .min(self.backoff.max);
                self.next_try = Some(now + wait);
                // After any fault the device may have been reset or
                // replaced: probe and configure it again.
                self.needs_init = true;
                Attempt::Failed(e)
            }
        }
    }
}
