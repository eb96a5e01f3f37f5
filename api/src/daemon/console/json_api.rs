//! `/api/v1/…`: the gRPC operations as JSON, for the console and for
//! scripts. Each route builds the gRPC request from its path, query and
//! body and calls the same service the CLI uses, so the two surfaces
//! cannot drift apart; replies are the gRPC messages as JSON (field names
//! as in `tidemark.proto`). Errors are `{"error": "…"}` with the status
//! the gRPC code maps to. A few routes exist for the console alone: the
//! session's cross-site secret, the write rate along the timeline, the
//! crash-consistent point near a chosen one, and restore jobs.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tidemark_proto::v1 as pb;
use tidemark_proto::v1::tidemark_server::Tidemark;
use tonic::{Code, Request, Status};

use super::session::Caller;
use super::Console;
use crate::daemon::timeline;
use crate::point_spec::PointSpec;

/// An error as the JSON API answers it.
#[derive(Debug)]
pub struct JsonError(StatusCode, String);

impl JsonError {
    /// Bad input: 400 with `message`.
    pub fn invalid(message: impl Into<String>) -> JsonError {
        JsonError(StatusCode::BAD_REQUEST, message.into())
    }
}

impl From<Status> for JsonError {
    fn from(status: Status) -> JsonError {
        let code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        JsonError(code, status.message().to_string())
    }
}

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type Reply<T> = Result<Json<T>, JsonError>;

fn reply<T>(result: Result<tonic::Response<T>, Status>) -> Reply<T> {
    result
        .map(|r| Json(r.into_inner()))
        .map_err(JsonError::from)
}

/// The request body as `T`: empty means every field at its default;
/// anything that is not `T` as JSON is a 400 that says where.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes, what: &str) -> Result<T, JsonError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| JsonError::invalid(format!("the body of {what} is not valid: {e}")))
}

/// The routes, each behind the session check of [`super::require_caller`].
pub fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/session", get(session))
        .route("/status", get(status))
        .route("/volumes", get(list_volumes).post(create_volume))
        .route("/volumes/:volume", get(show_volume).delete(delete_volume))
        .route("/volumes/:volume/mode", post(set_mode))
        .route("/volumes/:volume/tags", get(list_tags).post(create_tag))
        .route("/volumes/:volume/tags/:tag", delete(delete_tag))
        .route("/volumes/:volume/tags/:tag/verify", post(verify_tag))
        .route("/volumes/:volume/timeline", get(timeline_of))
        .route("/volumes/:volume/activity", get(activity))
        .route("/volumes/:volume/point", get(point))
        .route("/volumes/:volume/flushes", get(flushes))
        .route("/volumes/:volume/exports", post(export))
        .route("/exports/:export", delete(unexport))
        .route("/volumes/:volume/restore", post(restore))
        .route("/volumes/:volume/rollback", post(rollback))
        .route("/jobs", get(jobs))
        .route("/replicas", get(list_replicas))
        .route(
            "/volumes/:volume/replica",
            post(add_replica).delete(remove_replica),
        )
        .route("/volumes/:volume/replica/verify", post(verify_replica))
        .route("/volumes/:volume/failover", post(failover))
        .route("/volumes/:volume/failback", post(failback))
        .route("/archive", get(archive_status))
        .fallback(not_found)
}

async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> JsonError {
    JsonError(
        StatusCode::NOT_FOUND,
        format!(
            "no such API route: {method} {} (see docs/console.md)",
            uri.path()
        ),
    )
}

#[derive(Serialize)]
struct SessionInfo {
    csrf: Option<String>,
    version: &'static str,
}

async fn session(axum::Extension(caller): axum::Extension<Caller>) -> Json<SessionInfo> {
    Json(SessionInfo {
        csrf: match caller {
            Caller::Session(s) => Some(s.csrf),
            Caller::Bearer => None,
        },
        version: env!("CARGO_PKG_VERSION"),
    })
}

async fn status(State(c): State<Arc<Console>>) -> Reply<pb::StatusResponse> {
    reply(c.service.status(Request::new(pb::StatusRequest {})).await)
}

async fn list_volumes(State(c): State<Arc<Console>>) -> Reply<pb::ListVolumesResponse> {
    reply(
        c.service
            .list_volumes(Request::new(pb::ListVolumesRequest {}))
            .await,
    )
}

async fn create_volume(State(c): State<Arc<Console>>, bytes: Bytes) -> Reply<pb::Volume> {
    let r: pb::CreateVolumeRequest = body(&bytes, "POST /api/v1/volumes")?;
    reply(c.service.create_volume(Request::new(r)).await)
}

async fn show_volume(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
) -> Reply<pb::VolumeDetail> {
    reply(
        c.service
            .show_volume(Request::new(pb::VolumeRef { name: volume }))
            .await,
    )
}

async fn delete_volume(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
) -> Reply<pb::Empty> {
    reply(
        c.service
            .delete_volume(Request::new(pb::VolumeRef { name: volume }))
            .await,
    )
}

async fn set_mode(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::Volume> {
    let mut r: pb::SetModeRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/mode")?;
    r.name = volume;
    reply(c.service.set_mode(Request::new(r)).await)
}

async fn list_tags(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
) -> Reply<pb::ListTagsResponse> {
    reply(
        c.service
            .list_tags(Request::new(pb::VolumeRef { name: volume }))
            .await,
    )
}

async fn create_tag(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::Tag> {
    let mut r: pb::CreateTagRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/tags")?;
    if r.name.trim().is_empty() {
        return Err(JsonError::invalid("a tag needs a name (\"name\")"));
    }
    r.volume = volume;
    reply(c.service.create_tag(Request::new(r)).await)
}

async fn delete_tag(
    State(c): State<Arc<Console>>,
    Path((volume, name)): Path<(String, String)>,
) -> Reply<pb::Empty> {
    reply(
        c.service
            .delete_tag(Request::new(pb::DeleteTagRequest { volume, name }))
            .await,
    )
}

async fn verify_tag(
    State(c): State<Arc<Console>>,
    Path((volume, name)): Path<(String, String)>,
    bytes: Bytes,
) -> Reply<pb::Tag> {
    let mut r: pb::VerifyTagRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/tags/TAG/verify")?;
    r.volume = volume;
    r.name = name;
    reply(c.service.verify_tag(Request::new(r)).await)
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Range {
    from: String,
    to: String,
}

async fn timeline_of(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    Query(range): Query<Range>,
) -> Reply<pb::TimelineResponse> {
    reply(
        c.service
            .timeline(Request::new(pb::TimelineRequest {
                volume,
                from: range.from,
                to: range.to,
            }))
            .await,
    )
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ActivityQuery {
    from: String,
    to: String,
    buckets: Option<u32>,
}

#[derive(Serialize)]
struct Activity {
    volume: String,
    /// Each slice's start (RFC 3339) and the records written in it.
    buckets: Vec<ActivityBucket>,
    seconds_per_bucket: f64,
}

#[derive(Serialize)]
struct ActivityBucket {
    time: String,
    records: u64,
}

fn time_param(text: &str, what: &str) -> Result<Option<tidemark_journal::Timestamp>, JsonError> {
    if text.is_empty() {
        return Ok(None);
    }
    match PointSpec::parse(text) {
        Ok(PointSpec::Time(t)) => Ok(Some(t)),
        _ => Err(JsonError::invalid(format!(
            "{what}: {text:?} is not an RFC 3339 time (like 2026-12-01T10:00:00Z)"
        ))),
    }
}

async fn activity(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    Query(q): Query<ActivityQuery>,
) -> Reply<Activity> {
    let from = time_param(&q.from, "from")?;
    let to = time_param(&q.to, "to")?;
    let buckets = q.buckets.unwrap_or(200);
    let registry = c.daemon.registry.clone();
    let (volume, rows) = blocking(move || {
        let v = registry.volume(&volume)?;
        let rows = timeline::activity(&v, from, to, buckets)?;
        Ok((v.name.clone(), rows))
    })
    .await?;
    let seconds_per_bucket = match rows.as_slice() {
        [a, b, ..] => (b.0.as_nanos() - a.0.as_nanos()) as f64 / 1e9,
        _ => 0.0,
    };
    Ok(Json(Activity {
        volume,
        seconds_per_bucket,
        buckets: rows
            .into_iter()
            .map(|(time, records)| ActivityBucket {
                time: time.to_string(),
                records,
            })
            .collect(),
    }))
}

#[derive(Serialize)]
struct Flushes {
    volume: String,
    flushes: Vec<FlushPoint>,
    /// True when the range held more than the 1000 returned.
    more: bool,
}

#[derive(Serialize)]
struct FlushPoint {
    seq: u64,
    time: String,
}

async fn flushes(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    Query(q): Query<Range>,
) -> Reply<Flushes> {
    let (Some(from), Some(to)) = (time_param(&q.from, "from")?, time_param(&q.to, "to")?) else {
        return Err(JsonError::invalid(
            "flush points need a range: from=TIME&to=TIME (RFC 3339)",
        ));
    };
    let registry = c.daemon.registry.clone();
    blocking(move || {
        let v = registry.volume(&volume)?;
        let (flushes, more) = timeline::flushes_between(&v, from, to, 1000)?;
        Ok(Flushes {
            volume: v.name.clone(),
            more,
            flushes: flushes
                .into_iter()
                .map(|(seq, time)| FlushPoint {
                    seq,
                    time: time.to_string(),
                })
                .collect(),
        })
    })
    .await
    .map(Json)
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct PointQuery {
    at: String,
}

#[derive(Serialize)]
struct PointDetail {
    volume: String,
    at: String,
    seq: u64,
    /// The newest flush point at or before `seq`: the crash-consistent
    /// point the console snaps to.
    flush_seq: Option<u64>,
    flush_time: Option<String>,
}

async fn point(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    Query(q): Query<PointQuery>,
) -> Reply<PointDetail> {
    let spec = PointSpec::parse(&q.at).map_err(|e| JsonError::invalid(format!("at: {e}")))?;
    let registry = c.daemon.registry.clone();
    blocking(move || {
        let v = registry.volume(&volume)?;
        let seq = registry.resolve(&v, &spec)?;
        let flush = timeline::flush_at_or_before(&v, seq)?;
        Ok(PointDetail {
            volume: v.name.clone(),
            at: q.at,
            seq,
            flush_seq: flush.map(|f| f.0),
            flush_time: flush.map(|f| f.1.to_string()),
        })
    })
    .await
    .map(Json)
}

async fn export(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::ExportResponse> {
    let mut r: pb::ExportRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/exports")?;
    r.volume = volume;
    reply(c.service.export(Request::new(r)).await)
}

async fn unexport(State(c): State<Arc<Console>>, Path(name): Path<String>) -> Reply<pb::Empty> {
    reply(
        c.service
            .unexport(Request::new(pb::UnexportRequest { name }))
            .await,
    )
}

/// A restore or a rollback: it must name what it does in `confirm`
/// (`VOLUME@POINT`), so a slip of the hand in a stressful moment is
/// caught here as well as by the page's dialog.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Confirmed {
    at: String,
    to: String,
    confirm: String,
}

fn check_confirmation(
    volume: &str,
    point: &str,
    confirm: &str,
    what: &str,
) -> Result<(), JsonError> {
    if point.trim().is_empty() {
        return Err(JsonError::invalid(format!("{what} needs a point")));
    }
    let expected = format!("{volume}@{}", point.trim());
    if confirm.trim() != expected {
        return Err(JsonError::invalid(format!(
            "{what} of volume {volume} needs \"confirm\": \"{expected}\" naming the volume and the point (got {confirm:?})"
        )));
    }
    Ok(())
}

async fn restore(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<super::jobs::Job> {
    let r: Confirmed = body(&bytes, "POST /api/v1/volumes/VOLUME/restore")?;
    check_confirmation(&volume, &r.at, &r.confirm, "a restore")?;
    if r.to.trim().is_empty() {
        return Err(JsonError::invalid("a restore needs a target path (\"to\")"));
    }
    let stream = c
        .service
        .restore(Request::new(pb::RestoreRequest {
            volume: volume.clone(),
            at: r.at.clone(),
            to: r.to.clone(),
        }))
        .await
        .map_err(JsonError::from)?
        .into_inner();
    Ok(Json(c.jobs.follow_restore(&volume, &r.at, &r.to, stream)))
}

async fn rollback(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::RollbackResponse> {
    let r: Confirmed = body(&bytes, "POST /api/v1/volumes/VOLUME/rollback")?;
    // A rollback goes *to* a point; `at` is accepted as the same.
    let point = if r.to.is_empty() { r.at } else { r.to };
    check_confirmation(&volume, &point, &r.confirm, "a rollback")?;
    // A job shows how far the rollback got while this request waits; the
    // rollback and its job go on (and end) even if the request is dropped.
    let watched = c
        .daemon
        .registry
        .volume(&volume)
        .map_err(|e| JsonError::from(Status::from(e)))?;
    let job = c.jobs.start("rollback", &volume, &point, "");
    let (jobs, id, service) = (c.jobs.clone(), job.id, c.service.clone());
    let result = tokio::spawn(async move {
        let watcher = {
            let jobs = jobs.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    if let Some((done, total)) = *watched.rollback_progress.lock() {
                        jobs.update(id, |j| (j.done_bytes, j.total_bytes) = (done, total));
                    }
                }
            })
        };
        let result = service
            .rollback(Request::new(pb::RollbackRequest { volume, to: point }))
            .await;
        watcher.abort();
        jobs.update(id, |j| match &result {
            Ok(r) => {
                let r = r.get_ref();
                j.state = "done";
                j.seq = r.to_seq;
                (j.done_bytes, j.total_bytes) = (r.bytes, r.bytes);
            }
            Err(status) => {
                j.state = "failed";
                j.error = Some(status.message().to_string());
            }
        });
        result
    })
    .await
    .map_err(|e| JsonError::from(Status::internal(format!("the rollback task failed: {e}"))))?;
    reply(result)
}

async fn jobs(State(c): State<Arc<Console>>) -> Json<Vec<super::jobs::Job>> {
    Json(c.jobs.list())
}

async fn list_replicas(State(c): State<Arc<Console>>) -> Reply<pb::ListReplicasResponse> {
    reply(
        c.service
            .list_replicas(Request::new(pb::ListReplicasRequest {}))
            .await,
    )
}

async fn add_replica(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::Replica> {
    let mut r: pb::AddReplicaRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/replica")?;
    r.volume = volume;
    reply(c.service.add_replica(Request::new(r)).await)
}

async fn remove_replica(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
) -> Reply<pb::Empty> {
    reply(
        c.service
            .remove_replica(Request::new(pb::VolumeRef { name: volume }))
            .await,
    )
}

async fn verify_replica(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::VerifyReplicaResponse> {
    let mut r: pb::VerifyReplicaRequest =
        body(&bytes, "POST /api/v1/volumes/VOLUME/replica/verify")?;
    r.volume = volume;
    reply(c.service.verify_replica(Request::new(r)).await)
}

async fn failover(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::FailoverResponse> {
    let mut r: pb::FailoverRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/failover")?;
    r.volume = volume;
    // The reason is the daemon's to write; a console takeover is manual.
    r.reason = String::new();
    reply(c.service.failover(Request::new(r)).await)
}

async fn failback(
    State(c): State<Arc<Console>>,
    Path(volume): Path<String>,
    bytes: Bytes,
) -> Reply<pb::FailoverResponse> {
    let mut r: pb::FailbackRequest = body(&bytes, "POST /api/v1/volumes/VOLUME/failback")?;
    r.volume = volume;
    reply(c.service.failback(Request::new(r)).await)
}

async fn archive_status(State(c): State<Arc<Console>>) -> Reply<pb::ArchiveStatusResponse> {
    reply(
        c.service
            .archive_status(Request::new(pb::ArchiveStatusRequest {}))
            .await,
    )
}

/// Runs daemon work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::daemon::error::ApiResult<T> + Send + 'static,
) -> Result<T, JsonError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            JsonError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("request failed: {e}"),
            )
        })?
        .map_err(|e| JsonError::from(Status::from(e)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_confirmations_say_what_is_wrong() {
        let empty: pb::ExportRequest = body(&Bytes::from_static(b" "), "x").unwrap();
        assert_eq!(empty.at, "");
        let err =
            body::<pb::ExportRequest>(&Bytes::from_static(b"{\"att\": 1}"), "POST x").unwrap_err();
        assert_eq!(err.0, StatusCode::BAD_REQUEST);
        assert!(
            err.1.contains("POST x") && err.1.contains("att"),
            "{}",
            err.1
        );

        assert!(check_confirmation("db", "tag:t", "db@tag:t", "a rollback").is_ok());
        let wrong = check_confirmation("db", "tag:t", "db@tag:u", "a rollback").unwrap_err();
        assert!(wrong.1.contains("db@tag:t"), "{}", wrong.1);
        assert!(check_confirmation("db", " ", "db@", "a rollback").is_err());
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        let of = |s: Status| JsonError::from(s).0;
        assert_eq!(of(Status::not_found("x")), StatusCode::NOT_FOUND);
        assert_eq!(of(Status::invalid_argument("x")), StatusCode::BAD_REQUEST);
        assert_eq!(of(Status::failed_precondition("x")), StatusCode::CONFLICT);
        assert_eq!(of(Status::internal("x")), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
