//! A filesystem that fails chosen operations on chosen files, for tests:
//! a wrapper around another [`Fs`].

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Fs, FsFile, FsLock, Mapping, OpenMode};

/// The operations a [`FaultyFs`] can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsOp {
    /// Opening (and creating) files.
    Open,
    /// Reads.
    Read,
    /// Writes, length changes and allocation.
    Write,
    /// File and directory fsyncs (not flushes of mappings).
    Sync,
}

#[derive(Clone, Debug)]
struct Rule {
    op: FsOp,
    path_part: String,
    effect: Effect,
}

#[derive(Clone, Copy, Debug)]
enum Effect {
    /// Fails with this OS error.
    Fail(i32),
    /// Succeeds, this much later (a slow or stalled disk).
    Stall(std::time::Duration),
}

/// Fails operations on files whose path contains a given text, on command.
#[derive(Debug)]
pub struct FaultyFs {
    inner: Arc<dyn Fs>,
    rules: Arc<Mutex<Vec<Rule>>>,
}

impl FaultyFs {
    /// Wraps `inner`; nothing fails until told to.
    pub fn new(inner: Arc<dyn Fs>) -> Arc<FaultyFs> {
        Arc::new(FaultyFs {
            inner,
            rules: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// `op` on every path containing `path_part` fails with OS error
    /// `errno` from now on.
    pub fn fail(&self, op: FsOp, path_part: &str, errno: i32) {
        self.rules.lock().push(Rule {
            op,
            path_part: path_part.to_string(),
            effect: Effect::Fail(errno),
        });
    }

    /// `op` on every path containing `path_part` takes `delay` longer
    /// from now on (and then succeeds, unless a failure rule says else).
    pub fn stall(&self, op: FsOp, path_part: &str, delay: std::time::Duration) {
        self.rules.lock().push(Rule {
            op,
            path_part: path_part.to_string(),
            effect: Effect::Stall(delay),
        });
    }

    /// Everything succeeds again.
    pub fn heal(&self) {
        self.rules.lock().clear();
    }
}

fn check(rules: &Mutex<Vec<Rule>>, op: FsOp, path: &Path) -> io::Result<()> {
    let text = path.to_string_lossy();
    let effects: Vec<Effect> = rules
        .lock()
        .iter()
        .filter(|r| r.op == op && text.contains(&r.path_part))
        .map(|r| r.effect)
        .collect();
    for effect in &effects {
        if let Effect::Stall(delay) = effect {
            std::thread::sleep(*delay);
        }
    }
    match effects.iter().find_map(|e| match e {
        Effect::Fail(errno) => Some(*errno),
        Effect::Stall(_) => None,
    }) {
        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        None => Ok(()),
    }
}

impl Fs for FaultyFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        check(&self.rules, FsOp::Open, path)?;
        Ok(Arc::new(FaultyFile {
            inner: self.inner.open(path, mode)?,
            path: path.to_path_buf(),
            rules: self.rules.clone(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        check(&self.rules, FsOp::Write, path)?;
        self.inner.create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        check(&self.rules, FsOp::Read, path)?;
        self.inner.list_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        check(&self.rules, FsOp::Write, to)?;
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        check(&self.rules, FsOp::Write, path)?;
        self.inner.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        check(&self.rules, FsOp::Write, path)?;
        self.inner.remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        check(&self.rules, FsOp::Sync, path)?;
        self.inner.sync_dir(path)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        check(&self.rules, FsOp::Read, path)?;
        self.inner.file_len(path)
    }

    fn lock(&self, path: &Path) -> io::Result<FsLock> {
        self.inner.lock(path)
    }

    fn local_dir(&self, path: &Path) -> PathBuf {
        self.inner.local_dir(path)
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn FsFile>,
    path: PathBuf,
    rules: Arc<Mutex<Vec<Rule>>>,
}

impl FsFile for FaultyFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check(&self.rules, FsOp::Read, &self.path)?;
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        check(&self.rules, FsOp::Write, &self.path)?;
        self.inner.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        check(&self.rules, FsOp::Sync, &self.path)?;
        self.inner.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        check(&self.rules, FsOp::Sync, &self.path)?;
        self.inner.sync_all()
    }

    fn len(&self) -> io::Result<u64> {
        check(&self.rules, FsOp::Read, &self.path)?;
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        check(&self.rules, FsOp::Write, &self.path)?;
        self.inner.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        check(&self.rules, FsOp::Write, &self.path)?;
        self.inner.allocate(len)
    }

    fn allocate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check(&self.rules, FsOp::Write, &self.path)?;
        self.inner.allocate_range(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        check(&self.rules, FsOp::Write, &self.path)?;
        self.inner.zero_range(offset, len, punch)
    }

    fn data_ranges(&self, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
        check(&self.rules, FsOp::Read, &self.path)?;
        self.inner.data_ranges(from, to)
    }

    fn is_direct(&self) -> bool {
        self.inner.is_direct()
    }

    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }

    unsafe fn map(&self, writable: bool) -> io::Result<Mapping> {
        check(&self.rules, FsOp::Open, &self.path)?;
        // SAFETY: the caller's contract passes through unchanged.
        unsafe { self.inner.map(writable) }
    }
}
