//! What changed since a point (what a rollback rewrites): the spans equal
//! a model's, and they are streamed — listing a million changed blocks
//! holds next to nothing in memory.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use rand::Rng;
use tidemark_journal::{Change, Journal, JournalOptions, ManualClock, RecoveryMode, Timestamp};

/// Counts the bytes this test binary's Rust code has allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const START: i64 = 1_800_000_000_000_000_000;

fn options(large_range_blocks: u64) -> JournalOptions {
    JournalOptions {
        large_range_blocks,
        max_batch_bytes: 1 << 20,
        segment_size: 4 << 20,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(START))),
            RecoveryMode::Strict,
        )
    }
}

fn spans(journal: &Journal, seq: u64) -> Vec<(u64, u64)> {
    journal
        .changed_since("vol", seq)
        .expect("changed since")
        .collect::<tidemark_journal::Result<_>>()
        .expect("spans")
}

#[test]
fn changed_spans_equal_a_model() {
    for seed in seeds(6) {
        let _guard = SeedGuard(seed, "changed_spans_equal_a_model");
        let mut rng = rng(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), options(4)).expect("open");
        let size = 2 << 20;
        let volume = journal.create_volume("vol", size).expect("volume").id;
        // Seq → 4 KiB blocks the record touched.
        let mut touched: Vec<(u64, BTreeSet<u64>)> = Vec::new();
        for _ in 0..300 {
            let op = random_op(&mut rng, size, 32 << 10);
            let (offset, len) = match &op {
                Op::Write { offset, data } => (*offset, data.len() as u64),
                Op::Zero { offset, len } | Op::Trim { offset, len } => (*offset, *len),
                _ => continue,
            };
            let seq = op
                .append_to(&journal, volume)
                .and_then(|h| h.wait())
                .expect("durable")
                .seq;
            let blocks = (offset / 4096..(offset + len).div_ceil(4096)).collect();
            touched.push((seq, blocks));
        }
        for _ in 0..10 {
            let after = rng.random_range(0..=touched.last().map_or(0, |t| t.0));
            let changed: BTreeSet<u64> = touched
                .iter()
                .filter(|(seq, _)| *seq > after)
                .flat_map(|(_, blocks)| blocks.iter().copied())
                .collect();
            let mut expected: Vec<(u64, u64)> = Vec::new();
            for block in changed {
                let (start, end) = (block * 4096, ((block + 1) * 4096).min(size));
                match expected.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += end - start,
                    _ => expected.push((start, end - start)),
                }
            }
            assert_eq!(
                spans(&journal, after),
                expected,
                "seed {seed}, after seq {after}"
            );
        }
    }
}

#[test]
fn a_million_changed_blocks_are_listed_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = Journal::open(dir.path(), options(256)).expect("open");
    let records = 4000u64;
    let volume = journal
        .create_volume("vol", records * 256 * 4096)
        .expect("volume")
        .id;
    // Zeroes of 255 blocks, a block apart: one index entry per block, and
    // spans that do not merge.
    let mut handles = Vec::new();
    for i in 0..records {
        let change = Change::Zero {
            offset: i * 256 * 4096,
            len: 255 * 4096,
        };
        handles.push(journal.append(volume, change).expect("append"));
    }
    for h in handles {
        h.wait().expect("durable");
    }
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let mut count = 0u64;
    for span in journal.changed_since("vol", 0).expect("changed since") {
        let (start, len) = span.expect("span");
        assert_eq!((start, len), (count * 256 * 4096, 255 * 4096));
        count += 1;
    }
    let grew = PEAK.load(Ordering::SeqCst) - before;
    assert_eq!(count, records);
    assert!(
        grew < 1 << 20,
        "listing {} changed blocks took {grew} bytes",
        records * 255
    );
}
