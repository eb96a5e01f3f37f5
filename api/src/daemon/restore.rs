//! Restore: a point of a volume materialised into a file or block device
//! on the daemon's host.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

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
    let result = (|| {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut at = 0u64;
        while at < volume.size {
            let n = CHUNK.min(volume.size - at);
            let part = &mut buf[..n as usize];
            journal.read(&volume.name, at, part, Point::Seq(seq))?;
            if is_device || part.iter().any(|&b| b != 0) {
                file.write_all_at(part, at)
                    .map_err(|e| failed("write", at, e))?;
            }
            at += n;
            progress(at, volume.size);
        }
        file.sync_all().map_err(|e| failed("sync", at, e))
    })();
    let released = journal.release_hold(&hold);
    result?;
    released?;
    Ok(())
}
