//! Replication between two real daemons on loopback, with a
//! fault-injecting proxy on the link between them: fio-verified writes in
//! each mode end equal on both sites; `kill -9` of the primary during sync
//! writes loses nothing acknowledged on the replica; a dropped, stalled or
//! severed link catches up by journal position, sending about what was
//! written; history retained away is resynced by region hashes, sending
//! only the regions that differ; a sync replica that goes away degrades and
//! comes back; an adaptive replica follows the link's speed and is proven
//! equal periodically; bad peers and bad records are refused while both
//! daemons keep serving.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tidemark_tests::forged::{heartbeat, records as batch, stream, ForgedPrimary};
use tidemark_tests::proxy::Proxy;
use tidemark_tests::raw_nbd::Conn;
use tidemark_tests::{require, run, tail, write_load, Daemon, TEST_CONFIG};

/// The test configuration with fast heartbeats, so a stalled link is
/// noticed in seconds; `extra` adds to it.
fn config(extra: &str) -> String {
    let timeout = if extra.contains("sync_timeout") {
        ""
    } else {
        "sync_timeout = \"5s\"\n"
    };
    format!("{TEST_CONFIG}\n[replication]\nheartbeat = \"100ms\"\n{timeout}{extra}")
}

/// A primary, a replica site, and the proxy the primary reaches it through.
struct Sites {
    primary: Daemon,
    replica: Daemon,
    link: Proxy,
}

impl Sites {
    fn start(primary_extra: &str) -> Sites {
        let replica = Daemon::with_config(&config(""));
        let link = Proxy::start(&replica.grpc);
        let primary = Daemon::with_config(&config(primary_extra));
        Sites {
            primary,
            replica,
            link,
        }
    }

    /// `replica add VOLUME --to PROXY --mode MODE` on the primary.
    fn add(&self, volume: &str, mode: &str) -> String {
        self.primary
            .add_replica(volume, &self.link.address, mode, &self.replica.token_file())
    }

    /// The primary's `volume show --json` for `volume`.
    fn show(&self, volume: &str) -> Value {
        self.primary.json(&["volume", "show", volume, "--json"])
    }

    /// Where the replica of `volume` stands (`volume show --json` → `replica`).
    fn replica_of(&self, volume: &str) -> Value {
        self.show(volume)["replica"].clone()
    }

    /// Waits until the replica holds everything the primary has.
    fn caught_up(&self, volume: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let show = self.show(volume);
            let r = &show["replica"];
            if r["state"] == "streaming" && r["acked_seq"] == show["newest_seq"] {
                assert_eq!(r["rpo_seconds"].as_f64(), Some(0.0), "caught up: {r}");
                assert_eq!(r["lag_bytes"].as_u64(), Some(0), "caught up: {r}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica of {volume} did not catch up within {secs} s: {show}\nprimary log:\n{}\nreplica log:\n{}",
                tail(&self.primary.log_text(), 20),
                tail(&self.replica.log_text(), 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both sites' `VOLUME@latest`, byte for byte, and `replica verify`.
    fn assert_equal(&self, volume: &str) {
        let ours = self.primary.path(&format!("{volume}.primary"));
        let theirs = self.replica.path(&format!("{volume}.replica"));
        let latest = format!("{volume}@latest");
        run(
            "nbdcopy",
            &[&self.primary.uri(&latest), &ours.display().to_string()],
        );
        run(
            "nbdcopy",
            &[&self.replica.uri(&latest), &theirs.display().to_string()],
        );
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{volume}@latest differs between the sites"
        );
        let v = self.primary.json(&["replica", "verify", volume, "--json"]);
        assert_eq!(v["equal"], true, "replica verify: {v}");
        assert!(v["differences"].as_array().unwrap().is_empty(), "{v}");
        let _ = std::fs::remove_file(ours);
        let _ = std::fs::remove_file(theirs);
    }
}

/// Writes `data` at `offset` of `export`, 1 MiB per request.
fn write_at(d: &Daemon, export: &str, offset: u64, data: &[u8]) {
    let mut c = Conn::open(&d.nbd);
    c.flags();
    c.go(export).unwrap();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        c.request(
            1,
            i as u64,
            offset + (i as u64) * (1 << 20),
            chunk.len() as u32,
            chunk,
        );
        let (_, error, _) = c.reply(0).unwrap();
        assert_eq!(error, 0, "write at {offset} of {export}");
    }
}

fn random_bytes(rng: &mut rand::rngs::SmallRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

/// Waits for an event named `name` that `matches` on `d`'s timeline of
/// `volume`; returns its body.
fn wait_event(d: &Daemon, volume: &str, name: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(e) = d.events(volume, name).into_iter().find(|e| matches(e)) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {name} event on the timeline of {volume}: {}",
            d.json(&["timeline", volume, "--json"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A metric's value for `volume` from `/metrics`.
fn metric(d: &Daemon, name: &str, volume: &str) -> Option<f64> {
    d.metric(name, volume)
}

#[test]
fn fio_in_each_mode_leaves_both_sites_equal() {
    if !require("fio", "fio_in_each_mode_leaves_both_sites_equal")
        || !require("nbdcopy", "fio_in_each_mode_leaves_both_sites_equal")
    {
        return;
    }
    let sites = Sites::start("");
    for mode in ["sync", "async", "adaptive"] {
        let volume = format!("fio-{mode}");
        sites.primary.create_volume(&volume, "64M", "sync");
        sites.add(&volume, mode);
        sites.caught_up(&volume, 30);
        let uri = sites.primary.uri(&volume);
        tidemark_tests::fio_verify(
            &uri,
            "randwrite",
            "4k",
            "16M",
            &format!("a {mode}-replicated volume"),
        );
        // A tag travels with the records: same name, same seq.
        sites.primary.ok(&["tag", "create", &volume, "after-fio"]);
        sites.caught_up(&volume, 60);
        sites.assert_equal(&volume);
        let ours = sites.primary.tags(&volume);
        let theirs = sites.replica.tags(&volume);
        let seq = |tags: &[Value]| {
            tags.iter()
                .find(|t| t["name"] == "after-fio")
                .map(|t| t["seq"].clone())
        };
        assert!(seq(&ours).is_some());
        assert_eq!(seq(&ours), seq(&theirs), "the tag differs on the replica");
        // The replica's timeline equals the primary's.
        let timeline = |d: &Daemon| {
            d.json(&["timeline", &volume, "--json"])["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["seq"].clone(), e["kind"].clone(), e["name"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            timeline(&sites.primary),
            timeline(&sites.replica),
            "the timelines differ"
        );
    }

    // What the contract promises to show.
    let r = sites.replica_of("fio-sync");
    for key in [
        "address",
        "state",
        "mode",
        "acked_seq",
        "lag_seconds",
        "rpo_seconds",
        "lag_bytes",
    ] {
        assert!(
            r.get(key).is_some(),
            "volume show --json lacks replica.{key}: {r}"
        );
    }
    assert_eq!(r["address"], sites.link.address.as_str());
    assert_eq!(r["mode"], "sync");
    let list = sites.primary.json(&["replica", "list", "--json"]);
    let listed = list.as_array().unwrap();
    assert_eq!(listed.len(), 3, "{list}");
    for key in [
        "volume",
        "address",
        "state",
        "mode",
        "acked_seq",
        "lag_seconds",
        "rpo_seconds",
    ] {
        assert!(listed[0].get(key).is_some(), "replica list lacks {key}");
    }
    for name in [
        "tidemark_replica_lag_seconds",
        "tidemark_replica_rpo_seconds",
        "tidemark_replica_lag_bytes",
        "tidemark_replica_sent_bytes_total",
        "tidemark_replica_resync_bytes_total",
    ] {
        assert!(
            metric(&sites.primary, name, "fio-async").is_some(),
            "/metrics lacks {name} for fio-async"
        );
    }
    assert!(
        metric(
            &sites.primary,
            "tidemark_replica_sent_bytes_total",
            "fio-async"
        )
        .unwrap()
            > 16e6
    );
    let (_, text) = sites.primary.http_get("/metrics");
    // The async link's mode (the sync one may have degraded under fio).
    assert!(
        text.lines().any(
            |l| l.starts_with("tidemark_replica_mode{volume=\"fio-async\"")
                && l.ends_with("configured=\"async\",mode=\"async\"} 1")
        ),
        "/metrics lacks the mode of fio-async's link: {text}"
    );

    // On the replica site: role replica, same size and group; the live
    // export refuses writes with EPERM, reads work.
    let theirs = sites
        .replica
        .json(&["volume", "show", "fio-sync", "--json"]);
    let ours = sites.show("fio-sync");
    assert_eq!(theirs["role"], "replica");
    assert_eq!(ours["role"], "primary");
    assert_eq!(theirs["size"], ours["size"]);
    assert_eq!(theirs["group"], ours["group"]);
    let mut c = Conn::open(&sites.replica.nbd);
    c.flags();
    c.go("fio-sync").expect("the replica's live export opens");
    c.request(1, 7, 0, 4096, &[0xab; 4096]);
    let (_, error, _) = c.reply(0).unwrap();
    assert_eq!(
        error, 1,
        "a write to the replica's live export must fail with EPERM"
    );
    c.request(0, 8, 0, 4096, &[]);
    let (_, error, _) = c.reply(4096).unwrap();
    assert_eq!(error, 0, "reads of the replica's live export work");
    // Changes on the replica site are refused with a reason.
    let out = sites.replica.cli(&["tag", "create", "fio-sync", "mine"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replica"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sites.primary.healthy() && sites.replica.healthy());

    // A verification at an earlier point compares that point on both
    // sites, not the newest.
    sites.primary.ok(&["tag", "create", "fio-async", "checked"]);
    write_at(&sites.primary, "fio-async", 0, &[7u8; 1 << 20]);
    sites.caught_up("fio-async", 30);
    let v = sites.primary.json(&[
        "replica",
        "verify",
        "fio-async",
        "--at",
        "tag:checked",
        "--json",
    ]);
    assert_eq!(v["equal"], true, "replica verify --at: {v}");
    let tagged = sites
        .primary
        .tags("fio-async")
        .into_iter()
        .find(|t| t["name"] == "checked")
        .expect("the tag");
    assert_eq!(v["seq"], tagged["seq"], "verified another point: {v}");

    // Removing the replica ends the stream: what the primary writes
    // after it stays there.
    sites.primary.ok(&["replica", "remove", "fio-async"]);
    assert!(
        sites.show("fio-async")["replica"].is_null(),
        "{}",
        sites.show("fio-async")
    );
    let theirs_before = sites
        .replica
        .json(&["volume", "show", "fio-async", "--json"])["newest_seq"]
        .clone();
    write_at(&sites.primary, "fio-async", 1 << 20, &[8u8; 1 << 20]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sites
            .replica
            .json(&["volume", "show", "fio-async", "--json"])["newest_seq"],
        theirs_before,
        "a removed replica still receives records"
    );
    assert_eq!(
        sites
            .replica
            .json(&["volume", "show", "fio-async", "--json"])["role"],
        "replica"
    );
}

/// P2: every write acknowledged in sync mode is on the replica when the
/// primary dies with `kill -9`.
#[test]
fn kill_9_of_the_primary_during_sync_writes_loses_nothing_acknowledged_on_the_replica() {
    let replica = Daemon::with_config(&config(""));
    for (trial, seed) in tidemark_tests::seeds(3).into_iter().enumerate() {
        let _guard = tidemark_tests::SeedGuard(seed, "P2 kill -9 trial");
        let mut primary = Daemon::with_config(&config(""));
        let volume = format!("p2-{trial}");
        const BLOCKS: u64 = 4096;
        primary.create_volume(&volume, "16M", "sync");
        let token = replica.token_file().display().to_string();
        primary.ok(&[
            "replica",
            "add",
            &volume,
            "--to",
            &replica.grpc,
            "--mode",
            "sync",
            "--token-file",
            &token,
        ]);
        let show = primary.json(&["volume", "show", &volume, "--json"]);
        assert_eq!(show["replica"]["mode"], "sync");
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let pending = Arc::new(Mutex::new(HashMap::new()));
        let (addr, a, p, export) = (
            primary.nbd.clone(),
            acked.clone(),
            pending.clone(),
            volume.clone(),
        );
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let writer = std::thread::spawn(move || {
            write_load::run(&addr, &export, BLOCKS, seed & 0xffff_ffff, &a, &p);
            done2.store(true, Ordering::SeqCst);
        });
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2000)));
        assert!(
            !done.load(Ordering::SeqCst),
            "the load stopped before the kill"
        );
        let show = primary.json(&["volume", "show", &volume, "--json"]);
        assert_eq!(
            show["replica"]["effective_mode"], "sync",
            "the replica left sync mode before the kill: {show}"
        );
        primary.kill9();
        writer.join().unwrap();
        let blocks = write_load::check(
            &replica.nbd,
            &format!("{volume}@latest"),
            &acked,
            &pending,
            &format!("trial {trial}"),
        );
        eprintln!("trial {trial}: {blocks} acknowledged blocks found on the replica");
        assert!(replica.healthy());
    }
}

/// A link dropped, stalled and severed mid-message while writes go on:
/// the replica catches up by journal position with about the bytes
/// written meanwhile; then history retained past the replica forces a
/// resync by region hashes that sends only the regions that differ.
#[test]
fn a_broken_link_catches_up_by_journal_then_by_region_hashes() {
    let alert = tempfile::tempdir().unwrap();
    let alert_file = alert.path().join("alerted");
    let sites = Sites::start(&format!(
        "rpo_alert = \"1s\"\nalert_command = \"touch {}\"\nmax_lag = \"16M\"\n\n[retention]\nmax_age = \"1s\"\ninterval = \"300ms\"\n",
        alert_file.display()
    ));
    let volume = "link";
    const MIB: usize = 1 << 20;
    sites.primary.create_volume(volume, "64M", "sync");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    write_at(&sites.primary, volume, 0, &random_bytes(&mut rng, 4 * MIB));
    // A volume with history older than its replica: retention (max_age
    // 1 s) folds it into the base image first, so the initial sync must
    // send the base image, by regions.
    sites
        .primary
        .eventually(30, "the first write folds into the base image", || {
            sites.show(volume)["horizon_seq"].as_u64().unwrap_or(0) > 0
        });
    sites.add(volume, "async");
    sites.caught_up(volume, 30);
    let before = sites.replica_of(volume);
    // (Events are read on the replica's timeline: it equals the
    // primary's, and the primary's own retention (max_age 1s here) folds
    // history the replica holds.)
    let initial = wait_event(&sites.replica, volume, "replica-initial-sync", |e| {
        e["kind"] == "regions"
    });
    assert_eq!(
        initial["bytes"].as_u64(),
        Some(4 * MIB as u64),
        "the initial sync sends the one 4 MiB region the base image holds: {initial}"
    );

    // Dropped: writes go on, the RPO grows, an alert fires.
    sites.link.drop_link();
    let written = 6 * MIB;
    for i in 0..6u64 {
        write_at(
            &sites.primary,
            volume,
            (8 + i * 5) * MIB as u64,
            &random_bytes(&mut rng, MIB),
        );
    }
    sites.primary.eventually(20, "the link is seen down", || {
        sites.replica_of(volume)["state"] == "disconnected"
    });
    let rpo1 = sites.replica_of(volume)["rpo_seconds"].as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let r = sites.replica_of(volume);
    let rpo2 = r["rpo_seconds"].as_f64().unwrap();
    assert!(
        rpo2 > rpo1 && rpo2 >= 1.0,
        "the RPO does not grow while the link is down: {rpo1} then {r}"
    );
    // (An estimate from the segment catalogue for what is not yet sent.)
    assert!(
        r["lag_bytes"].as_u64().unwrap() >= written as u64 * 9 / 10,
        "{r}"
    );
    sites.primary.eventually(10, "an RPO alert", || {
        !sites.primary.events(volume, "rpo-alert").is_empty() && alert_file.exists()
    });
    assert_eq!(
        metric(&sites.primary, "tidemark_replica_rpo_alert", volume),
        Some(1.0)
    );
    sites.link.restore();
    sites.caught_up(volume, 30);
    let after = sites.replica_of(volume);
    let sent = after["sent_bytes"].as_u64().unwrap() - before["sent_bytes"].as_u64().unwrap();
    assert!(
        sent >= written as u64 && sent < (written + 2 * MIB) as u64,
        "catching up sent {sent} bytes for {written} written"
    );
    assert_eq!(
        after["resync_bytes"], before["resync_bytes"],
        "a catch-up by journal sent regions"
    );
    let journal = wait_event(&sites.replica, volume, "replica-resync", |e| {
        e["kind"] == "journal"
    });
    assert!(journal["bytes"].as_u64().unwrap() >= written as u64);
    sites.assert_equal(volume);

    // Stalled (bytes held, connection open), then severed in the middle
    // of a message: the stream resumes, nothing applied twice or skipped.
    sites.link.stall();
    write_at(
        &sites.primary,
        volume,
        20 * MIB as u64,
        &random_bytes(&mut rng, 2 * MIB),
    );
    sites
        .primary
        .eventually(20, "a stalled link is taken for dead", || {
            sites.replica_of(volume)["state"] != "streaming"
        });
    sites.link.restore();
    sites.link.sever_after(300_000);
    write_at(
        &sites.primary,
        volume,
        30 * MIB as u64,
        &random_bytes(&mut rng, 2 * MIB),
    );
    sites.caught_up(volume, 30);
    assert!(
        sites.link.connections() >= 4,
        "the link was never re-established"
    );
    sites.assert_equal(volume);

    // Retention passes a replica too far behind (max_lag 16M): a gap on
    // both timelines, then a resync by region hashes. Only the two 4 MiB
    // regions written meanwhile differ.
    let resync_before = sites.replica_of(volume)["resync_bytes"].as_u64().unwrap();
    sites.link.drop_link();
    for _ in 0..5 {
        write_at(
            &sites.primary,
            volume,
            40 * MIB as u64,
            &random_bytes(&mut rng, 2 * MIB),
        );
        write_at(
            &sites.primary,
            volume,
            52 * MIB as u64 + 4096,
            &random_bytes(&mut rng, 2 * MIB),
        );
    }
    // (Once retention has folded every write above: then the resync is
    // by hashes alone, with nothing left to catch up by journal.)
    let written_to = sites.show(volume)["newest_seq"].as_u64().unwrap();
    sites
        .primary
        .eventually(30, "retention passes the lagging replica", || {
            let show = sites.show(volume);
            show["horizon_seq"].as_u64().unwrap() >= written_to
        });
    // (The event itself is history retention has folded by now.)
    assert!(
        sites
            .primary
            .log_text()
            .contains("too far behind to hold retention back"),
        "the lag past max_lag was not reported"
    );
    sites.link.restore();
    sites.caught_up(volume, 60);
    let resync = sites.replica_of(volume)["resync_bytes"].as_u64().unwrap() - resync_before;
    assert_eq!(
        resync,
        8 * MIB as u64,
        "a resync by hashes must send exactly the two differing 4 MiB regions"
    );
    let regions = wait_event(&sites.replica, volume, "replica-resync", |e| {
        e["kind"] == "regions"
    });
    assert_eq!(
        regions["regions"],
        2,
        "{regions}\nprimary log:\n{}\nreplica log:\n{}",
        tail(&sites.primary.log_text(), 120),
        tail(&sites.replica.log_text(), 60)
    );
    assert_eq!(regions["bytes"].as_u64(), Some(8 * MIB as u64), "{regions}");
    // The history the replica lacks is a gap on its timeline.
    let timeline = sites.replica.json(&["timeline", volume, "--json"]);
    assert!(
        timeline["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "gap"),
        "no gap on the replica's timeline: {timeline}"
    );
    // And on the primary's, where retention passed the replica's hold.
    let timeline = sites.primary.json(&["timeline", volume, "--json"]);
    assert!(
        timeline["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "gap"),
        "no gap on the primary's timeline: {timeline}"
    );
    sites.assert_equal(volume);
    assert!(sites.primary.healthy() && sites.replica.healthy());
}

/// A sync replica that goes away: writes wait up to `sync_timeout`, then
/// the replica is degraded to async with an event, and returns to sync
/// once caught up. With `on_replica_down = "block"` writes wait for it.
#[test]
fn a_sync_replica_that_goes_away_degrades_then_returns_or_blocks() {
    let alerts = tempfile::tempdir().unwrap();
    let alerted = alerts.path().join("alerts");
    let mut sites = Sites::start(&format!(
        "sync_timeout = \"2s\"\nalert_command = \"echo $TIDEMARK_ALERT $TIDEMARK_GROUP >> {}\"\n",
        alerted.display()
    ));
    let volume = "down";
    sites.primary.create_volume(volume, "16M", "sync");
    sites.add(volume, "sync");
    sites.caught_up(volume, 30);
    sites.link.drop_link();
    let started = Instant::now();
    write_at(&sites.primary, volume, 0, &[7u8; 65536]);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "a sync write was acknowledged without its replica after {waited:?}"
    );
    let r = sites.replica_of(volume);
    assert_eq!(r["effective_mode"], "async", "{r}");
    // (Events are recorded beside the write path: wait for it.)
    wait_event(&sites.primary, volume, "replica-degraded", |_| true);
    // The degradation is an alert: the alert command ran for it.
    sites
        .primary
        .eventually(10, "the alert command for the degradation", || {
            std::fs::read_to_string(&alerted).is_ok_and(|s| s.contains("replica-degraded down"))
        });
    // Further writes do not wait.
    let started = Instant::now();
    write_at(&sites.primary, volume, 65536, &[8u8; 65536]);
    assert!(started.elapsed() < Duration::from_millis(1500));
    sites.link.restore();
    sites.caught_up(volume, 30);
    sites.primary.eventually(10, "back to sync", || {
        sites.replica_of(volume)["effective_mode"] == "sync"
    });
    wait_event(&sites.primary, volume, "replica-caught-up", |_| true);
    sites.assert_equal(volume);

    // on_replica_down = "block": a write waits for as long as the replica
    // is away, and completes when it is back.
    sites.primary.set_config(&config(
        "sync_timeout = \"1s\"\non_replica_down = \"block\"\n",
    ));
    sites.primary.restart();
    sites.caught_up(volume, 30);
    sites.link.drop_link();
    let (addr, done) = (sites.primary.nbd.clone(), Arc::new(AtomicBool::new(false)));
    let done2 = done.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Conn::open(&addr);
        c.flags();
        c.go("down").unwrap();
        c.request(1, 1, 4096 * 100, 4096, &[9u8; 4096]);
        let (_, error, _) = c.reply(0).unwrap();
        done2.store(true, Ordering::SeqCst);
        error
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !done.load(Ordering::SeqCst),
        "with on_replica_down = block a sync write went on without its replica"
    );
    sites.link.restore();
    assert_eq!(writer.join().unwrap(), 0);
    sites.caught_up(volume, 30);
    sites.assert_equal(volume);
}

/// A wrong token, a record that fails its CRC, records with a gap or of an
/// older epoch are refused with the reason; both daemons keep serving and
/// a real replication stream beside them goes on.
#[test]
fn bad_peers_and_bad_records_are_refused_and_both_sites_keep_serving() {
    let sites = Sites::start("");
    sites.primary.create_volume("good", "8M", "sync");

    // A wrong token: `replica add` fails at once and says so.
    let wrong = sites.primary.path("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let out = sites.primary.cli(&[
        "replica",
        "add",
        "good",
        "--to",
        &sites.link.address,
        "--token-file",
        &wrong.display().to_string(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("token"), "{stderr}");
    assert!(sites
        .primary
        .json(&["replica", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    // A site cannot be its own replica.
    let own = sites.primary.token_file().display().to_string();
    let out = sites.primary.cli(&[
        "replica",
        "add",
        "good",
        "--to",
        &sites.primary.grpc,
        "--token-file",
        &own,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("primary"));

    sites.add("good", "sync");
    write_at(&sites.primary, "good", 0, &[1u8; 1 << 20]);
    sites.caught_up("good", 30);

    // Records made by a journal of this test's own, sent by hand.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let forged = ForgedPrimary::new("forged", 1 << 20, 5);
        let records = forged.writes(3);
        assert_eq!(records.len(), 3);
        let hello = |epoch: u64| forged.hello(epoch, 3);
        let site = &sites.replica;

        // The first record, good: applied and acknowledged.
        let (replies, ended) = stream(site, vec![hello(5), batch(0, &records[..1])]).await;
        assert!(ended.is_none(), "a good record was refused: {ended:?}");
        assert!(
            replies
                .iter()
                .any(|r| r.contains("Ack") && r.contains("durable_seq: 1")),
            "{replies:?}"
        );
        // A flipped bit in the second: refused, named.
        let mut damaged = records[1..2].to_vec();
        let last = damaged[0].bytes.len() - 1;
        damaged[0].bytes[last] ^= 1;
        let (_, ended) = stream(site, vec![hello(5), batch(1, &damaged)]).await;
        let why = ended.expect("a damaged record must be refused");
        assert!(why.contains("CRC") || why.contains("verify"), "{why}");
        // A gap: the third without the second.
        let (_, ended) = stream(site, vec![hello(5), batch(2, &records[2..])]).await;
        let why = ended.expect("a record after a gap must be refused");
        assert!(why.contains("follow"), "{why}");
        // An older epoch than the replica has seen.
        let (_, ended) = stream(site, vec![hello(3), batch(1, &records[1..])]).await;
        let why = ended.expect("an older epoch must be refused");
        assert!(why.contains("epoch"), "{why}");
        // The stream goes on where it stood.
        let (replies, ended) = stream(site, vec![hello(5), batch(1, &records[1..])]).await;
        assert!(ended.is_none(), "{ended:?}");
        assert!(
            replies.iter().any(|r| r.contains("durable_seq: 3")),
            "{replies:?}"
        );
        // Every message carries the stream's epoch: a heartbeat of the
        // stream's is answered with the replica's epoch, one of another
        // epoch ends the stream.
        let (replies, ended) = stream(site, vec![hello(5), heartbeat(5, 3)]).await;
        assert!(ended.is_none(), "{ended:?}");
        assert!(
            replies
                .iter()
                .any(|r| r.contains("Ack") && r.contains("sent_ns: 1") && r.contains("epoch: 5")),
            "{replies:?}"
        );
        let (_, ended) = stream(site, vec![hello(5), heartbeat(4, 3)]).await;
        let why = ended.expect("a heartbeat of another epoch must be refused");
        assert!(why.contains("heartbeat of epoch 4"), "{why}");
    });
    let forged = sites.replica.path("forged.img");
    run(
        "nbdcopy",
        &[
            &sites.replica.uri("forged@latest"),
            &forged.display().to_string(),
        ],
    );
    let data = std::fs::read(&forged).unwrap();
    for i in 0..3usize {
        assert!(data[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }

    // The real stream beside it went on.
    write_at(&sites.primary, "good", 1 << 20, &[2u8; 1 << 20]);
    sites.caught_up("good", 30);
    sites.assert_equal("good");
    assert!(sites.primary.healthy() && sites.replica.healthy());
}

/// An adaptive replica is sync while its acknowledgements are quick, goes
/// async when the link slows past `adaptive_latency` and comes back to
/// sync once it has kept up again, each switch an event; with
/// `verify_interval` the primary proves the replica equal on its own and
/// says so on the timeline of both sites.
#[test]
fn an_adaptive_replica_follows_the_link_and_is_proven_equal_periodically() {
    // Thresholds far above what a loaded machine's fsync and loopback
    // cost, so only the link's delay below moves the mode.
    let sites = Sites::start(
        "adaptive_latency = \"300ms\"\nadaptive_lag = \"10s\"\nverify_interval = \"1s\"\n",
    );
    let volume = "adapt";
    sites.primary.create_volume(volume, "8M", "sync");
    sites.add(volume, "adaptive");
    write_at(&sites.primary, volume, 0, &[1u8; 65536]);
    sites.caught_up(volume, 30);
    sites.primary.eventually(30, "adaptive starts in sync", || {
        sites.replica_of(volume)["effective_mode"] == "sync"
    });

    // A slow link: acknowledgements take longer than 300 ms.
    sites.link.delay(Duration::from_millis(700));
    let mut offset = 0u64;
    sites
        .primary
        .eventually(30, "adaptive goes async on a slow link", || {
            write_at(&sites.primary, volume, offset % (8 << 20), &[2u8; 4096]);
            offset += 4096;
            sites.replica_of(volume)["effective_mode"] == "async"
        });
    wait_event(&sites.primary, volume, "replica-mode", |e| {
        e["to"] == "async"
    });

    // A quick link again: back to sync once caught up for a while.
    sites.link.delay(Duration::ZERO);
    sites
        .primary
        .eventually(30, "adaptive returns to sync", || {
            write_at(&sites.primary, volume, offset % (8 << 20), &[3u8; 4096]);
            offset += 4096;
            std::thread::sleep(Duration::from_millis(100));
            sites.replica_of(volume)["effective_mode"] == "sync"
        });
    wait_event(&sites.primary, volume, "replica-mode", |e| {
        e["to"] == "sync"
    });
    sites.caught_up(volume, 30);

    // Periodic proofs: "the replica was proven equal at seq N" on both
    // timelines (events travel with the records).
    let proof = wait_event(&sites.primary, volume, "replica-verified", |e| {
        e["differing_regions"] == 0
    });
    assert!(proof["seq"].as_u64().is_some(), "{proof}");
    assert!(
        proof["hash"].as_str().is_some_and(|h| !h.is_empty()),
        "{proof}"
    );
    write_at(&sites.primary, volume, 0, &[4u8; 4096]);
    wait_event(&sites.replica, volume, "replica-verified", |_| true);
    assert!(sites.replica_of(volume)["last_verified"]
        .as_str()
        .is_some_and(|s| s.contains("equal")));
    assert!(sites.primary.events(volume, "replica-differs").is_empty());
    sites.assert_equal(volume);
}

/// `replica verify` finds a difference and names it: bytes of the
/// replica's base image changed behind its back (a bad disk there) show
/// as the 4 MiB region that holds them, with exit status 1 — and nothing
/// else differs.
#[test]
fn replica_verify_names_the_region_that_differs() {
    let sites = Sites::start("");
    let volume = "differs";
    sites.primary.create_volume(volume, "16M", "sync");
    sites.add(volume, "sync");
    write_at(&sites.primary, volume, 0, &[1u8; 65536]);
    sites.caught_up(volume, 30);
    let equal = sites.primary.json(&["replica", "verify", volume, "--json"]);
    assert_eq!(equal["equal"], true, "{equal}");

    // Damage where no record covers: the base image at 9 MiB.
    let base_dir = sites.replica.path(&format!("data/groups/{volume}/base"));
    let base = std::fs::read_dir(&base_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "img"))
        .unwrap_or_else(|| panic!("no base image in {}", base_dir.display()));
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        file.write_all_at(&[0x5a; 4096], 9 << 20).unwrap();
        file.sync_all().unwrap();
    }
    let out = sites.primary.cli(&["replica", "verify", volume, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["equal"], false, "{v}");
    let differences = v["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 1, "{v}");
    assert_eq!(differences[0]["volume"], volume, "{v}");
    assert_eq!(differences[0]["offset"], 8 << 20, "{v}");
    assert_eq!(differences[0]["length"], 4 << 20, "{v}");
    let text = sites.primary.cli(&["replica", "verify", volume]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("1 of 4 regions differ"),
        "{text:?}"
    );
}

/// An adaptive replica whose link dies — silent (stalled) or cut — goes
/// async once a record has waited past `adaptive_lag` (1 s, the default),
/// as a `replica-mode` switch, though no acknowledgement arrives to
/// decide it: the write goes through without waiting out `sync_timeout`
/// (60 s here) and without the `replica-degraded` fallback. Back to sync
/// once the link is back and the replica kept up.
#[test]
fn an_adaptive_replica_whose_link_dies_goes_async_without_waiting_for_the_timeout() {
    let sites = Sites::start("sync_timeout = \"60s\"\nadaptive_latency = \"300ms\"\n");
    let volume = "adapt-dead";
    sites.primary.create_volume(volume, "8M", "sync");
    sites.add(volume, "adaptive");
    write_at(&sites.primary, volume, 0, &[1u8; 4096]);
    sites.caught_up(volume, 30);
    for (round, cut) in [(1u8, false), (2u8, true)] {
        sites.primary.eventually(30, "adaptive is in sync", || {
            sites.replica_of(volume)["effective_mode"] == "sync"
        });
        if cut {
            sites.link.drop_link();
        } else {
            sites.link.stall();
        }
        write_at(
            &sites.primary,
            volume,
            u64::from(round) * 4096,
            &[round + 1; 4096],
        );
        assert_eq!(
            sites.replica_of(volume)["effective_mode"],
            "async",
            "round {round}: {}",
            sites.replica_of(volume)
        );
        sites.link.restore();
        sites.caught_up(volume, 30);
    }
    sites
        .primary
        .eventually(30, "adaptive returns to sync", || {
            sites.replica_of(volume)["effective_mode"] == "sync"
        });
    let to_async = sites
        .primary
        .events(volume, "replica-mode")
        .into_iter()
        .filter(|e| e["to"] == "async")
        .count();
    assert_eq!(
        to_async,
        2,
        "{:?}",
        sites.primary.events(volume, "replica-mode")
    );
    assert!(
        sites.primary.events(volume, "replica-degraded").is_empty(),
        "an adaptive replica waited for the sync timeout"
    );
    sites.assert_equal(volume);
}

/// Two sites that speak TLS, each with its own self-signed certificate,
/// replicating a consistency group of two volumes: `replica add --ca F`
/// names the replica site's CA (this site's own is in `TIDEMARK_CA`), the
/// stream runs over TLS with the replica site's token, survives a broken
/// link, and the group ends equal on both sites — volume by volume, at the
/// same seqs. Without the replica's CA, `replica add` is refused and says
/// why.
#[test]
fn sites_that_speak_tls_replicate_a_whole_group_over_it() {
    let certs = tempfile::tempdir().unwrap();
    let (Some((primary_cert, primary_key)), Some((replica_cert, replica_key))) = (
        tidemark_tests::self_signed_certificate(&certs.path().join("primary")),
        tidemark_tests::self_signed_certificate(&certs.path().join("replica")),
    ) else {
        return;
    };
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        config(&format!(
            "\n[api]\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ))
    };
    let replica = Daemon::with_config(&tls(&replica_cert, &replica_key)).trusting(&replica_cert);
    let primary = Daemon::with_config(&tls(&primary_cert, &primary_key)).trusting(&primary_cert);
    assert!(replica.grpc.starts_with("https://"), "{}", replica.grpc);
    let link = Proxy::start(&replica.grpc);
    // The replica site is reached through the proxy by the name in its
    // certificate (127.0.0.1).
    let to = format!("https://{}", link.address);
    for volume in ["db", "logs"] {
        primary.ok(&[
            "volume", "create", volume, "--size", "8M", "--mode", "sync", "--group", "app",
        ]);
    }
    let token = replica.token_file().display().to_string();
    let add = |ca: Option<&std::path::Path>| {
        let mut args = vec!["replica", "add", "db", "--to", &to, "--mode", "sync"];
        args.extend(["--token-file", &token]);
        let ca = ca.map(|p| p.display().to_string());
        if let Some(ca) = &ca {
            args.extend(["--ca", ca]);
        }
        primary.cli_command(&args).output().unwrap()
    };
    let refused = add(None);
    assert!(!refused.status.success(), "added without the replica's CA");
    let why = String::from_utf8_lossy(&refused.stderr);
    eprintln!("without the CA: {why}");
    assert!(
        why.contains("certificate") || why.contains("TLS") || why.contains("tls"),
        "{why}"
    );
    let added = add(Some(&replica_cert));
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );

    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let (db, logs) = (
        random_bytes(&mut rng, 2 << 20),
        random_bytes(&mut rng, 1 << 20),
    );
    write_at(&primary, "db", 0, &db);
    write_at(&primary, "logs", 4096, &logs);
    // A broken link: the stream comes back over TLS by itself.
    link.sever();
    write_at(&primary, "logs", 3 << 20, &logs);
    primary.ok(&["tag", "create", "db", "both-written"]);
    let caught_up = || {
        let show = primary.json(&["volume", "show", "db", "--json"]);
        show["replica"]["state"] == "streaming"
            && show["replica"]["acked_seq"] == show["newest_seq"]
    };
    primary.eventually(30, "the replica catches up over TLS", caught_up);
    assert!(link.connections() >= 2, "the link never reconnected");

    for volume in ["db", "logs"] {
        let show = replica.json(&["volume", "show", volume, "--json"]);
        assert_eq!(show["role"], "replica", "{show}");
        assert_eq!(show["group"], "app", "{show}");
        let points: &[&str] = if volume == "db" {
            &["latest", "tag:both-written"]
        } else {
            &["latest"]
        };
        for point in points {
            let export = format!("{volume}@{point}");
            let (ours, theirs) = (primary.path("ours.img"), replica.path("theirs.img"));
            run(
                "nbdcopy",
                &[&primary.uri(&export), &ours.display().to_string()],
            );
            run(
                "nbdcopy",
                &[&replica.uri(&export), &theirs.display().to_string()],
            );
            assert!(
                std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                "{export} differs between the sites"
            );
        }
        let v = primary.json(&["replica", "verify", volume, "--json"]);
        assert_eq!(v["equal"], true, "{volume}: {v}");
    }
    let theirs = replica.path("logs.img");
    run(
        "nbdcopy",
        &[&replica.uri("logs@latest"), &theirs.display().to_string()],
    );
    let image = std::fs::read(&theirs).unwrap();
    assert!(image[4096..4096 + logs.len()] == logs[..]);
    assert!(image[3 << 20..(3 << 20) + logs.len()] == logs[..]);
}
