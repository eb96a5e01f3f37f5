//! The write side of the active segment: batches go to disk with
//! `O_DIRECT`, straight from an aligned buffer, bypassing the page cache.
//!
//! Buffered writes followed by `fdatasync` reach well under half the
//! disk's sequential bandwidth here, because every sync waits for page
//! cache writeback to start from cold; direct writes keep the device busy
//! and leave `fdatasync` only the metadata and the device cache to flush.
//! Direct IO wants offsets, lengths and memory aligned to the block size, so
//! each write starts at the block holding the end of the previous batch and
//! rewrites that block's durable bytes unchanged (a torn write of it leaves
//! each sector either old or new, and both hold the same durable bytes),
//! then pads the last block with zeros. The format on disk is unchanged:
//! batches back to back, zeros after the last one.
//!
//! Filesystems that refuse `O_DIRECT` get the same writes through the page
//! cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::segment::Segment;

/// Alignment of direct writes: offsets, lengths and buffer addresses.
pub const IO_ALIGN: usize = 4096;

fn align_down(n: u64) -> u64 {
    n - n % IO_ALIGN as u64
}

fn align_up(n: usize) -> usize {
    n.div_ceil(IO_ALIGN) * IO_ALIGN
}

/// A zero-filled buffer whose usable part starts at an `IO_ALIGN` address.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + IO_ALIGN];
        let start = raw.as_ptr().align_offset(IO_ALIGN).min(IO_ALIGN);
        AlignedBuf { raw, start, len }
    }

    fn slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Appends batches to one segment file.
pub struct SegmentAppender {
    file: Arc<File>,
    path: PathBuf,
    direct: bool,
    /// Where the next batch goes.
    write_offset: u64,
    /// The bytes of the block holding `write_offset` that precede it.
    tail: Vec<u8>,
    buf: AlignedBuf,
}

impl std::fmt::Debug for SegmentAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentAppender")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("write_offset", &self.write_offset)
            .finish()
    }
}

/// Opens `path` for writing, with `O_DIRECT` if `direct` and the
/// filesystem allows it. Returns the file and whether it is direct.
fn open_for_append(path: &Path, direct: bool) -> Result<(File, bool)> {
    if direct {
        let flags = rustix::fs::OFlags::DIRECT.bits() as i32;
        match OpenOptions::new()
            .write(true)
            .custom_flags(flags)
            .open(path)
        {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                tracing::info!(segment = %path.display(), "the filesystem refuses O_DIRECT; writing through the page cache");
            }
            Err(e) => return Err(Error::io("open segment", path, e)),
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open segment", path, e))?;
    Ok((file, false))
}

impl SegmentAppender {
    /// An appender for `segment` whose valid bytes end at `write_offset`,
    /// able to write batches of up to `max_batch` bytes.
    pub fn open(
        segment: &Segment,
        write_offset: u64,
        direct: bool,
        max_batch: usize,
    ) -> Result<Self> {
        let (file, direct) = open_for_append(&segment.path, direct)?;
        let block = align_down(write_offset);
        let tail = segment
            .bytes(block, (write_offset - block) as usize)?
            .to_vec();
        Ok(SegmentAppender {
            file: Arc::new(file),
            path: segment.path.clone(),
            direct,
            write_offset,
            tail,
            buf: AlignedBuf::new(align_up(max_batch + IO_ALIGN)),
        })
    }

    /// The file, for the sync stage's `fdatasync`.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where the next batch goes.
    pub fn write_offset(&self) -> u64 {
        self.write_offset
    }

    /// The buffer to encode a batch of `len` bytes into; then [`write`](Self::write) it.
    pub fn batch_buffer(&mut self, len: usize) -> Result<&mut [u8]> {
        let start = self.tail.len();
        if start + len > self.buf.len {
            return Err(Error::Invalid(format!(
                "batch of {len} bytes exceeds the writer's buffer of {} bytes",
                self.buf.len - start
            )));
        }
        Ok(&mut self.buf.slice()[start..start + len])
    }

    /// Writes the batch of `len` bytes encoded by [`batch_buffer`](Self::batch_buffer).
    pub fn write(&mut self, len: usize) -> Result<()> {
        let tail_len = self.tail.len();
        let end = tail_len + len;
        let padded = align_up(end);
        let block = align_down(self.write_offset);
        let buf = self.buf.slice();
        buf[..tail_len].copy_from_slice(&self.tail);
        buf[end..padded].fill(0);
        if let Err(e) = self.file.write_all_at(&buf[..padded], block) {
            // Nothing was acknowledged and the next batch overwrites these
            // bytes; re-writing the old tail keeps a crash before then from
            // finding a complete-looking batch that was reported failed.
            let keep = align_up(tail_len.max(1));
            buf[tail_len..keep].fill(0);
            let _ = self.file.write_all_at(&buf[..keep], block);
            return Err(Error::io_at(
                "write segment",
                &self.path,
                self.write_offset,
                e,
            ));
        }
        let new_offset = self.write_offset + len as u64;
        let new_block = align_down(new_offset);
        let from = (new_block - block) as usize;
        let to = (new_offset - block) as usize;
        self.tail.clear();
        self.tail.extend_from_slice(&buf[from..to]);
        self.write_offset = new_offset;
        Ok(())
    }
}
