//! A fault-injecting engine for tests of every layer above the I/O engine.
//!
//! [`FaultEngine`] wraps any [`IoEngine`] and is one itself, so the code under test runs
//! unchanged on top of it (the same seam redb's `StorageBackend` gives its crash tests). It
//! is steered, from any thread, through a [`FaultControl`]:
//!
//! - **Errors**: [`FaultRule`]s fail chosen requests (by op, device, byte range; after
//!   letting some through; a number of times or forever) with an errno, EIO by default.
//! - **Latency**: [`Latency`] delays completions like a slow disk: a fixed cost, a transfer
//!   rate, and a seek model whose cost grows with the square root of the distance the head
//!   travels; with `serial` the emulated disk serves one request at a time, as a disk arm does;
//!   a random `jitter` completes requests out of the order they were made in.
//! - **Crashes**: with volatile writes on, every write or discard is recorded with the
//!   contents it overwrites until a flush that follows its completion makes it durable.
//!   [`FaultControl::crash`] cuts the power: requests in flight fail with EIO, then every
//!   write not yet durable is undone ([`CrashMode::DropUnflushed`]) or torn, each of its
//!   sectors independently kept or undone ([`CrashMode::TearUnflushed`]), newest first.
//!   The device then behaves as after a reboot: what it holds is what a real disk with a
//!   volatile write cache could hold after a power cut, and the test reopens it. A FUA
//!   write ([`IoRequest::fua`]) is durable once it completes; in flight it may tear.
//!
//! Removing a device from the engine forgets its volatile writes (a clean close).
//!
//! An event loop can drive a fault engine too ([`IoEngine::completion_fd`]): its descriptor
//! is an epoll set over the inner engine's descriptor and a timer armed for the next held-back
//! completion, so a benchmark can put an emulated slow disk under the real cache engine.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, DevId, Device, EngineKind, EventFd, IoCompletion, IoEngine, IoOp, IoRequest, OpKind};

/// Which requests a rule fails, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Only this kind of op (any if `None`).
    pub op: Option<OpKind>,
    /// Only this device (any if `None`).
    pub dev: Option<DevId>,
    /// Only requests overlapping this byte range `[start, end)` (any if `None`; a flush
    /// overlaps every range).
    pub range: Option<(u64, u64)>,
    /// Let this many matching requests through before failing any.
    pub skip: u64,
    /// Fail this many matching requests, then retire (forever if `None`).
    pub times: Option<u64>,
    /// The errno the failed requests get.
    pub errno: i32,
}

impl Default for FaultRule {
    fn default() -> Self {
        FaultRule { op: None, dev: None, range: None, skip: 0, times: None, errno: libc::EIO }
    }
}

impl FaultRule {
    /// Fails every request with EIO; narrow it with the builder methods.
    pub fn eio() -> Self {
        FaultRule::default()
    }
    /// Only ops of `kind`.
    pub fn op(mut self, kind: OpKind) -> Self {
        self.op = Some(kind);
        self
    }
    /// Only requests to `dev`.
    pub fn dev(mut self, dev: DevId) -> Self {
        self.dev = Some(dev);
        self
    }
    /// Only requests overlapping `[start, end)`.
    pub fn range(mut self, start: u64, end: u64) -> Self {
        self.range = Some((start, end));
        self
    }
    /// Let `n` matching requests through first.
    pub fn skip(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }
    /// Fail only `n` matching requests.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }
    /// Fail with `errno` instead of EIO.
    pub fn errno(mut self, errno: i32) -> Self {
        self.errno = errno;
        self
    }

    fn matches(&self, req: &IoRequest) -> bool {
        if self.op.is_some_and(|k| k != req.op.kind()) || self.dev.is_some_and(|d| d != req.dev) {
            return false;
        }
        match (self.range, &req.op) {
            (None, _) | (Some(_), IoOp::Flush) => true,
            (Some((s, e)), op) => req.offset < e && req.offset + op.len() > s,
        }
    }
}

/// Seek cost of the emulated disk: nothing for a sequential request, otherwise
/// `track_to_track + (full_stroke - track_to_track) * sqrt(distance / device size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeekModel {
    /// Cost of the shortest non-zero seek.
    pub track_to_track: Duration,
    /// Cost of a seek across the whole device.
    pub full_stroke: Duration,
}

/// Latency added to every request, to emulate a slow disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latency {
    /// Cost of any request.
    pub fixed: Duration,
    /// Transfer rate in bytes per second: each byte costs `1 / bytes_per_sec` (0: free).
    pub bytes_per_sec: u64,
    /// Head movement cost, if any.
    pub seek: Option<SeekModel>,
    /// Serve one request at a time per device (a disk arm), instead of all in parallel.
    pub serial: bool,
    /// Up to this much more per request, drawn at random (seeded by `jitter_seed`): requests
    /// then complete in an order other than the one they were made in, as on a real device.
    pub jitter: Duration,
    /// Seed of the jitter.
    pub jitter_seed: u64,
}

impl Latency {
    fn service(&self, dev_size: u64, head: u64, offset: u64, len: u64) -> Duration {
        let mut t = self.fixed;
        if self.bytes_per_sec > 0 {
            t += Duration::from_secs_f64(len as f64 / self.bytes_per_sec as f64);
        }
        if let Some(s) = self.seek {
            let dist = head.abs_diff(offset);
            if dist > 0 {
                let frac = (dist as f64 / dev_size.max(1) as f64).min(1.0).sqrt();
                t += s.track_to_track + s.full_stroke.saturating_sub(s.track_to_track).mul_f64(frac);
            }
        }
        t
    }
}

/// What a simulated crash does to writes that were not yet durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every such write is lost entirely.
    DropUnflushed,
    /// Each sector of every such write independently survives or is lost (seeded).
    TearUnflushed {
        /// Seed of the choices, for reproducible tests.
        seed: u64,
    },
}

/// What a crash did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrashReport {
    /// Writes (and discards) that were not durable.
    pub unflushed_writes: usize,
    /// Sectors given back their old contents.
    pub sectors_reverted: u64,
    /// Sectors of non-durable writes that kept their new contents.
    pub sectors_kept: u64,
}

struct UndoEntry {
    id: u64,
    dev: DevId,
    offset: u64,
    old: AlignedBuf,
    /// Write epoch at which the write completed; durable once a flush submitted after it
    /// completes.
    completed: Option<u64>,
    /// Byte ranges (within this write) a later FUA write made durable with its own data:
    /// a crash must not give them this write's old contents back.
    settled: Vec<(usize, usize)>,
}

#[derive(Default)]
struct FaultState {
    rules: Vec<FaultRule>,
    latency: Option<Latency>,
    /// Paths of the devices the latency applies to (None: every device).
    latency_only: Option<Vec<std::path::PathBuf>>,
    volatile: bool,
    devices: HashMap<DevId, Arc<Device>>,
    undo: Vec<UndoEntry>,
    epoch: u64,
    next_undo: u64,
    crashes: u64,
    powered_off: bool,
    inner_inflight: usize,
    injected: u64,
    /// Submissions recorded while tracing: device, kind, byte offset.
    trace: Option<Vec<(DevId, OpKind, u64)>>,
}

struct FaultShared {
    state: Mutex<FaultState>,
    drained: Condvar,
}

impl FaultShared {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Steers a [`FaultEngine`] from any thread.
#[derive(Clone)]
pub struct FaultControl {
    shared: Arc<FaultShared>,
}

impl FaultControl {
    /// Adds a rule; the first matching rule decides a request's fate.
    pub fn add_rule(&self, rule: FaultRule) {
        self.shared.lock().rules.push(rule);
    }

    /// Starts recording every request submitted (device, kind, byte offset), in order.
    pub fn start_trace(&self) {
        self.shared.lock().trace = Some(Vec::new());
    }

    /// The requests submitted since [`FaultControl::start_trace`]; recording goes on.
    pub fn take_trace(&self) -> Vec<(DevId, OpKind, u64)> {
        self.shared.lock().trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// Sets (or with `None` removes) the latency model for requests submitted from now on.
    pub fn set_latency(&self, latency: Option<Latency>) {
        self.shared.lock().latency = latency;
    }

    /// Limits the latency model to the devices opened from `paths` (None: every device), to
    /// emulate a slow backing device behind a fast cache.
    pub fn set_latency_only(&self, paths: Option<Vec<std::path::PathBuf>>) {
        self.shared.lock().latency_only = paths;
    }

    /// Adds `path` to the devices the latency model applies to (starting the list if the
    /// model applied to every device), for a backing device attached after the engine started.
    pub fn add_latency_path(&self, path: &std::path::Path) {
        self.shared.lock().latency_only.get_or_insert_with(Vec::new).push(path.to_path_buf());
    }

    /// Turns volatile-write tracking on or off (off forgets what was tracked).
    pub fn set_volatile(&self, on: bool) {
        let mut st = self.shared.lock();
        st.volatile = on;
        if !on {
            st.undo.clear();
        }
    }

    /// Requests failed by rules so far.
    pub fn injected(&self) -> u64 {
        self.shared.lock().injected
    }

    /// Writes (and discards) tracked as not yet durable.
    pub fn unflushed_writes(&self) -> usize {
        self.shared.lock().undo.len()
    }

    /// Cuts the power (see the module docs) and powers back on. Waits until requests
    /// already at the device have finished, so the engine must be driven meanwhile by
    /// another thread (an [`crate::io::IoThread`]); for an engine driven by the calling
    /// thread use [`FaultEngine::crash`].
    pub fn crash(&self, mode: CrashMode) -> Result<CrashReport> {
        let mut st = self.shared.lock();
        st.powered_off = true;
        while st.inner_inflight > 0 {
            st = self.shared.drained.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let r = apply_crash(&mut st, mode);
        st.powered_off = false;
        r
    }
}

impl FaultControl {
    /// Cuts the power after the engine this steers was dropped, as a process killed
    /// mid-flight leaves it: whatever the engine still had in flight died with it, and
    /// every write not yet durable is undone or torn as [`FaultControl::crash`] does. The
    /// devices are let go, so they can be opened again.
    pub fn cut_power_after_drop(&self, mode: CrashMode) -> Result<CrashReport> {
        let mut st = self.shared.lock();
        st.inner_inflight = 0;
        let r = apply_crash(&mut st, mode);
        st.devices.clear();
        st.undo.clear();
        r
    }
}

fn apply_crash(st: &mut FaultState, mode: CrashMode) -> Result<CrashReport> {
    // Completions held back by the latency model were never seen by the host: they fail.
    st.crashes += 1;
    let mut report = CrashReport { unflushed_writes: st.undo.len(), ..Default::default() };
    let mut rng = match mode {
        CrashMode::TearUnflushed { seed } => seed ^ 0x9e37_79b9_7f4a_7c15,
        CrashMode::DropUnflushed => 0,
    };
    let mut touched = Vec::new();
    for e in st.undo.drain(..).rev() {
        let Some(dev) = st.devices.get(&e.dev) else { continue };
        let sector = dev.logical_block_size() as usize;
        // Restores the old contents of a range, sector by sector, but for what a later FUA
        // write settled.
        let restore = |off: usize, len: usize| {
            let mut at = off;
            while at < off + len {
                let n = sector.min(off + len - at);
                if !e.settled.iter().any(|&(s, t)| s < at + n && at < t) {
                    dev.write_at(&e.old[at..at + n], e.offset + at as u64)
                        .map_err(|err| Error::io(format!("{}: crash simulation restore", dev.path().display()), err))?;
                }
                at += n;
            }
            Ok::<(), Error>(())
        };
        match mode {
            CrashMode::DropUnflushed => {
                restore(0, e.old.len())?;
                report.sectors_reverted += e.old.len().div_ceil(sector) as u64;
            }
            CrashMode::TearUnflushed { .. } => {
                let mut off = 0;
                while off < e.old.len() {
                    let len = sector.min(e.old.len() - off);
                    // xorshift64*: enough randomness to pick sectors, reproducible by seed.
                    rng ^= rng >> 12;
                    rng ^= rng << 25;
                    rng ^= rng >> 27;
                    if rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 63 == 1 {
                        restore(off, len)?;
                        report.sectors_reverted += 1;
                    } else {
                        report.sectors_kept += 1;
                    }
                    off += len;
                }
            }
        }
        if !touched.contains(&e.dev) {
            touched.push(e.dev);
        }
    }
    for id in touched {
        if let Some(dev) = st.devices.get(&id) {
            dev.sync_data()
                .map_err(|err| Error::io(format!("{}: crash simulation sync", dev.path().display()), err))?;
        }
    }
    Ok(report)
}

struct Pending {
    user_data: u64,
    due: Option<Instant>,
    undo: Option<u64>,
    /// A FUA write: durable as soon as it completes.
    fua: bool,
    flush_epoch: Option<u64>,
}

/// A completion held back until the emulated disk would have finished it.
struct Delayed {
    due: Instant,
    seq: u64,
    /// Crash count when it was held back; a crash since then fails it.
    crashes: u64,
    c: IoCompletion,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

#[derive(Clone, Copy)]
struct Head {
    busy_until: Instant,
    pos: u64,
}

/// The fault-injecting engine (see the module docs).
pub struct FaultEngine<E: IoEngine> {
    inner: E,
    shared: Arc<FaultShared>,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    ready: Vec<IoCompletion>,
    heads: HashMap<DevId, Head>,
    in_flight: usize,
    /// The descriptor an event loop watches, once asked for.
    notifier: Option<Notifier>,
}

/// An epoll set over the inner engine's completion descriptor and a timerfd: readable when
/// the inner engine has completions or a held-back one is due.
struct Notifier {
    epoll: OwnedFd,
    timer: OwnedFd,
}

impl Notifier {
    fn new(inner_fd: RawFd) -> Result<Notifier> {
        let sys = |what: &str| Error::io(format!("fault engine: {what}"), std::io::Error::last_os_error());
        // SAFETY: plain system calls; each descriptor is owned as soon as it is made.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(sys("epoll_create1"));
        }
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let timer = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if timer < 0 {
            return Err(sys("timerfd_create"));
        }
        let timer = unsafe { OwnedFd::from_raw_fd(timer) };
        for fd in [inner_fd, timer.as_raw_fd()] {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
            // SAFETY: both descriptors are open; `ev` outlives the call.
            if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(sys("epoll_ctl"));
            }
        }
        Ok(Notifier { epoll, timer })
    }

    /// Fires the timer after `after` (None: disarms it). Setting it also clears a past expiry.
    fn arm(&self, after: Option<Duration>) {
        let after = after.map(|d| d.max(Duration::from_nanos(1)));
        let value = after.map_or(libc::timespec { tv_sec: 0, tv_nsec: 0 }, |d| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        // SAFETY: the timer is open; failure leaves it as it was, which only delays a wakeup
        // until the next call into the engine.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }
}

impl<E: IoEngine> FaultEngine<E> {
    /// Wraps `inner`; no faults until rules, latency or volatile writes are set.
    pub fn new(inner: E) -> Self {
        FaultEngine {
            inner,
            shared: Arc::new(FaultShared { state: Mutex::new(FaultState::default()), drained: Condvar::new() }),
            next_tag: 0,
            pending: HashMap::new(),
            delayed: BinaryHeap::new(),
            ready: Vec::new(),
            heads: HashMap::new(),
            in_flight: 0,
            notifier: None,
        }
    }

    /// Points the event loop's timer at what is due next: now if completions are ready,
    /// else the first held-back one.
    fn rearm(&self) {
        let Some(n) = &self.notifier else { return };
        if !self.ready.is_empty() {
            n.arm(Some(Duration::ZERO));
        } else {
            n.arm(self.delayed.peek().map(|d| d.0.due.saturating_duration_since(Instant::now())));
        }
    }

    /// A handle to steer this engine from any thread.
    pub fn control(&self) -> FaultControl {
        FaultControl { shared: self.shared.clone() }
    }

    /// The wrapped engine.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// [`FaultControl::crash`] for an engine driven by the calling thread: drives the
    /// inner engine until requests at the device finish (they complete with EIO), then
    /// cuts the power.
    pub fn crash(&mut self, mode: CrashMode) -> Result<CrashReport> {
        self.shared.lock().powered_off = true;
        let mut got = Vec::new();
        while self.shared.lock().inner_inflight > 0 {
            self.inner.poll(&mut got, None)?;
            self.absorb(&mut got);
        }
        let mut st = self.shared.lock();
        let r = apply_crash(&mut st, mode);
        st.powered_off = false;
        r
    }

    fn power_off_error() -> Error {
        Error::io("simulated power cut", std::io::Error::from_raw_os_error(libc::EIO))
    }

    fn release_due(&mut self) {
        if self.delayed.is_empty() {
            return;
        }
        let crashes = self.shared.lock().crashes;
        let now = Instant::now();
        while self.delayed.peek().is_some_and(|d| d.0.due <= now) {
            let mut d = self.delayed.pop().expect("peeked").0;
            if d.crashes != crashes {
                d.c.result = Err(Self::power_off_error());
            }
            self.ready.push(d.c);
        }
    }

    /// Takes completions from the inner engine: updates the crash bookkeeping and holds
    /// each back until its emulated due time.
    fn absorb(&mut self, got: &mut Vec<IoCompletion>) {
        if got.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut st = self.shared.lock();
        for mut c in got.drain(..) {
            let Some(p) = self.pending.remove(&c.user_data) else { continue };
            c.user_data = p.user_data;
            st.inner_inflight -= 1;
            if st.powered_off {
                c.result = Err(Self::power_off_error());
            } else if c.result.is_ok() {
                if let Some(id) = p.undo {
                    if p.fua {
                        // Durable now, and over whatever older unflushed writes left there.
                        let (dev, start, end) = (c.dev, c.offset, c.offset + c.op.len());
                        st.undo.retain(|e| e.id != id);
                        for e in st.undo.iter_mut().filter(|e| e.dev == dev && e.id < id) {
                            let (es, ee) = (e.offset, e.offset + e.old.len() as u64);
                            if es < end && start < ee {
                                e.settled.push(((start.max(es) - es) as usize, (end.min(ee) - es) as usize));
                            }
                        }
                    } else {
                        let epoch = st.epoch;
                        st.epoch += 1;
                        if let Some(e) = st.undo.iter_mut().find(|e| e.id == id) {
                            e.completed = Some(epoch);
                        }
                    }
                }
                if let Some(fe) = p.flush_epoch {
                    let dev = c.dev;
                    st.undo.retain(|e| !(e.dev == dev && e.completed.is_some_and(|ep| ep < fe)));
                }
            }
            // A failed write keeps its entry: it may have landed in part.
            match p.due {
                Some(due) if due > now => {
                    self.next_tag += 1;
                    self.delayed.push(Reverse(Delayed { due, seq: self.next_tag, crashes: st.crashes, c }));
                }
                _ => self.ready.push(c),
            }
        }
        drop(st);
        self.shared.drained.notify_all();
    }
}

impl<E: IoEngine> IoEngine for FaultEngine<E> {
    fn kind(&self) -> EngineKind {
        EngineKind::Fault
    }

    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        let id = self.inner.add_device(dev.clone())?;
        self.shared.lock().devices.insert(id, dev);
        Ok(id)
    }

    fn remove_device(&mut self, id: DevId) -> Result<()> {
        self.inner.remove_device(id)?;
        let mut st = self.shared.lock();
        st.devices.remove(&id);
        st.undo.retain(|e| e.dev != id);
        Ok(())
    }

    fn device(&self, id: DevId) -> Option<Arc<Device>> {
        self.inner.device(id)
    }

    fn submit(&mut self, mut req: IoRequest) {
        self.in_flight += 1;
        let mut st = self.shared.lock();
        if st.powered_off {
            drop(st);
            self.ready.push(IoCompletion::of(req, Err(Self::power_off_error())));
            self.rearm();
            return;
        }
        if let Some(t) = st.trace.as_mut() {
            t.push((req.dev, req.op.kind(), req.offset));
        }
        let dev = self.inner.device(req.dev);
        let valid = dev.as_ref().is_some_and(|d| d.check(&req).is_ok());
        if valid {
            let mut hit = None;
            for (i, r) in st.rules.iter_mut().enumerate() {
                if !r.matches(&req) {
                    continue;
                }
                if r.skip > 0 {
                    r.skip -= 1;
                    break;
                }
                hit = Some((i, r.errno));
                break;
            }
            if let Some((i, errno)) = hit {
                st.injected += 1;
                let r = &mut st.rules[i];
                if let Some(t) = r.times.as_mut() {
                    *t -= 1;
                    if *t == 0 {
                        st.rules.remove(i);
                    }
                }
                drop(st);
                let what = format!("injected fault on {:?} at offset {}", req.op.kind(), req.offset);
                self.ready.push(IoCompletion::of(req, Err(Error::io(what, std::io::Error::from_raw_os_error(errno)))));
                self.rearm();
                return;
            }
        }
        let dev = dev.filter(|_| valid);
        let fua = req.fua && req.op.kind() == OpKind::Write;
        let mut p = Pending { user_data: req.user_data, due: None, undo: None, fua, flush_epoch: None };
        if let Some(dev) = &dev {
            let slow = st.latency_only.as_ref().is_none_or(|only| only.iter().any(|p| p == dev.path()));
            if let Some(lat) = st.latency.filter(|_| slow) {
                let now = Instant::now();
                let len = req.op.len();
                let h = self.heads.entry(req.dev).or_insert(Head { busy_until: now, pos: 0 });
                let mut service = lat.service(dev.size(), h.pos, req.offset, len);
                if !lat.jitter.is_zero() {
                    // splitmix64 over a per-engine counter: reproducible for a seed.
                    let mut z = lat.jitter_seed.wrapping_add(self.next_tag.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    service += lat.jitter.mul_f64((z >> 11) as f64 / (1u64 << 53) as f64);
                }
                let start = if lat.serial { h.busy_until.max(now) } else { now };
                let due = start + service;
                if lat.serial {
                    h.busy_until = due;
                }
                if len > 0 {
                    h.pos = req.offset + len;
                }
                p.due = Some(due);
            }
            match req.op.kind() {
                OpKind::Write | OpKind::Discard if st.volatile => {
                    let mut old = AlignedBuf::new(req.op.len() as usize);
                    if let Err(e) = dev.read_at(&mut old, req.offset) {
                        drop(st);
                        let err = Error::io(
                            format!("{}: crash simulation could not save old contents", dev.path().display()),
                            e,
                        );
                        self.ready.push(IoCompletion::of(req, Err(err)));
                        self.rearm();
                        return;
                    }
                    let id = st.next_undo;
                    st.next_undo += 1;
                    st.undo.push(UndoEntry {
                        id,
                        dev: req.dev,
                        offset: req.offset,
                        old,
                        completed: None,
                        settled: Vec::new(),
                    });
                    p.undo = Some(id);
                }
                OpKind::Flush => p.flush_epoch = Some(st.epoch),
                _ => {}
            }
        }
        st.inner_inflight += 1;
        drop(st);
        self.next_tag += 1;
        let tag = self.next_tag;
        self.pending.insert(tag, p);
        req.user_data = tag;
        self.inner.submit(req);
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        // One pass: returning with nothing is allowed, and it lets the waker through.
        self.release_due();
        let mut wait = if self.ready.is_empty() { timeout } else { Some(Duration::ZERO) };
        if let Some(d) = self.delayed.peek() {
            let until = d.0.due.saturating_duration_since(Instant::now());
            wait = Some(wait.map_or(until, |w| w.min(until)));
        }
        let mut got = Vec::new();
        self.inner.poll(&mut got, wait)?;
        self.absorb(&mut got);
        self.release_due();
        let n = self.ready.len();
        out.append(&mut self.ready);
        self.in_flight -= n;
        self.rearm();
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()> {
        self.inner.set_waker(waker)
    }

    fn completion_fd(&mut self) -> Result<RawFd> {
        if self.notifier.is_none() {
            let inner = self.inner.completion_fd()?;
            self.notifier = Some(Notifier::new(inner)?);
            self.rearm();
        }
        Ok(self.notifier.as_ref().expect("just set").epoll.as_raw_fd())
    }

    fn spurious_wakeup(&mut self) {
        self.inner.spurious_wakeup();
        self.rearm();
    }
}
