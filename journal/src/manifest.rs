//! The manifest: the small, durable description of a consistency group that
//! the segments cannot give back on their own.
//!
//! It holds the volumes, the horizon (the seq the base images stand at), the
//! fencing epoch, the retention holds and the gaps that forced retention
//! left. It is rewritten whole on every change, atomically: written to
//! `MANIFEST.partial`, fsynced, renamed over `MANIFEST`, directory fsynced
//! ([`crate::fs::write_atomically`]).
//! The RocksDB index mirrors horizon and epoch, but this file is the truth,
//! which is what lets the index be deleted and rebuilt from segments alone.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fs::Fs;
use crate::point::{Seq, Timestamp};
use crate::record::le_u32;
use crate::volume::{VolumeId, VolumeInfo};

/// The first bytes of the manifest file.
pub const MANIFEST_MAGIC: [u8; 8] = *b"TDMKMAN\0";

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

const MANIFEST_HEADER_LEN: usize = 20;

/// File name of the manifest within the journal directory.
pub const MANIFEST_FILE: &str = "MANIFEST";

/// A window of history that retention was forced to drop although a
/// consumer (a replica, the archive) still needed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    /// The hold that was passed.
    pub hold: String,
    /// Where the hold stood: its consumer had everything up to here.
    pub hold_seq: Seq,
    /// The horizon retention moved to; the consumer lacks `hold_seq+1..=horizon_seq`.
    pub horizon_seq: Seq,
    /// When it happened, nanoseconds since the epoch.
    pub at_ns: i64,
}

/// A retention fold in progress: the base images may already hold records
/// up to `seq`, so a restart must finish the fold before serving reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldIntent {
    /// The horizon being moved to.
    pub seq: Seq,
}

/// The durable state of one consistency group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Random id written into every segment header, so a segment from
    /// another group is never mixed in.
    pub group_id: u64,
    /// The group's name.
    pub group: String,
    /// When the group was created (the time of seq 0).
    pub created_ns: i64,
    /// The seq the base images stand at.
    pub horizon_seq: Seq,
    /// The time of the horizon record.
    pub horizon_ns: i64,
    /// A fold that had started when the manifest was last written.
    pub folding_to: Option<FoldIntent>,
    /// The fencing epoch appends are written under.
    pub epoch: u64,
    /// The id the next volume gets; ids are never reused.
    pub next_volume_id: VolumeId,
    /// The group's volumes.
    pub volumes: Vec<VolumeInfo>,
    /// Retention holds: consumer name → the newest seq it has taken.
    pub holds: BTreeMap<String, Seq>,
    /// Windows that forced retention dropped past a hold.
    pub gaps: Vec<Gap>,
    /// A rebase in progress: the base images are being replaced by another
    /// site's state at this horizon; until it finishes no point is real.
    #[serde(default)]
    pub rebasing: Option<Rebasing>,
    /// The journal this one replicates (its group id); 0 for none.
    #[serde(default)]
    pub source_id: u64,
    /// Where each epoch began: (epoch, first seq written under it), in
    /// order. Two sites find their highest common point from these.
    #[serde(default)]
    pub epochs: Vec<EpochStart>,
    /// Holds retention may pass without being forced, recording a gap: a
    /// consumer that fell too far behind (a replica past its lag limit).
    #[serde(default)]
    pub expendable: std::collections::BTreeSet<String>,
    /// The highest epoch another site was seen writing this group under
    /// (a primary's hello, a fence, the witness) when above `epoch`: a
    /// takeover here goes above it, even if no record of it arrived.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seen_epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A rebase in progress (see `Manifest::rebasing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rebasing {
    /// The new horizon.
    pub seq: Seq,
    /// Its time, nanoseconds since the epoch.
    pub ns: i64,
}

/// The first seq of an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: u64,
    /// The first seq written under it.
    pub first_seq: Seq,
}

impl Manifest {
    /// A manifest for a new, empty group.
    pub fn new(group: &str, group_id: u64, created: Timestamp) -> Self {
        Manifest {
            group_id,
            group: group.to_string(),
            created_ns: created.as_nanos(),
            horizon_seq: 0,
            horizon_ns: created.as_nanos(),
            folding_to: None,
            epoch: 0,
            next_volume_id: 1,
            volumes: Vec::new(),
            holds: BTreeMap::new(),
            gaps: Vec::new(),
            rebasing: None,
            source_id: 0,
            epochs: Vec::new(),
            expendable: std::collections::BTreeSet::new(),
            seen_epoch: 0,
        }
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeInfo> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// The volume with id `id`.
    pub fn volume_by_id(&self, id: VolumeId) -> Option<&VolumeInfo> {
        self.volumes.iter().find(|v| v.id == id)
    }

    /// Reads the manifest in `dir`; `None` when there is none yet.
    ///
    /// Format: `{ [u8;8] magic "TDMKMAN\0" | u32 version | u32 json_len |
    ///            u32 crc32c(json) }` then `json_len` bytes of JSON.
    pub fn load(fs: &dyn Fs, dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match crate::fs::read(fs, &path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read manifest", &path, e)),
        };
        let bad = |offset: u64, reason: String| Error::corruption(&path, offset, reason);
        if bytes.len() < MANIFEST_HEADER_LEN || bytes[0..8] != MANIFEST_MAGIC {
            return Err(bad(
                0,
                "not a tidemark manifest (bad magic or too short)".into(),
            ));
        }
        let version = le_u32(&bytes, 8);
        if version != MANIFEST_VERSION {
            return Err(bad(
                8,
                format!("manifest version {version}; this build reads version {MANIFEST_VERSION}"),
            ));
        }
        let len = le_u32(&bytes, 12) as usize;
        let body = bytes
            .get(MANIFEST_HEADER_LEN..MANIFEST_HEADER_LEN + len)
            .ok_or_else(|| {
                bad(
                    12,
                    format!("manifest claims {len} bytes of JSON, file is shorter"),
                )
            })?;
        if crc32c::crc32c(body) != le_u32(&bytes, 16) {
            return Err(bad(16, "manifest fails its CRC".into()));
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| bad(MANIFEST_HEADER_LEN as u64, format!("manifest JSON: {e}")))
    }

    /// Writes the manifest durably and atomically into `dir`.
    pub fn store(&self, fs: &dyn Fs, dir: &Path) -> Result<()> {
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("manifest does not serialise: {e}")))?;
        let mut bytes = Vec::with_capacity(MANIFEST_HEADER_LEN + body.len());
        bytes.extend_from_slice(&MANIFEST_MAGIC);
        bytes.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let path = dir.join(MANIFEST_FILE);
        crate::fs::write_atomically(fs, &path, &bytes)
            .map_err(|e| Error::io("store manifest", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_roundtrip_and_damage_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = crate::fs::RealFs;
        assert_eq!(Manifest::load(&fs, dir.path()).expect("load"), None);
        let mut m = Manifest::new("g", 77, Timestamp::from_nanos(10));
        m.volumes.push(VolumeInfo {
            id: 1,
            name: "db".into(),
            size: 1 << 20,
        });
        m.holds.insert("replica".into(), 5);
        m.store(&fs, dir.path()).expect("store");
        assert_eq!(Manifest::load(&fs, dir.path()).expect("load"), Some(m));

        let path = dir.path().join(MANIFEST_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        std::fs::write(&path, &bytes).expect("write");
        let err = Manifest::load(&fs, dir.path()).expect_err("damage found");
        assert!(err.to_string().contains("MANIFEST"), "{err}");
    }
}
