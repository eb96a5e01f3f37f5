//! The file cache: a memory-mapped ring file between capture and the
//! journal, larger and slower than the memory cache, that survives a crash.
//!
//! Records spill here when the memory cache passes its high-water mark (or
//! always, with the file tier alone). Each entry is a record exactly as a
//! segment holds it, behind a small frame, written in seq order. Entries
//! are made durable with `msync`, group-committed: one flush covers every
//! entry written before it. A record in the file cache counts as durable —
//! a sync write may be acknowledged — because on start-up every entry the
//! journal lacks is journalled before anything new. Space is given back
//! once the journal holds an entry durably *and* the header's tail has been
//! moved past it durably: recovery walks the ring from the tail on disk, so
//! space that tail still covers is never written again before then (else a
//! crash while the ring wraps would leave the walk starting in the middle
//! of a newer entry and drop every acknowledged entry after it).
//!
//! The ring file is sparse: its disk blocks are allocated a chunk at a time
//! just before the head first writes into a chunk, and given back (a hole
//! punched) once the durable tail has left a chunk behind. Each chunk is
//! charged to a [`FileBudget`], which a daemon shares between all its
//! journals: the file tier's disk use is bounded for the whole daemon, not
//! per group, and a group that is not spilling holds no disk at all. A full
//! disk shows as a failed allocation (the entry goes elsewhere), never as a
//! fault on a write into the mapping.
//!
//! Format (little-endian), header in the first 4 KiB:
//! `{ [u8;8] magic "TDMKFCAC" | u32 version | u32 header_len (4096) |
//!    u64 capacity | u64 group_id | u64 tail | u64 tail_seq | u64 head |
//!    u32 reserved | u32 crc32c(bytes 0..60) }`;
//! then the ring of `capacity` bytes. Entry at ring offset `p`:
//! `{ u32 magic "TDFC" | u32 len | u64 seq | u32 crc32c(record) |
//!    u32 crc32c(bytes 0..20) }` then `len` bytes of record; the next entry
//! starts at `p + 24 + len` rounded up to 8. Where an entry does not fit
//! before the end of the ring, a wrap marker (magic "TDFW") or the end
//! itself sends it to offset 0.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::fs::{Fs, FsFile, Mapping, OpenMode};
use crate::point::Seq;
use crate::record::{decode_record, le_u32, le_u64, RecordHeader};

/// The first bytes of a file cache.
pub const FILE_CACHE_MAGIC: [u8; 8] = *b"TDMKFCAC";

/// The file-cache format this build reads and writes.
pub const FILE_CACHE_VERSION: u32 = 1;

const HEADER_LEN: u64 = 4096;
const ENTRY_HEADER: usize = 24;
const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"TDFC");
const WRAP_MAGIC: u32 = u32::from_le_bytes(*b"TDFW");

/// The bound on disk bytes the file tier may hold, for one journal or
/// shared by every journal of a daemon.
#[derive(Debug)]
pub struct FileBudget {
    limit: u64,
    used: AtomicU64,
}

impl FileBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(FileBudget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// The bound.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes allocated now, by every file cache sharing the budget.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Takes `bytes` if they fit under the bound.
    fn try_take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used + bytes <= self.limit).then_some(used + bytes)
            })
            .is_ok()
    }

    /// Takes `bytes` whatever the bound: entries found at start-up hold
    /// acknowledged writes and keep their space.
    fn take_anyway(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::SeqCst);
    }

    fn give(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// Bytes of ring allocated (and charged to the budget) at a time: small
/// enough that an idle group gives nearly everything back, large enough
/// that allocating is rare next to the writes it serves.
fn chunk_size(capacity: u64) -> u64 {
    (capacity / 64).clamp(64 << 10, 4 << 20) / 4096 * 4096
}

/// How long after a failed chunk allocation the ring counts as full.
const ALLOCATION_RETRY: Duration = Duration::from_secs(1);

/// How long an appender that found the shared budget spent waits before it
/// looks again: the room comes from other journals, which do not signal.
const BUDGET_POLL: Duration = Duration::from_millis(10);

/// Where a journal keeps its file cache.
pub fn file_cache_path(journal_dir: &Path) -> PathBuf {
    journal_dir.join("cache").join("file-cache.ring")
}

fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// Bytes the entry of a `len`-byte record takes in the ring.
fn entry_size(len: usize) -> u64 {
    align8(ENTRY_HEADER as u64 + len as u64)
}

/// Where an entry lies in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Ring offset of the record bytes (after the entry frame).
    pub record_at: u64,
    /// Bytes of record.
    pub len: u32,
    /// Ring offset just past the entry (where the next one may go).
    pub end: u64,
    /// The record's seq.
    pub seq: Seq,
    /// Number of the write that made it, for [`FileCache::sync_through`].
    pub write_no: u64,
}

/// One entry's place in the ring.
#[derive(Clone, Copy, Debug)]
struct Slot {
    seq: Seq,
    start: u64,
    /// Bytes it holds: its own, plus wrap waste just before it.
    charge: u64,
}

struct Ring {
    /// Ring offset where the next entry goes.
    head: u64,
    /// Every entry from the tail on disk on, oldest first: entries already
    /// journalled whose space is not yet free (the tail on disk still
    /// covers them), then entries waiting for the journal.
    slots: VecDeque<Slot>,
    /// Bytes the slots hold: nothing else in the ring may be overwritten.
    used: u64,
    /// How many slots at the front are journalled...
    released: usize,
    /// ...and the bytes they hold.
    released_bytes: u64,
    /// Writes made so far.
    writes: u64,
    /// Ranges written since the last flush (ring offsets).
    unsynced: Vec<(u64, u64)>,
    /// The newest seq released (journalled).
    released_seq: Seq,
    /// Which chunks of the ring have disk blocks (charged to the budget).
    chunks: Vec<bool>,
    /// Bytes of those chunks.
    allocated: u64,
    /// When allocating a chunk last failed (a full or failing disk): until
    /// [`ALLOCATION_RETRY`] later the ring counts as full, so appenders go
    /// elsewhere (or wait) instead of trying again in a loop.
    allocation_failed: Option<Instant>,
    /// The failure, if it was not a full disk (the disk itself fails):
    /// room will not come back by waiting, so appenders are told.
    allocation_error: Option<(u64, std::io::Error)>,
}

impl Ring {
    /// Ring offset of the oldest entry not yet journalled (the head when
    /// there is none): where recovery must start walking.
    fn tail(&self) -> u64 {
        self.slots.get(self.released).map_or(self.head, |s| s.start)
    }

    /// Entries waiting for the journal.
    fn live(&self) -> usize {
        self.slots.len() - self.released
    }

    /// Counts the slots up to `seq` as journalled.
    fn release_through(&mut self, seq: Seq) {
        self.released_seq = self.released_seq.max(seq);
        while let Some(slot) = self.slots.get(self.released) {
            if slot.seq > self.released_seq {
                break;
            }
            self.released += 1;
            self.released_bytes += slot.charge;
        }
    }
}

/// Counters of the file cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileCacheStats {
    /// Bytes of the ring in use.
    pub used_bytes: u64,
    /// The ring's size.
    pub capacity_bytes: u64,
    /// Entries waiting to be journalled.
    pub entries: u64,
    /// Flushes (msync) made.
    pub flushes: u64,
    /// Bytes of disk the ring holds now (whole chunks around its entries).
    pub disk_bytes: u64,
}

/// The file cache of one journal.
pub struct FileCache {
    path: PathBuf,
    file: Arc<dyn FsFile>,
    map: Mapping,
    capacity: u64,
    chunk: u64,
    budget: Arc<FileBudget>,
    group_id: u64,
    ring: Mutex<Ring>,
    /// Signalled when space is given back.
    freed: Condvar,
    /// Writes known durable; flushes are made under this lock.
    synced: Mutex<u64>,
    /// Held while the header is written and flushed, so two writers never
    /// interleave their bytes and the tail on disk only moves forward.
    header_lock: Mutex<()>,
    flushes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for FileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCache")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// An entry found in the file cache at start-up, not yet in the journal.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// Where it is.
    pub entry: FileEntry,
    /// Its record's header.
    pub header: RecordHeader,
}

impl FileCache {
    /// Opens (or creates) the file cache at `path` with a ring of
    /// `capacity` bytes for group `group_id`, and returns the entries whose
    /// seq is above `journalled` (the journal's newest durable seq): they
    /// must be journalled before anything new. A cache of another size or
    /// group, or with a damaged header, is reported as corruption: it may
    /// hold acknowledged writes, so it is never discarded silently.
    /// A new cache is a sparse file: its ring takes disk blocks, charged
    /// to `budget`, a chunk at a time as entries need them.
    pub fn open(
        fs: &dyn Fs,
        path: &Path,
        capacity: u64,
        group_id: u64,
        journalled: Seq,
        hooks: &dyn crate::io_hooks::IoHooks,
        budget: Arc<FileBudget>,
    ) -> Result<(Self, Vec<Pending>)> {
        if capacity < 1 << 20 || capacity % 4096 != 0 {
            return Err(Error::Invalid(format!(
                "file cache size {capacity} must be at least 1 MiB and a multiple of 4096"
            )));
        }
        let file = fs
            .open(path, OpenMode::create())
            .map_err(|e| Error::io("open file cache", path, e))?;
        let len = file
            .len()
            .map_err(|e| Error::io("stat file cache", path, e))?;
        let fresh = len == 0;
        if fresh {
            // Allocated and in its directory durably before any record is
            // acknowledged from it.
            let allocated = hooks
                .before_cache_create(path)
                .and_then(|()| file.allocate(HEADER_LEN))
                .and_then(|()| file.set_len(HEADER_LEN + capacity))
                .and_then(|()| file.sync_all())
                .and_then(|()| fs.sync_dir(&crate::fs::parent_dir(path)));
            if let Err(e) = allocated {
                drop(file);
                let _ = fs.remove_file(path);
                return Err(Error::io("allocate file cache", path, e));
            }
        } else if len != HEADER_LEN + capacity {
            return Err(Error::corruption(
                path,
                0,
                format!(
                    "file cache is {len} bytes, configured for {} ({}-byte ring); it may hold acknowledged writes: \
                     journal them with the old size, or remove the file deliberately",
                    HEADER_LEN + capacity,
                    capacity
                ),
            ));
        }
        // SAFETY: the file cache is this journal's alone (the journal
        // directory is locked); ring ranges are written only while reserved
        // to one writer and read only after they were written, and the file
        // keeps its length.
        let map = unsafe { file.map(true) }.map_err(|e| Error::io("map file cache", path, e))?;
        let chunk = chunk_size(capacity);
        let chunks = capacity.div_ceil(chunk) as usize;
        let cache = FileCache {
            path: path.to_path_buf(),
            file,
            map,
            capacity,
            chunk,
            budget,
            group_id,
            ring: Mutex::new(Ring {
                head: 0,
                slots: VecDeque::new(),
                used: 0,
                released: 0,
                released_bytes: 0,
                writes: 0,
                unsynced: Vec::new(),
                released_seq: journalled,
                chunks: vec![false; chunks],
                allocated: 0,
                allocation_failed: None,
                allocation_error: None,
            }),
            freed: Condvar::new(),
            synced: Mutex::new(0),
            header_lock: Mutex::new(()),
            flushes: std::sync::atomic::AtomicU64::new(0),
        };
        let pending = if fresh {
            Vec::new()
        } else {
            cache.recover(journalled)?
        };
        cache.write_header();
        cache.flush_header()?;
        if !fresh {
            // Only once the tail on disk is the oldest entry kept: a punch
            // behind an older tail would stop the next recovery's walk.
            cache.adopt_chunks();
        }
        Ok((cache, pending))
    }

    /// Ring offset and length of chunk `i` (the last may be short).
    fn chunk_span(&self, i: usize) -> (u64, u64) {
        let at = i as u64 * self.chunk;
        (at, self.chunk.min(self.capacity - at))
    }

    /// The ring ranges that must keep their bytes: from the oldest entry
    /// recovery may walk (the durable tail) to just past the head, where a
    /// cleared frame stops the walk. Empty when there is no entry.
    fn occupied(&self, ring: &Ring) -> Vec<(u64, u64)> {
        let Some(front) = ring.slots.front() else {
            return Vec::new();
        };
        let (from, to) = (front.start, ring.head);
        let stop = |at: u64| (at + ENTRY_HEADER as u64).min(self.capacity);
        if from < to || (from == to && ring.used == 0) {
            vec![(from, stop(to))]
        } else {
            vec![(from, self.capacity), (0, stop(to))]
        }
    }

    /// Chunks `ranges` touch that have no disk blocks yet, as
    /// `(index, bytes)`.
    fn missing_chunks(&self, ring: &Ring, ranges: &[(u64, u64)]) -> Vec<(usize, u64)> {
        let mut out: Vec<(usize, u64)> = Vec::new();
        for &(a, b) in ranges.iter().filter(|(a, b)| b > a) {
            for i in (a / self.chunk) as usize..b.div_ceil(self.chunk) as usize {
                if !ring.chunks[i] && !out.iter().any(|&(j, _)| j == i) {
                    out.push((i, self.chunk_span(i).1));
                }
            }
        }
        out
    }

    /// Gives every chunk `ranges` touch disk blocks, charged to the
    /// budget. False when the budget or the disk has no room (chunks taken
    /// so far are given back by the next [`Self::free_chunks`]).
    fn allocate_chunks(&self, ring: &mut Ring, ranges: &[(u64, u64)]) -> bool {
        for (i, bytes) in self.missing_chunks(ring, ranges) {
            if !self.budget.try_take(bytes) {
                return false;
            }
            let (at, len) = self.chunk_span(i);
            if let Err(e) = self.file.allocate_range(HEADER_LEN + at, len) {
                self.budget.give(bytes);
                if ring.allocation_failed.is_none() {
                    tracing::warn!(cache = %self.path.display(), offset = HEADER_LEN + at, error = %e, "cannot allocate file-cache space; records wait elsewhere");
                }
                ring.allocation_failed = Some(Instant::now());
                if e.raw_os_error() != Some(libc::ENOSPC) {
                    ring.allocation_error = Some((HEADER_LEN + at, e));
                }
                return false;
            }
            ring.allocation_failed = None;
            ring.chunks[i] = true;
            ring.allocated += bytes;
        }
        true
    }

    /// Punches out every chunk with disk blocks outside the occupied ring
    /// and gives its bytes back to the budget. Called under the ring lock,
    /// so no appender allocates (and writes) a chunk while it is punched.
    fn free_chunks(&self, ring: &mut Ring) {
        let keep = self.occupied(ring);
        let kept = |i: usize| {
            let (a, len) = self.chunk_span(i);
            keep.iter().any(|&(from, to)| a < to && from < a + len)
        };
        let mut i = 0;
        while i < ring.chunks.len() {
            if !ring.chunks[i] || kept(i) {
                i += 1;
                continue;
            }
            // One punch for a run of free chunks.
            let first = i;
            let mut bytes = 0;
            while i < ring.chunks.len() && ring.chunks[i] && !kept(i) {
                bytes += self.chunk_span(i).1;
                i += 1;
            }
            let at = self.chunk_span(first).0;
            match self.file.zero_range(HEADER_LEN + at, bytes, true) {
                Ok(()) => {
                    ring.chunks[first..i].fill(false);
                    ring.allocated -= bytes;
                    self.budget.give(bytes);
                }
                Err(e) => {
                    tracing::warn!(cache = %self.path.display(), offset = HEADER_LEN + at, error = %e, "cannot give file-cache space back; it stays allocated");
                }
            }
        }
    }

    /// After recovery: charges the chunks the found entries occupy to the
    /// budget (whatever it holds: they are acknowledged writes) and gives
    /// every other chunk's disk blocks back.
    fn adopt_chunks(&self) {
        let mut ring = self.ring.lock();
        let occupied = self.occupied(&ring);
        for (i, bytes) in self.missing_chunks(&ring, &occupied) {
            self.budget.take_anyway(bytes);
            ring.chunks[i] = true;
            ring.allocated += bytes;
        }
        // The rest may hold blocks from before (a crash before a punch, or
        // a ring allocated whole by an earlier version): mark them so the
        // punch below frees them. Charged first, so the punch's give-back
        // balances.
        for i in 0..ring.chunks.len() {
            if !ring.chunks[i] {
                let bytes = self.chunk_span(i).1;
                self.budget.take_anyway(bytes);
                ring.chunks[i] = true;
                ring.allocated += bytes;
            }
        }
        self.free_chunks(&mut ring);
    }

    /// Where an entry of `size` bytes goes with the head at `head`: its
    /// start and the bytes wasted before the end of the ring.
    fn placement(&self, head: u64, size: u64) -> (u64, u64) {
        if self.capacity - head < size {
            (0, self.capacity - head)
        } else {
            (head, 0)
        }
    }

    /// The ring ranges an entry of `size` bytes written at the head would
    /// write: a wrap marker, the entry, the cleared frame after it.
    fn ranges_written(&self, head: u64, size: u64) -> [(u64, u64); 3] {
        let (start, waste) = self.placement(head, size);
        let end = start + size;
        let wrap = if waste >= ENTRY_HEADER as u64 {
            (head, head + ENTRY_HEADER as u64)
        } else {
            (0, 0)
        };
        let clear = if self.capacity - end >= ENTRY_HEADER as u64 {
            (end, end + 4)
        } else {
            (0, 0)
        };
        [wrap, (start, end), clear]
    }

    /// True when the budget can give the chunks the next entry of `len`
    /// record bytes needs (and allocating did not just fail).
    fn budget_has_room(&self, ring: &Ring, len: usize) -> bool {
        if ring
            .allocation_failed
            .is_some_and(|at| at.elapsed() < ALLOCATION_RETRY)
        {
            return false;
        }
        let size = entry_size(len);
        let need: u64 = self
            .missing_chunks(ring, &self.ranges_written(ring.head, size))
            .iter()
            .map(|&(_, bytes)| bytes)
            .sum();
        need <= self.budget.available()
    }

    fn bytes(&self, at: u64, len: usize) -> &[u8] {
        // SAFETY: the map is `HEADER_LEN + capacity` bytes and every caller
        // passes a range inside it. Ring ranges are written only while
        // reserved to one writer and read only after they were written
        // (entries) or under the ring lock (header), so no read overlaps a
        // write.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at as usize), len) }
    }

    fn write_bytes(&self, at: u64, data: &[u8]) {
        // SAFETY: as in `bytes`: the range is inside the map and reserved
        // to this writer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(at as usize),
                data.len(),
            );
        }
    }

    fn header(&self, ring: &Ring) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[0..8].copy_from_slice(&FILE_CACHE_MAGIC);
        out[8..12].copy_from_slice(&FILE_CACHE_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        out[24..32].copy_from_slice(&self.group_id.to_le_bytes());
        out[32..40].copy_from_slice(&ring.tail().to_le_bytes());
        out[40..48].copy_from_slice(&ring.released_seq.to_le_bytes());
        out[48..56].copy_from_slice(&ring.head.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn write_header(&self) {
        let header = self.header(&self.ring.lock());
        self.write_bytes(0, &header);
    }

    /// Moves the tail on disk up to the oldest entry the journal lacks and,
    /// once that is durable, frees the space of the journalled entries
    /// before it.
    fn persist_tail(&self) -> Result<()> {
        let _header = self.header_lock.lock();
        let (header, freeing) = {
            let ring = self.ring.lock();
            if ring.released == 0 {
                return Ok(());
            }
            (self.header(&ring), ring.released)
        };
        self.write_bytes(0, &header);
        self.map
            .flush_range(0, header.len())
            .map_err(|e| Error::io("flush file cache header", &self.path, e))?;
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut ring = self.ring.lock();
        for _ in 0..freeing {
            if let Some(slot) = ring.slots.pop_front() {
                ring.used -= slot.charge;
                ring.released -= 1;
                ring.released_bytes -= slot.charge;
            }
        }
        // The tail on disk has left these bytes behind: their disk blocks
        // can serve another group.
        self.free_chunks(&mut ring);
        drop(ring);
        self.freed.notify_all();
        Ok(())
    }

    /// Finds the entries after the persisted tail, rebuilding the ring.
    fn recover(&self, journalled: Seq) -> Result<Vec<Pending>> {
        let header = self.bytes(0, 64).to_vec();
        if header[0..8] != FILE_CACHE_MAGIC || crc32c::crc32c(&header[0..60]) != le_u32(&header, 60)
        {
            return Err(Error::corruption(
                &self.path,
                0,
                "file cache header is damaged (bad magic or CRC)",
            ));
        }
        let version = le_u32(&header, 8);
        if version != FILE_CACHE_VERSION {
            return Err(Error::corruption(
                &self.path,
                8,
                format!(
                    "file cache version {version}; this build reads version {FILE_CACHE_VERSION}"
                ),
            ));
        }
        if le_u64(&header, 24) != self.group_id {
            return Err(Error::corruption(
                &self.path,
                24,
                "file cache belongs to another consistency group",
            ));
        }
        let tail = le_u64(&header, 32) % self.capacity;
        let mut at = tail;
        let mut walked = 0u64;
        let mut prev = 0;
        let mut pending = Vec::new();
        let mut slots = VecDeque::new();
        let mut writes = 0;
        let mut waste = 0;
        while walked < self.capacity {
            if self.capacity - at < ENTRY_HEADER as u64 {
                walked += self.capacity - at;
                waste += self.capacity - at;
                at = 0;
                continue;
            }
            let frame = self.bytes(HEADER_LEN + at, ENTRY_HEADER);
            let magic = le_u32(frame, 0);
            if magic == WRAP_MAGIC && crc32c::crc32c(&frame[0..20]) == le_u32(frame, 20) {
                walked += self.capacity - at;
                waste += self.capacity - at;
                at = 0;
                continue;
            }
            if magic != ENTRY_MAGIC || crc32c::crc32c(&frame[0..20]) != le_u32(frame, 20) {
                break;
            }
            let len = le_u32(frame, 4) as u64;
            let seq = le_u64(frame, 8);
            let record_at = at + ENTRY_HEADER as u64;
            if seq <= prev || record_at + len > self.capacity {
                break;
            }
            let record = self.bytes(HEADER_LEN + record_at, len as usize);
            if crc32c::crc32c(record) != le_u32(frame, 16) {
                break;
            }
            let Ok((header, _)) = decode_record(record, &self.path, HEADER_LEN + record_at) else {
                break;
            };
            if header.seq != seq || header.encoded_len() as u64 != len {
                break;
            }
            let end = align8(record_at + len);
            writes += 1;
            let entry = FileEntry {
                record_at,
                len: len as u32,
                end,
                seq,
                write_no: writes,
            };
            if seq > journalled {
                // Waste before the first live entry lies behind the tail.
                let charge = (end - at) + if slots.is_empty() { 0 } else { waste };
                slots.push_back(Slot {
                    seq,
                    start: at,
                    charge,
                });
                pending.push(Pending { entry, header });
            }
            waste = 0;
            walked += end - at;
            prev = seq;
            at = end % self.capacity;
        }
        let mut ring = self.ring.lock();
        ring.head = at;
        ring.used = slots.iter().map(|s| s.charge).sum();
        ring.slots = slots;
        ring.writes = writes;
        *self.synced.lock() = writes;
        Ok(pending)
    }

    /// Whether `len` bytes of record fit now with no IO: without moving
    /// the tail on disk, into space already allocated.
    pub fn has_room_now(&self, len: usize) -> bool {
        let size = entry_size(len);
        let ring = self.ring.lock();
        ring.used + size * 2 <= self.capacity
            && self
                .missing_chunks(&ring, &self.ranges_written(ring.head, size))
                .is_empty()
    }

    /// Waits, until `deadline` (`None`: no waiting), for `len` bytes of
    /// record to fit. True if they fit now.
    pub fn wait_for_room(&self, len: usize, deadline: Option<Instant>) -> bool {
        let need = entry_size(len) * 2;
        if need > self.capacity {
            // It would never fit: do not wait for it.
            return false;
        }
        let mut ring = self.ring.lock();
        loop {
            let ring_fits = ring.used + need <= self.capacity;
            if ring_fits && self.budget_has_room(&ring, len) {
                return true;
            }
            if ring.released > 0 {
                // Journalled entries hold the room: free it by moving the
                // tail on disk past them.
                drop(ring);
                if let Err(e) = self.persist_tail() {
                    tracing::warn!(cache = %self.path.display(), error = %e, "cannot move the file cache's tail; its space stays in use");
                    return false;
                }
                ring = self.ring.lock();
                continue;
            }
            match deadline {
                None => return false,
                Some(at) => {
                    // Room in the ring comes back from this journal, which
                    // signals; room in a shared budget from others, which
                    // do not: look again soon.
                    let until = if ring_fits {
                        at.min(Instant::now() + BUDGET_POLL)
                    } else {
                        at
                    };
                    if self.freed.wait_until(&mut ring, until).timed_out() && Instant::now() >= at {
                        return ring.used + need <= self.capacity
                            && self.budget_has_room(&ring, len);
                    }
                }
            }
        }
    }

    /// Writes an entry of `len` record bytes for `seq`, filled in by
    /// `encode`; `None` if the ring has no room. Entries must be written in
    /// seq order.
    pub fn append(
        &self,
        seq: Seq,
        len: usize,
        encode: impl FnOnce(&mut [u8]),
    ) -> Option<FileEntry> {
        let mut ring = self.ring.lock();
        let size = entry_size(len);
        let (start, waste) = self.placement(ring.head, size);
        // Room for a frame more is kept free, so clearing the magic after
        // the entry never touches the oldest entry in use.
        if ring.used + waste + size + ENTRY_HEADER as u64 > self.capacity {
            return None;
        }
        // Disk blocks under every byte written, before any is written.
        let written = self.ranges_written(ring.head, size);
        if !self.allocate_chunks(&mut ring, &written) {
            return None;
        }
        if waste >= ENTRY_HEADER as u64 {
            let mut wrap = [0u8; ENTRY_HEADER];
            wrap[0..4].copy_from_slice(&WRAP_MAGIC.to_le_bytes());
            let crc = crc32c::crc32c(&wrap[0..20]);
            wrap[20..24].copy_from_slice(&crc.to_le_bytes());
            let at = ring.head;
            self.write_bytes(HEADER_LEN + at, &wrap);
            ring.unsynced.push((at, at + ENTRY_HEADER as u64));
        }
        let record_at = start + ENTRY_HEADER as u64;
        let mut record = vec![0u8; len];
        encode(&mut record);
        let mut frame = [0u8; ENTRY_HEADER];
        frame[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        frame[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        frame[8..16].copy_from_slice(&seq.to_le_bytes());
        frame[16..20].copy_from_slice(&crc32c::crc32c(&record).to_le_bytes());
        let crc = crc32c::crc32c(&frame[0..20]);
        frame[20..24].copy_from_slice(&crc.to_le_bytes());
        self.write_bytes(HEADER_LEN + start, &frame);
        self.write_bytes(HEADER_LEN + record_at, &record);
        let end = start + size;
        // A stale entry right after this one must not look like its
        // successor after a crash: clear the next frame's magic.
        if self.capacity - end >= ENTRY_HEADER as u64 {
            self.write_bytes(HEADER_LEN + end, &[0u8; 4]);
        }
        ring.unsynced.push((start, (end + 4).min(self.capacity)));
        ring.used += waste + size;
        ring.head = end % self.capacity;
        ring.writes += 1;
        ring.slots.push_back(Slot {
            seq,
            start,
            charge: waste + size,
        });
        // The entry's whole pages need not stay mapped: the page cache
        // holds them (and a flush writes them) until the journal reads them.
        self.drop_pages(start, end);
        Some(FileEntry {
            record_at,
            len: len as u32,
            end,
            seq,
            write_no: ring.writes,
        })
    }

    /// Makes every entry up to write `write_no` durable, with one flush for
    /// all writers waiting at the same time.
    pub fn sync_through(&self, write_no: u64) -> Result<()> {
        let mut synced = self.synced.lock();
        if *synced >= write_no {
            return Ok(());
        }
        let (ranges, writes) = {
            let mut ring = self.ring.lock();
            (std::mem::take(&mut ring.unsynced), ring.writes)
        };
        let flushed = ranges.iter().try_for_each(|&(a, b)| {
            self.map
                .flush_range((HEADER_LEN + a) as usize, (b - a) as usize)
        });
        if let Err(e) = flushed {
            // Put the ranges back: a later flush must still cover them.
            self.ring.lock().unsynced.extend(ranges);
            return Err(Error::io("flush file cache", &self.path, e));
        }
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *synced = writes;
        Ok(())
    }

    /// Makes the header durable: at open nothing else in the ring was
    /// written, and a flush of the whole mapping would walk all of it.
    fn flush_header(&self) -> Result<()> {
        self.map
            .flush_range(0, HEADER_LEN as usize)
            .map_err(|e| Error::io("flush file cache header", &self.path, e))
    }

    /// Copies the record of `entry` into `out`.
    pub fn read(&self, entry: &FileEntry, out: &mut [u8]) {
        out[..entry.len as usize]
            .copy_from_slice(self.bytes(HEADER_LEN + entry.record_at, entry.len as usize));
    }

    /// Marks every entry with seq up to `seq` as journalled (durable in the
    /// journal). Their space is freed once the tail on disk has moved past
    /// them, which happens when an appender needs the room.
    pub fn release_through(&self, seq: Seq) {
        let mut ring = self.ring.lock();
        let old_tail = ring.tail();
        ring.release_through(seq);
        let new_tail = ring.tail();
        // Without pressure for room the tail on disk would lag ever
        // further, and a restart would walk every journalled entry again.
        // A drained ring, or a shared budget running short, gives its disk
        // back at once: other groups may need it, and an idle group holds
        // none.
        let lagging = ring.released_bytes > self.capacity / 4
            || (ring.released > 0
                && (ring.live() == 0 || self.budget.available() < self.budget.limit() / 8));
        drop(ring);
        if lagging {
            if let Err(e) = self.persist_tail() {
                tracing::warn!(cache = %self.path.display(), error = %e, "cannot move the file cache's tail");
            }
        }
        // Waiters for room can now free it.
        self.freed.notify_all();
        self.drop_pages(old_tail, new_tail);
    }

    /// Takes the whole pages of ring range `from..to` (wrapping) out of this
    /// process's resident set; the page cache keeps (and writes back) their
    /// contents. Without this a busy file cache would count gigabytes of
    /// page cache as the daemon's resident memory.
    fn drop_pages(&self, from: u64, to: u64) {
        let ranges = if from <= to {
            [(from, to), (0, 0)]
        } else {
            [(from, self.capacity), (0, to)]
        };
        for (a, b) in ranges {
            let start = (HEADER_LEN + a).div_ceil(4096) * 4096;
            let end = (HEADER_LEN + b) / 4096 * 4096;
            if end > start {
                // SAFETY: no reference into the range is held: entries are
                // copied in and out under their reservation. On a shared
                // file mapping MADV_DONTNEED only unmaps pages; their
                // contents, written back or not, stay in the page cache and
                // are mapped again on the next access.
                let dropped =
                    unsafe { self.map.drop_pages(start as usize, (end - start) as usize) };
                if let Err(e) = dropped {
                    tracing::debug!(cache = %self.path.display(), error = %e, "could not drop released file-cache pages");
                }
            }
        }
    }

    /// The error of a chunk allocation that failed other than for a full
    /// disk, once: an appender waiting for room gives up with it.
    pub fn take_allocation_error(&self) -> Option<Error> {
        let (offset, e) = self.ring.lock().allocation_error.take()?;
        Some(Error::io_at(
            "allocate file cache space",
            &self.path,
            offset,
            e,
        ))
    }

    /// True when no entry waits to be journalled.
    pub fn is_empty(&self) -> bool {
        self.ring.lock().live() == 0
    }

    /// The counters now.
    pub fn stats(&self) -> FileCacheStats {
        let ring = self.ring.lock();
        FileCacheStats {
            used_bytes: ring.used,
            capacity_bytes: self.capacity,
            entries: ring.live() as u64,
            flushes: self.flushes.load(std::sync::atomic::Ordering::Relaxed),
            disk_bytes: ring.allocated,
        }
    }
}

impl Drop for FileCache {
    fn drop(&mut self) {
        // The blocks stay on disk with the file; the next open charges
        // them again.
        self.budget.give(self.ring.get_mut().allocated);
    }
}
