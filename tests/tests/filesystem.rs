//! A real ext4 filesystem on a protected volume: `nbdfuse` makes the live
//! export a file, the kernel loop-mounts it, files are written, tagged,
//! changed; then the tag is exported and checked, the volume rolled back
//! and restored, and a sample of flush points is checked for crash
//! consistency. Skipped with a reason where FUSE or loop devices are
//! missing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tidemark_tests::{require, run, run_any, Daemon};

fn can_mount(test: &str) -> bool {
    for tool in [
        "nbdfuse",
        "nbdcopy",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fsfreeze",
    ] {
        if !require(tool, test) {
            return false;
        }
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP {test}: /dev/fuse is missing");
        return false;
    }
    if !Path::new("/dev/loop-control").exists() && !Path::new("/dev/loop0").exists() {
        eprintln!("SKIP {test}: no loop devices");
        return false;
    }
    true
}

/// The live export as a file through nbdfuse, loop-mounted.
struct Mounted {
    fuse_dir: PathBuf,
    mnt: PathBuf,
    nbdfuse: Child,
    mounted: bool,
}

impl Mounted {
    fn new(d: &Daemon, export: &str, mkfs: bool) -> Mounted {
        let fuse_dir = d.path("fuse");
        let mnt = d.path("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let disk = fuse_dir.join("disk");
        let nbdfuse = Command::new("nbdfuse")
            .arg(&disk)
            .arg(d.uri(export))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdfuse");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "nbdfuse did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let disk = disk.display().to_string();
        if mkfs {
            run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &disk]);
        }
        let mut m = Mounted {
            fuse_dir,
            mnt,
            nbdfuse,
            mounted: false,
        };
        run(
            "mount",
            &["-o", "loop", &disk, &m.mnt.display().to_string()],
        );
        m.mounted = true;
        m
    }

    fn freeze_and(&self, f: impl FnOnce()) {
        let mnt = self.mnt.display().to_string();
        run("sync", &[]);
        run("fsfreeze", &["-f", &mnt]);
        f();
        run("fsfreeze", &["-u", &mnt]);
    }

    fn unmount(&mut self) {
        if self.mounted {
            run("umount", &[&self.mnt.display().to_string()]);
            self.mounted = false;
        }
        let _ = run_any("umount", &[&self.fuse_dir.display().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nbdfuse.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run_any("umount", &["-l", &self.mnt.display().to_string()]);
        }
        let _ = run_any("umount", &["-l", &self.fuse_dir.display().to_string()]);
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

/// Every regular file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if name == "lost+found" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn write_files(dir: &Path, prefix: &str, count: usize, rng: &mut rand::rngs::SmallRng) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let len = rng.random_range(1..256 << 10);
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        std::fs::write(dir.join(format!("{prefix}-{i}.bin")), data).unwrap();
    }
}

/// Checks an image file with `e2fsck -fn` after replaying its journal
/// (what mounting it after a power cut would do).
fn fsck_clean(image: &Path) -> Result<(), String> {
    let image = image.display().to_string();
    let replay = run_any("e2fsck", &["-E", "journal_only", "-p", &image]);
    if !replay.status.success() {
        return Err(format!(
            "journal replay failed: {}",
            String::from_utf8_lossy(&replay.stderr)
        ));
    }
    let out = run_any("e2fsck", &["-fn", &image]);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn exit {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Reads the files of an ext4 image by loop-mounting it read-only.
fn files_of_image(d: &Daemon, image: &Path, name: &str) -> BTreeMap<String, Vec<u8>> {
    let mnt = d.path(name);
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    run(
        "mount",
        &["-o", "loop,ro,noload", &image.display().to_string(), &mnt_s],
    );
    let files = snapshot(&mnt);
    run("umount", &[&mnt_s]);
    files
}

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
