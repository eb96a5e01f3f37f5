//! The operating system's filesystem.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::FallocateFlags;

use super::{Fs, FsFile, FsLock, Mapping, MappingBacking, OpenMode};

/// The real filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

/// A file of the real filesystem.
#[derive(Debug)]
pub struct RealFile {
    file: File,
    direct: bool,
    block_device: bool,
}

impl RealFile {
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn options(mode: OpenMode) -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(mode.write)
        .create(mode.create && !mode.create_new)
        .create_new(mode.create_new)
        .truncate(mode.truncate);
    if mode.private {
        options.mode(0o600);
    }
    options
}

impl Fs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        let mut direct = false;
        let file = if mode.direct {
            let flags = rustix::fs::OFlags::DIRECT.bits() as i32;
            match options(mode).custom_flags(flags).open(path) {
                Ok(file) => {
                    direct = true;
                    file
                }
                // The filesystem refuses O_DIRECT (tmpfs): the page cache then.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::info!(file = %path.display(), "the filesystem refuses O_DIRECT; writing through the page cache");
                    options(mode).open(path)?
                }
                Err(e) => return Err(e),
            }
        } else {
            options(mode).open(path)?
        };
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Arc::new(RealFile {
            file,
            direct,
            block_device,
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }

    fn lock(&self, path: &Path) -> io::Result<FsLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        Ok(FsLock::new(Box::new(file)))
    }

    fn local_dir(&self, path: &Path) -> PathBuf {
        path.to_path_buf()
    }
}

/// The size of block device `file`, from the kernel (`BLKGETSIZE64`):
/// its metadata says 0.
fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t).
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live u64; the descriptor is open for the call's duration.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(file),
            BLKGETSIZE64 as _,
            &mut size as *mut u64,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl FsFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            block_device_size(&self.file)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device has no settable length",
            ));
        }
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NOSPC => Err(e.into()),
            // No fallocate here: a sparse file, and a full disk can then
            // only be found by writing.
            Err(_) => self.set_len(len),
        }
    }

    fn allocate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NOSPC => Err(e.into()),
            // No fallocate here: a full disk can only be found by writing.
            Err(_) => Ok(()),
        }
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        // Keep the size; let the filesystem zero (or free) the range where
        // it can, else write zeros.
        let flags = if punch {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        if !self.block_device && rustix::fs::fallocate(&self.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        write_zeros(self, offset, len)
    }

    fn data_ranges(&self, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        if self.block_device {
            return Ok(super::whole_range(from, to));
        }
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let start = match seek(&self.file, SeekFrom::Data(at)) {
                Ok(start) => start,
                // Nothing but holes from `at` on.
                Err(e) if e == rustix::io::Errno::NXIO => break,
                // No SEEK_DATA here: every byte may be data.
                Err(_) => return Ok(super::whole_range(from, to)),
            };
            if start >= to {
                break;
            }
            let end = seek(&self.file, SeekFrom::Hole(start))
                .unwrap_or(to)
                .min(to);
            out.push((start, end));
            at = end;
        }
        Ok(out)
    }

    fn is_direct(&self) -> bool {
        self.direct
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    unsafe fn map(&self, writable: bool) -> io::Result<Mapping> {
        let map = if writable {
            memmap2::MmapOptions::new().map_raw(&self.file)?
        } else {
            memmap2::MmapOptions::new().map_raw_read_only(&self.file)?
        };
        Ok(Mapping {
            ptr: map.as_mut_ptr(),
            len: map.len(),
            backing: MappingBacking::Real(map),
        })
    }
}

/// Writes `len` zeros at `offset` of `file`, a MiB at a time.
pub(crate) fn write_zeros(file: &dyn FsFile, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Fs, OpenMode};

    #[test]
    fn data_ranges_skip_unwritten_preallocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seg");
        let file = RealFs.open(&path, OpenMode::create()).expect("create");
        file.allocate(1 << 20).expect("allocate");
        file.write_all_at(&[7u8; 4096], 512 << 10).expect("write");
        file.sync_data().expect("sync");
        let ranges = file.data_ranges(0, 1 << 20).expect("ranges");
        if ranges == vec![(0, 1 << 20)] {
            eprintln!("skipped: this filesystem does not tell unwritten extents from data");
            return;
        }
        assert_eq!(ranges, vec![(512 << 10, (512 << 10) + 4096)]);
        assert_eq!(
            file.data_ranges(600 << 10, 1 << 20).expect("ranges"),
            vec![]
        );
        assert_eq!(
            file.data_ranges(514 << 10, 515 << 10).expect("ranges"),
            vec![(514 << 10, 515 << 10)],
            "clipped to the range asked"
        );
    }
}
