//! What changed since a point is streamed: listing a million changed
//! blocks holds next to nothing in memory. A test binary of its own, with
//! one test, so its allocation counter sees only this test.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use tidemark_journal::{Change, Journal};

/// Counts the bytes this test binary's Rust code has allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_million_changed_blocks_are_listed_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = Journal::open(dir.path(), changes_options(256)).expect("open");
    let records = 4000u64;
    let volume = journal
        .create_volume("vol", records * 256 * 4096)
        .expect("volume")
        .id;
    // Zeroes of 255 blocks, a block apart: one index entry per block, and
    // spans that do not merge.
    let mut handles = Vec::new();
    for i in 0..records {
        let change = Change::Zero {
            offset: i * 256 * 4096,
            len: 255 * 4096,
        };
        handles.push(journal.append(volume, change).expect("append"));
    }
    for h in handles {
        h.wait().expect("durable");
    }
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let mut count = 0u64;
    for span in journal.changed_since("vol", 0).expect("changed since") {
        let (start, len) = span.expect("span");
        assert_eq!((start, len), (count * 256 * 4096, 255 * 4096));
        count += 1;
    }
    let grew = PEAK.load(Ordering::SeqCst) - before;
    assert_eq!(count, records);
    assert!(
        grew < 1 << 20,
        "listing {} changed blocks took {grew} bytes",
        records * 255
    );
}
