//! Standard NBD clients against live and point-in-time exports, fio with
//! verification in every IO mode, and malformed NBD traffic.

#![allow(clippy::unwrap_used)]

use tidemark_tests::raw_nbd::Conn;
use tidemark_tests::{fio_verify, require, run, run_any, Daemon};

#[test]
fn fio_verifies_random_and_sequential_writes_in_every_mode() {
    if !require(
        "fio",
        "fio_verifies_random_and_sequential_writes_in_every_mode",
    ) {
        return;
    }
    let d = Daemon::start();
    for mode in ["sync", "async", "adaptive"] {
        let volume = format!("fio-{mode}");
        d.create_volume(&volume, "64M", mode);
        let uri = d.uri(&volume);
        for (rw, bs, size) in [("randwrite", "4k", "16M"), ("write", "1M", "48M")] {
            fio_verify(&uri, rw, bs, size, &format!("a {mode} volume"));
        }
        // What fio wrote is journalled: the latest point equals the live volume.
        let live = d.path(&format!("{volume}.live"));
        let point = d.path(&format!("{volume}.point"));
        run("nbdcopy", &[&uri, &live.display().to_string()]);
        d.ok(&["volume", "set-mode", &volume, "sync"]);
        run(
            "nbdcopy",
            &[
                &d.uri(&format!("{volume}@latest")),
                &point.display().to_string(),
            ],
        );
        assert!(
            std::fs::read(&live).unwrap() == std::fs::read(&point).unwrap(),
            "{mode}: the journal's latest point differs from the live volume"
        );
    }
}

#[test]
fn standard_clients_read_live_and_point_in_time_exports() {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"] {
        if !require(tool, "standard_clients_read_live_and_point_in_time_exports") {
            return;
        }
    }
    let d = Daemon::start();
    d.create_volume("vm", "32M", "sync");
    let first = d.path("first.bin");
    std::fs::write(&first, vec![0x11u8; 32 << 20]).unwrap();
    run("nbdcopy", &[&first.display().to_string(), &d.uri("vm")]);
    d.ok(&["tag", "create", "vm", "ones"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x22 0 4M", &d.uri("vm")],
    );

    let info = run("nbdinfo", &["--json", &d.uri("vm")]);
    assert!(info.contains("\"export-size\": 33554432"), "{info}");
    let info = run("nbdinfo", &["--json", &d.uri("vm@tag:ones")]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let list = run("nbdinfo", &["--list", &format!("nbd://{}", d.nbd)]);
    assert!(list.contains("vm"), "{list}");

    let img = run(
        "qemu-img",
        &["info", "--output=json", "-f", "raw", &d.uri("vm@tag:ones")],
    );
    assert!(img.contains("\"virtual-size\": 33554432"), "{img}");
    let tagged = d.path("tagged.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &d.uri("vm@tag:ones"),
            &tagged.display().to_string(),
        ],
    );
    assert!(std::fs::read(&tagged).unwrap().iter().all(|&b| b == 0x11));
    let live = d.path("live.raw");
    run("nbdcopy", &[&d.uri("vm"), &live.display().to_string()]);
    let live = std::fs::read(&live).unwrap();
    assert!(
        live[..4 << 20].iter().all(|&b| b == 0x22) && live[4 << 20..].iter().all(|&b| b == 0x11)
    );

    // A view is read-only; a write through it fails and changes nothing.
    let out = run_any(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 4k",
            &d.uri("vm@tag:ones"),
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("ermission") || text.contains("read-only"),
        "{text}"
    );

    // A writable export takes writes into its overlay only.
    let uri = d
        .ok(&["export", "vm", "--at", "tag:ones", "--writable"])
        .trim()
        .to_string();
    assert!(uri.starts_with("nbd://"), "{uri}");
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 4096 8k", &uri],
    );
    let scratch = d.path("scratch.raw");
    run("nbdcopy", &[&uri, &scratch.display().to_string()]);
    let scratch = std::fs::read(&scratch).unwrap();
    assert!(scratch[4096..12288].iter().all(|&b| b == 0x44));
    assert!(scratch[..4096]
        .iter()
        .chain(&scratch[12288..])
        .all(|&b| b == 0x11));
    let export = uri.rsplit('/').next().unwrap();
    d.ok(&["unexport", export]);
    run(
        "nbdcopy",
        &[&d.uri("vm@tag:ones"), &tagged.display().to_string()],
    );
    assert!(
        std::fs::read(&tagged).unwrap().iter().all(|&b| b == 0x11),
        "overlay writes leaked into the point"
    );

    // Restore a point to a file: byte for byte the export.
    let restored = d.path("restored.raw");
    d.ok(&[
        "restore",
        "vm",
        "--at",
        "tag:ones",
        "--to",
        &restored.display().to_string(),
    ]);
    assert!(std::fs::read(&restored).unwrap().iter().all(|&b| b == 0x11));
}

#[test]
fn malformed_nbd_traffic_gets_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    d.create_volume("db", "1M", "sync");
    d.ok(&["tag", "create", "db", "empty"]);

    // Garbage instead of client flags: closed.
    let mut c = Conn::open(&d.nbd);
    std::io::Write::write_all(&mut c.stream, &[0xff; 64]).unwrap();
    assert!(c.closed());
    // Bad option magic: closed.
    let mut c = Conn::open(&d.nbd);
    c.flags();
    std::io::Write::write_all(&mut c.stream, &[0x42; 16]).unwrap();
    assert!(c.closed());
    // An option claiming a gigabyte of data: refused, closed.
    let mut c = Conn::open(&d.nbd);
    c.flags();
    let mut msg = tidemark_tests::raw_nbd::IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&(1u32 << 30).to_be_bytes());
    std::io::Write::write_all(&mut c.stream, &msg).unwrap();
    assert_eq!(c.option_reply().unwrap().0, (1 << 31) | 9);
    assert!(c.closed());
    // Unknown export, bad point, point outside history: errors with reasons, negotiation goes on.
    let mut c = Conn::open(&d.nbd);
    c.flags();
    let (kind, text) = c.go("nope").unwrap_err();
    assert_eq!(kind, (1 << 31) | 6);
    assert!(text.contains("unknown volume \"nope\""), "{text}");
    let (_, text) = c.go("db@sometime").unwrap_err();
    assert!(text.contains("invalid point"), "{text}");
    let (_, text) = c.go("db@99999").unwrap_err();
    assert!(text.contains("outside the retained history"), "{text}");
    c.option(99, b"");
    assert_eq!(c.option_reply().unwrap().0, (1 << 31) | 1);
    let (size, _) = c.go("db").unwrap();
    assert_eq!(size, 1 << 20);

    // Transmission: out of range, oversized, read-only and unknown
    // requests get errnos; the connection carries on.
    let check = |c: &mut Conn, handle: u64, want: u32, data_len: usize| {
        let (h, error, _) = c.reply(data_len).unwrap();
        assert_eq!((h, error), (handle, want), "request {handle}");
    };
    c.request(0, 1, (1 << 20) - 512, 4096, &[]);
    check(&mut c, 1, 22, 4096); // read past the end: EINVAL
    c.request(1, 2, (1 << 20) - 512, 4096, &[0u8; 4096]);
    check(&mut c, 2, 28, 0); // write past the end: ENOSPC
    c.request(0, 3, 0, 64 << 20, &[]);
    check(&mut c, 3, 22, 0); // read larger than the maximum: EINVAL
    c.request(99, 4, 0, 0, &[]);
    check(&mut c, 4, 22, 0); // unknown command: EINVAL
    c.request(1, 5, u64::MAX - 10, 4096, &[7u8; 4096]);
    check(&mut c, 5, 28, 0); // offset overflow
                             // Many requests in flight at once.
    for h in 0..32u64 {
        c.request(1, 100 + h, h * 4096, 4096, &[h as u8; 4096]);
    }
    let mut handles: Vec<u64> = (0..32)
        .map(|_| c.reply(0).unwrap())
        .map(|(h, e, _)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (100..132).collect::<Vec<u64>>());
    c.request(0, 200, 5 * 4096, 4096, &[]);
    let (_, error, data) = c.reply(4096).unwrap();
    assert_eq!(error, 0);
    assert!(data.iter().all(|&b| b == 5));
    c.request(3, 201, 0, 0, &[]);
    check(&mut c, 201, 0, 0); // flush
                              // A bad request magic ends the connection.
    std::io::Write::write_all(&mut c.stream, &[0u8; 28]).unwrap();
    assert!(c.closed());

    // A read-only view refuses writes with EPERM.
    let mut v = Conn::open(&d.nbd);
    v.flags();
    let (_, flags) = v.go("db@tag:empty").unwrap();
    assert_ne!(flags & 2, 0, "view is not flagged read-only");
    v.request(1, 1, 0, 4096, &[1u8; 4096]);
    check(&mut v, 1, 1, 0);
    v.request(0, 2, 0, 4096, &[]);
    let (_, error, data) = v.reply(4096).unwrap();
    assert_eq!(error, 0);
    assert!(
        data.iter().all(|&b| b == 0),
        "the view shows the tagged (empty) state"
    );
    drop(v);

    assert!(d.healthy());
    let info = run("nbdinfo", &["--size", &d.uri("db")]);
    assert_eq!(info.trim(), (1 << 20).to_string());
}

/// A block device as the production volume (`--backing /dev/…`): its size
/// comes from the kernel, a device smaller than the volume is refused by
/// name, and writes through the live export land on the device and in the
/// journal. A loop device stands in; skipped where there is none.
#[test]
fn a_block_device_is_a_production_volume() {
    let test = "a_block_device_is_a_production_volume";
    if !require("losetup", test) {
        return;
    }
    let d = Daemon::start();
    let image = d.path("device.img");
    std::fs::write(&image, vec![0u8; 32 << 20]).unwrap();
    let out = run_any("losetup", &["-f", "--show", &image.display().to_string()]);
    if !out.status.success() {
        tidemark_tests::skip(
            test,
            &format!(
                "no loop device ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
        return;
    }
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = run_any("losetup", &["-d", &self.0]);
        }
    }
    let _detach = Detach(device.clone());

    let out = d.cli(&[
        "volume",
        "create",
        "toobig",
        "--size",
        "64M",
        "--backing",
        &device,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&device) && stderr.contains("block device") && stderr.contains("33554432"),
        "{stderr}"
    );
    assert!(!d.ok(&["volume", "list"]).contains("toobig"));

    d.ok(&[
        "volume",
        "create",
        "dev",
        "--size",
        "32M",
        "--backing",
        &device,
        "--mode",
        "sync",
    ]);
    let mut data = vec![0u8; 4 << 20];
    rand::Rng::fill(
        &mut <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(3),
        &mut data[..],
    );
    let src = d.path("src.img");
    std::fs::write(&src, &data).unwrap();
    run("nbdcopy", &[&src.display().to_string(), &d.uri("dev")]);
    let mut on_device = vec![0u8; 4 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open(&device).unwrap(), &mut on_device).unwrap();
    assert!(on_device == data, "the writes are on the block device");
    let back = d.path("back.img");
    run(
        "nbdcopy",
        &[&d.uri("dev@latest"), &back.display().to_string()],
    );
    assert!(
        std::fs::read(&back).unwrap()[..4 << 20] == data[..],
        "and in the journal"
    );
    assert!(d.healthy());
}
