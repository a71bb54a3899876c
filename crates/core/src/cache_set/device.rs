//! Cached devices: backing devices the set caches, each known by its slot in the UUID
//! table (the inode of its keys), with the cache mode its requests follow.

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::io::{DevId, Device};

/// How a cached device's writes (and read misses) use the cache, in bcache's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CacheMode {
    /// Writes go to the backing device and the cache; complete when both have them.
    #[default]
    Writethrough,
    /// Writes go to the cache only and are dirty until written back; fastest, and the
    /// cache then holds the only copy.
    Writeback,
    /// Writes go to the backing device only (the cache copy is dropped); read misses still fill.
    Writearound,
    /// The cache is not used: writes and read misses go to the backing device; what the
    /// cache already holds for the device (dirty data above all) is still read from it.
    None,
}

impl CacheMode {
    /// bcache's name and number (`cache_mode` in a backing superblock).
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writeback => "writeback",
            CacheMode::Writearound => "writearound",
            CacheMode::None => "none",
        }
    }

    /// bcache's number for the mode (`BDEV_CACHE_MODE`).
    pub fn number(self) -> u8 {
        match self {
            CacheMode::Writethrough => 0,
            CacheMode::Writeback => 1,
            CacheMode::Writearound => 2,
            CacheMode::None => 3,
        }
    }

    /// The mode bcache numbers `n` (anything past `none` reads as writethrough, as bcache's
    /// four values fill the field).
    pub fn from_number(n: u8) -> CacheMode {
        match n {
            1 => CacheMode::Writeback,
            2 => CacheMode::Writearound,
            3 => CacheMode::None,
            _ => CacheMode::Writethrough,
        }
    }

    /// The mode named `s` (bcache's names).
    pub fn from_name(s: &str) -> Result<CacheMode> {
        Ok(match s {
            "writethrough" => CacheMode::Writethrough,
            "writeback" => CacheMode::Writeback,
            "writearound" => CacheMode::Writearound,
            "none" => CacheMode::None,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("cache mode {s:?}: expected writethrough, writeback, writearound or none"),
                ))
            }
        })
    }
}

/// A backing device as the set is given it.
#[derive(Clone, Debug)]
pub struct CachedDevConfig {
    /// The backing device's UUID (its superblock's `uuid`): what the UUID table remembers it by.
    pub uuid: [u8; 16],
    /// Its label (up to 32 bytes, NUL padded).
    pub label: [u8; 32],
    /// The open device.
    pub device: Arc<Device>,
    /// Where its data starts, in bytes (the superblock's `data_offset` × 512).
    pub data_offset: u64,
    /// Its cache mode.
    pub mode: CacheMode,
    /// Its writeback tunables (bcache's defaults: `Default::default()`).
    pub writeback: super::writeback::WritebackConfig,
    /// Its bypass tunables (bcache's defaults: `Default::default()`).
    pub bypass: super::bypass::BypassConfig,
    /// Cached as it is, with no bcache superblock (`data_offset` 0): its size, cache mode and
    /// state live in its UUID-table entry alone (see `cache_set::existing`).
    pub no_superblock: bool,
}

/// A cached device attached to the running set.
pub(crate) struct CachedDev {
    /// Its UUID-table slot: the inode of its keys.
    pub inode: u32,
    /// The backing device in the I/O engine.
    pub backing: DevId,
    /// Byte offset of sector 0 of the cached device on the backing device.
    pub data_offset: u64,
    /// Size in sectors.
    pub sectors: u64,
    /// Sectors per block: requests are whole blocks.
    pub block_sectors: u64,
    pub mode: CacheMode,
    /// A write reached the backing device since the last flush of it was sent.
    pub backing_unflushed: bool,
    /// Flushes of the backing device: the next one's number, those in flight, and the
    /// requests waiting for one.
    pub flush_next: u32,
    pub flushes_in_flight: Vec<u32>,
    pub flush_waiters: Vec<(u32, FlushWaiter)>,
    /// Its writeback.
    pub wb: super::writeback::Writeback,
    /// Its sequential detector and cutoffs.
    pub bypass: super::bypass::Bypass,
    /// Its detach, once begun.
    pub detach: Option<super::detach::Detach>,
    /// Its request accounting (bcache's per-device stats).
    pub accounting: super::accounting::Collector,
    /// A flash-only volume (`volume.rs`): no backing device; its data lives in the cache
    /// only, dirty, and is never written back.
    pub flash: bool,
}

/// Who waits for a flush of a backing device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlushWaiter {
    /// A user request (a flush): one of its outstanding parts.
    Req(u32),
    /// The clean close.
    Close,
    /// Writeback: the extents of this batch become clean.
    Writeback(u32),
}

impl CachedDev {
    /// A device just attached: bcache's default writeback and bypass tunables, nothing in
    /// flight, no detach, empty accounting.
    pub fn new(
        inode: u32,
        backing: DevId,
        data_offset: u64,
        sectors: u64,
        block_sectors: u64,
        mode: CacheMode,
    ) -> CachedDev {
        CachedDev {
            inode,
            backing,
            data_offset,
            sectors,
            block_sectors,
            mode,
            backing_unflushed: false,
            flush_next: 0,
            flushes_in_flight: Vec::new(),
            flush_waiters: Vec::new(),
            wb: super::writeback::Writeback::new(Default::default()),
            bypass: super::bypass::Bypass::new(Default::default()),
            detach: None,
            accounting: super::accounting::Collector::new(std::time::Instant::now()),
            flash: false,
        }
    }

    /// Checks a request's range: whole blocks, inside the device, not empty.
    pub fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        let block = self.block_sectors * 512;
        if len == 0 {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("{what} of 0 bytes at {offset}")));
        }
        if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(Error::new(
                ErrorKind::Misaligned,
                format!("{what} of {len} bytes at {offset}: not whole blocks of {block} bytes"),
            ));
        }
        let size = self.sectors * 512;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{what} of {len} bytes at {offset} passes the end of the device ({size} bytes)"),
            ));
        }
        Ok(())
    }
}
