//! Reusable write buffers: a write's bytes are read once into one, which
//! then serves as the source of the production write and, shared, as the
//! payload of its record until the journal has encoded it.
//!
//! Freshly allocated large buffers cost more than the copy into them:
//! records are kept in their own mappings (see
//! [`crate::memory_cache::return_freed_buffers_to_the_system`]), so every
//! 1 MiB write mapped, zero-filled by page faults and unmapped a megabyte
//! of memory, twice (the request and the record). A buffer taken here is
//! given back when the last holder of its bytes (the request or the
//! record) drops them, and reused, up to a bound on what the pool keeps
//! idle.
//!
//! Buffers of [`ALIGNED_FROM`] bytes and more start at an
//! [`IO_ALIGN`] address, so the production volume can take a large write
//! straight from them with `O_DIRECT` (see
//! [`crate::production::FileDevice`]) instead of copying it into the page
//! cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::appender::IO_ALIGN;

/// Smallest buffer: one block.
const MIN_CLASS_SHIFT: u32 = 12;

/// Size classes: 4 KiB, 8 KiB, … 32 MiB (the largest NBD request).
const CLASSES: usize = 14;

/// Buffers at least this long are aligned for direct IO; smaller ones are
/// not worth the extra page (they never take the direct path).
pub const ALIGNED_FROM: usize = 64 << 10;

/// Idle bytes a pool keeps by default.
pub const DEFAULT_IDLE_BYTES: usize = 32 << 20;

/// A pool of write buffers, by power-of-two size class. Cheap to clone.
#[derive(Clone, Debug)]
pub struct WriteBuffers {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    /// Allocations of [`raw_len`] bytes per class.
    free: [Mutex<Vec<Vec<u8>>>; CLASSES],
    /// Bytes of buffers in `free`.
    idle: AtomicUsize,
    /// What `idle` may reach; a buffer given back beyond it is freed.
    max_idle: usize,
}

impl Default for WriteBuffers {
    fn default() -> Self {
        WriteBuffers::new(DEFAULT_IDLE_BYTES)
    }
}

impl WriteBuffers {
    /// A pool that keeps at most `max_idle` bytes of unused buffers.
    pub fn new(max_idle: usize) -> Self {
        WriteBuffers {
            pool: Arc::new(Pool {
                free: std::array::from_fn(|_| Mutex::new(Vec::new())),
                idle: AtomicUsize::new(0),
                max_idle,
            }),
        }
    }

    /// A buffer of `len` bytes, to be filled entirely (it holds whatever an
    /// earlier write left in it). Lengths beyond the largest class get a
    /// buffer of their own, not pooled.
    pub fn take(&self, len: usize) -> WriteBuffer {
        let class = class_of(len);
        let reused = class.and_then(|c| self.pool.free[c].lock().pop());
        let bytes = match reused {
            Some(buf) => {
                self.pool.idle.fetch_sub(buf.len(), Ordering::Relaxed);
                buf
            }
            None => vec![0u8; class.map_or_else(|| raw_len(len), |c| raw_len(class_len(c)))],
        };
        // (Found again when the buffer is reused: the same answer.)
        let start = if bytes.len() > len && len >= ALIGNED_FROM {
            crate::appender::aligned_start(&bytes)
        } else {
            0
        };
        WriteBuffer {
            bytes,
            start,
            len,
            pool: class.map(|_| self.pool.clone()),
        }
    }

    /// Bytes of unused buffers the pool holds now.
    pub fn idle_bytes(&self) -> usize {
        self.pool.idle.load(Ordering::Relaxed)
    }
}

/// The class whose buffers hold `len` bytes, if one does.
fn class_of(len: usize) -> Option<usize> {
    let shift = len.max(1).next_power_of_two().trailing_zeros();
    let class = shift.saturating_sub(MIN_CLASS_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

fn class_len(class: usize) -> usize {
    1 << (MIN_CLASS_SHIFT as usize + class)
}

/// What is allocated for a buffer of `len` usable bytes: room to align
/// its start, where it is long enough to be aligned.
fn raw_len(len: usize) -> usize {
    if len >= ALIGNED_FROM {
        len + IO_ALIGN
    } else {
        len
    }
}

impl Pool {
    fn give_back(&self, buf: Vec<u8>) {
        let Some(class) = (0..CLASSES).find(|&c| raw_len(class_len(c)) == buf.len()) else {
            return;
        };
        // Checked before the lock; a race may overshoot by a buffer or two.
        if self.idle.load(Ordering::Relaxed) + buf.len() > self.max_idle {
            return;
        }
        self.idle.fetch_add(buf.len(), Ordering::Relaxed);
        self.free[class].lock().push(buf);
    }
}

/// A buffer taken from [`WriteBuffers`]: fill it, then
/// [`freeze`](WriteBuffer::freeze) it into shared bytes. Dropped unfrozen,
/// it goes back to the pool.
#[derive(Debug)]
pub struct WriteBuffer {
    /// The whole allocation ([`raw_len`] of its class's length).
    bytes: Vec<u8>,
    /// Where the part in use starts (aligned, for large buffers).
    start: usize,
    /// The length of the part in use.
    len: usize,
    pool: Option<Arc<Pool>>,
}

impl std::ops::Deref for WriteBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for WriteBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for WriteBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl WriteBuffer {
    /// The bytes, shared without copying; the buffer returns to its pool
    /// when the last clone (or slice) of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Drop for WriteBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.bytes));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_share_drops_and_are_reused() {
        let pool = WriteBuffers::new(1 << 20);
        let mut buf = pool.take(5000);
        assert_eq!(buf.len(), 5000);
        buf.fill(7);
        let ptr = buf.as_ptr();
        let bytes = buf.freeze();
        let part = bytes.slice(100..200);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds it");
        assert!(part.iter().all(|&b| b == 7));
        drop(part);
        assert_eq!(pool.idle_bytes(), 8192);
        let again = pool.take(8000);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_bound_and_odd_sizes_are_not_pooled() {
        let pool = WriteBuffers::new(64 << 10);
        let held: Vec<WriteBuffer> = (0..5).map(|_| pool.take(32 << 10)).collect();
        drop(held);
        assert_eq!(pool.idle_bytes(), 64 << 10);
        drop(pool.take(64 << 20));
        assert_eq!(pool.idle_bytes(), 64 << 10);
        assert_eq!(pool.take(0).len(), 0);
    }

    #[test]
    fn large_buffers_start_aligned_for_direct_io_also_when_reused() {
        let pool = WriteBuffers::new(8 << 20);
        for len in [ALIGNED_FROM, 1 << 20, (1 << 20) - 4096, 3 << 20] {
            let buf = pool.take(len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0, "{len}");
            assert_eq!(buf.len(), len);
            drop(buf);
            let again = pool.take(len);
            assert_eq!(again.as_ptr() as usize % IO_ALIGN, 0, "{len} reused");
        }
        assert!(pool.idle_bytes() > 0, "the aligned allocations are pooled");
    }
}
