//! Retention: folding the oldest records into the base images, deleting
//! their segments and moving the horizon — by age, by size, or to a seq.
//!
//! Holds (see [`Journal::set_hold`]) stop retention at the position their
//! consumer still needs. Only a forced run passes a hold, and then the
//! window the consumer lacks is recorded as a [`Gap`].
//!
//! A fold is crash-safe: the target is written to the manifest before any
//! base image changes, so a restart finishes a fold that was cut short
//! (re-applying records in seq order is idempotent).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::Result;
use crate::index::INDEX_BLOCK;
use crate::journal::{Journal, Shared};
use crate::manifest::{FoldIntent, Gap};
use crate::point::{Seq, Timestamp};
use crate::record::payload_bytes;
use crate::segment::sync_dir;

/// How much history to keep. Either limit, or both, may be set; a run
/// folds as far as the stricter one requires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Fold records older than this.
    pub max_age: Option<Duration>,
    /// Fold whole segments, oldest first, until the journal is at most
    /// this many bytes (segments not yet wholly durable are never removed).
    pub max_bytes: Option<u64>,
}

/// What a retention run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// The horizon before.
    pub old_horizon: Seq,
    /// The horizon after.
    pub new_horizon: Seq,
    /// Segments deleted.
    pub removed_segments: Vec<u64>,
    /// The hold that stopped retention short of its target, with its seq.
    pub held_back: Option<(String, Seq)>,
    /// Windows dropped past holds by a forced run.
    pub gaps: Vec<Gap>,
}

impl Shared {
    /// Folds every record with `horizon < seq <= target` into the base
    /// images and moves the horizon to `target`, recording `gaps`.
    pub(crate) fn fold_to(&self, target: Seq, gaps: Vec<Gap>) -> Result<RetentionReport> {
        let _fold = self.fold.write();
        let mut manifest = self.manifest.read().clone();
        let old = manifest.horizon_seq;
        let target = target.min(self.durable().0.max(old));
        let mut report = RetentionReport {
            old_horizon: old,
            new_horizon: old,
            ..RetentionReport::default()
        };
        if target <= old {
            if manifest.folding_to.take().is_some() {
                self.store_manifest(manifest)?;
            }
            return Ok(report);
        }
        manifest.folding_to = Some(FoldIntent { seq: target });
        self.store_manifest(manifest.clone())?;

        let segments: Vec<_> = self.segments.read().values().cloned().collect();
        let catalogue = self.catalogue.lock().clone();
        let bases = self.bases.read().clone();
        let mut folded = Vec::new();
        let mut touched = BTreeSet::new();
        let mut horizon_time = Timestamp::from_nanos(manifest.horizon_ns);
        for segment in &segments {
            let Some(entry) = catalogue.get(&segment.id()) else {
                continue;
            };
            if entry.last_seq <= old || entry.first_seq > target {
                continue;
            }
            // Damage past the durable records (a batch being written right
            // now) ends the scan harmlessly: everything up to `target` is
            // durable and lies before it.
            segment.scan(0, |header, offset, stored| {
                if header.seq <= old || header.seq > target {
                    return Ok(());
                }
                horizon_time = header.timestamp;
                if !header.kind.changes_data() || header.length == 0 {
                    return Ok(());
                }
                let base = self.base(header.volume)?;
                if header.kind == crate::record::RecordKind::Write {
                    base.write(
                        header.offset,
                        &payload_bytes(header, stored, &segment.path, offset)?,
                    )?;
                } else {
                    base.zero(header.offset, header.length)?;
                }
                touched.insert(header.volume);
                if self.index.is_large_range(header) {
                    return Ok(());
                }
                let last = header.offset + header.length - 1;
                folded.push((
                    header.volume,
                    header.offset / INDEX_BLOCK,
                    last / INDEX_BLOCK,
                    header.seq,
                ));
                Ok(())
            })?;
        }
        for volume in &touched {
            if let Some(base) = bases.get(volume) {
                base.sync()?;
            }
        }
        let durable_segment = self
            .durable_segment
            .load(std::sync::atomic::Ordering::SeqCst);
        let removed: Vec<u64> = catalogue
            .values()
            .filter(|e| e.id < durable_segment && e.last_seq <= target)
            .map(|e| e.id)
            .collect();

        manifest.horizon_seq = target;
        manifest.horizon_ns = horizon_time.as_nanos();
        manifest.folding_to = None;
        manifest.gaps.extend(gaps.iter().cloned());
        self.store_manifest(manifest.clone())?;
        let volumes: Vec<_> = manifest.volumes.iter().map(|v| v.id).collect();
        self.index.forget_before(
            &folded,
            &volumes,
            target,
            horizon_time,
            &removed,
            manifest.epoch,
        )?;

        for id in &removed {
            if let Some(segment) = self.segments.write().remove(id) {
                self.options
                    .fs
                    .remove_file(&segment.path)
                    .map_err(|e| crate::error::Error::io("remove segment", &segment.path, e))?;
            }
            self.catalogue.lock().remove(id);
        }
        if !removed.is_empty() {
            sync_dir(self.options.fs.as_ref(), &self.segments_dir)?;
        }
        tracing::info!(
            old_horizon = old,
            new_horizon = target,
            removed = removed.len(),
            "retention moved the horizon"
        );
        report.new_horizon = target;
        report.removed_segments = removed;
        report.gaps = gaps;
        Ok(report)
    }

    /// Clamps `target` to the retention holds unless `force` (or the hold
    /// is expendable); returns the gaps passing holds leaves.
    fn honour_holds(&self, target: Seq, force: bool) -> (Seq, Option<(String, Seq)>, Vec<Gap>) {
        let manifest = self.manifest.read();
        let now = self.options.clock.now().as_nanos();
        let mut target = target;
        let mut held_back = None;
        let mut gaps = Vec::new();
        for (name, &seq) in &manifest.holds {
            if seq >= target || seq < manifest.horizon_seq {
                continue;
            }
            if force || manifest.expendable.contains(name) {
                gaps.push(Gap {
                    hold: name.clone(),
                    hold_seq: seq,
                    horizon_seq: target,
                    at_ns: now,
                });
            } else if held_back.as_ref().is_none_or(|(_, s)| seq < *s) {
                held_back = Some((name.clone(), seq));
            }
        }
        if let Some((_, seq)) = &held_back {
            target = (*seq).max(manifest.horizon_seq);
            gaps.retain(|g| g.hold_seq < target);
        }
        for gap in &mut gaps {
            gap.horizon_seq = target;
        }
        (target, held_back, gaps)
    }
}

impl Journal {
    /// Applies `policy`: works out how far the horizon must move, honours
    /// the holds (passing them only if `force`), and folds.
    pub fn apply_retention(
        &self,
        policy: &RetentionPolicy,
        force: bool,
    ) -> Result<RetentionReport> {
        let shared = self.shared();
        let history = shared.history();
        let mut target = history.horizon_seq;
        if let Some(age) = policy.max_age {
            let age = i64::try_from(age.as_nanos()).unwrap_or(i64::MAX);
            let cutoff =
                Timestamp::from_nanos(shared.options.clock.now().as_nanos().saturating_sub(age));
            if let Some((seq, _)) = shared.index.seq_at_time(cutoff)? {
                target = target.max(seq);
            }
        }
        if let Some(max_bytes) = policy.max_bytes {
            let durable_segment = shared
                .durable_segment
                .load(std::sync::atomic::Ordering::SeqCst);
            let catalogue = shared.catalogue.lock().clone();
            let mut total: u64 = catalogue.values().map(|e| e.used_bytes).sum();
            for entry in catalogue.values() {
                if total <= max_bytes || entry.id >= durable_segment {
                    break;
                }
                target = target.max(entry.last_seq);
                total -= entry.used_bytes;
            }
        }
        self.retain_from(target.min(history.newest_seq), force)
    }

    /// Moves the horizon to `target` (folding everything up to it), as far
    /// as the holds allow unless `force`.
    pub fn retain_from(&self, target: Seq, force: bool) -> Result<RetentionReport> {
        let shared = self.shared();
        // Holds read here must still be the holds when the fold stores
        // the new horizon: no hold may be set in between.
        let _updates = shared.manifest_update.lock();
        let (target, held_back, gaps) = shared.honour_holds(target, force);
        let mut report = shared.fold_to(target, gaps)?;
        report.held_back = held_back;
        Ok(report)
    }
}
