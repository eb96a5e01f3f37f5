//! What changed since a point (what a rollback rewrites) and between two
//! points (what an incremental copy takes): the spans equal a model's. (That they are streamed is `changes_memory.rs`.)

mod common;

use std::collections::BTreeSet;

use common::*;
use rand::Rng;
use tidemark_journal::Journal;

fn spans(journal: &Journal, after: u64, upto: u64) -> Vec<(u64, u64)> {
    journal
        .changed_between("vol", after, upto)
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
        let (journal, _) = Journal::open(dir.path(), changes_options(4)).expect("open");
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
        let newest = touched.last().map_or(0, |t| t.0);
        for round in 0..20 {
            let after = rng.random_range(0..=newest);
            // Half the rounds up to now, half up to a point in between.
            let upto = if round % 2 == 0 {
                u64::MAX
            } else {
                rng.random_range(after..=newest)
            };
            let changed: BTreeSet<u64> = touched
                .iter()
                .filter(|(seq, _)| *seq > after && *seq <= upto)
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
                spans(&journal, after, upto),
                expected,
                "seed {seed}, after seq {after} up to {upto}"
            );
        }
    }
}
