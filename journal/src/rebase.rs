//! Rebasing a journal onto another site's history: its base images become
//! the other journal's state at that journal's horizon, and its records
//! continue from there with the other journal's seqs. This is how a
//! replica starts (from nothing) and how it catches up when the records it
//! lacks were retained away on the primary: its own newest state is folded
//! into the base images, only the regions that differ are written, and the
//! history before the new horizon is gone on both sites (a gap on the
//! timeline).
//!
//! Crash-safe: the manifest says a rebase is in progress before any base
//! image changes, and until it finishes no point reads (the base images
//! are part old, part new); a cut-short rebase is simply done again.

use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::manifest::{Gap, Rebasing};
use crate::point::{Seq, Timestamp};
use crate::volume::VolumeId;

impl Journal {
    /// Begins a rebase onto a history whose horizon is `horizon` at
    /// `time`: everything this journal holds is folded into its base
    /// images first, so they hold its newest state (which region hashes
    /// are then taken of). The journal must hold nothing past `horizon`.
    pub fn begin_rebase(&self, horizon: Seq, time: Timestamp) -> Result<()> {
        let shared = self.shared();
        if let Some(rebasing) = shared.manifest.read().rebasing {
            if rebasing.seq == horizon {
                return Ok(());
            }
        }
        let newest = self.sync()?;
        if newest > horizon {
            return Err(Error::Invalid(format!(
                "journal {}: it holds records up to seq {newest}, past the horizon {horizon} to rebase onto",
                shared.dir.display()
            )));
        }
        self.retain_from(newest, true)?;
        shared.update_manifest(|manifest| {
            manifest.rebasing = Some(Rebasing {
                seq: horizon,
                ns: time.as_nanos(),
            });
            Ok(())
        })
    }

    /// The horizon of a rebase in progress (begun and not finished, maybe
    /// cut short by a crash).
    pub fn rebasing(&self) -> Option<Seq> {
        self.shared().manifest.read().rebasing.map(|r| r.seq)
    }

    fn rebasing_or_refuse(&self) -> Result<()> {
        match self.rebasing() {
            Some(_) => Ok(()),
            None => Err(Error::Invalid(format!(
                "journal {}: base images change only during a rebase",
                self.dir().display()
            ))),
        }
    }

    /// Reads a volume's base image (during a rebase: what it holds now).
    pub fn read_base(&self, volume: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let shared = self.shared();
        let _fold = shared.fold.read();
        shared.base(volume)?.read_into(offset, buf)
    }

    /// Writes `data` at `offset` of a volume's base image, during a rebase.
    pub fn write_base(&self, volume: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.rebasing_or_refuse()?;
        let shared = self.shared();
        let _fold = shared.fold.write();
        shared.base(volume)?.write(offset, data)
    }

    /// Zeroes `len` bytes at `offset` of a volume's base image, during a
    /// rebase.
    pub fn zero_base(&self, volume: VolumeId, offset: u64, len: u64) -> Result<()> {
        self.rebasing_or_refuse()?;
        let shared = self.shared();
        let _fold = shared.fold.write();
        shared.base(volume)?.zero(offset, len)
    }

    /// Finishes the rebase: the base images are durable, the horizon moves
    /// to the rebase's, what lay between this journal's newest record and
    /// it is recorded as a gap, and the next record appended (shipped)
    /// must follow the horizon.
    pub fn finish_rebase(&self) -> Result<Seq> {
        let shared = self.shared();
        let Some(target) = shared.manifest.read().rebasing else {
            return Err(Error::Invalid(format!(
                "journal {}: no rebase in progress",
                shared.dir.display()
            )));
        };
        for base in shared.bases.read().values() {
            base.sync()?;
        }
        let time = Timestamp::from_nanos(target.ns);
        let mut sequencer = self.sequencer_lock();
        let (newest, _) = shared.durable();
        // (Reads are refused while rebasing, so no fold lock is needed to
        // move base and horizon together.)
        shared.update_manifest(|manifest| {
            if newest + 1 < target.seq && target.seq > manifest.horizon_seq {
                manifest.gaps.push(Gap {
                    hold: "rebase".into(),
                    hold_seq: newest,
                    horizon_seq: target.seq,
                    at_ns: shared.options.clock.now().as_nanos(),
                });
            }
            manifest.horizon_seq = target.seq;
            manifest.horizon_ns = target.ns;
            manifest.rebasing = None;
            Ok(())
        })?;
        let epoch = shared.epoch();
        shared.index.set_meta(target.seq, target.seq, epoch)?;
        shared.set_durable(target.seq, time);
        sequencer.restart_at(target.seq + 1, time);
        Ok(target.seq)
    }
}

impl Journal {
    /// A journal that holds no records yet takes `time` as its horizon's
    /// time: a new replica adopts the primary's, so records the primary
    /// wrote before the replica existed can follow it. Refused once a
    /// record is here.
    pub fn adopt_horizon_time(&self, time: Timestamp) -> Result<()> {
        let shared = self.shared();
        let mut sequencer = self.sequencer_lock();
        let (newest, _) = shared.durable();
        let horizon = shared.manifest.read().horizon_seq;
        if newest != 0 || horizon != 0 || sequencer.next_seq() != 1 {
            return Err(Error::Invalid(format!(
                "journal {}: it already holds records (newest seq {newest}); its horizon stays",
                shared.dir.display()
            )));
        }
        shared.update_manifest(|manifest| {
            manifest.horizon_ns = time.as_nanos();
            Ok(())
        })?;
        shared.set_durable(0, time);
        sequencer.restart_at(1, time);
        Ok(())
    }
}
