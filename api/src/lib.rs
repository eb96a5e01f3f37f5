//! tidemark: the daemon and the command line.
//!
//! Map of the crate:
//! - [`cli`] — `tidemark` subcommands: `serve`, and the gRPC clients.
//! - [`daemon`] — the daemon: registry of groups and volumes, exports,
//!   tags and timeline, rollback and restore, gRPC, HTTP and metrics.
//! - [`nbd`] — the NBD server.
//! - [`config`] — the TOML configuration.
//! - [`point_spec`] — POINT syntax.
//! - [`size`] — SIZE syntax.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod nbd;
pub mod point_spec;
pub mod size;

/// Chooses the process's TLS crypto provider (ring) before any TLS is
/// spoken. Two are linked — tonic's and the S3 client's — and rustls
/// refuses to guess between them.
pub fn install_tls_provider() {
    // Err only when one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
