//! The daemon's side of replication (`tidemark-replicator` does the work):
//! which groups replicate where (`DATA_DIR/replicas.json`, readable by the
//! daemon's user only: it holds the replica sites' tokens), one shipper per
//! group and replica site, started at boot and by `replica add`; and this
//! site as a replica: the groups that primaries stream here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidemark_journal::fs::{document, RealFs};
use tidemark_journal::{Journal, Seq, VolumeInfo};
use tidemark_proto::v1::replication_message::Hello;
use tidemark_replicator::{
    Fence, Peer, ReplicaHost, ReplicaMode, ReplicaStatus, ReplicationSettings, Shipper,
    Verification,
};

use super::catalog::VolumeSpec;
use super::error::{ApiError, ApiResult};
use super::registry::{Registry, Volume};

/// The document's format name.
const FORMAT: &str = "tidemark-replicas";

/// One replica site of one group, as configured.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// The consistency group replicated.
    pub group: String,
    /// The replica site's daemon.
    pub address: String,
    /// `sync`, `async` or `adaptive`.
    pub mode: String,
    /// The replica site's API token.
    pub token: String,
    /// PEM of the replica site's CA (`https://` addresses), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for ReplicaSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSpec")
            .field("group", &self.group)
            .field("address", &self.address)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Every replica this site ships to.
#[derive(Debug)]
pub struct Replication {
    path: PathBuf,
    settings: Arc<ReplicationSettings>,
    specs: Mutex<Vec<ReplicaSpec>>,
    /// Running shippers, by (group, address).
    shippers: Mutex<BTreeMap<(String, String), Shipper>>,
    /// Replication streams coming in (this site as a replica).
    pub receivers: Arc<tidemark_replicator::Receivers>,
}

impl Replication {
    /// The configuration in `data_dir`, loaded (no shipper runs yet).
    pub fn load(data_dir: &std::path::Path, settings: ReplicationSettings) -> ApiResult<Self> {
        let path = data_dir.join("replicas.json");
        let specs = document::load::<Vec<ReplicaSpec>>(&RealFs, &path, FORMAT, 1..=1)
            .map_err(|e| ApiError::Failed(format!("the list of replicas: {e}")))?
            .map(|(_, specs)| specs)
            .unwrap_or_default();
        Ok(Replication {
            path,
            settings: Arc::new(settings),
            specs: Mutex::new(specs),
            shippers: Mutex::new(BTreeMap::new()),
            receivers: tidemark_replicator::Receivers::new(),
        })
    }

    fn store(&self, specs: &[ReplicaSpec]) -> ApiResult<()> {
        document::store_private(&RealFs, &self.path, FORMAT, 1, &specs).map_err(|e| {
            ApiError::Failed(format!(
                "cannot store the list of replicas {}: {e}",
                self.path.display()
            ))
        })
    }

    /// Starts a shipper for every configured replica (at boot).
    pub fn start_all(&self, registry: &Arc<Registry>) {
        for spec in self.specs.lock().clone() {
            if let Err(e) = self.start(registry, &spec) {
                tracing::error!(group = %spec.group, replica = %spec.address, error = %e, "cannot start replication");
            }
        }
    }

    fn start(&self, registry: &Arc<Registry>, spec: &ReplicaSpec) -> ApiResult<()> {
        let group = registry.group_by_name(&spec.group)?;
        let mode: ReplicaMode = spec.mode.parse().map_err(ApiError::Invalid)?;
        let peer = Peer {
            address: spec.address.clone(),
            token: spec.token.clone(),
            ca_pem: spec.ca_pem.clone().map(String::into_bytes),
        };
        let events = {
            let registry = Arc::downgrade(registry);
            let group_name = spec.group.clone();
            let handle = tokio::runtime::Handle::current();
            Arc::new(move |name: &str, body: String| {
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let (group, name) = (group_name.clone(), name.to_string());
                handle.spawn_blocking(move || registry.record_group_event(&group, &name, &body));
            })
        };
        let fenced: tidemark_replicator::FenceSink = {
            let registry = Arc::downgrade(registry);
            let handle = tokio::runtime::Handle::current();
            Arc::new(move |fence: Fence| {
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                handle.spawn_blocking(move || {
                    if let Err(e) = registry.demote(&fence) {
                        tracing::error!(group = %fence.group, error = %e, "cannot demote the group");
                    }
                });
            })
        };
        let shipper = Shipper::start(
            &spec.group,
            group.journal().clone(),
            peer,
            mode,
            self.settings.clone(),
            events,
            fenced,
        );
        group.gate.add(&shipper);
        self.shippers
            .lock()
            .insert((spec.group.clone(), spec.address.clone()), shipper);
        Ok(())
    }

    /// `replica add`: replicate the group of `volume` to the daemon at
    /// `address`, from now on and after every restart.
    pub fn add(
        &self,
        registry: &Arc<Registry>,
        volume: &Volume,
        address: &str,
        mode: &str,
        token: &str,
        ca_pem: Option<String>,
    ) -> ApiResult<ReplicaStatus> {
        volume.refuse_on_replica("replicate it")?;
        let mode: ReplicaMode = mode.parse().map_err(ApiError::Invalid)?;
        if address.is_empty() {
            return Err(ApiError::Invalid("replica add needs --to ADDRESS".into()));
        }
        if token.trim().is_empty() {
            return Err(ApiError::Invalid(format!(
                "replica add needs the token of the daemon at {address} (--token-file F)"
            )));
        }
        let group = volume.group.name.clone();
        let spec = ReplicaSpec {
            group: group.clone(),
            address: address.to_string(),
            mode: mode.to_string(),
            token: token.trim().to_string(),
            ca_pem,
        };
        {
            let mut specs = self.specs.lock();
            if specs
                .iter()
                .any(|s| s.group == group && s.address == address)
            {
                return Err(ApiError::Exists(format!(
                    "group {group} already replicates to {address}"
                )));
            }
            let mut next = specs.clone();
            next.push(spec.clone());
            self.store(&next)?;
            *specs = next;
        }
        self.start(registry, &spec)?;
        tracing::info!(volume = %volume.name, group, replica = address, %mode, "replication added");
        self.status(&group, address)
            .ok_or_else(|| ApiError::Failed("the shipper did not start".into()))
    }

    /// `replica remove`: stops replicating the group of `volume` (to every
    /// site it replicated to) and lets retention go on without them.
    pub async fn remove(&self, volume: &Volume) -> ApiResult<()> {
        let group = volume.group.name.clone();
        if self.remove_group(&volume.group, true).await.is_empty() {
            return Err(ApiError::NotFound(format!(
                "volume {} (group {group}) does not replicate anywhere",
                volume.name
            )));
        }
        Ok(())
    }

    /// Stops replicating `group` anywhere; returns what it replicated to.
    /// `tell` (`replica remove`): each replica site is told it no longer
    /// follows this one (a demoted site tells no one: the other site is
    /// the primary now).
    pub async fn remove_group(&self, of: &super::registry::Group, tell: bool) -> Vec<ReplicaSpec> {
        let group = of.name.as_str();
        let removed: Vec<ReplicaSpec> = {
            let mut specs = self.specs.lock();
            let (gone, kept): (Vec<_>, Vec<_>) =
                specs.iter().cloned().partition(|s| s.group == group);
            if gone.is_empty() {
                return gone;
            }
            if let Err(e) = self.store(&kept) {
                tracing::error!(group, error = %e, "cannot store the list of replicas");
            }
            *specs = kept;
            gone
        };
        for spec in &removed {
            let shipper = self
                .shippers
                .lock()
                .remove(&(group.to_string(), spec.address.clone()));
            of.gate.remove(&spec.address);
            match shipper {
                Some(shipper) if tell => shipper.remove().await,
                Some(shipper) => shipper.stop(true).await,
                None => {}
            }
            tracing::info!(group, replica = %spec.address, "replication removed");
        }
        removed
    }

    /// Where `group` replicates to.
    pub fn specs_of(&self, group: &str) -> Vec<ReplicaSpec> {
        self.specs
            .lock()
            .iter()
            .filter(|s| s.group == group)
            .cloned()
            .collect()
    }

    /// The status of the replica of `group` at `address`.
    pub fn status(&self, group: &str, address: &str) -> Option<ReplicaStatus> {
        self.shippers
            .lock()
            .get(&(group.to_string(), address.to_string()))
            .map(Shipper::status)
    }

    /// Every replica's status.
    pub fn statuses(&self) -> Vec<ReplicaStatus> {
        self.shippers.lock().values().map(Shipper::status).collect()
    }

    /// The statuses of `group`'s replicas.
    pub fn of_group(&self, group: &str) -> Vec<ReplicaStatus> {
        self.shippers
            .lock()
            .iter()
            .filter(|((g, _), _)| g == group)
            .map(|(_, s)| s.status())
            .collect()
    }

    /// `replica verify`: both sites' content hash of `volume`'s group at
    /// `seq` (default: the newest point the replica holds).
    pub async fn verify(&self, volume: &Volume, seq: Option<Seq>) -> ApiResult<Verification> {
        let group = volume.group.name.clone();
        let address = self
            .specs
            .lock()
            .iter()
            .find(|s| s.group == group)
            .map(|s| s.address.clone())
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "volume {} (group {group}) does not replicate anywhere",
                    volume.name
                ))
            })?;
        let status = self
            .status(&group, &address)
            .ok_or_else(|| ApiError::Failed("the replica's shipper is not running".into()))?;
        let seq = seq.unwrap_or(status.acked_seq);
        if seq > status.acked_seq {
            return Err(ApiError::OutOfRange(format!(
                "the replica holds group {group} up to seq {}; seq {seq} is not there yet",
                status.acked_seq
            )));
        }
        // Retention may not fold the point away while both sites hash it.
        let journal = volume.journal().clone();
        let hold = format!("verify:{address}");
        {
            let (journal, hold) = (journal.clone(), hold.clone());
            tokio::task::spawn_blocking(move || journal.set_hold(&hold, seq))
                .await
                .map_err(|e| ApiError::Failed(e.to_string()))??;
        }
        let verification = {
            let shipper = self.shippers.lock();
            let Some(shipper) = shipper.get(&(group.clone(), address.clone())) else {
                return Err(ApiError::Failed(
                    "the replica's shipper is not running".into(),
                ));
            };
            shipper.verifier()
        }
        .verify(seq)
        .await;
        let _ = tokio::task::spawn_blocking(move || journal.release_hold(&hold)).await;
        verification.map_err(ApiError::Failed)
    }

    /// Stops every shipper (at shutdown), keeping their retention holds.
    pub async fn shutdown(&self) {
        let shippers: Vec<Shipper> = std::mem::take(&mut *self.shippers.lock())
            .into_values()
            .collect();
        for shipper in shippers {
            shipper.stop(false).await;
        }
    }
}

/// This site as the replica of groups other sites stream here.
#[derive(Debug)]
pub struct ReplicaSite(pub Arc<Registry>);

impl ReplicaHost for ReplicaSite {
    fn replica_journal(&self, hello: &Hello) -> Result<Journal, Box<tonic::Status>> {
        let registry = &self.0;
        // A group primary here: an older epoch than the stream's makes
        // this site its replica; the same or a newer one fences the sender.
        if let Ok(group) = registry.group_by_name(&hello.group) {
            if !group.is_replica() {
                let journal = group.journal();
                let ours = journal.epochs();
                if hello.epoch > journal.epoch() {
                    let fence = Fence {
                        group: hello.group.clone(),
                        epoch: hello.epoch,
                        history: tidemark_replicator::wire::history_from_wire(
                            &hello.epochs,
                            hello.newest_seq,
                        ),
                        by: "the new primary's stream".into(),
                    };
                    registry
                        .demote(&fence)
                        .map_err(|e| Box::new(tonic::Status::failed_precondition(e.to_string())))?;
                } else {
                    return Err(Box::new(tidemark_replicator::fence::refusal(
                        format!(
                            "group {} is the primary here at epoch {}, not older than the stream's {}: the sender is not the primary",
                            hello.group,
                            journal.epoch(),
                            hello.epoch
                        ),
                        journal.epoch(),
                        &ours,
                    )));
                }
            }
        }
        registry
            .replica_group(hello)
            .map_err(|e| Box::new(tonic::Status::failed_precondition(e.to_string())))
    }

    fn heard(&self, group: &str, newest: Seq) {
        // A copy that follows no one (its primary let it go) is not
        // watched, whatever a stream still open a moment longer says.
        let follows = self
            .0
            .group_by_name(group)
            .is_ok_and(|g| g.follows_a_primary());
        if follows {
            self.0.failover.monitor.heard(group, newest);
        }
    }

    fn heartbeat(&self) -> Option<Duration> {
        Some(self.0.failover.monitor.settings().heartbeat)
    }

    fn detach(&self, hello: &Hello) -> Result<(), Box<tonic::Status>> {
        let registry = &self.0;
        let refuse = |why: String| Box::new(tonic::Status::failed_precondition(why));
        let Ok(group) = registry.group_by_name(&hello.group) else {
            tracing::info!(group = %hello.group, "a primary stopped replicating a group this site does not hold");
            return Ok(());
        };
        if !group.is_replica() {
            return Err(refuse(format!(
                "group {} is a primary on this site, not a copy of the sender's",
                hello.group
            )));
        }
        let journal = group.journal();
        if journal.source_id() != hello.source_id {
            return Err(refuse(format!(
                "this site's copy of group {} follows another journal (id {:#x}, the sender's is {:#x})",
                hello.group,
                journal.source_id(),
                hello.source_id
            )));
        }
        if journal.epoch() > hello.epoch {
            return Err(refuse(format!(
                "group {} is at epoch {} here, newer than the sender's {}",
                hello.group,
                journal.epoch(),
                hello.epoch
            )));
        }
        registry.replication.receivers.end(&hello.group);
        journal
            .set_source_id(0)
            .map_err(|e| refuse(e.to_string()))?;
        registry.failover.monitor.forget(&hello.group);
        tracing::info!(group = %hello.group, "the primary stopped replicating the group here; this copy is kept and follows no one");
        Ok(())
    }
}

/// How long a verification of a large volume may take before the CLI's
/// request gives up on it (it goes on in the daemon).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);

impl Registry {
    /// The journal of the group a primary streams here (`hello`), in role
    /// replica: made, with its volumes by id, if this site lacks it; a
    /// volume the primary added since is added here too.
    pub fn replica_group(&self, hello: &Hello) -> ApiResult<Journal> {
        let _changes = self.changes_lock();
        let group = self.group_as(&hello.group, true)?;
        let journal = group.journal().clone();
        let mut added = false;
        for v in &hello.volumes {
            match journal.volume(&v.name) {
                Ok(existing) if existing.id == v.id && existing.size == v.size => {}
                Ok(existing) => {
                    return Err(ApiError::Exists(format!(
                        "volume {} of group {} differs here (id {}, {} bytes) from the primary's (id {}, {} bytes)",
                        v.name, hello.group, existing.id, existing.size, v.id, v.size
                    )))
                }
                Err(_) => {
                    journal.create_volume_as(&VolumeInfo {
                        id: v.id,
                        name: v.name.clone(),
                        size: v.size,
                    })?;
                }
            }
            if let Ok(known) = self.volume(&v.name) {
                if !Arc::ptr_eq(&known.group, &group) {
                    return Err(ApiError::Exists(format!(
                        "volume {} is a volume of group {} on this site, not of {}",
                        v.name, known.group.name, hello.group
                    )));
                }
                continue;
            }
            let spec = VolumeSpec {
                name: v.name.clone(),
                size: v.size,
                group: hello.group.clone(),
                backing: PathBuf::new(),
                owns_backing: false,
                mode: "sync".into(),
                role: "replica".into(),
            };
            self.insert_volume(&group, spec)?;
            added = true;
            tracing::info!(volume = %v.name, group = %hello.group, "volume kept here as a replica");
        }
        if added {
            self.persist_catalog()?;
        }
        Ok(journal)
    }

    /// Records a timeline event on every volume of `group`.
    pub fn record_group_event(&self, group: &str, name: &str, body: &str) {
        for volume in self.volumes() {
            if volume.group.name != group || volume.is_replica() {
                continue;
            }
            if let Err(e) = volume.record_event(name, body, self.sync_timeout()) {
                tracing::warn!(group, volume = %volume.name, event = name, error = %e, "cannot record a replication event");
            }
        }
    }
}
