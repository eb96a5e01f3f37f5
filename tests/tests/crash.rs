//! What clients were told stays true: `kill -9` during a verified write
//! load in sync mode (after a restart every acknowledged write reads back,
//! on the live volume and at the latest point of the journal), SIGTERM
//! with async writes still on their way to the journal, and two clients
//! writing one volume at once.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tidemark_tests::raw_nbd::Conn;
use tidemark_tests::write_load::{self, pattern, read_block, BLOCK};
use tidemark_tests::Daemon;

const BLOCKS: u64 = 4096; // 16 MiB volume

#[test]
fn kill_9_during_sync_writes_loses_nothing_acknowledged() {
    for seed in tidemark_tests::seeds(1) {
        kill_9_trial(seed, tidemark_tests::TEST_CONFIG, 0);
    }
}

/// The same with both cache tiers (the default) and the smallest file
/// cache: records spill to it from a tiny memory cache, and the ring is
/// written over and over while the kills come.
#[test]
fn kill_9_while_a_small_file_cache_wraps_loses_nothing_acknowledged() {
    const CONFIG: &str = r#"
log = "info"
[journal]
segment_size = "64M"
memory_cache = "48K"
file_cache = "1M"
cache_tiers = "both"
sync_timeout = "20s"
"#;
    for seed in tidemark_tests::seeds(1) {
        let spilled = kill_9_trial(seed, CONFIG, 400);
        // The trial proves something only if records went through the ring.
        assert!(
            spilled > 1000,
            "only {spilled} records went to the file cache"
        );
    }
}

/// Records the daemon has sent to the file cache since it started.
fn spilled_records(d: &Daemon) -> u64 {
    let (_, metrics) = d.http_get("/metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("tidemark_cache_spilled_records_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Three rounds of load, `kill -9` and restart; returns how many records
/// went through the file cache. Each kill waits (as well as the random
/// time) until at least `min_spilled` records went to the file cache in
/// that round, so a slow machine still wraps the ring before it.
fn kill_9_trial(seed: u64, config: &str, min_spilled: u64) -> u64 {
    let _guard = tidemark_tests::SeedGuard(seed, "kill -9 trial");
    let mut d = Daemon::with_config(config);
    d.create_volume("crash", "16M", "sync");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let pending = Arc::new(Mutex::new(HashMap::new()));
    let mut spilled = 0;
    for round in 0..3u64 {
        let addr = d.nbd.clone();
        let (a, p) = (acked.clone(), pending.clone());
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let load_seed = seed.wrapping_mul(4).wrapping_add(round + 1) & 0xffff_ffff;
        let writer = std::thread::spawn(move || {
            write_load::run(&addr, "crash", BLOCKS, load_seed, &a, &p);
            done2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        if min_spilled > 0 {
            d.eventually(60, "records to spill to the file cache", || {
                spilled_records(&d) >= min_spilled
            });
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "the load stopped before the kill"
        );
        spilled += spilled_records(&d);
        d.kill9();
        writer.join().unwrap();
        d.restart();

        let mut blocks = 0;
        for export in ["crash", "crash@latest"] {
            blocks = write_load::check(&d.nbd, export, &acked, &pending, &format!("round {round}"));
        }
        eprintln!("round {round}: {blocks} blocks verified after kill -9");
    }
    assert!(d.healthy());
    spilled
}

#[test]
fn sigterm_journals_every_acknowledged_async_write_before_exiting() {
    let mut d = Daemon::start();
    d.create_volume("quiet", "32M", "async");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut data = vec![0u8; 32 << 20];
    rng.fill(&mut data[..]);
    let src = d.path("src.img");
    std::fs::write(&src, &data).unwrap();
    tidemark_tests::run("nbdcopy", &[&src.display().to_string(), &d.uri("quiet")]);
    let status = d.stop();
    assert!(status.success(), "daemon exited with {status} on SIGTERM");
    // Printed only when every group closed with everything durable.
    assert!(
        d.log_text()
            .contains("stopped; every acknowledged write is durable"),
        "{}",
        tidemark_tests::tail(&d.log_text(), 20)
    );
    d.restart();
    let back = d.path("back.img");
    tidemark_tests::run(
        "nbdcopy",
        &[&d.uri("quiet@latest"), &back.display().to_string()],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the journal lacks writes acknowledged before SIGTERM"
    );
}

#[test]
fn two_clients_write_one_volume_and_see_each_other() {
    let d = Daemon::start();
    d.create_volume("shared", "4M", "sync");
    let mut a = Conn::open(&d.nbd);
    let mut b = Conn::open(&d.nbd);
    a.flags();
    b.flags();
    a.go("shared").unwrap();
    b.go("shared").unwrap();
    for i in 0..64u64 {
        let (writer, n) = if i % 2 == 0 { (&mut a, 1) } else { (&mut b, 2) };
        writer.request(1, i, i * BLOCK as u64, BLOCK as u32, &pattern(i, n));
    }
    for _ in 0..32 {
        assert_eq!(a.reply(0).unwrap().1, 0);
        assert_eq!(b.reply(0).unwrap().1, 0);
    }
    a.request(3, 100, 0, 0, &[]);
    assert_eq!(a.reply(0).unwrap().1, 0);
    for i in 0..64u64 {
        let reader = if i % 2 == 0 { &mut b } else { &mut a };
        let want = pattern(i, if i % 2 == 0 { 1 } else { 2 });
        assert_eq!(read_block(reader, i), want, "block {i}");
    }
}

/// A tag set while async writes overflow a tiny cache (so most were left
/// to a resync) is a point after every write acknowledged before it: the
/// export of the tag holds all of them.
#[test]
fn a_tag_in_async_mode_under_a_full_cache_holds_every_acknowledged_write() {
    const CONFIG: &str = r#"
log = "info"
[journal]
segment_size = "64M"
memory_cache = "64K"
cache_tiers = "memory"
sync_timeout = "20s"
"#;
    let d = Daemon::with_config(CONFIG);
    d.create_volume("fast", "32M", "async");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let mut data = vec![0u8; 32 << 20];
    rng.fill(&mut data[..]);
    let src = d.path("src.img");
    std::fs::write(&src, &data).unwrap();
    tidemark_tests::run("nbdcopy", &[&src.display().to_string(), &d.uri("fast")]);
    d.ok(&["tag", "create", "fast", "after-copy"]);
    let back = d.path("back.img");
    tidemark_tests::run(
        "nbdcopy",
        &[&d.uri("fast@tag:after-copy"), &back.display().to_string()],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the tag lacks writes acknowledged before it"
    );
    let (_, metrics) = d.http_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tidemark_cache_fallbacks_total") && !l.ends_with(" 0")),
        "no async write overflowed the cache; the test proves nothing:\n{metrics}"
    );
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts `size` of tmpfs at `dir`; `None` (and the reason printed)
    /// where this machine cannot.
    fn mount(dir: &std::path::Path, size: &str, test: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = tidemark_tests::run_any(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        );
        if !out.status.success() {
            tidemark_tests::skip(
                test,
                &format!(
                    "cannot mount a tmpfs ({})",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        tidemark_tests::run(
            "mount",
            &[
                "-o",
                &format!("remount,size={size}"),
                &self.0.display().to_string(),
            ],
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = tidemark_tests::run_any("umount", &["-l", &self.0.display().to_string()]);
    }
}

/// SIGTERM while the journal's disk is full: the daemon still stops within
/// a bounded time, says truthfully that not everything acknowledged is in
/// the journal, and the next start (with space again) resyncs it.
#[test]
fn sigterm_on_a_full_journal_disk_ends_in_time_and_says_what_is_not_durable() {
    const CONFIG: &str = r#"
log = "info"
[journal]
segment_size = "10M"
max_record = "1M"
memory_cache = "8M"
cache_tiers = "memory"
sync_timeout = "3s"
"#;
    let test = "sigterm_on_a_full_journal_disk";
    let scratch = tempfile::tempdir().unwrap();
    let mut tmpfs = None;
    let mut d = Daemon::with_config_and(CONFIG, |dir| {
        tmpfs = Tmpfs::mount(&dir.join("data"), "40m", test);
    });
    let Some(tmpfs) = tmpfs else {
        return;
    };
    let backing = scratch.path().join("production.img");
    d.ok(&[
        "volume",
        "create",
        "full",
        "--size",
        "64M",
        "--mode",
        "async",
        "--backing",
        &backing.display().to_string(),
    ]);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut data = vec![0u8; 64 << 20];
    rng.fill(&mut data[..]);
    let src = scratch.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    // Random data: the 40 MiB disk cannot journal 64 MiB of it.
    tidemark_tests::run("nbdcopy", &[&src.display().to_string(), &d.uri("full")]);

    let started = std::time::Instant::now();
    let status = d.stop();
    let took = started.elapsed();
    let log = d.log_text();
    assert!(took < Duration::from_secs(60), "SIGTERM took {took:?}");
    assert_eq!(status.code(), Some(1), "{}", tidemark_tests::tail(&log, 20));
    assert!(
        !log.contains("stopped; every acknowledged write is durable"),
        "the daemon claimed everything durable on a full disk"
    );
    assert!(
        log.contains("not every acknowledged write is durable"),
        "{}",
        tidemark_tests::tail(&log, 20)
    );

    // With room again, the next start journals what the full disk could not.
    tmpfs.resize("512m");
    d.restart();
    let back = scratch.path().join("back.img");
    tidemark_tests::run(
        "nbdcopy",
        &[&d.uri("full@latest"), &back.display().to_string()],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the journal's newest point lacks writes acknowledged before the full disk"
    );
    d.kill9();
    drop(tmpfs);
}
