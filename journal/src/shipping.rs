//! Reading the journal to ship it to another site: durable records exactly
//! as the segments hold them (header, payload, CRC), in seq order, with the
//! epoch of the batch each was written in; and the other side, appending
//! records shipped from another site's journal with their seqs and
//! timestamps unchanged, so both journals hold the same records.
//!
//! A [`RawCursor`] remembers where the last read stopped, so a stream that
//! follows the journal reads each segment once, not once per call.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::memory_cache::Admission;
use crate::point::{Seq, Timestamp};
use crate::record::{decode_record, RecordHeader, RecordKind};
use crate::segment::SEGMENT_HEADER_LEN;
use crate::writer::AppendHandle;

/// A record as a segment holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// Its decoded header.
    pub header: RecordHeader,
    /// The encoded record: header, then stored payload.
    pub bytes: Vec<u8>,
    /// The fencing epoch of the batch it was written in.
    pub epoch: u64,
}

/// Where [`Journal::read_raw`] stopped: the batch that holds `next_seq`
/// (or follows it) starts at `offset` of segment `segment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCursor {
    segment: u64,
    offset: u64,
    /// The seq the cursor is for, and the one before it.
    next_seq: Seq,
    prev_seq: Seq,
}

impl RawCursor {
    /// The seq the cursor is for: the next record read from it has this
    /// seq or a higher one.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }
}

/// What [`Journal::read_raw`] found.
#[derive(Debug)]
pub struct RawBatch {
    /// The records, in seq order (empty when nothing newer is durable).
    pub records: Vec<RawRecord>,
    /// The seq of the record before the first one (`from - 1` when the
    /// journal holds every seq; lower after a gap).
    pub prev_seq: Seq,
    /// Where to go on from.
    pub cursor: RawCursor,
}

impl Journal {
    /// Durable records with seq ≥ `from`, in order, up to about
    /// `max_bytes` (at least one batch), continuing from `cursor` when it
    /// was returned for `from`. A `from` at or below the horizon is
    /// [`Error::PointOutOfRange`]: that history was retained away.
    pub fn read_raw(
        &self,
        from: Seq,
        cursor: Option<RawCursor>,
        max_bytes: usize,
    ) -> Result<RawBatch> {
        let shared = self.shared();
        let history = shared.history();
        if from <= history.horizon_seq && from > 0 {
            return Err(Error::PointOutOfRange {
                volume: shared.manifest.read().group.clone(),
                point: format!("seq {from}"),
                available: history.to_string(),
            });
        }
        let durable = history.newest_seq;
        let empty = |cursor| RawBatch {
            records: Vec::new(),
            prev_seq: from.saturating_sub(1),
            cursor,
        };
        // The newest seq known to come before `from` where a fresh scan
        // starts (its segment's earlier records are checked as it goes).
        let mut floor = 0;
        let start = match cursor.filter(|c| c.next_seq == from) {
            Some(c) => c,
            None => {
                // The first segment holding a record at or after `from`.
                let catalogue = shared.catalogue.lock();
                let Some(entry) = catalogue.values().find(|e| e.last_seq >= from) else {
                    let at = RawCursor {
                        segment: shared.durable_segment.load(Ordering::SeqCst),
                        offset: SEGMENT_HEADER_LEN as u64,
                        next_seq: from,
                        prev_seq: 0,
                    };
                    return Ok(empty(at));
                };
                // The record before the segment's first: the newest of
                // the segments before it, or one folded into the base.
                let before = catalogue
                    .values()
                    .map(|e| e.last_seq)
                    .filter(|&s| s < from)
                    .max()
                    .unwrap_or(0)
                    .max(history.horizon_seq);
                floor = before;
                RawCursor {
                    segment: entry.id,
                    offset: SEGMENT_HEADER_LEN as u64,
                    next_seq: from,
                    prev_seq: 0,
                }
            }
        };
        if from > durable {
            return Ok(empty(start));
        }
        let _fold = shared.fold.read();
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut at = start;
        let mut prev_seq = None;
        loop {
            let Ok(segment) = shared.segment(at.segment) else {
                break;
            };
            let mut done = false;
            let mut last_end = at.offset;
            let mut last_seq = at.prev_seq;
            segment.batches_from(at.offset, at.prev_seq, |frame, end, batch| {
                if frame.last_seq > durable {
                    done = true;
                    return Ok(false);
                }
                for (header, offset) in batch {
                    if header.seq < from {
                        last_seq = header.seq;
                        continue;
                    }
                    let raw = segment.bytes(*offset, header.encoded_len())?.to_vec();
                    prev_seq.get_or_insert(last_seq.max(floor));
                    last_seq = header.seq;
                    bytes += raw.len();
                    records.push(RawRecord {
                        header: *header,
                        bytes: raw,
                        epoch: frame.epoch,
                    });
                }
                last_seq = frame.last_seq;
                last_end = end;
                if bytes >= max_bytes || frame.last_seq >= durable {
                    done = true;
                    return Ok(false);
                }
                Ok(true)
            })?;
            at = RawCursor {
                segment: at.segment,
                offset: last_end,
                next_seq: last_seq + 1,
                prev_seq: last_seq,
            };
            if done {
                break;
            }
            // This segment ends here: on to the next one that holds records.
            let next = shared
                .catalogue
                .lock()
                .range(at.segment + 1..)
                .next()
                .map(|(&id, _)| id);
            match next {
                Some(id) => {
                    at = RawCursor {
                        segment: id,
                        offset: SEGMENT_HEADER_LEN as u64,
                        next_seq: last_seq + 1,
                        prev_seq: last_seq,
                    }
                }
                None => break,
            }
        }
        Ok(RawBatch {
            prev_seq: prev_seq.unwrap_or(from.saturating_sub(1)),
            records,
            cursor: RawCursor {
                next_seq: at.next_seq.max(from),
                ..at
            },
        })
    }

    /// Appends records shipped from another site's journal, keeping their
    /// seqs and timestamps: `prev_seq` must be this journal's newest seq
    /// (what the sender had before them), and each record must verify and
    /// follow the one before. Waits for cache room. Returns the handle of
    /// the last record (durable in order, so it stands for all of them).
    pub fn append_shipped(
        &self,
        prev_seq: Seq,
        records: &[RawRecord],
    ) -> Result<Option<AppendHandle>> {
        let shared = self.shared();
        let dir = shared.dir.clone();
        let refuse = |reason: String| Error::Invalid(format!("shipped records refused: {reason}"));
        let mut checked = Vec::with_capacity(records.len());
        let mut expect_after = prev_seq;
        for raw in records {
            let (header, _) = decode_record(&raw.bytes, &dir, 0)
                .map_err(|e| refuse(format!("a record does not verify ({e})")))?;
            if header.seq <= expect_after {
                return Err(refuse(format!(
                    "record seq {} does not follow seq {expect_after}",
                    header.seq
                )));
            }
            if header.kind != RecordKind::Flush
                && header.kind != RecordKind::Mark
                && shared.volume_by_id(header.volume).is_err()
            {
                return Err(refuse(format!(
                    "record seq {} is for volume #{}, which this journal does not hold",
                    header.seq, header.volume
                )));
            }
            expect_after = header.seq;
            checked.push(header);
        }
        let total: u64 = records.iter().map(|r| r.bytes.len() as u64).sum();
        let charge = shared
            .memory
            .admit(total, Admission::Wait)
            .ok_or_else(|| Error::Closed(dir.clone()))?;
        let shipped = records
            .iter()
            .zip(checked)
            .map(|(raw, header)| (header, raw.bytes.clone()))
            .collect();
        self.sequence_shipped(prev_seq, shipped, charge)
    }
}

impl RawRecord {
    /// The record's timestamp.
    pub fn time(&self) -> Timestamp {
        self.header.timestamp
    }
}
