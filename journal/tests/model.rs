//! Model-based randomised test: random interleavings of aligned, unaligned
//! and overlapping writes, zeroes, trims, flushes, tags, close/reopen and
//! retention, with reads at random points compared against a model of every
//! state each volume has been in.
//!
//! Seeded; a failure prints its seed. `TIDEMARK_SEED=N` replays one seed,
//! `TIDEMARK_SEEDS=N` runs N of them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::Rng;
use tidemark_journal::{
    Error, ManualClock, Point, RecoveryMode, RetentionPolicy, Timestamp, VolumeId,
};

const START: i64 = 1_800_000_000_000_000_000;

#[test]
fn random_histories_read_back_exactly() {
    for seed in seeds(24) {
        run(seed, "random_histories_read_back_exactly");
    }
}

/// The same histories written through the page cache, as on filesystems
/// that refuse O_DIRECT.
#[test]
fn random_histories_read_back_exactly_without_direct_io() {
    BUFFERED_IO.with(|b| b.set(true));
    // The seeds as printed: `TIDEMARK_SEED` replays a failing one.
    for seed in seeds(24).into_iter().take(8) {
        run(seed, "random_histories_read_back_exactly_without_direct_io");
    }
}

fn run(seed: u64, test: &'static str) {
    let _guard = SeedGuard(seed, test);
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (mut journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
    let mut model = Model::default();
    for i in 0..rng.random_range(1..=2u32) {
        let size = 64 * 1024 + 512 * rng.random_range(0..200u64);
        let volume = journal
            .create_volume(&format!("vol{i}"), size)
            .expect("create volume");
        model.sizes.insert(volume.id, size);
    }
    let volumes: Vec<VolumeId> = model.sizes.keys().copied().collect();

    for _ in 0..rng.random_range(40..70) {
        // Sometimes the clock stands still: timestamps must still rise.
        clock.advance(rng.random_range(0..3) * 1_000_000);
        match rng.random_range(0..100) {
            0..=64 => {
                let ops = (0..rng.random_range(1..=12))
                    .map(|_| {
                        let v = volumes[rng.random_range(0..volumes.len())];
                        (v, random_op(&mut rng, model.sizes[&v], 20_000))
                    })
                    .collect();
                apply(&journal, &mut model, ops);
            }
            65..=72 => check_reads(&journal, &model, &mut rng, 6),
            73..=78 => {
                journal.close().expect("close");
                let (reopened, report) = open(dir.path(), &clock, RecoveryMode::Strict);
                assert_eq!(report.newest_seq, model.newest(), "{report:?}");
                assert!(
                    report.torn_tail.is_none(),
                    "clean close left a torn tail: {report:?}"
                );
                journal = reopened;
            }
            79..=84 => retain_to_random_point(&journal, &mut model, &mut rng),
            85..=87 => retain_by_policy(&journal, &mut model, &clock, &mut rng),
            88..=91 => holds_stop_retention(&journal, &mut model, &mut rng),
            92..=95 => check_time_points(&journal, &model, &mut rng),
            _ => check_tags(&journal, &model),
        }
    }
    check_reads(&journal, &model, &mut rng, 20);
    check_tags(&journal, &model);
    journal.close().expect("close");
    let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
    check_reads(&journal, &model, &mut rng, 20);
    check_tags(&journal, &model);
}

fn retain_to_random_point(
    journal: &tidemark_journal::Journal,
    model: &mut Model,
    rng: &mut rand::rngs::SmallRng,
) {
    let target = rng.random_range(model.horizon..=model.newest());
    let report = journal.retain_from(target, false).expect("retention");
    assert_eq!(report.new_horizon, target.max(model.horizon));
    model.horizon = report.new_horizon;
    check_history(journal, model);
}

fn retain_by_policy(
    journal: &tidemark_journal::Journal,
    model: &mut Model,
    clock: &ManualClock,
    rng: &mut rand::rngs::SmallRng,
) {
    let policy = if rng.random_bool(0.5) {
        RetentionPolicy {
            max_bytes: Some(journal.journal_bytes() / 2),
            max_age: None,
        }
    } else {
        RetentionPolicy {
            max_age: Some(Duration::from_millis(rng.random_range(0..40))),
            max_bytes: None,
        }
    };
    let report = journal.apply_retention(&policy, false).expect("retention");
    assert!(report.new_horizon >= model.horizon);
    if let Some(age) = policy.max_age {
        // Everything older than the cutoff is folded, nothing newer.
        let cutoff = clock.now_nanos() - age.as_nanos() as i64;
        let expected = model
            .records
            .iter()
            .filter(|(_, (_, _, t))| t.as_nanos() <= cutoff)
            .map(|(&s, _)| s)
            .max()
            .unwrap_or(0)
            .max(model.horizon);
        assert_eq!(
            report.new_horizon, expected,
            "age retention, cutoff {cutoff}"
        );
    }
    if let Some(max) = policy.max_bytes {
        let segments = journal.segments();
        assert!(
            journal.journal_bytes() <= max || segments.len() <= 1,
            "size retention left {} bytes in {} segments, limit {max}",
            journal.journal_bytes(),
            segments.len()
        );
    }
    model.horizon = report.new_horizon;
    check_history(journal, model);
}

fn holds_stop_retention(
    journal: &tidemark_journal::Journal,
    model: &mut Model,
    rng: &mut rand::rngs::SmallRng,
) {
    let newest = model.newest();
    let hold = rng.random_range(model.horizon..=newest);
    journal.set_hold("replica", hold).expect("set hold");
    let report = journal.retain_from(newest, false).expect("retention");
    assert_eq!(report.new_horizon, hold, "retention passed a hold");
    if hold < newest {
        assert_eq!(report.held_back, Some(("replica".to_string(), hold)));
    }
    model.horizon = hold;
    if rng.random_bool(0.5) && hold < newest {
        let target = rng.random_range(hold + 1..=newest);
        let forced = journal.retain_from(target, true).expect("forced retention");
        assert_eq!(forced.new_horizon, target);
        assert_eq!(forced.gaps.len(), 1);
        assert_eq!(forced.gaps[0].hold_seq, hold);
        assert_eq!(forced.gaps[0].horizon_seq, target);
        assert!(journal
            .gaps()
            .iter()
            .any(|g| g.hold_seq == hold && g.horizon_seq == target));
        model.horizon = target;
    }
    journal.release_hold("replica").expect("release hold");
    check_history(journal, model);
}

/// The retained range is what the model says, and points before it are
/// refused with an error that names the available range.
fn check_history(journal: &tidemark_journal::Journal, model: &Model) {
    let history = journal.history();
    assert_eq!(history.horizon_seq, model.horizon);
    assert_eq!(history.newest_seq, model.newest());
    if model.horizon > 0 {
        let name = journal.volumes()[0].name.clone();
        let mut buf = [0u8; 512];
        match journal.read(&name, 0, &mut buf, Point::Seq(model.horizon - 1)) {
            Err(e @ Error::PointOutOfRange { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&name) && text.contains(&format!("seq {}..=", model.horizon)),
                    "{text}"
                );
            }
            other => panic!("read before the horizon gave {other:?}"),
        }
    }
}

/// A moment resolves to the newest record at or before it.
fn check_time_points(
    journal: &tidemark_journal::Journal,
    model: &Model,
    rng: &mut rand::rngs::SmallRng,
) {
    let history = journal.history();
    let retained: Vec<_> = model.records.range(model.horizon + 1..).collect();
    if retained.is_empty() {
        return;
    }
    let (&seq, (_, _, time)) = retained[rng.random_range(0..retained.len())];
    assert_eq!(
        journal
            .resolve("vol0", Point::Time(*time))
            .expect("resolve"),
        seq
    );
    let before = Timestamp::from_nanos(time.as_nanos() - 1);
    let expected = model
        .records
        .range(model.horizon + 1..seq)
        .next_back()
        .map_or(model.horizon, |(&s, _)| s);
    if before >= history.horizon_time {
        assert_eq!(
            journal
                .resolve("vol0", Point::Time(before))
                .expect("resolve"),
            expected
        );
    } else {
        assert!(journal.resolve("vol0", Point::Time(before)).is_err());
    }
    let far = Timestamp::from_nanos(history.newest_time.as_nanos() + 1_000_000_000);
    assert_eq!(
        journal.resolve("vol0", Point::Time(far)).expect("resolve"),
        model.newest()
    );
    assert!(journal
        .resolve("vol0", Point::Time(Timestamp::from_nanos(START - 1)))
        .is_err());
}

fn check_tags(journal: &tidemark_journal::Journal, model: &Model) {
    for &volume in model.sizes.keys() {
        let stored: Vec<(String, u64)> = journal
            .tags(volume)
            .expect("tags")
            .into_iter()
            .map(|t| (t.name, t.seq))
            .collect();
        let mut expected: Vec<(String, u64)> =
            model.tags_at(volume, model.newest()).into_iter().collect();
        expected.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        assert_eq!(stored, expected, "tags of volume {volume}");
    }
}

trait NowNanos {
    fn now_nanos(&self) -> i64;
}

impl NowNanos for ManualClock {
    fn now_nanos(&self) -> i64 {
        tidemark_journal::Clock::now(self).as_nanos()
    }
}
