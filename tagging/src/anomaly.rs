//! Anomaly detection on each volume's write stream.
//!
//! Ransomware turns files into incompressible bytes: in place, as
//! encrypted copies written to free blocks while the originals are
//! deleted, or only the first block of each file. The lz4 ratio of every
//! journal record is a free entropy signal; the detector keeps a sliding
//! window of quarter-second buckets per volume and raises:
//!
//! - **entropy**, when from its first incompressible write on most of what
//!   is written is incompressible and it *replaces* earlier data:
//!   - it overwrites at least `min_burst` of earlier data (the original
//!     signal; needs no learnt baseline), or
//!   - the volume's writes have been compressible until now (a share of
//!     incompressible bytes learnt per volume, as Zerto compares with a
//!     learnt baseline) and about as much earlier data as was written
//!     incompressible (within `replace_ratio`) was freed (trims, zeroes)
//!     or overwritten: at least `min_burst` of it, or overwrites in at
//!     least `min_regions` separate places (only each file's head
//!     encrypted);
//! - **rate**, when the volume is overwritten far faster than its usual
//!   rate (an exponentially weighted baseline), once there is a baseline.
//!
//! Defaults keep ordinary workloads quiet: copying files writes fresh
//! blocks and frees nothing; replacing compressed files is usual on a
//! volume that holds them; compressing logs frees far more than it writes;
//! text, object files and database pages compress; a load at the usual
//! rate is the baseline. The alarm names the first incompressible write's
//! seq, so the tag can go just before it.
//!
//! Frees are only seen where the filesystem discards what it frees
//! (`mount -o discard`, or a hypervisor passing discards through):
//! without that, encrypted copies on free space look like new files.

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
    /// Share of the burst's bytes that must be high-entropy.
    pub entropy_fraction: f64,
    /// Share of the high-entropy bytes that must overwrite earlier data.
    pub overwrite_fraction: f64,
    /// At least this much earlier data replaced by high-entropy writes …
    pub min_burst_bytes: u64,
    /// … or, on a volume whose writes have been compressible, high-entropy
    /// overwrites in at least this many separate 64 KiB regions (encrypting
    /// only the start of each file writes little, but in many places).
    pub min_regions: u64,
    /// On a volume whose writes have been compressible: the earlier data
    /// freed or overwritten must be within this factor of the high-entropy
    /// bytes written (encrypted copies are the size of what they replace;
    /// compressing a log and deleting it frees ten times what it writes).
    pub replace_ratio: f64,
    /// A volume's writes "have been compressible" while at most this share
    /// of the bytes it usually takes are high-entropy …
    pub usual_fraction: f64,
    /// … judged once it has taken this many bytes.
    pub learn_bytes: u64,
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
            min_regions: 32,
            replace_ratio: 2.0,
            usual_fraction: 0.5,
            learn_bytes: 16 << 20,
            rate_factor: 50.0,
            min_rate_bytes: 200 << 20,
            cooldown: Duration::from_secs(600),
        }
    }
}

/// What a write did to its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Data, `stored` payload bytes after lz4.
    Data {
        /// Payload bytes stored after lz4.
        stored: u64,
    },
    /// Trimmed or zeroed: whatever the range held is gone (a filesystem
    /// freeing the blocks of a deleted file, with online discard).
    Freed,
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
    /// Data, or freed.
    pub content: Content,
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
/// The usual share of high-entropy writes follows roughly the last this
/// many bytes a volume took: long enough that one burst barely moves it.
const USUAL_HORIZON: f64 = (1u64 << 30) as f64;

/// What one bucket, or a run of them, took.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// Data bytes written.
    bytes: u64,
    /// Of those, high-entropy.
    high: u64,
    /// Of the high-entropy ones, overwriting earlier data.
    high_overwrite: u64,
    /// Separate places those overwrites hit: 64 KiB regions, not next to
    /// the one the overwrite before ended in.
    high_regions: u64,
    /// Data bytes overwriting earlier data (the rate signal).
    overwrite: u64,
    /// Earlier data trimmed or zeroed.
    freed: u64,
}

impl Tally {
    fn add(mut self, other: &Tally) -> Tally {
        self.bytes += other.bytes;
        self.high += other.high;
        self.high_overwrite += other.high_overwrite;
        self.high_regions += other.high_regions;
        self.overwrite += other.overwrite;
        self.freed += other.freed;
        self
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    start: Instant,
    tally: Tally,
    first_seq: Option<Seq>,
    first_high_seq: Option<Seq>,
}

/// The share of high-entropy bytes a volume usually takes: decayed sums
/// of the buckets that left the window.
#[derive(Clone, Copy, Debug, Default)]
struct Usual {
    bytes: f64,
    high: f64,
}

impl Usual {
    fn learn(&mut self, tally: &Tally) {
        self.bytes += tally.bytes as f64;
        self.high += tally.high as f64;
        if self.bytes > USUAL_HORIZON {
            let keep = USUAL_HORIZON / self.bytes;
            self.bytes *= keep;
            self.high *= keep;
        }
    }

    /// Adds writes not yet learnt (those in the window before a burst).
    fn with(mut self, tally: &Tally) -> Usual {
        self.bytes += tally.bytes as f64;
        self.high += tally.high as f64;
        self
    }

    fn share(&self) -> f64 {
        if self.bytes > 0.0 {
            self.high / self.bytes
        } else {
            0.0
        }
    }
}

#[derive(Debug)]
struct Watch {
    written: Vec<u64>,
    buckets: VecDeque<Bucket>,
    /// Bytes per second, exponentially weighted over minutes.
    baseline: f64,
    observed: Duration,
    usual: Usual,
    /// The region of the last high-entropy overwrite, to count regions hit
    /// one after another rather than writes.
    last_high_region: Option<u64>,
    last_alarm: Option<Instant>,
}

impl Watch {
    fn new(size: u64) -> Self {
        Watch {
            written: vec![0; size.div_ceil(REGION).div_ceil(64) as usize],
            buckets: VecDeque::new(),
            baseline: 0.0,
            observed: Duration::ZERO,
            usual: Usual::default(),
            last_high_region: None,
            last_alarm: None,
        }
    }

    fn regions(offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / REGION..(offset + len).div_ceil(REGION)
    }

    /// The word and bit of region `r`, if inside the volume.
    fn bit(&mut self, r: u64) -> Option<(&mut u64, u64)> {
        let word = self.written.get_mut((r / 64) as usize)?;
        Some((word, 1 << (r % 64)))
    }

    /// Marks `offset..offset+len` written; true if all of it was before.
    fn overwrites(&mut self, offset: u64, len: u64) -> bool {
        let mut all = true;
        for r in Self::regions(offset, len) {
            if let Some((word, bit)) = self.bit(r) {
                all &= *word & bit != 0;
                *word |= bit;
            }
        }
        all
    }

    /// Bytes of `offset..offset+len` that held earlier data; regions it
    /// covers whole count as never written again.
    fn frees(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset + len;
        let mut freed = 0;
        for r in Self::regions(offset, len) {
            let (start, stop) = (r * REGION, (r + 1) * REGION);
            let whole = offset <= start && stop <= end;
            if let Some((word, bit)) = self.bit(r) {
                if *word & bit != 0 {
                    freed += stop.min(end) - start.max(offset);
                    if whole {
                        *word &= !bit;
                    }
                }
            }
        }
        freed
    }

    /// Starts a new bucket if the current one is a quarter second old;
    /// buckets leaving the window teach the baselines.
    fn rotate(&mut self, now: Instant, window: Duration) {
        let current = self
            .buckets
            .back()
            .is_some_and(|b| now.duration_since(b.start) < BUCKET);
        if current {
            return;
        }
        // The rate baseline learns from closed buckets only.
        if let Some(last) = self.buckets.back() {
            let rate = last.tally.bytes as f64 / BUCKET.as_secs_f64();
            let alpha = BUCKET.as_secs_f64() / 300.0;
            self.baseline = if self.observed.is_zero() {
                rate
            } else {
                self.baseline + alpha * (rate - self.baseline)
            };
            self.observed += BUCKET;
        }
        self.buckets.push_back(Bucket {
            start: now,
            tally: Tally::default(),
            first_seq: None,
            first_high_seq: None,
        });
        while let Some(old) = self
            .buckets
            .front()
            .filter(|b| now.duration_since(b.start) > window)
        {
            self.usual.learn(&old.tally);
            self.buckets.pop_front();
        }
    }

    /// Counts one write into the current bucket.
    fn record(&mut self, write: &ObservedWrite<'_>, entropy_ratio: f64) {
        let ObservedWrite {
            seq,
            offset,
            len,
            content,
            ..
        } = *write;
        let mut add = Tally::default();
        let mut high_seq = None;
        match content {
            Content::Freed => add.freed = self.frees(offset, len),
            Content::Data { stored } => {
                let overwrite = self.overwrites(offset, len);
                let high = seq.is_some()
                    && len >= MIN_ENTROPY_WRITE
                    && stored as f64 >= entropy_ratio * len as f64;
                add.bytes = len;
                if overwrite {
                    add.overwrite = len;
                }
                if high {
                    add.high = len;
                    high_seq = seq;
                }
                if high && overwrite {
                    add.high_overwrite = len;
                    // Separate places: a file written from start to end
                    // moves to the next region, it is not in another place.
                    let region = offset / REGION;
                    if self
                        .last_high_region
                        .is_none_or(|last| region.abs_diff(last) > 1)
                    {
                        add.high_regions = 1;
                    }
                    self.last_high_region = Some((offset + len - 1) / REGION);
                }
            }
        }
        if let Some(bucket) = self.buckets.back_mut() {
            bucket.tally = bucket.tally.add(&add);
            bucket.first_seq = bucket.first_seq.or(seq);
            bucket.first_high_seq = bucket.first_high_seq.or(high_seq);
        }
    }
}

/// The window, split where its high-entropy burst starts.
#[derive(Clone, Copy, Debug)]
struct Judged {
    /// Everything in the window.
    window: Tally,
    /// From the first bucket with a high-entropy write on.
    burst: Tally,
    /// The volume's usual share of high-entropy bytes, and whether it has
    /// taken enough to say.
    usual_share: f64,
    learnt: bool,
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
        let s = &self.settings;
        if !s.enabled || write.len == 0 {
            return None;
        }
        let mut volumes = self.volumes.lock();
        let watch = volumes
            .entry(write.volume.to_string())
            .or_insert_with(|| Watch::new(write.volume_size));
        watch.rotate(now, s.window);
        watch.record(write, s.entropy_ratio);
        if watch
            .last_alarm
            .is_some_and(|at| now.duration_since(at) < s.cooldown)
        {
            return None;
        }
        let judged = self.judge(watch);
        let (kind, first_seq) = if self.entropy(&judged) {
            (
                "entropy",
                watch.buckets.iter().find_map(|b| b.first_high_seq)?,
            )
        } else if self.rate(watch, &judged) {
            ("rate", watch.buckets.iter().find_map(|b| b.first_seq)?)
        } else {
            return None;
        };
        watch.last_alarm = Some(now);
        Some(Alarm {
            volume: write.volume.to_string(),
            kind,
            first_seq,
            detail: self.detail(watch, &judged),
        })
    }

    fn judge(&self, watch: &Watch) -> Judged {
        let sum = |buckets: &mut dyn Iterator<Item = &Bucket>| {
            buckets.fold(Tally::default(), |acc, b| acc.add(&b.tally))
        };
        let window = sum(&mut watch.buckets.iter());
        // The burst is judged from its first high-entropy write on, so
        // ordinary writes just before it do not dilute it; they are what
        // the volume usually takes.
        let before = sum(&mut watch.buckets.iter().take_while(|b| b.tally.high == 0));
        let burst = sum(&mut watch.buckets.iter().skip_while(|b| b.tally.high == 0));
        let usual = watch.usual.with(&before);
        if burst.high > 0 {
            tracing::trace!(?burst, ?window, usual = usual.share(), "anomaly window");
        }
        Judged {
            window,
            burst,
            usual_share: usual.share(),
            learnt: usual.bytes >= self.settings.learn_bytes as f64,
        }
    }

    /// Incompressible writes replacing earlier data: see the module doc.
    fn entropy(&self, j: &Judged) -> bool {
        let s = &self.settings;
        let share = j.burst.high as f64 / j.burst.bytes.max(1) as f64;
        let mostly_high = j.burst.high > 0 && share >= s.entropy_fraction;
        // Encrypting only each file's head writes little, so the
        // filesystem's own writes around it (inode times, bitmaps written
        // back by the same sync) weigh more: in many separate places, more
        // than half is enough.
        let scattered = j.burst.high > 0 && share > 0.5 && j.burst.high_regions >= s.min_regions;
        (mostly_high && (self.overwritten(&j.burst) || self.changed(j)))
            || (scattered && self.changed(j))
    }

    /// Encrypted in place: enough earlier data overwritten. Needs no
    /// learnt baseline, only the earlier writes to have been seen.
    fn overwritten(&self, burst: &Tally) -> bool {
        let s = &self.settings;
        burst.high_overwrite >= s.min_burst_bytes
            && burst.high_overwrite as f64 >= s.overwrite_fraction * burst.high as f64
    }

    /// A volume whose writes have compressed now writes incompressible
    /// bytes in place of about as much earlier data, freed or overwritten:
    /// encrypted copies with the originals deleted, or many small
    /// overwrites (the head of each file).
    fn changed(&self, j: &Judged) -> bool {
        let s = &self.settings;
        let was_compressible = j.learnt && j.usual_share <= s.usual_fraction;
        // Frees anywhere in the window count: a filesystem frees a file's
        // blocks seconds after the copy that replaced it was written.
        let replaced = j.burst.high_overwrite + j.window.freed;
        let (replaced_f, high) = (replaced as f64, j.burst.high as f64);
        let same_size =
            replaced_f * s.replace_ratio >= high && replaced_f <= s.replace_ratio * high;
        let enough = replaced.min(j.burst.high) >= s.min_burst_bytes
            || j.burst.high_regions >= s.min_regions;
        was_compressible && same_size && enough
    }

    /// Overwriting far faster than usual.
    fn rate(&self, watch: &Watch, j: &Judged) -> bool {
        let s = &self.settings;
        let rate = j.window.bytes as f64 / s.window.as_secs_f64();
        s.rate_factor > 0.0
            && watch.observed >= Duration::from_secs(60)
            && rate >= s.min_rate_bytes as f64
            && rate >= s.rate_factor * watch.baseline
            && j.window.overwrite as f64 >= s.overwrite_fraction * j.window.bytes as f64
    }

    fn detail(&self, watch: &Watch, j: &Judged) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let pct = |part: u64, whole: u64| 100.0 * part as f64 / whole.max(1) as f64;
        let rate = j.window.bytes as f64 / self.settings.window.as_secs_f64();
        let usual = if j.learnt {
            format!("usually {:.0}%", 100.0 * j.usual_share)
        } else {
            "no usual share learnt yet".to_string()
        };
        format!(
            "{:.1} MiB written in {:?}: {:.0}% high-entropy ({usual}), {:.1} MiB of it overwriting earlier data in {} places, {:.1} MiB of earlier data freed; {:.1} MiB/s against a usual {:.1} MiB/s",
            mib(j.window.bytes),
            self.settings.window,
            pct(j.burst.high, j.burst.bytes),
            mib(j.burst.high_overwrite),
            j.burst.high_regions,
            mib(j.window.freed),
            mib(rate as u64),
            mib(watch.baseline as u64)
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 30;
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    /// One volume's write stream, on a clock of its own.
    struct Stream {
        detector: Detector,
        now: Instant,
        seq: Seq,
        /// Time between writes.
        gap: Duration,
        alarms: Vec<Alarm>,
    }

    impl Stream {
        fn new() -> Self {
            Self::with(AnomalySettings::default())
        }

        fn with(settings: AnomalySettings) -> Self {
            Stream {
                detector: Detector::new(settings),
                now: Instant::now(),
                seq: 0,
                gap: Duration::from_millis(1),
                alarms: Vec::new(),
            }
        }

        fn observe(&mut self, offset: u64, len: u64, content: Content) {
            self.seq += 1;
            self.now += self.gap;
            let w = ObservedWrite {
                volume: "db",
                volume_size: SIZE,
                seq: Some(self.seq),
                offset,
                len,
                content,
            };
            self.alarms.extend(self.detector.observe(&w, self.now));
        }

        /// Writes `len` bytes at `offset` in writes of up to `chunk`, each
        /// stored in `ratio` of its size.
        fn write(&mut self, offset: u64, len: u64, ratio: f64, chunk: u64) {
            let mut at = offset;
            while at < offset + len {
                let n = chunk.min(offset + len - at);
                let stored = (n as f64 * ratio) as u64;
                self.observe(at, n, Content::Data { stored });
                at += n;
            }
        }

        /// Trims `len` bytes at `offset`.
        fn free(&mut self, offset: u64, len: u64) {
            self.observe(offset, len, Content::Freed);
        }

        fn pass(&mut self, time: Duration) {
            self.now += time;
        }

        /// The seq the next write gets.
        fn next_seq(&self) -> Seq {
            self.seq + 1
        }

        fn quiet(&self, what: &str) {
            assert!(self.alarms.is_empty(), "{what}: {:?}", self.alarms);
        }

        fn alarm(&self, what: &str) -> &Alarm {
            assert_eq!(self.alarms.len(), 1, "{what}: {:?}", self.alarms);
            &self.alarms[0]
        }
    }

    /// Where file `i` of 512 KiB files lies.
    fn file(i: u64) -> u64 {
        64 * MIB + i * 512 * KIB
    }

    /// 40 text files of 512 KiB (20 MiB, compressible), then a quiet
    /// while: the volume has learnt that its writes compress.
    fn volume_of_text_files(s: &mut Stream) {
        for i in 0..40 {
            s.write(file(i), 512 * KIB, 0.3, 128 * KIB);
        }
        s.pass(Duration::from_secs(10));
        s.quiet("writing text files");
    }

    #[test]
    fn encrypted_copies_with_the_originals_freed_alarm_at_the_first_copy() {
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        let first_bad = s.next_seq();
        // Each file: an encrypted copy on free blocks, renamed over the
        // original; the filesystem frees the originals when it commits.
        let copies = 512 * MIB;
        for i in 0..40 {
            s.write(copies + i * 512 * KIB, 512 * KIB, 1.0, 128 * KIB);
            if i % 8 == 7 {
                s.free(file(i - 7), 8 * 512 * KIB);
            }
        }
        let alarm = s.alarm("encrypted copies");
        assert_eq!(alarm.kind, "entropy");
        assert_eq!(alarm.first_seq, first_bad);
        assert!(alarm.detail.contains("freed"), "{}", alarm.detail);
    }

    #[test]
    fn overwriting_with_random_bytes_alarms_at_the_first_such_write() {
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        let first_bad = s.next_seq();
        for i in 0..40 {
            s.write(file(i), 512 * KIB, 1.0, 128 * KIB);
        }
        let alarm = s.alarm("encryption in place").clone();
        assert_eq!(alarm.kind, "entropy");
        assert_eq!(alarm.first_seq, first_bad);
        // One alarm per burst.
        for i in 0..40 {
            s.write(file(i), 512 * KIB, 1.0, 128 * KIB);
        }
        assert_eq!(s.alarms, vec![alarm]);
    }

    #[test]
    fn overwriting_with_random_bytes_alarms_without_a_baseline_too() {
        // The original signal: 8 MiB of earlier data overwritten with
        // random bytes alarms on a volume the detector has just met.
        let mut s = Stream::new();
        s.write(0, 32 * MIB, 0.4, 64 * KIB);
        let first_bad = s.next_seq();
        s.write(0, 32 * MIB, 1.0, 64 * KIB);
        assert_eq!(s.alarm("overwrites").first_seq, first_bad);
    }

    #[test]
    fn encrypting_the_first_block_of_each_file_alarms_at_the_first_block() {
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        let first_bad = s.next_seq();
        for i in 0..40 {
            s.write(file(i), 4 * KIB, 1.0, 4 * KIB);
            if i % 8 == 7 {
                // The inodes' new times, through the filesystem's journal.
                s.write(32 * MIB, 4 * KIB, 0.1, 4 * KIB);
            }
        }
        let alarm = s.alarm("first blocks encrypted");
        assert_eq!(alarm.first_seq, first_bad);
        assert!(alarm.detail.contains("32 places"), "{}", alarm.detail);

        // The same, with the filesystem writing back more of its own
        // compressible metadata among them: a quarter of the burst.
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        let first_bad = s.next_seq();
        for i in 0..40 {
            s.write(file(i), 4 * KIB, 1.0, 4 * KIB);
            if i % 3 == 2 {
                s.write(32 * MIB + i * 4 * KIB, 4 * KIB, 0.1, 4 * KIB);
            }
        }
        assert_eq!(s.alarm("first blocks among metadata").first_seq, first_bad);
    }

    #[test]
    fn ordinary_writes_right_before_the_burst_do_not_hide_it() {
        let mut s = Stream::new();
        s.write(0, 24 * MIB, 0.4, 64 * KIB);
        s.write(0, 24 * MIB, 0.4, 64 * KIB);
        let first_bad = s.next_seq();
        s.write(0, 24 * MIB, 1.0, 64 * KIB);
        assert_eq!(s.alarm("after ordinary writes").first_seq, first_bad);
    }

    #[test]
    fn copying_compressed_files_stays_quiet() {
        // Onto a volume of text files: fresh blocks, nothing freed.
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        s.write(512 * MIB, 64 * MIB, 1.0, 128 * KIB);
        s.quiet("copying compressed files onto a volume of text");

        // Onto a volume that holds them, over the old copies: once the
        // volume has taken compressed files, replacing them is usual.
        let mut s = Stream::new();
        s.write(0, 64 * MIB, 1.0, 128 * KIB);
        s.quiet("the first copy");
        s.pass(Duration::from_secs(10));
        for round in 1..4u64 {
            let (old, new) = ((round - 1) % 2 * 128 * MIB, round % 2 * 128 * MIB);
            for i in 0..128 {
                s.write(new + i * 512 * KIB, 512 * KIB, 1.0, 128 * KIB);
                s.free(old + i * 512 * KIB, 512 * KIB);
            }
            s.pass(Duration::from_secs(10));
        }
        s.quiet("replacing compressed files on a volume that holds them");

        // A volume met just now: its first copy replaced at once, before
        // anything is learnt about it; only overwrites count then.
        let mut s = Stream::new();
        s.write(0, 32 * MIB, 1.0, 128 * KIB);
        for i in 0..64 {
            s.write(256 * MIB + i * 512 * KIB, 512 * KIB, 1.0, 128 * KIB);
            s.free(i * 512 * KIB, 512 * KIB);
        }
        s.quiet("replacing compressed files on a volume not learnt yet");
    }

    #[test]
    fn a_database_load_stays_quiet() {
        let mut s = Stream::new();
        s.gap = Duration::from_micros(200);
        let wal = 16 * MIB;
        let (mut wal_at, mut page) = (0u64, 0u64);
        let mut rng = 7u64;
        let mut random = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // A quarter of the pages hold values that were compressed
        // already (images, compressed columns): they do not shrink.
        let ratio = |r: u64| if r % 4 == 0 { 0.97 } else { 0.4 };
        for _ in 0..100_000u64 {
            match random() % 10 {
                // The WAL, a ring of recycled segments: overwrites, with
                // images of incompressible pages now and then.
                0..=2 => {
                    s.write(wal_at, 64 * KIB, ratio(random()), 64 * KIB);
                    wal_at = (wal_at + 64 * KIB) % wal;
                }
                // New table pages.
                3..=5 => {
                    s.write(wal + page * 8 * KIB, 64 * KIB, ratio(random()), 8 * KIB);
                    page += 8;
                }
                // Pages rewritten in place (hint bits, updates, indexes).
                6..=8 => {
                    let at = wal + (random() % page.max(1)) * 8 * KIB;
                    s.write(at, 8 * KIB, ratio(random()), 8 * KIB);
                }
                // Sort runs for an index build: written, then deleted.
                _ => {
                    let at = 768 * MIB + (random() % 64) * MIB;
                    s.write(at, MIB, 0.45, 128 * KIB);
                    s.free(at, MIB);
                }
            }
        }
        s.quiet("a database load");
    }

    #[test]
    fn a_database_of_partly_compressed_pages_stays_quiet() {
        // A tenth of its overwrites are high-entropy: never a burst.
        let mut s = Stream::new();
        s.write(0, 64 * MIB, 0.4, 64 * KIB);
        s.gap = Duration::from_micros(500);
        for i in 0..40_000u64 {
            let ratio = if i % 10 == 0 { 1.0 } else { 0.4 };
            s.write((i % 1024) * 64 * KIB, 64 * KIB, ratio, 64 * KIB);
        }
        s.quiet("partly compressed pages");
    }

    #[test]
    fn one_compressed_file_over_reused_blocks_stays_quiet() {
        // Without discard, a new 4 MiB archive lands on blocks that held
        // text, written front to back in 128 KiB pieces, with 3 MiB of
        // text saved beside it: one place, not 64.
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        for i in 0..32u64 {
            s.write(file(0) + i * 128 * KIB, 128 * KIB, 1.0, 128 * KIB);
            s.write(200 * MIB + i * 96 * KIB, 96 * KIB, 0.3, 96 * KIB);
        }
        s.quiet("a compressed file over reused blocks");
    }

    #[test]
    fn a_build_stays_quiet() {
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        let objects = 256 * MIB;
        for round in 0..4u64 {
            // Each object file written under a temporary name, renamed
            // over the last build's, which is freed; the directory and
            // inodes change through the journal.
            let (old, new) = ((round + 1) % 2 * 64 * MIB, round % 2 * 64 * MIB);
            for i in 0..300u64 {
                let len = (16 + (i * 37) % 180) * KIB;
                s.write(objects + new + i * 256 * KIB, len, 0.55, 128 * KIB);
                s.write(32 * MIB + (i % 16) * 4 * KIB, 4 * KIB, 0.2, 4 * KIB);
                if round > 0 {
                    s.free(objects + old + i * 256 * KIB, len);
                }
            }
            // The release archive: compressed, replacing the last one.
            s.write(900 * MIB + new, 4 * MIB, 1.0, 128 * KIB);
            if round > 0 {
                s.free(900 * MIB + old, 4 * MIB);
            }
            s.pass(Duration::from_secs(2));
        }
        s.quiet("builds");
    }

    #[test]
    fn compressing_logs_and_deleting_them_stays_quiet() {
        // logrotate: 160 MiB of text becomes 16 MiB of gzip, then the text
        // is deleted. Incompressible writes with data freed, but ten times
        // as much freed as written: not encrypted copies.
        let mut s = Stream::new();
        s.write(0, 160 * MIB, 0.3, 128 * KIB);
        s.pass(Duration::from_secs(10));
        s.write(512 * MIB, 16 * MIB, 1.0, 128 * KIB);
        s.free(0, 160 * MIB);
        s.quiet("compressing logs");
    }

    #[test]
    fn small_bursts_and_small_writes_stay_quiet() {
        let mut s = Stream::new();
        volume_of_text_files(&mut s);
        // The first block of a few files: a handful of documents saved.
        for i in 0..8 {
            s.write(file(i), 4 * KIB, 1.0, 4 * KIB);
        }
        // Small random writes never count as entropy.
        for i in 0..10_000u64 {
            s.write((i % 100) * 4 * KIB, 512, 1.0, 512);
        }
        s.quiet("small writes");
        // Heads of files encrypted on a volume that usually takes
        // incompressible writes: no baseline to stand out from.
        let mut s = Stream::new();
        for i in 0..40 {
            s.write(file(i), 512 * KIB, 1.0, 128 * KIB);
        }
        s.pass(Duration::from_secs(10));
        for i in 0..40 {
            s.write(file(i), 4 * KIB, 1.0, 4 * KIB);
        }
        s.quiet("heads of compressed files");
    }

    #[test]
    fn disabled_means_silent() {
        let mut s = Stream::with(AnomalySettings {
            enabled: false,
            ..AnomalySettings::default()
        });
        volume_of_text_files(&mut s);
        for i in 0..40 {
            s.write(file(i), 512 * KIB, 1.0, 128 * KIB);
        }
        s.quiet("disabled");
    }
}
