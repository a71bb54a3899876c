//! A [`CacheEngine`] on an engine thread of its own, for bench/engine's comparison of where
//! the engine should run (`placement.rs`): the same [`Rig`] as rig.rs, but opened, loaded
//! and driven on a thread that nothing else runs on, the way `ubcache_core::io::IoThread`
//! serves raw engines and a JavaScript binding would use it:
//!
//! - requests go in through a queue (one `Mutex<Vec>` push per batch: the requests a batch of
//!   completions made) and an eventfd doorbell, rung only when the engine thread is about to
//!   sleep or asleep (IoThread's `parked`/`pending` handshake), so a busy engine costs the
//!   submitter no system call;
//! - the engine thread takes everything queued, hands it to `CacheEngine::submit` in one
//!   call, reaps, runs background work when due, and sleeps in poll(2) on the ring's
//!   descriptor and the doorbell at once (until the next background deadline);
//! - each loop turn's completions go back in one batch through a second queue and an
//!   eventfd that is written only when no earlier batch is still unclaimed (uv_async_send's
//!   coalescing: what a napi threadsafe function costs per call), so the submitter wakes
//!   once per batch, or once for several.
//!
//! The io_uring ring is single-issuer: the engine thread must be the one that first submits,
//! so it opens the set itself. [`CacheThread::with`] runs a closure on the engine thread
//! with the rig (set-up, statistics, and the inline runs, which then drive the engine from
//! that same thread exactly as today).
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::rig::{Load, Rig, RigConfig, Run, Stop};
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, CacheSetStats};
use ubcache_core::io::{AlignedBuf, BufPool, DevId, DirectIo, EventFd, IoCompletion, IoRequest};

/// How to open a [`CacheThread`]'s rig (an owned [`RigConfig`]).
#[derive(Clone)]
pub struct ThreadRigConfig {
    pub cache: PathBuf,
    pub cache_direct: DirectIo,
    pub backing: PathBuf,
    pub backing_direct: DirectIo,
    pub mode: CacheMode,
    pub set: CacheSetOptions,
    pub arena_bytes: usize,
    /// How long the engine thread spins for new requests once its queue is empty, before it
    /// sleeps (IoThreadOptions::spin; zero, its default: never).
    pub spin: Duration,
}

type WithFn = Box<dyn FnOnce(&mut Rig) + Send>;

enum Cmd {
    Io(IoRequest),
    With(WithFn),
}

#[derive(Default)]
struct Counters {
    /// Doorbell rings by the submitter (the engine thread was asleep or about to be).
    doorbells: AtomicU64,
    /// Batches of completions handed back.
    batches: AtomicU64,
    /// Completions handed back.
    completions: AtomicU64,
    /// Completion eventfd writes (batches that found no earlier one unclaimed).
    completion_rings: AtomicU64,
    /// Times the engine thread slept in poll(2).
    sleeps: AtomicU64,
}

struct Shared {
    sq: Mutex<Vec<Cmd>>,
    pending: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
    doorbell: EventFd,
    cq: Mutex<Vec<IoCompletion>>,
    /// A completion ring is outstanding (the submitter has not claimed the queue since).
    cq_armed: AtomicBool,
    cq_bell: EventFd,
    n: Counters,
}

/// Counters of a [`CacheThread`] (see the fields of `Counters`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadCounters {
    pub doorbells: u64,
    pub batches: u64,
    pub completions: u64,
    pub completion_rings: u64,
    pub sleeps: u64,
    /// Times the submitter slept in poll(2) on the completion eventfd.
    pub waits: u64,
}

impl ThreadCounters {
    pub fn minus(&self, o: &ThreadCounters) -> ThreadCounters {
        ThreadCounters {
            doorbells: self.doorbells - o.doorbells,
            batches: self.batches - o.batches,
            completions: self.completions - o.completions,
            completion_rings: self.completion_rings - o.completion_rings,
            sleeps: self.sleeps - o.sleeps,
            waits: self.waits - o.waits,
        }
    }
}

/// See the module docs.
pub struct CacheThread {
    shared: Arc<Shared>,
    join: Option<JoinHandle<()>>,
    /// The engine's buffer pool (shared with the engine thread).
    pub pool: BufPool,
    /// The cached device's handle and inode.
    pub handle: u32,
    pub inode: u32,
    /// Size of the cached device in bytes.
    pub dev_bytes: u64,
    cpu_clock: libc::clockid_t,
    waits: u64,
}

fn cpu_of(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the calling thread.
pub fn this_thread_cpu() -> Duration {
    cpu_of(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole process (every thread, io_uring workers included), user + system.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn wait_readable(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: a valid array of pollfds.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

impl CacheThread {
    /// Starts the engine thread, which opens the rig (loads the set, starts it, attaches the
    /// backing device) and then serves requests; returns once the set runs.
    pub fn spawn(cfg: ThreadRigConfig) -> CacheThread {
        let shared = Arc::new(Shared {
            sq: Mutex::new(Vec::with_capacity(256)),
            pending: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            doorbell: EventFd::new().expect("eventfd"),
            cq: Mutex::new(Vec::with_capacity(256)),
            cq_armed: AtomicBool::new(false),
            cq_bell: EventFd::new().expect("eventfd"),
            n: Counters::default(),
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        let join = std::thread::Builder::new()
            .name("ubcache-cache".into())
            .spawn(move || {
                let rig = Rig::open(&RigConfig {
                    cache: &cfg.cache,
                    cache_direct: cfg.cache_direct,
                    backing: &cfg.backing,
                    backing_direct: cfg.backing_direct,
                    mode: cfg.mode,
                    set: cfg.set.clone(),
                    arena_bytes: cfg.arena_bytes,
                });
                let _ = tx.send((rig.pool.clone(), rig.handle, rig.inode, rig.dev_bytes()));
                run(rig, &s, cfg.spin);
            })
            .expect("spawn the engine thread");
        let (pool, handle, inode, dev_bytes) = rx.recv().expect("the engine thread failed to open the set");
        let mut clock: libc::clockid_t = 0;
        // SAFETY: a live thread's pthread_t (joined only in drop).
        let r = unsafe { libc::pthread_getcpuclockid(join.as_pthread_t(), &mut clock) };
        assert_eq!(r, 0, "pthread_getcpuclockid");
        CacheThread { shared, join: Some(join), pool, handle, inode, dev_bytes, cpu_clock: clock, waits: 0 }
    }

    /// CPU time of the engine thread so far.
    pub fn engine_cpu(&self) -> Duration {
        cpu_of(self.cpu_clock)
    }

    /// The engine thread's CPU clock.
    pub fn cpu_clock(&self) -> libc::clockid_t {
        self.cpu_clock
    }

    pub fn counters(&self) -> ThreadCounters {
        let n = &self.shared.n;
        ThreadCounters {
            doorbells: n.doorbells.load(Ordering::Relaxed),
            batches: n.batches.load(Ordering::Relaxed),
            completions: n.completions.load(Ordering::Relaxed),
            completion_rings: n.completion_rings.load(Ordering::Relaxed),
            sleeps: n.sleeps.load(Ordering::Relaxed),
            waits: self.waits,
        }
    }

    fn push(&self, cmds: impl Iterator<Item = Cmd>) {
        let s = &self.shared;
        let mut q = s.sq.lock().unwrap();
        let before = q.len();
        q.extend(cmds);
        let added = q.len() - before;
        drop(q);
        s.pending.fetch_add(added, Ordering::SeqCst);
        if s.parked.swap(false, Ordering::SeqCst) {
            s.n.doorbells.fetch_add(1, Ordering::Relaxed);
            s.doorbell.notify();
        }
    }

    /// Enqueues `reqs` (emptying it) with one doorbell at most.
    pub fn submit(&self, reqs: &mut Vec<IoRequest>) {
        if !reqs.is_empty() {
            self.push(reqs.drain(..).map(Cmd::Io));
        }
    }

    /// Waits up to `timeout` for the completion eventfd, then takes every batch handed
    /// back since the last call (as a JavaScript event loop would on its async handle).
    pub fn wait(&mut self, out: &mut Vec<IoCompletion>, timeout: Duration) {
        let s = &self.shared;
        let mut p = [libc::pollfd { fd: s.cq_bell.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        self.waits += 1;
        wait_readable(&mut p, timeout);
        if p[0].revents & libc::POLLIN == 0 {
            return;
        }
        s.cq_bell.drain();
        s.cq_armed.store(false, Ordering::SeqCst);
        out.append(&mut s.cq.lock().unwrap());
        if crate::rig::INTERRUPTED.load(Ordering::Relaxed) {
            panic!("interrupted");
        }
    }

    /// Runs `f` with the rig on the engine thread, after everything submitted before, and
    /// returns what it returns.
    pub fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Rig) -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.push(std::iter::once(Cmd::With(Box::new(move |rig: &mut Rig| {
            let _ = tx.send(f(rig));
        }))));
        rx.recv().expect("the engine thread died")
    }

    pub fn stats(&self) -> CacheSetStats {
        self.with(|rig| rig.stats())
    }
}

impl Drop for CacheThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.doorbell.notify();
        if let Some(j) = self.join.take() {
            if j.join().is_err() && !std::thread::panicking() {
                panic!("the engine thread panicked");
            }
        }
    }
}

fn deliver(s: &Shared, out: &mut Vec<IoCompletion>) {
    s.n.batches.fetch_add(1, Ordering::Relaxed);
    s.n.completions.fetch_add(out.len() as u64, Ordering::Relaxed);
    s.cq.lock().unwrap().append(out);
    if !s.cq_armed.swap(true, Ordering::SeqCst) {
        s.n.completion_rings.fetch_add(1, Ordering::Relaxed);
        s.cq_bell.notify();
    }
}

/// The engine thread's loop.
fn run(mut rig: Rig, s: &Shared, spin: Duration) {
    let mut cmds: Vec<Cmd> = Vec::with_capacity(256);
    let mut reqs: Vec<IoRequest> = Vec::with_capacity(256);
    let mut out: Vec<IoCompletion> = Vec::with_capacity(256);
    let ring = rig.ce.fd();
    loop {
        {
            let mut q = s.sq.lock().unwrap();
            std::mem::swap(&mut *q, &mut cmds);
        }
        if !cmds.is_empty() {
            s.pending.fetch_sub(cmds.len(), Ordering::SeqCst);
            for cmd in cmds.drain(..) {
                match cmd {
                    Cmd::Io(r) => reqs.push(r),
                    Cmd::With(f) => {
                        if !reqs.is_empty() {
                            rig.ce.submit(reqs.drain(..), &mut out).expect("submit");
                        }
                        f(&mut rig);
                    }
                }
            }
            if !reqs.is_empty() {
                // Everything queued since the last turn, in one call.
                rig.ce.submit(reqs.drain(..), &mut out).expect("submit");
            }
        }
        rig.ce.reap(&mut out).expect("reap");
        if rig.ce.next_deadline().is_some_and(|d| d <= Instant::now()) {
            rig.ce.tick(&mut out).expect("tick");
        }
        if !out.is_empty() {
            deliver(s, &mut out);
            continue;
        }
        if s.stop.load(Ordering::SeqCst) && s.pending.load(Ordering::SeqCst) == 0 {
            rig.drain();
            return;
        }
        if !spin.is_zero() && rig.ce.in_flight() == 0 {
            let until = Instant::now() + spin;
            while s.pending.load(Ordering::SeqCst) == 0 && !s.stop.load(Ordering::SeqCst) && Instant::now() < until {
                std::hint::spin_loop();
            }
            if s.pending.load(Ordering::SeqCst) > 0 {
                continue;
            }
        }
        s.parked.store(true, Ordering::SeqCst);
        if s.pending.load(Ordering::SeqCst) > 0 || s.stop.load(Ordering::SeqCst) {
            s.parked.store(false, Ordering::SeqCst);
            continue;
        }
        let wait = match rig.ce.next_deadline() {
            Some(d) => d.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
            None => Duration::from_millis(100),
        };
        let mut p = [
            libc::pollfd { fd: ring, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: s.doorbell.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if !wait.is_zero() {
            s.n.sleeps.fetch_add(1, Ordering::Relaxed);
            wait_readable(&mut p, wait);
        }
        s.parked.store(false, Ordering::SeqCst);
        if p[1].revents & libc::POLLIN != 0 {
            s.doorbell.drain();
        }
    }
}

/// CPU time each thread spent over a run, and the wall time it took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// The engine thread.
    pub engine: Duration,
    /// The submitting (bench) thread.
    pub driver: Duration,
    /// The whole process.
    pub process: Duration,
    pub wall: Duration,
}

impl Cpu {
    /// Microseconds of CPU per request: `busy` is CPU time over the run's wall time, and the
    /// run's rate turns that into time per request (the run's CPU includes its warm-up, at
    /// the same rate).
    pub fn us_per_req(busy: Duration, wall: Duration, iops: f64) -> f64 {
        busy.as_secs_f64() / wall.as_secs_f64() / iops * 1e6
    }
}

/// Measures the CPU of the engine thread (its `clock`), this thread and the process across `f`.
pub fn measure_cpu<T>(clock: libc::clockid_t, f: impl FnOnce() -> T) -> (T, Cpu) {
    let (e0, d0, p0, t0) = (cpu_of(clock), this_thread_cpu(), process_cpu(), Instant::now());
    let r = f();
    let cpu = Cpu {
        engine: cpu_of(clock) - e0,
        driver: this_thread_cpu() - d0,
        process: process_cpu() - p0,
        wall: t0.elapsed(),
    };
    (r, cpu)
}

/// [`crate::rig::drive`] with the engine on its thread: the same closed loop, requests
/// submitted to the engine thread's queue (the successors of one batch of completions
/// together) and completions taken in batches from its completion queue when its eventfd
/// fires. Statistics are fetched from the engine thread at the start and end of the
/// measurement.
pub fn drive_thread(ct: &mut CacheThread, load: Load) -> Run {
    let qd = load.qd;
    let h = DevId(ct.handle);
    let mut started = vec![Instant::now(); qd];
    let mut bufs: Vec<Option<AlignedBuf>> = (0..qd)
        .map(|i| {
            let mut b = ct.pool.get(load.bs);
            if load.write && !load.zero_data {
                let mut r = crate::rig::Rng(0x9e37_79b9_7f4a_7c15 ^ i as u64);
                for c in b.chunks_mut(8) {
                    c.copy_from_slice(&r.next().to_le_bytes());
                }
            }
            Some(b)
        })
        .collect();
    let mk = |slot: usize, off: u64, buf: AlignedBuf, write: bool| {
        if write {
            IoRequest::write(h, off, buf, slot as u64)
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
    ct.submit(&mut again);
    let warm_end = start + load.warm;
    let mut t0: Option<Instant> = None;
    let mut before = ct.stats();
    let mut run =
        Run { ops: 0, secs: 0.0, lat: Vec::new(), marks: Vec::new(), before, after: before, dev_written: None };
    if load.lat {
        run.lat.reserve(1 << 20);
    }
    let mut in_flight = qd;
    let mut stopping = false;
    loop {
        if out.is_empty() {
            ct.wait(&mut out, Duration::from_millis(100));
        }
        let now = Instant::now();
        if t0.is_none() && now >= warm_end {
            t0 = Some(now);
            before = ct.stats();
        }
        for c in out.drain(..) {
            let slot = c.user_data as usize;
            if let Err(e) = &c.result {
                panic!("request failed: {e}");
            }
            in_flight -= 1;
            if let (Some(t0), false) = (t0, stopping) {
                run.ops += 1;
                if load.lat {
                    run.lat.push((now - started[slot]).as_nanos() as u64);
                }
                stopping = submitted >= limit
                    || match load.stop {
                        Stop::Time(d) => now - t0 >= d,
                        Stop::Ops(n) => run.ops >= n,
                    };
                if stopping {
                    run.secs = (now - t0).as_secs_f64();
                    run.after = ct.stats();
                }
            }
            let buf = c.into_buf().unwrap_or_else(|| ct.pool.get(load.bs));
            if !stopping && submitted < limit {
                submitted += 1;
                started[slot] = Instant::now();
                again.push(mk(slot, (load.next)(), buf, load.write));
            }
        }
        if !again.is_empty() {
            in_flight += again.len();
            if load.lat {
                let t = Instant::now();
                for r in &again {
                    started[r.user_data as usize] = t;
                }
            }
            ct.submit(&mut again);
        }
        if stopping && in_flight == 0 {
            break;
        }
    }
    run.before = before;
    run
}
