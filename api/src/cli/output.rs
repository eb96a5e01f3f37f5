//! How client commands print: aligned tables for people, one JSON document
//! with stable field names for scripts (interface.md, "JSON shapes").

use serde_json::{json, Value};
use tidemark_proto::v1 as pb;

use crate::size::format_size;

/// A volume as `volume list --json` prints it.
pub fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "name": v.name,
        "size": v.size,
        "mode": v.mode,
        "effective_mode": v.effective_mode,
        "group": v.group,
        "newest_seq": v.newest_seq,
        "newest_time": v.newest_time,
        "horizon_seq": v.horizon_seq,
        "horizon_time": v.horizon_time,
        "backing": v.backing,
        "role": v.role,
        "epoch": v.epoch,
    })
}

/// A replica as `replica list --json` (and `volume show --json`) print it.
pub fn replica_json(r: &pb::Replica) -> Value {
    json!({
        "volume": r.volume,
        "group": r.group,
        "address": r.address,
        "state": r.state,
        "mode": r.mode,
        "effective_mode": r.effective_mode,
        "acked_seq": r.acked_seq,
        "lag_seconds": r.lag_seconds,
        "rpo_seconds": r.rpo_seconds,
        "rpo_alert": r.rpo_alert,
        "lag_bytes": r.lag_bytes,
        "sent_bytes": r.sent_bytes,
        "resync_bytes": r.resync_bytes,
        "last_error": if r.last_error.is_empty() { Value::Null } else { json!(r.last_error) },
        "last_verified": if r.last_verified.is_empty() { Value::Null } else { json!(r.last_verified) },
    })
}

/// A tag as `tag list --json` prints it.
pub fn tag_json(t: &pb::Tag) -> Value {
    json!({
        "name": t.name,
        "seq": t.seq,
        "time": t.time,
        "source": t.source,
        "consistency": t.consistency,
        "verified": t.verified,
        "note": t.note,
        "id": t.id,
        "verification": if t.verified_at.is_empty() {
            serde_json::Value::Null
        } else {
            json!({"at": t.verified_at, "ran": t.verified_by, "detail": t.verification_detail})
        },
    })
}

/// A timeline as `timeline --json` prints it.
pub fn timeline_json(t: &pb::TimelineResponse) -> Value {
    json!({
        "volume": t.volume,
        "horizon_seq": t.horizon_seq,
        "newest_seq": t.newest_seq,
        "entries": t.entries.iter().map(|e| json!({
            "seq": e.seq,
            "time": e.time,
            "kind": e.kind,
            "name": e.name,
            "count": e.count,
            "first_seq": e.first_seq,
            "detail": e.detail,
        })).collect::<Vec<_>>(),
    })
}

/// Prints rows under a header with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Volume rows.
pub fn volumes_table(volumes: &[pb::Volume]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let mode = if v.mode == v.effective_mode || v.effective_mode.is_empty() {
                v.mode.clone()
            } else {
                format!("{} (now {})", v.mode, v.effective_mode)
            };
            vec![
                v.name.clone(),
                format_size(v.size),
                mode,
                v.group.clone(),
                v.newest_seq.to_string(),
                v.horizon_seq.to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "MODE", "GROUP", "NEWEST", "HORIZON"],
        &rows,
    );
}

/// `status --json` → `failover`.
pub fn failover_json(f: &pb::FailoverStatus) -> serde_json::Value {
    json!({
        "auto": f.auto,
        "phi": f.phi,
        "last_heartbeat_seconds": (f.last_heartbeat_seconds >= 0.0).then_some(f.last_heartbeat_seconds),
        "witness": f.witness,
        "takeovers": f.takeovers,
        "demotions": f.demotions,
        "probes": f.probes.iter().map(|p| json!({
            "kind": p.kind,
            "target": p.target,
            "failures_in_a_row": p.failures_in_a_row,
            "failures": p.failures,
            "last_error": (!p.last_error.is_empty()).then_some(&p.last_error),
        })).collect::<Vec<_>>(),
    })
}
