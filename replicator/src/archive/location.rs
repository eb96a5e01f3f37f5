//! Where an archive lives: `s3://BUCKET/PREFIX` on any S3-compatible
//! store, or `file:///DIR` on a local (or mounted) filesystem.

use std::fmt;
use std::path::PathBuf;

use super::error::{ArchiveError, Result};

/// A parsed archive URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A bucket and a key prefix (empty, or ending in `/`).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix every key starts with.
        prefix: String,
    },
    /// A directory.
    File(PathBuf),
}

impl Location {
    /// Parses `s3://bucket[/prefix]` or `file:///dir`.
    pub fn parse(url: &str) -> Result<Location> {
        let bad = |why: &str| {
            ArchiveError::Invalid(format!(
                "archive URL {url:?} {why}: expected s3://BUCKET/PREFIX or file:///DIR"
            ))
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // Bucket names: 3-63 of lowercase letters, digits, dots, dashes.
            let valid = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
            if !valid {
                return Err(bad("has no valid bucket name"));
            }
            let prefix = prefix.trim_matches('/');
            let prefix = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            };
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("names a relative directory"));
            }
            return Ok(Location::File(PathBuf::from(path)));
        }
        Err(bad("has an unknown scheme"))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::S3 { bucket, prefix } => {
                write!(f, "s3://{bucket}/{}", prefix.trim_end_matches('/'))
            }
            Location::File(path) => write!(f, "file://{}", path.display()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            Location::parse("s3://my-bucket/a/b/").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b/".into()
            }
        );
        assert_eq!(
            Location::parse("s3://my-bucket").unwrap().to_string(),
            "s3://my-bucket/"
        );
        assert_eq!(
            Location::parse("file:///srv/archive").unwrap(),
            Location::File("/srv/archive".into())
        );
        for bad in ["http://x/y", "s3://", "s3://UPPER/x", "file://rel/dir"] {
            let e = Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
