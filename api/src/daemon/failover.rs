//! The daemon's side of failover (`tidemark-failover` judges): the watch
//! over the primaries this site keeps replicas of, and the two role
//! changes it carries out.
//!
//! - **Takeover** (a detector's decision, or `tidemark failover`): the
//!   group's epoch is raised durably before anything is written, its
//!   volumes get production files holding the newest point, the group
//!   turns primary and its live exports accept writes; a chosen earlier
//!   point is reached by a rollback under the new epoch. The `takeover`
//!   event says why, at which point, and what the old primary had that
//!   never arrived; the takeover hook runs with the NBD URI.
//! - **Demotion**: a site that learns of a higher epoch for a group it
//!   holds as primary (a refusal from its replica, or a stream from the
//!   new primary) refuses writes to it at once, keeps what it wrote past
//!   the point both sites agree on as a branch image, stops shipping it,
//!   and asks the new primary to replicate to it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tidemark_failover::epoch::{self, Verdict};
use tidemark_failover::{Decision, FailoverSettings, Learnt, Monitor, PromoteAt, Witness};
use tidemark_journal::epochs::common_point;
use tidemark_journal::fs::{Fs, RealFs};
use tidemark_journal::{Seq, Timestamp};
use tidemark_replicator::Fence;
use tokio::sync::mpsc;

use super::catalog::VolumeSpec;
use super::error::{ApiError, ApiResult};
use super::registry::{Registry, Volume};
use crate::point_spec::PointSpec;

/// Where this site can be reached, for URIs and for a new primary to
/// replicate back to it.
#[derive(Clone, Debug)]
pub struct SiteAddress {
    /// NBD clients reach us here.
    pub nbd: std::net::SocketAddr,
    /// Other sites reach our gRPC API here.
    pub grpc: String,
    /// Our API token, given to a new primary that replicates to us.
    pub token: String,
}

/// The watch and the role changes of one daemon.
#[derive(Debug)]
pub struct Failover {
    /// The detectors, probes and triggers.
    pub monitor: Arc<Monitor>,
    decisions: Mutex<Option<mpsc::UnboundedReceiver<Decision>>>,
    /// Takeovers carried out since start.
    pub takeovers: AtomicU64,
    /// Demotions carried out since start.
    pub demotions: AtomicU64,
    /// One role change at a time.
    changing: Mutex<()>,
    /// Set once the daemon listens.
    pub site: OnceLock<SiteAddress>,
    /// The witness, when `[failover.witness]` names one (set at start).
    pub witness: Arc<OnceLock<Arc<Witness>>>,
}

/// A takeover's outcome.
#[derive(Clone, Debug)]
pub struct Promotion {
    /// The group promoted.
    pub group: String,
    /// The epoch it is written under now.
    pub epoch: u64,
    /// The point it was promoted at.
    pub seq: Seq,
    /// Which point, and why that one.
    pub point: String,
    /// Its volumes.
    pub volumes: Vec<String>,
}

impl From<Promotion> for tidemark_proto::v1::FailoverResponse {
    fn from(p: Promotion) -> Self {
        tidemark_proto::v1::FailoverResponse {
            group: p.group,
            epoch: p.epoch,
            seq: p.seq,
            point: p.point,
            volumes: p.volumes,
        }
    }
}

impl Failover {
    /// The watch as configured (nothing runs yet).
    pub fn new(settings: FailoverSettings) -> Failover {
        let (monitor, decisions) = Monitor::new(settings);
        Failover {
            monitor,
            decisions: Mutex::new(Some(decisions)),
            takeovers: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            changing: Mutex::new(()),
            site: OnceLock::new(),
            witness: Arc::new(OnceLock::new()),
        }
    }

    /// With a witness, groups kept here for a primary are watched from the
    /// start: one that stays silent after a restart of this site is as
    /// down as one that falls silent later, and the witness refuses the
    /// takeover of a primary that is alive but cannot reach this site (a
    /// rotated token, say). Without one, silence since a restart proves
    /// too little: the primary must be heard first. (A copy the primary
    /// let go follows no one and is never watched.) Called once this
    /// site's gRPC server serves, so the grace is all the primary's.
    pub fn watch_from_start(registry: &Registry) {
        let failover = &registry.failover;
        if failover.monitor.settings().witness.is_none() {
            return;
        }
        for group in registry.groups() {
            if group.follows_a_primary() {
                failover.monitor.watch(&group.name, STARTUP_GRACE);
            }
        }
    }

    /// Runs the watch and carries out its decisions until `stop`; with a
    /// witness, holds every group this site is the primary of.
    pub fn start(registry: &Arc<Registry>, stop: tokio::sync::watch::Receiver<bool>) {
        let failover = &registry.failover;
        if let (Some(settings), Some(site)) = (
            failover.monitor.settings().witness.clone(),
            failover.site.get(),
        ) {
            let witness = Witness::new(settings, site.grpc.clone());
            let _ = failover.witness.set(witness);
            for group in registry.groups() {
                if !group.is_replica() {
                    registry.hold_witness(&group.name, group.journal().epoch());
                }
            }
        }
        tokio::spawn(failover.monitor.clone().run(stop));
        let Some(mut decisions) = failover.decisions.lock().take() else {
            return;
        };
        let registry = Arc::downgrade(registry);
        tokio::spawn(async move {
            while let Some(decision) = decisions.recv().await {
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let replicas: Vec<String> = registry
                    .groups()
                    .iter()
                    .filter(|g| g.is_replica())
                    .map(|g| g.name.clone())
                    .collect();
                let plan = &registry.failover.monitor.settings().plan;
                let in_plan = |g: &str| plan.iter().any(|s| s.group == g);
                // A group of the plan takes the whole plan over, in its
                // order; a probe or trigger takes every replica group.
                let groups: Vec<String> = match &decision.group {
                    Some(g) if !in_plan(g) => vec![g.clone()],
                    Some(_) => plan.iter().map(|s| s.group.clone()).collect(),
                    None => {
                        let mut all: Vec<String> = plan.iter().map(|s| s.group.clone()).collect();
                        all.extend(replicas.iter().filter(|g| !in_plan(g)).cloned());
                        all
                    }
                };
                for group in groups {
                    if !replicas.contains(&group) {
                        continue;
                    }
                    let step = plan.iter().find(|s| s.group == group).cloned();
                    let (promoting, decided) = (registry.clone(), decision.clone());
                    let outcome = tokio::task::spawn_blocking(move || {
                        promoting.promote(&group, None, &decided.reason, decided.detector)
                    })
                    .await;
                    match outcome {
                        Ok(Ok(p)) => {
                            tracing::warn!(group = %p.group, epoch = p.epoch, seq = p.seq, "took over");
                            if let Some(step) = step {
                                after_step(&step).await;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "takeover failed");
                            // The witness may let a later attempt through
                            // (once the primary's lease runs out): the
                            // detector may decide again after a while.
                            if let Some(group) = &decision.group {
                                let monitor = registry.failover.monitor.clone();
                                let wait = monitor
                                    .settings()
                                    .witness
                                    .as_ref()
                                    .map_or(std::time::Duration::from_secs(1), |w| w.lease / 2);
                                let group = group.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(wait).await;
                                    monitor.rearm(&group);
                                });
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "takeover failed"),
                    }
                }
            }
        });
    }
}

/// How long a primary has to reconnect after this site starts before its
/// silence counts: its link retries every 5 s at most, and a connection
/// attempt may take 5 s more.
const STARTUP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits what a plan step says before the next group is taken over.
async fn after_step(step: &tidemark_failover::PlanStep) {
    if let Some(wait) = step.then_wait {
        tracing::info!(group = %step.group, ?wait, "takeover plan: waiting before the next group");
        tokio::time::sleep(wait).await;
    }
    if let Some(probe) = &step.then_probe {
        let deadline = std::time::Instant::now() + step.then_timeout;
        loop {
            match probe.check(std::time::Duration::from_secs(2)).await {
                Ok(()) => {
                    tracing::info!(group = %step.group, probe = probe.target(), "takeover plan: the probe passed; next group");
                    return;
                }
                Err(e) if std::time::Instant::now() > deadline => {
                    tracing::warn!(group = %step.group, probe = probe.target(), error = %e, "takeover plan: the probe did not pass in time; going on");
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }
}

impl Registry {
    /// With a witness: holds `group`'s key for this site, a primary at
    /// `epoch`, and demotes the group if another site holds it at a
    /// higher epoch.
    pub fn hold_witness(self: &Arc<Self>, group: &str, epoch: u64) {
        let Some(witness) = self.failover.witness.get() else {
            return;
        };
        witness.hold(group, epoch, self.witness_learnt(group));
    }

    /// What this site does when the witness says another site holds
    /// `group` at a higher epoch: demote it.
    fn witness_learnt(self: &Arc<Self>, group: &str) -> tidemark_failover::OnLearnt {
        let registry = Arc::downgrade(self);
        let name = group.to_string();
        Arc::new(move |learnt: Learnt| {
            let Learnt::Newer(holder) = learnt;
            let Some(registry) = registry.upgrade() else {
                return;
            };
            let fence = Fence {
                group: name.clone(),
                epoch: holder.epoch,
                history: tidemark_journal::epochs::History {
                    epochs: Vec::new(),
                    newest: 0,
                },
                by: format!("the witness (held by {})", holder.site),
            };
            tokio::task::spawn_blocking(move || {
                if let Err(e) = registry.demote(&fence) {
                    tracing::error!(group = %fence.group, error = %e, "cannot demote the group");
                }
            });
        })
    }

    /// Promotes `group` to primary on this site: at `at` (a POINT), or as
    /// `[failover] promote_at` says. `reason` and `detector` say why.
    pub fn promote(
        self: &Arc<Self>,
        group: &str,
        at: Option<&str>,
        reason: &str,
        detector: &str,
    ) -> ApiResult<Promotion> {
        let _one = self.failover.changing.lock();
        let group = self.group_by_name(group)?;
        let journal = group.journal().clone();
        if !group.is_replica() {
            return Err(ApiError::Invalid(format!(
                "group {} is already the primary on this site (epoch {})",
                group.name,
                journal.epoch()
            )));
        }
        let volumes: Vec<Arc<Volume>> = self
            .volumes()
            .into_iter()
            .filter(|v| Arc::ptr_eq(&v.group, &group))
            .collect();
        let Some(first) = volumes.first().cloned() else {
            return Err(ApiError::NotFound(format!(
                "group {} has no volumes on this site to promote",
                group.name
            )));
        };
        // The old primary's records stop here, before anything changes.
        self.replication.receivers.end(&group.name);
        if journal.rebasing().is_some() {
            return Err(ApiError::Failed(format!(
                "group {} is in the middle of a resync from its primary: this site holds no consistent point to promote",
                group.name
            )));
        }
        let newest = journal.history().newest_seq;
        let (seq, point) = match at.filter(|a| !a.trim().is_empty()) {
            Some(text) => {
                let spec = PointSpec::parse(text).map_err(ApiError::Invalid)?;
                (self.resolve(&first, &spec)?, format!("{text} (chosen)"))
            }
            None => self.promotion_point(&first)?,
        };
        // The new epoch is durable before the first write under it; with
        // a witness, only after winning the group's key at that epoch.
        // Above every epoch seen here — the old primary's, even one of
        // which no record arrived — and, with a witness, above every epoch
        // it ever granted: one epoch never has two writers.
        let old_epoch = journal.epoch();
        let mut new_epoch = epoch::next_epoch(old_epoch, journal.highest_epoch());
        if let Some(witness) = self.failover.witness.get() {
            new_epoch = tokio::runtime::Handle::current()
                .block_on(witness.claim(&group.name, new_epoch, self.witness_learnt(&group.name)))
                .map_err(ApiError::Busy)?;
        }
        journal.set_epoch(new_epoch)?;
        // Production files holding the newest point, then primary.
        let mut specs = Vec::new();
        let mut rolled_back = Vec::new();
        for volume in &volumes {
            let backing = self
                .config()
                .data_dir
                .join("volumes")
                .join(format!("{}.img", volume.name));
            super::restore::restore(volume, newest, &backing, |_, _| {})?;
            let mut spec = volume.spec.lock().clone();
            spec.backing = backing;
            spec.owns_backing = true;
            spec.role = "primary".into();
            specs.push(spec);
        }
        {
            let _changes = self.changes_lock();
            for (volume, spec) in volumes.iter().zip(&specs) {
                self.attach_device(&group, spec)?;
                *volume.spec.lock() = spec.clone();
            }
            // At the chosen point before the group takes a write or says
            // it is the primary: no client ever sees the newest point of
            // a group promoted before it (a burst an anomaly tag marks).
            if seq < newest {
                for volume in &volumes {
                    let report = super::rollback::roll_back(
                        self,
                        volume,
                        &PointSpec::Seq(seq),
                        false,
                        false,
                    )?;
                    rolled_back.push((volume.clone(), report));
                }
            }
            group.replica.store(false, Ordering::SeqCst);
            self.persist_catalog()?;
        }
        // Opened as a replica with memory alone: the configured tiers now,
        // so a burst of writes spills to the file cache instead of waiting.
        if let Err(e) = journal.set_cache_tiers(self.config().cache_tiers) {
            tracing::warn!(group = %group.name, error = %e, "the promoted group keeps its memory-only cache: the file cache cannot be made");
        }
        // What the old primary had that never arrived (async modes): the
        // newest seq it last said it had, read before the watch on it ends.
        let primary_newest = self.failover.monitor.primary_newest(&group.name);
        self.failover.monitor.forget(&group.name);
        for (volume, report) in &rolled_back {
            if let Err(e) = super::rollback::record(self, volume, report) {
                tracing::warn!(volume = %volume.name, error = %e, "cannot record the rollback of the takeover");
            }
        }
        self.failover.takeovers.fetch_add(1, Ordering::SeqCst);
        let lost = primary_newest
            .filter(|&p| p > newest)
            .map(|p| serde_json::json!({"from": newest + 1, "to": p}));
        let body = serde_json::json!({
            "reason": reason,
            "detector": detector,
            "epoch": new_epoch,
            "previous_epoch": old_epoch,
            "seq": seq,
            "point": point,
            "newest_seq": newest,
            "old_primary_last_seq": primary_newest,
            "lost": lost,
        })
        .to_string();
        for volume in &volumes {
            if let Err(e) = volume.record_event("takeover", &body, self.sync_timeout()) {
                tracing::warn!(volume = %volume.name, error = %e, "cannot record the takeover event");
            }
        }
        tracing::warn!(group = %group.name, epoch = new_epoch, seq, %point, reason, "takeover: this site is the primary now");
        self.run_takeover_hook(&group.name, &volumes, new_epoch);
        Ok(Promotion {
            group: group.name.clone(),
            epoch: new_epoch,
            seq,
            point,
            volumes: volumes.iter().map(|v| v.name.clone()).collect(),
        })
    }

    /// The point `[failover] promote_at` chooses for `volume`'s group, and
    /// why.
    fn promotion_point(&self, volume: &Volume) -> ApiResult<(Seq, String)> {
        let settings = self.failover.monitor.settings();
        let newest = volume.history().newest_seq;
        match settings.promote_at {
            PromoteAt::Latest => Ok((newest, "latest".into())),
            PromoteAt::LastVerified => match self.resolve(volume, &PointSpec::LastVerified) {
                Ok(seq) => Ok((
                    seq,
                    "last-verified: the newest tag whose verification passed".into(),
                )),
                Err(e) => {
                    tracing::warn!(volume = %volume.name, error = %e, "no verified point: promoting at the newest");
                    Ok((newest, format!("latest (no verified tag: {e})")))
                }
            },
            PromoteAt::BeforeAnomaly => {
                let window = settings.anomaly_window;
                let since = Timestamp::now().as_nanos() - window.as_nanos() as i64;
                let anomaly = self
                    .tags(volume)?
                    .into_iter()
                    .filter(|t| {
                        t.body.source == tidemark_tagging::tag::Source::Anomaly
                            && t.time.as_nanos() >= since
                    })
                    .min_by_key(|t| t.seq);
                match anomaly {
                    Some(tag) => {
                        let seq = self.resolve(volume, &PointSpec::Before(tag.name.clone()))?;
                        Ok((
                            seq,
                            format!(
                                "before-anomaly: before tag {} ({} ago at most)",
                                tag.name,
                                humantime(window)
                            ),
                        ))
                    }
                    None => Ok((newest, "latest (no anomaly tag in the window)".into())),
                }
            }
        }
    }

    fn run_takeover_hook(&self, group: &str, volumes: &[Arc<Volume>], epoch: u64) {
        let Some(hook) = self.failover.monitor.settings().takeover_hook.clone() else {
            return;
        };
        let nbd = self
            .failover
            .site
            .get()
            .map(|s| s.nbd.to_string())
            .unwrap_or_else(|| self.config().nbd.to_string());
        let uri = format!("nbd://{nbd}/{}", volumes[0].name);
        let names: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
        let group = group.to_string();
        std::thread::spawn(move || {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&hook)
                .env("TIDEMARK_URI", &uri)
                .env("TIDEMARK_GROUP", &group)
                .env("TIDEMARK_VOLUMES", names.join(" "))
                .env("TIDEMARK_EPOCH", epoch.to_string())
                .output();
            match out {
                Ok(o) if o.status.success() => tracing::info!(hook, %uri, "takeover hook done"),
                Ok(o) => {
                    tracing::error!(hook, status = %o.status, stderr = %String::from_utf8_lossy(&o.stderr).trim(), "the takeover hook failed")
                }
                Err(e) => tracing::error!(hook, error = %e, "cannot run the takeover hook"),
            }
        });
    }

    /// This site learnt of a newer primary of `fence.group`: unless it is
    /// not newer, the group stops taking writes at once and becomes that
    /// primary's replica; its production volumes — which may hold what it
    /// wrote past the point both agree on, journalled or (async writes
    /// left to a resync) not — are kept as branch images. Runs on a
    /// blocking thread.
    pub fn demote(self: &Arc<Self>, fence: &Fence) -> ApiResult<()> {
        self.demote_as(fence, true)
    }

    /// `demote`; `keep_branch` false only for a failback, where the other
    /// site acknowledged every record first.
    fn demote_as(self: &Arc<Self>, fence: &Fence, keep_branch: bool) -> ApiResult<()> {
        let _one = self.failover.changing.lock();
        let group = self.group_by_name(&fence.group)?;
        let journal = group.journal().clone();
        let own = journal.epoch();
        let demoted = self
            .volumes()
            .iter()
            .filter(|v| Arc::ptr_eq(&v.group, &group))
            .all(|v| v.spec.lock().role == "replica");
        if demoted || epoch::judge(own, fence.epoch) == Verdict::Keep {
            return Ok(());
        }
        // Writes are refused from this moment on.
        group.replica.store(true, Ordering::SeqCst);
        if let Err(e) = journal.note_epoch_seen(fence.epoch) {
            tracing::warn!(group = %group.name, epoch = fence.epoch, error = %e, "cannot record the newer primary's epoch");
        }
        if let Some(witness) = self.failover.witness.get() {
            witness.release(&group.name);
        }
        let volumes: Vec<Arc<Volume>> = self
            .volumes()
            .into_iter()
            .filter(|v| Arc::ptr_eq(&v.group, &group))
            .collect();
        // Stop shipping: the other site is the primary. (First: writes
        // that wait for a replica are released by it.)
        let removed = tokio::runtime::Handle::current()
            .block_on(self.replication.remove_group(&group, false));
        // Writes that passed the check before the flag are in the journal
        // once this returns.
        group.stop_writes();
        // What was appended is made durable; no flush record is added (it
        // would be a record the new primary never had). The branch image
        // is the production volume, which holds every acknowledged write.
        let _ = journal.sync();
        let ours = journal.epochs();
        let common = common_point(&ours, &fence.history);
        let orphaned = ours.newest > common;
        let mut branches = Vec::new();
        {
            let _changes = self.changes_lock();
            for volume in &volumes {
                let mut spec: VolumeSpec = volume.spec.lock().clone();
                let _ = group.write_path.release(&volume.name);
                if (orphaned || keep_branch) && !spec.backing.as_os_str().is_empty() {
                    let branch = self.branch_path(&volume.name, own);
                    branch_from(&spec.backing, &branch, spec.owns_backing)?;
                    branches.push(branch.display().to_string());
                } else if spec.owns_backing {
                    let _ = std::fs::remove_file(&spec.backing);
                }
                spec.backing = PathBuf::new();
                spec.owns_backing = false;
                spec.role = "replica".into();
                *volume.spec.lock() = spec;
            }
            self.persist_catalog()?;
        }
        self.failover.demotions.fetch_add(1, Ordering::SeqCst);
        // The seq range is what the journal holds past the common point
        // (none: the images may still hold async writes never journalled;
        // or unknown: a fence from the witness carries no history — the
        // new primary's `replica-diverged` event says it once it rebases
        // this site).
        let history_known = !fence.history.epochs.is_empty() || fence.history.newest > 0;
        let orphan = (!branches.is_empty()).then(|| {
            let range = (orphaned && history_known)
                .then(|| serde_json::json!({"from": common + 1, "to": ours.newest}));
            serde_json::json!({"records": range, "epoch": own, "images": branches})
        });
        tracing::warn!(
            group = %group.name,
            own_epoch = own,
            new_epoch = fence.epoch,
            by = %fence.by,
            common,
            orphaned = ?orphan,
            "demoted: another site is the primary of this group now"
        );
        // The new primary replicates to us from here on.
        if let Some(peer) = removed.first() {
            self.ask_to_replicate_back(own, &group.name, &volumes, peer, fence, orphan);
        }
        Ok(())
    }

    /// `tidemark failback`: a planned switchover of `volume`'s group to
    /// the site it replicates to. Writes stop here, the replica catches
    /// up to the last of them, it is promoted with a new epoch, and this
    /// site becomes its replica. A replica that does not catch up in time
    /// leaves everything as it was.
    pub async fn failback(self: &Arc<Self>, volume: &str) -> ApiResult<Promotion> {
        let volume = self.volume(volume)?;
        let group = volume.group.clone();
        if group.is_replica() {
            return Err(ApiError::Invalid(format!(
                "volume {} is a replica on this site: fail back on its primary (or use failover here)",
                volume.name
            )));
        }
        let peer = self
            .replication
            .specs_of(&group.name)
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "volume {} (group {}) replicates nowhere: there is no site to fail back to",
                    volume.name, group.name
                ))
            })?;
        // On the timeline (and so on the other site) before writes stop.
        let body = serde_json::json!({
            "to": peer.address,
            "epoch": group.journal().epoch(),
            "reason": "tidemark failback: a planned switchover",
        })
        .to_string();
        {
            let (volume, timeout) = (volume.clone(), self.sync_timeout());
            tokio::task::spawn_blocking(move || volume.record_event("failback", &body, timeout))
                .await
                .map_err(|e| ApiError::Failed(e.to_string()))??;
        }
        // Writes are refused from here on; what was acknowledged is
        // journalled before the replica is asked to catch up.
        group.replica.store(true, Ordering::SeqCst);
        let undo = |e: ApiError| {
            group.replica.store(false, Ordering::SeqCst);
            e
        };
        let (registry, g) = (self.clone(), group.clone());
        let newest = tokio::task::spawn_blocking(move || -> ApiResult<Seq> {
            // Writes that passed the check before the flag are appended
            // first, so `newest` covers every write acknowledged here.
            g.stop_writes();
            for v in registry
                .volumes()
                .iter()
                .filter(|v| Arc::ptr_eq(&v.group, &g))
            {
                g.write_path.flush(&v.name)?;
            }
            Ok(g.journal().sync()?)
        })
        .await
        .map_err(|e| ApiError::Failed(e.to_string()))
        .and_then(|r| r)
        .map_err(undo)?;
        let deadline =
            std::time::Instant::now() + self.sync_timeout().max(std::time::Duration::from_secs(30));
        loop {
            let acked = self
                .replication
                .status(&group.name, &peer.address)
                .map_or(0, |s| s.acked_seq);
            if acked >= newest {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(undo(ApiError::Failed(format!(
                    "the replica at {} holds group {} up to seq {acked}, not {newest}: failback abandoned, this site stays the primary",
                    peer.address, group.name
                ))));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The other site takes over at exactly our newest point; it must
        // be able to win the witness's key, so this site lets it go.
        if let Some(witness) = self.failover.witness.get() {
            witness.release(&group.name);
        }
        let undo = |e: ApiError| {
            if self.failover.witness.get().is_some() {
                self.hold_witness(&group.name, group.journal().epoch());
            }
            undo(e)
        };
        let link = tidemark_replicator::Peer {
            address: peer.address.clone(),
            token: peer.token.clone(),
            ca_pem: peer.ca_pem.clone().map(String::into_bytes),
        };
        let reason = format!(
            "failback: planned switchover from {} at seq {newest}",
            self.failover
                .site
                .get()
                .map_or_else(|| "the primary".to_string(), |s| s.grpc.clone())
        );
        let promoted = async {
            let mut client = tidemark_replicator::link::connect(&link)
                .await
                .map_err(ApiError::Failed)?;
            client
                .failover(tidemark_proto::v1::FailoverRequest {
                    volume: volume.name.clone(),
                    at: newest.to_string(),
                    reason,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| {
                    ApiError::Failed(format!(
                        "the site at {} did not take over: {}",
                        peer.address,
                        s.message()
                    ))
                })
        }
        .await
        .map_err(undo)?;
        // We are its replica now: same history up to `newest`, then its.
        let mut history = group.journal().epochs();
        history.epochs.push(tidemark_journal::manifest::EpochStart {
            epoch: promoted.epoch,
            first_seq: newest + 1,
        });
        let fence = Fence {
            group: group.name.clone(),
            epoch: promoted.epoch,
            history,
            by: peer.address.clone(),
        };
        let registry = self.clone();
        tokio::task::spawn_blocking(move || registry.demote_as(&fence, false))
            .await
            .map_err(|e| ApiError::Failed(e.to_string()))??;
        tracing::warn!(group = %group.name, to = %peer.address, epoch = promoted.epoch, seq = newest, "failback done: this site is the replica now");
        Ok(Promotion {
            group: promoted.group,
            epoch: promoted.epoch,
            seq: promoted.seq,
            point: promoted.point,
            volumes: promoted.volumes,
        })
    }

    /// Where the branch of `volume` written under `epoch` is kept.
    pub fn branch_path(&self, volume: &str, epoch: u64) -> PathBuf {
        self.config()
            .data_dir
            .join("branches")
            .join(format!("{volume}.epoch-{epoch}.img"))
    }

    fn ask_to_replicate_back(
        self: &Arc<Self>,
        own_epoch: u64,
        group: &str,
        volumes: &[Arc<Volume>],
        peer: &super::replication::ReplicaSpec,
        fence: &Fence,
        orphan: Option<serde_json::Value>,
    ) {
        let Some(site) = self.failover.site.get().cloned() else {
            return;
        };
        let Some(volume) = volumes.first().map(|v| v.name.clone()) else {
            return;
        };
        let peer = peer.clone();
        let group = group.to_string();
        let new_epoch = fence.epoch;
        let fence_by = fence.by.clone();
        let old_epoch = own_epoch;
        let registry = Arc::downgrade(self);
        tokio::runtime::Handle::current().spawn(async move {
            let demotion = serde_json::json!({
                "site": site.grpc,
                "reason": format!("{} holds group {group} at epoch {new_epoch}", fence_by),
                "epoch": new_epoch,
                "previous_epoch": old_epoch,
                "branch": orphan,
            })
            .to_string();
            let request = tidemark_proto::v1::AddReplicaRequest {
                volume,
                address: site.grpc.clone(),
                mode: peer.mode.clone(),
                token: site.token.clone(),
                ca_pem: String::new(),
                demotion,
            };
            let link = tidemark_replicator::Peer {
                address: peer.address.clone(),
                token: peer.token.clone(),
                ca_pem: peer.ca_pem.clone().map(String::into_bytes),
            };
            // The new primary may be busy promoting, or unreachable for a
            // while: ask until it answers (1 s doubling to 30 s), for as
            // long as this site keeps the group as a replica — until then
            // this copy falls behind, and the demotion is on no timeline.
            let mut pause = std::time::Duration::from_secs(1);
            for attempt in 0u64.. {
                let still_replica = registry
                    .upgrade()
                    .and_then(|r| r.group_by_name(&group).ok())
                    .is_some_and(|g| g.is_replica());
                if !still_replica {
                    return;
                }
                let outcome = async {
                    let mut client = tidemark_replicator::link::connect(&link).await?;
                    client
                        .add_replica(request.clone())
                        .await
                        .map_err(|s| s.message().to_string())
                }
                .await;
                match outcome {
                    Ok(_) => {
                        tracing::info!(group, primary = %peer.address, epoch = new_epoch, ?orphan, "the new primary replicates to this site");
                        return;
                    }
                    Err(e) if e.contains("already replicates") => return,
                    Err(e) => {
                        tracing::warn!(group, primary = %peer.address, attempt, error = %e, "cannot ask the new primary to replicate here yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
    }
}

/// Keeps `backing` (a demoted primary's production volume, as its
/// clients last saw it) as the branch image `branch`.
fn branch_from(backing: &std::path::Path, branch: &std::path::Path, owned: bool) -> ApiResult<()> {
    let failed = |e: std::io::Error| {
        ApiError::Failed(format!(
            "cannot keep {} as the branch {}: {e}",
            backing.display(),
            branch.display()
        ))
    };
    if let Some(dir) = branch.parent() {
        tidemark_journal::fs::create_dir_all_durably(&RealFs, dir).map_err(failed)?;
    }
    if owned {
        std::fs::rename(backing, branch).map_err(failed)?;
    } else {
        // Not ours to move: the operator's device or file stays, a copy
        // is the branch.
        std::fs::copy(backing, branch).map_err(failed)?;
    }
    std::fs::File::open(branch)
        .and_then(|f| f.sync_all())
        .map_err(failed)?;
    RealFs
        .sync_dir(&tidemark_journal::fs::parent_dir(branch))
        .map_err(failed)?;
    Ok(())
}

fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 && s > 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 && s > 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
