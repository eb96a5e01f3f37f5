//! Applying archived records to an image: the one place that turns a
//! segment object's writes, zeroes and trims into bytes of a volume, for
//! restores and for views served from the bucket.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tidemark_journal::record::payload_bytes;
use tidemark_journal::RecordKind;

use super::catalog::records;
use super::error::{ArchiveError, Result};

/// What one record does to a volume.
#[derive(Debug)]
pub enum Effect {
    /// These bytes at this offset.
    Data(u64, Vec<u8>),
    /// Zeros over this range.
    Zero(u64, u64),
}

/// Calls `apply` for every record of volume `volume` in a segment object's
/// verified `body` with `after < seq <= upto`, in seq order.
pub fn effects(
    key: &str,
    body: &[u8],
    volume: u32,
    after: u64,
    upto: u64,
    mut apply: impl FnMut(Effect) -> Result<()>,
) -> Result<()> {
    for record in records(key, body) {
        let (header, stored) = record?;
        if header.seq > upto {
            break;
        }
        if header.seq <= after || header.volume != volume || header.length == 0 {
            continue;
        }
        match header.kind {
            RecordKind::Write => {
                let data = payload_bytes(&header, stored, Path::new(key), 0).map_err(|e| {
                    ArchiveError::Corrupt {
                        location: String::new(),
                        key: key.to_string(),
                        reason: e.to_string(),
                    }
                })?;
                apply(Effect::Data(header.offset, data))?;
            }
            RecordKind::Zero | RecordKind::Trim => {
                apply(Effect::Zero(header.offset, header.length))?
            }
            RecordKind::Flush | RecordKind::Mark => {}
        }
    }
    Ok(())
}

/// Zeros `len` bytes of `file` at `offset`: a hole where the file system
/// can punch one, written zeros elsewhere (a block device).
pub fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    if fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
    {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = zeros.len().min((offset + len - at) as usize);
        file.write_all_at(&zeros[..n], at)
            .map_err(|e| ArchiveError::io("write zeros to", path, e))?;
        at += n as u64;
    }
    Ok(())
}
