//! A memory-limited heap for QuickJS runtimes.
//!
//! QuickJS enforces its own memory limit only with its built-in libc
//! allocator. shardflow gives each runtime this allocator instead: it
//! allocates from Rust's global allocator (mimalloc in the binary, which is
//! much faster than glibc for QuickJS's many small objects) and refuses any
//! allocation that would take the runtime past its limit, which QuickJS
//! turns into an out-of-memory error for the script.

use std::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};
use std::ptr::null_mut;

use rquickjs::allocator::Allocator;

/// Bytes in front of each block that hold its size; also the alignment.
const HEADER: usize = 16;

pub struct LimitedHeap {
    used: usize,
    limit: usize,
}

impl LimitedHeap {
    pub fn new(limit: usize) -> Self {
        LimitedHeap { used: 0, limit }
    }

    fn layout(size: usize) -> Option<Layout> {
        Layout::from_size_align(size.checked_add(HEADER)?, HEADER).ok()
    }

    fn allocate(&mut self, size: usize, zeroed: bool) -> *mut u8 {
        if self.used.saturating_add(size) > self.limit {
            return null_mut();
        }
        let Some(layout) = Self::layout(size) else {
            return null_mut();
        };
        // SAFETY: the layout has a non-zero size (at least HEADER).
        let base = unsafe {
            if zeroed {
                alloc_zeroed(layout)
            } else {
                alloc(layout)
            }
        };
        if base.is_null() {
            return null_mut();
        }
        self.used += size;
        // SAFETY: the block is at least HEADER bytes and HEADER-aligned.
        unsafe {
            (base as *mut usize).write(size);
            base.add(HEADER)
        }
    }
}

// SAFETY: every block returned is HEADER-aligned (16, a multiple of
// `usize`'s alignment), at least the requested size, and records its size
// in the header that `usable_size`, `dealloc` and `realloc` read back.
unsafe impl Allocator for LimitedHeap {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        self.allocate(size, false)
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        match count.checked_mul(size) {
            Some(total) => self.allocate(total, true),
            None => null_mut(),
        }
    }

    unsafe fn dealloc(&mut self, ptr: *mut u8) {
        if ptr.is_null() {
            return;
        }
        let base = ptr.sub(HEADER);
        let size = (base as *const usize).read();
        self.used -= size;
        dealloc(
            base,
            Layout::from_size_align_unchecked(size + HEADER, HEADER),
        );
    }

    unsafe fn realloc(&mut self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        if ptr.is_null() {
            return self.allocate(new_size, false);
        }
        if new_size == 0 {
            self.dealloc(ptr);
            return null_mut();
        }
        let base = ptr.sub(HEADER);
        let old_size = (base as *const usize).read();
        if new_size > old_size && self.used.saturating_add(new_size - old_size) > self.limit {
            return null_mut();
        }
        let Some(new_layout) = Self::layout(new_size) else {
            return null_mut();
        };
        let old_layout = Layout::from_size_align_unchecked(old_size + HEADER, HEADER);
        let new_base = realloc(base, old_layout, new_layout.size());
        if new_base.is_null() {
            return null_mut();
        }
        self.used = self.used - old_size + new_size;
        (new_base as *mut usize).write(new_size);
        new_base.add(HEADER)
    }

    unsafe fn usable_size(ptr: *mut u8) -> usize {
        (ptr.sub(HEADER) as *const usize).read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_gives_back_on_free() {
        let mut heap = LimitedHeap::new(1000);
        let a = heap.alloc(600);
        assert!(!a.is_null());
        assert!(heap.alloc(600).is_null());
        unsafe {
            let a = heap.realloc(a, 900);
            assert!(!a.is_null());
            assert_eq!(LimitedHeap::usable_size(a), 900);
            assert!(heap.realloc(a, 2000).is_null());
            heap.dealloc(a);
        }
        assert_eq!(heap.used, 0);
        assert!(!heap.calloc(10, 10).is_null());
    }
}
