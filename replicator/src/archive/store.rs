//! The object store behind one trait, as neon keeps its remote storage:
//! [`S3Store`](super::s3::S3Store) for any S3-compatible endpoint,
//! [`LocalStore`] for a directory, and [`FaultyStore`], which fails on
//! command, for tests of what the archiver does when the store is down.
//!
//! Keys are relative to the archive's prefix. A `put` is atomic: a reader
//! sees the whole object or none (S3 guarantees it for single and multipart
//! uploads; the local store writes a temporary file and renames it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::error::{ArchiveError, Result};
use super::location::Location;

/// An object as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key, relative to the prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An object store.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// The archive's URL, for messages.
    fn location(&self) -> String;
    /// Stores `body` as `key`, replacing any object of that name.
    async fn put(&self, key: &str, body: Bytes) -> Result<()>;
    /// The whole object `key` ([`ArchiveError::NotFound`] when absent).
    async fn get(&self, key: &str) -> Result<Bytes>;
    /// `len` bytes of object `key` from byte `start` (fewer where the
    /// object ends first).
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes>;
    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// The names of the "directories" right below `prefix` (which ends
    /// in `/`): the next path component of every key under it.
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>>;
    /// Deletes `key` (no error when it is already gone).
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Settings for reaching a store.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); path-style
    /// addressing is used with it. None: AWS.
    pub endpoint: Option<String>,
    /// The region; None: the standard AWS chain, else `us-east-1`.
    pub region: Option<String>,
    /// How long one attempt of one request may take.
    pub timeout: Option<Duration>,
}

/// Opens the store `location` names.
pub async fn open(location: &Location, options: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    Ok(match location {
        Location::S3 { bucket, prefix } => {
            Arc::new(super::s3::S3Store::connect(bucket, prefix, options).await)
        }
        Location::File(dir) => Arc::new(LocalStore::new(dir.clone())),
    })
}

/// A directory as an object store (`file:///DIR`): keys are paths below it.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store in `root` (made when the first object is stored).
    pub fn new(root: PathBuf) -> Self {
        LocalStore { root }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(ArchiveError::Invalid(format!(
                "archive {}: {key:?} is not a valid object key",
                self.location()
            )));
        }
        Ok(self.root.join(key))
    }

    fn failed(&self, op: &'static str, key: &str, e: std::io::Error) -> ArchiveError {
        ArchiveError::Store {
            location: self.location(),
            op,
            key: key.to_string(),
            detail: e.to_string(),
        }
    }

    fn list_dir(&self, dir: &Path, out: &mut Vec<ObjectInfo>) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                self.list_dir(&entry.path(), out)?;
            } else if !entry.file_name().to_string_lossy().ends_with(".partial") {
                let key = entry
                    .path()
                    .strip_prefix(&self.root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let fail = |e| self.failed("put", key, e);
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        // The journal's crash-safe helpers: directories made durably, the
        // object whole or absent after a power cut.
        let fs = tidemark_journal::fs::RealFs;
        tokio::task::block_in_place(|| {
            tidemark_journal::fs::create_dir_all_durably(&fs, &parent)?;
            tidemark_journal::fs::write_atomically(&fs, &path, &body)
        })
        .map_err(fail)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        match tokio::task::block_in_place(|| std::fs::read(&path)) {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ArchiveError::NotFound {
                location: self.location(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.failed("get", key, e)),
        }
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let path = self.path(key)?;
        let read = tokio::task::block_in_place(|| {
            let file = std::fs::File::open(&path)?;
            let end = file.metadata()?.len().min(start.saturating_add(len));
            let mut buf = vec![0u8; end.saturating_sub(start) as usize];
            file.read_exact_at(&mut buf, start)?;
            Ok::<_, std::io::Error>(buf)
        });
        match read {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ArchiveError::NotFound {
                location: self.location(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.failed("get", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        tokio::task::block_in_place(|| self.list_dir(&self.root, &mut out))
            .map_err(|e| self.failed("list", prefix, e))?;
        out.retain(|o| o.key.starts_with(prefix));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.root.join(prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.failed("list", prefix, e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match tokio::task::block_in_place(|| std::fs::remove_file(&path)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.failed("delete", key, e)),
        }
    }
}

/// A store that fails on command: every operation while `down`, or the
/// puts after a budget runs out. For unit tests.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    down: AtomicBool,
    puts_left: AtomicU64,
    /// Operations refused so far.
    pub refused: AtomicU64,
    /// Bytes fetched through it so far.
    pub got_bytes: AtomicU64,
}

impl FaultyStore {
    /// Wraps `inner`, healthy.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FaultyStore {
            inner,
            down: AtomicBool::new(false),
            puts_left: AtomicU64::new(u64::MAX),
            refused: AtomicU64::new(0),
            got_bytes: AtomicU64::new(0),
        }
    }

    /// Makes every operation fail (true) or pass (false).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if !down {
            self.puts_left.store(u64::MAX, Ordering::SeqCst);
        }
    }

    /// Lets `n` more puts through, then fails the rest until `set_down(false)`.
    pub fn fail_puts_after(&self, n: u64) {
        self.puts_left.store(n, Ordering::SeqCst);
    }

    fn check(&self, op: &'static str, key: &str, put: bool) -> Result<()> {
        let out_of_puts = put
            && self
                .puts_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err();
        if self.down.load(Ordering::SeqCst) || out_of_puts {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(ArchiveError::Store {
                location: self.location(),
                op,
                key: key.to_string(),
                detail: "injected fault: the store is down".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        self.check("put", key, true)?;
        self.inner.put(key, body).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.check("get", key, false)?;
        let got = self.inner.get(key).await?;
        self.got_bytes.fetch_add(got.len() as u64, Ordering::SeqCst);
        Ok(got)
    }
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        self.check("get", key, false)?;
        let got = self.inner.get_range(key, start, len).await?;
        self.got_bytes.fetch_add(got.len() as u64, Ordering::SeqCst);
        Ok(got)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.check("list", prefix, false)?;
        self.inner.list(prefix).await
    }
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        self.check("list", prefix, false)?;
        self.inner.list_dirs(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.check("delete", key, false)?;
        self.inner.delete(key).await
    }
}
