//! Tags as the daemon describes them. The journal stores a tag as a name,
//! a seq and an opaque body; the body is this JSON, so a rebuilt index
//! keeps source, consistency, verification and note.

use serde::{Deserialize, Serialize};
use tidemark_journal::StoredTag;

/// The tag body stored in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagBody {
    /// `manual`, `schedule`, `log`, `hook`, `anomaly` or `event`.
    pub source: String,
    /// `crash`, `app` or `unknown`.
    pub consistency: String,
    /// `none`, `passed` or `failed`.
    pub verified: String,
    /// Free text.
    #[serde(default)]
    pub note: String,
}

impl TagBody {
    /// A tag set by an operator right after a flush.
    pub fn manual(note: &str) -> Self {
        TagBody {
            source: "manual".into(),
            consistency: "crash".into(),
            verified: "none".into(),
            note: note.into(),
        }
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a stored body; bodies this build cannot read count as
    /// `unknown`.
    pub fn decode(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes).unwrap_or_else(|_| TagBody {
            source: "manual".into(),
            consistency: "unknown".into(),
            verified: "none".into(),
            note: String::new(),
        })
    }
}

/// A tag with its body decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    /// The stored tag.
    pub stored: StoredTag,
    /// Its description.
    pub body: TagBody,
}

impl From<StoredTag> for Tag {
    fn from(stored: StoredTag) -> Self {
        let body = TagBody::decode(&stored.body);
        Tag { stored, body }
    }
}

impl Tag {
    /// The API's view of it.
    pub fn to_proto(&self) -> tidemark_proto::v1::Tag {
        tidemark_proto::v1::Tag {
            name: self.stored.name.clone(),
            seq: self.stored.seq,
            time: self.stored.time.to_string(),
            source: self.body.source.clone(),
            consistency: self.body.consistency.clone(),
            verified: self.body.verified.clone(),
            note: self.body.note.clone(),
        }
    }
}
