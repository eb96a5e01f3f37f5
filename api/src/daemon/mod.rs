//! `tidemark serve`: the daemon. It opens the data directory, serves NBD,
//! gRPC and HTTP, runs retention, and on SIGTERM/SIGINT stops taking
//! requests, lets those in flight finish and closes every journal, so
//! everything acknowledged is durable.
//!
//! - [`registry`] — groups, volumes and the operations on them.
//! - [`catalog`] — the persistent list of volumes.
//! - [`exports`] — live, point-in-time and overlay exports; [`extents`] —
//!   what is allocated or changed in them, as NBD block status tells it.
//! - [`tags`], [`timeline`] — tags and the timeline; [`tagging_host`] —
//!   the daemon as host of the tagger (time policies, log rules, hooks,
//!   anomaly detection, verification: `tidemark-tagging`).
//! - [`rollback`], [`restore`], [`initial_sync`] — recovery operations.
//! - [`archive`] — the archivers of `[archive]` and points served from
//!   the bucket (the work is `tidemark-replicator`'s `archive`).
//! - [`replication`] — the replicas this site ships to, and the groups it
//!   keeps as another site's replica (the work is `tidemark-replicator`'s).
//! - [`grpc`], [`http`], [`metrics`] — the API surfaces; [`console`] — the
//!   web console and its JSON API; [`access`] — the API token and TLS.
//! - [`error`] — errors as clients see them.

pub mod access;
pub mod archive;
pub mod catalog;
pub mod console;
pub mod error;
pub mod exports;
pub mod extents;
pub mod failover;
pub mod grpc;
pub mod http;
pub mod initial_sync;
pub mod metrics;
pub mod registry;
pub mod replication;
pub mod restore;
pub mod rollback;
pub mod tagging_host;
pub mod tags;
pub mod timeline;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use metrics::Metrics;
use registry::Registry;

/// What every surface of the daemon shares.
#[derive(Debug)]
pub struct Daemon {
    /// Groups, volumes, exports.
    pub registry: Arc<Registry>,
    /// The daemon's counters.
    pub metrics: Metrics,
    /// Where NBD clients reach us (for URIs).
    pub nbd_addr: SocketAddr,
    /// Automatic tags, app-consistent tags, verification.
    pub tagger: Arc<tidemark_tagging::Tagger>,
    /// Turns true when the daemon shuts down: long-lived streams end.
    pub stopping: watch::Receiver<bool>,
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(config: Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(256)
        .thread_name("tidemark")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let outcome = runtime.block_on(run(config));
    // A blocking task still running (a restore the stop ended, a close
    // past its deadline) does not hold the process: its outcome is
    // already said.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    outcome
}

async fn run(config: Config) -> Result<(), String> {
    // Bind first: a port in use is reported before any journal is opened.
    let nbd = bind("NBD", config.nbd).await?;
    let grpc = bind("gRPC", config.grpc).await?;
    let http = bind("HTTP", config.http).await?;
    let nbd_addr = nbd.local_addr().map_err(|e| e.to_string())?;
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;

    tidemark_journal::fs::create_dir_all_durably(&tidemark_journal::fs::RealFs, &config.data_dir)
        .map_err(|e| {
        format!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let token = access::Token::load(config.token_file.as_deref(), &config.data_dir)?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(access::server_tls(cert, key)?),
        None => None,
    };
    let registry = {
        let owned = config.clone();
        tokio::task::spawn_blocking(move || Registry::open(owned))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| {
                format!(
                    "cannot open data directory {}: {e}",
                    config.data_dir.display()
                )
            })?
    };
    check_tagging_targets(&config, &registry)?;
    let _ = registry.failover.site.set(failover::SiteAddress {
        nbd: nbd_addr,
        grpc: config.advertise.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https://" } else { "" };
            format!("{scheme}{grpc_addr}")
        }),
        token: token.secret().to_string(),
    });
    registry.replication.start_all(&registry);
    let mut tagging = config.tagging.clone();
    tagging.state_dir = config.data_dir.join("tagging");
    let tagger = tidemark_tagging::Tagger::start(
        Arc::new(tagging_host::DaemonHost::new(registry.clone(), nbd_addr)),
        tagging,
        Arc::new(tidemark_journal::SystemClock),
    );
    let _ = registry.tagger.set(tagger.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let daemon = Arc::new(Daemon {
        registry: registry.clone(),
        metrics: Metrics::default(),
        nbd_addr,
        tagger: tagger.clone(),
        stopping: stop_rx.clone(),
    });
    failover::Failover::start(&registry, stop_rx.clone());
    if let Some(archive) = config.archive.clone() {
        let host = archive::ArchiveHost::start(archive, &registry, stop_rx.clone())
            .await
            .map_err(|e| e.to_string())?;
        let _ = registry.archive.set(host);
    }

    let nbd_task = tokio::spawn(crate::nbd::serve(nbd, daemon.clone(), stop_rx.clone()));
    let grpc_task = {
        let service = tidemark_proto::v1::tidemark_server::TidemarkServer::new(grpc::Service::new(
            daemon.clone(),
        ))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
        // Every request, streams included, shows the token first.
        let service = tonic::service::interceptor::InterceptedService::new(service, token.clone());
        // Replication streams carry megabytes at a time: windows larger
        // than HTTP/2's 64 KiB default, so a stream is not paced by
        // window updates.
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20));
        if let Some(tls) = tls.clone() {
            builder = builder
                .tls_config(tls)
                .map_err(|e| format!("cannot set up TLS for the API: {e}"))?;
        }
        let mut stop = stop_rx.clone();
        // No Nagle: a replica's acknowledgements are small messages a sync
        // write waits for.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            |stream| {
                stream.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            },
        );
        tokio::spawn(async move {
            let result = builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.changed().await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        })
    };
    failover::Failover::watch_from_start(&registry);
    let http_task = {
        let mut stop = stop_rx.clone();
        let tls = match &config.tls {
            Some((cert, key)) => Some(http::tls_acceptor(cert, key)?),
            None => None,
        };
        let router = http::router(daemon.clone(), token.clone(), tls.is_some());
        tokio::spawn(async move {
            if let Some(acceptor) = tls {
                http::serve_tls(http, router, acceptor, stop).await;
                return;
            }
            let result = axum::serve(http, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    };
    let retention_task = {
        let registry = registry.clone();
        let interval = config.retention_interval;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => break,
                }
                let registry = registry.clone();
                let _ = tokio::task::spawn_blocking(move || registry.apply_retention()).await;
            }
        })
    };

    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(nbd = %nbd_addr, grpc = %grpc_addr, http = %http_addr, data_dir = %config.data_dir.display(), token = %token.path.display(), tls = tls.is_some(), "tidemark serving");
    // One line on stdout for people and scripts, whatever the log level.
    println!(
        "tidemark serving: nbd://{nbd_addr} grpc={scheme}://{grpc_addr} http={scheme}://{http_addr} data={} token={}",
        config.data_dir.display(),
        token.path.display()
    );

    wait_for_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(true);
    // Replication streams from primaries stay open for as long as the
    // primary may: end them, or the server waits for them forever.
    registry.replication.receivers.end_all();
    let _ = nbd_task.await;
    // (Ingest streams end on the same signal, after the write they are
    // in; the servers finish once every request has — but a restore or a
    // rollback of a large volume may take hours: a stop waits a minute
    // for them, then ends them, so SIGTERM ends in a bounded time.)
    let requests_end = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    for (what, mut task) in [("gRPC", grpc_task), ("HTTP", http_task)] {
        if tokio::time::timeout_at(requests_end, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(server = what, "requests still running a minute after the stop (a restore or rollback?): ending them");
            task.abort();
        }
    }
    let _ = retention_task.await;
    // NBD connections answer what they have read, then close.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while daemon
        .metrics
        .nbd_open
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    registry.replication.shutdown().await;
    if let Some(archive) = registry.archive.get() {
        archive.stop();
    }
    let problems = tokio::task::spawn_blocking(move || {
        tagger.stop();
        registry.shutdown()
    })
    .await
    .map_err(|e| e.to_string())?;
    if problems.is_empty() {
        tracing::info!("stopped; every acknowledged write is durable");
        return Ok(());
    }
    // Acknowledged async writes the journal could not take are on the
    // production volumes and marked in the dirty maps: not lost, but not
    // in the journal either until the next start resyncs them.
    Err(format!(
        "stopped, but not every acknowledged write is durable in the journal ({}); \
         the dirty maps mark their regions, and the next start resyncs them from the production volumes",
        problems.join("; ")
    ))
}

/// Every tagging rule must name a volume or group that exists.
fn check_tagging_targets(config: &Config, registry: &Registry) -> Result<(), String> {
    use tidemark_tagging::schedule::Target;
    let volumes: Vec<String> = registry.volumes().iter().map(|v| v.name.clone()).collect();
    let groups: Vec<String> = registry.groups().iter().map(|g| g.name.clone()).collect();
    for (label, target) in &config.tagging_targets {
        match target {
            Target::Volume(v) if !volumes.contains(v) => {
                return Err(format!(
                    "{label}: volume = {v:?} is not a volume (volumes: {})",
                    if volumes.is_empty() {
                        "none".to_string()
                    } else {
                        volumes.join(", ")
                    }
                ))
            }
            Target::Group(g) if !groups.contains(g) => {
                return Err(format!(
                    "{label}: group = {g:?} is not a consistency group (groups: {})",
                    if groups.is_empty() {
                        "none".to_string()
                    } else {
                        groups.join(", ")
                    }
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
