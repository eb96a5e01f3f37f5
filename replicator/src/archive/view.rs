//! A point of an archived volume served straight from the bucket, without
//! downloading the volume first: the chain's records are applied at open
//! into a local overlay (an extent map over a sparse file), and base-image
//! chunks are fetched when a read first needs them, through a cache bounded
//! in bytes. Opening costs the segments since the base version, not the
//! volume's size, so a filesystem mounts in seconds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::apply::{effects, Effect};
use super::catalog::{locate, Catalog};
use super::error::{ArchiveError, Result};
use super::layout::CHUNK_SIZE;

/// Where a range of the view comes from, when not from the base version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The overlay file, at the same offset.
    Overlay,
    /// Zeros.
    Zero,
}

/// Non-overlapping byte ranges `start -> (end, source)`.
#[derive(Debug, Default)]
struct Extents(BTreeMap<u64, (u64, Source)>);

impl Extents {
    fn insert(&mut self, start: u64, end: u64, source: Source) {
        let overlapping: Vec<(u64, u64, Source)> = self
            .0
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(&s, &(e, src))| (s, e, src))
            .collect();
        for (s, e, src) in overlapping {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, (start, src));
            }
            if e > end {
                self.0.insert(end, (e, src));
            }
        }
        self.0.insert(start, (end, source));
    }

    /// The extent covering `at` (its end and source), or where the next
    /// one starts.
    fn at(&self, at: u64) -> std::result::Result<(u64, Source), u64> {
        if let Some((_, &(end, source))) = self.0.range(..=at).next_back() {
            if end > at {
                return Ok((end, source));
            }
        }
        Err(self
            .0
            .range(at + 1..)
            .next()
            .map(|(&s, _)| s)
            .unwrap_or(u64::MAX))
    }
}

/// Chunks kept in memory, least recently used evicted first.
#[derive(Debug)]
struct ChunkCache {
    capacity: usize,
    chunks: HashMap<usize, Bytes>,
    order: VecDeque<usize>,
}

impl ChunkCache {
    fn get(&mut self, n: usize) -> Option<Bytes> {
        let chunk = self.chunks.get(&n)?.clone();
        self.order.retain(|&m| m != n);
        self.order.push_back(n);
        Some(chunk)
    }

    fn put(&mut self, n: usize, chunk: Bytes) {
        if self.chunks.insert(n, chunk).is_none() {
            self.order.push_back(n);
        }
        while self.chunks.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.chunks.remove(&old);
                }
                None => break,
            }
        }
    }
}

/// One archived point of one volume, readable.
#[derive(Debug)]
pub struct ArchiveView {
    catalog: Arc<Catalog>,
    volume: String,
    size: u64,
    seq: u64,
    chunks: Vec<Option<String>>,
    extents: Extents,
    overlay: File,
    overlay_path: PathBuf,
    cache: Mutex<ChunkCache>,
    runtime: tokio::runtime::Handle,
    /// Chunks fetched from the store so far.
    pub fetched: AtomicU64,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl ArchiveView {
    /// Opens volume `volume` at `seq`, keeping its overlay in `cache_dir`
    /// and at most `cache_bytes` of chunks in memory.
    pub async fn open(
        catalog: Arc<Catalog>,
        volume: &str,
        seq: u64,
        cache_dir: &Path,
        cache_bytes: u64,
    ) -> Result<ArchiveView> {
        let entry = catalog.volume(volume)?.clone();
        let plan = catalog.plan(seq)?;
        let manifest = catalog.base_manifest(&plan.base).await?;
        let chunks = manifest
            .volumes
            .iter()
            .find(|v| v.id == entry.id)
            .map(|v| v.chunks.clone())
            .unwrap_or_default();
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| ArchiveError::io("create archive cache", cache_dir, e))?;
        let overlay_path = cache_dir.join(format!(
            "view-{}-{}.overlay",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&overlay_path)
            .map_err(|e| ArchiveError::io("create archive view overlay", &overlay_path, e))?;
        overlay
            .set_len(entry.size)
            .map_err(|e| ArchiveError::io("size archive view overlay", &overlay_path, e))?;
        let mut extents = Extents::default();
        // Fetch every object of the chain at once; apply them in order.
        let fetches: Vec<_> = plan
            .segments
            .iter()
            .map(|s| {
                let (catalog, s) = (catalog.clone(), s.clone());
                tokio::spawn(async move { catalog.segment(&s).await.map(|b| (s, b)) })
            })
            .collect();
        for fetch in fetches {
            let (segment, bytes) = fetch
                .await
                .map_err(|e| ArchiveError::Invalid(format!("archive fetch failed: {e}")))??;
            let (_, body) = catalog.decode_segment(&segment, &bytes)?;
            effects(&segment.key, body, entry.id, plan.base.seq, seq, |effect| {
                match effect {
                    Effect::Data(offset, data) => {
                        overlay.write_all_at(&data, offset).map_err(|e| {
                            ArchiveError::io("write archive view overlay", &overlay_path, e)
                        })?;
                        extents.insert(offset, offset + data.len() as u64, Source::Overlay);
                    }
                    Effect::Zero(offset, len) => extents.insert(offset, offset + len, Source::Zero),
                }
                Ok(())
            })
            .map_err(|e| locate(e, catalog.store().as_ref()))?;
        }
        Ok(ArchiveView {
            volume: volume.to_string(),
            size: entry.size,
            seq,
            chunks,
            extents,
            overlay,
            overlay_path,
            cache: Mutex::new(ChunkCache {
                capacity: (cache_bytes / CHUNK_SIZE).max(2) as usize,
                chunks: HashMap::new(),
                order: VecDeque::new(),
            }),
            runtime: tokio::runtime::Handle::current(),
            catalog,
            fetched: AtomicU64::new(0),
        })
    }

    /// The volume's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The seq shown.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The volume's name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.catalog.index.group
    }

    fn chunk(&self, n: usize) -> Result<Option<Bytes>> {
        let Some(Some(hash)) = self.chunks.get(n) else {
            return Ok(None);
        };
        if let Some(chunk) = self.cache.lock().get(n) {
            return Ok(Some(chunk));
        }
        // Blocking: reads come from a blocking thread of the runtime.
        let data = self.runtime.block_on(self.catalog.chunk(hash))?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.cache.lock().put(n, data.clone());
        Ok(Some(data))
    }

    fn read_base(&self, mut offset: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = (offset / CHUNK_SIZE) as usize;
            let within = (offset % CHUNK_SIZE) as usize;
            let take = buf.len().min(CHUNK_SIZE as usize - within);
            let (part, rest) = buf.split_at_mut(take);
            match self.chunk(n)? {
                Some(chunk) if chunk.len() >= within + take => {
                    part.copy_from_slice(&chunk[within..within + take])
                }
                Some(_) => {
                    return Err(ArchiveError::Invalid(format!(
                        "volume {}: chunk {n} of the archive is shorter than the volume",
                        self.volume
                    )))
                }
                None => part.fill(0),
            }
            offset += take as u64;
            buf = rest;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (from a blocking thread).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(ArchiveError::Invalid(format!(
                "volume {}: range offset {offset} length {} is outside the volume (size {})",
                self.volume,
                buf.len(),
                self.size
            )));
        }
        let mut at = offset;
        while at < end {
            let from = (at - offset) as usize;
            match self.extents.at(at) {
                Ok((extent_end, source)) => {
                    let to = (extent_end.min(end) - offset) as usize;
                    let part = &mut buf[from..to];
                    match source {
                        Source::Zero => part.fill(0),
                        Source::Overlay => self.overlay.read_exact_at(part, at).map_err(|e| {
                            ArchiveError::io("read archive view overlay", &self.overlay_path, e)
                        })?,
                    }
                    at += (to - from) as u64;
                }
                Err(next) => {
                    let to = (next.min(end) - offset) as usize;
                    self.read_base(at, &mut buf[from..to])?;
                    at += (to - from) as u64;
                }
            }
        }
        Ok(())
    }
}

impl Drop for ArchiveView {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.overlay_path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn extents_split_and_replace_what_they_cover() {
        let mut x = Extents::default();
        x.insert(0, 100, Source::Overlay);
        x.insert(40, 60, Source::Zero);
        x.insert(90, 200, Source::Zero);
        let all: Vec<_> = x.0.iter().map(|(&s, &(e, src))| (s, e, src)).collect();
        assert_eq!(
            all,
            vec![
                (0, 40, Source::Overlay),
                (40, 60, Source::Zero),
                (60, 90, Source::Overlay),
                (90, 200, Source::Zero)
            ]
        );
        assert_eq!(x.at(45), Ok((60, Source::Zero)));
        assert_eq!(x.at(250), Err(u64::MAX));
        x.insert(300, 310, Source::Overlay);
        assert_eq!(x.at(250), Err(300));
        x.insert(0, 400, Source::Zero);
        assert_eq!(x.0.len(), 1);
    }
}
