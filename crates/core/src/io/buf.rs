//! Aligned buffers for O_DIRECT and the pool that recycles them.
//!
//! O_DIRECT wants the memory address, not only the file offset, aligned to the device's
//! block size, so every buffer here starts on a 4 KiB boundary. The pool keeps freed buffers
//! in power-of-two size classes so the hot path does not go to the allocator, and it can
//! carve buffers out of one preallocated arena that the io_uring engine registers with the
//! kernel (`IORING_REGISTER_BUFFERS`), which spares the kernel pinning pages on every I/O.
//!
//! A buffer is plain owned memory (`Send`), so it can be handed to JavaScript as an external
//! `Buffer` without copying and come back to the pool when the JavaScript side drops it.
//!
//! Buffers of 1 MiB and more are mapped on their own, on 2 MiB boundaries, and offered to
//! transparent huge pages (`MADV_HUGEPAGE`; 1 MiB buffers come in pairs from one 2 MiB
//! mapping). Why: a request's pages go to the device as one segment per physically
//! contiguous run, and a virtio disk takes a limited number of segments per request (254
//! here). A 1 MiB read into 256 scattered 4 KiB pages is split into two requests; into a
//! huge page it is one segment, and the block layer can even merge consecutive reads into
//! one request. 1 MiB sequential reads at queue depth 4 from Node into reused buffers, on a
//! 2-core VM: 1.05 GB/s in 4 KiB pages (every read split in two), 4.3 GB/s in huge pages
//! (four reads per 4 MiB request). Where huge pages are off or short, the memory is
//! ordinary pages and nothing else changes. (With the kernel's default `defrag` setting a
//! first touch may compact memory to find a huge page; the pool keeps these buffers, so
//! that happens once per buffer, not per read.)

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of every buffer: enough for any logical block size up to 4 KiB and for pages.
pub const BUF_ALIGN: usize = 4096;

const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 22; // 4 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// Allocations of at least this many bytes are mappings of their own (see the module docs).
const MAPPED_MIN: usize = 1 << 20;
/// Size and alignment of a transparent huge page on x86-64 and (4 KiB-page) arm64.
const HUGE_PAGE: usize = 2 << 20;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// An owned byte buffer whose memory starts on a [`BUF_ALIGN`] boundary.
///
/// `len` bytes are in use out of `capacity`; derefs to `[u8]` of length `len`. Dropping a
/// pooled buffer gives its memory back to its [`BufPool`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

enum Origin {
    /// Our own allocation, freed on drop.
    Heap,
    /// A window on a [`Slab`], which it keeps alive.
    Slab(Arc<Slab>),
    /// From a pool's size class; `arena` when the memory lies in the pool's registered arena.
    Pool { pool: Arc<PoolShared>, class: usize, arena: bool },
}

// SAFETY: the buffer exclusively owns its memory; the pool it returns to is thread-safe.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled, unpooled buffer of `len` bytes (capacity rounded up to 4 KiB).
    pub fn new(len: usize) -> AlignedBuf {
        let cap = round_up(len.max(1), BUF_ALIGN);
        let ptr = heap_alloc(cap, true);
        AlignedBuf { ptr, len, cap, origin: Origin::Heap }
    }

    /// An unpooled buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated; `len` can grow up to this without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the number of bytes in use. Bytes that come into use keep whatever they held
    /// (zero for fresh memory, stale data for recycled pool memory).
    ///
    /// Panics never: a `len` above the capacity is clamped to the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }

    /// Start of the memory (aligned to [`BUF_ALIGN`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the memory, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// If this buffer lies in a pool's registered arena: that pool's id and the byte offset
    /// of the buffer in the arena. The io_uring engine uses fixed-buffer opcodes for these.
    pub fn arena_slot(&self) -> Option<(u64, usize)> {
        match &self.origin {
            Origin::Pool { pool, arena: true, .. } => {
                let base = pool.arena.as_ref().map(|a| a.ptr.as_ptr() as usize)?;
                Some((pool.id, self.ptr.as_ptr() as usize - base))
            }
            // A window on a slab carved from an arena lies in that arena too.
            Origin::Slab(slab) => {
                let (pool, at) = slab.buf.arena_slot()?;
                Some((pool, at + (self.ptr.as_ptr() as usize - slab.as_ptr() as usize)))
            }
            _ => None,
        }
    }
}

/// A block of aligned memory shared by several users: windows on it ([`AlignedBuf::in_slab`])
/// that requests read into, and whoever else holds the `Arc` (the JavaScript binding exposes
/// a slab as an `ArrayBuffer`, so reads land straight in JavaScript memory). The memory goes
/// back where it came from (a [`BufPool`], or the allocator) when the last holder lets go.
pub struct Slab {
    buf: AlignedBuf,
}

impl Slab {
    /// A slab over `buf`'s whole capacity.
    pub fn new(mut buf: AlignedBuf) -> Arc<Slab> {
        buf.set_len(buf.capacity());
        Arc::new(Slab { buf })
    }

    /// Start of the memory (aligned to [`BUF_ALIGN`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.buf.ptr.as_ptr()
    }

    /// Bytes in the slab.
    pub fn len(&self) -> usize {
        self.buf.len
    }

    /// True for a slab of no bytes (never: buffers have a capacity of at least one page).
    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }
}

impl std::fmt::Debug for Slab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slab").field("len", &self.len()).finish()
    }
}

impl AlignedBuf {
    /// A buffer over bytes `offset .. offset + len` of `slab`, keeping the slab alive. None
    /// unless the window lies inside the slab and starts on a [`BUF_ALIGN`] boundary.
    ///
    /// # Safety
    /// While the buffer lives, nothing else may read or write those bytes (no other window
    /// overlapping them, no JavaScript view reading them): the kernel writes into them.
    pub unsafe fn in_slab(slab: &Arc<Slab>, offset: usize, len: usize) -> Option<AlignedBuf> {
        // SAFETY: the caller's promise, passed on.
        unsafe { AlignedBuf::in_slab_aligned(slab, offset, len, BUF_ALIGN) }
    }

    /// [`AlignedBuf::in_slab`] for a window that starts on an `align` boundary (a power of
    /// two of at least 512: what O_DIRECT needs of a device with 512-byte blocks).
    ///
    /// # Safety
    /// As for [`AlignedBuf::in_slab`]; windows that only requests writing *from* them use
    /// (the kernel reads them) may overlap each other.
    pub unsafe fn in_slab_aligned(slab: &Arc<Slab>, offset: usize, len: usize, align: usize) -> Option<AlignedBuf> {
        if !align.is_power_of_two()
            || align < 512
            || !offset.is_multiple_of(align)
            || offset.checked_add(len)? > slab.len()
        {
            return None;
        }
        // SAFETY: offset + len <= slab.len(), so the pointer stays inside the allocation.
        let ptr = unsafe { NonNull::new_unchecked(slab.as_ptr().add(offset)) };
        Some(AlignedBuf { ptr, len, cap: len, origin: Origin::Slab(slab.clone()) })
    }

    /// This buffer as a window on a slab: `(slab, offset, len)`. A window stays where it
    /// is; any other buffer becomes a slab of its own (no copy). Requests that split one
    /// buffer into pieces take windows of it with [`AlignedBuf::in_slab_aligned`].
    pub fn into_slab(self) -> (Arc<Slab>, usize, usize) {
        if let Origin::Slab(slab) = &self.origin {
            let at = self.ptr.as_ptr() as usize - slab.as_ptr() as usize;
            return (slab.clone(), at, self.len);
        }
        let len = self.len;
        (Slab::new(self), 0, len)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, all initialised (zeroed or written).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we own the memory exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("capacity", &self.cap).finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.origin, Origin::Heap) {
            Origin::Heap => heap_free(self.ptr, self.cap),
            Origin::Slab(_) => {}
            Origin::Pool { pool, class, arena } => pool.give_back(class, self.ptr, arena),
        }
    }
}

fn heap_alloc(cap: usize, zeroed: bool) -> NonNull<u8> {
    if cap >= MAPPED_MIN {
        return map_alloc(cap);
    }
    let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("buffer size overflows a Layout");
    // SAFETY: layout has non-zero size (cap >= BUF_ALIGN).
    let p = unsafe {
        if zeroed {
            alloc_zeroed(layout)
        } else {
            alloc(layout)
        }
    };
    match NonNull::new(p) {
        Some(p) => p,
        None => std::alloc::handle_alloc_error(layout),
    }
}

fn heap_free(ptr: NonNull<u8>, cap: usize) {
    if cap >= MAPPED_MIN {
        // SAFETY: map_alloc mapped exactly these `cap` bytes (or a pool split a mapping
        // into pieces of `cap` bytes, each unmapped on its own).
        unsafe { libc::munmap(ptr.as_ptr().cast(), cap) };
        return;
    }
    let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("layout was valid at allocation");
    // SAFETY: allocated by heap_alloc with this layout.
    unsafe { dealloc(ptr.as_ptr(), layout) }
}

/// `cap` zeroed bytes (a multiple of 4 KiB) mapped on a 2 MiB boundary and offered to
/// transparent huge pages.
fn map_alloc(cap: usize) -> NonNull<u8> {
    let fail =
        || -> ! { std::alloc::handle_alloc_error(Layout::from_size_align(cap, HUGE_PAGE).expect("mapping size")) };
    // Map a huge page more than asked, so that an aligned start lies inside, then trim.
    let len = cap.checked_add(HUGE_PAGE).unwrap_or_else(|| fail());
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail();
    }
    let start = p as usize;
    let aligned = round_up(start, HUGE_PAGE);
    let head = aligned - start;
    let tail = len - head - cap;
    // SAFETY: both ranges lie inside the mapping just made and outside the part kept. The
    // advice is best effort: without huge pages the memory is ordinary pages.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + cap) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, cap, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8).unwrap_or_else(|| fail())
}

/// How a [`BufPool`] is sized.
#[derive(Debug, Clone, Copy)]
pub struct BufPoolConfig {
    /// Bytes preallocated as one arena the io_uring engine can register (0: no arena).
    /// Buffers are carved from it first; once it is used up the pool falls back to the heap.
    pub arena_bytes: usize,
    /// Freed heap buffers kept per size class, in bytes; beyond this they are freed.
    pub max_cached_bytes_per_class: usize,
}

impl Default for BufPoolConfig {
    fn default() -> Self {
        BufPoolConfig { arena_bytes: 0, max_cached_bytes_per_class: 64 << 20 }
    }
}

/// Counters of a pool, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BufPoolStats {
    /// Buffers handed out that came from a free list.
    pub reused: u64,
    /// Buffers handed out that needed new memory (arena or heap).
    pub fresh: u64,
    /// Bytes of the arena carved into buffers so far.
    pub arena_used: usize,
}

struct Arena {
    ptr: NonNull<u8>,
    len: usize,
}

/// Free buffers of one size class: start, and whether it lies in the arena.
type FreeList = Vec<(NonNull<u8>, bool)>;

struct PoolShared {
    id: u64,
    cfg: BufPoolConfig,
    arena: Option<Arena>,
    arena_used: AtomicUsize,
    classes: [Mutex<FreeList>; CLASSES],
    reused: AtomicU64,
    fresh: AtomicU64,
}

// SAFETY: the raw pointers in the free lists are owned memory guarded by the mutexes.
unsafe impl Send for PoolShared {}
// SAFETY: as above.
unsafe impl Sync for PoolShared {}

impl PoolShared {
    fn give_back(&self, class: usize, ptr: NonNull<u8>, arena: bool) {
        let size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
        let mut list = self.classes[class].lock().unwrap_or_else(|e| e.into_inner());
        // Arena memory cannot be freed piecemeal, so it always goes back on the list.
        if arena || (list.len() + 1) * size <= self.cfg.max_cached_bytes_per_class {
            list.push((ptr, arena));
        } else {
            drop(list);
            heap_free(ptr, size);
        }
    }

    fn carve_arena(&self, size: usize) -> Option<NonNull<u8>> {
        let arena = self.arena.as_ref()?;
        let mut used = self.arena_used.load(Ordering::Relaxed);
        loop {
            let start = used;
            if start + size > arena.len {
                return None;
            }
            match self.arena_used.compare_exchange(used, start + size, Ordering::AcqRel, Ordering::Relaxed) {
                // SAFETY: start + size <= arena.len, inside the arena allocation.
                Ok(_) => return Some(unsafe { NonNull::new_unchecked(arena.ptr.as_ptr().add(start)) }),
                Err(now) => used = now,
            }
        }
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        for (class, list) in self.classes.iter_mut().enumerate() {
            let size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
            for (ptr, arena) in list.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
                if !arena {
                    heap_free(ptr, size);
                }
            }
        }
        if let Some(a) = self.arena.take() {
            heap_free(a.ptr, a.len);
        }
    }
}

/// A thread-safe pool of [`AlignedBuf`]s in power-of-two size classes from 4 KiB to 4 MiB.
/// Larger requests get unpooled buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool").field("id", &self.shared.id).field("stats", &self.stats()).finish()
    }
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool::new(BufPoolConfig::default())
    }
}

impl BufPool {
    /// A pool with the given sizing; the arena (if any) is allocated and zeroed now.
    pub fn new(cfg: BufPoolConfig) -> BufPool {
        let arena = (cfg.arena_bytes > 0).then(|| {
            let len = round_up(cfg.arena_bytes, BUF_ALIGN);
            Arena { ptr: heap_alloc(len, true), len }
        });
        BufPool {
            shared: Arc::new(PoolShared {
                id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
                cfg,
                arena,
                arena_used: AtomicUsize::new(0),
                classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
                reused: AtomicU64::new(0),
                fresh: AtomicU64::new(0),
            }),
        }
    }

    /// Identity of this pool, as found in [`AlignedBuf::arena_slot`].
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The arena's start and length, for registration with io_uring.
    pub fn arena(&self) -> Option<(*mut u8, usize)> {
        self.shared.arena.as_ref().map(|a| (a.ptr.as_ptr(), a.len))
    }

    /// A buffer of `len` bytes. Recycled memory keeps stale contents: callers that do not
    /// overwrite every byte (a read does) should use [`BufPool::get_zeroed`].
    pub fn get(&self, len: usize) -> AlignedBuf {
        let size = len.max(1).next_power_of_two().max(1 << MIN_CLASS_SHIFT);
        if size > 1 << MAX_CLASS_SHIFT {
            self.shared.fresh.fetch_add(1, Ordering::Relaxed);
            let mut b = AlignedBuf::new(len);
            b.set_len(len);
            return b;
        }
        let class = (size.trailing_zeros() - MIN_CLASS_SHIFT) as usize;
        let popped = self.shared.classes[class].lock().unwrap_or_else(|e| e.into_inner()).pop();
        let (ptr, arena) = match popped {
            Some(p) => {
                self.shared.reused.fetch_add(1, Ordering::Relaxed);
                p
            }
            None => {
                self.shared.fresh.fetch_add(1, Ordering::Relaxed);
                match self.shared.carve_arena(size) {
                    Some(p) => (p, true),
                    None if (MAPPED_MIN..HUGE_PAGE).contains(&size) => {
                        // One huge page holds several: map it whole, keep the rest for later.
                        let block = heap_alloc(HUGE_PAGE, true);
                        let mut list = self.shared.classes[class].lock().unwrap_or_else(|e| e.into_inner());
                        for at in (size..HUGE_PAGE).step_by(size) {
                            // SAFETY: at < HUGE_PAGE, inside the mapping.
                            list.push((unsafe { NonNull::new_unchecked(block.as_ptr().add(at)) }, false));
                        }
                        (block, false)
                    }
                    None => (heap_alloc(size, true), false),
                }
            }
        };
        AlignedBuf { ptr, len, cap: size, origin: Origin::Pool { pool: self.shared.clone(), class, arena } }
    }

    /// A buffer of `len` zero bytes.
    pub fn get_zeroed(&self, len: usize) -> AlignedBuf {
        let mut b = self.get(len);
        b.fill(0);
        b
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(&self, data: &[u8]) -> AlignedBuf {
        let mut b = self.get(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Counters so far.
    pub fn stats(&self) -> BufPoolStats {
        BufPoolStats {
            reused: self.shared.reused.load(Ordering::Relaxed),
            fresh: self.shared.fresh.load(Ordering::Relaxed),
            arena_used: self.shared.arena_used.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_sit_on_huge_page_boundaries() {
        let pool = BufPool::default();
        let mut a = pool.get(1 << 20);
        let mut b = pool.get(1 << 20);
        // A pair from one 2 MiB mapping: one on the boundary, the other right after it.
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert_eq!(pa.min(pb) % HUGE_PAGE, 0);
        assert_eq!(pa.abs_diff(pb), 1 << 20);
        let mut c = AlignedBuf::new(3 << 20);
        assert_eq!(c.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(c.iter().all(|&x| x == 0));
        for (i, buf) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
            buf.fill(i as u8 + 1);
        }
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        drop(c);
        // Freed and reused, then freed past the pool's cache (unmapped piece by piece).
        drop(a);
        let a2 = pool.get(1 << 20);
        assert!(a2.iter().all(|&x| x == 1), "recycled memory keeps its contents");
        let tiny = BufPool::new(BufPoolConfig { max_cached_bytes_per_class: 0, ..Default::default() });
        let pair = (tiny.get(1 << 20), tiny.get(1 << 20));
        drop(pair);
        drop((a2, b, pool, tiny));
    }

    #[test]
    fn buffers_are_aligned_and_sized() {
        let pool = BufPool::default();
        for len in [0usize, 1, 511, 4096, 4097, 65536, 1 << 20, (4 << 20) + 1] {
            let b = pool.get(len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len.max(1));
        }
        let b = AlignedBuf::new(100);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn slab_windows_keep_the_slab_alive_and_stay_inside_it() {
        let slab = Slab::new(AlignedBuf::new(10_000));
        assert_eq!(slab.len(), 12_288);
        assert_eq!(slab.as_ptr() as usize % BUF_ALIGN, 0);
        // SAFETY (all three): no other window or reader touches these bytes.
        let mut w = unsafe { AlignedBuf::in_slab(&slab, 4096, 8192) }.expect("inside");
        assert!(unsafe { AlignedBuf::in_slab(&slab, 4096, 8193) }.is_none(), "past the end");
        assert!(unsafe { AlignedBuf::in_slab(&slab, 512, 512) }.is_none(), "misaligned");
        assert_eq!(w.as_ptr() as usize, slab.as_ptr() as usize + 4096);
        w.fill(7);
        let base = slab.as_ptr();
        drop(slab);
        // The window still holds the memory; writing through it is fine.
        w[8191] = 9;
        // SAFETY: the window keeps the slab allocation alive.
        assert_eq!(unsafe { *base.add(4096 + 8191) }, 9);
        assert_eq!(w.len(), 8192);
    }

    #[test]
    fn windows_on_an_arena_slab_lie_in_the_arena() {
        let pool = BufPool::new(BufPoolConfig { arena_bytes: 1 << 20, ..Default::default() });
        let slab = Slab::new(pool.get(65536));
        let (id, at) = slab.buf.arena_slot().expect("carved from the arena");
        // SAFETY: no other window or reader touches these bytes.
        let w = unsafe { AlignedBuf::in_slab(&slab, 8192, 4096) }.unwrap();
        assert_eq!(w.arena_slot(), Some((id, at + 8192)));
        assert_eq!(pool.id(), id);
        let heap = Slab::new(AlignedBuf::new(8192));
        // SAFETY: as above.
        assert_eq!(unsafe { AlignedBuf::in_slab(&heap, 0, 4096) }.unwrap().arena_slot(), None);
    }

    #[test]
    fn freed_buffers_are_reused() {
        let pool = BufPool::default();
        let a = pool.get(8192);
        let p = a.as_ptr();
        drop(a);
        let b = pool.get(5000);
        assert_eq!(b.as_ptr(), p);
        assert_eq!(pool.stats().reused, 1);
        assert_eq!(pool.stats().fresh, 1);
    }

    #[test]
    fn arena_buffers_report_their_slot_and_overflow_to_heap() {
        let pool = BufPool::new(BufPoolConfig { arena_bytes: 64 << 10, ..Default::default() });
        let (base, len) = pool.arena().unwrap();
        assert_eq!(len, 64 << 10);
        let a = pool.get(32 << 10);
        let b = pool.get(32 << 10);
        let c = pool.get(4096);
        let (id, off) = a.arena_slot().unwrap();
        assert_eq!(id, pool.id());
        assert_eq!(a.as_ptr() as usize, base as usize + off);
        assert!(b.arena_slot().is_some());
        assert!(c.arena_slot().is_none(), "arena is full, so this one comes from the heap");
        drop(a);
        let d = pool.get(20000);
        assert!(d.arena_slot().is_some(), "the freed arena buffer is reused");
    }

    #[test]
    fn zeroed_and_copied() {
        let pool = BufPool::default();
        let mut a = pool.get(4096);
        a.fill(7);
        drop(a);
        let z = pool.get_zeroed(4096);
        assert!(z.iter().all(|&x| x == 0));
        let c = pool.copy_from(b"hello");
        assert_eq!(&c[..], b"hello");
    }

    #[test]
    fn buffers_cross_threads() {
        let pool = BufPool::default();
        let bufs: Vec<_> = (0..16).map(|i| pool.copy_from(&[i as u8; 4096])).collect();
        let h = std::thread::spawn(move || bufs.into_iter().map(|b| b[0] as u32).sum::<u32>());
        assert_eq!(h.join().unwrap(), (0..16).sum());
        assert_eq!(pool.get(4096).len(), 4096);
    }
}
