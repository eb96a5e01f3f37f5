//! tidemark's write-order journal.
//!
//! Every block write to a protected volume becomes a record, in write order,
//! and any volume can be read back as it was at any retained point.
//!
//! Map of the crate, from the bytes on disk upwards:
//! - [`record`] — a record and its codec (header, lz4 payload, CRC32C).
//! - [`segment`] — fixed-size segment files of commit batches; the scan that
//!   verifies them.
//! - [`manifest`] — the durable group description: volumes, horizon, epoch,
//!   holds, gaps.
//! - [`index`] — the RocksDB index: block versions, time → seq, segment
//!   catalogue, tags, timeline events, metadata.
//! - [`base`] — base images: each volume at the horizon.
//! - [`mark`] — bodies of mark records (tags, events).
//! - `writer` — the group-commit write and sync stages and [`AppendHandle`].
//! - `appender` — direct (`O_DIRECT`) appends of batches to a segment.
//! - [`recovery`] — start-up: torn tails, corruption, index catch-up.
//! - `read` — point-in-time reads.
//! - [`changes`] — what changed since a point (for rollbacks), streamed.
//! - [`retention`] — folding old records into the base images.
//! - [`shipping`] — records read out to ship to another site, and records
//!   shipped from one appended unchanged; [`rebase`] — a history rebased
//!   onto another site's base images (how a replica starts and catches up).
//! - [`memory_cache`] — the byte-bounded memory cache between capture and
//!   the journal, and how appenders wait for room in it; its bound may be
//!   shared by every journal of a daemon.
//! - [`file_cache`] — the file tier: a memory-mapped, sparse ring that
//!   records spill to, durable across a crash, its disk drawn from a
//!   (possibly shared) budget.
//! - [`journal`] — [`Journal`], which ties these together.
//! - [`production`] — the production volume the write path writes through.
//! - [`dirty_map`] — the persistent dirty-region map: regions that may hold
//!   changes not (yet) durable in the journal.
//! - [`io_mode`] — sync / async / adaptive, and the adaptive controller.
//! - [`write_path`] — [`WritePath`]: what the daemon calls for every write;
//!   applies the IO mode, the dirty map and resyncs.
//! - [`write_buffers`] — pooled buffers a write is read into once and that
//!   its record shares.
//! - [`io_hooks`] — hooks in front of segment IO; [`io_hooks::FaultyIo`]
//!   makes the disk slow, full or broken for tests.
//! - [`fs`] — the filesystem behind a trait: [`fs::RealFs`], and
//!   [`fs::SimFs`], which loses power on command for crash tests;
//!   [`fs::write_atomically`] replaces a small file crash-safely.
//! - [`epochs`] — epoch histories and the point two sites agree on.
//! - [`point`], [`volume`], [`clock`], [`error`] — the vocabulary.
//!
//! The on-disk format is specified in `docs/format.md`.

mod appender;
pub mod base;
pub mod changes;
pub mod clock;
pub mod dirty_map;
pub mod epochs;
pub mod error;
pub mod file_cache;
pub mod fs;
pub mod index;
pub mod io_hooks;
pub mod io_mode;
pub mod journal;
pub mod manifest;
pub mod mark;
pub mod memory_cache;
pub mod point;
pub mod production;
mod read;
pub mod rebase;
pub mod record;
pub mod recovery;
pub mod retention;
pub mod segment;
pub mod shipping;
pub mod volume;
pub mod write_buffers;
pub mod write_path;
mod writer;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use file_cache::FileBudget;
pub use index::{SegmentEntry, StoredEvent, StoredTag, INDEX_BLOCK};
pub use io_mode::{AdaptiveThresholds, IoMode};
pub use journal::{
    CacheBudget, CacheStats, CacheTiers, Change, DurableListener, Journal, JournalOptions,
};
pub use manifest::Gap;
pub use mark::Mark;
pub use memory_cache::{
    return_freed_buffers_to_the_system, Admission, MemoryBudget, MemoryCacheStats,
};
pub use point::{History, Point, Seq, Timestamp};
pub use production::{BlockDevice, FileDevice};
pub use record::RecordKind;
pub use recovery::{Damage, RecoveryMode, RecoveryReport};
pub use retention::{RetentionPolicy, RetentionReport};
pub use shipping::{RawBatch, RawCursor, RawRecord};
pub use volume::{VolumeId, VolumeInfo};
pub use write_buffers::{WriteBuffer, WriteBuffers};
pub use write_path::{
    Acknowledged, ReplicaGate, ResyncReport, SyncWrite, VolumeStats, WritePath, WritePathOptions,
};
pub use writer::{AppendHandle, Appended};
