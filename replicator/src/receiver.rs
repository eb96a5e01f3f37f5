//! The replica's side of a replication stream: the group's journal here,
//! made on the first hello (same volumes, same ids), takes the primary's
//! records unchanged — same seqs, timestamps and CRCs — and answers with
//! what is durable in it after its own fsync. A rebase replaces its
//! history with the primary's base images, region by region. Anything
//! wrong (a record out of order or failing its CRC, an older epoch, another
//! primary's journal) is refused with the reason, and the stream ends;
//! the primary reconnects and resumes from where this journal stands.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tidemark_journal::{Journal, Seq, Timestamp};
use tidemark_proto::v1 as pb;
use tidemark_proto::v1::replication_message::{self as msg, Message};
use tidemark_proto::v1::replication_reply::{self as reply, Reply};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::hash;
use crate::wire;

/// What the receiver needs from the daemon it runs in.
pub trait ReplicaHost: Send + Sync {
    /// The journal of the group `hello` names, kept here as a replica:
    /// made (with its volumes, by id) if this site does not hold it yet;
    /// a group primary here at an older epoch than the hello's is demoted
    /// first. An error refuses the stream (a group primary here at the
    /// same or a newer epoch refuses it with a fence, see [`crate::fence`]).
    fn replica_journal(&self, hello: &msg::Hello) -> Result<Journal, Box<Status>>;

    /// The primary of `group` said something (records or a heartbeat);
    /// `newest` is its newest seq as it says (0: not said). Feeds the
    /// failure detector.
    fn heard(&self, group: &str, newest: Seq);

    /// The heartbeat interval this site's failure detector expects from a
    /// primary; the primary is asked to send at it. `None`: no wish.
    fn heartbeat(&self) -> Option<std::time::Duration> {
        None
    }

    /// The primary that says `hello` (with `detach`) stops replicating
    /// its group here (`replica remove`): the copy here, if this site
    /// keeps one for that primary, follows no one from now on and its
    /// silence is no failure. Nothing is made or demoted.
    fn detach(&self, hello: &msg::Hello) -> Result<(), Box<Status>>;
}

/// The replication streams open on this site, one per group: a new one for
/// a group ends the old (the primary reconnected).
#[derive(Debug, Default)]
pub struct Receivers {
    open: Mutex<HashMap<String, watch::Sender<bool>>>,
}

type Replies = mpsc::Sender<Result<pb::ReplicationReply, Status>>;

fn refuse(reason: String) -> Status {
    Status::failed_precondition(reason)
}

async fn answer(out: &Replies, r: Reply) -> bool {
    out.send(Ok(pb::ReplicationReply { reply: Some(r) }))
        .await
        .is_ok()
}

fn position(journal: &Journal, heartbeat: Option<std::time::Duration>) -> Reply {
    let history = journal.history();
    Reply::Position(reply::Position {
        durable_seq: if journal.rebasing().is_some() {
            0
        } else {
            history.newest_seq
        },
        horizon_seq: history.horizon_seq,
        epoch: journal.epoch(),
        source_id: journal.source_id(),
        rebasing: journal.rebasing().is_some(),
        epochs: wire::epochs_to_wire(&journal.epoch_history()),
        heartbeat_ms: heartbeat.map_or(0, |d| d.as_millis().max(1) as u64),
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(refuse)
}

impl Receivers {
    /// A new, empty set.
    pub fn new() -> Arc<Receivers> {
        Arc::new(Receivers::default())
    }

    /// Ends the stream open for `group`, if any (the group was promoted
    /// here: its old primary's records must stop at once).
    pub fn end(&self, group: &str) {
        if let Some(stop) = self.open.lock().remove(group) {
            let _ = stop.send(true);
        }
    }

    /// Ends every open stream (this site shuts down: a primary keeps its
    /// stream open for as long as it may, and the server waits for it).
    pub fn end_all(&self) {
        for (_, stop) in self.open.lock().drain() {
            let _ = stop.send(true);
        }
    }

    /// Takes a replication stream: reads the hello, answers with where this
    /// site's copy stands, and applies the rest in the background. Returns
    /// the replies.
    pub async fn accept(
        self: &Arc<Self>,
        host: Arc<dyn ReplicaHost>,
        mut inbound: tonic::Streaming<pb::ReplicationMessage>,
    ) -> Result<mpsc::Receiver<Result<pb::ReplicationReply, Status>>, Status> {
        let hello = match inbound.message().await? {
            Some(pb::ReplicationMessage {
                message: Some(Message::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "a replication stream begins with a hello",
                ))
            }
        };
        if hello.version != 1 {
            return Err(refuse(format!(
                "replication protocol version {} is not spoken here (version 1 is)",
                hello.version
            )));
        }
        let group = hello.group.clone();
        if hello.detach {
            let host = host.clone();
            tokio::task::spawn_blocking(move || host.detach(&hello))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| *e)?;
            // Nothing to answer: the stream ends here.
            let (_, replies) = mpsc::channel(1);
            return Ok(replies);
        }
        let journal = {
            let (hello, host) = (hello.clone(), host.clone());
            tokio::task::spawn_blocking(move || host.replica_journal(&hello))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| *e)?
        };
        if journal.source_id() != 0 && journal.source_id() != hello.source_id {
            return Err(refuse(format!(
                "this site's copy of group {group} follows another journal (id {:#x}, the primary's is {:#x})",
                journal.source_id(),
                hello.source_id
            )));
        }
        if journal.epoch() > hello.epoch {
            return Err(refuse(format!(
                "group {group} is at epoch {} here, newer than the primary's {}: refusing records of an older epoch",
                journal.epoch(),
                hello.epoch
            )));
        }
        // (The journal's epoch here follows the records applied: it becomes
        // a record's epoch when that record arrives, so the epoch history
        // starts each epoch at the same seq on both sites.) The primary's
        // epoch is noted at once all the same: a takeover here must go
        // above it even if no record of it ever arrives.
        if hello.epoch > journal.highest_epoch() {
            let (journal, epoch) = (journal.clone(), hello.epoch);
            blocking(move || journal.note_epoch_seen(epoch).map_err(|e| e.to_string())).await?;
        }
        if journal.source_id() == 0 {
            let journal = journal.clone();
            let (source, horizon) = (hello.source_id, Timestamp::from_nanos(hello.horizon_ns));
            blocking(move || {
                // A new copy begins where the primary's history begins, so
                // records written there before this site took part follow.
                let history = journal.history();
                if history.newest_seq == 0 && history.horizon_time != horizon {
                    journal
                        .adopt_horizon_time(horizon)
                        .map_err(|e| e.to_string())?;
                }
                journal.set_source_id(source).map_err(|e| e.to_string())
            })
            .await?;
        }
        // (After the copy knows whom it follows: a copy that follows no one
        // is not watched.)
        host.heard(&group, hello.newest_seq);
        let (out, replies) = mpsc::channel(16);
        answer(&out, position(&journal, host.heartbeat())).await;
        let (stop, stopped) = watch::channel(false);
        if let Some(old) = self.open.lock().insert(group.clone(), stop) {
            let _ = old.send(true);
        }
        tracing::info!(
            group,
            durable = journal.history().newest_seq,
            "replication stream from the primary"
        );
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = apply(&journal, &*host, hello.epoch, inbound, &out, stopped).await;
            if let Err(status) = outcome {
                tracing::warn!(group, error = %status.message(), "replication stream refused");
                let _ = out.send(Err(status)).await;
            }
            let mut open = me.open.lock();
            if open
                .get(&group)
                .is_some_and(|s| s.is_closed() || *s.borrow())
            {
                open.remove(&group);
            }
        });
        Ok(replies)
    }
}

/// Applies a stream's messages until it ends, acknowledging durability as
/// it comes.
async fn apply(
    journal: &Journal,
    host: &dyn ReplicaHost,
    stream_epoch: u64,
    mut inbound: tonic::Streaming<pb::ReplicationMessage>,
    out: &Replies,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Status> {
    let (durable_tx, mut durable) = watch::channel(journal.history().newest_seq);
    let listener = journal.listen_durable(Arc::new(move |seq, _| {
        let _ = durable_tx.send(seq);
    }));
    let outcome = async {
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(pb::ReplicationMessage { message: Some(m) })) => {
                        let newest = match &m {
                            Message::Records(r) => r.last_seq,
                            Message::Heartbeat(h) => h.newest_seq,
                            _ => 0,
                        };
                        host.heard(&journal.group(), newest);
                        handle(journal, stream_epoch, m, out).await?;
                    }
                    Ok(Some(_)) => return Err(Status::invalid_argument("an empty replication message")),
                    Ok(None) | Err(_) => return Ok(()),
                },
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let seq = *durable.borrow();
                    if journal.rebasing().is_none()
                        && !answer(out, ack(journal, seq, 0)).await
                    {
                        return Ok(());
                    }
                }
                _ = stopped.changed() => return Ok(()),
            }
        }
    }
    .await;
    journal.stop_listening(listener);
    outcome
}

fn ack(journal: &Journal, durable_seq: Seq, sent_ns: i64) -> Reply {
    Reply::Ack(reply::Ack {
        durable_seq,
        sent_ns,
        epoch: journal.epoch(),
    })
}

/// Every message after the hello carries the stream's epoch (records carry
/// their own, checked where they are applied): one of another epoch is not
/// of this stream's primary, and a site that moved past it (promoted while
/// the stream was open) takes nothing more from it.
fn check_epoch(journal: &Journal, stream_epoch: u64, message: &Message) -> Result<(), String> {
    let (what, epoch) = match message {
        Message::Hello(_) | Message::Records(_) => return Ok(()),
        Message::Rebase(m) => ("a rebase", m.epoch),
        Message::Region(m) => ("a region", m.epoch),
        Message::RebaseDone(m) => ("the end of a rebase", m.epoch),
        Message::Heartbeat(m) => ("a heartbeat", m.epoch),
    };
    // 0: not said (a primary of an older build), or a group that never
    // changed hands, where there is nothing older to fence off.
    if epoch == 0 {
        return Ok(());
    }
    if epoch != stream_epoch {
        return Err(format!(
            "{what} of epoch {epoch} on a stream of group {} opened at epoch {stream_epoch}",
            journal.group()
        ));
    }
    if journal.epoch() > epoch {
        return Err(format!(
            "group {} is at epoch {} here, newer than {what}'s {epoch}",
            journal.group(),
            journal.epoch()
        ));
    }
    Ok(())
}

async fn handle(
    journal: &Journal,
    stream_epoch: u64,
    message: Message,
    out: &Replies,
) -> Result<(), Status> {
    check_epoch(journal, stream_epoch, &message).map_err(refuse)?;
    match message {
        Message::Hello(_) => Err(Status::invalid_argument("a second hello on one stream")),
        Message::Records(records) => {
            if records.epoch > stream_epoch {
                return Err(refuse(format!(
                    "records {}..={} claim epoch {}, past the primary's own epoch {stream_epoch}",
                    records.first_seq, records.last_seq, records.epoch
                )));
            }
            if records.epoch < journal.epoch() {
                return Err(refuse(format!(
                    "records {}..={} are of epoch {}, older than this site's {}",
                    records.first_seq,
                    records.last_seq,
                    records.epoch,
                    journal.epoch()
                )));
            }
            let raw = wire::unpack(&records).map_err(refuse)?;
            let journal = journal.clone();
            let (prev, epoch) = (records.prev_seq, records.epoch);
            blocking(move || {
                if epoch > journal.epoch() {
                    journal.set_epoch(epoch).map_err(|e| e.to_string())?;
                }
                journal
                    .append_shipped(prev, &raw)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Message::Heartbeat(beat) => {
            let seq = journal.history().newest_seq;
            if journal.rebasing().is_none() {
                answer(out, ack(journal, seq, beat.sent_ns)).await;
            }
            Ok(())
        }
        Message::Rebase(rebase) => {
            let journal = journal.clone();
            let region = u64::from(rebase.region_size).max(4096);
            let hashes = blocking(move || {
                journal
                    .begin_rebase(rebase.horizon_seq, Timestamp::from_nanos(rebase.horizon_ns))
                    .map_err(|e| e.to_string())?;
                journal
                    .volumes()
                    .into_iter()
                    .map(|v| {
                        hash::region_hashes(v.size, region, |offset, buf| {
                            journal.read_base(v.id, offset, buf)
                        })
                        .map(|h| reply::Hashes {
                            volume: v.id,
                            region_size: region as u32,
                            hashes: hash::pack(&h),
                        })
                        .map_err(|e| e.to_string())
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
            for h in hashes {
                if !answer(out, Reply::Hashes(h)).await {
                    break;
                }
            }
            Ok(())
        }
        Message::Region(region) => {
            let journal = journal.clone();
            blocking(move || {
                if region.zero {
                    journal
                        .zero_base(region.volume, region.offset, region.length)
                        .map_err(|e| e.to_string())
                } else if crc32c::crc32c(&region.data) != region.crc32c {
                    Err(format!(
                        "the region at offset {} of volume #{} fails its CRC",
                        region.offset, region.volume
                    ))
                } else {
                    journal
                        .write_base(region.volume, region.offset, &region.data)
                        .map_err(|e| e.to_string())
                }
            })
            .await
        }
        Message::RebaseDone(_) => {
            let done = journal.clone();
            let seq: Seq =
                blocking(move || done.finish_rebase().map_err(|e| e.to_string())).await?;
            tracing::info!(group = %journal.group(), horizon = seq, "rebased onto the primary's history");
            answer(out, position(journal, None)).await;
            Ok(())
        }
    }
}
