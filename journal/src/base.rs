//! Base images: each volume as it was at the horizon.
//!
//! A base image is a sparse file of the volume's size. Retention folds the
//! oldest records into it; a read falls through to it for every byte that
//! no retained record covers. Zeroed and trimmed ranges become holes, so a
//! large discard costs no space and little time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::segment::sync_dir;
use crate::volume::{VolumeId, VolumeInfo};

/// A volume's base image file.
#[derive(Debug)]
pub struct BaseImage {
    path: PathBuf,
    file: Arc<dyn FsFile>,
    size: u64,
}

/// The path of volume `id`'s base image in `dir`.
pub fn base_path(dir: &Path, id: VolumeId) -> PathBuf {
    dir.join(format!("{id:010}.img"))
}

impl BaseImage {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates an all-zero (sparse) base image for a new volume.
    pub fn create(fs: &dyn Fs, dir: &Path, volume: &VolumeInfo) -> Result<Self> {
        let path = base_path(dir, volume.id);
        let file = fs
            .open(&path, OpenMode::create().truncating())
            .map_err(|e| Error::io("create base image", &path, e))?;
        file.set_len(volume.size)
            .map_err(|e| Error::io("size base image", &path, e))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync base image", &path, e))?;
        sync_dir(fs, dir)?;
        Ok(BaseImage {
            path,
            file,
            size: volume.size,
        })
    }

    /// Opens an existing base image, checking its size.
    pub fn open(fs: &dyn Fs, dir: &Path, volume: &VolumeInfo) -> Result<Self> {
        let path = base_path(dir, volume.id);
        let file = fs
            .open(&path, OpenMode::write())
            .map_err(|e| Error::io("open base image", &path, e))?;
        let len = file
            .len()
            .map_err(|e| Error::io("stat base image", &path, e))?;
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
        self.file
            .zero_range(offset, len, true)
            .map_err(|e| Error::io_at("zero base image", &self.path, offset, e))
    }

    /// Makes everything written durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync base image", &self.path, e))
    }
}

/// The ranges of `[from, to)` of the file at `path` that hold data, as
/// the filesystem reports them (`SEEK_DATA` / `SEEK_HOLE`), merged and
/// ascending. A file whose filesystem cannot tell (or a block device) is
/// all data: the answer may claim data where there is none, never the
/// reverse.
pub fn data_spans(path: &Path, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path)?;
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).unwrap_or(libc::off_t::MAX);
        // SAFETY: lseek on a descriptor this function owns; no memory is
        // passed.
        let at = unsafe { libc::lseek(fd, offset, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after `offset`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut spans = Vec::new();
    let mut at = from;
    while at < to {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(Some(data)) => data,
            Ok(None) => break,
            // The filesystem or device cannot say: all data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(from, to)]),
            Err(e) => return Err(e),
        };
        if data >= to {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        spans.push((data, hole));
        at = hole.max(data + 1);
    }
    Ok(spans)
}
