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
