//! Sparse volumes at the speed of their data: structured replies and NBD
//! block status (`base:allocation`) on live and point exports, read by the
//! standard tools — `nbdinfo --map`, `qemu-img map`, `nbdcopy` — and
//! tidemark's own `tidemark:changed:POINT` context, which tells an
//! incremental copy what changed since a point.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;

use tidemark_tests::{require, run, Daemon};

const MIB: u64 = 1 << 20;

/// `nbdinfo --map[=CONTEXT]` as `(offset, length, type)` lines.
fn map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    run("nbdinfo", &[&flag, uri])
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The ranges of a map whose type is not a hole (bit 0 clear) — or, for
/// the changed context, whose bit 0 is set.
fn ranges(map: &[(u64, u64, u32)], hole_bit_means_data: bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(offset, length, kind) in map {
        let set = (kind & 1 != 0) == hole_bit_means_data;
        if !set {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += length,
            _ => out.push((offset, length)),
        }
    }
    out
}

fn write(uri: &str, pattern: u8, offset: u64, len: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
            uri,
        ],
    );
}

#[test]
fn block_status_maps_live_and_point_exports_and_what_changed_since_a_point() {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"] {
        if !require(tool, "block_status_maps_live_and_point_exports") {
            return;
        }
    }
    let d = Daemon::start();
    d.create_volume("db", "256M", "sync");
    write(&d.uri("db"), 0xab, 0, MIB);
    write(&d.uri("db"), 0xcd, 64 * MIB, 2 * MIB);
    d.ok(&["tag", "create", "db", "first"]);
    write(&d.uri("db"), 0xef, 200 * MIB, MIB);

    // The live volume and its newest point: data where it was written,
    // holes elsewhere.
    let written = vec![(0, MIB), (64 * MIB, 2 * MIB), (200 * MIB, MIB)];
    assert_eq!(ranges(&map(&d.uri("db"), None), false), written, "live");
    assert_eq!(
        ranges(&map(&d.uri("db@latest"), None), false),
        written,
        "db@latest"
    );
    // The tagged point has only what was written before the tag. (A point
    // may claim data where there is none, never the reverse: here the
    // journal knows exactly.)
    let at_tag = ranges(&map(&d.uri("db@tag:first"), None), false);
    for (offset, length) in [(0, MIB), (64 * MIB, 2 * MIB)] {
        assert!(
            at_tag
                .iter()
                .any(|&(o, l)| o <= offset && offset + length <= o + l),
            "{at_tag:?}"
        );
    }

    // What changed since the tag: the one write after it.
    let changed = map(&d.uri("db@latest"), Some("tidemark:changed:tag:first"));
    assert_eq!(
        ranges(&changed, true),
        vec![(200 * MIB, MIB)],
        "{changed:?}"
    );
    // Between two points, exactly what changed between them: a write
    // after the later point is not in the map of that point.
    d.ok(&["tag", "create", "db", "second"]);
    write(&d.uri("db"), 0x12, 100 * MIB, MIB);
    let between = map(&d.uri("db@tag:second"), Some("tidemark:changed:tag:first"));
    assert_eq!(
        ranges(&between, true),
        vec![(200 * MIB, MIB)],
        "{between:?}"
    );
    // A writable view of the later point: its own writes changed it too,
    // as they come.
    let view = d
        .ok(&["export", "db", "--at", "tag:second", "--writable"])
        .trim()
        .to_string();
    let changed_view = |uri: &str| ranges(&map(uri, Some("tidemark:changed:tag:first")), true);
    assert_eq!(changed_view(&view), vec![(200 * MIB, MIB)]);
    write(&view, 0x34, 8 * MIB, 8192);
    assert_eq!(changed_view(&view), vec![(8 * MIB, 8192), (200 * MIB, MIB)]);
    d.ok(&["unexport", view.rsplit('/').next().unwrap()]);
    // The 100 MiB write is in the live volume's and `@latest`'s maps.
    let written = vec![
        (0, MIB),
        (64 * MIB, 2 * MIB),
        (100 * MIB, MIB),
        (200 * MIB, MIB),
    ];

    // A point that is not there selects no context: nbdinfo says so.
    let out = tidemark_tests::run_any(
        "nbdinfo",
        &["--map=tidemark:changed:tag:nope", &d.uri("db@latest")],
    );
    assert!(!out.status.success() || out.stdout.is_empty());

    // qemu-img sees the same.
    let json = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &d.uri("db@latest")],
    );
    let extents: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, written, "{json}");

    // nbdcopy copies the data only, and the copy reads back exactly.
    for export in ["db", "db@latest", "db@tag:first"] {
        let out = d.path(&format!("{}.img", export.replace(['@', ':'], "_")));
        std::fs::File::create(&out).unwrap();
        run("nbdcopy", &[&d.uri(export), &out.display().to_string()]);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() as u64, 256 * MIB);
        let expect = |offset: u64| -> u8 {
            match offset {
                o if o < MIB => 0xab,
                o if (64 * MIB..66 * MIB).contains(&o) => 0xcd,
                o if (200 * MIB..201 * MIB).contains(&o) && export != "db@tag:first" => 0xef,
                o if (100 * MIB..101 * MIB).contains(&o) && export != "db@tag:first" => 0x12,
                _ => 0,
            }
        };
        for offset in (0..256 * MIB).step_by(4096) {
            assert_eq!(
                bytes[offset as usize],
                expect(offset),
                "{export} at {offset}"
            );
        }
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated <= 10 * MIB,
            "{export}: the copy wrote {allocated} bytes for 5 MiB of data"
        );
    }
}
