//! Base images: each volume as it was at the horizon.
//!
//! A base image is a sparse file of the volume's size. Retention folds the
//! oldest records into it; a read falls through to it for every byte that
//! no retained record covers. Zeroed and trimmed ranges become holes, so a
//! large discard costs no space and little time.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use crate::error::{Error, Result};
use crate::segment::sync_dir;
use crate::volume::{VolumeId, VolumeInfo};

/// A volume's base image file.
#[derive(Debug)]
pub struct BaseImage {
    path: PathBuf,
    file: File,
    size: u64,
}

/// The path of volume `id`'s base image in `dir`.
pub fn base_path(dir: &Path, id: VolumeId) -> PathBuf {
    dir.join(format!("{id:010}.img"))
}

impl BaseImage {
    /// Creates an all-zero (sparse) base image for a new volume.
    pub fn create(dir: &Path, volume: &VolumeInfo) -> Result<Self> {
        let path = base_path(dir, volume.id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("create base image", &path, e))?;
        file.set_len(volume.size)
            .map_err(|e| Error::io("size base image", &path, e))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync base image", &path, e))?;
        sync_dir(dir)?;
        Ok(BaseImage {
            path,
            file,
            size: volume.size,
        })
    }

    /// Opens an existing base image, checking its size.
    pub fn open(dir: &Path, volume: &VolumeInfo) -> Result<Self> {
        let path = base_path(dir, volume.id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open base image", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat base image", &path, e))?
            .len();
        if len != volume.size {
            return Err(Error::corruption(
                &path,
                len,
                format!(
                    "base image of volume {} is {len} bytes, the volume is {}",
                    volume.name, volume.size
                ),
            ));
        }
        Ok(BaseImage {
            path,
            file,
            size: volume.size,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::corruption(
                &self.path,
                offset,
                format!(
                    "range of {len} bytes runs past the base image's {} bytes",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io_at("read base image", &self.path, offset, e))
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io_at("write base image", &self.path, offset, e))
    }

    /// Sets `len` bytes at `offset` to zero, punching a hole where the
    /// filesystem can.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let punched = rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        );
        if punched.is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes everything written durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync base image", &self.path, e))
    }
}
