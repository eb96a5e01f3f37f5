//! The archive against a real S3-compatible server (moto, on its own
//! loopback port): ext4 through nbdfuse, tags, writes over several sealed
//! segments and a retention fold; the data directory deleted; restore from
//! the bucket alone at a tag and at a time, byte for byte, `e2fsck -fn`
//! clean; a second daemon with an empty data directory serving a tag from
//! the bucket; the server stopped mid-upload; a corrupted object named.
//! Skipped with a reason where moto (or FUSE, for the filesystem) is
//! missing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tidemark_tests::ext4::{can_mount, fsck_clean, write_files, Mounted};
use tidemark_tests::raw_nbd::Conn;
use tidemark_tests::s3::Moto;
use tidemark_tests::{binary, nbd_to_file, run, Daemon};

const BUCKET: &str = "tidemark-archive";

fn config(moto: &Moto, prefix: &str) -> String {
    config_with(moto, prefix, "10M")
}

/// `segment` sets the journal's segment size: at 64M objects of more than
/// 16 MiB go up as multipart uploads.
fn config_with(moto: &Moto, prefix: &str, segment: &str) -> String {
    format!(
        r#"
log = "info,tidemark_replicator=debug"
[journal]
segment_size = "{segment}"
max_record = "1M"
memory_cache = "32M"
file_cache = "32M"
sync_timeout = "20s"
[retention]
max_bytes = "20M"
interval = "1s"
[archive]
url = "s3://{BUCKET}/{prefix}"
endpoint = "{}"
region = "us-east-1"
upload_after = "1s"
base_every = "1s"
timeout = "3s"
"#,
        moto.endpoint
    )
}

/// Starts moto with a bucket and sets the AWS environment every tidemark
/// process of this test inherits (the same values in every test).
fn moto(test: &str) -> Option<Moto> {
    let moto = Moto::start(test)?;
    moto.create_bucket(BUCKET);
    for (key, value) in moto.env() {
        std::env::set_var(key, value);
    }
    Some(moto)
}

/// Waits until the archive holds everything the group has journalled and
/// has made at least `bases` base versions.
fn wait_archived(d: &Daemon, volume: &str, what: &str) -> serde_json::Value {
    let newest = d.json(&["volume", "show", volume, "--json"])["newest_seq"]
        .as_u64()
        .unwrap();
    let mut last = serde_json::Value::Null;
    d.eventually(90, what, || {
        last = d.json(&["archive", "status", "--json"]);
        last["groups"][0]["archived_seq"].as_u64().unwrap_or(0) >= newest
    });
    last
}

fn restore_from_archive(moto: &Moto, prefix: &str, at: &str, to: &Path) -> std::process::Output {
    Command::new(binary())
        .args(["restore", "db", "--at", at, "--to"])
        .arg(to)
        .args([
            "--from-archive",
            &format!("s3://{BUCKET}/{prefix}"),
            "--endpoint",
            &moto.endpoint,
        ])
        // No daemon: nothing may be asked of one.
        .env("TIDEMARK_SERVER", "127.0.0.1:1")
        .output()
        .unwrap()
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn ext4_restored_from_the_bucket_alone_and_served_from_it_by_an_empty_daemon() {
    let test = "ext4_restored_from_the_bucket_alone_and_served_from_it_by_an_empty_daemon";
    let Some(moto) = moto(test) else { return };
    if !can_mount(test) {
        return;
    }
    let mut d = Daemon::with_config(&config(&moto, "site-a"));
    d.create_volume("db", "64M", "sync");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut m = Mounted::new(&d, "db", true);
    write_files(&m.mnt.join("a"), "first", 24, &mut rng);
    m.freeze_and(|| {
        d.ok(&["tag", "create", "db", "first"]);
    });
    write_files(&m.mnt.join("b"), "second", 24, &mut rng);
    m.freeze_and(|| {
        d.ok(&["tag", "create", "db", "second"]);
    });
    // More than the journal keeps: retention folds behind the archive.
    for round in 0..4 {
        write_files(&m.mnt.join(format!("c{round}")), "third", 32, &mut rng);
        run("sync", &[]);
    }
    m.unmount();
    let first = d.path("first.img");
    let second = d.path("second.img");
    nbd_to_file(&d.uri("db@tag:first"), &first);
    nbd_to_file(&d.uri("db@tag:second"), &second);
    let tags = d.tags("db");
    let second_time = tags.iter().find(|t| t["name"] == "second").unwrap()["time"]
        .as_str()
        .unwrap()
        .to_string();
    // The same point by its seq.
    let second_seq = tags.iter().find(|t| t["name"] == "second").unwrap()["seq"]
        .as_u64()
        .unwrap()
        .to_string();

    let status = wait_archived(&d, "db", "the archive to catch up");
    let group = &status["groups"][0];
    for field in [
        "group",
        "archived_seq",
        "archived_time",
        "lag_seconds",
        "bytes",
        "objects",
        "last_error",
    ] {
        assert!(
            group.get(field).is_some(),
            "archive status lacks {field}: {status}"
        );
    }
    assert!(
        status["url"].as_str().unwrap().starts_with("s3://"),
        "{status}"
    );
    d.eventually(60, "retention to fold behind the archive", || {
        d.json(&["volume", "show", "db", "--json"])["horizon_seq"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let (_, metrics) = d.http_get("/metrics");
    assert!(
        metrics.contains("tidemark_archive_archived_seq{group="),
        "{metrics}"
    );
    let archived_at: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("tidemark_archive_archived_timestamp_seconds{group=")?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no archived time in /metrics: {metrics}"));
    assert!(archived_at > 1.7e9, "archived up to {archived_at}");

    // Everything local is lost.
    d.stop();
    std::fs::remove_dir_all(d.path("data")).unwrap();

    for (at, want) in [
        ("tag:first", &first),
        (second_time.as_str(), &second),
        (second_seq.as_str(), &second),
    ] {
        let to = d.path("restored.img");
        let out = restore_from_archive(&moto, "site-a", at, &to);
        if !out.status.success() {
            for k in moto.list_keys(BUCKET) {
                if k.contains("index") {
                    eprintln!(
                        "{k}: {}",
                        String::from_utf8_lossy(&moto.get_raw(BUCKET, &k))
                    );
                }
            }
            eprintln!("{}", d.log_text());
        }
        assert!(
            out.status.success(),
            "restore --from-archive at {at}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(same(&to, want), "restore at {at} differs from the export");
        fsck_clean(&to).unwrap();
    }
    let out = restore_from_archive(&moto, "site-a", "tag:nope", &d.path("x.img"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tag named \"nope\""));

    // A daemon that never held the volume serves its points from the bucket.
    let empty = Daemon::with_config(&config(&moto, "site-a"));
    let started = Instant::now();
    let mut conn = Conn::open(&empty.nbd);
    conn.flags();
    let (size, _) = conn
        .go("db@tag:second")
        .expect("db@tag:second from the bucket");
    assert_eq!(size, 64 << 20);
    let _ = tidemark_tests::write_load::read_block(&mut conn, 0);
    eprintln!(
        "first byte of db@tag:second from the bucket after {:?}",
        started.elapsed()
    );
    let served = empty.path("served.img");
    nbd_to_file(&empty.uri("db@tag:second"), &served);
    assert!(
        same(&served, &second),
        "db@tag:second served from the bucket differs"
    );
    // Every connection to the point while one is open shares its view.
    let opened = empty.log_text().matches("archive view opened").count();
    assert_eq!(opened, 1, "views opened for db@tag:second: {opened}");
    drop(conn);
    let out = empty.cli(&["archive", "status", "--json"]);
    assert!(out.status.success());
}

#[test]
fn the_archive_catches_up_after_its_server_stops_and_names_a_corrupted_object() {
    let test = "the_archive_catches_up_after_its_server_stops_and_names_a_corrupted_object";
    let Some(moto) = moto(test) else { return };
    for tool in ["nbdcopy"] {
        if !tidemark_tests::require(tool, test) {
            return;
        }
    }
    let d = Daemon::with_config(&config_with(&moto, "site-b", "64M"));
    d.create_volume("db", "32M", "sync");
    let data = d.path("data.bin");
    // Incompressible, so records keep their size and objects pass the
    // multipart threshold.
    let mut random = vec![0u8; 24 << 20];
    rand::Rng::fill(&mut rand::rngs::SmallRng::seed_from_u64(5), &mut random[..]);
    std::fs::write(&data, &random).unwrap();
    run("nbdcopy", &[&data.display().to_string(), &d.uri("db")]);
    // The server stops while segments are going up: writes go on.
    moto.pause();
    let started = Instant::now();
    run(
        "nbdcopy",
        &[
            &data.display().to_string(),
            &d.uri("db"),
            "--destination-is-zero",
        ],
    );
    d.ok(&["tag", "create", "db", "during-outage"]);
    assert!(started.elapsed() < Duration::from_secs(60));
    d.eventually(60, "the archive to report the outage", || {
        let s = d.json(&["archive", "status", "--json"]);
        s["groups"][0]["last_error"].is_string()
    });
    let failing = |d: &Daemon| {
        let (_, metrics) = d.http_get("/metrics");
        metrics
            .lines()
            .find(|l| l.starts_with("tidemark_archive_failing{group=\"db\"}"))
            .map(|l| l.ends_with(" 1"))
            .unwrap_or_else(|| panic!("no tidemark_archive_failing in /metrics: {metrics}"))
    };
    assert!(failing(&d), "the outage is not on /metrics");
    moto.resume();
    let status = wait_archived(&d, "db", "the archive to catch up after the outage");
    assert!(status["groups"][0]["last_error"].is_null(), "{status}");
    assert!(!failing(&d), "/metrics still says the archive fails");
    let live = d.path("live.img");
    nbd_to_file(&d.uri("db@latest"), &live);
    let out = restore_from_archive(&moto, "site-b", "latest", &d.path("latest.img"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        same(&live, &d.path("latest.img")),
        "the archive lost something"
    );

    // Objects this large went up as multipart uploads, and restored whole.
    let segments: Vec<String> = moto
        .list_keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("site-b/") && k.contains("/segments/"))
        .collect();
    assert!(
        segments
            .iter()
            .any(|k| moto.get_raw(BUCKET, k).len() > 16 << 20),
        "no segment object above the multipart threshold: {segments:?}"
    );

    // A bucket that is not there: the error names it and the operation.
    let out = Command::new(binary())
        .args(["restore", "db", "--at", "latest", "--to"])
        .arg(d.path("none.img"))
        .args([
            "--from-archive",
            "s3://no-such-bucket-here/x",
            "--endpoint",
            &moto.endpoint,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("s3://no-such-bucket-here/x")
            && stderr.contains("ListObjectsV2")
            && stderr.contains("NoSuchBucket"),
        "{stderr}"
    );

    // Damage one segment object: a restore that needs it names it and stops.
    let victim = moto
        .list_keys(BUCKET)
        .into_iter()
        .rfind(|k| k.starts_with("site-b/") && k.contains("/segments/"))
        .unwrap();
    let mut bytes = moto.get_raw(BUCKET, &victim);
    let n = bytes.len() - 100;
    bytes[n] ^= 0x55;
    moto.put_raw(BUCKET, &victim, &bytes);
    let out = restore_from_archive(&moto, "site-b", "latest", &d.path("bad.img"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let key = victim.trim_start_matches("site-b/");
    assert!(
        stderr.contains(key),
        "the error does not name {key}: {stderr}"
    );
}

/// Writes `data` at `offset` of the live export; the NBD error (0: none).
fn write_at(d: &Daemon, volume: &str, offset: u64, data: &[u8]) -> u32 {
    let mut c = Conn::open(&d.nbd);
    c.flags();
    c.go(volume).unwrap();
    c.request(1, 1, offset, data.len() as u32, data);
    c.reply(0).unwrap().1
}

#[test]
fn after_a_takeover_the_new_primary_continues_the_archive() {
    let test = "after_a_takeover_the_new_primary_continues_the_archive";
    let Some(moto) = moto(test) else { return };
    let archive = format!(
        "[archive]\nurl = \"s3://{BUCKET}/site-ab\"\nendpoint = \"{}\"\nupload_after = \"1s\"\n",
        moto.endpoint
    );
    let replica = Daemon::with_config(&format!("{}\n{archive}", tidemark_tests::TEST_CONFIG));
    let mut primary = Daemon::with_config(&format!(
        "{}\n[replication]\nheartbeat = \"100ms\"\n{archive}",
        tidemark_tests::TEST_CONFIG
    ));
    primary.create_volume("app", "8M", "sync");
    primary.add_replica("app", &replica.grpc, "sync", &replica.token_file());
    assert_eq!(write_at(&primary, "app", 0, &[1u8; 1 << 20]), 0);
    primary.ok(&["tag", "create", "app", "before-takeover"]);
    assert_eq!(write_at(&primary, "app", 2 << 20, &[2u8; 1 << 20]), 0);
    let archived = wait_archived(&primary, "app", "the primary's archive")["groups"][0]
        ["archived_seq"]
        .as_u64()
        .unwrap();
    let before = primary.path("before.img");
    nbd_to_file(&primary.uri("app@tag:before-takeover"), &before);
    // The replica site does not archive, but follows what was archived.
    replica.eventually(30, "the replica to follow the archive", || {
        let s = replica.json(&["archive", "status", "--json"]);
        s["groups"][0]["active"] == false
            && s["groups"][0]["archived_seq"].as_u64() >= Some(archived)
    });

    primary.kill9();
    let promoted = replica.json(&["failover", "app", "--json"]);
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    assert_eq!(write_at(&replica, "app", 4 << 20, &[3u8; 1 << 20]), 0);
    replica.ok(&["tag", "create", "app", "after-takeover"]);
    wait_archived(&replica, "app", "the new primary's archive");
    let after = replica.path("after.img");
    nbd_to_file(&replica.uri("app@tag:after-takeover"), &after);
    let keys = moto.list_keys(BUCKET);
    assert!(
        keys.iter()
            .any(|k| k.ends_with("site-ab/groups/app/index.e0000000000.json"))
            && keys
                .iter()
                .any(|k| k.ends_with("site-ab/groups/app/index.e0000000001.json")),
        "{keys:?}"
    );
    for (at, want) in [
        ("tag:before-takeover", &before),
        ("tag:after-takeover", &after),
    ] {
        let to = replica.path("restored.img");
        let out = Command::new(binary())
            .args(["restore", "app", "--at", at, "--to"])
            .arg(&to)
            .args([
                "--from-archive",
                &format!("s3://{BUCKET}/site-ab"),
                "--endpoint",
                &moto.endpoint,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{at}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(same(&to, want), "restore at {at} differs");
    }
}
