//! Criterion benches of the write path: latency and throughput of writes
//! acknowledged in sync and async mode (and adaptive, which starts sync),
//! at queue depth 1 and 16, for 4 KiB and 1 MiB writes, with the memory,
//! file and both tiers of the monitoring cache, against a production
//! volume in a file on the same disk as the journal.
//!
//! Run with `cargo bench -p tidemark-bench --profile dev --bench write_path`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidemark_bench::{payload, Content};
use tidemark_journal::{
    CacheTiers, FileDevice, IoMode, Journal, JournalOptions, WritePath, WritePathOptions,
};

const VOLUME: u64 = 4 << 30;

fn write_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("write_path");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(10);
    let cases = [
        (IoMode::Sync, CacheTiers::Memory),
        (IoMode::Sync, CacheTiers::File),
        (IoMode::Sync, CacheTiers::Both),
        (IoMode::Async, CacheTiers::Memory),
        (IoMode::Async, CacheTiers::File),
        (IoMode::Async, CacheTiers::Both),
        (IoMode::Adaptive, CacheTiers::Both),
    ];
    for (mode, tiers) in cases {
        for len in [4usize << 10, 1 << 20] {
            for depth in [1usize, 16] {
                group.throughput(Throughput::Bytes(len as u64));
                let id = BenchmarkId::new(
                    format!("{mode}/{tiers:?}"),
                    format!("{}KiB/qd{depth}", len >> 10),
                );
                let data = payload(Content::Compressible, len, 3);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let dir = tempfile::tempdir_in(bench_dir()).expect("tempdir");
                        let (journal, _) =
                            Journal::open(&dir.path().join("journal"), JournalOptions::default())
                                .expect("open");
                        journal.create_volume("bench", VOLUME).expect("volume");
                        let path = WritePath::new(journal, WritePathOptions::default())
                            .expect("write path");
                        let device = Arc::new(
                            FileDevice::open(&dir.path().join("production.img"), VOLUME)
                                .expect("device"),
                        );
                        path.attach("bench", device, mode).expect("attach");
                        let per_thread = iters.div_ceil(depth as u64);
                        let start = Instant::now();
                        std::thread::scope(|scope| {
                            for t in 0..depth as u64 {
                                let path = &path;
                                let data = &data;
                                scope.spawn(move || {
                                    for i in 0..per_thread {
                                        let n = t * per_thread + i;
                                        let offset = (n * len as u64) % (VOLUME - len as u64);
                                        path.write("bench", offset, data, false).expect("write");
                                    }
                                });
                            }
                        });
                        let elapsed = start.elapsed();
                        path.close().expect("close");
                        elapsed
                    });
                });
            }
        }
    }
    group.finish();
}

fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("TIDEMARK_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into)
}

criterion_group!(benches, write_path);
criterion_main!(benches);
