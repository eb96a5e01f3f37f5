//! The memory cache: records between capture and the journal, bounded by
//! bytes.
//!
//! Every appended record is charged to the cache from the moment it is
//! captured until it is durable in the journal (or has failed). When the
//! cache is full, an appender either waits (sync mode: backpressure,
//! bounded by a timeout that becomes a clear error) or is refused at once
//! (async mode, which then falls back to its dirty-region map). The charge
//! is a guard that releases itself when dropped, so no path through the
//! writer can leak cache space.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How an appender waits for room in the memory cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Wait as long as it takes.
    Wait,
    /// Wait at most this long, then fail with [`crate::Error::CacheFull`].
    WaitFor(Duration),
    /// Fail at once if there is no room.
    NoWait,
}

/// Counters of the memory cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryCacheStats {
    /// Bytes of records captured and not yet durable.
    pub used_bytes: u64,
    /// The bound.
    pub limit_bytes: u64,
    /// The most that was ever in use.
    pub peak_bytes: u64,
    /// Appends that had to wait for room.
    pub waits: u64,
    /// Appends refused because there was no room (in time).
    pub refusals: u64,
}

/// A byte-bounded admission gate for records on their way to the journal.
#[derive(Debug)]
pub struct MemoryCache {
    stats: Mutex<MemoryCacheStats>,
    freed: Condvar,
}

/// Room held in the memory cache; given back when dropped.
#[derive(Debug)]
pub struct CacheCharge {
    cache: Arc<MemoryCache>,
    bytes: u64,
}

impl CacheCharge {
    /// Adds `other`'s bytes to this charge (one charge per batch).
    pub fn absorb(&mut self, mut other: CacheCharge) {
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for CacheCharge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.cache.release(self.bytes);
        }
    }
}

impl MemoryCache {
    /// A cache of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(MemoryCache {
            stats: Mutex::new(MemoryCacheStats {
                limit_bytes: limit,
                ..MemoryCacheStats::default()
            }),
            freed: Condvar::new(),
        })
    }

    /// Charges `bytes` to the cache, waiting for room as `how` says.
    /// Returns `None` when there was no room (in time). A record larger than
    /// the whole cache is admitted when the cache is empty, so it is slow
    /// rather than impossible.
    pub fn admit(self: &Arc<Self>, bytes: u64, how: Admission) -> Option<CacheCharge> {
        let mut stats = self.stats.lock();
        let fits =
            |s: &MemoryCacheStats| s.used_bytes == 0 || s.used_bytes + bytes <= s.limit_bytes;
        if !fits(&stats) {
            let deadline = match how {
                Admission::NoWait => None,
                Admission::Wait => Some(None),
                Admission::WaitFor(timeout) => Some(Some(Instant::now() + timeout)),
            };
            let Some(deadline) = deadline else {
                stats.refusals += 1;
                return None;
            };
            stats.waits += 1;
            while !fits(&stats) {
                match deadline {
                    None => self.freed.wait(&mut stats),
                    Some(at) => {
                        if self.freed.wait_until(&mut stats, at).timed_out() && !fits(&stats) {
                            stats.refusals += 1;
                            return None;
                        }
                    }
                }
            }
        }
        stats.used_bytes += bytes;
        stats.peak_bytes = stats.peak_bytes.max(stats.used_bytes);
        Some(CacheCharge {
            cache: self.clone(),
            bytes,
        })
    }

    fn release(&self, bytes: u64) {
        let mut stats = self.stats.lock();
        stats.used_bytes = stats.used_bytes.saturating_sub(bytes);
        drop(stats);
        self.freed.notify_all();
    }

    /// The counters now.
    pub fn stats(&self) -> MemoryCacheStats {
        *self.stats.lock()
    }
}

/// Makes the C allocator give freed record buffers back to the system.
///
/// Records are large buffers allocated by appending threads and freed by the
/// writer's threads at a high rate. glibc's dynamic mmap threshold then
/// rises to their size, after which they are carved from per-thread arenas
/// that keep freed space: under a sustained overload the process's resident
/// memory exceeded the memory cache's bound by tens of MiB. Fixing the
/// threshold at 128 KiB keeps every record buffer in its own mapping,
/// returned on free. Binaries call this once, first thing; it is process
/// wide, which is why the library does not do it on its own.
pub fn return_freed_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // any thread of ours allocates records, and any value is valid for it.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_waits_refuses_and_releases() {
        let cache = MemoryCache::new(100);
        let a = cache.admit(60, Admission::NoWait).expect("room");
        assert!(cache.admit(60, Admission::NoWait).is_none());
        assert!(cache
            .admit(60, Admission::WaitFor(Duration::from_millis(20)))
            .is_none());
        let waiter = {
            let cache = cache.clone();
            std::thread::spawn(move || cache.admit(60, Admission::Wait).map(|c| c.bytes()))
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert_eq!(waiter.join().expect("waiter"), Some(60));
        let stats = cache.stats();
        assert_eq!(
            stats.used_bytes, 0,
            "the waiter's charge was dropped with it"
        );
        assert_eq!(stats.peak_bytes, 60);
        assert_eq!(stats.refusals, 2);
        assert!(stats.waits >= 2);
    }

    #[test]
    fn an_oversized_record_passes_an_empty_cache() {
        let cache = MemoryCache::new(10);
        let big = cache
            .admit(1000, Admission::NoWait)
            .expect("admitted when empty");
        assert!(cache.admit(1, Admission::NoWait).is_none());
        drop(big);
        assert!(cache.admit(1, Admission::NoWait).is_some());
    }

    #[test]
    fn absorbed_charges_release_together() {
        let cache = MemoryCache::new(100);
        let mut a = cache.admit(10, Admission::NoWait).expect("room");
        a.absorb(cache.admit(20, Admission::NoWait).expect("room"));
        assert_eq!(cache.stats().used_bytes, 30);
        drop(a);
        assert_eq!(cache.stats().used_bytes, 0);
    }
}
