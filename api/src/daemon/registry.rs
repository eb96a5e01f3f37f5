//! The registry: every consistency group (one journal and write path
//! each), every volume, and the operations the API offers on them.
//!
//! Locking: `state` is held only to look things up or to change the set
//! of volumes; journal work happens on `Arc`s taken out of it, so one slow
//! operation never blocks the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tidemark_journal::fs::{Fs, RealFs};
use tidemark_journal::{
    Change, FileDevice, History, IoMode, Journal, JournalOptions, Point, RetentionPolicy, Seq,
    Timestamp, WritePath, WritePathOptions,
};

use super::catalog::{self, VolumeSpec};
use super::error::{ApiError, ApiResult};
use super::exports::{Export, Exports};
use crate::config::{parse_mode, Config};
use crate::point_spec::PointSpec;
use std::sync::OnceLock;
use tidemark_tagging::{Tag, TagBody, Tagger};

/// One consistency group: its journal and write path.
pub struct Group {
    /// The group's name.
    pub name: String,
    /// The write path (which owns the journal).
    pub write_path: WritePath,
    /// This site keeps the group as another site's replica: its journal
    /// is fed by the primary, and nothing here writes to it. Flips on a
    /// takeover (false) and a demotion (true).
    pub replica: std::sync::atomic::AtomicBool,
    /// Writes past the role check and not yet appended (see
    /// [`Group::writing`]).
    writes_in_flight: std::sync::atomic::AtomicUsize,
    /// What its sync writes wait for besides the journal: its replicas.
    pub gate: Arc<tidemark_replicator::GroupGate>,
    /// The failover witness, when one is configured: a primary writes
    /// only while it holds the group's lease there.
    pub witness: Arc<OnceLock<Arc<tidemark_failover::Witness>>>,
}

/// See [`Group::writing`].
#[derive(Debug)]
pub struct WritePass<'a>(&'a Group);

impl Drop for WritePass<'_> {
    fn drop(&mut self) {
        self.0.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("name", &self.name).finish()
    }
}

impl Group {
    /// False while a configured witness does not let this site write the
    /// group (its lease is lost or not held yet).
    pub fn witness_allows(&self) -> bool {
        self.witness.get().is_none_or(|w| w.allows(&self.name))
    }

    /// True while this site keeps the group as another site's replica.
    pub fn is_replica(&self) -> bool {
        self.replica.load(Ordering::SeqCst)
    }

    /// A write's pass: `None` when this site may not write the group (a
    /// replica here, or the witness's lease not held). While the pass
    /// lives the write is counted in flight, so [`Group::stop_writes`]
    /// waits for it: no write that passed the check lands after a role
    /// change has read the group's newest seq.
    pub fn writing(&self) -> Option<WritePass<'_>> {
        // Counted before the check (both SeqCst): either `stop_writes`
        // sees this write in flight, or this write sees the new role.
        self.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        let pass = WritePass(self);
        (!self.is_replica() && self.witness_allows()).then_some(pass)
    }

    /// Refuses writes from now on (the group becomes a replica here) and
    /// returns once every write that passed the check before has been
    /// appended. Blocks: call it where a thread may wait.
    pub fn stop_writes(&self) {
        self.replica.store(true, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let mut said = false;
        while self.writes_in_flight.load(Ordering::SeqCst) > 0 {
            if !said && started.elapsed() > std::time::Duration::from_secs(1) {
                tracing::info!(group = %self.name, "waiting for writes in flight before the role changes");
                said = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// True while the group is a replica that still follows a primary:
    /// a copy the primary let go (`replica remove`) has source id 0,
    /// follows no one and is never watched for the primary's failure.
    pub fn follows_a_primary(&self) -> bool {
        self.is_replica() && self.journal().source_id() != 0
    }

    /// The group's journal.
    pub fn journal(&self) -> &Journal {
        self.write_path.journal()
    }

    /// `primary` or `replica`.
    pub fn role(&self) -> &'static str {
        if self.is_replica() {
            "replica"
        } else {
            "primary"
        }
    }
}

/// One protected volume.
#[derive(Debug)]
pub struct Volume {
    /// As created (mode as last set).
    pub spec: Mutex<VolumeSpec>,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its group.
    pub group: Arc<Group>,
    /// Clients connected to the live export (NBD or Ingest).
    pub writers: AtomicU32,
    /// The tagger, once running: it watches this volume's writes.
    pub tagger: Arc<OnceLock<Arc<Tagger>>>,
    /// A rollback in progress: bytes rewritten so far and in all.
    pub rollback_progress: Mutex<Option<(u64, u64)>>,
}

impl Volume {
    /// The journal holding its history.
    pub fn journal(&self) -> &Journal {
        self.group.journal()
    }

    /// True if this site keeps the volume as another site's replica.
    pub fn is_replica(&self) -> bool {
        self.group.is_replica()
    }

    /// Why this site may not write the volume now (its group's
    /// [`Group::writing`] gave no pass): demoted, or the witness's lease
    /// is not held.
    pub fn write_refusal(&self) -> String {
        if self.is_replica() {
            format!(
                "volume {} was demoted on this site: another site took over as its primary",
                self.name
            )
        } else {
            format!(
                "volume {}: this site does not hold the witness's lease for group {}; writes wait until it does",
                self.name, self.group.name
            )
        }
    }

    /// Refuses a change on a replica: the primary makes them, and they
    /// travel here.
    pub fn refuse_on_replica(&self, what: &str) -> ApiResult<()> {
        if self.is_replica() {
            return Err(ApiError::Invalid(format!(
                "volume {} is a replica on this site: {what} on the primary site (it travels here)",
                self.name
            )));
        }
        Ok(())
    }

    /// Its journal volume id.
    pub fn id(&self) -> ApiResult<u32> {
        Ok(self.journal().volume(&self.name)?.id)
    }

    /// The retained history of its group.
    pub fn history(&self) -> History {
        self.journal().history()
    }

    /// Records a timeline event on this volume and waits (up to `timeout`)
    /// until it is durable.
    pub fn record_event(&self, name: &str, body: &str, timeout: Duration) -> ApiResult<Seq> {
        // A replica's journal holds the primary's records and nothing else.
        self.refuse_on_replica("events are recorded")?;
        let mark = tidemark_journal::Mark::Event {
            name,
            body: body.as_bytes(),
        };
        let handle = self.journal().append(self.id()?, Change::Mark(mark))?;
        Ok(handle.wait_timeout(timeout)?.seq)
    }

    /// Shows an acknowledged write of `len` bytes at `offset` to anomaly
    /// detection (once the tagger runs).
    pub fn observe_write(&self, offset: u64, len: u64, ack: &tidemark_journal::Acknowledged) {
        let stored = ack.stored_bytes;
        self.observe(
            offset,
            len,
            ack,
            tidemark_tagging::anomaly::Content::Data { stored },
        );
    }

    /// Shows an acknowledged trim or zeroing to anomaly detection: a
    /// filesystem with online discard frees a deleted file's blocks so, and
    /// encrypted copies written while the originals are freed are a
    /// ransomware pattern.
    pub fn observe_free(&self, offset: u64, len: u64, ack: &tidemark_journal::Acknowledged) {
        self.observe(offset, len, ack, tidemark_tagging::anomaly::Content::Freed);
    }

    fn observe(
        &self,
        offset: u64,
        len: u64,
        ack: &tidemark_journal::Acknowledged,
        content: tidemark_tagging::anomaly::Content,
    ) {
        if let Some(tagger) = self.tagger.get() {
            tagger.observe_write(&tidemark_tagging::anomaly::ObservedWrite {
                volume: &self.name,
                volume_size: self.size,
                seq: ack.seq,
                offset,
                len,
                content,
            });
        }
    }
}

/// Counts a writer (NBD client of the live export, Ingest stream) for as
/// long as it lives.
#[derive(Debug)]
pub struct WriterGuard(Arc<Volume>);

impl WriterGuard {
    /// Counts a writer of `volume`.
    pub fn new(volume: Arc<Volume>) -> Self {
        volume.writers.fetch_add(1, Ordering::SeqCst);
        WriterGuard(volume)
    }

    /// The volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.0
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct State {
    groups: BTreeMap<String, Arc<Group>>,
    volumes: BTreeMap<String, Arc<Volume>>,
}

/// Every group and volume of one daemon.
#[derive(Debug)]
pub struct Registry {
    config: Config,
    catalog_path: PathBuf,
    state: RwLock<State>,
    /// Serialises changes to the set of volumes (create, delete) and to
    /// the catalogue.
    changes: Mutex<()>,
    /// Point-in-time and overlay exports.
    pub exports: Exports,
    /// The tagger, once running (shared with every volume).
    pub tagger: Arc<OnceLock<Arc<Tagger>>>,
    /// Where groups replicate to, and the streams of groups replicated here.
    pub replication: super::replication::Replication,
    /// The watch over primaries, takeovers and demotions.
    pub failover: super::failover::Failover,
    /// The archive, when `[archive]` names one.
    pub archive: OnceLock<Arc<super::archive::ArchiveHost>>,
    /// The monitoring cache's bounds, shared by every group: a thousand
    /// groups share `memory_cache` and `file_cache`, they do not each get
    /// them.
    cache_budget: tidemark_journal::CacheBudget,
}

impl Registry {
    /// The monitoring cache's bounds, shared by every group.
    pub fn cache_budget(&self) -> &tidemark_journal::CacheBudget {
        &self.cache_budget
    }

    /// Opens the data directory: every group in the catalogue is recovered
    /// and every volume attached again (resyncing what a crash left dirty).
    pub fn open(config: Config) -> ApiResult<Arc<Registry>> {
        let dir = &config.data_dir;
        for sub in ["groups", "volumes", "overlays"] {
            let path = dir.join(sub);
            // Durably: journals and production files live in these.
            tidemark_journal::fs::create_dir_all_durably(&RealFs, &path).map_err(|e| {
                ApiError::Failed(format!("cannot create directory {}: {e}", path.display()))
            })?;
        }
        let catalog_path = dir.join("volumes.json");
        let specs = catalog::load(&RealFs, &catalog_path)?;
        let replication = super::replication::Replication::load(dir, config.replication.clone())?;
        let failover = super::failover::Failover::new(config.failover.clone());
        let registry = Arc::new(Registry {
            replication,
            failover,
            exports: Exports::new(dir.join("overlays")),
            tagger: Arc::new(OnceLock::new()),
            archive: OnceLock::new(),
            cache_budget: tidemark_journal::CacheBudget::new(
                config.memory_cache,
                config.file_cache,
            ),
            catalog_path,
            state: RwLock::new(State::default()),
            changes: Mutex::new(()),
            config,
        });
        for spec in specs {
            let group = registry.group_as(&spec.group, spec.is_replica())?;
            let volume = registry.attach(&group, spec)?;
            registry
                .state
                .write()
                .volumes
                .insert(volume.name.clone(), volume);
        }
        Ok(registry)
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn group_dir(&self, group: &str) -> PathBuf {
        self.config.data_dir.join("groups").join(group)
    }

    /// The group `name`, opening (or creating) its journal if needed.
    fn group(&self, name: &str) -> ApiResult<Arc<Group>> {
        self.group_as(name, false)
    }

    /// The group `name` in role replica (`replica`) or primary, opening
    /// (or creating) its journal if needed; a group already open in the
    /// other role is refused.
    pub(crate) fn group_as(&self, name: &str, replica: bool) -> ApiResult<Arc<Group>> {
        if let Some(group) = self.state.read().groups.get(name) {
            if group.is_replica() != replica {
                return Err(ApiError::Exists(format!(
                    "group {name} is a {} on this site",
                    group.role()
                )));
            }
            return Ok(group.clone());
        }
        tidemark_journal::volume::validate_volume_name(name)
            .map_err(|e| ApiError::Invalid(e.replace("volume name", "group name")))?;
        let c = &self.config;
        let options = JournalOptions {
            group: name.to_string(),
            segment_size: c.segment_size,
            max_record_len: c.max_record,
            memory_cache_bytes: c.memory_cache,
            file_cache_bytes: c.file_cache,
            shared_cache: Some(self.cache_budget.clone()),
            // A replica's records arrive already durable on the primary and
            // wait in memory: no file cache to allocate.
            cache_tiers: if replica {
                tidemark_journal::CacheTiers::Memory
            } else {
                c.cache_tiers
            },
            // Start-up in seconds however much journal there is; sealed
            // segments are checked in the background.
            trust_sealed: true,
            ..JournalOptions::default()
        };
        let dir = self.group_dir(name);
        let (journal, report) = Journal::open(&dir, options)?;
        tracing::info!(group = name, dir = %dir.display(), ?report, "journal open");
        // Views of an earlier run are gone; so must be their holds.
        let holds = journal.holds();
        for hold in holds.keys() {
            if hold.starts_with(super::exports::HOLD_PREFIX) {
                journal.release_hold(hold)?;
            }
        }
        // With an archive, retention must keep what it has not taken from
        // the very first record on — before its archiver's first round.
        // Without one, an old archive hold would keep everything forever.
        let archive_hold = tidemark_replicator::archive::archiver::HOLD;
        match (c.archive.is_some(), holds.contains_key(archive_hold)) {
            (true, false) => journal.set_hold(archive_hold, journal.history().horizon_seq)?,
            (false, true) => journal.release_hold(archive_hold)?,
            _ => {}
        }
        let write_path = WritePath::new(
            journal,
            WritePathOptions {
                sync_timeout: c.sync_timeout,
                ..WritePathOptions::default()
            },
        )?;
        let gate = tidemark_replicator::GroupGate::new();
        write_path.set_replica_gate(Some(gate.clone()));
        let group = Arc::new(Group {
            name: name.to_string(),
            write_path,
            replica: std::sync::atomic::AtomicBool::new(replica),
            writes_in_flight: std::sync::atomic::AtomicUsize::new(0),
            gate,
            witness: self.failover.witness.clone(),
        });
        self.state
            .write()
            .groups
            .insert(name.to_string(), group.clone());
        Ok(group)
    }

    /// Attaches the production volume of `spec` to its group.
    fn attach(&self, group: &Arc<Group>, spec: VolumeSpec) -> ApiResult<Arc<Volume>> {
        // A replica has no production volume: the journal is the replica.
        if !spec.is_replica() {
            self.attach_device(group, &spec)?;
        }
        Ok(Arc::new(Volume {
            name: spec.name.clone(),
            size: spec.size,
            group: group.clone(),
            spec: Mutex::new(spec),
            writers: AtomicU32::new(0),
            tagger: self.tagger.clone(),
            rollback_progress: Mutex::new(None),
        }))
    }

    /// Opens the production device of `spec` and puts it in `group`'s
    /// write path.
    pub(crate) fn attach_device(&self, group: &Arc<Group>, spec: &VolumeSpec) -> ApiResult<()> {
        let mode = parse_mode(&spec.mode).map_err(ApiError::Invalid)?;
        let device = FileDevice::open(&spec.backing, spec.size).map_err(|e| {
            ApiError::Failed(format!(
                "volume {}: cannot open production volume {}: {e}",
                spec.name,
                spec.backing.display()
            ))
        })?;
        let report = group
            .write_path
            .attach(&spec.name, Arc::new(device), mode)?;
        if !report.regions.is_empty() {
            tracing::warn!(volume = %spec.name, regions = report.regions.len(), bytes = report.bytes, "resynced regions a crash left unjournalled");
        }
        Ok(())
    }

    /// The open group `name`.
    pub fn group_by_name(&self, name: &str) -> ApiResult<Arc<Group>> {
        self.state
            .read()
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no consistency group {name:?} here")))
    }

    /// Serialises changes to the set of volumes.
    pub(crate) fn changes_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.changes.lock()
    }

    /// Adds volume `spec` of `group` (attached as its role says).
    pub(crate) fn insert_volume(
        &self,
        group: &Arc<Group>,
        spec: VolumeSpec,
    ) -> ApiResult<Arc<Volume>> {
        let name = spec.name.clone();
        let volume = self.attach(group, spec)?;
        self.state.write().volumes.insert(name, volume.clone());
        Ok(volume)
    }

    /// Stores the catalogue as the volumes are now.
    pub(crate) fn persist_catalog(&self) -> ApiResult<()> {
        self.store_catalog()
    }

    fn store_catalog(&self) -> ApiResult<()> {
        let specs: Vec<VolumeSpec> = self
            .state
            .read()
            .volumes
            .values()
            .map(|v| v.spec.lock().clone())
            .collect();
        catalog::store(&RealFs, &self.catalog_path, &specs)
    }

    /// The volume `name`.
    pub fn volume(&self, name: &str) -> ApiResult<Arc<Volume>> {
        self.state.read().volumes.get(name).cloned().ok_or_else(|| {
            let known: Vec<String> = self.state.read().volumes.keys().cloned().collect();
            ApiError::NotFound(if known.is_empty() {
                format!("unknown volume {name:?}: no volumes exist yet")
            } else {
                format!("unknown volume {name:?}; volumes: {}", known.join(", "))
            })
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.state.read().volumes.values().cloned().collect()
    }

    /// Every group, by name.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.state.read().groups.values().cloned().collect()
    }

    /// Creates and protects a volume. Without `backing` the production
    /// volume is a sparse file in the data directory; with one that
    /// already holds data, that data is journalled first (the initial
    /// sync) so every point reads what the volume really held.
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        backing: Option<&Path>,
        mode: Option<&str>,
        group: Option<&str>,
    ) -> ApiResult<Arc<Volume>> {
        tidemark_journal::volume::validate_volume_name(name).map_err(ApiError::Invalid)?;
        if size == 0 || size % 512 != 0 {
            return Err(ApiError::Invalid(format!(
                "volume {name}: size {size} must be a non-zero multiple of 512 bytes"
            )));
        }
        let mode = match mode {
            Some(m) if !m.is_empty() => parse_mode(m).map_err(ApiError::Invalid)?,
            _ => self.config.default_mode,
        };
        let _changes = self.changes.lock();
        if self.state.read().volumes.contains_key(name) {
            return Err(ApiError::Exists(format!("volume {name:?} already exists")));
        }
        let group_name = group.filter(|g| !g.is_empty()).unwrap_or(name);
        let (backing, owns_backing) = match backing {
            Some(path) => {
                let path = std::path::absolute(path).map_err(|e| {
                    ApiError::Invalid(format!("backing path {}: {e}", path.display()))
                })?;
                (path, false)
            }
            None => (
                self.config
                    .data_dir
                    .join("volumes")
                    .join(format!("{name}.img")),
                true,
            ),
        };
        if owns_backing && backing.exists() {
            std::fs::remove_file(&backing).map_err(|e| {
                ApiError::Failed(format!(
                    "cannot remove stale production volume {}: {e}",
                    backing.display()
                ))
            })?;
        }
        let holds_data =
            !owns_backing && std::fs::metadata(&backing).is_ok_and(|m| m.len() > 0 || !m.is_file());
        if !owns_backing {
            // Before anything is journalled: a production volume that is
            // too small (or cannot be opened) refuses the volume cleanly.
            FileDevice::open(&backing, size).map_err(|e| {
                ApiError::Invalid(format!(
                    "volume {name}: cannot use {} as its production volume: {e}",
                    backing.display()
                ))
            })?;
        }
        let group = self.group(group_name)?;
        let journal = group.journal();
        match journal.volume(name) {
            Ok(existing) if existing.size == size => {}
            Ok(existing) => {
                return Err(ApiError::Exists(format!(
                    "group {group_name} already journals a volume {name:?} of {} bytes (deleted, history kept); \
                     choose another name or the same size",
                    existing.size
                )))
            }
            Err(_) => {
                journal.create_volume(name, size)?;
            }
        }
        let spec = VolumeSpec {
            name: name.to_string(),
            size,
            group: group_name.to_string(),
            backing,
            owns_backing,
            mode: mode.to_string(),
            role: "primary".into(),
        };
        let volume = self.attach(&group, spec)?;
        if holds_data {
            super::initial_sync::run(&volume, self.config.sync_timeout)?;
        }
        self.state
            .write()
            .volumes
            .insert(name.to_string(), volume.clone());
        if let Err(e) = self.store_catalog() {
            self.state.write().volumes.remove(name);
            let _ = group.write_path.detach(name);
            return Err(e);
        }
        tracing::info!(volume = name, size, group = group_name, %mode, "volume created");
        Ok(volume)
    }

    /// Changes a volume's IO mode (persistently).
    pub fn set_mode(&self, name: &str, mode: &str) -> ApiResult<Arc<Volume>> {
        let mode = parse_mode(mode).map_err(ApiError::Invalid)?;
        let _changes = self.changes.lock();
        let volume = self.volume(name)?;
        volume.refuse_on_replica("its IO mode is set")?;
        volume.group.write_path.set_mode(name, mode)?;
        volume.spec.lock().mode = mode.to_string();
        self.store_catalog()?;
        tracing::info!(volume = name, %mode, "mode set");
        Ok(volume)
    }

    /// The configured and the current mode of a volume.
    pub fn mode(&self, volume: &Volume) -> (IoMode, IoMode) {
        volume
            .group
            .write_path
            .mode(&volume.name)
            .unwrap_or((IoMode::Sync, IoMode::Sync))
    }

    /// Deletes a volume: it stops being served and protected; a group left
    /// without volumes is deleted with its journal.
    pub fn delete_volume(&self, name: &str) -> ApiResult<()> {
        let _changes = self.changes.lock();
        let volume = self.volume(name)?;
        let writers = volume.writers.load(Ordering::SeqCst);
        if writers > 0 {
            return Err(ApiError::Busy(format!(
                "volume {name} has {writers} client(s) writing to it; disconnect them first"
            )));
        }
        let exports = self.exports.of_volume(name);
        if !exports.is_empty() {
            return Err(ApiError::Busy(format!(
                "volume {name} is exported as {}; unexport first",
                exports.join(", ")
            )));
        }
        if !volume.is_replica() {
            volume.group.write_path.detach(name)?;
        }
        self.state.write().volumes.remove(name);
        self.store_catalog()?;
        let spec = volume.spec.lock().clone();
        if spec.owns_backing {
            let _ = std::fs::remove_file(&spec.backing);
        }
        let group_empty = !self
            .state
            .read()
            .volumes
            .values()
            .any(|v| Arc::ptr_eq(&v.group, &volume.group));
        if group_empty {
            let group = self.state.write().groups.remove(&spec.group);
            drop(volume);
            if let Some(group) = group {
                group.write_path.close()?;
                match Arc::try_unwrap(group) {
                    Ok(group) => {
                        drop(group);
                        let dir = self.group_dir(&spec.group);
                        std::fs::remove_dir_all(&dir)
                            .and_then(|()| RealFs.sync_dir(&self.config.data_dir.join("groups")))
                            .map_err(|e| {
                            ApiError::Failed(format!(
                                "volume {name} deleted, but its journal {} could not be removed: {e}",
                                dir.display()
                            ))
                        })?;
                    }
                    Err(_) => {
                        tracing::warn!(group = %spec.group, "group still in use; its journal is kept")
                    }
                }
            }
        }
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Resolves a point of `volume` to a seq within the retained history.
    pub fn resolve(&self, volume: &Volume, spec: &PointSpec) -> ApiResult<Seq> {
        let journal = volume.journal();
        let name = &volume.name;
        let history = journal.history();
        let in_history = |seq: Seq, what: &str| {
            if seq < history.horizon_seq || seq > history.newest_seq {
                Err(ApiError::OutOfRange(format!(
                    "volume {name}: {what} (seq {seq}) is outside the retained history; available: {history}"
                )))
            } else {
                Ok(seq)
            }
        };
        match spec {
            PointSpec::Latest => Ok(journal.resolve(name, Point::Latest)?),
            PointSpec::Seq(seq) => Ok(journal.resolve(name, Point::Seq(*seq))?),
            PointSpec::Time(at) => Ok(journal.resolve(name, Point::Time(*at))?),
            PointSpec::Ago(ago) => {
                let ago = i64::try_from(ago.as_nanos()).unwrap_or(i64::MAX);
                let at = Timestamp::from_nanos(Timestamp::now().as_nanos().saturating_sub(ago));
                Ok(journal.resolve(name, Point::Time(at))?)
            }
            PointSpec::Tag(tag) => {
                let tag = self.tag(volume, tag)?;
                in_history(tag.seq, &format!("tag {}", tag.name))
            }
            PointSpec::Before(tag) => {
                let tag = self.tag(volume, tag)?;
                in_history(
                    tag.seq.saturating_sub(1),
                    &format!("the point before tag {}", tag.name),
                )
            }
            PointSpec::LastVerified => {
                let tag = self
                    .tags(volume)?
                    .into_iter()
                    .rev()
                    .find(|t| t.body.verified == tidemark_tagging::Verified::Passed)
                    .ok_or_else(|| {
                        ApiError::NotFound(format!(
                            "volume {name} has no tag whose verification passed"
                        ))
                    })?;
                in_history(tag.seq, &format!("tag {}", tag.name))
            }
        }
    }

    /// Every tag of `volume`, oldest first.
    pub fn tags(&self, volume: &Volume) -> ApiResult<Vec<Tag>> {
        let mut tags: Vec<Tag> = volume
            .journal()
            .tags(volume.id()?)?
            .into_iter()
            .map(Tag::from)
            .collect();
        tags.sort_by_key(|t| (t.seq, t.mark_seq));
        Ok(tags)
    }

    /// Tag `name` of `volume`.
    pub fn tag(&self, volume: &Volume, name: &str) -> ApiResult<Tag> {
        match volume.journal().tag(volume.id()?, name)? {
            Some(tag) => Ok(Tag::from(tag)),
            None => {
                let known: Vec<String> = self.tags(volume)?.into_iter().map(|t| t.name).collect();
                Err(ApiError::NotFound(if known.is_empty() {
                    format!(
                        "volume {} has no tag named {name:?} (it has no tags)",
                        volume.name
                    )
                } else {
                    format!(
                        "volume {} has no tag named {name:?}; tags: {}",
                        volume.name,
                        known.join(", ")
                    )
                }))
            }
        }
    }

    /// Sets a tag after a flush, so it marks a crash-consistent point.
    pub fn create_tag(&self, volume: &Volume, name: &str, body: TagBody) -> ApiResult<Tag> {
        volume.refuse_on_replica("tags are set")?;
        if name.is_empty() || name.len() > 256 || name.chars().any(|c| c.is_control()) {
            return Err(ApiError::Invalid(format!(
                "tag name {name:?} must be 1 to 256 printable characters"
            )));
        }
        if let Some(existing) = volume.journal().tag(volume.id()?, name)? {
            return Err(ApiError::Exists(format!(
                "volume {} already has a tag named {name:?} (seq {}); delete it first",
                volume.name,
                Tag::from(existing).seq
            )));
        }
        volume.group.write_path.flush(&volume.name)?;
        let handle = volume
            .journal()
            .set_tag(volume.id()?, name, &body.encode())?;
        let appended = handle.wait_timeout(self.config.sync_timeout)?;
        tracing::info!(volume = %volume.name, tag = name, seq = appended.seq, "tag created");
        self.tag(volume, name)
    }

    /// Sets (or replaces) tag `name` for the earlier point `seq`: the mark
    /// record is new, the point it names is `seq`.
    pub fn tag_at(
        &self,
        volume: &Volume,
        name: &str,
        seq: Seq,
        mut body: TagBody,
    ) -> ApiResult<Tag> {
        volume.refuse_on_replica("tags are set")?;
        let history = volume.history();
        if seq < history.horizon_seq || seq > history.newest_seq {
            return Err(ApiError::OutOfRange(format!(
                "volume {}: seq {seq} is outside the retained history; available: {history}",
                volume.name
            )));
        }
        body.point = Some(seq);
        let handle = volume
            .journal()
            .set_tag(volume.id()?, name, &body.encode())?;
        handle.wait_timeout(self.config.sync_timeout)?;
        self.tag(volume, name)
    }

    /// The newest flush point of `volume` before `seq`, and its time.
    pub fn last_flush_before(
        &self,
        volume: &Volume,
        seq: Seq,
    ) -> ApiResult<Option<(Seq, Timestamp)>> {
        let horizon = volume.history().horizon_seq;
        if seq <= horizon + 1 {
            return Ok(None);
        }
        let events = volume.journal().events(volume.id()?, horizon, seq - 1)?;
        Ok(events
            .iter()
            .rev()
            .find(|e| e.kind == tidemark_journal::RecordKind::Flush)
            .map(|e| (e.seq, e.time)))
    }

    /// Deletes a tag.
    pub fn delete_tag(&self, volume: &Volume, name: &str) -> ApiResult<()> {
        volume.refuse_on_replica("tags are deleted")?;
        self.tag(volume, name)?;
        let handle = volume.journal().delete_tag(volume.id()?, name)?;
        handle.wait_timeout(self.config.sync_timeout)?;
        Ok(())
    }

    /// One retention round over every group.
    pub fn apply_retention(&self) {
        let policy = RetentionPolicy {
            max_age: self.config.retention_max_age,
            max_bytes: self.config.retention_max_bytes,
        };
        if policy.max_age.is_none() && policy.max_bytes.is_none() {
            return;
        }
        for group in self.groups() {
            match group.journal().apply_retention(&policy, false) {
                Ok(report) if report.new_horizon != report.old_horizon => {
                    tracing::info!(group = %group.name, from = report.old_horizon, to = report.new_horizon, "retention moved the horizon")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(group = %group.name, error = %e, "retention failed"),
            }
        }
    }

    /// Flushes and closes every group, each within a bounded time (see
    /// `WritePath::close`). Returns what could not be made durable, one
    /// sentence per group; empty when everything acknowledged is durable
    /// in the journal.
    pub fn shutdown(&self) -> Vec<String> {
        self.exports.clear();
        let groups: Vec<Arc<Group>> = {
            let mut state = self.state.write();
            state.volumes.clear();
            std::mem::take(&mut state.groups).into_values().collect()
        };
        // All at once, each on a thread of its own: a stop takes as long
        // as the slowest group (each close is bounded by `sync_timeout`),
        // not their sum, and ends by a deadline whatever the disks do.
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut closing = std::collections::BTreeMap::new();
        let mut problems = Vec::new();
        for group in groups {
            let done_tx = done_tx.clone();
            let name = group.name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("close {name}"))
                .spawn(move || {
                    let name = group.name.clone();
                    let outcome = group.write_path.close();
                    // This thread's hold on the journal goes before it
                    // reports (the last one, unless a request still holds
                    // the group), so RocksDB is not closing here while the
                    // process exits.
                    drop(group);
                    let _ = done_tx.send((name, outcome));
                });
            match spawned {
                Ok(thread) => {
                    closing.insert(name, thread);
                }
                Err(e) => problems.push(format!("group {name}: cannot start closing it: {e}")),
            }
        }
        // (Only the threads hold senders now: a thread that panicked
        // ends the wait rather than running out the deadline.)
        drop(done_tx);
        let allowed = self.sync_timeout() * 3 + Duration::from_secs(10);
        let deadline = std::time::Instant::now() + allowed;
        let mut timed_out = false;
        while !closing.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match done.recv_timeout(left) {
                Ok((name, outcome)) => {
                    if let Some(thread) = closing.remove(&name) {
                        let _ = thread.join();
                    }
                    if let Err(e) = outcome {
                        tracing::error!(group = %name, error = %e, "group did not close cleanly");
                        problems.push(format!("group {name}: {e}"));
                    }
                }
                Err(e) => {
                    timed_out = e == std::sync::mpsc::RecvTimeoutError::Timeout;
                    break;
                }
            }
        }
        for name in closing.into_keys() {
            if !timed_out {
                tracing::error!(group = %name, "closing the group failed (its thread panicked)");
                problems.push(format!(
                    "group {name}: closing it failed; what it acknowledged may not all be durable in its journal"
                ));
                continue;
            }
            tracing::error!(group = %name, ?allowed, "group still closing at the shutdown deadline");
            problems.push(format!(
                "group {name}: still closing after {allowed:?} (a disk that does not answer?); what it acknowledged may not all be durable in its journal"
            ));
        }
        problems
    }

    /// The export an NBD client asks for: a named export, `NAME@POINT`
    /// (a view made for this client), or the live volume `NAME`.
    pub fn open_export(&self, name: &str) -> ApiResult<Arc<Export>> {
        if let Some(export) = self.exports.get(name) {
            return Ok(export);
        }
        match name.split_once('@') {
            Some((volume, point)) => {
                let spec = PointSpec::parse(point).map_err(ApiError::Invalid)?;
                let volume = match (self.volume(volume), self.archive.get()) {
                    (Ok(volume), _) => volume,
                    // A volume this site does not hold: from the archive.
                    (Err(ApiError::NotFound(_)), Some(archive)) => {
                        let view = archive.open_view(volume, &spec)?;
                        return Ok(Export::archived(name, view));
                    }
                    (Err(e), _) => return Err(e),
                };
                let seq = self.resolve(&volume, &spec)?;
                self.exports.transient(name, volume, seq)
            }
            None => Ok(Export::live(self.volume(name)?)),
        }
    }

    /// Every export name a client may list: live volumes and named exports.
    pub fn export_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.volumes().iter().map(|v| v.name.clone()).collect();
        names.extend(self.exports.list().iter().map(|e| e.name.clone()));
        names
    }

    /// How long the daemon waits for a sync write.
    pub fn sync_timeout(&self) -> Duration {
        self.config.sync_timeout
    }
}
