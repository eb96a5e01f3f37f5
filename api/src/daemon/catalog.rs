//! The daemon's catalogue of volumes (`DATA_DIR/volumes.json`): what was
//! created through the API, so volumes and consistency groups come back
//! after a restart. The journals hold the history; this holds the wiring
//! (group, production volume, mode).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};

/// One volume as created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Its name (and live export name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Its consistency group.
    pub group: String,
    /// The production volume.
    pub backing: PathBuf,
    /// Whether the daemon made the backing file (and deletes it with the
    /// volume).
    pub owns_backing: bool,
    /// `sync`, `async` or `adaptive`.
    pub mode: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    volumes: Vec<VolumeSpec>,
}

/// Loads the catalogue at `path` (empty if there is none yet).
pub fn load(path: &Path) -> ApiResult<Vec<VolumeSpec>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<CatalogFile>(&bytes)
            .map(|f| f.volumes)
            .map_err(|e| ApiError::Failed(format!("catalogue {} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(ApiError::Failed(format!(
            "cannot read catalogue {}: {e}",
            path.display()
        ))),
    }
}

/// Stores `volumes` at `path` atomically (temporary file, fsync, rename,
/// fsync of the directory).
pub fn store(path: &Path, volumes: &[VolumeSpec]) -> ApiResult<()> {
    let failed = |what: &str, e: std::io::Error| {
        ApiError::Failed(format!("cannot {what} catalogue {}: {e}", path.display()))
    };
    let file = CatalogFile {
        version: 1,
        volumes: volumes.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&file)
        .map_err(|e| ApiError::Failed(format!("cannot encode catalogue: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let mut out = std::fs::File::create(&tmp).map_err(|e| failed("write", e))?;
    out.write_all(&bytes).map_err(|e| failed("write", e))?;
    out.sync_all().map_err(|e| failed("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| failed("replace", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed("sync the directory of", e))?;
    }
    Ok(())
}
