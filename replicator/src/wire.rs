//! Records on the wire: a `Records` message carries records exactly as the
//! primary's segments hold them, back to back, with the seq of the
//! primary's record before them and a CRC32C of the bytes; the replica
//! takes them apart and checks every one (each record carries its own
//! CRC too).

use tidemark_journal::epochs::History;
use tidemark_journal::manifest::EpochStart;
use tidemark_journal::record::decode_record;
use tidemark_journal::{RawRecord, Seq};
use tidemark_proto::v1 as pb;
use tidemark_proto::v1::replication_message::Records;

/// An epoch history as hellos and positions carry it.
pub fn epochs_to_wire(epochs: &[EpochStart]) -> Vec<pb::EpochStart> {
    epochs
        .iter()
        .map(|e| pb::EpochStart {
            epoch: e.epoch,
            first_seq: e.first_seq,
        })
        .collect()
}

/// A site's history from the epochs a hello or position carries and its
/// newest seq.
pub fn history_from_wire(epochs: &[pb::EpochStart], newest: Seq) -> History {
    History {
        epochs: epochs
            .iter()
            .map(|e| EpochStart {
                epoch: e.epoch,
                first_seq: e.first_seq,
            })
            .collect(),
        newest,
    }
}

/// Packs shipped records (all of one epoch) into a message.
pub fn pack(prev_seq: Seq, records: &[RawRecord]) -> Option<Records> {
    let (first, last) = (records.first()?, records.last()?);
    let mut bytes = Vec::with_capacity(records.iter().map(|r| r.bytes.len()).sum());
    for r in records {
        bytes.extend_from_slice(&r.bytes);
    }
    Some(Records {
        prev_seq,
        first_seq: first.header.seq,
        last_seq: last.header.seq,
        epoch: first.epoch,
        crc32c: crc32c::crc32c(&bytes),
        records: bytes,
    })
}

/// Takes a message apart into records, checking its CRC, every record's
/// own, and that the seqs it claims are the ones it holds.
pub fn unpack(message: &Records) -> Result<Vec<RawRecord>, String> {
    if crc32c::crc32c(&message.records) != message.crc32c {
        return Err(format!(
            "records {}..={} fail their CRC",
            message.first_seq, message.last_seq
        ));
    }
    let mut records = Vec::new();
    let mut at = 0usize;
    let path = std::path::Path::new("replication stream");
    while at < message.records.len() {
        let (header, _) = decode_record(&message.records[at..], path, at as u64).map_err(|e| {
            format!(
                "a record of {}..={}: {e}",
                message.first_seq, message.last_seq
            )
        })?;
        let end = at + header.encoded_len();
        records.push(RawRecord {
            header,
            bytes: message.records[at..end].to_vec(),
            epoch: message.epoch,
        });
        at = end;
    }
    match (records.first(), records.last()) {
        (Some(f), Some(l))
            if f.header.seq == message.first_seq && l.header.seq == message.last_seq =>
        {
            Ok(records)
        }
        _ => Err(format!(
            "the message claims records {}..={} but holds others",
            message.first_seq, message.last_seq
        )),
    }
}
