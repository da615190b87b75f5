//! Heap accounting: a wrapper around the system allocator that counts allocations and their
//! bytes once asked to ([`start_counting`]), so that `voxtrald bench` can report what the
//! per-frame loop allocates. Until then an allocation costs two relaxed loads more, and the
//! daemon never asks. The binary installs it; elsewhere (tests, other embedders) there are no
//! counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// The system allocator, counted.
pub struct Counted;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static COUNTING: AtomicBool = AtomicBool::new(false);

// SAFETY: every call is forwarded to `System` unchanged; the counters have no effect on it.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[inline]
fn count(bytes: usize) {
    if !INSTALLED.load(Relaxed) {
        INSTALLED.store(true, Relaxed);
    }
    if COUNTING.load(Relaxed) {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(bytes as u64, Relaxed);
    }
}

/// Counts every allocation from now on (for the rest of the process).
pub fn start_counting() {
    COUNTING.store(true, Relaxed);
}

/// Allocations (reallocations included) and their bytes since [`start_counting`], or `None`
/// where [`Counted`] is not the global allocator.
pub fn counts() -> Option<(u64, u64)> {
    INSTALLED
        .load(Relaxed)
        .then(|| (ALLOCATIONS.load(Relaxed), BYTES.load(Relaxed)))
}
