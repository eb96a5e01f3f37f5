//! The initial sync: protecting a production volume that already holds
//! data starts by journalling that data, so every point reads what the
//! volume really held and not the zeroes of an empty base image.

use tidemark_journal::Change;

use super::error::{ApiError, ApiResult};
use super::registry::Volume;

const CHUNK: usize = 1 << 20;

/// Journals every non-zero MiB of `volume`'s production volume and marks
/// the window on the timeline.
pub fn run(volume: &Volume, timeout: std::time::Duration) -> ApiResult<()> {
    let spec = volume.spec.lock().clone();
    let journal = volume.journal();
    let id = volume.id()?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut copied = 0u64;
    while offset < volume.size {
        let len = CHUNK.min((volume.size - offset) as usize);
        let chunk = &mut buf[..len];
        volume.group.write_path.read(&volume.name, offset, chunk)?;
        if chunk.iter().any(|&b| b != 0) {
            journal.append(
                id,
                Change::Write {
                    offset,
                    data: chunk,
                },
            )?;
            copied += len as u64;
        }
        offset += len as u64;
    }
    journal.sync()?;
    let body = format!(
        "{{\"backing\":{},\"bytes\":{copied}}}",
        serde_json::Value::String(spec.backing.display().to_string())
    );
    volume
        .record_event("initial-sync", &body, timeout)
        .map_err(|e| ApiError::Failed(format!("volume {}: initial sync: {e}", volume.name)))?;
    tracing::info!(volume = %volume.name, bytes = copied, "initial sync done");
    Ok(())
}
