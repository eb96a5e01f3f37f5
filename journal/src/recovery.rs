//! Start-up recovery: finding where the journal really ends, telling a torn
//! tail from damage, and catching the index up.
//!
//! The rule that makes this exact: a batch is acknowledged only after an
//! fsync that began after it was written, and every batch frame records how
//! far the journal was durable when the batch was written (its durable
//! watermark: a segment and an offset). So damage at position X (segment
//! S, offset X) is the torn tail of a crash — never acknowledged, and
//! neither is anything after it — unless some valid batch after it, in S or
//! a later segment, was written when X was already durable. A torn tail is
//! cut off, with every later segment. Damage that some later batch vouches
//! for is corruption of acknowledged data and is reported with its file and
//! offset — or, if the operator chose [`RecoveryMode::TruncateCorrupt`], cut
//! off with everything after it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::{Fs, OpenMode};
use crate::index::{Index, IndexBatch, SegmentEntry};
use crate::journal::Shared;
use crate::manifest::Manifest;
use crate::point::{Seq, Timestamp};
use crate::record::{payload_bytes, RecordKind};
use crate::segment::{
    parse_segment_name, segment_path, Segment, SegmentHeader, BATCH_MAGIC, SEGMENT_HEADER_LEN,
};
use crate::writer::ActiveSegment;

/// What to do when recovery finds damage that is not a torn tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Refuse to open, naming the segment and offset. Nothing is lost
    /// without an operator deciding so.
    #[default]
    Strict,
    /// Cut the journal at the first bad record, dropping it and everything
    /// after it (later segments too), and open with what precedes it.
    TruncateCorrupt,
}

/// A place where recovery found bytes that did not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment.
    pub path: PathBuf,
    /// Offset of the first bad byte (start of the bad batch).
    pub offset: u64,
    /// What was wrong.
    pub reason: String,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: usize,
    /// Records found in them.
    pub records: u64,
    /// The newest durable seq after recovery.
    pub newest_seq: Seq,
    /// Records added to the index during recovery (catch-up or rebuild).
    pub indexed_records: u64,
    /// The index was rebuilt from the segments.
    pub index_rebuilt: bool,
    /// A torn tail that was cut off (records never acknowledged).
    pub torn_tail: Option<Damage>,
    /// Corruption cut off under [`RecoveryMode::TruncateCorrupt`].
    pub truncated_corruption: Option<Damage>,
    /// Segment files removed: wholly folded by an interrupted retention,
    /// never-finished creations, or dropped after a truncation.
    pub removed_segments: Vec<PathBuf>,
    /// An interrupted retention fold that was finished, and its horizon.
    pub finished_fold: Option<Seq>,
    /// Records found in the file cache that the journal lacked; they are
    /// journalled before anything new.
    pub replayed_from_file_cache: u64,
    /// Sealed segments taken from the index's catalogue without a scan
    /// (see `JournalOptions::trust_sealed`); their records are checked in
    /// the background.
    pub trusted_segments: usize,
}

/// Segments newest-first that start-up always scans, trusted or not: a
/// torn tail, and batches that vouch for it, live only there.
const ALWAYS_SCANNED: usize = 2;

/// The outcome of scanning every segment.
pub(crate) struct Recovered {
    pub segments: Vec<Arc<Segment>>,
    pub catalogue: Vec<SegmentEntry>,
    pub newest: (Seq, Timestamp),
    /// The newest segment and where its next batch goes.
    pub active: Option<(u64, u64)>,
    /// The index knows records that recovery cut off; it must be rebuilt.
    pub index_ahead: bool,
    pub report: RecoveryReport,
    /// Segments kept unscanned, each with the seq before it and its
    /// catalogue line, for the background check.
    pub trusted: Vec<(Arc<Segment>, Seq, SegmentEntry)>,
}

/// Gathers index updates during a scan, committing every few thousand
/// records so a rebuild of a large journal stays bounded in memory.
struct Catchup<'a> {
    index: &'a Index,
    batch: IndexBatch<'a>,
    pending: usize,
    indexed: u64,
}

impl Catchup<'_> {
    fn commit(&mut self, upto: Seq) -> Result<()> {
        let batch = std::mem::replace(&mut self.batch, self.index.batch());
        self.pending = 0;
        batch.commit(upto)
    }
}

fn list_segments(fs: &dyn Fs, dir: &Path) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for name in fs
        .list_dir(dir)
        .map_err(|e| Error::io("list segments", dir, e))?
    {
        match name.to_str().and_then(parse_segment_name) {
            Some(id) => ids.push(id),
            None => {
                tracing::warn!(file = %dir.join(&name).display(), "ignoring a file that is not a segment")
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// True for a segment file whose creation never finished: too short for a
/// header, or a header that is zero or does not decode — and no batch
/// anywhere. (A header is written and synced before the first batch, so a
/// bad header with batches behind it is damage, never an unfinished
/// creation.)
fn never_finished(fs: &dyn Fs, path: &Path) -> Result<bool> {
    let bytes = crate::fs::read(fs, path).map_err(|e| Error::io("read segment", path, e))?;
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Ok(true);
    }
    let header_zero = bytes[..SEGMENT_HEADER_LEN].iter().all(|&b| b == 0);
    Ok(
        (header_zero || SegmentHeader::decode(&bytes, path).is_err())
            && memchr::memmem::find(&bytes, &BATCH_MAGIC.to_le_bytes()).is_none(),
    )
}

/// The first valid batch in the segments `later_ids` that vouches for
/// position `offset` of segment `segment` (see [`crate::segment::BatchFrame::vouches_for`]).
///
/// A later segment that cannot be opened might hold such a batch, so it
/// is an error — unless it is the newest one and its creation never
/// finished (then it holds no batch at all). Under
/// [`RecoveryMode::TruncateCorrupt`] it is taken as vouching: the operator
/// chose to cut at the damage either way.
fn voucher_in(
    fs: &dyn Fs,
    dir: &Path,
    later_ids: &[u64],
    prev_seq: Seq,
    segment: u64,
    offset: u64,
    mode: RecoveryMode,
) -> Result<Option<(PathBuf, u64)>> {
    for (i, &id) in later_ids.iter().enumerate() {
        let path = segment_path(dir, id);
        let later = match Segment::open(fs, &path) {
            Ok(later) => later,
            Err(_) if i + 1 == later_ids.len() && never_finished(fs, &path)? => continue,
            Err(e) if mode == RecoveryMode::TruncateCorrupt => {
                tracing::warn!(segment = %path.display(), error = %e, "a later segment cannot be opened");
                return Ok(Some((path, 0)));
            }
            Err(e) => {
                return Err(Error::Corruption {
                    path: path.clone(),
                    offset: 0,
                    reason: format!(
                        "this segment cannot be opened ({e}), and it may vouch that the damage in {} at offset {offset} was acknowledged data; \
                         repair it, or open with recovery mode truncate-corrupt to drop everything from the damage on",
                        segment_path(dir, segment).display()
                    ),
                })
            }
        };
        let found = later
            .valid_batches_after(fs, SEGMENT_HEADER_LEN as u64, prev_seq)
            .into_iter()
            .find(|(_, frame)| frame.vouches_for(segment, offset))
            .map(|(at, _)| (path, at));
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Cuts a segment at `offset`: the bytes after it become zeros (holes),
/// as they were before anything was written there.
fn cut_segment(fs: &dyn Fs, path: &Path, offset: u64, size: u64) -> Result<()> {
    let file = fs
        .open(path, OpenMode::write())
        .map_err(|e| Error::io("open segment", path, e))?;
    file.set_len(offset)
        .and_then(|()| file.set_len(size))
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("truncate segment", path, e))
}

fn remove(fs: &dyn Fs, path: &Path, report: &mut RecoveryReport) -> Result<()> {
    fs.remove_file(path)
        .map_err(|e| Error::io("remove segment", path, e))?;
    report.removed_segments.push(path.to_path_buf());
    Ok(())
}

/// Scans every segment in `segments_dir`, verifying every record, cutting
/// a torn tail, and indexing records the index lacks.
pub(crate) fn recover(
    fs: &dyn Fs,
    dir: &Path,
    segments_dir: &Path,
    manifest: &Manifest,
    index: &Index,
    mode: RecoveryMode,
    trust_sealed: bool,
) -> Result<Recovered> {
    let ids = list_segments(fs, segments_dir)?;
    let indexed = index.indexed_seq()?.unwrap_or(0);
    let already = indexed.max(manifest.horizon_seq);
    // Sealed segments the index has wholly indexed: their catalogue lines
    // say what a scan would find, unless the segment was damaged since.
    let catalogued: std::collections::HashMap<u64, SegmentEntry> = if trust_sealed {
        index
            .segments()?
            .into_iter()
            .filter(|e| e.last_seq <= indexed && e.records > 0)
            .map(|e| (e.id, e))
            .collect()
    } else {
        Default::default()
    };
    let mut trusted = Vec::new();
    let mut report = RecoveryReport::default();
    let mut segments = Vec::new();
    let mut catalogue = Vec::new();
    let mut newest = (0, Timestamp::default());
    let mut active = None;
    let mut prev_seq = 0;
    let mut catchup = Catchup {
        index,
        batch: index.batch(),
        pending: 0,
        indexed: 0,
    };

    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let path = segment_path(segments_dir, id);
        let is_last = i + 1 == ids.len();
        i += 1;
        let segment = match Segment::open(fs, &path) {
            Ok(segment) => segment,
            Err(_) if is_last && never_finished(fs, &path)? => {
                tracing::warn!(segment = %path.display(), "removing a segment whose creation never finished");
                remove(fs, &path, &mut report)?;
                continue;
            }
            Err(e) => match (mode, &e) {
                (RecoveryMode::TruncateCorrupt, Error::Corruption { offset, reason, .. }) => {
                    report.truncated_corruption = Some(Damage {
                        path: path.clone(),
                        offset: *offset,
                        reason: reason.clone(),
                    });
                    remove(fs, &path, &mut report)?;
                    for &later in &ids[i..] {
                        remove(fs, &segment_path(segments_dir, later), &mut report)?;
                    }
                    break;
                }
                _ => return Err(e),
            },
        };
        if segment.header.group_id != manifest.group_id {
            return Err(Error::corruption(
                &path,
                16,
                format!(
                    "segment belongs to group id {:#x}, this journal ({}) is {:#x}",
                    segment.header.group_id,
                    dir.display(),
                    manifest.group_id
                ),
            ));
        }
        // Its catalogue line is final only once the next segment's records
        // were indexed too (the index takes batches in seq order): a line
        // flushed while the segment still grew would hide its later records.
        let sealed = ids.len() - i >= ALWAYS_SCANNED;
        let next_indexed = |e: &SegmentEntry| {
            ids.get(i)
                .and_then(|next| catalogued.get(next))
                .is_some_and(|next| next.first_seq == e.last_seq + 1)
        };
        match catalogued.get(&id) {
            Some(e)
                if sealed && next_indexed(e) && (prev_seq == 0 || e.first_seq == prev_seq + 1) =>
            {
                // Taken as the catalogue says; a scan of it in the
                // background finds damage that came after it was written
                // (reads check every record's CRC meanwhile).
                let e = *e;
                if e.last_seq <= manifest.horizon_seq {
                    // Left behind by an interrupted retention run.
                    drop(segment);
                    remove(fs, &path, &mut report)?;
                } else {
                    catalogue.push(e);
                    newest = (e.last_seq, e.last_time);
                    report.records += e.records;
                    report.trusted_segments += 1;
                    active = Some((id, e.used_bytes));
                    let segment = Arc::new(segment);
                    trusted.push((segment.clone(), prev_seq, e));
                    segments.push(segment);
                }
                prev_seq = e.last_seq;
                continue;
            }
            _ => {}
        }

        let mut entry: Option<SegmentEntry> = None;
        let summary = segment.scan(prev_seq, |header, offset, stored| {
            let e = entry.get_or_insert(SegmentEntry {
                id,
                first_seq: header.seq,
                last_seq: header.seq,
                first_time: header.timestamp,
                last_time: header.timestamp,
                used_bytes: 0,
                records: 0,
            });
            e.last_seq = header.seq;
            e.last_time = header.timestamp;
            e.records += 1;
            if header.seq > already {
                let body = if header.kind == RecordKind::Mark {
                    Some(payload_bytes(header, stored, &path, offset)?)
                } else {
                    None
                };
                catchup
                    .batch
                    .add_record(header, id, offset, body.as_deref())?;
                catchup.pending += 1;
                catchup.indexed += 1;
                if catchup.pending >= 4096 {
                    catchup.commit(header.seq)?;
                }
            }
            Ok(())
        })?;

        let end = summary.end.valid_end;
        let later = segment.valid_batches_after(fs, end, summary.last_seq);
        let mut stop = false;
        if summary.end.damage.is_some() || !later.is_empty() {
            // A valid batch written after the bytes at `end` were durable
            // (in this segment or a later one) means those bytes were
            // acknowledged: damage. Batches written while they were still
            // being synced belong to the same unacknowledged tail.
            let voucher = match later
                .iter()
                .find(|(_, frame)| frame.vouches_for(id, end))
                .map(|(at, _)| (path.clone(), *at))
            {
                Some(found) => Some(found),
                None => voucher_in(fs, segments_dir, &ids[i..], summary.last_seq, id, end, mode)?,
            };
            let reason = summary.end.damage.clone();
            match voucher {
                None => {
                    let reason = reason.unwrap_or_else(|| {
                        "zeroed bytes before batches that were never acknowledged".into()
                    });
                    tracing::warn!(segment = %path.display(), offset = end, %reason, "cutting the torn tail of the journal");
                    cut_segment(fs, &path, end, segment.header.segment_size)?;
                    report.torn_tail = Some(Damage {
                        path: path.clone(),
                        offset: end,
                        reason,
                    });
                }
                Some((vouching_file, at)) => {
                    let reason = format!(
                        "{}; a valid batch written after this was durable follows in {} at offset {at}",
                        reason.unwrap_or_else(|| "zeroed bytes where the next batch should be".into()),
                        vouching_file.display()
                    );
                    if mode == RecoveryMode::Strict {
                        return Err(Error::Corruption {
                            path,
                            offset: end,
                            reason: format!(
                                "{reason} (open with recovery mode truncate-corrupt to drop everything from here on)"
                            ),
                        });
                    }
                    tracing::error!(segment = %path.display(), offset = end, %reason, "dropping the journal from a corrupt record on");
                    cut_segment(fs, &path, end, segment.header.segment_size)?;
                    report.truncated_corruption = Some(Damage {
                        path: path.clone(),
                        offset: end,
                        reason,
                    });
                }
            }
            // Either way nothing after the cut survives: a torn tail's later
            // batches were never acknowledged, and under truncate-corrupt the
            // operator chose to drop them.
            for &later in &ids[i..] {
                remove(fs, &segment_path(segments_dir, later), &mut report)?;
            }
            stop = true;
        }

        let last_kept = is_last || stop;
        let folded_away = entry.is_none_or(|e| e.last_seq <= manifest.horizon_seq);
        if !last_kept && folded_away {
            // Left behind by a retention run that stopped between moving the
            // horizon and removing the files.
            drop(segment);
            remove(fs, &path, &mut report)?;
            prev_seq = summary.last_seq;
            continue;
        }
        if let Some(mut e) = entry {
            e.used_bytes = end;
            catchup.batch.set_segment(&e)?;
            catalogue.push(e);
            newest = (e.last_seq, e.last_time);
            report.records += e.records;
        }
        prev_seq = summary.last_seq;
        active = Some((id, end));
        segments.push(Arc::new(segment));
        if stop {
            break;
        }
    }
    if !report.removed_segments.is_empty() {
        // The removals must not come back after a power cut: a segment of
        // a torn tail that reappeared would follow a newer one.
        fs.sync_dir(segments_dir)
            .map_err(|e| Error::io("fsync directory", segments_dir, e))?;
    }
    catchup.commit(newest.0)?;
    report.segments = segments.len();
    report.indexed_records = catchup.indexed;
    Ok(Recovered {
        index_ahead: indexed > newest.0.max(manifest.horizon_seq),
        segments,
        catalogue,
        newest,
        active,
        report,
        trusted,
    })
}

/// Opens the newest segment for appending, or creates the first one.
pub(crate) fn active_segment(shared: &Arc<Shared>, recovered: &Recovered) -> Result<ActiveSegment> {
    if let Some((id, end)) = recovered.active {
        let segment = shared.segment(id)?;
        let entry = recovered.catalogue.iter().find(|e| e.id == id).copied();
        return ActiveSegment::open(segment, end, entry, &shared.options);
    }
    let header = SegmentHeader {
        group_id: shared.group_id,
        segment_id: 1,
        first_seq: shared.durable().0 + 1,
        segment_size: shared.options.segment_size,
        created: shared.options.clock.now(),
    };
    let segment = Arc::new(Segment::create(
        shared.options.fs.as_ref(),
        &shared.segments_dir,
        header,
        shared.options.io_hooks.as_ref(),
    )?);
    shared.add_segment(segment.clone());
    ActiveSegment::open(segment, SEGMENT_HEADER_LEN as u64, None, &shared.options)
}
