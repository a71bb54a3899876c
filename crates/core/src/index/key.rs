//! Extent keys and cache pointers, in bcache's units (512-byte sectors).
//!
//! A key says: sectors `start..start + size` of `inode` (a cached device or a flash volume
//! slot) are held in the cache at the place each pointer names. The pointer carries the
//! generation its bucket had when the data was written; once the allocator bumps that
//! bucket's gen, the pointer is stale and the key is dead without anyone touching it.

use crate::crc64::crc64;
use crate::error::{Error, ErrorKind, Result};
use std::fmt;

/// Largest extent one key can describe, in sectors (bcache's 16-bit `KEY_SIZE`).
pub const KEY_SIZE_MAX: u64 = (1 << 16) - 1;
/// Largest inode a key can carry (bcache's 20-bit `KEY_INODE`).
pub const KEY_INODE_MAX: u32 = (1 << 20) - 1;
/// Largest end sector a key can carry (bcache's `MAX_KEY_OFFSET`).
pub const KEY_OFFSET_MAX: u64 = u64::MAX >> 1;
/// Largest cache offset a pointer can carry, in sectors (bcache's 43-bit `PTR_OFFSET`).
pub const PTR_OFFSET_MAX: u64 = (1 << 43) - 1;
/// Most pointers one key may hold: bcache caps a key at `KEY_MAX_U64S` (8) words, two of
/// which are the header.
pub const KEY_PTRS_MAX: usize = 6;
/// A data checksum keeps 63 bits: bcache clears the top bit of the crc64 it stores.
pub const KEY_CRC_MASK: u64 = u64::MAX >> 1;

pub(crate) const PTR_OFFSET_SHIFT: u32 = 8;
pub(crate) const PTR_DEV_SHIFT: u32 = 51;
pub(crate) const PTR_DEV_MASK: u64 = 0xfff;

/// A pointer into the cache: device index in the cache set, sector offset on it and the
/// generation of the bucket at that offset. Stored exactly as bcache stores a `ptr[]` word:
/// `PTR_GEN` in bits 0..8, `PTR_OFFSET` in bits 8..51, `PTR_DEV` in bits 51..63.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ptr(u64);

impl Ptr {
    /// A pointer to `offset` (sectors) on cache device `dev`, valid for bucket generation `gen`.
    pub fn new(dev: u8, offset: u64, gen: u8) -> Result<Ptr> {
        if offset > PTR_OFFSET_MAX {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("pointer offset {offset} exceeds the 43-bit PTR_OFFSET field (max {PTR_OFFSET_MAX})"),
            ));
        }
        Ok(Ptr(((dev as u64) << PTR_DEV_SHIFT) | (offset << PTR_OFFSET_SHIFT) | gen as u64))
    }

    /// The pointer whose bcache `ptr[]` word is `raw`, if its device fits ubcache's range.
    pub fn from_raw(raw: u64) -> Result<Ptr> {
        let dev = (raw >> PTR_DEV_SHIFT) & PTR_DEV_MASK;
        if raw >> 63 != 0 || dev > u8::MAX as u64 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("pointer word {raw:#018x} names cache device {dev}; at most 255 are supported"),
            ));
        }
        Ok(Ptr(raw))
    }

    /// A pointer from bits the index packed itself (device known to fit).
    #[inline(always)]
    pub(crate) fn from_bits(raw: u64) -> Ptr {
        debug_assert!(raw >> 59 == 0);
        Ptr(raw)
    }

    /// bcache's on-disk `ptr[]` word.
    #[inline]
    pub fn raw(self) -> u64 {
        self.0
    }

    /// Cache device index within the set (`PTR_DEV`).
    #[inline]
    pub fn dev(self) -> u8 {
        ((self.0 >> PTR_DEV_SHIFT) & PTR_DEV_MASK) as u8
    }

    /// Sector offset on the cache device (`PTR_OFFSET`).
    #[inline]
    pub fn offset(self) -> u64 {
        (self.0 >> PTR_OFFSET_SHIFT) & PTR_OFFSET_MAX
    }

    /// Generation of the bucket when the data was written (`PTR_GEN`).
    #[inline]
    pub fn gen(self) -> u8 {
        self.0 as u8
    }

    /// Bucket number the pointer lies in, for buckets of `1 << bucket_bits` sectors.
    #[inline]
    pub fn bucket(self, bucket_bits: u32) -> u64 {
        self.offset() >> bucket_bits
    }

    /// The same pointer moved `sectors` further into its extent. Callers only move within
    /// an extent that was valid, so the offset cannot leave the field.
    #[inline]
    pub(crate) fn advance(self, sectors: u64) -> Ptr {
        debug_assert!(self.offset() + sectors <= PTR_OFFSET_MAX);
        Ptr(self.0 + (sectors << PTR_OFFSET_SHIFT))
    }
}

impl fmt::Debug for Ptr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@gen{}", self.dev(), self.offset(), self.gen())
    }
}

/// A cached extent: `size` sectors of `inode` from `start`, held at each of `ptrs()` in the
/// cache, dirty if the backing device does not have it yet, optionally with the crc64 of
/// its data (63 bits, [`KEY_CRC_MASK`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// Cached device or flash volume slot (20 bits).
    pub inode: u32,
    /// First sector of the extent on the cached device.
    pub start: u64,
    /// Length in sectors, `1..=KEY_SIZE_MAX` for a key that holds data.
    pub size: u64,
    /// The data is newer in the cache than on the backing device.
    pub dirty: bool,
    /// Checksum of the extent's data as written, see [`Key::data_crc`].
    pub crc: Option<u64>,
    nptrs: u8,
    ptrs: [Ptr; KEY_PTRS_MAX],
}

impl Key {
    /// A clean key with one pointer and no checksum.
    pub fn new(inode: u32, start: u64, size: u64, ptr: Ptr) -> Key {
        let mut ptrs = [Ptr(0); KEY_PTRS_MAX];
        ptrs[0] = ptr;
        Key { inode, start, size, dirty: false, crc: None, nptrs: 1, ptrs }
    }

    /// A key with no pointers: inserting it drops whatever the range held (bcache writes
    /// such keys to the journal for invalidations).
    pub fn empty(inode: u32, start: u64, size: u64) -> Key {
        Key { inode, start, size, dirty: false, crc: None, nptrs: 0, ptrs: [Ptr(0); KEY_PTRS_MAX] }
    }

    /// Builder: sets the dirty flag.
    pub fn with_dirty(mut self, dirty: bool) -> Key {
        self.dirty = dirty;
        self
    }

    /// Builder: sets the data checksum.
    pub fn with_crc(mut self, crc: Option<u64>) -> Key {
        self.crc = crc;
        self
    }

    /// Builder: adds a pointer (a replica on another cache device).
    pub fn with_ptr(mut self, ptr: Ptr) -> Result<Key> {
        self.push_ptr(ptr)?;
        Ok(self)
    }

    /// Adds a pointer after the existing ones.
    pub fn push_ptr(&mut self, ptr: Ptr) -> Result<()> {
        if self.nptrs as usize == KEY_PTRS_MAX {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("key {} already holds the maximum of {KEY_PTRS_MAX} pointers", self),
            ));
        }
        self.ptrs[self.nptrs as usize] = ptr;
        self.nptrs += 1;
        Ok(())
    }

    /// Drops every pointer for which `keep` is false, keeping the order of the rest.
    pub fn retain_ptrs(&mut self, mut keep: impl FnMut(Ptr) -> bool) {
        let mut n = 0;
        for i in 0..self.nptrs as usize {
            if keep(self.ptrs[i]) {
                self.ptrs[n] = self.ptrs[i];
                n += 1;
            }
        }
        self.nptrs = n as u8;
    }

    /// The key's pointers, in order.
    #[inline]
    pub fn ptrs(&self) -> &[Ptr] {
        &self.ptrs[..self.nptrs as usize]
    }

    /// One past the last sector (bcache's `KEY_OFFSET`).
    #[inline]
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    /// The checksum ubcache keeps for `data`: crc64 with the top bit cleared.
    pub fn data_crc(data: &[u8]) -> u64 {
        crc64(data) & KEY_CRC_MASK
    }

    /// Checks every field against what a key may hold: sizes and offsets inside their bcache
    /// fields, a non-empty extent when pointers are present, and a checksum of 63 bits.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::new(ErrorKind::InvalidArgument, msg));
        if self.inode > KEY_INODE_MAX {
            return bad(format!("key inode {} exceeds the 20-bit KEY_INODE field", self.inode));
        }
        if self.size > KEY_SIZE_MAX {
            return bad(format!("key {} is {} sectors; a key holds at most {KEY_SIZE_MAX}", self, self.size));
        }
        if self.size == 0 && self.nptrs > 0 {
            return bad(format!("key {} has pointers but no sectors", self));
        }
        match self.start.checked_add(self.size) {
            Some(end) if end <= KEY_OFFSET_MAX => {}
            _ => return bad(format!("key {} ends past sector {KEY_OFFSET_MAX}", self)),
        }
        if let Some(crc) = self.crc {
            if crc > KEY_CRC_MASK {
                return bad(format!("key {} checksum {crc:#x} has its top bit set", self));
            }
        }
        for p in self.ptrs() {
            if p.offset() + self.size > PTR_OFFSET_MAX + 1 {
                return bad(format!("key {} pointer {:?} runs past the 43-bit PTR_OFFSET range", self, p));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}+{}", self.inode, self.start, self.size)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}..{}", self.inode, self.start, self.start.saturating_add(self.size))?;
        if self.dirty {
            f.write_str(" dirty")?;
        }
        write!(f, " {:?}", self.ptrs())?;
        if let Some(crc) = self.crc {
            write!(f, " crc {crc:#x}")?;
        }
        Ok(())
    }
}

/// One piece of a looked-up range, in sector order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// First sector of the piece on the cached device.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// What the cache holds there.
    pub kind: FragmentKind,
}

/// What the cache holds for a [`Fragment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentKind {
    /// Nothing: read it from the backing device.
    Hole,
    /// A read miss for this range is in flight (a placeholder stands there); read it from
    /// the backing device, and do not start another fill.
    Pending,
    /// Cached. The data of the fragment sits at `ptr.offset() + offset` on `ptr.dev()`.
    Hit {
        /// The extent's (first live) pointer, as stored in its key.
        ptr: Ptr,
        /// Sectors from the start of the extent to the start of the fragment.
        offset: u64,
        /// The extent is dirty.
        dirty: bool,
    },
}

impl Fragment {
    /// One past the last sector of the fragment.
    #[inline]
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}
