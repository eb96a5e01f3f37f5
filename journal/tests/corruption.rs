//! Torn tails, flipped bytes and a lost index: recovery finds the truth in
//! the segments, reports damage with its file and offset, and never panics.

mod common;

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use rand::Rng;
use tidemark_journal::manifest::Manifest;
use tidemark_journal::{Error, Journal, ManualClock, RecoveryMode, Timestamp, VolumeId};

const START: i64 = 1_800_000_000_000_000_000;

/// A journal with one volume and `batches` batches of random changes, each
/// made durable before the next (so each is its own batch on disk).
fn build(dir: &Path, clock: &Arc<ManualClock>, seed: u64, batches: usize) -> (Model, VolumeId) {
    let mut rng = rng(seed);
    let (journal, _) = open(dir, clock, RecoveryMode::Strict);
    let size = 96 * 1024;
    let volume = journal.create_volume("vol0", size).expect("create").id;
    let mut model = Model::with_volume(volume, size);
    for _ in 0..batches {
        clock.advance(1_000_000);
        let ops = (0..rng.random_range(1..=4))
            .map(|_| (volume, random_op(&mut rng, size, 16_000)))
            .collect();
        apply(&journal, &mut model, ops);
    }
    journal.close().expect("close");
    (model, volume)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("segments"))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
}

/// Offset just past the last non-zero byte of a segment: where its last
/// batch ends.
fn used_len(path: &Path) -> usize {
    let bytes = fs::read(path).expect("read");
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

/// Opening after damage either reports corruption that names the file, or
/// recovers a prefix of the history whose every point reads as the model.
fn check_recovery(
    dir: &Path,
    clock: &Arc<ManualClock>,
    model: &Model,
    mode: RecoveryMode,
    seed: u64,
) -> Option<u64> {
    let mut rng = rng(seed ^ 0xabc);
    match Journal::open(dir, small_options(clock.clone(), mode)) {
        Err(e @ Error::Corruption { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(".seg") || text.contains("MANIFEST"),
                "error names no file: {text}"
            );
            assert!(text.contains("offset"), "error names no offset: {text}");
            None
        }
        Err(e) => panic!("open after damage failed with a non-corruption error: {e}"),
        Ok((journal, report)) => {
            let newest = report.newest_seq;
            assert!(
                newest <= model.newest(),
                "recovery invented records: {report:?}"
            );
            let mut prefix = model.clone();
            prefix.cut_after(newest);
            check_reads(&journal, &prefix, &mut rng, 12);
            Some(newest)
        }
    }
}

#[test]
fn torn_tail_is_cut_at_the_last_whole_batch() {
    for seed in seeds(12) {
        let _guard = SeedGuard(seed, "torn_tail_is_cut_at_the_last_whole_batch");
        let mut rng = rng(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
        let (mut model, _) = build(dir.path(), &clock, seed, 30);

        // Append a batch, then tear it at a random byte: zero everything
        // from there on, as a crash before the fsync would leave it.
        {
            let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
            let volume = journal.volumes()[0].id;
            let ops = (0..3)
                .map(|_| (volume, random_op(&mut rng, 96 * 1024, 16_000)))
                .collect();
            apply(&journal, &mut model, ops);
            journal.close().expect("close");
        }
        let newest_file = segment_files(dir.path())
            .into_iter()
            .rev()
            .find(|f| used_len(f) > 64)
            .expect("a segment with batches");
        let used = used_len(&newest_file);
        let mut bytes = fs::read(&newest_file).expect("read");
        // Find where the last batch starts: the previous journal state ended there.
        let batch_start = find_last_batch(&bytes[..used]);
        let first_seq_of_batch = u64::from_le_bytes(
            bytes[batch_start + 16..batch_start + 24]
                .try_into()
                .expect("8 bytes"),
        );
        let last_before = first_seq_of_batch - 1;
        let tear = rng.random_range(batch_start + 1..used - 1);
        bytes[tear..used].fill(0);
        if rng.random_bool(0.5) {
            // Some torn writes leave garbage, not zeros.
            rng.fill(&mut bytes[tear..(tear + 40).min(used)]);
        }
        fs::write(&newest_file, &bytes).expect("write");

        let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
        let torn = report
            .torn_tail
            .clone()
            .unwrap_or_else(|| panic!("no torn tail reported: {report:?}"));
        assert_eq!(torn.path, newest_file);
        assert_eq!(torn.offset as usize, batch_start);
        assert_eq!(report.newest_seq, last_before, "{report:?}");
        model.cut_after(last_before);
        check_reads(&journal, &model, &mut rng, 10);
        // The journal goes on from the cut.
        let volume = journal.volumes()[0].id;
        let data = payload(&mut rng, 5000);
        apply(
            &journal,
            &mut model,
            vec![(volume, Op::Write { offset: 777, data })],
        );
        assert!(model.newest() > last_before);
        journal.close().expect("close");
        let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
        assert!(report.torn_tail.is_none());
        check_reads(&journal, &model, &mut rng, 10);
    }
}

/// The id of a segment file, from its name.
fn segment_id_of(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("segment id")
}

/// The offset of the last batch frame in `bytes`.
fn find_last_batch(bytes: &[u8]) -> usize {
    let magic = u32::from_le_bytes(*b"TDBT").to_le_bytes();
    let mut last = None;
    let mut at = 64;
    while let Some(found) = bytes[at..].windows(4).position(|w| w == magic) {
        let pos = at + found;
        let body_len =
            u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().expect("4 bytes")) as usize;
        last = Some(pos);
        at = pos + 64 + body_len;
        if at >= bytes.len() {
            break;
        }
    }
    last.expect("a batch")
}

#[test]
fn damage_before_valid_batches_is_reported_with_its_position() {
    for seed in seeds(8) {
        let _guard = SeedGuard(
            seed,
            "damage_before_valid_batches_is_reported_with_its_position",
        );
        let mut rng = rng(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
        let (model, _) = build(dir.path(), &clock, seed, 40);
        let files = segment_files(dir.path());
        let file = &files[rng.random_range(0..files.len())];
        if used_len(file) <= 64 {
            continue; // the spare segment, made ahead of time, holds nothing
        }
        let bytes = fs::read(file).expect("read");
        let first_batch = 64;
        // Damage the first batch of the chosen segment. It is only provably
        // not a torn tail if a later batch was written after it was durable:
        // the newest batch of all carries the newest watermark.
        let segment_id = segment_id_of(file);
        let newest_file = files
            .iter()
            .rev()
            .find(|f| used_len(f) > 64)
            .expect("a segment with batches");
        let newest = fs::read(newest_file).expect("read");
        let newest_last = find_last_batch(&newest[..used_len(newest_file)]);
        let watermark = (
            u64::from_le_bytes(
                newest[newest_last + 40..newest_last + 48]
                    .try_into()
                    .expect("8 bytes"),
            ),
            u64::from_le_bytes(
                newest[newest_last + 48..newest_last + 56]
                    .try_into()
                    .expect("8 bytes"),
            ),
        );
        if watermark <= (segment_id, first_batch as u64) {
            continue;
        }
        let mut damaged = bytes.clone();
        let at = rng.random_range(first_batch..first_batch + 64 + 56);
        damaged[at] ^= 0x10;
        fs::write(file, &damaged).expect("write");

        match Journal::open(
            dir.path(),
            small_options(clock.clone(), RecoveryMode::Strict),
        ) {
            Err(Error::Corruption { path, offset, .. }) => {
                assert_eq!(&path, file);
                assert_eq!(offset, first_batch as u64);
            }
            other => panic!("strict open of a damaged journal gave {other:?}"),
        }
        let newest = check_recovery(
            dir.path(),
            &clock,
            &model,
            RecoveryMode::TruncateCorrupt,
            seed,
        )
        .expect("truncate-corrupt opens");
        assert!(newest < model.newest());
        // And the cut journal stays consistent across another reopen.
        let mut prefix = model.clone();
        prefix.cut_after(newest);
        let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
        assert_eq!(report.newest_seq, newest);
        check_reads(&journal, &prefix, &mut rng, 10);
    }
}

#[test]
fn random_byte_flips_never_panic_and_never_invent_data() {
    for seed in seeds(16) {
        let _guard = SeedGuard(seed, "random_byte_flips_never_panic_and_never_invent_data");
        let mut rng = rng(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
        let (model, _) = build(dir.path(), &clock, seed, 25);
        let files = segment_files(dir.path());
        for _ in 0..rng.random_range(1..=3) {
            let file = &files[rng.random_range(0..files.len())];
            let mut bytes = fs::read(file).expect("read");
            let used = used_len(file).max(64);
            let at = rng.random_range(0..used + 64).min(bytes.len() - 1);
            bytes[at] ^= 1 << rng.random_range(0..8);
            fs::write(file, &bytes).expect("write");
        }
        let mode = if rng.random_bool(0.5) {
            RecoveryMode::Strict
        } else {
            RecoveryMode::TruncateCorrupt
        };
        check_recovery(dir.path(), &clock, &model, mode, seed);
    }
}

#[test]
fn truncated_segment_files_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (model, _) = build(dir.path(), &clock, 7, 60);
    let files = segment_files(dir.path());
    assert!(files.len() > 1, "want several segments");
    // A sealed segment cut short is damage, not a tail.
    let file = &files[0];
    let len = fs::metadata(file).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|f| f.set_len(len / 3))
        .expect("truncate");
    match Journal::open(
        dir.path(),
        small_options(clock.clone(), RecoveryMode::Strict),
    ) {
        Err(e @ Error::Corruption { .. }) => {
            assert!(e.to_string().contains(&file.display().to_string()), "{e}")
        }
        other => panic!("open of a truncated segment gave {other:?}"),
    }
    check_recovery(dir.path(), &clock, &model, RecoveryMode::TruncateCorrupt, 7).expect("opens");
}

#[test]
fn rebuilt_index_is_identical() {
    for seed in seeds(6) {
        let _guard = SeedGuard(seed, "rebuilt_index_is_identical");
        let mut rng = rng(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
        let (mut model, volume) = build(dir.path(), &clock, seed, 40);
        {
            // Move the horizon into the middle of a segment, so the rebuild
            // must skip folded records in a kept segment.
            let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
            let target = rng.random_range(1..model.newest());
            journal.retain_from(target, false).expect("retention");
            model.horizon = target;
            apply(
                &journal,
                &mut model,
                vec![(volume, random_op(&mut rng, 96 * 1024, 16_000))],
            );
            journal.close().expect("close");
        }
        let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
        let before = journal.dump_index().expect("dump");
        let tags_before = journal.tags(volume).expect("tags");
        journal.close().expect("close");

        fs::remove_dir_all(dir.path().join("index")).expect("delete index");
        let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
        assert!(report.indexed_records > 0, "{report:?}");
        let after = journal.dump_index().expect("dump");
        assert_eq!(before.len(), after.len(), "index entry counts differ");
        for (a, b) in before.iter().zip(&after) {
            assert_eq!(a, b, "index entries differ");
        }
        assert_eq!(journal.tags(volume).expect("tags"), tags_before);
        check_reads(&journal, &model, &mut rng, 15);
    }
}

#[test]
fn interrupted_fold_is_finished_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (mut model, _) = build(dir.path(), &clock, 3, 50);
    let target = model.newest() / 2;
    // As if a fold had recorded its intent and written part of the base
    // image, then the process died.
    let mut manifest = Manifest::load(&tidemark_journal::fs::RealFs, dir.path())
        .expect("load")
        .expect("manifest");
    manifest.folding_to = Some(tidemark_journal::manifest::FoldIntent { seq: target });
    manifest
        .store(&tidemark_journal::fs::RealFs, dir.path())
        .expect("store");
    let base = dir.path().join("base").join(format!("{:010}.img", 1));
    let mut garbage = fs::read(&base).expect("read base");
    let state = model.state_at(1, target);
    garbage[..4096].copy_from_slice(&state[..4096]);
    fs::write(&base, &garbage).expect("write base");

    let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
    assert_eq!(report.finished_fold, Some(target), "{report:?}");
    assert_eq!(journal.history().horizon_seq, target);
    model.horizon = target;
    let mut rng = rng(3);
    check_reads(&journal, &model, &mut rng, 20);
}

#[test]
fn segment_of_another_group_is_refused() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    build(a.path(), &clock, 1, 5);
    build(b.path(), &clock, 2, 5);
    let foreign = segment_files(b.path()).remove(0);
    fs::copy(
        &foreign,
        a.path().join("segments").join("00000000000000000099.seg"),
    )
    .expect("copy");
    match Journal::open(a.path(), small_options(clock.clone(), RecoveryMode::Strict)) {
        Err(e @ Error::Corruption { .. }) => assert!(e.to_string().contains("group id"), "{e}"),
        other => panic!("a foreign segment was accepted: {other:?}"),
    }
}

/// Rewrites the durable watermark of the batch frame at `pos` (and its CRC).
fn set_watermark(bytes: &mut [u8], pos: usize, segment: u64, durable_end: u64) {
    bytes[pos + 40..pos + 48].copy_from_slice(&segment.to_le_bytes());
    bytes[pos + 48..pos + 56].copy_from_slice(&durable_end.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[pos..pos + 60]);
    bytes[pos + 60..pos + 64].copy_from_slice(&crc.to_le_bytes());
}

/// The frame offsets of every batch in a segment's bytes.
fn batch_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 64;
    while at + 64 <= bytes.len() && bytes[at..at + 4] == *b"TDBT" {
        out.push(at);
        at += 64 + u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
    }
    out
}

#[test]
fn a_batch_written_while_the_previous_synced_does_not_make_a_tear_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (model, _) = build(dir.path(), &clock, 11, 6);
    let file = segment_files(dir.path())
        .into_iter()
        .rev()
        .find(|f| used_len(f) > 64)
        .expect("a segment with batches");
    let segment_id = segment_id_of(&file);
    let pristine = fs::read(&file).expect("read");
    let batches = batch_offsets(&pristine);
    assert!(batches.len() >= 3, "want several batches, got {batches:?}");
    let torn = batches[batches.len() - 2];
    let last = batches[batches.len() - 1];
    let seq_before_torn =
        u64::from_le_bytes(pristine[torn + 16..torn + 24].try_into().expect("8 bytes")) - 1;

    // The last batch was written while the one before it was still being
    // synced (its durable_end stops short of it), and the crash tore that
    // one: a torn tail, both cut.
    let mut bytes = pristine.clone();
    set_watermark(&mut bytes, last, segment_id, torn as u64);
    bytes[torn + 80] ^= 0xff;
    fs::write(&file, &bytes).expect("write");
    let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
    let cut = report
        .torn_tail
        .clone()
        .unwrap_or_else(|| panic!("no torn tail: {report:?}"));
    assert_eq!(cut.offset as usize, torn);
    assert_eq!(report.newest_seq, seq_before_torn);
    let mut prefix = model.clone();
    prefix.cut_after(seq_before_torn);
    check_reads(&journal, &prefix, &mut rng(11), 10);
    journal.close().expect("close");

    // The same damage when the last batch was written after the damaged
    // one was durable: acknowledged data is gone, so it is corruption.
    let mut bytes = pristine;
    set_watermark(&mut bytes, last, segment_id, last as u64);
    bytes[torn + 80] ^= 0xff;
    fs::write(&file, &bytes).expect("write");
    match Journal::open(
        dir.path(),
        small_options(clock.clone(), RecoveryMode::Strict),
    ) {
        Err(Error::Corruption {
            path,
            offset,
            reason,
        }) => {
            assert_eq!(path, file);
            assert_eq!(offset as usize, torn);
            assert!(reason.contains(&format!("at offset {last}")), "{reason}");
        }
        other => panic!("durable damage was not reported: {other:?}"),
    }
}

#[test]
fn a_tear_at_the_end_of_a_segment_takes_unacknowledged_later_segments_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (model, _) = build(dir.path(), &clock, 21, 70);
    let with_batches: Vec<PathBuf> = segment_files(dir.path())
        .into_iter()
        .filter(|f| used_len(f) > 64)
        .collect();
    assert!(with_batches.len() >= 2, "want two segments with batches");
    let older = &with_batches[with_batches.len() - 2];
    let newer = &with_batches[with_batches.len() - 1];
    let older_id = segment_id_of(older);
    let older_pristine = fs::read(older).expect("read");
    let newer_pristine = fs::read(newer).expect("read");
    let torn = *batch_offsets(&older_pristine).last().expect("a batch");
    let seq_before_torn = u64::from_le_bytes(
        older_pristine[torn + 16..torn + 24]
            .try_into()
            .expect("8 bytes"),
    ) - 1;

    // Every batch of the newer segment was written while the older one's
    // last batch was still syncing, and that batch tore: a torn tail that
    // takes the newer segment with it.
    let mut older_bytes = older_pristine.clone();
    older_bytes[torn + 80] ^= 0xff;
    let mut newer_bytes = newer_pristine.clone();
    for pos in batch_offsets(&newer_bytes) {
        set_watermark(&mut newer_bytes, pos, older_id, torn as u64);
    }
    fs::write(older, &older_bytes).expect("write");
    fs::write(newer, &newer_bytes).expect("write");
    let (journal, report) = open(dir.path(), &clock, RecoveryMode::Strict);
    let cut = report
        .torn_tail
        .clone()
        .unwrap_or_else(|| panic!("no torn tail: {report:?}"));
    assert_eq!((&cut.path, cut.offset as usize), (older, torn));
    assert!(report.removed_segments.contains(newer), "{report:?}");
    assert_eq!(report.newest_seq, seq_before_torn);
    let mut prefix = model.clone();
    prefix.cut_after(seq_before_torn);
    check_reads(&journal, &prefix, &mut rng(21), 10);
    journal.close().expect("close");

    // Once a batch of the newer segment vouches that the older segment was
    // durable, the same damage is corruption.
    let mut newer_bytes = newer_pristine;
    let first = batch_offsets(&newer_bytes)[0];
    set_watermark(&mut newer_bytes, first, segment_id_of(newer), 64);
    fs::write(older, &older_bytes).expect("write");
    fs::write(newer, &newer_bytes).expect("write");
    match Journal::open(
        dir.path(),
        small_options(clock.clone(), RecoveryMode::Strict),
    ) {
        Err(Error::Corruption {
            path,
            offset,
            reason,
        }) => {
            assert_eq!((&path, offset as usize), (older, torn));
            assert!(reason.contains(&newer.display().to_string()), "{reason}");
        }
        other => panic!("vouched-for damage was not reported: {other:?}"),
    }
}

/// Damage at the end of a segment, followed by a later segment that cannot
/// be opened (its header is damaged): that segment might vouch for the
/// damaged bytes, so strict recovery reports it instead of taking the
/// damage for a torn tail and deleting every later segment.
#[test]
fn a_later_segment_that_cannot_be_opened_is_never_a_reason_to_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    build(dir.path(), &clock, 22, 70);
    let with_batches: Vec<PathBuf> = segment_files(dir.path())
        .into_iter()
        .filter(|f| used_len(f) > 64)
        .collect();
    assert!(with_batches.len() >= 2, "want two segments with batches");
    let older = &with_batches[with_batches.len() - 2];
    let newer = &with_batches[with_batches.len() - 1];
    let mut older_bytes = fs::read(older).expect("read");
    let last = *batch_offsets(&older_bytes).last().expect("a batch");
    older_bytes[last + 80] ^= 0xff;
    fs::write(older, &older_bytes).expect("write");
    let mut newer_bytes = fs::read(newer).expect("read");
    newer_bytes[20] ^= 0xff; // inside the header, under its CRC
    fs::write(newer, &newer_bytes).expect("write");

    match Journal::open(
        dir.path(),
        small_options(clock.clone(), RecoveryMode::Strict),
    ) {
        Err(Error::Corruption { path, .. }) => {
            assert!(path == *older || path == *newer, "{}", path.display())
        }
        Err(e) => panic!("expected corruption naming a segment, got {e}"),
        Ok((_, report)) => panic!("strict recovery cut acknowledged data: {report:?}"),
    }
    assert!(newer.exists(), "the later segment is kept for the operator");
}

/// The newest segment's header zeroed while batches follow it is damage,
/// not a segment whose creation never finished (a header is written and
/// synced before any batch): strict recovery reports it and keeps the
/// file, instead of removing it with the acknowledged records it holds.
#[test]
fn a_zeroed_header_before_batches_is_damage_not_an_unfinished_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    build(dir.path(), &clock, 23, 70);
    // The newest segment file must be the one with batches (a segment
    // made ahead and never used holds none: as if the crash came first).
    let mut files = segment_files(dir.path());
    while files.last().is_some_and(|f| used_len(f) <= 64) {
        fs::remove_file(files.pop().expect("a file")).expect("remove");
    }
    let newest = files.last().expect("a segment with batches").clone();
    let mut bytes = fs::read(&newest).expect("read");
    bytes[..64].fill(0);
    fs::write(&newest, &bytes).expect("write");

    match Journal::open(
        dir.path(),
        small_options(clock.clone(), RecoveryMode::Strict),
    ) {
        Err(Error::Corruption { path, .. }) => assert_eq!(path, newest),
        Err(e) => panic!("expected corruption naming {}, got {e}", newest.display()),
        Ok((_, report)) => panic!("strict recovery dropped acknowledged data: {report:?}"),
    }
    assert!(
        newest.exists(),
        "the damaged segment is kept for the operator"
    );
}

/// With `trust_sealed`, start-up takes the sealed segments the index has
/// wholly indexed from its catalogue without reading them: the same
/// history opens, and damage in one of them is found by the background
/// check (naming the file), not at open.
#[test]
fn sealed_segments_are_trusted_at_start_and_checked_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (model, _) = build(dir.path(), &clock, 7, 120);
    let options = || tidemark_journal::JournalOptions {
        trust_sealed: true,
        ..small_options(clock.clone(), RecoveryMode::Strict)
    };
    let check_done = |journal: &Journal| {
        for _ in 0..2000 {
            if let Some(found) = journal.sealed_check() {
                return found;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the background check did not finish");
    };

    let (journal, report) = Journal::open(dir.path(), options()).expect("open");
    assert!(
        report.trusted_segments >= 2 && report.trusted_segments + 2 <= report.segments,
        "sealed segments trusted, the newest two scanned: {report:?}"
    );
    assert_eq!(report.newest_seq, model.newest());
    check_reads(&journal, &model, &mut rng(8), 12);
    assert_eq!(check_done(&journal), Vec::new());
    journal.close().expect("close");

    let oldest = segment_files(dir.path())
        .into_iter()
        .next()
        .expect("a segment");
    let mut bytes = fs::read(&oldest).expect("read");
    bytes[64 + 100] ^= 0x10;
    fs::write(&oldest, &bytes).expect("write");
    let (journal, report) = Journal::open(dir.path(), options()).expect("open without a scan");
    assert!(report.trusted_segments >= 2, "{report:?}");
    let found = check_done(&journal);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, oldest);
    journal.close().expect("close");

    // Without trust, the same damage stops a strict open, as before.
    match Journal::open(
        dir.path(),
        small_options(clock.clone(), RecoveryMode::Strict),
    ) {
        Err(Error::Corruption { path, .. }) => assert_eq!(path, oldest),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a strict scan must find the damage"),
    }
}

/// Offset of the first hole at or after `from` (the file's length if
/// none): where the filesystem holds no written block.
fn first_hole(path: &Path, from: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(path).expect("open");
    // SAFETY: a plain lseek on a file this function owns.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_HOLE) };
    assert!(at >= 0, "SEEK_HOLE on {}", path.display());
    at as u64
}

/// A journal of small batches (each made durable before the next) gets
/// its next segments zero-filled ahead of time, so a group commit writes
/// into written blocks; such segments recover like any other.
#[test]
fn segments_for_small_batches_are_zero_filled_and_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let (model, _) = build(dir.path(), &clock, 11, 400);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4, "several segments: {files:?}");
    let direct = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&files[0])
        .is_ok();
    if direct {
        // The first segment was made before any batch was seen; the
        // spares after the first roll were zero-filled (a zero-fill a
        // roll caught part way stops there, so not necessarily all).
        let size = fs::metadata(&files[2]).expect("stat").len();
        let later = &files[2..];
        let filled = later
            .iter()
            .filter(|file| first_hole(file, 4096) == size)
            .count();
        assert!(
            filled * 2 >= later.len(),
            "{filled} of {} later segments zero-filled",
            later.len()
        );
    }
    let (journal, _) = open(dir.path(), &clock, RecoveryMode::Strict);
    assert_eq!(journal.history().newest_seq, model.newest());
    check_reads(&journal, &model, &mut rng(11), 200);
}

/// Disk blocks a file holds.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").blocks() * 512
}

/// A segment holds disk blocks only a little ahead of what it was written
/// with, not its whole size: idle groups cost little disk. The writer
/// allocates more as batches get near, and every record reads back.
#[test]
fn segments_allocate_disk_as_they_fill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(Timestamp::from_nanos(START)));
    let options = tidemark_journal::JournalOptions {
        segment_size: 64 << 20,
        ..small_options(clock.clone(), RecoveryMode::Strict)
    };
    let (journal, _) = Journal::open(dir.path(), options.clone()).expect("open");
    let volume = journal.create_volume("vol0", 1 << 20).expect("create").id;
    let segment = segment_files(dir.path()).pop().expect("a segment");
    assert_eq!(fs::metadata(&segment).expect("stat").len(), 64 << 20);
    let at_start = allocated_bytes(&segment);
    assert!(
        at_start <= 2 << 20,
        "{at_start} bytes allocated at creation"
    );

    let mut rng = rng(3);
    let mut model = Model::with_volume(volume, 1 << 20);
    let mut written = 0u64;
    while written < 24 << 20 {
        let data = payload(&mut rng, 32 << 10);
        let offset = rng.random_range(0..32u64) * (32 << 10);
        written += data.len() as u64;
        apply(
            &journal,
            &mut model,
            vec![(volume, Op::Write { offset, data })],
        );
    }
    journal.sync().expect("sync");
    let used = used_len(&segment) as u64;
    let grown = allocated_bytes(&segment);
    assert!(used > 9 << 20, "past the first allocation: {used}");
    assert!(
        grown >= used && grown <= used + (9 << 20),
        "{grown} bytes allocated for {used} used"
    );
    journal.close().expect("close");
    let (journal, _) = Journal::open(dir.path(), options).expect("reopen");
    assert_eq!(journal.history().newest_seq, model.newest());
    check_reads(&journal, &model, &mut rng, 100);
}
