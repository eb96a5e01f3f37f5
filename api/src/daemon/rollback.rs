//! Rollback in place: the live volume is rewound to a point by rewriting
//! only the blocks changed since, through the write path, so the rollback
//! is journalled like any write and can itself be undone (roll back to
//! the `undo_seq` it reports).

use std::sync::Arc;

use tidemark_journal::{Point, Seq};

use super::error::{ApiError, ApiResult};
use super::registry::{Registry, Volume, WriterGuard};
use crate::point_spec::PointSpec;

/// What a rollback did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollbackReport {
    /// The point the volume now equals.
    pub to_seq: Seq,
    /// The newest seq before the rollback.
    pub undo_seq: Seq,
    /// 4 KiB blocks rewritten.
    pub blocks: u64,
    /// Bytes rewritten.
    pub bytes: u64,
}

const CHUNK: u64 = 1 << 20;

/// Rolls `volume` back to `to`. Refused while clients write to it: they
/// would see their disk change under them.
pub fn rollback(
    registry: &Registry,
    volume: &Arc<Volume>,
    to: &PointSpec,
) -> ApiResult<RollbackReport> {
    let name = &volume.name;
    volume.refuse_on_replica("roll it back")?;
    let writers = volume.writers.load(std::sync::atomic::Ordering::SeqCst);
    if writers > 0 {
        return Err(ApiError::Busy(format!(
            "volume {name} has {writers} client(s) connected to its live export; \
             disconnect them (unmount, stop nbd clients) before rolling back"
        )));
    }
    let _guard = WriterGuard::new(volume.clone());
    let report = roll_back(registry, volume, to, true, true)?;
    record(registry, volume, &report)?;
    Ok(report)
}

/// The rollback itself, without [`rollback`]'s checks and without its
/// timeline event: what a takeover runs while the group still refuses
/// writes as a replica, so no client sees the volume between the newest
/// point and the one promoted. (The event is [`record`]ed once the group
/// may take records of its own.) With `show_progress` it first counts
/// what there is to rewrite, from the index alone, for the progress the
/// console shows; a takeover does not, to keep its time down. With
/// `as_primary` each chunk is written only while this site may write the
/// group (a user's rollback stops at a demotion or a lost lease; a
/// takeover's runs while the group is still a replica).
pub fn roll_back(
    registry: &Registry,
    volume: &Arc<Volume>,
    to: &PointSpec,
    show_progress: bool,
    as_primary: bool,
) -> ApiResult<RollbackReport> {
    let name = &volume.name;
    let write_path = &volume.group.write_path;
    let journal = volume.journal();
    // Everything acknowledged must be in the journal before we ask it
    // what changed: async writes and pending resyncs included.
    write_path.flush(name)?;
    write_path.maintain_now()?;
    journal.sync()?;
    let to_seq = registry.resolve(volume, to)?;
    let undo_seq = journal.history().newest_seq;
    let progress = if show_progress {
        let mut total = 0u64;
        for span in journal.changed_since(name, to_seq)? {
            total += span?.1;
        }
        Some(Progress::start(volume, total))
    } else {
        None
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut bytes = 0u64;
    // Streamed: a large volume's changes are never all in memory.
    for span in journal.changed_since(name, to_seq)? {
        let (start, len) = span?;
        let mut at = start;
        while at < start + len {
            let n = CHUNK.min(start + len - at);
            let part = &mut buf[..n as usize];
            journal.read(name, at, part, Point::Seq(to_seq))?;
            let pass = volume.group.writing();
            if as_primary && pass.is_none() {
                return Err(ApiError::Failed(format!(
                    "volume {name}: the rollback to seq {to_seq} stopped at offset {at}: this site no longer writes the group (demoted, or the witness's lease is lost); the volume is rolled back up to there"
                )));
            }
            if part.iter().all(|&b| b == 0) {
                write_path.write_zeroes(name, at, n, false)?;
            } else {
                write_path.write(name, at, part, false)?;
            }
            bytes += n;
            at += n;
            if let Some(progress) = &progress {
                progress.set(bytes);
            }
        }
    }
    write_path.flush(name)?;
    drop(progress);
    tracing::info!(volume = %name, to_seq, undo_seq, bytes, "rolled back");
    Ok(RollbackReport {
        to_seq,
        undo_seq,
        blocks: bytes / tidemark_journal::INDEX_BLOCK,
        bytes,
    })
}

/// A volume's rollback progress, cleared however the rollback ends.
struct Progress<'a> {
    volume: &'a Volume,
    total: u64,
}

impl<'a> Progress<'a> {
    fn start(volume: &'a Volume, total: u64) -> Self {
        *volume.rollback_progress.lock() = Some((0, total));
        Progress { volume, total }
    }

    /// `done` bytes rewritten (never shown past the total, which a write
    /// racing the count may have outgrown).
    fn set(&self, done: u64) {
        *self.volume.rollback_progress.lock() = Some((done.min(self.total), self.total.max(done)));
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        *self.volume.rollback_progress.lock() = None;
    }
}

/// Puts the `rollback` event of `report` on `volume`'s timeline.
pub fn record(registry: &Registry, volume: &Volume, report: &RollbackReport) -> ApiResult<()> {
    let body = format!(
        "{{\"to_seq\":{},\"undo_seq\":{},\"bytes\":{}}}",
        report.to_seq, report.undo_seq, report.bytes
    );
    volume.record_event("rollback", &body, registry.sync_timeout())?;
    Ok(())
}
