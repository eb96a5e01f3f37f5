//! Power loss, simulated: the journal, the file cache, the dirty maps, the
//! production volume and the manifest run on `fs::SimFs`, which at a power
//! cut (armed at a random filesystem operation) keeps only what was made
//! durable, plus a seeded random part of the rest, torn at sector
//! granularity. After the "reboot" the journal must open (strict recovery:
//! a power cut is never corruption), every acknowledged record must read
//! back at its seq, and the production volume must equal the journal's
//! newest point once the write path is attached again.
//!
//! Every trial prints its seed; `TIDEMARK_SEED=N` replays one (the disk a
//! cut leaves is a function of the seed; which operation the Nth is can
//! vary with thread scheduling), `TIDEMARK_SEEDS=N` runs more.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::rngs::SmallRng;
use rand::Rng;
use tidemark_journal::fs::{Fs, OpenMode, PowerCut, SimFs};
use tidemark_journal::io_hooks::FaultyIo;
use tidemark_journal::{
    CacheTiers, FileDevice, IoMode, Journal, JournalOptions, ManualClock, Point, RecoveryMode,
    Timestamp, WritePath, WritePathOptions,
};

const START: i64 = 1_800_000_000_000_000_000;
const SIZE: u64 = 256 << 10;
const DIR: &str = "/data/journal";

/// A power cut whose leniency with unsynced data comes from the seed.
fn power_cut(rng: &mut SmallRng, seed: u64) -> PowerCut {
    let keep = [0.0, 0.5, 1.0];
    PowerCut {
        seed,
        keep_data: keep[rng.random_range(0..3)],
        keep_entries: keep[rng.random_range(0..3)],
    }
}

/// Options for `variant`; the seed also picks how the writer's batches go:
/// all through its pipeline, all written by one thread while it is idle,
/// or mixed (batches of a few records either way).
fn sim_options(fs: &Arc<SimFs>, variant: &str, seed: u64) -> JournalOptions {
    let base = JournalOptions {
        fs: fs.clone(),
        memory_cache_bytes: 64 << 10,
        inline_batch_below: [0, 16 << 10, 1 << 20][(seed % 3) as usize],
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    };
    match variant {
        "memory" => base,
        "file" => JournalOptions {
            cache_tiers: CacheTiers::File,
            file_cache_bytes: 1 << 20,
            ..base
        },
        "both" => JournalOptions {
            cache_tiers: CacheTiers::Both,
            file_cache_bytes: 1 << 20,
            spill_above: 0.25,
            ..base
        },
        // The file tier with a slow journal: the ring is full and wraps.
        "file-wrap" => {
            let slow = FaultyIo::new();
            slow.set_sync_delay(Duration::from_millis(2));
            JournalOptions {
                cache_tiers: CacheTiers::File,
                file_cache_bytes: 1 << 20,
                io_hooks: Arc::new(slow),
                ..base
            }
        }
        other => panic!("unknown variant {other}"),
    }
}

/// Opens the journal after a restart: it must open, whatever the cut left.
fn reopen(fs: &Arc<SimFs>, variant: &str, seed: u64) -> Journal {
    match Journal::open(Path::new(DIR), sim_options(fs, variant, seed)) {
        Ok((journal, _)) => journal,
        Err(e) => {
            panic!("{variant}, seed {seed}: the journal does not open after a power cut: {e}")
        }
    }
}

/// Appends random changes until the power fails (or `count` are done),
/// `depth` in flight; returns the model of what was appended and the
/// newest acknowledged seq.
fn append_until_the_cut(
    journal: &Journal,
    rng: &mut SmallRng,
    count: usize,
    depth: usize,
) -> (Model, u64) {
    let volume = journal.volume("vol0").expect("volume").id;
    let mut model = Model::with_volume(volume, SIZE);
    let mut acked = 0;
    let mut in_flight = std::collections::VecDeque::new();
    let settle = |h: tidemark_journal::AppendHandle, acked: &mut u64| -> bool {
        match h.wait() {
            Ok(done) => {
                *acked = (*acked).max(done.seq);
                true
            }
            Err(_) => false,
        }
    };
    'work: for _ in 0..count {
        let op = random_op(rng, SIZE, 20_000);
        if matches!(op, Op::TagSet(_) | Op::TagDelete(_)) {
            continue;
        }
        let Ok(handle) = op.append_to(journal, volume) else {
            break;
        };
        model
            .records
            .insert(handle.seq(), (volume, op, Timestamp::default()));
        in_flight.push_back(handle);
        while in_flight.len() >= depth {
            let h = in_flight.pop_front().expect("in flight");
            if !settle(h, &mut acked) {
                break 'work;
            }
        }
    }
    for h in in_flight {
        settle(h, &mut acked);
    }
    (model, acked)
}

fn journal_trial(seed: u64, variant: &str) {
    let _guard = SeedGuard(seed, "journal power-cut trial");
    eprintln!("power cut, journal {variant}, seed {seed}");
    let mut rng = rng(seed);
    let local = tempfile::tempdir().expect("tempdir");
    let fs = SimFs::new(local.path());
    {
        let (journal, _) =
            Journal::open(Path::new(DIR), sim_options(&fs, variant, seed)).expect("open");
        journal.create_volume("vol0", SIZE).expect("volume");
    }
    let journal = reopen(&fs, variant, seed);
    let cut = power_cut(&mut rng, seed);
    fs.cut_after(rng.random_range(1..1500), cut);
    // With both tiers a record waiting in memory may be lost while a later
    // one survives in the file cache: one append at a time, so the only
    // record that may be missing is the one in flight.
    let depth = if variant == "both" { 1 } else { 8 };
    let (mut model, acked) = append_until_the_cut(&journal, &mut rng, 600, depth);
    fs.cut_power(cut);
    drop(journal);
    fs.restart();

    let journal = reopen(&fs, variant, seed);
    let newest = journal.sync().expect("sync");
    assert!(
        newest >= acked,
        "{variant}, seed {seed}: acknowledged seq {acked} lost, the journal ends at {newest}"
    );
    model.cut_after(newest);
    check_reads(&journal, &model, &mut rng, 12);
}

#[test]
fn power_cuts_lose_no_acknowledged_record() {
    for seed in seeds(8) {
        for variant in ["memory", "file", "both", "file-wrap"] {
            journal_trial(seed, variant);
        }
    }
}

/// A journal being made, and its first volume, survive a cut at any point
/// once made: `open` and `create_volume` return only when durable.
#[test]
fn a_new_journal_and_volume_survive_a_power_cut() {
    for seed in seeds(16) {
        let _guard = SeedGuard(seed, "new journal power-cut trial");
        let mut rng = rng(seed);
        let local = tempfile::tempdir().expect("tempdir");
        let fs = SimFs::new(local.path());
        let cut = power_cut(&mut rng, seed);
        let made = {
            match Journal::open(Path::new(DIR), sim_options(&fs, "both", seed)) {
                Ok((journal, _)) => {
                    fs.cut_after(rng.random_range(1..40), cut);
                    journal.create_volume("vol0", SIZE).is_ok()
                }
                Err(_) => false,
            }
        };
        fs.cut_power(cut);
        fs.restart();
        let journal = reopen(&fs, "both", seed);
        if made {
            assert!(
                journal.volume("vol0").is_ok(),
                "seed {seed}: a volume whose creation returned is gone after a power cut"
            );
            let mut buf = vec![1u8; 4096];
            journal
                .read("vol0", 0, &mut buf, Point::Latest)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}

/// Holds and retention under power cuts: a hold whose `set_hold` returned
/// is there after the cut (unless released since), and every retained
/// point still reads as the model says.
#[test]
fn holds_and_retention_survive_power_cuts() {
    for seed in seeds(8) {
        let _guard = SeedGuard(seed, "retention power-cut trial");
        let mut rng = rng(seed);
        let local = tempfile::tempdir().expect("tempdir");
        let fs = SimFs::new(local.path());
        let (journal, _) =
            Journal::open(Path::new(DIR), sim_options(&fs, "memory", seed)).expect("open");
        let volume = journal.create_volume("vol0", SIZE).expect("volume").id;
        let mut model = Model::with_volume(volume, SIZE);
        let ops = (0..200)
            .map(|_| (volume, random_op(&mut rng, SIZE, 20_000)))
            .filter(|(_, op)| !matches!(op, Op::TagSet(_) | Op::TagDelete(_)))
            .collect();
        apply(&journal, &mut model, ops);
        let cut = power_cut(&mut rng, seed);
        fs.cut_after(rng.random_range(1..60), cut);
        let mut holds = std::collections::BTreeMap::new();
        // A set_hold failing at the cut may still have reached the disk
        // (its rename did, the directory fsync did not): that hold may
        // read as before or as attempted.
        let mut attempted: Option<(String, u64)> = None;
        let mut horizon = 0;
        for i in 0..20u64 {
            let name = format!("h{}", i % 4);
            let seq = rng.random_range(horizon..=model.newest());
            if journal.set_hold(&name, seq).is_err() {
                attempted = Some((name, seq));
                break;
            }
            holds.insert(name, seq);
            match journal.retain_from(rng.random_range(horizon..=model.newest()), false) {
                Ok(report) => horizon = report.new_horizon,
                Err(_) => break,
            }
        }
        fs.cut_power(cut);
        drop(journal);
        fs.restart();
        let journal = reopen(&fs, "memory", seed);
        let kept = journal.holds();
        for (name, seq) in &holds {
            let got = kept.get(name);
            let in_doubt = matches!(&attempted, Some((n, s)) if n == name && got == Some(s));
            assert!(
                got == Some(seq) || in_doubt,
                "seed {seed}: hold {name} at {seq} lost ({kept:?})"
            );
        }
        let history = journal.history();
        assert!(
            history.horizon_seq >= horizon,
            "seed {seed}: the horizon went back"
        );
        model.horizon = history.horizon_seq;
        check_reads(&journal, &model, &mut rng, 12);
    }
}

/// The write path on the simulated disk, production volume included: after
/// a cut and a restart, every acknowledged sync write reads back at its
/// seq, and — in every mode — the production volume equals the journal's
/// newest point once attached again (the dirty map covered every region a
/// lost record touched).
#[test]
fn the_write_path_and_its_dirty_maps_survive_power_cuts() {
    for seed in seeds(8) {
        for mode in [IoMode::Sync, IoMode::Async] {
            write_path_trial(seed, mode);
        }
    }
}

fn path_options() -> WritePathOptions {
    WritePathOptions {
        region_size: 64 << 10,
        sync_timeout: Duration::from_secs(10),
        maintenance_interval: Duration::from_millis(5),
        ..WritePathOptions::default()
    }
}

fn attach(fs: &Arc<SimFs>, journal: Journal, mode: IoMode, seed: u64) -> WritePath {
    let path = WritePath::new(journal, path_options()).expect("write path");
    let device = FileDevice::open_on(fs.as_ref(), Path::new("/data/production.img"), SIZE)
        .expect("production volume");
    if let Err(e) = path.attach("vol0", Arc::new(device), mode) {
        panic!("{mode}, seed {seed}: attach after the cut: {e}");
    }
    path
}

fn write_path_trial(seed: u64, mode: IoMode) {
    let _guard = SeedGuard(seed, "write path power-cut trial");
    eprintln!("power cut, write path {mode}, seed {seed}");
    let mut rng = rng(seed);
    let local = tempfile::tempdir().expect("tempdir");
    let fs = SimFs::new(local.path());
    {
        let (journal, _) =
            Journal::open(Path::new(DIR), sim_options(&fs, "memory", seed)).expect("open");
        journal.create_volume("vol0", SIZE).expect("volume");
    }
    let journal = reopen(&fs, "memory", seed);
    let path = attach(&fs, journal, mode, seed);
    let cut = power_cut(&mut rng, seed);
    fs.cut_after(rng.random_range(1..800), cut);
    // Acknowledged sync writes: (seq, offset, data).
    let mut acked = Vec::new();
    for _ in 0..300 {
        let len = rng.random_range(1..=20_000u64);
        let offset = rng.random_range(0..=SIZE - len);
        let data = payload(&mut rng, len as usize);
        match path.write("vol0", offset, &data, rng.random_bool(0.1)) {
            Ok(ack) => {
                if let (IoMode::Sync, Some(seq)) = (ack.mode, ack.seq) {
                    acked.push((seq, offset, data));
                }
            }
            Err(_) => break,
        }
        if rng.random_bool(0.05) && path.flush("vol0").is_err() {
            break;
        }
    }
    fs.cut_power(cut);
    drop(path);
    fs.restart();

    let journal = reopen(&fs, "memory", seed);
    let path = attach(&fs, journal, mode, seed);
    for (seq, offset, data) in &acked {
        let mut buf = vec![0u8; data.len()];
        path.journal()
            .read("vol0", *offset, &mut buf, Point::Seq(*seq))
            .unwrap_or_else(|e| panic!("{mode}, seed {seed}: read at seq {seq}: {e}"));
        assert!(
            buf == *data,
            "{mode}, seed {seed}: the write acknowledged at seq {seq} is not at its point"
        );
    }
    if let Some(at) = production_differs_from_journal(&path, "vol0", SIZE) {
        panic!(
            "{mode}, seed {seed}: production and the journal's newest point differ at byte {at}"
        );
    }
    // The production volume's file itself survived.
    assert!(fs
        .open(Path::new("/data/production.img"), OpenMode::read())
        .is_ok());
}

/// A flush of a sync volume does not fsync the production volume where the
/// journal leads every marked region (it holds every acknowledged write):
/// after a power cut right after the flush, attaching rolls the production
/// volume forward, and it holds every flushed write.
#[test]
fn flushed_sync_writes_are_on_the_production_volume_after_a_power_cut() {
    // With the file tier the records a flush relied on may wait in the
    // ring at the cut, and are journalled again after the restart: the
    // roll-forward must see them.
    for variant in ["memory", "file"] {
        flushed_sync_writes_survive(variant);
    }
}

fn flushed_sync_writes_survive(variant: &str) {
    let mut rolled_forward = 0;
    for seed in seeds(8) {
        let _guard = SeedGuard(seed, "flushed sync writes, power cut");
        eprintln!("flushed sync writes, {variant}, seed {seed}");
        let mut rng = rng(seed);
        let local = tempfile::tempdir().expect("tempdir");
        let fs = SimFs::new(local.path());
        {
            let (journal, _) =
                Journal::open(Path::new(DIR), sim_options(&fs, variant, seed)).expect("open");
            journal.create_volume("vol0", SIZE).expect("volume");
        }
        // No background round: it would flush the production volume itself.
        let quiet = WritePathOptions {
            maintenance_interval: Duration::from_secs(3600),
            ..path_options()
        };
        let attach = |journal: Journal| {
            let path = WritePath::new(journal, quiet).expect("write path");
            let device = FileDevice::open_on(fs.as_ref(), Path::new("/data/production.img"), SIZE)
                .expect("production volume");
            let report = path
                .attach("vol0", Arc::new(device), IoMode::Sync)
                .unwrap_or_else(|e| panic!("seed {seed}: attach: {e}"));
            (path, report)
        };
        let (path, _) = attach(reopen(&fs, variant, seed));
        let mut model = vec![0u8; SIZE as usize];
        for _ in 0..60 {
            let len = rng.random_range(1..=20_000u64);
            let offset = rng.random_range(0..=SIZE - len);
            let data = payload(&mut rng, len as usize);
            path.write("vol0", offset, &data, rng.random_bool(0.2))
                .expect("sync write");
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        }
        path.flush("vol0").expect("flush");
        fs.cut_power(PowerCut {
            seed,
            keep_data: 0.0,
            keep_entries: 0.0,
        });
        drop(path);
        fs.restart();

        let (path, report) = attach(reopen(&fs, variant, seed));
        rolled_forward += report.rolled_forward_bytes;
        let mut production = vec![0u8; SIZE as usize];
        path.read("vol0", 0, &mut production).expect("read");
        if let Some(at) = production.iter().zip(&model).position(|(a, b)| a != b) {
            panic!(
                "{variant}, seed {seed}: the production volume lost a flushed write at byte {at}"
            );
        }
        if let Some(at) = production_differs_from_journal(&path, "vol0", SIZE) {
            panic!("{variant}, seed {seed}: production and the journal's newest point differ at byte {at}");
        }
    }
    assert!(
        rolled_forward > 0,
        "{variant}: the power cuts never took a flushed write from the production volume: \
         the flushes fsynced it, and the test shows nothing"
    );
}
