//! The production volume: the backing file or block device that the
//! protected application really reads and writes.
//!
//! The write path writes every change here as well as into the journal;
//! after a crash, regions the dirty-region map names are re-read from here.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

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

/// A production volume in a file (or a block device node).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileDevice {
    /// Opens `path`, creating a sparse file of `size` bytes if it does not
    /// exist. An existing file must be at least `size` bytes.
    pub fn open(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size)?;
        } else if len < size && file.metadata()?.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is {len} bytes, the volume needs {size}", path.display()),
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
        // Keep the size and the allocation; fall back to writing zeros where
        // the filesystem cannot zero a range itself.
        if rustix::fs::fallocate(
            &self.file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
        {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
