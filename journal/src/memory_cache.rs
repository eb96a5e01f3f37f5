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
//!
//! The bound is a [`MemoryBudget`], which one journal may have to itself or
//! share with every other journal of a daemon: a thousand consistency
//! groups then share one bound instead of each holding its own, and a busy
//! group may use what idle ones leave. Each journal's [`MemoryCache`]
//! still counts its own use, for its metrics.

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
    /// Fail at once if there is no room, and do no IO to make some (a
    /// file cache's tail is not moved on disk): the caller is an event
    /// loop, which must not wait for a disk.
    NoBlock,
}

/// Counters of the memory cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryCacheStats {
    /// Bytes of this journal's records captured and not yet durable.
    pub used_bytes: u64,
    /// The bound (of the budget, which other journals may share).
    pub limit_bytes: u64,
    /// The most that was ever in use.
    pub peak_bytes: u64,
    /// Appends that had to wait for room.
    pub waits: u64,
    /// Appends refused because there was no room (in time).
    pub refusals: u64,
}

/// The bound on bytes of records waiting in memory, for one journal or
/// shared by all journals of a daemon.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// The bound.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes in use now, by every journal sharing the budget.
    pub fn used(&self) -> u64 {
        *self.used.lock()
    }

    fn release(&self, bytes: u64) {
        let mut used = self.used.lock();
        *used = used.saturating_sub(bytes);
        drop(used);
        self.freed.notify_all();
    }
}

/// A journal's byte-bounded admission gate for records on their way to
/// it, drawing on a (possibly shared) [`MemoryBudget`].
#[derive(Debug)]
pub struct MemoryCache {
    budget: Arc<MemoryBudget>,
    stats: Mutex<MemoryCacheStats>,
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
    /// A cache with a budget of `limit` bytes of its own.
    pub fn new(limit: u64) -> Arc<Self> {
        Self::sharing(MemoryBudget::new(limit))
    }

    /// A cache drawing on `budget`, which other caches may share.
    pub fn sharing(budget: Arc<MemoryBudget>) -> Arc<Self> {
        Arc::new(MemoryCache {
            stats: Mutex::new(MemoryCacheStats {
                limit_bytes: budget.limit,
                ..MemoryCacheStats::default()
            }),
            budget,
        })
    }

    /// The budget this cache draws on.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// Charges `bytes` to the cache, waiting for room as `how` says.
    /// Returns `None` when there was no room (in time). A record larger than
    /// the whole budget is admitted when the budget is unused, so it is slow
    /// rather than impossible.
    pub fn admit(self: &Arc<Self>, bytes: u64, how: Admission) -> Option<CacheCharge> {
        let budget = &self.budget;
        let mut used = budget.used.lock();
        let fits = |used: u64| used == 0 || used + bytes <= budget.limit;
        if !fits(*used) {
            let deadline = match how {
                Admission::NoWait | Admission::NoBlock => None,
                Admission::Wait => Some(None),
                Admission::WaitFor(timeout) => Some(Some(Instant::now() + timeout)),
            };
            let Some(deadline) = deadline else {
                drop(used);
                self.stats.lock().refusals += 1;
                return None;
            };
            self.stats.lock().waits += 1;
            while !fits(*used) {
                match deadline {
                    None => budget.freed.wait(&mut used),
                    Some(at) => {
                        if budget.freed.wait_until(&mut used, at).timed_out() && !fits(*used) {
                            drop(used);
                            self.stats.lock().refusals += 1;
                            return None;
                        }
                    }
                }
            }
        }
        *used += bytes;
        drop(used);
        let mut stats = self.stats.lock();
        stats.used_bytes += bytes;
        stats.peak_bytes = stats.peak_bytes.max(stats.used_bytes);
        drop(stats);
        Some(CacheCharge {
            cache: self.clone(),
            bytes,
        })
    }

    fn release(&self, bytes: u64) {
        {
            let mut stats = self.stats.lock();
            stats.used_bytes = stats.used_bytes.saturating_sub(bytes);
        }
        self.budget.release(bytes);
    }

    /// The counters now: this journal's use, against the budget's bound.
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

    #[test]
    fn caches_sharing_a_budget_share_its_bound() {
        let budget = MemoryBudget::new(100);
        let (a, b) = (
            MemoryCache::sharing(budget.clone()),
            MemoryCache::sharing(budget.clone()),
        );
        let held = a.admit(70, Admission::NoWait).expect("room");
        assert!(
            b.admit(40, Admission::NoWait).is_none(),
            "the other journal's bytes count against the same bound"
        );
        let small = b.admit(30, Admission::NoWait).expect("what is left");
        assert_eq!((a.stats().used_bytes, b.stats().used_bytes), (70, 30));
        assert_eq!(budget.used(), 100);
        assert_eq!(b.stats().refusals, 1);
        drop(held);
        assert_eq!(budget.used(), 30);
        assert!(b.admit(70, Admission::NoWait).is_some());
        drop(small);
    }
}
