//! The write path: what the daemon calls for every write to a protected
//! volume. It applies the volume's IO mode, writes the production volume,
//! journals the change, and returns when the mode says the write may be
//! acknowledged.
//!
//! Per write, in order:
//! 1. lock the write's regions (so the journal's order of overlapping
//!    writes is the order they reach the production volume);
//! 2. mark the regions in the persistent dirty-region map (durably, before
//!    the production volume changes);
//! 3. **sync**: append the record (waiting for room in the memory cache, up
//!    to `sync_timeout`), write the production volume, unlock, wait until
//!    the record is durable, acknowledge;
//!    **async**: write the production volume, append the record if the
//!    memory cache has room (else leave the region for a resync), unlock,
//!    acknowledge;
//! 4. settle the regions in the dirty map; a background round clears them
//!    once their records are durable and the production volume is flushed.
//!
//! After a crash, [`WritePath::attach`] re-reads every marked region from
//! the production volume and journals what differs as `resync` writes, with
//! a `resync` event on the timeline: the journal never silently misses a
//! change, and afterwards the production volume equals the journal's newest
//! point. Regions left unjournalled by a full cache are resynced the same
//! way in the background once the cache has room.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::dirty_map::DirtyMap;
use crate::error::{Error, Result};
use crate::io_mode::{AdaptiveController, AdaptiveThresholds, IoMode, Switch};
use crate::journal::{Change, Journal};
use crate::mark::Mark;
use crate::memory_cache::Admission;
use crate::point::{Point, Seq};
use crate::production::BlockDevice;
use crate::volume::VolumeInfo;
use crate::writer::AppendHandle;

/// What a sync write waits for besides this journal: the consistency
/// group's replicas. The replicator implements it; the write path knows no
/// network, only that a sync write is acknowledged once `wait_replicated`
/// returns.
pub trait ReplicaGate: Send + Sync + std::fmt::Debug {
    /// Returns once `seq` is durable wherever the group's replicas must
    /// hold it before a sync write is acknowledged (at once when none
    /// must), or an error that fails the write. `deadline` is the write's
    /// own; what happens when a replica does not answer by then is the
    /// gate's policy (degrade to async, or keep waiting).
    fn wait_replicated(&self, seq: Seq, deadline: Instant) -> Result<()>;

    /// Whether a sync write begun now must wait for a replica at all:
    /// false while no replica is in sync mode. A write begun then is
    /// acknowledged once it is durable here (a replica that turns sync
    /// later gets its record by catching up), and its wait holds no thread.
    fn must_wait(&self) -> bool {
        true
    }
}

/// How the write path behaves.
#[derive(Clone, Copy, Debug)]
pub struct WritePathOptions {
    /// Granularity of the dirty-region map.
    pub region_size: u64,
    /// How long a sync write may wait for room in the memory cache, and
    /// then for its record to become durable, before it fails.
    pub sync_timeout: Duration,
    /// When adaptive volumes switch.
    pub adaptive: AdaptiveThresholds,
    /// How often the background round runs: probing the journal for
    /// adaptive volumes, resyncing unjournalled regions, cleaning dirty
    /// maps.
    pub maintenance_interval: Duration,
}

impl Default for WritePathOptions {
    fn default() -> Self {
        WritePathOptions {
            region_size: 1 << 20,
            sync_timeout: Duration::from_secs(30),
            adaptive: AdaptiveThresholds::default(),
            maintenance_interval: Duration::from_millis(200),
        }
    }
}

/// Counters of one protected volume, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Writes (including zeroes and trims) acknowledged.
    pub writes: u64,
    /// Bytes they covered.
    pub bytes: u64,
    /// Of them, acknowledged in sync mode.
    pub sync_writes: u64,
    /// Of them, acknowledged in async mode.
    pub async_writes: u64,
    /// Async writes the memory cache had no room for (left to a resync).
    pub cache_fallbacks: u64,
    /// Adaptive switches between sync and async.
    pub mode_switches: u64,
    /// Regions resynced from the production volume.
    pub resynced_regions: u64,
    /// Bytes written to the journal by resyncs.
    pub resynced_bytes: u64,
    /// Regions marked in the dirty map now.
    pub dirty_regions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    bytes: AtomicU64,
    sync_writes: AtomicU64,
    async_writes: AtomicU64,
    cache_fallbacks: AtomicU64,
    mode_switches: AtomicU64,
    resynced_regions: AtomicU64,
    resynced_bytes: AtomicU64,
}

/// What one resync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// The volume.
    pub volume: String,
    /// Regions re-read from the production volume, by index.
    pub regions: Vec<usize>,
    /// Bytes that differed from the journal and were journalled.
    pub bytes: u64,
    /// The seq of the `resync` event, if anything was resynced.
    pub seq: Option<Seq>,
    /// Journal-led regions brought up to the journal's newest point on
    /// the production volume (at attach, after a crash), by index...
    pub rolled_forward: Vec<usize>,
    /// ...and the bytes of them that the production volume lacked.
    pub rolled_forward_bytes: u64,
}

/// How a write was acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acknowledged {
    /// The mode it went in.
    pub mode: IoMode,
    /// Its record's seq; `None` if the cache had no room (async only) and
    /// a resync will cover it.
    pub seq: Option<Seq>,
    /// Payload bytes its records hold after lz4 (0 for zeroes, trims and
    /// writes left to a resync): against the bytes written, how well the
    /// data compressed.
    pub stored_bytes: u64,
}

/// One change as the write path applies it.
#[derive(Clone, Copy, Debug)]
enum Op<'a> {
    /// The bytes, and the shared buffer they are, when the caller has one
    /// (its records then share it rather than copy it).
    Write(&'a [u8], Option<&'a Bytes>),
    Zero(u64),
    Trim(u64),
}

impl Op<'_> {
    fn len(&self) -> u64 {
        match self {
            Op::Write(data, _) => data.len() as u64,
            Op::Zero(len) | Op::Trim(len) => *len,
        }
    }

    /// The journal changes for this op at `offset`, each with its share
    /// of the op's buffer: a write larger than the largest record becomes
    /// several records.
    fn changes(&self, offset: u64, max_record: u64) -> Vec<(Change<'_>, Option<Bytes>)> {
        match *self {
            Op::Write(data, shared) => data
                .chunks(max_record.max(1) as usize)
                .scan(0usize, |at, chunk| {
                    let start = *at;
                    *at += chunk.len();
                    let change = Change::Write {
                        offset: offset + start as u64,
                        data: chunk,
                    };
                    Some((change, shared.map(|b| b.slice(start..*at))))
                })
                .collect(),
            Op::Zero(len) => vec![(Change::Zero { offset, len }, None)],
            Op::Trim(len) => vec![(Change::Trim { offset, len }, None)],
        }
    }
}

/// A protected volume attached to the write path.
struct Protected {
    info: VolumeInfo,
    device: Arc<dyn BlockDevice>,
    dirty: DirtyMap,
    /// One lock per dirty-map region; see the module documentation.
    stripes: Vec<Mutex<()>>,
    mode: Mutex<IoMode>,
    adaptive: Mutex<AdaptiveController>,
    counters: Counters,
    /// Background maintenance rounds so far.
    rounds: AtomicU64,
    /// Records of acknowledged async writes whose fate is not known yet.
    pending: Mutex<PendingRecords>,
}

/// Background rounds between two cleanings of a dirty map.
const CLEAN_EVERY_ROUNDS: u64 = 5;

/// Pending async records kept before a write reaps them itself (rounds
/// normally do), at least.
const REAP_AT_LEAST: usize = 4096;

/// The records of acknowledged async writes, until the journal answers
/// them. Nobody waits for them, yet the journal may fail one (a segment it
/// cannot make, on a full disk) and go on with later records: then the
/// write's regions must wait for a resync rather than be cleared because
/// the journal is durable past the record's seq.
#[derive(Debug)]
struct PendingRecords {
    records: Vec<PendingRecord>,
    /// Length at which a write reaps them (amortized: twice what was left
    /// at the last reap).
    reap_at: usize,
}

#[derive(Debug)]
struct PendingRecord {
    /// The write the record belongs to.
    offset: u64,
    len: u64,
    handle: AppendHandle,
}

impl Protected {
    /// True when the journal holds everything a flush of this volume
    /// promises, so the production volume need not be fsynced for it: the
    /// volume is configured sync (an adaptive one may have acknowledged
    /// from the production volume alone) and no marked region is
    /// production-led. A crash is then repaired by rolling the production
    /// volume forward from the journal.
    fn journal_leads_flushes(&self) -> bool {
        *self.mode.lock() == IoMode::Sync && !self.dirty.production_leads_somewhere()
    }

    /// Locks the regions `offset..offset+len` touches, in ascending order.
    fn lock(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        self.dirty
            .regions_of(offset, len)
            .filter_map(|r| self.stripes.get(r))
            .map(|m| m.lock())
            .collect()
    }

    /// Locks the regions like [`Protected::lock`] if none is held now.
    fn try_lock(&self, offset: u64, len: u64) -> Option<Vec<MutexGuard<'_, ()>>> {
        self.dirty
            .regions_of(offset, len)
            .filter_map(|r| self.stripes.get(r))
            .map(|m| m.try_lock())
            .collect()
    }

    /// Counts an acknowledged write of `len` bytes.
    fn count(&self, len: u64, acknowledged: &Acknowledged) {
        let c = &self.counters;
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(len, Ordering::Relaxed);
        match acknowledged.mode {
            IoMode::Async => c.async_writes.fetch_add(1, Ordering::Relaxed),
            _ => c.sync_writes.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The mode a write goes in now.
    fn effective_mode(&self, backlog: u64) -> (IoMode, Option<Switch>) {
        match *self.mode.lock() {
            IoMode::Adaptive => {
                let mut controller = self.adaptive.lock();
                let switch = controller.decide(backlog, Instant::now());
                (controller.current(), switch)
            }
            mode => (mode, None),
        }
    }
}

struct Inner {
    journal: Journal,
    options: WritePathOptions,
    dirty_dir: PathBuf,
    volumes: RwLock<HashMap<String, Arc<Protected>>>,
    stop: AtomicBool,
    /// Wakes the maintenance thread early (on close).
    wake: (Mutex<bool>, Condvar),
    /// What sync writes wait for besides the journal, when the group
    /// replicates.
    gate: RwLock<Option<Arc<dyn ReplicaGate>>>,
}

/// The write path of one journal (consistency group).
pub struct WritePath {
    inner: Arc<Inner>,
    maintenance: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for WritePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritePath")
            .field("journal", &self.inner.journal)
            .finish()
    }
}

impl WritePath {
    /// A write path over `journal`, with its background round running.
    pub fn new(journal: Journal, options: WritePathOptions) -> Result<Self> {
        let dirty_dir = journal.dir().join("dirty");
        crate::fs::create_dir_all_durably(journal.fs().as_ref(), &dirty_dir)
            .map_err(|e| Error::io("create directory", &dirty_dir, e))?;
        let inner = Arc::new(Inner {
            journal,
            options,
            dirty_dir,
            volumes: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            gate: RwLock::new(None),
        });
        let background = inner.clone();
        let maintenance = std::thread::Builder::new()
            .name("tidemark-write-path".into())
            .spawn(move || background.maintain())
            .map_err(|e| Error::io("spawn maintenance thread", &inner.dirty_dir, e))?;
        Ok(WritePath {
            inner,
            maintenance: Mutex::new(Some(maintenance)),
        })
    }

    /// The journal underneath.
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// Makes sync writes (and flushes) also wait for `gate` (the group's
    /// replicas), or no longer, with `None`.
    pub fn set_replica_gate(&self, gate: Option<Arc<dyn ReplicaGate>>) {
        *self.inner.gate.write() = gate;
    }

    /// Attaches the production volume `device` to journal volume `volume`
    /// in `mode`, and resyncs every region its dirty map marks (after a
    /// crash: every region where the journal may have missed a change).
    pub fn attach(
        &self,
        volume: &str,
        device: Arc<dyn BlockDevice>,
        mode: IoMode,
    ) -> Result<ResyncReport> {
        let info = self.inner.journal.volume(volume)?;
        if device.size() < info.size {
            return Err(Error::Invalid(format!(
                "volume {volume}: the production volume {} is {} bytes, the volume is {}",
                device.path().display(),
                device.size(),
                info.size
            )));
        }
        if self.inner.volumes.read().contains_key(volume) {
            return Err(Error::Invalid(format!(
                "volume {volume} is already attached"
            )));
        }
        let region_size = self.inner.options.region_size;
        let dirty = DirtyMap::open(
            self.inner.journal.fs().as_ref(),
            &self.inner.dirty_dir.join(format!("{:010}.map", info.id)),
            &info,
            region_size,
            mode == IoMode::Sync,
        )?;
        let regions = info.size.div_ceil(region_size) as usize;
        let protected = Arc::new(Protected {
            stripes: (0..regions).map(|_| Mutex::new(())).collect(),
            mode: Mutex::new(mode),
            adaptive: Mutex::new(AdaptiveController::new(
                self.inner.options.adaptive,
                Instant::now(),
            )),
            counters: Counters::default(),
            rounds: AtomicU64::new(0),
            pending: Mutex::new(PendingRecords {
                records: Vec::new(),
                reap_at: REAP_AT_LEAST,
            }),
            info,
            device,
            dirty,
        });
        let (journal_led, production_led) = protected.dirty.marked_by_leader();
        // A map that could not be read marks everything: say so on the
        // timeline rather than calling it a crash.
        let reason = match protected.dirty.assumed_dirty() {
            Some(_) => "dirty-map-lost",
            None => "crash",
        };
        // Records the file cache held are journalled again in the
        // background after open: the newest point must include them before
        // it is copied anywhere.
        if !journal_led.is_empty() {
            self.inner.journal.sync()?;
        }
        let rolled_forward_bytes = self.inner.roll_forward(&protected, &journal_led, reason)?;
        let mut report = self
            .inner
            .resync(&protected, &production_led, reason, Admission::Wait)?;
        report.rolled_forward = journal_led;
        report.rolled_forward_bytes = rolled_forward_bytes;
        self.inner
            .volumes
            .write()
            .insert(volume.to_string(), protected);
        Ok(report)
    }

    /// Detaches `volume`: flushes its production volume, journals what
    /// its dirty map still marks, and forgets it. Its journal history stays.
    pub fn detach(&self, volume: &str) -> Result<()> {
        let v = self.settle_for_leaving(volume)?;
        let marked = v.dirty.marked();
        self.inner.resync(&v, &marked, "detach", Admission::Wait)?;
        self.inner.volumes.write().remove(volume);
        Ok(())
    }

    /// What both ways of letting go of a volume do first: the journal
    /// durable, the production volume flushed.
    fn settle_for_leaving(&self, volume: &str) -> Result<Arc<Protected>> {
        let v = self.volume(volume)?;
        self.inner.journal.sync()?;
        v.device
            .flush()
            .map_err(|e| Error::io("flush production volume", v.device.path(), e))?;
        Ok(v)
    }

    /// Lets go of `volume`'s production device without journalling
    /// anything more: the group was demoted, another site's records follow
    /// and any record made here now would be one the new primary never
    /// had. What the production volume holds beyond the journal stays
    /// there (the daemon keeps it as a branch image).
    pub fn release(&self, volume: &str) -> Result<()> {
        self.settle_for_leaving(volume)?;
        self.inner.volumes.write().remove(volume);
        Ok(())
    }

    fn volume(&self, name: &str) -> Result<Arc<Protected>> {
        self.inner
            .volumes
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownVolume(name.to_string()))
    }

    /// Writes `data` at `offset` of `volume`; returns when the volume's IO
    /// mode allows the write to be acknowledged. `fua` also makes the
    /// production volume durable before returning.
    pub fn write(&self, volume: &str, offset: u64, data: &[u8], fua: bool) -> Result<Acknowledged> {
        self.apply(volume, offset, Op::Write(data, None), fua)
    }

    /// [`WritePath::write`] of a shared buffer, which the write's records
    /// share instead of copying (see [`crate::write_buffers`]).
    pub fn write_shared(
        &self,
        volume: &str,
        offset: u64,
        data: &Bytes,
        fua: bool,
    ) -> Result<Acknowledged> {
        self.apply(volume, offset, Op::Write(data, Some(data)), fua)
    }

    /// Sets `len` bytes at `offset` to zero.
    pub fn write_zeroes(
        &self,
        volume: &str,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<Acknowledged> {
        self.apply(volume, offset, Op::Zero(len), fua)
    }

    /// Discards `len` bytes at `offset`; they read back as zeros.
    pub fn trim(&self, volume: &str, offset: u64, len: u64) -> Result<Acknowledged> {
        self.apply(volume, offset, Op::Trim(len), false)
    }

    /// Reads the live volume (the production volume).
    pub fn read(&self, volume: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.volume(volume)?;
        v.info.check_range(offset, buf.len() as u64)?;
        v.device
            .read_at(buf, offset)
            .map_err(|e| Error::io_at("read production volume", v.device.path(), offset, e))
    }

    /// Makes every acknowledged write to `volume` durable on the production
    /// volume and records a flush (a crash-consistent point) in the journal
    /// after every write acknowledged before the call — in async mode too:
    /// writes the cache had no room for are resynced first. Waits for cache
    /// room up to `sync_timeout` ([`Error::Behind`] after that); in sync
    /// mode it returns once the flush record is durable too.
    pub fn flush(&self, volume: &str) -> Result<Option<Seq>> {
        self.flush_as(volume, true)
    }

    /// A flush as a block-device client needs it: every acknowledged write
    /// durable, the flush point recorded after them — but in sync mode,
    /// once every acknowledged write's record is durable (as it is unless
    /// the volume wrote in async mode a moment ago), it does not wait for
    /// the flush record itself: nothing the client was promised depends on
    /// it, and the next group commit takes it. A database commits with a
    /// flush after each log write; waiting for a commit of its own doubled
    /// what every transaction waited for.
    pub fn flush_acknowledged(&self, volume: &str) -> Result<Option<Seq>> {
        self.flush_as(volume, false)
    }

    /// [`WritePath::flush_acknowledged`] only if that cannot block: the
    /// volume writes in sync mode, the journal leads every marked region
    /// (no production fsync), nothing waits for a resync, every async
    /// record is durable and the flush record goes to a cache at once.
    /// `None` otherwise; the caller then flushes where blocking is fine.
    /// What an event loop runs in place, saving a thread hand-off per
    /// database commit.
    pub fn try_flush(&self, volume: &str) -> Option<Result<Option<Seq>>> {
        let v = match self.volume(volume) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let inner = &self.inner;
        if !v.journal_leads_flushes()
            || v.dirty.has_unjournaled()
            || !inner.async_records_durable(&v)
        {
            return None;
        }
        match inner
            .journal
            .append_with(v.info.id, Change::Flush, Admission::NoBlock)
        {
            Ok(handle) => Some(Ok(Some(handle.seq()))),
            Err(Error::CacheFull { .. }) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn flush_as(&self, volume: &str, wait_for_point: bool) -> Result<Option<Seq>> {
        let v = self.volume(volume)?;
        let timeout = self.inner.options.sync_timeout;
        let behind = |e: Error| match e {
            Error::CacheFull { .. } | Error::NotDurable { .. } => Error::Behind {
                volume: volume.to_string(),
                reason: e.to_string(),
            },
            other => other,
        };
        let left = v.dirty.unjournaled(true);
        if !left.is_empty() {
            self.inner
                .resync(&v, &left, "flush", Admission::WaitFor(timeout))
                .map_err(behind)?;
        }
        let (mode, switch) = v.effective_mode(self.inner.backlog());
        self.inner.record_switch(&v, switch);
        let handle = self
            .inner
            .journal
            .append_with(v.info.id, Change::Flush, Admission::WaitFor(timeout))
            .map_err(behind)?;
        // Where the journal leads every marked region, everything
        // acknowledged is durable in the journal already and a crash rolls
        // the production volume forward to it: no fsync of the production
        // volume (for a database, whose every commit is a flush, that fsync
        // was most of what a sync volume cost). Else it runs while the
        // journal commits the flush record — the slower of the two, not
        // their sum; the record only marks the point.
        if !v.journal_leads_flushes() {
            v.device
                .flush()
                .map_err(|e| Error::io("flush production volume", v.device.path(), e))?;
        }
        match mode {
            // A replica in sync mode holds what a flush acknowledged in
            // every IO mode: an async volume's flush then waits for its
            // record here and there, as a database commit expects.
            IoMode::Async if !self.inner.gate_must_wait() => Ok(Some(handle.seq())),
            _ if !wait_for_point
                && *v.mode.lock() == IoMode::Sync
                && self.inner.async_records_durable(&v) =>
            {
                Ok(Some(handle.seq()))
            }
            _ => {
                let started = Instant::now();
                let seq = handle.wait_timeout(timeout).map_err(behind)?.seq;
                self.inner.wait_replicated(seq, started + timeout)?;
                Ok(Some(seq))
            }
        }
    }

    /// Changes `volume`'s IO mode; takes effect with the next write.
    pub fn set_mode(&self, volume: &str, mode: IoMode) -> Result<()> {
        let v = self.volume(volume)?;
        let from = std::mem::replace(&mut *v.mode.lock(), mode);
        if from != mode {
            *v.adaptive.lock() =
                AdaptiveController::new(self.inner.options.adaptive, Instant::now());
            self.inner.event(
                &v,
                "io-mode",
                &format!("{{\"from\":\"{from}\",\"to\":\"{mode}\",\"by\":\"operator\"}}"),
            );
            // A sync volume's flushes may skip the production fsync, and a
            // sync volume whose dirty map is lost is rolled forward from
            // the journal: both need everything acknowledged before the
            // switch durable in the journal (and on a sync replica).
            if mode == IoMode::Sync {
                if let Err(e) = self.flush(volume) {
                    *v.mode.lock() = from;
                    self.inner.event(
                        &v,
                        "io-mode",
                        &format!("{{\"from\":\"{mode}\",\"to\":\"{from}\",\"by\":\"operator\",\"reason\":\"flush failed\"}}"),
                    );
                    return Err(Error::Invalid(format!(
                        "volume {volume} stays {from}: switching to sync needs every write acknowledged so far durable in the journal first, and that failed ({e}); try again"
                    )));
                }
            }
        }
        Ok(())
    }

    /// `volume`'s configured IO mode and the mode writes go in now.
    pub fn mode(&self, volume: &str) -> Result<(IoMode, IoMode)> {
        let v = self.volume(volume)?;
        let configured = *v.mode.lock();
        let now = match configured {
            IoMode::Adaptive => v.adaptive.lock().current(),
            mode => mode,
        };
        Ok((configured, now))
    }

    /// `volume`'s counters.
    pub fn stats(&self, volume: &str) -> Result<VolumeStats> {
        let v = self.volume(volume)?;
        let c = &v.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(VolumeStats {
            writes: load(&c.writes),
            bytes: load(&c.bytes),
            sync_writes: load(&c.sync_writes),
            async_writes: load(&c.async_writes),
            cache_fallbacks: load(&c.cache_fallbacks),
            mode_switches: load(&c.mode_switches),
            resynced_regions: load(&c.resynced_regions),
            resynced_bytes: load(&c.resynced_bytes),
            dirty_regions: v.dirty.marked_count() as u64,
        })
    }

    /// Runs one background round now: adaptive probes, resyncs of
    /// unjournalled regions, dirty-map cleaning. (It also runs on its own
    /// every `maintenance_interval`.)
    pub fn maintain_now(&self) -> Result<()> {
        self.inner.round(true, Admission::Wait)
    }

    /// Stops the background round, resyncs what is left unjournalled, and
    /// cleans the dirty maps as far as the journal allows — within a
    /// bounded time: each wait for the journal gives up after
    /// `sync_timeout` (a full disk). Succeeds only if every change on the
    /// production volumes is durable in the journal; otherwise the error
    /// ([`Error::NotJournalled`]) names the regions that are not, which
    /// the dirty maps still mark, so the next start resyncs them from the
    /// production volumes.
    pub fn close(&self) -> Result<()> {
        self.inner.stop.store(true, Ordering::SeqCst);
        {
            let (lock, cvar) = &self.inner.wake;
            *lock.lock() = true;
            cvar.notify_all();
        }
        if let Some(handle) = self.maintenance.lock().take() {
            let _ = handle.join();
        }
        let timeout = self.inner.options.sync_timeout;
        let outcome = self
            .inner
            .journal
            .sync_within(timeout)
            .and_then(|_| self.inner.round(true, Admission::WaitFor(timeout)));
        // Not the outcome alone: an earlier round (the background one this
        // close stopped) or a write may have left regions that this one
        // could not journal either, or records the journal failed.
        let (left, durable) = self.inner.not_durable();
        if left.is_empty() {
            return outcome;
        }
        Err(Error::NotJournalled {
            regions: left.join("; "),
            reason: match outcome {
                Err(e) => e.to_string(),
                Ok(()) => format!("the journal is durable through seq {durable}"),
            },
        })
    }

    fn apply(&self, volume: &str, offset: u64, op: Op<'_>, fua: bool) -> Result<Acknowledged> {
        let v = self.volume(volume)?;
        let len = op.len();
        v.info.check_range(offset, len)?;
        let inner = &self.inner;
        let (mode, switch) = v.effective_mode(inner.backlog());
        inner.record_switch(&v, switch);
        let stripes = v.lock(offset, len);
        v.dirty.begin(offset, len, mode != IoMode::Async)?;
        let acknowledged = match mode {
            IoMode::Async => inner.apply_async(&v, offset, op, fua, stripes, Admission::NoWait),
            _ => inner.apply_sync(&v, offset, op, fua, stripes),
        }?;
        v.count(len, &acknowledged);
        Ok(acknowledged)
    }

    /// Writes `data` at `offset` of `volume` only if that cannot block on
    /// a disk or a lock: the volume writes in async mode now, the write's
    /// regions are free and already marked in the dirty map (no fsync),
    /// and its record goes to a cache without waiting for room. `None`
    /// when that does not hold; the caller then uses [`WritePath::write`]
    /// where blocking is fine. This is what lets an event loop (the NBD
    /// server) take small async writes without a thread hand-off.
    pub fn try_write(
        &self,
        volume: &str,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<Acknowledged>> {
        self.try_write_op(volume, offset, Op::Write(data, None))
    }

    /// [`WritePath::try_write`] of a shared buffer; see
    /// [`WritePath::write_shared`].
    pub fn try_write_shared(
        &self,
        volume: &str,
        offset: u64,
        data: &Bytes,
    ) -> Option<Result<Acknowledged>> {
        self.try_write_op(volume, offset, Op::Write(data, Some(data)))
    }

    fn try_write_op(&self, volume: &str, offset: u64, op: Op<'_>) -> Option<Result<Acknowledged>> {
        let v = match self.volume(volume) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let len = op.len();
        if let Err(e) = v.info.check_range(offset, len) {
            return Some(Err(e));
        }
        let inner = &self.inner;
        let (mode, switch) = v.effective_mode(inner.backlog());
        // Recorded before any way out: the controller has switched, and
        // the write that returns here will not see the switch again.
        // (An event is a mark, which never waits for the file tier.)
        inner.record_switch(&v, switch);
        if mode != IoMode::Async || !inner.journal.takes_without_io(len) {
            return None;
        }
        let stripes = v.try_lock(offset, len)?;
        if !v.dirty.try_begin(offset, len, false) {
            return None;
        }
        let acknowledged = inner.apply_async(&v, offset, op, false, stripes, Admission::NoBlock);
        if let Ok(acknowledged) = &acknowledged {
            v.count(len, acknowledged);
        }
        Some(acknowledged)
    }
}

impl WritePath {
    /// Starts a sync write of `data` at `offset` of `volume` if that cannot
    /// block on a disk or a lock (like [`WritePath::try_write`]: the volume
    /// writes in sync mode now, the write is one record, its regions are
    /// free and already marked, the cache has room at once): appends its
    /// record and writes the production volume. What is left — waiting for
    /// durability, which is what takes time — is the returned
    /// [`SyncWrite`]'s, so an event loop can await it instead of holding a
    /// thread per write. `None` when that does not hold; the caller then
    /// uses [`WritePath::write_shared`] where blocking is fine.
    pub fn try_begin_sync(
        &self,
        volume: &str,
        offset: u64,
        data: &Bytes,
    ) -> Option<Result<SyncWrite>> {
        let v = match self.volume(volume) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let len = data.len() as u64;
        if let Err(e) = v.info.check_range(offset, len) {
            return Some(Err(e));
        }
        let inner = &self.inner;
        if len > inner.journal.max_record_len() {
            return None;
        }
        let (mode, switch) = v.effective_mode(inner.backlog());
        // Before any way out, as in `try_write_op`.
        inner.record_switch(&v, switch);
        if mode == IoMode::Async {
            return None;
        }
        let stripes = v.try_lock(offset, len)?;
        if !v.dirty.try_begin(offset, len, true) {
            return None;
        }
        let started = Instant::now();
        let handle = match inner
            .journal
            .append_shared(v.info.id, offset, data, Admission::NoBlock)
        {
            Ok(handle) => handle,
            Err(e) => {
                // Nothing reached journal or volume.
                drop(stripes);
                v.dirty.settle(offset, len, None, false);
                return match e {
                    Error::CacheFull { .. } => None,
                    e => Some(Err(e)),
                };
            }
        };
        let failed = inner
            .device_apply(&v, offset, Op::Write(data, Some(data)), false)
            .err();
        drop(stripes);
        if failed.is_some() {
            v.dirty.settle(offset, len, None, true);
        }
        let waits_for_replica = inner.gate_must_wait();
        Some(Ok(SyncWrite {
            inner: inner.clone(),
            v: v.clone(),
            offset,
            len,
            handle,
            failed,
            started,
            waits_for_replica,
        }))
    }
}

/// A sync write begun by [`WritePath::try_begin_sync`]: its record is
/// appended and the production volume written; it is acknowledged once
/// the record is durable. Await [`SyncWrite::durable`] (under a timeout of
/// [`SyncWrite::time_left`]) and then [`SyncWrite::settle`] — unless
/// [`SyncWrite::blocks`], when [`SyncWrite::wait`] where blocking is fine.
pub struct SyncWrite {
    inner: Arc<Inner>,
    v: Arc<Protected>,
    offset: u64,
    len: u64,
    handle: AppendHandle,
    /// The production write's error: the journal holds a change the volume
    /// lacks, and must be made to agree again before answering.
    failed: Option<Error>,
    started: Instant,
    /// Whether the group's replicas hold it back (asked when it began).
    waits_for_replica: bool,
}

impl std::fmt::Debug for SyncWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncWrite")
            .field("volume", &self.v.info.name)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("seq", &self.handle.seq())
            .finish()
    }
}

impl SyncWrite {
    /// Whether finishing may block: the production write failed (a resync
    /// follows), the group waits for a replica, or the record waits in the
    /// file cache (whose durability is an fsync).
    pub fn blocks(&self) -> bool {
        self.failed.is_some() || self.waits_for_replica || self.handle.waits_on_file_cache()
    }

    /// Whether settling must wait for a replica: one held the write back
    /// when it began, or one has turned sync since (its catching up was
    /// measured against the durable seq, which this record may not have
    /// reached then). Ask once the record is durable, before
    /// [`SyncWrite::settle`]: true means settling blocks (and the answer
    /// holds: settling waits for the replica then).
    pub fn waits_for_replica(&mut self) -> bool {
        if !self.waits_for_replica {
            self.waits_for_replica = self.inner.gate_must_wait();
        }
        self.waits_for_replica
    }

    /// How long the write may still wait for its record.
    pub fn time_left(&self) -> Duration {
        self.inner
            .options
            .sync_timeout
            .saturating_sub(self.started.elapsed())
    }

    /// Resolves when the record is durable (or failed).
    pub async fn durable(&mut self) -> Result<()> {
        (&mut self.handle).await.map(|_| ())
    }

    /// Acknowledges the write after [`SyncWrite::durable`] answered
    /// `durable` — `None` if it did not within [`SyncWrite::time_left`].
    /// Waits for a replica only as [`SyncWrite::waits_for_replica`] last
    /// said (or as it was when the write began), so it does not block
    /// unless that said so.
    pub fn settle(self, durable: Option<Result<()>>) -> Result<Acknowledged> {
        let seq = self.handle.seq();
        let durable = durable.unwrap_or(Err(Error::NotDurable {
            seq,
            waited: self.inner.options.sync_timeout,
        }));
        self.finish(Some(durable))
    }

    /// Waits for the record and acknowledges, blocking.
    pub fn wait(self) -> Result<Acknowledged> {
        self.finish(None)
    }

    /// Settles with `durable`, the outcome of waiting for the record, or
    /// waits for it here (blocking) when there is none yet.
    fn finish(self, durable: Option<Result<()>>) -> Result<Acknowledged> {
        let blocking = durable.is_none();
        let time_left = self.time_left();
        let SyncWrite {
            inner,
            v,
            offset,
            len,
            handle,
            failed,
            started,
            waits_for_replica,
        } = self;
        if let Some(e) = failed {
            inner.agree_again(&v, offset, len, vec![handle], "production-write-failed");
            return Err(e);
        }
        let (seq, stored_bytes) = (handle.seq(), handle.stored_bytes());
        let durable = durable.unwrap_or_else(|| handle.wait_timeout(time_left).map(|_| ()));
        // Blocking here anyway: asked again now the record is durable
        // (see `waits_for_replica`).
        let replica = waits_for_replica || (blocking && inner.gate_must_wait());
        let acknowledged = inner.settle_sync(
            &v,
            (offset, len),
            (seq, stored_bytes),
            started,
            durable,
            replica,
        )?;
        v.count(len, &acknowledged);
        Ok(acknowledged)
    }
}

impl Drop for WritePath {
    fn drop(&mut self) {
        if self.maintenance.lock().is_some() {
            if let Err(e) = self.close() {
                tracing::warn!(error = %e, "write path did not close cleanly");
            }
        }
    }
}

impl Inner {
    /// Whether a sync write settled now must wait for a replica.
    fn gate_must_wait(&self) -> bool {
        self.gate.read().as_ref().is_some_and(|g| g.must_wait())
    }

    /// Waits for the replica gate, if the group has one.
    fn wait_replicated(&self, seq: Seq, deadline: Instant) -> Result<()> {
        let gate = self.gate.read().clone();
        match gate {
            Some(gate) => gate.wait_replicated(seq, deadline),
            None => Ok(()),
        }
    }

    /// Appends one change of `v`, sharing `shared` (the change's bytes)
    /// when there is one.
    fn append(
        &self,
        v: &Protected,
        change: Change<'_>,
        shared: Option<Bytes>,
        admission: Admission,
    ) -> Result<AppendHandle> {
        match (change, shared) {
            (Change::Write { offset, .. }, Some(data)) => self
                .journal
                .append_shared(v.info.id, offset, &data, admission),
            (change, _) => self.journal.append_with(v.info.id, change, admission),
        }
    }

    /// True when every async write of `v` still tracked has its record
    /// durable: then everything acknowledged to `v` is in the journal.
    fn async_records_durable(&self, v: &Protected) -> bool {
        let pending = v.pending.lock();
        if pending.records.is_empty() {
            return true;
        }
        let durable = self.journal.history().newest_seq;
        pending.records.iter().all(|r| r.handle.seq() <= durable)
    }

    fn backlog(&self) -> u64 {
        self.journal.memory_cache().used_bytes
    }

    fn device_apply(&self, v: &Protected, offset: u64, op: Op<'_>, fua: bool) -> Result<()> {
        let device = &v.device;
        let result = match op {
            Op::Write(data, _) => device.write_at(data, offset),
            Op::Zero(len) | Op::Trim(len) => device.zero(offset, len),
        }
        .and_then(|()| if fua { device.flush() } else { Ok(()) });
        result.map_err(|e| Error::io_at("write production volume", device.path(), offset, e))
    }

    fn apply_sync(
        &self,
        v: &Protected,
        offset: u64,
        op: Op<'_>,
        fua: bool,
        stripes: Vec<MutexGuard<'_, ()>>,
    ) -> Result<Acknowledged> {
        let len = op.len();
        let started = Instant::now();
        let timeout = self.options.sync_timeout;
        let mut handles = Vec::new();
        for (change, shared) in op.changes(offset, self.journal.max_record_len()) {
            match self.append(v, change, shared, Admission::WaitFor(timeout)) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    // Part of a split write may be journalled already while
                    // the production volume has none of it.
                    drop(stripes);
                    v.dirty.settle(offset, len, None, !handles.is_empty());
                    if !handles.is_empty() {
                        self.agree_again(v, offset, len, handles, "journal-append-failed");
                    }
                    return Err(e);
                }
            }
        }
        let seq = handles.last().map_or(0, |h| h.seq());
        let stored_bytes = handles.iter().map(|h| h.stored_bytes()).sum();
        // FUA asks for this write to be durable, which it is once its
        // records are, where the journal leads (see `flush`).
        let fua = fua && !v.journal_leads_flushes();
        if let Err(e) = self.device_apply(v, offset, op, fua) {
            // The journal has a change the production volume lacks (wholly
            // or in part): make them agree again before answering.
            drop(stripes);
            v.dirty.settle(offset, len, None, true);
            self.agree_again(v, offset, len, handles, "production-write-failed");
            return Err(e);
        }
        drop(stripes);
        let durable: Result<Vec<_>> = handles
            .into_iter()
            .map(|h| h.wait_timeout(timeout.saturating_sub(started.elapsed())))
            .collect();
        self.settle_sync(
            v,
            (offset, len),
            (seq, stored_bytes),
            started,
            durable.map(|_| ()),
            true,
        )
    }

    /// The end of a sync write whose records were appended and production
    /// write done, once waiting for the records has `durable` as outcome:
    /// settles the regions, waits for the replica (if `replica`: one held
    /// it back when it began), acknowledges.
    fn settle_sync(
        &self,
        v: &Protected,
        (offset, len): (u64, u64),
        (seq, stored_bytes): (Seq, u64),
        started: Instant,
        durable: Result<()>,
        replica: bool,
    ) -> Result<Acknowledged> {
        let timeout = self.options.sync_timeout;
        // A record that failed, or is not durable in time, may never reach
        // the journal while the production volume has the change: leave the
        // region to a resync then (needless if the record lands after all).
        let journalled = durable.as_ref().ok().map(|_| seq);
        v.dirty.settle(offset, len, journalled, true);
        durable?;
        if replica {
            self.wait_replicated(seq, started + timeout)?;
        }
        if *v.mode.lock() == IoMode::Adaptive {
            let switch =
                v.adaptive
                    .lock()
                    .observe(started.elapsed(), self.backlog(), Instant::now());
            self.record_switch(v, switch);
        }
        Ok(Acknowledged {
            mode: IoMode::Sync,
            seq: Some(seq),
            stored_bytes,
        })
    }

    /// After a write that reached only one of journal and production
    /// volume: waits for its records (whatever their fate), then resyncs
    /// its regions, so the journal's newest point equals the production
    /// volume again and the window shows on the timeline as a `resync`
    /// event. If that fails too, the regions stay marked for the
    /// background round.
    fn agree_again(
        &self,
        v: &Protected,
        offset: u64,
        len: u64,
        handles: Vec<crate::writer::AppendHandle>,
        reason: &str,
    ) {
        let timeout = self.options.sync_timeout;
        for handle in handles {
            // A record that is not durable in time may still become so
            // after the resync's comparison: then the region stays marked
            // and the background round resyncs it again.
            let _ = handle.wait_timeout(timeout);
        }
        let regions: Vec<usize> = v.dirty.regions_of(offset, len).collect();
        if let Err(e) = self.resync(v, &regions, reason, Admission::WaitFor(timeout)) {
            tracing::warn!(volume = %v.info.name, error = %e, reason, "could not resync after a failed write; the background round will");
        }
    }

    fn apply_async(
        &self,
        v: &Protected,
        offset: u64,
        op: Op<'_>,
        fua: bool,
        stripes: Vec<MutexGuard<'_, ()>>,
        admission: Admission,
    ) -> Result<Acknowledged> {
        let len = op.len();
        if let Err(e) = self.device_apply(v, offset, op, fua) {
            v.dirty.settle(offset, len, None, false);
            return Err(e);
        }
        let mut seq = None;
        let mut stored_bytes = 0;
        let mut handles = Vec::new();
        for (change, shared) in op.changes(offset, self.journal.max_record_len()) {
            match self.append(v, change, shared, admission) {
                Ok(handle) => {
                    seq = Some(handle.seq());
                    stored_bytes += handle.stored_bytes();
                    handles.push(handle);
                }
                Err(e) => {
                    if !matches!(e, Error::CacheFull { .. }) {
                        tracing::warn!(volume = %v.info.name, error = %e, "journalling an async write failed; its region will be resynced");
                    }
                    v.counters.cache_fallbacks.fetch_add(1, Ordering::Relaxed);
                    seq = None;
                    stored_bytes = 0;
                    handles.clear();
                    break;
                }
            }
        }
        drop(stripes);
        // Before the write settles: a round that finds its regions settled
        // also finds its records (see `Inner::reap`).
        self.track(v, offset, len, handles);
        v.dirty.settle(offset, len, seq, true);
        Ok(Acknowledged {
            mode: IoMode::Async,
            seq,
            stored_bytes,
        })
    }

    /// Appends a timeline event for `v` without waiting on the cache.
    fn event(&self, v: &Protected, name: &str, body: &str) {
        let mark = Mark::Event {
            name,
            body: body.as_bytes(),
        };
        if let Err(e) = self
            .journal
            .append_with(v.info.id, Change::Mark(mark), Admission::NoWait)
        {
            tracing::warn!(volume = %v.info.name, event = name, error = %e, "could not record a timeline event");
        }
    }

    fn record_switch(&self, v: &Protected, switch: Option<Switch>) {
        if let Some(Switch { from, to }) = switch {
            v.counters.mode_switches.fetch_add(1, Ordering::Relaxed);
            tracing::info!(volume = %v.info.name, %from, %to, "adaptive IO mode switched");
            self.event(
                v,
                "io-mode",
                &format!("{{\"from\":\"{from}\",\"to\":\"{to}\",\"by\":\"adaptive\"}}"),
            );
        }
    }

    /// Keeps the records of an acknowledged async write until the journal
    /// answers them; reaps the kept ones now and then.
    fn track(&self, v: &Protected, offset: u64, len: u64, handles: Vec<AppendHandle>) {
        if handles.is_empty() {
            return;
        }
        let mut pending = v.pending.lock();
        pending
            .records
            .extend(handles.into_iter().map(|handle| PendingRecord {
                offset,
                len,
                handle,
            }));
        if pending.records.len() >= pending.reap_at {
            let durable = self.journal.history().newest_seq;
            self.reap(v, &mut pending, durable);
        }
    }

    /// Takes the journal's answers to `v`'s async records: a write whose
    /// record failed waits for a resync. `durable` must be read before (and
    /// `pending` held until the dirty map is cleaned with it): the journal
    /// answers a failed record before any later one becomes durable, so a
    /// record at or below `durable` that has no answer yet will be durable,
    /// and every failure the cleaning could be misled by is seen here.
    fn reap(&self, v: &Protected, pending: &mut PendingRecords, durable: Seq) {
        let mut failed = 0u64;
        let mut first_error = None;
        pending
            .records
            .retain_mut(|record| match record.handle.try_wait() {
                Some(Ok(_)) => false,
                Some(Err(e)) => {
                    v.dirty.unjournal(record.offset, record.len);
                    failed += 1;
                    first_error.get_or_insert(e);
                    false
                }
                None => record.handle.seq() > durable,
            });
        pending.reap_at = (pending.records.len() * 2).max(REAP_AT_LEAST);
        if let Some(e) = first_error {
            tracing::warn!(volume = %v.info.name, records = failed, error = %e, "the journal failed records of acknowledged async writes; their regions will be resynced");
        }
    }

    /// Reaps `v`'s async records against the journal's durable seq now.
    fn reap_now(&self, v: &Protected) {
        let mut pending = v.pending.lock();
        let durable = self.journal.history().newest_seq;
        self.reap(v, &mut pending, durable);
    }

    /// What may not be durable in the journal, one sentence per volume
    /// (none when everything is), and the durable seq it was judged by.
    fn not_durable(&self) -> (Vec<String>, Seq) {
        let mut volumes: Vec<Arc<Protected>> = self.volumes.read().values().cloned().collect();
        volumes.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        let mut durable = 0;
        let mut left = Vec::new();
        for v in volumes {
            let mut pending = v.pending.lock();
            durable = self.journal.history().newest_seq;
            self.reap(&v, &mut pending, durable);
            let regions = v.dirty.not_durable(durable);
            drop(pending);
            if !regions.is_empty() {
                left.push(describe_regions(&v, &regions));
            }
        }
        (left, durable)
    }

    /// Re-reads `regions` from the production volume and journals, as
    /// resync writes, every 4 KiB block that differs from the journal's
    /// newest point; then records a `resync` event naming the window. If
    /// its records do not all become durable (in time, with
    /// `Admission::WaitFor`), the regions wait for a resync again.
    /// Brings journal-led `regions` of the production volume up to the
    /// journal's newest point (after a crash it may lack acknowledged
    /// changes whose flush did not fsync it, or hold unacknowledged ones
    /// the journal never got), writing only the 4 KiB blocks that differ,
    /// then flushes it. Returns the bytes written; a `roll-forward` event
    /// says so on the timeline. The regions stay marked until the next
    /// cleaning round.
    fn roll_forward(&self, v: &Protected, regions: &[usize], reason: &str) -> Result<u64> {
        if regions.is_empty() {
            return Ok(0);
        }
        let region_size = v.dirty.region_size();
        let mut production = vec![0u8; region_size as usize];
        let mut journalled = vec![0u8; region_size as usize];
        let mut bytes = 0u64;
        for &r in regions {
            let (offset, len) = self.read_both(v, r, &mut production, &mut journalled)?;
            for (start, end) in differing_runs(&production[..len], &journalled[..len], usize::MAX) {
                let at = offset + start as u64;
                v.device
                    .write_at(&journalled[start..end], at)
                    .map_err(|e| {
                        Error::io_at("roll production volume forward", v.device.path(), at, e)
                    })?;
                bytes += (end - start) as u64;
            }
        }
        v.device
            .flush()
            .map_err(|e| Error::io("flush production volume", v.device.path(), e))?;
        tracing::info!(volume = %v.info.name, regions = regions.len(), bytes, reason, "production volume rolled forward to the journal");
        // A lost map is news even where nothing differed. Durable before
        // the volume serves, like a resync's event.
        if bytes > 0 || reason != "crash" {
            let body = format!(
                "{{\"reason\":\"{reason}\",\"regions\":{},\"bytes\":{bytes}}}",
                regions.len()
            );
            let mark = Mark::Event {
                name: "roll-forward",
                body: body.as_bytes(),
            };
            let recorded = self
                .journal
                .append_with(v.info.id, Change::Mark(mark), Admission::Wait)
                .and_then(|handle| handle.wait_timeout(self.options.sync_timeout));
            if let Err(e) = recorded {
                tracing::warn!(volume = %v.info.name, error = %e, "could not record the roll-forward on the timeline");
            }
        }
        Ok(bytes)
    }

    /// Reads region `r` of the production volume and of the journal's
    /// newest point into the two buffers (each a region long); returns the
    /// region's offset and length (the last region may be short).
    fn read_both(
        &self,
        v: &Protected,
        r: usize,
        production: &mut [u8],
        journalled: &mut [u8],
    ) -> Result<(u64, usize)> {
        let region_size = v.dirty.region_size();
        let offset = r as u64 * region_size;
        let len = region_size.min(v.info.size - offset) as usize;
        v.device
            .read_at(&mut production[..len], offset)
            .map_err(|e| Error::io_at("read production volume", v.device.path(), offset, e))?;
        self.journal
            .read(&v.info.name, offset, &mut journalled[..len], Point::Latest)?;
        Ok((offset, len))
    }

    fn resync(
        &self,
        v: &Protected,
        regions: &[usize],
        reason: &str,
        admission: Admission,
    ) -> Result<ResyncReport> {
        let mut begun = Vec::new();
        let outcome = self.resync_regions(v, regions, reason, admission, &mut begun);
        v.dirty.resync_settle(&begun, outcome.is_ok());
        outcome
    }

    fn resync_regions(
        &self,
        v: &Protected,
        regions: &[usize],
        reason: &str,
        admission: Admission,
        begun: &mut Vec<usize>,
    ) -> Result<ResyncReport> {
        let mut report = ResyncReport {
            volume: v.info.name.clone(),
            ..ResyncReport::default()
        };
        if regions.is_empty() {
            return Ok(report);
        }
        let region_size = v.dirty.region_size();
        let max_record = (self.journal.max_record_len().max(4096) / 4096 * 4096) as usize;
        let mut production = vec![0u8; region_size as usize];
        let mut journalled = vec![0u8; region_size as usize];
        let mut handles = Vec::new();
        let mut first_offset = u64::MAX;
        let mut end_offset = 0;
        for &r in regions {
            let _stripe = v.stripes.get(r).map(|m| m.lock());
            let (offset, len) = self.read_both(v, r, &mut production, &mut journalled)?;
            let mut newest = 0;
            for (start, end) in differing_runs(&production[..len], &journalled[..len], max_record) {
                let data = &production[start..end];
                let handle = self.journal.append_with(
                    v.info.id,
                    Change::Resync {
                        offset: offset + start as u64,
                        data,
                    },
                    admission,
                )?;
                newest = newest.max(handle.seq());
                handles.push(handle);
                report.bytes += data.len() as u64;
            }
            // Still under the region's lock: a write that comes after this
            // is not covered by the resync and must count on its own.
            v.dirty.resync_begin(r, newest);
            begun.push(r);
            first_offset = first_offset.min(offset);
            end_offset = end_offset.max(offset + len as u64);
            report.regions.push(r);
        }
        let body = format!(
            "{{\"reason\":\"{reason}\",\"regions\":{},\"offset\":{first_offset},\"end\":{end_offset},\"bytes\":{}}}",
            report.regions.len(),
            report.bytes
        );
        let event = self.journal.append_with(
            v.info.id,
            Change::Mark(Mark::Event {
                name: "resync",
                body: body.as_bytes(),
            }),
            admission,
        )?;
        // Bounded like the appends, so a full disk cannot hold a close.
        let deadline = match admission {
            Admission::WaitFor(timeout) => Some(Instant::now() + timeout),
            Admission::Wait | Admission::NoWait | Admission::NoBlock => None,
        };
        let wait = |handle: AppendHandle| match deadline {
            Some(deadline) => {
                handle.wait_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            None => handle.wait(),
        };
        let mut last = event.seq();
        for handle in handles {
            last = last.max(wait(handle)?.seq);
        }
        let seq = wait(event)?.seq.max(last);
        v.counters
            .resynced_regions
            .fetch_add(report.regions.len() as u64, Ordering::Relaxed);
        v.counters
            .resynced_bytes
            .fetch_add(report.bytes, Ordering::Relaxed);
        tracing::info!(volume = %v.info.name, reason, regions = report.regions.len(), bytes = report.bytes, "resynced from the production volume");
        report.seq = Some(seq);
        Ok(report)
    }

    /// One background round over every attached volume.
    /// One maintenance round; `forced` (on request and at close) cleans
    /// every region it can, background rounds only regions gone quiet.
    fn round(&self, forced: bool, admission: Admission) -> Result<()> {
        let volumes: Vec<Arc<Protected>> = self.volumes.read().values().cloned().collect();
        let mut first_error = None;
        for v in volumes {
            if let Err(e) = self.maintain_volume(&v, forced, admission) {
                tracing::warn!(volume = %v.info.name, error = %e, "write-path maintenance failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn maintain_volume(&self, v: &Protected, forced: bool, admission: Admission) -> Result<()> {
        if *v.mode.lock() == IoMode::Adaptive {
            // A probe: how long until everything captured so far is
            // durable. Async writes give the controller no latency of
            // their own, so this is how it sees the journal recover.
            let started = Instant::now();
            // Bounded, so a full disk cannot hold the round (and a close
            // waiting for it) forever.
            self.journal.sync_within(self.options.sync_timeout)?;
            let switch =
                v.adaptive
                    .lock()
                    .observe(started.elapsed(), self.backlog(), Instant::now());
            self.record_switch(v, switch);
        }
        // Writes whose records the journal failed are resynced too.
        self.reap_now(v);
        let unjournaled = v.dirty.unjournaled(false);
        if !unjournaled.is_empty() {
            self.resync(v, &unjournaled, "cache-full", admission)?;
        }
        // Cleaning costs a flush of the production volume, and a cleaned
        // region costs an fsync of the map when it is written again. So
        // background rounds clean only every CLEAN_EVERY_ROUNDS rounds and
        // only regions not written since the previous cleaning: hot
        // regions stay marked (a crash merely resyncs them).
        let round = v.rounds.fetch_add(1, Ordering::Relaxed);
        if !forced && round % CLEAN_EVERY_ROUNDS != 0 || v.dirty.marked_count() == 0 {
            return Ok(());
        }
        let generation = v.dirty.start_clean();
        let min_idle = if forced { 0 } else { 1 };
        // Under a steady random load every marked region was written in
        // the generation just ended: nothing could be cleared, and the
        // flush would only force the page cache's writeback now, on this
        // thread, rather than when the kernel finds it best.
        if !v.dirty.has_idle_marked(generation, min_idle) {
            return Ok(());
        }
        v.device
            .flush()
            .map_err(|e| Error::io("flush production volume", v.device.path(), e))?;
        // Held until cleaned: a write that settles meanwhile has its
        // records reaped first, or is not cleaned (see `Inner::reap`).
        let mut pending = v.pending.lock();
        let durable = self.journal.history().newest_seq;
        self.reap(v, &mut pending, durable);
        v.dirty.clean(durable, generation, min_idle)?;
        Ok(())
    }

    fn maintain(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            {
                let (lock, cvar) = &self.wake;
                let mut woken = lock.lock();
                if !*woken {
                    cvar.wait_for(&mut woken, self.options.maintenance_interval);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // Bounded waits: close() joins this thread.
            let _ = self.round(false, Admission::WaitFor(self.options.sync_timeout));
        }
    }
}

/// `regions` of `v` for an operator: the volume, how many, and the byte
/// ranges they cover (the first few).
fn describe_regions(v: &Protected, regions: &[usize]) -> String {
    const SHOWN: usize = 8;
    let region_size = v.dirty.region_size();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &r in regions {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == r => *last = r,
            _ => ranges.push((r, r)),
        }
    }
    let mut shown: Vec<String> = ranges
        .iter()
        .take(SHOWN)
        .map(|&(first, last)| {
            let start = first as u64 * region_size;
            let end = ((last as u64 + 1) * region_size).min(v.info.size);
            format!("{start}..{end}")
        })
        .collect();
    if ranges.len() > SHOWN {
        shown.push(format!("and {} more ranges", ranges.len() - SHOWN));
    }
    format!(
        "volume {}: {} region{} of {region_size} bytes at bytes {}",
        v.info.name,
        regions.len(),
        if regions.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

/// The runs of 4 KiB blocks where `a` and `b` (of equal length) differ, as
/// byte ranges, each at most `max_run` bytes (a multiple of 4096; the last
/// block may be short).
fn differing_runs(a: &[u8], b: &[u8], max_run: usize) -> Vec<(usize, usize)> {
    let len = a.len();
    let differs = |at: usize| {
        let end = (at + 4096).min(len);
        a[at..end] != b[at..end]
    };
    let mut runs = Vec::new();
    let mut block = 0;
    while block < len {
        if !differs(block) {
            block += 4096;
            continue;
        }
        let start = block;
        while block < len && differs(block) && block - start + 4096 <= max_run {
            block += 4096;
        }
        runs.push((start, block.min(len)));
    }
    runs
}
