//! Volumes of a consistency group.

use serde::{Deserialize, Serialize};

/// A volume's number within its consistency group, as stored in records and
/// index keys (names are kept once, in the manifest).
pub type VolumeId = u32;

/// A protected volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Its number in records and index keys.
    pub id: VolumeId,
    /// The name users and exports know it by.
    pub name: String,
    /// Size in bytes; writes beyond it are refused.
    pub size: u64,
}

impl VolumeInfo {
    /// Checks that `offset..offset+len` is a non-empty range inside the
    /// volume.
    pub fn check_range(&self, offset: u64, len: u64) -> crate::error::Result<()> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(crate::error::Error::OutOfBounds {
                volume: self.name.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// Checks that a volume name can be used in export names and file paths:
/// `NAME@POINT` exports reserve `@`, and paths reserve `/`.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!("volume name {name:?} must be 1 to 128 characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "volume name {name:?} contains {bad:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("volume name {name:?} must not start with '.'"));
    }
    Ok(())
}
