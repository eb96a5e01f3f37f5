//! The command line: `tidemark serve` runs the daemon; every other
//! subcommand is a gRPC client of a running daemon.
//!
//! - `args` — the commands and flags (clap).
//! - `archive` — restore from the bucket alone (no daemon), and the
//!   archive's status.
//! - `client` — what each client command does.
//! - `output` — tables for people, JSON for scripts.

mod archive;
pub mod args;
mod client;
mod output;

pub use client::{run_client, Bearer, Client, Connection};
