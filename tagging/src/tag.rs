//! The tag model: what a tag says about the point it names.
//!
//! The journal stores a tag as a name, the seq of the mark record that set
//! it, and an opaque body; the body is [`TagBody`] as JSON, so a rebuilt
//! index keeps everything here. A tag set later for an earlier point (a
//! missed schedule slot, an anomaly found after the fact, a verification
//! result written back) carries that point in `point`.

use serde::{Deserialize, Serialize};
use tidemark_journal::{Seq, StoredTag, Timestamp};

/// Where a tag came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// An operator or the API.
    Manual,
    /// A time policy.
    Schedule,
    /// A log rule.
    Log,
    /// An app-consistent hook (freeze, tag, thaw).
    Hook,
    /// Anomaly detection.
    Anomaly,
    /// A system event.
    Event,
}

/// What state the point holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Right after a flush: what a filesystem finds after a power cut.
    Crash,
    /// The application was frozen: its own consistent state.
    App,
    /// Not known (a point between flushes).
    Unknown,
}

/// Whether the point was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verified {
    /// Never checked.
    None,
    /// The check passed.
    Passed,
    /// The check failed.
    Failed,
}

/// The last check of a point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// When it ran (RFC 3339).
    pub at: String,
    /// What ran.
    pub ran: String,
    /// Its last lines of output, or why it could not run.
    pub detail: String,
}

/// The tag body stored in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagBody {
    /// Stable identity, kept when the tag is rewritten.
    #[serde(default)]
    pub id: String,
    /// Where it came from.
    pub source: Source,
    /// What state it marks.
    pub consistency: Consistency,
    /// Whether it was checked.
    pub verified: Verified,
    /// Free text.
    #[serde(default)]
    pub note: String,
    /// The point, when it is not the seq of the mark record itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<Seq>,
    /// The time of `point`, in nanoseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_ns: Option<i64>,
    /// The policy or rule that made it (for a policy's retention count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The last verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

impl TagBody {
    /// A new tag body with a fresh id.
    pub fn new(source: Source, consistency: Consistency, note: &str) -> Self {
        TagBody {
            id: fresh_id(),
            source,
            consistency,
            verified: Verified::None,
            note: note.to_string(),
            point: None,
            point_ns: None,
            origin: None,
            verification: None,
        }
    }

    /// Names the policy or rule that made it.
    pub fn from_origin(mut self, origin: &str) -> Self {
        self.origin = Some(origin.to_string());
        self
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a stored body; one this build cannot read counts as a
    /// manual tag of unknown consistency.
    pub fn decode(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| TagBody::new(Source::Manual, Consistency::Unknown, ""))
    }
}

fn fresh_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}{:04x}",
        Timestamp::now().as_nanos(),
        (n ^ u64::from(std::process::id())) & 0xffff
    )
}

/// A tag with its body decoded and its point worked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Its name, unique per volume.
    pub name: String,
    /// The point it names.
    pub seq: Seq,
    /// When that point was written.
    pub time: Timestamp,
    /// The seq of the mark record that holds it now.
    pub mark_seq: Seq,
    /// What the tag says.
    pub body: TagBody,
}

impl From<StoredTag> for Tag {
    fn from(stored: StoredTag) -> Self {
        let body = TagBody::decode(&stored.body);
        Tag {
            name: stored.name,
            seq: body.point.unwrap_or(stored.seq),
            time: body.point_ns.map_or(stored.time, Timestamp::from_nanos),
            mark_seq: stored.seq,
            body,
        }
    }
}

fn lower<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl Source {
    /// `manual`, `schedule`, …
    pub fn as_str(&self) -> String {
        lower(self)
    }
}

impl Consistency {
    /// `crash`, `app` or `unknown`.
    pub fn as_str(&self) -> String {
        lower(self)
    }
}

impl Verified {
    /// `none`, `passed` or `failed`.
    pub fn as_str(&self) -> String {
        lower(self)
    }
}

/// A tag name from a prefix and a moment: `policy:nightly-2026-11-21T22:00Z`.
pub fn timed_name(prefix: &str, at: chrono::DateTime<chrono::Utc>, seconds: bool) -> String {
    if seconds {
        format!("{prefix}-{}", at.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
    } else {
        format!("{prefix}-{}", at.format("%Y-%m-%dT%H:%MZ"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_and_old_bodies_still_read() {
        let mut body = TagBody::new(Source::Anomaly, Consistency::Crash, "entropy burst");
        body.point = Some(41);
        body.point_ns = Some(7);
        let stored = StoredTag {
            name: "anomaly:x".into(),
            seq: 50,
            time: Timestamp::from_nanos(9),
            body: body.encode(),
        };
        let tag = Tag::from(stored);
        assert_eq!((tag.seq, tag.mark_seq, tag.time.as_nanos()), (41, 50, 7));
        assert_eq!(tag.body, body);
        let old = br#"{"source":"manual","consistency":"crash","verified":"none","note":"n"}"#;
        let body = TagBody::decode(old);
        assert_eq!(body.source, Source::Manual);
        assert_eq!(body.note, "n");
        assert_eq!(Source::Schedule.as_str(), "schedule");
        assert_eq!(Verified::Passed.as_str(), "passed");
    }

    #[test]
    fn timed_names_say_where_they_came_from() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-21T22:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            timed_name("policy:nightly", at, false),
            "policy:nightly-2026-11-21T22:00Z"
        );
        assert_eq!(
            timed_name("log:pg-checkpoint", at, true),
            "log:pg-checkpoint-2026-11-21T22:00:00.000Z"
        );
    }
}
