//! The `weir` binary's global allocator: glibc's malloc with a deeper
//! per-thread cache on the data-plane workers.
//!
//! A proxied request allocates and frees a few dozen blocks, and a worker
//! serves many requests at once, so a size class often has more blocks in
//! flight than glibc's own thread cache holds (7 per class, blocks up to
//! 1,032 bytes). Past that, every `malloc` and `free` of the class takes
//! glibc's slow path (bins, consolidation: ~300 instructions instead of
//! ~30). Larger blocks allocated per request always take it: the boxed
//! request future (~10 KiB), hyper's header index array (32 bytes per
//! allowed header, allocated per parse when `max_headers` is set) and its
//! 8 KiB read buffers (a new one per request while the last request's
//! header values still share the old one). HAProxy keeps per-thread object pools for the same
//! reason.
//!
//! This layer keeps up to [`MAX_PER_CLASS`] freed blocks per glibc size
//! class (and per 256 bytes from 1 to 16 KiB: such requests are rounded up
//! to their class), at most [`MAX_BYTES`] per thread, in a free list threaded through the blocks themselves. It is on
//! only for threads that call [`enable_thread_cache`] (the workers, which
//! live as long as the process): other threads (control, access-log
//! writers, tokio's blocking pool) go straight to glibc, so a thread that
//! exits never strands a cache. Every block comes from glibc's `malloc` and
//! goes back through `free`: `malloc_trim` and glibc's accounting still
//! see all memory that is not cached.
// An allocator is unsafe code by nature; every block is commented.
#![allow(unsafe_code)]
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

/// Freed blocks kept per size class.
pub const MAX_PER_CLASS: u16 = 64;
/// Bytes (glibc chunk sizes) cached per thread, all classes together.
pub const MAX_BYTES: usize = 1024 * 1024;
/// Requests up to this size are cached by glibc chunk size.
const SMALL_MAX: usize = 1024;
/// Larger requests up to this size are cached by multiples of 256 bytes
/// (the request future, hyper's header index and 8 KiB read buffers).
const LARGE_MAX: usize = 16 * 1024;
/// Classes: glibc chunk size / 16 for small requests (2..=65), then one
/// per 256 bytes from 1,280 to 16 KiB (66..=125).
const CLASSES: usize = 126;

/// glibc's chunk size for a request of `n` bytes (x86-64 and aarch64:
/// 8-byte header, 16-byte alignment, 32-byte minimum). A block of that
/// chunk has at least `chunk(n) - 8` usable bytes, so any request with the
/// same chunk size fits in it (checked against `malloc_usable_size` in the
/// tests).
const fn chunk(n: usize) -> usize {
    let c = (n + 8 + 15) & !15;
    if c < 32 {
        32
    } else {
        c
    }
}

/// What a request of `size` bytes is asked of glibc: large cached classes
/// are rounded up, so every block of a class fits every request of it.
#[inline]
fn malloc_size(size: usize) -> usize {
    if size > SMALL_MAX && size <= LARGE_MAX {
        (size + 255) & !255
    } else {
        size
    }
}

/// The class of a request and the bytes its block holds, or `None` when
/// such blocks are not cached.
#[inline]
fn class_of(size: usize, align: usize) -> Option<(usize, usize)> {
    if align > 16 {
        return None;
    }
    if size <= SMALL_MAX {
        let c = chunk(size);
        return Some((c / 16, c));
    }
    if size <= LARGE_MAX {
        let r = malloc_size(size);
        return Some((66 + r / 256 - 5, r + 16));
    }
    None
}

struct Cache {
    on: bool,
    heads: [*mut u8; CLASSES],
    counts: [u16; CLASSES],
    bytes: usize,
}

thread_local! {
    // Const-initialised and without `Drop`: no destructor registration
    // (which could allocate, re-entering the allocator), no lazy state.
    static CACHE: UnsafeCell<Cache> = const {
        UnsafeCell::new(Cache {
            on: false,
            heads: [std::ptr::null_mut(); CLASSES],
            counts: [0; CLASSES],
            bytes: 0,
        })
    };
}

/// Turns the cache on for the calling thread, for the rest of its life
/// (only for threads that live as long as the process: their cache is
/// never handed back).
pub fn enable_thread_cache() {
    // SAFETY: the cache is only touched by its own thread, and no
    // reference to it outlives one call.
    CACHE.with(|c| unsafe { (*c.get()).on = true });
}

/// The allocator (installed by the binary's `#[global_allocator]`).
#[derive(Clone, Copy)]
pub struct WeirAlloc;

// Not inlined: with fat LTO every allocation site would carry a copy
// (3.6 MB more text, 1.5 MiB more of it resident at idle).
unsafe impl GlobalAlloc for WeirAlloc {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((class, bytes)) = class_of(layout.size(), layout.align()) else {
            return System.alloc(layout);
        };
        let (hit, on) = CACHE.with(|c| {
            // SAFETY: see `enable_thread_cache`; a cached block's first
            // word holds the next block (set by `dealloc`).
            let c = unsafe { &mut *c.get() };
            let head = c.heads[class];
            if head.is_null() {
                return (head, c.on);
            }
            c.heads[class] = unsafe { *(head as *mut *mut u8) };
            c.counts[class] -= 1;
            c.bytes -= bytes;
            (head, true)
        });
        if !hit.is_null() {
            hit
        } else if on {
            // `malloc` for every cached class (alignment <= 16 is glibc's),
            // a large class's block at its class size.
            libc::malloc(malloc_size(layout.size())) as *mut u8
        } else {
            // Other threads (start-up, control) allocate what they ask.
            libc::malloc(layout.size()) as *mut u8
        }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((class, bytes)) = class_of(layout.size(), layout.align()) else {
            return System.dealloc(ptr, layout);
        };
        let kept = CACHE.with(|c| {
            // SAFETY: as in `alloc`; the block is ours to reuse (at least
            // `chunk - 8 >= 24` bytes, room for the link).
            let c = unsafe { &mut *c.get() };
            if !c.on || c.counts[class] >= MAX_PER_CLASS || c.bytes + bytes > MAX_BYTES {
                return false;
            }
            // A large block allocated by a thread without the cache has
            // its request's size, not its class's: not reusable.
            if layout.size() > SMALL_MAX
                && unsafe { libc::malloc_usable_size(ptr as *mut libc::c_void) } < bytes - 16
            {
                return false;
            }
            unsafe { *(ptr as *mut *mut u8) = c.heads[class] };
            c.heads[class] = ptr;
            c.counts[class] += 1;
            c.bytes += bytes;
            true
        });
        if !kept {
            libc::free(ptr as *mut libc::c_void);
        }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout.size(), layout.align()) {
            // `calloc` (no zeroing of fresh pages) for the rest.
            None => System.alloc_zeroed(layout),
            Some(_) => {
                let p = self.alloc(layout);
                if !p.is_null() {
                    std::ptr::write_bytes(p, 0, layout.size());
                }
                p
            }
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() > 16 {
            return System.realloc(ptr, layout, new_size);
        }
        let (old, new) = (layout.size(), new_size);
        // Same small class: the block already fits (glibc's chunk).
        if old <= SMALL_MAX && new <= SMALL_MAX && chunk(old) == chunk(new) {
            return ptr;
        }
        let on = CACHE.with(|c| unsafe { (*c.get()).on });
        // Same large class: it fits if it was allocated at the class size.
        if on
            && old > SMALL_MAX
            && old <= LARGE_MAX
            && new > SMALL_MAX
            && malloc_size(old) == malloc_size(new)
            && libc::malloc_usable_size(ptr as *mut libc::c_void) >= new
        {
            return ptr;
        }
        // Every block with alignment <= 16 came from `malloc` (or
        // `realloc`): glibc's `realloc` takes any of them, and grows in
        // place when it can.
        let size = if on { malloc_size(new) } else { new };
        libc::realloc(ptr as *mut libc::c_void, size) as *mut u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).expect("layout")
    }

    #[test]
    fn a_class_fits_every_request_of_its_chunk() {
        for n in 1..=SMALL_MAX {
            // SAFETY: plain malloc/free of a fresh block.
            unsafe {
                let p = libc::malloc(n);
                assert!(!p.is_null());
                let usable = libc::malloc_usable_size(p);
                libc::free(p);
                assert!(
                    usable >= chunk(n) - 8,
                    "request {n}: usable {usable}, chunk {}",
                    chunk(n)
                );
                // The largest request of the class fits too.
                let top = (chunk(n) - 8).min(SMALL_MAX);
                assert_eq!(chunk(top), chunk(n), "request {n}");
            }
        }
    }

    #[test]
    fn blocks_are_reused_within_a_class_and_bounded() {
        let a = WeirAlloc;
        std::thread::spawn(move || {
            enable_thread_cache();
            // SAFETY: layouts with align <= 16, blocks written within
            // their size only, each freed once.
            unsafe {
                let l40 = layout(40, 8);
                let l36 = layout(36, 4);
                let p = a.alloc(l40);
                std::ptr::write_bytes(p, 0xab, 40);
                a.dealloc(p, l40);
                // 36 and 40 bytes share glibc's 48-byte chunk.
                let q = a.alloc(l36);
                assert_eq!(p, q, "reused");
                std::ptr::write_bytes(q, 0xcd, 36);
                let q = a.realloc(q, l36, 40);
                assert_eq!(p, q, "same class: in place");
                let r = a.realloc(q, l40, 4000);
                std::ptr::write_bytes(r, 0xef, 4000);
                a.dealloc(r, layout(4000, 8));
                // 8 KiB buffers are cached exactly.
                let l8k = layout(8192, 1);
                let b = a.alloc(l8k);
                a.dealloc(b, l8k);
                assert_eq!(a.alloc(l8k), b);
                a.dealloc(b, l8k);
                // Between 1 and 16 KiB, requests round up to 256 bytes:
                // 3,232 and 3,300 share a class, and its block holds 3,328.
                let b = a.alloc(layout(3232, 8));
                assert!(libc::malloc_usable_size(b as *mut libc::c_void) >= 3328);
                let b = a.realloc(b, layout(3232, 8), 3300);
                std::ptr::write_bytes(b, 1, 3300);
                a.dealloc(b, layout(3300, 8));
                let c = a.alloc(layout(3232, 8));
                assert_eq!(b, c);
                // A realloc into a large class gets the class size.
                let c = a.realloc(c, layout(3232, 8), 1500);
                assert!(libc::malloc_usable_size(c as *mut libc::c_void) >= 1536);
                a.dealloc(c, layout(1500, 8));
                let d = a.alloc(layout(1536, 8));
                std::ptr::write_bytes(d, 2, 1536);
                a.dealloc(d, layout(1536, 8));
                // At most MAX_PER_CLASS blocks of a class stay cached.
                let l64 = layout(64, 8);
                let many: Vec<*mut u8> = (0..200).map(|_| a.alloc(l64)).collect();
                for p in &many {
                    a.dealloc(*p, l64);
                }
                CACHE.with(|c| {
                    let c = &*c.get();
                    assert_eq!(c.counts[chunk(64) / 16], MAX_PER_CLASS);
                    assert!(c.bytes <= MAX_BYTES);
                });
                let z = a.alloc_zeroed(l64);
                assert!(std::slice::from_raw_parts(z, 64).iter().all(|b| *b == 0));
                a.dealloc(z, l64);
            }
        })
        .join()
        .expect("thread");
    }

    /// Random allocations, reallocations and frees of 1 byte to 20 KiB,
    /// each block filled to its size and checked before it is freed: a
    /// block handed out too small would corrupt its neighbour (glibc
    /// aborts on a damaged chunk header) or fail the check.
    #[test]
    fn random_blocks_hold_their_size() {
        let a = WeirAlloc;
        std::thread::spawn(move || {
            enable_thread_cache();
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut rand = move |n: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            let mut live: Vec<(*mut u8, usize, u8)> = Vec::new();
            // SAFETY: every block is used within its layout's size and
            // freed once, with the layout it was last given.
            unsafe {
                let check = |p: *mut u8, n: usize, v: u8| {
                    assert!(std::slice::from_raw_parts(p, n).iter().all(|b| *b == v));
                };
                for i in 0..40_000 {
                    let n = match rand(4) {
                        0 => 1 + rand(64),
                        1 => 1 + rand(1100),
                        2 => 1000 + rand(4000),
                        _ => 1 + rand(20_000),
                    };
                    let v = (i % 251) as u8;
                    match rand(3) {
                        0 if !live.is_empty() => {
                            let (p, old, ov) = live.swap_remove(rand(live.len()));
                            check(p, old, ov);
                            let p = a.realloc(p, layout(old, 8), n);
                            check(p, old.min(n), ov);
                            std::ptr::write_bytes(p, v, n);
                            live.push((p, n, v));
                        }
                        1 if !live.is_empty() => {
                            let (p, old, ov) = live.swap_remove(rand(live.len()));
                            check(p, old, ov);
                            a.dealloc(p, layout(old, 8));
                        }
                        _ if live.len() < 200 => {
                            let p = a.alloc(layout(n, 8));
                            std::ptr::write_bytes(p, v, n);
                            live.push((p, n, v));
                        }
                        _ => {}
                    }
                }
                for (p, n, v) in live {
                    check(p, n, v);
                    a.dealloc(p, layout(n, 8));
                }
            }
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn threads_without_the_cache_go_straight_to_glibc() {
        let a = WeirAlloc;
        std::thread::spawn(move || {
            // SAFETY: as above.
            unsafe {
                let l = layout(100, 8);
                let p = a.alloc(l);
                a.dealloc(p, l);
                CACHE.with(|c| assert_eq!((*c.get()).bytes, 0));
            }
        })
        .join()
        .expect("thread");
        // A large block from such a thread has its request's size: a
        // worker that frees it must not hand it out for its whole class.
        let exact = std::thread::spawn(move || unsafe { a.alloc(layout(1100, 8)) as usize })
            .join()
            .expect("thread");
        std::thread::spawn(move || {
            enable_thread_cache();
            // SAFETY: the block was allocated with this layout and is
            // freed once.
            unsafe {
                a.dealloc(exact as *mut u8, layout(1100, 8));
                CACHE.with(|c| assert_eq!((*c.get()).bytes, 0, "not cached"));
                let p = a.alloc(layout(1200, 8));
                std::ptr::write_bytes(p, 3, 1200);
                a.dealloc(p, layout(1200, 8));
            }
        })
        .join()
        .expect("thread");
    }
}
