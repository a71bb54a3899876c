//! Storage for the B+tree's fixed-size nodes: chunks addressed by 32-bit ids
//! (`chunk << 16 | slot`), freed slots reused.
//!
//! Chunks start small (a tree per flash volume must stay cheap) and double up to a few MiB;
//! those big chunks are aligned to 2 MiB and offered to the kernel for transparent huge
//! pages, because a lookup in a tree of millions of extents otherwise pays a TLB miss on
//! nearly every node it touches.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::mem::size_of;
use std::ptr::NonNull;

pub(crate) const NIL: u32 = u32::MAX;
const SLOT_BITS: u32 = 16;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
const FIRST_CHUNK: usize = 4;
const HUGE_PAGE: usize = 2 << 20;
const BIG_CHUNK_BYTES: usize = 2 * HUGE_PAGE;

/// One allocation of `cap` nodes, all initialised.
struct Chunk<T: Copy> {
    ptr: NonNull<T>,
    cap: usize,
    layout: Layout,
}

// SAFETY: a chunk owns its nodes like a Box<[T]> does.
unsafe impl<T: Copy + Send> Send for Chunk<T> {}
// SAFETY: shared access only hands out shared references.
unsafe impl<T: Copy + Sync> Sync for Chunk<T> {}

impl<T: Copy> Chunk<T> {
    fn new(cap: usize, blank: T) -> Chunk<T> {
        let bytes = cap * size_of::<T>();
        let huge = bytes >= HUGE_PAGE;
        let layout = if huge {
            Layout::from_size_align(bytes.next_multiple_of(HUGE_PAGE), HUGE_PAGE)
        } else {
            Layout::array::<T>(cap)
        }
        .expect("extent index: chunk layout");
        // SAFETY: the layout is never zero-sized (cap >= 1, nodes are not ZSTs).
        let raw = unsafe { alloc(layout) } as *mut T;
        let Some(ptr) = NonNull::new(raw) else { handle_alloc_error(layout) };
        if huge {
            advise_huge_pages(raw as *mut u8, layout.size());
        }
        for i in 0..cap {
            // SAFETY: i < cap, inside the allocation just made for cap nodes.
            unsafe { ptr.as_ptr().add(i).write(blank) };
        }
        Chunk { ptr, cap, layout }
    }

    #[inline(always)]
    fn nodes(&self) -> &[T] {
        // SAFETY: the allocation holds `cap` initialised nodes for the chunk's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    #[inline(always)]
    fn nodes_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl<T: Copy> Drop for Chunk<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout; nodes are Copy (no drop glue).
        unsafe { dealloc(self.ptr.as_ptr() as *mut u8, self.layout) }
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(p: *mut u8, len: usize) {
    // A hint only: without THP the memory works the same, just with small pages.
    // SAFETY: the range is one live allocation of ours.
    unsafe { libc::madvise(p as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_p: *mut u8, _len: usize) {}

/// Asks the CPU to start loading `v` into cache; no effect on results.
#[inline(always)]
pub(crate) fn prefetch<T>(v: &T) {
    prefetch_lines::<false, T>(v)
}

/// `prefetch`, with the non-temporal hint: for data read once, that should not push
/// hotter data out of the outer caches.
#[inline(always)]
pub(crate) fn prefetch_nta<T>(v: &T) {
    prefetch_lines::<true, T>(v)
}

#[inline(always)]
fn prefetch_lines<const NTA: bool, T>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_NTA, _MM_HINT_T0};
        let p = v as *const T as *const i8;
        let mut off = 0;
        while off < size_of::<T>() {
            let line = p.wrapping_add(off);
            // SAFETY: prefetching never faults and the address is inside `v` anyway.
            unsafe {
                if NTA {
                    _mm_prefetch(line, _MM_HINT_NTA)
                } else {
                    _mm_prefetch(line, _MM_HINT_T0)
                }
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// A node type: what a free slot holds.
pub(crate) trait Node: Copy {
    const BLANK: Self;
}

pub(crate) struct Arena<T: Node> {
    chunks: Vec<Chunk<T>>,
    /// Slots handed out from the last chunk.
    used: usize,
    free: Vec<u32>,
}

impl<T: Node> Arena<T> {
    pub fn new() -> Arena<T> {
        Arena { chunks: Vec::new(), used: 0, free: Vec::new() }
    }

    fn next_chunk_cap(&self) -> usize {
        let big = (BIG_CHUNK_BYTES / size_of::<T>()).min(1 << SLOT_BITS);
        let grown = FIRST_CHUNK << self.chunks.len().min(20);
        if grown * size_of::<T>() >= HUGE_PAGE {
            big
        } else {
            grown
        }
    }

    pub fn alloc(&mut self, v: T) -> u32 {
        if let Some(id) = self.free.pop() {
            *self.get_mut(id) = v;
            return id;
        }
        if self.chunks.last().is_none_or(|c| self.used == c.cap) {
            assert!(self.chunks.len() < (1 << (32 - SLOT_BITS)) - 1, "extent index: node arena exhausted");
            self.chunks.push(Chunk::new(self.next_chunk_cap(), T::BLANK));
            self.used = 0;
        }
        let id = ((self.chunks.len() as u32 - 1) << SLOT_BITS) | self.used as u32;
        self.used += 1;
        *self.get_mut(id) = v;
        id
    }

    pub fn free(&mut self, id: u32) {
        *self.get_mut(id) = T::BLANK;
        self.free.push(id);
    }

    /// `get` without the bounds checks, for the lookup path, where every instruction counts.
    ///
    /// # Safety
    /// `id` must have come from `alloc` of this arena (freed or not): ids are never handed
    /// out past the chunks that exist, nor past a chunk's capacity.
    #[inline(always)]
    pub unsafe fn get_unchecked(&self, id: u32) -> &T {
        let c = (id >> SLOT_BITS) as usize;
        let slot = (id & SLOT_MASK) as usize;
        debug_assert!(c < self.chunks.len() && slot < self.chunks[c].cap);
        // SAFETY: by the caller's promise, chunk `c` exists and holds `slot`.
        unsafe { &*self.chunks.get_unchecked(c).ptr.as_ptr().add(slot) }
    }

    #[inline(always)]
    pub fn get(&self, id: u32) -> &T {
        &self.chunks[(id >> SLOT_BITS) as usize].nodes()[(id & SLOT_MASK) as usize]
    }

    #[inline(always)]
    pub fn get_mut(&mut self, id: u32) -> &mut T {
        &mut self.chunks[(id >> SLOT_BITS) as usize].nodes_mut()[(id & SLOT_MASK) as usize]
    }

    /// Two different nodes, both mutable.
    pub fn pair_mut(&mut self, a: u32, b: u32) -> (&mut T, &mut T) {
        assert_ne!(a, b);
        let (ca, sa) = ((a >> SLOT_BITS) as usize, (a & SLOT_MASK) as usize);
        let (cb, sb) = ((b >> SLOT_BITS) as usize, (b & SLOT_MASK) as usize);
        if ca == cb {
            let nodes = self.chunks[ca].nodes_mut();
            if sa < sb {
                let (x, y) = nodes.split_at_mut(sb);
                (&mut x[sa], &mut y[0])
            } else {
                let (x, y) = nodes.split_at_mut(sa);
                (&mut y[0], &mut x[sb])
            }
        } else if ca < cb {
            let (x, y) = self.chunks.split_at_mut(cb);
            (&mut x[ca].nodes_mut()[sa], &mut y[0].nodes_mut()[sb])
        } else {
            let (x, y) = self.chunks.split_at_mut(ca);
            (&mut y[0].nodes_mut()[sa], &mut x[cb].nodes_mut()[sb])
        }
    }

    /// Nodes handed out and not freed.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.chunks.iter().map(|c| c.cap).sum::<usize>()
            - self.chunks.last().map_or(0, |c| c.cap - self.used)
            - self.free.len()
    }

    pub fn heap_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.layout.size()).sum::<usize>()
            + self.chunks.capacity() * size_of::<Chunk<T>>()
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy)]
    struct Big([u64; 40]);

    impl Node for Big {
        const BLANK: Big = Big([0; 40]);
    }

    impl std::ops::Deref for Big {
        type Target = [u64; 40];
        fn deref(&self) -> &[u64; 40] {
            &self.0
        }
    }

    impl std::ops::DerefMut for Big {
        fn deref_mut(&mut self) -> &mut [u64; 40] {
            &mut self.0
        }
    }

    #[test]
    fn ids_stay_valid_across_chunks_and_reuse() {
        let mut a = Arena::new();
        let ids: Vec<u32> = (0..20_000u64).map(|i| a.alloc(Big([i; 40]))).collect();
        assert!(a.chunks.len() > 5, "{} chunks", a.chunks.len());
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(a.get(id)[39], i as u64);
        }
        a.free(ids[7]);
        a.free(ids[19_999]);
        assert_eq!(a.live(), 19_998);
        let again = a.alloc(Big([5; 40]));
        assert_eq!(again, ids[19_999]);
        let (x, y) = a.pair_mut(ids[0], ids[19_000]);
        std::mem::swap(x, y);
        assert_eq!((a.get(ids[0])[0], a.get(ids[19_000])[0]), (19_000, 0));
        let (x, y) = a.pair_mut(ids[2], ids[1]);
        assert_eq!((x[0], y[0]), (2, 1));
    }
}
