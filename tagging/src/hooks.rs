//! App-consistent tags: run the application's freeze command, tag, and run
//! its thaw command — the thaw always runs, also when the freeze or the
//! tag fails or times out. Commands run with `sh -c`, in a process group
//! of their own so a timeout kills everything they started.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::schedule::Target;

/// A freeze/thaw pair for a volume or group.
#[derive(Clone, Debug)]
pub struct Hook {
    /// What it freezes.
    pub target: Target,
    /// Run before the tag (e.g. `fsfreeze -f /mnt/db`).
    pub freeze: String,
    /// Run after the tag, always (e.g. `fsfreeze -u /mnt/db`).
    pub thaw: String,
    /// Limit for each command.
    pub timeout: Duration,
}

/// Checks that the program a command starts with exists (on `PATH`, or as
/// a path), so a typo is found at start-up rather than at the first tag.
pub fn command_exists(command: &str) -> Result<(), String> {
    let program = command
        .split_whitespace()
        .find(|w| !w.contains('='))
        .ok_or_else(|| "the command is empty".to_string())?;
    let found = if program.contains('/') {
        std::path::Path::new(program).is_file()
    } else {
        const BUILTINS: [&str; 6] = ["true", "false", "echo", "exit", ":", "test"];
        BUILTINS.contains(&program)
            || std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
            })
    };
    if found {
        Ok(())
    } else {
        Err(format!("program {program:?} was not found"))
    }
}

/// Runs `command` with `sh -c` and the extra environment `env`; returns
/// the tail of its output, or why it failed (exit status, timeout).
pub fn run_shell(command: &str, timeout: Duration, env: &[(&str, &str)]) -> Result<String, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        })
    })
    .collect();
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= timeout => {
                // SAFETY: kill(2) on the process group the child leads.
                unsafe {
                    libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
                }
                let _ = child.wait();
                break Err(format!(
                    "{command:?} timed out after {timeout:?} and was killed"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("waiting for {command:?}: {e}")),
        }
    };
    let mut output = Vec::new();
    for reader in readers {
        output.extend(reader.join().unwrap_or_default());
    }
    let text = String::from_utf8_lossy(&output);
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    match status? {
        s if s.success() => Ok(tail),
        s => Err(format!(
            "{command:?} failed ({s}){}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        )),
    }
}

/// Freezes, runs `tag`, thaws. The thaw runs whatever happened before it;
/// the first failure is returned (with the thaw's, if it failed too).
pub fn app_consistent<T>(
    hook: &Hook,
    tag: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let frozen = run_shell(&hook.freeze, hook.timeout, &[]);
    let tagged = match &frozen {
        Ok(_) => tag(),
        Err(e) => Err(format!("freeze command failed, nothing was tagged: {e}")),
    };
    let thawed = run_shell(&hook.thaw, hook.timeout, &[]);
    match (tagged, thawed) {
        (Ok(t), Ok(_)) => Ok(t),
        (Ok(_), Err(thaw)) => Err(format!(
            "the tag was set, but the thaw command failed: {thaw}"
        )),
        (Err(e), Ok(_)) => Err(e),
        (Err(e), Err(thaw)) => Err(format!("{e}; the thaw command failed too: {thaw}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hook(dir: &std::path::Path, freeze: &str) -> Hook {
        let log = dir.join("order.log").display().to_string();
        Hook {
            target: Target::Volume("db".into()),
            freeze: freeze.replace("LOG", &log),
            thaw: format!("echo thaw >> {log}"),
            // Generous: a fork and exec on a loaded machine can take a
            // while, and a killed `echo` would change the order logged.
            timeout: Duration::from_secs(5),
        }
    }

    fn order(dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("order.log")).unwrap_or_default()
    }

    #[test]
    fn freeze_tag_thaw_run_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(dir.path(), "echo freeze >> LOG");
        let log = dir.path().join("order.log");
        let got = app_consistent(&h, || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"tag\n"))
                .unwrap();
            Ok(7)
        });
        assert_eq!(got, Ok(7));
        assert_eq!(order(dir.path()), "freeze\ntag\nthaw\n");
    }

    #[test]
    fn thaw_runs_when_freeze_fails_times_out_or_tagging_fails() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(dir.path(), "echo freeze >> LOG; exit 3");
        let err =
            app_consistent(&h, || -> Result<(), String> { panic!("must not tag") }).unwrap_err();
        assert!(err.contains("freeze command failed"), "{err}");
        assert_eq!(order(dir.path()), "freeze\nthaw\n");

        let dir = tempfile::tempdir().unwrap();
        let mut h = hook(dir.path(), "echo freeze >> LOG; sleep 30");
        h.timeout = Duration::from_secs(2);
        let started = Instant::now();
        let err = app_consistent(&h, || Ok(())).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(15));
        assert_eq!(order(dir.path()), "freeze\nthaw\n");

        let dir = tempfile::tempdir().unwrap();
        let h = hook(dir.path(), "echo freeze >> LOG");
        let err = app_consistent(&h, || -> Result<(), String> { Err("journal full".into()) })
            .unwrap_err();
        assert_eq!(err, "journal full");
        assert_eq!(order(dir.path()), "freeze\nthaw\n");
    }

    #[test]
    fn missing_programs_are_found_before_they_are_needed() {
        assert!(command_exists("sh -c true").is_ok());
        assert!(command_exists("LANG=C sh -c true").is_ok());
        assert!(command_exists("fsfreez -f /mnt")
            .unwrap_err()
            .contains("\"fsfreez\" was not found"));
        assert!(command_exists("/no/such/tool").is_err());
    }
}
