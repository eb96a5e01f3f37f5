//! The production volume: the backing file or block device that the
//! protected application really reads and writes.
//!
//! The write path writes every change here as well as into the journal;
//! after a crash, regions the dirty-region map names are re-read from here.

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::appender::IO_ALIGN;
use crate::fs::{Fs, FsFile, OpenMode, RealFs};

/// Writes at least this long go to the production volume with `O_DIRECT`
/// when offset, length and buffer are aligned. A buffered write copies
/// every byte into the page cache on the writing thread — for sequential
/// streams the largest item of the daemon's profile (a core per ~GiB/s on
/// this project's machine), and 16 concurrent buffered writes of one file
/// also queue on its inode lock — and the dirty-region map's cleaning
/// then writes it out again. A direct write hands the buffer to the disk.
/// Small writes stay buffered: for them the page cache's absorbing of
/// rewrites and its merging of neighbours is worth more than the copy.
pub const DIRECT_WRITE_MIN: usize = 256 << 10;

/// A block device (or file) the write path can read, write and flush.
pub trait BlockDevice: Send + Sync + Debug {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Where it lives, for errors.
    fn path(&self) -> &Path;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Sets `len` bytes at `offset` to zero.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes everything written durable.
    fn flush(&self) -> io::Result<()>;
}

/// A production volume in a file or a block device.
#[derive(Debug)]
pub struct FileDevice {
    file: Arc<dyn FsFile>,
    /// The same file opened with `O_DIRECT`, where the filesystem allows
    /// it, for large aligned writes.
    direct: Option<Arc<dyn FsFile>>,
    /// Set once the device refused an aligned direct write (a logical
    /// block larger than [`IO_ALIGN`]): every write is buffered after.
    direct_refused: AtomicBool,
    path: PathBuf,
    size: u64,
}

impl FileDevice {
    /// Opens `path`, creating a sparse file of `size` bytes if it does not
    /// exist. An existing file or block device must be at least `size`
    /// bytes (a block device's size comes from the kernel; it is never
    /// resized).
    pub fn open(path: &Path, size: u64) -> io::Result<Self> {
        Self::open_on(&RealFs, path, size)
    }

    /// Opens `path` on filesystem `fs` (as [`FileDevice::open`]).
    pub fn open_on(fs: &dyn Fs, path: &Path, size: u64) -> io::Result<Self> {
        let created = matches!(fs.file_len(path), Err(e) if e.kind() == io::ErrorKind::NotFound);
        let file = fs.open(path, OpenMode::create())?;
        let len = file.len()?;
        if len == 0 && !file.is_block_device() {
            file.set_len(size)?;
            if created {
                // The volume's file must outlive a power cut as surely as
                // the writes the client will flush into it.
                file.sync_all()?;
                fs.sync_dir(&crate::fs::parent_dir(path))?;
            }
        } else if len < size {
            let what = if file.is_block_device() {
                "block device"
            } else {
                "file"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what} {} is {len} bytes, smaller than the volume's {size}",
                    path.display()
                ),
            ));
        }
        let direct = fs
            .open(path, OpenMode::write().direct())
            .ok()
            .filter(|f| f.is_direct());
        Ok(FileDevice {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            path: path.to_path_buf(),
            size,
        })
    }
}

impl FileDevice {
    /// The direct handle, if `data` at `offset` may take it.
    fn direct_for(&self, data: &[u8], offset: u64) -> Option<&Arc<dyn FsFile>> {
        let aligned = |n: usize| n % IO_ALIGN == 0;
        let direct = self.direct.as_ref()?;
        (data.len() >= DIRECT_WRITE_MIN
            && aligned(data.len())
            && offset % IO_ALIGN as u64 == 0
            && aligned(data.as_ptr() as usize)
            && !self.direct_refused.load(Ordering::Relaxed))
        .then_some(direct)
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_for(data, offset) {
            match direct.write_all_at(data, offset) {
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    // Nothing was written: O_DIRECT fails before any IO
                    // when the alignment does not suit the device.
                    tracing::info!(file = %self.path.display(), offset, error = %e, "the production volume refuses aligned direct writes; writing through the page cache");
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                done => return done,
            }
        }
        self.file.write_all_at(data, offset)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        // Keep the size and the allocation.
        self.file.zero_range(offset, len, false)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::write_buffers::WriteBuffers;

    /// Large aligned writes bypass the page cache, small ones do not, and
    /// a read sees the newest of either, whichever way each went.
    #[test]
    fn direct_and_buffered_writes_of_one_range_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let device = FileDevice::open(&dir.path().join("volume"), 8 << 20).unwrap();
        let pool = WriteBuffers::default();
        let large = |fill: u8| {
            let mut buf = pool.take(1 << 20);
            buf.fill(fill);
            buf.freeze()
        };
        let first = large(1);
        if device.direct.is_some() {
            assert!(device.direct_for(&first, 1 << 20).is_some());
            assert!(
                device.direct_for(&first[..4096], 1 << 20).is_none(),
                "small writes stay buffered"
            );
            assert!(device.direct_for(&first, (1 << 20) + 512).is_none());
        } else {
            eprintln!("the filesystem under the temporary directory refuses O_DIRECT; checking the buffered path only");
        }
        device.write_at(&first, 1 << 20).unwrap();
        // Buffered over part of it, then direct over all of it, then
        // buffered again: each read sees the last.
        device.write_at(&[2u8; 4096], (1 << 20) + 8192).unwrap();
        let mut got = vec![0u8; 1 << 20];
        device.read_at(&mut got, 1 << 20).unwrap();
        assert!(got[..8192].iter().all(|&b| b == 1));
        assert!(got[8192..12288].iter().all(|&b| b == 2));
        assert!(got[12288..].iter().all(|&b| b == 1));
        device.write_at(&large(3), 1 << 20).unwrap();
        device.read_at(&mut got, 1 << 20).unwrap();
        assert!(
            got.iter().all(|&b| b == 3),
            "the direct write replaced the cached pages"
        );
        device.write_at(&[4u8; 4096], 1 << 20).unwrap();
        device.flush().unwrap();
        device.read_at(&mut got, 1 << 20).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 4));
        assert!(got[4096..].iter().all(|&b| b == 3));
    }
}
