//! Decoders fed garbage, and the journal used from several threads at once.
//!
//! Every decoder of bytes from disk must answer damage with an error, never
//! a panic (S4); reads, appends and retention running together must never
//! see anything but the history the model describes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use rand::{Rng, RngCore};
use tidemark_journal::mark::Mark;
use tidemark_journal::record::{decode_record, payload_bytes, PreparedRecord, RecordKind};
use tidemark_journal::segment::{BatchFrame, SegmentHeader};
use tidemark_journal::{Error, ManualClock, Point, RecoveryMode, Timestamp};

/// Recomputes the CRC a record header carries over its bytes and payload,
/// so a mutation reaches the checks behind the CRC instead of being
/// caught by it.
fn reseal_record(bytes: &mut [u8]) {
    if bytes.len() < 56 {
        return;
    }
    let stored = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let Some(payload) = bytes.get(56..56 + stored) else {
        return;
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(payload), &bytes[..52]);
    bytes[52..56].copy_from_slice(&crc.to_le_bytes());
}

/// The same for a 64-byte frame or header whose CRC covers bytes 0..60.
fn reseal_64(bytes: &mut [u8]) {
    if bytes.len() >= 64 {
        let crc = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    }
}

#[test]
fn decoders_answer_garbage_with_errors_not_panics() {
    for seed in seeds(8) {
        let _guard = SeedGuard(seed, "decoders_answer_garbage_with_errors_not_panics");
        let mut rng = rng(seed);
        let path = std::path::Path::new("fuzz.seg");
        // How often a damaged record got past its CRC and was then judged
        // by the checks behind it: they must be reached, not just the CRC.
        let (mut refused_behind_crc, mut accepted) = (0u32, 0u32);
        for _ in 0..2000 {
            // Pure noise, and valid encodings with a few bytes changed and
            // their CRC made to match again.
            let mut bytes = vec![0u8; rng.random_range(0..300)];
            rng.fill_bytes(&mut bytes);
            let resealed = rng.random_bool(0.5);
            if resealed {
                let len = rng.random_range(0..200);
                let data = payload(&mut rng, len);
                let kind = [RecordKind::Write, RecordKind::Mark][rng.random_range(0..2)];
                let record = PreparedRecord::new(kind, 1, 0, data.len() as u64, &data);
                bytes.clear();
                record.encode_into(
                    rng.random(),
                    Timestamp::from_nanos(rng.random()),
                    &mut bytes,
                );
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
                if rng.random_bool(0.3) {
                    bytes.truncate(rng.random_range(0..bytes.len()));
                }
                reseal_record(&mut bytes);
            }
            match decode_record(&bytes, path, 0) {
                Ok((header, stored)) => {
                    accepted += 1;
                    // What passed every check is self-consistent.
                    assert_eq!(stored.len(), header.stored_len as usize);
                    if !header.compressed
                        && matches!(header.kind, RecordKind::Write | RecordKind::Mark)
                    {
                        assert_eq!(header.length, u64::from(header.stored_len));
                    }
                    if let Ok(logical) = payload_bytes(&header, stored, path, 0) {
                        if matches!(header.kind, RecordKind::Write | RecordKind::Mark) {
                            assert_eq!(logical.len() as u64, header.length, "seed {seed}");
                        }
                    }
                }
                Err(Error::Corruption { reason, offset, .. }) => {
                    assert_eq!(offset, 0);
                    if resealed && !reason.contains("CRC") {
                        refused_behind_crc += 1;
                    }
                }
                Err(other) => panic!("seed {seed}: a decode error that is not corruption: {other}"),
            }
            let mut frame = bytes.clone();
            reseal_64(&mut frame);
            if let Ok(f) = BatchFrame::decode(&frame) {
                assert!(
                    f.count > 0 && f.last_seq >= f.first_seq,
                    "seed {seed}: {f:?}"
                );
            }
            if let Ok(h) = SegmentHeader::decode(&frame, path) {
                assert_eq!(
                    u32::from_le_bytes(frame[8..12].try_into().expect("4 bytes")),
                    tidemark_journal::segment::FORMAT_VERSION,
                    "seed {seed}: {h:?}"
                );
            }
            let _ = Mark::decode(&bytes);
        }
        assert!(
            refused_behind_crc > 50 && accepted > 50,
            "seed {seed}: only {refused_behind_crc} damaged records reached the checks behind the CRC, {accepted} decoded"
        );
    }
}

#[test]
fn reads_appends_and_retention_run_together() {
    for seed in seeds(3).into_iter().take(4) {
        let _guard = SeedGuard(seed, "reads_appends_and_retention_run_together");
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(
            1_800_000_000_000_000_000,
        )));
        let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
        let size = 256 << 10;
        let volume = journal.create_volume("vol", size).expect("volume").id;
        let model = parking_lot::Mutex::new(Model::with_volume(volume, size));
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // Appends.
            scope.spawn(|| {
                let mut rng = rng(seed);
                for _ in 0..300 {
                    let op = random_op(&mut rng, size, 20_000);
                    if matches!(op, Op::TagSet(_) | Op::TagDelete(_)) {
                        continue;
                    }
                    let handle = op.append_to(&journal, volume).expect("append");
                    let appended = handle.wait().expect("durable");
                    model
                        .lock()
                        .records
                        .insert(appended.seq, (volume, op, appended.time));
                }
                done.store(true, Ordering::SeqCst);
            });
            // Retention, moving the horizon now and then.
            scope.spawn(|| {
                let mut rng = rng(seed ^ 1);
                while !done.load(Ordering::SeqCst) {
                    let history = journal.history();
                    if history.newest_seq > history.horizon_seq {
                        let target = rng.random_range(history.horizon_seq..=history.newest_seq);
                        journal.retain_from(target, false).expect("retention");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(rng.random_range(1..15)));
                }
            });
            // Reads at random retained points: each either reads exactly
            // what the model says the volume held then, or finds the point
            // folded away in the meantime.
            for t in 0..2 {
                let journal = &journal;
                let model = &model;
                let done = &done;
                scope.spawn(move || {
                    let mut rng = rng(seed ^ (10 + t));
                    let mut buf = vec![0u8; 16 << 10];
                    while !done.load(Ordering::SeqCst) {
                        // Only points whose records the model already has.
                        let history = journal.history();
                        let known = model.lock().newest().min(history.newest_seq);
                        if known < history.horizon_seq {
                            std::thread::yield_now();
                            continue;
                        }
                        let seq = rng.random_range(history.horizon_seq..=known);
                        let offset = rng.random_range(0..size - buf.len() as u64);
                        match journal.read("vol", offset, &mut buf, Point::Seq(seq)) {
                            Ok(_) => {
                                let expected = model.lock().state_at(volume, seq);
                                assert!(
                                    buf[..]
                                        == expected[offset as usize..offset as usize + buf.len()],
                                    "read at seq {seq} offset {offset} differs from the model"
                                );
                            }
                            Err(Error::PointOutOfRange { .. }) => {}
                            Err(e) => panic!("read at seq {seq}: {e}"),
                        }
                    }
                });
            }
        });
        let mut model = model.into_inner();
        model.horizon = journal.history().horizon_seq;
        check_reads(&journal, &model, &mut rng(seed ^ 99), 20);
    }
}
