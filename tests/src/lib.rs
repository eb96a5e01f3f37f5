//! End-to-end tests for tidemark: real daemons (the `tidemark` binary),
//! real NBD clients (nbdinfo, nbdcopy, qemu-img, fio, nbdfuse), real
//! filesystems.
//!
//! This library is the harness: [`Daemon`] starts `tidemark serve` on
//! ephemeral loopback ports in a temporary data directory, runs CLI
//! commands against it, and kills or restarts it. Tests that need a tool
//! or kernel feature the machine lacks call [`require`] and skip with a
//! printed reason. [`proxy::Proxy`] stands between two sites and breaks
//! their link on demand; [`forged::ForgedPrimary`] sends a replica site
//! records by hand; [`etcd::Etcd`] and [`s3::Moto`] are real etcd and
//! S3-compatible servers on their own ports; [`browser::Browser`] is a
//! headless Chromium for the console.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

pub mod browser;
pub mod etcd;
pub mod ext4;
pub mod forged;
pub mod proxy;
pub mod s3;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A self-signed certificate for 127.0.0.1 made with openssl, as
/// (certificate, key) in `dir`; `None` (the reason printed) without
/// openssl.
pub fn self_signed_certificate(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    if !require("openssl", "a TLS test") {
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tidemark-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // An end-entity certificate that the client trusts directly.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
            &key.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ],
    );
    Some((cert, key))
}

/// The `tidemark` binary built with the tests.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let bin = dir.join("tidemark");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// Says that `test` is skipped and why: on stderr, and as a line in the
/// file `TIDEMARK_SKIP_LOG` names (the test command counts and prints
/// them, so a skip is never mistaken for a pass).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
    if let Some(path) = std::env::var_os("TIDEMARK_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = writeln!(log, "{test}: {why}");
        }
    }
}

/// True if `tool` runs here; otherwise says why the test is skipped. Under
/// `CI=true` a missing tool fails the test instead: the test command
/// installs every tool the tests use, so one missing is a broken install,
/// not a machine without a kernel feature.
pub fn require(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {tool} is not installed, though scripts/setup.sh installs it"
        );
        skip(test, &format!("{tool} is not installed"));
    }
    found
}

/// The seeds a randomised end-to-end test runs: `TIDEMARK_SEED` for one,
/// else `default`, or one per 32 of `TIDEMARK_SEEDS` (a trial here starts
/// real daemons and takes seconds where a journal trial takes
/// milliseconds; CI's 64 seeds make two), from a fixed base.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("TIDEMARK_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(default, |n| n.div_ceil(32).max(default));
    (0..count).map(|i| 2026 + i).collect()
}

/// Prints the seed if the test panics while it is alive, so the failing
/// trial replays with `TIDEMARK_SEED`.
#[derive(Debug)]
pub struct SeedGuard(pub u64, pub &'static str);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}; replay with TIDEMARK_SEED={}",
                self.1, self.0, self.0
            );
        }
    }
}

/// Configuration used by every test daemon unless a test adds more: small
/// caches, so tests do not allocate gigabytes.
pub const TEST_CONFIG: &str = r#"
log = "info"
[journal]
segment_size = "64M"
memory_cache = "64M"
file_cache = "64M"
sync_timeout = "20s"
"#;

/// A reply to [`Daemon::http`].
#[derive(Debug)]
pub struct HttpReply {
    /// The status code.
    pub status: u32,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpReply {
    /// The first header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// A running `tidemark serve`.
#[derive(Debug)]
pub struct Daemon {
    /// Its data directory (and scratch space for tests).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// NBD address.
    pub nbd: String,
    /// gRPC address.
    pub grpc: String,
    /// HTTP address.
    pub http: String,
    config: String,
    log: PathBuf,
    /// The CA its CLI commands trust (`TIDEMARK_CA`), for a daemon that
    /// speaks TLS.
    ca: Option<PathBuf>,
}

impl Daemon {
    /// Starts a daemon with [`TEST_CONFIG`].
    pub fn start() -> Daemon {
        Self::with_config(TEST_CONFIG)
    }

    /// Starts a daemon with `config` as its TOML file.
    pub fn with_config(config: &str) -> Daemon {
        Self::with_config_and(config, |_| {})
    }

    /// Starts a daemon with `config`, after `prepare` has been given the
    /// test's directory (the data directory will be its `data/`).
    pub fn with_config_and(config: &str, prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-e2e-")
            .tempdir()
            .expect("temporary directory");
        let mut daemon = Daemon {
            log: dir.path().join("daemon.log"),
            dir,
            child: None,
            nbd: String::new(),
            grpc: String::new(),
            http: String::new(),
            config: config.to_string(),
            ca: None,
        };
        prepare(daemon.dir.path());
        daemon.launch();
        daemon
    }

    /// Scratch path inside the test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn launch(&mut self) {
        let config = self.path("tidemark.toml");
        std::fs::write(&config, &self.config).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut child = serve_command(&config, &self.path("data"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start tidemark serve");
        let stdout = child.stdout.take().expect("daemon stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("daemon did not start; log:\n{}", self.log_text());
            }
        };
        // "tidemark serving: nbd://A grpc=B http=http://C data=D"
        let field = |prefix: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {line:?}"))
                .to_string()
        };
        self.nbd = field("nbd://");
        self.grpc = field("grpc=");
        // HOST:PORT; https:// when TLS is configured.
        let http = field("http=");
        self.http = http
            .split_once("://")
            .map_or(http.clone(), |(_, addr)| addr.to_string());
        self.child = Some(child);
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nbd://HOST:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// Runs `tidemark ARGS` against this daemon, with its token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run tidemark")
    }

    /// `tidemark ARGS` against this daemon, with its token, not yet run.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary());
        command
            .arg("--server")
            .arg(&self.grpc)
            .args(args)
            .env("TIDEMARK_TOKEN_FILE", self.token_file())
            .env_remove("TIDEMARK_TOKEN")
            .stdin(Stdio::null());
        match &self.ca {
            Some(ca) => command.env("TIDEMARK_CA", ca),
            None => command.env_remove("TIDEMARK_CA"),
        };
        command
    }

    /// CLI commands trust `ca` from now on (a daemon whose `[api]` has a
    /// certificate).
    pub fn trusting(mut self, ca: &Path) -> Daemon {
        self.ca = Some(ca.to_path_buf());
        self
    }

    /// A gRPC client of this daemon that presents its token.
    pub async fn grpc_client(&self) -> tidemark::cli::Client {
        self.grpc_client_with(Some(&self.token())).await
    }

    /// A gRPC client of this daemon presenting `token` (or none).
    pub async fn grpc_client_with(&self, token: Option<&str>) -> tidemark::cli::Client {
        let channel = tonic::transport::Channel::from_shared(self.grpc.clone())
            .expect("address")
            .connect()
            .await
            .expect("connect to the daemon's gRPC API");
        let bearer = token.map(|t| format!("Bearer {t}").parse().expect("header value"));
        tidemark_proto::v1::tidemark_client::TidemarkClient::with_interceptor(
            channel,
            tidemark::cli::Bearer(bearer),
        )
    }

    /// The daemon's API token file (made at its first start).
    pub fn token_file(&self) -> PathBuf {
        self.path("data").join("api.token")
    }

    /// The daemon's API token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .expect("the daemon's token file")
            .trim()
            .to_string()
    }

    /// Runs `tidemark ARGS`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tidemark {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits up to `secs` seconds for `check` to hold, polling.
    pub fn eventually(&self, secs: u64, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; daemon log:\n{}",
                tail(&self.log_text(), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tags of `volume` as `tag list --json` gives them.
    pub fn tags(&self, volume: &str) -> Vec<serde_json::Value> {
        self.json(&["tag", "list", volume, "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The bodies (parsed) of the timeline events named `name` of `volume`.
    pub fn events(&self, volume: &str, name: &str) -> Vec<serde_json::Value> {
        self.json(&["timeline", volume, "--json"])["entries"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["name"] == name)
                    .map(|e| {
                        serde_json::from_str(e["detail"].as_str().unwrap_or("{}"))
                            .unwrap_or(serde_json::Value::Null)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `replica add VOLUME --to ADDRESS --mode MODE` with the replica
    /// site's token file; returns what the CLI printed.
    pub fn add_replica(&self, volume: &str, to: &str, mode: &str, token_file: &Path) -> String {
        let token = token_file.display().to_string();
        self.ok(&[
            "replica",
            "add",
            volume,
            "--to",
            to,
            "--mode",
            mode,
            "--token-file",
            &token,
        ])
    }

    /// Runs `tidemark ARGS --json` (ARGS must include `--json`) and parses it.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Creates a volume.
    pub fn create_volume(&self, name: &str, size: &str, mode: &str) {
        self.ok(&["volume", "create", name, "--size", size, "--mode", mode]);
    }

    /// `GET path` on the HTTP address: (status code, body).
    pub fn http_get(&self, path: &str) -> (u32, String) {
        let mut stream = std::net::TcpStream::connect(&self.http).expect("connect http");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )
        .expect("send");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).expect("read");
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// `METHOD path` on the HTTP address with extra `headers` and `body`
    /// (HTTP/1.0, so the reply is never chunked).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpReply {
        let mut stream = std::net::TcpStream::connect(&self.http).expect("connect http");
        let mut request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.http,
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).expect("send");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        HttpReply {
            status,
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
            body: body.to_string(),
        }
    }

    /// True while the daemon answers `/healthz`.
    /// A metric's value for `volume` from `/metrics`.
    pub fn metric(&self, name: &str, volume: &str) -> Option<f64> {
        let (_, text) = self.http_get("/metrics");
        let label = format!("volume=\"{volume}\"");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn healthy(&self) -> bool {
        std::net::TcpStream::connect(&self.http).is_ok() && self.http_get("/healthz").0 == 200
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        sigterm(child.id());
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop within 90 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the configuration used from the next (re)start on.
    pub fn set_config(&mut self, config: &str) {
        self.config = config.to_string();
    }

    /// Runs `tidemark serve` with `config` on a fresh data directory and
    /// expects it to refuse to start: returns its exit status and stderr.
    pub fn refuses_to_start(config: &str) -> (Option<i32>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tidemark.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = serve_command(&path, &dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tidemark serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the daemon started with a configuration it should refuse:\n{config}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts the daemon again on the same data directory (new ports).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch();
    }
}

/// `tidemark serve` with `config` and `data_dir` on ephemeral loopback ports.
fn serve_command(config: &Path, data_dir: &Path) -> Command {
    let mut command = Command::new(binary());
    command
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--nbd",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ]);
    command
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a command, asserting success; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command; returns its output whatever the status.
pub fn run_any(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// fio writes `size` in `bs` blocks (`rw`: randwrite or write) at QD16
/// to the NBD export `uri`, reads it back and checks every block's CRC;
/// panics with fio's output, prefixed by `what`, when a block is wrong.
pub fn fio_verify(uri: &str, rw: &str, bs: &str, size: &str, what: &str) {
    let out = run_any(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--size={size}"),
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=42",
            "--verify_state_save=0",
        ],
    );
    assert!(
        out.status.success(),
        "{what}: fio {rw} {bs} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies an NBD export to a local file with nbdcopy.
pub fn nbd_to_file(uri: &str, path: &Path) {
    run("nbdcopy", &[uri, &path.display().to_string()]);
}

/// A deliberately small NBD client that speaks the wire protocol itself,
/// so tests can send what real clients never would.
pub mod raw_nbd {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// IHAVEOPT.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Option reply magic.
    pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    /// Request magic.
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;

    /// A connection past the server's greeting.
    #[derive(Debug)]
    pub struct Conn {
        /// The socket.
        pub stream: TcpStream,
    }

    impl Conn {
        /// Connects and reads the greeting (NBDMAGIC, IHAVEOPT, flags).
        pub fn open(addr: &str) -> Conn {
            let mut stream = TcpStream::connect(addr).expect("connect nbd");
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut greeting = [0u8; 18];
            stream.read_exact(&mut greeting).expect("greeting");
            assert_eq!(&greeting[0..8], b"NBDMAGIC");
            Conn { stream }
        }

        /// Sends the client flags (fixed newstyle, no zeroes).
        pub fn flags(&mut self) {
            self.stream.write_all(&3u32.to_be_bytes()).expect("flags");
        }

        /// Sends an option.
        pub fn option(&mut self, option: u32, data: &[u8]) {
            let mut msg = IHAVEOPT.to_be_bytes().to_vec();
            msg.extend_from_slice(&option.to_be_bytes());
            msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
            msg.extend_from_slice(data);
            self.stream.write_all(&msg).expect("option");
        }

        /// Reads one option reply: (type, data).
        pub fn option_reply(&mut self) -> std::io::Result<(u32, Vec<u8>)> {
            let mut header = [0u8; 20];
            self.stream.read_exact(&mut header)?;
            assert_eq!(
                u64::from_be_bytes(header[0..8].try_into().unwrap()),
                REPLY_MAGIC
            );
            let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            self.stream.read_exact(&mut data)?;
            Ok((kind, data))
        }

        /// NBD_OPT_GO for `name`: Ok(size, flags) or Err(reply type, message).
        pub fn go(&mut self, name: &str) -> Result<(u64, u16), (u32, String)> {
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&0u16.to_be_bytes());
            self.option(7, &data);
            let mut export = None;
            loop {
                let (kind, data) = self.option_reply().expect("option reply");
                match kind {
                    3 if data.len() >= 12 && data[0..2] == [0, 0] => {
                        export = Some((
                            u64::from_be_bytes(data[2..10].try_into().unwrap()),
                            u16::from_be_bytes(data[10..12].try_into().unwrap()),
                        ))
                    }
                    3 => {}
                    1 => return Ok(export.expect("NBD_INFO_EXPORT before ACK")),
                    err => return Err((err, String::from_utf8_lossy(&data).into_owned())),
                }
            }
        }

        /// Sends a request (a WRITE's payload follows separately or here).
        pub fn request(
            &mut self,
            kind: u16,
            handle: u64,
            offset: u64,
            length: u32,
            payload: &[u8],
        ) {
            let mut msg = REQUEST_MAGIC.to_be_bytes().to_vec();
            msg.extend_from_slice(&0u16.to_be_bytes());
            msg.extend_from_slice(&kind.to_be_bytes());
            msg.extend_from_slice(&handle.to_be_bytes());
            msg.extend_from_slice(&offset.to_be_bytes());
            msg.extend_from_slice(&length.to_be_bytes());
            msg.extend_from_slice(payload);
            self.stream.write_all(&msg).expect("request");
        }

        /// Sends a request like [`Conn::request`]; an error if the
        /// connection broke (the daemon was killed).
        pub fn try_request(
            &mut self,
            kind: u16,
            handle: u64,
            offset: u64,
            length: u32,
            payload: &[u8],
        ) -> std::io::Result<()> {
            let mut msg = REQUEST_MAGIC.to_be_bytes().to_vec();
            msg.extend_from_slice(&0u16.to_be_bytes());
            msg.extend_from_slice(&kind.to_be_bytes());
            msg.extend_from_slice(&handle.to_be_bytes());
            msg.extend_from_slice(&offset.to_be_bytes());
            msg.extend_from_slice(&length.to_be_bytes());
            msg.extend_from_slice(payload);
            self.stream.write_all(&msg)
        }

        /// Reads a simple reply: (handle, error), plus `data_len` bytes of
        /// data if the error is 0.
        pub fn reply(&mut self, data_len: usize) -> std::io::Result<(u64, u32, Vec<u8>)> {
            let mut header = [0u8; 16];
            self.stream.read_exact(&mut header)?;
            assert_eq!(
                u32::from_be_bytes(header[0..4].try_into().unwrap()),
                0x6744_6698
            );
            let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
            let handle = u64::from_be_bytes(header[8..16].try_into().unwrap());
            let mut data = Vec::new();
            if error == 0 && data_len > 0 {
                data = vec![0u8; data_len];
                self.stream.read_exact(&mut data)?;
            }
            Ok((handle, error, data))
        }

        /// True once the server has closed the connection.
        pub fn closed(&mut self) -> bool {
            let mut byte = [0u8; 1];
            matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
        }
    }
}

/// A verifiable write load over NBD: each write carries its number and
/// block, so after a crash a reader can tell which write a block holds and
/// whether every acknowledged one survived.
pub mod write_load {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use rand::{Rng, SeedableRng};

    use crate::raw_nbd::Conn;

    /// The block size of the load.
    pub const BLOCK: usize = 4096;
    /// Writes in flight at once.
    pub const IN_FLIGHT: u64 = 16;

    /// Per block, the last acknowledged write.
    pub type Acked = Mutex<HashMap<u64, u64>>;
    /// Per block, every write sent (answered or not).
    pub type Pending = Mutex<HashMap<u64, Vec<u64>>>;

    /// The block's content for write number `n`: `n` and the block, then
    /// bytes drawn from both (incompressible, so records fill the caches
    /// as real data would).
    pub fn pattern(block: u64, n: u64) -> Vec<u8> {
        let mut data = Vec::with_capacity(BLOCK);
        data.extend_from_slice(&n.to_le_bytes());
        data.extend_from_slice(&block.to_le_bytes());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(n ^ block.rotate_left(32));
        data.resize(BLOCK, 0);
        rng.fill(&mut data[16..]);
        data
    }

    /// Writes random blocks of `export` (of `blocks` blocks) at the NBD
    /// server `addr` until the connection breaks; records, per block, the
    /// last acknowledged write and the writes sent but not answered.
    pub fn run(addr: &str, export: &str, blocks: u64, seed: u64, acked: &Acked, pending: &Pending) {
        let mut c = Conn::open(addr);
        c.flags();
        c.go(export).expect("open the live export");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut sent: HashMap<u64, (u64, u64)> = HashMap::new(); // handle -> (block, n)
        let mut n = seed << 32;
        loop {
            while (sent.len() as u64) < IN_FLIGHT {
                n += 1;
                // Never two writes to one block in flight: NBD may complete
                // overlapping requests in any order (as a disk may).
                let mut block = rng.random_range(0..blocks);
                while sent.values().any(|&(b, _)| b == block) {
                    block = rng.random_range(0..blocks);
                }
                pending.lock().unwrap().entry(block).or_default().push(n);
                if c.try_request(1, n, block * BLOCK as u64, BLOCK as u32, &pattern(block, n))
                    .is_err()
                {
                    return;
                }
                sent.insert(n, (block, n));
            }
            let Ok((handle, error, _)) = c.reply(0) else {
                return;
            };
            assert_eq!(error, 0, "write failed before the kill");
            let (block, n) = sent.remove(&handle).expect("reply to a request we sent");
            let mut acked = acked.lock().unwrap();
            let last = acked.entry(block).or_insert(0);
            *last = (*last).max(n);
        }
    }

    /// Reads one block.
    pub fn read_block(c: &mut Conn, block: u64) -> Vec<u8> {
        c.request(0, block, block * BLOCK as u64, BLOCK as u32, &[]);
        let (_, error, data) = c.reply(BLOCK).expect("read");
        assert_eq!(error, 0);
        data
    }

    /// Checks that `export` at `addr` holds every acknowledged write (or
    /// one sent after it), untorn. Returns the blocks checked.
    pub fn check(addr: &str, export: &str, acked: &Acked, pending: &Pending, what: &str) -> usize {
        let acked = acked.lock().unwrap();
        let pending = pending.lock().unwrap();
        assert!(!acked.is_empty(), "{what}: nothing was acknowledged");
        let mut c = Conn::open(addr);
        c.flags();
        c.go(export)
            .unwrap_or_else(|e| panic!("{what}: cannot open export {export}: {e:?}"));
        for (&block, &n) in acked.iter() {
            let data = read_block(&mut c, block);
            let got = u64::from_le_bytes(data[..8].try_into().unwrap());
            // The acknowledged write, or one sent later (answered or not).
            let later_ok = pending.get(&block).is_some_and(|ns| ns.contains(&got));
            assert!(
                got == n || (got > n && later_ok),
                "{what}, {export}: block {block} holds write {got}, the last acknowledged was {n}"
            );
            assert_eq!(data, pattern(block, got), "{what}: block {block} is torn");
        }
        acked.len()
    }
}
