//! A model of what a consistency group's volumes held at every seq, and
//! helpers shared by the journal's integration tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tidemark_journal::{
    Change, Journal, JournalOptions, ManualClock, Mark, RecoveryMode, RecoveryReport, Seq,
    Timestamp, VolumeId,
};

/// One change as the model keeps it.
#[derive(Clone, Debug)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
    Flush,
    TagSet(String),
    TagDelete(String),
}

impl Op {
    /// Appends this change to `volume` of `journal`.
    pub fn append_to(
        &self,
        journal: &Journal,
        volume: VolumeId,
    ) -> tidemark_journal::Result<tidemark_journal::AppendHandle> {
        let change = match self {
            Op::Write { offset, data } => Change::Write {
                offset: *offset,
                data,
            },
            Op::Zero { offset, len } => Change::Zero {
                offset: *offset,
                len: *len,
            },
            Op::Trim { offset, len } => Change::Trim {
                offset: *offset,
                len: *len,
            },
            Op::Flush => Change::Flush,
            Op::TagSet(name) => Change::Mark(Mark::TagSet {
                name,
                body: b"body",
            }),
            Op::TagDelete(name) => return journal.delete_tag(volume, name),
        };
        journal.append(volume, change)
    }
}

/// Every acknowledged record, by seq.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub sizes: BTreeMap<VolumeId, u64>,
    pub records: BTreeMap<Seq, (VolumeId, Op, Timestamp)>,
    pub horizon: Seq,
}

impl Model {
    /// A model of one volume of `size` bytes with no records yet.
    pub fn with_volume(volume: VolumeId, size: u64) -> Self {
        let mut model = Model::default();
        model.sizes.insert(volume, size);
        model
    }

    /// The bytes of `volume` at `seq`.
    pub fn state_at(&self, volume: VolumeId, seq: Seq) -> Vec<u8> {
        let mut state = vec![0u8; self.sizes[&volume] as usize];
        for (_, (v, op, _)) in self.records.range(..=seq) {
            if *v != volume {
                continue;
            }
            match op {
                Op::Write { offset, data } => {
                    state[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                Op::Zero { offset, len } | Op::Trim { offset, len } => {
                    state[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                _ => {}
            }
        }
        state
    }

    /// Tags of `volume` at `seq`: name → the seq that set it.
    pub fn tags_at(&self, volume: VolumeId, seq: Seq) -> BTreeMap<String, Seq> {
        let mut tags = BTreeMap::new();
        for (&s, (v, op, _)) in self.records.range(..=seq) {
            if *v != volume {
                continue;
            }
            match op {
                Op::TagSet(name) => {
                    tags.insert(name.clone(), s);
                }
                Op::TagDelete(name) => {
                    tags.remove(name);
                }
                _ => {}
            }
        }
        tags.retain(|_, s| *s > self.horizon);
        tags
    }

    pub fn newest(&self) -> Seq {
        self.records
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.horizon)
    }

    /// Forgets records after `seq` (a recovery cut them).
    pub fn cut_after(&mut self, seq: Seq) {
        self.records.retain(|&s, _| s <= seq);
    }
}

thread_local! {
    /// Whether journals opened on this test thread write through the page
    /// cache instead of with O_DIRECT.
    pub static BUFFERED_IO: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Small segments and batches, so tests roll segments and split batches.
pub fn small_options(clock: Arc<ManualClock>, recovery: RecoveryMode) -> JournalOptions {
    JournalOptions {
        group: "test".into(),
        segment_size: 256 << 10,
        max_record_len: 32 << 10,
        max_batch_bytes: 64 << 10,
        // Between a small batch and a large one here, so the writer takes
        // both its ways (one thread while idle, and the pipeline) and the
        // switches between them.
        inline_batch_below: 16 << 10,
        recovery,
        // Small, so the model's zeroes and trims exercise both layouts.
        large_range_blocks: 4,
        direct_io: !BUFFERED_IO.with(|b| b.get()),
        memory_cache_bytes: 256 << 10,
        io_hooks: Arc::new(tidemark_journal::io_hooks::RealIo),
        cache_tiers: tidemark_journal::CacheTiers::Memory,
        file_cache_bytes: 4 << 20,
        shared_cache: None,
        spill_above: 0.75,
        return_below: 0.25,
        clock,
        fs: Arc::new(tidemark_journal::fs::RealFs),
        trust_sealed: false,
    }
}

pub fn open(
    dir: &Path,
    clock: &Arc<ManualClock>,
    recovery: RecoveryMode,
) -> (Journal, RecoveryReport) {
    match Journal::open(dir, small_options(clock.clone(), recovery)) {
        Ok(opened) => opened,
        Err(e) => panic!("open {}: {e}", dir.display()),
    }
}

/// Random bytes, sometimes compressible and sometimes not.
pub fn payload(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    if rng.random_bool(0.5) {
        let byte: u8 = rng.random();
        let mut data = vec![byte; len];
        for b in data.iter_mut().step_by(97) {
            *b = rng.random();
        }
        data
    } else {
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        data
    }
}

/// A random change for a volume of `size` bytes: aligned and unaligned,
/// small and spanning many blocks.
pub fn random_op(rng: &mut SmallRng, size: u64, max_len: u64) -> Op {
    let pick = rng.random_range(0..100);
    let len = if rng.random_bool(0.5) {
        4096 * rng.random_range(1..=(max_len / 4096).max(1))
    } else {
        rng.random_range(1..=max_len)
    }
    .min(size);
    let offset = if rng.random_bool(0.5) {
        4096 * rng.random_range(0..=(size - len) / 4096)
    } else {
        rng.random_range(0..=size - len)
    };
    match pick {
        0..=69 => Op::Write {
            offset,
            data: payload(rng, len as usize),
        },
        70..=79 => Op::Zero { offset, len },
        80..=87 => Op::Trim { offset, len },
        88..=94 => Op::Flush,
        95..=97 => Op::TagSet(format!("tag-{}", rng.random_range(0..6))),
        _ => Op::TagDelete(format!("tag-{}", rng.random_range(0..6))),
    }
}

/// Appends `ops` concurrently (so they share group commits) and records in
/// the model the ones that were acknowledged.
pub fn apply(journal: &Journal, model: &mut Model, ops: Vec<(VolumeId, Op)>) {
    let mut handles = Vec::new();
    for (volume, op) in ops {
        if let Op::TagDelete(name) = &op {
            let newest = model.newest();
            if !model.tags_at(volume, newest).contains_key(name) {
                // Deleting a missing tag is refused; check that, then skip.
                assert!(journal.delete_tag(volume, name).is_err());
                continue;
            }
        }
        let handle = op.append_to(journal, volume);
        let handle = handle.unwrap_or_else(|e| panic!("append {op:?}: {e}"));
        handles.push((volume, op, handle));
        // A tag delete is checked against the model, so settle it first.
        if matches!(
            handles.last(),
            Some((_, Op::TagSet(_) | Op::TagDelete(_), _))
        ) {
            settle(model, &mut handles);
        }
    }
    settle(model, &mut handles);
}

fn settle(model: &mut Model, handles: &mut Vec<(VolumeId, Op, tidemark_journal::AppendHandle)>) {
    for (volume, op, handle) in handles.drain(..) {
        let done = handle
            .wait()
            .unwrap_or_else(|e| panic!("append {op:?} not durable: {e}"));
        model.records.insert(done.seq, (volume, op, done.time));
    }
}

/// Prints the seed if the test panics while it is alive.
pub struct SeedGuard(pub u64, pub &'static str);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}; replay with TIDEMARK_SEED={}",
                self.1, self.0, self.0
            );
        }
    }
}

/// The seeds to run: `TIDEMARK_SEED` for one, else `TIDEMARK_SEEDS` (or
/// `default`) seeds starting from a fixed base.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("TIDEMARK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (0..count).map(|i| 0x71de_0000 + i).collect()
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Checks reads of every volume at `points` against the model.
pub fn check_reads(journal: &Journal, model: &Model, rng: &mut SmallRng, reads: usize) {
    let newest = model.newest();
    let names: BTreeMap<VolumeId, String> = journal
        .volumes()
        .into_iter()
        .map(|v| (v.id, v.name))
        .collect();
    for _ in 0..reads {
        let volume = *names
            .keys()
            .nth(rng.random_range(0..names.len()))
            .expect("a volume");
        let size = model.sizes[&volume];
        let seq = match rng.random_range(0..4) {
            0 => newest,
            1 => model.horizon,
            _ => rng.random_range(model.horizon..=newest),
        };
        let expected = model.state_at(volume, seq);
        let (offset, len) = if rng.random_bool(0.3) {
            (0, size)
        } else {
            let len = rng.random_range(1..=size.min(40_000));
            (rng.random_range(0..=size - len), len)
        };
        let mut buf = vec![0xAAu8; len as usize];
        let name = &names[&volume];
        let got = journal
            .read(name, offset, &mut buf, tidemark_journal::Point::Seq(seq))
            .unwrap_or_else(|e| panic!("read {name} at seq {seq}: {e}"));
        assert_eq!(got, seq);
        if buf[..] != expected[offset as usize..(offset + len) as usize] {
            let first = buf
                .iter()
                .zip(&expected[offset as usize..])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "volume {name} at seq {seq} (horizon {}, newest {newest}): read of {len} bytes at {offset} differs first at byte {}",
                model.horizon,
                offset + first as u64
            );
        }
    }
}

/// The first byte (if any) at which volume `name`'s production volume
/// differs from the journal's newest point, after a journal sync.
pub fn production_differs_from_journal(
    path: &tidemark_journal::WritePath,
    name: &str,
    size: u64,
) -> Option<usize> {
    path.journal().sync().expect("sync");
    let mut production = vec![0u8; size as usize];
    let mut journalled = vec![0u8; size as usize];
    path.read(name, 0, &mut production)
        .expect("read production");
    path.journal()
        .read(name, 0, &mut journalled, tidemark_journal::Point::Latest)
        .expect("read journal");
    production.iter().zip(&journalled).position(|(a, b)| a != b)
}

/// Options of the changed-since tests: a manual clock, small segments and
/// batches, and `large_range_blocks` as given.
pub fn changes_options(large_range_blocks: u64) -> JournalOptions {
    JournalOptions {
        large_range_blocks,
        max_batch_bytes: 1 << 20,
        segment_size: 4 << 20,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(
                1_800_000_000_000_000_000,
            ))),
            RecoveryMode::Strict,
        )
    }
}
