//! R1: time from connecting to an NBD export to its first byte read.
//!
//! `nbd-first-byte HOST:PORT EXPORT [ROUNDS]` connects, negotiates
//! `NBD_OPT_GO` for EXPORT (e.g. `db@12345`), reads 4 KiB at a random
//! offset, and prints the median and worst time over ROUNDS connections
//! in milliseconds: `median_ms worst_ms`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use rand::Rng;

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read from the NBD server");
    buf
}

fn first_byte(addr: &str, export: &str) -> f64 {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    read_exact(&mut s, 18);
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).expect("NBD_OPT_GO");
    let mut size = 0u64;
    loop {
        let header = read_exact(&mut s, 20);
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default()) as usize;
        let data = read_exact(&mut s, len);
        match kind {
            3 if data.len() >= 10 && data[0..2] == [0, 0] => {
                size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default())
            }
            3 => {}
            1 => break,
            _ => panic!("export {export}: {}", String::from_utf8_lossy(&data)),
        }
    }
    let offset = rand::rng().random_range(0..size / 4096) * 4096;
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&1u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    s.write_all(&req).expect("read request");
    let reply = read_exact(&mut s, 16);
    assert_eq!(reply[4..8], [0, 0, 0, 0], "read failed");
    read_exact(&mut s, 4096);
    started.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: nbd-first-byte HOST:PORT EXPORT [ROUNDS]");
        std::process::exit(2);
    }
    let rounds: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(20);
    let mut times: Vec<f64> = (0..rounds)
        .map(|_| first_byte(&args[1], &args[2]))
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{:.2} {:.2}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
