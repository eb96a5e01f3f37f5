//! The daemon's catalogue of volumes (`DATA_DIR/volumes.json`): what was
//! created through the API, so volumes and consistency groups come back
//! after a restart. The journals hold the history; this holds the wiring
//! (group, production volume, mode).
//!
//! A versioned, checksummed JSON document (`tidemark_journal::fs::document`,
//! format `tidemark-volumes`, version 2), replaced crash-safely. Version 1
//! (`{"version": 1, "volumes": [...]}`, no checksum) is still read and is
//! rewritten as version 2 at the next change.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_journal::fs::{document, Fs};

use super::error::{ApiError, ApiResult};

/// The document's format name.
pub const FORMAT: &str = "tidemark-volumes";

/// The version this build writes.
pub const VERSION: u32 = 2;

/// One volume as created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// `primary` (written here) or `replica` (kept here as another site's
    /// replica: no production volume, the journal fed by the primary).
    /// Left out of the file for primaries, so catalogues of before
    /// replication read (and checksum) as they were.
    #[serde(default = "primary", skip_serializing_if = "is_primary")]
    pub role: String,
}

fn primary() -> String {
    "primary".into()
}

fn is_primary(role: &String) -> bool {
    role == "primary"
}

impl VolumeSpec {
    /// True if this site keeps the volume as another site's replica.
    pub fn is_replica(&self) -> bool {
        self.role == "replica"
    }
}

/// Version 1, as written before the catalogue had a checksum.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogV1 {
    version: u32,
    volumes: Vec<VolumeSpec>,
}

/// Loads the catalogue at `path` (empty if there is none yet).
pub fn load(fs: &dyn Fs, path: &Path) -> ApiResult<Vec<VolumeSpec>> {
    if let Ok(bytes) = tidemark_journal::fs::read(fs, path) {
        if let Ok(v1) = serde_json::from_slice::<CatalogV1>(&bytes) {
            if v1.version == 1 {
                return Ok(v1.volumes);
            }
        }
    }
    match document::load::<Vec<VolumeSpec>>(fs, path, FORMAT, 2..=VERSION) {
        Ok(Some((_, volumes))) => Ok(volumes),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(ApiError::Failed(format!(
            "the catalogue of volumes: {e}; it lists what each volume's production volume and group are, \
             so the daemon does not start without it (restore it from a backup, or move it away to start empty \
             — the journals under groups/ keep every volume's history)"
        ))),
    }
}

/// Stores `volumes` at `path` crash-safely (temporary file, fsync, rename,
/// fsync of the directory).
pub fn store(fs: &dyn Fs, path: &Path, volumes: &[VolumeSpec]) -> ApiResult<()> {
    document::store(fs, path, FORMAT, VERSION, &volumes)
        .map_err(|e| ApiError::Failed(format!("cannot store catalogue {}: {e}", path.display())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tidemark_journal::fs::{PowerCut, RealFs, SimFs};

    fn spec(name: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size: 1 << 20,
            group: name.into(),
            backing: PathBuf::from(format!("/v/{name}.img")),
            owns_backing: true,
            mode: "sync".into(),
            role: "primary".into(),
        }
    }

    #[test]
    fn version_1_is_read_and_damage_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumes.json");
        let v1 = serde_json::json!({"version": 1, "volumes": [spec("db")]});
        std::fs::write(&path, serde_json::to_vec(&v1).unwrap()).unwrap();
        assert_eq!(load(&RealFs, &path).unwrap(), vec![spec("db")]);
        store(&RealFs, &path, &[spec("db"), spec("logs")]).unwrap();
        assert_eq!(
            load(&RealFs, &path).unwrap(),
            vec![spec("db"), spec("logs")]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"format\": \"tidemark-volumes\"") && text.contains("\"version\": 2")
        );
        std::fs::write(&path, text.replace("logs.img", "lost.img")).unwrap();
        let err = load(&RealFs, &path).unwrap_err().to_string();
        assert!(
            err.contains("volumes.json") && err.contains("checksum"),
            "{err}"
        );
    }

    #[test]
    fn a_power_cut_while_storing_leaves_the_old_catalogue_or_the_new() {
        for seed in 0..64 {
            let dir = tempfile::tempdir().unwrap();
            let fs = SimFs::new(dir.path());
            let path = Path::new("/volumes.json");
            store(fs.as_ref(), path, &[spec("a")]).unwrap();
            let cut = PowerCut {
                seed,
                keep_data: 0.5,
                keep_entries: 0.5,
            };
            fs.cut_after(1 + seed % 6, cut);
            let _ = store(fs.as_ref(), path, &[spec("a"), spec("b")]);
            fs.cut_power(cut);
            fs.restart();
            let got = load(fs.as_ref(), path).unwrap();
            assert!(
                got == vec![spec("a")] || got == vec![spec("a"), spec("b")],
                "seed {seed}: {got:?}"
            );
        }
    }
}
