//! A real S3-compatible server for the object-store tests: moto's
//! `moto_server`, one per test, on a free loopback port (never 5000),
//! keeping its objects in memory, stopped when dropped.
//!
//! `scripts/setup.sh` installs a pinned moto in a virtual environment and
//! exports `TIDEMARK_MOTO_SERVER`; without it, `moto_server` on PATH is
//! used, and a test skips (with the reason printed) where neither is there.
//!
//! The test itself talks to the server with plain HTTP/1.1 ([`Moto::put_raw`],
//! [`Moto::get_raw`], [`Moto::list_keys`]), to set a bucket up, look at what
//! it holds or corrupt an object behind tidemark's back. moto checks no
//! signature; an `Authorization` header must still be there for it to
//! serve a private object, so these requests carry a dummy one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long moto has to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test's request waits for an answer (a paused server never
/// answers: resume it first).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What moto needs to treat a request as authenticated (it checks no
/// signature): the access key and region of [`Moto::env`].
const AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=testing/20260101/us-east-1/s3/aws4_request, \
    SignedHeaders=host, Signature=0";

/// A running moto S3 server.
#[derive(Debug)]
pub struct Moto {
    /// Its endpoint URL (`http://127.0.0.1:PORT`), for tidemark's
    /// configuration.
    pub endpoint: String,
    /// Its address (`127.0.0.1:PORT`), for a proxy in front of it.
    pub address: String,
    child: Child,
    paused: AtomicBool,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The `moto_server` to run: `TIDEMARK_MOTO_SERVER`, else the pinned one
/// `scripts/setup.sh` installs (where it puts it), else the one on PATH.
/// The pinned one comes before PATH: an older moto answers
/// CompleteMultipartUpload with a reply aws-sdk-s3 cannot parse, and the
/// archive's retries then never end.
fn server_program() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TIDEMARK_MOTO_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "TIDEMARK_MOTO_SERVER={} does not exist (run `source scripts/setup.sh`)",
                path.display()
            ))
        };
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(pinned) = cache
        .map(|c| c.join("tidemark-tools/moto-venv/bin/moto_server"))
        .filter(|p| p.is_file())
    {
        return Ok(pinned);
    }
    let found = Command::new("sh")
        .arg("-c")
        .arg("command -v moto_server")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|p| !p.is_empty());
    found.map(PathBuf::from).ok_or_else(|| {
        "moto_server is not installed (set TIDEMARK_MOTO_SERVER, or run \
         `source scripts/setup.sh`, which installs it)"
            .to_string()
    })
}

/// A free loopback port, never moto's default 5000 (another moto may be
/// running on it).
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if port != 5000 {
            return port;
        }
    }
}

impl Moto {
    /// Starts moto, or None (with the reason printed) where it is not
    /// installed. Panics, with its log, if it does not answer in time.
    pub fn start(test: &str) -> Option<Moto> {
        let program = match server_program() {
            Ok(program) => program,
            Err(why) => {
                crate::skip(test, &why);
                return None;
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("tidemark-moto-")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("moto.log");
        let log_tail = || crate::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 40);
        // The port is free when chosen but could be taken before moto
        // binds it: try another then.
        for attempt in 1..=3 {
            let port = free_port();
            let address = format!("127.0.0.1:{port}");
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("moto log");
            let err = out.try_clone().expect("moto log");
            let mut child = Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let deadline = Instant::now() + START_TIMEOUT;
            let ready = loop {
                if let Ok((200, _)) = exchange(&address, "GET", "/", &[], Duration::from_secs(2)) {
                    break true;
                }
                if let Some(status) = child.try_wait().expect("wait for moto") {
                    let text = log_tail();
                    if attempt < 3 && text.contains("Address already in use") {
                        break false;
                    }
                    panic!(
                        "moto ({}) exited ({status}) before it answered; log:\n{text}",
                        program.display()
                    );
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "moto did not answer within {} s; log:\n{}",
                        START_TIMEOUT.as_secs(),
                        log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if ready {
                return Some(Moto {
                    endpoint: format!("http://{address}"),
                    address,
                    child,
                    paused: AtomicBool::new(false),
                    log,
                    _dir: dir,
                });
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True if the server answers a ListBuckets within `timeout`.
    pub fn answers(&self, timeout: Duration) -> bool {
        matches!(
            exchange(&self.address, "GET", "/", &[], timeout),
            Ok((200, _))
        )
    }

    /// The environment a tidemark process needs to use this server with
    /// the AWS SDK's default credential and region chain.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// One request: `method` on `target` (a path and query, already
    /// encoded) with `body`; returns the status and the body of the answer.
    /// Panics if the server does not answer (a paused one never does).
    pub fn request(&self, method: &str, target: &str, body: &[u8]) -> (u16, Vec<u8>) {
        exchange(&self.address, method, target, body, REQUEST_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "moto did not answer {method} {target}{}: {e}; log:\n{}",
                if self.paused.load(Ordering::SeqCst) {
                    " (it is paused)"
                } else {
                    ""
                },
                crate::tail(&self.log_text(), 20)
            )
        })
    }

    /// Creates bucket `name` (in us-east-1). Creating it again is no error:
    /// moto, like S3 in us-east-1, answers 200 to its owner.
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = self.request("PUT", &format!("/{}", encode(name)), &[]);
        assert_eq!(
            status,
            200,
            "create bucket {name}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Stores `bytes` as `key` in `bucket` (replacing what is there).
    pub fn put_raw(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let (status, body) = self.request("PUT", &object_path(bucket, key), bytes);
        assert_eq!(
            status,
            200,
            "put {bucket}/{key}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// The object `key` of `bucket`; panics if there is none.
    pub fn get_raw(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) = self.request("GET", &object_path(bucket, key), &[]);
        assert_eq!(
            status,
            200,
            "get {bucket}/{key}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    /// Deletes the object `key` of `bucket` (no error if there is none).
    pub fn delete_raw(&self, bucket: &str, key: &str) {
        let (status, body) = self.request("DELETE", &object_path(bucket, key), &[]);
        assert_eq!(
            status,
            204,
            "delete {bucket}/{key}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Every key in `bucket`, in S3's (lexicographic) order.
    pub fn list_keys(&self, bucket: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut target = format!("/{}?list-type=2&max-keys=1000", encode(bucket));
            if let Some(token) = &token {
                target.push_str("&continuation-token=");
                target.push_str(&encode(token));
            }
            let (status, body) = self.request("GET", &target, &[]);
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "list {bucket}: {text}");
            keys.extend(elements(&text, "Key"));
            let truncated = elements(&text, "IsTruncated").next().as_deref() == Some("true");
            token = elements(&text, "NextContinuationToken").next();
            if !truncated {
                return keys;
            }
            assert!(token.is_some(), "list {bucket}: truncated without a token");
        }
    }

    /// Stops the server (SIGSTOP) without losing what it holds: requests
    /// to it hang (connections are accepted by the kernel, never answered)
    /// until [`Moto::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
        self.paused.store(false, Ordering::SeqCst);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with the pid of the child we spawned (not yet
        // waited for, so not reused) and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "signal {signal} to moto: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if self.paused.load(Ordering::SeqCst) {
            // SAFETY: as in `signal`; the child has not been waited for.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/BUCKET/KEY`, encoded.
fn object_path(bucket: &str, key: &str) -> String {
    format!("/{}/{}", encode(bucket), encode(key))
}

/// Percent-encodes all but S3's unreserved characters and `/`.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The texts of every `<NAME>…</NAME>` in `xml`, unescaped (a naive
/// reading, enough for S3's answers).
fn elements<'a>(xml: &'a str, name: &str) -> impl Iterator<Item = String> + 'a {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let text = unescape(&rest[start..start + len]);
        rest = &rest[start + len + close.len()..];
        Some(text)
    })
}

/// Undoes XML's escapes.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
fn exchange(
    address: &str,
    method: &str,
    target: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let socket = address
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stream = TcpStream::connect_timeout(&socket, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // An explicit content type: with none, some clients' default
    // (form-urlencoded) would make the server parse the body as a form
    // and store nothing.
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {address}\r\nAuthorization: {AUTHORIZATION}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    // One write: a head and a body sent apart would wait on a delayed ACK.
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.set_nodelay(true)?;
    stream.write_all(&request)?;
    // Read up to the end of the body its length announces, not to the
    // end of the connection: the server is slow to close it.
    let mut answer = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if complete(&answer) {
            break;
        }
    }
    parse_response(&answer)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed answer"))
}

/// True once `answer` holds its head and all the body its
/// `Content-Length` announces.
fn complete(answer: &[u8]) -> bool {
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..split]);
    head.split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .is_some_and(|length| answer.len() >= split + 4 + length)
}

/// Splits an HTTP/1.1 answer read to its end into (status, body).
fn parse_response(answer: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        return Some((status, dechunk(body)?));
    }
    match length {
        Some(length) => Some((status, body.get(..length)?.to_vec())),
        None => Some((status, body.to_vec())),
    }
}

/// Decodes a chunked body.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}
