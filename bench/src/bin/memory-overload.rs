//! M1: drives a volume in async mode far faster than the journal can take
//! (the journal's disk is slowed by fault hooks) with a memory cache of
//! CACHE_MIB, and prints the process's peak resident memory against the
//! bound `cache + 64 MiB` on its last line.
//!
//! Usage: `memory-overload DIR [CACHE_MIB] [SECONDS] [memory|file|both]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_bench::{payload, Content};
use tidemark_journal::io_hooks::FaultyIo;
use tidemark_journal::{FileDevice, IoMode, Journal, JournalOptions, WritePath, WritePathOptions};

fn main() {
    tidemark_journal::return_freed_buffers_to_the_system();
    if let Err(e) = run() {
        eprintln!("memory-overload: {e}");
        std::process::exit(1);
    }
}

/// A field of /proc/self/status, in bytes.
fn status(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .ok_or("usage: memory-overload DIR [CACHE_MIB] [SECONDS]")?,
    );
    let cache_mib: u64 = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let seconds: u64 = args.get(3).map_or(Ok(10), |s| s.parse())?;
    let tiers: tidemark_journal::CacheTiers = args.get(4).map_or("both", String::as_str).parse()?;
    let volume_size = 8u64 << 30;

    let faults = Arc::new(FaultyIo::new());
    // A journal disk that takes 50 ms per batch: far slower than the load.
    faults.set_write_delay(Duration::from_millis(50));
    let options = JournalOptions {
        memory_cache_bytes: cache_mib << 20,
        cache_tiers: tiers,
        io_hooks: faults.clone(),
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open(&dir.join("journal"), options)?;
    journal.create_volume("load", volume_size)?;
    let path = WritePath::new(journal, WritePathOptions::default())?;
    let device = Arc::new(FileDevice::open(&dir.join("production.img"), volume_size)?);
    path.attach("load", device, IoMode::Async)?;

    let baseline = status("RssAnon:");
    // Sample the anonymous resident set while the load runs. File-backed
    // resident pages (journal segments mapped for reads) are page cache the
    // kernel reclaims at will, so they are reported but not held against
    // the bound.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut anon, mut file) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                anon = anon.max(status("RssAnon:"));
                file = file.max(status("RssFile:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            (anon, file)
        })
    };
    let data = payload(Content::Incompressible, 1 << 20, 9);
    let start = Instant::now();
    let mut written = 0u64;
    let mut fallbacks_seen = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let offset = (written * (1 << 20)) % (volume_size - (1 << 20));
        if path.write("load", offset, &data, false)?.seq.is_none() {
            fallbacks_seen += 1;
        }
        written += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak, peak_file) = sampler.join().map_err(|_| "the sampler panicked")?;
    let cache = path.journal().memory_cache();
    faults.set_write_delay(Duration::ZERO);
    path.close()?;
    let bound = (cache_mib << 20) + (64 << 20);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "tiers {tiers:?}: wrote {written} MiB in {seconds} s; memory cache peak {:.1} MiB of {cache_mib} MiB; {fallbacks_seen} writes left to resync",
        mib(cache.peak_bytes)
    );
    println!(
        "anonymous resident before load {:.1} MiB; file-backed resident peak {:.1} MiB (page cache, not counted); VmHWM {:.1} MiB",
        mib(baseline),
        mib(peak_file),
        mib(status("VmHWM:"))
    );
    println!(
        "M1 peak anonymous resident {:.1} MiB vs bound {:.1} MiB (cache + 64 MiB): {}",
        mib(peak),
        mib(bound),
        if peak <= bound { "within" } else { "OVER" }
    );
    Ok(())
}
