//! Crash tests of the write path in each IO mode: a child process writes a
//! seeded stream through the write path and reports each acknowledgement;
//! the parent kills it with SIGKILL at a random moment, reopens, attaches
//! (which resyncs what the dirty-region map names) and checks:
//! - sync: every acknowledged write is in the journal at its own seq;
//! - async and adaptive: every acknowledged write whose record survived is
//!   there, and the production volume equals the journal's newest point, so
//!   every other change is covered by a resync;
//! - all modes: nothing the journal holds is invented.
//!
//! The child is this same test binary, re-run with `TIDEMARK_MODE_CHILD`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use tidemark_journal::{
    FileDevice, IoMode, Journal, JournalOptions, ManualClock, Point, RecoveryMode, SystemClock,
    Timestamp, WritePath, WritePathOptions,
};

const SIZE: u64 = 2 << 20;

fn journal_options() -> JournalOptions {
    JournalOptions {
        clock: Arc::new(SystemClock),
        // Small, so async writes overflow it and fall back to the dirty map.
        memory_cache_bytes: 96 << 10,
        ..small_options(
            Arc::new(ManualClock::new(Timestamp::from_nanos(0))),
            RecoveryMode::Strict,
        )
    }
}

fn path_options() -> WritePathOptions {
    WritePathOptions {
        region_size: 128 << 10,
        maintenance_interval: Duration::from_millis(30),
        ..WritePathOptions::default()
    }
}

/// The changes the child makes, in order.
fn changes(seed: u64) -> Vec<Op> {
    let mut rng = rng(seed);
    (0..4000)
        .map(|_| random_op(&mut rng, SIZE, 48_000))
        .filter(|op| matches!(op, Op::Write { .. } | Op::Zero { .. } | Op::Trim { .. }))
        .collect()
}

/// Opens the journal and the write path and attaches the volume; also
/// returns the newest seq the journal had before the attach resynced
/// anything (seqs of records lost in the crash are given out again).
fn open_path(dir: &Path, mode: IoMode) -> (WritePath, tidemark_journal::ResyncReport, u64) {
    let (journal, _) =
        Journal::open(&dir.join("journal"), journal_options()).expect("open journal");
    let recovered = journal.history().newest_seq;
    if journal.volume("vol").is_err() {
        journal.create_volume("vol", SIZE).expect("create volume");
    }
    let path = WritePath::new(journal, path_options()).expect("write path");
    let device = Arc::new(FileDevice::open(&dir.join("production.img"), SIZE).expect("device"));
    let report = path.attach("vol", device, mode).expect("attach");
    (path, report, recovered)
}

/// The child: writes the seeded changes and prints `ack INDEX SEQ` (SEQ `-`
/// when the write went unjournalled) as each is acknowledged.
#[test]
fn mode_crash_child() {
    let (Ok(dir), Ok(mode), Ok(seed)) = (
        std::env::var("TIDEMARK_MODE_CHILD"),
        std::env::var("TIDEMARK_MODE"),
        std::env::var("TIDEMARK_MODE_SEED"),
    ) else {
        return;
    };
    let mode: IoMode = mode.parse().expect("mode");
    let seed: u64 = seed.parse().expect("seed");
    let (path, _, _) = open_path(Path::new(&dir), mode);
    println!("ready");
    for (i, op) in changes(seed).into_iter().enumerate() {
        let ack = match op {
            Op::Write { offset, data } => path.write("vol", offset, &data, i % 7 == 0),
            Op::Zero { offset, len } => path.write_zeroes("vol", offset, len, false),
            Op::Trim { offset, len } => path.trim("vol", offset, len),
            _ => continue,
        }
        .expect("write");
        match ack.seq {
            Some(seq) => println!("ack {i} {seq}"),
            None => println!("ack {i} -"),
        }
    }
    println!("done");
}

fn run(mode: IoMode, seed: u64) {
    let _guard = SeedGuard(seed, "mode crash test");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "mode_crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TIDEMARK_MODE_CHILD", dir.path())
        .env("TIDEMARK_MODE", mode.to_string())
        .env("TIDEMARK_MODE_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let kill_after = Duration::from_millis(rng.random_range(30..300));
    let mut acks: Vec<(usize, Option<u64>)> = Vec::new();
    let parse = |line: &str| -> Option<(usize, Option<u64>)> {
        let mut parts = line.strip_prefix("ack ")?.split(' ');
        let index = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok();
        Some((index, seq))
    };
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if started.is_some_and(|t: Instant| t.elapsed() >= kill_after) || Instant::now() > deadline
        {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            // (libtest prints "test NAME ... " on the same line first.)
            // The clock starts at the first acknowledgement, not at "ready":
            // on a loaded machine the child may need longer than the
            // shortest kill delay to finish its first write.
            Ok(line) if line == "done" => break,
            Ok(line) => {
                if let Some(ack) = parse(&line) {
                    started.get_or_insert_with(Instant::now);
                    acks.push(ack);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        acks.extend(parse(&line));
    }
    reader.join().expect("reader");
    assert!(
        !acks.is_empty(),
        "the child acknowledged nothing before the kill"
    );

    let (path, report, newest) = open_path(dir.path(), mode);
    let journal = path.journal();
    let ops = changes(seed);
    for &(index, seq) in &acks {
        let (offset, expected) = match &ops[index] {
            Op::Write { offset, data } => (*offset, data.clone()),
            Op::Zero { offset, len } | Op::Trim { offset, len } => {
                (*offset, vec![0u8; *len as usize])
            }
            _ => continue,
        };
        match (mode, seq) {
            (IoMode::Sync, None) => panic!("a sync write was acknowledged without a record"),
            (IoMode::Sync, Some(seq)) => assert!(
                seq <= newest,
                "acknowledged sync write seq {seq} lost (newest {newest})"
            ),
            (_, Some(seq)) if seq <= newest => {}
            // A lost async record: its region was still marked, so it was resynced.
            (_, Some(_)) | (_, None) => continue,
        }
        let seq = seq.unwrap_or(newest);
        let mut got = vec![0u8; expected.len()];
        journal
            .read("vol", offset, &mut got, Point::Seq(seq))
            .expect("read at seq");
        assert!(
            got == expected,
            "{mode} write #{index} acknowledged at seq {seq} is not in the journal (resync {report:?})"
        );
    }
    if let Some(at) = production_differs_from_journal(&path, "vol", SIZE) {
        panic!("{mode}: after recovery the production volume and the journal differ at byte {at} (resync {report:?})");
    }
}

fn trials() -> Vec<u64> {
    seeds(4).into_iter().take(16).collect()
}

#[test]
fn sync_mode_survives_sigkill() {
    for seed in trials() {
        run(IoMode::Sync, seed);
    }
}

#[test]
fn async_mode_survives_sigkill() {
    for seed in trials() {
        run(IoMode::Async, seed);
    }
}

#[test]
fn adaptive_mode_survives_sigkill() {
    for seed in trials() {
        run(IoMode::Adaptive, seed);
    }
}
