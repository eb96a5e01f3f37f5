//! Shipping a journal to another site's journal: records read raw and
//! appended there keep their seqs, timestamps and CRCs, so every point and
//! tag reads the same on both; records out of order or damaged are refused
//! and leave the replica as it was; a rebase brings a replica that lacks
//! history onto the primary's base images and horizon.

mod common;

use std::sync::Arc;

use common::*;
use rand::Rng;
use tidemark_journal::{
    Error, Journal, ManualClock, Point, RawRecord, RecoveryMode, Seq, Timestamp,
};

const START: i64 = 1_800_000_000_000_000_000;
const SIZE: u64 = 1 << 20;

struct Site {
    journal: Journal,
    clock: Arc<ManualClock>,
    // Last: fields drop in order, and the journal's index flushes into
    // the directory as it closes (deleted first, RocksDB retries forever).
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (journal, _) = open(&dir.path().join("journal"), &clock, RecoveryMode::Strict);
    Site {
        _dir: dir,
        journal,
        clock,
    }
}

/// A primary with one volume and a replica holding the same volume (same
/// id), as a replica site makes it.
fn pair() -> (Site, Site) {
    let primary = site();
    let info = primary.journal.create_volume("vol", SIZE).expect("volume");
    let replica = site();
    replica
        .journal
        .create_volume_as(&info)
        .expect("replica volume");
    (primary, replica)
}

/// Writes `count` random changes on the primary, advancing its clock.
fn write(primary: &Site, model: &mut Model, rng: &mut rand::rngs::SmallRng, count: usize) {
    let volume = primary.journal.volume("vol").expect("vol").id;
    for _ in 0..count {
        primary.clock.advance(rng.random_range(1_000..500_000));
        let op = random_op(rng, SIZE, 32 << 10);
        apply(&primary.journal, model, vec![(volume, op)]);
    }
}

/// Ships everything after the replica's newest seq, `max_bytes` at a time.
fn ship(primary: &Journal, replica: &Journal, max_bytes: usize) -> usize {
    let mut cursor = None;
    let mut batches = 0;
    loop {
        let from = replica.history().newest_seq + 1;
        let batch = primary.read_raw(from, cursor, max_bytes).expect("read raw");
        cursor = Some(batch.cursor);
        if batch.records.is_empty() {
            return batches;
        }
        batches += 1;
        let handle = replica
            .append_shipped(batch.prev_seq, &batch.records)
            .expect("append shipped");
        handle.expect("a handle").wait().expect("durable");
    }
}

fn assert_same(primary: &Journal, replica: &Journal, seqs: &[Seq]) {
    assert_eq!(primary.history(), replica.history(), "histories differ");
    let p = primary.volume("vol").expect("vol");
    let r = replica.volume("vol").expect("vol");
    for &seq in seqs {
        let mut a = vec![0u8; SIZE as usize];
        let mut b = vec![0u8; SIZE as usize];
        primary
            .read("vol", 0, &mut a, Point::Seq(seq))
            .expect("primary read");
        replica
            .read("vol", 0, &mut b, Point::Seq(seq))
            .expect("replica read");
        assert!(a == b, "the volume differs at seq {seq}");
    }
    assert_eq!(
        primary.tags(p.id).expect("tags"),
        replica.tags(r.id).expect("tags"),
        "tags differ"
    );
}

#[test]
fn shipped_records_rebuild_the_same_journal() {
    for seed in seeds(3) {
        let _guard = SeedGuard(seed, "shipping test");
        let mut rng = rng(seed);
        let (primary, replica) = pair();
        let volume = primary.journal.volume("vol").expect("vol").id;
        let mut model = Model::with_volume(volume, SIZE);
        write(&primary, &mut model, &mut rng, 150);
        // Small reads: the cursor carries the stream across batches and
        // segments.
        let batches = ship(&primary.journal, &replica.journal, 8 << 10);
        assert!(batches > 5, "only {batches} batches shipped");
        // More writes, shipped in one go, as a stream following the journal.
        write(&primary, &mut model, &mut rng, 60);
        ship(&primary.journal, &replica.journal, 64 << 20);
        let newest = primary.journal.history().newest_seq;
        let seqs: Vec<Seq> = (0..8).map(|_| rng.random_range(0..=newest)).collect();
        assert_same(&primary.journal, &replica.journal, &seqs);
        assert_eq!(
            primary
                .journal
                .events(volume, 0, newest)
                .expect("events")
                .len(),
            replica
                .journal
                .events(volume, 0, newest)
                .expect("events")
                .len(),
            "the timelines differ"
        );
        // Reads of the replica match the model too (not just the primary).
        let mut check = rng.clone();
        check_reads(&replica.journal, &model, &mut check, 20);
    }
}

#[test]
fn records_out_of_order_or_damaged_are_refused() {
    let (primary, replica) = pair();
    let volume = primary.journal.volume("vol").expect("vol").id;
    let mut model = Model::with_volume(volume, SIZE);
    let mut rng = rng(7);
    write(&primary, &mut model, &mut rng, 20);
    let batch = primary.journal.read_raw(1, None, 64 << 20).expect("read");
    let records = batch.records;
    assert!(records.len() >= 10, "only {} records", records.len());

    let refused = |prev: Seq, records: &[RawRecord], why: &str| {
        match replica.journal.append_shipped(prev, records) {
            Err(Error::Invalid(reason)) => assert!(
                reason.contains(why),
                "refused for the wrong reason: {reason} (expected {why:?})"
            ),
            Err(e) => panic!("refused with {e}, expected Invalid"),
            Ok(_) => panic!("accepted records that should be refused ({why})"),
        }
        assert_eq!(
            replica.journal.history().newest_seq,
            0,
            "the replica changed"
        );
    };
    // A gap: the first record is missing.
    refused(1, &records[1..], "newest seq is 0");
    // Out of order within the batch.
    let mut swapped = records[..3].to_vec();
    swapped.swap(1, 2);
    refused(0, &swapped, "does not follow");
    // A record applied twice.
    let twice = vec![records[0].clone(), records[0].clone()];
    refused(0, &twice, "does not follow");
    // A flipped bit fails the CRC.
    let mut damaged = records[..2].to_vec();
    let last = damaged[1].bytes.len() - 1;
    damaged[1].bytes[last] ^= 0x40;
    refused(0, &damaged, "does not verify");
    // A record for a volume the replica does not hold.
    let other = site();
    let info = other.journal.create_volume("a", SIZE).expect("a");
    let other_vol = other.journal.create_volume("b", SIZE).expect("b");
    assert_ne!(info.id, other_vol.id);
    other
        .journal
        .append(
            other_vol.id,
            tidemark_journal::Change::Write {
                offset: 0,
                data: &[1; 512],
            },
        )
        .expect("append")
        .wait()
        .expect("durable");
    let foreign = other
        .journal
        .read_raw(1, None, 1 << 20)
        .expect("read")
        .records;
    if other_vol.id != volume {
        refused(0, &foreign, "does not hold");
    }
    // The stream goes on where it stood.
    ship(&primary.journal, &replica.journal, 1 << 20);
    let newest = primary.journal.history().newest_seq;
    assert_same(&primary.journal, &replica.journal, &[0, 5, newest]);
}

#[test]
fn history_retained_away_cannot_be_read_raw() {
    let (primary, _replica) = pair();
    let volume = primary.journal.volume("vol").expect("vol").id;
    let mut model = Model::with_volume(volume, SIZE);
    let mut rng = rng(11);
    write(&primary, &mut model, &mut rng, 30);
    primary.journal.retain_from(10, true).expect("retain");
    match primary.journal.read_raw(5, None, 1 << 20) {
        Err(Error::PointOutOfRange { .. }) => {}
        other => panic!("read below the horizon gave {other:?}"),
    }
    let batch = primary.journal.read_raw(11, None, 1 << 20).expect("read");
    assert_eq!(batch.prev_seq, 10);
    assert_eq!(batch.records.first().map(|r| r.header.seq), Some(11));
}

#[test]
fn a_rebase_brings_a_lagging_replica_onto_the_primary() {
    for seed in seeds(2) {
        let _guard = SeedGuard(seed, "rebase test");
        let mut rng = rng(seed);
        let (primary, replica) = pair();
        let volume = primary.journal.volume("vol").expect("vol").id;
        let mut model = Model::with_volume(volume, SIZE);
        write(&primary, &mut model, &mut rng, 40);
        ship(&primary.journal, &replica.journal, 1 << 20);
        let replica_had = replica.journal.history().newest_seq;
        // The replica falls behind, and the primary retains past it.
        write(&primary, &mut model, &mut rng, 80);
        let horizon = primary.journal.history().newest_seq - 20;
        primary.journal.retain_from(horizon, true).expect("retain");
        let history = primary.journal.history();
        assert_eq!(history.horizon_seq, horizon);
        assert!(matches!(
            primary.journal.read_raw(replica_had + 1, None, 1 << 20),
            Err(Error::PointOutOfRange { .. })
        ));

        replica
            .journal
            .begin_rebase(history.horizon_seq, history.horizon_time)
            .expect("begin rebase");
        assert_eq!(replica.journal.rebasing(), Some(horizon));
        let mut buf = vec![0u8; 4096];
        assert!(
            matches!(
                replica.journal.read("vol", 0, &mut buf, Point::Latest),
                Err(Error::Rebasing(_))
            ),
            "reads of a journal being rebased must be refused"
        );
        // Region by region, only where the base images differ.
        const REGION: u64 = 64 << 10;
        let mut sent = 0;
        for offset in (0..SIZE).step_by(REGION as usize) {
            let mut ours = vec![0u8; REGION as usize];
            let mut theirs = vec![0u8; REGION as usize];
            primary
                .journal
                .read_base(volume, offset, &mut ours)
                .expect("primary base");
            replica
                .journal
                .read_base(volume, offset, &mut theirs)
                .expect("replica base");
            if ours != theirs {
                sent += 1;
                if ours.iter().all(|&b| b == 0) {
                    replica
                        .journal
                        .zero_base(volume, offset, REGION)
                        .expect("zero");
                } else {
                    replica
                        .journal
                        .write_base(volume, offset, &ours)
                        .expect("write");
                }
            }
        }
        assert!(sent > 0, "the bases cannot be equal after 80 writes");
        assert_eq!(replica.journal.finish_rebase().expect("finish"), horizon);
        assert_eq!(replica.journal.rebasing(), None);
        assert!(
            replica
                .journal
                .gaps()
                .iter()
                .any(|g| g.hold_seq == replica_had && g.horizon_seq == horizon),
            "the rebase's gap is not on the replica's timeline: {:?}",
            replica.journal.gaps()
        );
        ship(&primary.journal, &replica.journal, 1 << 20);
        let newest = primary.journal.history().newest_seq;
        assert_same(
            &primary.journal,
            &replica.journal,
            &[horizon, horizon + 7, newest],
        );
    }
}

#[test]
fn a_rebase_survives_reopening() {
    let (primary, replica) = pair();
    let volume = primary.journal.volume("vol").expect("vol").id;
    let mut model = Model::with_volume(volume, SIZE);
    let mut rng = rng(3);
    write(&primary, &mut model, &mut rng, 30);
    primary.journal.retain_from(25, true).expect("retain");
    let history = primary.journal.history();
    replica
        .journal
        .begin_rebase(history.horizon_seq, history.horizon_time)
        .expect("begin");
    let dir = replica.journal.dir().to_path_buf();
    replica.journal.close().expect("close");
    let (reopened, _) = open(&dir, &replica.clock, RecoveryMode::Strict);
    assert_eq!(
        reopened.rebasing(),
        Some(25),
        "a cut-short rebase is forgotten"
    );
    let mut base = vec![0u8; SIZE as usize];
    primary
        .journal
        .read_base(volume, 0, &mut base)
        .expect("base");
    reopened.write_base(volume, 0, &base).expect("write base");
    assert_eq!(reopened.finish_rebase().expect("finish"), 25);
    ship(&primary.journal, &reopened, 1 << 20);
    let newest = primary.journal.history().newest_seq;
    assert_same(&primary.journal, &reopened, &[25, newest]);
}
