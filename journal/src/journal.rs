//! The journal of one consistency group: opening and recovering it,
//! appending records in write order, volumes and tags.
//!
//! Layout of a journal directory:
//! ```text
//! DIR/LOCK            flock'd while open: one process at a time
//! DIR/MANIFEST        volumes, horizon, epoch, holds, gaps (see manifest.rs)
//! DIR/segments/*.seg  the records (the source of truth)
//! DIR/base/*.img      each volume at the horizon
//! DIR/index/          RocksDB, rebuildable from the above
//! ```

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};
use std::sync::mpsc::Sender;

use crate::base::BaseImage;
use crate::changes::ChangedSpans;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::file_cache::{self, FileCache, FileCacheStats};
use crate::fs::{Fs, FsLock, RealFs};
use crate::index::{Index, SegmentEntry, StoredEvent, StoredTag};
use crate::io_hooks::{IoHooks, RealIo};
use crate::manifest::{Gap, Manifest};
use crate::mark::Mark;
use crate::memory_cache::{Admission, MemoryCache, MemoryCacheStats};
use crate::point::{History, Point, Seq, Timestamp};
use crate::record::{PreparedRecord, RecordKind, MAX_PAYLOAD_LEN, RECORD_HEADER_LEN};
use crate::recovery::{self, RecoveryMode, RecoveryReport};
use crate::segment::{Segment, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::volume::{validate_volume_name, VolumeId, VolumeInfo};
use crate::writer::{AppendHandle, Payload, Submission, Writer};

/// How a journal is opened.
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// The consistency group's name, used when the journal is created.
    pub group: String,
    /// Size of each segment file. Every batch must fit in one segment.
    pub segment_size: u64,
    /// The largest write one record may carry.
    pub max_record_len: u64,
    /// A group commit stops gathering records at about this many bytes.
    pub max_batch_bytes: usize,
    /// Batches smaller than this are written, synced and indexed by one
    /// thread while the writer's stages are idle, rather than passed along
    /// its three-stage pipeline (see `writer.rs`); 0 always pipelines.
    pub inline_batch_below: usize,
    /// What to do with damage in the middle of the journal.
    pub recovery: RecoveryMode,
    /// Zeroes and trims spanning more 4 KiB blocks than this are indexed as
    /// one range entry instead of one entry per block.
    pub large_range_blocks: u64,
    /// Write segments with `O_DIRECT` (where the filesystem allows it).
    pub direct_io: bool,
    /// At start-up, take sealed segments the index has wholly indexed as
    /// its catalogue records them, instead of reading every record, and
    /// check their CRCs in the background ([`Journal::sealed_check`]):
    /// start-up then costs the same for 1 GiB of journal as for 32. The
    /// newest two segments, where a torn tail can be, are always scanned.
    /// Damage found later in a sealed segment is reported, not cut off.
    pub trust_sealed: bool,
    /// Bound of the memory cache: bytes of records captured but not yet
    /// durable in the journal.
    pub memory_cache_bytes: u64,
    /// Hooks in front of segment IO ([`RealIo`] but in fault tests).
    pub io_hooks: Arc<dyn IoHooks>,
    /// Which tiers of the monitoring cache records wait in.
    pub cache_tiers: CacheTiers,
    /// Size of the file cache's ring (`DIR/cache/file-cache.ring`): the
    /// most of the file tier this journal may use. Its disk blocks are
    /// allocated as entries need them.
    pub file_cache_bytes: u64,
    /// Budgets shared with the other journals of a daemon, bounding the
    /// memory and the file tier of all of them together. `None`: this
    /// journal has budgets of its own, of `memory_cache_bytes` and
    /// `file_cache_bytes`.
    pub shared_cache: Option<CacheBudget>,
    /// With both tiers: records spill to the file cache once the memory
    /// cache holds more than this fraction of its bound...
    pub spill_above: f64,
    /// ...and return to memory once the file cache has drained and the
    /// memory cache holds less than this fraction.
    pub return_below: f64,
    /// Where timestamps come from.
    pub clock: Arc<dyn Clock>,
    /// The filesystem every journal file lives on ([`RealFs`] but in
    /// power-loss tests).
    pub fs: Arc<dyn Fs>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            group: "default".into(),
            segment_size: 64 << 20,
            max_record_len: 32 << 20,
            max_batch_bytes: 8 << 20,
            inline_batch_below: 256 << 10,
            recovery: RecoveryMode::Strict,
            large_range_blocks: 256,
            direct_io: true,
            trust_sealed: false,
            memory_cache_bytes: 128 << 20,
            io_hooks: Arc::new(RealIo),
            cache_tiers: CacheTiers::Both,
            file_cache_bytes: 4 << 30,
            shared_cache: None,
            spill_above: 0.75,
            return_below: 0.25,
            clock: Arc::new(SystemClock),
            fs: Arc::new(RealFs),
        }
    }
}

impl JournalOptions {
    fn validate(&self) -> Result<()> {
        if self.max_record_len == 0 || self.max_record_len > MAX_PAYLOAD_LEN {
            return Err(Error::Invalid(format!(
                "max_record_len {} must be between 1 and {MAX_PAYLOAD_LEN}",
                self.max_record_len
            )));
        }
        let needed = (SEGMENT_HEADER_LEN + BATCH_HEADER_LEN + RECORD_HEADER_LEN) as u64
            + self.max_batch_bytes as u64
            + self.max_record_len;
        if self.segment_size < needed || self.segment_size > u32::MAX as u64 {
            return Err(Error::Invalid(format!(
                "segment_size {} must be at least {needed} (a full batch plus the largest record) and below 4 GiB",
                self.segment_size
            )));
        }
        Ok(())
    }
}

/// How long an appender waiting for room in the file cache waits before it
/// looks whether the journal has stopped.
const FILE_ROOM_SLICE: std::time::Duration = std::time::Duration::from_millis(100);

/// How long after failing to make the file cache (a full disk) it is tried
/// again.
pub const FILE_CACHE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// The monitoring cache's bounds, shared by every journal that is given
/// them (a daemon's consistency groups): bytes of records waiting in
/// memory, and disk bytes of the file tier.
#[derive(Clone, Debug)]
pub struct CacheBudget {
    /// The memory tier's bound.
    pub memory: Arc<crate::memory_cache::MemoryBudget>,
    /// The file tier's bound.
    pub file: Arc<file_cache::FileBudget>,
}

impl CacheBudget {
    /// Budgets of `memory` and `file` bytes.
    pub fn new(memory: u64, file: u64) -> Self {
        CacheBudget {
            memory: crate::memory_cache::MemoryBudget::new(memory),
            file: file_cache::FileBudget::new(file),
        }
    }
}

/// Which tiers of the monitoring cache records wait in between capture and
/// the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheTiers {
    /// Memory only.
    Memory,
    /// The file cache only: every record is durable (in the file cache)
    /// before it reaches the journal.
    File,
    /// Memory, spilling to the file cache above a high-water mark.
    Both,
}

impl CacheTiers {
    fn code(self) -> u8 {
        match self {
            CacheTiers::Memory => 0,
            CacheTiers::File => 1,
            CacheTiers::Both => 2,
        }
    }

    fn from_code(code: u8) -> CacheTiers {
        match code {
            0 => CacheTiers::Memory,
            1 => CacheTiers::File,
            _ => CacheTiers::Both,
        }
    }
}

impl std::str::FromStr for CacheTiers {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "memory" => Ok(CacheTiers::Memory),
            "file" => Ok(CacheTiers::File),
            "both" => Ok(CacheTiers::Both),
            other => Err(format!(
                "unknown cache tiers {other:?}; use memory, file or both"
            )),
        }
    }
}

/// Counters of the monitoring cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The memory tier.
    pub memory: MemoryCacheStats,
    /// The file tier, when there is one.
    pub file: Option<FileCacheStats>,
    /// Whether records go to the file tier now.
    pub spilling: bool,
    /// Switches between the tiers (to the file tier and back).
    pub tier_switches: u64,
    /// Records that went to the file tier.
    pub spilled_records: u64,
    /// Records journalled from the file cache at start-up.
    pub replayed_records: u64,
}

/// A change to append to a volume.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// Write `data` at `offset`.
    Write {
        /// First byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// Zero `len` bytes at `offset`.
    Zero {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Discard `len` bytes at `offset`; they read back as zeros.
    Trim {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A resync write: the production volume's content of a range,
    /// re-read after changes to it may have gone unjournalled.
    Resync {
        /// First byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A flush: the volume's state here is crash-consistent.
    Flush,
    /// A mark on the timeline.
    Mark(Mark<'a>),
}

/// Told of each newly published durable seq and its time; called on the
/// journal's sync thread, so it must only hand the news on.
pub type DurableListener = Arc<dyn Fn(Seq, Timestamp) + Send + Sync>;

/// State shared by the journal's handle, its writer thread, reads and
/// retention.
pub(crate) struct Shared {
    /// The journal directory.
    pub dir: PathBuf,
    /// What the background check of trusted sealed segments found, once
    /// it is done.
    pub sealed_check: Arc<Mutex<Option<Vec<crate::recovery::Damage>>>>,
    /// `DIR/segments`.
    pub segments_dir: PathBuf,
    /// `DIR/base`.
    pub base_dir: PathBuf,
    /// As opened.
    pub options: JournalOptions,
    /// Written into every segment header.
    pub group_id: u64,
    /// The RocksDB index.
    pub index: Index,
    /// The durable group description; every change is stored before it is
    /// visible here.
    pub manifest: RwLock<Manifest>,
    /// Every segment, mapped, by id.
    pub segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    /// Catalogue lines of segments holding records, by id.
    pub catalogue: Mutex<BTreeMap<u64, SegmentEntry>>,
    /// Base images by volume.
    pub bases: RwLock<HashMap<VolumeId, Arc<BaseImage>>>,
    /// Newest durable and indexed record: reads never go past it.
    durable: RwLock<(Seq, Timestamp)>,
    /// Told of every newly published durable seq (a replication stream
    /// waiting for records to ship, a replica acknowledging them).
    durable_listeners: RwLock<Vec<(u64, DurableListener)>>,
    /// The segment holding the newest durable batch. Every segment before
    /// it is wholly durable and its catalogue line final, so retention may
    /// remove those and no other (the catalogue of a newer segment may
    /// still be catching up with batches on their way to the disk).
    pub durable_segment: AtomicU64,
    /// Set after a failed fsync; see [`Error::Poisoned`].
    poisoned: Mutex<Option<String>>,
    /// Readers hold it shared; a retention fold holds it exclusively while
    /// base images and horizon change under them.
    pub fold: RwLock<()>,
    /// Serialises read-modify-store cycles of the manifest (holds, epoch,
    /// volumes, retention), so concurrent updates neither lose each other
    /// nor race on its temporary file. Taken before `fold` where both are.
    pub manifest_update: Mutex<()>,
    /// Records captured and not yet durable, bounded by bytes.
    pub memory: Arc<MemoryCache>,
    /// Set when the journal is closing, so a writer waiting out a full disk
    /// gives up.
    pub closing: std::sync::atomic::AtomicBool,
    /// Batch writes that found the disk full and waited.
    pub disk_full_waits: AtomicU64,
    /// The file tier of the monitoring cache, when it could be made.
    file_cache: RwLock<Option<Arc<FileCache>>>,
    /// When making the file cache last failed (disk full): it is tried
    /// again now and then, so the tier comes back when space does.
    file_cache_failed: Mutex<Option<std::time::Instant>>,
    /// The tiers records wait in now: `options.cache_tiers` until
    /// [`Journal::set_cache_tiers`] (a replica group promoted).
    cache_tiers: std::sync::atomic::AtomicU8,
    /// Whether records go to the file tier now (with both tiers).
    pub spilling: std::sync::atomic::AtomicBool,
    /// Switches between the tiers.
    pub tier_switches: AtomicU64,
    /// Records that went to the file tier.
    pub spilled_records: AtomicU64,
    /// Records journalled from the file cache at start-up.
    pub replayed_records: AtomicU64,
    /// Payloads recent reads decoded.
    pub recent_payloads: Mutex<crate::read::RecentPayloads>,
}

impl Shared {
    pub fn durable(&self) -> (Seq, Timestamp) {
        *self.durable.read()
    }

    pub fn set_durable(&self, seq: Seq, time: Timestamp) {
        *self.durable.write() = (seq, time);
        for (_, listener) in self.durable_listeners.read().iter() {
            listener(seq, time);
        }
    }

    pub fn epoch(&self) -> u64 {
        self.manifest.read().epoch
    }

    pub fn poisoned(&self) -> Option<Error> {
        self.poisoned
            .lock()
            .as_ref()
            .map(|reason| self.poison_error(reason))
    }

    pub fn poison_error(&self, reason: &impl ToString) -> Error {
        Error::Poisoned {
            path: self.dir.clone(),
            reason: reason.to_string(),
        }
    }

    pub fn poison(&self, reason: String) {
        tracing::error!(journal = %self.dir.display(), %reason, "journal stops taking appends");
        self.poisoned.lock().get_or_insert(reason);
    }

    pub fn add_segment(&self, segment: Arc<Segment>) {
        let id = segment.id();
        self.segments.write().insert(id, segment);
    }

    pub fn set_catalogue(&self, entry: SegmentEntry) {
        self.catalogue.lock().insert(entry.id, entry);
    }

    /// Whether a record of `bytes` goes to the file tier now, switching
    /// tiers (with hysteresis) as the memory cache fills and drains.
    /// An appender that may not wait (`may_make` false) never tries to
    /// make a missing file cache: that allocates a file, which is no work
    /// for a thread that must not block.
    /// Refuses a write of `len` bytes at `offset` that leaves the volume or
    /// exceeds the largest record.
    fn check_write(&self, info: &VolumeInfo, offset: u64, len: usize) -> Result<()> {
        info.check_range(offset, len as u64)?;
        if len as u64 > self.options.max_record_len {
            return Err(Error::Invalid(format!(
                "volume {}: a write of {len} bytes exceeds the largest record, {} bytes",
                info.name, self.options.max_record_len
            )));
        }
        Ok(())
    }

    /// The tiers records wait in now.
    pub fn cache_tiers(&self) -> CacheTiers {
        CacheTiers::from_code(self.cache_tiers.load(Ordering::SeqCst))
    }

    pub fn goes_to_file_tier(&self, bytes: u64, may_make: bool) -> bool {
        let cache = if may_make {
            self.file_cache()
        } else {
            self.file_cache_now()
        };
        let Some(file) = cache else {
            return false;
        };
        match self.cache_tiers() {
            CacheTiers::Memory => false,
            CacheTiers::File => true,
            CacheTiers::Both => {
                // The memory budget may be shared: what fills it is every
                // group's records, and every group then spills.
                let budget = self.memory.budget();
                let (used, limit) = (budget.used(), budget.limit() as f64);
                let spilling = self.spilling.load(Ordering::SeqCst);
                let switch = if spilling {
                    file.is_empty() && (used as f64) < limit * self.options.return_below
                } else {
                    (used + bytes) as f64 > limit * self.options.spill_above
                };
                if switch
                    && self
                        .spilling
                        .compare_exchange(spilling, !spilling, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    self.tier_switches.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(to_file = !spilling, "monitoring cache switched tiers");
                }
                self.spilling.load(Ordering::SeqCst)
            }
        }
    }

    /// The file cache as it is now (the writer's view: it never waits on
    /// making one).
    pub fn file_cache_now(&self) -> Option<Arc<FileCache>> {
        self.file_cache.read().clone()
    }

    /// The file cache, if the tiers use one and it could be made. After a
    /// failure (a full disk) it is tried again at most every
    /// [`FILE_CACHE_RETRY`].
    pub fn file_cache(&self) -> Option<Arc<FileCache>> {
        if let Some(cache) = self.file_cache_now() {
            return Some(cache);
        }
        let mut failed = self.file_cache_failed.lock();
        match *failed {
            Some(at) if at.elapsed() >= FILE_CACHE_RETRY => {}
            _ => return None,
        }
        match self.put_file_cache(&mut failed) {
            Ok(Some(cache)) => {
                tracing::info!(journal = %self.dir.display(), "the file cache is back");
                Some(cache)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(journal = %self.dir.display(), error = %e, "the file cache still cannot be made");
                *failed = Some(std::time::Instant::now());
                None
            }
        }
    }

    /// Makes the file cache and puts it in place. `failed` is the guard of
    /// `file_cache_failed`, held so no two threads make it at once; when
    /// there is no room now (`None`) it remembers when, and
    /// [`Shared::file_cache`] tries again later.
    fn put_file_cache(
        &self,
        failed: &mut Option<std::time::Instant>,
    ) -> Result<Option<Arc<FileCache>>> {
        match new_file_cache(&self.dir, &self.options, self.group_id, self.durable().0)? {
            Some(cache) => {
                let cache = Arc::new(cache);
                *self.file_cache.write() = Some(cache.clone());
                *failed = None;
                Ok(Some(cache))
            }
            None => {
                *failed = Some(std::time::Instant::now());
                Ok(None)
            }
        }
    }

    /// The range of history that can be read now.
    pub fn history(&self) -> History {
        let (newest_seq, newest_time) = self.durable();
        let manifest = self.manifest.read();
        History {
            horizon_seq: manifest.horizon_seq,
            horizon_time: Timestamp::from_nanos(manifest.horizon_ns),
            newest_seq: newest_seq.max(manifest.horizon_seq),
            newest_time: newest_time.max(Timestamp::from_nanos(manifest.horizon_ns)),
        }
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        self.manifest
            .read()
            .volume(name)
            .cloned()
            .ok_or_else(|| Error::UnknownVolume(name.to_string()))
    }

    pub fn volume_by_id(&self, id: VolumeId) -> Result<VolumeInfo> {
        self.manifest
            .read()
            .volume_by_id(id)
            .cloned()
            .ok_or_else(|| Error::UnknownVolume(format!("#{id}")))
    }

    /// Resolves `point` to a seq within the retained history; `volume`
    /// names the volume in errors.
    pub fn resolve(&self, volume: &str, point: Point) -> Result<Seq> {
        let history = self.history();
        let out_of_range = || Error::PointOutOfRange {
            volume: volume.to_string(),
            point: point.to_string(),
            available: history.to_string(),
        };
        match point {
            Point::Latest => Ok(history.newest_seq),
            Point::Seq(seq) if seq >= history.horizon_seq && seq <= history.newest_seq => Ok(seq),
            Point::Seq(_) => Err(out_of_range()),
            Point::Time(at) if at < history.horizon_time => Err(out_of_range()),
            Point::Time(at) => match self.index.seq_at_time(at)? {
                Some((seq, _)) if seq > history.horizon_seq => Ok(seq.min(history.newest_seq)),
                _ => Ok(history.horizon_seq),
            },
        }
    }

    /// The segment with id `id`.
    pub fn segment(&self, id: u64) -> Result<Arc<Segment>> {
        self.segments.read().get(&id).cloned().ok_or_else(|| {
            Error::corruption(
                crate::segment::segment_path(&self.segments_dir, id),
                0,
                "the index refers to a segment that does not exist",
            )
        })
    }

    /// The base image of `volume`.
    pub fn base(&self, volume: VolumeId) -> Result<Arc<BaseImage>> {
        self.bases
            .read()
            .get(&volume)
            .cloned()
            .ok_or_else(|| Error::UnknownVolume(format!("#{volume}")))
    }

    /// Stores `manifest` durably and makes it current.
    pub fn store_manifest(&self, manifest: Manifest) -> Result<()> {
        manifest.store(self.options.fs.as_ref(), &self.dir)?;
        *self.manifest.write() = manifest;
        Ok(())
    }

    /// Changes the manifest with `change` and stores it, as one step
    /// against every other update.
    pub fn update_manifest<R>(&self, change: impl FnOnce(&mut Manifest) -> Result<R>) -> Result<R> {
        let _updates = self.manifest_update.lock();
        let mut manifest = self.manifest.read().clone();
        let out = change(&mut manifest)?;
        self.store_manifest(manifest)?;
        Ok(out)
    }
}

pub(crate) struct Sequencer {
    next_seq: Seq,
    last_time: Timestamp,
    tx: Option<Sender<Submission>>,
}

impl Sequencer {
    /// Continues the write order at `next` after `time` (a rebase moved
    /// the history).
    pub(crate) fn restart_at(&mut self, next: Seq, time: Timestamp) {
        self.next_seq = next;
        self.last_time = time;
    }

    /// The seq the next record gets.
    pub(crate) fn next_seq(&self) -> Seq {
        self.next_seq
    }
}

struct JournalInner {
    shared: Arc<Shared>,
    sequencer: Mutex<Sequencer>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Held for the lock on `DIR/LOCK`.
    _lock: FsLock,
}

impl JournalInner {
    fn shutdown(&self) -> Result<()> {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.sequencer.lock().tx = None;
        if let Some(handle) = self.writer.lock().take() {
            if handle.join().is_err() {
                tracing::error!(journal = %self.shared.dir.display(), "journal writer thread panicked");
            }
            self.shared.index.flush()?;
        }
        Ok(())
    }
}

impl Drop for JournalInner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(journal = %self.shared.dir.display(), error = %e, "journal did not close cleanly");
        }
    }
}

/// The write-order journal of one consistency group. Cheap to clone; every
/// clone is the same journal.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<JournalInner>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.inner.shared.dir)
            .finish()
    }
}

/// Lowers the calling thread's CPU and disk priority to the idle class, so
/// a background check of old segments reads only what the workload (and a
/// start-up in progress) leaves of the disk. Best effort.
fn yield_to_foreground_work() {
    #[cfg(target_os = "linux")]
    // SAFETY: both calls only change the calling thread's scheduling
    // attributes; `who` 0 is the calling thread.
    unsafe {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        );
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Opens the file cache in `DIR/cache` when the tiers use it or when one
/// is left from an earlier run (it may hold acknowledged writes), and
/// returns what in it the journal lacks. A cache left over that is empty
/// and no longer wanted, or of another size than configured, is remade.
fn open_file_cache(
    dir: &Path,
    options: &JournalOptions,
    group_id: u64,
    journalled: Seq,
) -> Result<(Option<Arc<FileCache>>, Vec<file_cache::Pending>)> {
    let path = file_cache::file_cache_path(dir);
    let fs = options.fs.as_ref();
    let wanted = options.cache_tiers != CacheTiers::Memory;
    let existing = fs.file_len(&path).ok().map(|len| len.saturating_sub(4096));
    let Some(capacity) = existing else {
        let made = if wanted {
            new_file_cache(dir, options, group_id, journalled)?
        } else {
            None
        };
        return Ok((made.map(Arc::new), Vec::new()));
    };
    // A cache left from an earlier run may hold acknowledged writes: any
    // failure to open it stops the journal.
    let (cache, pending) = FileCache::open(
        fs,
        &path,
        capacity,
        group_id,
        journalled,
        options.io_hooks.as_ref(),
        file_budget(options),
    )?;
    if !pending.is_empty() || (wanted && capacity == options.file_cache_bytes) {
        return Ok((Some(Arc::new(cache)), pending));
    }
    drop(cache);
    fs.remove_file(&path)
        .map_err(|e| Error::io("remove file cache", &path, e))?;
    let cache_dir = crate::fs::parent_dir(&path);
    fs.sync_dir(&cache_dir)
        .map_err(|e| Error::io("fsync directory", &cache_dir, e))?;
    let made = if wanted {
        new_file_cache(dir, options, group_id, journalled)?
    } else {
        None
    };
    Ok((made.map(Arc::new), Vec::new()))
}

/// The budget a journal's file cache draws on: the daemon's shared one, or
/// its own of the ring's size.
fn file_budget(options: &JournalOptions) -> Arc<file_cache::FileBudget> {
    match &options.shared_cache {
        Some(shared) => shared.file.clone(),
        None => file_cache::FileBudget::new(options.file_cache_bytes),
    }
}

/// Makes a new, empty file cache of the configured size in `DIR/cache`;
/// `None` when the disk has no room for it (records then wait in memory
/// until it can be made).
fn new_file_cache(
    dir: &Path,
    options: &JournalOptions,
    group_id: u64,
    journalled: Seq,
) -> Result<Option<FileCache>> {
    let path = file_cache::file_cache_path(dir);
    let fs = options.fs.as_ref();
    if let Some(parent) = path.parent() {
        crate::fs::create_dir_all_durably(fs, parent)
            .map_err(|e| Error::io("create directory", parent, e))?;
    }
    match FileCache::open(
        fs,
        &path,
        options.file_cache_bytes,
        group_id,
        journalled,
        options.io_hooks.as_ref(),
        file_budget(options),
    ) {
        Ok((cache, _)) => Ok(Some(cache)),
        Err(e) if e.is_disk_full() => {
            tracing::warn!(cache = %path.display(), error = %e, "no room for the file cache; records wait in memory until there is");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn lock_dir(fs: &dyn Fs, dir: &Path) -> Result<FsLock> {
    fs.lock(&dir.join("LOCK"))
        .map_err(|_| Error::Locked(dir.to_path_buf()))
}

impl Journal {
    /// Opens the journal in `dir`, creating it if it does not exist, and
    /// recovers it: a torn tail is truncated, damage elsewhere is handled
    /// as `options.recovery` says, the index is caught up (or rebuilt), and
    /// an interrupted retention fold is finished.
    pub fn open(dir: &Path, options: JournalOptions) -> Result<(Journal, RecoveryReport)> {
        options.validate()?;
        let segments_dir = dir.join("segments");
        let base_dir = dir.join("base");
        let index_dir = dir.join("index");
        let fs = options.fs.clone();
        for d in [dir, &segments_dir, &base_dir] {
            // Durably: a directory entry lost in a power cut takes every
            // file in it along.
            crate::fs::create_dir_all_durably(fs.as_ref(), d)
                .map_err(|e| Error::io("create directory", d, e))?;
        }
        let lock = lock_dir(fs.as_ref(), dir)?;
        let manifest = match Manifest::load(fs.as_ref(), dir)? {
            Some(m) => m,
            None => {
                let now = options.clock.now();
                let group_id = RandomState::new().hash_one((now.as_nanos(), std::process::id()));
                let m = Manifest::new(&options.group, group_id, now);
                m.store(fs.as_ref(), dir)?;
                m
            }
        };

        // RocksDB does its own file IO, on the real disk; it is rebuilt or
        // caught up from the segments at every open, whatever a crash left.
        let index_dir = fs.local_dir(&index_dir);
        if let Some(parent) = index_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create directory", parent, e))?;
        }
        let mut index = Index::open(&index_dir, options.large_range_blocks)?;
        // RocksDB made its directory; make its entry durable too (a lost
        // index is rebuilt from the segments, but that takes a while).
        if let Some(parent) = index_dir.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("sync directory", parent, e))?;
        }
        let mut rebuilt = false;
        let stale = match (index.version()?, index.indexed_seq()?) {
            (None, None) => false,
            (Some(v), Some(_)) if v == crate::index::INDEX_VERSION => {
                index.horizon_seq()? != Some(manifest.horizon_seq)
            }
            _ => true,
        };
        if stale {
            drop(index);
            Index::destroy(&index_dir)?;
            index = Index::open(&index_dir, options.large_range_blocks)?;
            rebuilt = true;
        }
        let mut recovered = recovery::recover(
            fs.as_ref(),
            dir,
            &segments_dir,
            &manifest,
            &index,
            options.recovery,
            options.trust_sealed,
        )?;
        if recovered.index_ahead {
            // Recovery cut records the index already knew: rebuild it from
            // what is left.
            drop(index);
            Index::destroy(&index_dir)?;
            index = Index::open(&index_dir, options.large_range_blocks)?;
            rebuilt = true;
            let first = recovered.report;
            recovered = recovery::recover(
                fs.as_ref(),
                dir,
                &segments_dir,
                &manifest,
                &index,
                options.recovery,
                options.trust_sealed,
            )?;
            let report = &mut recovered.report;
            report.torn_tail = report.torn_tail.take().or(first.torn_tail);
            report.truncated_corruption = report
                .truncated_corruption
                .take()
                .or(first.truncated_corruption);
            report.removed_segments.splice(0..0, first.removed_segments);
        }
        let mut report = std::mem::take(&mut recovered.report);
        let trusted = std::mem::take(&mut recovered.trusted);
        report.index_rebuilt = rebuilt;
        let (newest_seq, newest_time) = recovered.newest;
        index.set_meta(
            newest_seq.max(manifest.horizon_seq),
            manifest.horizon_seq,
            manifest.epoch,
        )?;

        let mut bases = HashMap::new();
        for volume in &manifest.volumes {
            bases.insert(
                volume.id,
                Arc::new(BaseImage::open(fs.as_ref(), &base_dir, volume)?),
            );
        }
        let horizon = (
            manifest.horizon_seq,
            Timestamp::from_nanos(manifest.horizon_ns),
        );
        let fold_intent = manifest.folding_to;
        let (file_cache, replay) =
            open_file_cache(dir, &options, manifest.group_id, newest_seq.max(horizon.0))?;
        report.replayed_from_file_cache = replay.len() as u64;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            sealed_check: Default::default(),
            segments_dir: segments_dir.clone(),
            base_dir,
            group_id: manifest.group_id,
            index,
            manifest: RwLock::new(manifest),
            segments: RwLock::new(BTreeMap::new()),
            catalogue: Mutex::new(recovered.catalogue.iter().map(|e| (e.id, *e)).collect()),
            bases: RwLock::new(bases),
            durable: RwLock::new((newest_seq.max(horizon.0), newest_time.max(horizon.1))),
            durable_listeners: RwLock::new(Vec::new()),
            durable_segment: AtomicU64::new(recovered.active.map_or(0, |(id, _)| id)),
            poisoned: Mutex::new(None),
            fold: RwLock::new(()),
            manifest_update: Mutex::new(()),
            memory: match &options.shared_cache {
                Some(shared) => MemoryCache::sharing(shared.memory.clone()),
                None => MemoryCache::new(options.memory_cache_bytes),
            },
            closing: std::sync::atomic::AtomicBool::new(false),
            disk_full_waits: AtomicU64::new(0),
            file_cache_failed: Mutex::new(
                (file_cache.is_none() && options.cache_tiers != CacheTiers::Memory)
                    .then(std::time::Instant::now),
            ),
            file_cache: RwLock::new(file_cache),
            cache_tiers: std::sync::atomic::AtomicU8::new(options.cache_tiers.code()),
            spilling: std::sync::atomic::AtomicBool::new(false),
            tier_switches: AtomicU64::new(0),
            spilled_records: AtomicU64::new(0),
            replayed_records: AtomicU64::new(replay.len() as u64),
            recent_payloads: Mutex::new(Default::default()),
            options,
        });
        for segment in &recovered.segments {
            shared.add_segment(segment.clone());
        }
        let active = recovery::active_segment(&shared, &recovered)?;
        if let Some(intent) = fold_intent {
            let done = shared.fold_to(intent.seq, Vec::new())?;
            report.finished_fold = Some(done.new_horizon);
        }

        let (durable_seq, durable_time) = shared.durable();
        let (tx, rx) = std::sync::mpsc::channel();
        // What waits in the file cache is journalled before anything new:
        // it goes into the channel first, with the seq and time it was
        // given (and perhaps acknowledged with) before the restart.
        let mut next_seq = durable_seq + 1;
        let mut last_time = durable_time;
        for pending in replay {
            let header = pending.header;
            next_seq = next_seq.max(header.seq + 1);
            last_time = last_time.max(header.timestamp);
            tx.send(Submission::Append {
                seq: header.seq,
                time: header.timestamp,
                record: Payload::File {
                    entry: pending.entry,
                    header,
                },
                reply: None,
                charge: None,
            })
            .map_err(|_| Error::Closed(dir.to_path_buf()))?;
        }
        let writer = Writer::new(shared.clone(), active, rx);
        let handle = std::thread::Builder::new()
            .name("tidemark-journal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::io("spawn writer thread", dir, e))?;
        let journal = Journal {
            inner: Arc::new(JournalInner {
                shared,
                sequencer: Mutex::new(Sequencer {
                    next_seq,
                    last_time,
                    tx: Some(tx),
                }),
                writer: Mutex::new(Some(handle)),
                _lock: lock,
            }),
        };
        report.newest_seq = durable_seq;
        journal.check_sealed_in_background(trusted);
        Ok((journal, report))
    }

    /// Scans the segments start-up trusted, on a thread of its own, and
    /// keeps what it finds for [`Journal::sealed_check`].
    fn check_sealed_in_background(&self, trusted: Vec<(Arc<Segment>, Seq, SegmentEntry)>) {
        let outcome = self.shared().sealed_check.clone();
        if trusted.is_empty() {
            *outcome.lock() = Some(Vec::new());
            return;
        }
        let dir = self.dir().to_path_buf();
        let check = move || {
            yield_to_foreground_work();
            let mut damage = Vec::new();
            for (segment, prev_seq, entry) in trusted {
                let started = std::time::Instant::now();
                let scanned = segment.scan(prev_seq, |_, _, _| Ok(()));
                // At most half the disk and a core's time: as long a pause
                // as the scan took.
                std::thread::sleep(started.elapsed());
                let found = match scanned {
                    Ok(summary)
                        if summary.end.damage.is_none()
                            && summary.end.valid_end == entry.used_bytes
                            && summary.last_seq == entry.last_seq =>
                    {
                        None
                    }
                    Ok(summary) => Some(crate::recovery::Damage {
                        path: segment.path.clone(),
                        offset: summary.end.valid_end,
                        reason: summary.end.damage.unwrap_or_else(|| {
                            format!(
                                "records end at seq {} (offset {}), the index's catalogue says seq {} (offset {})",
                                summary.last_seq, summary.end.valid_end, entry.last_seq, entry.used_bytes
                            )
                        }),
                    }),
                    Err(e) => Some(crate::recovery::Damage {
                        path: segment.path.clone(),
                        offset: 0,
                        reason: e.to_string(),
                    }),
                };
                if let Some(d) = found {
                    tracing::error!(journal = %dir.display(), segment = %d.path.display(), offset = d.offset, reason = %d.reason, "a sealed segment is damaged: reads of its records fail from here on");
                    damage.push(d);
                }
            }
            *outcome.lock() = Some(damage);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("tidemark-journal-check".into())
            .spawn(check)
        {
            tracing::warn!(journal = %self.dir().display(), error = %e, "could not start the check of sealed segments");
        }
    }

    /// The background check of the sealed segments start-up trusted (see
    /// [`JournalOptions::trust_sealed`]): `None` while it runs, then the
    /// damage it found (empty when none, or nothing was trusted).
    pub fn sealed_check(&self) -> Option<Vec<crate::recovery::Damage>> {
        self.shared().sealed_check.lock().clone()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The sequencer, locked: nothing is appended while it is held.
    pub(crate) fn sequencer_lock(&self) -> parking_lot::MutexGuard<'_, Sequencer> {
        self.inner.sequencer.lock()
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// Calls `listener` with every newly durable seq from now on, until
    /// [`Journal::stop_listening`] with the id returned.
    pub fn listen_durable(&self, listener: DurableListener) -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        self.shared().durable_listeners.write().push((id, listener));
        id
    }

    /// Stops calling the listener `id`.
    pub fn stop_listening(&self, id: u64) {
        self.shared()
            .durable_listeners
            .write()
            .retain(|(listener, _)| *listener != id);
    }

    /// The filesystem the journal lives on.
    pub fn fs(&self) -> &Arc<dyn Fs> {
        &self.inner.shared.options.fs
    }

    /// The consistency group's name.
    pub fn group(&self) -> String {
        self.inner.shared.manifest.read().group.clone()
    }

    /// Stops the writer after it has made everything submitted durable,
    /// and flushes the index so the next open has nothing to catch up.
    pub fn close(self) -> Result<()> {
        self.inner.shutdown()
    }

    /// Creates a volume of `size` bytes whose base image is all zeros.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size, None)
    }

    /// Creates volume `info` with its id as given: a replica keeps the
    /// volume ids of the journal it follows, since records name volumes by
    /// id. The id must be free.
    pub fn create_volume_as(&self, info: &VolumeInfo) -> Result<VolumeInfo> {
        self.create_volume_with(&info.name, info.size, Some(info.id))
    }

    fn create_volume_with(
        &self,
        name: &str,
        size: u64,
        id: Option<VolumeId>,
    ) -> Result<VolumeInfo> {
        validate_volume_name(name).map_err(Error::Invalid)?;
        if size == 0 || size % 512 != 0 {
            return Err(Error::Invalid(format!(
                "volume {name}: size {size} must be a positive multiple of 512 bytes"
            )));
        }
        let shared = self.shared();
        let _updates = shared.manifest_update.lock();
        let _fold = shared.fold.write();
        let mut manifest = shared.manifest.read().clone();
        if manifest.volume(name).is_some() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let id = match id {
            Some(id) if manifest.volume_by_id(id).is_some() || id == 0 => {
                return Err(Error::Invalid(format!(
                    "volume {name}: id {id} is taken in group {}",
                    manifest.group
                )))
            }
            Some(id) => id,
            None => manifest.next_volume_id,
        };
        let volume = VolumeInfo {
            id,
            name: name.to_string(),
            size,
        };
        let base = BaseImage::create(shared.options.fs.as_ref(), &shared.base_dir, &volume)?;
        manifest.next_volume_id = manifest.next_volume_id.max(id + 1);
        manifest.volumes.push(volume.clone());
        shared.store_manifest(manifest)?;
        shared.bases.write().insert(volume.id, Arc::new(base));
        Ok(volume)
    }

    /// The group's volumes.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.shared().manifest.read().volumes.clone()
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        self.shared().volume(name)
    }

    /// Appends `change` to `volume` and returns with the record's place in
    /// the write order; the handle resolves when it is durable. Waits for
    /// room in the memory cache as long as it takes.
    pub fn append(&self, volume: VolumeId, change: Change<'_>) -> Result<AppendHandle> {
        self.append_with(volume, change, Admission::Wait)
    }

    /// Appends like [`Journal::append`], waiting for room in the memory
    /// cache only as `admission` says; [`Error::CacheFull`] when there is
    /// none.
    pub fn append_with(
        &self,
        volume: VolumeId,
        change: Change<'_>,
        admission: Admission,
    ) -> Result<AppendHandle> {
        let shared = self.shared();
        let info = shared.volume_by_id(volume)?;
        let in_volume = |offset: u64, len: u64| info.check_range(offset, len);
        let record = match change {
            Change::Write { offset, data } | Change::Resync { offset, data } => {
                shared.check_write(&info, offset, data.len())?;
                let mut record =
                    PreparedRecord::new(RecordKind::Write, volume, offset, data.len() as u64, data);
                record.resync = matches!(change, Change::Resync { .. });
                record
            }
            Change::Zero { offset, len } => {
                in_volume(offset, len)?;
                PreparedRecord::new(RecordKind::Zero, volume, offset, len, &[])
            }
            Change::Trim { offset, len } => {
                in_volume(offset, len)?;
                PreparedRecord::new(RecordKind::Trim, volume, offset, len, &[])
            }
            Change::Flush => PreparedRecord::new(RecordKind::Flush, volume, 0, 0, &[]),
            Change::Mark(mark) => {
                let body = mark.encode();
                if body.len() > 1 << 20 {
                    return Err(Error::Invalid(format!(
                        "volume {}: a mark of {} bytes exceeds 1 MiB",
                        info.name,
                        body.len()
                    )));
                }
                // Marks stay uncompressed so the writer can index tags
                // straight from the record.
                PreparedRecord::raw(RecordKind::Mark, volume, 0, body)
            }
        };
        self.place(&info, record, admission)
    }

    /// Appends a write of `data` at `offset` like [`Journal::append_with`]
    /// does a [`Change::Write`], but a record stored raw shares `data`'s
    /// buffer rather than copying it (see [`crate::write_buffers`]).
    pub fn append_shared(
        &self,
        volume: VolumeId,
        offset: u64,
        data: &bytes::Bytes,
        admission: Admission,
    ) -> Result<AppendHandle> {
        let shared = self.shared();
        let info = shared.volume_by_id(volume)?;
        shared.check_write(&info, offset, data.len())?;
        let record =
            PreparedRecord::shared(RecordKind::Write, volume, offset, data.len() as u64, data);
        self.place(&info, record, admission)
    }

    /// Whether a write of `len` bytes would be taken now without IO, as
    /// [`Admission::NoBlock`] asks — not when it would go to a file cache
    /// that must first move its tail on disk or allocate. A hint for an
    /// event loop deciding whether to hand a write to a thread: another
    /// appender may change the answer before it appends.
    pub fn takes_without_io(&self, len: u64) -> bool {
        let shared = self.shared();
        let encoded = crate::record::RECORD_HEADER_LEN + len as usize;
        let file_room = || {
            shared
                .file_cache_now()
                .is_some_and(|cache| cache.has_room_now(encoded))
        };
        match shared.cache_tiers() {
            CacheTiers::Memory => true,
            CacheTiers::File => file_room(),
            CacheTiers::Both => !shared.spilling.load(Ordering::SeqCst) || file_room(),
        }
    }

    /// Puts a prepared record in the tier it waits in, and in the write
    /// order.
    fn place(
        &self,
        info: &VolumeInfo,
        record: PreparedRecord,
        admission: Admission,
    ) -> Result<AppendHandle> {
        let shared = self.shared();
        let bytes = record.encoded_len() as u64;
        if record.kind != RecordKind::Mark
            && shared.goes_to_file_tier(
                bytes,
                matches!(admission, Admission::Wait | Admission::WaitFor(_)),
            )
        {
            match self.append_to_file_cache(info, record, admission)? {
                Ok(handle) => return Ok(handle),
                // The file cache is full: with both tiers, memory takes it.
                Err(record) if shared.cache_tiers() == CacheTiers::Both => {
                    return self.append_to_memory(info, record, admission);
                }
                Err(record) => {
                    let limit = shared
                        .file_cache()
                        .as_ref()
                        .map_or(0, |c| c.stats().capacity_bytes);
                    return Err(Error::CacheFull {
                        volume: info.name.clone(),
                        bytes: record.encoded_len() as u64,
                        limit,
                    });
                }
            }
        }
        self.append_to_memory(info, record, admission)
    }

    /// Stamps `record` with the next seq and time and sends it to the
    /// writer, under the sequencer lock (so the channel's order is the
    /// write order). `store` puts it where it waits; it may refuse, and
    /// then nothing is used up.
    fn sequence<T>(
        &self,
        store: impl FnOnce(Seq, Timestamp) -> Option<(Payload, T)>,
        reply: Option<oneshot::Sender<Result<()>>>,
        charge: Option<crate::memory_cache::CacheCharge>,
    ) -> Result<Option<(Seq, Timestamp, T)>> {
        let shared = self.shared();
        let mut sequencer = self.inner.sequencer.lock();
        let tx = sequencer
            .tx
            .clone()
            .ok_or_else(|| Error::Closed(shared.dir.clone()))?;
        let seq = sequencer.next_seq;
        let now = shared.options.clock.now();
        // Timestamps rise strictly with seqs, even if the clock steps back,
        // so every moment maps to one seq.
        let time = if now > sequencer.last_time {
            now
        } else {
            Timestamp::from_nanos(sequencer.last_time.as_nanos() + 1)
        };
        let Some((record, out)) = store(seq, time) else {
            return Ok(None);
        };
        tx.send(Submission::Append {
            seq,
            time,
            record,
            reply,
            charge,
        })
        .map_err(|_| Error::Closed(shared.dir.clone()))?;
        sequencer.next_seq += 1;
        sequencer.last_time = time;
        Ok(Some((seq, time, out)))
    }

    /// Sends records shipped from another site to the writer with their
    /// own seqs and times, under the sequencer lock: they must follow
    /// `prev_seq`, this journal's newest seq, and rise in time.
    pub(crate) fn sequence_shipped(
        &self,
        prev_seq: Seq,
        records: Vec<(crate::record::RecordHeader, Vec<u8>)>,
        charge: crate::memory_cache::CacheCharge,
    ) -> Result<Option<AppendHandle>> {
        let shared = self.shared();
        let refuse = |reason: String| Error::Invalid(format!("shipped records refused: {reason}"));
        let mut sequencer = self.inner.sequencer.lock();
        let tx = sequencer
            .tx
            .clone()
            .ok_or_else(|| Error::Closed(shared.dir.clone()))?;
        let newest = sequencer.next_seq.saturating_sub(1);
        if newest != prev_seq {
            return Err(refuse(format!(
                "they follow seq {prev_seq}, but this journal's newest seq is {newest}"
            )));
        }
        let count = records.len();
        let mut charge = Some(charge);
        let mut last = None;
        for (i, (header, bytes)) in records.into_iter().enumerate() {
            if header.timestamp <= sequencer.last_time {
                return Err(refuse(format!(
                    "record seq {} is older ({}) than this journal's newest record ({})",
                    header.seq, header.timestamp, sequencer.last_time
                )));
            }
            let is_last = i + 1 == count;
            let (reply, rx) = oneshot::channel();
            tx.send(Submission::Append {
                seq: header.seq,
                time: header.timestamp,
                record: Payload::Shipped { header, bytes },
                reply: is_last.then_some(reply),
                charge: if is_last { charge.take() } else { None },
            })
            .map_err(|_| Error::Closed(shared.dir.clone()))?;
            sequencer.next_seq = header.seq + 1;
            sequencer.last_time = header.timestamp;
            if is_last {
                last = Some(AppendHandle::new(
                    header.seq,
                    header.timestamp,
                    u64::from(header.stored_len),
                    rx,
                    shared.dir.clone(),
                ));
            }
        }
        Ok(last)
    }

    fn append_to_memory(
        &self,
        info: &VolumeInfo,
        record: PreparedRecord,
        admission: Admission,
    ) -> Result<AppendHandle> {
        let shared = self.shared();
        let bytes = record.encoded_len() as u64;
        let charge = shared
            .memory
            .admit(bytes, admission)
            .ok_or_else(|| Error::CacheFull {
                volume: info.name.clone(),
                bytes,
                limit: shared.memory.budget().limit(),
            })?;
        let (reply, rx) = oneshot::channel();
        let stored_bytes = record.stored.len() as u64;
        let stored = self.sequence(
            |_, _| Some((Payload::Memory(record), ())),
            Some(reply),
            Some(charge),
        )?;
        let (seq, time, ()) = stored.ok_or_else(|| Error::Closed(shared.dir.clone()))?;
        Ok(AppendHandle::new(
            seq,
            time,
            stored_bytes,
            rx,
            shared.dir.clone(),
        ))
    }

    /// Writes `record` into the file cache, waiting for room as `admission`
    /// says. Gives the record back if there is no room.
    fn append_to_file_cache(
        &self,
        info: &VolumeInfo,
        record: PreparedRecord,
        admission: Admission,
    ) -> Result<std::result::Result<AppendHandle, PreparedRecord>> {
        let shared = self.shared();
        let Some(cache) = shared.file_cache() else {
            return Ok(Err(record));
        };
        let len = record.encoded_len();
        let deadline = match admission {
            Admission::NoWait => None,
            // Room that needs the tail moved on disk is no room for it.
            Admission::NoBlock if !cache.has_room_now(len) => return Ok(Err(record)),
            Admission::NoBlock => None,
            Admission::WaitFor(d) => Some(std::time::Instant::now() + d),
            Admission::Wait => {
                Some(std::time::Instant::now() + std::time::Duration::from_secs(365 * 86_400))
            }
        };
        loop {
            if !cache.wait_for_room(len, None) {
                // Room comes back only as the journal takes entries: a
                // journal that stopped (a failed fsync) or is closing never
                // gives any, so wait in slices and look. (While there is
                // room, records are taken even then: the file cache is a
                // durable tier of its own.)
                if let Some(e) = shared.poisoned() {
                    return Err(e);
                }
                if shared.closing.load(Ordering::SeqCst) {
                    return Err(Error::Closed(shared.dir.clone()));
                }
                // A disk that fails (not one that is full) gives no room
                // by waiting.
                if let Some(e) = cache.take_allocation_error() {
                    return Err(e);
                }
                let slice = deadline.map(|at| at.min(std::time::Instant::now() + FILE_ROOM_SLICE));
                if !cache.wait_for_room(len, slice) {
                    if deadline.is_some_and(|at| std::time::Instant::now() < at) {
                        continue;
                    }
                    return Ok(Err(record));
                }
            }
            let stored = self.sequence(
                |seq, time| {
                    let entry = cache.append(seq, len, |buf| {
                        record.encode_to(seq, time, buf);
                    })?;
                    let header = record.header(seq, time);
                    Some((Payload::File { entry, header }, entry.write_no))
                },
                None,
                None,
            )?;
            if let Some((seq, time, write_no)) = stored {
                shared.spilled_records.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(volume = %info.name, seq, "record waits in the file cache");
                return Ok(Ok(AppendHandle::in_file_cache(
                    seq,
                    time,
                    record.stored.len() as u64,
                    cache,
                    write_no,
                    shared.dir.clone(),
                )));
            }
            // Another appender took the room first; wait again.
        }
    }

    /// Waits until everything appended before the call is durable and
    /// returns the newest durable seq.
    pub fn sync(&self) -> Result<Seq> {
        self.barrier()?
            .recv()
            .map_err(|_| Error::Closed(self.dir().to_path_buf()))?
    }

    /// Like [`Journal::sync`], giving up after `timeout` with
    /// [`Error::NotDurable`] (a full disk, a stalled device): for callers
    /// that must finish, such as a shutdown.
    pub fn sync_within(&self, timeout: std::time::Duration) -> Result<Seq> {
        let newest = self.inner.sequencer.lock().next_seq.saturating_sub(1);
        match self.barrier()?.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(oneshot::RecvTimeoutError::Timeout) => Err(Error::NotDurable {
                seq: newest,
                waited: timeout,
            }),
            Err(oneshot::RecvTimeoutError::Disconnected) => {
                Err(Error::Closed(self.dir().to_path_buf()))
            }
        }
    }

    /// Sends a barrier; its answer comes once everything before it is
    /// durable.
    fn barrier(&self) -> Result<oneshot::Receiver<Result<Seq>>> {
        let (reply, rx) = oneshot::channel();
        let tx = self
            .inner
            .sequencer
            .lock()
            .tx
            .clone()
            .ok_or_else(|| Error::Closed(self.dir().to_path_buf()))?;
        tx.send(Submission::Barrier { reply })
            .map_err(|_| Error::Closed(self.dir().to_path_buf()))?;
        Ok(rx)
    }

    /// The range of history that can be read.
    pub fn history(&self) -> History {
        self.shared().history()
    }

    /// Resolves `point` to a seq in the retained history. `volume` names the
    /// volume in the error when the point is outside it.
    pub fn resolve(&self, volume: &str, point: Point) -> Result<Seq> {
        self.shared().resolve(volume, point)
    }

    /// Reads `buf.len()` bytes of `volume` at `offset` as they were at
    /// `point`; returns the seq the point resolved to.
    pub fn read(&self, volume: &str, offset: u64, buf: &mut [u8], point: Point) -> Result<Seq> {
        self.shared().read(volume, offset, buf, point)
    }

    /// Sets (or moves) tag `name` on `volume` at a new mark record, which is
    /// the point the tag names. `body` is the tagging layer's.
    pub fn set_tag(&self, volume: VolumeId, name: &str, body: &[u8]) -> Result<AppendHandle> {
        if name.is_empty() || name.len() > 1024 {
            return Err(Error::Invalid(format!(
                "tag name {name:?} must be 1 to 1024 bytes"
            )));
        }
        self.append(volume, Change::Mark(Mark::TagSet { name, body }))
    }

    /// Deletes tag `name` of `volume`.
    pub fn delete_tag(&self, volume: VolumeId, name: &str) -> Result<AppendHandle> {
        if self.shared().index.tag(volume, name)?.is_none() {
            let volume = self.shared().volume_by_id(volume)?;
            return Err(Error::Invalid(format!(
                "volume {}: no tag named {name:?}",
                volume.name
            )));
        }
        self.append(volume, Change::Mark(Mark::TagDelete { name }))
    }

    /// The byte ranges of `volume` that records after `seq` changed,
    /// merged and ascending (4 KiB granular): what differs between the
    /// volume at `seq` and now. Streamed from the index: memory stays
    /// bounded however much changed.
    pub fn changed_since(&self, volume: &str, seq: Seq) -> Result<ChangedSpans<'_>> {
        self.changed_between(volume, seq, Seq::MAX)
    }

    /// The byte ranges of `volume` that records with `after < seq <=
    /// upto` changed, merged and ascending (4 KiB granular): what differs
    /// between the volume at `after` and at `upto` — exactly, since the
    /// index keeps every retained version of a block. Streamed like
    /// [`Journal::changed_since`].
    pub fn changed_between(&self, volume: &str, after: Seq, upto: Seq) -> Result<ChangedSpans<'_>> {
        let shared = self.shared();
        let info = shared.volume(volume)?;
        let ranges = shared
            .index
            .ranges(info.id, after, upto, 0, u64::MAX)?
            .into_iter()
            .map(|r| (r.offset, r.length));
        ChangedSpans::new(
            shared.index.changed_blocks(info.id, after, upto)?,
            ranges,
            info.size,
        )
    }

    /// The byte ranges of `volume` that may hold data at some retained
    /// point — what its base image has allocated and what any retained
    /// record wrote — as `(start, end)`, ascending, possibly overlapping.
    /// Everything outside them reads as zeroes at every retained point:
    /// what NBD's `base:allocation` reports for a point. Retries if
    /// retention folds while it looks, so no range falls between the
    /// base image read before the fold and the index read after it.
    pub fn written_extents(&self, volume: &str) -> Result<Vec<(u64, u64)>> {
        let info = self.volume(volume)?;
        let path = self.shared().base(info.id)?.path().to_path_buf();
        loop {
            let horizon = self.history().horizon_seq;
            let mut spans = crate::base::data_spans(&path, 0, info.size)
                .map_err(|e| Error::io("find the data in base image", &path, e))?;
            for span in self.changed_since(volume, horizon)? {
                let (offset, length) = span?;
                spans.push((offset, offset + length));
            }
            if self.history().horizon_seq == horizon {
                return Ok(spans);
            }
        }
    }

    /// Tag `name` of `volume`.
    pub fn tag(&self, volume: VolumeId, name: &str) -> Result<Option<StoredTag>> {
        self.shared().index.tag(volume, name)
    }

    /// Every tag of `volume`, oldest first.
    pub fn tags(&self, volume: VolumeId) -> Result<Vec<StoredTag>> {
        self.shared().index.tags(volume)
    }

    /// Flushes and marks of `volume` with `from <= seq <= to`.
    pub fn events(&self, volume: VolumeId, from: Seq, to: Seq) -> Result<Vec<StoredEvent>> {
        self.shared().index.events(volume, from, to)
    }

    /// The segment catalogue, from memory (one line per segment holding
    /// records).
    pub fn segments(&self) -> Vec<SegmentEntry> {
        self.shared().catalogue.lock().values().copied().collect()
    }

    /// The segment catalogue as the index stores it.
    pub fn indexed_segments(&self) -> Result<Vec<SegmentEntry>> {
        self.shared().index.segments()
    }

    /// Bytes of journal the records after `seq` take, estimated from the
    /// segment catalogue (a segment partly after `seq` counts in
    /// proportion to its seqs).
    pub fn bytes_after(&self, seq: Seq) -> u64 {
        self.shared()
            .catalogue
            .lock()
            .values()
            .filter(|e| e.last_seq > seq)
            .map(|e| {
                if e.first_seq > seq {
                    e.used_bytes
                } else {
                    let span = e.last_seq - e.first_seq + 1;
                    e.used_bytes / span.max(1) * (e.last_seq - seq)
                }
            })
            .sum()
    }

    /// Bytes of journal held in segments.
    pub fn journal_bytes(&self) -> u64 {
        self.shared()
            .catalogue
            .lock()
            .values()
            .map(|e| e.used_bytes)
            .sum()
    }

    /// The fencing epoch appends are written under.
    pub fn epoch(&self) -> u64 {
        self.shared().epoch()
    }

    /// Raises the fencing epoch; it may never go down. The epoch history
    /// records the seq the new epoch's first record will get.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        // The sequencer is held so no record slips in between.
        let sequencer = self.inner.sequencer.lock();
        let first_seq = sequencer.next_seq;
        self.shared().update_manifest(|manifest| {
            if epoch < manifest.epoch {
                return Err(Error::Invalid(format!(
                    "epoch {epoch} is below the current epoch {}",
                    manifest.epoch
                )));
            }
            if epoch > manifest.epoch {
                manifest
                    .epochs
                    .push(crate::manifest::EpochStart { epoch, first_seq });
            }
            manifest.epoch = epoch;
            Ok(())
        })
    }

    /// Records, durably, that another site writes this group under
    /// `epoch` (a no-op unless it is above every epoch known here). A
    /// takeover here then goes above it (see [`Journal::highest_epoch`]),
    /// though no record of that epoch may ever have arrived.
    pub fn note_epoch_seen(&self, epoch: u64) -> Result<()> {
        if epoch <= self.highest_epoch() {
            return Ok(());
        }
        self.shared().update_manifest(|manifest| {
            manifest.seen_epoch = manifest.seen_epoch.max(epoch);
            Ok(())
        })
    }

    /// The highest epoch of this group known here: its own, or one seen
    /// at another site.
    pub fn highest_epoch(&self) -> u64 {
        let manifest = self.shared().manifest.read();
        manifest.epoch.max(manifest.seen_epoch)
    }

    /// The next record gets a seq above `seq` (seqs only ever rise; they
    /// need not be contiguous). A new primary does this before it rebases
    /// a former primary whose own branch reaches `seq`, so the state it
    /// sends is at a seq the branch never had.
    pub fn skip_seqs_past(&self, seq: Seq) {
        let mut sequencer = self.inner.sequencer.lock();
        if sequencer.next_seq <= seq {
            sequencer.next_seq = seq + 1;
        }
    }

    /// Where each epoch began: (epoch, first seq), oldest first.
    pub fn epoch_history(&self) -> Vec<crate::manifest::EpochStart> {
        self.shared().manifest.read().epochs.clone()
    }

    /// The epoch history with the newest seq: what another site compares
    /// its own with (see [`crate::epochs::common_point`]).
    pub fn epochs(&self) -> crate::epochs::History {
        crate::epochs::History {
            epochs: self.epoch_history(),
            newest: self.history().newest_seq,
        }
    }

    /// The journal this one replicates (its group id), once set.
    pub fn source_id(&self) -> u64 {
        self.shared().manifest.read().source_id
    }

    /// Records that this journal replicates the journal with group id
    /// `source`.
    pub fn set_source_id(&self, source: u64) -> Result<()> {
        self.shared().update_manifest(|manifest| {
            manifest.source_id = source;
            Ok(())
        })
    }

    /// This journal's group id (written into its segments).
    pub fn group_id(&self) -> u64 {
        self.shared().group_id
    }

    /// Sets retention hold `name`: its consumer has taken everything up to
    /// `seq` and needs what follows, so retention will not fold past `seq`.
    pub fn set_hold(&self, name: &str, seq: Seq) -> Result<()> {
        self.shared().update_manifest(|manifest| {
            manifest.holds.insert(name.to_string(), seq);
            Ok(())
        })
    }

    /// Makes hold `name` expendable (or not): retention then passes it
    /// like any limit, and records the window its consumer lacks as a gap.
    pub fn set_hold_expendable(&self, name: &str, expendable: bool) -> Result<()> {
        self.shared().update_manifest(|manifest| {
            if expendable {
                manifest.expendable.insert(name.to_string());
            } else {
                manifest.expendable.remove(name);
            }
            Ok(())
        })
    }

    /// Removes retention hold `name`.
    pub fn release_hold(&self, name: &str) -> Result<()> {
        self.shared().update_manifest(|manifest| {
            if manifest.holds.remove(name).is_none() {
                return Err(Error::Invalid(format!("no retention hold named {name:?}")));
            }
            manifest.expendable.remove(name);
            Ok(())
        })
    }

    /// The retention holds.
    pub fn holds(&self) -> BTreeMap<String, Seq> {
        self.shared().manifest.read().holds.clone()
    }

    /// Windows that forced retention dropped past a hold.
    pub fn gaps(&self) -> Vec<Gap> {
        self.shared().manifest.read().gaps.clone()
    }

    /// The largest write one record may carry.
    pub fn max_record_len(&self) -> u64 {
        self.shared().options.max_record_len
    }

    /// The memory cache's counters.
    pub fn memory_cache(&self) -> MemoryCacheStats {
        self.shared().memory.stats()
    }

    /// The tiers records wait in now.
    pub fn cache_tiers(&self) -> CacheTiers {
        self.shared().cache_tiers()
    }

    /// Changes the tiers records wait in from now on, making the file
    /// cache if the new tiers use one and there is none (a replica group,
    /// opened with memory alone, promoted to primary). Records waiting
    /// where they are stay there.
    pub fn set_cache_tiers(&self, tiers: CacheTiers) -> Result<()> {
        let shared = self.shared();
        if tiers != CacheTiers::Memory && shared.file_cache_now().is_none() {
            let mut failed = shared.file_cache_failed.lock();
            // (No room now: tried again now and then, as at open.)
            if shared.file_cache_now().is_none() {
                shared.put_file_cache(&mut failed)?;
            }
        }
        shared.cache_tiers.store(tiers.code(), Ordering::SeqCst);
        Ok(())
    }

    /// Counters of both tiers of the monitoring cache.
    pub fn cache_stats(&self) -> CacheStats {
        let shared = self.shared();
        CacheStats {
            memory: shared.memory.stats(),
            file: shared.file_cache.read().as_ref().map(|c| c.stats()),
            spilling: shared.spilling.load(Ordering::SeqCst),
            tier_switches: shared.tier_switches.load(Ordering::Relaxed),
            spilled_records: shared.spilled_records.load(Ordering::Relaxed),
            replayed_records: shared.replayed_records.load(Ordering::Relaxed),
        }
    }

    /// Every key and value of the index, for tests that compare indexes.
    pub fn dump_index(&self) -> Result<Vec<crate::index::IndexEntry>> {
        self.shared().index.dump()
    }
}
