//! F2, the detector half: a generated trace of heartbeats every 200 ms
//! with ±50 % jitter and 1 % of them lost, fed to the phi-accrual
//! detector with the daemon's default settings. Counts false suspicions
//! (phi reaching the threshold while the primary lives; target 0) and
//! reports how long the same settings take to notice a real death.
//!
//!   failover-detector [MINUTES] [SEED]

use std::time::Duration;

use rand::{Rng, SeedableRng};
use tidemark_failover::{DetectorSettings, PhiAccrual};

fn main() {
    let mut args = std::env::args().skip(1);
    let minutes: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let settings = DetectorSettings::default();
    let interval = settings.first_interval;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut detector = PhiAccrual::new(settings);
    let end = Duration::from_secs(minutes * 60);
    let mut t = Duration::ZERO;
    let (mut beats, mut lost, mut false_suspicions) = (0u64, 0u64, 0u64);
    let mut worst: f64 = 0.0;
    let mut suspected = false;
    detector.heartbeat(t);
    while t < end {
        let jitter = rng.random_range(0.5..1.5);
        let next = t + interval.mul_f64(jitter);
        // Sample the suspicion every 10 ms up to the next heartbeat.
        let mut s = t + Duration::from_millis(10);
        while s < next {
            let phi = detector.phi(s);
            worst = worst.max(phi);
            if phi >= settings.threshold && !suspected {
                false_suspicions += 1;
                suspected = true;
            }
            s += Duration::from_millis(10);
        }
        t = next;
        if rng.random_bool(0.01) {
            lost += 1;
            continue;
        }
        detector.heartbeat(t);
        suspected = false;
        beats += 1;
    }
    // A real death after the last heartbeat.
    let last = detector.last_heartbeat().unwrap_or(t);
    let mut d = last;
    while !detector.is_down(d) {
        d += Duration::from_millis(10);
    }
    println!(
        "F2 detector: {minutes} min of 200 ms heartbeats, ±50 % jitter, {lost} of {} lost (seed {seed}): worst phi {worst:.2}, threshold {}",
        beats + lost,
        settings.threshold
    );
    println!(
        "F2 false suspicions {false_suspicions} (target 0); a real death detected after {:.2} s",
        (d - last).as_secs_f64()
    );
}
