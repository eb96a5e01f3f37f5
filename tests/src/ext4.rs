//! A real ext4 filesystem on an export: `nbdfuse` makes the export a
//! file, the kernel loop-mounts it. Shared by the filesystem and archive
//! tests; skipped with a reason where FUSE or loop devices are missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::{require, run, run_any, Daemon};

/// True if this machine can mount a filesystem through nbdfuse (else the
/// reason is printed).
pub fn can_mount(test: &str) -> bool {
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
        crate::skip(test, "/dev/fuse is missing");
        return false;
    }
    if !Path::new("/dev/loop-control").exists() && !Path::new("/dev/loop0").exists() {
        crate::skip(test, "no loop devices");
        return false;
    }
    true
}

/// The live export as a file through nbdfuse, loop-mounted.
#[derive(Debug)]
pub struct Mounted {
    fuse_dir: PathBuf,
    /// Where the filesystem is mounted.
    pub mnt: PathBuf,
    nbdfuse: Child,
    mounted: bool,
}

impl Mounted {
    /// Mounts export `export` (after mkfs.ext4 if `mkfs`).
    pub fn new(d: &Daemon, export: &str, mkfs: bool) -> Mounted {
        Self::with_options(d, export, mkfs, "loop")
    }

    /// Mounts with `options` (`-o`), e.g. `loop,discard` to have ext4 tell
    /// the volume which blocks it frees.
    pub fn with_options(d: &Daemon, export: &str, mkfs: bool, options: &str) -> Mounted {
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
            // 4 KiB blocks, as production filesystems have (mke2fs picks
            // 1 KiB for volumes this small, and nbdfuse then splits a
            // block's write where its page cache pages meet).
            run(
                "mkfs.ext4",
                &["-q", "-F", "-b", "4096", "-E", "nodiscard", &disk],
            );
        }
        let mut m = Mounted {
            fuse_dir,
            mnt,
            nbdfuse,
            mounted: false,
        };
        run(
            "mount",
            &["-o", options, &disk, &m.mnt.display().to_string()],
        );
        m.mounted = true;
        m
    }

    /// Runs `f` with the filesystem frozen (consistent on the volume).
    pub fn freeze_and(&self, f: impl FnOnce()) {
        let mnt = self.mnt.display().to_string();
        run("sync", &[]);
        run("fsfreeze", &["-f", &mnt]);
        f();
        run("fsfreeze", &["-u", &mnt]);
    }

    /// Unmounts and stops nbdfuse.
    pub fn unmount(&mut self) {
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
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
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

/// Writes `count` files of random bytes under `dir`.
pub fn write_files(dir: &Path, prefix: &str, count: usize, rng: &mut rand::rngs::SmallRng) {
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
pub fn fsck_clean(image: &Path) -> Result<(), String> {
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
pub fn files_of_image(d: &Daemon, image: &Path, name: &str) -> BTreeMap<String, Vec<u8>> {
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
