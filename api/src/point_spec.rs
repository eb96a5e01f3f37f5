//! Points as users name them (interface.md, "Points"), parsed before any
//! journal is asked.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tidemark_journal::{Seq, Timestamp};

/// A parsed POINT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSpec {
    /// `latest`.
    Latest,
    /// `1234` or `seq:1234`.
    Seq(Seq),
    /// An RFC 3339 moment.
    Time(Timestamp),
    /// `-5m`: that long before now.
    Ago(Duration),
    /// `tag:NAME`.
    Tag(String),
    /// `before:NAME`.
    Before(String),
    /// `last-verified`.
    LastVerified,
}

impl PointSpec {
    /// Parses a POINT, or says what forms are accepted.
    pub fn parse(text: &str) -> Result<PointSpec, String> {
        let text = text.trim();
        let bad = || {
            format!(
                "invalid point {text:?}: use latest, a seq (1234 or seq:1234), an RFC 3339 time, \
                 a relative time (-5m, -2h, -30s), tag:NAME, before:NAME or last-verified"
            )
        };
        if text.is_empty() {
            return Err(bad());
        }
        if text == "latest" {
            return Ok(PointSpec::Latest);
        }
        if text == "last-verified" {
            return Ok(PointSpec::LastVerified);
        }
        if let Some(name) = text.strip_prefix("tag:") {
            return non_empty(name, text).map(PointSpec::Tag);
        }
        if let Some(name) = text.strip_prefix("before:") {
            return non_empty(name, text).map(PointSpec::Before);
        }
        let digits = text.strip_prefix("seq:").unwrap_or(text);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return digits
                .parse()
                .map(PointSpec::Seq)
                .map_err(|_| format!("invalid point {text:?}: seq is too large"));
        }
        if let Some(rel) = text.strip_prefix('-') {
            return parse_duration(rel).map(PointSpec::Ago).ok_or_else(bad);
        }
        DateTime::parse_from_rfc3339(text)
            .map(|at| PointSpec::Time(Timestamp::from_datetime(at.with_timezone(&Utc))))
            .map_err(|_| bad())
    }
}

fn non_empty(name: &str, text: &str) -> Result<String, String> {
    if name.is_empty() {
        Err(format!("invalid point {text:?}: the tag name is missing"))
    } else {
        Ok(name.to_string())
    }
}

/// `5m`, `2h`, `30s`, `1d`, `250ms`, or combinations like `1h30m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !c.is_ascii_digit())?;
        let (digits, tail) = rest.split_at(split);
        let number: u64 = digits.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "w" => Duration::from_secs(7 * 86_400),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(number).ok()?)?)?;
        rest = tail;
    }
    Some(total)
}

impl fmt::Display for PointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::Seq(seq) => write!(f, "seq:{seq}"),
            PointSpec::Time(at) => write!(f, "{at}"),
            PointSpec::Ago(d) => write!(f, "-{}s", d.as_secs_f64()),
            PointSpec::Tag(name) => write!(f, "tag:{name}"),
            PointSpec::Before(name) => write!(f, "before:{name}"),
            PointSpec::LastVerified => f.write_str("last-verified"),
        }
    }
}

impl PointSpec {
    /// The same point as the archive names it (relative times made
    /// absolute now); `last-verified` is known only to a journal.
    pub fn to_archive(&self) -> Result<tidemark_replicator::archive::ArchivePoint, String> {
        use tidemark_replicator::archive::ArchivePoint;
        Ok(match self {
            PointSpec::Latest => ArchivePoint::Latest,
            PointSpec::Seq(seq) => ArchivePoint::Seq(*seq),
            PointSpec::Time(at) => ArchivePoint::Time(*at),
            PointSpec::Ago(ago) => ArchivePoint::Time(Timestamp::from_nanos(
                Timestamp::now()
                    .as_nanos()
                    .saturating_sub(i64::try_from(ago.as_nanos()).unwrap_or(i64::MAX)),
            )),
            PointSpec::Tag(name) => ArchivePoint::Tag(name.clone()),
            PointSpec::Before(name) => ArchivePoint::Before(name.clone()),
            PointSpec::LastVerified => {
                return Err(
                    "last-verified is not known to the archive: name the tag (tag:NAME) instead"
                        .into(),
                )
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_interface_md_parses() {
        assert_eq!(PointSpec::parse("latest"), Ok(PointSpec::Latest));
        assert_eq!(PointSpec::parse("1234"), Ok(PointSpec::Seq(1234)));
        assert_eq!(PointSpec::parse("seq:1234"), Ok(PointSpec::Seq(1234)));
        assert_eq!(
            PointSpec::parse("-5m"),
            Ok(PointSpec::Ago(Duration::from_secs(300)))
        );
        assert_eq!(
            PointSpec::parse("-1h30m"),
            Ok(PointSpec::Ago(Duration::from_secs(5400)))
        );
        assert_eq!(
            PointSpec::parse("tag:nightly"),
            Ok(PointSpec::Tag("nightly".into()))
        );
        assert_eq!(
            PointSpec::parse("before:ransom"),
            Ok(PointSpec::Before("ransom".into()))
        );
        assert_eq!(
            PointSpec::parse("last-verified"),
            Ok(PointSpec::LastVerified)
        );
        let PointSpec::Time(at) = PointSpec::parse("2026-11-21T10:41:07.250Z").unwrap() else {
            panic!("not a time")
        };
        assert_eq!(at.to_string(), "2026-11-21T10:41:07.250Z");
    }

    #[test]
    fn bad_points_name_the_accepted_forms() {
        for bad in [
            "",
            "yesterday",
            "-5x",
            "tag:",
            "seq:",
            "-",
            "2026-13-01T00:00:00Z",
        ] {
            let err = PointSpec::parse(bad).unwrap_err();
            assert!(err.contains("invalid point"), "{bad}: {err}");
        }
    }
}
