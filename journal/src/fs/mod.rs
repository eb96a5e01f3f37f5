//! The filesystem the journal stands on, behind a small trait.
//!
//! Every file operation of the journal (segments, the file cache, the
//! manifest, base images, dirty maps) goes through [`Fs`] and [`FsFile`],
//! so a test can run the journal on [`SimFs`]: a filesystem in memory that,
//! at a simulated power cut, keeps only what was made durable — written
//! data only after an fsync (or an msync of its mapping), directory entries
//! only after an fsync of their directory — and a seeded random part of
//! the rest, torn at sector granularity. Production uses [`RealFs`].
//!
//! - [`real`] — the operating system's filesystem.
//! - [`sim`] — the simulated one, with power cuts.
//! - [`faulty`] — a wrapper that fails chosen operations on chosen files.
//! - [`document`] — small JSON documents with a version and a checksum.
//!
//! The RocksDB index is the one thing not on this trait: it is rebuilt or
//! caught up from the segments at every start, so it may be anything after
//! a crash; [`Fs::local_dir`] says where it lives.

pub mod document;
pub mod faulty;
pub mod real;
pub mod sim;

use std::ffi::OsString;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use faulty::{FaultyFs, FsOp};
pub use real::RealFs;
pub use sim::{PowerCut, SimFs};

/// How a file is opened. Reading is always allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// Allow writes.
    pub write: bool,
    /// Create the file if it does not exist.
    pub create: bool,
    /// Fail if it exists (implies `create`).
    pub create_new: bool,
    /// Truncate to zero length on open.
    pub truncate: bool,
    /// Bypass the page cache (`O_DIRECT`) where the filesystem allows it.
    pub direct: bool,
    /// A file created is readable and writable by its owner only (it
    /// holds secrets).
    pub private: bool,
}

impl OpenMode {
    /// Read only.
    pub fn read() -> Self {
        OpenMode::default()
    }

    /// Read and write an existing file.
    pub fn write() -> Self {
        OpenMode {
            write: true,
            ..OpenMode::default()
        }
    }

    /// Read and write, creating the file if it is missing.
    pub fn create() -> Self {
        OpenMode {
            write: true,
            create: true,
            ..OpenMode::default()
        }
    }

    /// Read and write a file that must not exist yet.
    pub fn create_new() -> Self {
        OpenMode {
            write: true,
            create: true,
            create_new: true,
            ..OpenMode::default()
        }
    }

    /// The same, truncating the file on open.
    pub fn truncating(self) -> Self {
        OpenMode {
            truncate: true,
            ..self
        }
    }

    /// The same, creating the file with mode 0600.
    pub fn private(self) -> Self {
        OpenMode {
            private: true,
            ..self
        }
    }

    /// The same, with `O_DIRECT` where possible.
    pub fn direct(self) -> Self {
        OpenMode {
            direct: true,
            ..self
        }
    }
}

/// A filesystem: the operations the journal needs, nothing more.
pub trait Fs: Send + Sync + Debug {
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>>;
    /// Creates `path` and every missing parent.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries in directory `path`.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Renames `from` to `to`, replacing `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes directory `path` and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `path` (files created, renamed or
    /// removed in it) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// The length of file `path` (`NotFound` if there is none).
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Takes an exclusive lock on `path` (created if missing) for as long
    /// as the returned guard lives; fails at once if another holder has it.
    fn lock(&self, path: &Path) -> io::Result<FsLock>;
    /// Where a library that does its own file IO (RocksDB) keeps the
    /// directory this filesystem calls `path`.
    fn local_dir(&self, path: &Path) -> PathBuf;
}

/// An open file.
pub trait FsFile: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the data (and the size) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes data and metadata durable.
    fn sync_all(&self) -> io::Result<()>;
    /// The file's length (a block device's size).
    fn len(&self) -> io::Result<u64>;
    /// True for an empty file.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length; new bytes read as zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Sets the length to `len` with every block allocated where the
    /// filesystem can, so that a full disk shows here (`ENOSPC`) and never
    /// later in the middle of a write.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Allocates the blocks of `len` bytes at `offset` inside the file
    /// (where the filesystem can), so that writing them through a mapping
    /// never meets a full disk: that shows here, as `ENOSPC`.
    fn allocate_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Sets `len` bytes at `offset` to zero, keeping the file's size;
    /// `punch` frees their space where the filesystem can.
    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> io::Result<()>;
    /// The ranges of `from..to` that may hold data, in order: where the
    /// filesystem tells holes and unwritten preallocation apart
    /// (`SEEK_DATA`), only the written ranges; else the whole range.
    fn data_ranges(&self, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(whole_range(from, to))
    }
    /// True if writes bypass the page cache.
    fn is_direct(&self) -> bool;
    /// True if the file is a block device (which has no settable length).
    fn is_block_device(&self) -> bool {
        false
    }
    /// Maps the whole file (at its current length) into memory.
    ///
    /// # Safety
    /// The caller must keep every byte it reads through the mapping free of
    /// concurrent writes (through the mapping or the file), and must not
    /// change the file's length beyond the mapping while it lives.
    unsafe fn map(&self, writable: bool) -> io::Result<Mapping>;
}

/// `from..to` as the one range [`FsFile::data_ranges`] gives where it cannot
/// tell data from holes (none if it is empty).
pub(crate) fn whole_range(from: u64, to: u64) -> Vec<(u64, u64)> {
    if from < to {
        vec![(from, to)]
    } else {
        Vec::new()
    }
}

/// A held [`Fs::lock`].
pub struct FsLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl Debug for FsLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FsLock")
    }
}

impl FsLock {
    /// A lock held for as long as `guard` lives.
    pub fn new(guard: Box<dyn Send + Sync>) -> Self {
        FsLock(guard)
    }
}

/// A file mapped into memory.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    backing: MappingBacking,
}

enum MappingBacking {
    Real(memmap2::MmapRaw),
    Sim(sim::SimMapping),
}

// SAFETY: the mapping is plain memory owned by `backing`, which is Send and
// Sync itself (memmap2's MmapRaw is; the simulated one keeps its inode
// alive); who may read or write which bytes is the caller's contract (see
// `FsFile::map`).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).finish()
    }
}

impl Mapping {
    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The first byte, for writing.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is mapped for as long as `self` lives;
        // that no byte read is written meanwhile is the contract under
        // which the mapping was made (`FsFile::map`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Makes `len` bytes at `offset`, written through the mapping, durable.
    pub fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        match &self.backing {
            MappingBacking::Real(map) => map.flush_range(offset, len),
            MappingBacking::Sim(map) => map.flush_range(offset, len),
        }
    }

    /// Makes every byte written through the mapping durable.
    pub fn flush(&self) -> io::Result<()> {
        self.flush_range(0, self.len)
    }

    /// Takes the pages of `len` bytes at `offset` out of this process's
    /// resident set; their contents stay in the page cache.
    ///
    /// # Safety
    /// No reference into the range may be held.
    pub unsafe fn drop_pages(&self, offset: usize, len: usize) -> io::Result<()> {
        match &self.backing {
            // SAFETY: the caller holds no reference into the range; on a
            // shared file mapping MADV_DONTNEED only unmaps the pages.
            MappingBacking::Real(map) => unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            },
            MappingBacking::Sim(_) => Ok(()),
        }
    }
}

/// Reads the whole of file `path`.
pub fn read(fs: &dyn Fs, path: &Path) -> io::Result<Vec<u8>> {
    let file = fs.open(path, OpenMode::read())?;
    let len = usize::try_from(file.len()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to read"))?;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Replaces file `path` with `bytes` so that a crash at any moment leaves
/// either the old file or the new one, whole: the bytes go to
/// `PATH.partial`, which is fsynced, renamed over `path`, and the
/// directory is fsynced so the rename itself is durable.
pub fn write_atomically(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(fs, path, bytes, OpenMode::create().truncating())
}

/// Like [`write_atomically`], for a file only its owner may read (mode
/// 0600 from the moment it exists).
pub fn write_atomically_private(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    // A partial file left by a crash may have been made more open.
    let _ = fs.remove_file(Path::new(&partial));
    replace(fs, path, bytes, OpenMode::create_new().private())
}

fn replace(fs: &dyn Fs, path: &Path, bytes: &[u8], mode: OpenMode) -> io::Result<()> {
    let dir = parent_dir(path);
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = fs.open(&partial, mode)?;
    file.write_all_at(bytes, 0)?;
    file.sync_all()?;
    drop(file);
    fs.rename(&partial, path)?;
    fs.sync_dir(&dir)
}

/// Creates directory `path` (and missing parents) durably: each directory
/// made is fsynced into its parent.
pub fn create_dir_all_durably(fs: &dyn Fs, path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = path.to_path_buf();
    while fs.list_dir(&at).is_err() {
        missing.push(at.clone());
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent.to_path_buf(),
            _ => break,
        }
    }
    fs.create_dir_all(path)?;
    for dir in missing.iter().rev() {
        fs.sync_dir(&parent_dir(dir))?;
    }
    Ok(())
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The real filesystem, shared.
pub fn real() -> Arc<dyn Fs> {
    Arc::new(RealFs)
}
