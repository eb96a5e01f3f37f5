//! Content hashes of a volume, region by region (BLAKE3 over 4 MiB
//! regions): what a resync compares to send only the regions that differ,
//! and what `replica verify` compares to prove two sites equal.

/// The region size of resyncs and verification.
pub const REGION: u64 = 4 << 20;

/// A region's hash.
pub type RegionHash = [u8; 32];

/// The hashes of a volume of `size` bytes, one per `region` bytes (the last
/// region may be shorter), reading through `read(offset, buf)`.
pub fn region_hashes<E>(
    size: u64,
    region: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Vec<RegionHash>, E> {
    let mut buf = vec![0u8; region as usize];
    let mut hashes = Vec::with_capacity(size.div_ceil(region) as usize);
    let mut offset = 0;
    while offset < size {
        let len = region.min(size - offset) as usize;
        read(offset, &mut buf[..len])?;
        hashes.push(*blake3::hash(&buf[..len]).as_bytes());
        offset += len as u64;
    }
    Ok(hashes)
}

/// One hash for a whole list of region hashes.
pub fn combined(hashes: &[RegionHash]) -> String {
    let mut hasher = blake3::Hasher::new();
    for h in hashes {
        hasher.update(h);
    }
    hasher.finalize().to_hex().to_string()
}

/// Packs hashes for the wire, 32 bytes each.
pub fn pack(hashes: &[RegionHash]) -> Vec<u8> {
    hashes.iter().flatten().copied().collect()
}

/// Unpacks hashes from the wire; `None` if the length is not a multiple
/// of 32.
pub fn unpack(bytes: &[u8]) -> Option<Vec<RegionHash>> {
    if bytes.len() % 32 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_hash_apart_and_pack_round_trips() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let hashes = region_hashes::<()>(10_000, 4096, |offset, buf| {
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
        .unwrap_or_default();
        assert_eq!(hashes.len(), 3);
        assert_ne!(hashes[0], hashes[1]);
        assert_eq!(unpack(&pack(&hashes)), Some(hashes.clone()));
        assert_eq!(unpack(&[0u8; 33]), None);
        assert_eq!(combined(&hashes).len(), 64);
    }
}
