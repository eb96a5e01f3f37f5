//! The archiver: one task per consistency group on its primary site, which
//! uploads the journal to the archive as it seals, a base version now and
//! then, and keeps the bucket within `keep`.
//!
//! Order of one upload: the segment object, then the index that lists it,
//! then the local retention hold moves past it — so the index never names
//! an object that is not whole in the bucket, and the journal never folds
//! away what the archive lacks. A store that is down costs retries with
//! backoff, never a stalled write: the hold keeps the history locally until
//! the journal behind it passes `max_lag`; then the hold becomes
//! expendable, retention records a gap on the timeline, and the archive
//! resumes from a new base version with the gap in its index.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_journal::{Journal, Mark, Point, RawCursor, RecordKind, Timestamp};
use tokio::task::JoinHandle;

use super::catalog::Catalog;
use super::error::{ArchiveError, Result};
use super::index::{
    BaseEntry, BaseManifest, BaseVolume, EpochEntry, GapEntry, GroupIndex, SegmentEntry, TagEntry,
    VolumeEntry, BASE_FORMAT, INDEX_FORMAT,
};
use super::layout::{self, MapEntry, SegmentHeader, CHUNK_SIZE};
use super::store::ObjectStore;

/// The journal hold the archiver keeps.
pub const HOLD: &str = "archive";

/// How the archiver behaves (`[archive]` in the configuration).
#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    /// Delete what only points older than this need (None: keep all).
    pub keep: Option<Duration>,
    /// Upload records of a segment that has not sealed yet once the
    /// oldest of them is this old (bounds how far the archive trails).
    pub upload_after: Duration,
    /// Make a new base version at most this often (after the journal's
    /// horizon has moved), so old segments can be deleted.
    pub base_every: Duration,
    /// Journal bytes not yet archived after which the hold gives way.
    pub max_lag_bytes: u64,
    /// Largest segment object.
    pub object_bytes: usize,
    /// How often an idle archiver looks for new records.
    pub poll: Duration,
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            keep: None,
            upload_after: Duration::from_secs(30),
            base_every: Duration::from_secs(3600),
            max_lag_bytes: 16 << 30,
            object_bytes: 64 << 20,
            poll: Duration::from_secs(1),
        }
    }
}

/// Where a group's archive stands.
#[derive(Clone, Debug, Default)]
pub struct ArchiveStatus {
    /// The group.
    pub group: String,
    /// True while this site archives the group (it is the primary).
    pub active: bool,
    /// Every record up to this seq is in the archive.
    pub archived_seq: u64,
    /// Its time.
    pub archived_time: Option<Timestamp>,
    /// Time between the newest record here and the newest archived.
    pub lag_seconds: f64,
    /// Bytes in the archive for the group (chunks counted once).
    pub bytes: u64,
    /// Objects in the archive for the group.
    pub objects: u64,
    /// The last failure, until an upload succeeds.
    pub last_error: Option<String>,
    /// Objects uploaded by this process.
    pub uploads: u64,
    /// Failed rounds so far.
    pub errors: u64,
    /// Windows the archive lacks.
    pub gaps: u64,
    /// The seq of the newest base version (a view or restore of a point
    /// after it needs only the segments from there).
    pub base_seq: u64,
    /// Bytes of volume data read to make base versions, by this process:
    /// after the first, only the chunks records touched since the last.
    pub base_read_bytes: u64,
}

/// Says whether this site is the group's primary now.
pub type IsPrimary = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Debug)]
struct Shared {
    group: String,
    journal: Journal,
    store: Arc<dyn ObjectStore>,
    settings: ArchiveSettings,
    status: Mutex<ArchiveStatus>,
    stopping: AtomicBool,
    wake: tokio::sync::Notify,
}

/// A running archiver; stops when dropped.
#[derive(Debug)]
pub struct Archiver {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// A base version's chunks per volume id: the volume's size and its
/// chunks' names (`None`: all zeros).
type BaseChunks = HashMap<u32, (u64, Vec<Option<String>>)>;

/// What the task keeps between rounds.
struct State {
    index: Option<GroupIndex>,
    chunks: HashSet<String>,
    /// The newest base version this process made, so the next reads only
    /// the chunks records touched since: its seq and each volume's size
    /// and chunks.
    last_manifest: Option<(u64, BaseChunks)>,
    /// Per volume, the chunks records uploaded since `last_manifest`
    /// touched.
    touched: HashMap<u32, HashSet<u64>>,
    cursor: Option<RawCursor>,
    last_base: Instant,
    last_retention: Option<Instant>,
    last_follow: Option<Instant>,
    expendable: bool,
}

fn blocking_failed(e: tokio::task::JoinError) -> ArchiveError {
    ArchiveError::Invalid(format!("archive task failed: {e}"))
}

impl Archiver {
    /// Starts archiving `group` of `journal` to `store` while `is_primary`.
    pub fn start(
        group: &str,
        journal: Journal,
        store: Arc<dyn ObjectStore>,
        settings: ArchiveSettings,
        is_primary: IsPrimary,
    ) -> Archiver {
        let shared = Arc::new(Shared {
            group: group.to_string(),
            journal,
            store,
            settings,
            status: Mutex::new(ArchiveStatus {
                group: group.to_string(),
                ..ArchiveStatus::default()
            }),
            stopping: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(run(shared.clone(), is_primary));
        Archiver { shared, task }
    }

    /// The group's archive status, as of now.
    pub fn status(&self) -> ArchiveStatus {
        let mut status = self.shared.status.lock().clone();
        let history = self.shared.journal.history();
        status.lag_seconds = match status.archived_time {
            Some(at) if status.archived_seq < history.newest_seq => {
                (history.newest_time.as_nanos() - at.as_nanos()).max(0) as f64 / 1e9
            }
            Some(_) => 0.0,
            None => {
                (history.newest_time.as_nanos() - history.horizon_time.as_nanos()).max(0) as f64
                    / 1e9
            }
        };
        status
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.shared.store
    }

    /// Asks for a round now (tests, shutdown).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Stops the task (an upload in flight is abandoned; the index never
    /// names it).
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn run(shared: Arc<Shared>, is_primary: IsPrimary) {
    let mut state = State {
        index: None,
        chunks: HashSet::new(),
        last_manifest: None,
        touched: HashMap::new(),
        cursor: None,
        last_base: Instant::now(),
        last_retention: None,
        last_follow: None,
        expendable: false,
    };
    let mut backoff = Duration::from_secs(1);
    while !shared.stopping.load(Ordering::SeqCst) {
        if !is_primary() {
            // A replica does not archive; whoever is primary does. Forget
            // the index: a takeover starts from the bucket's newest. Until
            // then the hold follows what the primary has archived, so this
            // journal keeps what a takeover would have to archive next.
            state.index = None;
            state.cursor = None;
            shared.status.lock().active = false;
            if state.last_follow.is_none_or(|t| t.elapsed() >= FOLLOW) {
                state.last_follow = Some(Instant::now());
                if let Err(e) = follow(&shared).await {
                    tracing::debug!(group = %shared.group, error = %e, "cannot read the primary's archive index");
                }
                let _ = limit_lag(&shared, &mut state);
            }
            let _ = tokio::time::timeout(shared.settings.poll, shared.wake.notified()).await;
            continue;
        }
        shared.status.lock().active = true;
        let result = round(&shared, &mut state).await;
        // Also (above all) while the store is down.
        if let Err(e) = limit_lag(&shared, &mut state) {
            tracing::warn!(group = %shared.group, error = %e, "cannot set the archive hold's limit");
        }
        match result {
            Ok(more) => {
                backoff = Duration::from_secs(1);
                shared.status.lock().last_error = None;
                if !more {
                    let _ =
                        tokio::time::timeout(shared.settings.poll, shared.wake.notified()).await;
                }
            }
            Err(e) => {
                tracing::warn!(group = %shared.group, error = %e, "archive round failed; retrying");
                {
                    let mut status = shared.status.lock();
                    status.last_error = Some(e.to_string());
                    status.errors += 1;
                }
                // The bucket may have changed under us: start from it again.
                state.index = None;
                state.cursor = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// How often a replica site reads what the primary has archived.
const FOLLOW: Duration = Duration::from_secs(10);

/// On a replica site: moves the hold to what the group's newest index says
/// is archived.
async fn follow(shared: &Arc<Shared>) -> Result<()> {
    let Some(catalog) = Catalog::load(shared.store.clone(), &shared.group).await? else {
        return Ok(());
    };
    let seq = catalog.index.archived_seq;
    let journal = shared.journal.clone();
    tokio::task::spawn_blocking(move || journal.set_hold(HOLD, seq))
        .await
        .map_err(blocking_failed)??;
    let mut status = shared.status.lock();
    status.archived_seq = seq;
    status.archived_time = Some(Timestamp::from_nanos(catalog.index.archived_ns));
    status.bytes = catalog.index.bytes();
    status.gaps = catalog.index.gaps.len() as u64;
    status.base_seq = catalog.index.bases.last().map(|b| b.seq).unwrap_or(0);
    Ok(())
}

/// One round: adopt the bucket's index, make a base version where one is
/// needed, upload what sealed, apply `keep`. True if there may be more.
async fn round(shared: &Arc<Shared>, state: &mut State) -> Result<bool> {
    if state.index.is_none() {
        let (index, chunks) = adopt(shared).await?;
        state.chunks = chunks;
        state.index = Some(index);
        state.cursor = None;
        // (What was uploaded before is not known chunk by chunk.)
        state.last_manifest = None;
        state.touched.clear();
    }
    let history = shared.journal.history();
    let needs_base = {
        let index = state.index.as_ref().expect("adopted above");
        index.bases.is_empty() || index.archived_seq < history.horizon_seq
    };
    if needs_base {
        base_version(shared, state, true).await?;
        publish(shared, state).await?;
        return Ok(true);
    }
    let more = upload_segment(shared, state).await?;
    let (archived, last_base_seq) = {
        let index = state.index.as_ref().expect("adopted above");
        (
            index.archived_seq,
            index.bases.last().map(|b| b.seq).unwrap_or(0),
        )
    };
    if !more
        && history.horizon_seq > last_base_seq
        && archived > last_base_seq
        && state.last_base.elapsed() >= shared.settings.base_every
    {
        base_version(shared, state, false).await?;
        publish(shared, state).await?;
    }
    if shared.settings.keep.is_some()
        && state
            .last_retention
            .is_none_or(|t| t.elapsed() >= shared.settings.poll * 10)
    {
        retain(shared, state).await?;
        state.last_retention = Some(Instant::now());
    }
    Ok(more)
}

/// Loads the newest index in the bucket and makes it this site's: an index
/// of an older epoch is taken over (without what that writer archived past
/// the point where this site's history parted from it); a newer one means
/// this site was fenced and must not write.
async fn adopt(shared: &Arc<Shared>) -> Result<(GroupIndex, HashSet<String>)> {
    let journal = &shared.journal;
    let epoch = journal.epoch();
    let group_id = journal.group_id();
    let chunks: HashSet<String> = shared
        .store
        .list(&format!("{}chunks/", layout::group_prefix(&shared.group)))
        .await?
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
        .collect();
    let found = Catalog::load(shared.store.clone(), &shared.group).await?;
    let mut index = match found {
        None => GroupIndex {
            group: shared.group.clone(),
            ..GroupIndex::default()
        },
        Some(catalog) => {
            let mut index = catalog.index;
            if index.group_id != group_id && index.group_id != journal.source_id() {
                return Err(ArchiveError::Invalid(format!(
                    "archive {} holds a group named {} of another journal (id {:#x}, this one is {group_id:#x}); \
                     give this daemon another archive prefix",
                    shared.store.location(),
                    shared.group,
                    index.group_id
                )));
            }
            if index.epoch > epoch {
                return Err(ArchiveError::Invalid(format!(
                    "archive {} holds group {} at epoch {}, newer than this site's {epoch}: \
                     another site took over; this one does not archive",
                    shared.store.location(),
                    shared.group,
                    index.epoch
                )));
            }
            if index.epoch < epoch {
                // What the older writer archived from where this site's
                // newer epochs begin is a branch this site never had.
                let boundary = journal
                    .epoch_history()
                    .iter()
                    .filter(|e| e.epoch > index.epoch)
                    .map(|e| e.first_seq)
                    .min()
                    .unwrap_or(u64::MAX);
                index.segments.retain(|s| s.last_seq < boundary);
                index.bases.retain(|b| b.seq < boundary);
                index.tags.retain(|t| t.seq < boundary);
                let last = index
                    .segments
                    .last()
                    .map(|s| (s.last_seq, s.last_ns))
                    .into_iter()
                    .chain(index.bases.last().map(|b| (b.seq, b.time_ns)))
                    .max();
                if let Some((seq, ns)) = last {
                    if index.archived_seq > seq {
                        index.archived_seq = seq;
                        index.archived_ns = ns;
                    }
                }
            }
            index
        }
    };
    index.group_id = group_id;
    index.epoch = epoch;
    Ok((index, chunks))
}

/// Writes the index, then moves the hold to what it says is archived.
async fn publish(shared: &Arc<Shared>, state: &mut State) -> Result<()> {
    let index = state.index.as_mut().expect("adopted");
    let journal = shared.journal.clone();
    index.epochs = journal
        .epoch_history()
        .iter()
        .map(|e| EpochEntry {
            epoch: e.epoch,
            first_seq: e.first_seq,
        })
        .collect();
    index.volumes = journal
        .volumes()
        .iter()
        .map(|v| VolumeEntry {
            id: v.id,
            name: v.name.clone(),
            size: v.size,
        })
        .collect();
    index.updated_ns = Timestamp::now().as_nanos();
    let key = layout::index_key(&shared.group, index.epoch);
    shared
        .store
        .put(&key, layout::encode_document(INDEX_FORMAT, index))
        .await?;
    let seq = index.archived_seq;
    tokio::task::spawn_blocking(move || journal.set_hold(HOLD, seq))
        .await
        .map_err(blocking_failed)??;
    let mut status = shared.status.lock();
    status.archived_seq = index.archived_seq;
    status.archived_time = Some(Timestamp::from_nanos(index.archived_ns));
    status.bytes = index.bytes();
    status.objects = (index.segments.len() + index.bases.len() + state.chunks.len() + 1) as u64;
    status.gaps = index.gaps.len() as u64;
    status.base_seq = index.bases.last().map(|b| b.seq).unwrap_or(0);
    Ok(())
}

/// Uploads every volume of the group at one seq as a base version: the
/// archived seq, or — the first time, and after a gap — the journal's
/// horizon, held while it is read.
async fn base_version(shared: &Arc<Shared>, state: &mut State, at_horizon: bool) -> Result<()> {
    let journal = shared.journal.clone();
    let index = state.index.as_mut().expect("adopted");
    let (seq, time_ns) = if at_horizon {
        let history = journal.history();
        let seq = history.horizon_seq.max(index.archived_seq);
        let hold = journal.clone();
        tokio::task::spawn_blocking(move || hold.set_hold(HOLD, seq))
            .await
            .map_err(blocking_failed)??;
        let history = journal.history();
        if history.horizon_seq > seq {
            return Err(ArchiveError::Invalid(format!(
                "group {}: retention moved the horizon past seq {seq} while the archive held it",
                shared.group
            )));
        }
        let time = if seq == history.horizon_seq {
            history.horizon_time.as_nanos()
        } else {
            index.archived_ns
        };
        if index.archived_seq < history.horizon_seq && !index.bases.is_empty() {
            tracing::warn!(
                group = %shared.group,
                archived = index.archived_seq,
                horizon = history.horizon_seq,
                "the journal retained away history the archive lacked; recording a gap"
            );
            index.gaps.push(GapEntry {
                after_seq: index.archived_seq,
                to_seq: seq,
                at_ns: Timestamp::now().as_nanos(),
            });
        }
        (seq, time)
    } else {
        (index.archived_seq, index.archived_ns)
    };
    // Only the chunks records touched since the last base version this
    // process made are read again, when every record between the two was
    // uploaded here (no gap, no restart): a base version costs what
    // changed, not the size of the volumes.
    let since = state.last_manifest.take().filter(|(base, _)| {
        index.bases.last().is_some_and(|b| b.seq == *base) && seq == index.archived_seq
    });
    let touched = std::mem::take(&mut state.touched);
    let mut volumes = Vec::new();
    let mut new_bytes = 0;
    let mut read_bytes = 0;
    for volume in journal.volumes() {
        let mut chunks = Vec::new();
        let count = volume.size.div_ceil(CHUNK_SIZE);
        let before = since
            .as_ref()
            .and_then(|(_, volumes)| volumes.get(&volume.id))
            .filter(|(size, chunks)| *size == volume.size && chunks.len() as u64 == count)
            .map(|(_, chunks)| chunks);
        for n in 0..count {
            if let Some(before) = before {
                if !touched.get(&volume.id).is_some_and(|t| t.contains(&n)) {
                    chunks.push(before[n as usize].clone());
                    continue;
                }
            }
            let offset = n * CHUNK_SIZE;
            let len = CHUNK_SIZE.min(volume.size - offset) as usize;
            let (reader, name) = (journal.clone(), volume.name.clone());
            let data = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                reader
                    .read(&name, offset, &mut buf, Point::Seq(seq))
                    .map(|_| buf)
            })
            .await
            .map_err(blocking_failed)??;
            read_bytes += data.len() as u64;
            if layout::is_zero(&data) {
                chunks.push(None);
                continue;
            }
            let hash = layout::chunk_hash(&data);
            if !state.chunks.contains(&hash) {
                let object = layout::encode_chunk(&data);
                new_bytes += object.len() as u64;
                shared
                    .store
                    .put(&layout::chunk_key(&shared.group, &hash), object)
                    .await?;
                state.chunks.insert(hash.clone());
                shared.status.lock().uploads += 1;
            }
            chunks.push(Some(hash));
        }
        volumes.push(BaseVolume {
            id: volume.id,
            name: volume.name.clone(),
            size: volume.size,
            chunks,
        });
    }
    let manifest = BaseManifest {
        group: shared.group.clone(),
        seq,
        time_ns,
        epoch: index.epoch,
        chunk_size: CHUNK_SIZE,
        volumes,
    };
    let key = layout::base_key(&shared.group, seq, index.epoch);
    shared
        .store
        .put(&key, layout::encode_document(BASE_FORMAT, &manifest))
        .await?;
    index.bases.retain(|b| b.seq != seq);
    index.bases.push(BaseEntry {
        key,
        seq,
        time_ns,
        new_bytes,
    });
    index.bases.sort_by_key(|b| b.seq);
    index.archived_seq = seq;
    index.archived_ns = time_ns;
    state.last_base = Instant::now();
    state.cursor = None;
    state.last_manifest = Some((
        seq,
        manifest
            .volumes
            .into_iter()
            .map(|v| (v.id, (v.size, v.chunks)))
            .collect(),
    ));
    shared.status.lock().base_read_bytes += read_bytes;
    tracing::info!(group = %shared.group, seq, new_bytes, read_bytes, "archived a base version");
    Ok(())
}

/// Uploads the next segment object, if one is due: the rest of a sealed
/// local segment, `object_bytes` of records, or records older than
/// `upload_after`. True if another may be due at once.
async fn upload_segment(shared: &Arc<Shared>, state: &mut State) -> Result<bool> {
    let journal = shared.journal.clone();
    let index = state.index.as_mut().expect("adopted");
    let from = index.archived_seq + 1;
    if from > journal.history().newest_seq {
        return Ok(false);
    }
    // The local segment holding `from`: sealed when a newer one exists.
    let catalogue = journal.segments();
    let sealed_end = catalogue
        .iter()
        .find(|e| e.last_seq >= from)
        .filter(|e| catalogue.iter().any(|o| o.id > e.id && o.records > 0))
        .map(|e| e.last_seq);
    let limit = shared.settings.object_bytes;
    let cursor = state.cursor;
    let reader = journal.clone();
    let (records, next_cursor) = tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut at = from;
        let mut cursor = cursor;
        loop {
            let batch = reader.read_raw(at, cursor, limit - bytes.min(limit - 1))?;
            cursor = Some(batch.cursor);
            let Some(last) = batch.records.last() else {
                break;
            };
            at = last.header.seq + 1;
            for record in batch.records {
                bytes += record.bytes.len();
                records.push(record);
            }
            if bytes >= limit || sealed_end.is_some_and(|end| at > end) {
                break;
            }
        }
        Ok::<_, tidemark_journal::Error>((records, cursor))
    })
    .await
    .map_err(blocking_failed)??;
    let Some(first) = records.first() else {
        return Ok(false);
    };
    // One object holds one epoch and no more than the sealed segment.
    let epoch = first.epoch;
    let mut take = records
        .iter()
        .take_while(|r| r.epoch == epoch && sealed_end.is_none_or(|end| r.header.seq <= end))
        .count();
    let mut bytes: usize = 0;
    for (n, record) in records.iter().enumerate().take(take) {
        if n > 0 && bytes + record.bytes.len() > limit {
            take = n;
            break;
        }
        bytes += record.bytes.len();
    }
    let cut = take < records.len();
    let full = bytes >= limit / 2 || cut;
    let sealed = sealed_end.is_some_and(|end| records[take - 1].header.seq == end);
    let age = Timestamp::now().as_nanos() - first.header.timestamp.as_nanos();
    let old = age >= shared.settings.upload_after.as_nanos() as i64;
    if !(sealed || full || old) {
        state.cursor = None;
        return Ok(false);
    }
    let chosen = &records[..take];
    let last = &chosen[chosen.len() - 1];
    let header = SegmentHeader {
        group_id: index.group_id,
        epoch,
        prev_seq: index.archived_seq,
        first_seq: first.header.seq,
        last_seq: last.header.seq,
        first_ns: first.header.timestamp.as_nanos(),
        last_ns: last.header.timestamp.as_nanos(),
        count: chosen.len() as u32,
    };
    let mut body = Vec::with_capacity(bytes);
    let mut entries = Vec::new();
    for record in chosen {
        let h = &record.header;
        let zero = matches!(h.kind, RecordKind::Zero | RecordKind::Trim);
        if (zero || h.kind == RecordKind::Write) && h.length > 0 {
            entries.push(MapEntry {
                seq: h.seq,
                volume: h.volume,
                zero,
                offset: h.offset,
                length: h.length,
                pos: body.len() as u64,
                len: record.bytes.len() as u32,
            });
        }
        body.extend_from_slice(&record.bytes);
    }
    let map = layout::encode_map(&entries);
    let map_len = map.len() as u64;
    let object = layout::encode_segment(&header, &body, &map);
    let key = layout::segment_key(&shared.group, epoch, header.first_seq, header.last_seq);
    let size = object.len() as u64;
    shared.store.put(&key, object).await?;
    shared.status.lock().uploads += 1;
    // The object's record map names every range it changed: the chunks
    // the next base version must read again.
    for e in &entries {
        let (first, last) = (
            e.offset / CHUNK_SIZE,
            (e.offset + e.length - 1) / CHUNK_SIZE,
        );
        state
            .touched
            .entry(e.volume)
            .or_default()
            .extend(first..=last);
    }
    for record in chosen {
        if record.header.kind != RecordKind::Mark {
            continue;
        }
        let payload = &record.bytes[record.bytes.len() - record.header.stored_len as usize..];
        match Mark::decode(payload) {
            Some(Mark::TagSet { name, body }) => {
                index
                    .tags
                    .retain(|t| !(t.volume == record.header.volume && t.name == name));
                let (seq, time_ns) = tag_point(body)
                    .unwrap_or((record.header.seq, record.header.timestamp.as_nanos()));
                index.tags.push(TagEntry {
                    volume: record.header.volume,
                    name: name.to_string(),
                    seq,
                    time_ns,
                });
            }
            Some(Mark::TagDelete { name }) => index
                .tags
                .retain(|t| !(t.volume == record.header.volume && t.name == name)),
            _ => {}
        }
    }
    index.segments.push(SegmentEntry {
        key,
        epoch,
        prev_seq: header.prev_seq,
        first_seq: header.first_seq,
        last_seq: header.last_seq,
        first_ns: header.first_ns,
        last_ns: header.last_ns,
        bytes: size,
        map_len,
    });
    index.archived_seq = header.last_seq;
    index.archived_ns = header.last_ns;
    state.cursor = if cut { None } else { next_cursor };
    publish(shared, state).await?;
    Ok(true)
}

/// The point a tag names when it is not its mark record's own seq: the
/// tagging layer's body (JSON) may carry `point` and `point_ns` (a tag set
/// for an earlier point, e.g. before an anomaly).
fn tag_point(body: &[u8]) -> Option<(u64, i64)> {
    let body: serde_json::Value = serde_json::from_slice(body).ok()?;
    let seq = body.get("point")?.as_u64()?;
    let ns = body.get("point_ns").and_then(|v| v.as_i64()).unwrap_or(0);
    Some((seq, ns))
}

/// Applies `keep`: the newest base version at or before the cutoff becomes
/// the oldest point; what only older points needed is deleted (segments,
/// base versions, tags, chunks no remaining base version names), and so
/// are objects of this epoch that no index names (an upload cut short).
async fn retain(shared: &Arc<Shared>, state: &mut State) -> Result<()> {
    let Some(keep) = shared.settings.keep else {
        return Ok(());
    };
    let index = state.index.as_mut().expect("adopted");
    let cutoff = Timestamp::now().as_nanos() - keep.as_nanos() as i64;
    let Some(oldest) = index
        .bases
        .iter()
        .filter(|b| b.time_ns <= cutoff)
        .map(|b| b.seq)
        .max()
    else {
        return Ok(());
    };
    let doomed_bases: Vec<BaseEntry> = index
        .bases
        .iter()
        .filter(|b| b.seq < oldest)
        .cloned()
        .collect();
    let doomed_segments: Vec<SegmentEntry> = index
        .segments
        .iter()
        .filter(|s| s.last_seq <= oldest)
        .cloned()
        .collect();
    if doomed_bases.is_empty() && doomed_segments.is_empty() {
        return Ok(());
    }
    // The index stops naming them first; then they go.
    index.bases.retain(|b| b.seq >= oldest);
    index.segments.retain(|s| s.last_seq > oldest);
    index.tags.retain(|t| t.seq >= oldest);
    index.gaps.retain(|g| g.to_seq > oldest);
    publish(shared, state).await?;
    let index = state.index.as_ref().expect("adopted");
    let mut live = HashSet::new();
    for base in &index.bases {
        let bytes = shared.store.get(&base.key).await?;
        let manifest: BaseManifest = layout::decode_document(BASE_FORMAT, &base.key, &bytes)
            .map_err(|e| super::catalog::locate(e, shared.store.as_ref()))?;
        for volume in manifest.volumes {
            live.extend(volume.chunks.into_iter().flatten());
        }
    }
    for base in &doomed_bases {
        shared.store.delete(&base.key).await?;
    }
    for segment in &doomed_segments {
        shared.store.delete(&segment.key).await?;
    }
    let dead: Vec<String> = state
        .chunks
        .iter()
        .filter(|c| !live.contains(*c))
        .cloned()
        .collect();
    for chunk in &dead {
        shared
            .store
            .delete(&layout::chunk_key(&shared.group, chunk))
            .await?;
        state.chunks.remove(chunk);
    }
    // Segment objects of this epoch the index does not name: uploads whose
    // index update never happened.
    let named: HashSet<&str> = index.segments.iter().map(|s| s.key.as_str()).collect();
    let suffix = format!(".e{:010}.tdseg", index.epoch);
    let prefix = format!("{}segments/", layout::group_prefix(&shared.group));
    for object in shared.store.list(&prefix).await? {
        if object.key.ends_with(&suffix) && !named.contains(object.key.as_str()) {
            let first: u64 = object.key[prefix.len()..]
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            if first <= index.archived_seq {
                shared.store.delete(&object.key).await?;
            }
        }
    }
    tracing::info!(
        group = %shared.group,
        oldest,
        bases = doomed_bases.len(),
        segments = doomed_segments.len(),
        chunks = dead.len(),
        "archive retention deleted what only older points needed"
    );
    Ok(())
}

/// Lets the hold give way (recording a gap) once the archive trails by
/// more than `max_lag_bytes`, and holds firmly again once it catches up.
fn limit_lag(shared: &Arc<Shared>, state: &mut State) -> Result<()> {
    let archived = shared.status.lock().archived_seq;
    let behind = shared.journal.bytes_after(archived);
    let expendable = behind > shared.settings.max_lag_bytes;
    if expendable != state.expendable {
        shared.journal.set_hold_expendable(HOLD, expendable)?;
        state.expendable = expendable;
        if expendable {
            tracing::warn!(
                group = %shared.group,
                behind,
                "the archive trails by more than its limit: retention may pass it, leaving a gap"
            );
        }
    }
    Ok(())
}
