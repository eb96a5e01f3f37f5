//! Restore from the bucket alone: the newest base version at or before the
//! point, its chunks downloaded in parallel straight to their offsets, then
//! the chain of segment objects applied in order (fetched a few ahead).
//! Needs no daemon and no local data.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::apply::{effects, zero_range, Effect};
use super::catalog::{locate, Catalog};
use super::error::{ArchiveError, Result};
use super::layout::CHUNK_SIZE;

/// Segment objects fetched ahead of the one being applied.
const SEGMENTS_AHEAD: usize = 4;

/// Reports progress: bytes done of bytes to do.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The seq restored.
    pub seq: u64,
    /// The volume's size.
    pub size: u64,
    /// Chunks downloaded.
    pub chunks: usize,
    /// Segment objects applied.
    pub segments: usize,
    /// Bytes downloaded.
    pub downloaded: u64,
}

fn open_target(path: &Path, size: u64) -> Result<(File, bool)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| ArchiveError::io("open restore target", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| ArchiveError::io("stat restore target", path, e))?;
    if meta.file_type().is_block_device() {
        let len = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
            .map_err(|e| ArchiveError::io("size restore target", path, e.into()))?;
        if len < size {
            return Err(ArchiveError::Invalid(format!(
                "restore target {} holds {len} bytes, the volume needs {size}",
                path.display()
            )));
        }
        // A device keeps what it held: zero chunks must be written.
        return Ok((file, true));
    }
    // A file starts empty and sparse: zero chunks are holes already.
    file.set_len(0)
        .and_then(|()| file.set_len(size))
        .map_err(|e| ArchiveError::io("size restore target", path, e))?;
    Ok((file, false))
}

/// Restores volume `volume` of `catalog` at `seq` to `to` (a file, made or
/// replaced, or a block device at least the volume's size), downloading
/// `parallel` chunks at a time.
pub async fn restore(
    catalog: Arc<Catalog>,
    volume: &str,
    seq: u64,
    to: &Path,
    parallel: usize,
    progress: Progress,
) -> Result<Restored> {
    let entry = catalog.volume(volume)?.clone();
    let plan = catalog.plan(seq)?;
    let manifest = catalog.base_manifest(&plan.base).await?;
    let chunks: Vec<Option<String>> = manifest
        .volumes
        .iter()
        .find(|v| v.id == entry.id)
        .map(|v| v.chunks.clone())
        .unwrap_or_default();
    let (file, zero_fill) = open_target(to, entry.size)?;
    let file = Arc::new(file);
    let path: Arc<PathBuf> = Arc::new(to.to_path_buf());

    let stored = chunks.iter().filter(|c| c.is_some()).count() as u64;
    let total = stored * CHUNK_SIZE + plan.segments.iter().map(|s| s.bytes).sum::<u64>();
    let done = Arc::new(AtomicU64::new(0));
    let downloaded = Arc::new(AtomicU64::new(0));
    progress(0, total);

    // Base chunks, `parallel` at a time.
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    let chunk_count = entry.size.div_ceil(CHUNK_SIZE) as usize;
    for n in 0..chunk_count {
        let offset = n as u64 * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(entry.size - offset);
        let hash = chunks.get(n).cloned().flatten();
        if hash.is_none() && !zero_fill {
            continue;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ArchiveError::Invalid("restore was cancelled".into()))?;
        let (catalog, file, path, done, downloaded, progress) = (
            catalog.clone(),
            file.clone(),
            path.clone(),
            done.clone(),
            downloaded.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            match hash {
                Some(hash) => {
                    let data = catalog.chunk(&hash).await?;
                    if data.len() as u64 != len {
                        return Err(ArchiveError::Corrupt {
                            location: catalog.store().location(),
                            key: super::layout::chunk_key(&catalog.index.group, &hash),
                            reason: format!("holds {} bytes, chunk {n} needs {len}", data.len()),
                        });
                    }
                    downloaded.fetch_add(data.len() as u64, Ordering::Relaxed);
                    tokio::task::spawn_blocking(move || {
                        file.write_all_at(&data, offset)
                            .map_err(|e| ArchiveError::io("write restore target", &*path, e))
                    })
                    .await
                    .map_err(|e| ArchiveError::Invalid(format!("restore task failed: {e}")))??;
                    let now = done.fetch_add(CHUNK_SIZE, Ordering::Relaxed) + CHUNK_SIZE;
                    progress(now, total);
                }
                None => {
                    tokio::task::spawn_blocking(move || zero_range(&file, &path, offset, len))
                        .await
                        .map_err(|e| {
                            ArchiveError::Invalid(format!("restore task failed: {e}"))
                        })??;
                }
            }
            Ok::<(), ArchiveError>(())
        });
        // Surface a failure as soon as it happens.
        while let Some(finished) = tasks.try_join_next() {
            finished.map_err(|e| ArchiveError::Invalid(format!("restore task failed: {e}")))??;
        }
    }
    while let Some(finished) = tasks.join_next().await {
        finished.map_err(|e| ArchiveError::Invalid(format!("restore task failed: {e}")))??;
    }

    // The chain, in order, a few objects fetched ahead.
    let mut ahead = VecDeque::new();
    let mut next = plan.segments.iter();
    let fetch = |entry: &super::index::SegmentEntry| {
        let (catalog, entry) = (catalog.clone(), entry.clone());
        tokio::spawn(async move { catalog.segment(&entry).await.map(|b| (entry, b)) })
    };
    for entry in next.by_ref().take(SEGMENTS_AHEAD) {
        ahead.push_back(fetch(entry));
    }
    while let Some(task) = ahead.pop_front() {
        if let Some(entry) = next.next() {
            ahead.push_back(fetch(entry));
        }
        let (segment, bytes) = task
            .await
            .map_err(|e| ArchiveError::Invalid(format!("restore task failed: {e}")))??;
        downloaded.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let (catalog2, file, path) = (catalog.clone(), file.clone(), path.clone());
        let (base, id, len) = (plan.base.seq, entry.id, segment.bytes);
        tokio::task::spawn_blocking(move || {
            let (_, body) = catalog2.decode_segment(&segment, &bytes)?;
            effects(&segment.key, body, id, base, seq, |effect| match effect {
                Effect::Data(offset, data) => file
                    .write_all_at(&data, offset)
                    .map_err(|e| ArchiveError::io("write restore target", &*path, e)),
                Effect::Zero(offset, len) => zero_range(&file, &path, offset, len),
            })
            .map_err(|e| locate(e, catalog2.store().as_ref()))
        })
        .await
        .map_err(|e| ArchiveError::Invalid(format!("restore task failed: {e}")))??;
        let now = done.fetch_add(len, Ordering::Relaxed) + len;
        progress(now, total);
    }
    let sync_file = file.clone();
    tokio::task::spawn_blocking(move || sync_file.sync_all())
        .await
        .map_err(|e| ArchiveError::Invalid(format!("restore task failed: {e}")))?
        .map_err(|e| ArchiveError::io("fsync restore target", to, e))?;
    progress(total, total);
    Ok(Restored {
        seq,
        size: entry.size,
        chunks: stored as usize,
        segments: plan.segments.len(),
        downloaded: downloaded.load(Ordering::Relaxed),
    })
}
