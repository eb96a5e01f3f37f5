//! The write path in each IO mode: what is acknowledged is journalled (or
//! covered by a resync), the production volume always ends up equal to the
//! journal's newest point, a full cache falls back to the dirty-region map,
//! a slowed journal drives adaptive mode to async and back without
//! flapping, and a full disk makes sync writes fail cleanly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::Rng;
use tidemark_journal::io_hooks::FaultyIo;
use tidemark_journal::{
    AdaptiveThresholds, BlockDevice, Error, FileDevice, IoMode, Journal, JournalOptions,
    ManualClock, Mark, Point, RecoveryMode, Timestamp, WritePath, WritePathOptions,
};

const START: i64 = 1_800_000_000_000_000_000;
const SIZE: u64 = 2 << 20;
const ENOSPC: i32 = 28;

struct Setup {
    faults: Arc<FaultyIo>,
    path: WritePath,
    // Last: fields drop in order, and the journal's index flushes into
    // the directory as it closes.
    _dir: tempfile::TempDir,
}

fn setup(mode: IoMode, cache: u64, options: WritePathOptions) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let journal_options = JournalOptions {
        io_hooks: faults.clone(),
        memory_cache_bytes: cache,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    };
    let (journal, _) = Journal::open(&dir.path().join("journal"), journal_options).expect("open");
    journal.create_volume("vol", SIZE).expect("volume");
    let path = WritePath::new(journal, options).expect("write path");
    let device =
        Arc::new(FileDevice::open(&dir.path().join("production.img"), SIZE).expect("device"));
    let report = path.attach("vol", device, mode).expect("attach");
    assert!(report.regions.is_empty(), "a fresh volume needs no resync");
    Setup {
        _dir: dir,
        faults,
        path,
    }
}

fn small_regions() -> WritePathOptions {
    WritePathOptions {
        region_size: 256 << 10,
        sync_timeout: Duration::from_secs(10),
        maintenance_interval: Duration::from_secs(3600),
        ..WritePathOptions::default()
    }
}

/// Small regions and adaptive thresholds far from ordinary fsync
/// latencies, so a loaded machine running other tests does not trip them;
/// a switch back to sync waits `min_dwell`.
/// A journal write delay that sends adaptive to async at once.
const SLOW: Duration = Duration::from_millis(500);

fn adaptive_options(min_dwell: Duration) -> WritePathOptions {
    WritePathOptions {
        adaptive: AdaptiveThresholds {
            // Far apart, and far from a real fsync's latency even on a
            // loaded machine: the tests make the journal slow with delays
            // of their own (`SLOW`), and a spike of the real disk must
            // neither hold a volume in async nor send it there.
            high_latency: Duration::from_millis(250),
            high_backlog: 1 << 30,
            low_latency: Duration::from_millis(50),
            low_backlog: 1 << 20,
            min_dwell,
        },
        ..small_regions()
    }
}

/// Whether the production volume and the journal's newest point are
/// identical.
fn production_equals_journal(path: &WritePath) -> bool {
    production_differs_from_journal(path, "vol", SIZE).is_none()
}

/// The production volume and the journal's newest point are identical.
fn assert_production_equals_journal(path: &WritePath) {
    if let Some(at) = production_differs_from_journal(path, "vol", SIZE) {
        panic!("production and journal differ first at byte {at}");
    }
}

fn random_write(rng: &mut rand::rngs::SmallRng) -> (u64, Vec<u8>) {
    let len = rng.random_range(1..=40_000u64);
    let offset = rng.random_range(0..=SIZE - len);
    (offset, payload(rng, len as usize))
}

#[test]
fn sync_writes_are_durable_in_the_journal_when_acknowledged() {
    let s = setup(IoMode::Sync, 1 << 20, small_regions());
    let mut rng = rng(1);
    for i in 0..200 {
        let (offset, data) = random_write(&mut rng);
        let ack = match i % 10 {
            7 => s.path.write_zeroes("vol", offset, data.len() as u64, false),
            8 => s.path.trim("vol", offset, data.len() as u64),
            _ => s.path.write("vol", offset, &data, i % 5 == 0),
        }
        .expect("write");
        assert_eq!(ack.mode, IoMode::Sync);
        let seq = ack.seq.expect("sync writes have a record");
        // Durable and readable at its own point the moment it is acknowledged.
        assert!(s.path.journal().history().newest_seq >= seq);
        let mut at_seq = vec![0u8; data.len()];
        s.path
            .journal()
            .read("vol", offset, &mut at_seq, Point::Seq(seq))
            .expect("read");
        let expected = if i % 10 == 7 || i % 10 == 8 {
            vec![0u8; data.len()]
        } else {
            data
        };
        assert!(
            at_seq == expected,
            "write {i} at seq {seq} is not in the journal"
        );
    }
    s.path.flush("vol").expect("flush");
    assert_production_equals_journal(&s.path);
    let stats = s.path.stats("vol").expect("stats");
    assert_eq!(
        (stats.writes, stats.sync_writes, stats.async_writes),
        (200, 200, 0)
    );
}

#[test]
fn async_writes_beyond_the_cache_are_resynced_from_production() {
    let s = setup(IoMode::Async, 64 << 10, small_regions());
    let mut rng = rng(2);
    // A slow journal and a small cache: most async writes find no room.
    s.faults.set_write_delay(Duration::from_millis(20));
    let mut unjournalled = 0;
    for _ in 0..100 {
        let (offset, data) = random_write(&mut rng);
        let ack = s.path.write("vol", offset, &data, false).expect("write");
        assert_eq!(ack.mode, IoMode::Async);
        if ack.seq.is_none() {
            unjournalled += 1;
        }
    }
    assert!(unjournalled > 0, "the cache never overflowed");
    let stats = s.path.stats("vol").expect("stats");
    assert_eq!(stats.cache_fallbacks, unjournalled);
    assert!(stats.dirty_regions > 0);

    s.faults.set_write_delay(Duration::ZERO);
    s.path.maintain_now().expect("maintenance resyncs");
    let stats = s.path.stats("vol").expect("stats");
    assert!(
        stats.resynced_regions > 0 && stats.resynced_bytes > 0,
        "{stats:?}"
    );
    assert_production_equals_journal(&s.path);
    // The resync is on the timeline.
    let volume = s.path.journal().volume("vol").expect("volume").id;
    let events = s
        .path
        .journal()
        .events(volume, 0, u64::MAX)
        .expect("events");
    let resyncs: Vec<_> = events
        .iter()
        .filter_map(|e| match Mark::decode(&e.body) {
            Some(Mark::Event {
                name: "resync",
                body,
            }) => Some(String::from_utf8_lossy(body).into_owned()),
            _ => None,
        })
        .collect();
    assert!(
        resyncs
            .iter()
            .any(|b| b.contains("\"reason\":\"cache-full\"")),
        "{resyncs:?}"
    );
    // Once durable and flushed, the regions are clean again.
    s.path.maintain_now().expect("maintenance");
    assert_eq!(s.path.stats("vol").expect("stats").dirty_regions, 0);
}

#[test]
fn adaptive_goes_async_while_the_journal_is_slow_and_back_once_it_recovers() {
    let s = setup(
        IoMode::Adaptive,
        4 << 20,
        adaptive_options(Duration::from_secs(1)),
    );
    let mut rng = rng(3);
    assert_eq!(
        s.path.mode("vol").expect("mode"),
        (IoMode::Adaptive, IoMode::Sync)
    );

    s.faults.set_write_delay(SLOW);
    let mut went_async = false;
    for _ in 0..40 {
        let (offset, data) = random_write(&mut rng);
        if s.path
            .write("vol", offset, &data, false)
            .expect("write")
            .mode
            == IoMode::Async
        {
            went_async = true;
            break;
        }
    }
    assert!(
        went_async,
        "a slow journal did not switch adaptive to async"
    );

    // The journal recovers; writes keep coming. Hysteresis: no switch back
    // before the dwell time, then one switch back (within a generous
    // bound, for a loaded machine), then no more while writes go on.
    s.faults.set_write_delay(Duration::ZERO);
    let started = std::time::Instant::now();
    let mut back_at = None;
    while back_at.is_none_or(|t: std::time::Instant| t.elapsed() < Duration::from_millis(300)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never went back to sync"
        );
        let (offset, data) = random_write(&mut rng);
        let ack = s.path.write("vol", offset, &data, false).expect("write");
        // Half the dwell time: the switch was a moment before `started`.
        if started.elapsed() < Duration::from_millis(500) {
            assert_eq!(
                ack.mode,
                IoMode::Async,
                "switched back before the dwell time"
            );
        }
        if back_at.is_none() && ack.mode == IoMode::Sync {
            back_at = Some(std::time::Instant::now());
        }
        s.path.maintain_now().expect("probe");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        s.path.mode("vol").expect("mode").1,
        IoMode::Sync,
        "went async again"
    );
    let stats = s.path.stats("vol").expect("stats");
    assert_eq!(stats.mode_switches, 2, "flapped: {stats:?}");
    let volume = s.path.journal().volume("vol").expect("volume").id;
    s.path.journal().sync().expect("sync");
    let switches = s
        .path
        .journal()
        .events(volume, 0, u64::MAX)
        .expect("events")
        .iter()
        .filter(|e| {
            matches!(
                Mark::decode(&e.body),
                Some(Mark::Event {
                    name: "io-mode",
                    ..
                })
            )
        })
        .count();
    assert_eq!(switches, 2, "each switch is a timeline event");
    s.path.maintain_now().expect("maintenance");
    assert_production_equals_journal(&s.path);
}

#[test]
fn sync_writes_fail_cleanly_while_the_journal_disk_is_full_and_recover() {
    let options = WritePathOptions {
        sync_timeout: Duration::from_secs(2),
        ..small_regions()
    };
    let s = setup(IoMode::Sync, 1 << 20, options);
    let mut rng = rng(4);
    let (offset, data) = random_write(&mut rng);
    s.path.write("vol", offset, &data, false).expect("write");

    s.faults.fail_writes(ENOSPC);
    let (offset, data) = random_write(&mut rng);
    match s.path.write("vol", offset, &data, false) {
        Err(e @ Error::NotDurable { .. }) => assert!(e.to_string().contains("stalled"), "{e}"),
        other => panic!("a sync write on a full disk gave {other:?}"),
    }
    s.faults.fail_writes(0);
    let (offset, data) = random_write(&mut rng);
    s.path
        .write("vol", offset, &data, true)
        .expect("writes work once space returns");
    s.path.flush("vol").expect("flush");
    s.path.maintain_now().expect("maintenance");
    assert_production_equals_journal(&s.path);
}

#[test]
fn modes_change_while_running_and_bad_requests_are_refused() {
    let s = setup(IoMode::Sync, 1 << 20, small_regions());
    s.path.set_mode("vol", IoMode::Async).expect("set mode");
    assert_eq!(
        s.path.write("vol", 0, b"abc", false).expect("write").mode,
        IoMode::Async
    );
    s.path.set_mode("vol", IoMode::Sync).expect("set mode");
    assert_eq!(
        s.path.write("vol", 0, b"abd", false).expect("write").mode,
        IoMode::Sync
    );
    assert!(matches!(
        s.path.write("vol", SIZE - 1, b"ab", false),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        s.path.write("nope", 0, b"ab", false),
        Err(Error::UnknownVolume(_))
    ));
    assert!(matches!(
        s.path.write_zeroes("vol", 0, 0, false),
        Err(Error::OutOfBounds { .. })
    ));
    s.path.maintain_now().expect("maintenance");
    assert_production_equals_journal(&s.path);
}

#[test]
fn regions_stay_dirty_until_their_records_are_durable() {
    let s = setup(IoMode::Async, 8 << 20, small_regions());
    let mut rng = rng(6);
    s.faults.set_write_delay(Duration::from_millis(400));
    for _ in 0..5 {
        let (offset, data) = random_write(&mut rng);
        assert!(s
            .path
            .write("vol", offset, &data, false)
            .expect("write")
            .seq
            .is_some());
    }
    // The records are still on their way: cleaning must keep the regions.
    s.path.maintain_now().expect("maintenance");
    assert!(s.path.stats("vol").expect("stats").dirty_regions > 0);
    s.faults.set_write_delay(Duration::ZERO);
    s.path.journal().sync().expect("sync");
    s.path.maintain_now().expect("maintenance");
    assert_eq!(s.path.stats("vol").expect("stats").dirty_regions, 0);
    assert_production_equals_journal(&s.path);
}

/// A production volume that takes a random while to write, so concurrent
/// writes overtake each other on their way to it.
#[derive(Debug)]
struct Jittery(FileDevice, std::sync::atomic::AtomicU64);

impl BlockDevice for Jittery {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let n = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros((n * 7919) % 1500));
        self.0.write_at(data, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.zero(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn concurrent_overlapping_writes_reach_journal_and_production_in_the_same_order() {
    for mode in [IoMode::Sync, IoMode::Async] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(
            &dir.path().join("journal"),
            small_options(
                Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
                RecoveryMode::Strict,
            ),
        )
        .expect("open");
        journal.create_volume("vol", SIZE).expect("volume");
        let path = WritePath::new(journal, small_regions()).expect("write path");
        let device = FileDevice::open(&dir.path().join("production.img"), SIZE).expect("device");
        path.attach("vol", Arc::new(Jittery(device, Default::default())), mode)
            .expect("attach");
        let s = Setup {
            _dir: dir,
            faults: Arc::new(FaultyIo::new()),
            path,
        };
        // Rounds in which every thread writes the same range at once (the
        // slow device lets them overtake each other); after each round the
        // production volume must equal the journal's newest point.
        let threads = 4;
        let barrier = std::sync::Barrier::new(threads);
        let diverged = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for t in 0..threads as u64 {
                let path = &s.path;
                let barrier = &barrier;
                let diverged = &diverged;
                scope.spawn(move || {
                    let mut rng = rng(100 + t);
                    for round in 0..25 {
                        barrier.wait();
                        let len = rng.random_range(4096..=12_000u64);
                        let data = payload(&mut rng, len as usize);
                        path.write("vol", 1000, &data, false).expect("write");
                        barrier.wait();
                        if t == 0
                            && diverged.lock().expect("lock").is_none()
                            && !production_equals_journal(path)
                        {
                            *diverged.lock().expect("lock") = Some(round);
                        }
                        barrier.wait();
                    }
                });
            }
        });
        if let Some(round) = *diverged.lock().expect("lock") {
            panic!("{mode}: production and journal diverged after round {round}");
        }
        s.path.maintain_now().expect("maintenance");
        assert_production_equals_journal(&s.path);
    }
}

/// A tag placed in async (or adaptive, gone async) mode while the cache
/// overflows is a point after every write acknowledged before it: writes
/// the cache had no room for are resynced before the flush and the tag.
#[test]
fn a_tag_in_async_mode_holds_every_write_acknowledged_before_it() {
    for mode in [IoMode::Async, IoMode::Adaptive] {
        let s = setup(mode, 64 << 10, small_regions());
        let mut rng = rng(11);
        s.faults.set_write_delay(Duration::from_millis(20));
        let mut model = vec![0u8; SIZE as usize];
        let mut unjournalled = 0;
        for _ in 0..80 {
            let (offset, data) = random_write(&mut rng);
            let ack = s.path.write("vol", offset, &data, false).expect("write");
            unjournalled += u32::from(ack.seq.is_none());
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        assert!(unjournalled > 0, "{mode}: the cache never overflowed");
        // What the daemon does to set a tag: a flush, then the tag's mark.
        s.path.flush("vol").expect("flush");
        let journal = s.path.journal();
        let volume = journal.volume("vol").expect("volume").id;
        let tag = journal
            .set_tag(volume, "t", b"")
            .expect("tag")
            .wait()
            .expect("durable");
        s.faults.set_write_delay(Duration::ZERO);
        let mut at_tag = vec![0u8; SIZE as usize];
        journal
            .read("vol", 0, &mut at_tag, Point::Seq(tag.seq))
            .expect("read at the tag");
        if let Some(at) = at_tag.iter().zip(&model).position(|(a, b)| a != b) {
            panic!("{mode}: the tag at seq {} lacks an acknowledged write (first difference at byte {at})", tag.seq);
        }
    }
}

/// A production volume that fails writes on command, after writing the
/// first half of them.
#[derive(Debug)]
struct FailingDevice {
    inner: FileDevice,
    fail: std::sync::atomic::AtomicBool,
}

impl BlockDevice for FailingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn path(&self) -> &std::path::Path {
        self.inner.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            self.inner.write_at(&data[..data.len() / 2], offset)?;
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.inner.write_at(data, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.zero(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A sync volume whose production device fails writes while told to; the
/// directory must outlive the write path.
fn sync_volume_on_a_failing_device() -> (tempfile::TempDir, WritePath, Arc<FailingDevice>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = Journal::open(
        &dir.path().join("journal"),
        small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        ),
    )
    .expect("open");
    journal.create_volume("vol", SIZE).expect("volume");
    let path = WritePath::new(journal, small_regions()).expect("write path");
    let device = Arc::new(FailingDevice {
        inner: FileDevice::open(&dir.path().join("production.img"), SIZE).expect("device"),
        fail: false.into(),
    });
    path.attach("vol", device.clone(), IoMode::Sync)
        .expect("attach");
    (dir, path, device)
}

/// A sync write is journalled before the production volume is written; if
/// that write then fails, the journal must agree with the volume again at
/// once, not at some later background round.
#[test]
fn a_sync_write_the_production_volume_refuses_is_resynced_at_once() {
    let (_dir, path, device) = sync_volume_on_a_failing_device();
    let mut rng = rng(4);
    let (offset, data) = random_write(&mut rng);
    path.write("vol", offset, &data, false).expect("write");

    device.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let data = payload(&mut rng, 64 << 10);
    let err = path
        .write("vol", 100_000, &data, false)
        .expect_err("the production volume failed the write");
    assert!(err.to_string().contains("production"), "{err}");
    device
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // No background round has run (the interval is an hour).
    assert_production_equals_journal(&path);
    let volume = path.journal().volume("vol").expect("volume").id;
    let events = path.journal().events(volume, 0, u64::MAX).expect("events");
    assert!(
        events.iter().any(|e| matches!(
            Mark::decode(&e.body),
            Some(Mark::Event { name: "resync", .. })
        )),
        "the resync is on the timeline"
    );
}

/// A dirty map that cannot be read counts as all dirty: attaching resyncs
/// every region (async: the production volume may hold what the journal
/// lacks) or rolls every region forward (sync: the journal holds all that
/// was acknowledged, and flushes did not fsync the production volume), and
/// says why on the timeline.
#[test]
fn an_unreadable_dirty_map_resyncs_or_rolls_forward_everything_and_says_so() {
    for (mode, event) in [(IoMode::Async, "resync"), (IoMode::Sync, "roll-forward")] {
        unreadable_dirty_map(mode, event);
    }
}

fn unreadable_dirty_map(mode: IoMode, event: &str) {
    use tidemark_journal::fs::{FaultyFs, FsOp, RealFs};
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FaultyFs::new(Arc::new(RealFs));
    let options = || JournalOptions {
        fs: fs.clone(),
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    };
    let production = dir.path().join("production.img");
    {
        let (journal, _) = Journal::open(&dir.path().join("journal"), options()).expect("open");
        journal.create_volume("vol", SIZE).expect("volume");
        let path = WritePath::new(journal, small_regions()).expect("write path");
        let device = Arc::new(FileDevice::open(&production, SIZE).expect("device"));
        path.attach("vol", device, mode).expect("attach");
        path.write("vol", 0, &[9u8; 4096], false).expect("write");
        path.close().expect("close");
    }
    fs.fail(FsOp::Read, ".map", 5);
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).expect("reopen");
    let path = WritePath::new(journal, small_regions()).expect("write path");
    let device = Arc::new(FileDevice::open(&production, SIZE).expect("device"));
    let report = path.attach("vol", device, mode).expect("attach");
    let regions = match mode {
        IoMode::Sync => report.rolled_forward.len(),
        _ => report.regions.len(),
    };
    assert_eq!(regions as u64, SIZE / (256 << 10), "{mode}: {report:?}");
    let volume = path.journal().volume("vol").expect("volume").id;
    let events = path.journal().events(volume, 0, u64::MAX).expect("events");
    assert!(
        events.iter().any(|e| matches!(
            Mark::decode(&e.body),
            Some(Mark::Event { name, body }) if name == event && String::from_utf8_lossy(body).contains("dirty-map-lost")
        )),
        "{mode}: the {event} names the lost map"
    );
    assert_production_equals_journal(&path);
}

/// Closing while the journal's disk is full ends within a bounded time and
/// says what is not durable; the dirty map still marks it, so the next open
/// (with space again) resyncs it.
#[test]
fn close_on_a_full_disk_ends_in_bounded_time_and_the_next_open_resyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let options = || JournalOptions {
        io_hooks: faults.clone(),
        memory_cache_bytes: 64 << 10,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    };
    let production = dir.path().join("production.img");
    let path_options = WritePathOptions {
        sync_timeout: Duration::from_millis(500),
        ..small_regions()
    };
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).expect("open");
    journal.create_volume("vol", SIZE).expect("volume");
    let path = WritePath::new(journal, path_options).expect("write path");
    let device = Arc::new(FileDevice::open(&production, SIZE).expect("device"));
    path.attach("vol", device, IoMode::Async).expect("attach");
    faults.fail_writes(ENOSPC);
    let mut rng = rng(12);
    for _ in 0..40 {
        let (offset, data) = random_write(&mut rng);
        path.write("vol", offset, &data, false)
            .expect("async writes are acknowledged");
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = std::thread::spawn(move || {
        let outcome = path.close();
        let _ = done_tx.send(outcome.map_err(|e| e.to_string()));
        path
    });
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("close did not end within 20 s on a full disk");
    let err = outcome.expect_err("close reports that not everything is durable");
    assert!(
        err.contains("not durable") || err.contains("failed"),
        "{err}"
    );
    drop(closer.join().expect("closer"));

    faults.fail_writes(0);
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).expect("reopen");
    let path = WritePath::new(journal, small_regions()).expect("write path");
    let device = Arc::new(FileDevice::open(&production, SIZE).expect("device"));
    let report = path.attach("vol", device, IoMode::Async).expect("attach");
    assert!(
        !report.regions.is_empty(),
        "the marked regions are resynced"
    );
    assert_production_equals_journal(&path);
}

/// Incompressible data, so each record takes its full size in a segment.
fn random_bytes(rng: &mut rand::rngs::SmallRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

/// Async writes whose records the journal fails after they were
/// acknowledged (here: no room for the next segment) are not forgotten:
/// records after them becoming durable does not let the dirty map clear
/// their regions; the next round resyncs them instead.
#[test]
fn async_records_the_journal_failed_are_resynced_not_cleaned_away() {
    let s = setup(IoMode::Async, 8 << 20, small_regions());
    let mut rng = rng(13);
    // The first segment takes a few of these; the batches after it fail.
    s.faults.fail_creates(ENOSPC);
    for i in 0..32u64 {
        let data = random_bytes(&mut rng, 32 << 10);
        let ack = s
            .path
            .write("vol", i * (32 << 10), &data, false)
            .expect("async writes are acknowledged");
        assert!(ack.seq.is_some(), "the cache has room for every record");
    }
    s.path.journal().sync().expect("sync");
    // Space again: a later record is durable, past the failed ones.
    s.faults.fail_creates(0);
    let data = random_bytes(&mut rng, 4096);
    s.path
        .write("vol", SIZE - 4096, &data, false)
        .expect("write");
    s.path.journal().sync().expect("sync");
    s.path.maintain_now().expect("maintenance");
    assert_production_equals_journal(&s.path);
    s.path.close().expect("everything is journalled now");
}

/// A resync whose records the journal fails (the maintenance round on a
/// full disk) leaves its regions waiting for the next resync: a close
/// afterwards, on the still full disk, does not claim them durable but
/// names them, and the next open (with space) resyncs them.
#[test]
fn a_failed_resync_leaves_its_regions_unjournalled_and_close_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let options = || JournalOptions {
        io_hooks: faults.clone(),
        memory_cache_bytes: 64 << 10,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    };
    let production = dir.path().join("production.img");
    let path_options = WritePathOptions {
        sync_timeout: Duration::from_secs(2),
        ..small_regions()
    };
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).expect("open");
    journal.create_volume("vol", SIZE).expect("volume");
    let path = WritePath::new(journal, path_options).expect("write path");
    let device = Arc::new(FileDevice::open(&production, SIZE).expect("device"));
    path.attach("vol", device, IoMode::Async).expect("attach");
    // No room for a second segment, and a journal too slow for the
    // writes: most of them are left to a resync.
    faults.fail_creates(ENOSPC);
    faults.set_write_delay(Duration::from_millis(100));
    let mut rng = rng(14);
    let mut unjournalled = 0;
    for i in 0..24u64 {
        let data = random_bytes(&mut rng, 32 << 10);
        let ack = path
            .write("vol", i * (64 << 10), &data, false)
            .expect("async writes are acknowledged");
        unjournalled += u64::from(ack.seq.is_none());
    }
    assert!(unjournalled >= 16, "{unjournalled} writes left to a resync");
    faults.set_write_delay(Duration::ZERO);
    path.journal().sync().expect("sync");
    // The resync does not fit the first segment.
    let err = path
        .maintain_now()
        .expect_err("a resync on a full disk fails");
    assert!(err.is_disk_full(), "{err}");

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = std::thread::spawn(move || {
        let outcome = path.close();
        let _ = done_tx.send(outcome.map_err(|e| e.to_string()));
        path
    });
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("close did not end within 30 s on a full disk");
    let err = outcome.expect_err("close must not claim the failed resync's regions durable");
    assert!(err.contains("not durable") && err.contains("vol"), "{err}");
    drop(closer.join().expect("closer"));

    faults.fail_creates(0);
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).expect("reopen");
    let path = WritePath::new(journal, small_regions()).expect("write path");
    let device = Arc::new(FileDevice::open(&production, SIZE).expect("device"));
    let report = path.attach("vol", device, IoMode::Async).expect("attach");
    assert!(
        !report.regions.is_empty(),
        "the marked regions are resynced"
    );
    assert_production_equals_journal(&path);
}

/// Polls `future` to completion on this thread (the journal answers from
/// its own threads, so a waker is not needed: look again shortly).
fn poll_until_ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A sync write begun without blocking (what the NBD server does on its
/// event loop) is acknowledged exactly like a blocking one: durable and
/// readable at its seq; one that cannot start at once is left to the
/// blocking path untouched; a timed-out wait leaves its region to a
/// resync; a failed production write is made to agree again.
#[test]
fn sync_writes_begun_without_blocking_settle_like_blocking_ones() {
    let s = setup(IoMode::Sync, 1 << 20, small_regions());
    let mut rng = rng(9);
    let data = bytes::Bytes::from(payload(&mut rng, 8192));
    assert!(
        s.path.try_begin_sync("vol", 0, &data).is_none(),
        "a region not yet marked dirty needs an fsync: not without blocking"
    );
    s.path.write("vol", 0, &data, false).expect("write");
    let newest = s.path.journal().history().newest_seq;

    let data = bytes::Bytes::from(payload(&mut rng, 8192));
    let mut write = s
        .path
        .try_begin_sync("vol", 4096, &data)
        .expect("a marked, free region")
        .expect("begun");
    assert!(!write.blocks());
    assert!(write.time_left() > Duration::ZERO);
    let durable = poll_until_ready(write.durable());
    let ack = write.settle(Some(durable)).expect("acknowledged");
    assert_eq!(ack.mode, IoMode::Sync);
    let seq = ack.seq.expect("a record");
    assert!(seq > newest && s.path.journal().history().newest_seq >= seq);
    let mut at_seq = vec![0u8; data.len()];
    s.path
        .journal()
        .read("vol", 4096, &mut at_seq, Point::Seq(seq))
        .expect("read");
    assert!(at_seq == data[..], "the write is in the journal at its seq");

    // Given up on: the error says so and the region waits for a resync.
    let data = bytes::Bytes::from(payload(&mut rng, 4096));
    let write = s
        .path
        .try_begin_sync("vol", 16384, &data)
        .expect("begun")
        .expect("begun");
    let err = write.settle(None).expect_err("not durable in time");
    assert!(matches!(err, Error::NotDurable { .. }), "{err}");

    let data = bytes::Bytes::from(payload(&mut rng, 4096));
    let write = s
        .path
        .try_begin_sync("vol", 20480, &data)
        .expect("begun")
        .expect("begun");
    write.wait().expect("blocking wait");
    s.path.flush("vol").expect("flush");
    assert_production_equals_journal(&s.path);
    assert_eq!(s.path.stats("vol").expect("stats").sync_writes, 3);

    s.path.set_mode("vol", IoMode::Async).expect("mode");
    assert!(
        s.path.try_begin_sync("vol", 0, &data).is_none(),
        "async writes go through try_write"
    );
}

/// A replica gate that says whether sync writes must wait for it, and
/// counts how often they did.
#[derive(Debug, Default)]
struct CountingGate {
    must_wait: std::sync::atomic::AtomicBool,
    waited: std::sync::atomic::AtomicUsize,
}

impl CountingGate {
    fn waited(&self) -> usize {
        self.waited.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl tidemark_journal::ReplicaGate for CountingGate {
    fn wait_replicated(&self, _seq: u64, _deadline: std::time::Instant) -> Result<(), Error> {
        self.waited
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn must_wait(&self) -> bool {
        self.must_wait.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A group with a replica gate but no replica in sync mode settles sync
/// writes begun without blocking on the event loop (they hold no thread);
/// one whose replica is sync leaves them to the blocking path, and waits.
#[test]
fn sync_writes_wait_for_a_replica_only_while_one_is_sync() {
    let s = setup(IoMode::Sync, 1 << 20, small_regions());
    let gate = Arc::new(CountingGate::default());
    s.path.set_replica_gate(Some(gate.clone()));
    let mut rng = rng(12);
    let data = bytes::Bytes::from(payload(&mut rng, 4096));
    s.path.write("vol", 0, &data, false).expect("write");
    assert_eq!(gate.waited(), 1);

    let mut write = s
        .path
        .try_begin_sync("vol", 4096, &data)
        .expect("a marked, free region")
        .expect("begun");
    assert!(!write.blocks(), "no replica holds it back");
    let durable = poll_until_ready(write.durable());
    write.settle(Some(durable)).expect("acknowledged");
    assert_eq!(gate.waited(), 1);

    // A replica that turns sync while the record is on its way (it caught
    // up with the durable seq, which the record had not reached): once the
    // record is durable the write asks again, and waits for it.
    let mut write = s
        .path
        .try_begin_sync("vol", 12288, &data)
        .expect("a marked, free region")
        .expect("begun");
    assert!(!write.blocks());
    gate.must_wait
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let durable = poll_until_ready(write.durable());
    assert!(write.waits_for_replica(), "asked again once durable");
    write.settle(Some(durable)).expect("acknowledged");
    assert_eq!(gate.waited(), 2);

    let write = s
        .path
        .try_begin_sync("vol", 8192, &data)
        .expect("a marked, free region")
        .expect("begun");
    assert!(write.blocks(), "a sync replica: finishing may block");
    write.wait().expect("acknowledged");
    assert_eq!(gate.waited(), 3);
}

/// A flush of an async volume whose group has a replica in sync mode
/// waits for the replica (what the flush acknowledged is on both sites);
/// without one it does not.
#[test]
fn an_async_volume_flush_waits_for_a_sync_replica() {
    let s = setup(IoMode::Async, 1 << 20, small_regions());
    let gate = Arc::new(CountingGate::default());
    s.path.set_replica_gate(Some(gate.clone()));
    let mut rng = rng(13);
    s.path
        .write("vol", 0, &payload(&mut rng, 4096), false)
        .expect("write");
    s.path.flush("vol").expect("flush");
    assert_eq!(gate.waited(), 0, "no replica in sync mode: no wait");
    gate.must_wait
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.path
        .write("vol", 4096, &payload(&mut rng, 4096), false)
        .expect("write");
    let seq = s.path.flush("vol").expect("flush").expect("a flush point");
    assert_eq!(gate.waited(), 1, "the flush waited for the replica");
    assert!(s.path.journal().history().newest_seq >= seq);
}

#[test]
fn a_sync_write_begun_without_blocking_that_production_refuses_is_resynced() {
    let (_dir, path, device) = sync_volume_on_a_failing_device();
    let mut rng = rng(10);
    path.write("vol", 0, &payload(&mut rng, 4096), false)
        .expect("write");
    device.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let data = bytes::Bytes::from(payload(&mut rng, 8192));
    let write = path
        .try_begin_sync("vol", 4096, &data)
        .expect("begun")
        .expect("the record was appended");
    assert!(write.blocks(), "a resync must follow: not on an event loop");
    let err = write.wait().expect_err("the production volume failed");
    assert!(err.to_string().contains("production"), "{err}");
    device
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_production_equals_journal(&path);
}

/// A client's flush of a sync volume does not wait for a journal commit of
/// its own: every write it acknowledged is durable already. Switching a
/// volume to sync makes what it acknowledged in async mode durable first.
#[test]
fn a_clients_flush_waits_only_for_what_was_acknowledged() {
    let s = setup(IoMode::Sync, 1 << 20, small_regions());
    let journal = s.path.journal();
    let ack = s.path.write("vol", 0, &[1u8; 8192], false).expect("write");
    let written = ack.seq.expect("a sync write has a record");
    assert!(
        journal.history().newest_seq >= written,
        "acknowledged: durable"
    );
    // Every commit from now takes two seconds.
    s.faults.set_sync_delay(Duration::from_secs(2));
    let point = s
        .path
        .flush_acknowledged("vol")
        .expect("flush")
        .expect("a flush point");
    assert!(point > written);
    assert!(
        journal.history().newest_seq < point,
        "the client's flush waited for its flush record's commit"
    );
    // The waiting flush, as a tag uses it, returns with its point durable.
    let point = s.path.flush("vol").expect("flush").expect("a flush point");
    assert!(journal.history().newest_seq >= point);

    // An async write whose record is not durable yet: the switch to sync
    // waits for it.
    s.path.set_mode("vol", IoMode::Async).expect("async");
    let ack = s
        .path
        .write("vol", 65536, &[2u8; 4096], false)
        .expect("write");
    let pending = ack.seq.expect("journalled in the background");
    assert!(journal.history().newest_seq < pending, "still on its way");
    s.path.set_mode("vol", IoMode::Sync).expect("sync");
    assert!(
        journal.history().newest_seq >= pending,
        "switching to sync makes every write acknowledged before it durable in the journal"
    );
    s.faults.set_sync_delay(Duration::ZERO);
}

/// A flush that needs no fsync and no wait runs without blocking; one
/// that needs either is left to a thread that may block.
#[test]
fn a_flush_runs_in_place_only_where_it_cannot_block() {
    let s = setup(IoMode::Sync, 1 << 20, small_regions());
    s.path.write("vol", 0, &[1u8; 8192], false).expect("write");
    let point = s
        .path
        .try_flush("vol")
        .expect("sync, journal-led: nothing to block on")
        .expect("flush");
    assert!(point.is_some());
    s.path.set_mode("vol", IoMode::Async).expect("async");
    assert!(
        s.path.try_flush("vol").is_none(),
        "async: the production volume needs an fsync"
    );
    s.path
        .write("vol", 65536, &[2u8; 4096], false)
        .expect("write");
    s.path.set_mode("vol", IoMode::Sync).expect("sync");
    assert!(
        s.path.try_flush("vol").is_none(),
        "an async write made its region production-led: the flush must fsync"
    );
    s.path.flush("vol").expect("flush where blocking is fine");
}

/// Every switch the adaptive controller makes is on the timeline — also
/// one an event loop's write finds first and then hands on to a thread
/// (`try_write` finding the volume back in sync mode).
#[test]
fn an_adaptive_switch_a_try_path_finds_first_is_recorded() {
    let s = setup(
        IoMode::Adaptive,
        4 << 20,
        adaptive_options(Duration::from_secs(4)),
    );
    let mut rng = rng(9);
    s.faults.set_write_delay(SLOW);
    let (offset, data) = random_write(&mut rng);
    s.path.write("vol", offset, &data, false).expect("write");
    assert_eq!(s.path.mode("vol").expect("mode").1, IoMode::Async);
    assert_eq!(s.path.stats("vol").expect("stats").mode_switches, 1);
    // The journal recovers; the probes see it, within the dwell time.
    s.faults.set_write_delay(Duration::ZERO);
    let started = std::time::Instant::now();
    for _ in 0..30 {
        s.path.maintain_now().expect("maintenance");
    }
    // (Well inside the dwell time, or the switch back would be theirs.)
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the probes took {:?}",
        started.elapsed()
    );
    assert_eq!(s.path.stats("vol").expect("stats").mode_switches, 1);
    std::thread::sleep(Duration::from_secs(4).saturating_sub(started.elapsed()));
    let (offset, data) = random_write(&mut rng);
    assert!(
        s.path.try_write("vol", offset, &data).is_none(),
        "back in sync mode: the event loop hands the write on"
    );
    assert_eq!(
        s.path.stats("vol").expect("stats").mode_switches,
        2,
        "the switch back to sync was lost"
    );
}
