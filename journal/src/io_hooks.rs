//! Hooks in front of the journal's segment IO, so tests can make the disk
//! slow, full or broken without a special filesystem.
//!
//! Production uses [`RealIo`], whose hooks do nothing. [`FaultyIo`] delays
//! or fails writes, syncs and segment creation on command; tests flip its
//! switches while a journal runs (a slowed journal drives the adaptive IO
//! mode to async; a full disk must stall writes, not corrupt anything).

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

/// Called before each segment write, sync and creation. An error returned
/// here is treated exactly as if the operation itself had failed with it.
pub trait IoHooks: Send + Sync + Debug {
    /// Before `len` bytes are written at `offset` of segment `file`.
    fn before_write(&self, _file: &Path, _offset: u64, _len: usize) -> io::Result<()> {
        Ok(())
    }

    /// Before segment `file` is fsynced.
    fn before_sync(&self, _file: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Before segment `file` is created.
    fn before_create(&self, _file: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Before the file cache `file` is created (and allocated).
    fn before_cache_create(&self, _file: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Before a durable batch is written to the index `dir`.
    fn before_index_write(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// The real disk, untouched.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

impl IoHooks for RealIo {}

/// A disk that is as slow, full or broken as a test says, at any moment.
#[derive(Debug, Default)]
pub struct FaultyIo {
    write_delay_us: AtomicU64,
    sync_delay_us: AtomicU64,
    write_errno: AtomicI32,
    sync_errno: AtomicI32,
    create_errno: AtomicI32,
    cache_create_errno: AtomicI32,
    index_errno: AtomicI32,
    index_writes: AtomicU64,
    index_panics: std::sync::atomic::AtomicBool,
    writes: AtomicU64,
    syncs: AtomicU64,
}

fn errno(code: &AtomicI32) -> io::Result<()> {
    match code.load(Ordering::SeqCst) {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(code)),
    }
}

fn pause(us: &AtomicU64) {
    let us = us.load(Ordering::SeqCst);
    if us > 0 {
        std::thread::sleep(Duration::from_micros(us));
    }
}

impl FaultyIo {
    /// A disk with no faults (yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Every segment write takes at least `delay` longer.
    pub fn set_write_delay(&self, delay: Duration) {
        self.write_delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Every fsync takes at least `delay` longer.
    pub fn set_sync_delay(&self, delay: Duration) {
        self.sync_delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Segment writes fail with OS error `code` (0: they succeed again).
    pub fn fail_writes(&self, code: i32) {
        self.write_errno.store(code, Ordering::SeqCst);
    }

    /// Fsyncs fail with OS error `code` (0: they succeed again).
    pub fn fail_syncs(&self, code: i32) {
        self.sync_errno.store(code, Ordering::SeqCst);
    }

    /// Segment creation fails with OS error `code` (0: it succeeds again).
    pub fn fail_creates(&self, code: i32) {
        self.create_errno.store(code, Ordering::SeqCst);
    }

    /// Creating the file cache fails with OS error `code` (0: it succeeds
    /// again).
    pub fn fail_cache_creates(&self, code: i32) {
        self.cache_create_errno.store(code, Ordering::SeqCst);
    }

    /// Index writes fail with OS error `code` (0: they succeed again).
    pub fn fail_index_writes(&self, code: i32) {
        self.index_errno.store(code, Ordering::SeqCst);
    }

    /// Index writes panic (a bug in the thread that makes them), so the
    /// journal's stages lose one of their threads.
    pub fn panic_index_writes(&self) {
        self.index_panics.store(true, Ordering::SeqCst);
    }

    /// Index writes attempted so far.
    pub fn index_writes(&self) -> u64 {
        self.index_writes.load(Ordering::SeqCst)
    }

    /// Segment writes attempted so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Fsyncs attempted so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }
}

impl IoHooks for FaultyIo {
    fn before_write(&self, _file: &Path, _offset: u64, _len: usize) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        pause(&self.write_delay_us);
        errno(&self.write_errno)
    }

    fn before_sync(&self, _file: &Path) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        pause(&self.sync_delay_us);
        errno(&self.sync_errno)
    }

    fn before_create(&self, _file: &Path) -> io::Result<()> {
        errno(&self.create_errno)
    }

    fn before_cache_create(&self, _file: &Path) -> io::Result<()> {
        errno(&self.cache_create_errno)
    }

    fn before_index_write(&self, _dir: &Path) -> io::Result<()> {
        self.index_writes.fetch_add(1, Ordering::SeqCst);
        if self.index_panics.load(Ordering::SeqCst) {
            panic!("an index write panicked, as the test asked");
        }
        errno(&self.index_errno)
    }
}
