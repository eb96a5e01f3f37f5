//! tidemark's failover: a replica site that takes over by itself when the
//! primary dies, and never two writers of one group.
//!
//! Map of the crate:
//! - [`detector`] — the phi-accrual failure detector fed by heartbeats.
//! - [`probe`] — application-level probes (TCP, HTTP, command) and custom
//!   triggers.
//! - [`monitor`] — one replica site's watch over its primaries: the
//!   detector per group, probes and triggers, and the decision to take
//!   over, with its reason.
//! - [`epoch`] — epochs as fencing tokens: who demotes, what a takeover
//!   writes under.
//! - [`witness`] — the etcd witness: a primary writes only while it holds
//!   its group's lease, a takeover must win the key.
//! - [`settings`] — the `[failover]` vocabulary.
//!
//! The daemon carries the decisions out (promotion, demotion, the
//! takeover hook); the epoch histories two sites compare live in the
//! journal (`tidemark_journal::epochs`).

pub mod detector;
pub mod epoch;
pub mod monitor;
pub mod probe;
pub mod settings;
pub mod witness;

pub use detector::{DetectorSettings, PhiAccrual};
pub use monitor::{Decision, Monitor, MonitorStatus, ProbeStatus};
pub use settings::{FailoverSettings, PlanStep, ProbeSettings, PromoteAt, TriggerSettings};
pub use witness::{Learnt, OnLearnt, Witness, WitnessSettings};
