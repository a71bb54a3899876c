//! A cache set driven the way the JavaScript binding drives it, for the benchmarks
//! (bench/engine, and bench/journal through `#[path]`): an io_uring engine opened for an
//! event loop (`EngineOptions { submit_batch: 2, buf_pool }`, as
//! crates/napi/src/io.rs `engine_of` builds it by default; the cache engine's binding asks
//! for 0 instead, see below), a [`RingDriver`] with adaptive busy polling (as
//! crates/napi/src/ring.rs `NativeRing::new` does), the set loaded through an
//! [`EngineStorage`] over that same engine, then run by a [`CacheEngine`] from this thread:
//! requests go in with `submit`, completions come out of `reap` when the ring's descriptor
//! turns readable (this thread sleeps in poll(2) on it, as libuv would) and `tick` runs
//! background work when `next_deadline` says.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ubcache_core::cache_set::{
    self, superblock, CacheEngine, CacheMode, CacheSetOptions, CacheSetStats, CachedDevConfig, SetState,
};
use ubcache_core::io::{
    open_engine, AlignedBuf, BufPool, BufPoolConfig, BusyPoll, DevId, Device, DirectIo, EngineChoice, EngineOptions,
    EngineStorage, IoCompletion, IoRequest, OpenOptions, RingDriver, ADAPTIVE_POLL_CAP,
};

/// Where a backing device's data starts (bcache's default 16 sectors).
pub const DATA_OFFSET: u64 = 8192;

/// Set by SIGINT/SIGTERM: the drive loops stop by panicking, so guards clean up on unwind.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`].
pub fn catch_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// CLOCK_MONOTONIC in seconds (what `perf record -k CLOCK_MONOTONIC` stamps samples with).
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn check_interrupted() {
    if INTERRUPTED.load(Ordering::Relaxed) {
        panic!("interrupted");
    }
}

/// xorshift64: reproducible choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Writes a fresh cache superblock (`CACHE_SYNC` clear, so the next load starts a new set)
/// at byte 4096 of `path`, with a set UUID of its own so entries of earlier sets on the
/// device never look like this one's.
pub fn format_cache(path: &Path, nbuckets: u64, bucket_sectors: u16, set_uuid: [u8; 16]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open the cache device to format it");
    let sb = superblock::format([0xca; 16], set_uuid, nbuckets, bucket_sectors, 8);
    f.write_all_at(&sb, superblock::SB_OFFSET).expect("write the superblock");
    f.sync_all().expect("sync the superblock");
}

/// A set UUID no earlier run used.
pub fn fresh_set_uuid() -> [u8; 16] {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&t.to_le_bytes());
    u[8..].copy_from_slice(&(n ^ u64::from(std::process::id()) << 32).to_le_bytes());
    u
}

/// How to open a rig.
pub struct RigConfig<'a> {
    pub cache: &'a Path,
    pub cache_direct: DirectIo,
    pub backing: &'a Path,
    pub backing_direct: DirectIo,
    pub mode: CacheMode,
    pub set: CacheSetOptions,
    /// Bytes of the engine's buffer arena (registered with io_uring as a fixed buffer).
    pub arena_bytes: usize,
}

/// A running cache engine with one backing device attached.
pub struct Rig {
    pub ce: CacheEngine,
    pub handle: u32,
    pub inode: u32,
    pub pool: BufPool,
    pub cache: Arc<Device>,
    pub backing: Arc<Device>,
    fd: i32,
    next_tag: u64,
    /// Time `load` took.
    pub load_time: Duration,
    /// The cache device's block-layer counters (/sys/block/<dev>/stat), when it is a block
    /// device: bytes written to it, measured independently of the set's own counters.
    pub dev_stat: Option<std::path::PathBuf>,
    /// Every write `drive` makes is a FUA write (durable when it completes).
    pub fua_writes: bool,
}

impl Rig {
    /// Loads the set on `cfg.cache`, starts it, attaches `cfg.backing` and waits until the
    /// set runs and the attach is recorded.
    pub fn open(cfg: &RigConfig) -> Rig {
        let pool = BufPool::new(BufPoolConfig { arena_bytes: cfg.arena_bytes, ..Default::default() });
        let defaults = EngineOptions::default();
        // As crates/napi/src/io.rs `engine_of` builds an engine for an event loop, with one
        // difference: I/O goes to the kernel in pairs as the engine makes it, where the cache
        // engine's binding sends all of a call's I/O at its end (`submit_batch` 0). Each is
        // the better for its caller (2-core VM, two alternating runs of 3 rounds each):
        // driven from this Rust loop, writethrough QD32 0.81 and 0.88 of fio with pairs
        // against 0.73 and 0.75 at the end (hits alike); from JavaScript, whose requests
        // come a tick's worth at a time, hits QD32 0.80 and 0.80 at the end against 0.73
        // and 0.72 with pairs (writethrough alike).
        let opts =
            EngineOptions { choice: EngineChoice::Uring, buf_pool: Some(pool.clone()), submit_batch: 2, ..defaults };
        let mut engine = open_engine(&opts).expect("io_uring engine");
        let cache = Arc::new(
            Device::open(cfg.cache, &OpenOptions { direct: cfg.cache_direct, ..Default::default() })
                .expect("open cache"),
        );
        let id = engine.add_device(cache.clone()).expect("add the cache device");
        let mut st = EngineStorage::new(engine, id);
        let t = Instant::now();
        let set = cache_set::load(&mut st, cfg.set.clone()).expect("load the cache set");
        let load_time = t.elapsed();
        let mut engine = st.into_engine();
        engine.remove_device(id).expect("remove the cache device");
        let mut driver = RingDriver::new(engine).expect("ring driver");
        driver.set_busy_poll(BusyPoll::Adaptive(ADAPTIVE_POLL_CAP));
        let fd = driver.fd();
        let ce = CacheEngine::with_set(driver, set, cache.clone()).expect("start the set");
        let backing = Arc::new(
            Device::open(cfg.backing, &OpenOptions { direct: cfg.backing_direct, ..Default::default() })
                .expect("open backing"),
        );
        let dev_stat = cache
            .is_block_device()
            .then(|| cfg.cache.canonicalize().ok())
            .flatten()
            .and_then(|p| p.file_name().map(|n| Path::new("/sys/block").join(n).join("stat")))
            .filter(|p| p.exists());
        let mut rig = Rig {
            ce,
            handle: u32::MAX,
            inode: 0,
            pool,
            cache,
            backing: backing.clone(),
            fd,
            next_tag: 0,
            load_time,
            dev_stat,
            fua_writes: false,
        };
        let tag = rig.tag();
        let dev = CachedDevConfig {
            uuid: [0xb1; 16],
            label: [0; 32],
            device: backing,
            data_offset: DATA_OFFSET,
            mode: cfg.mode,
            writeback: Default::default(),
            // The cache path is what is measured: sequential streams must not bypass it.
            bypass: ubcache_core::cache_set::BypassConfig { sequential_cutoff: 0, ..Default::default() },
            no_superblock: false,
        };
        rig.handle = rig.ce.attach(tag, dev).expect("attach");
        let mut events = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        loop {
            rig.ce.take_events(&mut events);
            if let Some((_, r)) = events.iter().find(|e| e.0 == tag) {
                r.as_ref().expect("attach failed");
                if rig.state() == SetState::Running {
                    break;
                }
            }
            if let SetState::Failed(e) = rig.state() {
                panic!("the set failed while starting: {e}");
            }
            assert!(Instant::now() < until, "startup did not finish in 60 s: {}", rig.set().describe());
            rig.turn(&mut out, Duration::from_millis(10));
        }
        rig.inode = rig.ce.inode(rig.handle).expect("a cached device");
        rig
    }

    pub fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    pub fn set(&self) -> &cache_set::CacheSet {
        self.ce.set().expect("a set")
    }

    pub fn state(&self) -> SetState {
        self.set().state().clone()
    }

    pub fn stats(&self) -> CacheSetStats {
        self.set().stats()
    }

    pub fn set_mode(&mut self, mode: CacheMode) {
        self.ce.set_cache_mode(self.handle, mode).expect("set_cache_mode");
    }

    /// Bytes written to the cache device so far, by the block layer's count (None when the
    /// cache device is not a block device).
    pub fn dev_written(&self) -> Option<u64> {
        let s = std::fs::read_to_string(self.dev_stat.as_ref()?).ok()?;
        let sectors: u64 = s.split_whitespace().nth(6)?.parse().ok()?;
        Some(sectors * 512)
    }

    /// Size of the cached device in bytes.
    pub fn dev_bytes(&self) -> u64 {
        self.backing.size() - DATA_OFFSET
    }

    /// One turn of the loop: takes what completed and runs background work that is due;
    /// if nothing finished, sleeps in poll(2) on the ring's descriptor (until it is
    /// readable, background work is due, or `max_wait`), then takes what completed.
    pub fn turn(&mut self, out: &mut Vec<IoCompletion>, max_wait: Duration) {
        let before = out.len();
        self.ce.reap(out).expect("reap");
        if self.ce.next_deadline().is_some_and(|d| d <= Instant::now()) {
            self.ce.tick(out).expect("tick");
        }
        if out.len() > before {
            return;
        }
        check_interrupted();
        let wait = match self.ce.next_deadline() {
            Some(d) => d.saturating_duration_since(Instant::now()).min(max_wait),
            None => max_wait,
        };
        if !wait.is_zero() {
            let mut p = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
            // Round up: a deadline a fraction of a millisecond away must not spin.
            let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, ms) };
        }
        self.ce.reap(out).expect("reap");
        if self.ce.next_deadline().is_some_and(|d| d <= Instant::now()) {
            self.ce.tick(out).expect("tick");
        }
    }

    /// Drives the engine until nothing is in flight.
    pub fn drain(&mut self) {
        let until = Instant::now() + Duration::from_secs(120);
        let mut out = Vec::new();
        while self.ce.in_flight() > 0 {
            assert!(Instant::now() < until, "requests still in flight after 120 s: {}", self.set().describe());
            self.turn(&mut out, Duration::from_millis(10));
            out.clear();
        }
    }

    /// A clean close (final checkpoint and all).
    pub fn close(mut self) {
        self.drain();
        let tag = self.tag();
        self.ce.close(tag).expect("close");
        let until = Instant::now() + Duration::from_secs(300);
        let mut events = Vec::new();
        let mut out = Vec::new();
        loop {
            self.ce.take_events(&mut events);
            if let Some((_, r)) = events.iter().find(|e| e.0 == tag) {
                r.as_ref().expect("close failed");
                return;
            }
            assert!(Instant::now() < until, "close did not finish: {}", self.set().describe());
            self.turn(&mut out, Duration::from_millis(10));
        }
    }
}

/// When a run stops.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// After this long (past the warm-up).
    Time(Duration),
    /// After this many requests completed (past the warm-up).
    Ops(u64),
}

/// A workload: `qd` requests of `bs` bytes kept in flight, reads or writes at the offsets
/// `next` gives.
pub struct Load<'a> {
    pub qd: usize,
    pub bs: usize,
    pub write: bool,
    pub next: &'a mut dyn FnMut() -> u64,
    pub warm: Duration,
    pub stop: Stop,
    /// Record each request's latency, submission to completion.
    pub lat: bool,
    /// Record the time at which these many requests had completed (past the warm-up).
    pub marks: Vec<u64>,
    /// Report progress on stderr every so often (None: quiet).
    pub progress: Option<Duration>,
    /// Submit at most this many requests in all (warm-up included); the measurement ends
    /// when one more would pass it.
    pub limit: Option<u64>,
    /// Write all-zero data (else a pattern that is not).
    pub zero_data: bool,
}

/// What a run measured.
pub struct Run {
    pub ops: u64,
    pub secs: f64,
    /// Latencies in ns (when asked for).
    pub lat: Vec<u64>,
    /// Time since the start of measurement at each mark.
    pub marks: Vec<f64>,
    /// The set's counters over the measurement.
    pub before: CacheSetStats,
    pub after: CacheSetStats,
    /// Bytes written to the cache device over the measurement (block-layer count).
    pub dev_written: Option<u64>,
}

impl Run {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    pub fn p50(&mut self) -> f64 {
        self.lat.sort_unstable();
        self.lat[self.lat.len() / 2] as f64
    }
    pub fn pct(&mut self, p: f64) -> f64 {
        self.lat.sort_unstable();
        self.lat[((self.lat.len() as f64 * p) as usize).min(self.lat.len() - 1)] as f64
    }
}

/// Runs `load` on `rig` (from this thread, as the binding's event loop would).
pub fn drive(rig: &mut Rig, load: Load) -> Run {
    let qd = load.qd;
    let h = DevId(rig.handle);
    let mut started = vec![Instant::now(); qd];
    let mut bufs: Vec<Option<AlignedBuf>> = (0..qd)
        .map(|i| {
            let mut b = rig.pool.get(load.bs);
            if load.write && !load.zero_data {
                // Data that is not all zeros (content is not checked).
                let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ i as u64);
                for c in b.chunks_mut(8) {
                    c.copy_from_slice(&r.next().to_le_bytes());
                }
            }
            Some(b)
        })
        .collect();
    let fua = rig.fua_writes;
    let mk = |slot: usize, off: u64, buf: AlignedBuf, write: bool| {
        if write {
            let mut r = IoRequest::write(h, off, buf, slot as u64);
            r.fua = fua;
            r
        } else {
            IoRequest::read(h, off, buf, slot as u64)
        }
    };
    let mut out: Vec<IoCompletion> = Vec::with_capacity(qd * 2);
    let mut again: Vec<IoRequest> = Vec::with_capacity(qd);
    let mut submitted = qd as u64;
    let limit = load.limit.unwrap_or(u64::MAX);
    assert!(limit >= qd as u64, "a limit below the queue depth");
    let start = Instant::now();
    for (slot, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        again.push(mk(slot, (load.next)(), bufs[slot].take().unwrap(), load.write));
    }
    rig.ce.submit(again.drain(..), &mut out).expect("submit");
    let warm_end = start + load.warm;
    let mut t0: Option<Instant> = None;
    let mut before = rig.stats();
    let mut dev_before = None;
    let mut run =
        Run { ops: 0, secs: 0.0, lat: Vec::new(), marks: Vec::new(), before, after: before, dev_written: None };
    if load.lat {
        run.lat.reserve(1 << 20);
    }
    let mut next_mark = 0;
    let mut in_flight = qd;
    let mut stopping = false;
    let mut last_progress = Instant::now();
    // UBCACHE_BENCH_PERF_WINDOWS=1: print each measurement's window, for `perf report --time`.
    let windows = std::env::var_os("UBCACHE_BENCH_PERF_WINDOWS").is_some();
    let mut window_start = 0.0;
    let mut progress_ops = 0u64;
    loop {
        if out.is_empty() {
            rig.turn(&mut out, Duration::from_millis(100));
        }
        let now = Instant::now();
        if t0.is_none() && now >= warm_end {
            t0 = Some(now);
            window_start = monotonic();
            before = rig.stats();
            dev_before = rig.dev_written();
        }
        for c in out.drain(..) {
            let slot = c.user_data as usize;
            if let Err(e) = &c.result {
                panic!("request failed: {e}; {}", rig.set().describe());
            }
            in_flight -= 1;
            if let (Some(t0), false) = (t0, stopping) {
                run.ops += 1;
                if load.lat {
                    run.lat.push((now - started[slot]).as_nanos() as u64);
                }
                while next_mark < load.marks.len() && run.ops >= load.marks[next_mark] {
                    run.marks.push((now - t0).as_secs_f64());
                    next_mark += 1;
                }
                stopping = submitted >= limit
                    || match load.stop {
                        Stop::Time(d) => now - t0 >= d,
                        Stop::Ops(n) => run.ops >= n,
                    };
                if stopping {
                    if windows {
                        eprintln!("perf window: {window_start:.6},{:.6}", monotonic());
                    }
                    run.secs = (now - t0).as_secs_f64();
                    run.after = rig.stats();
                    run.dev_written = rig.dev_written().zip(dev_before).map(|(a, b)| a - b);
                }
            }
            let buf = c.into_buf().unwrap_or_else(|| rig.pool.get(load.bs));
            if !stopping && submitted < limit {
                submitted += 1;
                started[slot] = Instant::now();
                again.push(mk(slot, (load.next)(), buf, load.write));
            }
        }
        if !again.is_empty() {
            in_flight += again.len();
            // When several completed together, their successors go in one submission.
            if load.lat {
                let t = Instant::now();
                for r in &again {
                    started[r.user_data as usize] = t;
                }
            }
            rig.ce.submit(again.drain(..), &mut out).expect("submit");
        }
        if let Some(every) = load.progress {
            if last_progress.elapsed() >= every {
                let n = run.ops - progress_ops;
                eprintln!(
                    "    ... {} requests, {:.0}/s lately; {}",
                    run.ops,
                    n as f64 / last_progress.elapsed().as_secs_f64(),
                    rig.set().describe()
                );
                progress_ops = run.ops;
                last_progress = Instant::now();
            }
        }
        if stopping && in_flight == 0 {
            break;
        }
    }
    run.before = before;
    run
}
