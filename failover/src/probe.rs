//! Application-level probes of the protected service, and custom
//! triggers. A probe checks the service the primary runs (a TCP connect,
//! an HTTP status, a command's exit status) every `interval`; only
//! `failures` failures in a row say "down", so a flapping service below
//! that count never causes a takeover. A trigger is a command of the
//! operator's whose non-zero exit says "take over".

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a probe checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// A TCP connection to `HOST:PORT` is accepted.
    Tcp(String),
    /// `GET` of an `http://` URL answers 2xx or 3xx.
    Http(String),
    /// A shell command exits 0.
    Command(String),
}

impl ProbeKind {
    /// From the configuration's `kind` and `target`.
    pub fn parse(kind: &str, target: &str) -> Result<ProbeKind, String> {
        if target.trim().is_empty() {
            return Err(format!("a {kind} probe needs a target"));
        }
        match kind {
            "tcp" => {
                if !target.contains(':') {
                    return Err(format!("tcp probe target {target:?} must be HOST:PORT"));
                }
                Ok(ProbeKind::Tcp(target.to_string()))
            }
            "http" => {
                if !target.starts_with("http://") {
                    return Err(format!(
                        "http probe target {target:?} must start with http:// (probe https with kind = \"command\" and curl)"
                    ));
                }
                Ok(ProbeKind::Http(target.to_string()))
            }
            "command" => Ok(ProbeKind::Command(target.to_string())),
            other => Err(format!("probe kind {other:?} must be tcp, http or command")),
        }
    }

    /// The kind's name, as configured.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Tcp(_) => "tcp",
            ProbeKind::Http(_) => "http",
            ProbeKind::Command(_) => "command",
        }
    }

    /// The target, as configured.
    pub fn target(&self) -> &str {
        match self {
            ProbeKind::Tcp(t) | ProbeKind::Http(t) | ProbeKind::Command(t) => t,
        }
    }

    /// Checks once, within `timeout`: Ok, or why it failed.
    pub async fn check(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.check_now()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn check_now(&self) -> Result<(), String> {
        match self {
            ProbeKind::Tcp(target) => TcpStream::connect(target)
                .await
                .map(|_| ())
                .map_err(|e| format!("cannot connect: {e}")),
            ProbeKind::Http(url) => http_status(url).await.and_then(|status| {
                if (200..400).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("HTTP status {status}"))
                }
            }),
            ProbeKind::Command(command) => run(command, &[]).await,
        }
    }
}

/// The status code of `GET url` (plain HTTP/1.1; the body is not read).
async fn http_status(url: &str) -> Result<u16, String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(&address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: tidemark-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
}

/// Runs `command` with `sh -c` and `env`; Ok if it exits 0, else its exit
/// status and the end of what it printed. Killed if the caller's timeout
/// drops it.
pub async fn run(command: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if said.is_empty() {
        said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    let said: String = said
        .chars()
        .rev()
        .take(300)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(match out.status.code() {
        Some(code) if said.is_empty() => format!("exit status {code}"),
        Some(code) => format!("exit status {code}: {said}"),
        None => "killed by a signal".to_string(),
    })
}

/// One probe's record: how many checks failed in a row, and the last
/// result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeRecord {
    /// Failures in a row (0 after any success).
    pub failures_in_a_row: u32,
    /// Checks made.
    pub checks: u64,
    /// The last failure's reason, while failing.
    pub last_error: Option<String>,
}

impl ProbeRecord {
    /// Counts one check's result; true when it makes `failures` in a row
    /// (the service counts as down).
    pub fn count(&mut self, result: Result<(), String>, failures: u32) -> bool {
        self.checks += 1;
        match result {
            Ok(()) => {
                self.failures_in_a_row = 0;
                self.last_error = None;
                false
            }
            Err(e) => {
                self.failures_in_a_row += 1;
                self.last_error = Some(e);
                self.failures_in_a_row >= failures.max(1)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A one-shot HTTP server on loopback answering `status` to every
    /// request; returns its URL.
    async fn http_server(status: u16) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{address}/health")
    }

    #[test]
    fn tcp_probes_see_a_listener_come_and_go() {
        rt().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let target = listener.local_addr().unwrap().to_string();
            let probe = ProbeKind::parse("tcp", &target).unwrap();
            assert_eq!(probe.check(Duration::from_secs(2)).await, Ok(()));
            drop(listener);
            let e = probe.check(Duration::from_secs(2)).await.unwrap_err();
            assert!(e.contains("cannot connect"), "{e}");
        });
    }

    #[test]
    fn http_probes_judge_by_status() {
        rt().block_on(async {
            let ok = ProbeKind::parse("http", &http_server(204).await).unwrap();
            assert_eq!(ok.check(Duration::from_secs(2)).await, Ok(()));
            let bad = ProbeKind::parse("http", &http_server(503).await).unwrap();
            let e = bad.check(Duration::from_secs(2)).await.unwrap_err();
            assert!(e.contains("503"), "{e}");
            // A server that accepts and never answers: the timeout.
            let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/", silent.local_addr().unwrap());
            let e = ProbeKind::parse("http", &url)
                .unwrap()
                .check(Duration::from_millis(300))
                .await
                .unwrap_err();
            assert!(e.contains("no answer"), "{e}");
        });
    }

    #[test]
    fn command_probes_judge_by_exit_status_and_say_what_was_printed() {
        rt().block_on(async {
            let ok = ProbeKind::parse("command", "true").unwrap();
            assert_eq!(ok.check(Duration::from_secs(5)).await, Ok(()));
            let bad = ProbeKind::parse("command", "echo db is gone >&2; exit 3").unwrap();
            let e = bad.check(Duration::from_secs(5)).await.unwrap_err();
            assert_eq!(e, "exit status 3: db is gone");
            let slow = ProbeKind::parse("command", "sleep 5").unwrap();
            let e = slow.check(Duration::from_millis(200)).await.unwrap_err();
            assert!(e.contains("no answer"), "{e}");
        });
    }

    #[test]
    fn bad_probe_configuration_says_what_is_wrong() {
        assert!(ProbeKind::parse("tcp", "localhost")
            .unwrap_err()
            .contains("HOST:PORT"));
        assert!(ProbeKind::parse("http", "https://x/")
            .unwrap_err()
            .contains("http://"));
        assert!(ProbeKind::parse("ping", "x")
            .unwrap_err()
            .contains("tcp, http or command"));
        assert!(ProbeKind::parse("command", " ")
            .unwrap_err()
            .contains("target"));
    }

    #[test]
    fn a_flapping_probe_below_its_failure_count_never_says_down() {
        let mut record = ProbeRecord::default();
        for i in 0..100 {
            let result = if i % 3 == 2 {
                Ok(())
            } else {
                Err("refused".to_string())
            };
            assert!(!record.count(result, 3), "down at check {i}");
        }
        assert!(!record.count(Ok(()), 3));
        assert!(!record.count(Err("x".into()), 3));
        assert!(!record.count(Err("x".into()), 3));
        assert!(record.count(Err("x".into()), 3));
        assert_eq!(record.last_error.as_deref(), Some("x"));
    }
}
