//! The portable engine: a small pool of threads doing pread/pwrite/fdatasync behind the
//! [`IoEngine`] trait, for kernels and sandboxes where io_uring cannot be set up.
//!
//! The pool is built so that, under load, a request costs the syscall that does the I/O and
//! little else:
//!
//! - **One lock, two lists.** Queued requests and posted completions live under one mutex.
//!   A worker that finishes a request posts its completion and takes the next request in the
//!   same critical section, and keeps going without sleeping while work is queued.
//! - **Workers are woken only when asleep.** The state counts idle workers; `submit` signals
//!   the condition variable only if one is idle, so a steady queue costs no futex call.
//! - **The poller is woken only when asleep, and under load once per batch.** A blocking
//!   [`IoEngine::poll`] announces in an atomic word how it will sleep (on that word as a
//!   futex, or on its eventfd when it also waits for a waker), re-checks the completion list
//!   and sleeps. A worker that posts a completion while the poller is awake makes no syscall:
//!   the completion is found at the next `poll`. If the poller sleeps, the worker wakes it at
//!   once when fewer than `threads` requests remain queued; while a full round of work for
//!   every worker is still queued it waits until `threads` completions have gathered (the
//!   queue drains meanwhile, so one of the two comes true). So at depth a wakeup costs one
//!   worker one syscall per `threads` requests instead of one per request, for a delay of
//!   at most about one round of service on completions that already waited that long in the
//!   queue; at low depth every completion wakes the poller at once. The wakeup is claimed
//!   with one swap, so only one worker makes it, and the mutex orders the announcement
//!   against the post, so no completion is missed.
//! - **Event-loop mode.** Once [`IoEngine::completion_fd`] has been handed out the caller
//!   sleeps outside `poll`, so workers ring the eventfd whenever the completion list turns
//!   non-empty (once per batch), and `poll` resets it.
//!
//! Workers run requests with [`Device::execute`], which completes short transfers and retries
//! EINTR/EAGAIN; errors are per request. No allocation happens per request (the lists keep
//! their capacity). Dropping the engine lets the workers finish the requests already queued,
//! then joins them; their completions are dropped with the engine.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{closed_device, poll_fds, DevId, Device, EngineKind, EventFd, IoCompletion, IoEngine, IoRequest};

struct Job {
    dev: Arc<Device>,
    req: IoRequest,
}

struct State {
    jobs: VecDeque<Job>,
    done: Vec<IoCompletion>,
    /// Workers waiting on [`Shared::work`].
    idle: usize,
    closing: bool,
}

/// Values of [`Shared::sleep`]: how the poller must be told of a completion.
const AWAKE: u32 = 0;
/// Asleep in `futex_wait` on the word itself.
const SLEEP_FUTEX: u32 = 1;
/// Asleep in `poll` on the eventfd (and the waker).
const SLEEP_FD: u32 = 2;

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    sleep: AtomicU32,
    /// Number of workers.
    threads: usize,
    /// Set for good by `completion_fd`: ring `notify` whenever `done` turns non-empty.
    event_loop: AtomicBool,
    notify: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the poller of a completion just posted (`was_empty`: the list was empty before).
    fn wake_poller(&self, was_empty: bool, urgent: bool) {
        if self.event_loop.load(Ordering::Relaxed) {
            if was_empty {
                self.notify.notify();
            }
            return;
        }
        // The post happened under the lock after the poller's announcement was released by
        // the same lock, or before its re-check: either this load sees the announcement or the
        // poller sees the completion.
        if !urgent || self.sleep.load(Ordering::SeqCst) == AWAKE {
            return;
        }
        match self.sleep.swap(AWAKE, Ordering::SeqCst) {
            SLEEP_FUTEX => futex_wake(&self.sleep),
            SLEEP_FD => self.notify.notify(),
            _ => {}
        }
    }
}

/// The thread-pool engine. Dropping it lets the workers finish the requests already queued,
/// then joins them.
pub struct PsyncEngine {
    devices: Vec<Option<Arc<Device>>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    ready: Vec<IoCompletion>,
    in_flight: usize,
    waker: Option<Arc<EventFd>>,
}

impl PsyncEngine {
    /// An engine with `threads` workers (at least one).
    pub fn new(threads: usize) -> Result<PsyncEngine> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { jobs: VecDeque::new(), done: Vec::new(), idle: 0, closing: false }),
            work: Condvar::new(),
            sleep: AtomicU32::new(AWAKE),
            threads: threads.max(1),
            event_loop: AtomicBool::new(false),
            notify: EventFd::new()?,
        });
        let mut engine = PsyncEngine {
            devices: Vec::new(),
            shared,
            workers: Vec::new(),
            ready: Vec::new(),
            in_flight: 0,
            waker: None,
        };
        for i in 0..threads.max(1) {
            let s = engine.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("ubcache-psync-{i}"))
                .spawn(move || worker(&s))
                .map_err(|e| Error::io("spawn psync worker", e))?;
            engine.workers.push(h);
        }
        Ok(engine)
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Moves posted completions to `out`; returns how many.
    fn take_done(&self, out: &mut Vec<IoCompletion>) -> usize {
        let mut st = self.shared.lock();
        let n = st.done.len();
        out.append(&mut st.done);
        n
    }
}

fn worker(s: &Shared) {
    let Some(mut job) = next_job(s, s.lock()) else { return };
    loop {
        let Job { dev, mut req } = job;
        let result = dev.execute(&mut req);
        // Let go of the device before the completion is visible, so a closed device's
        // descriptor (and exclusive lock) is gone once its last completion is seen.
        drop(dev);
        // Post the completion and take the next job in one critical section; wake the poller
        // (a syscall only if it sleeps) after the lock is released.
        let mut st = s.lock();
        let was_empty = st.done.is_empty();
        st.done.push(IoCompletion::of(req, result));
        let next = st.jobs.pop_front();
        // A sleeping poller is woken at once unless the queue still holds a full round of
        // work for every worker: then it is woken when a batch of `threads` completions
        // has gathered (or the queue runs short), which keeps the wakeup syscall off most
        // workers' paths. Workers keep completing queued jobs, so one of those two
        // conditions comes true.
        let urgent = st.jobs.len() < s.threads || st.done.len() >= s.threads;
        drop(st);
        s.wake_poller(was_empty, urgent);
        job = match next {
            Some(j) => j,
            None => match next_job(s, s.lock()) {
                Some(j) => j,
                None => return,
            },
        };
    }
}

/// The next queued job, sleeping while there is none; `None` once the engine closes and the
/// queue is empty.
fn next_job(s: &Shared, mut st: MutexGuard<'_, State>) -> Option<Job> {
    loop {
        if let Some(j) = st.jobs.pop_front() {
            return Some(j);
        }
        if st.closing {
            return None;
        }
        st.idle += 1;
        st = s.work.wait(st).unwrap_or_else(|e| e.into_inner());
        st.idle -= 1;
    }
}

/// Waits while `word` holds `val`, at most `timeout` (spurious returns are the caller's to handle).
fn futex_wait(word: &AtomicU32, val: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT reads the live u32 behind `word` and sleeps; the timespec outlives
    // the call. Errors (EAGAIN: the value changed, EINTR, ETIMEDOUT) all mean "look again".
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, val, tsp);
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
    }
}

impl IoEngine for PsyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Psync
    }

    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        let slot = self.devices.iter().position(|d| d.is_none()).unwrap_or_else(|| {
            self.devices.push(None);
            self.devices.len() - 1
        });
        self.devices[slot] = Some(dev);
        Ok(DevId(slot as u32))
    }

    fn remove_device(&mut self, id: DevId) -> Result<()> {
        match self.devices.get_mut(id.0 as usize).and_then(Option::take) {
            Some(_) => Ok(()),
            None => Err(Error::new(ErrorKind::Closed, format!("device {} is not open in this engine", id.0))),
        }
    }

    fn device(&self, id: DevId) -> Option<Arc<Device>> {
        self.devices.get(id.0 as usize).and_then(|d| d.clone())
    }

    fn submit(&mut self, req: IoRequest) {
        self.in_flight += 1;
        let Some(dev) = self.device(req.dev) else {
            let e = closed_device(req.dev);
            self.ready.push(IoCompletion::of(req, Err(e)));
            return;
        };
        if let Err(e) = dev.check(&req) {
            self.ready.push(IoCompletion::of(req, Err(e)));
            return;
        }
        let mut st = self.shared.lock();
        st.jobs.push_back(Job { dev, req });
        // Busy workers take queued jobs without sleeping; only an idle one needs a signal.
        let wake = st.idle > 0;
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut n = self.ready.len();
        out.append(&mut self.ready);
        let event_loop = self.shared.event_loop.load(Ordering::Relaxed);
        loop {
            if event_loop {
                // Reset the descriptor before taking the list: a completion posted after the
                // take rings it again.
                self.shared.notify.drain();
            }
            n += self.take_done(out);
            if n > 0 || timeout == Some(Duration::ZERO) {
                break;
            }
            if self.waker.as_ref().is_some_and(|w| w.drain() > 0) {
                break;
            }
            // Nothing outstanding and no doorbell: nothing could end the wait.
            if self.in_flight == 0 && self.waker.is_none() {
                break;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                break;
            }
            let notify = self.shared.notify.as_raw_fd();
            if event_loop {
                match &self.waker {
                    Some(w) => poll_fds(&[notify, w.as_raw_fd()], left),
                    None => poll_fds(&[notify], left),
                };
                continue;
            }
            let how = if self.waker.is_some() { SLEEP_FD } else { SLEEP_FUTEX };
            self.shared.sleep.store(how, Ordering::SeqCst);
            let got = self.take_done(out);
            if got > 0 {
                self.shared.sleep.store(AWAKE, Ordering::SeqCst);
                n += got;
                break;
            }
            match &self.waker {
                None => futex_wait(&self.shared.sleep, SLEEP_FUTEX, left),
                Some(w) => {
                    poll_fds(&[notify, w.as_raw_fd()], left);
                    self.shared.notify.drain();
                }
            }
            self.shared.sleep.store(AWAKE, Ordering::SeqCst);
        }
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()> {
        self.waker = Some(waker);
        Ok(())
    }

    fn completion_fd(&mut self) -> Result<std::os::fd::RawFd> {
        // From now on workers ring this eventfd for the first completion of a batch, and
        // `poll` drains it before it takes the list. Completions posted before the switch
        // may not have rung it: ring once so they are not missed.
        self.shared.event_loop.store(true, Ordering::SeqCst);
        self.shared.notify.notify();
        Ok(self.shared.notify.as_raw_fd())
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
