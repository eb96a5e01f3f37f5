//! The production volume: the backing file or block device that the
//! protected application really reads and writes.
//!
//! The write path writes every change here as well as into the journal;
//! after a crash, regions the dirty-region map names are re-read from here.

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::{Fs, FsFile, OpenMode, RealFs};

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
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
        })
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
