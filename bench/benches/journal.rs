//! Criterion benches of the journal core.
//!
//! - `append/*`: throughput of durable appends (group commit, 64 in
//!   flight) for 4 KiB, 64 KiB and 1 MiB records, compressible and not.
//! - `point_read/*`: one 4 KiB read at a random point of a journal holding
//!   10 k or 1 M records (R3: should grow no faster than log n).
//!
//! Run with `cargo bench -p tidemark-bench --bench journal`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tidemark_bench::{open_journal, payload, Content};
use tidemark_journal::{Change, Point};

const DEPTH: usize = 64;

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.measurement_time(Duration::from_secs(8));
    group.sample_size(10);
    for record_len in [4usize << 10, 64 << 10, 1 << 20] {
        for content in [Content::Compressible, Content::Incompressible] {
            group.throughput(Throughput::Bytes(record_len as u64));
            let id = BenchmarkId::new(content.name(), format!("{}KiB", record_len >> 10));
            let payloads: Vec<Vec<u8>> = (0..8).map(|i| payload(content, record_len, i)).collect();
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    // A fresh journal per sample keeps the disk from filling.
                    let dir = tempfile::tempdir_in(bench_dir()).expect("tempdir");
                    let journal = open_journal(dir.path()).expect("open");
                    let size = 16u64 << 30;
                    let volume = journal.create_volume("bench", size).expect("volume").id;
                    let start = Instant::now();
                    let mut in_flight = VecDeque::with_capacity(DEPTH);
                    for i in 0..iters {
                        let offset = (i * record_len as u64) % (size - record_len as u64);
                        let data = &payloads[(i % 8) as usize];
                        in_flight.push_back(
                            journal
                                .append(volume, Change::Write { offset, data })
                                .expect("append"),
                        );
                        if in_flight.len() >= DEPTH {
                            if let Some(h) = in_flight.pop_front() {
                                h.wait().expect("durable");
                            }
                        }
                    }
                    for h in in_flight {
                        h.wait().expect("durable");
                    }
                    let elapsed = start.elapsed();
                    journal.close().expect("close");
                    elapsed
                });
            });
        }
    }
    group.finish();
}

fn point_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("point_read");
    for records in [10_000u64, 1_000_000] {
        let dir = tempfile::tempdir_in(bench_dir()).expect("tempdir");
        let journal = open_journal(dir.path()).expect("open");
        let size = 1u64 << 30;
        let blocks = size / 4096;
        let volume = journal.create_volume("bench", size).expect("volume").id;
        let mut rng = SmallRng::seed_from_u64(1);
        let data = payload(Content::Compressible, 4096, 1);
        let mut in_flight = VecDeque::with_capacity(256);
        for _ in 0..records {
            let offset = rng.random_range(0..blocks) * 4096;
            in_flight.push_back(
                journal
                    .append(
                        volume,
                        Change::Write {
                            offset,
                            data: &data,
                        },
                    )
                    .expect("append"),
            );
            if in_flight.len() >= 256 {
                if let Some(h) = in_flight.pop_front() {
                    h.wait().expect("durable");
                }
            }
        }
        for h in in_flight {
            h.wait().expect("durable");
        }
        let newest = journal.history().newest_seq;
        // Segments are written with O_DIRECT, so none of them is in the page
        // cache yet; read them once so the bench measures the lookup, not
        // the disk (the cold case is the disk's latency plus this).
        for entry in std::fs::read_dir(dir.path().join("segments")).expect("segments") {
            std::hint::black_box(
                std::fs::read(entry.expect("entry").path()).expect("read segment"),
            );
        }
        group.bench_function(BenchmarkId::from_parameter(records), |b| {
            let mut buf = vec![0u8; 4096];
            b.iter(|| {
                let seq = rng.random_range(1..=newest);
                let offset = rng.random_range(0..blocks) * 4096;
                journal
                    .read("bench", offset, &mut buf, Point::Seq(seq))
                    .expect("read");
            });
        });
        journal.close().expect("close");
    }
    group.finish();
}

/// Benches write where `TIDEMARK_BENCH_DIR` says (default: the system
/// temporary directory), so they can be pointed at the disk under test.
fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("TIDEMARK_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into)
}

criterion_group!(benches, append, point_read);
criterion_main!(benches);
