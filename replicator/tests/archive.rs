//! The archiver against a directory store and a store that fails on
//! command: every point it claims restores byte for byte, an outage costs
//! no write and no record, a fold makes a new base version, `keep` deletes
//! only what no retained point needs, and damage is named.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{rngs::SmallRng, Rng, SeedableRng};
use tidemark_journal::journal::Change;
use tidemark_journal::{CacheTiers, Journal, JournalOptions, Point, Seq};
use tidemark_replicator::archive::catalog::Catalog;
use tidemark_replicator::archive::restore::restore;
use tidemark_replicator::archive::store::{FaultyStore, LocalStore};
use tidemark_replicator::archive::{
    ArchivePoint, ArchiveSettings, ArchiveView, Archiver, ObjectStore,
};

const SIZE: u64 = 12 << 20;

fn options() -> JournalOptions {
    JournalOptions {
        group: "g".into(),
        segment_size: 1 << 20,
        max_record_len: 128 << 10,
        max_batch_bytes: 256 << 10,
        direct_io: false,
        memory_cache_bytes: 8 << 20,
        cache_tiers: CacheTiers::Memory,
        ..JournalOptions::default()
    }
}

fn settings() -> ArchiveSettings {
    ArchiveSettings {
        keep: None,
        upload_after: Duration::from_millis(200),
        base_every: Duration::ZERO,
        max_lag_bytes: 1 << 30,
        object_bytes: 512 << 10,
        poll: Duration::from_millis(50),
    }
}

fn write_some(journal: &Journal, rng: &mut SmallRng, n: usize) -> Seq {
    let volume = journal.volume("v").unwrap().id;
    let mut last = 0;
    for _ in 0..n {
        let offset = rng.random_range(0..SIZE / 4096 - 16) * 4096;
        let change = match rng.random_range(0..10) {
            0 => Change::Zero {
                offset,
                len: 8 * 4096,
            },
            1 => Change::Trim { offset, len: 4096 },
            _ => {
                let len = rng.random_range(1..16) * 4096;
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8) ^ (rng.random::<u8>() % 4))
                    .collect();
                last = journal
                    .append(
                        volume,
                        Change::Write {
                            offset,
                            data: &data,
                        },
                    )
                    .unwrap()
                    .wait()
                    .unwrap()
                    .seq;
                continue;
            }
        };
        last = journal.append(volume, change).unwrap().wait().unwrap().seq;
    }
    last
}

async fn wait_archived(archiver: &Archiver, seq: Seq) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        archiver.wake();
        let status = archiver.status();
        if status.archived_seq >= seq {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "archive stuck at seq {} (wanted {seq}): {:?}",
            status.archived_seq,
            status.last_error
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn image(journal: &Journal, seq: Seq) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    journal.read("v", 0, &mut buf, Point::Seq(seq)).unwrap();
    buf
}

async fn restored(store: &Arc<dyn ObjectStore>, point: ArchivePoint, dir: &Path) -> (Seq, Vec<u8>) {
    let catalog = Arc::new(Catalog::for_volume(store.clone(), "v").await.unwrap());
    let seq = catalog.resolve("v", &point).await.unwrap();
    let path = dir.join(format!("restore-{seq}.img"));
    restore(catalog, "v", seq, &path, 4, Arc::new(|_, _| {}))
        .await
        .unwrap();
    (seq, std::fs::read(&path).unwrap())
}

/// The whole volume as `view` serves it, read `piece` bytes at a time
/// (from a blocking thread).
fn read_whole(view: &ArchiveView, piece: usize) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    for (n, part) in buf.chunks_mut(piece).enumerate() {
        view.read((n * piece) as u64, part).unwrap();
    }
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_points_restore_byte_for_byte_through_an_outage_and_a_fold() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).unwrap();
    let volume = journal.create_volume("v", SIZE).unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    let early = write_some(&journal, &mut rng, 200);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("bucket")));
    let faulty = Arc::new(FaultyStore::new(local.clone()));
    let archiver = Archiver::start(
        "g",
        journal.clone(),
        faulty.clone(),
        settings(),
        Arc::new(|| true),
    );
    let tagged = journal
        .set_tag(volume.id, "before-outage", b"")
        .unwrap()
        .wait()
        .unwrap()
        .seq;
    wait_archived(&archiver, tagged).await;
    assert_eq!(journal.holds().get("archive"), Some(&tagged));

    // The store goes down: writes go on, the hold keeps the history.
    faulty.set_down(true);
    let during = write_some(&journal, &mut rng, 300);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = archiver.status();
    assert!(status.archived_seq < during);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("injected fault"),
        "{status:?}"
    );
    assert_eq!(journal.holds().get("archive"), Some(&tagged));
    faulty.set_down(false);
    wait_archived(&archiver, during).await;
    assert!(archiver.status().last_error.is_none());

    // A fold moves the horizon; a new base version follows.
    let images: Vec<(Seq, Vec<u8>)> = [early, tagged, during]
        .iter()
        .map(|&s| (s, image(&journal, s)))
        .collect();
    journal.retain_from(tagged, false).unwrap();
    let after_fold = write_some(&journal, &mut rng, 50);
    wait_archived(&archiver, after_fold).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Catalog::load(local.clone(), "g")
        .await
        .unwrap()
        .unwrap()
        .index
        .bases
        .len()
        < 2
    {
        assert!(Instant::now() < deadline, "no base version after the fold");
        archiver.wake();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let latest = image(&journal, after_fold);

    for (seq, want) in &images {
        let (got_seq, got) = restored(&local, ArchivePoint::Seq(*seq), dir.path()).await;
        assert_eq!(got_seq, *seq);
        assert!(got == *want, "restore at seq {seq} differs");
    }
    let (seq, got) = restored(
        &local,
        ArchivePoint::Tag("before-outage".into()),
        dir.path(),
    )
    .await;
    assert_eq!(seq, tagged);
    assert!(got == images[1].1);
    let (seq, got) = restored(&local, ArchivePoint::Latest, dir.path()).await;
    assert!(seq >= after_fold);
    assert!(got == latest, "restore at latest differs");

    // The same points served on demand: opening fetches the segments'
    // record maps, not the segments; a read fetches what it touches.
    let counted = Arc::new(FaultyStore::new(local.clone()));
    let catalog = Arc::new(Catalog::for_volume(counted.clone(), "v").await.unwrap());
    let mut on_demand = false;
    for (seq, want) in &images {
        let segment_bytes: u64 = catalog
            .plan(*seq)
            .unwrap()
            .segments
            .iter()
            .map(|s| s.bytes)
            .sum();
        let before = counted.got_bytes.load(Ordering::SeqCst);
        let view = ArchiveView::open(
            catalog.clone(),
            "v",
            *seq,
            &dir.path().join("cache"),
            8 << 20,
        )
        .await
        .unwrap();
        let opened = counted.got_bytes.load(Ordering::SeqCst) - before;
        // (Besides the maps, the base version's manifest: a few KiB.)
        assert!(
            opened < segment_bytes / 20 + (16 << 10),
            "opening seq {seq} fetched {opened} bytes; its segments hold {segment_bytes}"
        );
        on_demand |= segment_bytes > 1 << 20;
        let got = tokio::task::spawn_blocking(move || {
            let mut block = vec![0u8; 4096];
            view.read(SIZE / 2, &mut block).unwrap();
            assert!(view.fetched_pages.load(Ordering::Relaxed) <= 4);
            read_whole(&view, 128 << 10)
        })
        .await
        .unwrap();
        assert!(got == *want, "view at seq {seq} differs");
    }
    assert!(
        on_demand,
        "no point read more than 1 MiB of segments on demand"
    );
    // Objects without a record map (written by an older build) are
    // fetched whole and mixed with those read on demand.
    let mut older = Catalog::for_volume(local.clone(), "v").await.unwrap();
    for s in older.index.segments.iter_mut().step_by(2) {
        s.map_len = 0;
    }
    let view = ArchiveView::open(
        Arc::new(older),
        "v",
        during,
        &dir.path().join("cache"),
        1 << 20,
    )
    .await
    .unwrap();
    let got = tokio::task::spawn_blocking(move || read_whole(&view, 1 << 20))
        .await
        .unwrap();
    assert!(got == images[2].1, "a view of mixed objects differs");

    // Outside the window, and a corrupted object: named errors.
    let e = catalog
        .resolve("v", &ArchivePoint::Seq(u64::MAX))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("outside the archive window"), "{e}");
    // (A segment some point needs: `during` may be a base version's
    // alone, if the archiver was slow enough to make the base after the
    // fold right at it; `tagged` and `early` stand on the first base.)
    let (point, victim) = [during, tagged, early]
        .into_iter()
        .find_map(|seq| {
            let plan = catalog.plan(seq).unwrap();
            plan.segments.last().map(|s| (seq, s.key.clone()))
        })
        .expect("a point that needs a segment");
    let path = dir.path().join("bucket").join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() - 10;
    bytes[n] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let e = restore(
        catalog.clone(),
        "v",
        point,
        &dir.path().join("bad.img"),
        4,
        Arc::new(|_, _| {}),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains(&victim), "{e}");
    drop(archiver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_deletes_only_what_no_retained_point_needs() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).unwrap();
    journal.create_volume("v", SIZE).unwrap();
    let mut rng = SmallRng::seed_from_u64(8);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("bucket")));
    let faulty = Arc::new(FaultyStore::new(local.clone()));
    let mut s = settings();
    s.keep = Some(Duration::from_millis(300));
    s.max_lag_bytes = 256 << 10;
    let archiver = Archiver::start("g", journal.clone(), faulty.clone(), s, Arc::new(|| true));
    let first = write_some(&journal, &mut rng, 100);
    wait_archived(&archiver, first).await;
    // A point served from the bucket, opened before retention can pass it:
    // until the journal folds, the bucket has no newer base version, so
    // `keep` cannot delete what this point needs yet.
    let catalog = Arc::new(Catalog::for_volume(local.clone(), "v").await.unwrap());
    let early = first;
    let old_view = ArchiveView::open(catalog, "v", early, &dir.path().join("cache"), 1 << 20)
        .await
        .unwrap();
    journal.retain_from(first, false).unwrap();
    let second = write_some(&journal, &mut rng, 100);
    wait_archived(&archiver, second).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let third = write_some(&journal, &mut rng, 10);
    wait_archived(&archiver, third).await;
    // Retention in the bucket: the window starts at a base version after
    // `first`'s, and everything in it restores.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let catalog = Catalog::load(local.clone(), "g").await.unwrap().unwrap();
        if catalog.window().unwrap().0 >= first {
            break;
        }
        assert!(Instant::now() < deadline, "keep never deleted anything");
        archiver.wake();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = image(&journal, third);
    let (_, got) = restored(&local, ArchivePoint::Seq(third), dir.path()).await;
    assert!(got == want);
    // The new index goes up before the objects it no longer names are
    // deleted: look until the deleting is done.
    loop {
        let catalog = Catalog::load(local.clone(), "g").await.unwrap().unwrap();
        let keys: Vec<String> = local
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        for segment in &catalog.index.segments {
            assert!(keys.contains(&segment.key));
        }
        let orphans = keys.iter().any(|k| {
            k.contains("/segments/") && !catalog.index.segments.iter().any(|s| &s.key == k)
        });
        if !orphans {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "objects no index names remain: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The view opened before: its reads name what is gone and why.
    let e = tokio::task::spawn_blocking(move || {
        let mut piece = vec![0u8; 128 << 10];
        (0..SIZE)
            .step_by(piece.len())
            .find_map(|at| old_view.read(at, &mut piece).err())
    })
    .await
    .unwrap()
    .expect("a view of a point retention passed read everything");
    assert!(
        e.to_string().contains(&format!("v@{early}"))
            && e.to_string().contains("no longer holds")
            && e.to_string().contains("keep"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_down_past_its_limit_leaves_a_gap_and_resumes_from_a_base_version() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).unwrap();
    journal.create_volume("v", SIZE).unwrap();
    let mut rng = SmallRng::seed_from_u64(9);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("bucket")));
    let faulty = Arc::new(FaultyStore::new(local.clone()));
    let mut s = settings();
    s.max_lag_bytes = 256 << 10;
    let archiver = Archiver::start("g", journal.clone(), faulty.clone(), s, Arc::new(|| true));
    let third = write_some(&journal, &mut rng, 100);
    wait_archived(&archiver, third).await;
    // The store is down long enough for the journal to pass the limit:
    // retention passes the hold, and the archive records the gap.
    faulty.set_down(true);
    let lost = write_some(&journal, &mut rng, 400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = journal.retain_from(lost, false).unwrap();
    assert!(!report.gaps.is_empty(), "{report:?}");
    faulty.set_down(false);
    let after = write_some(&journal, &mut rng, 10);
    wait_archived(&archiver, after).await;
    let catalog = Catalog::load(local.clone(), "g").await.unwrap().unwrap();
    assert_eq!(catalog.index.gaps.len(), 1, "{:?}", catalog.index.gaps);
    let e = catalog
        .resolve("v", &ArchivePoint::Seq(third + 1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gap"), "{e}");
    let (_, got) = restored(&local, ArchivePoint::Seq(after), dir.path()).await;
    assert!(got == image(&journal, after));
}

/// Waits until the bucket's index lists `n` base versions.
async fn wait_bases(archiver: &Archiver, store: &Arc<dyn ObjectStore>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let catalog = Catalog::load(store.clone(), "g").await.unwrap();
        if catalog.is_some_and(|c| c.index.bases.len() >= n) {
            return;
        }
        assert!(Instant::now() < deadline, "no base version {n} within 30 s");
        archiver.wake();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A base version after the first reads only the chunks that records
/// uploaded since the last one touched — not the whole volume, every
/// `base_every` — and the point it stands at restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_base_version_reads_only_the_chunks_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(&dir.path().join("journal"), options()).unwrap();
    let volume = journal.create_volume("v", SIZE).unwrap().id;
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("bucket")));
    let archiver = Archiver::start(
        "g",
        journal.clone(),
        local.clone(),
        settings(),
        Arc::new(|| true),
    );
    let write = |offset: u64, byte: u8| {
        journal
            .append(
                volume,
                Change::Write {
                    offset,
                    data: &[byte; 8192],
                },
            )
            .unwrap()
            .wait()
            .unwrap()
            .seq
    };
    // The first base version, at the empty horizon, reads every chunk.
    wait_bases(&archiver, &local, 1).await;
    let full = archiver.status().base_read_bytes;
    assert_eq!(full, SIZE, "the first base version reads the whole volume");

    // Records in the middle 4 MiB chunk only, then a fold: the next base.
    let mut last = 0;
    for i in 0..4u64 {
        last = write((5 << 20) + i * 8192, 2 + i as u8);
    }
    wait_archived(&archiver, last).await;
    journal.retain_from(last, false).unwrap();
    let after = write((5 << 20) + 65536, 9);
    wait_archived(&archiver, after).await;
    wait_bases(&archiver, &local, 2).await;
    assert_eq!(
        archiver.status().base_read_bytes - full,
        4 << 20,
        "the second base version read more than the one chunk that changed"
    );
    let (seq, got) = restored(&local, ArchivePoint::Latest, dir.path()).await;
    assert!(got == image(&journal, seq), "restore at latest differs");
    let catalog = Catalog::load(local.clone(), "g").await.unwrap().unwrap();
    let base = catalog.index.bases[1].seq;
    let (got_seq, got) = restored(&local, ArchivePoint::Seq(base), dir.path()).await;
    assert_eq!(got_seq, base);
    assert!(
        got == image(&journal, base),
        "restore at the new base differs"
    );
    drop(archiver);
}
