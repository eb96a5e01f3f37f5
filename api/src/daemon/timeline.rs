//! A volume's timeline: its tags, its flush points (runs of them
//! summarised), system events (mode switches, resync windows, rollbacks,
//! the initial sync) and gaps retention left.

use tidemark_journal::{Mark, RecordKind, Seq, Timestamp};

use super::error::ApiResult;
use super::registry::{Registry, Volume};
use crate::point_spec::PointSpec;
use tidemark_tagging::Tag;

/// One line of the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The point it names (for a run of flushes: the newest of them).
    pub seq: Seq,
    /// When.
    pub time: Timestamp,
    /// `tag`, `flush`, `event` or `gap`.
    pub kind: &'static str,
    /// Tag name, event name, or a summary of flushes.
    pub name: String,
    /// For a run of flushes: how many, and the first one's seq.
    pub count: u64,
    /// See `count`.
    pub first_seq: Seq,
    /// Tag source and consistency, or an event's body.
    pub detail: String,
}

/// The timeline of `volume` between two points (default: all history).
pub fn timeline(
    registry: &Registry,
    volume: &Volume,
    from: Option<&PointSpec>,
    to: Option<&PointSpec>,
) -> ApiResult<(Seq, Seq, Vec<Entry>)> {
    let history = volume.history();
    // The whole history: gaps retention left are shown even once the
    // horizon has moved past them — what was lost stays said.
    let whole = from.is_none();
    let from = match from {
        Some(spec) => registry.resolve(volume, spec)?,
        None => history.horizon_seq,
    };
    let to = match to {
        Some(spec) => registry.resolve(volume, spec)?,
        None => history.newest_seq,
    };
    let tags: Vec<Tag> = registry.tags(volume)?;
    let mut entries: Vec<Entry> = Vec::new();
    let mut flushes: Option<Entry> = None;
    let close_run = |run: &mut Option<Entry>, entries: &mut Vec<Entry>| {
        if let Some(mut run) = run.take() {
            run.name = if run.count == 1 {
                "flush".into()
            } else {
                format!("{} flush points", run.count)
            };
            entries.push(run);
        }
    };
    for event in volume.journal().events(volume.id()?, from, to)? {
        match event.kind {
            RecordKind::Flush => {
                let run = flushes.get_or_insert(Entry {
                    seq: event.seq,
                    time: event.time,
                    kind: "flush",
                    name: String::new(),
                    count: 0,
                    first_seq: event.seq,
                    detail: String::new(),
                });
                run.seq = event.seq;
                run.time = event.time;
                run.count += 1;
            }
            RecordKind::Mark => {
                let entry = match Mark::decode(&event.body) {
                    Some(Mark::TagSet { name, .. }) => tags
                        .iter()
                        .find(|t| t.name == name && t.mark_seq == event.seq)
                        .map(|t| Entry {
                            // A tag names its point, which may be earlier
                            // than the record that set it.
                            seq: t.seq,
                            time: t.time,
                            kind: "tag",
                            name: name.to_string(),
                            count: 1,
                            first_seq: t.seq,
                            detail: format!(
                                "source={} consistency={} verified={}{}",
                                t.body.source.as_str(),
                                t.body.consistency.as_str(),
                                t.body.verified.as_str(),
                                if t.body.note.is_empty() {
                                    String::new()
                                } else {
                                    format!(" note={:?}", t.body.note)
                                }
                            ),
                        }),
                    Some(Mark::Event { name, body }) => Some(Entry {
                        seq: event.seq,
                        time: event.time,
                        kind: "event",
                        name: name.to_string(),
                        count: 1,
                        first_seq: event.seq,
                        detail: String::from_utf8_lossy(body).into_owned(),
                    }),
                    Some(Mark::TagDelete { .. }) | None => None,
                };
                if let Some(entry) = entry {
                    close_run(&mut flushes, &mut entries);
                    entries.push(entry);
                }
            }
            _ => {}
        }
    }
    close_run(&mut flushes, &mut entries);
    for gap in volume.journal().gaps() {
        if (whole || gap.horizon_seq >= from) && gap.hold_seq <= to {
            entries.push(Entry {
                seq: gap.hold_seq,
                time: Timestamp::from_nanos(gap.at_ns),
                kind: "gap",
                name: format!(
                    "history {}..={} lost to retention",
                    gap.hold_seq + 1,
                    gap.horizon_seq
                ),
                count: gap.horizon_seq - gap.hold_seq,
                first_seq: gap.hold_seq + 1,
                detail: format!("hold {} was passed", gap.hold),
            });
        }
    }
    entries.sort_by_key(|e| e.seq);
    Ok((history.horizon_seq, history.newest_seq, entries))
}

/// The newest seq of `volume`'s group written at or before `t`, clamped
/// to the retained `history` (a moment before the horizon is the horizon;
/// one at or after the newest record is that record).
fn seq_at_time(
    volume: &Volume,
    history: &tidemark_journal::History,
    t: Timestamp,
) -> ApiResult<Seq> {
    if t < history.horizon_time {
        return Ok(history.horizon_seq);
    }
    if t >= history.newest_time {
        return Ok(history.newest_seq);
    }
    Ok(volume
        .journal()
        .resolve(&volume.name, tidemark_journal::Point::Time(t))?)
}

/// How busy a volume's group was: records written in each of `buckets`
/// equal slices of `[from, to]` (clamped to the retained history), found
/// from the journal's time index with one lookup per slice edge, so the
/// cost does not grow with the number of records.
pub fn activity(
    volume: &Volume,
    from: Option<Timestamp>,
    to: Option<Timestamp>,
    buckets: u32,
) -> ApiResult<Vec<(Timestamp, u64)>> {
    let journal = volume.journal();
    let history = journal.history();
    let from = from.map_or(history.horizon_time, |t| t.max(history.horizon_time));
    let to = to.unwrap_or_else(Timestamp::now).max(from);
    let buckets = i64::from(buckets.clamp(1, 2000));
    let span = to.as_nanos() - from.as_nanos();
    let edge = |i: i64| {
        Timestamp::from_nanos(
            from.as_nanos() + (i128::from(span) * i128::from(i) / i128::from(buckets)) as i64,
        )
    };
    let seq_at = |t: Timestamp| seq_at_time(volume, &history, t);
    let mut out = Vec::with_capacity(buckets as usize);
    let mut before = seq_at(from)?;
    for i in 1..=buckets {
        let after = seq_at(edge(i))?;
        out.push((edge(i - 1), after.saturating_sub(before)));
        before = after;
    }
    Ok(out)
}

/// The newest flush point of `volume` at or before `seq`: where the
/// volume's own filesystem or database last made its state durable, the
/// crash-consistent point to snap a chosen moment to. Looks back in
/// growing windows, so a busy volume costs a few small scans.
pub fn flush_at_or_before(volume: &Volume, seq: Seq) -> ApiResult<Option<(Seq, Timestamp)>> {
    let journal = volume.journal();
    let horizon = journal.history().horizon_seq;
    let id = volume.id()?;
    let mut window: Seq = 1024;
    let mut to = seq;
    loop {
        let from = to.saturating_sub(window).max(horizon);
        let found = journal
            .events(id, from, to)?
            .into_iter()
            .filter(|e| e.kind == RecordKind::Flush)
            .map(|e| (e.seq, e.time))
            .next_back();
        if found.is_some() || from <= horizon {
            return Ok(found);
        }
        to = from.saturating_sub(1);
        window = window.saturating_mul(8);
    }
}

/// Each flush point of `volume` written between two moments, at most
/// `limit` of them (and whether there were more): what the console draws
/// when zoomed in far enough to tell them apart.
pub fn flushes_between(
    volume: &Volume,
    from: Timestamp,
    to: Timestamp,
    limit: usize,
) -> ApiResult<(Vec<(Seq, Timestamp)>, bool)> {
    let journal = volume.journal();
    let history = journal.history();
    let seq_at = |t: Timestamp| seq_at_time(volume, &history, t);
    let (first, last) = (seq_at(from)?, seq_at(to)?);
    let mut out: Vec<(Seq, Timestamp)> = journal
        .events(volume.id()?, first, last)?
        .into_iter()
        .filter(|e| e.kind == RecordKind::Flush && e.time >= from && e.time <= to)
        .map(|e| (e.seq, e.time))
        .take(limit + 1)
        .collect();
    let more = out.len() > limit;
    out.truncate(limit);
    Ok((out, more))
}
