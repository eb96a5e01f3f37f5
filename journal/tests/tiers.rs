//! The two tiers of the monitoring cache: records spill from memory to the
//! file cache above the high-water mark and come back once it drains, with
//! contents intact and order preserved; what waits in the file cache
//! survives a restart and is journalled before anything new.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark_journal::file_cache::{FileBudget, FileCache};
use tidemark_journal::fs::RealFs;
use tidemark_journal::io_hooks::{FaultyIo, RealIo};
use tidemark_journal::record::{decode_record, PreparedRecord, RecordKind};
use tidemark_journal::{
    CacheTiers, Change, Journal, JournalOptions, ManualClock, RecoveryMode, Timestamp,
};

const START: i64 = 1_800_000_000_000_000_000;
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

fn options(tiers: CacheTiers, faults: &Arc<FaultyIo>, memory: u64) -> JournalOptions {
    JournalOptions {
        cache_tiers: tiers,
        memory_cache_bytes: memory,
        file_cache_bytes: 2 << 20,
        spill_above: 0.5,
        return_below: 0.25,
        io_hooks: faults.clone(),
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    }
}

#[test]
fn the_ring_wraps_and_gives_back_exactly_what_the_journal_lacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let mut rng = rng(7);
    let (cache, pending) = FileCache::open(
        &RealFs,
        &path,
        1 << 20,
        42,
        0,
        &RealIo,
        FileBudget::new(64 << 20),
    )
    .expect("open");
    assert!(pending.is_empty());
    let mut live = std::collections::VecDeque::new();
    for seq in 1..=400u64 {
        let data = payload(&mut rng, 1000 + (seq as usize * 37) % 9000);
        let record = PreparedRecord::new(RecordKind::Write, 1, seq * 512, data.len() as u64, &data);
        let len = record.encoded_len();
        let entry = loop {
            match cache.append(seq, len, |buf| {
                record.encode_to(seq, Timestamp::from_nanos(seq as i64), buf);
            }) {
                Some(entry) => break entry,
                None => {
                    // Full: the journal takes the oldest half.
                    let (oldest, _) = live[live.len() / 2];
                    cache.release_through(oldest);
                    while live.front().is_some_and(|&(s, _)| s <= oldest) {
                        live.pop_front();
                    }
                }
            }
        };
        cache.sync_through(entry.write_no).expect("flush");
        live.push_back((seq, data));
    }
    assert!(cache.stats().flushes > 0);
    let journalled = live.front().map_or(0, |&(s, _)| s) + 3;
    drop(cache);

    let (cache, pending) = FileCache::open(
        &RealFs,
        &path,
        1 << 20,
        42,
        journalled,
        &RealIo,
        FileBudget::new(64 << 20),
    )
    .expect("reopen");
    let expected: Vec<_> = live.iter().filter(|(s, _)| *s > journalled).collect();
    assert_eq!(pending.len(), expected.len(), "entries the journal lacks");
    for (p, (seq, data)) in pending.iter().zip(expected) {
        assert_eq!(p.header.seq, *seq);
        let mut bytes = vec![0u8; p.entry.len as usize];
        cache.read(&p.entry, &mut bytes);
        let (header, stored) = decode_record(&bytes, &path, 0).expect("decodes");
        let back =
            tidemark_journal::record::payload_bytes(&header, stored, &path, 0).expect("payload");
        assert_eq!(&back, data, "entry seq {seq} came back changed");
    }
    drop(cache);
    assert!(
        FileCache::open(
            &RealFs,
            &path,
            2 << 20,
            42,
            0,
            &RealIo,
            FileBudget::new(64 << 20)
        )
        .is_err(),
        "a cache of another size is refused"
    );
    assert!(
        FileCache::open(
            &RealFs,
            &path,
            1 << 20,
            43,
            0,
            &RealIo,
            FileBudget::new(64 << 20)
        )
        .is_err(),
        "a cache of another group is refused"
    );
}

/// Disk bytes `path` holds (its allocated blocks).
fn disk_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn rings_sharing_a_budget_hold_no_more_disk_than_it_and_give_it_back_when_drained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path_a, path_b) = (dir.path().join("a"), dir.path().join("b"));
    let budget = FileBudget::new(1 << 20);
    let open = |path: &std::path::Path| {
        FileCache::open(&RealFs, path, 4 << 20, 42, 0, &RealIo, budget.clone())
            .expect("open")
            .0
    };
    let (a, b) = (open(&path_a), open(&path_b));
    assert!(
        disk_bytes(&path_a) <= 64 << 10,
        "a new ring is sparse: {} bytes on disk",
        disk_bytes(&path_a)
    );
    let mut rng = rng(11);
    let record_of = |seq: u64, data: &[u8]| {
        PreparedRecord::new(RecordKind::Write, 1, seq * 512, data.len() as u64, data)
    };
    let append = |cache: &FileCache, seq: u64, data: &[u8]| {
        let record = record_of(seq, data);
        cache.append(seq, record.encoded_len(), |buf| {
            record.encode_to(seq, Timestamp::from_nanos(seq as i64), buf);
        })
    };
    // Group a spills until the budget (not its 4 MiB ring) stops it.
    let mut seq = 0;
    let data = payload(&mut rng, 8000);
    while let Some(entry) = append(&a, seq + 1, &data) {
        a.sync_through(entry.write_no).expect("flush");
        seq += 1;
    }
    assert!(seq > 50, "only {seq} entries fitted a 1 MiB budget");
    let stats = a.stats();
    assert!(stats.used_bytes < 4 << 20, "the ring itself had room");
    assert!(stats.disk_bytes <= 1 << 20 && budget.used() == stats.disk_bytes);
    assert!(
        disk_bytes(&path_a) <= (1 << 20) + (64 << 10),
        "ring a holds {} bytes of disk, over the 1 MiB budget",
        disk_bytes(&path_a)
    );
    // Group b finds no room while a holds it all...
    assert!(append(&b, 1, &data).is_none(), "b spilled past the budget");
    assert!(!b.wait_for_room(data.len() + 100, None));
    // ...and gets it once a's journal has taken a's entries.
    a.release_through(seq);
    assert_eq!(a.stats().disk_bytes, 0, "a drained ring holds no disk");
    assert!(
        disk_bytes(&path_a) <= 64 << 10,
        "ring a still holds {} bytes of disk",
        disk_bytes(&path_a)
    );
    assert_eq!(budget.used(), 0);
    let entry = append(&b, 1, &data).expect("b has room now");
    b.sync_through(entry.write_no).expect("flush");
    assert!(budget.used() > 0 && budget.used() == b.stats().disk_bytes);

    // Entries found at start-up keep their space whatever the budget; the
    // rest of the ring is given back.
    drop(b);
    assert_eq!(budget.used(), 0, "a closed ring's blocks are not charged");
    let tight = FileBudget::new(0);
    let (b, pending) =
        FileCache::open(&RealFs, &path_b, 4 << 20, 42, 0, &RealIo, tight.clone()).expect("reopen");
    assert_eq!(pending.len(), 1, "the acknowledged entry came back");
    let mut bytes = vec![0u8; pending[0].entry.len as usize];
    b.read(&pending[0].entry, &mut bytes);
    let (header, stored) = decode_record(&bytes, &path_b, 0).expect("decodes");
    let back =
        tidemark_journal::record::payload_bytes(&header, stored, &path_b, 0).expect("payload");
    assert_eq!(back, data);
    assert!(tight.used() > 0 && tight.used() == b.stats().disk_bytes);
}

/// A disk that refuses to allocate ring space makes the ring count as full
/// (appenders go to memory or wait), never an appender that retries in a
/// loop; once the disk allocates again, so does the ring.
#[test]
fn a_ring_whose_disk_refuses_space_counts_as_full() {
    use tidemark_journal::fs::{FaultyFs, FsOp};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let fs = FaultyFs::new(Arc::new(RealFs));
    let (cache, _) = FileCache::open(
        fs.as_ref(),
        &path,
        1 << 20,
        42,
        0,
        &RealIo,
        FileBudget::new(1 << 20),
    )
    .expect("open");
    let data = payload(&mut rng(3), 5000);
    let record = PreparedRecord::new(RecordKind::Write, 1, 0, data.len() as u64, &data);
    let len = record.encoded_len();
    let append = || {
        cache.append(1, len, |buf| {
            record.encode_to(1, Timestamp::from_nanos(1), buf);
        })
    };
    assert!(cache.wait_for_room(len, None));
    fs.fail(FsOp::Write, "ring", 28);
    assert!(append().is_none(), "no space allocated, nothing written");
    assert!(
        !cache.wait_for_room(len, None),
        "the ring must count as full, or an appender loops on it"
    );
    assert!(
        cache.take_allocation_error().is_none(),
        "a full disk is waited out, not reported"
    );
    fs.heal();
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        cache.wait_for_room(len, None),
        "room again once the disk allocates"
    );
    assert!(append().is_some());

    // A disk that fails (not a full one) is reported to the appender that
    // waits: no room comes back by waiting.
    let failing = dir.path().join("failing-ring");
    let (cache, _) = FileCache::open(
        fs.as_ref(),
        &failing,
        1 << 20,
        42,
        0,
        &RealIo,
        FileBudget::new(1 << 20),
    )
    .expect("open");
    fs.fail(FsOp::Write, "failing-ring", 5);
    let appended = cache.append(1, len, |buf| {
        record.encode_to(1, Timestamp::from_nanos(1), buf);
    });
    assert!(appended.is_none());
    assert!(
        cache.take_allocation_error().is_some(),
        "the failing disk's error reaches the appender"
    );
}

#[test]
fn both_tiers_spill_to_the_file_cache_and_return_with_order_preserved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) =
        Journal::open(dir.path(), options(CacheTiers::Both, &faults, 64 << 10)).expect("open");
    let volume = journal.create_volume("vol", 1 << 20).expect("volume").id;
    let mut rng = rng(8);
    let mut model = Model::with_volume(volume, 1 << 20);

    // A slow journal: the memory cache passes its mark and records spill.
    faults.set_write_delay(Duration::from_millis(60));
    let mut handles = Vec::new();
    for _ in 0..60 {
        // Overlapping writes, so order matters to the result.
        let offset = 4096 * (rand::Rng::random_range(&mut rng, 0..8u64));
        let data = payload(&mut rng, 6000);
        let handle = journal
            .append(
                volume,
                Change::Write {
                    offset,
                    data: &data,
                },
            )
            .expect("append");
        handles.push((handle, offset, data));
    }
    let stats = journal.cache_stats();
    assert!(stats.spilled_records > 0, "nothing spilled: {stats:?}");
    assert!(stats.spilling && stats.tier_switches >= 1, "{stats:?}");
    assert!(
        stats.file.is_some_and(|f| f.entries > 0 || f.flushes > 0),
        "{stats:?}"
    );

    faults.set_write_delay(Duration::ZERO);
    for (handle, offset, data) in handles {
        let done = handle.wait().expect("durable");
        model
            .records
            .insert(done.seq, (volume, Op::Write { offset, data }, done.time));
    }
    journal.sync().expect("sync");
    assert!(
        journal.cache_stats().file.is_some_and(|f| f.entries == 0),
        "the file cache drains"
    );
    // The next append finds memory empty and the file cache drained.
    let data = payload(&mut rng, 3000);
    let done = journal
        .append(
            volume,
            Change::Write {
                offset: 100,
                data: &data,
            },
        )
        .and_then(|h| h.wait())
        .expect("append");
    model.records.insert(
        done.seq,
        (volume, Op::Write { offset: 100, data }, done.time),
    );
    let stats = journal.cache_stats();
    assert!(!stats.spilling, "did not return to memory: {stats:?}");
    assert_eq!(stats.tier_switches, 2, "{stats:?}");
    check_reads(&journal, &model, &mut rng, 20);
}

#[test]
fn records_in_the_file_cache_survive_and_are_journalled_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) =
        Journal::open(dir.path(), options(CacheTiers::File, &faults, 1 << 20)).expect("open");
    let volume = journal.create_volume("vol", 1 << 20).expect("volume").id;
    let mut rng = rng(9);
    let mut model = Model::with_volume(volume, 1 << 20);
    let write = |journal: &Journal, model: &mut Model, rng: &mut rand::rngs::SmallRng| {
        let offset = rand::Rng::random_range(rng, 0..200_000u64);
        let data = payload(rng, 5000);
        // Acknowledged from the file cache, even while the journal is broken.
        apply(journal, model, vec![(volume, Op::Write { offset, data })]);
    };
    for _ in 0..5 {
        write(&journal, &mut model, &mut rng);
    }
    journal.sync().expect("sync");
    // The journal's disk breaks: records are still acknowledged, from the
    // file cache, though the journal cannot take them.
    faults.fail_writes(EIO);
    for _ in 0..20 {
        write(&journal, &mut model, &mut rng);
    }
    assert!(journal.sync().is_err(), "the journal is broken");
    journal.close().expect("close");

    faults.fail_writes(0);
    let (journal, report) =
        Journal::open(dir.path(), options(CacheTiers::File, &faults, 1 << 20)).expect("reopen");
    assert_eq!(report.replayed_from_file_cache, 20, "{report:?}");
    journal.sync().expect("sync");
    assert_eq!(journal.history().newest_seq, model.newest());
    check_reads(&journal, &model, &mut rng, 20);
    // New records follow the replayed ones.
    write(&journal, &mut model, &mut rng);
    assert_eq!(journal.sync().expect("sync"), model.newest());
    journal.close().expect("close");

    // Opened with the memory tier alone, a drained file cache goes away.
    let (journal, report) =
        Journal::open(dir.path(), options(CacheTiers::Memory, &faults, 1 << 20)).expect("reopen");
    assert_eq!(report.replayed_from_file_cache, 0);
    assert!(journal.cache_stats().file.is_none());
    assert!(!tidemark_journal::file_cache::file_cache_path(dir.path()).exists());
    check_reads(&journal, &model, &mut rng, 10);
}

#[test]
fn no_room_for_the_file_cache_means_memory_until_there_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    faults.fail_cache_creates(ENOSPC);
    let (journal, _) = Journal::open(dir.path(), options(CacheTiers::File, &faults, 1 << 20))
        .expect("a full disk for the file cache does not stop the journal");
    assert!(journal.cache_stats().file.is_none());
    let volume = journal.create_volume("vol", 1 << 20).expect("volume").id;
    let mut rng = rng(10);
    let mut model = Model::with_volume(volume, 1 << 20);
    let mut write = |journal: &Journal, model: &mut Model| {
        let data = payload(&mut rng, 4000);
        apply(
            journal,
            model,
            vec![(volume, Op::Write { offset: 0, data })],
        );
    };
    write(&journal, &mut model);
    assert_eq!(
        journal.cache_stats().spilled_records,
        0,
        "records waited in memory"
    );

    // Space returns; the file cache is made at the next try.
    faults.fail_cache_creates(0);
    std::thread::sleep(tidemark_journal::journal::FILE_CACHE_RETRY + Duration::from_millis(100));
    write(&journal, &mut model);
    let stats = journal.cache_stats();
    assert!(stats.file.is_some(), "the file cache came back");
    assert_eq!(stats.spilled_records, 1, "{stats:?}");
    journal.sync().expect("sync");
    check_reads(&journal, &model, &mut common::rng(11), 10);
}

/// An event loop appends with `Admission::NoBlock`: room that needs the
/// tail moved on disk (an `msync`) is no room for it, while a thread that
/// may wait moves the tail and finds the room.
#[test]
fn room_that_needs_the_tail_moved_on_disk_is_not_room_for_an_event_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cache, _) = FileCache::open(
        &RealFs,
        &dir.path().join("ring"),
        1 << 20,
        42,
        0,
        &RealIo,
        FileBudget::new(64 << 20),
    )
    .expect("open");
    let data = vec![7u8; 8000];
    let record = PreparedRecord::new(RecordKind::Write, 1, 0, data.len() as u64, &data);
    let len = record.encoded_len();
    let mut seq = 0;
    while cache.wait_for_room(len, None) {
        seq += 1;
        let entry = cache
            .append(seq, len, |buf| {
                record.encode_to(seq, Timestamp::from_nanos(seq as i64), buf);
            })
            .expect("room");
        cache.sync_through(entry.write_no).expect("flush");
    }
    assert!(seq > 10, "{seq} entries fit");
    assert!(!cache.has_room_now(len));
    // The journal takes the three oldest: too little for the ring to move
    // its tail on disk by itself.
    cache.release_through(3);
    assert!(!cache.has_room_now(len), "the room is not free without IO");
    assert!(
        cache.wait_for_room(len, None),
        "a thread that may wait frees it"
    );
    assert!(cache.has_room_now(len));
}

/// A journal opened with memory alone (a replica group) that is given both
/// tiers (promoted) makes its file cache then and spills to it.
#[test]
fn tiers_given_later_make_the_file_cache_and_spill_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FaultyIo::new());
    let (journal, _) =
        Journal::open(dir.path(), options(CacheTiers::Memory, &faults, 64 << 10)).expect("open");
    let volume = journal.create_volume("vol", 1 << 20).expect("volume").id;
    assert!(journal.cache_stats().file.is_none());
    journal.set_cache_tiers(CacheTiers::Both).expect("tiers");
    assert_eq!(journal.cache_tiers(), CacheTiers::Both);
    assert!(journal.cache_stats().file.is_some(), "no file cache made");

    let mut rng = rng(9);
    faults.set_write_delay(Duration::from_millis(60));
    let mut handles = Vec::new();
    for i in 0..40u64 {
        let data = payload(&mut rng, 6000);
        handles.push(
            journal
                .append(
                    volume,
                    Change::Write {
                        offset: (i % 16) * 8192,
                        data: &data,
                    },
                )
                .expect("append"),
        );
    }
    assert!(
        journal.cache_stats().spilled_records > 0,
        "nothing spilled: {:?}",
        journal.cache_stats()
    );
    faults.set_write_delay(Duration::ZERO);
    for handle in handles {
        handle.wait().expect("durable");
    }
}
