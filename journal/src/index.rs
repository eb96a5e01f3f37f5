//! The index: RocksDB, embedded, answering "where is the newest write to
//! this block at or before this seq" with one seek.
//!
//! The segments are the source of truth; the index is a derived view. Its
//! writes go without RocksDB's WAL, one `WriteBatch` per group commit, and
//! each batch also records the seq it has indexed up to. Column families are
//! flushed atomically, so after a crash the index on disk is exactly "all
//! records up to `indexed_seq`" and start-up catches it up from the
//! segments. That keeps the index off the fsync path entirely.
//!
//! Key layouts (big-endian so that byte order is numeric order) are given
//! in `docs/format.md`.

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, FlushOptions, Options,
    ReadOptions, SliceTransform, WriteBatch, WriteOptions, DB,
};

use crate::error::{Error, Result};
use crate::mark::Mark;
use crate::point::{Seq, Timestamp};
use crate::record::{le_u16, le_u32, le_u64, RecordHeader, RecordKind};
use crate::volume::VolumeId;

/// The index's own format version; an index of another version is rebuilt.
pub const INDEX_VERSION: u64 = 1;

/// The granularity of the block index. Writes are indexed per 4 KiB block;
/// unaligned writes record which bytes of the block they cover.
pub const INDEX_BLOCK: u64 = 4096;

const CF_BLOCKS: &str = "blocks";
const CF_TIMES: &str = "times";
const CF_SEGMENTS: &str = "segments";
const CF_META: &str = "meta";
const CF_TAGS: &str = "tags";
const CF_EVENTS: &str = "events";
const CF_RANGES: &str = "ranges";
const ALL_CFS: [&str; 7] = [
    CF_BLOCKS,
    CF_TIMES,
    CF_SEGMENTS,
    CF_META,
    CF_TAGS,
    CF_EVENTS,
    CF_RANGES,
];

/// Bytes of a block key that name the block (`volume ‖ block`).
const BLOCK_PREFIX_LEN: usize = 12;

/// Bound of all memtables together.
const MEMTABLE_BYTES: usize = 16 << 20;

/// Arena block of each family's memtable.
const ARENA_BLOCK_BYTES: usize = 256 << 10;

/// Size of the block cache shared by every column family.
const BLOCK_CACHE_BYTES: usize = 32 << 20;

const META_VERSION: &[u8] = b"index_version";
const META_INDEXED_SEQ: &[u8] = b"indexed_seq";
const META_HORIZON_SEQ: &[u8] = b"horizon_seq";
const META_EPOCH: &[u8] = b"epoch";

/// One raw key/value of the index and its column family, as
/// [`Index::dump`] lists them.
pub type IndexEntry = (String, Vec<u8>, Vec<u8>);

/// Where one version of one block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// The record's seq.
    pub seq: Seq,
    /// The segment holding the record.
    pub segment: u64,
    /// The record's offset within the segment.
    pub offset: u64,
    /// The record's kind (write, zero or trim).
    pub kind: RecordKind,
    /// First byte of the block the record covers.
    pub lo: u16,
    /// One past the last byte of the block the record covers.
    pub hi: u16,
}

/// A zero or trim too large to index block by block (a discard of a whole
/// device at mkfs time would otherwise write millions of keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    /// The record's seq.
    pub seq: Seq,
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// See [`Index::changed_blocks`].
pub struct ChangedBlocks<'a> {
    iter: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
    volume: VolumeId,
    after: Seq,
    upto: Seq,
    /// The block last stepped over (see `next`).
    stepped: Option<u64>,
    index: &'a Index,
    done: bool,
}

impl std::fmt::Debug for ChangedBlocks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangedBlocks")
            .field("volume", &self.volume)
            .field("after", &self.after)
            .field("upto", &self.upto)
            .finish()
    }
}

impl Iterator for ChangedBlocks<'_> {
    type Item = Result<u64>;

    fn next(&mut self) -> Option<Result<u64>> {
        while !self.done {
            let Some(key) = self.iter.key() else {
                self.done = true;
                return self.iter.status().err().map(|e| Err(self.index.err(e)));
            };
            if key.len() != 20 || be_u32(key, 0) != self.volume {
                self.done = true;
                return None;
            }
            let (block, seq) = (be_u64(key, 4), be_u64(key, 12));
            if seq <= self.after {
                // Skip the block's versions at or before `after`: a step
                // for the first (most blocks have one or two), one seek
                // for the rest. The first version after `after` decides.
                if self.stepped == Some(block) {
                    self.iter
                        .seek(block_key(self.volume, block, self.after.saturating_add(1)));
                } else {
                    self.stepped = Some(block);
                    self.iter.next();
                }
                continue;
            }
            // The block's first version after `after`: it changed in
            // `(after, upto]` exactly when that version is at or before
            // `upto` (keys are ordered by seq within a block). Either way
            // the block's other versions need no visit.
            match block.checked_add(1) {
                Some(next) => self.iter.seek(block_key(self.volume, next, 0)),
                None => self.done = true,
            }
            if seq <= self.upto {
                return Some(Ok(block));
            }
        }
        None
    }
}

/// A segment's line in the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentEntry {
    /// The segment id.
    pub id: u64,
    /// Seq of its first record.
    pub first_seq: Seq,
    /// Seq of its last record.
    pub last_seq: Seq,
    /// Time of its first record.
    pub first_time: Timestamp,
    /// Time of its last record.
    pub last_time: Timestamp,
    /// Bytes used, header included.
    pub used_bytes: u64,
    /// Records it holds.
    pub records: u64,
}

/// A tag as the index stores it: a named seq with an opaque body that the
/// tagging layer defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTag {
    /// The tag's name, unique per volume.
    pub name: String,
    /// The point it marks: the seq of the mark record that set it.
    pub seq: Seq,
    /// When it was set.
    pub time: Timestamp,
    /// The tagging layer's description of the tag.
    pub body: Vec<u8>,
}

/// A flush or mark on a volume's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Seq of the record.
    pub seq: Seq,
    /// When it was written.
    pub time: Timestamp,
    /// Flush or mark.
    pub kind: RecordKind,
    /// For marks, the mark body; empty for flushes.
    pub body: Vec<u8>,
}

/// The RocksDB index of one consistency group.
pub struct Index {
    db: DB,
    path: PathBuf,
    /// Zeroes and trims spanning more blocks than this go to the `ranges`
    /// family as one entry instead of one entry per block.
    large_range_blocks: u64,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).finish()
    }
}

/// Key of one block version.
/// Format: `{ u32 volume | u64 block | u64 seq }`, big-endian.
fn block_key(volume: VolumeId, block: u64, seq: Seq) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[0..4].copy_from_slice(&volume.to_be_bytes());
    key[4..12].copy_from_slice(&block.to_be_bytes());
    key[12..20].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Key of a moment: the timestamp with its sign bit flipped, so negative
/// times sort first. Format: `{ u64 timestamp_ns ^ 1<<63 }`, big-endian.
fn time_key(time: Timestamp) -> [u8; 8] {
    ((time.as_nanos() as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from_key(key: &[u8]) -> Timestamp {
    Timestamp::from_nanos((be_u64(key, 0) ^ (1 << 63)) as i64)
}

/// Key of a flush or mark. Format: `{ u32 volume | u64 seq }`, big-endian.
fn event_key(volume: VolumeId, seq: Seq) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[0..4].copy_from_slice(&volume.to_be_bytes());
    key[4..12].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Key of a tag. Format: `{ u32 volume | name bytes }`.
fn tag_key(volume: VolumeId, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + name.len());
    key.extend_from_slice(&volume.to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Index {
    /// Opens (creating if needed) the index at `path`. Zeroes and trims of
    /// more than `large_range_blocks` blocks are indexed as one range.
    pub fn open(path: &Path, large_range_blocks: u64) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Without a WAL, column families must reach disk together, or the
        // meta family's `indexed_seq` could claim entries that were lost.
        opts.set_atomic_flush(true);
        opts.set_max_background_jobs(2);
        // Memtables of every family together stay under this, so the
        // index's memory is bounded however fast records arrive (M1).
        opts.set_db_write_buffer_size(MEMTABLE_BYTES);
        opts.set_keep_log_file_num(2);
        // One block cache for every family, holding index and filter blocks
        // too, so a point lookup in a large index costs memory reads, not
        // file reads.
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let table = |bloom: bool| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_cache_index_and_filter_blocks(true);
            if bloom {
                table.set_bloom_filter(10.0, false);
                table.set_whole_key_filtering(false);
            }
            table
        };
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            // Each family's memtable allocates its arena in blocks of an
            // eighth of its own write buffer (64 MiB by default), and its
            // prefix bloom filter is sized from it too; both count against
            // the shared budget above. Left at the default, seven families'
            // first blocks alone exceed it, so every few writes switched
            // and flushed all memtables (and zeroed a fresh 6 MiB bloom).
            cf.set_write_buffer_size(MEMTABLE_BYTES / 4);
            cf.set_arena_block_size(ARENA_BLOCK_BYTES);
            if *name == CF_BLOCKS {
                // Every lookup stays within one `volume ‖ block` prefix, so a
                // prefix bloom filter lets a seek skip every file that never
                // saw that block.
                cf.set_prefix_extractor(SliceTransform::create_fixed_prefix(BLOCK_PREFIX_LEN));
                cf.set_memtable_prefix_bloom_ratio(0.1);
                cf.set_block_based_table_factory(&table(true));
            } else {
                cf.set_block_based_table_factory(&table(false));
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| Error::Index {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Index {
            db,
            path: path.to_path_buf(),
            large_range_blocks,
        })
    }

    /// Where the index lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the index at `path`.
    pub fn destroy(path: &Path) -> Result<()> {
        if !path.exists() {
            return Ok(());
        }
        std::fs::remove_dir_all(path).map_err(|e| Error::io("remove index", path, e))
    }

    fn err(&self, source: rocksdb::Error) -> Error {
        Error::Index {
            path: self.path.clone(),
            source,
        }
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| {
            Error::corruption(&self.path, 0, format!("index lacks column family {name}"))
        })
    }

    fn meta(&self, key: &[u8]) -> Result<Option<u64>> {
        let cf = self.cf(CF_META)?;
        match self.db.get_cf(cf, key).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) if v.len() == 8 => Ok(Some(le_u64(&v, 0))),
            Some(v) => Err(Error::corruption(
                &self.path,
                0,
                format!(
                    "index meta {} holds {} bytes, expected 8",
                    String::from_utf8_lossy(key),
                    v.len()
                ),
            )),
        }
    }

    /// The index format version it was written with, if it says.
    pub fn version(&self) -> Result<Option<u64>> {
        self.meta(META_VERSION)
    }

    /// The seq up to which every record is indexed.
    pub fn indexed_seq(&self) -> Result<Option<Seq>> {
        self.meta(META_INDEXED_SEQ)
    }

    /// The horizon the index last heard of (the manifest holds the truth).
    pub fn horizon_seq(&self) -> Result<Option<Seq>> {
        self.meta(META_HORIZON_SEQ)
    }

    /// Records version, horizon, epoch and indexed seq.
    pub fn set_meta(&self, indexed: Seq, horizon: Seq, epoch: u64) -> Result<()> {
        let cf = self.cf(CF_META)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, META_VERSION, INDEX_VERSION.to_le_bytes());
        batch.put_cf(cf, META_INDEXED_SEQ, indexed.to_le_bytes());
        batch.put_cf(cf, META_HORIZON_SEQ, horizon.to_le_bytes());
        batch.put_cf(cf, META_EPOCH, epoch.to_le_bytes());
        self.write(batch)
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }

    /// Starts a batch of index updates for one group commit.
    pub fn batch(&self) -> IndexBatch<'_> {
        IndexBatch {
            index: self,
            batch: WriteBatch::default(),
        }
    }

    /// Flushes every column family to disk together, so a clean shutdown
    /// leaves nothing to catch up.
    pub fn flush(&self) -> Result<()> {
        let cfs = ALL_CFS
            .iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>>>()?;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &fo).map_err(|e| self.err(e))
    }

    /// Visits the versions of `block` of `volume` with `horizon < seq <=
    /// point`, newest first, until `visit` returns false. The first step is
    /// a single seek.
    pub fn block_versions(
        &self,
        iter: &mut rocksdb::DBRawIterator<'_>,
        volume: VolumeId,
        block: u64,
        point: Seq,
        horizon: Seq,
        mut visit: impl FnMut(BlockEntry) -> Result<bool>,
    ) -> Result<()> {
        iter.seek_for_prev(block_key(volume, block, point));
        let prefix = &block_key(volume, block, 0)[..BLOCK_PREFIX_LEN];
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            if key.len() != 20 || &key[..BLOCK_PREFIX_LEN] != prefix {
                break;
            }
            let seq = be_u64(key, 12);
            if seq <= horizon {
                break;
            }
            let entry = decode_block_entry(seq, value).ok_or_else(|| {
                Error::corruption(
                    &self.path,
                    0,
                    format!("index entry for volume {volume} block {block} seq {seq} is malformed"),
                )
            })?;
            if !visit(entry)? {
                return Ok(());
            }
            iter.prev();
        }
        iter.status().map_err(|e| self.err(e))
    }

    /// True if `header` is a zero or trim indexed as one range rather than
    /// block by block.
    pub fn is_large_range(&self, header: &RecordHeader) -> bool {
        matches!(header.kind, RecordKind::Zero | RecordKind::Trim)
            && header.length.div_ceil(INDEX_BLOCK) > self.large_range_blocks
    }

    /// Large zero/trim ranges of `volume` with `horizon < seq <= point`
    /// that overlap `offset..end`, newest first.
    pub fn ranges(
        &self,
        volume: VolumeId,
        horizon: Seq,
        point: Seq,
        offset: u64,
        end: u64,
    ) -> Result<Vec<RangeEntry>> {
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_RANGES)?);
        iter.seek(event_key(volume, horizon.saturating_add(1)));
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.len() != 12 || be_u32(key, 0) != volume {
                break;
            }
            let seq = be_u64(key, 4);
            if seq > point {
                break;
            }
            if value.len() != 16 {
                return Err(Error::corruption(
                    &self.path,
                    0,
                    format!("range entry seq {seq} is malformed"),
                ));
            }
            let range = RangeEntry {
                seq,
                offset: le_u64(value, 0),
                length: le_u64(value, 8),
            };
            if range.offset < end && range.offset + range.length > offset {
                out.push(range);
            }
            iter.next();
        }
        iter.status().map_err(|e| self.err(e))?;
        out.reverse();
        Ok(out)
    }

    /// The 4 KiB blocks of `volume` that records with `after < seq <=
    /// upto` wrote, ascending, each once — streamed from the index, so
    /// memory stays bounded however many changed. Large zero/trim ranges
    /// are not among them (see [`Index::ranges`]).
    pub fn changed_blocks(
        &self,
        volume: VolumeId,
        after: Seq,
        upto: Seq,
    ) -> Result<ChangedBlocks<'_>> {
        let mut opts = ReadOptions::default();
        opts.set_total_order_seek(true);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_BLOCKS)?, opts);
        iter.seek(block_key(volume, 0, 0));
        Ok(ChangedBlocks {
            iter,
            volume,
            after,
            upto,
            stepped: None,
            index: self,
            // Nothing lies after the last seq, or in an empty interval.
            done: upto <= after,
        })
    }

    /// A raw iterator over the block family, for [`Index::block_versions`].
    pub fn block_iter(&self) -> Result<rocksdb::DBRawIterator<'_>> {
        let mut opts = ReadOptions::default();
        opts.set_prefix_same_as_start(true);
        Ok(self.db.raw_iterator_cf_opt(self.cf(CF_BLOCKS)?, opts))
    }

    /// The newest record at or before `at`: its seq and time.
    pub fn seq_at_time(&self, at: Timestamp) -> Result<Option<(Seq, Timestamp)>> {
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_TIMES)?);
        iter.seek_for_prev(time_key(at));
        if let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.len() == 8 && value.len() == 8 {
                return Ok(Some((le_u64(value, 0), time_from_key(key))));
            }
            return Err(Error::corruption(
                &self.path,
                0,
                "malformed time index entry",
            ));
        }
        iter.status().map_err(|e| self.err(e))?;
        Ok(None)
    }

    /// The segment catalogue, ordered by segment id.
    pub fn segments(&self) -> Result<Vec<SegmentEntry>> {
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_SEGMENTS)?);
        iter.seek_to_first();
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.len() != 8 || value.len() != 48 {
                return Err(Error::corruption(
                    &self.path,
                    0,
                    "malformed segment catalogue entry",
                ));
            }
            out.push(SegmentEntry {
                id: be_u64(key, 0),
                first_seq: le_u64(value, 0),
                last_seq: le_u64(value, 8),
                first_time: Timestamp::from_nanos(le_u64(value, 16) as i64),
                last_time: Timestamp::from_nanos(le_u64(value, 24) as i64),
                used_bytes: le_u64(value, 32),
                records: le_u64(value, 40),
            });
            iter.next();
        }
        iter.status().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The tag `name` of `volume`.
    pub fn tag(&self, volume: VolumeId, name: &str) -> Result<Option<StoredTag>> {
        let cf = self.cf(CF_TAGS)?;
        match self
            .db
            .get_cf(cf, tag_key(volume, name))
            .map_err(|e| self.err(e))?
        {
            None => Ok(None),
            Some(value) => self.decode_tag(name.to_string(), &value).map(Some),
        }
    }

    fn decode_tag(&self, name: String, value: &[u8]) -> Result<StoredTag> {
        if value.len() < 16 {
            return Err(Error::corruption(
                &self.path,
                0,
                format!("tag {name:?} entry is malformed"),
            ));
        }
        Ok(StoredTag {
            name,
            seq: le_u64(value, 0),
            time: Timestamp::from_nanos(le_u64(value, 8) as i64),
            body: value[16..].to_vec(),
        })
    }

    /// Every tag of `volume`, ordered by seq.
    pub fn tags(&self, volume: VolumeId) -> Result<Vec<StoredTag>> {
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_TAGS)?);
        let prefix = volume.to_be_bytes();
        iter.seek(prefix);
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.len() < 4 || key[..4] != prefix {
                break;
            }
            let name = String::from_utf8_lossy(&key[4..]).into_owned();
            out.push(self.decode_tag(name, value)?);
            iter.next();
        }
        iter.status().map_err(|e| self.err(e))?;
        out.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Flushes and marks of `volume` with `from <= seq <= to`, oldest first.
    pub fn events(&self, volume: VolumeId, from: Seq, to: Seq) -> Result<Vec<StoredEvent>> {
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_EVENTS)?);
        iter.seek(event_key(volume, from));
        let mut out = Vec::new();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.len() != 12 || be_u32(key, 0) != volume {
                break;
            }
            let seq = be_u64(key, 4);
            if seq > to {
                break;
            }
            let kind = value
                .get(8)
                .and_then(|&k| RecordKind::from_u8(k))
                .ok_or_else(|| {
                    Error::corruption(&self.path, 0, format!("event entry seq {seq} is malformed"))
                })?;
            out.push(StoredEvent {
                seq,
                time: Timestamp::from_nanos(le_u64(value, 0) as i64),
                kind,
                body: value[9..].to_vec(),
            });
            iter.next();
        }
        iter.status().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Removes what retention folded away: the block versions in
    /// `folded` (as `(volume, first block, last block, seq)`), times and
    /// events up to `horizon`, tags at or before it, and the catalogue
    /// lines of `removed_segments`; then records the new horizon.
    pub fn forget_before(
        &self,
        folded: &[(VolumeId, u64, u64, Seq)],
        volumes: &[VolumeId],
        horizon: Seq,
        horizon_time: Timestamp,
        removed_segments: &[u64],
        epoch: u64,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        let blocks = self.cf(CF_BLOCKS)?;
        for &(volume, first, last, seq) in folded {
            for block in first..=last {
                batch.delete_cf(blocks, block_key(volume, block, seq));
            }
        }
        let times = self.cf(CF_TIMES)?;
        batch.delete_range_cf(
            times,
            time_key(Timestamp::from_nanos(i64::MIN)),
            time_key(horizon_time),
        );
        batch.delete_cf(times, time_key(horizon_time));
        let events = self.cf(CF_EVENTS)?;
        let ranges = self.cf(CF_RANGES)?;
        let tags = self.cf(CF_TAGS)?;
        for &volume in volumes {
            batch.delete_range_cf(
                events,
                event_key(volume, 0),
                event_key(volume, horizon.saturating_add(1)),
            );
            batch.delete_range_cf(
                ranges,
                event_key(volume, 0),
                event_key(volume, horizon.saturating_add(1)),
            );
            for tag in self.tags(volume)? {
                if tag.seq <= horizon {
                    batch.delete_cf(tags, tag_key(volume, &tag.name));
                }
            }
        }
        let segments = self.cf(CF_SEGMENTS)?;
        for id in removed_segments {
            batch.delete_cf(segments, id.to_be_bytes());
        }
        let meta = self.cf(CF_META)?;
        batch.put_cf(meta, META_HORIZON_SEQ, horizon.to_le_bytes());
        batch.put_cf(meta, META_EPOCH, epoch.to_le_bytes());
        self.write(batch)
    }

    /// Every key and value of every column family, for tests that compare
    /// a rebuilt index with the original.
    pub fn dump(&self) -> Result<Vec<IndexEntry>> {
        let mut out = Vec::new();
        for name in ALL_CFS {
            let mut opts = ReadOptions::default();
            opts.set_total_order_seek(true);
            let mut iter = self.db.raw_iterator_cf_opt(self.cf(name)?, opts);
            iter.seek_to_first();
            while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                out.push((name.to_string(), key.to_vec(), value.to_vec()));
                iter.next();
            }
            iter.status().map_err(|e| self.err(e))?;
        }
        Ok(out)
    }
}

fn decode_block_entry(seq: Seq, value: &[u8]) -> Option<BlockEntry> {
    if value.len() != 17 {
        return None;
    }
    Some(BlockEntry {
        seq,
        segment: le_u64(value, 0),
        offset: le_u32(value, 8) as u64,
        kind: RecordKind::from_u8(value[12])?,
        lo: le_u16(value, 13),
        hi: le_u16(value, 15),
    })
}

/// Index updates for one group commit, written in one `WriteBatch`.
pub struct IndexBatch<'a> {
    index: &'a Index,
    batch: WriteBatch,
}

impl std::fmt::Debug for IndexBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexBatch")
            .field("len", &self.batch.len())
            .finish()
    }
}

impl IndexBatch<'_> {
    /// Indexes one record at `offset` of `segment`. `mark_body` is the
    /// decompressed body of a mark record.
    pub fn add_record(
        &mut self,
        header: &RecordHeader,
        segment: u64,
        offset: u64,
        mark_body: Option<&[u8]>,
    ) -> Result<()> {
        let index = self.index;
        self.batch.put_cf(
            index.cf(CF_TIMES)?,
            time_key(header.timestamp),
            header.seq.to_le_bytes(),
        );
        match header.kind {
            RecordKind::Zero | RecordKind::Trim if index.is_large_range(header) => {
                let mut value = [0u8; 16];
                value[0..8].copy_from_slice(&header.offset.to_le_bytes());
                value[8..16].copy_from_slice(&header.length.to_le_bytes());
                self.batch.put_cf(
                    index.cf(CF_RANGES)?,
                    event_key(header.volume, header.seq),
                    value,
                );
            }
            RecordKind::Write | RecordKind::Zero | RecordKind::Trim if header.length > 0 => {
                let cf = index.cf(CF_BLOCKS)?;
                let end = header.offset + header.length;
                let first = header.offset / INDEX_BLOCK;
                let last = (end - 1) / INDEX_BLOCK;
                for block in first..=last {
                    let start = block * INDEX_BLOCK;
                    let lo = header.offset.max(start) - start;
                    let hi = end.min(start + INDEX_BLOCK) - start;
                    let mut value = [0u8; 17];
                    value[0..8].copy_from_slice(&segment.to_le_bytes());
                    value[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
                    value[12] = header.kind as u8;
                    value[13..15].copy_from_slice(&(lo as u16).to_le_bytes());
                    value[15..17].copy_from_slice(&(hi as u16).to_le_bytes());
                    self.batch
                        .put_cf(cf, block_key(header.volume, block, header.seq), value);
                }
            }
            RecordKind::Flush | RecordKind::Mark => {
                let mut value = Vec::with_capacity(9 + mark_body.map_or(0, |b| b.len()));
                value.extend_from_slice(&header.timestamp.as_nanos().to_le_bytes());
                value.push(header.kind as u8);
                if let Some(body) = mark_body {
                    value.extend_from_slice(body);
                    match Mark::decode(body) {
                        Some(Mark::TagSet { name, body }) => {
                            let mut tag = Vec::with_capacity(16 + body.len());
                            tag.extend_from_slice(&header.seq.to_le_bytes());
                            tag.extend_from_slice(&header.timestamp.as_nanos().to_le_bytes());
                            tag.extend_from_slice(body);
                            self.batch.put_cf(
                                index.cf(CF_TAGS)?,
                                tag_key(header.volume, name),
                                tag,
                            );
                        }
                        Some(Mark::TagDelete { name }) => {
                            self.batch
                                .delete_cf(index.cf(CF_TAGS)?, tag_key(header.volume, name));
                        }
                        Some(Mark::Event { .. }) | None => {}
                    }
                }
                self.batch.put_cf(
                    index.cf(CF_EVENTS)?,
                    event_key(header.volume, header.seq),
                    value,
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Records a segment's catalogue line.
    pub fn set_segment(&mut self, entry: &SegmentEntry) -> Result<()> {
        let mut value = [0u8; 48];
        value[0..8].copy_from_slice(&entry.first_seq.to_le_bytes());
        value[8..16].copy_from_slice(&entry.last_seq.to_le_bytes());
        value[16..24].copy_from_slice(&entry.first_time.as_nanos().to_le_bytes());
        value[24..32].copy_from_slice(&entry.last_time.as_nanos().to_le_bytes());
        value[32..40].copy_from_slice(&entry.used_bytes.to_le_bytes());
        value[40..48].copy_from_slice(&entry.records.to_le_bytes());
        self.batch
            .put_cf(self.index.cf(CF_SEGMENTS)?, entry.id.to_be_bytes(), value);
        Ok(())
    }

    /// Writes the batch, recording that everything up to `indexed` is in.
    pub fn commit(mut self, indexed: Seq) -> Result<()> {
        let index = self.index;
        let meta = index.cf(CF_META)?;
        self.batch
            .put_cf(meta, META_VERSION, INDEX_VERSION.to_le_bytes());
        self.batch
            .put_cf(meta, META_INDEXED_SEQ, indexed.to_le_bytes());
        index.write(self.batch)
    }
}
