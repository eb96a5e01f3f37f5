//! The CLI and gRPC surface against a real daemon: volumes, tags,
//! timeline, exports, JSON shapes, exit codes, persistence across a
//! restart, and bad input that must leave the daemon serving.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidemark_tests::{run, Daemon};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn volumes_tags_and_timeline_survive_a_restart() {
    let mut d = Daemon::start();
    d.create_volume("db", "64M", "sync");
    d.ok(&[
        "volume", "create", "logs", "--size", "16M", "--mode", "async", "--group", "dbgroup",
    ]);

    let list = d.json(&["volume", "list", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "logs"]);
    for v in list.as_array().unwrap() {
        for field in ["name", "size", "mode", "group", "newest_seq", "horizon_seq"] {
            assert!(v.get(field).is_some(), "volume list lacks {field}: {v}");
        }
    }
    assert_eq!(list[0]["size"], 64 << 20);
    assert_eq!(list[1]["group"], "dbgroup");
    assert_eq!(list[1]["mode"], "async");

    // Write through NBD, tag, write more.
    let data = d.path("a.bin");
    std::fs::write(&data, vec![0xA5u8; 1 << 20]).unwrap();
    run(
        "nbdcopy",
        &[
            "--destination-is-zero",
            &data.display().to_string(),
            &d.uri("db"),
        ],
    );
    d.ok(&[
        "tag",
        "create",
        "db",
        "first",
        "--note",
        "after the first MiB",
    ]);
    let tags = d.json(&["tag", "list", "db", "--json"]);
    let tag = &tags[0];
    for field in [
        "name",
        "seq",
        "time",
        "source",
        "consistency",
        "verified",
        "note",
    ] {
        assert!(tag.get(field).is_some(), "tag lacks {field}: {tag}");
    }
    assert_eq!(tag["source"], "manual");
    assert_eq!(tag["consistency"], "crash");
    assert_eq!(tag["verified"], "none");
    assert_eq!(tag["note"], "after the first MiB");

    d.ok(&["volume", "set-mode", "db", "adaptive"]);
    let show = d.json(&["volume", "show", "db", "--json"]);
    assert_eq!(show["mode"], "adaptive");
    assert!(
        show["cache"].get("memory_bytes").is_some() && show["cache"].get("file_bytes").is_some()
    );

    let timeline = d.json(&["timeline", "db", "--json"]);
    for field in ["volume", "horizon_seq", "newest_seq", "entries"] {
        assert!(timeline.get(field).is_some(), "timeline lacks {field}");
    }
    let kinds: Vec<&str> = timeline["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"tag") && kinds.contains(&"flush") && kinds.contains(&"event"),
        "{timeline}"
    );
    let mode_event = timeline["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "io-mode");
    assert!(
        mode_event.is_some(),
        "the mode change is not on the timeline: {timeline}"
    );

    let status = d.json(&["status", "--json"]);
    assert_eq!(status["role"], "primary");
    assert!(status.get("epoch").is_some() && status["volumes"].as_array().unwrap().len() == 2);

    d.restart();
    let list = d.json(&["volume", "list", "--json"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "volumes did not survive the restart"
    );
    assert_eq!(
        d.json(&["volume", "show", "db", "--json"])["mode"],
        "adaptive"
    );
    let tags = d.json(&["tag", "list", "db", "--json"]);
    assert_eq!(tags[0]["name"], "first");
    let back = d.path("back.bin");
    run(
        "nbdcopy",
        &[&d.uri("db@tag:first"), &back.display().to_string()],
    );
    let got = std::fs::read(&back).unwrap();
    assert!(got[..1 << 20].iter().all(|&b| b == 0xA5) && got[1 << 20..].iter().all(|&b| b == 0));

    d.ok(&["tag", "delete", "db", "first"]);
    assert_eq!(
        d.json(&["tag", "list", "db", "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    d.ok(&["volume", "delete", "logs", "--yes"]);
    assert!(
        !d.path("data/groups/dbgroup").exists(),
        "an empty group's journal is removed"
    );
    assert_eq!(
        d.json(&["volume", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn bad_input_gets_clear_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    d.create_volume("db", "16M", "sync");
    let cases: [(&[&str], i32, &str); 13] = [
        (&["volume", "show", "nope"], 1, "unknown volume \"nope\""),
        (
            &["volume", "create", "x", "--size", "12Q"],
            2,
            "unknown unit",
        ),
        (
            &["volume", "create", "x", "--size", "100"],
            1,
            "multiple of 512",
        ),
        (
            &["volume", "create", "bad/name", "--size", "1M"],
            1,
            "contains '/'",
        ),
        (
            &["volume", "create", "db", "--size", "1M"],
            1,
            "already exists",
        ),
        (
            &["volume", "create", "y", "--size", "1M", "--mode", "fast"],
            2,
            "must be \"sync\"",
        ),
        (&["export", "db", "--at", "yesterday"], 2, "invalid point"),
        (
            &["export", "db", "--at", "-10d"],
            1,
            "outside the retained history",
        ),
        (
            &["export", "db", "--at", "999999"],
            1,
            "outside the retained history",
        ),
        (
            &["export", "db", "--at", "tag:none"],
            1,
            "no tag named \"none\"",
        ),
        (
            &["export", "db", "--at", "last-verified"],
            1,
            "verification passed",
        ),
        (&["rollback", "db", "--to", "latest"], 2, "without --yes"),
        (&["unexport", "db@7"], 1, "no export named"),
    ];
    for (args, code, text) in cases {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(text),
            "{args:?}: {:?} lacks {text:?}",
            stderr(&out)
        );
        assert!(d.healthy(), "daemon stopped serving after {args:?}");
    }
    // Out-of-range point: the error says what range is available.
    let out = d.cli(&["export", "db", "--at", "999999"]);
    assert!(
        stderr(&out).contains("available: seq 0..="),
        "{}",
        stderr(&out)
    );
    // No daemon at all: exit 1 with a hint.
    let out = std::process::Command::new(tidemark_tests::binary())
        .args(["--server", "127.0.0.1:1", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the tidemark daemon"),
        "{}",
        stderr(&out)
    );
    // A config with an unknown field is refused, naming it.
    let cfg = d.path("bad.toml");
    std::fs::write(&cfg, "[journal]\nmemroy_cache = \"1G\"\n").unwrap();
    let out = std::process::Command::new(tidemark_tests::binary())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("memroy_cache"), "{}", stderr(&out));
}

#[test]
fn metrics_and_health_are_served() {
    let d = Daemon::start();
    d.create_volume("db", "16M", "sync");
    let data = d.path("a.bin");
    std::fs::write(&data, vec![7u8; 256 << 10]).unwrap();
    run("nbdcopy", &[&data.display().to_string(), &d.uri("db")]);
    let (code, body) = d.http_get("/healthz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = d.http_get("/metrics");
    assert_eq!(code, 200);
    for metric in [
        "tidemark_writes_total{volume=\"db\"",
        "tidemark_written_bytes_total{volume=\"db\"",
        "tidemark_journal_bytes{group=\"db\"}",
        "tidemark_cache_bytes{group=\"db\",tier=\"memory\"}",
        "tidemark_cache_bytes{group=\"db\",tier=\"file\"}",
        "tidemark_io_mode{volume=\"db\",configured=\"sync\",mode=\"sync\"} 1",
        "tidemark_mode_switches_total{volume=\"db\"",
        "tidemark_nbd_request_seconds_bucket{op=\"write\",le=\"+Inf\"}",
        "tidemark_tags{volume=\"db\"",
    ] {
        assert!(body.contains(metric), "metrics lack {metric}:\n{body}");
    }
    let writes = metric(&body, "tidemark_written_bytes_total{volume=\"db\"").unwrap();
    assert!(writes >= 256 << 10, "written bytes {writes}");
}

/// The value of the first `/metrics` line starting with `series`.
fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn every_group_draws_on_one_cache_budget_and_a_drained_ring_holds_no_disk() {
    let d = Daemon::with_config(
        "log = \"info\"\n[journal]\nmemory_cache = \"2M\"\nfile_cache = \"16M\"\ncache_tiers = \"file\"\n",
    );
    let data = d.path("a.bin");
    std::fs::write(&data, vec![5u8; 2 << 20]).unwrap();
    for name in ["a", "b", "c"] {
        d.create_volume(name, "8M", "sync");
        // Every record of these volumes goes through its group's ring.
        run("nbdcopy", &[&data.display().to_string(), &d.uri(name)]);
    }
    let mut body = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        body = d.http_get("/metrics").1;
        if metric(&body, "tidemark_cache_budget_used_bytes{tier=\"file\"}") == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(&body, "tidemark_cache_budget_limit_bytes{tier=\"file\"}"),
        Some(16 << 20)
    );
    assert_eq!(
        metric(&body, "tidemark_cache_budget_limit_bytes{tier=\"memory\"}"),
        Some(2 << 20)
    );
    for group in ["a", "b", "c"] {
        assert_eq!(
            metric(
                &body,
                &format!("tidemark_cache_limit_bytes{{group=\"{group}\",tier=\"memory\"}}")
            ),
            Some(2 << 20),
            "group {group} has a memory bound of its own:\n{body}"
        );
        assert_eq!(
            metric(
                &body,
                &format!("tidemark_cache_file_disk_bytes{{group=\"{group}\"}}")
            ),
            Some(0),
            "group {group}'s drained ring still holds disk:\n{body}"
        );
    }
    assert_eq!(
        metric(&body, "tidemark_cache_budget_used_bytes{tier=\"file\"}"),
        Some(0),
        "the drained rings did not give their disk back:\n{body}"
    );
    // Three 16 MiB rings, none holding the 16 MiB it may grow to.
    let mut on_disk = 0;
    for group in ["a", "b", "c"] {
        use std::os::unix::fs::MetadataExt;
        let ring = d.path(&format!("data/groups/{group}/cache/file-cache.ring"));
        let meta = std::fs::metadata(&ring).unwrap();
        assert_eq!(meta.len(), 4096 + (16 << 20), "{}", ring.display());
        on_disk += meta.blocks() * 512;
    }
    assert!(
        on_disk <= 3 * (64 << 10),
        "the rings hold {on_disk} bytes of disk though all are drained"
    );
    // The volumes still read back what was written through the rings.
    let back = d.path("back.bin");
    run(
        "nbdcopy",
        &[&d.uri("c@latest"), &back.display().to_string()],
    );
    assert_eq!(
        std::fs::read(&back).unwrap()[..2 << 20],
        std::fs::read(&data).unwrap()[..]
    );
}

#[test]
fn protecting_a_volume_that_holds_data_starts_with_an_initial_sync() {
    let d = Daemon::start();
    let backing = d.path("existing.img");
    let mut data = vec![0u8; 8 << 20];
    for (i, chunk) in data
        .chunks_mut(4096)
        .enumerate()
        .filter(|(i, _)| i % 5 == 0)
    {
        chunk.fill(i as u8 | 1);
    }
    std::fs::write(&backing, &data).unwrap();
    d.ok(&[
        "volume",
        "create",
        "old",
        "--size",
        "8M",
        "--backing",
        &backing.display().to_string(),
    ]);
    let timeline = d.json(&["timeline", "old", "--json"]);
    assert!(
        timeline["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "initial-sync"),
        "{timeline}"
    );
    let first = d.path("first.img");
    run(
        "nbdcopy",
        &[&d.uri("old@latest"), &first.display().to_string()],
    );
    assert!(
        std::fs::read(&first).unwrap() == data,
        "the first point is not what the volume held"
    );
    // The user's production volume is never restored over, nor deleted.
    let out = d.cli(&[
        "restore",
        "old",
        "--at",
        "latest",
        "--to",
        &backing.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is the production volume of old"),
        "{}",
        stderr(&out)
    );
    d.ok(&["volume", "delete", "old", "--yes"]);
    assert!(std::fs::read(&backing).unwrap() == data);
}

/// A reader that closes the pipe before the CLI prints (`| grep -q`,
/// `| head`) ends it quietly, without a panic.
#[test]
fn a_closed_output_pipe_ends_the_cli_quietly() {
    let d = Daemon::start();
    d.create_volume("piped", "8M", "sync");
    let mut child = d
        .cli_command(&["volume", "list", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
