//! What changed since a point: the byte ranges a rollback must rewrite,
//! streamed in ascending order from the index (block by block, merged
//! with the large zero/trim ranges), so rolling back a volume of any size
//! holds only the current span in memory.

use crate::error::Result;
use crate::index::{ChangedBlocks, INDEX_BLOCK};

/// Merged, ascending `(offset, length)` spans of one volume that records
/// after a point changed, 4 KiB granular; see
/// [`crate::Journal::changed_since`].
#[derive(Debug)]
pub struct ChangedSpans<'a> {
    blocks: ChangedBlocks<'a>,
    /// The next changed block, read ahead.
    next_block: Option<u64>,
    /// Large zero/trim ranges as merged `(start, end)`, ascending, and the
    /// next one to use.
    ranges: Vec<(u64, u64)>,
    next_range: usize,
    /// The span being grown.
    pending: Option<(u64, u64)>,
    size: u64,
}

impl<'a> ChangedSpans<'a> {
    /// Spans of a volume of `size` bytes from its changed `blocks` and its
    /// large `ranges` (`(offset, length)`, any order).
    pub(crate) fn new(
        mut blocks: ChangedBlocks<'a>,
        ranges: impl IntoIterator<Item = (u64, u64)>,
        size: u64,
    ) -> Result<Self> {
        let mut aligned: Vec<(u64, u64)> = ranges
            .into_iter()
            .map(|(offset, length)| {
                let start = offset / INDEX_BLOCK * INDEX_BLOCK;
                (start, (offset + length).next_multiple_of(INDEX_BLOCK))
            })
            .collect();
        aligned.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(aligned.len());
        for (start, end) in aligned {
            match merged.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let next_block = blocks.next().transpose()?;
        Ok(ChangedSpans {
            blocks,
            next_block,
            ranges: merged,
            next_range: 0,
            pending: None,
            size,
        })
    }

    /// The next interval by start: a block or a large range.
    fn next_interval(&mut self) -> Result<Option<(u64, u64)>> {
        let block = self
            .next_block
            .map(|b| (b * INDEX_BLOCK, (b + 1) * INDEX_BLOCK));
        let range = self.ranges.get(self.next_range).copied();
        let take_block = match (block, range) {
            (Some(b), Some(r)) => b.0 <= r.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return Ok(None),
        };
        if take_block {
            self.next_block = self.blocks.next().transpose()?;
            Ok(block)
        } else {
            self.next_range += 1;
            Ok(range)
        }
    }

    fn step(&mut self) -> Result<Option<(u64, u64)>> {
        loop {
            let Some((start, end)) = self.next_interval()? else {
                return Ok(self.pending.take());
            };
            let end = end.min(self.size);
            if end <= start {
                continue;
            }
            match &mut self.pending {
                Some(pending) if pending.1 >= start => pending.1 = pending.1.max(end),
                pending => {
                    if let Some(done) = pending.replace((start, end)) {
                        return Ok(Some(done));
                    }
                }
            }
        }
    }
}

impl Iterator for ChangedSpans<'_> {
    type Item = Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step()
            .map(|span| span.map(|(start, end)| (start, end - start)))
            .transpose()
    }
}
