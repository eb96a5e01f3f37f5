//! The gRPC service: every operation of the CLI, and Ingest for capture
//! agents. Each call runs its journal work on the blocking pool.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tidemark_proto::v1 as pb;
use tidemark_proto::v1::tidemark_server::Tidemark;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::error::{ApiError, ApiResult};
use super::registry::{Volume, WriterGuard};
use super::{restore, rollback, tags, timeline, Daemon};
use crate::point_spec::PointSpec;
use tidemark_tagging::{Consistency, Source, TagBody};

/// The service over one daemon.
#[derive(Debug, Clone)]
pub struct Service {
    daemon: Arc<Daemon>,
}

impl Service {
    /// The service of `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Service { daemon }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Daemon) -> ApiResult<T> + Send + 'static,
    ) -> Result<T, Status> {
        let daemon = self.daemon.clone();
        tokio::task::spawn_blocking(move || f(&daemon))
            .await
            .map_err(|e| Status::internal(format!("request failed: {e}")))?
            .map_err(Status::from)
    }
}

/// Returns once `stopping` turns true (never if its sender is gone).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        if stopping.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn point(text: &str, what: &str) -> ApiResult<Option<PointSpec>> {
    if text.is_empty() {
        return Ok(None);
    }
    PointSpec::parse(text)
        .map(Some)
        .map_err(|e| ApiError::Invalid(format!("{what}: {e}")))
}

fn required_point(text: &str, what: &str) -> ApiResult<PointSpec> {
    point(text, what)?.ok_or_else(|| ApiError::Invalid(format!("{what}: a point is required")))
}

/// The API's view of a volume.
pub fn volume_proto(daemon: &Daemon, v: &Volume) -> pb::Volume {
    let history = v.history();
    let (mode, now) = daemon.registry.mode(v);
    let spec = v.spec.lock().clone();
    pb::Volume {
        name: v.name.clone(),
        size: v.size,
        mode: mode.to_string(),
        group: v.group.name.clone(),
        newest_seq: history.newest_seq,
        horizon_seq: history.horizon_seq,
        backing: spec.backing.display().to_string(),
        effective_mode: now.to_string(),
        newest_time: history.newest_time.to_string(),
        horizon_time: history.horizon_time.to_string(),
        role: v.group.role().into(),
        epoch: v.journal().epoch(),
    }
}

/// A replica's status as the API gives it.
pub fn replica_proto(volume: &str, s: &tidemark_replicator::ReplicaStatus) -> pb::Replica {
    pb::Replica {
        volume: volume.to_string(),
        group: s.group.clone(),
        address: s.address.clone(),
        state: s.state.to_string(),
        mode: s.mode.to_string(),
        effective_mode: s.effective_mode.to_string(),
        acked_seq: s.acked_seq,
        lag_seconds: s.lag_seconds,
        rpo_seconds: s.rpo_seconds,
        lag_bytes: s.lag_bytes,
        sent_bytes: s.sent_bytes,
        resync_bytes: s.resync_bytes,
        last_error: s.last_error.clone().unwrap_or_default(),
        last_verified: s.last_verified.clone().unwrap_or_default(),
        rpo_alert: s.rpo_alert,
    }
}

fn export_proto(daemon: &Daemon, e: &super::exports::Export) -> pb::ExportResponse {
    pb::ExportResponse {
        name: e.name.clone(),
        uri: format!("nbd://{}/{}", daemon.nbd_addr, e.name),
        seq: e.seq().unwrap_or(0),
        time: String::new(),
        writable: !e.read_only(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Tidemark for Service {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let backing = (!r.backing.is_empty()).then(|| PathBuf::from(&r.backing));
            let v = d.registry.create_volume(
                &r.name,
                r.size,
                backing.as_deref(),
                Some(&r.mode),
                Some(&r.group),
            )?;
            // With a witness, a new group's writes wait for its lease.
            d.registry
                .hold_witness(&v.group.name, v.group.journal().epoch());
            Ok(volume_proto(d, &v))
        })
        .await
        .map(Response::new)
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.blocking(|d| {
            Ok(pb::ListVolumesResponse {
                volumes: d
                    .registry
                    .volumes()
                    .iter()
                    .map(|v| volume_proto(d, v))
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn show_volume(
        &self,
        request: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::VolumeDetail>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |d| {
            let v = d.registry.volume(&name)?;
            let cache = v.journal().cache_stats();
            // A replica here has no production volume, so no write-path
            // counters.
            let stats = v.group.write_path.stats(&name).unwrap_or_default();
            Ok(pb::VolumeDetail {
                volume: Some(volume_proto(d, &v)),
                cache: Some(pb::CacheUse {
                    memory_bytes: cache.memory.used_bytes,
                    file_bytes: cache.file.map_or(0, |f| f.used_bytes),
                    memory_limit: cache.memory.limit_bytes,
                    file_limit: cache.file.map_or(0, |f| f.capacity_bytes),
                }),
                stats: Some(pb::VolumeStats {
                    writes: stats.writes,
                    bytes: stats.bytes,
                    sync_writes: stats.sync_writes,
                    async_writes: stats.async_writes,
                    mode_switches: stats.mode_switches,
                    resynced_regions: stats.resynced_regions,
                    dirty_regions: stats.dirty_regions,
                    cache_fallbacks: stats.cache_fallbacks,
                }),
                journal_bytes: v.journal().journal_bytes(),
                failover: Some(failover_proto(d, Some(&v.group.name))),
                nbd_clients: v.writers.load(std::sync::atomic::Ordering::Relaxed),
                tags: d.registry.tags(&v)?.len() as u32,
                replicas: d
                    .registry
                    .replication
                    .of_group(&v.group.name)
                    .iter()
                    .map(|s| replica_proto(&v.name, s))
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn set_mode(
        &self,
        request: Request<pb::SetModeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.set_mode(&r.name, &r.mode)?;
            Ok(volume_proto(d, &v))
        })
        .await
        .map(Response::new)
    }

    async fn delete_volume(
        &self,
        request: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Empty>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |d| d.registry.delete_volume(&name))
            .await
            .map(|()| Response::new(pb::Empty {}))
    }

    async fn create_tag(
        &self,
        request: Request<pb::CreateTagRequest>,
    ) -> Result<Response<pb::Tag>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.volume(&r.volume)?;
            let tag = if r.app_consistent {
                d.tagger
                    .app_consistent_tag(&v.name, &r.name, &r.note)
                    .map_err(ApiError::Failed)?
            } else {
                d.registry.create_tag(
                    &v,
                    &r.name,
                    TagBody::new(Source::Manual, Consistency::Crash, &r.note),
                )?
            };
            Ok(tags::to_proto(&tag))
        })
        .await
        .map(Response::new)
    }

    async fn list_tags(
        &self,
        request: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::ListTagsResponse>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |d| {
            let v = d.registry.volume(&name)?;
            Ok(pb::ListTagsResponse {
                tags: d.registry.tags(&v)?.iter().map(tags::to_proto).collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn delete_tag(
        &self,
        request: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.volume(&r.volume)?;
            d.registry.delete_tag(&v, &r.name)
        })
        .await
        .map(|()| Response::new(pb::Empty {}))
    }

    async fn verify_tag(
        &self,
        request: Request<pb::VerifyTagRequest>,
    ) -> Result<Response<pb::Tag>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.volume(&r.volume)?;
            d.registry.tag(&v, &r.name)?;
            let command = (!r.command.is_empty()).then_some(r.command.as_str());
            let tag = d
                .tagger
                .verify(&v.name, &r.name, command)
                .map_err(ApiError::Failed)?;
            Ok(tags::to_proto(&tag))
        })
        .await
        .map(Response::new)
    }

    async fn timeline(
        &self,
        request: Request<pb::TimelineRequest>,
    ) -> Result<Response<pb::TimelineResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.volume(&r.volume)?;
            let from = point(&r.from, "--from")?;
            let to = point(&r.to, "--to")?;
            let (horizon_seq, newest_seq, entries) =
                timeline::timeline(&d.registry, &v, from.as_ref(), to.as_ref())?;
            Ok(pb::TimelineResponse {
                volume: v.name.clone(),
                horizon_seq,
                newest_seq,
                entries: entries
                    .into_iter()
                    .map(|e| pb::TimelineEntry {
                        seq: e.seq,
                        time: e.time.to_string(),
                        kind: e.kind.to_string(),
                        name: e.name,
                        count: e.count,
                        first_seq: e.first_seq,
                        detail: e.detail,
                    })
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.volume(&r.volume)?;
            let at = required_point(&r.at, "--at")?;
            let seq = d.registry.resolve(&v, &at)?;
            let export = d.registry.exports.create(v, seq, r.writable)?;
            Ok(export_proto(d, &export))
        })
        .await
        .map(Response::new)
    }

    async fn unexport(
        &self,
        request: Request<pb::UnexportRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |d| d.registry.exports.remove(&name))
            .await
            .map(|()| Response::new(pb::Empty {}))
    }

    type RestoreStream = BoxStream<pb::RestoreProgress>;

    async fn restore(
        &self,
        request: Request<pb::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let r = request.into_inner();
        if r.to.is_empty() {
            return Err(Status::invalid_argument(
                "restore needs a target path (--to)",
            ));
        }
        let (v, seq) = self
            .blocking({
                let r = r.clone();
                move |d| {
                    let v = d.registry.volume(&r.volume)?;
                    let at = required_point(&r.at, "--at")?;
                    let seq = d.registry.resolve(&v, &at)?;
                    Ok((v, seq))
                }
            })
            .await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            let path = PathBuf::from(&r.to);
            let mut last_sent = 0u64;
            let result = restore::restore(&v, seq, &path, |done, total| {
                if done - last_sent >= 64 << 20 || done == total {
                    last_sent = done;
                    let _ = tx.blocking_send(Ok(pb::RestoreProgress {
                        done_bytes: done,
                        total_bytes: total,
                        done: false,
                        seq,
                    }));
                }
            });
            let last = match result {
                Ok(()) => Ok(pb::RestoreProgress {
                    done_bytes: v.size,
                    total_bytes: v.size,
                    done: true,
                    seq,
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let v = d.registry.volume(&r.volume)?;
            let to = required_point(&r.to, "--to")?;
            let report = rollback::rollback(&d.registry, &v, &to)?;
            Ok(pb::RollbackResponse {
                to_seq: report.to_seq,
                undo_seq: report.undo_seq,
                blocks: report.blocks,
                bytes: report.bytes,
            })
        })
        .await
        .map(Response::new)
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.blocking(|d| {
            let volumes: Vec<pb::Volume> = d
                .registry
                .volumes()
                .iter()
                .map(|v| volume_proto(d, v))
                .collect();
            let epoch = d
                .registry
                .groups()
                .iter()
                .map(|g| g.journal().epoch())
                .max()
                .unwrap_or(0);
            let role = if d.registry.groups().iter().any(|g| !g.is_replica())
                || d.registry.groups().is_empty()
            {
                "primary"
            } else {
                "replica"
            };
            let failover = failover_proto(d, None);
            Ok(pb::StatusResponse {
                failover: Some(failover),
                volumes,
                role: role.into(),
                epoch,
                version: env!("CARGO_PKG_VERSION").into(),
                nbd: d.nbd_addr.to_string(),
                data_dir: d.registry.config().data_dir.display().to_string(),
                exports: d
                    .registry
                    .exports
                    .list()
                    .iter()
                    .map(|e| export_proto(d, e))
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn add_replica(
        &self,
        request: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let r = request.into_inner();
        let daemon = self.daemon.clone();
        // On the runtime: the shipper it starts is a task of it.
        let status = {
            let registry = daemon.registry.clone();
            let volume = registry.volume(&r.volume).map_err(Status::from)?;
            let ca = (!r.ca_pem.is_empty()).then(|| r.ca_pem.clone());
            let peer = tidemark_replicator::Peer {
                address: r.address.clone(),
                token: r.token.trim().to_string(),
                ca_pem: ca.clone().map(String::into_bytes),
            };
            if !r.address.is_empty() && !r.token.trim().is_empty() {
                tidemark_replicator::link::probe(&peer, &volume.group.name)
                    .await
                    .map_err(Status::failed_precondition)?;
            }
            let status = tokio::task::block_in_place(|| {
                registry
                    .replication
                    .add(&registry, &volume, &r.address, &r.mode, &r.token, ca)
            })
            .map_err(Status::from)?;
            if !r.demotion.is_empty() {
                // The old primary this site took over from: its demotion
                // goes on the timeline here (and travels to it).
                let (registry, group, body) = (
                    registry.clone(),
                    volume.group.name.clone(),
                    r.demotion.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    registry.record_group_event(&group, "demotion", &body)
                });
            }
            status
        };
        Ok(Response::new(replica_proto(&r.volume, &status)))
    }

    async fn archive_status(
        &self,
        _: Request<pb::ArchiveStatusRequest>,
    ) -> Result<Response<pb::ArchiveStatusResponse>, Status> {
        let Some(archive) = self.daemon.registry.archive.get() else {
            return Err(Status::failed_precondition(
                "this daemon has no archive: add an [archive] table with url = \"s3://BUCKET/PREFIX\" to its configuration",
            ));
        };
        let groups = archive
            .statuses()
            .into_iter()
            .map(|s| pb::ArchiveGroupStatus {
                group: s.group,
                archived_seq: s.archived_seq,
                archived_time: s.archived_time.map(|t| t.to_string()).unwrap_or_default(),
                lag_seconds: s.lag_seconds,
                bytes: s.bytes,
                objects: s.objects,
                last_error: s.last_error.unwrap_or_default(),
                active: s.active,
                gaps: s.gaps,
                base_seq: s.base_seq,
            })
            .collect();
        Ok(Response::new(pb::ArchiveStatusResponse {
            url: archive.location(),
            groups,
        }))
    }

    async fn list_replicas(
        &self,
        _: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let registry = &self.daemon.registry;
        let mut replicas = Vec::new();
        for status in registry.replication.statuses() {
            for v in registry.volumes() {
                if v.group.name == status.group {
                    replicas.push(replica_proto(&v.name, &status));
                }
            }
        }
        Ok(Response::new(pb::ListReplicasResponse { replicas }))
    }

    async fn remove_replica(
        &self,
        request: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Empty>, Status> {
        let registry = self.daemon.registry.clone();
        let volume = registry
            .volume(&request.into_inner().name)
            .map_err(Status::from)?;
        registry
            .replication
            .remove(&volume)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn failover(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let r = request.into_inner();
        let registry = self.daemon.registry.clone();
        let p = tokio::task::spawn_blocking(move || {
            let volume = registry.volume(&r.volume)?;
            let at = (!r.at.trim().is_empty()).then_some(r.at.as_str());
            let (reason, detector) = if r.reason.is_empty() {
                ("manual: tidemark failover".to_string(), "manual")
            } else {
                (r.reason.clone(), "failback")
            };
            registry.promote(&volume.group.name, at, &reason, detector)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)?;
        Ok(Response::new(p.into()))
    }

    async fn failback(
        &self,
        request: Request<pb::FailbackRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let r = request.into_inner();
        let registry = self.daemon.registry.clone();
        let p = registry.failback(&r.volume).await.map_err(Status::from)?;
        Ok(Response::new(p.into()))
    }

    async fn verify_replica(
        &self,
        request: Request<pb::VerifyReplicaRequest>,
    ) -> Result<Response<pb::VerifyReplicaResponse>, Status> {
        let r = request.into_inner();
        let registry = self.daemon.registry.clone();
        let volume = registry.volume(&r.volume).map_err(Status::from)?;
        let seq = match point(&r.at, "--at").map_err(Status::from)? {
            Some(spec) => {
                let (registry, volume) = (registry.clone(), volume.clone());
                Some(
                    tokio::task::spawn_blocking(move || registry.resolve(&volume, &spec))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?
                        .map_err(Status::from)?,
                )
            }
            None => None,
        };
        let v = registry
            .replication
            .verify(&volume, seq)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::VerifyReplicaResponse {
            seq: v.seq,
            equal: v.differences.is_empty(),
            differences: v
                .differences
                .iter()
                .map(|(volume, offset, length)| pb::RegionDifference {
                    volume: volume.clone(),
                    offset: *offset,
                    length: *length,
                })
                .collect(),
            hash: v.hash,
            regions: v.regions,
        }))
    }

    type ReplicateStream = BoxStream<pb::ReplicationReply>;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::ReplicationMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let registry = self.daemon.registry.clone();
        let host = Arc::new(super::replication::ReplicaSite(registry.clone()));
        let replies = registry
            .replication
            .receivers
            .accept(host, request.into_inner())
            .await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(replies))))
    }

    async fn region_hashes(
        &self,
        request: Request<pb::RegionHashesRequest>,
    ) -> Result<Response<pb::RegionHashesResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |d| {
            let group = d.registry.group_by_name(&r.group)?;
            let journal = group.journal();
            let region = u64::from(r.region_size).max(4096);
            let mut volumes = Vec::new();
            for v in journal.volumes() {
                let hashes =
                    tidemark_replicator::hash::region_hashes(v.size, region, |offset, buf| {
                        journal
                            .read(&v.name, offset, buf, tidemark_journal::Point::Seq(r.seq))
                            .map(|_| ())
                    })?;
                volumes.push(pb::replication_reply::Hashes {
                    volume: v.id,
                    region_size: region as u32,
                    hashes: tidemark_replicator::hash::pack(&hashes),
                });
            }
            Ok(pb::RegionHashesResponse {
                volumes,
                seq: r.seq,
            })
        })
        .await
        .map(Response::new)
    }

    type IngestStream = BoxStream<pb::IngestReply>;

    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming.next().await.ok_or_else(|| {
            Status::invalid_argument("ingest stream ended before opening a volume")
        })??;
        let Some(pb::ingest_request::Op::Open(open)) = first.op else {
            return Err(Status::invalid_argument(
                "the first ingest message must open a volume",
            ));
        };
        let guard = self
            .blocking(move |d| {
                let volume = d.registry.volume(&open.volume)?;
                volume.refuse_on_replica("write it")?;
                Ok(WriterGuard::new(volume))
            })
            .await?;
        let guard = Arc::new(guard);
        let (tx, rx) = mpsc::channel(64);
        let _ = tx
            .send(Ok(pb::IngestReply {
                id: first.id,
                seq: 0,
                mode: String::new(),
                error: String::new(),
            }))
            .await;
        let mut stopping = self.daemon.stopping.clone();
        tokio::spawn(async move {
            loop {
                // The daemon shutting down ends the stream between writes:
                // none is taken after the last flush.
                let message = tokio::select! {
                    m = incoming.next() => m,
                    _ = stopped(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("the daemon is shutting down"))).await;
                        break;
                    }
                };
                let Some(message) = message else { break };
                let message = match message {
                    Ok(m) => m,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let guard = guard.clone();
                let id = message.id;
                let reply =
                    tokio::task::spawn_blocking(move || ingest_one(guard.volume(), message))
                        .await
                        .unwrap_or_else(|e| Err(ApiError::Failed(e.to_string())));
                let reply = match reply {
                    Ok((seq, mode)) => pb::IngestReply {
                        id,
                        seq,
                        mode,
                        error: String::new(),
                    },
                    Err(e) => pb::IngestReply {
                        id,
                        seq: 0,
                        mode: String::new(),
                        error: e.to_string(),
                    },
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Applies one ingest message to `volume`; returns the seq and mode.
fn ingest_one(volume: &Volume, message: pb::IngestRequest) -> ApiResult<(u64, String)> {
    use pb::ingest_request::Op;
    let wp = &volume.group.write_path;
    let name = &volume.name;
    // Each write checks the role as an NBD write does: a stream opened
    // before a demotion or a lost witness lease takes no write after it.
    let writes = matches!(message.op, Some(Op::Write(_) | Op::Zero(_) | Op::Trim(_)));
    let _pass = match writes.then(|| volume.group.writing()) {
        None => None,
        Some(Some(pass)) => Some(pass),
        // (Demoted: refused for good; no lease: for now.)
        Some(None) if volume.is_replica() => return Err(ApiError::Invalid(volume.write_refusal())),
        Some(None) => return Err(ApiError::Busy(volume.write_refusal())),
    };
    let ack = match message.op {
        Some(Op::Write(w)) => {
            let ack = wp.write(name, w.offset, &w.data, w.fua)?;
            volume.observe_write(w.offset, w.data.len() as u64, &ack);
            ack
        }
        Some(Op::Zero(z)) => {
            let ack = wp.write_zeroes(name, z.offset, z.length, false)?;
            volume.observe_free(z.offset, z.length, &ack);
            ack
        }
        Some(Op::Trim(t)) => {
            let ack = wp.trim(name, t.offset, t.length)?;
            volume.observe_free(t.offset, t.length, &ack);
            ack
        }
        Some(Op::Flush(_)) => {
            let seq = wp.flush(name)?;
            return Ok((seq.unwrap_or(0), wp.mode(name)?.1.to_string()));
        }
        Some(Op::Open(_)) => {
            return Err(ApiError::Invalid(format!(
                "this ingest stream already writes volume {name}; open another stream for another volume"
            )))
        }
        None => return Err(ApiError::Invalid("ingest message without an operation".into())),
    };
    Ok((ack.seq.unwrap_or(0), ack.mode.to_string()))
}

/// This site's watch over its primaries (over `group`'s only, if given).
fn failover_proto(d: &Daemon, group: Option<&str>) -> pb::FailoverStatus {
    let failover = &d.registry.failover;
    let f = failover.monitor.status(group);
    pb::FailoverStatus {
        auto: f.auto,
        phi: f.phi,
        last_heartbeat_seconds: f.last_heartbeat_seconds.unwrap_or(-1.0),
        witness: failover
            .witness
            .get()
            .map_or_else(|| "none".to_string(), |w| w.state()),
        probes: f
            .probes
            .into_iter()
            .map(|p| pb::ProbeStatus {
                kind: p.kind,
                target: p.target,
                failures_in_a_row: p.failures_in_a_row,
                failures: p.failures,
                last_error: p.last_error.unwrap_or_default(),
            })
            .collect(),
        takeovers: failover.takeovers.load(std::sync::atomic::Ordering::SeqCst),
        demotions: failover.demotions.load(std::sync::atomic::Ordering::SeqCst),
    }
}
