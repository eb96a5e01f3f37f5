//! A simulated filesystem with power cuts, for crash tests.
//!
//! Files live in memory. Each file keeps its current bytes and its durable
//! bytes (as of its last fsync, or msync of a mapped range); each directory
//! operation (create, rename, remove, mkdir) is durable once its directory
//! is fsynced. At a [power cut](SimFs::cut_power) the machine "dies": every
//! later operation fails with `EIO`, and what the disk holds afterwards is
//! the durable state plus a seeded random part of what was not yet durable
//! — each unsynced 512-byte sector and each unsynced directory operation
//! (in order) survives with the cut's probability. [`SimFs::restart`] then
//! brings the disk back as the cut left it, as a reboot would.
//!
//! Mappings work like a shared `mmap`: the memory is the file's current
//! bytes, written by the caller without the filesystem seeing it; a
//! mapped file's unsynced bytes are found at the cut by comparing current
//! with durable.
//!
//! A cut can be armed to fire at the Nth mutating operation
//! ([`SimFs::cut_after`]), so a test can kill the "machine" at a random
//! point in the middle of the journal's work. The randomness is a
//! splitmix64 seeded by the test, so the disk a cut leaves replays from its
//! seed (which operation is the Nth can vary with thread scheduling).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::{Fs, FsFile, FsLock, Mapping, MappingBacking, OpenMode};

const SECTOR: usize = 512;

/// How a power cut treats what was not yet durable.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PowerCut {
    /// Seeds the choice of what survives.
    pub seed: u64,
    /// Chance that an unsynced sector of file data reached the disk anyway.
    pub keep_data: f64,
    /// Chance that an unsynced directory operation did (they are kept in
    /// order: once one is lost, so are all later ones in that directory).
    pub keep_entries: f64,
}

impl PowerCut {
    /// Nothing unsynced survives.
    pub fn dropping_everything(seed: u64) -> Self {
        PowerCut {
            seed,
            keep_data: 0.0,
            keep_entries: 0.0,
        }
    }
}

/// splitmix64: a few lines of well-known PRNG, so the library needs no
/// random-number crate for a test device.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The bytes of one file, at a stable address while mapped.
struct Buffer {
    ptr: *mut u8,
    cap: usize,
}

impl Buffer {
    fn new(cap: usize) -> Buffer {
        let boxed = vec![0u8; cap.max(1)].into_boxed_slice();
        let cap = boxed.len();
        Buffer {
            ptr: Box::into_raw(boxed).cast::<u8>(),
            cap,
        }
    }

    fn slice(&self, from: usize, to: usize) -> &[u8] {
        // SAFETY: `from..to` lies within the allocation (callers check
        // against the file length, which never exceeds `cap`).
        unsafe { std::slice::from_raw_parts(self.ptr.add(from), to - from) }
    }

    fn write(&self, at: usize, data: &[u8]) {
        // SAFETY: as in `slice`; a raw copy, so no reference to the whole
        // buffer is formed while mappings may read other parts of it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) }
    }

    fn fill_zero(&self, from: usize, to: usize) {
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(self.ptr.add(from), 0, to - from) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `Box::into_raw` of a `[u8]` of `cap` bytes.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.cap,
            )));
        }
    }
}

struct InodeState {
    buf: Buffer,
    len: usize,
    durable: Vec<u8>,
    /// Sectors written (not through a mapping) since they were last durable.
    dirty: BTreeSet<usize>,
    /// Live mappings: the buffer must not move.
    maps: usize,
    /// Ever mapped writable: unsynced bytes are found by comparison.
    mapped_writable: bool,
}

struct Inode {
    state: Mutex<InodeState>,
}

// SAFETY: the raw buffer is owned by the inode and only touched under its
// mutex, or through mappings whose callers keep reads and writes apart
// (the contract of `FsFile::map`).
unsafe impl Send for Inode {}
// SAFETY: as above.
unsafe impl Sync for Inode {}

impl Inode {
    fn new(content: &[u8]) -> Arc<Inode> {
        let buf = Buffer::new(content.len().max(4096));
        buf.write(0, content);
        Arc::new(Inode {
            state: Mutex::new(InodeState {
                buf,
                len: content.len(),
                durable: content.to_vec(),
                dirty: BTreeSet::new(),
                maps: 0,
                mapped_writable: false,
            }),
        })
    }
}

impl InodeState {
    fn resize(&mut self, len: usize) -> io::Result<()> {
        if len > self.buf.cap {
            if self.maps > 0 {
                return Err(io::Error::other(
                    "simulated file grows past its mapping while mapped",
                ));
            }
            let buf = Buffer::new(len.max(self.buf.cap * 2));
            buf.write(0, self.buf.slice(0, self.len));
            self.buf = buf;
        }
        if len < self.len {
            // The cut bytes read as zeros if the file grows again, while
            // the disk may still hold them: unsynced until the next sync.
            self.buf.fill_zero(len, self.len);
            for sector in len / SECTOR..self.len.div_ceil(SECTOR) {
                self.dirty.insert(sector);
            }
        }
        self.len = len;
        Ok(())
    }

    fn write(&mut self, data: &[u8], offset: usize) -> io::Result<()> {
        let end = offset + data.len();
        if end > self.len {
            self.resize(end)?;
        }
        self.buf.write(offset, data);
        for sector in offset / SECTOR..end.div_ceil(SECTOR) {
            self.dirty.insert(sector);
        }
        Ok(())
    }

    /// An fsync: every byte as it is now becomes durable.
    fn sync(&mut self) {
        if self.mapped_writable {
            // Bytes written through a mapping are not tracked: take all.
            self.make_durable(0, self.len);
        } else {
            self.durable.resize(self.len, 0);
            for &sector in &self.dirty {
                let (a, b) = (sector * SECTOR, ((sector + 1) * SECTOR).min(self.len));
                if a < b {
                    self.durable[a..b].copy_from_slice(self.buf.slice(a, b));
                }
            }
        }
        self.dirty.clear();
    }

    fn make_durable(&mut self, from: usize, to: usize) {
        let to = to.min(self.len);
        if self.durable.len() != self.len {
            self.durable.resize(self.len, 0);
        }
        if from < to {
            self.durable[from..to].copy_from_slice(self.buf.slice(from, to));
        }
        let first = from / SECTOR;
        let last = to.div_ceil(SECTOR);
        let covered: Vec<usize> = self.dirty.range(first..last).copied().collect();
        for sector in covered {
            // A sector only partly in the range stays dirty.
            if sector * SECTOR >= from && ((sector + 1) * SECTOR).min(self.len) <= to {
                self.dirty.remove(&sector);
            }
        }
    }

    /// What the disk holds after a cut: durable bytes, plus each unsynced
    /// sector with probability `keep`.
    fn after_cut(&self, rng: &mut Rng, keep: f64) -> Vec<u8> {
        let len = if self.len != self.durable.len() && rng.chance(keep) {
            self.len
        } else {
            self.durable.len()
        };
        let mut out = self.durable.clone();
        out.resize(len, 0);
        let mut unsynced: BTreeSet<usize> = self.dirty.clone();
        if self.mapped_writable {
            let common = self.len.min(self.durable.len());
            for sector in 0..common.div_ceil(SECTOR) {
                let (a, b) = (sector * SECTOR, ((sector + 1) * SECTOR).min(common));
                if self.buf.slice(a, b) != &self.durable[a..b] {
                    unsynced.insert(sector);
                }
            }
        }
        for sector in unsynced {
            let a = sector * SECTOR;
            let b = ((sector + 1) * SECTOR).min(len).min(self.len);
            if a < b && rng.chance(keep) {
                out[a..b].copy_from_slice(self.buf.slice(a, b));
            }
        }
        out
    }
}

#[derive(Clone)]
enum Node {
    Dir,
    File(Arc<Inode>),
}

#[derive(Clone)]
enum DirOp {
    Put(PathBuf, Node),
    Remove(PathBuf),
    Rename(PathBuf, PathBuf),
}

impl DirOp {
    /// The directory whose fsync makes this durable.
    fn dir(&self) -> PathBuf {
        match self {
            DirOp::Put(path, _) | DirOp::Remove(path) | DirOp::Rename(_, path) => {
                super::parent_dir(path)
            }
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, Node>) {
        match self {
            DirOp::Put(path, node) => {
                if names.contains_key(&super::parent_dir(path)) {
                    names.insert(path.clone(), node.clone());
                }
            }
            DirOp::Remove(path) => {
                names.remove(path);
            }
            DirOp::Rename(from, to) => {
                if let Some(node) = names.remove(from) {
                    names.insert(to.clone(), node);
                }
            }
        }
    }
}

struct State {
    names: BTreeMap<PathBuf, Node>,
    durable_names: BTreeMap<PathBuf, Node>,
    /// Directory operations not yet durable, oldest first.
    unsynced: Vec<DirOp>,
    locks: BTreeSet<PathBuf>,
    /// The disk as the last cut left it, installed by `restart`.
    after_cut: Option<BTreeMap<PathBuf, Node>>,
}

/// A filesystem in memory that can lose power. Paths are absolute and
/// virtual; [`Fs::local_dir`] puts the directories of real libraries
/// (RocksDB) under a real directory given at construction.
pub struct SimFs {
    state: Mutex<State>,
    dead: AtomicBool,
    ops: AtomicU64,
    cut_at: AtomicU64,
    armed: Mutex<Option<PowerCut>>,
    local_root: PathBuf,
    me: Weak<SimFs>,
}

impl std::fmt::Debug for SimFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFs")
            .field("ops", &self.ops.load(Ordering::Relaxed))
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

fn dead() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory (simulated)", path.display()),
    )
}

impl SimFs {
    /// An empty filesystem (just `/`); RocksDB's directories go under
    /// `local_root`, a real directory.
    pub fn new(local_root: &Path) -> Arc<SimFs> {
        let mut names = BTreeMap::new();
        names.insert(PathBuf::from("/"), Node::Dir);
        Arc::new_cyclic(|me| SimFs {
            state: Mutex::new(State {
                durable_names: names.clone(),
                names,
                unsynced: Vec::new(),
                locks: BTreeSet::new(),
                after_cut: None,
            }),
            dead: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
            armed: Mutex::new(None),
            local_root: local_root.to_path_buf(),
            me: me.clone(),
        })
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// True once the power is off.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Arms a power cut at the `n`th mutating operation from now: that
    /// operation fails, as does everything after it.
    pub fn cut_after(&self, n: u64, cut: PowerCut) {
        *self.armed.lock() = Some(cut);
        self.cut_at
            .store(self.ops.load(Ordering::SeqCst) + n.max(1), Ordering::SeqCst);
    }

    /// Cuts the power now (if it is still on).
    pub fn cut_power(&self, cut: PowerCut) {
        let mut state = self.state.lock();
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut rng = Rng(cut.seed);
        // Directory entries: the durable ones, then unsynced operations in
        // order, each directory's run stopping at its first lost one.
        let mut names = state.durable_names.clone();
        let mut broken: BTreeSet<PathBuf> = BTreeSet::new();
        for op in &state.unsynced {
            let dir = op.dir();
            if broken.contains(&dir) {
                continue;
            }
            if rng.chance(cut.keep_entries) {
                op.apply(&mut names);
            } else {
                broken.insert(dir);
            }
        }
        // File data: what each surviving file's disk blocks hold.
        let mut cut_inodes: Vec<(*const Inode, Arc<Inode>)> = Vec::new();
        for node in names.values_mut() {
            if let Node::File(inode) = node {
                let key = Arc::as_ptr(inode);
                let fresh = match cut_inodes.iter().find(|(k, _)| *k == key) {
                    Some((_, fresh)) => fresh.clone(),
                    None => {
                        let content = inode.state.lock().after_cut(&mut rng, cut.keep_data);
                        let fresh = Inode::new(&content);
                        cut_inodes.push((key, fresh.clone()));
                        fresh
                    }
                };
                *node = Node::File(fresh);
            }
        }
        state.after_cut = Some(names);
    }

    /// Powers the machine back on with the disk as the last cut left it.
    /// Everything opened before the cut must have been dropped.
    pub fn restart(&self) {
        let mut state = self.state.lock();
        if let Some(names) = state.after_cut.take() {
            state.durable_names = names.clone();
            state.names = names;
            state.unsynced.clear();
            state.locks.clear();
        }
        self.cut_at.store(u64::MAX, Ordering::SeqCst);
        *self.armed.lock() = None;
        self.dead.store(false, Ordering::SeqCst);
    }

    /// Counts a mutating operation; fails if the power is (or just went)
    /// off.
    fn tick(&self) -> io::Result<()> {
        if self.is_dead() {
            return Err(dead());
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.cut_at.load(Ordering::SeqCst) {
            let cut = self.armed.lock().take();
            if let Some(cut) = cut {
                self.cut_power(cut);
            }
            return Err(dead());
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.is_dead() {
            Err(dead())
        } else {
            Ok(())
        }
    }

    fn inode(&self, path: &Path) -> io::Result<Arc<Inode>> {
        match self.state.lock().names.get(path) {
            Some(Node::File(inode)) => Ok(inode.clone()),
            Some(Node::Dir) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory (simulated)", path.display()),
            )),
            None => Err(not_found(path)),
        }
    }
}

fn check_parent(state: &State, path: &Path) -> io::Result<()> {
    match state.names.get(&super::parent_dir(path)) {
        Some(Node::Dir) => Ok(()),
        _ => Err(not_found(&super::parent_dir(path))),
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        self.alive()?;
        let existing = {
            let state = self.state.lock();
            match state.names.get(path) {
                Some(Node::File(inode)) => Some(inode.clone()),
                Some(Node::Dir) => {
                    return Err(io::Error::new(
                        io::ErrorKind::IsADirectory,
                        format!("{} is a directory (simulated)", path.display()),
                    ))
                }
                None => None,
            }
        };
        let inode = match existing {
            Some(_) if mode.create_new => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists (simulated)", path.display()),
                ))
            }
            Some(inode) => {
                if mode.truncate {
                    self.tick()?;
                    inode.state.lock().resize(0)?;
                }
                inode
            }
            None if mode.create || mode.create_new => {
                self.tick()?;
                let inode = Inode::new(&[]);
                let mut state = self.state.lock();
                check_parent(&state, path)?;
                let node = Node::File(inode.clone());
                state.names.insert(path.to_path_buf(), node.clone());
                state.unsynced.push(DirOp::Put(path.to_path_buf(), node));
                inode
            }
            None => return Err(not_found(path)),
        };
        Ok(Arc::new(SimFile {
            fs: self.me.upgrade().ok_or_else(dead)?,
            inode,
            writable: mode.write,
            path: path.to_path_buf(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.alive()?;
        let mut chain = Vec::new();
        let mut at = Some(path);
        while let Some(p) = at {
            if p.as_os_str().is_empty() {
                break;
            }
            chain.push(p.to_path_buf());
            at = p.parent();
        }
        for dir in chain.into_iter().rev() {
            let exists = matches!(self.state.lock().names.get(&dir), Some(Node::Dir));
            if !exists {
                self.tick()?;
                let mut state = self.state.lock();
                if let Some(Node::File(_)) = state.names.get(&dir) {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} is a file (simulated)", dir.display()),
                    ));
                }
                state.names.insert(dir.clone(), Node::Dir);
                state.unsynced.push(DirOp::Put(dir, Node::Dir));
            }
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        self.alive()?;
        let state = self.state.lock();
        if !matches!(state.names.get(path), Some(Node::Dir)) {
            return Err(not_found(path));
        }
        Ok(state
            .names
            .keys()
            .filter(|p| p.parent() == Some(path) && p.as_path() != path)
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.tick()?;
        let mut state = self.state.lock();
        check_parent(&state, to)?;
        let node = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), node);
        state
            .unsynced
            .push(DirOp::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        let mut state = self.state.lock();
        match state.names.get(path) {
            Some(Node::File(_)) => {}
            _ => return Err(not_found(path)),
        }
        state.names.remove(path);
        state.unsynced.push(DirOp::Remove(path.to_path_buf()));
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        let mut state = self.state.lock();
        let doomed: Vec<PathBuf> = state
            .names
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        if doomed.is_empty() {
            return Err(not_found(path));
        }
        // Deepest first, so each removal's directory still exists.
        for p in doomed.into_iter().rev() {
            state.names.remove(&p);
            state.unsynced.push(DirOp::Remove(p));
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        let mut state = self.state.lock();
        // A cut another thread fired since our tick has taken its snapshot
        // already: this fsync never happened.
        self.alive()?;
        if !matches!(state.names.get(path), Some(Node::Dir)) {
            return Err(not_found(path));
        }
        let (now, later): (Vec<DirOp>, Vec<DirOp>) = std::mem::take(&mut state.unsynced)
            .into_iter()
            .partition(|op| op.dir() == path);
        for op in &now {
            op.apply(&mut state.durable_names);
        }
        state.unsynced = later;
        Ok(())
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.alive()?;
        Ok(self.inode(path)?.state.lock().len as u64)
    }

    fn lock(&self, path: &Path) -> io::Result<FsLock> {
        self.alive()?;
        let file = self.open(path, OpenMode::create())?;
        let mut state = self.state.lock();
        if !state.locks.insert(path.to_path_buf()) {
            return Err(io::Error::from_raw_os_error(libc::EWOULDBLOCK));
        }
        Ok(FsLock::new(Box::new(SimLock {
            fs: self.me.clone(),
            path: path.to_path_buf(),
            _file: file,
        })))
    }

    fn local_dir(&self, path: &Path) -> PathBuf {
        self.local_root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

struct SimLock {
    fs: Weak<SimFs>,
    path: PathBuf,
    _file: Arc<dyn FsFile>,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.upgrade() {
            fs.state.lock().locks.remove(&self.path);
        }
    }
}

/// A file of a [`SimFs`].
struct SimFile {
    fs: Arc<SimFs>,
    inode: Arc<Inode>,
    writable: bool,
    path: PathBuf,
}

impl std::fmt::Debug for SimFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFile").field("path", &self.path).finish()
    }
}

impl SimFile {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        }
    }
}

impl FsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fs.alive()?;
        let state = self.inode.state.lock();
        let offset = offset as usize;
        if offset + buf.len() > state.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of a simulated file",
            ));
        }
        buf.copy_from_slice(state.buf.slice(offset, offset + buf.len()));
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.fs.tick()?;
        self.inode.state.lock().write(data, offset as usize)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.tick()?;
        let mut state = self.inode.state.lock();
        self.fs.alive()?;
        state.sync();
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.fs.alive()?;
        Ok(self.inode.state.lock().len as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.fs.tick()?;
        self.inode.state.lock().resize(len as usize)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.fs.tick()?;
        let mut state = self.inode.state.lock();
        if (len as usize) > state.len {
            state.resize(len as usize)?;
        }
        Ok(())
    }

    fn allocate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.fs.tick()?;
        let state = self.inode.state.lock();
        if offset + len > state.len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "allocate_range beyond the end of the file",
            ));
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, _punch: bool) -> io::Result<()> {
        self.check_writable()?;
        self.fs.tick()?;
        let mut state = self.inode.state.lock();
        let (from, to) = (offset as usize, (offset + len) as usize);
        let to = to.min(state.len);
        if from < to {
            state.buf.fill_zero(from, to);
            for sector in from / SECTOR..to.div_ceil(SECTOR) {
                state.dirty.insert(sector);
            }
        }
        Ok(())
    }

    fn is_direct(&self) -> bool {
        false
    }

    unsafe fn map(&self, writable: bool) -> io::Result<Mapping> {
        self.fs.alive()?;
        if writable {
            self.check_writable()?;
        }
        let mut state = self.inode.state.lock();
        state.maps += 1;
        state.mapped_writable |= writable;
        Ok(Mapping {
            ptr: state.buf.ptr,
            len: state.len,
            backing: MappingBacking::Sim(SimMapping {
                fs: self.fs.clone(),
                inode: self.inode.clone(),
            }),
        })
    }
}

/// Keeps a simulated file's buffer in place while mapped.
pub(super) struct SimMapping {
    fs: Arc<SimFs>,
    inode: Arc<Inode>,
}

impl SimMapping {
    pub(super) fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.fs.tick()?;
        let mut state = self.inode.state.lock();
        self.fs.alive()?;
        state.make_durable(offset, offset.saturating_add(len));
        Ok(())
    }
}

impl Drop for SimMapping {
    fn drop(&mut self) {
        let mut state = self.inode.state.lock();
        state.maps = state.maps.saturating_sub(1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fs::{read, write_atomically};

    fn fs() -> (tempfile::TempDir, Arc<SimFs>) {
        let dir = tempfile::tempdir().unwrap();
        let fs = SimFs::new(dir.path());
        (dir, fs)
    }

    #[test]
    fn unsynced_writes_and_entries_are_lost_at_a_cut() {
        let (_d, fs) = fs();
        fs.create_dir_all(Path::new("/j")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let a = fs.open(Path::new("/j/a"), OpenMode::create()).unwrap();
        a.write_all_at(b"durable", 0).unwrap();
        a.sync_all().unwrap();
        fs.sync_dir(Path::new("/j")).unwrap();
        a.write_all_at(b"LOST", 0).unwrap();
        let b = fs.open(Path::new("/j/b"), OpenMode::create()).unwrap();
        b.write_all_at(b"synced, entry not", 0).unwrap();
        b.sync_all().unwrap();
        drop((a, b));
        fs.cut_power(PowerCut::dropping_everything(1));
        assert!(
            fs.open(Path::new("/j/a"), OpenMode::read()).is_err(),
            "dead"
        );
        fs.restart();
        assert_eq!(read(fs.as_ref(), Path::new("/j/a")).unwrap(), b"durable");
        assert!(
            fs.file_len(Path::new("/j/b")).is_err(),
            "entry never synced"
        );
    }

    #[test]
    fn write_atomically_leaves_old_or_new_whole() {
        for seed in 0..200 {
            let (_d, fs) = fs();
            let path = Path::new("/m");
            write_atomically(fs.as_ref(), path, b"old").unwrap();
            fs.cut_after(
                1 + seed % 7,
                PowerCut {
                    seed,
                    keep_data: 0.5,
                    keep_entries: 0.5,
                },
            );
            let _ = write_atomically(fs.as_ref(), path, b"new!");
            fs.cut_power(PowerCut::dropping_everything(seed));
            fs.restart();
            let got = read(fs.as_ref(), path).unwrap();
            assert!(got == b"old" || got == b"new!", "seed {seed}: {got:?}");
        }
    }

    #[test]
    fn a_rename_without_an_fsync_first_can_leave_an_empty_file() {
        // What write_atomically guards against: found within a few seeds.
        let found = (0..100).any(|seed| {
            let (_d, fs) = fs();
            write_atomically(fs.as_ref(), Path::new("/m"), b"old").unwrap();
            let tmp = fs.open(Path::new("/m.tmp"), OpenMode::create()).unwrap();
            tmp.write_all_at(b"new", 0).unwrap();
            drop(tmp);
            fs.rename(Path::new("/m.tmp"), Path::new("/m")).unwrap();
            fs.sync_dir(Path::new("/")).unwrap();
            fs.cut_power(PowerCut {
                seed,
                keep_data: 0.5,
                keep_entries: 0.5,
            });
            fs.restart();
            read(fs.as_ref(), Path::new("/m")).unwrap() != b"old"
                && read(fs.as_ref(), Path::new("/m")).unwrap() != b"new"
        });
        assert!(found);
    }

    #[test]
    fn mapped_writes_are_durable_only_once_flushed() {
        let (_d, fs) = fs();
        let f = fs.open(Path::new("/r"), OpenMode::create()).unwrap();
        f.allocate(8192).unwrap();
        f.sync_all().unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        // SAFETY: this test is the only user of the file.
        let map = unsafe { f.map(true) }.unwrap();
        // SAFETY: inside the mapping, nothing else reads it.
        unsafe {
            std::ptr::copy_nonoverlapping(b"kept".as_ptr(), map.as_mut_ptr(), 4);
            std::ptr::copy_nonoverlapping(b"lost".as_ptr(), map.as_mut_ptr().add(4096), 4);
        }
        map.flush_range(0, 4).unwrap();
        drop((map, f));
        fs.cut_power(PowerCut::dropping_everything(3));
        fs.restart();
        let bytes = read(fs.as_ref(), Path::new("/r")).unwrap();
        assert_eq!(&bytes[0..4], b"kept");
        assert_eq!(&bytes[4096..4100], &[0, 0, 0, 0]);
    }
}
