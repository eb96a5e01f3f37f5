//! Epochs as fencing tokens. A takeover raises the epoch above every
//! epoch the taking site has seen, so one epoch only ever has one writer;
//! a site that sees a higher epoch than its own for a group stops writing
//! it at once. With that rule two sites find the point they agree on from
//! their epoch histories alone (`tidemark_journal::epochs`); the model
//! test below checks the rule and that point together.

/// What a site does when it sees `seen`, another site's epoch of a group
/// it holds at `own`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changes.
    Keep,
    /// A newer primary exists: refuse writes at once and become its
    /// replica.
    Demote,
}

/// The fencing rule: a higher epoch than one's own always wins.
pub fn judge(own: u64, seen: u64) -> Verdict {
    if seen > own {
        Verdict::Demote
    } else {
        Verdict::Keep
    }
}

/// The epoch a takeover writes under: above both the site's own and any
/// epoch it has seen (from the old primary, or the witness).
pub fn next_epoch(own: u64, seen: u64) -> u64 {
    own.max(seen) + 1
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use tidemark_journal::epochs::{common_point, History};
    use tidemark_journal::manifest::EpochStart;
    use tidemark_journal::Seq;

    fn seeds() -> u64 {
        std::env::var("TIDEMARK_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200)
    }

    /// A site in the model: its records as (epoch, id) per seq, its
    /// epoch and history.
    #[derive(Clone, Debug)]
    struct Site {
        records: Vec<(u64, u64)>,
        epoch: u64,
        epochs: Vec<EpochStart>,
    }

    impl Site {
        fn new() -> Site {
            Site {
                records: Vec::new(),
                epoch: 0,
                epochs: Vec::new(),
            }
        }
        fn history(&self) -> History {
            History {
                epochs: self.epochs.clone(),
                newest: self.records.len() as Seq,
            }
        }
        fn set_epoch(&mut self, epoch: u64) {
            if epoch > self.epoch {
                self.epochs.push(EpochStart {
                    epoch,
                    first_seq: self.records.len() as Seq + 1,
                });
                self.epoch = epoch;
            }
        }
        fn write(&mut self, id: u64) {
            self.records.push((self.epoch, id));
        }
        /// Receives `from`'s records after what it holds, as a replica
        /// does: the epoch follows the records.
        fn follow(&mut self, from: &Site, count: usize) {
            let start = self.records.len();
            for &(epoch, id) in from.records.iter().skip(start).take(count) {
                // A replica refuses records of an epoch older than its
                // own (the receiver's rule).
                if epoch < self.epoch {
                    return;
                }
                self.set_epoch(epoch);
                self.records.push((epoch, id));
            }
        }
        /// Resyncs from `from`: keeps what is common, takes the rest.
        fn resync(&mut self, from: &Site) {
            let common = common_point(&self.history(), &from.history()) as usize;
            self.records.truncate(common);
            self.epochs.retain(|e| (e.first_seq as usize) <= common);
            self.epoch = self.epochs.last().map_or(0, |e| e.epoch);
            let n = from.records.len();
            self.follow(from, n);
            self.set_epoch(from.epoch);
        }
    }

    /// The truth: how many leading records two sites share.
    fn truly_common(a: &Site, b: &Site) -> Seq {
        a.records
            .iter()
            .zip(&b.records)
            .take_while(|(x, y)| x == y)
            .count() as Seq
    }

    /// The common point from the two histories is the true one.
    fn assert_common_is_true(sites: &[Site; 2], seed: u64) {
        assert_eq!(
            common_point(&sites[0].history(), &sites[1].history()),
            truly_common(&sites[0], &sites[1]),
            "seed {seed}: {:?} vs {:?}",
            sites[0],
            sites[1]
        );
    }

    /// Two sites trading the primary role at random — writes, partial
    /// shipping, takeovers (with the unshipped tail lost), split brain
    /// (both writing) and resyncs: the common point from the histories is
    /// always the true one, and no epoch ever has two writers.
    #[test]
    fn the_common_point_from_epoch_histories_is_the_true_one() {
        for seed in 0..seeds() {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut sites = [Site::new(), Site::new()];
            let mut primary = 0usize;
            let mut writers: std::collections::HashMap<u64, usize> = Default::default();
            let mut id = 0u64;
            for _ in 0..60 {
                let other = 1 - primary;
                match rng.random_range(0..10) {
                    0..=4 => {
                        for _ in 0..rng.random_range(1..5) {
                            id += 1;
                            sites[primary].write(id);
                            let w = writers.entry(sites[primary].epoch).or_insert(primary);
                            assert_eq!(*w, primary, "seed {seed}: two writers in one epoch");
                        }
                    }
                    5 | 6 => {
                        let (p, r) = if primary == 0 {
                            let (a, b) = sites.split_at_mut(1);
                            (&a[0], &mut b[0])
                        } else {
                            let (a, b) = sites.split_at_mut(1);
                            (&b[0], &mut a[0])
                        };
                        if truly_common(r, p) as usize == r.records.len() {
                            r.follow(p, rng.random_range(0..6));
                        }
                    }
                    7 => {
                        // Takeover by the other site, at what it holds.
                        let seen = sites[primary].epoch.max(sites[other].epoch);
                        let epoch = next_epoch(sites[other].epoch, seen);
                        sites[other].set_epoch(epoch);
                        // Split brain: the old primary writes on a while.
                        if rng.random_bool(0.5) {
                            for _ in 0..rng.random_range(1..4) {
                                id += 1;
                                sites[primary].write(id);
                            }
                        }
                        primary = other;
                    }
                    _ => {
                        assert_common_is_true(&sites, seed);
                        // The old side demotes and resyncs.
                        assert_eq!(
                            judge(sites[other].epoch, sites[primary].epoch),
                            if sites[primary].epoch > sites[other].epoch {
                                Verdict::Demote
                            } else {
                                Verdict::Keep
                            }
                        );
                        let p = sites[primary].clone();
                        sites[other].resync(&p);
                        assert_eq!(sites[other].records, p.records, "seed {seed}");
                    }
                }
                assert_common_is_true(&sites, seed);
            }
        }
    }

    #[test]
    fn histories_that_share_nothing_meet_at_zero_and_equal_ones_at_the_end() {
        let a = History {
            epochs: vec![EpochStart {
                epoch: 1,
                first_seq: 1,
            }],
            newest: 10,
        };
        let b = History {
            epochs: vec![EpochStart {
                epoch: 2,
                first_seq: 1,
            }],
            newest: 5,
        };
        assert_eq!(common_point(&a, &b), 0);
        assert_eq!(common_point(&a, &a), 10);
        assert_eq!(judge(1, 2), Verdict::Demote);
        assert_eq!(judge(2, 2), Verdict::Keep);
        assert_eq!(next_epoch(3, 5), 6);
        assert_eq!(a.epoch(), 1);
    }
}
