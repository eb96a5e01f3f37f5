//! A point of an archived volume served straight from the bucket, without
//! downloading the volume first. At open, only each segment object's
//! record map is fetched (a ranged GET of its tail): an extent map says
//! which record, zeros or base chunk each byte of the volume comes from.
//! A read fetches what it touches — 1 MiB pages of segment objects and
//! 4 MiB base-image chunks — through caches bounded in bytes, and checks
//! every record's CRC. Objects written before maps existed are fetched
//! whole at open and applied into a local overlay. Opening costs the
//! maps, not the volume or its history, so a filesystem mounts in seconds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use tidemark_journal::record::{decode_record, payload_bytes};

use super::apply::{effects, Effect};
use super::catalog::{locate, Catalog};
use super::error::{ArchiveError, Result};
use super::index::SegmentEntry;
use super::layout::{self, MapEntry, CHUNK_SIZE, SEGMENT_HEADER_LEN};

/// Segment objects are fetched on demand in pages of this many bytes.
const PAGE: u64 = 1 << 20;

/// Where a range of the view comes from, when not from the base version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The overlay file, at the same offset.
    Overlay,
    /// Zeros.
    Zero,
    /// A write record, by its place in [`ArchiveView::records`].
    Record(u32),
}

/// A write record the view reads on demand.
#[derive(Clone, Copy, Debug)]
struct RecordRef {
    /// Its segment object, by its place in [`ArchiveView::segments`].
    segment: u32,
    seq: u64,
    /// The volume offset its bytes start at.
    offset: u64,
    /// Where it lies in the object's body, and its encoded bytes.
    pos: u64,
    len: u32,
}

/// What open fetched of one segment object.
enum Fetched {
    Map(Vec<MapEntry>),
    Whole(Bytes),
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

/// Pieces of objects kept in memory, least recently used evicted first.
#[derive(Debug)]
struct Lru<K> {
    capacity: usize,
    items: HashMap<K, Bytes>,
    order: VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Copy> Lru<K> {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity: capacity.max(2),
            items: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, k: K) -> Option<Bytes> {
        let item = self.items.get(&k)?.clone();
        self.order.retain(|&m| m != k);
        self.order.push_back(k);
        Some(item)
    }

    fn put(&mut self, k: K, item: Bytes) {
        if self.items.insert(k, item).is_none() {
            self.order.push_back(k);
        }
        while self.items.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.items.remove(&old);
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
    /// Segment objects read on demand, and their write records.
    segments: Vec<SegmentEntry>,
    records: Vec<RecordRef>,
    cache: Mutex<Lru<usize>>,
    pages: Mutex<Lru<(u32, u64)>>,
    runtime: tokio::runtime::Handle,
    /// Chunks fetched from the store so far.
    pub fetched: AtomicU64,
    /// Pages of segment objects fetched so far.
    pub fetched_pages: AtomicU64,
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
        let mut segments = Vec::new();
        let mut records = Vec::new();
        // Fetch every segment's map (or, lacking one, the whole object) at
        // once; apply them in order.
        let fetches: Vec<_> = plan
            .segments
            .iter()
            .map(|s| {
                let (catalog, s) = (catalog.clone(), s.clone());
                tokio::spawn(async move {
                    let fetched = if s.map_len > 0 && s.map_len <= s.bytes {
                        let bytes = catalog
                            .store()
                            .get_range(&s.key, s.bytes - s.map_len, s.map_len)
                            .await?;
                        Fetched::Map(
                            layout::decode_map(&s.key, &bytes)
                                .map_err(|e| locate(e, catalog.store().as_ref()))?,
                        )
                    } else {
                        Fetched::Whole(catalog.segment(&s).await?)
                    };
                    Ok::<_, ArchiveError>((s, fetched))
                })
            })
            .collect();
        let (after, upto) = (plan.base.seq, seq);
        for fetch in fetches {
            let (segment, fetched) = fetch
                .await
                .map_err(|e| ArchiveError::Invalid(format!("archive fetch failed: {e}")))??;
            match fetched {
                Fetched::Map(map) => {
                    let n = segments.len() as u32;
                    for e in map {
                        if e.seq <= after || e.seq > upto || e.volume != entry.id {
                            continue;
                        }
                        let end = e.offset + e.length;
                        if e.zero {
                            extents.insert(e.offset, end, Source::Zero);
                            continue;
                        }
                        extents.insert(e.offset, end, Source::Record(records.len() as u32));
                        records.push(RecordRef {
                            segment: n,
                            seq: e.seq,
                            offset: e.offset,
                            pos: e.pos,
                            len: e.len,
                        });
                    }
                    segments.push(segment);
                }
                Fetched::Whole(bytes) => {
                    let (_, body) = catalog.decode_segment(&segment, &bytes)?;
                    effects(&segment.key, body, entry.id, after, upto, |effect| {
                        match effect {
                            Effect::Data(offset, data) => {
                                overlay.write_all_at(&data, offset).map_err(|e| {
                                    ArchiveError::io("write archive view overlay", &overlay_path, e)
                                })?;
                                extents.insert(offset, offset + data.len() as u64, Source::Overlay);
                            }
                            Effect::Zero(offset, len) => {
                                extents.insert(offset, offset + len, Source::Zero)
                            }
                        }
                        Ok(())
                    })
                    .map_err(|e| locate(e, catalog.store().as_ref()))?;
                }
            }
        }
        Ok(ArchiveView {
            volume: volume.to_string(),
            size: entry.size,
            seq,
            chunks,
            extents,
            overlay,
            overlay_path,
            segments,
            records,
            cache: Mutex::new(Lru::new((cache_bytes / 2 / CHUNK_SIZE) as usize)),
            pages: Mutex::new(Lru::new((cache_bytes / 2 / PAGE) as usize)),
            runtime: tokio::runtime::Handle::current(),
            catalog,
            fetched: AtomicU64::new(0),
            fetched_pages: AtomicU64::new(0),
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
        let data = self
            .runtime
            .block_on(self.catalog.chunk(hash))
            .map_err(|e| self.gone(e))?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.cache.lock().put(n, data.clone());
        Ok(Some(data))
    }

    /// An object the view needs that is no longer there. The archive's
    /// retention (`keep`) deletes what only points older than its window
    /// need, and a view opened before the window passed its point does not
    /// hold them back: say so, rather than "no object".
    fn gone(&self, e: ArchiveError) -> ArchiveError {
        match e {
            ArchiveError::NotFound { location, key } => ArchiveError::Invalid(format!(
                "volume {}@{}: archive {location} no longer holds {key:?}, which this point \
                 needs — most likely the archive's retention (`keep`) has passed the point \
                 since it was opened; open a newer point",
                self.volume, self.seq
            )),
            e => e,
        }
    }

    /// Page `n` of segment object `segment`'s body.
    fn page(&self, segment: u32, n: u64) -> Result<Bytes> {
        if let Some(page) = self.pages.lock().get((segment, n)) {
            return Ok(page);
        }
        let entry = &self.segments[segment as usize];
        let body_len = entry.bytes - entry.map_len - SEGMENT_HEADER_LEN as u64;
        let start = n * PAGE;
        let len = PAGE.min(body_len.saturating_sub(start));
        // Blocking: reads come from a blocking thread of the runtime.
        let page = self
            .runtime
            .block_on(self.catalog.store().get_range(
                &entry.key,
                SEGMENT_HEADER_LEN as u64 + start,
                len,
            ))
            .map_err(|e| self.gone(e))?;
        if page.len() as u64 != len {
            return Err(ArchiveError::Corrupt {
                location: self.catalog.store().location(),
                key: entry.key.clone(),
                reason: format!(
                    "{} bytes at body offset {start}, {len} expected",
                    page.len()
                ),
            });
        }
        self.fetched_pages.fetch_add(1, Ordering::Relaxed);
        self.pages.lock().put((segment, n), page.clone());
        Ok(page)
    }

    /// The bytes record `r` writes, fetched and checked.
    fn record(&self, r: &RecordRef) -> Result<Vec<u8>> {
        let mut encoded = Vec::with_capacity(r.len as usize);
        let end = r.pos + u64::from(r.len);
        let mut at = r.pos;
        while at < end {
            let page = self.page(r.segment, at / PAGE)?;
            let within = (at % PAGE) as usize;
            let take = (page.len().saturating_sub(within)).min((end - at) as usize);
            if take == 0 {
                break;
            }
            encoded.extend_from_slice(&page[within..within + take]);
            at += take as u64;
        }
        let entry = &self.segments[r.segment as usize];
        let corrupt = |reason: String| ArchiveError::Corrupt {
            location: self.catalog.store().location(),
            key: entry.key.clone(),
            reason,
        };
        let path = Path::new(&entry.key);
        let (header, stored) =
            decode_record(&encoded, path, r.pos).map_err(|e| corrupt(e.to_string()))?;
        if header.seq != r.seq || header.offset != r.offset {
            return Err(corrupt(format!(
                "the record at body offset {} is seq {} at {}, its map says seq {} at {}",
                r.pos, header.seq, header.offset, r.seq, r.offset
            )));
        }
        payload_bytes(&header, stored, path, r.pos).map_err(|e| corrupt(e.to_string()))
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
                        Source::Record(n) => {
                            let r = self.records[n as usize];
                            let data = self.record(&r)?;
                            let from = (at - r.offset) as usize;
                            let Some(bytes) = data.get(from..from + part.len()) else {
                                return Err(ArchiveError::Invalid(format!(
                                    "volume {}: record seq {} holds {} bytes, a read needs {} from its byte {from}",
                                    self.volume,
                                    r.seq,
                                    data.len(),
                                    part.len()
                                )));
                            };
                            part.copy_from_slice(bytes);
                        }
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
