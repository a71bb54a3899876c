//! The bucket allocator, after bcache's `alloc.c`.
//!
//! A cache device is cut into buckets. Each bucket has an 8-bit gen that every pointer into it
//! carries too; a pointer whose gen no longer matches is stale. A bucket is reused by bumping
//! its gen, and only after the new gen is durable in the prio buckets; otherwise a crash could
//! leave old pointers looking valid over new data.
//!
//! The pipeline per cache device:
//! 1. invalidate buckets by the device's [`Replacement`] policy into `free_inc` until it is full;
//! 2. write every bucket's prio and gen to a fresh chain of prio buckets ([`Step::WritePrios`]);
//! 3. once the engine has written the chain and the journal recorded it, move the batch (with
//!    a discard on the way if enabled) to the free lists, prio reserve first;
//! 4. [`Allocator::bucket_alloc`] pops a free list in O(1).
//!
//! [`Allocator::prio_write_force`] starts a prio write outside that cycle, without a full
//! batch: opening a set ends with one, so that the gens its first GC pass bumped are durable
//! before any bucket is reused.
//!
//! There is no allocator thread: the engine calls [`Allocator::poll`] after anything that can
//! make progress possible (an allocation, a completed discard or prio write, a finished GC) and
//! carries out the [`Step`] it returns.
//!
//! Sectors used: LRU weighs a bucket's prio by the sectors it still holds. The allocator
//! implements the index's [`BucketGens`](crate::index::BucketGens) and
//! [`BucketAccounting`](crate::index::BucketAccounting), so an
//! [`ExtentIndex`](crate::index::ExtentIndex) called with the allocator (`insert`,
//! `invalidate`, `fill`, `mark_clean`) keeps each bucket's `sectors_used` live as keys come
//! and go between GC passes (counts saturate at 0 and at [`MAX_GC_SECTORS_USED`]). A data
//! bucket starts at 0 when allocated; metadata buckets count as full. GC recounts from
//! scratch: [`Allocator::gc_start`] zeroes the counts (and forgets the marks of unpinned
//! buckets), and each live pointer adds its sectors again through
//! [`Allocator::gc_mark_ptr`] (or `ExtentIndex::mark_buckets`). Accounting never changes a
//! GC mark or a pin: marks are GC's (and [`Allocator::mark_dirty`]'s). Keys inserted during
//! a GC pass, before the mark walk reaches them, are counted twice until the next pass: walk
//! the index in one go between `gc_start` and `gc_finish`.
//!
//! Memory: 8 bytes per bucket for the bucket array, 3 more for an image of the prio file that
//! is kept current as prios and gens change (so a prio write copies it rather than walking the
//! array again), plus free lists and the LRU heap of about nbuckets/64 entries.
//!
//! A typical engine loop:
//! ```
//! use ubcache_core::alloc::{Allocator, CacheConfig, Replacement, Reserve, SetConfig, Step};
//! let cfg = SetConfig {
//!     set_uuid: [7; 16],
//!     bucket_size: 16,
//!     block_size: 8,
//!     caches: vec![CacheConfig { nbuckets: 1024, first_bucket: 1, replacement: Replacement::Lru, discard: false }],
//!     seed: 1,
//! };
//! let mut a = Allocator::new(&cfg)?;
//! a.gc_start(); // a new set: nothing is live
//! a.gc_finish()?;
//! let mut buf = vec![0u8; 16 * 512];
//! let bucket = loop {
//!     match a.bucket_alloc(0, Reserve::None) {
//!         Ok(b) => break b,
//!         Err(_) => match a.poll(0)? {
//!             Step::WritePrios => {
//!                 let w = a.prio_write_begin(0)?;
//!                 for link in 0..w.buckets.len() {
//!                     a.encode_prio_bucket(0, link, &mut buf)?; // then write buf to bucket w.buckets[link]
//!                 }
//!                 // ... and have the journal record w.buckets[0] before:
//!                 a.prio_write_committed(0)?;
//!             }
//!             Step::Discard(b) => a.discard_done(0, b)?,
//!             Step::NeedGc => { a.gc_start(); a.gc_finish()?; }
//!             Step::Idle | Step::Waiting => {}
//!         },
//!     }
//! };
//! let ptr = a.bucket_ptr(0, bucket)?; // goes into a key; unpin once the key is indexed
//! a.unpin(0, bucket)?;
//! assert!(a.ptr_valid(ptr));
//! # Ok::<(), ubcache_core::Error>(())
//! ```

mod accounting;
mod bucket;
mod cache;
mod fifo;
mod gc;
mod open_bucket;
pub mod prio;
pub mod s3fifo;
mod stats;

pub use bucket::{gen_after, BucketInfo, GcMark, BTREE_PRIO, BUCKET_GC_GEN_MAX, INITIAL_PRIO, MAX_GC_SECTORS_USED};
pub use cache::lru_weight;
pub use gc::PtrKind;
pub use open_bucket::{DataWrite, SectorAlloc, MAX_OPEN_BUCKETS};
pub use stats::PriorityStats;

/// A pointer into a cache device (device, sector offset, gen): the index's packed pointer
/// word, the one pointer type of the crate.
pub use crate::index::Ptr;

use crate::error::{Error, ErrorKind, Result};
use crate::index::PTR_OFFSET_MAX;
use cache::{CacheAlloc, PrioInFlight, State};
use open_bucket::OpenBuckets;

/// Most cache devices in one cache set (bcache's MAX_CACHES_PER_SET).
pub const MAX_CACHES_PER_SET: usize = 8;
/// Fewest buckets a cache device may have (bcache's `read_super` minimum, 1 << 7).
pub const MIN_NBUCKETS: u64 = 128;

/// Which free list an allocation may draw from. Every allocation tries `None` first; only
/// its own reserve after that, so ordinary data never eats the buckets held for metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reserve {
    /// Btree nodes.
    Btree = 0,
    /// Prio buckets (the allocator's own prio writes).
    Prio = 1,
    /// Data rewritten by moving GC.
    MovingGc = 2,
    /// Everything else.
    None = 3,
}

pub(crate) const RESERVE_NR: usize = 4;

impl Reserve {
    /// All reserves, in bcache's order.
    pub const ALL: [Reserve; RESERVE_NR] = [Reserve::Btree, Reserve::Prio, Reserve::MovingGc, Reserve::None];
}

/// How a device picks the buckets to invalidate (bcache's `cache_replacement`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Replacement {
    /// Lowest prio weighted by sectors used first.
    #[default]
    Lru,
    /// In bucket order, round and round.
    Fifo,
    /// Uniformly at random.
    Random,
    /// S3-FIFO at bucket granularity (see `alloc::s3fifo`): a small FIFO for new buckets,
    /// a main one with reinsertion for buckets read again. Not one of bcache's.
    S3Fifo,
    /// S3-FIFO behind TinyLFU's doorkeeper (see `cache_set::admission`): a read miss fills
    /// the cache only the second time its data misses within a window, or when it returns
    /// after an eviction. Not one of bcache's.
    TinyLfu,
}

impl Replacement {
    /// True for the policies that evict by S3-FIFO's queues (their prios are queues and
    /// epochs, not ages).
    pub fn fifo_queues(self) -> bool {
        matches!(self, Replacement::S3Fifo | Replacement::TinyLfu)
    }
}

/// One cache device of the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Buckets on the device, including those before `first_bucket`.
    pub nbuckets: u64,
    /// First bucket the allocator may use (the superblock and padding come before it).
    pub first_bucket: u64,
    pub replacement: Replacement,
    /// Discard buckets on their way from `free_inc` to the free lists.
    pub discard: bool,
}

/// The cache set as the allocator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetConfig {
    /// The set UUID; the prio bucket magic derives from it.
    pub set_uuid: [u8; 16],
    /// Bucket size in 512-byte sectors (the same on every device of a set).
    pub bucket_size: u32,
    /// Block size in sectors: an open bucket with less than this left is closed.
    pub block_size: u32,
    pub caches: Vec<CacheConfig>,
    /// Seed of the random replacement policy.
    pub seed: u64,
}

/// What the engine must do next for one device; returned by [`Allocator::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until a bucket is allocated (the free lists are full).
    Idle,
    /// Waiting for a discard or prio write the engine was already asked for, or for the GC
    /// pass under way.
    Waiting,
    /// Discard this bucket, then call [`Allocator::discard_done`].
    Discard(u64),
    /// Call [`Allocator::prio_write_begin`], write the chain, have the journal record it, then
    /// call [`Allocator::prio_write_committed`]. Asked only when the free lists hold a bucket
    /// for every link of the chain, so `prio_write_begin` cannot run out of space.
    WritePrios,
    /// Invalidation cannot go on until GC has run ([`Allocator::gc_start`] ... `gc_finish`):
    /// the policy ran out of candidates, or the free lists cannot hold the prio chain the next
    /// batch needs (a set that came up with too few unused buckets; GC fills the prio reserve
    /// from the buckets it finds unused).
    NeedGc,
}

/// A prio write handed to the engine: the new chain, head first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrioWrite {
    /// Buckets of the new chain, in chain order; `buckets[0]` is what the journal records.
    pub buckets: Vec<u64>,
    /// Sequence number stamped on every bucket of this chain.
    pub seq: u64,
}

/// The bucket allocator of one cache set.
pub struct Allocator {
    caches: Vec<CacheAlloc>,
    pset_magic: u64,
    bucket_size: u32,
    /// log2 of `bucket_size`.
    bucket_bits: u32,
    block_size: u32,
    /// Lowest prio after the last rescale; LRU weights are relative to it.
    min_prio: u16,
    /// Sectors left until the next prio rescale.
    rescale: i64,
    rescale_step: i64,
    /// Largest `gen - last_gc` of any bucket: how urgently GC is needed against gen wrap.
    need_gc: u8,
    gc_mark_valid: bool,
    gc_running: bool,
    started: bool,
    avail_nbuckets: u64,
    nbuckets: u64,
    open: OpenBuckets,
}

impl Allocator {
    /// An allocator for a freshly formatted set, or one whose prios are read next with
    /// [`Allocator::read_prios`]. Nothing can be allocated before a first GC pass
    /// ([`Allocator::gc_start`], marks, [`Allocator::gc_finish`]) has said which buckets hold
    /// live data and metadata.
    pub fn new(cfg: &SetConfig) -> Result<Allocator> {
        if cfg.caches.is_empty() || cfg.caches.len() > MAX_CACHES_PER_SET {
            return Err(inval(format!(
                "a cache set has 1 to {MAX_CACHES_PER_SET} cache devices, got {}",
                cfg.caches.len()
            )));
        }
        if cfg.block_size == 0 || !cfg.block_size.is_power_of_two() {
            return Err(inval(format!("block size of {} sectors is not a power of two", cfg.block_size)));
        }
        if cfg.bucket_size < 8 || !cfg.bucket_size.is_multiple_of(cfg.block_size) {
            return Err(inval(format!(
                "bucket size of {} sectors must be at least 8 and a multiple of the block size ({})",
                cfg.bucket_size, cfg.block_size
            )));
        }
        // Pointers find their bucket by shifting (the index's `bucket_bits`).
        if !cfg.bucket_size.is_power_of_two() {
            return Err(inval(format!("bucket size of {} sectors is not a power of two", cfg.bucket_size)));
        }
        let bucket_bytes = cfg.bucket_size as usize * 512;
        let mut caches = Vec::with_capacity(cfg.caches.len());
        let mut total = 0u64;
        for (i, c) in cfg.caches.iter().enumerate() {
            if c.nbuckets < MIN_NBUCKETS || c.nbuckets > u64::from(u32::MAX) {
                return Err(inval(format!(
                    "cache {i}: {} buckets; the allocator needs {MIN_NBUCKETS} to {}",
                    c.nbuckets,
                    u32::MAX
                )));
            }
            // Every sector of the device must be nameable by a pointer (43-bit PTR_OFFSET).
            if c.nbuckets * u64::from(cfg.bucket_size) > PTR_OFFSET_MAX + 1 {
                return Err(inval(format!(
                    "cache {i}: {} buckets of {} sectors run past the last sector a pointer can name ({PTR_OFFSET_MAX})",
                    c.nbuckets, cfg.bucket_size
                )));
            }
            let prio_nr = prio::prio_buckets(c.nbuckets, bucket_bytes);
            // Room for the journal's and btree's first buckets, two prio chains and a batch.
            if c.first_bucket == 0 || c.first_bucket + 2 * prio_nr as u64 + 64 > c.nbuckets {
                return Err(inval(format!(
                    "cache {i}: first bucket {} leaves too few of {} buckets",
                    c.first_bucket, c.nbuckets
                )));
            }
            total += c.nbuckets - c.first_bucket;
            caches.push(CacheAlloc::new(
                c.nbuckets,
                c.first_bucket,
                c.replacement,
                c.discard,
                prio_nr,
                cfg.seed.wrapping_add(i as u64),
            ));
        }
        let step = (total * u64::from(cfg.bucket_size) / 1024).max(1) as i64;
        Ok(Allocator {
            caches,
            pset_magic: prio::pset_magic(&cfg.set_uuid),
            bucket_size: cfg.bucket_size,
            bucket_bits: cfg.bucket_size.trailing_zeros(),
            block_size: cfg.block_size,
            min_prio: 0,
            // bcache starts this at zero (the first write ages everything); start a full step.
            rescale: step,
            rescale_step: step,
            need_gc: 0,
            gc_mark_valid: false,
            gc_running: false,
            started: false,
            avail_nbuckets: 0,
            nbuckets: total,
            open: OpenBuckets::new(open_bucket::open_limit(total)),
        })
    }

    /// Number of cache devices.
    pub fn caches(&self) -> usize {
        self.caches.len()
    }

    /// Bucket size in sectors.
    pub fn bucket_size(&self) -> u32 {
        self.bucket_size
    }

    /// Bucket count of a device (including those before its first bucket).
    pub fn nbuckets(&self, dev: u8) -> Result<u64> {
        Ok(self.cache(dev)?.nbuckets)
    }

    /// The magic every prio bucket of this set carries.
    pub fn pset_magic(&self) -> u64 {
        self.pset_magic
    }

    /// Lowest prio after the last rescale.
    pub fn min_prio(&self) -> u16 {
        self.min_prio
    }

    /// Largest distance any bucket's gen has run ahead of the last GC.
    pub fn need_gc(&self) -> u8 {
        self.need_gc
    }

    /// True when the engine should run GC: some device cannot fill its next batch, or some
    /// bucket's gen came to the end of the window GC allows.
    pub fn gc_wanted(&self) -> bool {
        self.need_gc >= BUCKET_GC_GEN_MAX || self.caches.iter().any(|c| c.invalidate_needs_gc)
    }

    /// Buckets that are unused or clean and unpinned, as counted by the last GC and kept up to
    /// date by allocations and frees since.
    pub fn available_buckets(&self) -> u64 {
        self.avail_nbuckets
    }

    /// Sectors handed out for data on a device so far.
    pub fn sectors_written(&self, dev: u8) -> Result<u64> {
        Ok(self.cache(dev)?.sectors_written)
    }

    /// Sectors of prio buckets written on a device so far.
    pub fn meta_sectors_written(&self, dev: u8) -> Result<u64> {
        Ok(self.cache(dev)?.meta_sectors_written)
    }

    /// A copy of one bucket's state.
    pub fn bucket(&self, dev: u8, bucket: u64) -> Result<BucketInfo> {
        let c = self.cache(dev)?;
        Ok(c.buckets[check_bucket(c, dev, bucket)?].info())
    }

    /// Buckets waiting on one free list, in the order they will be handed out.
    pub fn free_list(&self, dev: u8, reserve: Reserve) -> Result<Vec<u64>> {
        Ok(self.cache(dev)?.free[reserve as usize].iter().map(u64::from).collect())
    }

    /// Capacity of one free list (bcache's sizing).
    pub fn free_list_capacity(&self, dev: u8, reserve: Reserve) -> Result<usize> {
        Ok(self.cache(dev)?.free[reserve as usize].capacity())
    }

    /// Buckets invalidated and waiting in `free_inc`, oldest first.
    pub fn free_inc(&self, dev: u8) -> Result<Vec<u64>> {
        Ok(self.cache(dev)?.free_inc.iter().map(u64::from).collect())
    }

    /// Capacity of `free_inc`: the size of one invalidation batch.
    pub fn free_inc_capacity(&self, dev: u8) -> Result<usize> {
        Ok(self.cache(dev)?.free_inc.capacity())
    }

    /// The committed prio chain of a device, head first (empty before the first prio write).
    pub fn prio_chain(&self, dev: u8) -> Result<&[u64]> {
        Ok(&self.cache(dev)?.prio_buckets)
    }

    /// Buckets in a full prio chain of a device.
    pub fn prio_chain_len(&self, dev: u8) -> Result<usize> {
        Ok(self.cache(dev)?.prio_nr)
    }

    /// A device's replacement policy and whether it discards buckets before reuse.
    pub fn cache_policy(&self, dev: u8) -> Result<(Replacement, bool)> {
        let c = self.cache(dev)?;
        Ok((c.replacement, c.discard))
    }

    /// Changes a device's replacement policy (from the next invalidation batch on) and
    /// whether it discards buckets before reuse (from the next bucket on).
    pub fn set_cache_policy(&mut self, dev: u8, replacement: Replacement, discard: bool) -> Result<()> {
        let c = self.cache_mut(dev)?;
        if c.replacement != replacement {
            // The prios meant something else under the old policy: every data bucket starts over.
            if replacement.fifo_queues() && !c.replacement.fifo_queues() {
                c.replacement = replacement;
                c.s3fifo_reset();
            } else if c.replacement.fifo_queues() && !replacement.fifo_queues() {
                for i in c.first_bucket as usize..c.buckets.len() {
                    if c.buckets[i].prio != BTREE_PRIO {
                        c.buckets[i].prio = INITIAL_PRIO;
                        c.note(i);
                    }
                }
            }
        }
        c.replacement = replacement;
        c.discard = discard;
        Ok(())
    }

    fn cache(&self, dev: u8) -> Result<&CacheAlloc> {
        self.caches.get(dev as usize).ok_or_else(|| no_cache(dev, self.caches.len()))
    }

    fn cache_mut(&mut self, dev: u8) -> Result<&mut CacheAlloc> {
        let n = self.caches.len();
        self.caches.get_mut(dev as usize).ok_or_else(|| no_cache(dev, n))
    }

    /// The device and bucket a pointer points into.
    pub fn ptr_bucket(&self, ptr: Ptr) -> Result<u64> {
        let c = self.cache(ptr.dev())?;
        let bucket = ptr.bucket(self.bucket_bits);
        check_bucket(c, ptr.dev(), bucket)?;
        Ok(bucket)
    }

    /// How many gens the pointer's bucket has moved on since the pointer was made; 0 means the
    /// pointer is still valid.
    pub fn ptr_stale(&self, ptr: Ptr) -> Result<u8> {
        let bucket = self.ptr_bucket(ptr)?;
        Ok(gen_after(self.caches[ptr.dev() as usize].buckets[bucket as usize].gen, ptr.gen()))
    }

    /// A pointer is valid when its device and bucket exist and its gen is current.
    pub fn ptr_valid(&self, ptr: Ptr) -> bool {
        matches!(self.ptr_stale(ptr), Ok(0))
    }

    /// A pointer to the start of a bucket with the bucket's current gen.
    pub fn bucket_ptr(&self, dev: u8, bucket: u64) -> Result<Ptr> {
        let c = self.cache(dev)?;
        let i = check_bucket(c, dev, bucket)?;
        Ptr::new(dev, bucket * u64::from(self.bucket_size), c.buckets[i].gen)
    }

    /// Takes one bucket from a device's free lists: `Reserve::None` first, then `reserve`. The
    /// bucket comes back pinned once; unpin it when the key pointing into it is in the index.
    /// Fails with `NoSpace` when both lists are empty (poll the allocator and retry). A
    /// metadata bucket (`Btree`, `Prio`) counts as full; a data bucket starts with no sectors
    /// used, and the index accounts them as keys pointing into it come and go.
    #[inline]
    pub fn bucket_alloc(&mut self, dev: u8, reserve: Reserve) -> Result<u64> {
        let bucket_size = self.bucket_size;
        let c = self.cache_mut(dev)?;
        let r = match c.free[Reserve::None as usize].pop() {
            Some(r) => r,
            None => match c.free[reserve as usize].pop() {
                Some(r) => r,
                None => {
                    return Err(Error::new(ErrorKind::NoSpace, format!("cache {dev}: no free bucket for {reserve:?}")))
                }
            },
        };
        let b = &mut c.buckets[r as usize];
        debug_assert_eq!(b.pin, 1, "bucket {r} on a free list must carry exactly the allocator's pin");
        // Metadata fills its bucket; data sectors are accounted as their keys are indexed.
        let meta = matches!(reserve, Reserve::Btree | Reserve::Prio);
        b.set_mark(if meta { GcMark::Metadata } else { GcMark::Reclaimable });
        b.set_sectors_used(if meta { bucket_size } else { 0 });
        let prio = if meta {
            BTREE_PRIO
        } else if c.replacement.fifo_queues() {
            c.s3fifo_new_prio(false)
        } else {
            INITIAL_PRIO
        };
        let b = &mut c.buckets[r as usize];
        // Invalidation already set INITIAL_PRIO: only metadata changes the prio file here.
        if b.prio != prio {
            b.prio = prio;
            c.note(r as usize);
        }
        self.avail_nbuckets = self.avail_nbuckets.saturating_sub(1);
        Ok(u64::from(r))
    }

    /// Allocates one bucket on each of `n` different devices (those with the most free buckets
    /// first) and returns a pointer to each, for metadata replicated across the set. All or
    /// nothing: on failure the buckets already taken are given back.
    pub fn alloc_set(&mut self, reserve: Reserve, n: usize) -> Result<Vec<Ptr>> {
        if n == 0 || n > self.caches.len() {
            return Err(inval(format!("cannot allocate on {n} of {} cache devices", self.caches.len())));
        }
        let mut order: Vec<u8> = (0..self.caches.len() as u8).collect();
        let room = |c: &CacheAlloc| c.free[Reserve::None as usize].len() + c.free[reserve as usize].len();
        order.sort_by_key(|&d| std::cmp::Reverse(room(&self.caches[d as usize])));
        let mut ptrs = Vec::with_capacity(n);
        for &dev in &order[..n] {
            let got = self.bucket_alloc(dev, reserve).and_then(|b| {
                self.bucket_ptr(dev, b).or_else(|e| {
                    self.bucket_free(dev, b)?;
                    self.unpin(dev, b)?;
                    Err(e)
                })
            });
            match got {
                Ok(p) => ptrs.push(p),
                Err(e) => {
                    for p in &ptrs {
                        let b = self.ptr_bucket(*p)?;
                        self.bucket_free(p.dev(), b)?;
                        self.unpin(p.dev(), b)?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(ptrs)
    }

    /// Declares a bucket empty (a freed btree node, an old prio chain): unused, no sectors. It
    /// is not reused until the allocator invalidates it, so its gen still moves on first.
    pub fn bucket_free(&mut self, dev: u8, bucket: u64) -> Result<()> {
        let nb = self.nbuckets;
        let c = self.cache_mut(dev)?;
        let i = check_bucket(c, dev, bucket)?;
        let b = &mut c.buckets[i];
        b.set_mark(GcMark::Unused);
        b.set_sectors_used(0);
        if self.avail_nbuckets < nb {
            self.avail_nbuckets += 1;
        }
        Ok(())
    }

    /// Takes a reference on a bucket: it is not invalidated while pinned.
    pub fn pin(&mut self, dev: u8, bucket: u64) -> Result<()> {
        let c = self.cache_mut(dev)?;
        let i = check_bucket(c, dev, bucket)?;
        let b = &mut c.buckets[i];
        b.pin = b.pin.checked_add(1).ok_or_else(|| {
            Error::new(ErrorKind::InvalidArgument, format!("cache {dev} bucket {bucket}: pin count overflow"))
        })?;
        Ok(())
    }

    /// Drops a reference taken by [`Allocator::pin`], [`Allocator::bucket_alloc`] or
    /// [`Allocator::alloc_sectors`].
    pub fn unpin(&mut self, dev: u8, bucket: u64) -> Result<()> {
        let c = self.cache_mut(dev)?;
        let i = check_bucket(c, dev, bucket)?;
        let b = &mut c.buckets[i];
        b.pin = b.pin.checked_sub(1).ok_or_else(|| {
            Error::new(ErrorKind::InvalidArgument, format!("cache {dev} bucket {bucket} is not pinned"))
        })?;
        Ok(())
    }

    /// Unpins the bucket of each pointer (bcache's `bkey_put`), once a key is in the index.
    pub fn put_ptrs(&mut self, ptrs: &[Ptr]) -> Result<()> {
        for &p in ptrs {
            let b = self.ptr_bucket(p)?;
            self.unpin(p.dev(), b)?;
        }
        Ok(())
    }

    /// A read hit: the bucket is young again (data buckets only; metadata keeps BTREE_PRIO).
    pub fn touch(&mut self, ptr: Ptr) -> Result<()> {
        let bucket = self.ptr_bucket(ptr)?;
        let c = &mut self.caches[ptr.dev() as usize];
        if c.replacement.fifo_queues() {
            if c.buckets[bucket as usize].gen == ptr.gen() {
                c.s3fifo_touch(bucket as usize);
            }
            return Ok(());
        }
        let b = &mut c.buckets[bucket as usize];
        if b.prio != BTREE_PRIO && b.prio != INITIAL_PRIO && b.gen == ptr.gen() {
            b.prio = INITIAL_PRIO;
            c.note(bucket as usize);
        }
        Ok(())
    }

    /// True when the policy found the data at `ptr` hot: with S3-FIFO, a bucket of the main
    /// queue or read since it was written (false for a stale pointer and other policies).
    pub fn ptr_hot(&self, ptr: Ptr) -> bool {
        let Ok(bucket) = self.ptr_bucket(ptr) else { return false };
        let c = &self.caches[ptr.dev() as usize];
        let b = &c.buckets[bucket as usize];
        c.replacement.fifo_queues()
            && b.gen == ptr.gen()
            && b.prio != BTREE_PRIO
            && (s3fifo::in_main(b.prio) || s3fifo::freq(b.prio) > 0)
    }

    /// Writeback read the data back (not a user's read): LRU keeps the bucket young, as
    /// bcache does; S3-FIFO counts user reads only.
    pub fn touch_for_writeback(&mut self, ptr: Ptr) -> Result<()> {
        if self.cache(ptr.dev())?.replacement.fifo_queues() {
            return Ok(());
        }
        self.touch(ptr)
    }

    /// A write with dirty data went into this pointer's bucket: it must not be invalidated
    /// before writeback (and the next GC) says so. A stale pointer changes nothing.
    pub fn mark_dirty(&mut self, ptr: Ptr) -> Result<()> {
        let bucket = self.ptr_bucket(ptr)?;
        let b = &mut self.caches[ptr.dev() as usize].buckets[bucket as usize];
        if b.gen == ptr.gen() && b.mark() != GcMark::Metadata {
            b.set_mark(GcMark::Dirty);
        }
        Ok(())
    }

    /// Ages every data bucket by one prio step each time 1/1024 of the set's capacity has
    /// been written (bcache's `bch_rescale_priorities`). [`Allocator::alloc_sectors`] calls
    /// it; call it yourself only for writes that do not go through it.
    pub fn rescale_priorities(&mut self, sectors: u64) {
        self.rescale -= sectors.min(i64::MAX as u64) as i64;
        if self.rescale >= 0 {
            return;
        }
        // One step per call, as bcache: a huge write ages once now and again on the next call,
        // rather than spinning here.
        self.rescale += self.rescale_step;
        let mut min = u16::MAX;
        for c in &mut self.caches {
            // S3-FIFO's prios are queues and epochs, not ages.
            if c.replacement.fifo_queues() {
                continue;
            }
            let first = c.first_bucket as usize;
            let (buckets, image) = (&mut c.buckets, &mut c.image);
            // The image follows in the same pass, while each bucket is at hand.
            let mut entries = image.get_mut(first * 3..).map(|e| e.chunks_exact_mut(3));
            for b in &mut buckets[first..] {
                let e = entries.as_mut().and_then(|it| it.next());
                if b.prio != 0 && b.prio != BTREE_PRIO && b.pin == 0 {
                    b.prio -= 1;
                    min = min.min(b.prio);
                    if let Some(e) = e {
                        e[..2].copy_from_slice(&b.prio.to_le_bytes());
                    }
                }
            }
        }
        // With nothing aged there is no new minimum to weigh against; keep the old one.
        if min != u16::MAX {
            self.min_prio = min;
        }
    }

    /// Advances a device's allocator as far as it can go without the engine and says what the
    /// engine must do next. Call it after allocations, completions and GC.
    pub fn poll(&mut self, dev: u8) -> Result<Step> {
        self.cache(dev)?;
        let (gc_valid, gc_running) = (self.gc_mark_valid, self.gc_running);
        let min_prio = self.min_prio;
        let need_gc = &mut self.need_gc;
        let c = &mut self.caches[dev as usize];
        loop {
            if c.discarding.is_some() {
                return Ok(Step::Waiting);
            }
            match c.state {
                State::Draining => {
                    if c.free_inc.is_empty() {
                        c.state = State::Filling;
                        continue;
                    }
                    if !c.has_free_room() {
                        return Ok(Step::Idle);
                    }
                    let b = c.free_inc.pop().expect("free_inc is not empty");
                    if c.discard {
                        c.discarding = Some(b);
                        return Ok(Step::Discard(u64::from(b)));
                    }
                    c.push_free(b);
                }
                State::Filling => {
                    if gc_running {
                        return Ok(Step::Waiting);
                    }
                    if !gc_valid || c.invalidate_needs_gc {
                        return Ok(Step::NeedGc);
                    }
                    // A forced prio write is in flight: a gen bumped now might miss the chain,
                    // and its commit releases whatever `free_inc` holds.
                    if c.prio_inflight.is_some() {
                        return Ok(Step::Waiting);
                    }
                    // A batch is released only by a prio write: never invalidate one (bumping
                    // gens, pinning buckets) whose prio write has nowhere to go. Only GC can
                    // find buckets for the prio reserve then (see `gc_finish`).
                    if !c.prio_write_placeable() {
                        c.invalidate_needs_gc = true;
                        return Ok(Step::NeedGc);
                    }
                    c.invalidate_buckets(min_prio, need_gc);
                    if c.free_inc.is_full() {
                        c.state = State::BatchFull;
                    }
                }
                State::BatchFull => {
                    if c.prio_inflight.is_some() {
                        return Ok(Step::Waiting);
                    }
                    if c.prio_write_placeable() {
                        return Ok(Step::WritePrios);
                    }
                    // The free lists were emptied since the batch was started (by allocations
                    // from the prio reserve): ask GC for room rather than for a write that
                    // `prio_write_begin` would refuse.
                    if gc_running {
                        return Ok(Step::Waiting);
                    }
                    c.invalidate_needs_gc = true;
                    return Ok(Step::NeedGc);
                }
            }
        }
    }

    /// Polls every device; returns `(dev, step)` for each.
    pub fn poll_all(&mut self) -> Result<Vec<(u8, Step)>> {
        (0..self.caches.len() as u8).map(|d| Ok((d, self.poll(d)?))).collect()
    }

    /// The discard the engine was asked for by [`Step::Discard`] is done.
    pub fn discard_done(&mut self, dev: u8, bucket: u64) -> Result<()> {
        let c = self.cache_mut(dev)?;
        match c.discarding {
            Some(b) if u64::from(b) == bucket => {
                c.discarding = None;
                if !c.push_free(b) {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("cache {dev}: no free list room for discarded bucket {bucket}"),
                    ));
                }
                Ok(())
            }
            _ => Err(inval(format!("cache {dev}: no discard of bucket {bucket} in flight"))),
        }
    }

    /// Starts the prio write [`Step::WritePrios`] asked for: takes a bucket per chain link from
    /// the prio reserve and bumps the sequence number. Serialize each link with
    /// [`Allocator::encode_prio_bucket`], write them, let the journal record `buckets[0]`,
    /// then call [`Allocator::prio_write_committed`] (or [`Allocator::prio_write_failed`]).
    pub fn prio_write_begin(&mut self, dev: u8) -> Result<PrioWrite> {
        let c = self.cache(dev)?;
        if c.state != State::BatchFull || c.prio_inflight.is_some() {
            return Err(inval(format!("cache {dev}: no prio write pending")));
        }
        self.start_prio_write(dev)
    }

    /// Starts a prio write whatever the device's state, without waiting for a full batch (a
    /// set being opened ends with one, so that the gens its first GC pass bumped are durable
    /// before any bucket is reused). Go on as after [`Allocator::prio_write_begin`].
    ///
    /// A device that is filling a batch first invalidates what it can into `free_inc`, as
    /// [`Allocator::poll`] would next: the commit releases those buckets to the free lists,
    /// where the next prio write finds the buckets this one took (without them, only another
    /// GC pass could refill the prio reserve). Whatever `free_inc` holds is in the chain, so
    /// the commit lets the device drain it, as after a batch; nothing more is invalidated
    /// while the write is in flight.
    ///
    /// `InvalidArgument` while another prio write is in flight, `NoSpace` when the free lists
    /// hold fewer buckets than the chain has links (nothing is changed then).
    pub fn prio_write_force(&mut self, dev: u8) -> Result<PrioWrite> {
        let (gc_valid, gc_running, min_prio) = (self.gc_mark_valid, self.gc_running, self.min_prio);
        let need_gc = &mut self.need_gc;
        let n = self.caches.len();
        let c = self.caches.get_mut(dev as usize).ok_or_else(|| no_cache(dev, n))?;
        if c.prio_inflight.is_some() {
            return Err(inval(format!("cache {dev}: a prio write is already in flight")));
        }
        if !c.prio_write_placeable() {
            return Err(no_room_for_chain(c, dev));
        }
        if c.state == State::Filling && gc_valid && !gc_running && !c.invalidate_needs_gc && c.discarding.is_none() {
            c.invalidate_buckets(min_prio, need_gc);
            if c.free_inc.is_full() {
                c.state = State::BatchFull;
            }
        }
        self.start_prio_write(dev)
    }

    /// Sequence number of the newest prio write begun on a device (0 before the first); after
    /// [`Allocator::read_prios`], that of the chain read.
    pub fn prio_seq(&self, dev: u8) -> Result<u64> {
        Ok(self.cache(dev)?.prio_seq)
    }

    fn start_prio_write(&mut self, dev: u8) -> Result<PrioWrite> {
        let bucket_size = self.bucket_size;
        let c = self.cache_mut(dev)?;
        debug_assert!(c.prio_inflight.is_none());
        let n = c.prio_nr;
        if !c.prio_write_placeable() {
            return Err(no_room_for_chain(c, dev));
        }
        c.prio_seq += 1;
        c.meta_sectors_written += u64::from(bucket_size) * n as u64;
        let seq = c.prio_seq;
        let mut buckets = vec![0u64; n];
        for slot in buckets.iter_mut().rev() {
            *slot = self.bucket_alloc(dev, Reserve::Prio)?;
        }
        self.caches[dev as usize].prio_inflight = Some(PrioInFlight { buckets: buckets.clone(), seq });
        Ok(PrioWrite { buckets, seq })
    }

    /// Serializes link `link` of the prio write in flight into `buf`, which must be exactly one
    /// bucket long.
    pub fn encode_prio_bucket(&mut self, dev: u8, link: usize, buf: &mut [u8]) -> Result<()> {
        let bucket_bytes = self.bucket_size as usize * 512;
        let magic = self.pset_magic;
        let c = self.cache_mut(dev)?;
        let Some(w) = &c.prio_inflight else {
            return Err(inval(format!("cache {dev}: no prio write in flight")));
        };
        if buf.len() != bucket_bytes {
            return Err(inval(format!("prio bucket buffer is {} bytes, a bucket is {bucket_bytes}", buf.len())));
        }
        if link >= w.buckets.len() {
            return Err(inval(format!("prio chain of {} links has no link {link}", w.buckets.len())));
        }
        let (seq, next) = (w.seq, w.buckets.get(link + 1).copied().unwrap_or(0));
        let per = prio::prios_per_bucket(bucket_bytes);
        let start = link * per;
        let end = ((link + 1) * per).min(c.buckets.len());
        // The same bytes as prio::encode_prio_set, copied from the kept-up-to-date image.
        prio::write_header(buf, magic, seq, next);
        let entries = c.entries(start, end);
        let (used, rest) = buf[prio::PRIO_SET_HEADER_BYTES..].split_at_mut(entries.len());
        used.copy_from_slice(entries);
        rest.fill(0);
        prio::seal(buf);
        Ok(())
    }

    /// The new chain is on disk and the journal points at it: the gens of the invalidated batch
    /// are durable, so the batch may be handed out (the device drains `free_inc`, whatever
    /// state a forced write found it in), and the previous chain is freed.
    pub fn prio_write_committed(&mut self, dev: u8) -> Result<()> {
        let c = self.cache_mut(dev)?;
        let Some(w) = c.prio_inflight.take() else {
            return Err(inval(format!("cache {dev}: no prio write in flight")));
        };
        let old = std::mem::replace(&mut c.prio_buckets, w.buckets.clone());
        c.state = State::Draining;
        for &b in &w.buckets {
            self.unpin(dev, b)?;
        }
        for b in old {
            self.bucket_free(dev, b)?;
        }
        Ok(())
    }

    /// The prio write failed: [`Step::WritePrios`] is asked again once the device has a full
    /// batch (retry a forced write by forcing it again). Its buckets go straight back to the
    /// free lists (nothing points into them and their gens are durable); were they merely
    /// freed, the retry could find no bucket to write to.
    pub fn prio_write_failed(&mut self, dev: u8) -> Result<()> {
        let c = self.cache_mut(dev)?;
        let Some(w) = c.prio_inflight.take() else {
            return Err(inval(format!("cache {dev}: no prio write in flight")));
        };
        for &b in &w.buckets {
            let bucket = &mut c.buckets[b as usize];
            bucket.set_mark(GcMark::Unused);
            bucket.set_sectors_used(0);
            bucket.prio = INITIAL_PRIO;
            c.note(b as usize);
            if !c.push_free(b as u32) {
                // Cannot happen (the lists only shrank since), but never lose a bucket.
                bucket_release(&mut c.buckets[b as usize]);
            }
        }
        Ok(())
    }

    /// Loads a device's prios and gens from the chain starting at `head` (as the journal
    /// recorded it). `read(bucket, buf)` fills `buf` with one bucket of the device. Every link
    /// is checked (checksum, magic, one sequence number, in range, no loop) before anything is
    /// applied. Only before the first GC pass.
    pub fn read_prios<F>(&mut self, dev: u8, head: u64, mut read: F) -> Result<()>
    where
        F: FnMut(u64, &mut [u8]) -> Result<()>,
    {
        if self.started || self.gc_running {
            return Err(inval(format!("cache {dev}: prios are read only before the allocator starts")));
        }
        let bucket_bytes = self.bucket_size as usize * 512;
        let magic = self.pset_magic;
        let c = self.cache(dev)?;
        let (n, nb, first) = (c.prio_nr, c.nbuckets, c.first_bucket);
        let per = prio::prios_per_bucket(bucket_bytes);
        let mut buf = vec![0u8; bucket_bytes];
        let mut entries: Vec<(u16, u8)> = Vec::with_capacity(nb as usize);
        let mut chain = Vec::with_capacity(n);
        let mut seq = None;
        let mut bucket = head;
        for link in 0..n {
            if bucket < first || bucket >= nb {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("cache {dev}: prio chain link {link} points at bucket {bucket}, outside {first}..{nb}"),
                ));
            }
            if chain.contains(&bucket) {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("cache {dev}: prio chain loops back to bucket {bucket}"),
                ));
            }
            read(bucket, &mut buf)?;
            let h = prio::decode_prio_set_header(&buf, magic, bucket)?;
            if *seq.get_or_insert(h.seq) != h.seq {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "cache {dev}: prio bucket {bucket} has seq {}, the chain's head has {}",
                        h.seq,
                        seq.unwrap_or(0)
                    ),
                ));
            }
            let count = per.min(nb as usize - link * per);
            entries.extend((0..count).map(|i| prio::prio_entry(&buf, i)));
            chain.push(bucket);
            bucket = h.next_bucket;
        }
        let c = self.cache_mut(dev)?;
        for (b, &(prio, gen)) in c.buckets.iter_mut().zip(&entries) {
            b.prio = prio;
            b.gen = gen;
            b.last_gc = gen;
        }
        c.prio_buckets = chain;
        c.prio_seq = seq.unwrap_or(0);
        c.drop_image();
        if c.replacement.fifo_queues() {
            c.s3fifo_restore_clock();
        }
        Ok(())
    }

    /// Checks the allocator's bookkeeping, as bcache's expensive debug checks do: every bucket
    /// on a free list or `free_inc` is there once, carries exactly one pin, is not part of a
    /// prio chain, and no bucket's gen ran past the GC window. Slow: for tests and debugging.
    pub fn check_invariants(&self) -> Result<()> {
        let corrupt = |m: String| Err(Error::new(ErrorKind::Corrupt, m));
        for (dev, c) in self.caches.iter().enumerate() {
            let mut seen = vec![false; c.nbuckets as usize];
            let lists = c.free.iter().chain(std::iter::once(&c.free_inc));
            let held = lists.flat_map(|f| f.iter()).chain(c.discarding);
            for b in held {
                let i = b as usize;
                if i < c.first_bucket as usize || i >= seen.len() {
                    return corrupt(format!("cache {dev}: bucket {b} on a free list is out of range"));
                }
                if std::mem::replace(&mut seen[i], true) {
                    return corrupt(format!("cache {dev}: bucket {b} is on the free lists twice"));
                }
                if c.buckets[i].pin != 1 {
                    return corrupt(format!("cache {dev}: free bucket {b} has pin count {}", c.buckets[i].pin));
                }
            }
            let inflight = c.prio_inflight.iter().flat_map(|w| w.buckets.iter());
            for &b in c.prio_buckets.iter().chain(inflight) {
                if seen.get(b as usize).copied().unwrap_or(true) {
                    return corrupt(format!("cache {dev}: prio bucket {b} is also free or out of range"));
                }
            }
            for (i, b) in c.buckets.iter().enumerate() {
                if b.gc_gen() > BUCKET_GC_GEN_MAX {
                    return corrupt(format!(
                        "cache {dev}: bucket {i} gen {} is {} past its last GC",
                        b.gen,
                        b.gc_gen()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Drops the allocator's pin on a bucket it could not place: it is invalidated again later.
fn bucket_release(b: &mut bucket::Bucket) {
    b.pin = b.pin.saturating_sub(1);
}

fn check_bucket(c: &CacheAlloc, dev: u8, bucket: u64) -> Result<usize> {
    if bucket >= c.nbuckets {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!("cache {dev}: bucket {bucket} is past the last ({})", c.nbuckets - 1),
        ));
    }
    Ok(bucket as usize)
}

fn no_cache(dev: u8, n: usize) -> Error {
    Error::new(ErrorKind::OutOfRange, format!("no cache device {dev} in this set of {n}"))
}

fn no_room_for_chain(c: &CacheAlloc, dev: u8) -> Error {
    let ready = c.free[Reserve::None as usize].len() + c.free[Reserve::Prio as usize].len();
    Error::new(ErrorKind::NoSpace, format!("cache {dev}: {ready} free buckets for a prio chain of {}", c.prio_nr))
}

fn inval(m: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, m)
}
