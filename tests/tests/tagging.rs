//! Tags that make themselves, through a real daemon: time policies, log
//! rules (across rotation), app-consistent hooks, and configuration the
//! daemon must refuse. Anomaly detection and verification need a real
//! filesystem and live in `filesystem.rs`.

#![allow(clippy::unwrap_used)]

use std::io::Write;

use tidemark_tests::{run, Daemon, TEST_CONFIG};

fn names(tags: &[serde_json::Value]) -> Vec<String> {
    tags.iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_time_policy_fires_once_per_slot_keeps_its_count_and_survives_a_restart() {
    let mut d = Daemon::start();
    d.create_volume("db", "8M", "sync");
    d.set_config(&format!(
        "{TEST_CONFIG}\n[[tagging.schedule]]\nvolume = \"db\"\nevery = \"1s\"\nname = \"often\"\nkeep = 3\n"
    ));
    d.restart();
    d.eventually(15, "three policy tags", || d.tags("db").len() >= 3);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // Each slot's tag is made, then the oldest pruned: between the two a
    // listing may see four, so look until one sees three.
    let mut tags = Vec::new();
    d.eventually(10, "keep = 3 after more slots", || {
        tags = d.tags("db");
        tags.len() == 3
    });
    for t in &tags {
        assert_eq!(t["source"], "schedule");
        assert_eq!(t["consistency"], "crash");
        assert!(
            t["name"].as_str().unwrap().starts_with("policy:often-"),
            "{t}"
        );
    }
    let before = names(&tags);
    d.restart();
    d.eventually(10, "a new slot after the restart", || {
        names(&d.tags("db"))
            .iter()
            .any(|n| !before.contains(n) && n.as_str() > before[2].as_str())
    });
    // One tag per slot: the names (made of the slot) never repeat, and
    // the state file kept the restart from re-tagging the last slot.
    let log = d.log_text();
    let fired: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("policy tag"))
        .filter_map(|l| {
            l.split("tag=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
        })
        .collect();
    let mut unique = fired.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        fired.len(),
        unique.len(),
        "a slot was tagged twice: {fired:?}"
    );
}

#[test]
fn log_rules_tag_the_point_where_the_line_appeared_across_rotation() {
    let mut d = Daemon::start();
    d.create_volume("db", "8M", "sync");
    let log = d.path("logs/pg.log");
    d.set_config(&format!(
        "{TEST_CONFIG}\n[[tagging.log_rule]]\nvolume = \"db\"\nfile = \"{}\"\npattern = \"checkpoint complete\"\nname = \"pg-checkpoint\"\n",
        log.display()
    ));
    d.restart();
    // The file does not exist yet: a warning, not an error.
    d.eventually(5, "a warning about the missing log file", || {
        d.log_text().contains("does not exist (yet)")
    });
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let append = |text: &str| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x0a 0 64k", &d.uri("db")],
    );
    append("LOG:  statement: select 1\nLOG:  checkpoint complete: wrote 5 buffers\n");
    d.eventually(10, "a log tag", || d.tags("db").len() == 1);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x0b 0 64k", &d.uri("db")],
    );
    let tag = d.tags("db")[0].clone();
    assert_eq!(tag["source"], "log");
    assert!(
        tag["name"]
            .as_str()
            .unwrap()
            .starts_with("log:pg-checkpoint-"),
        "{tag}"
    );
    assert!(tag["note"]
        .as_str()
        .unwrap()
        .contains("checkpoint complete"));
    let point = d.path("point.img");
    let name = tag["name"].as_str().unwrap();
    run(
        "nbdcopy",
        &[
            &d.uri(&format!("db@tag:{name}")),
            &point.display().to_string(),
        ],
    );
    assert!(
        std::fs::read(&point).unwrap()[..65536]
            .iter()
            .all(|&b| b == 0x0a),
        "the tag is not where the line appeared"
    );

    // Rotation: the rest of the old file, then the new one.
    std::fs::rename(&log, d.path("logs/pg.log.1")).unwrap();
    append("LOG:  checkpoint complete: wrote 9 buffers\n");
    d.eventually(10, "a tag from the rotated log", || d.tags("db").len() == 2);
    // Unmatched lines tag nothing.
    append("LOG:  checkpoint starting: time\n");
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(d.tags("db").len(), 2);
}

#[test]
fn app_consistent_tags_freeze_tag_and_always_thaw() {
    let mut d = Daemon::start();
    d.create_volume("db", "8M", "sync");
    let order = d.path("order.log");
    let fail = d.path("fail-freeze");
    d.set_config(&format!(
        "{TEST_CONFIG}\n[[tagging.hook]]\nvolume = \"db\"\nfreeze = \"sh -c 'echo freeze >> {o}; test ! -e {f}'\"\nthaw = \"sh -c 'echo thaw >> {o}'\"\ntimeout = \"5s\"\n",
        o = order.display(),
        f = fail.display()
    ));
    d.restart();
    d.ok(&[
        "tag",
        "create",
        "db",
        "consistent",
        "--app-consistent",
        "--note",
        "frozen",
    ]);
    let tag = d.tags("db")[0].clone();
    assert_eq!(
        (tag["source"].as_str(), tag["consistency"].as_str()),
        (Some("hook"), Some("app"))
    );
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "freeze\nthaw\n");
    // A failing freeze: no tag, and the thaw ran anyway.
    std::fs::write(&fail, b"").unwrap();
    let out = d.cli(&["tag", "create", "db", "never", "--app-consistent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("freeze command failed"));
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "freeze\nthaw\nfreeze\nthaw\n"
    );
    assert_eq!(d.tags("db").len(), 1);
    // Without a hook for the volume, --app-consistent says so.
    d.create_volume("other", "1M", "sync");
    let out = d.cli(&["tag", "create", "other", "x", "--app-consistent"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a [[tagging.hook]]"));
}

#[test]
fn bad_tagging_configuration_is_refused_at_start_naming_table_field_and_value() {
    let cases = [
        ("[[tagging.schedule]]\nvolume = \"nope\"\ncron = \"0 22 * * *\"\nname = \"n\"\n", "[[tagging.schedule]] #1 (name \"n\"): volume = \"nope\" is not a volume"),
        ("[[tagging.schedule]]\nvolume = \"db\"\ncron = \"61 * * * *\"\nname = \"n\"\n", "cron = \"61 * * * *\""),
        ("[[tagging.log_rule]]\nvolume = \"db\"\nfile = \"/tmp/x.log\"\npattern = \"[unclosed\"\nname = \"r\"\n", "pattern = \"[unclosed\" is not a valid regular expression"),
        ("[[tagging.hook]]\nvolume = \"db\"\nfreeze = \"fsfreez -f /mnt\"\nthaw = \"true\"\n", "freeze = \"fsfreez -f /mnt\": program \"fsfreez\" was not found"),
    ];
    for (config, want) in cases {
        let (code, stderr) = Daemon::refuses_to_start(&format!("{TEST_CONFIG}\n{config}"));
        assert_ne!(code, Some(0));
        assert!(stderr.contains(want), "{config}\n{stderr}");
    }
}
