//! IO modes: when a write to a protected volume may be acknowledged.
//!
//! - **sync**: once its record is durable in the journal. RPO 0.
//! - **async**: once the production volume has it; the record is journalled
//!   in the background, and the dirty-region map covers the gap.
//! - **adaptive**: sync while the journal keeps up, async while it does not,
//!   with hysteresis so the mode cannot flap.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A volume's IO mode, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// Acknowledge once journalled.
    Sync,
    /// Acknowledge once on the production volume.
    Async,
    /// Sync or async by how well the journal keeps up.
    Adaptive,
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Sync => "sync",
            IoMode::Async => "async",
            IoMode::Adaptive => "adaptive",
        })
    }
}

impl FromStr for IoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(IoMode::Sync),
            "async" => Ok(IoMode::Async),
            "adaptive" => Ok(IoMode::Adaptive),
            other => Err(format!(
                "unknown IO mode {other:?}; use sync, async or adaptive"
            )),
        }
    }
}

/// When adaptive mode switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveThresholds {
    /// Switch to async when a sync write waits longer than this for the
    /// journal (smoothed)...
    pub high_latency: Duration,
    /// ...or when this many bytes wait in the memory cache.
    pub high_backlog: u64,
    /// Switch back to sync only when the smoothed wait is below this...
    pub low_latency: Duration,
    /// ...and the backlog has drained below this...
    pub low_backlog: u64,
    /// ...and at least this long has passed since the last switch.
    pub min_dwell: Duration,
}

impl Default for AdaptiveThresholds {
    fn default() -> Self {
        AdaptiveThresholds {
            high_latency: Duration::from_millis(20),
            high_backlog: 64 << 20,
            low_latency: Duration::from_millis(5),
            low_backlog: 8 << 20,
            min_dwell: Duration::from_secs(2),
        }
    }
}

/// The adaptive controller of one volume: it watches journal latency and
/// backlog and says whether writes should go sync or async now.
#[derive(Debug)]
pub struct AdaptiveController {
    thresholds: AdaptiveThresholds,
    /// Smoothed journal wait of writes (microseconds, EWMA).
    latency_us: f64,
    /// Whether writes currently go async.
    async_now: bool,
    last_switch: Instant,
}

/// A switch the controller made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    /// The mode writes went in before.
    pub from: IoMode,
    /// The mode they go in now.
    pub to: IoMode,
}

impl AdaptiveController {
    /// A controller starting in sync.
    pub fn new(thresholds: AdaptiveThresholds, now: Instant) -> Self {
        AdaptiveController {
            thresholds,
            latency_us: 0.0,
            async_now: false,
            last_switch: now,
        }
    }

    /// The mode writes go in now.
    pub fn current(&self) -> IoMode {
        if self.async_now {
            IoMode::Async
        } else {
            IoMode::Sync
        }
    }

    /// The smoothed journal latency.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us as u64)
    }

    /// Feeds one observation: how long the journal took for a write (for
    /// async writes, from capture to durable), and the backlog now.
    /// Returns a switch if one happened.
    pub fn observe(&mut self, latency: Duration, backlog: u64, now: Instant) -> Option<Switch> {
        let sample = latency.as_micros() as f64;
        self.latency_us = if self.latency_us == 0.0 {
            sample
        } else {
            0.8 * self.latency_us + 0.2 * sample
        };
        self.decide(backlog, now)
    }

    /// Re-evaluates with no new latency sample (the journal may have
    /// drained while no write came).
    pub fn decide(&mut self, backlog: u64, now: Instant) -> Option<Switch> {
        let t = &self.thresholds;
        let dwelt = now.duration_since(self.last_switch) >= t.min_dwell;
        let latency = self.latency();
        let switch_to_async =
            !self.async_now && (latency > t.high_latency || backlog > t.high_backlog);
        let switch_to_sync =
            self.async_now && dwelt && latency < t.low_latency && backlog < t.low_backlog;
        if switch_to_async || switch_to_sync {
            let from = self.current();
            self.async_now = switch_to_async;
            self.last_switch = now;
            return Some(Switch {
                from,
                to: self.current(),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> AdaptiveThresholds {
        AdaptiveThresholds {
            high_latency: Duration::from_millis(10),
            high_backlog: 1000,
            low_latency: Duration::from_millis(2),
            low_backlog: 100,
            min_dwell: Duration::from_secs(1),
        }
    }

    #[test]
    fn switches_to_async_under_load_and_back_after_draining_without_flapping() {
        let t0 = Instant::now();
        let mut c = AdaptiveController::new(thresholds(), t0);
        assert_eq!(c.observe(Duration::from_millis(1), 0, t0), None);
        let mut switched = None;
        for i in 0..20 {
            if let Some(s) = c.observe(Duration::from_millis(50), 0, t0 + Duration::from_millis(i))
            {
                switched = Some(s);
                break;
            }
        }
        assert_eq!(
            switched,
            Some(Switch {
                from: IoMode::Sync,
                to: IoMode::Async
            })
        );
        // Fast again, but not long enough since the switch: stays async.
        for i in 0..50 {
            assert_eq!(
                c.observe(
                    Duration::from_micros(100),
                    0,
                    t0 + Duration::from_millis(100 + i)
                ),
                None
            );
        }
        // Backlog still high: stays async even after the dwell time.
        assert_eq!(c.decide(500, t0 + Duration::from_secs(3)), None);
        // Drained: back to sync.
        assert_eq!(
            c.decide(0, t0 + Duration::from_secs(3)),
            Some(Switch {
                from: IoMode::Async,
                to: IoMode::Sync
            })
        );
    }

    #[test]
    fn backlog_alone_switches_to_async() {
        let t0 = Instant::now();
        let mut c = AdaptiveController::new(thresholds(), t0);
        assert!(c.decide(5000, t0).is_some());
        assert_eq!(c.current(), IoMode::Async);
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [IoMode::Sync, IoMode::Async, IoMode::Adaptive] {
            assert_eq!(mode.to_string().parse::<IoMode>(), Ok(mode));
        }
        assert!("fast".parse::<IoMode>().is_err());
    }
}
