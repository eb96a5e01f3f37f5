//! What the archive holds and how each object is named and framed (the
//! tables are in `docs/format.md`, "Archive"). Per consistency group,
//! under `groups/GROUP/`:
//!
//! - `segments/FIRST-LAST.eEPOCH.tdseg` — journal records `FIRST..=LAST`
//!   of one epoch, exactly as the segments hold them, behind a header with
//!   the seq before them (so a chain's contiguity can be checked) and a
//!   checksum of the body, and a map of where each record lies in it (so a
//!   view fetches one record with a ranged GET). Immutable: the epoch in
//!   the name keeps two writers (an old primary and the site that took
//!   over) apart.
//! - `chunks/BLAKE3` — a 4 MiB piece of a base image, named by the BLAKE3
//!   of its bytes, so an unchanged chunk is uploaded once.
//! - `bases/SEQ.eEPOCH.json` — a base version: every volume of the group
//!   at seq SEQ, as a list of chunk names (`null` for an all-zero chunk).
//! - `index.eEPOCH.json` — what the group's archive holds: the window, the
//!   segments, the base versions, the tags. Written by the primary of that
//!   epoch after each upload; a reader takes the highest epoch's.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::error::{ArchiveError, Result};

/// Base images are archived in chunks of this size.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// The key prefix of group `group`.
pub fn group_prefix(group: &str) -> String {
    format!("groups/{group}/")
}

/// The key of a segment object.
pub fn segment_key(group: &str, epoch: u64, first_seq: u64, last_seq: u64) -> String {
    format!("groups/{group}/segments/{first_seq:020}-{last_seq:020}.e{epoch:010}.tdseg")
}

/// The key of a chunk.
pub fn chunk_key(group: &str, hash: &str) -> String {
    format!("groups/{group}/chunks/{hash}")
}

/// The key of a base version's manifest.
pub fn base_key(group: &str, seq: u64, epoch: u64) -> String {
    format!("groups/{group}/bases/{seq:020}.e{epoch:010}.json")
}

/// The key of a group's index written under `epoch`.
pub fn index_key(group: &str, epoch: u64) -> String {
    format!("groups/{group}/index.e{epoch:010}.json")
}

/// The group and epoch of an index key (`groups/G/index.eE.json`).
pub fn parse_index_key(key: &str) -> Option<(String, u64)> {
    let rest = key.strip_prefix("groups/")?;
    let (group, name) = rest.split_once('/')?;
    let epoch = name.strip_prefix("index.e")?.strip_suffix(".json")?;
    Some((group.to_string(), epoch.parse().ok()?))
}

fn corrupt(key: &str, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Corrupt {
        location: String::new(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

const SEGMENT_MAGIC: &[u8; 8] = b"TDMKARSG";
const CHUNK_MAGIC: &[u8; 8] = b"TDMKCHNK";
/// Format version of archive objects.
pub const VERSION: u32 = 1;
/// Bytes of a segment object's header.
pub const SEGMENT_HEADER_LEN: usize = 96;
const CHUNK_HEADER_LEN: usize = 32;

/// The header of a segment object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The group's journal id (`group_id` of its manifest).
    pub group_id: u64,
    /// The epoch every record in it was written under.
    pub epoch: u64,
    /// The seq of the record before the first (0: none).
    pub prev_seq: u64,
    /// The first record's seq.
    pub first_seq: u64,
    /// The last record's seq.
    pub last_seq: u64,
    /// The first record's time (ns since the Unix epoch).
    pub first_ns: i64,
    /// The last record's time.
    pub last_ns: i64,
    /// Records in the body.
    pub count: u32,
}

/// One record of a segment object that changes a volume's bytes, as the
/// object's map lists it: where it lies in the body, so a reader fetches
/// it alone with a ranged GET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Its seq.
    pub seq: u64,
    /// The volume it changes.
    pub volume: u32,
    /// Zeros (a zero or trim record) rather than bytes (a write).
    pub zero: bool,
    /// The volume range it covers.
    pub offset: u64,
    /// Bytes of the volume it covers.
    pub length: u64,
    /// Where the encoded record starts in the body.
    pub pos: u64,
    /// Bytes of the encoded record.
    pub len: u32,
}

const MAP_MAGIC: &[u8; 8] = b"TDMKSMAP";
const MAP_HEADER_LEN: usize = 16;
const MAP_ENTRY_LEN: usize = 48;

/// Encodes a segment object's map: a 16-byte header (magic, count, CRC of
/// the entries), then 48 bytes per entry.
pub fn encode_map(entries: &[MapEntry]) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.len() * MAP_ENTRY_LEN);
    for e in entries {
        for v in [e.seq, e.offset, e.length, e.pos] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&e.len.to_le_bytes());
        body.extend_from_slice(&e.volume.to_le_bytes());
        body.extend_from_slice(&u32::from(e.zero).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    let mut out = Vec::with_capacity(MAP_HEADER_LEN + body.len());
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks and decodes the map of segment object `key`.
pub fn decode_map(key: &str, bytes: &[u8]) -> Result<Vec<MapEntry>> {
    if bytes.len() < MAP_HEADER_LEN || &bytes[..8] != MAP_MAGIC {
        return Err(corrupt(key, "its record map is not a tidemark map"));
    }
    let count = le_u32(bytes, 8) as usize;
    let body = &bytes[MAP_HEADER_LEN..];
    if body.len() != count * MAP_ENTRY_LEN {
        return Err(corrupt(
            key,
            format!(
                "its record map holds {} bytes for {count} entries",
                body.len()
            ),
        ));
    }
    if crc32c::crc32c(body) != le_u32(bytes, 12) {
        return Err(corrupt(key, "its record map fails its CRC32C"));
    }
    Ok(body
        .chunks_exact(MAP_ENTRY_LEN)
        .map(|e| MapEntry {
            seq: le_u64(e, 0),
            offset: le_u64(e, 8),
            length: le_u64(e, 16),
            pos: le_u64(e, 24),
            len: le_u32(e, 32),
            volume: le_u32(e, 36),
            zero: le_u32(e, 40) != 0,
        })
        .collect())
}

/// Frames `records` (encoded back to back, as segments hold them),
/// followed by `map` (encoded with [`encode_map`]; empty: none).
pub fn encode_segment(header: &SegmentHeader, records: &[u8], map: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(SEGMENT_HEADER_LEN + records.len() + map.len());
    out.extend_from_slice(SEGMENT_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    for v in [
        header.group_id,
        header.epoch,
        header.prev_seq,
        header.first_seq,
        header.last_seq,
        header.first_ns as u64,
        header.last_ns as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&header.count.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(records).to_le_bytes());
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(records);
    out.extend_from_slice(map);
    Bytes::from(out)
}

/// Checks a segment object's framing and body checksum; returns its header
/// and the records' bytes (each record still verifies its own CRC when
/// decoded).
pub fn decode_segment<'a>(key: &str, bytes: &'a [u8]) -> Result<(SegmentHeader, &'a [u8])> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(corrupt(
            key,
            format!("{} bytes, shorter than a header", bytes.len()),
        ));
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err(corrupt(key, "bad magic: not a tidemark segment object"));
    }
    let version = le_u32(bytes, 8);
    if version != VERSION {
        return Err(corrupt(
            key,
            format!("format version {version}, this build reads {VERSION}"),
        ));
    }
    let crc = crc32c::crc32c(&bytes[..92]);
    if crc != le_u32(bytes, 92) {
        return Err(corrupt(key, "header fails its CRC"));
    }
    let header = SegmentHeader {
        group_id: le_u64(bytes, 16),
        epoch: le_u64(bytes, 24),
        prev_seq: le_u64(bytes, 32),
        first_seq: le_u64(bytes, 40),
        last_seq: le_u64(bytes, 48),
        first_ns: le_u64(bytes, 56) as i64,
        last_ns: le_u64(bytes, 64) as i64,
        count: le_u32(bytes, 72),
    };
    let body_len = le_u64(bytes, 80);
    let map_len = u64::from(le_u32(bytes, 88));
    let rest = (bytes.len() - SEGMENT_HEADER_LEN) as u64;
    if rest != body_len + map_len {
        return Err(corrupt(
            key,
            format!(
                "{rest} bytes follow the header, it says {body_len} of records and {map_len} of map"
            ),
        ));
    }
    let body = &bytes[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + body_len as usize];
    if map_len > 0 {
        decode_map(key, &bytes[SEGMENT_HEADER_LEN + body_len as usize..])?;
    }
    if crc32c::crc32c(body) != le_u32(bytes, 76) {
        return Err(corrupt(key, "body fails its CRC32C"));
    }
    Ok((header, body))
}

/// The name of a chunk: the BLAKE3 of its bytes, in hex.
pub fn chunk_hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// True if every byte is zero (such chunks are not stored).
pub fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// Frames a chunk, lz4-compressed when that is smaller.
pub fn encode_chunk(data: &[u8]) -> Bytes {
    let packed = lz4_flex::block::compress(data);
    let (flags, stored): (u32, &[u8]) = if packed.len() < data.len() {
        (1, &packed)
    } else {
        (0, data)
    };
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + stored.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(stored), &out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(stored);
    Bytes::from(out)
}

/// Unframes chunk `key` and checks that its bytes hash to `hash`.
pub fn decode_chunk(key: &str, hash: &str, bytes: Bytes) -> Result<Bytes> {
    if bytes.len() < CHUNK_HEADER_LEN || &bytes[..8] != CHUNK_MAGIC {
        return Err(corrupt(key, "not a tidemark chunk object"));
    }
    let version = le_u32(&bytes, 8);
    if version != VERSION {
        return Err(corrupt(
            key,
            format!("format version {version}, this build reads {VERSION}"),
        ));
    }
    let flags = le_u32(&bytes, 12);
    let raw_len = le_u64(&bytes, 16);
    let stored_len = le_u32(&bytes, 24) as usize;
    let stored = &bytes[CHUNK_HEADER_LEN..];
    if stored.len() != stored_len || raw_len > CHUNK_SIZE {
        return Err(corrupt(key, "length fields do not match the object"));
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(stored), &bytes[..28]);
    if crc != le_u32(&bytes, 28) {
        return Err(corrupt(key, "fails its CRC32C"));
    }
    let data = if flags & 1 != 0 {
        Bytes::from(
            lz4_flex::block::decompress(stored, raw_len as usize)
                .map_err(|e| corrupt(key, format!("does not decompress: {e}")))?,
        )
    } else {
        bytes.slice(CHUNK_HEADER_LEN..)
    };
    if data.len() as u64 != raw_len || chunk_hash(&data) != hash {
        return Err(corrupt(key, "its bytes do not hash to its name"));
    }
    Ok(data)
}

/// A JSON document with a checksum: `{"format", "version", "blake3",
/// "content"}`, the BLAKE3 taken over `content` serialised compactly.
#[derive(Serialize, Deserialize)]
struct Document<T> {
    format: String,
    version: u32,
    blake3: String,
    content: T,
}

/// Serialises `content` as a checksummed document of `format`.
pub fn encode_document<T: Serialize>(format: &str, content: &T) -> Bytes {
    let compact = serde_json::to_vec(content).unwrap_or_default();
    let doc = Document {
        format: format.to_string(),
        version: VERSION,
        blake3: blake3::hash(&compact).to_hex().to_string(),
        content,
    };
    Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default())
}

/// Parses and verifies a document of `format`.
pub fn decode_document<T: Serialize + DeserializeOwned>(
    format: &str,
    key: &str,
    bytes: &[u8],
) -> Result<T> {
    let doc: Document<T> = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(key, format!("not a {format} document: {e}")))?;
    if doc.format != format || doc.version != VERSION {
        return Err(corrupt(
            key,
            format!(
                "is {} version {}, expected {format} version {VERSION}",
                doc.format, doc.version
            ),
        ));
    }
    let compact = serde_json::to_vec(&doc.content).unwrap_or_default();
    if blake3::hash(&compact).to_hex().as_str() != doc.blake3 {
        return Err(corrupt(key, "content does not match its BLAKE3 checksum"));
    }
    Ok(doc.content)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn segments_chunks_and_documents_round_trip_and_catch_damage() {
        let header = SegmentHeader {
            group_id: 7,
            epoch: 2,
            prev_seq: 9,
            first_seq: 10,
            last_seq: 12,
            first_ns: 100,
            last_ns: 300,
            count: 3,
        };
        let map = vec![
            MapEntry {
                seq: 10,
                volume: 1,
                zero: false,
                offset: 8192,
                length: 4096,
                pos: 0,
                len: 3,
            },
            MapEntry {
                seq: 12,
                volume: 2,
                zero: true,
                offset: 0,
                length: 1 << 40,
                pos: 3,
                len: 4,
            },
        ];
        let encoded = encode_map(&map);
        let object = encode_segment(&header, b"records", &encoded);
        let (back, body) = decode_segment("k", &object).unwrap();
        assert_eq!((back, body), (header, &b"records"[..]));
        let tail = &object[object.len() - encoded.len()..];
        assert_eq!(decode_map("k", tail).unwrap(), map);
        let mut bad = tail.to_vec();
        bad[20] ^= 1;
        assert!(decode_map("k", &bad)
            .unwrap_err()
            .to_string()
            .contains("CRC"));
        let plain = encode_segment(&header, b"records", b"");
        assert_eq!(decode_segment("k", &plain).unwrap().1, &b"records"[..]);
        let mut bad = object.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode_segment("k", &bad)
            .unwrap_err()
            .to_string()
            .contains("\"k\""));

        let data = vec![5u8; 10_000];
        let hash = chunk_hash(&data);
        let chunk = encode_chunk(&data);
        assert!(chunk.len() < data.len());
        assert_eq!(decode_chunk("c", &hash, chunk.clone()).unwrap(), data);
        let mut bad = chunk.to_vec();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(decode_chunk("c", &hash, Bytes::from(bad)).is_err());

        let doc = encode_document("t", &vec![1u64, 2]);
        assert_eq!(
            decode_document::<Vec<u64>>("t", "d", &doc).unwrap(),
            vec![1, 2]
        );
        let text = String::from_utf8(doc.to_vec()).unwrap().replace('2', "3");
        assert!(decode_document::<Vec<u64>>("t", "d", text.as_bytes()).is_err());
        assert_eq!(
            parse_index_key(&index_key("db", 3)),
            Some(("db".to_string(), 3))
        );
    }
}
