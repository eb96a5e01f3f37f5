//! The transmission phase: requests are read in order, each runs on the
//! blocking pool as soon as it has arrived (up to `MAX_IN_FLIGHT` at once),
//! and replies go back in the order they finish, matched by handle.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

use super::protocol::*;
use crate::daemon::error::ApiError;
use crate::daemon::exports::Export;
use crate::daemon::Daemon;

/// Requests one connection may have in flight.
const MAX_IN_FLIGHT: usize = 64;

struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
}

struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

/// Serves requests on `export` until the client disconnects, breaks the
/// protocol, or the daemon shuts down; requests in flight finish first.
pub async fn run<R, W>(
    mut r: R,
    w: W,
    export: Arc<Export>,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(write_replies(w, rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let mut header = [0u8; 28];
        tokio::select! {
            read = r.read_exact(&mut header) => if read.is_err() { break },
            _ = shutdown.changed() => break,
        }
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap_or_default());
        if magic != REQUEST_MAGIC {
            tracing::warn!(export = %export.name, magic, "nbd request with a bad magic; closing the connection");
            break;
        }
        let mut request = Request {
            flags: u16::from_be_bytes([header[4], header[5]]),
            kind: u16::from_be_bytes([header[6], header[7]]),
            handle: u64::from_be_bytes(header[8..16].try_into().unwrap_or_default()),
            offset: u64::from_be_bytes(header[16..24].try_into().unwrap_or_default()),
            length: u32::from_be_bytes(header[24..28].try_into().unwrap_or_default()),
            payload: Vec::new(),
        };
        if request.kind == CMD_DISC {
            break;
        }
        if request.kind == CMD_WRITE {
            if request.length > MAX_PAYLOAD {
                // Read past the payload so the stream stays in step.
                let mut rest = u64::from(request.length);
                let mut sink = vec![0u8; 1 << 20];
                let mut broken = false;
                while rest > 0 {
                    let n = rest.min(sink.len() as u64) as usize;
                    if r.read_exact(&mut sink[..n]).await.is_err() {
                        broken = true;
                        break;
                    }
                    rest -= n as u64;
                }
                if broken {
                    break;
                }
                daemon.metrics.nbd_errors.fetch_add(1, Ordering::Relaxed);
                let _ = tx
                    .send(Reply {
                        handle: request.handle,
                        error: EINVAL,
                        data: Vec::new(),
                    })
                    .await;
                continue;
            }
            request.payload = vec![0u8; request.length as usize];
            if r.read_exact(&mut request.payload).await.is_err() {
                break;
            }
        }
        // Requests that finish in microseconds (small reads of the live
        // volume, small async writes) run right here: handing each to a
        // pool thread and back costs more than the request itself.
        if runs_inline(&export, &request) {
            let started = Instant::now();
            let kind = request.kind;
            let (reply, _) = execute(&export, request);
            record(&daemon, kind, reply.error, started);
            if tx.send(reply).await.is_err() {
                break;
            }
            continue;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let export = export.clone();
        let daemon = daemon.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (reply, kind) = execute(&export, request);
            record(&daemon, kind, reply.error, started);
            let _ = tx.blocking_send(reply);
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// Largest request run inline.
const INLINE_MAX: u32 = 64 << 10;

fn runs_inline(export: &Export, request: &Request) -> bool {
    match request.kind {
        CMD_READ => export.is_live() && request.length <= INLINE_MAX,
        CMD_WRITE => {
            request.length <= INLINE_MAX
                && request.flags & CMD_FLAG_FUA == 0
                && export.writes_without_waiting()
        }
        _ => false,
    }
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

fn execute(export: &Export, request: Request) -> (Reply, u16) {
    let Request {
        flags,
        kind,
        handle,
        offset,
        length,
        payload,
    } = request;
    let fua = flags & CMD_FLAG_FUA != 0;
    let mut data = Vec::new();
    let result = match kind {
        CMD_READ if length > MAX_PAYLOAD => Err(ApiError::Invalid(format!(
            "read of {length} bytes is larger than the {MAX_PAYLOAD}-byte maximum"
        ))),
        CMD_READ => {
            data = vec![0u8; length as usize];
            export.read(offset, &mut data)
        }
        CMD_WRITE => export.write(offset, &payload, fua),
        CMD_FLUSH => export.flush(),
        CMD_TRIM => export.zero(offset, u64::from(length), fua, true),
        CMD_WRITE_ZEROES => export.zero(offset, u64::from(length), fua, false),
        other => Err(ApiError::NotFound(format!("unknown NBD command {other}"))),
    };
    let error = match &result {
        Ok(()) => 0,
        Err(e) => {
            data = Vec::new();
            errno(export, kind, e)
        }
    };
    (
        Reply {
            handle,
            error,
            data,
        },
        kind,
    )
}

async fn write_replies<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Reply>) {
    while let Some(reply) = rx.recv().await {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        header[4..8].copy_from_slice(&reply.error.to_be_bytes());
        header[8..16].copy_from_slice(&reply.handle.to_be_bytes());
        if w.write_all(&header).await.is_err() || w.write_all(&reply.data).await.is_err() {
            return;
        }
        if rx.is_empty() && w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}
