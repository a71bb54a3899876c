//! The napi-rs binding: converts between JavaScript and `ubcache-core` types and maps core
//! errors to JavaScript `Error`s carrying a `code`. No logic lives here.

use napi::bindgen_prelude::*;
use napi_derive::napi;

mod cache;
mod inline;
mod io;
mod ring;
mod sim;

// Reached from JavaScript only (napi registers it at load time).
pub use cache::load_cache_set;
pub use sim::simulate_cache;

/// Throws `err` as a JavaScript `Error` whose `code` is the core error's code, and returns
/// the marker error that tells napi-rs an exception is already pending.
fn throw<T>(env: &Env, err: ubcache_core::Error) -> Result<T> {
    env.throw_error(err.message(), Some(err.code()))?;
    Err(napi::Error::new(Status::PendingException, err.message().to_string()))
}

/// CRC-64/WE of `data`, as bcache's `bch_crc64` computes it.
#[napi]
pub fn crc64(data: &[u8]) -> BigInt {
    BigInt::from(ubcache_core::crc64::crc64(data))
}

/// Incremental CRC-64/WE: feed pieces in order with `update`, read the result with `digest`.
#[napi]
pub struct Crc64 {
    inner: ubcache_core::crc64::Crc64,
}

impl Default for Crc64 {
    fn default() -> Self {
        Self::new()
    }
}

#[napi]
impl Crc64 {
    #[napi(constructor)]
    pub fn new() -> Self {
        Crc64 { inner: ubcache_core::crc64::Crc64::new() }
    }

    /// Adds `data` after everything fed so far; returns `this` for chaining.
    #[napi]
    pub fn update(&mut self, data: &[u8]) -> &Self {
        self.inner.update(data);
        self
    }

    /// The checksum of everything fed so far.
    #[napi]
    pub fn digest(&self) -> BigInt {
        BigInt::from(self.inner.finish())
    }

    /// Forgets everything fed so far.
    #[napi]
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Size and geometry of a regular file or block device.
#[napi(object)]
pub struct DeviceInfo {
    /// Capacity in bytes.
    pub size_bytes: i64,
    /// Smallest addressable unit in bytes (512 for regular files).
    pub logical_block_size: u32,
    /// True for a block device, false for a regular file.
    pub is_block_device: bool,
}

/// Describes the file or block device at `path` (BLKGETSIZE64 / BLKSSZGET for devices).
#[napi]
pub fn device_info(env: &Env, path: String) -> Result<DeviceInfo> {
    let info = match ubcache_core::io::device_info(std::path::Path::new(&path)) {
        Ok(info) => info,
        Err(err) => return throw(env, err),
    };
    Ok(DeviceInfo {
        size_bytes: info.size_bytes as i64,
        logical_block_size: info.logical_block_size,
        is_block_device: info.is_block_device,
    })
}

/// Name of the crc64 kernel selected on this CPU.
#[napi]
pub fn crc64_implementation() -> String {
    ubcache_core::crc64::implementation()
}

/// The cache device superblock fields the Rust core reads (`cache_set::superblock`), for
/// the test that holds its parser against ts/superblock.ts.
#[napi(object)]
pub struct NativeCacheSb {
    pub set_uuid: Buffer,
    pub flags: BigInt,
    pub seq: BigInt,
    pub nbuckets: f64,
    pub block_size: u32,
    pub bucket_size: u32,
    pub nr_in_set: u32,
    pub nr_this_dev: u32,
    pub first_bucket: f64,
    pub journal_buckets: Vec<f64>,
}

impl From<ubcache_core::cache_set::CacheSb> for NativeCacheSb {
    fn from(sb: ubcache_core::cache_set::CacheSb) -> Self {
        NativeCacheSb {
            set_uuid: sb.set_uuid.to_vec().into(),
            flags: BigInt::from(sb.flags),
            seq: BigInt::from(sb.seq),
            nbuckets: sb.nbuckets as f64,
            block_size: sb.block_size,
            bucket_size: sb.bucket_size,
            nr_in_set: u32::from(sb.nr_in_set),
            nr_this_dev: u32::from(sb.nr_this_dev),
            first_bucket: sb.first_bucket as f64,
            journal_buckets: sb.journal_buckets.iter().map(|&b| b as f64).collect(),
        }
    }
}

/// The core's parse of a cache superblock page (4096 bytes from byte 4096 of the device).
/// @internal
#[napi]
pub fn parse_cache_superblock(env: Env, page: &[u8]) -> Result<NativeCacheSb> {
    ubcache_core::cache_set::superblock::parse(page).map(Into::into).or_else(|e| throw(&env, e))
}

/// The core's `mark_sync` of a cache superblock page: the patched page.
/// @internal
#[napi]
pub fn mark_cache_superblock_sync(env: Env, page: &[u8]) -> Result<Buffer> {
    let mut p = page.to_vec();
    match ubcache_core::cache_set::superblock::mark_sync(&mut p) {
        Ok(_) => Ok(p.into()),
        Err(e) => throw(&env, e),
    }
}

/// The core's `format_with_journal` (the superblock page its tests and benchmarks format).
/// @internal
#[napi]
pub fn format_cache_superblock(
    uuid: &[u8],
    set_uuid: &[u8],
    nbuckets: f64,
    bucket_size: u16,
    block_size: u16,
    journal_buckets: u32,
) -> Buffer {
    let id = |b: &[u8]| std::array::from_fn(|i| b.get(i).copied().unwrap_or(0));
    let page = ubcache_core::cache_set::superblock::format_with_journal(
        id(uuid),
        id(set_uuid),
        nbuckets as u64,
        bucket_size,
        block_size,
        journal_buckets as usize,
    );
    page.into()
}
