//! Restore: a point of a volume materialised into a file or block device
//! on the daemon's host.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use tidemark_journal::{Point, Seq};

use super::error::{ApiError, ApiResult};
use super::registry::Volume;

const CHUNK: u64 = 4 << 20;

/// Writes `volume` as of `seq` to `path`, calling `progress(done, total)`
/// after every chunk. A regular file is made sparse (zero chunks are
/// skipped); a block device is written in full.
pub fn restore(
    volume: &Volume,
    seq: Seq,
    path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> ApiResult<()> {
    let failed = |what: &str, offset: u64, e: std::io::Error| {
        ApiError::Failed(format!(
            "restore of volume {} to {}: cannot {what} at offset {offset}: {e}",
            volume.name,
            path.display()
        ))
    };
    let backing = volume.spec.lock().backing.clone();
    if let (Ok(a), Ok(b)) = (path.canonicalize(), backing.canonicalize()) {
        if a == b {
            return Err(ApiError::Invalid(format!(
                "{} is the production volume of {}; use rollback to rewind a volume in place",
                path.display(),
                volume.name
            )));
        }
    }
    let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let file = OpenOptions::new()
        .write(true)
        .create(!is_device)
        .truncate(!is_device)
        .open(path)
        .map_err(|e| failed("open", 0, e))?;
    if !is_device {
        file.set_len(volume.size)
            .map_err(|e| failed("size", 0, e))?;
    }
    let hold = format!("restore:{}:{seq}:{}", volume.name, std::process::id());
    let journal = volume.journal();
    journal.set_hold(&hold, seq)?;
    // Reads are bound by index lookups (CPU), so chunks are read by one
    // thread per core, each writing its own chunks in place.
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8) as u64;
    let chunks = volume.size.div_ceil(CHUNK);
    let done = AtomicU64::new(0);
    let failed_at: Mutex<Option<ApiError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (file, done, failed_at) = (&file, &done, &failed_at);
            scope.spawn(move || {
                let mut buf = vec![0u8; CHUNK as usize];
                for chunk in (t..chunks).step_by(threads as usize) {
                    if failed_at.lock().is_some() {
                        return;
                    }
                    let at = chunk * CHUNK;
                    let n = CHUNK.min(volume.size - at);
                    let part = &mut buf[..n as usize];
                    let result = journal
                        .read(&volume.name, at, part, Point::Seq(seq))
                        .map_err(ApiError::from)
                        .and_then(|_| {
                            if is_device || part.iter().any(|&b| b != 0) {
                                file.write_all_at(part, at)
                                    .map_err(|e| failed("write", at, e))
                            } else {
                                Ok(())
                            }
                        });
                    if let Err(e) = result {
                        failed_at.lock().get_or_insert(e);
                        return;
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
        let mut reported = 0;
        while reported < volume.size && failed_at.lock().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let now = done.load(Ordering::Relaxed);
            if now != reported {
                reported = now;
                progress(now, volume.size);
            }
        }
    });
    let result = match failed_at.into_inner() {
        Some(e) => Err(e),
        None => file.sync_all().map_err(|e| failed("sync", volume.size, e)),
    };
    let released = journal.release_hold(&hold);
    result?;
    released?;
    Ok(())
}
