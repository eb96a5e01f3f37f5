//! Hostile or unlucky NBD clients (target S9): many connections sending
//! the largest writes keep the daemon's memory within its documented
//! bound, connections beyond the limit are closed, a stalled handshake is
//! ended, and fuzzed handshakes and requests get errors while the daemon
//! keeps serving well-behaved clients.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tidemark_tests::raw_nbd::{Conn, IHAVEOPT, REQUEST_MAGIC};
use tidemark_tests::{Daemon, SeedGuard};

const MIB: u64 = 1 << 20;

fn config(limits: &str) -> String {
    format!("{}\n[limits]\n{limits}\n", tidemark_tests::TEST_CONFIG)
}

/// Sends `count` writes of 32 MiB (the largest request) without waiting
/// for replies, then collects every reply.
fn maximal_writes(addr: &str, export: &str, count: u64) {
    let mut c = Conn::open(addr);
    c.flags();
    c.go(export).unwrap();
    let mut reader = c.stream.try_clone().unwrap();
    let replies = std::thread::spawn(move || {
        let mut errors = 0;
        for _ in 0..count {
            let mut head = [0u8; 16];
            reader.read_exact(&mut head).unwrap();
            errors += u32::from(head[4..8] != [0, 0, 0, 0]);
        }
        errors
    });
    let payload = vec![0u8; 32 << 20];
    for i in 0..count {
        c.request(1, i, 0, payload.len() as u32, &payload);
    }
    assert_eq!(replies.join().unwrap(), 0, "a write failed");
}

#[test]
fn many_connections_sending_maximal_writes_stay_within_the_memory_bound() {
    const BUFFERS: u64 = 64 * MIB;
    const CONNECTIONS: u64 = 12;
    let d = Daemon::with_config(&config(&format!(
        "nbd_buffer_memory = \"{}M\"",
        BUFFERS / MIB
    )));
    d.create_volume("big", "64M", "sync");
    let before = d.memory_kib("VmRSS") * 1024;
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let addr = d.nbd.clone();
            std::thread::spawn(move || maximal_writes(&addr, "big", 8))
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let peak = d.memory_kib("VmHWM") * 1024;
    // The documented bound: the NBD buffer budget, each connection's own
    // read and write buffers, and the journal's memory cache (64 MiB in
    // the test configuration); plus headroom for the index and allocator.
    let bound =
        BUFFERS + CONNECTIONS * 2 * tidemark::nbd::CONNECTION_BUFFER as u64 + 64 * MIB + 96 * MIB;
    eprintln!(
        "resident before {} MiB, peak {} MiB, growth {} MiB, bound {} MiB",
        before / MIB,
        peak / MIB,
        (peak - before) / MIB,
        bound / MIB
    );
    assert!(
        peak - before <= bound,
        "the daemon grew by {} MiB under {CONNECTIONS} clients sending 32 MiB writes (bound {} MiB)",
        (peak - before) / MIB,
        bound / MIB
    );
    assert!(d.healthy());
}

#[test]
fn connections_beyond_the_limit_are_closed_and_a_stalled_handshake_is_ended() {
    let d = Daemon::with_config(&config(
        "nbd_connections = 3\nnbd_handshake_timeout = \"1s\"",
    ));
    d.create_volume("v", "4M", "sync");
    let mut open: Vec<Conn> = (0..3)
        .map(|_| {
            let mut c = Conn::open(&d.nbd);
            c.flags();
            c.go("v").unwrap();
            c
        })
        .collect();
    // The fourth is closed before its greeting.
    let mut extra = TcpStream::connect(&d.nbd).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(extra.read(&mut byte), Ok(0) | Err(_)),
        "over the limit"
    );
    // One gone, one more fits.
    drop(open.pop());
    d.eventually(10, "a slot to free up", || {
        let mut c = TcpStream::connect(&d.nbd).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).is_ok()
    });
    drop(open);

    // A client that says nothing after the greeting is cut off. (The
    // slots of the connections just closed free up as the daemon sees
    // them go.)
    let mut silent = None;
    d.eventually(10, "a free slot", || {
        let mut c = TcpStream::connect(&d.nbd).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        let greeted = c.read_exact(&mut greeting).is_ok();
        silent = greeted.then_some(c);
        greeted
    });
    let mut silent = silent.unwrap();
    let started = Instant::now();
    assert!(matches!(silent.read(&mut byte), Ok(0) | Err(_)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );
    let (_, metrics) = d.http_get("/metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidemark_nbd_refused_connections_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
    assert!(d.healthy());
}

/// A well-formed session: flags, a few options, GO, requests, DISC.
fn session(rng: &mut SmallRng) -> Vec<u8> {
    let mut s = 3u32.to_be_bytes().to_vec();
    let option = |s: &mut Vec<u8>, option: u32, data: &[u8]| {
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&option.to_be_bytes());
        s.extend_from_slice(&(data.len() as u32).to_be_bytes());
        s.extend_from_slice(data);
    };
    let info = |name: &str| {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes());
        data
    };
    for _ in 0..rng.random_range(0..3) {
        match rng.random_range(0..3) {
            0 => option(&mut s, 3, b""),
            1 => option(&mut s, 6, &info("f")),
            _ => option(&mut s, rng.random_range(0..20), b"xyz"),
        }
    }
    let export = if rng.random_bool(0.7) {
        "f"
    } else {
        "f@latest"
    };
    option(&mut s, 7, &info(export));
    for handle in 0..rng.random_range(1..8u64) {
        let kind: u16 = [0, 1, 1, 3, 4, 6, 9][rng.random_range(0..7)];
        let offset = rng.random_range(0..(8 * MIB)) & !511;
        let length: u32 = rng.random_range(0..(64 << 10));
        s.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        s.extend_from_slice(&(rng.random_range(0..2u16)).to_be_bytes());
        s.extend_from_slice(&kind.to_be_bytes());
        s.extend_from_slice(&handle.to_be_bytes());
        s.extend_from_slice(&offset.to_be_bytes());
        s.extend_from_slice(&length.to_be_bytes());
        if kind == 1 {
            let start = s.len();
            s.resize(start + length as usize, 0);
            rng.fill(&mut s[start..]);
        }
    }
    s.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 2]);
    s.extend_from_slice(&[0u8; 20]);
    s
}

/// Damages a session: flipped bits, overwritten fields, cuts, splices of
/// noise, huge lengths.
fn mutate(rng: &mut SmallRng, s: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..6) {
        if s.is_empty() {
            break;
        }
        let at = rng.random_range(0..s.len());
        match rng.random_range(0..5) {
            0 => s[at] ^= 1 << rng.random_range(0..8),
            1 => {
                let end = (at + 4).min(s.len());
                s[at..end].fill(0xff);
            }
            2 => s.truncate(at),
            3 => {
                let noise: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                s.splice(at..at, noise);
            }
            _ => {
                let end = (at + 4).min(s.len());
                let big = rng.random::<u32>().to_be_bytes();
                s[at..end].copy_from_slice(&big[..end - at]);
            }
        }
    }
}

/// Sends `bytes` as a client, reads what comes back for a moment, closes.
fn play(addr: &str, bytes: &[u8]) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(300)));
    let mut greeting = [0u8; 18];
    if stream.read_exact(&mut greeting).is_err() {
        return;
    }
    let reader = {
        let mut r = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64 << 10];
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                match r.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                    Err(_) => break,
                }
            }
        })
    };
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = reader.join();
}

/// A well-behaved client still gets its data.
fn still_serves(d: &Daemon, round: u64) {
    let mut c = Conn::open(&d.nbd);
    c.flags();
    c.go("f").unwrap();
    let data = vec![(round % 251) as u8; 4096];
    c.request(1, 1, 8 * MIB, 4096, &data);
    assert_eq!(c.reply(0).unwrap().1, 0, "a good write after fuzzing");
    c.request(0, 2, 8 * MIB, 4096, &[]);
    let (_, error, back) = c.reply(4096).unwrap();
    assert_eq!((error, back), (0, data), "a good read after fuzzing");
}

#[test]
fn fuzzed_handshakes_and_requests_get_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::with_config(&config("nbd_handshake_timeout = \"2s\""));
    d.create_volume("f", "16M", "async");
    let sessions = std::env::var("TIDEMARK_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(150, |n| n * 4);
    for seed in tidemark_tests::seeds(1) {
        let _guard = SeedGuard(seed, "NBD fuzz");
        let mut rng = SmallRng::seed_from_u64(seed);
        for round in 0..sessions {
            let mut bytes = session(&mut rng);
            if rng.random_bool(0.9) {
                mutate(&mut rng, &mut bytes);
            }
            play(&d.nbd, &bytes);
            if round % 25 == 0 {
                still_serves(&d, round);
                assert!(d.healthy(), "seed {seed}, session {round}");
            }
        }
        still_serves(&d, sessions);
    }
    assert!(
        !d.log_text().contains("panicked"),
        "{}",
        tidemark_tests::tail(&d.log_text(), 30)
    );
}

/// A client that goes away with sync writes in flight leaves none of them
/// unsettled: a write left so would keep its region busy for good, and
/// the region would never be clean again.
#[test]
fn sync_writes_in_flight_when_the_client_leaves_are_settled() {
    let d = Daemon::start();
    d.create_volume("v", "64M", "sync");
    let payload = vec![7u8; 4096];
    // Mark the regions first (answers read), so the writes below begin on
    // the connection's task and wait in its settling task.
    let mut c = Conn::open(&d.nbd);
    c.flags();
    c.go("v").unwrap();
    for i in 0..48u64 {
        c.request(1, i, i * MIB, 4096, &payload);
    }
    for _ in 0..48 {
        let mut head = [0u8; 16];
        c.stream.read_exact(&mut head).unwrap();
        assert_eq!(head[4..8], [0, 0, 0, 0], "a write failed");
    }
    drop(c);
    for round in 0..3u64 {
        let mut c = Conn::open(&d.nbd);
        c.flags();
        c.go("v").unwrap();
        for i in 0..48u64 {
            c.request(1, round * 100 + i, i * MIB + 8192, 4096, &payload);
        }
        // Gone without reading a reply.
        c.stream.shutdown(std::net::Shutdown::Both).unwrap();
    }
    d.eventually(30, "every dirty region cleaned", || {
        d.metric("tidemark_dirty_regions", "v") == Some(0.0)
    });
    assert!(d.healthy());
}
