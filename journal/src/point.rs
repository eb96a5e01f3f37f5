//! Sequence numbers, timestamps and points in time.
//!
//! A consistency group has one sequence: every record gets the next `Seq`,
//! and the state of every volume in the group "at seq S" is what all records
//! with seq ≤ S made of it. Timestamps are assigned with the seq and are
//! strictly increasing too, so a moment in time maps to exactly one seq.

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};

/// A record's position in its consistency group's write order. Seq 0 is the
/// empty journal: no record ever has it.
pub type Seq = u64;

/// A UTC moment with nanosecond resolution, as stored in records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `nanos` nanoseconds after the Unix epoch.
    pub const fn from_nanos(nanos: i64) -> Self {
        Timestamp(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// The current time of the system clock.
    pub fn now() -> Self {
        Self::from_datetime(Utc::now())
    }

    /// Converts from chrono. Dates beyond the year 2262 saturate.
    pub fn from_datetime(at: DateTime<Utc>) -> Self {
        Timestamp(at.timestamp_nanos_opt().unwrap_or(i64::MAX))
    }

    /// Converts to chrono.
    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_nanos(self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            self.to_datetime()
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        )
    }
}

/// A point in the history of a consistency group, as a caller names it.
/// Names that need more than the journal knows (tags, relative times) are
/// resolved to one of these by the layers above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// The newest durable record.
    Latest,
    /// Just after the record with this seq.
    Seq(Seq),
    /// The newest record at or before this moment.
    Time(Timestamp),
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Point::Latest => f.write_str("latest"),
            Point::Seq(seq) => write!(f, "seq {seq}"),
            Point::Time(at) => write!(f, "{at}"),
        }
    }
}

/// The range of history a journal can read: from the horizon (the base
/// image) to the newest durable record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    /// The oldest readable point: the state held by the base image.
    pub horizon_seq: Seq,
    /// When the horizon record was written (the group's creation for an
    /// untouched base image).
    pub horizon_time: Timestamp,
    /// The newest durable record.
    pub newest_seq: Seq,
    /// When the newest record was written.
    pub newest_time: Timestamp,
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq {}..={} ({} to {})",
            self.horizon_seq, self.newest_seq, self.horizon_time, self.newest_time
        )
    }
}
