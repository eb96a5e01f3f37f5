//! tidemark's timeline tags and where they come from.
//!
//! Map of the crate:
//! - [`tag`] — the tag model: source, consistency, verification, the point.
//! - [`schedule`] — time policies (cron or interval) and their state.
//! - [`log_watch`] — log rules: following files, built-in rule sets.
//! - [`hooks`] — app-consistent tags: freeze, tag, thaw; commands with
//!   time limits.
//! - [`anomaly`] — entropy and rate bursts on a volume's write stream.
//! - [`verify`] — checking a point (`e2fsck`, or the operator's command).
//! - [`engine`] — [`engine::Tagger`], which runs all of them against a
//!   [`engine::Host`] (the daemon).

pub mod anomaly;
pub mod engine;
pub mod hooks;
pub mod log_watch;
pub mod schedule;
pub mod tag;
pub mod verify;

pub use engine::{Host, Settings, Tagger};
pub use tag::{Consistency, Source, Tag, TagBody, Verified};
