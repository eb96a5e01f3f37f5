//! Failover between two real daemons on loopback: a replica takes over by
//! itself when its primary is killed (heartbeats and the phi detector), or
//! when a probe of the protected service or a trigger says so, or by
//! hand; every acknowledged write is on the new primary and its live
//! export takes writes. A primary that comes back after a takeover learns
//! the higher epoch, refuses writes at once, keeps what it wrote alone as
//! a branch, and becomes the new primary's replica.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tidemark_tests::forged::{records as batch, stream, ForgedPrimary};
use tidemark_tests::proxy::Proxy;
use tidemark_tests::raw_nbd::Conn;
use tidemark_tests::{tail, write_load, Daemon, TEST_CONFIG};

/// A primary's configuration: heartbeats every 100 ms.
fn primary_config() -> String {
    format!("{TEST_CONFIG}\n[replication]\nheartbeat = \"100ms\"\nsync_timeout = \"5s\"\n")
}

/// A replica site's configuration; `failover` adds to `[failover]`.
fn replica_config(failover: &str) -> String {
    format!(
        "{TEST_CONFIG}\n[replication]\nheartbeat = \"100ms\"\n\n[failover]\nheartbeat = \"100ms\"\nacceptable_pause = \"300ms\"\nmin_std_dev = \"50ms\"\n{failover}"
    )
}

struct Sites {
    primary: Daemon,
    replica: Daemon,
    link: Proxy,
}

impl Sites {
    fn start(failover: &str) -> Sites {
        let replica = Daemon::with_config(&replica_config(failover));
        let link = Proxy::start(&replica.grpc);
        let primary = Daemon::with_config(&primary_config());
        Sites {
            primary,
            replica,
            link,
        }
    }

    fn add(&self, volume: &str, mode: &str) {
        self.primary
            .add_replica(volume, &self.link.address, mode, &self.replica.token_file());
    }

    fn caught_up(&self, volume: &str) {
        self.primary.eventually(30, "the replica catches up", || {
            let show = self.primary.json(&["volume", "show", volume, "--json"]);
            show["replica"]["state"] == "streaming"
                && show["replica"]["acked_seq"] == show["newest_seq"]
        });
    }
}

impl Sites {
    /// Sites whose takeovers and writes need the witness at `key` in etcd:
    /// the replica (auto) reaches it at `replica_etcd`, the primary at
    /// `primary_etcd` (a proxy a test can cut, or the same).
    fn with_witness(key: &str, replica_etcd: &str, primary_etcd: &str) -> Sites {
        let witness = |url: &str| {
            format!(
                "[failover.witness]\netcd = [\"{url}\"]\nkey = \"{key}\"\nlease = \"2s\"\ngrace = \"600ms\"\n"
            )
        };
        let replica = Daemon::with_config(&format!(
            "{}{}",
            replica_config("auto = true\n"),
            witness(replica_etcd)
        ));
        let link = Proxy::start(&replica.grpc);
        let primary = Daemon::with_config(&format!(
            "{}\n[failover]\n{}",
            primary_config(),
            witness(primary_etcd)
        ));
        Sites {
            primary,
            replica,
            link,
        }
    }

    /// Creates `volume` on the primary and waits until it holds the
    /// witness's lease (a first write of `byte`s passes).
    fn volume_under_witness(&self, volume: &str, byte: u8) {
        self.primary.create_volume(volume, "8M", "async");
        self.primary
            .eventually(20, "the primary holds the witness's lease", || {
                write_at(&self.primary, volume, 0, &[byte; 4096]) == 0
            });
    }
}

/// The role of `volume` on `d`.
fn role(d: &Daemon, volume: &str) -> String {
    d.json(&["volume", "show", volume, "--json"])["role"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until `volume` is primary on `d`; returns how long that took.
fn wait_primary(d: &Daemon, volume: &str, secs: u64) -> Duration {
    let started = Instant::now();
    while role(d, volume) != "primary" {
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "{volume} was not promoted within {secs} s; log:\n{}",
            tail(&d.log_text(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// The end of a daemon's log without the NBD connection lines.
fn quiet_tail(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("nbd client connected"))
        .collect();
    tail(&lines.join("\n"), 30)
}

/// Writes `data` at `offset` of the live export; the NBD error (0: none).
fn write_at(d: &Daemon, volume: &str, offset: u64, data: &[u8]) -> u32 {
    let mut c = Conn::open(&d.nbd);
    c.flags();
    c.go(volume).unwrap();
    c.request(1, 1, offset, data.len() as u32, data);
    c.reply(0).unwrap().1
}

/// Reads `len` bytes at `offset` of `export`.
fn read_at(d: &Daemon, export: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut c = Conn::open(&d.nbd);
    c.flags();
    c.go(export).unwrap();
    c.request(0, 1, offset, len as u32, &[]);
    let (_, error, data) = c.reply(len).unwrap();
    assert_eq!(error, 0, "read of {export} failed");
    data
}

/// `kill -9` of the primary during pipelined sync writes: the replica
/// notices the silence and takes over by itself; every acknowledged write
/// is on its live export, which takes writes; the takeover is on the
/// timeline with its reason and the hook ran with the NBD URI.
#[test]
fn the_replica_takes_over_by_itself_when_the_primary_is_killed() {
    let hook_dir = tempfile::tempdir().unwrap();
    let hook_file = hook_dir.path().join("uri");
    let mut sites = Sites::start(&format!(
        "auto = true\ntakeover_hook = \"echo $TIDEMARK_URI $TIDEMARK_EPOCH > {}\"\n",
        hook_file.display()
    ));
    let volume = "db";
    sites.primary.create_volume(volume, "16M", "sync");
    sites.add(volume, "sync");
    sites.caught_up(volume);
    assert_eq!(role(&sites.replica, volume), "replica");
    // A second of heartbeats teaches the detector the link's rhythm.
    std::thread::sleep(Duration::from_secs(1));
    let show = sites.replica.json(&["volume", "show", volume, "--json"]);
    assert!(
        show["failover"]["phi"].as_f64().is_some_and(|p| p < 8.0),
        "volume show --json lacks failover.phi: {show}"
    );
    // A replica's records wait in memory alone.
    assert_eq!(show["cache"]["file_limit"], 0, "{show}");
    let status = sites.replica.json(&["status", "--json"]);
    assert_eq!(status["failover"]["auto"], true, "{status}");
    assert!(
        status["failover"]["last_heartbeat_seconds"]
            .as_f64()
            .unwrap()
            < 1.0,
        "{status}"
    );

    let acked = Arc::new(Mutex::new(HashMap::new()));
    let pending = Arc::new(Mutex::new(HashMap::new()));
    let (addr, a, p) = (sites.primary.nbd.clone(), acked.clone(), pending.clone());
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let writer = std::thread::spawn(move || {
        write_load::run(&addr, "db", 4096, 42, &a, &p);
        done2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !done.load(Ordering::SeqCst),
        "the load stopped before the kill"
    );
    sites.primary.kill9();
    let killed = Instant::now();
    writer.join().unwrap();
    wait_primary(&sites.replica, volume, 30);
    eprintln!(
        "primary killed -> replica primary in {:?}",
        killed.elapsed()
    );

    let blocks = write_load::check(
        &sites.replica.nbd,
        volume,
        &acked,
        &pending,
        "after takeover",
    );
    eprintln!("{blocks} acknowledged blocks found on the new primary");
    // The new primary takes writes, and they read back.
    assert_eq!(write_at(&sites.replica, volume, 0, &[0xAB; 4096]), 0);
    assert_eq!(read_at(&sites.replica, volume, 0, 4096), vec![0xAB; 4096]);
    assert_eq!(
        read_at(&sites.replica, &format!("{volume}@latest"), 0, 4096),
        vec![0xAB; 4096]
    );
    // Promoted, it spills to a file cache like any primary.
    let show = sites.replica.json(&["volume", "show", volume, "--json"]);
    assert_eq!(show["cache"]["file_limit"], 64 << 20, "{show}");
    let takeover = sites.replica.events(volume, "takeover");
    assert_eq!(takeover.len(), 1, "{takeover:?}");
    assert_eq!(takeover[0]["detector"], "host", "{takeover:?}");
    assert!(
        takeover[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no heartbeat"),
        "{takeover:?}"
    );
    assert_eq!(takeover[0]["epoch"], 1);
    let status = sites.replica.json(&["status", "--json"]);
    assert_eq!(status["failover"]["takeovers"], 1, "{status}");
    assert_eq!(status["epoch"], 1, "{status}");
    let (_, metrics) = sites.replica.http_get("/metrics");
    assert!(metrics.contains("tidemark_takeovers_total 1"), "{metrics}");
    sites.replica.eventually(10, "the takeover hook ran", || {
        std::fs::read_to_string(&hook_file)
            .is_ok_and(|s| s.trim() == format!("nbd://{}/{volume} 1", sites.replica.nbd))
    });
    // Promoted volumes survive a restart as primaries.
    sites.replica.restart();
    assert_eq!(role(&sites.replica, volume), "primary");
    assert_eq!(read_at(&sites.replica, volume, 0, 4096), vec![0xAB; 4096]);
}

/// `replica remove` on the primary tells the replica site, which keeps
/// its copy and stops watching that primary: with `auto` on and no
/// witness, its silence from then on — before and after a restart of the
/// replica site — is no reason to take over, while a group still
/// replicated there is taken over when its primary dies.
#[test]
fn a_copy_the_primary_let_go_is_not_taken_over() {
    let mut sites = Sites::start("auto = true\n");
    for volume in ["db", "kept"] {
        sites.primary.create_volume(volume, "8M", "async");
        sites.add(volume, "async");
        assert_eq!(write_at(&sites.primary, volume, 0, &[5u8; 65536]), 0);
        sites.caught_up(volume);
    }
    sites.primary.ok(&["replica", "remove", "kept"]);
    // Many times what detection takes at 100 ms heartbeats.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(role(&sites.replica, "kept"), "replica");
    assert!(sites.replica.events("kept", "takeover").is_empty());
    assert_eq!(role(&sites.replica, "db"), "replica");
    // The replica site shuts down while a primary streams to it.
    sites.replica.restart();
    sites.link.set_upstream(&sites.replica.grpc);
    sites.replica.eventually(30, "the primary reconnects", || {
        sites.replica.json(&["status", "--json"])["failover"]["last_heartbeat_seconds"]
            .as_f64()
            .is_some_and(|s| (0.0..1.0).contains(&s))
    });
    sites.primary.kill9();
    wait_primary(&sites.replica, "db", 30);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(role(&sites.replica, "kept"), "replica");
    assert!(sites.replica.events("kept", "takeover").is_empty());
    assert_eq!(
        read_at(&sites.replica, "kept@latest", 0, 65536),
        vec![5u8; 65536],
        "the copy let go of is not kept"
    );
}

/// A partition: the primary writes on alone, the replica is promoted by
/// hand and written. When the link heals, the old primary learns the
/// higher epoch, refuses writes at once (EPERM), keeps what it wrote alone
/// as a branch image, and becomes the new primary's replica, equal to it.
#[test]
fn an_old_primary_that_returns_is_demoted_keeps_its_branch_and_follows() {
    let sites = Sites::start("");
    let volume = "app";
    sites.primary.create_volume(volume, "8M", "async");
    sites.add(volume, "async");
    assert_eq!(write_at(&sites.primary, volume, 0, &[1u8; 65536]), 0);
    sites.caught_up(volume);

    // Partition; the primary goes on alone.
    sites.link.drop_link();
    assert_eq!(write_at(&sites.primary, volume, 1 << 20, &[2u8; 65536]), 0);
    // Manual takeover on the replica site; refused where it is primary.
    let out = sites.primary.cli(&["failover", volume]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already the primary"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sites
        .replica
        .cli(&["failover", volume, "--at", "no-such-point"]);
    assert!(!out.status.success());
    assert_eq!(
        role(&sites.replica, volume),
        "replica",
        "a bad point promoted"
    );
    let promoted = sites.replica.json(&["failover", volume, "--json"]);
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    assert_eq!(role(&sites.replica, volume), "primary");
    assert_eq!(write_at(&sites.replica, volume, 2 << 20, &[3u8; 65536]), 0);
    let takeover = sites.replica.events(volume, "takeover");
    assert_eq!(takeover[0]["detector"], "manual", "{takeover:?}");

    // Heal: the old primary's stream meets the newer epoch.
    sites.link.restore();
    sites
        .primary
        .eventually(30, "the old primary is demoted", || {
            sites.primary.json(&["status", "--json"])["failover"]["demotions"] == 1
        });
    assert_eq!(role(&sites.primary, volume), "replica");
    // Its live export refuses writes with EPERM from now on.
    let mut c = Conn::open(&sites.primary.nbd);
    c.flags();
    c.go(volume).unwrap();
    c.request(1, 9, 0, 4096, &[9u8; 4096]);
    assert_eq!(
        c.reply(0).unwrap().1,
        1,
        "a demoted primary accepted a write"
    );
    // What it wrote alone is kept as a branch image.
    let branch = sites.primary.path("data/branches/app.epoch-0.img");
    let image = std::fs::read(&branch)
        .unwrap_or_else(|e| panic!("no branch image {}: {e}", branch.display()));
    assert_eq!(&image[1 << 20..(1 << 20) + 65536], &[2u8; 65536][..]);

    // The new primary replicates to it, and the two end equal.
    sites
        .replica
        .eventually(30, "the new primary replicates back", || {
            sites.replica.json(&["volume", "show", volume, "--json"])["replica"]["state"]
                == "streaming"
        });
    sites.replica.eventually(30, "the old primary follows", || {
        let show = sites.replica.json(&["volume", "show", volume, "--json"]);
        show["replica"]["acked_seq"] == show["newest_seq"]
    });
    let latest = format!("{volume}@latest");
    for (offset, byte) in [(0u64, 1u8), (1 << 20, 0), (2 << 20, 3)] {
        assert_eq!(
            read_at(&sites.primary, &latest, offset, 65536),
            vec![byte; 65536],
            "the old primary at offset {offset} does not follow the new one"
        );
    }
    let v = sites.replica.json(&["replica", "verify", volume, "--json"]);
    assert_eq!(v["equal"], true, "{v}");
    assert_eq!(
        sites.primary.json(&["status", "--json"])["epoch"],
        1,
        "the old primary did not take the new epoch"
    );
    // The demotion is on the new primary's timeline, and so on both.
    sites.replica.eventually(10, "a demotion event", || {
        !sites.replica.events(volume, "demotion").is_empty()
    });
    let demotion = &sites.replica.events(volume, "demotion")[0];
    assert_eq!(demotion["epoch"], 1, "{demotion}");
    assert!(
        demotion["branch"]["images"][0]
            .as_str()
            .is_some_and(|p| p.ends_with("app.epoch-0.img")),
        "{demotion}"
    );
    assert!(sites.primary.healthy() && sites.replica.healthy());
}

/// An application probe that fails `failures` times in a row takes over;
/// so does a trigger command that exits non-zero. A probe that fails less
/// often than that never does.
#[test]
fn a_failing_probe_or_a_trigger_takes_over() {
    // The protected service: a listener the test closes.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = service.local_addr().unwrap().to_string();
    let sites = Sites::start(&format!(
        "auto = true\n[[failover.probe]]\nkind = \"tcp\"\ntarget = \"{target}\"\ninterval = \"100ms\"\nfailures = 3\n"
    ));
    sites.primary.create_volume("svc", "8M", "async");
    sites.add("svc", "async");
    sites.caught_up("svc");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(role(&sites.replica, "svc"), "replica");
    let status = sites.replica.json(&["status", "--json"]);
    let probe = &status["failover"]["probes"][0];
    assert_eq!(probe["kind"], "tcp", "{status}");
    assert_eq!(probe["failures_in_a_row"], 0, "{status}");
    drop(service);
    wait_primary(&sites.replica, "svc", 20);
    let takeover = sites.replica.events("svc", "takeover");
    assert_eq!(takeover[0]["detector"], "probe", "{takeover:?}");
    assert!(
        takeover[0]["reason"].as_str().unwrap().contains(&target),
        "{takeover:?}"
    );

    // A trigger: non-zero exit once a file exists.
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("primary-is-dead");
    let sites = Sites::start(&format!(
        "auto = true\n[[failover.trigger]]\ncommand = \"test ! -e {}\"\ninterval = \"100ms\"\n",
        flag.display()
    ));
    sites.primary.create_volume("job", "8M", "async");
    sites.add("job", "async");
    sites.caught_up("job");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(role(&sites.replica, "job"), "replica");
    std::fs::write(&flag, "").unwrap();
    wait_primary(&sites.replica, "job", 20);
    let takeover = sites.replica.events("job", "takeover");
    assert_eq!(takeover[0]["detector"], "trigger", "{takeover:?}");
}

/// Without `auto`, a dead primary is reported (phi rises) but nothing is
/// promoted; bad `[failover]` settings are refused at start, naming the
/// field.
#[test]
fn without_auto_a_dead_primary_is_only_reported_and_bad_settings_are_refused() {
    let mut sites = Sites::start("");
    sites.primary.create_volume("v", "8M", "async");
    sites.add("v", "async");
    sites.caught_up("v");
    std::thread::sleep(Duration::from_secs(1));
    sites.primary.kill9();
    sites
        .replica
        .eventually(20, "phi rises past the threshold", || {
            sites.replica.json(&["status", "--json"])["failover"]["phi"]
                .as_f64()
                .unwrap()
                > 8.0
        });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(role(&sites.replica, "v"), "replica");
    for (bad, field) in [
        ("promote_at = \"whenever\"", "promote_at"),
        ("phi_threshold = -1.0", "phi_threshold"),
        (
            "[[failover.probe]]\nkind = \"ping\"\ntarget = \"x\"",
            "failover.probe[0]",
        ),
        (
            "[[failover.probe]]\nkind = \"tcp\"\ntarget = \"localhost\"",
            "HOST:PORT",
        ),
    ] {
        let (code, err) = Daemon::refuses_to_start(&format!("{TEST_CONFIG}\n[failover]\n{bad}\n"));
        assert_ne!(code, Some(0));
        assert!(err.contains(field), "{bad}: {err}");
    }
}

/// `failover --at POINT` promotes the group at that point: what the dead
/// primary wrote after it is not on the new primary, and the takeover
/// event names the point.
#[test]
fn a_manual_takeover_at_a_tag_promotes_that_point() {
    let mut sites = Sites::start("");
    let volume = "at";
    sites.primary.create_volume(volume, "8M", "async");
    sites.add(volume, "async");
    assert_eq!(write_at(&sites.primary, volume, 0, &[1u8; 65536]), 0);
    sites.primary.ok(&["tag", "create", volume, "good"]);
    assert_eq!(write_at(&sites.primary, volume, 0, &[2u8; 65536]), 0);
    sites.caught_up(volume);
    assert_eq!(
        read_at(&sites.replica, &format!("{volume}@latest"), 0, 65536),
        vec![2u8; 65536]
    );
    sites.primary.kill9();
    let promoted = sites
        .replica
        .json(&["failover", volume, "--at", "tag:good", "--json"]);
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    assert_eq!(role(&sites.replica, volume), "primary");
    assert_eq!(
        read_at(&sites.replica, volume, 0, 65536),
        vec![1u8; 65536],
        "the live volume is not the tag's point"
    );
    let takeover = sites.replica.events(volume, "takeover");
    assert_eq!(takeover.len(), 1, "{takeover:?}");
    assert_eq!(takeover[0]["detector"], "manual", "{takeover:?}");
    assert!(
        takeover[0]["point"].as_str().unwrap().contains("good"),
        "{takeover:?}"
    );
    assert!(
        takeover[0]["seq"].as_u64() < takeover[0]["newest_seq"].as_u64(),
        "{takeover:?}"
    );
    // The new primary takes writes on top of that point.
    assert_eq!(write_at(&sites.replica, volume, 65536, &[3u8; 4096]), 0);
    assert_eq!(read_at(&sites.replica, volume, 0, 65536), vec![1u8; 65536]);
}

/// In async mode what the old primary journalled but never shipped is
/// lost to the new primary, and the takeover event says how much: here a
/// primary of the test's own says it holds seq 10 and ships 1..=3 before
/// it goes silent.
#[test]
fn a_takeover_names_what_the_old_primary_never_shipped() {
    let replica = Daemon::with_config(&replica_config(""));
    let volume = "behind";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let primary = ForgedPrimary::new(volume, 1 << 20, 0);
        let records = primary.writes(3);
        let (replies, ended) =
            stream(&replica, vec![primary.hello(0, 10), batch(0, &records)]).await;
        assert!(ended.is_none(), "{ended:?}");
        assert!(
            replies.iter().any(|r| r.contains("durable_seq: 3")),
            "{replies:?}"
        );
    });
    let promoted = replica.json(&["failover", volume, "--json"]);
    assert_eq!(promoted["epoch"], 1, "{promoted}");
    let takeover = replica.events(volume, "takeover");
    assert_eq!(takeover.len(), 1, "{takeover:?}");
    assert_eq!(takeover[0]["newest_seq"], 3, "{takeover:?}");
    assert_eq!(takeover[0]["old_primary_last_seq"], 10, "{takeover:?}");
    assert_eq!(takeover[0]["lost"]["from"], 4, "{takeover:?}");
    assert_eq!(takeover[0]["lost"]["to"], 10, "{takeover:?}");
    // What did arrive is the new primary's volume.
    for i in 0..3u8 {
        assert_eq!(
            read_at(&replica, volume, u64::from(i) * 4096, 4096),
            vec![i + 1; 4096]
        );
    }
}

/// A takeover goes above every epoch the site has seen, not only the
/// epochs whose records arrived: a primary at epoch 4 (its epoch-4 records
/// never shipped) that dies leaves a replica that takes over at 5 — at 1,
/// the old primary would write under the same epoch as the new one, and
/// neither would ever stand down. The seen epoch outlives a restart.
#[test]
fn a_takeover_goes_above_an_epoch_seen_without_its_records() {
    let mut replica = Daemon::with_config(&replica_config(""));
    let volume = "seen";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let primary = ForgedPrimary::new(volume, 1 << 20, 0);
        let records = primary.writes(2);
        let (replies, ended) =
            stream(&replica, vec![primary.hello(4, 2), batch(0, &records)]).await;
        assert!(ended.is_none(), "{ended:?}");
        assert!(
            replies.iter().any(|r| r.contains("durable_seq: 2")),
            "{replies:?}"
        );
    });
    replica.restart();
    let promoted = replica.json(&["failover", volume, "--json"]);
    assert_eq!(promoted["epoch"], 5, "{promoted}");
    assert_eq!(role(&replica, volume), "primary");
    assert_eq!(write_at(&replica, volume, 0, &[7u8; 4096]), 0);
}

/// `promote_at = "before-anomaly"`: random bytes written over the
/// primary's data raise an anomaly tag there, which replicates with the
/// burst; when the primary dies, the replica takes over by itself at
/// `before:` that tag, so the burst is not what the new primary serves.
#[test]
fn a_takeover_after_an_anomaly_promotes_the_point_before_it() {
    let mut sites = Sites::start("auto = true\npromote_at = \"before-anomaly\"\n");
    let volume = "ra";
    sites.primary.create_volume(volume, "16M", "async");
    sites.add(volume, "async");
    let text: Vec<u8> = b"INSERT INTO ledger VALUES (42, 'paid', 1700.00);\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    for mib in 0..12u64 {
        assert_eq!(write_at(&sites.primary, volume, mib << 20, &text), 0);
    }
    sites.caught_up(volume);
    std::thread::sleep(Duration::from_secs(1));
    // The "encryption": every MiB overwritten with random bytes.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for mib in 0..12u64 {
        let mut noise = vec![0u8; 1 << 20];
        rand::Rng::fill(&mut rng, &mut noise[..]);
        assert_eq!(write_at(&sites.primary, volume, mib << 20, &noise), 0);
    }
    sites
        .primary
        .eventually(15, "an anomaly tag on the primary", || {
            sites
                .primary
                .tags(volume)
                .iter()
                .any(|t| t["source"] == "anomaly")
        });
    sites.caught_up(volume);
    sites
        .replica
        .eventually(15, "the anomaly tag on the replica", || {
            sites
                .replica
                .tags(volume)
                .iter()
                .any(|t| t["source"] == "anomaly")
        });
    sites.primary.kill9();
    wait_primary(&sites.replica, volume, 30);
    // From the moment it says it is the primary, the volume is at the
    // point before the burst.
    for mib in [0u64, 5, 11] {
        assert!(
            read_at(&sites.replica, volume, mib << 20, 1 << 20) == text,
            "MiB {mib} of the new primary is not the data from before the burst"
        );
    }
    sites.replica.eventually(10, "the takeover event", || {
        !sites.replica.events(volume, "takeover").is_empty()
    });
    let takeover = sites.replica.events(volume, "takeover");
    assert_eq!(takeover.len(), 1, "{takeover:?}");
    assert!(
        takeover[0]["point"]
            .as_str()
            .unwrap()
            .starts_with("before-anomaly"),
        "{takeover:?}"
    );
    assert!(
        takeover[0]["seq"].as_u64() < takeover[0]["newest_seq"].as_u64(),
        "{takeover:?}"
    );
    let rollback = sites.replica.events(volume, "rollback");
    assert_eq!(rollback.len(), 1, "{rollback:?}");
    assert_eq!(rollback[0]["to_seq"], takeover[0]["seq"], "{rollback:?}");
}

/// `promote_at = "last-verified"`: the replica takes over at the newest
/// tag whose verification passed — not at a newer one that failed, nor at
/// the newest point. Verifications are recorded as records, so they travel.
#[test]
fn a_takeover_with_last_verified_promotes_the_newest_tag_that_passed() {
    let mut sites = Sites::start("auto = true\npromote_at = \"last-verified\"\n");
    let volume = "lv";
    sites.primary.create_volume(volume, "8M", "async");
    sites.add(volume, "async");
    assert_eq!(write_at(&sites.primary, volume, 0, &[1u8; 65536]), 0);
    sites.primary.ok(&["tag", "create", volume, "checked"]);
    sites
        .primary
        .ok(&["tag", "verify", volume, "checked", "--command", "true"]);
    assert_eq!(write_at(&sites.primary, volume, 0, &[2u8; 65536]), 0);
    sites.primary.ok(&["tag", "create", volume, "broken"]);
    let out = sites
        .primary
        .cli(&["tag", "verify", volume, "broken", "--command", "false"]);
    assert!(!out.status.success());
    assert_eq!(write_at(&sites.primary, volume, 0, &[3u8; 65536]), 0);
    sites.caught_up(volume);
    sites
        .replica
        .eventually(15, "the verifications on the replica", || {
            let tags = sites.replica.tags(volume);
            tags.iter()
                .any(|t| t["name"] == "checked" && t["verified"] == "passed")
                && tags
                    .iter()
                    .any(|t| t["name"] == "broken" && t["verified"] == "failed")
        });
    std::thread::sleep(Duration::from_secs(1));
    sites.primary.kill9();
    wait_primary(&sites.replica, volume, 30);
    assert_eq!(
        read_at(&sites.replica, volume, 0, 65536),
        vec![1u8; 65536],
        "not promoted at the last verified tag"
    );
    sites.replica.eventually(10, "the takeover event", || {
        !sites.replica.events(volume, "takeover").is_empty()
    });
    let takeover = sites.replica.events(volume, "takeover");
    assert!(
        takeover[0]["point"]
            .as_str()
            .unwrap()
            .starts_with("last-verified"),
        "{takeover:?}"
    );
}

/// The replica site's `[failover] heartbeat` is the interval it asks the
/// primary for: a primary configured to beat every 3 s beats every 100 ms
/// for a replica whose detector expects that.
#[test]
fn the_primary_beats_at_the_interval_the_replica_asks_for() {
    let replica = Daemon::with_config(&replica_config(""));
    let primary = Daemon::with_config(&format!(
        "{TEST_CONFIG}\n[replication]\nheartbeat = \"3s\"\n"
    ));
    let sites = Sites {
        link: Proxy::start(&replica.grpc),
        primary,
        replica,
    };
    sites.primary.create_volume("hb", "8M", "async");
    sites.add("hb", "async");
    sites.caught_up("hb");
    // Idle now: only heartbeats reach the replica.
    std::thread::sleep(Duration::from_secs(1));
    let mut oldest: f64 = 0.0;
    for _ in 0..20 {
        let status = sites.replica.json(&["status", "--json"]);
        let age = status["failover"]["last_heartbeat_seconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("no heartbeat age: {status}"));
        oldest = oldest.max(age);
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        oldest < 1.0,
        "the replica went {oldest:.2} s without a heartbeat; it asked for one every 100 ms"
    );
    assert_eq!(role(&sites.replica, "hb"), "replica");
}

/// Failback after a takeover: the new primary hands the group back with
/// `tidemark failback`; writes stop there, the old primary catches up,
/// the roles return with a new epoch and nothing acknowledged is lost.
#[test]
fn failback_after_a_takeover_returns_the_roles_and_loses_nothing() {
    let sites = Sites::start("");
    let volume = "fb";
    sites.primary.create_volume(volume, "8M", "sync");
    sites.add(volume, "sync");
    assert_eq!(write_at(&sites.primary, volume, 0, &[1u8; 65536]), 0);
    sites.caught_up(volume);
    // Takeover by hand while both live: the old primary is demoted and
    // follows the new one.
    sites.replica.json(&["failover", volume, "--json"]);
    sites
        .primary
        .eventually(30, "the old primary is demoted", || {
            sites.primary.json(&["status", "--json"])["failover"]["demotions"] == 1
        });
    assert_eq!(write_at(&sites.replica, volume, 65536, &[2u8; 65536]), 0);
    sites.replica.eventually(30, "the old primary follows", || {
        let show = sites.replica.json(&["volume", "show", volume, "--json"]);
        show["replica"]["state"] == "streaming"
            && show["replica"]["acked_seq"] == show["newest_seq"]
    });

    let diverged_before = sites.replica.events(volume, "replica-diverged").len();
    // Failback: refused where the group is a replica; done on its primary.
    let out = sites.primary.cli(&["failback", volume]);
    assert!(!out.status.success());
    let back = sites.replica.json(&["failback", volume, "--json"]);
    assert_eq!(back["epoch"], 2, "{back}");
    assert_eq!(role(&sites.primary, volume), "primary");
    sites
        .replica
        .eventually(30, "the site that failed back is a replica", || {
            role(&sites.replica, volume) == "replica"
        });
    // Every acknowledged write is on the primary again, and it takes more.
    assert_eq!(read_at(&sites.primary, volume, 0, 65536), vec![1u8; 65536]);
    assert_eq!(
        read_at(&sites.primary, volume, 65536, 65536),
        vec![2u8; 65536]
    );
    assert_eq!(write_at(&sites.primary, volume, 131072, &[3u8; 4096]), 0);
    // The other site refuses writes and follows, without a resync.
    assert_eq!(write_at(&sites.replica, volume, 0, &[9u8; 4096]), 1);
    sites
        .primary
        .eventually(30, "the replica follows again", || {
            let show = sites.primary.json(&["volume", "show", volume, "--json"]);
            show["replica"]["state"] == "streaming"
                && show["replica"]["acked_seq"] == show["newest_seq"]
        });
    // No resync: nothing diverged this time.
    assert_eq!(
        sites.primary.events(volume, "replica-diverged").len(),
        diverged_before,
        "{}\n---\n{}",
        quiet_tail(&sites.primary.log_text()),
        quiet_tail(&sites.replica.log_text())
    );
    let takeovers = sites.primary.events(volume, "takeover");
    assert!(
        takeovers.iter().any(|t| t["detector"] == "failback"),
        "{takeovers:?}"
    );
    let failbacks = sites.primary.events(volume, "failback");
    assert_eq!(
        failbacks.len(),
        1,
        "{failbacks:?}\n{}",
        sites.primary.json(&["timeline", volume, "--json"])
    );
    let v = sites.primary.json(&["replica", "verify", volume, "--json"]);
    assert_eq!(v["equal"], true, "{v}");
}

/// With a witness, a replica site that restarts watches its primaries
/// from the start: a primary killed while the site was down is taken over
/// by itself once a live one would have reconnected (and its lease ran
/// out), with the reason saying so.
#[test]
fn with_a_witness_a_restarted_replica_takes_over_a_primary_that_died_meanwhile() {
    let test = "with_a_witness_a_restarted_replica_takes_over_a_primary_that_died_meanwhile";
    let Some(etcd) = tidemark_tests::etcd::Etcd::start(test) else {
        return;
    };
    let mut sites = Sites::with_witness("/tidemark/restart", &etcd.url, &etcd.url);
    let volume = "db";
    sites.volume_under_witness(volume, 5);
    assert_eq!(write_at(&sites.primary, volume, 0, &[5u8; 65536]), 0);
    sites.add(volume, "async");
    sites.caught_up(volume);

    sites.replica.stop();
    sites.primary.kill9();
    sites.replica.restart();
    let took = wait_primary(&sites.replica, volume, 40);
    eprintln!("replica restarted -> the dead primary taken over in {took:?}");
    let takeover = sites.replica.events(volume, "takeover");
    assert_eq!(takeover.len(), 1, "{takeover:?}");
    assert!(
        takeover[0]["reason"]
            .as_str()
            .unwrap()
            .contains("since this site started"),
        "{takeover:?}"
    );
    assert_eq!(write_at(&sites.replica, volume, 0, &[6u8; 4096]), 0);
    assert_eq!(read_at(&sites.replica, volume, 4096, 4096), vec![5u8; 4096]);
}

/// Split brain with a witness (etcd): the link between the sites is cut
/// while both live. The replica's detector fires but the witness refuses
/// its takeover while the primary holds the lease. Then the primary is cut
/// from the witness too: it stops writing before its lease can run out,
/// and only then the replica wins the key and takes over. Sampled all
/// along, at no moment do both sites accept a write. Healed, the old
/// primary is demoted and keeps its own writes as a branch.
#[test]
fn with_a_witness_exactly_one_site_accepts_writes_through_a_partition() {
    let test = "with_a_witness_exactly_one_site_accepts_writes_through_a_partition";
    let Some(etcd) = tidemark_tests::etcd::Etcd::start(test) else {
        return;
    };
    // The primary reaches the witness through a proxy the test can cut.
    let to_etcd = Proxy::start(&etcd.address);
    let sites = Sites::with_witness(
        "/tidemark/s5",
        &etcd.url,
        &format!("http://{}", to_etcd.address),
    );
    let volume = "s5";
    sites.volume_under_witness(volume, 1);
    let status = sites.primary.json(&["status", "--json"]);
    assert!(
        status["failover"]["witness"]
            .as_str()
            .unwrap()
            .contains("s5: held"),
        "{status}"
    );
    let (_, metrics) = sites.primary.http_get("/metrics");
    assert!(
        metrics.contains("tidemark_failover_witness_held{group=\"s5\"} 1"),
        "{metrics}"
    );
    sites.add(volume, "async");
    sites.caught_up(volume);
    std::thread::sleep(Duration::from_secs(1));

    // The sites cannot see each other; both still see the witness.
    sites.link.drop_link();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        role(&sites.replica, volume),
        "replica",
        "took over past the witness"
    );
    assert!(
        sites
            .replica
            .log_text()
            .contains("its primary is alive there"),
        "the replica never tried: {}",
        tail(&sites.replica.log_text(), 20)
    );
    assert_eq!(write_at(&sites.primary, volume, 4096, &[2u8; 4096]), 0);
    assert_eq!(write_at(&sites.replica, volume, 4096, &[3u8; 4096]), 1);

    // Now the primary loses the witness too.
    to_etcd.drop_link();
    let started = Instant::now();
    let mut replica_took_over = false;
    let mut samples = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let p = write_at(&sites.primary, volume, 8192, &[4u8; 4096]) == 0;
        let r = write_at(&sites.replica, volume, 12288, &[5u8; 4096]) == 0;
        samples += 1;
        assert!(
            !(p && r),
            "both sites accepted a write {:?} after the primary lost the witness",
            started.elapsed()
        );
        if r {
            replica_took_over = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        replica_took_over,
        "the replica never took over ({samples} samples); log:\n{}\nprimary log:\n{}",
        quiet_tail(&sites.replica.log_text()),
        quiet_tail(&sites.primary.log_text())
    );
    eprintln!(
        "replica took over {:?} after the primary lost the witness",
        started.elapsed()
    );
    // The old primary keeps refusing.
    assert_eq!(write_at(&sites.primary, volume, 8192, &[6u8; 4096]), 1);
    let takeover = sites.replica.events(volume, "takeover");
    assert_eq!(takeover[0]["epoch"], 1, "{takeover:?}");

    // Heal: the old primary learns the higher epoch and is demoted.
    to_etcd.restore();
    sites.link.restore();
    sites
        .primary
        .eventually(30, "the old primary is demoted", || {
            sites.primary.json(&["status", "--json"])["failover"]["demotions"] == 1
        });
    assert_eq!(role(&sites.primary, volume), "replica");
    assert!(sites.primary.path("data/branches/s5.epoch-0.img").exists());
    assert_eq!(write_at(&sites.primary, volume, 0, &[7u8; 4096]), 1);
    assert_eq!(write_at(&sites.replica, volume, 0, &[8u8; 4096]), 0);
}

/// A takeover plan: the database's group comes up first, and the
/// application's only once the plan's probe of the database passes.
#[test]
fn a_takeover_plan_brings_groups_up_in_order() {
    // The "database" the plan waits for: not listening yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db_service = format!("127.0.0.1:{port}");
    let mut sites = Sites::start(&format!(
        "auto = true\n[[failover.plan]]\ngroup = \"db\"\nthen_probe = \"tcp:{db_service}\"\nthen_timeout = \"30s\"\n[[failover.plan]]\ngroup = \"app\"\nthen_wait = \"2s\"\n[[failover.plan]]\ngroup = \"web\"\n"
    ));
    for volume in ["db", "app", "web"] {
        sites.primary.create_volume(volume, "8M", "async");
        sites.add(volume, "async");
        sites.caught_up(volume);
    }
    std::thread::sleep(Duration::from_secs(1));
    sites.primary.kill9();
    wait_primary(&sites.replica, "db", 30);
    // The application waits for the database's service.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        role(&sites.replica, "app"),
        "replica",
        "the application was promoted before the database's probe passed"
    );
    let _db = std::net::TcpListener::bind(&db_service).unwrap();
    wait_primary(&sites.replica, "app", 30);
    // The web tier waits then_wait after the application: as the takeover
    // events' times say (the test's own clock would add its polling).
    wait_primary(&sites.replica, "web", 30);
    let apart = takeover_time(&sites.replica, "web") - takeover_time(&sites.replica, "app");
    assert!(
        apart >= chrono::Duration::milliseconds(1800),
        "web was promoted {apart:?} after app, before app's then_wait of 2 s"
    );
    assert!(sites.replica.healthy());
}

/// When the `takeover` event of `volume`'s group was recorded.
fn takeover_time(site: &Daemon, volume: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let timeline = site.json(&["timeline", volume, "--json"]);
    let time = timeline["entries"]
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e["name"] == "takeover"))
        .and_then(|e| e["time"].as_str())
        .unwrap_or_else(|| panic!("no takeover event for {volume}: {timeline}"));
    chrono::DateTime::parse_from_rfc3339(time).unwrap()
}
