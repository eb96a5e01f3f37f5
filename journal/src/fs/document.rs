//! Small JSON documents kept on disk (the daemon's catalogue, the tagger's
//! schedule state): readable by people, and still versioned and
//! checksummed like every other file tidemark writes, and replaced
//! crash-safely with [`super::write_atomically`].
//!
//! Format: `{ "format": NAME, "version": N, "crc32c": C, "content": ... }`
//! where `C` is the CRC32C of `content` serialised compactly (serde_json,
//! fields in declaration order), so reformatting the file by hand keeps it
//! valid and changing a value does not.

use std::io;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Fs;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    format: String,
    version: u32,
    crc32c: u32,
    content: T,
}

/// Why a document could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bytes are not the document they should be.
    #[error("{path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn crc_of<T: Serialize>(content: &T) -> Result<u32, serde_json::Error> {
    Ok(crc32c::crc32c(&serde_json::to_vec(content)?))
}

/// Writes `content` as document `format`, version `version`, to `path`,
/// crash-safely.
pub fn store<T: Serialize>(
    fs: &dyn Fs,
    path: &Path,
    format: &str,
    version: u32,
    content: &T,
) -> io::Result<()> {
    super::write_atomically(fs, path, &encode(format, version, content)?)
}

/// Like [`store`], for a document only its owner may read (it holds
/// secrets): the file is mode 0600 from the moment it exists.
pub fn store_private<T: Serialize>(
    fs: &dyn Fs,
    path: &Path,
    format: &str,
    version: u32,
    content: &T,
) -> io::Result<()> {
    super::write_atomically_private(fs, path, &encode(format, version, content)?)
}

/// `content` in its envelope, as the bytes of the file.
fn encode<T: Serialize>(format: &str, version: u32, content: &T) -> io::Result<Vec<u8>> {
    let envelope = Envelope {
        format: format.to_string(),
        version,
        crc32c: crc_of(content).map_err(io::Error::other)?,
        content,
    };
    let mut bytes = serde_json::to_vec_pretty(&envelope).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Reads document `format` from `path`: `None` if there is no file, its
/// version and content otherwise. A version outside `versions` is refused,
/// as is a document whose checksum does not match.
pub fn load<T: Serialize + DeserializeOwned>(
    fs: &dyn Fs,
    path: &Path,
    format: &str,
    versions: std::ops::RangeInclusive<u32>,
) -> Result<Option<(u32, T)>, DocumentError> {
    let shown = path.display().to_string();
    let bytes = match super::read(fs, path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DocumentError::Io {
                path: shown,
                source,
            })
        }
    };
    let damaged = |reason: String| DocumentError::Damaged {
        path: shown.clone(),
        reason,
    };
    let envelope: Envelope<T> = serde_json::from_slice(&bytes)
        .map_err(|e| damaged(format!("not a {format} document: {e}")))?;
    if envelope.format != format {
        return Err(damaged(format!(
            "it holds {:?}, not {format:?}",
            envelope.format
        )));
    }
    if !versions.contains(&envelope.version) {
        return Err(damaged(format!(
            "version {} of {format}; this build reads versions {}..={}",
            envelope.version,
            versions.start(),
            versions.end()
        )));
    }
    let crc = crc_of(&envelope.content).map_err(|e| damaged(e.to_string()))?;
    if crc != envelope.crc32c {
        return Err(damaged(format!(
            "checksum {:#010x} does not match its content ({crc:#010x})",
            envelope.crc32c
        )));
    }
    Ok(Some((envelope.version, envelope.content)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fs::{PowerCut, RealFs, SimFs};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Doc {
        names: Vec<String>,
    }

    #[test]
    fn round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        assert!(load::<Doc>(&RealFs, &path, "t", 1..=1).unwrap().is_none());
        let doc = Doc {
            names: vec!["a".into(), "b".into()],
        };
        store(&RealFs, &path, "t", 1, &doc).unwrap();
        assert_eq!(
            load::<Doc>(&RealFs, &path, "t", 1..=1).unwrap(),
            Some((1, doc))
        );
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"b\"", "\"c\"");
        std::fs::write(&path, text).unwrap();
        let err = load::<Doc>(&RealFs, &path, "t", 1..=1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("d.json") && err.contains("checksum"), "{err}");
        store(&RealFs, &path, "t", 3, &Doc { names: vec![] }).unwrap();
        let err = load::<Doc>(&RealFs, &path, "t", 1..=2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 3"), "{err}");
    }

    #[test]
    fn a_power_cut_leaves_the_old_document_or_the_new_one() {
        for seed in 0..100 {
            let dir = tempfile::tempdir().unwrap();
            let fs = SimFs::new(dir.path());
            let path = Path::new("/d.json");
            let old = Doc {
                names: vec!["old".into()],
            };
            store(fs.as_ref(), path, "t", 1, &old).unwrap();
            let cut = PowerCut {
                seed,
                keep_data: 0.5,
                keep_entries: 0.5,
            };
            fs.cut_after(1 + seed % 6, cut);
            let new = Doc {
                names: vec!["new".into()],
            };
            let _ = store(fs.as_ref(), path, "t", 1, &new);
            fs.cut_power(cut);
            fs.restart();
            let (_, got) = load::<Doc>(fs.as_ref(), path, "t", 1..=1).unwrap().unwrap();
            assert!(got == old || got == new, "seed {seed}: {got:?}");
        }
    }
}
