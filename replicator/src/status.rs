//! Where a replica stands, as `volume show`, `replica list` and the
//! metrics report it.

use tidemark_journal::Seq;

use crate::settings::ReplicaMode;

/// The state of the link to a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting (or reconnecting, after a backoff).
    Connecting,
    /// The replica is taking the group's base images for the first time.
    InitialSync,
    /// Records flow as they become durable.
    Streaming,
    /// The replica lacked history the primary no longer holds: regions
    /// that differ are being sent.
    Resyncing,
    /// The link is down; the next attempt comes after a backoff.
    Disconnected,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkState::Connecting => "connecting",
            LinkState::InitialSync => "initial-sync",
            LinkState::Streaming => "streaming",
            LinkState::Resyncing => "resyncing",
            LinkState::Disconnected => "disconnected",
        })
    }
}

/// A replica's numbers, at one moment.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    /// The consistency group replicated.
    pub group: String,
    /// The replica site's address.
    pub address: String,
    /// The link's state.
    pub state: LinkState,
    /// The configured mode.
    pub mode: ReplicaMode,
    /// The mode writes wait for now (adaptive and degraded replicas).
    pub effective_mode: ReplicaMode,
    /// Newest seq durable on the replica.
    pub acked_seq: Seq,
    /// Newest seq durable here.
    pub newest_seq: Seq,
    /// Time between the newest record here and the newest on the replica.
    pub lag_seconds: f64,
    /// Age of the oldest record here not yet durable on the replica (0 when
    /// caught up).
    pub rpo_seconds: f64,
    /// Bytes of journal not yet durable on the replica (estimated from the
    /// segment catalogue for what is not yet sent).
    pub lag_bytes: u64,
    /// Bytes of records sent.
    pub sent_bytes: u64,
    /// Bytes of regions sent by initial syncs and resyncs.
    pub resync_bytes: u64,
    /// Why the link last failed.
    pub last_error: Option<String>,
    /// The last time the replica was proven equal, and at which seq.
    pub last_verified: Option<String>,
    /// An RPO alert is raised now.
    pub rpo_alert: bool,
}
