//! How replication behaves: the `[replication]` table of the daemon's
//! configuration, and the mode of each replica.

use std::time::Duration;

/// How a replica's acknowledgements gate sync writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaMode {
    /// A sync write is acknowledged once durable on the replica too.
    Sync,
    /// The replica follows as fast as it can; writes never wait for it.
    Async,
    /// Sync while the replica keeps up, async while it does not.
    Adaptive,
}

impl std::fmt::Display for ReplicaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaMode::Sync => "sync",
            ReplicaMode::Async => "async",
            ReplicaMode::Adaptive => "adaptive",
        })
    }
}

impl std::str::FromStr for ReplicaMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(ReplicaMode::Sync),
            "async" | "" => Ok(ReplicaMode::Async),
            "adaptive" => Ok(ReplicaMode::Adaptive),
            other => Err(format!(
                "replication mode {other:?} must be sync, async or adaptive"
            )),
        }
    }
}

/// What a sync write does when a sync replica does not answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReplicaDown {
    /// The replica drops to async (an event and an alert), and comes back
    /// to sync once it has caught up.
    Degrade,
    /// Writes keep waiting until the replica answers.
    Block,
}

impl std::str::FromStr for OnReplicaDown {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "degrade" => Ok(OnReplicaDown::Degrade),
            "block" => Ok(OnReplicaDown::Block),
            other => Err(format!(
                "on_replica_down = {other:?} must be \"degrade\" or \"block\""
            )),
        }
    }
}

/// The `[replication]` settings.
#[derive(Clone, Debug)]
pub struct ReplicationSettings {
    /// How long a sync write waits for a sync replica before
    /// `on_replica_down` applies.
    pub sync_timeout: Duration,
    /// See [`OnReplicaDown`].
    pub on_replica_down: OnReplicaDown,
    /// RPO above this raises an alert (an event, a log line, a metric and
    /// `alert_command`).
    pub rpo_alert: Option<Duration>,
    /// Run (by `sh -c`) when an RPO alert is raised, with
    /// `TIDEMARK_GROUP`, `TIDEMARK_REPLICA` and `TIDEMARK_RPO_SECONDS` set.
    pub alert_command: Option<String>,
    /// How often the primary tells an idle replica where it stands.
    pub heartbeat: Duration,
    /// A replica this many bytes of journal behind no longer holds the
    /// primary's retention back: retention may pass it (a gap, recorded).
    pub max_lag_bytes: u64,
    /// Adaptive replicas stay sync while acknowledgements take less than
    /// this...
    pub adaptive_latency: Duration,
    /// ...and the replica is less than this far behind.
    pub adaptive_lag: Duration,
    /// How often each replica is proven equal (`replica verify`), if at
    /// all.
    pub verify_interval: Option<Duration>,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        ReplicationSettings {
            sync_timeout: Duration::from_secs(10),
            on_replica_down: OnReplicaDown::Degrade,
            rpo_alert: None,
            alert_command: None,
            heartbeat: Duration::from_millis(200),
            max_lag_bytes: 64 << 30,
            adaptive_latency: Duration::from_millis(50),
            adaptive_lag: Duration::from_secs(1),
            verify_interval: None,
        }
    }
}
