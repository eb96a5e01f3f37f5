//! The journal writer: two threads that turn a stream of sequenced records
//! into durable, indexed batches.
//!
//! Appenders send [`Submission`]s in seq order. The *write stage* takes the
//! first one, drains whatever else is already waiting (bounded by bytes),
//! and writes all of it as one batch with one `pwrite`. The *sync stage*
//! makes written batches durable with one `fdatasync` (covering every batch
//! written since the last one), indexes them with one RocksDB write each,
//! and only then answers their appenders. The two stages overlap — batch
//! k+1 is written while batch k is being synced — so the disk never idles
//! between a sync and the next write; while both are busy, the next batch
//! gathers in the channel: that is the group commit. Each batch frame
//! records how much of its segment was durable when it was written, which
//! keeps recovery exact (see `recovery.rs`).

use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::appender::SegmentAppender;
use crate::error::{Error, Result};
use crate::index::SegmentEntry;
use crate::journal::Shared;
use crate::point::{Seq, Timestamp};
use crate::record::{PreparedRecord, RecordHeader};
use crate::segment::{BatchFrame, Segment, SegmentHeader, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN};

/// What appenders send to the writer.
#[derive(Debug)]
pub enum Submission {
    /// A record with its place in the write order.
    Append {
        /// Its seq.
        seq: Seq,
        /// Its timestamp.
        time: Timestamp,
        /// The prepared record.
        record: PreparedRecord,
        /// Answered once the record is durable and indexed (or failed).
        reply: oneshot::Sender<Result<()>>,
    },
    /// A barrier: answered once everything submitted before it is durable,
    /// with the newest durable seq.
    Barrier {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Seq>>,
    },
}

/// What an append resolves to once durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's seq.
    pub seq: Seq,
    /// The record's timestamp.
    pub time: Timestamp,
}

/// A record on its way to the disk. Its place in the write order is fixed
/// already; [`AppendHandle::wait`] (or `.await`) tells when it is durable.
#[derive(Debug)]
pub struct AppendHandle {
    seq: Seq,
    time: Timestamp,
    reply: oneshot::Receiver<Result<()>>,
    closed: std::path::PathBuf,
}

impl AppendHandle {
    pub(crate) fn new(
        seq: Seq,
        time: Timestamp,
        reply: oneshot::Receiver<Result<()>>,
        dir: std::path::PathBuf,
    ) -> Self {
        AppendHandle {
            seq,
            time,
            reply,
            closed: dir,
        }
    }

    /// The seq the record got.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The timestamp the record got.
    pub fn time(&self) -> Timestamp {
        self.time
    }

    /// Blocks until the record is durable.
    pub fn wait(self) -> Result<Appended> {
        match self.reply.recv() {
            Ok(Ok(())) => Ok(Appended {
                seq: self.seq,
                time: self.time,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Closed(self.closed)),
        }
    }
}

impl Future for AppendHandle {
    type Output = Result<Appended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (seq, time) = (self.seq, self.time);
        match Pin::new(&mut self.reply).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Ok(()))) => Poll::Ready(Ok(Appended { seq, time })),
            Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(e)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Closed(self.closed.clone()))),
        }
    }
}

/// The segment being appended to.
#[derive(Debug)]
pub struct ActiveSegment {
    /// Writes its batches.
    pub appender: SegmentAppender,
    /// Mapped for reading (shared with readers).
    pub segment: Arc<Segment>,
    /// Its catalogue line, kept current after every batch.
    pub entry: Option<SegmentEntry>,
}

impl ActiveSegment {
    /// Opens `segment`, whose valid bytes end at `write_offset`, for
    /// appending batches under `options`.
    pub fn open(
        segment: Arc<Segment>,
        write_offset: u64,
        entry: Option<SegmentEntry>,
        options: &crate::journal::JournalOptions,
    ) -> Result<Self> {
        let max_batch = BATCH_HEADER_LEN
            + options.max_batch_bytes
            + crate::record::RECORD_HEADER_LEN
            + options.max_record_len as usize;
        Ok(ActiveSegment {
            appender: SegmentAppender::open(&segment, write_offset, options.direct_io, max_batch)?,
            segment,
            entry,
        })
    }
}

struct Pending {
    seq: Seq,
    time: Timestamp,
    record: PreparedRecord,
    reply: oneshot::Sender<Result<()>>,
}

/// A record of a written batch, as the sync stage indexes it.
struct Written {
    header: RecordHeader,
    offset: u64,
    /// The body of a mark record (never compressed), for the tag index.
    mark_body: Option<Vec<u8>>,
}

/// What the write stage hands the sync stage, in order.
enum ToSync {
    /// A batch written (not yet durable) to `file`.
    Batch {
        file: Arc<File>,
        path: std::path::PathBuf,
        segment: u64,
        end: u64,
        records: Vec<Written>,
        entry: SegmentEntry,
        replies: Vec<oneshot::Sender<Result<()>>>,
    },
    /// Answered once everything before it is durable.
    Barrier(oneshot::Sender<Result<Seq>>),
}

/// How far the active segment is durable: `(segment id, offset)`.
type SyncedTo = Arc<Mutex<(u64, u64)>>;

/// The write stage's state.
pub struct Writer {
    shared: Arc<Shared>,
    active: ActiveSegment,
    rx: Receiver<Submission>,
    synced_to: SyncedTo,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("active", &self.active)
            .finish()
    }
}

impl Writer {
    /// A writer appending to `active`, whose bytes up to `write_offset` are
    /// durable (recovery found them there).
    pub fn new(shared: Arc<Shared>, active: ActiveSegment, rx: Receiver<Submission>) -> Self {
        let synced_to = Arc::new(Mutex::new((
            active.segment.id(),
            active.appender.write_offset(),
        )));
        Writer {
            shared,
            active,
            rx,
            synced_to,
        }
    }

    /// Runs both stages until every sender is gone and everything written
    /// is durable, then returns.
    pub fn run(mut self) {
        // Two batches may wait for the sync stage; beyond that the write
        // stage waits too, which bounds how far writes run ahead of syncs.
        let (to_sync, from_write) = crossbeam_channel::bounded(2);
        let shared = self.shared.clone();
        let synced_to = self.synced_to.clone();
        std::thread::scope(|scope| {
            let syncer = std::thread::Builder::new()
                .name("tidemark-journal-sync".into())
                .spawn_scoped(scope, move || sync_stage(&shared, &from_write, &synced_to));
            match syncer {
                Ok(_) => self.write_stage(&to_sync),
                Err(e) => {
                    self.shared
                        .poison(format!("cannot start the sync thread: {e}"));
                    self.write_stage(&to_sync);
                }
            }
            drop(to_sync);
        });
    }

    fn write_stage(&mut self, to_sync: &Sender<ToSync>) {
        let max_batch = self.shared.options.max_batch_bytes;
        let mut carry: Option<Submission> = None;
        loop {
            let first = match carry.take() {
                Some(s) => s,
                None => match self.rx.recv() {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let mut batch: Vec<Pending> = Vec::new();
            let mut barriers = Vec::new();
            let mut bytes = 0usize;
            let mut next = Some(first);
            while let Some(submission) = next.take() {
                match submission {
                    Submission::Append {
                        seq,
                        time,
                        record,
                        reply,
                    } => {
                        if !batch.is_empty() && bytes + record.encoded_len() > max_batch {
                            carry = Some(Submission::Append {
                                seq,
                                time,
                                record,
                                reply,
                            });
                            break;
                        }
                        bytes += record.encoded_len();
                        batch.push(Pending {
                            seq,
                            time,
                            record,
                            reply,
                        });
                    }
                    Submission::Barrier { reply } => barriers.push(reply),
                }
                next = self.rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.write(batch, to_sync);
            }
            for reply in barriers {
                if to_sync.send(ToSync::Barrier(reply)).is_err() {
                    return;
                }
            }
        }
    }

    /// Writes one batch and hands it to the sync stage; on failure answers
    /// its appenders at once.
    fn write(&mut self, batch: Vec<Pending>, to_sync: &Sender<ToSync>) {
        if let Some(e) = self.shared.poisoned() {
            for p in batch {
                let _ = p.reply.send(Err(self.shared.poison_error(&e)));
            }
            return;
        }
        match self.write_batch(&batch) {
            Ok((records, end)) => {
                let Some(entry) = self.active.entry else {
                    return;
                };
                let written = ToSync::Batch {
                    file: self.active.appender.file().clone(),
                    path: self.active.segment.path.clone(),
                    segment: self.active.segment.id(),
                    end,
                    records,
                    entry,
                    replies: batch.into_iter().map(|p| p.reply).collect(),
                };
                // The sync stage only goes away once this stage is done.
                let _ = to_sync.send(written);
            }
            Err(e) => {
                let reason = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(Error::AppendFailed {
                        path: self.active.segment.path.clone(),
                        offset: self.active.appender.write_offset(),
                        reason: reason.clone(),
                    }));
                }
            }
        }
    }

    /// Encodes and writes one batch; returns its records and where it ends.
    fn write_batch(&mut self, batch: &[Pending]) -> Result<(Vec<Written>, u64)> {
        let (first_seq, last_seq) = match (batch.first(), batch.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => return Ok((Vec::new(), self.active.appender.write_offset())),
        };
        let len = BATCH_HEADER_LEN + batch.iter().map(|p| p.record.encoded_len()).sum::<usize>();
        if self.active.appender.write_offset() + len as u64
            > self.active.segment.header.segment_size
        {
            self.roll(first_seq)?;
        }
        let durable_end = match *self.synced_to.lock() {
            (segment, offset) if segment == self.active.segment.id() => offset,
            _ => SEGMENT_HEADER_LEN as u64,
        };
        let frame = BatchFrame {
            count: batch.len() as u32,
            body_len: (len - BATCH_HEADER_LEN) as u64,
            first_seq,
            last_seq,
            epoch: self.shared.epoch(),
            durable_end,
        };
        let at = self.active.appender.write_offset();
        let buf = self.active.appender.batch_buffer(len)?;
        buf[..BATCH_HEADER_LEN].copy_from_slice(&frame.encode());
        let mut offsets = Vec::with_capacity(batch.len());
        let mut pos = BATCH_HEADER_LEN;
        for p in batch {
            offsets.push(pos as u64);
            pos += p.record.encode_to(p.seq, p.time, &mut buf[pos..]);
        }
        self.active.appender.write(len)?;
        let end = self.active.appender.write_offset();

        let segment_id = self.active.segment.id();
        let mut records = Vec::with_capacity(batch.len());
        for (p, offset) in batch.iter().zip(offsets) {
            let header = RecordHeader {
                kind: p.record.kind,
                compressed: p.record.compressed,
                volume: p.record.volume,
                stored_len: p.record.stored.len() as u32,
                seq: p.seq,
                timestamp: p.time,
                offset: p.record.offset,
                length: p.record.length,
                crc: 0,
            };
            let mark_body = (p.record.kind == crate::record::RecordKind::Mark
                && !p.record.compressed)
                .then(|| p.record.stored.clone());
            records.push(Written {
                header,
                offset: at + offset,
                mark_body,
            });
            let entry = self.active.entry.get_or_insert(SegmentEntry {
                id: segment_id,
                first_seq: p.seq,
                last_seq: p.seq,
                first_time: p.time,
                last_time: p.time,
                used_bytes: 0,
                records: 0,
            });
            entry.last_seq = p.seq;
            entry.last_time = p.time;
            entry.records += 1;
        }
        if let Some(entry) = self.active.entry.as_mut() {
            entry.used_bytes = end;
        }
        Ok((records, end))
    }

    /// Starts a new segment for a batch beginning at `first_seq`, once
    /// everything in the current one is durable: recovery treats damage in
    /// any but the newest segment as corruption, so no older segment may
    /// hold an unsynced batch.
    fn roll(&mut self, first_seq: Seq) -> Result<()> {
        self.active.appender.file().sync_data().map_err(|e| {
            let err = Error::io("fsync segment", &self.active.segment.path, e);
            self.shared.poison(err.to_string());
            err
        })?;
        let header = SegmentHeader {
            group_id: self.shared.group_id,
            segment_id: self.active.segment.id() + 1,
            first_seq,
            segment_size: self.shared.options.segment_size,
            created: self.shared.options.clock.now(),
        };
        let segment = Arc::new(Segment::create(&self.shared.segments_dir, header)?);
        let active = ActiveSegment::open(
            segment.clone(),
            SEGMENT_HEADER_LEN as u64,
            None,
            &self.shared.options,
        )?;
        self.shared.add_segment(segment);
        tracing::debug!(
            segment = header.segment_id,
            first_seq,
            "rolled to a new segment"
        );
        self.active = active;
        Ok(())
    }
}

/// The sync stage: makes written batches durable, indexes them, publishes
/// them to readers and answers their appenders, in order.
fn sync_stage(shared: &Shared, from_write: &Receiver<ToSync>, synced_to: &Mutex<(u64, u64)>) {
    while let Ok(first) = from_write.recv() {
        let mut items = vec![first];
        while let Ok(more) = from_write.try_recv() {
            items.push(more);
        }
        // One fdatasync per file covers every batch written to it so far.
        let mut synced: Vec<u64> = Vec::new();
        let mut failure: Option<Error> = shared.poisoned();
        for item in &items {
            if let ToSync::Batch {
                file,
                path,
                segment,
                ..
            } = item
            {
                if failure.is_some() || synced.contains(segment) {
                    continue;
                }
                match file.sync_data() {
                    Ok(()) => synced.push(*segment),
                    Err(e) => {
                        let err = Error::io("fsync segment", path, e);
                        shared.poison(err.to_string());
                        failure = Some(err);
                    }
                }
            }
        }
        for item in items {
            match item {
                ToSync::Batch {
                    path,
                    segment,
                    end,
                    records,
                    entry,
                    replies,
                    ..
                } => {
                    if let Some(e) = &failure {
                        for reply in replies {
                            let _ = reply.send(Err(Error::AppendFailed {
                                path: path.clone(),
                                offset: end,
                                reason: e.to_string(),
                            }));
                        }
                        continue;
                    }
                    index_batch(shared, segment, &records, &entry);
                    *synced_to.lock() = (segment, end);
                    for reply in replies {
                        let _ = reply.send(Ok(()));
                    }
                }
                ToSync::Barrier(reply) => {
                    let answer = match &failure {
                        Some(e) => Err(shared.poison_error(e)),
                        None => Ok(shared.durable().0),
                    };
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

/// Indexes a durable batch and publishes it to readers.
fn index_batch(shared: &Shared, segment: u64, records: &[Written], entry: &SegmentEntry) {
    let Some(last) = records.last() else {
        return;
    };
    let mut batch = shared.index.batch();
    let indexed = records
        .iter()
        .try_for_each(|r| batch.add_record(&r.header, segment, r.offset, r.mark_body.as_deref()))
        .and_then(|()| batch.set_segment(entry))
        .and_then(|()| batch.commit(last.header.seq));
    if let Err(e) = indexed {
        // The batch is durable, so it is acknowledged, but reads would not
        // find it: stop appending until a reopen re-indexes it from the
        // segment.
        shared.poison(format!(
            "index update after seq {} failed: {e}",
            last.header.seq
        ));
    }
    shared.set_catalogue(*entry);
    shared.set_durable(last.header.seq, last.header.timestamp);
}
