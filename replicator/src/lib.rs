//! tidemark's replication: a consistency group's journal shipped to a
//! replica site, applied there record for record, and proven equal.
//!
//! Map of the crate:
//! - [`shipper`] — the primary's side: one [`Shipper`] per group and
//!   replica site; hello, catch-up from the replica's position or a rebase
//!   onto this site's base images (only differing regions travel), then
//!   following the journal; acknowledgements, retention hold, lag and RPO,
//!   adaptive and degraded modes, RPO alerts, periodic verification.
//! - [`receiver`] — the replica's side: applies a stream to the group's
//!   journal here with the primary's seqs, and acknowledges durability.
//! - [`fence`] — a newer primary's refusal, which demotes the sender.
//! - [`gate`] — what sync writes wait for (the journal's `ReplicaGate`).
//! - [`link`] — reaching another site's daemon (its token, TLS).
//! - [`wire`] — records on the wire; [`hash`] — region hashes.
//! - [`settings`], [`status`] — the vocabulary.
//! - [`archive`] — the group's history in an S3-compatible object store:
//!   the archiver, restore from the bucket alone, views served from it.
//!
//! The wire messages are `ReplicationMessage` / `ReplicationReply` in
//! `tidemark.proto`, described in `docs/format.md`.

pub mod archive;
pub mod fence;
pub mod gate;
pub mod hash;
pub mod link;
pub mod receiver;
pub mod settings;
pub mod shipper;
pub mod status;
pub mod wire;

pub use fence::{Fence, FenceSink};
pub use gate::GroupGate;
pub use link::Peer;
pub use receiver::{Receivers, ReplicaHost};
pub use settings::{OnReplicaDown, ReplicaMode, ReplicationSettings};
pub use shipper::{EventSink, Shipper, Verification};
pub use status::{LinkState, ReplicaStatus};
