//! Segments: fixed-size, append-only files of commit batches.
//!
//! A segment is created at its full size (sparse), so the writer never grows
//! it and every reader can map the whole file once. Records are written in
//! *batches*, one per group commit, each behind a small frame that says how
//! long the batch is. The frame is what makes recovery exact: the writer
//! writes batch k+1 only after batch k is durable, so a damaged batch
//! followed by a valid one is real corruption, while a damaged batch with
//! nothing valid after it is the torn tail of a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::{Fs, FsFile, Mapping, OpenMode};
use crate::point::{Seq, Timestamp};
use crate::record::{decode_record, le_u32, le_u64, RecordHeader};

/// The first bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TDMKSEG\0";

/// The segment and record format this build writes and reads. A file with
/// another version is refused as corruption rather than guessed at.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 64;

/// How far ahead of its write offset a segment's disk blocks are
/// allocated (see [`Segment::create`]): a full disk shows up this far
/// before the journal needs the space, and a stream of batches asks the
/// filesystem for space once per this many bytes.
pub const ALLOCATE_AHEAD: u64 = 8 << 20;

/// What a new segment allocates before its first batch: an idle group
/// holds this much disk for its journal.
const ALLOCATE_FIRST: u64 = 1 << 20;

/// How much [`Segment::zero_fill`] writes at a time.
const ZERO_FILL_CHUNK: usize = 1 << 20;

/// `"TDBT"`: the first bytes of every batch frame.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"TDBT");

/// Bytes of a batch frame.
pub const BATCH_HEADER_LEN: usize = 64;

/// The segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The consistency group the segment belongs to; a segment of another
    /// group in the directory is refused.
    pub group_id: u64,
    /// The segment's number; segments are read in this order.
    pub segment_id: u64,
    /// No record in the segment has a smaller seq.
    pub first_seq: Seq,
    /// The file's fixed size.
    pub segment_size: u64,
    /// When the segment was created.
    pub created: Timestamp,
}

impl SegmentHeader {
    /// Encodes the header.
    ///
    /// Format (little-endian, 64 bytes):
    /// `{ [u8;8] magic "TDMKSEG\0" | u32 version | u32 header_len |
    ///    u64 group_id | u64 segment_id | u64 first_seq | u64 segment_size |
    ///    i64 created_ns | u32 reserved | u32 crc32c(bytes 0..60) }`
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.group_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.segment_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        out[40..48].copy_from_slice(&self.segment_size.to_le_bytes());
        out[48..56].copy_from_slice(&self.created.as_nanos().to_le_bytes());
        let crc = crc32c::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and verifies a header read from `path`.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |offset: u64, reason: String| Error::corruption(path, offset, reason);
        if bytes.len() < SEGMENT_HEADER_LEN {
            return Err(bad(
                0,
                format!("segment is {} bytes, shorter than its header", bytes.len()),
            ));
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(bad(0, "not a tidemark segment (bad magic)".into()));
        }
        let crc = crc32c::crc32c(&bytes[0..60]);
        if crc != le_u32(bytes, 60) {
            return Err(bad(60, "segment header fails its CRC".into()));
        }
        let version = le_u32(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(bad(
                8,
                format!(
                    "segment format version {version}; this build reads version {FORMAT_VERSION}"
                ),
            ));
        }
        let header_len = le_u32(bytes, 12);
        if header_len as usize != SEGMENT_HEADER_LEN {
            return Err(bad(
                12,
                format!("segment header length {header_len}, expected {SEGMENT_HEADER_LEN}"),
            ));
        }
        Ok(SegmentHeader {
            group_id: le_u64(bytes, 16),
            segment_id: le_u64(bytes, 24),
            first_seq: le_u64(bytes, 32),
            segment_size: le_u64(bytes, 40),
            created: Timestamp::from_nanos(le_u64(bytes, 48) as i64),
        })
    }
}

/// A batch frame: the records of one group commit follow it back to back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFrame {
    /// Number of records in the batch.
    pub count: u32,
    /// Bytes of records after the frame.
    pub body_len: u64,
    /// Seq of the first record.
    pub first_seq: Seq,
    /// Seq of the last record.
    pub last_seq: Seq,
    /// The fencing epoch the batch was written under.
    pub epoch: u64,
    /// When the batch was written, every segment before `durable_segment`
    /// and every byte of `durable_segment` before `durable_end` was
    /// durable. The writer writes a batch while earlier ones are still
    /// being synced; this is what still lets recovery tell a torn tail from
    /// corruption (see `recovery.rs`).
    pub durable_segment: u64,
    /// See `durable_segment`.
    pub durable_end: u64,
}

impl BatchFrame {
    /// Encodes the frame.
    ///
    /// Format (little-endian, 64 bytes):
    /// `{ u32 magic "TDBT" | u32 count | u32 body_len | u32 reserved |
    ///    u64 first_seq | u64 last_seq | u64 epoch | u64 durable_segment |
    ///    u64 durable_end | u32 reserved | u32 crc32c(bytes 0..60) }`
    pub fn encode(&self) -> [u8; BATCH_HEADER_LEN] {
        let mut out = [0u8; BATCH_HEADER_LEN];
        out[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..12].copy_from_slice(&(self.body_len as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.last_seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        out[40..48].copy_from_slice(&self.durable_segment.to_le_bytes());
        out[48..56].copy_from_slice(&self.durable_end.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// True if this batch was written when every byte before `offset` of
    /// segment `segment` was durable.
    pub fn vouches_for(&self, segment: u64, offset: u64) -> bool {
        (self.durable_segment, self.durable_end) > (segment, offset)
    }

    /// Decodes a frame; the reason when the bytes are not one.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < BATCH_HEADER_LEN {
            return Err("batch frame cut short by the end of the segment".into());
        }
        let magic = le_u32(bytes, 0);
        if magic != BATCH_MAGIC {
            return Err(format!("bad batch magic {magic:#010x}"));
        }
        if crc32c::crc32c(&bytes[0..60]) != le_u32(bytes, 60) {
            return Err("batch frame fails its CRC".into());
        }
        let frame = BatchFrame {
            count: le_u32(bytes, 4),
            body_len: le_u32(bytes, 8) as u64,
            first_seq: le_u64(bytes, 16),
            last_seq: le_u64(bytes, 24),
            epoch: le_u64(bytes, 32),
            durable_segment: le_u64(bytes, 40),
            durable_end: le_u64(bytes, 48),
        };
        if frame.count == 0 || frame.last_seq < frame.first_seq {
            return Err(format!(
                "batch frame holds {} records with seqs {}..={}",
                frame.count, frame.first_seq, frame.last_seq
            ));
        }
        Ok(frame)
    }
}

/// The path of segment `id` in `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Parses a segment id back out of a file name made by [`segment_path`].
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment file mapped for reading.
#[derive(Debug)]
pub struct Segment {
    /// Its header.
    pub header: SegmentHeader,
    /// Its path, for errors.
    pub path: PathBuf,
    /// The whole fixed-size file.
    map: Mapping,
}

/// Where a scan of a segment stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanEnd {
    /// Offset just past the last valid batch: where the next batch goes.
    pub valid_end: u64,
    /// Why the scan stopped before the end of the file, if the bytes at
    /// `valid_end` are not zeros: the reason they do not decode.
    pub damage: Option<String>,
}

/// What a scan learned of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanSummary {
    /// Seq of the last valid record (the previous seq if there is none).
    pub last_seq: Seq,
    /// Records found.
    pub records: u64,
    /// Where and why the scan stopped.
    pub end: ScanEnd,
}

impl Segment {
    /// Opens and maps an existing segment, checking its header.
    pub fn open(fs: &dyn Fs, path: &Path) -> Result<Self> {
        let file = fs
            .open(path, OpenMode::read())
            .map_err(|e| Error::io("open segment", path, e))?;
        Self::map(file.as_ref(), path)
    }

    fn map(file: &dyn FsFile, path: &Path) -> Result<Self> {
        // SAFETY: segment files are written only by this process's journal
        // writer, which appends past every byte a reader can reach (readers
        // only follow index entries of durable records); truncation happens
        // only in recovery, within the mapped length. Unlinking a mapped
        // segment (retention) leaves the mapping valid.
        let map = unsafe { file.map(false) }.map_err(|e| Error::io("map segment", path, e))?;
        // The header is read, not faulted in through the mapping: a fault
        // reads ahead far more than a page, and a start-up that trusts
        // hundreds of sealed segments touches nothing else of them.
        let mut head = [0u8; SEGMENT_HEADER_LEN];
        let header = match file.read_exact_at(&mut head, 0) {
            Ok(()) => SegmentHeader::decode(&head, path)?,
            // A file shorter than its header: decoding the mapping says so.
            Err(_) => SegmentHeader::decode(map.as_slice(), path)?,
        };
        if header.segment_size != map.len() as u64 {
            return Err(Error::corruption(
                path,
                40,
                format!(
                    "segment header says {} bytes, the file has {}",
                    header.segment_size,
                    map.len()
                ),
            ));
        }
        Ok(Segment {
            header,
            path: path.to_path_buf(),
            map,
        })
    }

    /// Creates segment `header.segment_id` in `dir` at its full size, with
    /// its first [`ALLOCATE_FIRST`] bytes allocated where the filesystem
    /// can (the writer allocates the rest as it gets near: a thousand idle
    /// groups hold a few MiB of disk each, not a whole segment), writes
    /// and syncs its header and the directory entry, and returns it mapped
    /// for reading.
    pub fn create(
        fs: &dyn Fs,
        dir: &Path,
        header: SegmentHeader,
        hooks: &dyn crate::io_hooks::IoHooks,
    ) -> Result<Segment> {
        let path = segment_path(dir, header.segment_id);
        hooks
            .before_create(&path)
            .map_err(|e| Error::io("create segment", &path, e))?;
        let file: Arc<dyn FsFile> = fs
            .open(&path, OpenMode::create_new())
            .map_err(|e| Error::io("create segment", &path, e))?;
        let result = (|| {
            file.set_len(header.segment_size)
                .and_then(|()| file.allocate_range(0, header.segment_size.min(ALLOCATE_FIRST)))
                .map_err(|e| Error::io("allocate segment", &path, e))?;
            file.write_all_at(&header.encode(), 0)
                .map_err(|e| Error::io("write segment header", &path, e))?;
            file.sync_all()
                .map_err(|e| Error::io("fsync segment", &path, e))?;
            sync_dir(fs, dir)?;
            Segment::map(file.as_ref(), &path)
        })();
        if result.is_err() {
            // A half-made segment would be found as damage at the next
            // start; it holds nothing, so remove it now.
            let _ = fs.remove_file(&path);
        }
        result
    }

    /// Writes zeros over the segment's body (everything after its header),
    /// with direct writes, so its blocks are written rather than only
    /// allocated. A write into an allocated-but-unwritten block turns it
    /// into a written one, and the `fdatasync` after it must then commit
    /// that change to the filesystem's own journal: measured here, that
    /// halves the rate of small write+sync cycles (3 800/s instead of
    /// 7 500/s). Zeroing ahead of time (as PostgreSQL does for its WAL)
    /// leaves each group commit one data write and a cache flush. Where
    /// direct writes are refused it does nothing: buffered zeros would
    /// only fill the page cache. A crash part way leaves zeros either way;
    /// so does `stop`, which ends it early (the segment is needed now).
    pub fn zero_fill(&self, fs: &dyn Fs, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
        let file = fs
            .open(&self.path, OpenMode::write().direct())
            .map_err(|e| Error::io("open segment", &self.path, e))?;
        if !file.is_direct() {
            return Ok(());
        }
        let mut zeros = crate::appender::AlignedBuf::new(ZERO_FILL_CHUNK);
        // Direct writes go in whole blocks; a partial last one stays as it is.
        let align = crate::appender::IO_ALIGN as u64;
        let size = self.header.segment_size / align * align;
        let mut at = align;
        while at < size && !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let len = (size - at).min(ZERO_FILL_CHUNK as u64) as usize;
            file.write_all_at(&zeros.slice()[..len], at)
                .map_err(|e| Error::io_at("zero-fill segment", &self.path, at, e))?;
            at += len as u64;
        }
        // Made durable here, once, rather than by the first group commit.
        file.sync_data()
            .map_err(|e| Error::io("fsync segment", &self.path, e))
    }

    /// `len` bytes of the file at `offset`.
    pub fn bytes(&self, offset: u64, len: usize) -> Result<&[u8]> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.data().get(start..start.checked_add(len)?))
            .ok_or_else(|| {
                Error::corruption(
                    &self.path,
                    offset,
                    format!("{len} bytes from here run past the segment"),
                )
            })
    }

    /// The segment's id.
    pub fn id(&self) -> u64 {
        self.header.segment_id
    }

    /// The whole file, as mapped.
    pub(crate) fn data(&self) -> &[u8] {
        self.map.as_slice()
    }

    /// Decodes and verifies the record at `offset`.
    pub fn record_at(&self, offset: u64) -> Result<(RecordHeader, &[u8])> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&o| o >= SEGMENT_HEADER_LEN && o < self.map.len())
            .ok_or_else(|| {
                Error::corruption(&self.path, offset, "index points outside the segment")
            })?;
        decode_record(&self.data()[start..], &self.path, offset)
    }

    /// Walks the batches of the segment in order, verifying every record,
    /// and calls `visit` with each record and its offset once its whole
    /// batch has verified. `prev_seq` is the seq of the record before the
    /// segment; seqs must rise strictly from it.
    pub fn scan(
        &self,
        prev_seq: Seq,
        mut visit: impl FnMut(&RecordHeader, u64, &[u8]) -> Result<()>,
    ) -> Result<ScanSummary> {
        let mut pos = SEGMENT_HEADER_LEN;
        let mut last_seq = prev_seq;
        let mut records = 0u64;
        let mut batch: Vec<(RecordHeader, u64)> = Vec::new();
        let damage = loop {
            if pos + BATCH_HEADER_LEN > self.map.len() {
                break None;
            }
            let frame_bytes = &self.data()[pos..pos + BATCH_HEADER_LEN];
            if frame_bytes.iter().all(|&b| b == 0) {
                break None;
            }
            match self.check_batch(pos, last_seq, &mut batch) {
                Ok((frame, end)) => {
                    for (header, offset) in &batch {
                        let start = *offset as usize + crate::record::RECORD_HEADER_LEN;
                        let payload = &self.data()[start..start + header.stored_len as usize];
                        visit(header, *offset, payload)?;
                    }
                    records += batch.len() as u64;
                    last_seq = frame.last_seq;
                    pos = end;
                }
                Err(reason) => break Some(reason),
            }
        };
        Ok(ScanSummary {
            last_seq,
            records,
            end: ScanEnd {
                valid_end: pos as u64,
                damage,
            },
        })
    }

    /// Walks the valid batches from offset `from` (a batch boundary) on,
    /// calling `visit` with each batch's frame, the offset just past it,
    /// and its records (header and offset), until the first position that
    /// holds no valid batch or `visit` answers false. `prev_seq` is the seq
    /// before the first batch. Returns the offset where it stopped.
    pub fn batches_from(
        &self,
        from: u64,
        prev_seq: Seq,
        mut visit: impl FnMut(&BatchFrame, u64, &[(RecordHeader, u64)]) -> Result<bool>,
    ) -> Result<u64> {
        let mut pos = usize::try_from(from)
            .ok()
            .filter(|&p| p >= SEGMENT_HEADER_LEN)
            .unwrap_or(SEGMENT_HEADER_LEN);
        let mut last_seq = prev_seq;
        let mut batch = Vec::new();
        while pos + BATCH_HEADER_LEN <= self.map.len() {
            let Ok((frame, end)) = self.check_batch(pos, last_seq, &mut batch) else {
                break;
            };
            if !visit(&frame, end as u64, &batch)? {
                break;
            }
            last_seq = frame.last_seq;
            pos = end;
        }
        Ok(pos as u64)
    }

    /// Verifies the batch at `pos`: its frame and every record in it.
    /// Fills `batch` with the records and returns the frame and the offset
    /// just past the batch, or the reason it is not valid.
    fn check_batch(
        &self,
        pos: usize,
        prev_seq: Seq,
        batch: &mut Vec<(RecordHeader, u64)>,
    ) -> std::result::Result<(BatchFrame, usize), String> {
        batch.clear();
        let frame = BatchFrame::decode(&self.data()[pos..])?;
        if frame.first_seq <= prev_seq {
            return Err(format!(
                "batch starts at seq {} but seq {prev_seq} came before it",
                frame.first_seq
            ));
        }
        let body_start = pos + BATCH_HEADER_LEN;
        let end = usize::try_from(frame.body_len)
            .ok()
            .and_then(|len| body_start.checked_add(len))
            .filter(|&end| end <= self.map.len())
            .ok_or_else(|| {
                format!(
                    "batch of {} bytes runs past the end of the segment",
                    frame.body_len
                )
            })?;
        let mut at = body_start;
        let mut seq = prev_seq;
        while at < end {
            let (header, _) = decode_record(&self.data()[at..end], &self.path, at as u64)
                .map_err(|e| e.to_string())?;
            if header.seq <= seq || header.seq > frame.last_seq || header.seq < frame.first_seq {
                return Err(format!(
                    "record at offset {at} has seq {} out of order (previous {seq}, batch {}..={})",
                    header.seq, frame.first_seq, frame.last_seq
                ));
            }
            seq = header.seq;
            batch.push((header, at as u64));
            at += header.encoded_len();
        }
        if batch.len() != frame.count as usize || seq != frame.last_seq {
            return Err(format!(
                "batch frame promises {} records ending at seq {}, found {} ending at seq {seq}",
                frame.count,
                frame.last_seq,
                batch.len()
            ));
        }
        Ok((frame, end))
    }

    /// Looks for valid batches anywhere from `from` on whose records follow
    /// `prev_seq`, and returns the offset and frame of each. Used to tell a
    /// torn tail from corruption in the middle.
    ///
    /// A batch "vouches" for position `(segment, offset)` when its frame says
    /// that position was durable when the batch was written.
    pub fn valid_batches_after(
        &self,
        fs: &dyn Fs,
        from: u64,
        prev_seq: Seq,
    ) -> Vec<(u64, BatchFrame)> {
        let magic = BATCH_MAGIC.to_le_bytes();
        let mut found = Vec::new();
        let len = self.map.len() as u64;
        // Only what was ever written can hold a batch: the rest of a
        // preallocated segment is unwritten, and reading it through the
        // mapping would fault in (and keep resident) the whole file — for
        // the newest segments of every group at every start.
        let ranges = fs
            .open(&self.path, OpenMode::read())
            .and_then(|file| file.data_ranges(from, len))
            .unwrap_or_else(|_| vec![(from, len)]);
        let mut scratch = Vec::new();
        let mut at = 0usize;
        for (start, end) in ranges {
            at = at.max(start as usize);
            // A batch starts in a written range; its bytes may run past it
            // (check_batch reads them whole).
            while at < end as usize {
                let Some(hit) = memchr::memmem::find(&self.data()[at..end as usize], &magic) else {
                    break;
                };
                let pos = at + hit;
                match self.check_batch(pos, prev_seq, &mut scratch) {
                    Ok((frame, batch_end)) => {
                        found.push((pos as u64, frame));
                        at = batch_end;
                    }
                    Err(_) => at = pos + 1,
                }
            }
        }
        found
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it are
/// durable.
pub fn sync_dir(fs: &dyn Fs, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zero-filled segment's body is written blocks (no longer holes),
    /// reads as zeros, and keeps its header; recovery sees an empty segment.
    #[test]
    fn zero_fill_writes_the_body_and_keeps_the_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = crate::fs::RealFs;
        let header = SegmentHeader {
            group_id: 1,
            segment_id: 7,
            first_seq: 42,
            segment_size: 1 << 20,
            created: Timestamp::from_nanos(5),
        };
        let segment =
            Segment::create(&fs, dir.path(), header, &crate::io_hooks::RealIo).expect("create");
        let file = fs.open(&segment.path, OpenMode::read()).expect("open");
        let written = |file: &Arc<dyn FsFile>| -> u64 {
            let ranges = file.data_ranges(4096, 1 << 20).expect("ranges");
            ranges.iter().map(|(a, b)| b - a).sum()
        };
        let before = written(&file);
        segment
            .zero_fill(&fs, &std::sync::atomic::AtomicBool::new(false))
            .expect("zero fill");
        let direct = fs
            .open(&segment.path, OpenMode::write().direct())
            .expect("open")
            .is_direct();
        if direct {
            assert!(
                before < 1 << 19,
                "a new segment is mostly unwritten: {before}"
            );
            assert_eq!(
                written(&file),
                (1 << 20) - 4096,
                "the whole body is written"
            );
        }
        // Once the segment is needed, a zero-fill stops where it got to.
        let next = Segment::create(
            &fs,
            dir.path(),
            SegmentHeader {
                segment_id: 8,
                ..header
            },
            &crate::io_hooks::RealIo,
        )
        .expect("create");
        let untouched = written(&fs.open(&next.path, OpenMode::read()).expect("open"));
        next.zero_fill(&fs, &std::sync::atomic::AtomicBool::new(true))
            .expect("stopped at once");
        assert_eq!(
            written(&fs.open(&next.path, OpenMode::read()).expect("open")),
            untouched
        );
        let reopened = Segment::open(&fs, &segment.path).expect("reopen");
        assert_eq!(reopened.header, header);
        assert!(reopened.data()[SEGMENT_HEADER_LEN..]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn header_roundtrip_and_version_check() {
        let header = SegmentHeader {
            group_id: 9,
            segment_id: 3,
            first_seq: 100,
            segment_size: 1 << 20,
            created: Timestamp::from_nanos(123),
        };
        let bytes = header.encode();
        let path = Path::new("x.seg");
        assert_eq!(
            SegmentHeader::decode(&bytes, path).expect("decodes"),
            header
        );
        let mut newer = bytes;
        newer[8] = 2;
        let crc = crc32c::crc32c(&newer[0..60]);
        newer[60..64].copy_from_slice(&crc.to_le_bytes());
        let err = SegmentHeader::decode(&newer, path).expect_err("version 2 refused");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn frame_roundtrip() {
        let frame = BatchFrame {
            count: 2,
            body_len: 300,
            first_seq: 5,
            last_seq: 6,
            epoch: 1,
            durable_segment: 3,
            durable_end: 64,
        };
        assert_eq!(BatchFrame::decode(&frame.encode()), Ok(frame));
        let mut bad = frame.encode();
        bad[10] ^= 1;
        assert!(BatchFrame::decode(&bad).is_err());
    }

    #[test]
    fn segment_names_roundtrip() {
        let path = segment_path(Path::new("/j"), 42);
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(parse_segment_name(name), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
    }
}
