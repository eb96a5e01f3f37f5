//! Point-in-time reads.
//!
//! A read of volume V at point P starts from the base image (V at the
//! horizon) and paints over it, block by block, the newest retained record
//! at or before P that covers each byte. For every 4 KiB block one seek
//! finds the newest version; older versions are visited only while part of
//! the block is still uncovered (unaligned writes).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::index::{BlockEntry, RangeEntry, INDEX_BLOCK};
use crate::journal::Shared;
use crate::point::{Point, Seq};
use crate::record::{payload_bytes, RecordKind};
use crate::segment::Segment;
use crate::volume::VolumeInfo;

/// Payloads decoded during one read, by (segment, record offset), with the
/// volume offset of each.
type PayloadCache = HashMap<(u64, u64), (u64, Payload)>;

/// A write's payload: a range of its mapped segment when it was stored as
/// is (no copy at all), else its decompressed bytes.
#[derive(Clone, Debug)]
enum Payload {
    Mapped(Arc<Segment>, std::ops::Range<usize>),
    Owned(Arc<Vec<u8>>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Mapped(segment, range) => &segment.data()[range.clone()],
            Payload::Owned(data) => data,
        }
    }

    /// Memory it holds of its own.
    fn owned_len(&self) -> usize {
        match self {
            Payload::Mapped(..) => 0,
            Payload::Owned(data) => data.len(),
        }
    }
}

/// Payloads decoded by recent reads, shared between them: a copy tool
/// reads a large record in several requests (nbdcopy: 256 KiB at a time),
/// and each would otherwise checksum and copy all of it again. Bounded by
/// bytes, oldest first out; keyed by segment, offset and seq (segments are
/// immutable and their ids never reused).
#[derive(Debug, Default)]
pub(crate) struct RecentPayloads {
    entries: std::collections::VecDeque<RecentPayload>,
    bytes: usize,
}

#[derive(Debug)]
struct RecentPayload {
    key: (u64, u64),
    seq: Seq,
    volume_offset: u64,
    data: Payload,
}

/// Mapped payloads kept at most (they hold no memory of their own, only
/// their segment's mapping).
const RECENT_PAYLOADS: usize = 64;

/// What [`RecentPayloads`] keeps at most.
const RECENT_PAYLOAD_BYTES: usize = 8 << 20;

impl RecentPayloads {
    fn get(&mut self, key: (u64, u64), seq: Seq) -> Option<(u64, Payload)> {
        let i = self
            .entries
            .iter()
            .position(|e| e.key == key && e.seq == seq)?;
        let entry = self.entries.remove(i)?;
        let hit = (entry.volume_offset, entry.data.clone());
        self.entries.push_back(entry);
        Some(hit)
    }

    fn put(&mut self, key: (u64, u64), seq: Seq, volume_offset: u64, data: Payload) {
        if data.owned_len() > RECENT_PAYLOAD_BYTES / 2 {
            return;
        }
        self.bytes += data.owned_len();
        self.entries.push_back(RecentPayload {
            key,
            seq,
            volume_offset,
            data,
        });
        while self.bytes > RECENT_PAYLOAD_BYTES || self.entries.len() > RECENT_PAYLOADS {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= old.data.owned_len(),
                None => break,
            }
        }
    }
}

/// The versions that supply a block's bytes, newest first: a block-index
/// entry, or `None` for a large zero/trim range; each with the pieces of
/// the block it supplies.
type Versions = Vec<(Option<BlockEntry>, Vec<(u16, u16)>)>;

/// Byte ranges within one block that no newer version has covered yet.
/// At most a handful: each version covers one contiguous range.
#[derive(Debug)]
struct Uncovered(Vec<(u16, u16)>);

impl Uncovered {
    /// Removes `[lo, hi)` and returns the parts of it that were uncovered.
    fn take(&mut self, lo: u16, hi: u16) -> Vec<(u16, u16)> {
        let mut taken = Vec::new();
        let mut rest = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            let (s, e) = (a.max(lo), b.min(hi));
            if s >= e {
                rest.push((a, b));
                continue;
            }
            taken.push((s, e));
            if a < s {
                rest.push((a, s));
            }
            if e < b {
                rest.push((e, b));
            }
        }
        self.0 = rest;
        taken
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Shared {
    /// Reads `buf.len()` bytes of `volume` at `offset` as of `point`.
    pub fn read(&self, volume: &str, offset: u64, buf: &mut [u8], point: Point) -> Result<Seq> {
        let info = self.volume(volume)?;
        if !buf.is_empty() {
            info.check_range(offset, buf.len() as u64)?;
        }
        // Held for the whole read: a retention fold changes the base image
        // and the horizon together, and neither may move under us.
        let _fold = self.fold.read();
        if self.manifest.read().rebasing.is_some() {
            return Err(Error::Rebasing(self.dir.clone()));
        }
        let seq = self.resolve(volume, point)?;
        let horizon = self.manifest.read().horizon_seq;
        self.read_at(&info, offset, buf, seq, horizon)?;
        Ok(seq)
    }

    fn read_at(
        &self,
        info: &VolumeInfo,
        offset: u64,
        buf: &mut [u8],
        seq: Seq,
        horizon: Seq,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.base(info.id)?.read_into(offset, buf)?;
        if seq <= horizon {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut iter = self.index.block_iter()?;
        let ranges = self.index.ranges(info.id, horizon, seq, offset, end)?;
        // Payloads decoded during this read: a large write spans many
        // blocks and is decompressed once.
        let mut payloads = PayloadCache::new();
        for block in offset / INDEX_BLOCK..=(end - 1) / INDEX_BLOCK {
            let block_start = block * INDEX_BLOCK;
            let lo = offset.max(block_start) - block_start;
            let hi = end.min(block_start + INDEX_BLOCK) - block_start;
            let mut uncovered = Uncovered(vec![(lo as u16, hi as u16)]);
            let mut versions: Versions = Vec::new();
            // Large zero/trim ranges over this block, newest first, merged
            // by seq with the block's own versions.
            let mut over_block = ranges
                .iter()
                .filter(|r| {
                    r.offset < block_start + INDEX_BLOCK && r.offset + r.length > block_start
                })
                .peekable();
            let cover_range =
                |r: &RangeEntry, uncovered: &mut Uncovered, versions: &mut Versions| {
                    let a = r.offset.max(block_start) - block_start;
                    let b = (r.offset + r.length).min(block_start + INDEX_BLOCK) - block_start;
                    let pieces = uncovered.take(a as u16, b as u16);
                    if !pieces.is_empty() {
                        versions.push((None, pieces));
                    }
                };
            self.index
                .block_versions(&mut iter, info.id, block, seq, horizon, |entry| {
                    while let Some(r) = over_block.next_if(|r| r.seq > entry.seq) {
                        cover_range(r, &mut uncovered, &mut versions);
                    }
                    let pieces = uncovered.take(entry.lo, entry.hi);
                    if !pieces.is_empty() {
                        versions.push((Some(entry), pieces));
                    }
                    Ok(!uncovered.is_empty())
                })?;
            for r in over_block {
                if uncovered.is_empty() {
                    break;
                }
                cover_range(r, &mut uncovered, &mut versions);
            }
            for (entry, pieces) in versions {
                for (a, b) in pieces {
                    let at = block_start + a as u64;
                    let dst = &mut buf
                        [(at - offset) as usize..(block_start + b as u64 - offset) as usize];
                    match entry {
                        Some(entry) if entry.kind == RecordKind::Write => {
                            let (record_offset, payload) = self.payload(&entry, &mut payloads)?;
                            let data = payload.bytes();
                            let src = (at - record_offset) as usize;
                            let piece = data.get(src..src + dst.len()).ok_or_else(|| {
                                Error::corruption(
                                    crate::segment::segment_path(&self.segments_dir, entry.segment),
                                    entry.offset,
                                    format!(
                                        "record seq {} does not cover volume {} byte {at} as the index says",
                                        entry.seq, info.name
                                    ),
                                )
                            })?;
                            dst.copy_from_slice(piece);
                        }
                        _ => dst.fill(0),
                    }
                }
            }
        }
        Ok(())
    }

    /// The volume offset and decoded payload of the write `entry` points at.
    fn payload(&self, entry: &BlockEntry, cache: &mut PayloadCache) -> Result<(u64, Payload)> {
        let key = (entry.segment, entry.offset);
        if let Some(hit) = cache.get(&key) {
            return Ok(hit.clone());
        }
        if let Some(hit) = self.recent_payloads.lock().get(key, entry.seq) {
            cache.insert(key, hit.clone());
            return Ok(hit);
        }
        let segment = self.segment(entry.segment)?;
        let (header, stored) = segment.record_at(entry.offset)?;
        if header.seq != entry.seq || header.kind != RecordKind::Write {
            return Err(Error::corruption(
                &segment.path,
                entry.offset,
                format!(
                    "index says a write with seq {} is here, found a {} with seq {}",
                    entry.seq,
                    header.kind.name(),
                    header.seq
                ),
            ));
        }
        let data = if header.compressed {
            Payload::Owned(Arc::new(payload_bytes(
                &header,
                stored,
                &segment.path,
                entry.offset,
            )?))
        } else {
            // Checked by `record_at` (CRC); read in place.
            let start = stored.as_ptr() as usize - segment.data().as_ptr() as usize;
            Payload::Mapped(segment.clone(), start..start + stored.len())
        };
        cache.insert(key, (header.offset, data.clone()));
        self.recent_payloads
            .lock()
            .put(key, header.seq, header.offset, data.clone());
        Ok((header.offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::Uncovered;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn recent_payloads_stay_within_their_bytes() {
        use super::{Payload, RecentPayloads, RECENT_PAYLOAD_BYTES};
        use std::sync::Arc;
        let mut recent = RecentPayloads::default();
        let mib = Payload::Owned(Arc::new(vec![7u8; 1 << 20]));
        for i in 0..20u64 {
            recent.put((1, i), i, i << 20, mib.clone());
        }
        assert!(recent.bytes <= RECENT_PAYLOAD_BYTES);
        assert!(recent.get((1, 0), 0).is_none(), "the oldest went first");
        assert_eq!(recent.get((1, 19), 19).unwrap().0, 19 << 20);
        assert!(
            recent.get((1, 19), 18).is_none(),
            "another seq is another record"
        );
        // Too large to keep: not kept, nothing pushed out.
        recent.put(
            (2, 0),
            99,
            0,
            Payload::Owned(Arc::new(vec![0u8; RECENT_PAYLOAD_BYTES])),
        );
        assert!(recent.get((2, 0), 99).is_none());
        assert!(recent.get((1, 19), 19).is_some());
    }

    #[test]
    fn uncovered_ranges_split_and_shrink() {
        let mut u = Uncovered(vec![(0, 4096)]);
        assert_eq!(u.take(100, 200), vec![(100, 200)]);
        assert_eq!(u.0, vec![(0, 100), (200, 4096)]);
        assert_eq!(u.take(50, 300), vec![(50, 100), (200, 300)]);
        assert_eq!(u.take(0, 4096), vec![(0, 50), (300, 4096)]);
        assert!(u.is_empty());
    }
}
