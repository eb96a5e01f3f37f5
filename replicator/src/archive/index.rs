//! The documents that say what a group's archive holds: the index (one per
//! epoch) and the base versions' manifests.

use serde::{Deserialize, Serialize};

/// `format` of an index document.
pub const INDEX_FORMAT: &str = "tidemark-archive-index";
/// `format` of a base version's manifest.
pub const BASE_FORMAT: &str = "tidemark-archive-base";

/// A volume of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// Its id in the group's journal.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Where an epoch began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEntry {
    /// The epoch.
    pub epoch: u64,
    /// The first seq written under it.
    pub first_seq: u64,
}

/// One segment object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Its key.
    pub key: String,
    /// The epoch of its records.
    pub epoch: u64,
    /// The seq before its first record.
    pub prev_seq: u64,
    /// Its first record's seq.
    pub first_seq: u64,
    /// Its last record's seq.
    pub last_seq: u64,
    /// Its first record's time, ns.
    pub first_ns: i64,
    /// Its last record's time, ns.
    pub last_ns: i64,
    /// Object size.
    pub bytes: u64,
    /// Bytes of the record map at the object's end (0: none, an object
    /// written before maps were).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub map_len: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One base version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseEntry {
    /// Its manifest's key.
    pub key: String,
    /// The seq the base images stand at.
    pub seq: u64,
    /// The time of that seq, ns.
    pub time_ns: i64,
    /// Bytes of chunks this version uploaded that no earlier one had.
    pub new_bytes: u64,
}

/// A tag, as the archive knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    /// The volume's id.
    pub volume: u32,
    /// The tag's name.
    pub name: String,
    /// The mark record's seq: the point the tag names.
    pub seq: u64,
    /// Its time, ns.
    pub time_ns: i64,
}

/// History the archive lacks: records `after_seq+1 ..= to_seq` were
/// retained away locally before they could be uploaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapEntry {
    /// The newest seq archived before the gap.
    pub after_seq: u64,
    /// The seq the archive resumed at (a base version).
    pub to_seq: u64,
    /// When the gap was found, ns.
    pub at_ns: i64,
}

/// A group's index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupIndex {
    /// The group's name.
    pub group: String,
    /// Its journal's id on the site that wrote this index.
    pub group_id: u64,
    /// The epoch of the writer.
    pub epoch: u64,
    /// The writer's epoch history.
    pub epochs: Vec<EpochEntry>,
    /// The group's volumes.
    pub volumes: Vec<VolumeEntry>,
    /// Every record up to this seq is in the archive (from the oldest base
    /// version on, gaps aside).
    pub archived_seq: u64,
    /// The time of `archived_seq`, ns.
    pub archived_ns: i64,
    /// Segment objects in seq order.
    pub segments: Vec<SegmentEntry>,
    /// Base versions in seq order.
    pub bases: Vec<BaseEntry>,
    /// Tags set at or after the oldest base version and not deleted.
    pub tags: Vec<TagEntry>,
    /// Windows the archive lacks.
    pub gaps: Vec<GapEntry>,
    /// When this index was written, ns.
    pub updated_ns: i64,
}

impl GroupIndex {
    /// Total bytes of the objects this index lists (chunks counted once).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum::<u64>()
            + self.bases.iter().map(|b| b.new_bytes).sum::<u64>()
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// A volume in a base version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseVolume {
    /// Its id.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its chunks in order: the BLAKE3 name, or `null` for all zeros.
    pub chunks: Vec<Option<String>>,
}

/// A base version's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseManifest {
    /// The group.
    pub group: String,
    /// The seq the images stand at.
    pub seq: u64,
    /// Its time, ns.
    pub time_ns: i64,
    /// The epoch of the writer.
    pub epoch: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The volumes.
    pub volumes: Vec<BaseVolume>,
}
