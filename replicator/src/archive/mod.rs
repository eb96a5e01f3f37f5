//! The archive: a group's history in an object store, where it outlives
//! both sites' disks, and everything that reads it back.
//!
//! - [`location`] — `s3://BUCKET/PREFIX` (or `file:///DIR`).
//! - [`store`] — the object store behind one trait: [`s3`] for any
//!   S3-compatible endpoint, a directory, and a fault-injecting wrapper.
//! - [`layout`] — object names and how each object is framed and checked;
//!   [`index`] — the documents that list what a group's archive holds.
//! - [`archiver`] — the primary's task: sealed segments, base versions,
//!   `keep`, the retention hold.
//! - [`catalog`] — reading an archive: points, and the chain a point needs;
//!   [`apply`] — records turned into bytes of a volume.
//! - [`restore`] — a point restored from the bucket alone; [`view`] — a
//!   point served from the bucket on demand.
//!
//! The layout is specified in `docs/format.md` ("Archive").

pub mod apply;
pub mod archiver;
pub mod catalog;
pub mod error;
pub mod index;
pub mod layout;
pub mod location;
pub mod restore;
pub mod s3;
pub mod store;
pub mod view;

pub use archiver::{ArchiveSettings, ArchiveStatus, Archiver};
pub use catalog::{ArchivePoint, Catalog};
pub use error::{ArchiveError, Result};
pub use location::Location;
pub use store::{ObjectStore, StoreOptions};
pub use view::ArchiveView;
