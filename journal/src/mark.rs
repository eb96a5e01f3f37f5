//! Bodies of `mark` records: tags and timeline events.
//!
//! Tags live in the index, but the index must be rebuildable from segments
//! alone, so setting or deleting a tag is itself a record in the journal.
//! The mark body says which.

/// A decoded mark body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark<'a> {
    /// Sets tag `name` at this record's seq; `body` is the tagging layer's.
    TagSet {
        /// The tag name, unique per volume.
        name: &'a str,
        /// Opaque to the journal.
        body: &'a [u8],
    },
    /// Deletes tag `name`.
    TagDelete {
        /// The tag name.
        name: &'a str,
    },
    /// A timeline event (a mode switch, a resync window, a rollback).
    Event {
        /// What kind of event, e.g. `mode-switch`.
        name: &'a str,
        /// Its details, opaque to the journal.
        body: &'a [u8],
    },
}

const TAG_SET: u8 = 1;
const TAG_DELETE: u8 = 2;
const EVENT: u8 = 3;

impl<'a> Mark<'a> {
    /// Encodes the mark.
    ///
    /// Format: `{ u8 type (1 tag set, 2 tag delete, 3 event) | u16 name_len |
    ///            name (UTF-8) | body }`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, name, body): (u8, &str, &[u8]) = match self {
            Mark::TagSet { name, body } => (TAG_SET, name, body),
            Mark::TagDelete { name } => (TAG_DELETE, name, &[]),
            Mark::Event { name, body } => (EVENT, name, body),
        };
        let mut out = Vec::with_capacity(3 + name.len() + body.len());
        out.push(kind);
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Decodes a mark body; `None` for bodies this build does not know,
    /// which are kept on the timeline but otherwise ignored.
    pub fn decode(bytes: &'a [u8]) -> Option<Self> {
        let (&kind, rest) = bytes.split_first()?;
        let len = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
        let name = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        let body = &rest[2 + len..];
        match kind {
            TAG_SET => Some(Mark::TagSet { name, body }),
            TAG_DELETE => Some(Mark::TagDelete { name }),
            EVENT => Some(Mark::Event { name, body }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_roundtrip_and_garbage_is_none() {
        for mark in [
            Mark::TagSet {
                name: "nightly",
                body: b"{}",
            },
            Mark::TagDelete { name: "x" },
            Mark::Event {
                name: "mode-switch",
                body: b"sync->async",
            },
        ] {
            assert_eq!(Mark::decode(&mark.encode()), Some(mark));
        }
        assert_eq!(Mark::decode(&[]), None);
        assert_eq!(Mark::decode(&[1, 200, 0, b'a']), None);
        assert_eq!(Mark::decode(&[9, 0, 0]), None);
    }
}
