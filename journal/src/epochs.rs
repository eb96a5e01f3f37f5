//! Epoch histories and the highest common point of two of them.
//!
//! A group's journal writes under an epoch (the fencing token of
//! failover) and keeps where each epoch began, (epoch, first seq), as
//! neon's safekeepers keep term histories. One epoch only ever has one
//! writer, so a record is named by (seq, epoch): two journals that hold
//! the same seq under the same epoch hold the same record, and the point
//! up to which two sites agree follows from their histories alone.

use crate::manifest::EpochStart;
use crate::Seq;

/// One site's history of a group: where each epoch began, and its newest
/// seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// (epoch, first seq), oldest first; epoch 0 from seq 1 is implied.
    pub epochs: Vec<EpochStart>,
    /// The newest seq the site holds.
    pub newest: Seq,
}

impl History {
    /// The epochs with epoch 0's start made explicit.
    fn starts(&self) -> Vec<EpochStart> {
        let mut starts = Vec::with_capacity(self.epochs.len() + 1);
        if self.epochs.first().is_none_or(|e| e.epoch > 0) {
            starts.push(EpochStart {
                epoch: 0,
                first_seq: 1,
            });
        }
        starts.extend(self.epochs.iter().copied());
        starts
    }

    /// The last seq this history holds under `epoch` (None if it wrote
    /// nothing under it), with the seq it began at.
    fn span(&self, epoch: u64) -> Option<(Seq, Seq)> {
        let starts = self.starts();
        let i = starts.iter().position(|e| e.epoch == epoch)?;
        let end = match starts.get(i + 1) {
            Some(next) => next.first_seq.saturating_sub(1),
            None => self.newest,
        };
        Some((starts[i].first_seq, end.min(self.newest)))
    }

    /// The newest epoch in this history.
    pub fn epoch(&self) -> u64 {
        self.starts().last().map_or(0, |e| e.epoch)
    }
}

/// The highest seq up to which `a` and `b` hold the same records: the
/// newest epoch both wrote under, to where the shorter of the two stops.
/// Everything after it on either side is that side's own (a branch).
pub fn common_point(a: &History, b: &History) -> Seq {
    for start in a.starts().iter().rev() {
        let (Some((_, a_end)), Some((_, b_end))) = (a.span(start.epoch), b.span(start.epoch))
        else {
            continue;
        };
        // One writer per epoch: both sides hold the same records of it, up
        // to where the shorter stops.
        return a_end.min(b_end);
    }
    0
}
