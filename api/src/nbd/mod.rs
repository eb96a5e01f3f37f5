//! The NBD server: fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT`,
//! `NBD_OPT_SET_META_CONTEXT`) and the transmission phase (READ, WRITE,
//! FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, DISC, with FUA), many requests
//! in flight per connection. Block status answers `base:allocation` and
//! `tidemark:changed:POINT` (what changed since a point, for incremental
//! copies).
//!
//! Whatever clients send, the server's resources stay bounded
//! ([`Limits`]): connections beyond `limits.nbd_connections` are closed at
//! once, a handshake that stalls is ended, and every request holds its
//! buffer bytes from a daemon-wide budget (and a per-connection share of
//! it) from before its payload is read until its reply is written.
//!
//! - [`protocol`] — the protocol's constants.
//! - [`wire`] — decoding what clients send (options, requests), pure.
//! - `handshake` — option negotiation up to the chosen export.
//! - `transmission` — requests and replies on an export.

mod handshake;
pub mod protocol;
mod transmission;
pub mod wire;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::daemon::Daemon;

/// Buffer bytes are counted in pages of this size.
const PAGE: u64 = 4096;

/// Daemon-wide bounds on what NBD clients can make the server hold.
#[derive(Debug)]
pub struct Limits {
    /// Connections open at once.
    connections: Arc<Semaphore>,
    /// How long a client may take to choose an export.
    handshake_timeout: Duration,
    /// Buffer bytes held by requests and replies, in pages.
    buffers: Arc<Semaphore>,
    /// The buffers writes are read into, reused.
    write_buffers: tidemark_journal::WriteBuffers,
    /// The most one connection may hold of `buffers`, in pages: a client
    /// that never reads its replies pins no more than this.
    per_connection: u32,
}

impl Limits {
    /// The limits a configuration asks for.
    pub fn new(config: &crate::config::Config) -> Self {
        let pages = (config.nbd_buffer_memory / PAGE).min(Semaphore::MAX_PERMITS as u64) as usize;
        let largest = u64::from(protocol::MAX_PAYLOAD) / PAGE;
        Limits {
            connections: Arc::new(Semaphore::new(config.nbd_connections)),
            handshake_timeout: config.nbd_handshake_timeout,
            buffers: Arc::new(Semaphore::new(pages)),
            write_buffers: tidemark_journal::WriteBuffers::default(),
            per_connection: (pages as u64 / 4).max(largest).min(u32::MAX as u64) as u32,
        }
    }
}

/// Buffer bytes held from the budget; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    _global: OwnedSemaphorePermit,
    _local: OwnedSemaphorePermit,
    bytes: u64,
    daemon: Arc<Daemon>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.daemon
            .metrics
            .nbd_buffer_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Waits until `bytes` of buffer may be held by a connection whose share
/// is `local`; `None` once the budget is closed.
pub(crate) async fn hold(
    limits: &Limits,
    local: &Arc<Semaphore>,
    bytes: u64,
    daemon: &Arc<Daemon>,
) -> Option<Held> {
    let pages = bytes.div_ceil(PAGE).max(1) as u32;
    // The connection's share first, so one connection never queues for
    // more of the budget than its share.
    let local = local.clone().acquire_many_owned(pages).await.ok()?;
    let global = limits
        .buffers
        .clone()
        .acquire_many_owned(pages)
        .await
        .ok()?;
    daemon
        .metrics
        .nbd_buffer_bytes
        .fetch_add(bytes, Ordering::Relaxed);
    Some(Held {
        _global: global,
        _local: local,
        bytes,
        daemon: daemon.clone(),
    })
}

/// Accepts NBD clients on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = Arc::new(Limits::new(daemon.registry.config()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = limits.connections.clone().try_acquire_owned() else {
                        daemon.metrics.nbd_refused_connections.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, limit = daemon.registry.config().nbd_connections, "nbd connection refused: the connection limit is reached");
                        drop(stream);
                        continue;
                    };
                    let daemon = daemon.clone();
                    let shutdown = shutdown.clone();
                    let limits = limits.clone();
                    tokio::spawn(async move {
                        connection(stream, daemon, shutdown, limits).await;
                        drop(slot);
                        tracing::debug!(%peer, "nbd client gone");
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nbd accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

async fn connection(
    stream: TcpStream,
    daemon: Arc<Daemon>,
    shutdown: watch::Receiver<bool>,
    limits: Arc<Limits>,
) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    daemon
        .metrics
        .nbd_connections
        .fetch_add(1, Ordering::Relaxed);
    daemon.metrics.nbd_open.fetch_add(1, Ordering::Relaxed);
    let (read, write) = stream.into_split();
    let mut reader = tokio::io::BufReader::with_capacity(CONNECTION_BUFFER, read);
    let mut writer = tokio::io::BufWriter::with_capacity(CONNECTION_BUFFER, write);
    let negotiated = tokio::time::timeout(
        limits.handshake_timeout,
        handshake::negotiate(&mut reader, &mut writer, &daemon),
    )
    .await;
    match negotiated {
        Ok(Ok(Some((export, agreed)))) => {
            tracing::info!(?peer, export = %export.name, structured = agreed.structured, contexts = agreed.contexts.len(), "nbd client connected");
            let export = transmission::run(
                reader,
                writer,
                export,
                agreed,
                daemon.clone(),
                shutdown,
                limits,
            )
            .await;
            // The last handle of a view releases its retention hold, which
            // stores the manifest (an fsync): not on the event loop.
            let _ = tokio::task::spawn_blocking(move || drop(export)).await;
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            daemon
                .metrics
                .nbd_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(?peer, error = %e, "nbd handshake ended");
        }
        Err(_) => {
            daemon
                .metrics
                .nbd_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(?peer, timeout = ?limits.handshake_timeout, "nbd handshake took too long; closing");
        }
    }
    daemon.metrics.nbd_open.fetch_sub(1, Ordering::Relaxed);
}

/// Bytes of read and write buffer each connection keeps (twice this in
/// all), outside the request budget.
pub const CONNECTION_BUFFER: usize = 128 << 10;
