//! Verification of points: the point is exported (writable, into a
//! throw-away overlay, so a filesystem journal can be replayed as a mount
//! after a power cut would) and checked — by default with `e2fsck -fn`
//! after that replay, or with the operator's command, which finds the
//! export's NBD URI in `$TIDEMARK_URI`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::hooks::run_shell;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// `e2fsck -fn` on the point (after replaying its journal).
    Fsck,
    /// A command; `$TIDEMARK_URI` is the point's NBD URI.
    Command(String),
}

/// The outcome of a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether it passed.
    pub passed: bool,
    /// What ran.
    pub ran: String,
    /// The tail of its output, or why it failed.
    pub detail: String,
}

/// Runs `check` against the export at `uri`; scratch space goes under
/// `scratch` (a directory of its own, removed afterwards).
pub fn run_check(check: &Check, uri: &str, scratch: &Path, timeout: Duration) -> Outcome {
    match check {
        Check::Command(command) => {
            let result = run_shell(command, timeout, &[("TIDEMARK_URI", uri)]);
            outcome(command.clone(), result)
        }
        Check::Fsck => {
            let _ = std::fs::create_dir_all(scratch);
            let result = fsck(uri, scratch, timeout);
            let _ = std::fs::remove_dir_all(scratch);
            outcome("e2fsck -fn (after journal replay)".into(), result)
        }
    }
}

fn outcome(ran: String, result: Result<String, String>) -> Outcome {
    match result {
        Ok(detail) => Outcome {
            passed: true,
            ran,
            detail,
        },
        Err(detail) => Outcome {
            passed: false,
            ran,
            detail,
        },
    }
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// The point as a file: through nbdfuse where FUSE works (nothing copied),
/// else copied with nbdcopy.
fn fsck(uri: &str, scratch: &Path, timeout: Duration) -> Result<String, String> {
    let fuse = Path::new("/dev/fuse").exists() && crate::hooks::command_exists("nbdfuse").is_ok();
    if fuse {
        let mount = scratch.join("fuse");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let disk = mount.join("disk");
        let mut child = Command::new("nbdfuse")
            .arg(&disk)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run nbdfuse: {e}"))?;
        let result = wait_for_file(&disk, &mut child).and_then(|()| check_image(&disk, timeout));
        let _ = Command::new("umount").arg(&mount).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        result
    } else {
        let image = scratch.join("point.img");
        run_shell(&format!("nbdcopy '{uri}' {}", quote(&image)), timeout, &[])
            .map_err(|e| format!("cannot copy the point: {e}"))?;
        check_image(&image, timeout)
    }
}

fn wait_for_file(disk: &Path, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(disk).map(|m| m.len()).unwrap_or(0) == 0 {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "nbdfuse exited ({status}) before the point appeared"
            ));
        }
        if Instant::now() > deadline {
            return Err("nbdfuse did not make the point appear within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn check_image(image: &Path, timeout: Duration) -> Result<String, String> {
    let image = quote(image);
    // Exit 1 means the journal was replayed; only 4 and up are failures.
    if let Err(e) = run_shell(
        &format!("e2fsck -E journal_only -p {image}; test $? -lt 4"),
        timeout,
        &[],
    ) {
        return Err(format!("journal replay failed: {e}"));
    }
    run_shell(&format!("e2fsck -fn {image}"), timeout, &[])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_command_sees_the_uri_and_its_exit_status_decides() {
        let dir = tempfile::tempdir().unwrap();
        let ok = run_check(
            &Check::Command("test \"$TIDEMARK_URI\" = nbd://h/db@7 && echo fine".into()),
            "nbd://h/db@7",
            dir.path(),
            Duration::from_secs(5),
        );
        assert!(ok.passed, "{ok:?}");
        assert_eq!(ok.detail, "fine");
        let bad = run_check(
            &Check::Command("echo broken; exit 2".into()),
            "nbd://h/db@7",
            dir.path(),
            Duration::from_secs(5),
        );
        assert!(!bad.passed);
        assert!(bad.detail.contains("broken"), "{bad:?}");
    }
}
