//! What sync writes of a replicated group wait for: every replica whose
//! mode (adaptive: whose current mode) is sync must hold the write's
//! record. Implements the journal's `ReplicaGate`, so the write path knows
//! nothing of the network.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use tidemark_journal::{Error, ReplicaGate, Result, Seq};

use crate::shipper::{Shipper, ShipperShared};

/// The replicas of one consistency group, as its sync writes see them.
#[derive(Debug, Default)]
pub struct GroupGate {
    shippers: RwLock<Vec<Arc<ShipperShared>>>,
}

impl GroupGate {
    /// A gate with no replicas (writes pass at once).
    pub fn new() -> Arc<GroupGate> {
        Arc::new(GroupGate::default())
    }

    /// Sync writes wait for `shipper`'s replica from now on.
    pub fn add(&self, shipper: &Shipper) {
        self.shippers.write().push(shipper.shared.clone());
    }

    /// They no longer wait for the replica at `address`.
    pub fn remove(&self, address: &str) {
        self.shippers.write().retain(|s| s.peer.address != address);
    }

    /// True when no replica is left.
    pub fn is_empty(&self) -> bool {
        self.shippers.read().is_empty()
    }
}

impl ReplicaGate for GroupGate {
    fn wait_replicated(&self, seq: Seq, _deadline: Instant) -> Result<()> {
        // The replication settings' own timeout applies, not the write's:
        // what a late replica means is `on_replica_down`'s call.
        let shippers = self.shippers.read().clone();
        for shipper in shippers {
            shipper
                .wait_acked(seq)
                .map_err(|reason| Error::NotReplicated { seq, reason })?;
        }
        Ok(())
    }

    fn must_wait(&self) -> bool {
        self.shippers.read().iter().any(|s| s.holds_sync_writes())
    }
}
