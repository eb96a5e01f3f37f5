//! The transmission phase: requests are read in order and replies go back
//! in the order they finish, matched by handle.
//!
//! Each request holds one of the connection's `MAX_IN_FLIGHT` slots and
//! its buffer bytes (see [`super::Limits`]) from before its payload is
//! read until its reply is written, so a client cannot make the server
//! hold more than its share, however much it sends. Requests that cannot
//! block — small reads of the live volume, small async writes whose
//! regions are free and already marked dirty — run on the connection's
//! task. Small sync writes begin there too, and one settling task per
//! connection answers them as their records become durable. Everything
//! else that may fsync, wait for a lock or for the journal runs on the
//! blocking pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::handshake::{Agreed, Context};
use super::protocol::*;
use super::wire::{self, RequestHeader};
use super::{hold, Held, Limits};
use crate::daemon::error::ApiError;
use crate::daemon::error::ApiResult;
use crate::daemon::exports::{Export, PendingWrite};
use crate::daemon::extents::Extents;
use crate::daemon::Daemon;

/// Requests one connection may have in flight.
const MAX_IN_FLIGHT: usize = 64;

/// Largest request run on the connection's task.
const INLINE_MAX: u32 = 64 << 10;

/// What a request answers.
struct Answer {
    handle: u64,
    /// The command, which decides the reply's shape.
    kind: u16,
    /// Where a read read from.
    offset: u64,
    error: u32,
    data: Vec<u8>,
    /// For BLOCK_STATUS: each selected context's id and its extents as
    /// `(length, flags)`.
    status: Vec<(u32, Vec<(u32, u32)>)>,
}

/// The contexts one connection selected; a `tidemark:changed:` map is
/// made at its first request and kept for the connection.
struct Selected {
    contexts: Vec<(u32, Context, std::sync::OnceLock<Extents>)>,
}

/// An answer on its way to the client.
struct Reply {
    answer: Answer,
    /// The request's slot and buffer bytes, given back once written.
    _held: (OwnedSemaphorePermit, Option<Held>),
}

/// Serves requests on `export` until the client disconnects, breaks the
/// protocol, or the daemon shuts down; requests in flight finish first.
/// Returns the export, for the caller to drop where blocking is fine.
pub async fn run<R, W>(
    mut r: R,
    w: W,
    export: Arc<Export>,
    agreed: Agreed,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
    limits: Arc<Limits>,
) -> Arc<Export>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_replies(w, rx, agreed.structured));
    let selected = Arc::new(Selected {
        contexts: agreed
            .contexts
            .into_iter()
            .map(|(id, context)| (id, context, Default::default()))
            .collect(),
    });
    let (to_settler, settling) = mpsc::unbounded_channel::<Settling>();
    let settler = tokio::spawn(settle_sync_writes(
        settling,
        export.clone(),
        daemon.clone(),
        tx.clone(),
    ));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let share = Arc::new(Semaphore::new(limits.per_connection as usize));
    loop {
        let mut head = [0u8; 28];
        tokio::select! {
            read = r.read_exact(&mut head) => if read.is_err() { break },
            _ = shutdown.changed() => break,
        }
        let request = match wire::decode_request(&head) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(export = %export.name, error = %e, "nbd request out of step; closing the connection");
                break;
            }
        };
        if request.kind == CMD_DISC {
            break;
        }
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let oversized =
            matches!(request.kind, CMD_READ | CMD_WRITE) && request.length > MAX_PAYLOAD;
        if oversized {
            // Refused without a buffer; a write's payload is read past in
            // small pieces so the stream stays in step.
            if request.kind == CMD_WRITE && !skip(&mut r, u64::from(request.length)).await {
                break;
            }
            daemon.metrics.nbd_errors.fetch_add(1, Ordering::Relaxed);
            let reply = Reply {
                answer: Answer::error(&request, EINVAL),
                _held: (slot, None),
            };
            if tx.send(reply).await.is_err() {
                break;
            }
            continue;
        }
        let buffer = match request.kind {
            CMD_READ | CMD_WRITE if request.length > 0 => u64::from(request.length),
            _ => 0,
        };
        let held = if buffer > 0 {
            match hold(&limits, &share, buffer, &daemon).await {
                Some(held) => Some(held),
                None => break,
            }
        } else {
            None
        };
        let mut payload = Bytes::new();
        if request.kind == CMD_WRITE {
            // Read once into a pooled buffer that the production write and
            // the journal record then share.
            let mut buf = limits.write_buffers.take(request.length as usize);
            if r.read_exact(&mut buf).await.is_err() {
                break;
            }
            payload = buf.freeze();
        }
        let held = (slot, held);
        if let Some(write) = begin_sync_inline(&export, &request, &payload) {
            let settling = Settling {
                write,
                request,
                held,
                started: Instant::now(),
            };
            match settling.write {
                Ok(ref write) if !write.blocks() => {
                    if let Err(mpsc::error::SendError(settling)) = to_settler.send(settling) {
                        // Not to be dropped unsettled.
                        settle_apart(settling, export.clone(), daemon.clone(), tx.clone());
                        break;
                    }
                }
                _ => settle_apart(settling, export.clone(), daemon.clone(), tx.clone()),
            }
            continue;
        }
        if let Some(answer) = run_inline(&export, &daemon, &request, &payload) {
            let reply = Reply {
                answer,
                _held: held,
            };
            if tx.send(reply).await.is_err() {
                break;
            }
            continue;
        }
        let export = export.clone();
        let daemon = daemon.clone();
        let tx = tx.clone();
        let selected = selected.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let answer = if request.kind == CMD_BLOCK_STATUS {
                block_status(&export, &selected, &request)
            } else {
                execute(&export, &request, &payload)
            };
            record(&daemon, request.kind, answer.error, started);
            let _ = tx.blocking_send(Reply {
                answer,
                _held: held,
            });
        });
    }
    drop(to_settler);
    let _ = settler.await;
    drop(tx);
    let _ = writer.await;
    export
}

/// Reads and drops `len` bytes; false if the connection broke.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> bool {
    let mut sink = vec![0u8; 64 << 10];
    let mut rest = len;
    while rest > 0 {
        let n = rest.min(sink.len() as u64) as usize;
        if r.read_exact(&mut sink[..n]).await.is_err() {
            return false;
        }
        rest -= n as u64;
    }
    true
}

/// Starts a small sync write right here if that cannot block (see
/// `Export::try_begin_sync`): errors are answered at once too.
fn begin_sync_inline(
    export: &Export,
    request: &RequestHeader,
    payload: &Bytes,
) -> Option<ApiResult<PendingWrite>> {
    if request.kind != CMD_WRITE || request.length > INLINE_MAX || request.flags & CMD_FLAG_FUA != 0
    {
        return None;
    }
    export.try_begin_sync(request.offset, payload)
}

/// A sync write begun on the connection's task, waiting for its record.
struct Settling {
    write: ApiResult<PendingWrite>,
    request: RequestHeader,
    held: (OwnedSemaphorePermit, Option<Held>),
    started: Instant,
}

/// Answers the connection's sync writes begun on its task, in the order
/// they began (their records' order), each once its record is durable.
/// One task for all of them, so writes waiting for the journal's group
/// commit hold no thread, and a commit wakes one task per connection, not
/// one per write: the writes behind the first are found ready then.
async fn settle_sync_writes(
    mut settling: mpsc::UnboundedReceiver<Settling>,
    export: Arc<Export>,
    daemon: Arc<Daemon>,
    tx: mpsc::Sender<Reply>,
) {
    // Every write begun is settled, even once the client is gone: a
    // write left unsettled would keep its regions busy for good.
    let mut client_gone = false;
    while let Some(Settling {
        write,
        request,
        held,
        started,
    }) = settling.recv().await
    {
        let outcome = match write {
            Err(e) => Err(e),
            Ok(mut write) => {
                let durable = tokio::time::timeout(write.time_left(), write.durable())
                    .await
                    .ok();
                if write.waits_for_replica() {
                    // A replica turned sync meanwhile: its wait blocks.
                    on_pool(&export, &request, move || write.settle(durable)).await
                } else {
                    write.settle(durable)
                }
            }
        };
        let reply = settled(&export, &daemon, request, outcome, held, started);
        if !client_gone && tx.send(reply).await.is_err() {
            client_gone = true;
        }
    }
}

/// Answers a sync write begun on the connection's task that failed at
/// once, or whose finishing may block (a replica to wait for, a failed
/// production write): on a task of its own, blocking on the pool.
fn settle_apart(
    settling: Settling,
    export: Arc<Export>,
    daemon: Arc<Daemon>,
    tx: mpsc::Sender<Reply>,
) {
    let Settling {
        write,
        request,
        held,
        started,
    } = settling;
    tokio::spawn(async move {
        let outcome = match write {
            Err(e) => Err(e),
            Ok(write) => on_pool(&export, &request, move || write.wait()).await,
        };
        let reply = settled(&export, &daemon, request, outcome, held, started);
        let _ = tx.send(reply).await;
    });
}

/// Finishes a sync write where blocking is fine; a failure of the pool
/// itself answers as the write's failure.
async fn on_pool(
    export: &Export,
    request: &RequestHeader,
    finish: impl FnOnce() -> ApiResult<()> + Send + 'static,
) -> ApiResult<()> {
    tokio::task::spawn_blocking(finish)
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::Failed(format!(
                "volume {}: waiting for a sync write at offset {} failed: {e}",
                export.volume_name, request.offset
            )))
        })
}

/// The reply to a settled sync write, counted in the metrics.
fn settled(
    export: &Export,
    daemon: &Daemon,
    request: RequestHeader,
    outcome: ApiResult<()>,
    held: (OwnedSemaphorePermit, Option<Held>),
    started: Instant,
) -> Reply {
    let answer = answer(export, &request, outcome, Vec::new());
    record(daemon, request.kind, answer.error, started);
    Reply {
        answer,
        _held: held,
    }
}

/// Runs `request` right here if it cannot block: a small read of the live
/// volume (a pread of the production volume), a small write that
/// `Export::try_write` can take without waiting, or a flush that
/// `Export::try_flush` can. `None`: use the pool.
fn run_inline(
    export: &Export,
    daemon: &Daemon,
    request: &RequestHeader,
    payload: &Bytes,
) -> Option<Answer> {
    let started = Instant::now();
    let answer = match request.kind {
        CMD_READ if export.is_live() && request.length <= INLINE_MAX => {
            execute(export, request, payload)
        }
        CMD_WRITE if request.length <= INLINE_MAX && request.flags & CMD_FLAG_FUA == 0 => {
            let outcome = export.try_write(request.offset, payload)?;
            answer(export, request, outcome, Vec::new())
        }
        CMD_FLUSH => {
            let outcome = export.try_flush()?;
            answer(export, request, outcome, Vec::new())
        }
        _ => return None,
    };
    record(daemon, request.kind, answer.error, started);
    Some(answer)
}

fn record(daemon: &Daemon, kind: u16, error: u32, started: Instant) {
    if error != 0 {
        daemon.metrics.nbd_errors.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(h) = reply_metric(daemon, kind) {
        h.observe(started.elapsed());
    }
}

fn reply_metric(daemon: &Daemon, kind: u16) -> Option<&crate::daemon::metrics::Histogram> {
    let i = match kind {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_FLUSH => 2,
        CMD_TRIM => 3,
        CMD_WRITE_ZEROES => 4,
        _ => return None,
    };
    daemon.metrics.nbd_latency.get(i)
}

/// The errno for a failed request.
fn errno(export: &Export, kind: u16, e: &ApiError) -> u32 {
    let code = match e {
        ApiError::Invalid(_) if export.read_only() && kind != CMD_READ => EPERM,
        ApiError::Invalid(_) if kind == CMD_READ => EINVAL,
        ApiError::Invalid(_) => ENOSPC,
        ApiError::NotFound(_) | ApiError::Exists(_) | ApiError::OutOfRange(_) => EINVAL,
        ApiError::Busy(_) => EIO,
        ApiError::Failed(_) => EIO,
    };
    if code == EIO {
        tracing::warn!(export = %export.name, kind, error = %e, "nbd request failed");
    } else {
        tracing::debug!(export = %export.name, kind, error = %e, "nbd request refused");
    }
    code
}

impl Answer {
    fn error(request: &RequestHeader, error: u32) -> Answer {
        Answer {
            handle: request.handle,
            kind: request.kind,
            offset: request.offset,
            error,
            data: Vec::new(),
            status: Vec::new(),
        }
    }
}

fn answer(
    export: &Export,
    request: &RequestHeader,
    outcome: Result<(), ApiError>,
    data: Vec<u8>,
) -> Answer {
    match outcome {
        Ok(()) => Answer {
            data,
            ..Answer::error(request, 0)
        },
        Err(e) => Answer::error(request, errno(export, request.kind, &e)),
    }
}

/// BLOCK_STATUS: each selected context's extents over the request's range.
fn block_status(export: &Export, selected: &Selected, request: &RequestHeader) -> Answer {
    if selected.contexts.is_empty() {
        // The client selected no context (it must not ask, then).
        return Answer::error(request, EINVAL);
    }
    let (offset, length) = (request.offset, u64::from(request.length));
    if length == 0 {
        return Answer::error(request, EINVAL);
    }
    let one = request.flags & CMD_FLAG_REQ_ONE != 0;
    let mut status = Vec::with_capacity(selected.contexts.len());
    for (id, context, changed) in &selected.contexts {
        let runs = match context {
            Context::Allocation => export.allocation(offset, length, one).map(|runs| {
                runs.into_iter()
                    .map(|(len, data)| (len, if data { 0 } else { STATE_HOLE | STATE_ZERO }))
                    .collect::<Vec<_>>()
            }),
            Context::Changed { since } => {
                let map = match changed.get() {
                    Some(map) => Ok(map),
                    None => export
                        .changed_since(*since)
                        .map(|map| changed.get_or_init(|| map)),
                };
                map.and_then(|map| export.describe(map, offset, length, one))
                    .map(|runs| {
                        runs.into_iter()
                            .map(|(len, changed)| (len, if changed { STATE_CHANGED } else { 0 }))
                            .collect()
                    })
            }
        };
        match runs {
            Ok(runs) => status.push((
                *id,
                runs.into_iter()
                    .map(|(len, flags)| (len as u32, flags))
                    .collect(),
            )),
            Err(e) => return Answer::error(request, errno(export, CMD_READ, &e)),
        }
    }
    Answer {
        status,
        ..Answer::error(request, 0)
    }
}

fn execute(export: &Export, request: &RequestHeader, payload: &Bytes) -> Answer {
    let fua = request.flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (request.offset, request.length);
    let mut data = Vec::new();
    let outcome = match request.kind {
        CMD_READ => {
            data = vec![0u8; length as usize];
            export.read(offset, &mut data)
        }
        CMD_WRITE => export.write_shared(offset, payload, fua),
        CMD_FLUSH => export.flush(),
        CMD_TRIM => export.zero(offset, u64::from(length), fua, true),
        CMD_WRITE_ZEROES => export.zero(offset, u64::from(length), fua, false),
        other => Err(ApiError::NotFound(format!("unknown NBD command {other}"))),
    };
    answer(export, request, outcome, data)
}

/// A structured reply chunk's header.
fn chunk_header(flags: u16, kind: u16, handle: u64, length: usize) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&kind.to_be_bytes());
    header[8..16].copy_from_slice(&handle.to_be_bytes());
    header[16..20].copy_from_slice(&(length as u32).to_be_bytes());
    header
}

/// The bytes of `answer`'s reply, but a read's data: simple replies, or
/// with `structured` a read's OFFSET_DATA chunk, a block status's chunks
/// (one per context, the last marked done) and errors of either as an
/// ERROR chunk.
fn reply_head(answer: &Answer, structured: bool) -> Vec<u8> {
    let structured_kind = structured && matches!(answer.kind, CMD_READ | CMD_BLOCK_STATUS);
    if !structured_kind {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        header.extend_from_slice(&answer.error.to_be_bytes());
        header.extend_from_slice(&answer.handle.to_be_bytes());
        return header;
    }
    if answer.error != 0 {
        let mut out = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, answer.handle, 6).to_vec();
        out.extend_from_slice(&answer.error.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        return out;
    }
    if answer.kind == CMD_READ {
        if answer.data.is_empty() {
            // Nothing to send: one empty chunk ends the reply.
            return chunk_header(REPLY_FLAG_DONE, 0, answer.handle, 0).to_vec();
        }
        let mut out = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            answer.handle,
            8 + answer.data.len(),
        )
        .to_vec();
        out.extend_from_slice(&answer.offset.to_be_bytes());
        return out;
    }
    let mut out = Vec::new();
    for (i, (id, runs)) in answer.status.iter().enumerate() {
        let last = i + 1 == answer.status.len();
        out.extend_from_slice(&chunk_header(
            if last { REPLY_FLAG_DONE } else { 0 },
            REPLY_TYPE_BLOCK_STATUS,
            answer.handle,
            4 + 8 * runs.len(),
        ));
        out.extend_from_slice(&id.to_be_bytes());
        for (length, flags) in runs {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    out
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
) {
    while let Some(reply) = rx.recv().await {
        let answer = &reply.answer;
        let head = reply_head(answer, structured);
        if w.write_all(&head).await.is_err() || w.write_all(&answer.data).await.is_err() {
            return;
        }
        if rx.is_empty() {
            // Replies of one group commit arrive together, each from its
            // own task: let those already woken add theirs first, so one
            // send carries them all.
            tokio::task::yield_now().await;
        }
        if rx.is_empty() && w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}
