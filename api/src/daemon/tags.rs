//! Tags as the API shows them. The model (source, consistency,
//! verification, the point) is `tidemark_tagging::tag`; this is its
//! translation to the wire.

use tidemark_tagging::Tag;

/// The API's view of a tag.
pub fn to_proto(tag: &Tag) -> tidemark_proto::v1::Tag {
    let v = tag.body.verification.clone();
    tidemark_proto::v1::Tag {
        name: tag.name.clone(),
        seq: tag.seq,
        time: tag.time.to_string(),
        source: tag.body.source.as_str(),
        consistency: tag.body.consistency.as_str(),
        verified: tag.body.verified.as_str(),
        note: tag.body.note.clone(),
        id: tag.body.id.clone(),
        verified_at: v.as_ref().map(|v| v.at.clone()).unwrap_or_default(),
        verified_by: v.as_ref().map(|v| v.ran.clone()).unwrap_or_default(),
        verification_detail: v.map(|v| v.detail).unwrap_or_default(),
    }
}
