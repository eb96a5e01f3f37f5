//! Records: one per write that reached a volume, and their on-disk codec.
//!
//! A record is prepared (compressed, payload checksummed) by the thread that
//! appends it, before it takes its place in the write order, so the writer
//! thread only stamps seq and time into the header and copies bytes.

use std::path::Path;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::point::{Seq, Timestamp};
use crate::volume::VolumeId;

/// `"TDRC"`: the first bytes of every record header.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TDRC");

/// Size of the fixed record header.
pub const RECORD_HEADER_LEN: usize = 56;

/// The largest payload one record may carry, whatever the configuration:
/// a decoder refuses larger lengths instead of allocating them.
pub const MAX_PAYLOAD_LEN: u64 = 64 << 20;

/// Flag bit: the payload is an lz4 block (lz4_flex raw block format).
const FLAG_LZ4: u8 = 1;

/// Flag bit: a resync write — the production volume's content of the range,
/// re-read after a window in which changes to it may have gone unjournalled
/// (a crash in async mode, a full cache). History inside that window is
/// coarse: the write says how the range ended up, not how it got there.
const FLAG_RESYNC: u8 = 2;

/// How much of a large payload is compressed first to decide whether the
/// rest is worth compressing.
const COMPRESS_SAMPLE: usize = 64 << 10;

/// The largest compression scratch buffer a thread keeps (a little over a
/// 1 MiB payload's worst case); larger payloads compress into a buffer of
/// their own.
const SCRATCH_MAX: usize = (1 << 20) + (64 << 10);

/// Bytes of each of the four pieces of a small payload whose byte
/// entropy decides whether lz4 is tried at all.
const ENTROPY_PIECE: usize = 256;

/// Sampled byte entropy (bits per byte) above which a small payload is
/// taken for incompressible: the same "shrinks by less than an eighth"
/// rule large payloads follow (7 of 8 bits). Random bytes measure about
/// 7.8 on a 1 KiB sample, fio's default buffers 7.1 (lz4 saves 5% of
/// them); database pages, text and code that lz4 shrinks by an eighth
/// have runs or few byte values and measure well below.
const RANDOM_ENTROPY_BITS: f32 = 7.0;

/// Whether a payload of at least 1 KiB looks like random bytes (encrypted
/// or already compressed data) that lz4 would not shrink by an eighth, judged by the order-0 entropy of four
/// 256-byte pieces spread over it. lz4 on 4 KiB of such data costs several
/// microseconds on the acknowledging thread, more than the rest of an
/// async write, and gains nothing; the estimate costs a fraction of that.
/// The record is then stored raw, as a failed compression would have left
/// it, so the compression ratio the anomaly detector reads is unchanged.
fn looks_random(payload: &[u8]) -> bool {
    let n = payload.len();
    if n < 4 * ENTROPY_PIECE {
        return false;
    }
    let mut counts = [0u16; 256];
    for quarter in 0..4 {
        let start = (n / 4 * quarter).min(n - ENTROPY_PIECE);
        for &b in &payload[start..start + ENTROPY_PIECE] {
            counts[b as usize] += 1;
        }
    }
    // H = log2(N) - (1/N) * sum(c * log2 c), N = 1024.
    let table = c_log2_c();
    let sum: f32 = counts.iter().map(|&c| table[c as usize]).sum();
    let total = (4 * ENTROPY_PIECE) as f32;
    total.log2() - sum / total > RANDOM_ENTROPY_BITS
}

/// `c * log2(c)` for every count a sample can hold.
fn c_log2_c() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=4 * ENTROPY_PIECE)
            .map(|c| {
                if c == 0 {
                    0.0
                } else {
                    c as f32 * (c as f32).log2()
                }
            })
            .collect()
    })
}

thread_local! {
    /// Per-thread lz4 output buffer; see [`PreparedRecord::new`].
    static COMPRESS_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What a record does to its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Bytes written at an offset; the payload holds them.
    Write = 1,
    /// A range set to zeros (NBD WRITE_ZEROES); no payload.
    Zero = 2,
    /// A range discarded (NBD TRIM); reads back as zeros; no payload.
    Trim = 3,
    /// A flush or FUA: the volume's state here is crash-consistent.
    Flush = 4,
    /// A marker on the timeline (tags, events); payload is its body; the
    /// volume's contents do not change.
    Mark = 5,
}

impl RecordKind {
    /// Decodes the kind byte.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Trim,
            4 => RecordKind::Flush,
            5 => RecordKind::Mark,
            _ => return None,
        })
    }

    /// The lower-case name used in docs, logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Write => "write",
            RecordKind::Zero => "zero",
            RecordKind::Trim => "trim",
            RecordKind::Flush => "flush",
            RecordKind::Mark => "mark",
        }
    }

    /// True for kinds that change the bytes of a range of the volume.
    pub fn changes_data(self) -> bool {
        matches!(
            self,
            RecordKind::Write | RecordKind::Zero | RecordKind::Trim
        )
    }
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record does.
    pub kind: RecordKind,
    /// Whether the stored payload is lz4-compressed.
    pub compressed: bool,
    /// Whether it is a resync write (see the flag's documentation).
    pub resync: bool,
    /// The volume it applies to.
    pub volume: VolumeId,
    /// Bytes of payload stored after the header.
    pub stored_len: u32,
    /// Position in the group's write order.
    pub seq: Seq,
    /// When it was captured.
    pub timestamp: Timestamp,
    /// First byte of the volume it touches.
    pub offset: u64,
    /// Bytes of the volume it touches (write, zero, trim) or of the mark body.
    pub length: u64,
    /// CRC32C of payload then header bytes 0..52.
    pub crc: u32,
}

impl RecordHeader {
    /// Bytes this record occupies in a segment.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.stored_len as usize
    }
}

/// A record made ready for the writer: payload compressed and checksummed,
/// waiting for its seq and timestamp.
#[derive(Debug)]
pub struct PreparedRecord {
    /// What the record does.
    pub kind: RecordKind,
    /// The volume it applies to.
    pub volume: VolumeId,
    /// First byte of the volume it touches.
    pub offset: u64,
    /// Bytes it touches (or the mark body length).
    pub length: u64,
    /// The payload as it will be stored (compressed or raw); a raw one
    /// shares the write's own buffer when it came as [`Bytes`].
    pub stored: Bytes,
    /// Whether `stored` is lz4-compressed.
    pub compressed: bool,
    /// Whether this is a resync write.
    pub resync: bool,
    /// CRC32C of `stored`, to be extended over the header by the writer.
    pub payload_crc: u32,
}

impl PreparedRecord {
    /// Prepares a record. The payload is lz4-compressed and kept compressed
    /// only if that makes it smaller, so incompressible data costs one
    /// compression attempt (of its first 64 KiB, for large payloads; none
    /// for smaller ones whose sampled entropy says random) and no extra
    /// space.
    pub fn new(
        kind: RecordKind,
        volume: VolumeId,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Self {
        Self::prepare(kind, volume, offset, length, payload, None)
    }

    /// Like [`PreparedRecord::new`], but a payload stored raw shares
    /// `payload`'s buffer instead of copying it.
    pub fn shared(
        kind: RecordKind,
        volume: VolumeId,
        offset: u64,
        length: u64,
        payload: &Bytes,
    ) -> Self {
        Self::prepare(kind, volume, offset, length, payload, Some(payload))
    }

    fn prepare(
        kind: RecordKind,
        volume: VolumeId,
        offset: u64,
        length: u64,
        payload: &[u8],
        owned: Option<&Bytes>,
    ) -> Self {
        let raw = || {
            owned
                .cloned()
                .unwrap_or_else(|| Bytes::copy_from_slice(payload))
        };
        let (stored, compressed) = if payload.is_empty() {
            (Bytes::new(), false)
        } else {
            // Compress into a scratch buffer kept per thread, then keep an
            // exact-size copy of whichever is smaller: the record's memory
            // is then what the memory cache charges for it, and no
            // worst-case-sized buffer is allocated and freed per write.
            COMPRESS_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                // Only small payloads: four pieces of 256 bytes say little
                // about a large write that mixes blocks (the first block
                // of each of many small files, encrypted, between their
                // text), and the anomaly detector reads this decision.
                if payload.len() < 2 * COMPRESS_SAMPLE && looks_random(payload) {
                    return (raw(), false);
                }
                // A large payload whose first 64 KiB shrink by less than
                // an eighth is stored as it is: compressing a MiB of
                // (nearly) incompressible data costs a millisecond on the
                // writing thread for next to nothing.
                if payload.len() >= 2 * COMPRESS_SAMPLE {
                    let sample = &payload[..COMPRESS_SAMPLE];
                    let bound = lz4_flex::block::get_maximum_output_size(sample.len());
                    if scratch.len() < bound {
                        scratch.resize(bound, 0);
                    }
                    match lz4_flex::block::compress_into(sample, &mut scratch[..]) {
                        Ok(n) if n < sample.len() * 7 / 8 => {}
                        _ => return (raw(), false),
                    }
                }
                let bound = lz4_flex::block::get_maximum_output_size(payload.len());
                if bound > SCRATCH_MAX {
                    // Not through the scratch buffer: every pool thread that
                    // once took a 32 MiB write would keep 32 MiB for good.
                    let mut out = lz4_flex::block::compress(payload);
                    if out.len() >= payload.len() {
                        return (raw(), false);
                    }
                    out.shrink_to_fit();
                    return (Bytes::from(out), true);
                }
                if scratch.len() < bound {
                    scratch.resize(bound, 0);
                }
                match lz4_flex::block::compress_into(payload, &mut scratch[..]) {
                    Ok(n) if n < payload.len() => (Bytes::copy_from_slice(&scratch[..n]), true),
                    _ => (raw(), false),
                }
            })
        };
        let payload_crc = crc32c::crc32c(&stored);
        PreparedRecord {
            kind,
            volume,
            offset,
            length,
            stored,
            compressed,
            resync: false,
            payload_crc,
        }
    }

    /// Prepares a record whose payload is stored as it is, never
    /// compressed (marks, which the writer indexes from the bytes it has).
    pub fn raw(kind: RecordKind, volume: VolumeId, offset: u64, payload: Vec<u8>) -> Self {
        let payload_crc = crc32c::crc32c(&payload);
        PreparedRecord {
            kind,
            volume,
            offset,
            length: payload.len() as u64,
            stored: Bytes::from(payload),
            compressed: false,
            resync: false,
            payload_crc,
        }
    }

    /// The header the record gets when stamped with `seq` and `timestamp`
    /// (without its CRC, which only the encoding computes).
    pub fn header(&self, seq: Seq, timestamp: Timestamp) -> RecordHeader {
        RecordHeader {
            kind: self.kind,
            compressed: self.compressed,
            resync: self.resync,
            volume: self.volume,
            stored_len: self.stored.len() as u32,
            seq,
            timestamp,
            offset: self.offset,
            length: self.length,
            crc: 0,
        }
    }

    /// Bytes the record will occupy in a segment.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.stored.len()
    }

    /// Ratio of stored to logical payload bytes (1.0 when nothing shrank);
    /// a free entropy signal for anomaly detection.
    pub fn compression_ratio(&self) -> f64 {
        if self.kind == RecordKind::Write && self.length > 0 {
            self.stored.len() as f64 / self.length as f64
        } else {
            1.0
        }
    }

    /// Encodes the record, stamped with `seq` and `timestamp`, into the
    /// first [`PreparedRecord::encoded_len`] bytes of `out`, and returns
    /// that length.
    ///
    /// Format (little-endian, 56-byte header, then `stored_len` payload bytes):
    /// `{ u32 magic "TDRC" | u8 kind | u8 flags | u16 reserved | u32 volume |
    ///    u32 stored_len | u64 seq | i64 timestamp_ns | u64 offset |
    ///    u64 length | u32 reserved | u32 crc32c }`
    /// with `crc32c = crc32c_append(crc32c(payload), header[0..52])`.
    pub fn encode_to(&self, seq: Seq, timestamp: Timestamp, out: &mut [u8]) -> usize {
        let out = &mut out[..self.encoded_len()];
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4] = self.kind as u8;
        out[5] =
            if self.compressed { FLAG_LZ4 } else { 0 } | if self.resync { FLAG_RESYNC } else { 0 };
        out[6..8].copy_from_slice(&0u16.to_le_bytes());
        out[8..12].copy_from_slice(&self.volume.to_le_bytes());
        out[12..16].copy_from_slice(&(self.stored.len() as u32).to_le_bytes());
        out[16..24].copy_from_slice(&seq.to_le_bytes());
        out[24..32].copy_from_slice(&timestamp.as_nanos().to_le_bytes());
        out[32..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..48].copy_from_slice(&self.length.to_le_bytes());
        out[48..52].copy_from_slice(&0u32.to_le_bytes());
        let crc = crc32c::crc32c_append(self.payload_crc, &out[0..52]);
        out[52..56].copy_from_slice(&crc.to_le_bytes());
        out[RECORD_HEADER_LEN..].copy_from_slice(&self.stored);
        out.len()
    }

    /// Appends the encoded record to `out`; see [`PreparedRecord::encode_to`].
    pub fn encode_into(&self, seq: Seq, timestamp: Timestamp, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.encoded_len(), 0);
        self.encode_to(seq, timestamp, &mut out[start..]);
    }
}

/// Reads a little-endian u16 at `at`; the caller has checked the length.
pub(crate) fn le_u16(bytes: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(a)
}

/// Reads a little-endian u32 at `at`; the caller has checked the length.
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `at`; the caller has checked the length.
pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and verifies the record starting at `bytes[0]`, which lies at
/// `file_offset` in `path`. `bytes` may extend past the record. Returns the
/// header and the stored payload.
pub fn decode_record<'a>(
    bytes: &'a [u8],
    path: &Path,
    file_offset: u64,
) -> Result<(RecordHeader, &'a [u8])> {
    let bad = |reason: String| Error::corruption(path, file_offset, reason);
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(bad(format!(
            "record header needs {RECORD_HEADER_LEN} bytes, only {} remain",
            bytes.len()
        )));
    }
    let magic = le_u32(bytes, 0);
    if magic != RECORD_MAGIC {
        return Err(bad(format!("bad record magic {magic:#010x}")));
    }
    let kind = RecordKind::from_u8(bytes[4])
        .ok_or_else(|| bad(format!("unknown record kind {}", bytes[4])))?;
    let flags = bytes[5];
    if flags & !(FLAG_LZ4 | FLAG_RESYNC) != 0
        || (flags & FLAG_RESYNC != 0 && kind != RecordKind::Write)
    {
        return Err(bad(format!("unknown record flags {flags:#04x}")));
    }
    let stored_len = le_u32(bytes, 12);
    let header = RecordHeader {
        kind,
        compressed: flags & FLAG_LZ4 != 0,
        resync: flags & FLAG_RESYNC != 0,
        volume: le_u32(bytes, 8),
        stored_len,
        seq: le_u64(bytes, 16),
        timestamp: Timestamp::from_nanos(le_u64(bytes, 24) as i64),
        offset: le_u64(bytes, 32),
        length: le_u64(bytes, 40),
        crc: le_u32(bytes, 52),
    };
    let end = RECORD_HEADER_LEN + stored_len as usize;
    if bytes.len() < end {
        return Err(bad(format!(
            "record seq {} claims {stored_len} payload bytes, only {} remain",
            header.seq,
            bytes.len() - RECORD_HEADER_LEN
        )));
    }
    if matches!(kind, RecordKind::Write | RecordKind::Mark) && header.length > MAX_PAYLOAD_LEN {
        return Err(bad(format!(
            "record seq {} claims a {}-byte payload, more than the {MAX_PAYLOAD_LEN} allowed",
            header.seq, header.length
        )));
    }
    let payload = &bytes[RECORD_HEADER_LEN..end];
    let crc = crc32c::crc32c_append(crc32c::crc32c(payload), &bytes[..52]);
    if crc != header.crc {
        return Err(bad(format!(
            "record seq {} fails its CRC (stored {:#010x}, computed {crc:#010x})",
            header.seq, header.crc
        )));
    }
    match kind {
        RecordKind::Write | RecordKind::Mark
            if !header.compressed && header.length != stored_len as u64 =>
        {
            return Err(bad(format!(
                "record seq {} is {} bytes long but stores {stored_len} raw bytes",
                header.seq, header.length
            )));
        }
        RecordKind::Zero | RecordKind::Trim | RecordKind::Flush if stored_len != 0 => {
            return Err(bad(format!(
                "{} record seq {} carries {stored_len} payload bytes",
                kind.name(),
                header.seq
            )));
        }
        _ => {}
    }
    Ok((header, payload))
}

/// Returns the logical payload of a decoded record: decompressed if it was
/// stored compressed.
pub fn payload_bytes(
    header: &RecordHeader,
    stored: &[u8],
    path: &Path,
    file_offset: u64,
) -> Result<Vec<u8>> {
    if !header.compressed {
        return Ok(stored.to_vec());
    }
    let len = usize::try_from(header.length).map_err(|_| {
        Error::corruption(path, file_offset, "record length does not fit in memory")
    })?;
    let data = lz4_flex::block::decompress(stored, len).map_err(|e| {
        Error::corruption(
            path,
            file_offset,
            format!("record seq {} payload does not decompress: {e}", header.seq),
        )
    })?;
    if data.len() != len {
        return Err(Error::corruption(
            path,
            file_offset,
            format!(
                "record seq {} decompresses to {} bytes, header says {len}",
                header.seq,
                data.len()
            ),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn small_random_payloads_are_stored_raw_and_structured_ones_compressed() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert!(looks_random(&random));
        let raw = PreparedRecord::new(RecordKind::Write, 1, 0, 4096, &random);
        assert!(!raw.compressed);
        assert_eq!(raw.stored, random);

        // Half random, half zeros: lz4 halves it, so it must be tried.
        let mut page = random.clone();
        page[2048..].fill(0);
        assert!(!looks_random(&page));
        assert!(PreparedRecord::new(RecordKind::Write, 1, 0, 4096, &page).compressed);

        let text: Vec<u8> = b"INSERT INTO orders VALUES (42, 'widget', 3);\n"
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        assert!(!looks_random(&text));
        assert!(PreparedRecord::new(RecordKind::Write, 1, 0, 4096, &text).compressed);
    }

    #[test]
    fn large_payloads_whose_start_does_not_shrink_are_stored_raw() {
        let mut noisy = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for b in noisy.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let rec = PreparedRecord::new(RecordKind::Write, 1, 0, noisy.len() as u64, &noisy);
        assert!(!rec.compressed);
        assert_eq!(rec.stored, noisy);
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(25_000);
        let rec = PreparedRecord::new(RecordKind::Write, 1, 0, text.len() as u64, &text);
        assert!(rec.compressed && rec.stored.len() < text.len() / 4);
        let (_, data) = roundtrip(&noisy, RecordKind::Write, noisy.len() as u64);
        assert_eq!(data, noisy);
    }

    fn roundtrip(payload: &[u8], kind: RecordKind, length: u64) -> (RecordHeader, Vec<u8>) {
        let rec = PreparedRecord::new(kind, 7, 4096, length, payload);
        let mut out = Vec::new();
        rec.encode_into(
            42,
            Timestamp::from_nanos(1_700_000_000_000_000_000),
            &mut out,
        );
        assert_eq!(out.len(), rec.encoded_len());
        let path = PathBuf::from("seg");
        let (header, stored) = decode_record(&out, &path, 0).expect("decodes");
        let data = payload_bytes(&header, stored, &path, 0).expect("payload");
        (header, data)
    }

    #[test]
    fn compressible_payload_is_stored_compressed() {
        let payload = vec![b'a'; 65536];
        let (header, data) = roundtrip(&payload, RecordKind::Write, payload.len() as u64);
        assert!(header.compressed);
        assert!((header.stored_len as usize) < payload.len());
        assert_eq!(data, payload);
        assert_eq!(header.seq, 42);
        assert_eq!(header.volume, 7);
        assert_eq!(header.offset, 4096);
    }

    #[test]
    fn incompressible_payload_is_stored_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let payload: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (header, data) = roundtrip(&payload, RecordKind::Write, payload.len() as u64);
        assert!(!header.compressed);
        assert_eq!(header.stored_len as usize, payload.len());
        assert_eq!(data, payload);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let rec = PreparedRecord::new(RecordKind::Write, 1, 0, 100, &[9u8; 100]);
        let mut out = Vec::new();
        rec.encode_into(1, Timestamp::from_nanos(5), &mut out);
        let path = PathBuf::from("seg");
        for byte in 0..out.len() {
            for bit in 0..8 {
                let mut damaged = out.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    decode_record(&damaged, &path, 0).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncated_record_is_corruption_not_panic() {
        let rec = PreparedRecord::new(RecordKind::Write, 1, 0, 1000, &[3u8; 1000]);
        let mut out = Vec::new();
        rec.encode_into(1, Timestamp::from_nanos(5), &mut out);
        let path = PathBuf::from("seg");
        for len in 0..out.len() {
            assert!(decode_record(&out[..len], &path, 0).is_err());
        }
    }
}
