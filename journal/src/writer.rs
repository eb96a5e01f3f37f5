//! The journal writer: one thread that turns a stream of sequenced records
//! into durable, indexed batches.
//!
//! Appenders send [`Submission`]s in seq order. The writer takes the first
//! one, drains whatever else is already waiting (bounded by bytes), writes
//! all of it as one batch with one `pwrite`, makes it durable with one
//! `fdatasync`, indexes it with one RocksDB write, and only then answers
//! every appender. While it waits on the disk, the next batch gathers in
//! the channel: that is the group commit.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crossbeam_channel::Receiver;

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
    /// Open for writing.
    pub file: File,
    /// Mapped for reading (shared with readers).
    pub segment: Arc<Segment>,
    /// Where the next batch goes.
    pub write_offset: u64,
    /// Its catalogue line, kept current after every batch.
    pub entry: Option<SegmentEntry>,
}

/// The writer thread's state.
pub struct Writer {
    shared: Arc<Shared>,
    active: ActiveSegment,
    rx: Receiver<Submission>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("active", &self.active)
            .finish()
    }
}

struct Pending {
    seq: Seq,
    time: Timestamp,
    record: PreparedRecord,
    reply: oneshot::Sender<Result<()>>,
}

impl Writer {
    /// A writer appending to `active`.
    pub fn new(shared: Arc<Shared>, active: ActiveSegment, rx: Receiver<Submission>) -> Self {
        Writer {
            shared,
            active,
            rx,
            buf: Vec::new(),
        }
    }

    /// Runs until every sender is gone, then returns.
    pub fn run(mut self) {
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
                self.commit(batch);
            }
            for reply in barriers {
                let answer = match self.shared.poisoned() {
                    Some(e) => Err(e),
                    None => Ok(self.shared.durable().0),
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Writes, syncs and indexes one batch, then answers its appenders.
    fn commit(&mut self, batch: Vec<Pending>) {
        if let Some(e) = self.shared.poisoned() {
            for p in batch {
                let _ = p.reply.send(Err(self.shared.poison_error(&e)));
            }
            return;
        }
        match self.write_batch(&batch) {
            Ok(()) => {
                for p in batch {
                    let _ = p.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(Error::AppendFailed {
                        path: self.active.segment.path.clone(),
                        offset: self.active.write_offset,
                        reason: reason.clone(),
                    }));
                }
            }
        }
    }

    fn write_batch(&mut self, batch: &[Pending]) -> Result<()> {
        let (first_seq, last_seq) = match (batch.first(), batch.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => return Ok(()),
        };
        self.buf.clear();
        self.buf.resize(BATCH_HEADER_LEN, 0);
        let mut offsets = Vec::with_capacity(batch.len());
        for p in batch {
            offsets.push(self.buf.len());
            p.record.encode_into(p.seq, p.time, &mut self.buf);
        }
        let frame = BatchFrame {
            count: batch.len() as u32,
            body_len: (self.buf.len() - BATCH_HEADER_LEN) as u64,
            first_seq,
            last_seq,
            epoch: self.shared.epoch(),
        };
        self.buf[..BATCH_HEADER_LEN].copy_from_slice(&frame.encode());

        if self.active.write_offset + self.buf.len() as u64
            > self.active.segment.header.segment_size
        {
            self.roll(first_seq)?;
        }
        let at = self.active.write_offset;
        let path = self.active.segment.path.clone();
        if let Err(e) = self.active.file.write_all_at(&self.buf, at) {
            // Nothing was acknowledged and the next batch overwrites these
            // bytes; clearing the frame keeps a crash before then from
            // finding a complete-looking batch that was reported failed.
            let _ = self.active.file.write_all_at(&[0u8; BATCH_HEADER_LEN], at);
            return Err(Error::io("write segment", &path, e));
        }
        if let Err(e) = self.active.file.sync_data() {
            let err = Error::io("fsync segment", &path, e);
            self.shared.poison(err.to_string());
            return Err(err);
        }
        self.active.write_offset += self.buf.len() as u64;

        let segment_id = self.active.segment.id();
        let mut index_batch = self.shared.index.batch();
        let mut indexed = Ok(());
        for (p, offset) in batch.iter().zip(&offsets) {
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
                .then_some(p.record.stored.as_slice());
            let record_offset = at + *offset as u64;
            if let Err(e) = index_batch.add_record(&header, segment_id, record_offset, mark_body) {
                indexed = Err(e);
                break;
            }
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
            entry.used_bytes = self.active.write_offset;
        }
        let indexed = indexed.and_then(|()| {
            if let Some(entry) = &self.active.entry {
                index_batch.set_segment(entry)?;
                self.shared.set_catalogue(*entry);
            }
            index_batch.commit(last_seq)
        });
        if let Err(e) = indexed {
            // The batch is durable, so it is acknowledged, but reads would
            // not find it: stop appending until a reopen re-indexes it from
            // the segment.
            self.shared
                .poison(format!("index update after seq {last_seq} failed: {e}"));
        }
        let last_time = batch.last().map_or(Timestamp::default(), |p| p.time);
        self.shared.set_durable(last_seq, last_time);
        Ok(())
    }

    /// Starts a new segment for a batch beginning at `first_seq`.
    fn roll(&mut self, first_seq: Seq) -> Result<()> {
        let header = SegmentHeader {
            group_id: self.shared.group_id,
            segment_id: self.active.segment.id() + 1,
            first_seq,
            segment_size: self.shared.options.segment_size,
            created: self.shared.options.clock.now(),
        };
        let (file, segment) = Segment::create(&self.shared.segments_dir, header)?;
        let segment = Arc::new(segment);
        self.shared.add_segment(segment.clone());
        tracing::debug!(
            segment = header.segment_id,
            first_seq,
            "rolled to a new segment"
        );
        self.active = ActiveSegment {
            file,
            segment,
            write_offset: SEGMENT_HEADER_LEN as u64,
            entry: None,
        };
        Ok(())
    }
}
