//! The NBD server: fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`) and the
//! transmission phase (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC, with
//! FUA), many requests in flight per connection.
//!
//! - [`protocol`] — the protocol's constants.
//! - `handshake` — option negotiation up to the chosen export.
//! - `transmission` — requests and replies on an export.

mod handshake;
pub mod protocol;
mod transmission;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::daemon::Daemon;

/// Accepts NBD clients on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let daemon = daemon.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        connection(stream, daemon, shutdown).await;
                        tracing::debug!(%peer, "nbd client gone");
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nbd accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

async fn connection(stream: TcpStream, daemon: Arc<Daemon>, shutdown: watch::Receiver<bool>) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    daemon
        .metrics
        .nbd_connections
        .fetch_add(1, Ordering::Relaxed);
    daemon.metrics.nbd_open.fetch_add(1, Ordering::Relaxed);
    let (read, write) = stream.into_split();
    let mut reader = tokio::io::BufReader::with_capacity(256 << 10, read);
    let mut writer = tokio::io::BufWriter::with_capacity(256 << 10, write);
    match handshake::negotiate(&mut reader, &mut writer, &daemon).await {
        Ok(Some(export)) => {
            tracing::info!(?peer, export = %export.name, "nbd client connected");
            transmission::run(reader, writer, export, daemon.clone(), shutdown).await;
        }
        Ok(None) => {}
        Err(e) => {
            daemon
                .metrics
                .nbd_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(?peer, error = %e, "nbd handshake ended");
        }
    }
    daemon.metrics.nbd_open.fetch_sub(1, Ordering::Relaxed);
}
