//! Binding of the cache engine ([`CacheEngine`]): a cache set and the devices it serves,
//! driven by the JavaScript thread exactly as `NativeRing` drives the I/O engine, through
//! the same glue (inline.rs: the submission and completion buffers, slabs, the libuv poll
//! handle), plus the libuv timer that runs the set's background work (journal delay, GC and
//! checkpoint slices) when [`CacheEngine::next_deadline`] says.
//!
//! Opening a set reads its journal, checkpoint and index back, which for a large set takes
//! a while: [`load_cache_set`] does it on a libuv worker thread, over a short-lived I/O
//! engine of its own, and resolves to a `NativeLoadedSet` that the `NativeCacheEngine`
//! constructor takes over.
//!
//! Control operations that need I/O (attach: the UUID table must be recorded; close: the
//! final checkpoint) return at once and finish later: their `tag` comes back through the
//! engine's second callback, `onEvent(tag, handle)` (the attached device's handle; 0 for a
//! close), or `onEvent(tag, -1, [code, message])` when they failed. Events are always
//! delivered from a libuv callback, after the completions that came with them.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ubcache_core::alloc::Replacement;
use ubcache_core::cache_set::{self, CacheEngine, CacheMode, CacheSet, CacheSetOptions, CachedDevConfig, SetState};
use ubcache_core::io::{
    open_engine, Device, EngineChoice, EngineOptions, EngineStorage, IoCompletion, IoEngine, IoRequest, OpenOptions,
    RingDriver,
};
use ubcache_core::{Error as CoreError, ErrorKind, Result as CoreResult};

use crate::inline::{inline_methods, Callbacks, Driven, Glue};
use crate::io::{
    engine_choice, invalid, open_device, open_options, throw, to_u64, NativeDevice, NativeEngineOptions,
    NativeEngineStats, NativeOpenOptions,
};
use crate::ring::driver_of;
use ubcache_core::io::fault::FaultControl;

/// The cache engine as the glue drives it; `None` once shut down (its devices released).
pub(crate) struct Served(Option<CacheEngine>);

fn closed() -> CoreError {
    CoreError::new(ErrorKind::Closed, "the cache engine is closed")
}

impl Driven for Served {
    const TIMED: bool = true;
    fn submit_into(&mut self, reqs: Vec<IoRequest>, out: &mut Vec<IoCompletion>) -> CoreResult<usize> {
        match &mut self.0 {
            Some(e) => e.submit(reqs, out),
            None => {
                let n = reqs.len();
                out.extend(reqs.into_iter().map(|r| IoCompletion::of(r, Err(closed()))));
                Ok(n)
            }
        }
    }
    fn reap_into(&mut self, out: &mut Vec<IoCompletion>) -> CoreResult<usize> {
        self.0.as_mut().map_or(Ok(0), |e| e.reap(out))
    }
    fn in_flight(&self) -> usize {
        self.0.as_ref().map_or(0, CacheEngine::in_flight)
    }
    fn fd(&self) -> RawFd {
        self.0.as_ref().map_or(-1, CacheEngine::fd)
    }
    fn close(&mut self) {
        self.0 = None;
    }
    fn ring(&self) -> Option<&RingDriver> {
        self.0.as_ref().map(CacheEngine::driver)
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.0.as_ref().and_then(CacheEngine::next_deadline)
    }
    fn tick(&mut self, out: &mut Vec<IoCompletion>) -> CoreResult<usize> {
        self.0.as_mut().map_or(Ok(0), |e| e.tick(out))
    }
    fn take_events(&mut self, out: &mut Vec<(u64, CoreResult<u32>)>) {
        if let Some(e) = &mut self.0 {
            e.take_events(out);
        }
    }
    fn has_undelivered(&self) -> bool {
        self.0.as_ref().is_some_and(CacheEngine::has_undelivered)
    }
}

/// How to open a cache set.
#[napi(object)]
pub struct NativeLoadOptions {
    /// Engine that reads the set back: `auto` (default), `io_uring` or `psync`.
    pub engine: Option<String>,
    /// O_DIRECT policy of the cache device: `auto` (default), `require` or `off`.
    pub direct: Option<String>,
    /// Exclusive open of the cache device (default true).
    pub exclusive: Option<bool>,
    /// How long inserted keys may wait for a journal write when nobody flushes (default 100).
    pub journal_delay_ms: Option<u32>,
    /// Journal entries go with FUA rather than between two flushes (default true).
    pub journal_fua: Option<bool>,
    /// bcache's `io_error_limit` (default 8).
    pub io_error_limit: Option<u32>,
    /// bcache's `io_error_halflife`, in cache-device I/Os (default 0: no decay).
    pub io_error_halflife: Option<u32>,
    /// bcache's `congested_read_threshold_us` (default 0: reads not timed; bcache's 2000).
    pub congested_read_threshold_us: Option<u32>,
    /// bcache's `congested_write_threshold_us` (default 0: writes not timed; bcache's 20000).
    pub congested_write_threshold_us: Option<u32>,
    /// bcache's `gc_after_writeback` (default false).
    pub gc_after_writeback: Option<bool>,
    /// bcache's `copy_gc_enabled` (default true).
    pub copy_gc_enabled: Option<bool>,
    /// Data checksums in keys, checked on hits (default false).
    pub data_csum: Option<bool>,
    /// Hits in old buckets move their extent to a fresh one (default false).
    pub promote_hits: Option<bool>,
}

/// The cache device's replacement policy (`lru`, `fifo`, `random`) and discard flag; when
/// setting, the fields left out keep their value.
#[napi(object)]
pub struct NativeCachePolicy {
    pub replacement: Option<String>,
    pub discard: Option<bool>,
}

/// A range of a device, in bytes.
#[napi(object)]
pub struct NativeExtent {
    pub offset: f64,
    pub length: f64,
}

/// A flash-only volume of the set.
#[napi(object)]
pub struct NativeVolume {
    /// Its slot in the UUID table.
    pub inode: u32,
    pub uuid: Uint8Array,
    pub label: String,
    /// Its size in bytes.
    pub size: f64,
}

/// A backing device the set caches without a superblock, as its UUID table records it.
#[napi(object)]
pub struct NativeExistingDevice {
    /// Its slot in the UUID table.
    pub inode: u32,
    pub uuid: Uint8Array,
    pub label: String,
    /// Its size in bytes.
    pub size: f64,
    /// `writethrough`, `writeback`, `writearound` or `none`.
    pub mode: String,
    /// bcache's backing state number: 0 none, 1 clean, 2 dirty, 3 stale.
    pub state: u32,
}

fn replacement_name(r: Replacement) -> &'static str {
    match r {
        Replacement::Lru => "lru",
        Replacement::Fifo => "fifo",
        Replacement::Random => "random",
        Replacement::S3Fifo => "s3fifo",
        Replacement::TinyLfu => "tinylfu",
    }
}

fn uuid16(env: &Env, uuid: &[u8]) -> Result<[u8; 16]> {
    match <[u8; 16]>::try_from(uuid) {
        Ok(u) => Ok(u),
        Err(_) => invalid(env, format!("uuid must be 16 bytes, got {}", uuid.len())),
    }
}

fn label32(env: &Env, label: Option<&str>) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    let text = label.unwrap_or("").as_bytes();
    if text.len() > out.len() {
        return invalid(env, format!("label of {} bytes: at most 32", text.len()));
    }
    out[..text.len()].copy_from_slice(text);
    Ok(out)
}

/// A cache set read back from its cache device, waiting for an engine to run it.
pub struct Loaded {
    set: CacheSet,
    cache: Arc<Device>,
}

/// A cache set read back by `loadCacheSet`, with its cache device open: hand it to a
/// `NativeCacheEngine`, which takes it over (once).
#[napi]
pub struct NativeLoadedSet {
    path: String,
    loaded: RefCell<Option<Loaded>>,
}

#[napi]
impl NativeLoadedSet {
    /// The cache device's path.
    #[napi(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// False once an engine took the set over (or it was released).
    #[napi(getter)]
    pub fn available(&self) -> bool {
        self.loaded.borrow().is_some()
    }

    /// Lets go of a set no engine took over: closes its cache device now rather than when
    /// this object is collected.
    #[napi]
    pub fn release(&self) {
        self.loaded.borrow_mut().take();
    }
}

/// Reads a cache set back on a libuv worker thread.
pub struct LoadTask {
    path: String,
    open: OpenOptions,
    choice: EngineChoice,
    opts: CacheSetOptions,
}

impl LoadTask {
    /// Opens the cache device and reads the set back through a short-lived engine.
    fn load(&self) -> CoreResult<Loaded> {
        let cache = Arc::new(Device::open(&self.path, &self.open)?);
        let opts = EngineOptions { choice: self.choice, queue_depth: 8, psync_threads: 1, ..Default::default() };
        let mut engine = open_engine(&opts)?;
        let id = engine.add_device(cache.clone())?;
        let mut st = EngineStorage::new(engine, id);
        let set = cache_set::load(&mut st, self.opts.clone());
        let _ = st.engine().remove_device(id);
        Ok(Loaded { set: set?, cache })
    }
}

impl Task for LoadTask {
    type Output = CoreResult<Loaded>;
    type JsValue = NativeLoadedSet;

    fn compute(&mut self) -> Result<Self::Output> {
        Ok(self.load())
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> Result<NativeLoadedSet> {
        match output {
            Ok(l) => Ok(NativeLoadedSet { path: self.path.clone(), loaded: RefCell::new(Some(l)) }),
            Err(e) => Err(js_error(&env, &e)),
        }
    }
}

/// A rejection carrying a JavaScript `Error` whose `code` is the core error's code.
pub(crate) fn js_error(env: &Env, e: &CoreError) -> napi::Error {
    let raw = env.raw();
    let (mut code, mut msg, mut err) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: napi calls on the JavaScript thread (a task's resolve) with values of this env.
    let made = unsafe {
        sys::napi_create_string_utf8(raw, e.code().as_ptr().cast(), e.code().len() as isize, &mut code)
            == sys::Status::napi_ok
            && sys::napi_create_string_utf8(raw, e.message().as_ptr().cast(), e.message().len() as isize, &mut msg)
                == sys::Status::napi_ok
            && sys::napi_create_error(raw, code, msg, &mut err) == sys::Status::napi_ok
    };
    if !made {
        return napi::Error::new(Status::GenericFailure, format!("{}: {}", e.code(), e.message()));
    }
    // SAFETY: `err` is a live value of this env.
    match unsafe { Unknown::from_napi_value(raw, err) } {
        Ok(v) => napi::Error::from(v),
        Err(x) => x,
    }
}

/// Reads the cache set on the cache device at `path` back, on a libuv worker thread, and
/// resolves to it (rejects with an `Error` carrying the core's `code`: `ENOENT`, `EBUSY`
/// when the device is open elsewhere, `MAGIC_MISMATCH` when it holds no bcache superblock,
/// `CORRUPT`, `EIO`, ...). Opening a large set does not hold up the event loop.
#[napi(ts_return_type = "Promise<NativeLoadedSet>")]
pub fn load_cache_set(env: &Env, path: String, options: Option<NativeLoadOptions>) -> Result<AsyncTask<LoadTask>> {
    let o = options.unwrap_or(NativeLoadOptions {
        engine: None,
        direct: None,
        exclusive: None,
        journal_delay_ms: None,
        journal_fua: None,
        io_error_limit: None,
        io_error_halflife: None,
        congested_read_threshold_us: None,
        congested_write_threshold_us: None,
        gc_after_writeback: None,
        copy_gc_enabled: None,
        data_csum: None,
        promote_hits: None,
    });
    let choice = engine_choice(env, o.engine.as_deref())?;
    let open = open_options(
        env,
        Some(NativeOpenOptions {
            write: None,
            direct: o.direct,
            exclusive: o.exclusive,
            create_size: None,
            remote_timeout_ms: None,
            remote_connections: None,
        }),
    )?;
    let d = CacheSetOptions::default();
    let opts = CacheSetOptions {
        journal_delay_ms: o.journal_delay_ms.map_or(d.journal_delay_ms, u64::from),
        journal_fua: o.journal_fua.unwrap_or(d.journal_fua),
        io_error_limit: o.io_error_limit.unwrap_or(d.io_error_limit),
        io_error_halflife: o.io_error_halflife.unwrap_or(d.io_error_halflife),
        congestion: cache_set::CongestionConfig {
            read_threshold_us: o.congested_read_threshold_us.unwrap_or(d.congestion.read_threshold_us),
            write_threshold_us: o.congested_write_threshold_us.unwrap_or(d.congestion.write_threshold_us),
        },
        gc_after_writeback: o.gc_after_writeback.unwrap_or(d.gc_after_writeback),
        copy_gc_enabled: o.copy_gc_enabled.unwrap_or(d.copy_gc_enabled),
        data_csum: o.data_csum.unwrap_or(d.data_csum),
        promote_hits: o.promote_hits.unwrap_or(d.promote_hits),
        ..d
    };
    Ok(AsyncTask::new(LoadTask { path, open, choice, opts }))
}

/// A backing device to attach to the cache set.
#[napi(object)]
pub struct NativeAttachConfig {
    /// The backing device (a file or block device).
    pub path: String,
    /// Its UUID, 16 bytes (its superblock's `uuid`): what the set's UUID table knows it by.
    pub uuid: Uint8Array,
    /// Its label, at most 32 bytes of UTF-8.
    pub label: Option<String>,
    /// Byte offset of its data (the superblock's `data_offset` × 512).
    pub data_offset: f64,
    /// `writethrough` (default), `writeback`, `writearound` or `none`.
    pub mode: Option<String>,
    /// Open read-only.
    pub read_only: Option<bool>,
    /// O_DIRECT policy: `auto` (default), `require` or `off`.
    pub direct: Option<String>,
    /// Exclusive open (default true).
    pub exclusive: Option<bool>,
    /// A remote (NBD) backing device: milliseconds a request waits for its reply.
    pub remote_timeout_ms: Option<u32>,
    /// A remote (NBD) backing device: connections when its server allows multi-conn.
    pub remote_connections: Option<u32>,
    /// Writeback tunables to start with (the rest: bcache's defaults).
    pub writeback: Option<NativeWritebackConfig>,
    /// Bypass tunables to start with (the rest: bcache's defaults).
    pub bypass: Option<NativeBypassConfig>,
    /// Cached as it is, with no bcache superblock (`dataOffset` 0): its UUID-table entry
    /// records its size, cache mode and state.
    pub no_superblock: Option<bool>,
}

/// Counters of a cache set, and where it stands.
#[napi(object)]
pub struct NativeCacheSetStats {
    pub data_bytes: f64,
    pub journal_bytes: f64,
    pub checkpoint_bytes: f64,
    pub prio_bytes: f64,
    pub other_meta_bytes: f64,
    pub meta_bytes: f64,
    pub journal_entries: f64,
    pub journal_preflushes: f64,
    pub checkpoints: f64,
    pub prio_distance_checkpoints: f64,
    pub prio_writes: f64,
    pub gc_runs: f64,
    /// bcache's `btree_gc_average_duration_ms`, `btree_gc_max_duration_ms`,
    /// `btree_gc_average_frequency_sec` (as ms), and ms since the last pass ended (-1: none yet).
    pub gc_average_duration_ms: f64,
    pub gc_max_duration_ms: f64,
    pub gc_average_interval_ms: f64,
    pub gc_last_ms_ago: f64,
    /// Moving GC: passes finished, buckets chosen, sectors moved, moves given up, and the
    /// last pass's sectors and length.
    pub moving_gc_passes: f64,
    pub moving_gc_buckets: f64,
    pub moving_gc_sectors: f64,
    pub moving_gc_dropped: f64,
    pub moving_gc_last_sectors: f64,
    pub moving_gc_last_ms: f64,
    pub moving_gc_promotions: f64,
    pub hit_sectors: f64,
    pub miss_sectors: f64,
    pub cache_hits: f64,
    pub cache_misses: f64,
    pub cache_bypass_hits: f64,
    pub cache_bypass_misses: f64,
    pub bypassed_sectors: f64,
    pub sequential_bypasses: f64,
    pub congested_bypasses: f64,
    pub cache_add_cutoffs: f64,
    pub cache_miss_collisions: f64,
    pub fill_sectors: f64,
    pub returning_misses: f64,
    pub admission_bypasses: f64,
    pub writeback_cutoffs: f64,
    pub dirty_overlaps: f64,
    pub space_waits: f64,
    pub ordered_waits: f64,
    pub cache_io_errors: f64,
    pub reread_from_backing: f64,
    pub csum_errors: f64,
    pub readahead_sectors: f64,
    pub cache_read_races: f64,
    pub writeback_sectors: f64,
    pub writeback_errors: f64,
    /// The cache device's I/O errors as `io_error_limit` counts them (decayed).
    pub io_errors: f64,
    /// The longest single call of background work, in microseconds.
    pub longest_tick_us: f64,
    /// Percentage of buckets holding dirty data or metadata, as of the last GC.
    pub in_use_percent: f64,
    /// bcache's `cache_available_percent`: 100 − `in_use_percent`.
    pub cache_available_percent: f64,
    /// Buckets free for allocation.
    pub available_buckets: f64,
    /// Requests (and read-miss fills) in flight.
    pub in_flight: f64,
}

/// Writeback tunables of a cached device (bcache's names; see the core's
/// `WritebackConfig`). Every field is optional when setting: those left out keep their value.
#[napi(object)]
pub struct NativeWritebackConfig {
    pub running: Option<bool>,
    pub percent: Option<f64>,
    pub delay_seconds: Option<f64>,
    pub rate_update_seconds: Option<f64>,
    pub rate_p_term_inverse: Option<f64>,
    pub rate_i_term_inverse: Option<f64>,
    pub rate_minimum: Option<f64>,
    /// bcache's `stripe_size`, bytes (0: none).
    pub stripe_size: Option<f64>,
    pub partial_stripes_expensive: Option<bool>,
    pub consider_fragment: Option<bool>,
    pub rate_fp_term_low: Option<f64>,
    pub rate_fp_term_mid: Option<f64>,
    pub rate_fp_term_high: Option<f64>,
}

/// Bypass tunables of a cached device, in bytes (see the core's `BypassConfig`). Every
/// field is optional when setting: those left out keep their value; a negative
/// `sequentialCutoffRead`/`sequentialCutoffWrite` goes back to the shared cutoff (getting,
/// such a field is absent).
#[napi(object)]
pub struct NativeBypassConfig {
    pub sequential_cutoff: Option<f64>,
    pub sequential_cutoff_read: Option<f64>,
    pub sequential_cutoff_write: Option<f64>,
    pub sequential_merge: Option<bool>,
    /// bcache's `readahead`, bytes.
    pub readahead: Option<f64>,
}

/// Counts of one accounting window (bcache's stats names).
#[napi(object)]
pub struct NativeStatWindow {
    pub cache_hits: f64,
    pub cache_misses: f64,
    pub cache_bypass_hits: f64,
    pub cache_bypass_misses: f64,
    pub cache_miss_collisions: f64,
    pub bypassed_sectors: f64,
    pub cache_readaheads: f64,
    /// Whole percent of hits among hits and misses.
    pub cache_hit_ratio: f64,
}

/// bcache's four accounting windows.
#[napi(object)]
pub struct NativeAccounting {
    pub five_minute: NativeStatWindow,
    pub hour: NativeStatWindow,
    pub day: NativeStatWindow,
    pub total: NativeStatWindow,
}

fn native_accounting(a: &cache_set::Accounting) -> NativeAccounting {
    let w = |w: &cache_set::StatWindow| NativeStatWindow {
        cache_hits: w.cache_hits as f64,
        cache_misses: w.cache_misses as f64,
        cache_bypass_hits: w.cache_bypass_hits as f64,
        cache_bypass_misses: w.cache_bypass_misses as f64,
        cache_miss_collisions: w.cache_miss_collisions as f64,
        bypassed_sectors: w.bypassed_sectors as f64,
        cache_readaheads: w.cache_readaheads as f64,
        cache_hit_ratio: w.hit_ratio() as f64,
    };
    NativeAccounting { five_minute: w(&a.five_minute), hour: w(&a.hour), day: w(&a.day), total: w(&a.total) }
}

/// When a cache set's cache device counts as congested, in microseconds (0: not timed).
#[napi(object)]
pub struct NativeCongestionConfig {
    pub read_threshold_us: u32,
    pub write_threshold_us: u32,
}

/// The writeback controller's state (bcache's `writeback_rate_debug`), in sectors and
/// sectors per second.
#[napi(object)]
pub struct NativeWritebackRate {
    pub rate: f64,
    pub dirty: f64,
    pub target: f64,
    pub proportional: f64,
    pub integral: f64,
    pub written: f64,
    pub full_speed: bool,
}

/// bcache's `priority_stats` of the cache device.
#[napi(object)]
pub struct NativePriorityStats {
    pub unused_percent: f64,
    pub clean_percent: f64,
    pub dirty_percent: f64,
    pub metadata_percent: f64,
    pub average: f64,
    pub sectors_per_quantile: f64,
    pub quantiles: Vec<u32>,
}

/// What opening the set found and did (times in milliseconds).
#[napi(object)]
pub struct NativeOpenReport {
    pub fresh: bool,
    pub journal_entries: f64,
    pub head_seq: f64,
    pub checkpoint_keys: f64,
    pub checkpoint_seq: f64,
    pub checkpoint_fallback: bool,
    pub checkpoints_kept: f64,
    pub replayed_keys: f64,
    pub replayed_entries: f64,
    pub stale_keys: f64,
    pub gap_at: Option<f64>,
    pub prio_distance: f64,
    pub clean_shutdown: bool,
    pub clean_keys_dropped: f64,
    pub journal_read_ms: f64,
    pub checkpoint_ms: f64,
    pub replay_ms: f64,
    pub gc_ms: f64,
}

/// A cache engine driven by the JavaScript thread (see the module docs).
#[napi]
pub struct NativeCacheEngine {
    glue: Box<Glue<Served>>,
    /// With an emulated slow backing device: where its backing devices' paths go.
    slow_backing: Option<FaultControl>,
}

inline_methods!(NativeCacheEngine);

#[napi]
impl NativeCacheEngine {
    /// Starts an engine on this thread's event loop, running `set` (taken over; its
    /// startup writes begin now), or with no set, serving backing devices straight
    /// (`attachPlain`). `onComplete` hears of completions as `NativeRing`'s does; `onEvent`
    /// of finished control operations (see the module docs). Both are held strongly only
    /// while work is in flight or due: keep them reachable from the object that owns the
    /// engine (fields), so that an idle engine nobody refers to can be collected, which
    /// releases its devices (the set is then recovered at its next open).
    #[napi(
        constructor,
        ts_args_type = "options: NativeEngineOptions, set: NativeLoadedSet | null | undefined, onComplete: (count: number, fatal?: [string, string]) => void, onEvent: (tag: number, handle: number, error?: [string, string]) => void"
    )]
    pub fn new(
        env: &Env,
        options: NativeEngineOptions,
        set: Option<&NativeLoadedSet>,
        on_complete: Function<'_, (), ()>,
        on_event: Function<'_, (), ()>,
    ) -> Result<Self> {
        let loaded = match set {
            Some(s) => match s.loaded.borrow_mut().take() {
                Some(l) => Some(l),
                None => return invalid(env, format!("the cache set on {} is already run by an engine", s.path)),
            },
            None => None,
        };
        // Every I/O one call makes goes to the kernel at its end, in one system call (with
        // the inline queue holding lone requests while busy, calls carry a few requests).
        // bench:cache, 2-core VM, two alternating runs of 3 rounds: hits QD32 0.80 and 0.80
        // of fio against 0.73 and 0.72 in pairs (the default for an event loop); writethrough
        // QD32 0.80 and 0.83 against 0.87 and 0.81, at 17 us CPU/write against 22.
        let (driver, pool, slow_backing) = driver_of(env, &options, Some(0))?;
        if let Some(c) = &slow_backing {
            // Only backing devices are slow; each joins the list as it is attached.
            c.set_latency_only(Some(Vec::new()));
        }
        let engine = match loaded {
            Some(l) => match CacheEngine::with_set(driver, l.set, l.cache) {
                Ok(e) => e,
                Err(e) => return throw(env, e),
            },
            None => CacheEngine::new(driver),
        };
        let cbs = Callbacks { on_complete, on_event: Some(on_event), name: c"ubcache:cache" };
        Ok(NativeCacheEngine { glue: Glue::new(env, Served(Some(engine)), pool, cbs)?, slow_backing })
    }

    /// Runs `f` on the engine (CLOSED once shut down), throws its error, and settles the
    /// glue (timer, loop reference, events) afterwards.
    fn with<T>(&self, env: &Env, f: impl FnOnce(&mut CacheEngine) -> CoreResult<T>) -> Result<T> {
        let r = match self.glue.driven.borrow_mut().0.as_mut() {
            Some(e) => f(e),
            None => Err(closed()),
        };
        self.glue.after_call();
        r.or_else(|e| throw(env, e))
    }

    /// Reads from the engine, or `None` once it is shut down.
    fn get<T>(&self, f: impl FnOnce(&CacheEngine) -> T) -> Option<T> {
        self.glue.driven.borrow().0.as_ref().map(f)
    }

    /// Attaches a backing device to the set: opens it and returns its handle (in `id`;
    /// `size` is what lies past the data offset) at once. `tag` comes back through
    /// `onEvent` when it can take requests (its UUID-table entry is durable), or with the
    /// error that kept it from attaching; requests before that fail with `INVALID_ARGUMENT`.
    #[napi]
    pub fn attach(&self, env: &Env, tag: f64, config: NativeAttachConfig) -> Result<NativeDevice> {
        let uuid = uuid16(env, &config.uuid)?;
        let label = label32(env, config.label.as_deref())?;
        let mode = match CacheMode::from_name(config.mode.as_deref().unwrap_or("writethrough")) {
            Ok(m) => m,
            Err(e) => return throw(env, e),
        };
        let data_offset = to_u64(env, "dataOffset", config.data_offset)?;
        let open = NativeOpenOptions {
            write: config.read_only.map(|r| !r),
            direct: config.direct,
            exclusive: config.exclusive,
            create_size: None,
            remote_timeout_ms: config.remote_timeout_ms,
            remote_connections: config.remote_connections,
        };
        let (device, info) = open_device(env, &config.path, Some(open))?;
        if let Some(c) = &self.slow_backing {
            c.add_latency_path(device.path());
        }
        let mut writeback = cache_set::WritebackConfig::default();
        if let Some(w) = &config.writeback {
            if let Err(e) = apply_writeback(&mut writeback, w) {
                return throw(env, e);
            }
        }
        let mut bypass = cache_set::BypassConfig::default();
        if let Some(b) = &config.bypass {
            if let Err(e) = apply_bypass(&mut bypass, b) {
                return throw(env, e);
            }
        }
        let no_superblock = config.no_superblock.unwrap_or(false);
        let cfg = CachedDevConfig { uuid, label, device, data_offset, mode, writeback, bypass, no_superblock };
        let handle = self.with(env, |e| e.attach(tag as u64, cfg))?;
        Ok(NativeDevice { id: handle, size: (info.size - data_offset as f64).max(0.0), ..info })
    }

    /// Serves a backing device with no cache set: requests go to `dataOffset` on. Returns
    /// its handle (in `id`; `size` is what lies past the data offset); usable at once.
    #[napi]
    pub fn attach_plain(
        &self,
        env: &Env,
        path: String,
        data_offset: f64,
        options: Option<NativeOpenOptions>,
    ) -> Result<NativeDevice> {
        let data_offset = to_u64(env, "dataOffset", data_offset)?;
        let (device, info) = open_device(env, &path, options)?;
        if let Some(c) = &self.slow_backing {
            c.add_latency_path(device.path());
        }
        let handle = self.with(env, |e| e.attach_plain(device, data_offset))?;
        Ok(NativeDevice { id: handle, size: info.size - data_offset as f64, ..info })
    }

    /// bcache's `clear_stats`: a cached device's accounting windows, or (no handle) the set's and all.
    #[napi]
    pub fn clear_stats(&self, env: &Env, handle: Option<u32>) -> Result<()> {
        self.with(env, |e| e.clear_accounting(handle))
    }

    /// A cached device's dirty extents, in bytes, adjacent ones merged, at most `max`.
    #[napi]
    pub fn dirty_extents(&self, env: &Env, handle: u32, max: u32) -> Result<Vec<NativeExtent>> {
        let v = self.with(env, |e| e.dirty_extents(handle, max as usize))?;
        Ok(v.into_iter().map(|(s, l)| NativeExtent { offset: (s * 512) as f64, length: (l * 512) as f64 }).collect())
    }

    /// The cache device's replacement policy and discard flag.
    #[napi]
    pub fn cache_policy(&self, env: &Env) -> Result<NativeCachePolicy> {
        let (r, discard) = self.with(env, |e| e.cache_policy())?;
        Ok(NativeCachePolicy { replacement: Some(replacement_name(r).to_string()), discard: Some(discard) })
    }

    /// Changes the cache device's replacement policy and discard flag (recorded in its superblock).
    #[napi]
    pub fn set_cache_policy(&self, env: &Env, p: NativeCachePolicy) -> Result<()> {
        let (mut r, mut discard) = self.with(env, |e| e.cache_policy())?;
        if let Some(name) = p.replacement.as_deref() {
            r = match name {
                "lru" => Replacement::Lru,
                "fifo" => Replacement::Fifo,
                "random" => Replacement::Random,
                "s3fifo" => Replacement::S3Fifo,
                "tinylfu" => Replacement::TinyLfu,
                _ => {
                    return invalid(
                        env,
                        format!("cache_replacement_policy {name:?}: expected lru, fifo, random, s3fifo or tinylfu"),
                    )
                }
            };
        }
        if let Some(d) = p.discard {
            discard = d;
        }
        self.with(env, |e| e.set_cache_policy(r, discard))
    }

    /// Creates a flash-only volume of `size` bytes named `uuid` (16 bytes) in the set;
    /// returns its handle at once, and `tag` comes back when its UUID-table entry is durable.
    #[napi]
    pub fn create_volume(
        &self,
        env: &Env,
        tag: f64,
        uuid: Uint8Array,
        label: Option<String>,
        size: f64,
    ) -> Result<u32> {
        let uuid = uuid16(env, &uuid)?;
        let label = label32(env, label.as_deref())?;
        let size = to_u64(env, "size", size)?;
        if !size.is_multiple_of(512) {
            return invalid(env, format!("a volume of {size} bytes: not whole sectors"));
        }
        self.with(env, |e| e.create_volume(tag as u64, uuid, label, size / 512))
    }

    /// Attaches the set's flash-only volume `uuid`; returns its handle (`tag` comes back at once).
    #[napi]
    pub fn attach_volume(&self, env: &Env, tag: f64, uuid: Uint8Array) -> Result<u32> {
        let uuid = uuid16(env, &uuid)?;
        self.with(env, |e| e.attach_volume(tag as u64, uuid))
    }

    /// The set's flash-only volumes, as its UUID table records them.
    #[napi]
    pub fn volumes(&self) -> Vec<NativeVolume> {
        self.get(|e| {
            e.set().map(|s| {
                s.volumes()
                    .into_iter()
                    .map(|(inode, u)| NativeVolume {
                        inode,
                        uuid: u.uuid.to_vec().into(),
                        label: u.label_text(),
                        size: (u.sectors * 512) as f64,
                    })
                    .collect()
            })
        })
        .flatten()
        .unwrap_or_default()
    }

    /// The backing devices the set caches without a superblock, attached or not.
    #[napi]
    pub fn existing_devices(&self) -> Vec<NativeExistingDevice> {
        self.get(|e| {
            e.set().map(|s| {
                s.existing_devices()
                    .into_iter()
                    .map(|(inode, u)| NativeExistingDevice {
                        inode,
                        uuid: u.uuid.to_vec().into(),
                        label: u.label_text(),
                        size: (u.sectors * 512) as f64,
                        mode: CacheMode::from_number(u.mode).name().to_string(),
                        state: u32::from(u.state),
                    })
                    .collect()
            })
        })
        .flatten()
        .unwrap_or_default()
    }

    /// Records the cache mode and state (0..=3) of a cached device with no superblock in
    /// its UUID-table entry; `tag` comes back through `onEvent` once that is durable.
    #[napi]
    pub fn record_entry(&self, env: &Env, tag: f64, handle: u32, mode: String, state: u32) -> Result<()> {
        let mode = match CacheMode::from_name(&mode) {
            Ok(m) => m,
            Err(e) => return throw(env, e),
        };
        let Ok(state) = u8::try_from(state) else {
            return invalid(env, format!("backing state {state}: expected 0..=3"));
        };
        self.with(env, |e| e.record_entry(tag as u64, handle, mode, state))
    }

    /// Lets go of a device (nothing of it may be in flight: `EBUSY`); a cached device's
    /// entry and cached data stay in the set for its next attach.
    #[napi]
    pub fn detach(&self, env: &Env, handle: u32) -> Result<()> {
        self.with(env, |e| e.detach(handle))
    }

    /// Begins detaching a cached device from the set for good (its dirty data written
    /// back, its cached data dropped, its UUID slot freed); `tag` comes back through
    /// `onEvent` when that is durable, or with the error that stopped it.
    #[napi]
    pub fn detach_begin(&self, env: &Env, tag: f64, handle: u32) -> Result<()> {
        self.with(env, |e| e.detach_begin(tag as u64, handle))
    }

    /// Cancels a detach still writing back (its tag comes back with `CLOSED`).
    #[napi]
    pub fn detach_cancel(&self, env: &Env, handle: u32) -> Result<()> {
        self.with(env, |e| e.detach_cancel(handle))
    }

    /// Switches a cached device's cache mode (`writethrough`, `writeback`, `writearound` or
    /// `none`); requests submitted from now on follow it.
    #[napi]
    pub fn set_cache_mode(&self, env: &Env, handle: u32, mode: String) -> Result<()> {
        self.with(env, |e| e.set_cache_mode(handle, CacheMode::from_name(&mode)?))
    }

    /// A cached device's writeback tunables.
    #[napi]
    pub fn writeback_config(&self, env: &Env, handle: u32) -> Result<NativeWritebackConfig> {
        let c = self.with(env, |e| e.writeback_config(handle))?;
        Ok(NativeWritebackConfig {
            running: Some(c.running),
            percent: Some(f64::from(c.percent)),
            delay_seconds: Some(c.delay.as_secs_f64()),
            rate_update_seconds: Some(c.rate_update.as_secs_f64()),
            rate_p_term_inverse: Some(c.p_term_inverse as f64),
            rate_i_term_inverse: Some(c.i_term_inverse as f64),
            rate_minimum: Some(c.rate_minimum as f64),
            stripe_size: Some(c.stripe_size as f64),
            partial_stripes_expensive: Some(c.partial_stripes_expensive),
            consider_fragment: Some(c.consider_fragment),
            rate_fp_term_low: Some(c.fp_term_low as f64),
            rate_fp_term_mid: Some(c.fp_term_mid as f64),
            rate_fp_term_high: Some(c.fp_term_high as f64),
        })
    }

    /// Changes a cached device's writeback tunables: the fields given, validated together.
    #[napi]
    pub fn set_writeback_config(&self, env: &Env, handle: u32, cfg: NativeWritebackConfig) -> Result<()> {
        self.with(env, |e| {
            let mut c = e.writeback_config(handle)?;
            apply_writeback(&mut c, &cfg)?;
            e.set_writeback_config(handle, c)
        })
    }

    /// A cached device's request accounting since it was attached.
    #[napi]
    pub fn device_accounting(&self, env: &Env, handle: u32) -> Result<NativeAccounting> {
        let a = self.with(env, |e| e.device_accounting(handle))?;
        Ok(native_accounting(&a))
    }

    /// The cache set's request accounting since it was opened (null without a set).
    #[napi]
    pub fn accounting(&self) -> Option<NativeAccounting> {
        self.get(|e| e.set().map(|s| native_accounting(&s.accounting()))).flatten()
    }

    /// A cached device's bypass tunables.
    #[napi]
    pub fn bypass_config(&self, env: &Env, handle: u32) -> Result<NativeBypassConfig> {
        let c = self.with(env, |e| e.bypass_config(handle))?;
        Ok(NativeBypassConfig {
            sequential_cutoff: Some(c.sequential_cutoff as f64),
            sequential_cutoff_read: c.sequential_cutoff_read.map(|v| v as f64),
            sequential_cutoff_write: c.sequential_cutoff_write.map(|v| v as f64),
            sequential_merge: Some(c.sequential_merge),
            readahead: Some(c.readahead as f64),
        })
    }

    /// Changes a cached device's bypass tunables: the fields given, validated together.
    #[napi]
    pub fn set_bypass_config(&self, env: &Env, handle: u32, cfg: NativeBypassConfig) -> Result<()> {
        self.with(env, |e| {
            let mut c = e.bypass_config(handle)?;
            apply_bypass(&mut c, &cfg)?;
            e.set_bypass_config(handle, c)
        })
    }

    /// Asks the set for a GC pass now (bcache's `trigger_gc`).
    #[napi]
    pub fn trigger_gc(&self, env: &Env) -> Result<()> {
        self.with(env, |e| {
            e.set_mut().ok_or_else(no_set)?.trigger_gc();
            Ok(())
        })
    }

    /// The cache set's congestion thresholds.
    #[napi]
    pub fn congestion_config(&self, env: &Env) -> Result<NativeCongestionConfig> {
        let c = self.with(env, |e| Ok(e.set().ok_or_else(no_set)?.congestion_config()))?;
        Ok(NativeCongestionConfig { read_threshold_us: c.read_threshold_us, write_threshold_us: c.write_threshold_us })
    }

    /// Changes the cache set's congestion thresholds.
    #[napi]
    pub fn set_congestion_config(&self, env: &Env, cfg: NativeCongestionConfig) -> Result<()> {
        self.with(env, |e| {
            let c = cache_set::CongestionConfig {
                read_threshold_us: cfg.read_threshold_us,
                write_threshold_us: cfg.write_threshold_us,
            };
            e.set_mut().ok_or_else(no_set)?.set_congestion_config(c);
            Ok(())
        })
    }

    /// A cached device's writeback controller state.
    #[napi]
    pub fn writeback_rate(&self, env: &Env, handle: u32) -> Result<NativeWritebackRate> {
        let r = self.with(env, |e| e.writeback_rate(handle))?;
        Ok(NativeWritebackRate {
            rate: r.rate as f64,
            dirty: r.dirty as f64,
            target: r.target as f64,
            proportional: r.proportional as f64,
            integral: r.integral as f64,
            written: r.written as f64,
            full_speed: r.full_speed,
        })
    }

    /// A device's cache mode; null for a device with no cache set.
    #[napi]
    pub fn cache_mode(&self, env: &Env, handle: u32) -> Result<Option<String>> {
        self.with(env, |e| Ok(e.cache_mode(handle)?.map(|m| m.name().to_string())))
    }

    /// Begins a clean close: requests in flight finish, new ones are refused, a final
    /// checkpoint is written. `tag` comes back through `onEvent` when all of it is durable
    /// (with the error if the set failed). Then call `shutdown`.
    #[napi]
    pub fn close(&self, env: &Env, tag: f64) -> Result<()> {
        self.with(env, |e| e.close(tag as u64))
    }

    /// Stops watching the engine and drops it, which releases its devices (and their
    /// exclusive opens). Requests still in flight are waited for and lost. Idempotent.
    #[napi]
    pub fn shutdown(&self) {
        self.glue.shutdown();
        self.glue.driven.borrow_mut().close();
    }

    /// Counters of the cache set (null for an engine without one).
    #[napi]
    pub fn stats(&self) -> Option<NativeCacheSetStats> {
        self.get(|e| {
            let s = e.set()?;
            let st = s.stats();
            let gc = s.gc_times();
            let mgc = s.moving_gc_stats();
            Some(NativeCacheSetStats {
                data_bytes: st.data_bytes as f64,
                journal_bytes: st.journal_bytes as f64,
                checkpoint_bytes: st.checkpoint_bytes as f64,
                prio_bytes: st.prio_bytes as f64,
                other_meta_bytes: st.other_meta_bytes as f64,
                meta_bytes: st.meta_bytes() as f64,
                journal_entries: st.journal_entries as f64,
                journal_preflushes: st.journal_preflushes as f64,
                checkpoints: st.checkpoints as f64,
                prio_distance_checkpoints: st.prio_distance_checkpoints as f64,
                prio_writes: st.prio_writes as f64,
                gc_runs: st.gc_runs as f64,
                gc_average_duration_ms: gc.average_duration.as_secs_f64() * 1e3,
                gc_max_duration_ms: gc.max_duration.as_secs_f64() * 1e3,
                gc_average_interval_ms: gc.average_interval.as_secs_f64() * 1e3,
                gc_last_ms_ago: gc.since_last.map_or(-1.0, |d| d.as_secs_f64() * 1e3),
                moving_gc_passes: mgc.passes as f64,
                moving_gc_buckets: mgc.buckets as f64,
                moving_gc_sectors: mgc.sectors_moved as f64,
                moving_gc_dropped: mgc.moves_dropped as f64,
                moving_gc_last_sectors: mgc.last_sectors as f64,
                moving_gc_last_ms: mgc.last_duration.as_secs_f64() * 1e3,
                moving_gc_promotions: mgc.promotions as f64,
                hit_sectors: st.hit_sectors as f64,
                miss_sectors: st.miss_sectors as f64,
                cache_hits: st.cache_hits as f64,
                cache_misses: st.cache_misses as f64,
                cache_bypass_hits: st.cache_bypass_hits as f64,
                cache_bypass_misses: st.cache_bypass_misses as f64,
                bypassed_sectors: st.bypassed_sectors as f64,
                sequential_bypasses: st.sequential_bypasses as f64,
                congested_bypasses: st.congested_bypasses as f64,
                cache_add_cutoffs: st.cache_add_cutoffs as f64,
                cache_miss_collisions: st.cache_miss_collisions as f64,
                fill_sectors: st.fill_sectors as f64,
                returning_misses: st.returning_misses as f64,
                admission_bypasses: st.admission_bypasses as f64,
                writeback_cutoffs: st.writeback_cutoffs as f64,
                dirty_overlaps: st.dirty_overlaps as f64,
                space_waits: st.space_waits as f64,
                ordered_waits: st.ordered_waits as f64,
                cache_io_errors: st.cache_io_errors as f64,
                reread_from_backing: st.reread_from_backing as f64,
                csum_errors: st.csum_errors as f64,
                readahead_sectors: st.readahead_sectors as f64,
                cache_read_races: st.cache_read_races as f64,
                writeback_sectors: st.writeback_sectors as f64,
                writeback_errors: st.writeback_errors as f64,
                io_errors: st.io_errors_milli as f64 / 1000.0,
                longest_tick_us: st.longest_tick_us as f64,
                in_use_percent: s.in_use_percent() as f64,
                cache_available_percent: 100.0 - s.in_use_percent().min(100) as f64,
                available_buckets: s.allocator().available_buckets() as f64,
                in_flight: s.in_flight() as f64,
            })
        })
        .flatten()
    }

    /// `starting`, `running`, `failed`, `closing` or `closed` (an engine without a set:
    /// `running` until shut down).
    #[napi(getter, ts_return_type = "'starting' | 'running' | 'failed' | 'closing' | 'closed'")]
    pub fn state(&self) -> &'static str {
        self.get(|e| match e.set().map(CacheSet::state) {
            None | Some(SetState::Running) => "running",
            Some(SetState::Starting) => "starting",
            Some(SetState::Failed(_)) => "failed",
            Some(SetState::Closing) => "closing",
            Some(SetState::Closed) => "closed",
        })
        .unwrap_or("closed")
    }

    /// `[code, message]` of the error that took the set out of service, if it failed.
    #[napi(getter, ts_return_type = "[string, string] | null")]
    pub fn failure(&self) -> Option<Vec<String>> {
        self.get(|e| match e.set().map(CacheSet::state) {
            Some(SetState::Failed(err)) => Some(vec![err.code().to_string(), err.message().to_string()]),
            _ => None,
        })
        .flatten()
    }

    /// A one-line account of what the set is doing and waiting for (null without a set).
    #[napi]
    pub fn describe(&self) -> Option<String> {
        self.get(|e| e.set().map(CacheSet::describe)).flatten()
    }

    /// What opening the set found and did (null without a set).
    #[napi]
    pub fn open_report(&self) -> Option<NativeOpenReport> {
        self.get(|e| {
            let r = e.set()?.open_report();
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
            Some(NativeOpenReport {
                fresh: r.fresh,
                journal_entries: r.journal_entries as f64,
                head_seq: r.head_seq as f64,
                checkpoint_keys: r.checkpoint_keys as f64,
                checkpoint_seq: r.checkpoint_seq as f64,
                checkpoint_fallback: r.checkpoint_fallback,
                checkpoints_kept: r.checkpoints_kept as f64,
                replayed_keys: r.replayed_keys as f64,
                replayed_entries: r.replayed_entries as f64,
                stale_keys: r.stale_keys as f64,
                gap_at: r.gap_at.map(|g| g as f64),
                prio_distance: r.prio_distance as f64,
                clean_shutdown: r.clean_shutdown,
                clean_keys_dropped: r.clean_keys_dropped as f64,
                journal_read_ms: ms(r.journal_read_time),
                checkpoint_ms: ms(r.checkpoint_time),
                replay_ms: ms(r.replay_time),
                gc_ms: ms(r.gc_time),
            })
        })
        .flatten()
    }

    /// Dirty sectors of a cached device (null for a handle that is not one).
    #[napi]
    pub fn dirty_sectors(&self, handle: u32) -> Option<f64> {
        self.get(|e| Some(e.set()?.dirty_sectors(e.inode(handle)?) as f64)).flatten()
    }

    /// Sectors of a cached device the cache holds (null for a handle that is not one).
    #[napi]
    pub fn cached_sectors(&self, handle: u32) -> Option<f64> {
        self.get(|e| Some(e.set()?.cached_sectors(e.inode(handle)?) as f64)).flatten()
    }

    /// bcache's `priority_stats` of the cache device (null for an engine without a set).
    /// Sorts every bucket's prio: for an occasional look, not for every request.
    #[napi]
    pub fn priority_stats(&self, env: &Env) -> Result<Option<NativePriorityStats>> {
        let r = self.get(|e| e.set().map(|s| s.allocator().priority_stats(0))).flatten();
        match r {
            None => Ok(None),
            Some(Err(e)) => throw(env, e),
            Some(Ok(p)) => Ok(Some(NativePriorityStats {
                unused_percent: p.unused_percent as f64,
                clean_percent: p.clean_percent as f64,
                dirty_percent: p.dirty_percent as f64,
                metadata_percent: p.metadata_percent as f64,
                average: p.average as f64,
                sectors_per_quantile: p.sectors_per_quantile as f64,
                quantiles: p.quantiles.iter().map(|&q| u32::from(q)).collect(),
            })),
        }
    }

    /// Counters of the I/O engine underneath: event-loop wakeups, batches, buffers.
    #[napi]
    pub fn engine_stats(&self) -> NativeEngineStats {
        self.glue.engine_stats()
    }
}

/// The error for a set-level call on an engine that serves plain devices only.
fn no_set() -> CoreError {
    CoreError::new(ErrorKind::InvalidArgument, "this engine has no cache set")
}

/// Applies the bypass tunables `n` gives to `c` (ranges: `BypassConfig::validate`).
fn apply_bypass(c: &mut cache_set::BypassConfig, n: &NativeBypassConfig) -> CoreResult<()> {
    if let Some(v) = n.sequential_cutoff {
        c.sequential_cutoff = whole("sequential_cutoff", v)?;
    }
    if let Some(v) = n.sequential_cutoff_read {
        c.sequential_cutoff_read = if v < 0.0 { None } else { Some(whole("sequential_cutoff_read", v)?) };
    }
    if let Some(v) = n.sequential_cutoff_write {
        c.sequential_cutoff_write = if v < 0.0 { None } else { Some(whole("sequential_cutoff_write", v)?) };
    }
    if let Some(v) = n.readahead {
        c.readahead = whole("readahead", v)?;
    }
    if let Some(v) = n.sequential_merge {
        c.sequential_merge = v;
    }
    Ok(())
}

/// A tunable's value as a whole number, not negative; an error naming the tunable otherwise.
fn whole(what: &str, v: f64) -> CoreResult<u64> {
    if v.fract() != 0.0 || !(0.0..=u64::MAX as f64).contains(&v) {
        return Err(CoreError::new(
            ErrorKind::InvalidArgument,
            format!("{what}: must be a whole number, not negative, got {v}"),
        ));
    }
    Ok(v as u64)
}

/// Applies the tunables `n` gives to `c`: numbers must be whole and not negative; their
/// ranges are the core's to check (`WritebackConfig::validate`, when the config is set).
fn apply_writeback(c: &mut cache_set::WritebackConfig, n: &NativeWritebackConfig) -> CoreResult<()> {
    if let Some(v) = n.running {
        c.running = v;
    }
    if let Some(v) = n.percent {
        c.percent = u8::try_from(whole("writeback_percent", v)?).unwrap_or(u8::MAX);
    }
    if let Some(v) = n.delay_seconds {
        c.delay = Duration::from_secs(whole("writeback_delay", v)?);
    }
    if let Some(v) = n.rate_update_seconds {
        c.rate_update = Duration::from_secs(whole("writeback_rate_update_seconds", v)?);
    }
    if let Some(v) = n.rate_p_term_inverse {
        c.p_term_inverse = whole("writeback_rate_p_term_inverse", v)?;
    }
    if let Some(v) = n.rate_i_term_inverse {
        c.i_term_inverse = whole("writeback_rate_i_term_inverse", v)?;
    }
    if let Some(v) = n.rate_minimum {
        c.rate_minimum = whole("writeback_rate_minimum", v)?;
    }
    if let Some(v) = n.stripe_size {
        c.stripe_size = whole("stripe_size", v)?;
    }
    if let Some(v) = n.partial_stripes_expensive {
        c.partial_stripes_expensive = v;
    }
    if let Some(v) = n.consider_fragment {
        c.consider_fragment = v;
    }
    if let Some(v) = n.rate_fp_term_low {
        c.fp_term_low = whole("writeback_rate_fp_term_low", v)?;
    }
    if let Some(v) = n.rate_fp_term_mid {
        c.fp_term_mid = whole("writeback_rate_fp_term_mid", v)?;
    }
    if let Some(v) = n.rate_fp_term_high {
        c.fp_term_high = whole("writeback_rate_fp_term_high", v)?;
    }
    Ok(())
}
