//! The primary's side of a replica: one [`Shipper`] per consistency group
//! and replica site. It connects to the replica's daemon, says hello, and
//! learns where the replica stands; ships the records the replica lacks
//! straight from the journal's segments (no second log), or — when the
//! replica has nothing yet, or lacks history this site no longer holds —
//! rebases it onto this site's base images, sending only the regions whose
//! hashes differ; then follows the journal as it grows. The replica
//! acknowledges what is durable in its own journal; the acknowledgements
//! move the retention hold, wake sync writes waiting in the
//! [`crate::gate`], and give the lag and RPO. A dropped or stalled link is
//! retried with a backoff and resumes from the replica's position.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tidemark_journal::epochs;
use tidemark_journal::{Journal, Point, RawCursor, Seq, Timestamp};
use tidemark_proto::v1 as pb;
use tidemark_proto::v1::replication_message::{self as msg, Message};
use tidemark_proto::v1::replication_reply::Reply;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::fence::{self, Fence, FenceSink};
use crate::hash::{self, REGION};
use crate::link::{self, Peer};
use crate::settings::{OnReplicaDown, ReplicaMode, ReplicationSettings};
use crate::status::{LinkState, ReplicaStatus};
use crate::wire;

/// Records a timeline event on the group (name, JSON body).
pub type EventSink = Arc<dyn Fn(&str, String) + Send + Sync>;

/// Bytes of records sent and not yet acknowledged before the shipper waits
/// for acknowledgements.
const WINDOW: u64 = 64 << 20;
/// Bytes of records read from the journal at a time.
const READ_BYTES: usize = 4 << 20;
/// How often the retention hold follows the acknowledgements (each move
/// stores the manifest).
const HOLD_EVERY: Duration = Duration::from_secs(2);
/// A link that heard nothing from the replica for this many heartbeats is
/// taken for dead.
const SILENT_HEARTBEATS: u32 = 25;

/// A message sent and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Sent {
    last_seq: Seq,
    first_time: Timestamp,
    last_time: Timestamp,
    bytes: u64,
    at: Instant,
}

#[derive(Debug)]
struct Progress {
    state: LinkState,
    acked_seq: Seq,
    acked_time: Timestamp,
    unacked: VecDeque<Sent>,
    /// The time of the oldest record not on the replica, when none is in
    /// flight (a link down while records wait).
    oldest_unshipped: Option<Timestamp>,
    sent_bytes: u64,
    resync_bytes: u64,
    last_error: Option<String>,
    /// What sync writes wait for now: `Sync` or `Async`.
    effective: ReplicaMode,
    /// Dropped to async by `on_replica_down = degrade`.
    degraded: bool,
    /// Smoothed time from sending records to their acknowledgement.
    ack_latency: Option<Duration>,
    /// Since when the replica has been caught up (adaptive: the way back
    /// to sync).
    caught_up_since: Option<Instant>,
    alerting: bool,
    last_verified: Option<String>,
    expendable: bool,
    last_heard: Instant,
    /// A reconnected replica catching up by journal position: the seqs it
    /// lacked and the bytes sent before.
    catching_up: Option<CatchUp>,
}

/// A catch-up by journal position, reported once it completes.
#[derive(Debug, Clone, Copy)]
struct CatchUp {
    from: Seq,
    to: Seq,
    sent_before: u64,
    /// The replica had nothing before: this is its initial sync.
    initial: bool,
}

/// What the shipper, the gate and status readers share.
pub(crate) struct ShipperShared {
    pub(crate) group: String,
    pub(crate) peer: Peer,
    pub(crate) mode: ReplicaMode,
    pub(crate) journal: Journal,
    pub(crate) settings: Arc<ReplicationSettings>,
    events: EventSink,
    /// Told when the replica turns out to be a newer primary.
    fenced: FenceSink,
    progress: Mutex<Progress>,
    acked: Condvar,
    hold: String,
    /// Set once the shipper stops: waiting writes go on without it.
    stopped: std::sync::atomic::AtomicBool,
    /// Held while the hold's expendability changes (the watcher and a
    /// session starting both change it).
    hold_changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ShipperShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper")
            .field("group", &self.group)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Ships one consistency group to one replica site, for as long as it
/// lives.
#[derive(Debug)]
pub struct Shipper {
    pub(crate) shared: Arc<ShipperShared>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The retention hold a replica at `address` keeps.
pub fn hold_name(address: &str) -> String {
    format!("replica:{address}")
}

impl Shipper {
    /// Starts shipping `journal` (group `group`) to `peer` in `mode`, on
    /// the current tokio runtime.
    pub fn start(
        group: &str,
        journal: Journal,
        peer: Peer,
        mode: ReplicaMode,
        settings: Arc<ReplicationSettings>,
        events: EventSink,
        fenced: FenceSink,
    ) -> Shipper {
        let history = journal.history();
        let shared = Arc::new(ShipperShared {
            group: group.to_string(),
            hold: hold_name(&peer.address),
            peer,
            mode,
            settings,
            events,
            fenced,
            progress: Mutex::new(Progress {
                state: LinkState::Connecting,
                acked_seq: 0,
                acked_time: history.horizon_time,
                unacked: VecDeque::new(),
                oldest_unshipped: None,
                sent_bytes: 0,
                resync_bytes: 0,
                last_error: None,
                effective: match mode {
                    ReplicaMode::Async => ReplicaMode::Async,
                    _ => ReplicaMode::Sync,
                },
                degraded: false,
                ack_latency: None,
                caught_up_since: None,
                alerting: false,
                last_verified: None,
                expendable: false,
                last_heard: Instant::now(),
                catching_up: None,
            }),
            acked: Condvar::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            hold_changes: tokio::sync::Mutex::new(()),
            journal,
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(shared.clone().run(stopped));
        Shipper {
            shared,
            stop,
            task: Some(task),
        }
    }

    /// Where the replica stands now.
    pub fn status(&self) -> ReplicaStatus {
        self.shared.status()
    }

    /// The consistency group shipped.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// The replica site's address.
    pub fn address(&self) -> &str {
        &self.shared.peer.address
    }

    /// `replica remove`: stops shipping, tells the replica site that it no
    /// longer follows this one — so it does not take this site's silence
    /// for a failure — and releases the retention hold.
    pub async fn remove(self) {
        let shared = self.shared.clone();
        self.stop(true).await;
        let told = tokio::time::timeout(DETACH_TIMEOUT, shared.detach())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {DETACH_TIMEOUT:?}")));
        match told {
            Ok(()) => {
                tracing::info!(group = %shared.group, replica = %shared.peer.address, "the replica site no longer follows this one")
            }
            Err(e) => {
                tracing::warn!(group = %shared.group, replica = %shared.peer.address, error = %e, "the replica site could not be told that replication stopped; with failover.auto on there it may take over: remove the group there, or promote it deliberately")
            }
        }
    }

    /// Stops shipping and waits for the link to close; the retention hold
    /// stays unless `release_hold`.
    pub async fn stop(mut self, release_hold: bool) {
        self.shared.halt();
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if release_hold {
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if shared.journal.holds().contains_key(&shared.hold) {
                    let _ = shared.journal.release_hold(&shared.hold);
                }
            })
            .await;
        }
    }

    /// Compares this site's volumes at `seq` with the replica's, region by
    /// region.
    pub async fn verify(&self, seq: Seq) -> Result<Verification, String> {
        self.shared.verify(seq).await
    }

    /// A handle that verifies without holding on to the shipper.
    pub fn verifier(&self) -> Verifier {
        Verifier(self.shared.clone())
    }
}

/// Verifies a replica; see [`Shipper::verifier`].
#[derive(Debug, Clone)]
pub struct Verifier(Arc<ShipperShared>);

impl Verifier {
    /// Compares this site's volumes at `seq` with the replica's.
    pub async fn verify(&self, seq: Seq) -> Result<Verification, String> {
        self.0.verify(seq).await
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.shared.halt();
        let _ = self.stop.send(true);
    }
}

/// The outcome of comparing both sites at one seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// The point compared.
    pub seq: Seq,
    /// Regions that differ: (volume name, offset, length).
    pub differences: Vec<(String, u64, u64)>,
    /// The content hash of the point on this site.
    pub hash: String,
    /// Regions compared.
    pub regions: u64,
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Asked to stop.
    Stopped,
    /// The link (or the replica) failed; try again.
    Failed(String),
}

impl From<String> for End {
    fn from(e: String) -> End {
        End::Failed(e)
    }
}

/// Reads the state a rebase sends: the base image at the horizon, or the
/// volume at a later seq.
fn read_state(
    journal: &Journal,
    id: u32,
    name: &str,
    seq: Seq,
    offset: u64,
    buf: &mut [u8],
) -> tidemark_journal::Result<()> {
    if seq <= journal.history().horizon_seq {
        journal.read_base(id, offset, buf)
    } else {
        journal.read(name, offset, buf, Point::Seq(seq)).map(|_| ())
    }
}

/// A replica's epoch history, from its position.
fn their_history(p: &pb::replication_reply::Position) -> epochs::History {
    wire::history_from_wire(&p.epochs, p.durable_seq)
}

fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    }
}

impl ShipperShared {
    /// Marks the shipper stopped and wakes writes waiting for it.
    fn halt(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _p = self.progress.lock();
        self.acked.notify_all();
    }

    fn set_state(&self, state: LinkState) {
        self.progress.lock().state = state;
    }

    fn event(&self, name: &str, body: serde_json::Value) {
        (self.events)(name, body.to_string());
    }

    fn status(&self) -> ReplicaStatus {
        let history = self.journal.history();
        let p = self.progress.lock();
        let now = Timestamp::now();
        let caught_up = p.acked_seq >= history.newest_seq;
        let seconds = |from: Timestamp, to: Timestamp| {
            (to.as_nanos().saturating_sub(from.as_nanos())).max(0) as f64 / 1e9
        };
        let oldest = p
            .unacked
            .front()
            .map(|s| s.first_time)
            .or(p.oldest_unshipped);
        let (lag, rpo) = if caught_up {
            (0.0, 0.0)
        } else {
            (
                seconds(p.acked_time, history.newest_time),
                oldest.map_or(0.0, |t| seconds(t, now)),
            )
        };
        let in_flight: u64 = p.unacked.iter().map(|s| s.bytes).sum();
        let after = p.unacked.back().map_or(p.acked_seq, |s| s.last_seq);
        ReplicaStatus {
            group: self.group.clone(),
            address: self.peer.address.clone(),
            state: p.state,
            mode: self.mode,
            effective_mode: p.effective,
            acked_seq: p.acked_seq,
            newest_seq: history.newest_seq,
            lag_seconds: lag,
            rpo_seconds: rpo,
            lag_bytes: if caught_up {
                0
            } else {
                in_flight + self.journal.bytes_after(after)
            },
            sent_bytes: p.sent_bytes,
            resync_bytes: p.resync_bytes,
            last_error: p.last_error.clone(),
            last_verified: p.last_verified.clone(),
            rpo_alert: p.alerting,
        }
    }

    /// Whether sync writes begun now wait for this replica (see
    /// [`ShipperShared::wait_acked`]).
    pub(crate) fn holds_sync_writes(&self) -> bool {
        !self.stopped.load(std::sync::atomic::Ordering::SeqCst)
            && self.progress.lock().effective == ReplicaMode::Sync
    }

    /// Waits until the replica holds `seq`, as the gate asks for a sync
    /// write; see [`crate::gate`].
    pub(crate) fn wait_acked(&self, seq: Seq) -> Result<(), String> {
        let mut p = self.progress.lock();
        let started = Instant::now();
        let deadline = started + self.settings.sync_timeout;
        let mut warned = false;
        loop {
            if p.acked_seq >= seq
                || p.effective != ReplicaMode::Sync
                || self.stopped.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(());
            }
            match self.settings.on_replica_down {
                OnReplicaDown::Degrade => {
                    if self.acked.wait_until(&mut p, deadline).timed_out() && p.acked_seq < seq {
                        if p.effective != ReplicaMode::Sync {
                            return Ok(());
                        }
                        p.effective = ReplicaMode::Async;
                        p.degraded = true;
                        let acked = p.acked_seq;
                        drop(p);
                        tracing::warn!(group = %self.group, replica = %self.peer.address, seq, acked, "the sync replica did not answer in time; degrading it to async");
                        self.event(
                            "replica-degraded",
                            serde_json::json!({
                                "replica": self.peer.address,
                                "waited_seq": seq,
                                "acked_seq": acked,
                                "to": "async",
                            }),
                        );
                        // RPO is no longer 0: someone must hear of it.
                        self.run_alert_command("replica-degraded", self.status().rpo_seconds);
                        return Ok(());
                    }
                }
                OnReplicaDown::Block => {
                    self.acked.wait_for(&mut p, Duration::from_millis(500));
                    if !warned && started.elapsed() >= self.settings.sync_timeout {
                        warned = true;
                        tracing::warn!(group = %self.group, replica = %self.peer.address, seq, "sync writes wait for the replica (on_replica_down = block)");
                    }
                }
            }
        }
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (durable_tx, durable_rx) = watch::channel(self.journal.history().newest_seq);
        let listener = self.journal.listen_durable(Arc::new(move |seq, _| {
            let _ = durable_tx.send(seq);
        }));
        // Lag limits and RPO alerts are watched whether or not the link is
        // up: a replica that stays away must still stop holding retention
        // back, and its RPO must still raise the alert.
        let watcher = {
            let me = self.clone();
            let mut stop = stop.clone();
            let mut every = HOLD_EVERY.min(self.settings.heartbeat * 5);
            if self.mode == ReplicaMode::Adaptive {
                // Soon enough to go async about when `adaptive_lag` says.
                every = every.min((self.settings.adaptive_lag / 2).max(Duration::from_millis(50)));
            }
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => me.watch().await,
                        _ = stop.changed() => break,
                    }
                }
            })
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                break;
            }
            self.set_state(LinkState::Connecting);
            let began = Instant::now();
            match self.session(&mut stop, durable_rx.clone()).await {
                End::Stopped => break,
                End::Failed(e) => {
                    tracing::warn!(group = %self.group, replica = %self.peer.address, error = %e, "replication link failed; retrying");
                    {
                        let mut p = self.progress.lock();
                        p.state = LinkState::Disconnected;
                        p.last_error = Some(e);
                        // Records in flight were not acknowledged: the next
                        // session sends them again from the replica's position.
                        p.unacked.clear();
                    }
                    self.acked.notify_all();
                    self.note_unshipped().await;
                    if began.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        watcher.abort();
        self.journal.stop_listening(listener);
        self.set_state(LinkState::Disconnected);
    }

    /// One round of the watcher: the RPO of a link that is down, the lag
    /// limit, the RPO alert.
    async fn watch(&self) {
        // Behind with nothing in flight (the link is down, or a send is
        // stuck): the oldest record the replica lacks dates the RPO.
        let idle = {
            let newest = self.journal.history().newest_seq;
            let p = self.progress.lock();
            p.unacked.is_empty() && p.acked_seq < newest
        };
        if idle {
            self.note_unshipped().await;
        }
        // An adaptive replica that falls silent goes async here: no
        // acknowledgement arrives to make that decision.
        self.adapt();
        self.limit_lag().await;
        self.watch_rpo();
    }

    /// While the link is down: the time of the oldest record the replica
    /// lacks, so the RPO grows as it should.
    async fn note_unshipped(&self) {
        let journal = self.journal.clone();
        // (What retention passed is gone: the oldest record the replica
        // lacks that still exists follows the horizon.)
        let acked = self.progress.lock().acked_seq;
        let from = (acked + 1).max(journal.history().horizon_seq + 1);
        let time = tokio::task::spawn_blocking(move || {
            journal
                .read_raw(from, None, 1)
                .ok()
                .and_then(|b| b.records.first().map(|r| r.time()))
        })
        .await
        .ok()
        .flatten();
        // Unless an acknowledgement (or a send) came meanwhile: the time
        // read would then date records the replica already has.
        let mut p = self.progress.lock();
        if p.acked_seq == acked && p.unacked.is_empty() {
            p.oldest_unshipped = time;
        }
    }

    /// Tells the replica site, on a stream of its own, that this site
    /// stops replicating the group to it.
    async fn detach(&self) -> Result<(), String> {
        let mut client = link::connect(&self.peer).await?;
        let mut hello = self.hello();
        if let Some(Message::Hello(h)) = &mut hello.message {
            h.detach = true;
        }
        let messages = tokio_stream::iter(vec![hello]);
        let mut inbound = client
            .replicate(messages)
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        // The replica ends the stream once the copy there follows no one
        // (or refuses).
        loop {
            match inbound.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(s) => return Err(status_text(&s)),
            }
        }
    }

    fn hello(&self) -> pb::ReplicationMessage {
        let history = self.journal.history();
        pb::ReplicationMessage {
            message: Some(Message::Hello(msg::Hello {
                group: self.group.clone(),
                volumes: self
                    .journal
                    .volumes()
                    .iter()
                    .map(|v| pb::ReplicatedVolume {
                        id: v.id,
                        name: v.name.clone(),
                        size: v.size,
                    })
                    .collect(),
                epoch: self.journal.epoch(),
                horizon_seq: history.horizon_seq,
                horizon_ns: history.horizon_time.as_nanos(),
                newest_seq: history.newest_seq,
                source_id: self.journal.group_id(),
                version: 1,
                epochs: wire::epochs_to_wire(&self.journal.epoch_history()),
                detach: false,
            })),
        }
    }

    async fn session(
        self: &Arc<Self>,
        stop: &mut watch::Receiver<bool>,
        durable: watch::Receiver<Seq>,
    ) -> End {
        let mut client = tokio::select! {
            c = link::connect(&self.peer) => match c {
                Ok(c) => c,
                Err(e) => return End::Failed(e),
            },
            _ = stop.changed() => return End::Stopped,
        };
        let (out, out_rx) = mpsc::channel::<pb::ReplicationMessage>(8);
        if out.send(self.hello()).await.is_err() {
            return End::Failed("the outgoing stream closed".into());
        }
        let call = client.replicate(ReceiverStream::new(out_rx));
        let mut inbound = tokio::select! {
            r = call => match r {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    if let Some(fence) = fence::from_status(&s, &self.group, &self.peer.address) {
                        if fence.epoch > self.journal.epoch() {
                            (self.fenced)(fence);
                        }
                    }
                    return End::Failed(format!("the replica refused the stream: {}", status_text(&s)));
                }
            },
            _ = stop.changed() => return End::Stopped,
        };
        // A replica that never answers the hello is as dead as one that
        // stops answering heartbeats.
        let silence = self.settings.heartbeat * SILENT_HEARTBEATS;
        let position = match tokio::time::timeout(silence, next_reply(&mut inbound, stop)).await {
            Ok(Ok(Reply::Position(p))) => p,
            Ok(Ok(other)) => {
                return End::Failed(format!("the replica answered hello with {other:?}"))
            }
            Ok(Err(e)) => return e,
            Err(_) => {
                return End::Failed(format!(
                    "the replica did not answer the hello within {silence:?}"
                ))
            }
        };
        if let Err(e) = self.check_position(&position) {
            return End::Failed(e);
        }
        let beat = asked_heartbeat(position.heartbeat_ms, self.settings.heartbeat);
        if beat != self.settings.heartbeat {
            tracing::info!(group = %self.group, replica = %self.peer.address, heartbeat = ?beat, "sending heartbeats at the interval the replica's detector expects");
        }
        self.progress.lock().last_heard = Instant::now();
        self.bind_hold().await;
        let history = self.journal.history();
        tracing::info!(
            group = %self.group,
            replica = %self.peer.address,
            replica_seq = position.durable_seq,
            replica_rebasing = position.rebasing,
            horizon = history.horizon_seq,
            newest = history.newest_seq,
            hold = ?self.journal.holds().get(&self.hold),
            "replication link up"
        );
        // A replica whose history left ours (it was a primary once, and
        // wrote what we never had) is rebased onto ours; the daemon kept
        // what it wrote as a branch when it was demoted.
        let common = epochs::common_point(&self.journal.epochs(), &their_history(&position));
        let diverged = position.durable_seq > common;
        let lacks_history = diverged
            || position.durable_seq < history.horizon_seq
            || position.durable_seq > history.newest_seq
            || position.rebasing
            || (position.durable_seq == 0 && history.horizon_seq == 0 && position.horizon_seq > 0);
        let start = if lacks_history || (position.durable_seq == 0 && history.horizon_seq > 0) {
            let target = if diverged {
                match self.past_the_branch(&position, common).await {
                    Ok(target) => target,
                    Err(e) => return e,
                }
            } else {
                (history.horizon_seq, history.horizon_time)
            };
            match self
                .rebase(&out, &mut inbound, stop, &position, target)
                .await
            {
                Ok(next) => next,
                Err(e) => return e,
            }
        } else {
            self.acked_to(position.durable_seq, None);
            if let Err(e) = self.keep_hold(position.durable_seq).await {
                return End::Failed(e);
            }
            position.durable_seq + 1
        };
        let initial = position.durable_seq == 0 && !position.rebasing;
        let newest = self.journal.history().newest_seq;
        {
            let mut p = self.progress.lock();
            if start <= newest {
                // A catch-up cut short by another disconnect goes on: one
                // report covers it all.
                let sent_before = p.sent_bytes;
                let c = p.catching_up.get_or_insert(CatchUp {
                    from: start,
                    to: newest,
                    sent_before,
                    initial,
                });
                c.to = c.to.max(newest);
            }
            p.state = if p.catching_up.is_some_and(|c| c.initial) {
                LinkState::InitialSync
            } else {
                LinkState::Streaming
            };
        }
        self.progress.lock().last_error = None;
        self.stream(start, out, inbound, durable, stop, beat).await
    }

    fn check_position(&self, p: &pb::replication_reply::Position) -> Result<(), String> {
        if p.source_id != 0 && p.source_id != self.journal.group_id() {
            return Err(format!(
                "the replica's copy of group {} follows another journal (id {:#x}, this one is {:#x}); remove it there to replicate this one",
                self.group,
                p.source_id,
                self.journal.group_id()
            ));
        }
        if p.epoch > self.journal.epoch() {
            (self.fenced)(Fence {
                group: self.group.clone(),
                epoch: p.epoch,
                history: their_history(p),
                by: self.peer.address.clone(),
            });
            return Err(format!(
                "the replica's copy of group {} is at epoch {}, newer than this site's {}: this site is not the primary",
                self.group,
                p.epoch,
                self.journal.epoch()
            ));
        }
        Ok(())
    }

    /// Holds retention at `seq` (at least): the replica needs what follows.
    async fn keep_hold(&self, seq: Seq) -> Result<(), String> {
        let journal = self.journal.clone();
        let hold = self.hold.clone();
        tokio::task::spawn_blocking(move || {
            let at = seq.max(journal.history().horizon_seq);
            if journal.holds().get(&hold) != Some(&at) {
                journal.set_hold(&hold, at).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// A replica that was a primary once holds a branch of its own past
    /// `common`, the point both agree on: it is rebased onto this site's
    /// newest state, at a seq above its branch (seqs are skipped here if
    /// need be, and the divergence is an event on the timeline, which the
    /// replica receives too). Returns the seq to rebase at.
    async fn past_the_branch(
        &self,
        position: &pb::replication_reply::Position,
        common: Seq,
    ) -> Result<(Seq, Timestamp), End> {
        let branch_end = position.durable_seq;
        self.journal.skip_seqs_past(branch_end);
        tracing::warn!(group = %self.group, replica = %self.peer.address, common, branch_end, "the replica holds a branch of its own: rebasing it onto this site");
        self.event(
            "replica-diverged",
            serde_json::json!({
                "replica": self.peer.address,
                "common_seq": common,
                "branch": {"from": common + 1, "to": branch_end},
                "replica_epoch": position.epoch,
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let history = self.journal.history();
            let newest = history.newest_seq;
            if newest > branch_end {
                return Ok((newest, history.newest_time));
            }
            if Instant::now() > deadline {
                return Err(End::Failed(format!(
                    "the replica's branch reaches seq {branch_end}; this site's newest is still {newest}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rebases the replica onto this site's state at `target` (at least
    /// the horizon): it answers with its region hashes, the regions that
    /// differ are sent. Returns the first seq to stream.
    async fn rebase(
        self: &Arc<Self>,
        out: &mpsc::Sender<pb::ReplicationMessage>,
        inbound: &mut tonic::Streaming<pb::ReplicationReply>,
        stop: &mut watch::Receiver<bool>,
        position: &pb::replication_reply::Position,
        target: (Seq, Timestamp),
    ) -> Result<Seq, End> {
        let initial = position.durable_seq == 0 && !position.rebasing;
        self.set_state(if initial {
            LinkState::InitialSync
        } else {
            LinkState::Resyncing
        });
        let history = self.journal.history();
        let horizon = history.horizon_seq.max(target.0);
        // The state sent must hold still while it is read.
        self.keep_hold(horizon).await?;
        let history = self.journal.history();
        if history.horizon_seq > horizon {
            return Err(End::Failed(
                "retention moved the horizon during a rebase".into(),
            ));
        }
        let time = if horizon == target.0 {
            target.1
        } else {
            history.horizon_time
        };
        send(
            out,
            Message::Rebase(msg::Rebase {
                horizon_seq: horizon,
                horizon_ns: time.as_nanos(),
                region_size: REGION as u32,
                epoch: self.journal.epoch(),
            }),
        )
        .await?;
        let volumes = self.journal.volumes();
        let mut sent = 0u64;
        let mut differing = 0u64;
        for _ in &volumes {
            let theirs = match next_reply(inbound, stop).await? {
                Reply::Hashes(h) => h,
                other => {
                    return Err(End::Failed(format!(
                        "the replica answered a rebase with {other:?}"
                    )))
                }
            };
            let Some(volume) = volumes.iter().find(|v| v.id == theirs.volume) else {
                return Err(End::Failed(format!(
                    "the replica sent hashes of volume #{}, which group {} does not hold",
                    theirs.volume, self.group
                )));
            };
            let their_hashes = hash::unpack(&theirs.hashes).ok_or_else(|| {
                End::Failed("the replica's region hashes are malformed".to_string())
            })?;
            let journal = self.journal.clone();
            let (id, size) = (volume.id, volume.size);
            let name = volume.name.clone();
            let ours = tokio::task::spawn_blocking(move || {
                hash::region_hashes(size, REGION, |offset, buf| {
                    read_state(&journal, id, &name, horizon, offset, buf)
                })
            })
            .await
            .map_err(|e| End::Failed(e.to_string()))?
            .map_err(|e| End::Failed(e.to_string()))?;
            for (i, ours) in ours.iter().enumerate() {
                if their_hashes.get(i) == Some(ours) {
                    continue;
                }
                let offset = i as u64 * REGION;
                let len = REGION.min(size - offset) as usize;
                let journal = self.journal.clone();
                let name = volume.name.clone();
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    read_state(&journal, id, &name, horizon, offset, &mut buf).map(|()| buf)
                })
                .await
                .map_err(|e| End::Failed(e.to_string()))?
                .map_err(|e| End::Failed(e.to_string()))?;
                let zero = data.iter().all(|&b| b == 0);
                let region = if zero {
                    msg::Region {
                        volume: id,
                        offset,
                        data: Vec::new(),
                        zero: true,
                        crc32c: 0,
                        length: len as u64,
                        epoch: self.journal.epoch(),
                    }
                } else {
                    sent += data.len() as u64;
                    msg::Region {
                        volume: id,
                        offset,
                        crc32c: crc32c::crc32c(&data),
                        length: data.len() as u64,
                        data,
                        zero: false,
                        epoch: self.journal.epoch(),
                    }
                };
                differing += 1;
                send(out, Message::Region(region)).await?;
            }
        }
        send(
            out,
            Message::RebaseDone(msg::RebaseDone {
                epoch: self.journal.epoch(),
            }),
        )
        .await?;
        let done = match next_reply(inbound, stop).await? {
            Reply::Position(p) => p,
            other => {
                return Err(End::Failed(format!(
                    "the replica answered the end of a rebase with {other:?}"
                )))
            }
        };
        if done.durable_seq != horizon || done.rebasing {
            return Err(End::Failed(format!(
                "the replica ended the rebase at seq {} (rebasing: {}), not at {horizon}",
                done.durable_seq, done.rebasing
            )));
        }
        self.progress.lock().resync_bytes += sent;
        self.acked_to(horizon, Some(history.horizon_time));
        self.event(
            if initial {
                "replica-initial-sync"
            } else {
                "replica-resync"
            },
            serde_json::json!({
                "replica": self.peer.address,
                "kind": "regions",
                "horizon_seq": horizon,
                "regions": differing,
                "bytes": sent,
                "replica_had_seq": position.durable_seq,
            }),
        );
        tracing::info!(group = %self.group, replica = %self.peer.address, horizon, regions = differing, bytes = sent, initial, "replica rebased onto this site's base images");
        Ok(horizon + 1)
    }

    /// Records that the replica holds everything up to `seq`.
    fn acked_to(&self, seq: Seq, time: Option<Timestamp>) {
        let mut p = self.progress.lock();
        if seq < p.acked_seq {
            return;
        }
        p.acked_seq = seq;
        if let Some(time) = time {
            p.acked_time = time;
        }
        let now = Instant::now();
        while let Some(front) = p.unacked.front().copied() {
            if front.last_seq > seq {
                break;
            }
            p.unacked.pop_front();
            p.acked_time = p.acked_time.max(front.last_time);
            let took = now.duration_since(front.at);
            p.ack_latency = Some(match p.ack_latency {
                Some(old) => (old * 7 + took) / 8,
                None => took,
            });
        }
        p.oldest_unshipped = None;
        p.last_heard = now;
        let caught_up = p
            .catching_up
            .filter(|c| seq >= c.to)
            .map(|c| (c, p.sent_bytes - c.sent_before));
        if caught_up.is_some() {
            p.catching_up = None;
            if p.state == LinkState::InitialSync {
                p.state = LinkState::Streaming;
            }
        }
        drop(p);
        self.acked.notify_all();
        if let Some((c, bytes)) = caught_up {
            tracing::info!(group = %self.group, replica = %self.peer.address, from = c.from, to = c.to, bytes, "the replica caught up by journal position");
            self.event(
                if c.initial {
                    "replica-initial-sync"
                } else {
                    "replica-resync"
                },
                serde_json::json!({
                    "replica": self.peer.address,
                    "kind": "journal",
                    "from_seq": c.from,
                    "to_seq": c.to,
                    "bytes": bytes,
                }),
            );
        }
    }

    async fn stream(
        self: &Arc<Self>,
        start: Seq,
        out: mpsc::Sender<pb::ReplicationMessage>,
        mut inbound: tonic::Streaming<pb::ReplicationReply>,
        mut durable: watch::Receiver<Seq>,
        stop: &mut watch::Receiver<bool>,
        beat: Duration,
    ) -> End {
        let mut next = start;
        let mut cursor: Option<RawCursor> = None;
        let mut heartbeat = tokio::time::interval(beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(HOLD_EVERY.min(self.settings.heartbeat * 5));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_hold = Instant::now();
        let mut last_verify = Instant::now();
        loop {
            let in_flight: u64 = self.progress.lock().unacked.iter().map(|s| s.bytes).sum();
            if in_flight < WINDOW && next <= self.journal.history().newest_seq {
                let journal = self.journal.clone();
                let from = next;
                let read =
                    tokio::task::spawn_blocking(move || journal.read_raw(from, cursor, READ_BYTES))
                        .await;
                let batch = match read {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(e)) => {
                        return End::Failed(format!("reading the journal at seq {from}: {e}"))
                    }
                    Err(e) => return End::Failed(e.to_string()),
                };
                cursor = Some(batch.cursor);
                if !batch.records.is_empty() {
                    let mut prev = batch.prev_seq;
                    // One message per epoch run: the epoch travels with them.
                    let mut rest = &batch.records[..];
                    while let Some(first) = rest.first() {
                        let run = rest.iter().take_while(|r| r.epoch == first.epoch).count();
                        let (chunk, tail) = rest.split_at(run);
                        rest = tail;
                        let Some(records) = wire::pack(prev, chunk) else {
                            continue;
                        };
                        prev = records.last_seq;
                        let bytes = records.records.len() as u64;
                        let sent = Sent {
                            last_seq: records.last_seq,
                            first_time: chunk[0].time(),
                            last_time: chunk[chunk.len() - 1].time(),
                            bytes,
                            at: Instant::now(),
                        };
                        if let Err(e) = send(&out, Message::Records(records)).await {
                            return e;
                        }
                        let mut p = self.progress.lock();
                        p.unacked.push_back(sent);
                        p.sent_bytes += bytes;
                    }
                    next = prev + 1;
                    continue;
                }
                // Nothing durable at `next` yet (a gap in this journal's
                // seqs is skipped by the cursor).
                next = next.max(batch.cursor.next_seq());
            }
            tokio::select! {
                _ = durable.changed() => {}
                reply = inbound.message() => match reply {
                    Ok(Some(pb::ReplicationReply { reply: Some(Reply::Ack(ack)) })) => {
                        if ack.epoch > self.journal.epoch() {
                            // Promoted there: the refusal of the next hello
                            // carries its history, and this site demotes.
                            return End::Failed(format!(
                                "the replica's copy of group {} is at epoch {}, newer than this site's {}",
                                self.group, ack.epoch, self.journal.epoch()
                            ));
                        }
                        self.acked_to(ack.durable_seq, None);
                        self.adapt();
                    }
                    Ok(Some(other)) => {
                        return End::Failed(format!("the replica sent {other:?} while streaming"));
                    }
                    Ok(None) => return End::Failed("the replica closed the stream".into()),
                    Err(s) => return End::Failed(format!("the replica ended the stream: {}", status_text(&s))),
                },
                _ = heartbeat.tick() => {
                    let history = self.journal.history();
                    let message = Message::Heartbeat(msg::Heartbeat {
                        newest_seq: history.newest_seq,
                        newest_ns: history.newest_time.as_nanos(),
                        sent_ns: Timestamp::now().as_nanos(),
                        epoch: self.journal.epoch(),
                    });
                    if let Err(e) = send(&out, message).await {
                        return e;
                    }
                    let silent = self.progress.lock().last_heard.elapsed();
                    if silent > self.settings.heartbeat.max(beat) * SILENT_HEARTBEATS {
                        return End::Failed(format!("the replica has said nothing for {silent:?}"));
                    }
                }
                _ = housekeeping.tick() => {
                    if last_hold.elapsed() >= HOLD_EVERY {
                        last_hold = Instant::now();
                        let acked = self.progress.lock().acked_seq;
                        if let Err(e) = self.keep_hold(acked).await {
                            tracing::warn!(group = %self.group, error = %e, "cannot move the replica's retention hold");
                        }
                    }
                    if let Some(every) = self.settings.verify_interval {
                        if last_verify.elapsed() >= every {
                            last_verify = Instant::now();
                            let me = self.clone();
                            tokio::spawn(async move { me.verify_and_record().await });
                        }
                    }
                }
                _ = stop.changed() => return End::Stopped,
            }
        }
    }

    /// Adaptive replicas: async while acknowledgements are slow or the
    /// replica lags, back to sync once it has kept up for a while.
    /// Degraded ones come back to sync once caught up.
    fn adapt(&self) {
        let newest = self.journal.history().newest_seq;
        let mut p = self.progress.lock();
        let caught_up = p.acked_seq >= newest;
        if caught_up {
            p.caught_up_since.get_or_insert_with(Instant::now);
        } else {
            p.caught_up_since = None;
        }
        let mut switch = None;
        if p.degraded && caught_up {
            p.degraded = false;
            p.effective = ReplicaMode::Sync;
            switch = Some(("replica-caught-up", "sync"));
        } else if self.mode == ReplicaMode::Adaptive && !p.degraded {
            let slow = p
                .ack_latency
                .is_some_and(|l| l > self.settings.adaptive_latency);
            let lag = self.settings.adaptive_lag;
            let behind = p.unacked.front().is_some_and(|s| s.at.elapsed() > lag)
                || (p.unacked.is_empty()
                    && !caught_up
                    && p.oldest_unshipped.is_some_and(|t| {
                        Timestamp::now().as_nanos().saturating_sub(t.as_nanos())
                            > lag.as_nanos() as i64
                    }));
            if p.effective == ReplicaMode::Sync && (slow || behind) {
                p.effective = ReplicaMode::Async;
                switch = Some(("replica-mode", "async"));
            } else if p.effective == ReplicaMode::Async
                && !slow
                && p.caught_up_since
                    .is_some_and(|t| t.elapsed() >= Duration::from_secs(2))
            {
                p.effective = ReplicaMode::Sync;
                switch = Some(("replica-mode", "sync"));
            }
        }
        let latency = p.ack_latency.map(|l| l.as_secs_f64()).unwrap_or(0.0);
        drop(p);
        if let Some((name, to)) = switch {
            self.acked.notify_all();
            tracing::info!(group = %self.group, replica = %self.peer.address, to, "replication mode switched");
            self.event(
                name,
                serde_json::json!({
                    "replica": self.peer.address,
                    "to": to,
                    "ack_latency_seconds": latency,
                }),
            );
        }
    }

    /// A replica too far behind no longer holds retention back: it may be
    /// passed, and the window it lacks is recorded as a gap.
    async fn limit_lag(&self) {
        let _changing = self.hold_changes.lock().await;
        let status = self.status();
        // Only a replica that is away may be passed: one that is connected
        // is catching up, and passing it would only start another resync.
        let away = matches!(
            status.state,
            LinkState::Connecting | LinkState::Disconnected
        );
        let over = away && status.lag_bytes > self.settings.max_lag_bytes;
        let was = self.progress.lock().expendable;
        if over == was || (was && !over && away) {
            return;
        }
        self.set_expendable(over).await;
        if over {
            tracing::warn!(group = %self.group, replica = %self.peer.address, lag_bytes = status.lag_bytes, "the replica is too far behind to hold retention back");
            self.event(
                "replica-lagging",
                serde_json::json!({
                    "replica": self.peer.address,
                    "lag_bytes": status.lag_bytes,
                    "limit_bytes": self.settings.max_lag_bytes,
                    "acked_seq": status.acked_seq,
                }),
            );
        }
    }

    /// The hold binds retention again: the replica is back.
    async fn bind_hold(&self) {
        let _changing = self.hold_changes.lock().await;
        if self.progress.lock().expendable {
            self.set_expendable(false).await;
            tracing::info!(group = %self.group, replica = %self.peer.address, "the replica is back: its hold binds retention again");
        }
    }

    async fn set_expendable(&self, expendable: bool) {
        self.progress.lock().expendable = expendable;
        let journal = self.journal.clone();
        let hold = self.hold.clone();
        let set = tokio::task::spawn_blocking(move || {
            if journal.holds().contains_key(&hold) {
                journal.set_hold_expendable(&hold, expendable)
            } else {
                Ok(())
            }
        })
        .await;
        if let Ok(Err(e)) = set {
            tracing::warn!(group = %self.group, replica = %self.peer.address, error = %e, "cannot change the replica's retention hold");
        }
    }

    /// Raises (and clears) the RPO alert.
    fn watch_rpo(&self) {
        let Some(limit) = self.settings.rpo_alert else {
            return;
        };
        let status = self.status();
        let over = status.rpo_seconds > limit.as_secs_f64();
        let mut p = self.progress.lock();
        if over == p.alerting {
            return;
        }
        p.alerting = over;
        drop(p);
        if !over {
            tracing::info!(group = %self.group, replica = %self.peer.address, "RPO back under the alert threshold");
            return;
        }
        tracing::warn!(group = %self.group, replica = %self.peer.address, rpo_seconds = status.rpo_seconds, limit_seconds = limit.as_secs_f64(), "RPO alert");
        self.event(
            "rpo-alert",
            serde_json::json!({
                "replica": self.peer.address,
                "rpo_seconds": status.rpo_seconds,
                "limit_seconds": limit.as_secs_f64(),
                "acked_seq": status.acked_seq,
            }),
        );
        self.run_alert_command("rpo-alert", status.rpo_seconds);
    }

    /// Runs `[replication] alert_command`, if one is set, for `alert`
    /// (`rpo-alert`, `replica-degraded`: the event's name, in
    /// `TIDEMARK_ALERT`); it is not waited for.
    fn run_alert_command(&self, alert: &str, rpo_seconds: f64) {
        let Some(command) = &self.settings.alert_command else {
            return;
        };
        let spawned = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("TIDEMARK_ALERT", alert)
            .env("TIDEMARK_GROUP", &self.group)
            .env("TIDEMARK_REPLICA", &self.peer.address)
            .env("TIDEMARK_RPO_SECONDS", format!("{rpo_seconds:.3}"))
            .stdin(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(e) => {
                tracing::warn!(command, error = %e, "cannot run the alert command")
            }
        }
    }

    async fn verify_and_record(self: Arc<Self>) {
        let seq = self.progress.lock().acked_seq;
        match self.verify(seq).await {
            Ok(v) => {
                let name = if v.differences.is_empty() {
                    "replica-verified"
                } else {
                    "replica-differs"
                };
                self.event(
                    name,
                    serde_json::json!({
                        "replica": self.peer.address,
                        "seq": v.seq,
                        "hash": v.hash,
                        "differing_regions": v.differences.len(),
                    }),
                );
            }
            Err(e) => {
                tracing::warn!(group = %self.group, replica = %self.peer.address, error = %e, "periodic replica verification failed")
            }
        }
    }

    async fn verify(&self, seq: Seq) -> Result<Verification, String> {
        let mut client = link::connect(&self.peer).await?;
        let theirs = client
            .region_hashes(pb::RegionHashesRequest {
                group: self.group.clone(),
                seq,
                region_size: REGION as u32,
            })
            .await
            .map_err(|s| format!("the replica cannot hash seq {seq}: {}", status_text(&s)))?
            .into_inner();
        let journal = self.journal.clone();
        let ours = tokio::task::spawn_blocking(move || {
            journal
                .volumes()
                .into_iter()
                .map(|v| {
                    hash::region_hashes(v.size, REGION, |offset, buf| {
                        journal
                            .read(&v.name, offset, buf, Point::Seq(seq))
                            .map(|_| ())
                    })
                    .map(|h| (v, h))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mut differences = Vec::new();
        let mut all = Vec::new();
        for (volume, hashes) in &ours {
            let their = theirs
                .volumes
                .iter()
                .find(|h| h.volume == volume.id)
                .and_then(|h| hash::unpack(&h.hashes))
                .unwrap_or_default();
            for (i, h) in hashes.iter().enumerate() {
                if their.get(i) != Some(h) {
                    let offset = i as u64 * REGION;
                    differences.push((
                        volume.name.clone(),
                        offset,
                        REGION.min(volume.size - offset),
                    ));
                }
            }
            all.extend_from_slice(hashes);
        }
        let verification = Verification {
            seq,
            regions: all.len() as u64,
            hash: hash::combined(&all),
            differences,
        };
        self.progress.lock().last_verified = Some(format!(
            "{} at seq {seq}: {}",
            Timestamp::now(),
            if verification.differences.is_empty() {
                "equal"
            } else {
                "differs"
            }
        ));
        Ok(verification)
    }
}

async fn send(out: &mpsc::Sender<pb::ReplicationMessage>, message: Message) -> Result<(), End> {
    out.send(pb::ReplicationMessage {
        message: Some(message),
    })
    .await
    .map_err(|_| End::Failed("the link to the replica closed".into()))
}

async fn next_reply(
    inbound: &mut tonic::Streaming<pb::ReplicationReply>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Reply, End> {
    tokio::select! {
        reply = inbound.message() => match reply {
            Ok(Some(pb::ReplicationReply { reply: Some(reply) })) => Ok(reply),
            Ok(Some(_)) => Err(End::Failed("the replica sent an empty reply".into())),
            Ok(None) => Err(End::Failed("the replica closed the stream".into())),
            Err(s) => Err(End::Failed(format!("the replica ended the stream: {}", status_text(&s)))),
        },
        _ = stop.changed() => Err(End::Stopped),
    }
}

/// Bounds on the heartbeat interval a replica may ask for: a misconfigured
/// one neither floods the link nor silences the primary for minutes.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

/// How long `replica remove` waits to tell the replica site.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// The interval to send heartbeats at: what the replica's detector asks
/// for (`asked_ms`; 0: nothing), within sane bounds, else `own`.
fn asked_heartbeat(asked_ms: u64, own: Duration) -> Duration {
    if asked_ms == 0 {
        return own;
    }
    Duration::from_millis(asked_ms).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_go_at_the_interval_the_replica_asks_for_within_bounds() {
        let own = Duration::from_millis(200);
        assert_eq!(asked_heartbeat(0, own), own, "no wish: our own");
        assert_eq!(asked_heartbeat(50, own), Duration::from_millis(50));
        assert_eq!(asked_heartbeat(1_000, own), Duration::from_secs(1));
        assert_eq!(asked_heartbeat(1, own), MIN_HEARTBEAT);
        assert_eq!(asked_heartbeat(u64::MAX, own), MAX_HEARTBEAT);
    }
}
