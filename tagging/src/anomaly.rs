//! Anomaly detection on each volume's write stream.
//!
//! Two signals, both over a sliding window of quarter-second buckets:
//! - **entropy**: most of the bytes written are high-entropy (lz4 could not
//!   shrink them: the ratio comes free with every record) *and* overwrite
//!   data written earlier — what encrypting files in place looks like;
//! - **rate**: the volume is overwritten far faster than its usual rate
//!   (an exponentially weighted baseline), once there is a baseline.
//!
//! Defaults keep ordinary workloads quiet: copying files writes fresh
//! blocks, text and database pages compress, and a load at the usual rate
//! is the baseline. The alarm names the first suspicious write's seq, so
//! the tag can go just before it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_journal::Seq;

/// Thresholds (the `[tagging.anomaly]` table).
#[derive(Clone, Copy, Debug)]
pub struct AnomalySettings {
    /// Watch at all.
    pub enabled: bool,
    /// The sliding window.
    pub window: Duration,
    /// Stored/written above this makes a write high-entropy.
    pub entropy_ratio: f64,
    /// Share of the window's bytes that must be high-entropy.
    pub entropy_fraction: f64,
    /// Share of those that must overwrite earlier data.
    pub overwrite_fraction: f64,
    /// At least this many high-entropy overwritten bytes in the window.
    pub min_burst_bytes: u64,
    /// Rate alarm: this many times the baseline …
    pub rate_factor: f64,
    /// … and at least this many bytes per second.
    pub min_rate_bytes: u64,
    /// No second alarm for a volume within this time.
    pub cooldown: Duration,
}

impl Default for AnomalySettings {
    fn default() -> Self {
        AnomalySettings {
            enabled: true,
            window: Duration::from_secs(5),
            entropy_ratio: 0.9,
            entropy_fraction: 0.8,
            overwrite_fraction: 0.5,
            min_burst_bytes: 8 << 20,
            rate_factor: 50.0,
            min_rate_bytes: 200 << 20,
            cooldown: Duration::from_secs(600),
        }
    }
}

/// One acknowledged write, as the detector sees it.
#[derive(Clone, Copy, Debug)]
pub struct ObservedWrite<'a> {
    /// The volume written.
    pub volume: &'a str,
    /// Its size in bytes.
    pub volume_size: u64,
    /// The record's seq (`None`: left to a resync, nothing known).
    pub seq: Option<Seq>,
    /// Where.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
    /// Payload bytes stored after lz4.
    pub stored: u64,
}

/// What set an alarm off.
#[derive(Clone, Debug, PartialEq)]
pub struct Alarm {
    /// The volume.
    pub volume: String,
    /// `entropy` or `rate`.
    pub kind: &'static str,
    /// The first write of the burst.
    pub first_seq: Seq,
    /// Numbers behind it, for the tag's note.
    pub detail: String,
}

const BUCKET: Duration = Duration::from_millis(250);
/// Granularity of "written before" (a bit per 64 KiB).
const REGION: u64 = 64 << 10;
/// Writes smaller than this say nothing about entropy.
const MIN_ENTROPY_WRITE: u64 = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    start: Instant,
    bytes: u64,
    high: u64,
    high_overwrite: u64,
    overwrite: u64,
    first_seq: Option<Seq>,
    first_high_seq: Option<Seq>,
}

#[derive(Debug)]
struct Watch {
    written: Vec<u64>,
    buckets: VecDeque<Bucket>,
    /// Bytes per second, exponentially weighted over minutes.
    baseline: f64,
    observed: Duration,
    last_alarm: Option<Instant>,
}

impl Watch {
    fn new(size: u64) -> Self {
        Watch {
            written: vec![0; size.div_ceil(REGION).div_ceil(64) as usize],
            buckets: VecDeque::new(),
            baseline: 0.0,
            observed: Duration::ZERO,
            last_alarm: None,
        }
    }

    /// Marks `offset..offset+len` written; true if all of it was before.
    fn overwrites(&mut self, offset: u64, len: u64) -> bool {
        let mut all = true;
        for r in offset / REGION..(offset + len).div_ceil(REGION) {
            let (word, bit) = ((r / 64) as usize, r % 64);
            if let Some(w) = self.written.get_mut(word) {
                all &= *w & (1 << bit) != 0;
                *w |= 1 << bit;
            }
        }
        all
    }
}

/// Watches every volume's writes.
#[derive(Debug)]
pub struct Detector {
    settings: AnomalySettings,
    volumes: Mutex<HashMap<String, Watch>>,
}

impl Detector {
    /// A detector with `settings`.
    pub fn new(settings: AnomalySettings) -> Self {
        Detector {
            settings,
            volumes: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &AnomalySettings {
        &self.settings
    }

    /// Records one acknowledged write; returns an alarm when the window
    /// turns suspicious.
    pub fn observe(&self, write: &ObservedWrite<'_>, now: Instant) -> Option<Alarm> {
        let ObservedWrite {
            volume,
            volume_size: size,
            seq,
            offset,
            len,
            stored,
        } = *write;
        let s = &self.settings;
        if !s.enabled || len == 0 {
            return None;
        }
        let mut volumes = self.volumes.lock();
        let watch = volumes
            .entry(volume.to_string())
            .or_insert_with(|| Watch::new(size));
        let overwrite = watch.overwrites(offset, len);
        let high = seq.is_some()
            && len >= MIN_ENTROPY_WRITE
            && stored as f64 >= s.entropy_ratio * len as f64;
        let new_bucket = watch
            .buckets
            .back()
            .is_none_or(|b| now.duration_since(b.start) >= BUCKET);
        if new_bucket {
            // The baseline learns from closed buckets only.
            if let Some(last) = watch.buckets.back().copied() {
                let rate = last.bytes as f64 / BUCKET.as_secs_f64();
                let alpha = BUCKET.as_secs_f64() / 300.0;
                watch.baseline = if watch.observed.is_zero() {
                    rate
                } else {
                    watch.baseline + alpha * (rate - watch.baseline)
                };
                watch.observed += BUCKET;
            }
            watch.buckets.push_back(Bucket {
                start: now,
                bytes: 0,
                high: 0,
                high_overwrite: 0,
                overwrite: 0,
                first_seq: None,
                first_high_seq: None,
            });
            while watch
                .buckets
                .front()
                .is_some_and(|b| now.duration_since(b.start) > s.window)
            {
                watch.buckets.pop_front();
            }
        }
        let bucket = watch.buckets.back_mut()?;
        bucket.bytes += len;
        if bucket.first_seq.is_none() {
            bucket.first_seq = seq;
        }
        if overwrite {
            bucket.overwrite += len;
        }
        if high {
            bucket.high += len;
            if overwrite {
                bucket.high_overwrite += len;
                if bucket.first_high_seq.is_none() {
                    bucket.first_high_seq = seq;
                }
            }
        }
        if watch
            .last_alarm
            .is_some_and(|at| now.duration_since(at) < s.cooldown)
        {
            return None;
        }
        let sums = |buckets: &mut dyn Iterator<Item = &Bucket>| {
            buckets.fold((0u64, 0u64, 0u64, 0u64), |acc, b| {
                (
                    acc.0 + b.bytes,
                    acc.1 + b.high,
                    acc.2 + b.high_overwrite,
                    acc.3 + b.overwrite,
                )
            })
        };
        // The entropy burst is judged from its first suspicious write on,
        // so ordinary writes just before it do not dilute it.
        let (burst_bytes, high, high_ow, _) =
            sums(&mut watch.buckets.iter().skip_while(|b| b.high_overwrite == 0));
        let (bytes, _, _, ow) = sums(&mut watch.buckets.iter());
        if high_ow > 0 {
            tracing::trace!(volume, burst_bytes, high, high_ow, bytes, "anomaly window");
        }
        let entropy = high_ow >= s.min_burst_bytes
            && high as f64 >= s.entropy_fraction * burst_bytes as f64
            && high_ow as f64 >= s.overwrite_fraction * high as f64;
        let rate = bytes as f64 / s.window.as_secs_f64();
        let rate_alarm = s.rate_factor > 0.0
            && watch.observed >= Duration::from_secs(60)
            && rate >= s.min_rate_bytes as f64
            && rate >= s.rate_factor * watch.baseline
            && ow as f64 >= s.overwrite_fraction * bytes as f64;
        if !entropy && !rate_alarm {
            return None;
        }
        let first_seq = if entropy {
            watch.buckets.iter().find_map(|b| b.first_high_seq)
        } else {
            watch.buckets.iter().find_map(|b| b.first_seq)
        }?;
        watch.last_alarm = Some(now);
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        Some(Alarm {
            volume: volume.to_string(),
            kind: if entropy { "entropy" } else { "rate" },
            first_seq,
            detail: format!(
                "{:.1} MiB written in {:?}: {:.0}% high-entropy, {:.1} MiB of it overwriting earlier data; {:.1} MiB/s against a usual {:.1} MiB/s",
                mib(bytes),
                s.window,
                100.0 * high as f64 / burst_bytes.max(1) as f64,
                mib(high_ow),
                mib(rate as u64),
                mib(watch.baseline as u64)
            ),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 30;

    /// Writes `n` 64 KiB blocks starting at `block`, `stored_ratio` of their
    /// size after lz4, one per `gap`; returns the first alarm.
    fn run(
        d: &Detector,
        t: &mut Instant,
        seq: &mut Seq,
        block: u64,
        n: u64,
        stored_ratio: f64,
        gap: Duration,
    ) -> Option<Alarm> {
        let mut alarm = None;
        for i in 0..n {
            *seq += 1;
            *t += gap;
            let len = 64 << 10;
            let stored = (len as f64 * stored_ratio) as u64;
            let w = ObservedWrite {
                volume: "db",
                volume_size: SIZE,
                seq: Some(*seq),
                offset: (block + i) * len,
                len,
                stored,
            };
            let a = d.observe(&w, *t);
            alarm = alarm.or(a);
        }
        alarm
    }

    #[test]
    fn overwriting_with_random_bytes_alarms_at_the_first_such_write() {
        let d = Detector::new(AnomalySettings::default());
        let (mut t, mut seq) = (Instant::now(), 0);
        // Normal: 32 MiB of compressible files.
        assert_eq!(
            run(&d, &mut t, &mut seq, 0, 512, 0.4, Duration::from_millis(5)),
            None
        );
        t += Duration::from_secs(30);
        let first_bad = seq + 1;
        // The same blocks again, encrypted.
        let alarm = run(&d, &mut t, &mut seq, 0, 512, 1.0, Duration::from_millis(2)).unwrap();
        assert_eq!(alarm.kind, "entropy");
        assert_eq!(alarm.first_seq, first_bad);
        // One alarm per burst.
        assert_eq!(
            run(&d, &mut t, &mut seq, 0, 512, 1.0, Duration::from_millis(2)),
            None
        );
    }

    #[test]
    fn ordinary_writes_right_before_the_burst_do_not_hide_it() {
        let d = Detector::new(AnomalySettings::default());
        let (mut t, mut seq) = (Instant::now(), 0);
        assert_eq!(
            run(&d, &mut t, &mut seq, 0, 384, 0.4, Duration::from_millis(2)),
            None
        );
        assert_eq!(
            run(&d, &mut t, &mut seq, 0, 384, 0.4, Duration::from_millis(2)),
            None
        );
        let first_bad = seq + 1;
        let alarm = run(&d, &mut t, &mut seq, 0, 384, 1.0, Duration::from_millis(2)).unwrap();
        assert_eq!(alarm.first_seq, first_bad);
        // A database whose pages are partly compressed already: a tenth of
        // its overwrites are high-entropy, never a burst.
        let d = Detector::new(AnomalySettings::default());
        let (mut t, mut seq) = (Instant::now(), 0);
        run(&d, &mut t, &mut seq, 0, 1024, 0.4, Duration::from_millis(1));
        for i in 0..40_000u64 {
            let ratio = if i % 10 == 0 { 1.0 } else { 0.4 };
            let alarm = run(
                &d,
                &mut t,
                &mut seq,
                i % 1024,
                1,
                ratio,
                Duration::from_micros(500),
            );
            assert_eq!(alarm, None, "write {i}");
        }
    }

    #[test]
    fn ordinary_workloads_stay_quiet() {
        let d = Detector::new(AnomalySettings::default());
        let (mut t, mut seq) = (Instant::now(), 0);
        // Copying already-compressed files: high entropy, but fresh blocks.
        assert_eq!(
            run(&d, &mut t, &mut seq, 0, 2048, 1.0, Duration::from_millis(1)),
            None
        );
        // A database rewriting its (compressible) pages in place, fast.
        for _ in 0..5 {
            assert_eq!(
                run(
                    &d,
                    &mut t,
                    &mut seq,
                    0,
                    2048,
                    0.5,
                    Duration::from_micros(200)
                ),
                None
            );
        }
        // Small random writes never count as entropy.
        for i in 0..10_000u64 {
            seq += 1;
            t += Duration::from_micros(100);
            let w = ObservedWrite {
                volume: "db",
                volume_size: SIZE,
                seq: Some(seq),
                offset: (i % 100) * 4096,
                len: 512,
                stored: 512,
            };
            assert_eq!(d.observe(&w, t), None);
        }
    }

    #[test]
    fn disabled_means_silent() {
        let d = Detector::new(AnomalySettings {
            enabled: false,
            ..AnomalySettings::default()
        });
        let (mut t, mut seq) = (Instant::now(), 0);
        run(&d, &mut t, &mut seq, 0, 512, 0.3, Duration::from_millis(1));
        assert_eq!(
            run(&d, &mut t, &mut seq, 0, 512, 1.0, Duration::from_millis(1)),
            None
        );
    }
}
