//! Reading an archive: the newest index of a group, the points inside its
//! window, and the chain a point needs — the newest base version at or
//! before it and a contiguous run of segment objects from there (as
//! Litestream restores: snapshot, then a chain whose contiguity is checked).
//! Every object fetched is verified before it is used.

use std::sync::Arc;

use bytes::Bytes;
use tidemark_journal::record::decode_record;
use tidemark_journal::Timestamp;

use super::error::{ArchiveError, Result};
use super::index::{
    BaseEntry, BaseManifest, GroupIndex, SegmentEntry, VolumeEntry, BASE_FORMAT, INDEX_FORMAT,
};
use super::layout::{self, SegmentHeader};
use super::store::ObjectStore;

/// A point in the archive, as a caller names it (relative times already
/// made absolute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchivePoint {
    /// The newest archived record.
    Latest,
    /// Just after the record with this seq.
    Seq(u64),
    /// The newest record at or before this moment.
    Time(Timestamp),
    /// Where tag NAME was set.
    Tag(String),
    /// The newest point strictly before tag NAME.
    Before(String),
}

/// What restoring one point needs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The point.
    pub seq: u64,
    /// The base version to start from.
    pub base: BaseEntry,
    /// Segment objects to apply over it, in order.
    pub segments: Vec<SegmentEntry>,
}

/// One group's archive, as its newest index describes it.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<dyn ObjectStore>,
    /// The index.
    pub index: GroupIndex,
}

/// Every group in the archive with the epoch of its newest index.
pub async fn groups(store: &dyn ObjectStore) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    // One listing per group of its index keys, never of all its chunks.
    for group in store.list_dirs("groups/").await? {
        let prefix = format!("{}index.e", layout::group_prefix(&group));
        let newest = store
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|o| layout::parse_index_key(&o.key))
            .map(|(_, epoch)| epoch)
            .max();
        if let Some(epoch) = newest {
            out.push((group, epoch));
        }
    }
    Ok(out)
}

impl Catalog {
    /// The newest index of `group`, or None when the archive has none.
    pub async fn load(store: Arc<dyn ObjectStore>, group: &str) -> Result<Option<Catalog>> {
        let prefix = layout::group_prefix(group);
        let newest = store
            .list(&format!("{prefix}index.e"))
            .await?
            .iter()
            .filter_map(|o| layout::parse_index_key(&o.key))
            .filter(|(g, _)| g == group)
            .map(|(_, epoch)| epoch)
            .max();
        let Some(epoch) = newest else {
            return Ok(None);
        };
        let key = layout::index_key(group, epoch);
        let bytes = store.get(&key).await?;
        let index = layout::decode_document(INDEX_FORMAT, &key, &bytes)
            .map_err(|e| locate(e, store.as_ref()))?;
        Ok(Some(Catalog { store, index }))
    }

    /// The group whose archive holds volume `volume`.
    pub async fn for_volume(store: Arc<dyn ObjectStore>, volume: &str) -> Result<Catalog> {
        let mut seen = Vec::new();
        for (group, _) in groups(store.as_ref()).await? {
            if let Some(catalog) = Catalog::load(store.clone(), &group).await? {
                if catalog.index.volume(volume).is_some() {
                    return Ok(catalog);
                }
                seen.extend(catalog.index.volumes.iter().map(|v| v.name.clone()));
            }
        }
        Err(ArchiveError::Invalid(format!(
            "archive {} holds no volume named {volume:?} (it holds: {})",
            store.location(),
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        )))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Result<&VolumeEntry> {
        self.index.volume(name).ok_or_else(|| {
            ArchiveError::Invalid(format!(
                "archive {} group {}: no volume named {name:?}",
                self.store.location(),
                self.index.group
            ))
        })
    }

    /// The window of points the archive can restore: the oldest base
    /// version's seq to the newest archived seq, with their times.
    pub fn window(&self) -> Option<(u64, i64, u64, i64)> {
        let first = self.index.bases.first()?;
        Some((
            first.seq,
            first.time_ns,
            self.index.archived_seq,
            self.index.archived_ns,
        ))
    }

    fn window_text(&self) -> String {
        match self.window() {
            Some((a, at, b, bt)) => format!(
                "seq {a}..={b} ({} to {})",
                Timestamp::from_nanos(at),
                Timestamp::from_nanos(bt)
            ),
            None => "nothing yet".to_string(),
        }
    }

    fn outside(&self, volume: &str, point: &str) -> ArchiveError {
        ArchiveError::Invalid(format!(
            "volume {volume}: point {point} is outside the archive window of {}: {}",
            self.store.location(),
            self.window_text()
        ))
    }

    /// Resolves `point` of volume `volume` to a seq inside the window.
    pub async fn resolve(&self, volume: &str, point: &ArchivePoint) -> Result<u64> {
        let entry = self.volume(volume)?;
        let Some((first, first_ns, last, _)) = self.window() else {
            return Err(self.outside(volume, "any"));
        };
        let tag = |name: &str| {
            self.index
                .tags
                .iter()
                .find(|t| t.volume == entry.id && t.name == name)
                .ok_or_else(|| {
                    let names: Vec<_> = self
                        .index
                        .tags
                        .iter()
                        .filter(|t| t.volume == entry.id)
                        .map(|t| t.name.as_str())
                        .collect();
                    ArchiveError::Invalid(format!(
                        "volume {volume}: the archive {} holds no tag named {name:?} (tags there: {})",
                        self.store.location(),
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    ))
                })
        };
        let (seq, text) = match point {
            ArchivePoint::Latest => (last, "latest".to_string()),
            ArchivePoint::Seq(seq) => (*seq, format!("seq {seq}")),
            ArchivePoint::Tag(name) => (tag(name)?.seq, format!("tag:{name}")),
            ArchivePoint::Before(name) => (tag(name)?.seq - 1, format!("before:{name}")),
            ArchivePoint::Time(at) => {
                let text = at.to_string();
                if at.as_nanos() < first_ns {
                    return Err(self.outside(volume, &text));
                }
                (self.seq_at_time(*at).await?.max(first), text)
            }
        };
        if seq < first || seq > last {
            return Err(self.outside(volume, &text));
        }
        if let Some(gap) = self
            .index
            .gaps
            .iter()
            .find(|g| g.after_seq < seq && seq < g.to_seq)
        {
            return Err(ArchiveError::Invalid(format!(
                "volume {volume}: point {text} (seq {seq}) lies in a gap of the archive {}: \
                 records {}..={} were never archived",
                self.store.location(),
                gap.after_seq + 1,
                gap.to_seq
            )));
        }
        Ok(seq)
    }

    /// The newest archived seq whose record was written at or before `at`.
    async fn seq_at_time(&self, at: Timestamp) -> Result<u64> {
        let at = at.as_nanos();
        let mut best = self
            .index
            .bases
            .iter()
            .filter(|b| b.time_ns <= at)
            .map(|b| b.seq)
            .max()
            .unwrap_or(0);
        let Some(segment) = self.index.segments.iter().rev().find(|s| s.first_ns <= at) else {
            return Ok(best);
        };
        if segment.last_ns <= at {
            return Ok(best.max(segment.last_seq));
        }
        let bytes = self.segment(segment).await?;
        let (_, body) = self.decode_segment(segment, &bytes)?;
        for record in records(&segment.key, body) {
            let (header, _) = record?;
            if header.timestamp.as_nanos() > at {
                break;
            }
            best = best.max(header.seq);
        }
        Ok(best)
    }

    /// The base version and segments seq `seq` needs, checked contiguous.
    pub fn plan(&self, seq: u64) -> Result<Plan> {
        let base = self
            .index
            .bases
            .iter()
            .rev()
            .find(|b| b.seq <= seq)
            .ok_or_else(|| {
                ArchiveError::Invalid(format!(
                    "seq {seq} is older than every base version in the archive {}",
                    self.store.location()
                ))
            })?
            .clone();
        let mut segments = Vec::new();
        let mut at = base.seq;
        for entry in &self.index.segments {
            if at >= seq {
                break;
            }
            if entry.last_seq <= at {
                continue;
            }
            // An object that begins after what the chain holds must begin
            // right after it (one that straddles the base is fine: its
            // records up to the base are skipped).
            if entry.first_seq > at && entry.prev_seq != at {
                return Err(self.broken(at, entry));
            }
            at = entry.last_seq;
            segments.push(entry.clone());
        }
        if at < seq {
            return Err(ArchiveError::Invalid(format!(
                "the archive {} has records only up to seq {at} after base version {}, \
                 seq {seq} was asked for",
                self.store.location(),
                base.seq
            )));
        }
        Ok(Plan {
            seq,
            base,
            segments,
        })
    }

    fn broken(&self, at: u64, entry: &SegmentEntry) -> ArchiveError {
        ArchiveError::Corrupt {
            location: self.store.location(),
            key: entry.key.clone(),
            reason: format!(
                "the chain of segments is broken: it follows seq {}, the chain stands at seq {at}",
                entry.prev_seq
            ),
        }
    }

    /// The manifest of base version `base`, verified.
    pub async fn base_manifest(&self, base: &BaseEntry) -> Result<BaseManifest> {
        let bytes = self.store.get(&base.key).await?;
        layout::decode_document(BASE_FORMAT, &base.key, &bytes)
            .map_err(|e| locate(e, self.store.as_ref()))
    }

    /// Segment object `entry`, fetched (verify with [`Catalog::decode_segment`]).
    pub async fn segment(&self, entry: &SegmentEntry) -> Result<Bytes> {
        self.store.get(&entry.key).await
    }

    /// Verifies a fetched segment object against its index entry.
    pub fn decode_segment<'a>(
        &self,
        entry: &SegmentEntry,
        bytes: &'a [u8],
    ) -> Result<(SegmentHeader, &'a [u8])> {
        let (header, body) = layout::decode_segment(&entry.key, bytes)
            .map_err(|e| locate(e, self.store.as_ref()))?;
        if header.first_seq != entry.first_seq
            || header.last_seq != entry.last_seq
            || header.prev_seq != entry.prev_seq
            || header.epoch != entry.epoch
        {
            return Err(ArchiveError::Corrupt {
                location: self.store.location(),
                key: entry.key.clone(),
                reason: "its header does not match the index".into(),
            });
        }
        Ok((header, body))
    }

    /// Chunk `hash` of the group, fetched and verified.
    pub async fn chunk(&self, hash: &str) -> Result<Bytes> {
        let key = layout::chunk_key(&self.index.group, hash);
        let bytes = self.store.get(&key).await?;
        // Checksums and hashing off the runtime's few threads, which keep
        // the other downloads moving meanwhile.
        let hash = hash.to_string();
        let checked = tokio::task::spawn_blocking(move || layout::decode_chunk(&key, &hash, bytes))
            .await
            .map_err(|e| ArchiveError::Invalid(format!("archive task failed: {e}")))?;
        checked.map_err(|e| locate(e, self.store.as_ref()))
    }
}

/// Fills in the archive's location of an error from the codecs.
pub(crate) fn locate(e: ArchiveError, store: &dyn ObjectStore) -> ArchiveError {
    match e {
        ArchiveError::Corrupt { key, reason, .. } => ArchiveError::Corrupt {
            location: store.location(),
            key,
            reason,
        },
        other => other,
    }
}

/// The records of a segment object's body, each decoded and verified.
pub fn records<'a>(
    key: &'a str,
    body: &'a [u8],
) -> impl Iterator<Item = Result<(tidemark_journal::record::RecordHeader, &'a [u8])>> + 'a {
    let mut at = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= body.len() {
            return None;
        }
        match decode_record(&body[at..], std::path::Path::new(key), at as u64) {
            Ok((header, payload)) => {
                at += header.encoded_len();
                Some(Ok((header, payload)))
            }
            Err(e) => {
                failed = true;
                Some(Err(ArchiveError::Corrupt {
                    location: String::new(),
                    key: key.to_string(),
                    reason: e.to_string(),
                }))
            }
        }
    })
}
