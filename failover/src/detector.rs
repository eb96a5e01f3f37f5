//! The phi-accrual failure detector (Hayashibara et al., as Akka and
//! Cassandra use it): instead of "no heartbeat for N seconds", a suspicion
//! level phi that grows with the time since the last heartbeat, measured
//! against the distribution of the intervals seen so far. phi = 1 means a
//! 10 % chance that the primary is still alive and only late, phi = 8 one
//! in 10^8. A link whose heartbeats jitter widens the distribution and
//! makes the detector patient; a steady one makes it quick.
//!
//! Times are given by the caller (durations since any fixed start), so
//! recorded traces replay exactly in tests.

use std::collections::VecDeque;
use std::time::Duration;

/// How the detector judges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectorSettings {
    /// Suspicion at which the primary counts as down.
    pub threshold: f64,
    /// The standard deviation never counts as less than this, so a
    /// perfectly steady link does not make a short delay look fatal.
    pub min_std_dev: Duration,
    /// A pause this long on top of the mean interval is taken as normal
    /// (one stall of the primary does not trip the detector).
    pub acceptable_pause: Duration,
    /// The heartbeat interval expected before any has been measured.
    pub first_interval: Duration,
    /// How many intervals the distribution is drawn from.
    pub window: usize,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            threshold: 8.0,
            min_std_dev: Duration::from_millis(100),
            acceptable_pause: Duration::from_millis(500),
            first_interval: Duration::from_millis(200),
            window: 1000,
        }
    }
}

/// The detector of one monitored peer.
#[derive(Clone, Debug)]
pub struct PhiAccrual {
    settings: DetectorSettings,
    /// Intervals between heartbeats, in milliseconds, newest last.
    intervals: VecDeque<f64>,
    sum: f64,
    squares: f64,
    last: Option<Duration>,
}

impl PhiAccrual {
    /// A detector that has heard nothing yet.
    pub fn new(settings: DetectorSettings) -> PhiAccrual {
        let mut detector = PhiAccrual {
            settings,
            intervals: VecDeque::new(),
            sum: 0.0,
            squares: 0.0,
            last: None,
        };
        // Seed the distribution with the expected interval and a wide
        // spread (as Akka does), so the first real heartbeats decide
        // rather than an empty history.
        let mean = settings.first_interval.as_secs_f64() * 1000.0;
        detector.record(mean - mean / 4.0);
        detector.record(mean + mean / 4.0);
        detector
    }

    fn record(&mut self, interval_ms: f64) {
        if self.intervals.len() >= self.settings.window.max(2) {
            if let Some(old) = self.intervals.pop_front() {
                self.sum -= old;
                self.squares -= old * old;
            }
        }
        self.intervals.push_back(interval_ms);
        self.sum += interval_ms;
        self.squares += interval_ms * interval_ms;
    }

    /// A heartbeat arrived at `now`.
    pub fn heartbeat(&mut self, now: Duration) {
        if let Some(last) = self.last {
            if now > last {
                self.record((now - last).as_secs_f64() * 1000.0);
            }
        }
        self.last = Some(now);
    }

    /// When the last heartbeat arrived.
    pub fn last_heartbeat(&self) -> Option<Duration> {
        self.last
    }

    /// The suspicion level at `now`; 0 before the first heartbeat (a
    /// detector never suspects a peer it has not heard from: the caller
    /// decides what silence from the start means).
    pub fn phi(&self, now: Duration) -> f64 {
        let Some(last) = self.last else {
            return 0.0;
        };
        let n = self.intervals.len() as f64;
        let mean = self.sum / n;
        let variance = (self.squares / n - mean * mean).max(0.0);
        let min_std = self.settings.min_std_dev.as_secs_f64() * 1000.0;
        let std_dev = variance.sqrt().max(min_std);
        let mean = mean + self.settings.acceptable_pause.as_secs_f64() * 1000.0;
        let elapsed = now.saturating_sub(last).as_secs_f64() * 1000.0;
        phi(elapsed, mean, std_dev)
    }

    /// True once the suspicion reaches the threshold.
    pub fn is_down(&self, now: Duration) -> bool {
        self.phi(now) >= self.settings.threshold
    }

    /// The mean interval measured so far.
    pub fn mean_interval(&self) -> Duration {
        Duration::from_secs_f64(self.sum / self.intervals.len() as f64 / 1000.0)
    }
}

/// -log10 of the probability that a heartbeat comes later than `elapsed`,
/// with the normal distribution's tail approximated by a logistic curve
/// (Akka's formula: accurate to 10^-4 and never infinite).
fn phi(elapsed: f64, mean: f64, std_dev: f64) -> f64 {
    let y = (elapsed - mean) / std_dev;
    let exponent = -y * (1.5976 + 0.070566 * y * y);
    if elapsed > mean {
        // -log10(e / (1 + e)) with e = exp(exponent), kept in the log
        // domain so a long silence gives a large phi, not infinity.
        -exponent / std::f64::consts::LN_10 + exponent.exp().ln_1p() / std::f64::consts::LN_10
    } else {
        let e = exponent.exp();
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings() -> DetectorSettings {
        DetectorSettings {
            threshold: 8.0,
            min_std_dev: ms(50),
            acceptable_pause: ms(300),
            first_interval: ms(200),
            window: 1000,
        }
    }

    /// Feeds heartbeats at the given times; returns the detector.
    fn trace(times: impl IntoIterator<Item = Duration>) -> PhiAccrual {
        let mut d = PhiAccrual::new(settings());
        for t in times {
            d.heartbeat(t);
        }
        d
    }

    /// The first moment after the last heartbeat at which the detector
    /// says down, in 10 ms steps (None within a minute).
    fn detection(d: &PhiAccrual) -> Option<Duration> {
        let last = d.last_heartbeat()?;
        (1..6000)
            .map(|i| last + ms(i * 10))
            .find(|t| d.is_down(*t))
            .map(|t| t - last)
    }

    #[test]
    fn phi_grows_with_silence_and_is_never_infinite() {
        let d = trace((0..100).map(|i| ms(i * 200)));
        let last = d.last_heartbeat().unwrap();
        let mut previous = -1.0;
        for i in 0..200 {
            let p = d.phi(last + ms(i * 50));
            assert!(p.is_finite());
            assert!(p >= previous, "phi fell at {} ms", i * 50);
            previous = p;
        }
        assert!(d.phi(last + ms(100)) < 1.0);
        assert!(d.phi(last + ms(10_000)) > 8.0);
    }

    #[test]
    fn a_steady_primary_that_dies_is_detected_in_about_a_second() {
        let d = trace((0..300).map(|i| ms(i * 200)));
        let took = detection(&d).unwrap();
        assert!(took > ms(500) && took < ms(2000), "detected after {took:?}");
    }

    #[test]
    fn jittered_heartbeats_never_trip_it_but_a_death_still_does() {
        // ±50 % jitter around 200 ms, seeded.
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut t = ms(0);
        let mut d = PhiAccrual::new(settings());
        let mut worst: f64 = 0.0;
        for _ in 0..3000 {
            let next = t + ms(rng.random_range(100..=300));
            // Sample the suspicion just before each heartbeat arrives.
            worst = worst.max(d.phi(next - ms(1)));
            d.heartbeat(next);
            t = next;
        }
        assert!(
            worst < 8.0,
            "a jittered but live primary reached phi {worst}"
        );
        let took = detection(&d).unwrap();
        assert!(took < ms(3000), "detected after {took:?}");
    }

    #[test]
    fn one_stall_within_the_acceptable_pause_does_not_trip_it() {
        let mut times: Vec<Duration> = (0..100).map(|i| ms(i * 200)).collect();
        let stalled = *times.last().unwrap() + ms(700);
        times.push(stalled);
        let mut d = PhiAccrual::new(settings());
        let mut worst: f64 = 0.0;
        for t in times {
            worst = worst.max(d.phi(t.saturating_sub(ms(1))));
            d.heartbeat(t);
        }
        assert!(worst < 8.0, "a 700 ms stall reached phi {worst}");
    }

    #[test]
    fn a_dead_link_from_the_start_is_not_suspected_by_the_detector() {
        let d = PhiAccrual::new(settings());
        assert_eq!(d.phi(ms(60_000)), 0.0);
        assert!(!d.is_down(ms(60_000)));
    }

    #[test]
    fn a_slower_link_makes_a_more_patient_detector() {
        let quick = trace((0..300).map(|i| ms(i * 100)));
        let slow = trace((0..300).map(|i| ms(i * 1000)));
        assert!(detection(&quick).unwrap() < detection(&slow).unwrap());
        assert!((slow.mean_interval().as_secs_f64() - 1.0).abs() < 0.1);
    }
}
