//! The journal writer: three threads that turn a stream of sequenced
//! records into durable, indexed batches.
//!
//! Appenders send [`Submission`]s in seq order. The *encode stage* takes the
//! first one, drains whatever else is already waiting (bounded by bytes),
//! and encodes all of it as one batch into an aligned buffer. The *IO
//! stage* writes the buffer with one `pwrite` (`O_DIRECT`). The *sync
//! stage* makes written batches durable with one `fdatasync` (covering
//! every batch written since the last one), indexes each with one RocksDB
//! write, and only then answers their appenders. The stages overlap: batch
//! k+2 is encoded while k+1 is written and k is synced, so the disk never
//! idles for a memcpy or between a sync and the next write. While they are
//! busy, the next batch gathers in the channel: that is the group commit.
//! Each batch frame records how much of its segment was durable when it was
//! encoded, which keeps recovery exact (see `recovery.rs`).
//!
//! A small batch (under `JournalOptions::inline_batch_below`) that finds
//! the other two stages idle skips them: the encode stage writes, syncs
//! and indexes it itself, saving two thread hand-offs per commit — what a
//! commit-per-write load pays most for on a small machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

// The standard library's channels, not crossbeam's: a crossbeam `recv`
// that finds its channel empty spins and calls `sched_yield` eight times
// before it parks, and these stages find it empty after nearly every
// batch — under a database's commit-per-write load that was a seventh of
// the daemon's CPU time, taken from the database on a small machine.
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use crate::appender::{BatchWrite, BufferPool, SegmentAppender};
use crate::error::{Error, Result};
use crate::file_cache::{FileCache, FileEntry};
use crate::index::SegmentEntry;
use crate::journal::Shared;
use crate::memory_cache::CacheCharge;
use crate::point::{Seq, Timestamp};
use crate::record::{PreparedRecord, RecordHeader};
use crate::segment::{
    BatchFrame, Segment, SegmentHeader, ALLOCATE_AHEAD, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN,
};

/// What appenders send to the writer.
#[derive(Debug)]
pub enum Submission {
    /// A record with its place in the write order.
    Append {
        /// Its seq.
        seq: Seq,
        /// Its timestamp.
        time: Timestamp,
        /// The record, in memory or in the file cache.
        record: Payload,
        /// Answered once the record is durable and indexed (or failed);
        /// none for records acknowledged from the file cache.
        reply: Option<oneshot::Sender<Result<()>>>,
        /// The record's room in the memory cache, held until it is durable.
        charge: Option<CacheCharge>,
    },
    /// A barrier: answered once everything submitted before it is durable,
    /// with the newest durable seq.
    Barrier {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Seq>>,
    },
}

/// Where a record waits for the journal.
#[derive(Debug)]
pub enum Payload {
    /// In memory (the memory cache).
    Memory(PreparedRecord),
    /// Encoded in the file cache.
    File {
        /// Where.
        entry: FileEntry,
        /// Its header, for the index.
        header: RecordHeader,
    },
    /// Encoded by another site's journal, shipped here unchanged.
    Shipped {
        /// Its header.
        header: RecordHeader,
        /// The encoded record.
        bytes: Vec<u8>,
    },
}

impl Payload {
    /// Bytes the record occupies in a segment.
    pub fn encoded_len(&self) -> usize {
        match self {
            Payload::Memory(record) => record.encoded_len(),
            Payload::File { entry, .. } => entry.len as usize,
            Payload::Shipped { bytes, .. } => bytes.len(),
        }
    }

    /// Encodes the record (stamped with `seq` and `time`) into `out`.
    fn encode_to(
        &self,
        seq: Seq,
        time: Timestamp,
        out: &mut [u8],
        file_cache: Option<&FileCache>,
    ) -> Result<usize> {
        match self {
            Payload::Memory(record) => Ok(record.encode_to(seq, time, out)),
            Payload::File { entry, .. } => {
                let cache = file_cache.ok_or_else(|| {
                    Error::Invalid("a record waits in a file cache that is not open".into())
                })?;
                cache.read(entry, out);
                Ok(entry.len as usize)
            }
            Payload::Shipped { bytes, .. } => {
                out[..bytes.len()].copy_from_slice(bytes);
                Ok(bytes.len())
            }
        }
    }

    /// The record's header as the index needs it.
    fn header(&self, seq: Seq, time: Timestamp) -> RecordHeader {
        match self {
            Payload::Memory(record) => record.header(seq, time),
            Payload::File { header, .. } | Payload::Shipped { header, .. } => *header,
        }
    }

    /// The body of a mark record (marks always wait in memory, uncompressed).
    fn mark_body(&self) -> Option<Vec<u8>> {
        match self {
            Payload::Memory(record)
                if record.kind == crate::record::RecordKind::Mark && !record.compressed =>
            {
                Some(record.stored.to_vec())
            }
            Payload::Shipped { header, bytes }
                if header.kind == crate::record::RecordKind::Mark && !header.compressed =>
            {
                bytes
                    .get(crate::record::RECORD_HEADER_LEN..)
                    .map(<[u8]>::to_vec)
            }
            _ => None,
        }
    }
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
    /// Bytes of payload as stored (after lz4, if it shrank).
    stored: u64,
    durability: Durability,
    closed: std::path::PathBuf,
}

/// What an append handle waits for.
#[derive(Debug)]
enum Durability {
    /// The journal's answer once the record is durable in it.
    Journal(oneshot::Receiver<Result<()>>),
    /// A flush of the file cache through this write.
    FileCache(Arc<FileCache>, u64),
}

impl AppendHandle {
    pub(crate) fn new(
        seq: Seq,
        time: Timestamp,
        stored: u64,
        reply: oneshot::Receiver<Result<()>>,
        dir: std::path::PathBuf,
    ) -> Self {
        AppendHandle {
            seq,
            time,
            stored,
            durability: Durability::Journal(reply),
            closed: dir,
        }
    }

    /// A handle for a record written to the file cache: durable once the
    /// cache is flushed through `write_no`.
    pub(crate) fn in_file_cache(
        seq: Seq,
        time: Timestamp,
        stored: u64,
        cache: Arc<FileCache>,
        write_no: u64,
        dir: std::path::PathBuf,
    ) -> Self {
        AppendHandle {
            seq,
            time,
            stored,
            durability: Durability::FileCache(cache, write_no),
            closed: dir,
        }
    }

    /// The seq the record got.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Bytes of payload as stored: compared with the bytes written, the
    /// lz4 ratio, a free signal of how random (encrypted, compressed) the
    /// data is.
    pub fn stored_bytes(&self) -> u64 {
        self.stored
    }

    /// The timestamp the record got.
    pub fn time(&self) -> Timestamp {
        self.time
    }

    fn appended(&self) -> Appended {
        Appended {
            seq: self.seq,
            time: self.time,
        }
    }

    /// Blocks until the record is durable (in the journal, or in the file
    /// cache, from which it reaches the journal even across a crash).
    pub fn wait(self) -> Result<Appended> {
        let appended = self.appended();
        match self.durability {
            Durability::FileCache(cache, write_no) => {
                cache.sync_through(write_no).map(|()| appended)
            }
            Durability::Journal(reply) => match reply.recv() {
                Ok(Ok(())) => Ok(appended),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Error::Closed(self.closed)),
            },
        }
    }

    /// Whether the record waits in the file cache, whose durability is a
    /// flush of the cache's file (blocking, also when awaited).
    pub fn waits_on_file_cache(&self) -> bool {
        matches!(self.durability, Durability::FileCache(..))
    }

    /// The journal's answer, if it has come, without blocking: `None` while
    /// the record is on its way, and always for a record in the file cache
    /// (which has no answer of its own: it reaches the journal, or a
    /// failure stops the journal). After `Some`, the handle is spent.
    pub fn try_wait(&mut self) -> Option<Result<Appended>> {
        let appended = self.appended();
        match &self.durability {
            Durability::FileCache(..) => None,
            Durability::Journal(reply) => match reply.try_recv() {
                Ok(Ok(())) => Some(Ok(appended)),
                Ok(Err(e)) => Some(Err(e)),
                Err(oneshot::TryRecvError::Empty) => None,
                Err(oneshot::TryRecvError::Disconnected) => {
                    Some(Err(Error::Closed(self.closed.clone())))
                }
            },
        }
    }

    /// Blocks until the record is durable, or `timeout` has passed
    /// ([`Error::NotDurable`]; the record may still become durable later).
    pub fn wait_timeout(self, timeout: std::time::Duration) -> Result<Appended> {
        let appended = self.appended();
        match self.durability {
            Durability::FileCache(cache, write_no) => {
                cache.sync_through(write_no).map(|()| appended)
            }
            Durability::Journal(reply) => match reply.recv_timeout(timeout) {
                Ok(Ok(())) => Ok(appended),
                Ok(Err(e)) => Err(e),
                Err(oneshot::RecvTimeoutError::Timeout) => Err(Error::NotDurable {
                    seq: self.seq,
                    waited: timeout,
                }),
                Err(oneshot::RecvTimeoutError::Disconnected) => Err(Error::Closed(self.closed)),
            },
        }
    }
}

impl Future for AppendHandle {
    type Output = Result<Appended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let appended = self.appended();
        let closed = self.closed.clone();
        match &mut self.durability {
            // A flush of a few pages: done in place rather than on a thread.
            Durability::FileCache(cache, write_no) => {
                Poll::Ready(cache.sync_through(*write_no).map(|()| appended))
            }
            Durability::Journal(reply) => match Pin::new(reply).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(Ok(()))) => Poll::Ready(Ok(appended)),
                Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(e)),
                Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Closed(closed))),
            },
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
    /// Disk blocks are allocated (or known to be) up to here.
    allocated: u64,
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
        Ok(ActiveSegment {
            appender: SegmentAppender::open(
                options.fs.as_ref(),
                &segment,
                write_offset,
                options.direct_io,
            )?,
            // What lies beyond is allocated as batches get near (asking
            // for space already allocated costs nothing).
            allocated: write_offset,
            segment,
            entry,
        })
    }

    /// Makes sure disk blocks are allocated through `end`, and
    /// [`ALLOCATE_AHEAD`] beyond it, before a batch is written up to
    /// `end`: so the batch never waits for the filesystem to find space,
    /// and a full disk shows up here, a little ahead, as a clear error.
    fn allocate_through(&mut self, end: u64) -> Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let size = self.segment.header.segment_size;
        let to = (end + ALLOCATE_AHEAD).min(size);
        let from = self.allocated.min(to);
        self.appender
            .file()
            .allocate_range(from, to - from)
            .map_err(|e| Error::io_at("allocate segment", &self.segment.path, from, e))?;
        self.allocated = to;
        Ok(())
    }
}

struct Pending {
    seq: Seq,
    time: Timestamp,
    record: Payload,
    reply: Option<oneshot::Sender<Result<()>>>,
    charge: Option<CacheCharge>,
}

/// A record of a written batch, as the sync stage indexes it.
struct Written {
    header: RecordHeader,
    offset: u64,
    /// The body of a mark record (never compressed), for the tag index.
    mark_body: Option<Vec<u8>>,
}

/// A batch as the sync stage needs it, once written.
struct WrittenBatch {
    file: Arc<dyn crate::fs::FsFile>,
    path: std::path::PathBuf,
    segment: u64,
    end: u64,
    records: Vec<Written>,
    entry: SegmentEntry,
    replies: Vec<oneshot::Sender<Result<()>>>,
    /// The batch's room in the memory cache, given back when it is done.
    charge: Option<CacheCharge>,
    /// The newest seq of a record taken from the file cache, whose space is
    /// given back once the batch is durable.
    file_release: Option<Seq>,
}

impl WrittenBatch {
    /// Answers every appender of the batch with a failure caused by `cause`.
    fn fail(mut self, cause: &Error) {
        // Room is given back before anyone hears the outcome, so an
        // appender that was answered never finds its bytes still charged.
        drop(self.charge.take());
        for reply in self.replies {
            let _ = reply.send(Err(Error::AppendFailed {
                path: self.path.clone(),
                offset: self.end,
                reason: cause.to_string(),
                disk_full: cause.is_disk_full(),
            }));
        }
    }
}

/// What the encode stage hands the IO stage, in order.
enum ToIo {
    /// Write this, then pass the batch on.
    Batch(BatchWrite, Box<WrittenBatch>),
    /// Passed on as it is.
    Barrier(oneshot::Sender<Result<Seq>>),
}

/// What the IO stage hands the sync stage, in order.
enum ToSync {
    /// A batch written (not yet durable).
    Batch(Box<WrittenBatch>),
    /// Answered once everything before it is durable.
    Barrier(oneshot::Sender<Result<Seq>>),
}

/// The next segment, being made by a helper thread.
struct Spare {
    made: std::thread::JoinHandle<Result<Segment>>,
    /// Set when the segment is needed: its zero-fill stops where it got
    /// to (the rest stays unwritten, which only costs speed), so a roll
    /// or a close never waits for the zeros.
    needed: Arc<std::sync::atomic::AtomicBool>,
}

impl Spare {
    /// Says the segment is needed and waits for it.
    fn claim(self) -> std::thread::Result<Result<Segment>> {
        self.needed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.made.join()
    }
}

/// Below this many bytes per batch in the segment just filled, the next
/// one is zero-filled ahead of time (see `Segment::zero_fill`).
const ZERO_FILL_BELOW: u64 = 256 << 10;

/// How far the journal is durable: every segment before the first and every
/// byte of it before the second.
type SyncedTo = Arc<Mutex<(u64, u64)>>;

/// The encode stage's state.
pub struct Writer {
    shared: Arc<Shared>,
    active: ActiveSegment,
    rx: Receiver<Submission>,
    synced_to: SyncedTo,
    pool: BufferPool,
    /// The next segment, being made ahead of time.
    spare: Option<Spare>,
    /// Batches written to the active segment since it became active.
    batches_in_segment: u64,
    /// Items handed to the IO stage that the sync stage has not finished:
    /// while zero, nothing is between the stages and this thread may write,
    /// sync and index a small batch itself.
    in_flight: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("active", &self.active)
            .finish()
    }
}

impl Writer {
    /// A writer appending to `active`, whose bytes up to its write offset
    /// are durable (recovery found them there).
    pub fn new(shared: Arc<Shared>, active: ActiveSegment, rx: Receiver<Submission>) -> Self {
        let synced_to = Arc::new(Mutex::new((
            active.segment.id(),
            active.appender.write_offset(),
        )));
        let options = &shared.options;
        let max_batch = BATCH_HEADER_LEN
            + options.max_batch_bytes
            + crate::record::RECORD_HEADER_LEN
            + options.max_record_len as usize;
        // Two buffers: one being encoded while the other is written.
        let pool = BufferPool::new(2, max_batch);
        Writer {
            shared,
            active,
            rx,
            synced_to,
            pool,
            spare: None,
            batches_in_segment: 0,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Runs the three stages until every sender is gone and everything
    /// written is durable, then returns.
    pub fn run(mut self) {
        // A batch or two may wait between stages; beyond that the stage
        // before waits too, which bounds how far encoding runs ahead.
        let (to_io, from_encode) = std::sync::mpsc::sync_channel(1);
        let (to_sync, from_io) = std::sync::mpsc::sync_channel(2);
        let shared = self.shared.clone();
        let synced_to = self.synced_to.clone();
        let pool = self.pool.clone();
        let in_flight = self.in_flight.clone();
        std::thread::scope(|scope| {
            let io = std::thread::Builder::new()
                .name("tidemark-journal-io".into())
                .spawn_scoped(scope, {
                    let shared = shared.clone();
                    let in_flight = in_flight.clone();
                    move || io_stage(&shared, &from_encode, &to_sync, &pool, &in_flight)
                });
            let sync = std::thread::Builder::new()
                .name("tidemark-journal-sync".into())
                .spawn_scoped(scope, move || {
                    sync_stage(&shared, &from_io, &synced_to, &in_flight)
                });
            if let (Err(e), _) | (_, Err(e)) = (&io, &sync) {
                self.shared
                    .poison(format!("cannot start the journal's threads: {e}"));
            }
            self.encode_stage(&to_io);
            drop(to_io);
        });
        // A spare still being made (or zero-filled) would go on writing
        // into the journal's directory after it closed.
        if let Some(spare) = self.spare.take() {
            let _ = spare.claim();
        }
    }

    fn encode_stage(&mut self, to_io: &SyncSender<ToIo>) {
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
                        charge,
                    } => {
                        if !batch.is_empty() && bytes + record.encoded_len() > max_batch {
                            carry = Some(Submission::Append {
                                seq,
                                time,
                                record,
                                reply,
                                charge,
                            });
                            break;
                        }
                        bytes += record.encoded_len();
                        batch.push(Pending {
                            seq,
                            time,
                            record,
                            reply,
                            charge,
                        });
                    }
                    Submission::Barrier { reply } => barriers.push(reply),
                }
                next = self.rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.encode(batch, bytes, to_io);
            }
            for reply in barriers {
                if self.idle() {
                    settle(&self.shared, vec![ToSync::Barrier(reply)], &self.synced_to);
                    continue;
                }
                if let Err(ToIo::Barrier(reply)) = self.hand_on(to_io, ToIo::Barrier(reply)) {
                    let _ = reply.send(Err(self.stage_stopped()));
                }
            }
        }
    }

    /// Hands `item` to the IO stage, counted in flight until the sync stage
    /// is done with it; gives it back if the IO stage is gone.
    fn hand_on(&self, to_io: &SyncSender<ToIo>, item: ToIo) -> std::result::Result<(), ToIo> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        to_io.send(item).map_err(|gone| {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            gone.0
        })
    }

    /// Stops the journal because a stage thread after this one is gone
    /// (it panicked): nothing handed to it can become durable, and nothing
    /// encoded after it may be written. Without this, appenders waiting for
    /// room that only those stages give back would wait forever.
    fn stage_stopped(&self) -> Error {
        let reason = "the journal's write or sync thread stopped; reopen the journal \
                      (records acknowledged before are recovered from its segments)"
            .to_string();
        self.shared.poison(reason.clone());
        self.shared.poison_error(&reason)
    }

    /// Whether nothing is between the stages: every batch handed on is
    /// durable, indexed and answered.
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Encodes one batch of `bytes` and hands it to the IO stage — or, if
    /// it is small and the stages are idle, writes, syncs and indexes it
    /// here; on failure answers its appenders at once.
    fn encode(&mut self, batch: Vec<Pending>, bytes: usize, to_io: &SyncSender<ToIo>) {
        if let Some(e) = self.shared.poisoned() {
            for reply in batch.into_iter().filter_map(|p| p.reply) {
                let _ = reply.send(Err(self.shared.poison_error(&e)));
            }
            return;
        }
        let replies_path = self.active.segment.path.clone();
        let at = self.active.appender.write_offset();
        match self.encode_batch(&batch) {
            Ok((write, mut written)) => {
                for p in batch {
                    if matches!(p.record, Payload::File { .. }) {
                        written.file_release = Some(p.seq);
                    }
                    written.replies.extend(p.reply);
                    match (written.charge.as_mut(), p.charge) {
                        (Some(charge), Some(more)) => charge.absorb(more),
                        (None, more) => written.charge = more,
                        (Some(_), None) => {}
                    }
                }
                let written = Box::new(written);
                // For a small batch the stages' overlap saves little — a
                // pwrite of a few blocks — and their two thread hand-offs
                // cost more than that on a small machine; while this thread
                // syncs, the next writes gather into one larger batch
                // (under commit-per-write loads the flushes, not the bytes,
                // are the cost). Large batches keep the pipeline, where
                // writing one while the one before is flushed is what
                // reaches the disk's bandwidth.
                if bytes < self.shared.options.inline_batch_below && self.idle() {
                    if let Some(written) = write_batch(&self.shared, write, written, &self.pool) {
                        settle(&self.shared, vec![ToSync::Batch(written)], &self.synced_to);
                    }
                    return;
                }
                // The IO stage only goes away once this stage is done —
                // or when a stage thread died: then nothing after this
                // batch may be written either.
                if let Err(ToIo::Batch(write, written)) =
                    self.hand_on(to_io, ToIo::Batch(write, written))
                {
                    self.pool.give(write.into_buf());
                    written.fail(&self.stage_stopped());
                }
            }
            Err(e) => {
                let reason = e.to_string();
                let disk_full = e.is_disk_full();
                if batch
                    .iter()
                    .any(|p| matches!(p.record, Payload::File { .. }))
                {
                    // Records acknowledged from the file cache must reach the
                    // journal before any later record does, or the start-up
                    // replay would take them for journalled: stop here, and
                    // let a reopen journal them from the file cache.
                    self.shared.poison(format!(
                        "a batch holding file-cache records failed: {reason}"
                    ));
                }
                for reply in batch.into_iter().filter_map(|p| p.reply) {
                    let _ = reply.send(Err(Error::AppendFailed {
                        path: replies_path.clone(),
                        offset: at,
                        reason: reason.clone(),
                        disk_full,
                    }));
                }
            }
        }
    }

    /// Encodes one batch into a buffer of the pool.
    fn encode_batch(&mut self, batch: &[Pending]) -> Result<(BatchWrite, WrittenBatch)> {
        let (first_seq, last_seq) = match (batch.first(), batch.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => return Err(Error::Invalid("empty batch".into())),
        };
        let len = BATCH_HEADER_LEN + batch.iter().map(|p| p.record.encoded_len()).sum::<usize>();
        if self.active.appender.write_offset() + len as u64
            > self.active.segment.header.segment_size
        {
            self.roll(first_seq)?;
        }
        self.active
            .allocate_through(self.active.appender.write_offset() + len as u64)?;
        let (durable_segment, durable_end) = *self.synced_to.lock();
        let frame = BatchFrame {
            count: batch.len() as u32,
            body_len: (len - BATCH_HEADER_LEN) as u64,
            first_seq,
            last_seq,
            epoch: self.shared.epoch(),
            durable_segment,
            durable_end,
        };
        let at = self.active.appender.write_offset();
        let file_cache = self.shared.file_cache_now();
        let buf = self.active.appender.batch_buffer(&self.pool, len)?;
        buf[..BATCH_HEADER_LEN].copy_from_slice(&frame.encode());
        let mut offsets = Vec::with_capacity(batch.len());
        let mut pos = BATCH_HEADER_LEN;
        for p in batch {
            offsets.push(pos as u64);
            pos += p
                .record
                .encode_to(p.seq, p.time, &mut buf[pos..], file_cache.as_deref())?;
        }
        let write = self.active.appender.finish(len)?;
        self.batches_in_segment += 1;
        let end = self.active.appender.write_offset();

        let segment_id = self.active.segment.id();
        let mut records = Vec::with_capacity(batch.len());
        for (p, offset) in batch.iter().zip(offsets) {
            let header = p.record.header(p.seq, p.time);
            let mark_body = p.record.mark_body();
            records.push(Written {
                header,
                offset: at + offset,
                mark_body,
            });
        }
        let entry = self.active.entry.get_or_insert(SegmentEntry {
            id: segment_id,
            first_seq,
            last_seq,
            first_time: batch.first().map_or(Timestamp::default(), |p| p.time),
            last_time: Timestamp::default(),
            used_bytes: 0,
            records: 0,
        });
        entry.last_seq = last_seq;
        entry.last_time = batch.last().map_or(entry.last_time, |p| p.time);
        entry.records += batch.len() as u64;
        entry.used_bytes = end;
        let written = WrittenBatch {
            file: self.active.appender.file().clone(),
            path: self.active.segment.path.clone(),
            segment: segment_id,
            end,
            records,
            entry: *entry,
            replies: Vec::with_capacity(batch.len()),
            charge: None,
            file_release: None,
        };
        Ok((write, written))
    }

    /// Moves on to the next segment for a batch beginning at `first_seq`.
    /// Batches of the previous segment may still be on their way to the
    /// disk; the batches' durable watermarks keep recovery exact across the
    /// switch. The next segment is normally made ahead of time.
    fn roll(&mut self, first_seq: Seq) -> Result<()> {
        let id = self.active.segment.id() + 1;
        let segment = match self.spare.take().map(Spare::claim) {
            Some(Ok(Ok(segment))) if segment.id() == id => segment,
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "making the next segment ahead of time failed; trying again now");
                self.create_segment(id, first_seq)?
            }
            _ => self.create_segment(id, first_seq)?,
        };
        let segment = Arc::new(segment);
        let active = ActiveSegment::open(
            segment.clone(),
            SEGMENT_HEADER_LEN as u64,
            None,
            &self.shared.options,
        )?;
        self.shared.add_segment(segment);
        tracing::debug!(segment = id, first_seq, "rolled to a new segment");
        // Small batches pay most for writing into unwritten blocks (see
        // `Segment::zero_fill`); large ones would pay the zeros' bandwidth.
        let zero = self.batches_in_segment > 0
            && self.active.appender.write_offset() / self.batches_in_segment < ZERO_FILL_BELOW;
        self.active = active;
        self.batches_in_segment = 0;
        self.prepare_spare(first_seq, zero);
        Ok(())
    }

    fn create_segment(&self, id: u64, first_seq: Seq) -> Result<Segment> {
        Segment::create(
            self.shared.options.fs.as_ref(),
            &self.shared.segments_dir,
            self.segment_header(id, first_seq),
            self.shared.options.io_hooks.as_ref(),
        )
    }

    fn segment_header(&self, id: u64, first_seq: Seq) -> SegmentHeader {
        SegmentHeader {
            group_id: self.shared.group_id,
            segment_id: id,
            first_seq,
            segment_size: self.shared.options.segment_size,
            created: self.shared.options.clock.now(),
        }
    }

    /// Starts making the segment after the active one in the background,
    /// so a roll does not wait for allocation and fsyncs. Every record it
    /// will hold comes after `after_seq`. With `zero`, its body is written
    /// with zeros too.
    fn prepare_spare(&mut self, after_seq: Seq, zero: bool) {
        let header = self.segment_header(self.active.segment.id() + 1, after_seq + 1);
        let dir = self.shared.segments_dir.clone();
        let hooks = self.shared.options.io_hooks.clone();
        let fs = self.shared.options.fs.clone();
        let needed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = needed.clone();
        let made = std::thread::Builder::new()
            .name("tidemark-journal-segment".into())
            .spawn(move || {
                let segment = Segment::create(fs.as_ref(), &dir, header, hooks.as_ref())?;
                if zero {
                    if let Err(e) = segment.zero_fill(fs.as_ref(), &stop) {
                        // Only slower: unwritten blocks read as zeros too.
                        tracing::warn!(segment = %segment.path.display(), error = %e, "zero-filling the next segment failed; using it as it is");
                    }
                }
                Ok(segment)
            });
        self.spare = made.ok().map(|made| Spare { made, needed });
    }
}

/// The IO stage: writes encoded batches, in order, and passes them on.
fn io_stage(
    shared: &Shared,
    from_encode: &Receiver<ToIo>,
    to_sync: &SyncSender<ToSync>,
    pool: &BufferPool,
    in_flight: &AtomicUsize,
) {
    while let Ok(job) = from_encode.recv() {
        let passed = match job {
            ToIo::Barrier(reply) => to_sync.send(ToSync::Barrier(reply)),
            ToIo::Batch(write, batch) => match write_batch(shared, write, batch, pool) {
                Some(batch) => to_sync.send(ToSync::Batch(batch)),
                None => {
                    // Answered already; the sync stage never sees it.
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
            },
        };
        if passed.is_err() {
            return;
        }
    }
}

/// Writes one encoded batch and gives its buffer back. Returns the batch
/// for the sync stage, or `None` once it has been failed (the journal is
/// poisoned, or the write failed and poisoned it: later batches were
/// encoded to follow this one, so none of them may be written now).
fn write_batch(
    shared: &Shared,
    mut write: BatchWrite,
    batch: Box<WrittenBatch>,
    pool: &BufferPool,
) -> Option<Box<WrittenBatch>> {
    if let Some(e) = shared.poisoned() {
        pool.give(write.into_buf());
        batch.fail(&e);
        return None;
    }
    match write_waiting_out_full_disk(shared, &mut write) {
        Ok(()) => {
            pool.give(write.into_buf());
            Some(batch)
        }
        Err(e) => {
            let err = write.error(e);
            pool.give(write.into_buf());
            shared.poison(err.to_string());
            batch.fail(&err);
            None
        }
    }
}

/// Writes a batch. A full disk is waited out — retried every 100 ms until
/// space returns or the journal closes — so appenders see a stall (and
/// time out at their own pace) rather than a failure, and nothing on disk
/// changes until the write can succeed.
fn write_waiting_out_full_disk(shared: &Shared, write: &mut BatchWrite) -> std::io::Result<()> {
    let mut warned = false;
    loop {
        match write.write(shared.options.io_hooks.as_ref()) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                if shared.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(e);
                }
                if !warned {
                    tracing::warn!(journal = %shared.dir.display(), "the journal's disk is full; writes wait for space");
                    warned = true;
                }
                shared
                    .disk_full_waits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// The sync stage: makes written batches durable, indexes them, publishes
/// them to readers and answers their appenders, in order.
fn sync_stage(
    shared: &Shared,
    from_io: &Receiver<ToSync>,
    synced_to: &Mutex<(u64, u64)>,
    in_flight: &AtomicUsize,
) {
    while let Ok(first) = from_io.recv() {
        let mut items = vec![first];
        while let Ok(more) = from_io.try_recv() {
            items.push(more);
        }
        let count = items.len();
        settle(shared, items, synced_to);
        // Only now may the encode stage work on its own: everything it
        // handed on is published.
        in_flight.fetch_sub(count, Ordering::AcqRel);
    }
}

/// Makes written batches durable (one fdatasync per segment file covers
/// every batch written to it so far), indexes and publishes them, and
/// answers their appenders and the barriers among them, in order.
fn settle(shared: &Shared, items: Vec<ToSync>, synced_to: &Mutex<(u64, u64)>) {
    let mut synced: Vec<u64> = Vec::new();
    let mut failure: Option<Error> = shared.poisoned();
    for item in &items {
        if let ToSync::Batch(batch) = item {
            if failure.is_some() || synced.contains(&batch.segment) {
                continue;
            }
            let hooks = shared.options.io_hooks.as_ref();
            match hooks
                .before_sync(&batch.path)
                .and_then(|()| batch.file.sync_data())
            {
                Ok(()) => synced.push(batch.segment),
                Err(e) => {
                    let err = Error::io("fsync segment", &batch.path, e);
                    shared.poison(err.to_string());
                    failure = Some(err);
                }
            }
        }
    }
    for item in items {
        match item {
            ToSync::Batch(mut batch) => {
                if let Some(e) = &failure {
                    batch.fail(e);
                    continue;
                }
                // The batch is durable on disk either way.
                *synced_to.lock() = (batch.segment, batch.end);
                if let Err(e) = index_batch(shared, batch.segment, &batch.records, &batch.entry) {
                    // Later batches may not be published past this one:
                    // stop, and let a reopen index it from the segment.
                    shared.poison(e.to_string());
                    batch.fail(&e);
                    failure = Some(e);
                    continue;
                }
                if let (Some(seq), Some(cache)) = (batch.file_release, shared.file_cache_now()) {
                    cache.release_through(seq);
                }
                drop(batch.charge.take());
                for reply in batch.replies {
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

/// How long a failing index write is retried before its batch is failed.
/// RocksDB fails writes while its disk is full or briefly unhealthy; a
/// stall of a few seconds is better than a journal that stops.
pub const INDEX_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Indexes a durable batch (retrying a failing write for up to
/// [`INDEX_RETRY`]) and only then publishes it to readers. On failure
/// nothing is published: readers never see a newest seq whose records the
/// index lacks.
fn index_batch(
    shared: &Shared,
    segment: u64,
    records: &[Written],
    entry: &SegmentEntry,
) -> Result<()> {
    let Some(last) = records.last() else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + INDEX_RETRY;
    let mut warned = false;
    loop {
        let mut batch = shared.index.batch();
        let indexed = shared
            .options
            .io_hooks
            .before_index_write(shared.index.path())
            .map_err(|e| Error::io("write index", shared.index.path(), e))
            .and_then(|()| {
                records.iter().try_for_each(|r| {
                    batch.add_record(&r.header, segment, r.offset, r.mark_body.as_deref())
                })
            })
            .and_then(|()| batch.set_segment(entry))
            .and_then(|()| batch.commit(last.header.seq));
        match indexed {
            Ok(()) => break,
            Err(e)
                if std::time::Instant::now() < deadline
                    && !shared.closing.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                if !warned {
                    tracing::warn!(journal = %shared.dir.display(), seq = last.header.seq, error = %e, "index update failed; retrying");
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                return Err(Error::NotIndexed {
                    seq: last.header.seq,
                    segment: crate::segment::segment_path(&shared.segments_dir, segment),
                    index: shared.index.path().to_path_buf(),
                    reason: e.to_string(),
                })
            }
        }
    }
    shared.set_catalogue(*entry);
    shared
        .durable_segment
        .fetch_max(segment, std::sync::atomic::Ordering::SeqCst);
    shared.set_durable(last.header.seq, last.header.timestamp);
    Ok(())
}
