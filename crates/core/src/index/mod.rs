//! The extent index: which sectors of which cached device (or flash volume) sit where in
//! the cache.
//!
//! - [`key`]: keys (inode, start, size, dirty, pointers with gens, optional data crc) and
//!   lookup fragments;
//! - [`bkey`]: bcache's on-disk `bkey` encoding of keys, and the order to replay a run of them in;
//! - [`buckets`]: what the index needs from the allocator (gens, sector accounting);
//! - `btree`: the B+tree of one inode's extents, with overlap fix-up;
//! - `word`/`side`: how a leaf packs a key into 18 bytes, and where the rare keys with
//!   several pointers or a checksum keep the rest;
//! - [`extents`]: [`ExtentIndex`], the operations the cache engine calls.
//!
//! The index is owned by the engine thread of a cache set and takes no locks. The allocator
//! is consulted through [`BucketGens`] and told about sectors through
//! [`BucketAccounting`]; neither is stored, both are passed to each call.
//!
//! Why a B+tree of our own: the crates that keep non-overlapping ranges (`rangemap`,
//! `nodit`) sit on `BTreeMap`, which costs ~39 bytes an extent at 10M extents against our 28
//! (bench/index) and is 2-3 times slower to search there; `btree-range-map` merges equal
//! neighbours and stores generic ranges inline. None cuts an extent's value along with its
//! range (a cut key's pointer advances), packs a key into 18 bytes, or lets a search
//! prefetch whole nodes. The tree here does all three.
//!
//! The key space is not striped into 4 MiB subtrees as dm-pcache does: striping buys lock
//! independence, which a single engine thread does not need, and measured (bench/index,
//! INDEX_BENCH_STRIPES=1, 1M extents) it cost 1281 bytes an extent instead of 28 and made
//! 4 KiB lookups 3 times slower.

mod arena;
pub mod bkey;
mod btree;
pub mod buckets;
pub mod extents;
mod ghost;
pub mod key;
mod side;
mod word;

pub use bkey::{bkey_u64s, replay_order, replay_records, ReplayRec, BKEY_U64S_MAX};
pub use buckets::{BucketAccounting, BucketGens, MemBucket, MemBuckets};
pub use extents::{ExtentIndex, FillOutcome, IndexStats, LookupReq, Placeholder, ScanFilter, ScanPos};
pub use key::{
    Fragment, FragmentKind, Key, Ptr, KEY_CRC_MASK, KEY_INODE_MAX, KEY_OFFSET_MAX, KEY_PTRS_MAX, KEY_SIZE_MAX,
    PTR_OFFSET_MAX,
};
