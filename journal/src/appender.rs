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
//!
//! Encoding a batch and writing it are split ([`SegmentAppender::finish`]
//! hands back a [`BatchWrite`]) so that one thread can encode the next batch
//! into a second buffer while another writes this one.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::io_hooks::IoHooks;
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
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

/// Where the first `IO_ALIGN` address in `buf` is (at most `IO_ALIGN` in:
/// a buffer with that much slack always holds one). A vector's heap block
/// never moves, so the answer holds for the vector's life.
pub(crate) fn aligned_start(buf: &[u8]) -> usize {
    buf.as_ptr().align_offset(IO_ALIGN).min(IO_ALIGN)
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let raw = vec![0u8; len + IO_ALIGN];
        let start = aligned_start(&raw);
        AlignedBuf { raw, start, len }
    }

    pub(crate) fn slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The batch buffers, passed from the encoding thread to the writing one
/// and back. Their number bounds how far encoding runs ahead of the disk.
#[derive(Clone)]
pub struct BufferPool {
    give: Sender<AlignedBuf>,
    take: Receiver<AlignedBuf>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("free", &self.take.len())
            .finish()
    }
}

impl BufferPool {
    /// `count` buffers able to hold a batch of up to `max_batch` bytes.
    pub fn new(count: usize, max_batch: usize) -> Self {
        let (give, take) = crossbeam_channel::bounded(count);
        for _ in 0..count {
            let _ = give.send(AlignedBuf::new(align_up(max_batch + IO_ALIGN)));
        }
        BufferPool { give, take }
    }

    /// Waits for a free buffer. The pool holds a sender of its own, so
    /// this only waits for the writing thread to return one.
    fn take(&self) -> AlignedBuf {
        match self.take.recv() {
            Ok(buf) => buf,
            // Unreachable while `self.give` lives; a fresh buffer is correct
            // anyway.
            Err(_) => AlignedBuf::new(IO_ALIGN),
        }
    }

    /// Returns a buffer.
    pub fn give(&self, buf: AlignedBuf) {
        let _ = self.give.try_send(buf);
    }
}

/// Appends batches to one segment file.
pub struct SegmentAppender {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    direct: bool,
    /// Where the next batch goes.
    write_offset: u64,
    /// The bytes of the block holding `write_offset` that precede it.
    tail: Vec<u8>,
    /// The buffer a batch is being encoded into.
    current: Option<AlignedBuf>,
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

impl SegmentAppender {
    /// An appender for `segment` whose valid bytes end at `write_offset`.
    pub fn open(fs: &dyn Fs, segment: &Segment, write_offset: u64, direct: bool) -> Result<Self> {
        let mode = if direct {
            OpenMode::write().direct()
        } else {
            OpenMode::write()
        };
        let file = fs
            .open(&segment.path, mode)
            .map_err(|e| Error::io("open segment", &segment.path, e))?;
        let direct = file.is_direct();
        let block = align_down(write_offset);
        let tail = segment
            .bytes(block, (write_offset - block) as usize)?
            .to_vec();
        Ok(SegmentAppender {
            file,
            path: segment.path.clone(),
            direct,
            write_offset,
            tail,
            current: None,
        })
    }

    /// The file, for `fdatasync`.
    pub fn file(&self) -> &Arc<dyn FsFile> {
        &self.file
    }

    /// Where the next batch goes.
    pub fn write_offset(&self) -> u64 {
        self.write_offset
    }

    /// A buffer (from `pool`) to encode a batch of `len` bytes into; then
    /// [`finish`](Self::finish) it.
    pub fn batch_buffer(&mut self, pool: &BufferPool, len: usize) -> Result<&mut [u8]> {
        let tail = self.tail.len();
        let buf = self.current.get_or_insert_with(|| pool.take());
        if tail + len > buf.len {
            return Err(Error::Invalid(format!(
                "batch of {len} bytes exceeds the writer's buffer of {} bytes",
                buf.len - tail
            )));
        }
        let slice = buf.slice();
        slice[..tail].copy_from_slice(&self.tail);
        Ok(&mut slice[tail..tail + len])
    }

    /// Seals the batch of `len` bytes encoded by
    /// [`batch_buffer`](Self::batch_buffer) into a write, and moves the
    /// append position past it.
    pub fn finish(&mut self, len: usize) -> Result<BatchWrite> {
        let mut buf = self
            .current
            .take()
            .ok_or_else(|| Error::Invalid("finish without a batch buffer".into()))?;
        let tail_len = self.tail.len();
        let end = tail_len + len;
        let padded = align_up(end);
        let block = align_down(self.write_offset);
        let slice = buf.slice();
        slice[end..padded].fill(0);
        let new_offset = self.write_offset + len as u64;
        let from = (align_down(new_offset) - block) as usize;
        self.tail.clear();
        self.tail.extend_from_slice(&slice[from..end]);
        let write = BatchWrite {
            file: self.file.clone(),
            path: self.path.clone(),
            block,
            len: padded,
            start: self.write_offset,
            buf,
        };
        self.write_offset = new_offset;
        Ok(write)
    }
}

/// One batch, encoded and padded, ready to be written.
pub struct BatchWrite {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    /// The block-aligned offset the buffer goes to.
    block: u64,
    /// Bytes to write (a multiple of `IO_ALIGN`).
    len: usize,
    /// Where the batch itself starts, for errors.
    start: u64,
    buf: AlignedBuf,
}

impl BatchWrite {
    /// Gives up the write (done or not) and returns its buffer.
    pub fn into_buf(self) -> AlignedBuf {
        self.buf
    }

    /// Writes the batch; may be called again after a failure.
    pub fn write(&mut self, hooks: &dyn IoHooks) -> std::result::Result<(), std::io::Error> {
        hooks.before_write(&self.path, self.block, self.len)?;
        self.file
            .write_all_at(&self.buf.slice()[..self.len], self.block)
    }

    /// The error of a failed [`write`](Self::write), naming file and offset.
    pub fn error(&self, source: std::io::Error) -> Error {
        Error::io_at("write segment", &self.path, self.start, source)
    }
}
