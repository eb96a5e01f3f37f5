//! A real ext4 filesystem on a protected volume: `nbdfuse` makes the live
//! export a file, the kernel loop-mounts it, files are written, tagged,
//! changed; then the tag is exported and checked, the volume rolled back
//! and restored, and a sample of flush points is checked for crash
//! consistency. Ransomware patterns (in place, encrypted copies renamed
//! over the originals, only the first block of each file) raise anomaly
//! tags that roll back to intact files; ordinary work raises none.
//! Skipped with a reason where FUSE or loop devices are missing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tidemark_tests::ext4::{can_mount, files_of_image, fsck_clean, snapshot, write_files, Mounted};
use tidemark_tests::{run, Daemon};

#[test]
fn ext4_tag_export_rollback_and_restore() {
    let test = "ext4_tag_export_rollback_and_restore";
    if !can_mount(test) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("fs", "128M", "sync");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut m = Mounted::new(&d, "fs", true);
    write_files(&m.mnt.join("docs"), "a", 40, &mut rng);
    let at_tag = snapshot(&m.mnt);
    m.freeze_and(|| {
        d.ok(&["tag", "create", "fs", "good", "--note", "before the damage"]);
    });
    // Damage: overwrite some, delete some, add some.
    for (i, name) in at_tag.keys().enumerate() {
        let path = m.mnt.join(name);
        match i % 3 {
            0 => std::fs::write(&path, b"overwritten").unwrap(),
            1 => std::fs::remove_file(&path).unwrap(),
            _ => {}
        }
    }
    write_files(&m.mnt.join("junk"), "b", 20, &mut rng);
    run("sync", &[]);
    assert_ne!(snapshot(&m.mnt), at_tag);

    // Export the tag: clean filesystem, files exactly as at the tag.
    let uri = d
        .ok(&["export", "fs", "--at", "tag:good"])
        .trim()
        .to_string();
    let tagged = d.path("tagged.img");
    run("nbdcopy", &[&uri, &tagged.display().to_string()]);
    fsck_clean(&tagged).unwrap();
    assert_eq!(
        files_of_image(&d, &tagged, "check-tag"),
        at_tag,
        "files at the tag differ"
    );
    // Copy again: fsck_clean may have replayed the journal in the copy.
    run("nbdcopy", &[&uri, &tagged.display().to_string()]);

    // Roll back: the live volume equals the tagged point.
    m.unmount();
    d.ok(&["rollback", "fs", "--to", "tag:good", "--yes"]);
    let live = d.path("live.img");
    run("nbdcopy", &[&d.uri("fs"), &live.display().to_string()]);
    assert!(
        std::fs::read(&live).unwrap() == std::fs::read(&tagged).unwrap(),
        "rolled-back volume differs from the tag"
    );
    let m2 = Mounted::new(&d, "fs", false);
    assert_eq!(snapshot(&m2.mnt), at_tag);
    drop(m2);

    // Restore the tag to a file: byte for byte the export.
    let restored = d.path("restored.img");
    d.ok(&[
        "restore",
        "fs",
        "--at",
        "tag:good",
        "--to",
        &restored.display().to_string(),
    ]);
    assert!(
        std::fs::read(&restored).unwrap() == std::fs::read(&tagged).unwrap(),
        "restore differs from the export"
    );

    // The rollback is on the timeline and can be undone.
    let timeline = d.json(&["timeline", "fs", "--json"]);
    let rollback = timeline["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "rollback")
        .expect("rollback event")
        .clone();
    let undo: serde_json::Value =
        serde_json::from_str(rollback["detail"].as_str().unwrap()).unwrap();
    let undo_seq = undo["undo_seq"].as_u64().unwrap().to_string();
    d.ok(&["rollback", "fs", "--to", &undo_seq, "--yes"]);
    let m3 = Mounted::new(&d, "fs", false);
    assert!(
        m3.mnt.join("junk").exists(),
        "undoing the rollback did not bring the later files back"
    );
}

#[test]
fn every_sampled_flush_point_is_a_clean_filesystem() {
    let test = "every_sampled_flush_point_is_a_clean_filesystem";
    if !can_mount(test) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("fs", "96M", "sync");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let m = Mounted::new(&d, "fs", true);
    run("sync", &[]);
    // Before this the volume is not yet a filesystem.
    let made = d.json(&["volume", "show", "fs", "--json"])["newest_seq"]
        .as_u64()
        .unwrap();
    for round in 0..12 {
        write_files(&m.mnt.join(format!("r{round}")), "f", 8, &mut rng);
        if round > 2 {
            let _ = std::fs::remove_dir_all(m.mnt.join(format!("r{}", round - 3)));
        }
        if round % 2 == 0 {
            run("sync", &[]);
        }
    }
    run("sync", &[]);
    let newest = d.json(&["volume", "show", "fs", "--json"])["newest_seq"]
        .as_u64()
        .unwrap();
    // Flush points, sampled: the first and last flush of each of eight
    // windows of history.
    let mut points = Vec::new();
    for w in 0..8u64 {
        let from = (made + (newest - made) * w / 8).to_string();
        let to = (made + (newest - made) * (w + 1) / 8).to_string();
        let t = d.json(&["timeline", "fs", "--from", &from, "--to", &to, "--json"]);
        for e in t["entries"].as_array().unwrap() {
            if e["kind"] == "flush" {
                points.push(e["first_seq"].as_u64().unwrap());
                points.push(e["seq"].as_u64().unwrap());
            }
        }
    }
    points.sort_unstable();
    points.dedup();
    assert!(points.len() >= 8, "too few flush points: {points:?}");
    let image = d.path("point.img");
    for seq in &points {
        run(
            "nbdcopy",
            &[&d.uri(&format!("fs@{seq}")), &image.display().to_string()],
        );
        if let Err(e) = fsck_clean(&image) {
            panic!("flush point seq {seq} is not a clean filesystem: {e}");
        }
    }
    eprintln!("{} flush points checked clean", points.len());
    // The check can fail: a damaged image does not pass it.
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[1024..16384].fill(0);
    std::fs::write(&image, bytes).unwrap();
    assert!(fsck_clean(&image).is_err(), "fsck passed a damaged image");
}

fn write_text_files(dir: &Path, count: usize, variant: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let mut text = String::with_capacity(512 << 10);
        let mut line = 0u32;
        while text.len() < 512 << 10 {
            text.push_str(&format!(
                "{variant}: line {line} of file {i}: the quick brown fox jumps over the lazy dog\n"
            ));
            line += 1;
        }
        std::fs::write(dir.join(format!("doc-{i}.txt")), text).unwrap();
    }
}

fn anomaly_tags(d: &Daemon) -> Vec<serde_json::Value> {
    d.tags("fs")
        .into_iter()
        .filter(|t| t["source"] == "anomaly")
        .collect()
}

/// How an attack in these tests encrypts one file.
#[derive(Clone, Copy, Debug)]
enum Encryption {
    /// Random bytes written over the whole file, in place.
    InPlace,
    /// An encrypted copy written to a new file, then renamed over the
    /// original (which unlinks it): the copy lands on free blocks.
    CopyAndRename,
    /// Only the first 4 KiB overwritten: fast, and the file is ruined.
    FirstBlock,
}

fn encrypt(path: &Path, how: Encryption, rng: &mut rand::rngs::SmallRng) {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    let random = |rng: &mut rand::rngs::SmallRng, n: usize| {
        let mut junk = vec![0u8; n];
        rng.fill(&mut junk[..]);
        junk
    };
    match how {
        Encryption::InPlace | Encryption::FirstBlock => {
            let n = if matches!(how, Encryption::InPlace) {
                len
            } else {
                4096.min(len)
            };
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &random(rng, n), 0).unwrap();
        }
        Encryption::CopyAndRename => {
            let copy = path.with_extension("locked");
            std::fs::write(&copy, random(rng, len)).unwrap();
            std::fs::rename(&copy, path).unwrap();
        }
    }
}

/// A fresh ext4 volume holding 40 text files of 512 KiB, written once
/// (ordinary, compressible work that must raise nothing); returns the
/// mount and the files.
fn volume_of_text_files(d: &Daemon, mount_options: &str) -> (Mounted, BTreeMap<String, Vec<u8>>) {
    d.create_volume("fs", "128M", "sync");
    let m = Mounted::with_options(d, "fs", true, mount_options);
    write_text_files(&m.mnt.join("docs"), 40, 1);
    run("sync", &[]);
    let intact = snapshot(&m.mnt);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        anomaly_tags(d).is_empty(),
        "ordinary writes raised an anomaly: {:?}",
        anomaly_tags(d)
    );
    (m, intact)
}

/// Encrypts every file of a text volume `how`; an anomaly tag must
/// follow, and rolling back to `before:` it must give the files back.
fn attack_is_tagged_and_undone(test: &str, how: Encryption, mount_options: &str) {
    if !can_mount(test) {
        return;
    }
    let d = Daemon::start();
    let (mut m, intact) = volume_of_text_files(&d, mount_options);
    let started = Instant::now();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(13);
    for name in intact.keys() {
        encrypt(&m.mnt.join(name), how, &mut rng);
    }
    run("sync", &[]);
    assert_ne!(snapshot(&m.mnt), intact, "{how:?} changed nothing");
    d.eventually(10, &format!("an anomaly tag after {how:?}"), || {
        !anomaly_tags(&d).is_empty()
    });
    eprintln!(
        "{how:?}: tagged {:?} after the attack began",
        started.elapsed()
    );
    let tag = anomaly_tags(&d)[0].clone();
    let name = tag["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("anomaly:entropy-"), "{tag}");
    assert!(
        tag["note"].as_str().unwrap().contains("high-entropy"),
        "{tag}"
    );

    m.unmount();
    d.ok(&["rollback", "fs", "--to", &format!("before:{name}"), "--yes"]);
    let m2 = Mounted::new(&d, "fs", false);
    assert_eq!(
        snapshot(&m2.mnt),
        intact,
        "rolling back to before:{name} did not give the files back"
    );
}

#[test]
fn a_ransomware_burst_is_tagged_and_before_that_tag_the_files_are_intact() {
    attack_is_tagged_and_undone(
        "a_ransomware_burst_is_tagged_and_before_that_tag_the_files_are_intact",
        Encryption::InPlace,
        "loop",
    );
}

#[test]
fn encrypted_copies_renamed_over_the_originals_are_tagged_and_before_that_tag_the_files_are_intact()
{
    attack_is_tagged_and_undone(
        "encrypted_copies_renamed_over_the_originals_are_tagged_and_before_that_tag_the_files_are_intact",
        Encryption::CopyAndRename,
        "loop,discard",
    );
}

#[test]
fn encrypting_the_first_block_of_each_file_is_tagged_and_before_that_tag_the_files_are_intact() {
    attack_is_tagged_and_undone(
        "encrypting_the_first_block_of_each_file_is_tagged_and_before_that_tag_the_files_are_intact",
        Encryption::FirstBlock,
        "loop",
    );
}

/// Waits long enough for any alarm to have become a tag, then checks that
/// none did.
fn assert_no_anomaly(d: &Daemon, after: &str) {
    run("sync", &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        anomaly_tags(d).is_empty(),
        "{after} raised an anomaly: {:?}",
        anomaly_tags(d)
    );
}

/// Writes `data` to a temporary name and renames it over `path`, as
/// compilers and packers do; the file it replaces is freed.
fn replace_file(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A build: object files, moderately compressible (half of each 4 KiB is
/// code-like noise), then a compressed release archive of 4 MiB; each
/// replaces the last build's.
fn build(dir: &Path, objects: usize, rng: &mut rand::rngs::SmallRng) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..objects {
        let blocks = rng.random_range(1..48);
        let mut object = Vec::with_capacity(blocks * 4096);
        for _ in 0..blocks {
            let mut noise = [0u8; 2048];
            rng.fill(&mut noise[..]);
            object.extend_from_slice(&noise);
            object.extend(b"\x48\x89\xe5\x48\x83\xec\x10".iter().cycle().take(2048));
        }
        replace_file(&dir.join(format!("unit-{i}.o")), &object);
    }
    let mut archive = vec![0u8; 4 << 20];
    rng.fill(&mut archive[..]);
    replace_file(&dir.join("release.tar.gz"), &archive);
}

#[test]
fn rewriting_text_and_building_raise_no_anomaly() {
    let test = "rewriting_text_and_building_raise_no_anomaly";
    if !can_mount(test) {
        return;
    }
    let d = Daemon::start();
    let (m, _) = volume_of_text_files(&d, "loop,discard");
    // Every file truncated and written again: the old blocks are freed.
    write_text_files(&m.mnt.join("docs"), 40, 2);
    assert_no_anomaly(&d, "rewriting text files");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(19);
    for _ in 0..3 {
        build(&m.mnt.join("build"), 200, &mut rng);
        run("sync", &[]);
    }
    std::fs::remove_dir_all(m.mnt.join("build")).unwrap();
    assert_no_anomaly(&d, "three builds and a clean");
}

#[test]
fn replacing_compressed_files_on_a_volume_that_holds_them_raises_no_anomaly() {
    let test = "replacing_compressed_files_on_a_volume_that_holds_them_raises_no_anomaly";
    if !can_mount(test) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("fs", "128M", "sync");
    let m = Mounted::with_options(&d, "fs", true, "loop,discard");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    // Photos, archives: incompressible. Once this copy has left the
    // detector's window (5 s) it is what the volume usually takes.
    write_files(&m.mnt.join("photos"), "p", 160, &mut rng);
    assert_no_anomaly(&d, "copying compressed files");
    std::thread::sleep(Duration::from_secs(3));
    // A new copy over the old one: every file truncated, its blocks freed,
    // and written again with incompressible bytes of about the same size;
    // on a volume of text files, this is what encryption looks like.
    write_files(&m.mnt.join("photos"), "p", 160, &mut rng);
    assert_no_anomaly(&d, "replacing compressed files");
}

#[test]
fn verification_passes_a_good_point_fails_a_damaged_one_and_last_verified_finds_it() {
    let test = "verification_passes_a_good_point_fails_a_damaged_one_and_last_verified_finds_it";
    if !can_mount(test) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("fs", "64M", "sync");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut m = Mounted::new(&d, "fs", true);
    write_files(&m.mnt.join("a"), "f", 10, &mut rng);
    m.freeze_and(|| {
        d.ok(&["tag", "create", "fs", "good"]);
    });
    write_files(&m.mnt.join("b"), "g", 10, &mut rng);
    run("sync", &[]);
    m.unmount();

    let out = d.ok(&["tag", "verify", "fs", "good"]);
    assert!(out.contains("verification passed"), "{out}");
    let good = d
        .tags("fs")
        .into_iter()
        .find(|t| t["name"] == "good")
        .unwrap();
    assert_eq!(good["verified"], "passed");
    assert!(
        good["verification"]["ran"]
            .as_str()
            .unwrap()
            .contains("e2fsck"),
        "{good}"
    );

    // Wreck the superblock and group descriptors, then tag that.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xa5 0 64k", &d.uri("fs")],
    );
    d.ok(&["tag", "create", "fs", "wrecked"]);
    let out = d.cli(&["tag", "verify", "fs", "wrecked"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let wrecked = d
        .tags("fs")
        .into_iter()
        .find(|t| t["name"] == "wrecked")
        .unwrap();
    assert_eq!(wrecked["verified"], "failed");

    // last-verified is the good tag's point.
    let uri = d.ok(&["export", "fs", "--at", "last-verified"]);
    assert!(
        uri.trim().ends_with(&format!("fs@{}", good["seq"])),
        "{uri} vs {good}"
    );
    // A command of the operator's, with the point's URI.
    let out = d.ok(&[
        "tag",
        "verify",
        "fs",
        "wrecked",
        "--command",
        "nbdinfo --size \"$TIDEMARK_URI\"",
    ]);
    assert!(out.contains("passed") && out.contains("67108864"), "{out}");
    // The timeline shows how each tag was verified.
    let timeline = d.json(&["timeline", "fs", "--json"]);
    let entry = timeline["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "good")
        .unwrap()
        .clone();
    assert!(
        entry["detail"]
            .as_str()
            .unwrap()
            .contains("verified=passed"),
        "{entry}"
    );
}

/// ext4 on a replicated primary, a tag taken with the filesystem frozen:
/// on the replica site the tag exports a clean filesystem with the files
/// as they were at the tag.
#[test]
fn an_ext4_tag_on_the_primary_is_clean_and_intact_on_the_replica() {
    let test = "an_ext4_tag_on_the_primary_is_clean_and_intact_on_the_replica";
    if !can_mount(test) {
        return;
    }
    let replica = Daemon::start();
    let d = Daemon::start();
    d.create_volume("shared-fs", "128M", "sync");
    let token = replica.token_file().display().to_string();
    d.ok(&[
        "replica",
        "add",
        "shared-fs",
        "--to",
        &replica.grpc,
        "--mode",
        "async",
        "--token-file",
        &token,
    ]);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
    let mut m = Mounted::new(&d, "shared-fs", true);
    write_files(&m.mnt.join("docs"), "a", 30, &mut rng);
    let at_tag = snapshot(&m.mnt);
    m.freeze_and(|| {
        d.ok(&["tag", "create", "shared-fs", "good"]);
    });
    // Changes after the tag travel too, and must not show in it.
    write_files(&m.mnt.join("later"), "b", 10, &mut rng);
    run("sync", &[]);
    m.unmount();
    replica.eventually(60, "the tag reaches the replica", || {
        replica
            .tags("shared-fs")
            .iter()
            .any(|t| t["name"] == "good")
    });
    let uri = replica
        .ok(&["export", "shared-fs", "--at", "tag:good"])
        .trim()
        .to_string();
    let tagged = replica.path("tagged.img");
    run("nbdcopy", &[&uri, &tagged.display().to_string()]);
    fsck_clean(&tagged).unwrap();
    assert_eq!(
        files_of_image(&replica, &tagged, "check-replica-tag"),
        at_tag,
        "on the replica, the files at the tag differ"
    );
}
