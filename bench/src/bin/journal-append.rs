//! Appends a fixed amount of data to a fresh journal as fast as group
//! commit allows and prints the throughput as `MB/s <n>` on its last line.
//! `bench/j1.sh` runs it beside fio to compute J1.
//!
//! Usage: `journal-append DIR [TOTAL_MIB] [RECORD_KIB] [compressible|incompressible] [DEPTH] [THREADS]`
//!
//! THREADS appenders (default: one per core) share DEPTH records in flight,
//! as the connections of a daemon would; each compresses its own records.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use tidemark_bench::{open_journal, payload, Content};
use tidemark_journal::Change;

fn main() {
    tidemark_journal::return_freed_buffers_to_the_system();
    if let Err(e) = run() {
        eprintln!("journal-append: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .ok_or("usage: journal-append DIR [TOTAL_MIB] [RECORD_KIB] [CONTENT] [DEPTH]")?,
    );
    let total_mib: u64 = args.get(2).map_or(Ok(1024), |s| s.parse())?;
    let record_kib: usize = args.get(3).map_or(Ok(1024), |s| s.parse())?;
    let content = match args.get(4).map(String::as_str) {
        None | Some("incompressible") => Content::Incompressible,
        Some("compressible") => Content::Compressible,
        Some(other) => return Err(format!("unknown content {other:?}").into()),
    };
    let depth: usize = args.get(5).map_or(Ok(64), |s| s.parse())?;
    let threads: u64 = match args.get(6) {
        Some(s) => s.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    };

    let record_len = record_kib * 1024;
    let records = (total_mib * 1024 * 1024) / record_len as u64;
    let volume_size = 64u64 << 30;
    let journal = open_journal(&dir)?;
    let volume = journal.create_volume("bench", volume_size)?.id;
    // A few distinct payloads so lz4 cannot learn one.
    let payloads: Vec<Vec<u8>> = (0..8).map(|i| payload(content, record_len, i)).collect();

    let start = Instant::now();
    let per_thread_depth = (depth / threads as usize).max(1);
    std::thread::scope(|scope| -> Result<(), tidemark_journal::Error> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let journal = &journal;
                let payloads = &payloads;
                scope.spawn(move || -> Result<(), tidemark_journal::Error> {
                    let mut in_flight = VecDeque::with_capacity(per_thread_depth);
                    for i in (t..records).step_by(threads as usize) {
                        let offset = (i * record_len as u64) % (volume_size - record_len as u64);
                        let data = &payloads[(i % 8) as usize];
                        in_flight
                            .push_back(journal.append(volume, Change::Write { offset, data })?);
                        if in_flight.len() >= per_thread_depth {
                            if let Some(handle) = in_flight.pop_front() {
                                handle.wait()?;
                            }
                        }
                    }
                    for handle in in_flight {
                        handle.wait()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| {
                tidemark_journal::Error::Invalid("an appender thread panicked".into())
            })??;
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    journal.close()?;
    let mb = (records * record_len as u64) as f64 / 1e6;
    println!(
        "records {records} of {record_kib} KiB ({}), depth {depth}, {threads} appenders, {secs:.2} s",
        content.name()
    );
    println!("MB/s {:.1}", mb / secs);
    Ok(())
}
