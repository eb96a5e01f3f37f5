//! A slow, full or broken disk under the journal: the memory cache pushes
//! back, a full disk stalls writes until space returns, a failed fsync stops
//! appends until a reopen, and nothing acknowledged is ever lost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use tidemark_journal::io_hooks::FaultyIo;
use tidemark_journal::{
    Admission, Change, Error, Journal, JournalOptions, ManualClock, RecoveryMode, Timestamp,
};

const START: i64 = 1_800_000_000_000_000_000;
const ENOSPC: i32 = 28;
const EIO: i32 = 5;

/// Opens the journal again after the faults, with no faults.
fn reopen(dir: &std::path::Path) -> (Journal, tidemark_journal::RecoveryReport) {
    open(
        dir,
        &Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
        RecoveryMode::Strict,
    )
}

fn faulty_options(faults: &Arc<FaultyIo>, cache: u64) -> JournalOptions {
    JournalOptions {
        io_hooks: faults.clone(),
        memory_cache_bytes: cache,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    }
}

#[test]
fn a_slow_journal_fills_the_memory_cache_and_appenders_wait_or_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 64 << 10)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    faults.set_write_delay(Duration::from_millis(300));
    // Random bytes: lz4 cannot shrink them, so each record costs 24 KiB.
    let mut data = vec![0u8; 24 << 10];
    rng(1).fill(&mut data[..]);

    // Fill the cache: records stay charged until durable, and the disk is slow.
    let mut held = Vec::new();
    let refused = loop {
        match journal.append_with(
            volume,
            Change::Write {
                offset: 0,
                data: &data,
            },
            Admission::NoWait,
        ) {
            Ok(handle) => held.push(handle),
            Err(e) => break e,
        }
        assert!(
            held.len() < 10,
            "a 64 KiB cache took {} records of 24 KiB",
            held.len()
        );
    };
    match &refused {
        Error::CacheFull { volume, limit, .. } => {
            assert_eq!(volume, "vol0");
            assert_eq!(*limit, 64 << 10);
        }
        other => panic!("expected CacheFull, got {other}"),
    }
    assert!(journal.memory_cache().used_bytes <= 64 << 10);

    // A bounded wait that the slow disk cannot satisfy fails clearly.
    let started = Instant::now();
    let timed_out = journal.append_with(
        volume,
        Change::Write {
            offset: 0,
            data: &data,
        },
        Admission::WaitFor(Duration::from_millis(50)),
    );
    assert!(
        matches!(timed_out, Err(Error::CacheFull { .. })),
        "{timed_out:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(50));

    // An unbounded wait succeeds once the journal catches up.
    faults.set_write_delay(Duration::ZERO);
    let waited = journal
        .append(
            volume,
            Change::Write {
                offset: 0,
                data: &data,
            },
        )
        .expect("append waits for room");
    for handle in held {
        handle.wait().expect("durable");
    }
    waited.wait().expect("durable");
    let stats = journal.memory_cache();
    assert_eq!(stats.used_bytes, 0, "every charge is released once durable");
    assert!(stats.refusals >= 2 && stats.waits >= 1, "{stats:?}");
}

#[test]
fn a_full_disk_stalls_appends_until_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    let mut rng = rng(5);
    let mut model = Model::with_volume(volume, 1 << 20);
    apply(
        &journal,
        &mut model,
        vec![(
            volume,
            Op::Write {
                offset: 0,
                data: payload(&mut rng, 5000),
            },
        )],
    );

    faults.fail_writes(ENOSPC);
    let data = payload(&mut rng, 9000);
    let stalled = journal
        .append(
            volume,
            Change::Write {
                offset: 4096,
                data: &data,
            },
        )
        .expect("append is accepted");
    let seq = stalled.seq();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        journal.history().newest_seq,
        seq - 1,
        "nothing becomes durable on a full disk"
    );
    let attempts = faults.writes();
    assert!(attempts >= 3, "the writer retries ({attempts} attempts)");

    faults.fail_writes(0);
    let done = stalled.wait().expect("durable once space returns");
    assert_eq!(done.seq, seq);
    model
        .records
        .insert(seq, (volume, Op::Write { offset: 4096, data }, done.time));
    check_reads(&journal, &model, &mut rng, 10);
    journal.close().expect("close");

    let (journal, report) = reopen(dir.path());
    assert_eq!(report.newest_seq, seq);
    assert!(report.torn_tail.is_none(), "{report:?}");
    check_reads(&journal, &model, &mut rng, 10);
}

#[test]
fn a_full_disk_when_a_segment_is_made_fails_appends_cleanly_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    let mut rng = rng(9);
    let mut model = Model::with_volume(volume, 1 << 20);
    // No segment can be made: once the current one (and the spare made at
    // start) fill up, appends fail, cleanly.
    faults.fail_creates(ENOSPC);
    let mut failed = None;
    for i in 0..400u64 {
        let data = payload(&mut rng, 20_000);
        let offset = (i * 20_000) % ((1 << 20) - 20_000);
        let result = journal
            .append(
                volume,
                Change::Write {
                    offset,
                    data: &data,
                },
            )
            .and_then(|h| h.wait());
        match result {
            Ok(done) => {
                model
                    .records
                    .insert(done.seq, (volume, Op::Write { offset, data }, done.time));
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let failed = failed.expect("appends fail once no segment can be made");
    assert!(failed.is_disk_full(), "{failed}");
    check_reads(&journal, &model, &mut rng, 10);

    faults.fail_creates(0);
    // Appends work again once space returns.
    let data = payload(&mut rng, 20_000);
    apply(
        &journal,
        &mut model,
        vec![(volume, Op::Write { offset: 0, data })],
    );
    journal.close().expect("close");
    let (journal, _) = reopen(dir.path());
    check_reads(&journal, &model, &mut rng, 10);
}

#[test]
fn a_failed_fsync_stops_appends_until_reopen_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    let mut rng = rng(13);
    let mut model = Model::with_volume(volume, 1 << 20);
    for _ in 0..5 {
        let op = random_op(&mut rng, 1 << 20, 16_000);
        if matches!(op, Op::TagDelete(_)) {
            continue;
        }
        apply(&journal, &mut model, vec![(volume, op)]);
    }
    faults.fail_syncs(EIO);
    let data = payload(&mut rng, 3000);
    let lost = journal
        .append(
            volume,
            Change::Write {
                offset: 0,
                data: &data,
            },
        )
        .and_then(|h| h.wait());
    assert!(lost.is_err(), "a write whose fsync failed was acknowledged");
    faults.fail_syncs(0);
    let refused = journal
        .append(
            volume,
            Change::Write {
                offset: 0,
                data: &data,
            },
        )
        .and_then(|h| h.wait());
    match refused {
        Err(Error::Poisoned { .. }) => {}
        other => panic!("appends after a failed fsync gave {other:?}"),
    }
    journal.close().expect("close");
    let (journal, report) = reopen(dir.path());
    assert!(report.newest_seq >= model.newest());
    // The unacknowledged write may or may not have reached the disk.
    let mut prefix = model.clone();
    if report.newest_seq > model.newest() {
        prefix.records.insert(
            report.newest_seq,
            (volume, Op::Write { offset: 0, data }, Timestamp::default()),
        );
    }
    check_reads(&journal, &prefix, &mut rng, 10);
}

#[test]
fn retention_never_removes_a_segment_whose_last_batches_are_still_syncing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 8 << 20)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    let mut rng = rng(17);
    let mut model = Model::with_volume(volume, 1 << 20);
    // Slow syncs: the writer moves on to new segments while the batches of
    // the old ones still wait to be durable (and catalogued).
    faults.set_sync_delay(Duration::from_millis(100));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Retention to the newest durable point, again and again, while
        // segments roll under it.
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                journal
                    .retain_from(journal.history().newest_seq, false)
                    .expect("retention");
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let mut pending = Vec::new();
        for i in 0..60u64 {
            let mut data = vec![0u8; 20_000];
            rand::RngCore::fill_bytes(&mut rng, &mut data);
            let offset = (i * 20_000) % ((1 << 20) - 20_000);
            let handle = journal
                .append(
                    volume,
                    Change::Write {
                        offset,
                        data: &data,
                    },
                )
                .expect("append");
            pending.push((handle, offset, data));
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        for (handle, offset, data) in pending {
            let appended = handle.wait().expect("durable");
            model.records.insert(
                appended.seq,
                (volume, Op::Write { offset, data }, appended.time),
            );
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    faults.set_sync_delay(Duration::ZERO);
    model.horizon = journal.history().horizon_seq;
    check_reads(&journal, &model, &mut rng, 20);
    journal.close().expect("close");
    let (journal, _) = reopen(dir.path());
    check_reads(&journal, &model, &mut rng, 20);
}

#[test]
fn holds_set_and_released_concurrently_are_neither_lost_nor_refused() {
    // Exports set and release holds from many threads at once; every
    // update must land (a lost hold lets retention fold a reader's point
    // away) and none may fail on another's temporary manifest file.
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let journal = journal.clone();
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let name = format!("export:{t}:{i}");
                    journal.set_hold(&name, i).expect("set hold");
                    if i % 2 == 0 {
                        journal.release_hold(&name).expect("release hold");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let holds = journal.holds();
    assert_eq!(holds.len(), 8 * 20, "holds lost: {holds:?}");
    assert!(holds.keys().all(|name| name
        .rsplit(':')
        .next()
        .and_then(|i| i.parse::<u64>().ok())
        .is_some_and(|i| i % 2 == 1)));
}

/// A batch whose index write fails is not published to readers: its
/// appenders hear a failure (never an acknowledgement that reads would
/// then miss), and after a reopen the batch, durable in its segment, reads
/// back.
#[test]
fn a_failed_index_write_is_never_acknowledged_as_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    let before = journal
        .append(
            volume,
            Change::Write {
                offset: 0,
                data: &[1u8; 4096],
            },
        )
        .and_then(|h| h.wait())
        .expect("durable");

    faults.fail_index_writes(EIO);
    let outcome = journal
        .append(
            volume,
            Change::Write {
                offset: 0,
                data: &[2u8; 4096],
            },
        )
        .and_then(|h| h.wait());
    let mut latest = vec![0u8; 4096];
    let read = journal.read("vol0", 0, &mut latest, tidemark_journal::Point::Latest);
    match &outcome {
        Ok(done) => assert!(
            latest == [2u8; 4096],
            "seq {} was acknowledged but @latest (seq {read:?}) does not hold it",
            done.seq
        ),
        Err(e) => {
            assert_eq!(journal.history().newest_seq, before.seq, "{e}");
            assert_eq!(latest, [1u8; 4096], "nothing half-published");
            assert!(
                journal
                    .append(
                        volume,
                        Change::Write {
                            offset: 0,
                            data: &[3u8; 4096]
                        }
                    )
                    .and_then(|h| h.wait())
                    .is_err(),
                "later batches may not be published past the missing one"
            );
        }
    }
    drop(journal);

    faults.fail_index_writes(0);
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("reopen");
    journal
        .read("vol0", 0, &mut latest, tidemark_journal::Point::Latest)
        .expect("read");
    assert_eq!(
        latest, [2u8; 4096],
        "the durable batch is indexed at the reopen"
    );
}

/// A short index failure is waited out: the appender is answered late, but
/// answered with success, and reads find its record.
#[test]
fn a_brief_index_failure_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    faults.fail_index_writes(EIO);
    let handle = journal
        .append(
            volume,
            Change::Write {
                offset: 8192,
                data: &[7u8; 4096],
            },
        )
        .expect("append");
    std::thread::sleep(Duration::from_millis(400));
    assert!(faults.index_writes() >= 2, "the index write is retried");
    faults.fail_index_writes(0);
    let done = handle
        .wait()
        .expect("durable and indexed once the index recovers");
    let mut buf = vec![0u8; 4096];
    let seq = journal
        .read("vol0", 8192, &mut buf, tidemark_journal::Point::Latest)
        .expect("read");
    assert_eq!((seq, buf), (done.seq, vec![7u8; 4096]));
}

/// A stage thread that dies (a panic is a bug, but it must not turn into
/// appenders waiting for ever, or into a journal that looks healthy) stops
/// the journal with an error that says so; a reopen recovers every
/// acknowledged record.
#[test]
fn a_writer_thread_that_dies_stops_the_journal_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let options = JournalOptions {
        // Every batch through the pipeline, so the sync stage is a thread
        // of its own.
        inline_batch_below: 0,
        ..faulty_options(&faults, 1 << 20)
    };
    let (journal, _) = Journal::open(dir.path(), options.clone()).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("volume").id;
    let write = |byte: u8| {
        journal
            .append(
                volume,
                Change::Write {
                    offset: 0,
                    data: &[byte; 4096],
                },
            )
            .and_then(|h| h.wait())
    };
    write(1).expect("durable");
    faults.panic_index_writes();
    // The batch whose index write panicked, and any the stages held, fail;
    // within a few appends the journal knows it has stopped.
    let mut outcomes = Vec::new();
    let stopped = (2..12u8).find_map(|byte| match write(byte) {
        Err(e @ Error::Poisoned { .. }) => Some(e),
        other => {
            outcomes.push(other);
            None
        }
    });
    let stopped = stopped.unwrap_or_else(|| panic!("never stopped: {outcomes:?}"));
    assert!(stopped.to_string().contains("thread stopped"), "{stopped}");
    assert!(outcomes.iter().all(|o| o.is_err()), "{outcomes:?}");
    assert!(
        matches!(write(99), Err(Error::Poisoned { .. })),
        "later appends are refused as a stopped journal"
    );
    journal.close().expect("close");

    let faults = Arc::new(FaultyIo::new());
    let (journal, _) = Journal::open(dir.path(), faulty_options(&faults, 1 << 20)).expect("reopen");
    let mut latest = vec![0u8; 4096];
    journal
        .read("vol0", 0, &mut latest, tidemark_journal::Point::Latest)
        .expect("read");
    assert!(latest[0] >= 1 && latest[0] < 12, "{}", latest[0]);
}
