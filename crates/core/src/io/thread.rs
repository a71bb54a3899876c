//! The engine thread: one thread owns an [`IoEngine`] (and later the cache set's allocator
//! and index), so the hot path takes no locks beyond one short queue push per request.
//!
//! Any thread enqueues requests with [`IoThread::submit`]; a doorbell eventfd wakes the
//! engine thread only when it is about to sleep (a Dekker-style handshake on `parked` and
//! `pending`), so a busy engine costs submitters no syscall. The engine loop takes new
//! requests, submits them, and waits on the ring for completions *or* the doorbell at once.
//! Each loop turn hands every completion it reaped to the sink in one call, so a binding
//! wraps the sink in a single cross-thread call per batch.
//!
//! Closing stops new requests, lets every request already accepted complete (their
//! completions still reach the sink) and then joins the thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{DevId, Device, EngineKind, EventFd, IoCompletion, IoEngine, IoRequest};

/// Where completions go: called on the engine thread with one batch per loop turn.
pub type CompletionSink = Box<dyn FnMut(Vec<IoCompletion>) + Send>;

type EngineFn = Box<dyn FnOnce(&mut dyn IoEngine) + Send>;

enum Cmd {
    Io(IoRequest),
    AddDevice(Arc<Device>, mpsc::Sender<Result<DevId>>),
    RemoveDevice(DevId, mpsc::Sender<Result<()>>),
    /// Runs a closure with the engine on its thread (tests and control paths).
    With(EngineFn),
}

struct Shared {
    queue: Mutex<Vec<Cmd>>,
    pending: AtomicUsize,
    parked: AtomicBool,
    closing: AtomicBool,
    doorbell: Arc<EventFd>,
    wakeups: AtomicUsize,
    batches: AtomicUsize,
}

/// Counters of an engine thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoThreadStats {
    /// Doorbell rings by submitters (the engine thread was asleep).
    pub wakeups: usize,
    /// Batches handed to the sink.
    pub batches: usize,
}

/// Tuning of an engine thread.
#[derive(Debug, Clone, Copy)]
pub struct IoThreadOptions {
    /// How long the thread spins waiting for new requests once it has nothing in flight,
    /// before it sleeps until the doorbell. On a machine with a core to spare this saves a
    /// wakeup per request at low queue depths; on a busy one the spinning takes the CPU
    /// the submitter needs, so the default is zero (never spin).
    pub spin: Duration,
}

impl Default for IoThreadOptions {
    fn default() -> Self {
        IoThreadOptions { spin: Duration::ZERO }
    }
}

/// A request the engine thread would not take, given back to the caller.
#[derive(Debug)]
pub struct Rejected {
    /// Why ([`ErrorKind::Closed`]).
    pub error: Error,
    /// The request, with its buffers.
    pub request: IoRequest,
}

/// Handle to an engine thread. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct IoThread {
    shared: Arc<Shared>,
    join: Mutex<Option<JoinHandle<()>>>,
    kind: EngineKind,
}

impl IoThread {
    /// Starts a thread that owns `engine` and feeds completions to `sink`, with the default
    /// [`IoThreadOptions`].
    pub fn spawn<E: IoEngine + 'static>(engine: E, sink: CompletionSink) -> Result<IoThread> {
        IoThread::spawn_with(engine, sink, IoThreadOptions::default())
    }

    /// Starts a thread that owns `engine` and feeds completions to `sink`.
    pub fn spawn_with<E: IoEngine + 'static>(
        mut engine: E,
        sink: CompletionSink,
        opts: IoThreadOptions,
    ) -> Result<IoThread> {
        let doorbell = Arc::new(EventFd::new()?);
        engine.set_waker(doorbell.clone())?;
        let kind = engine.kind();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            doorbell,
            wakeups: AtomicUsize::new(0),
            batches: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let join = std::thread::Builder::new()
            .name("ubcache-io".into())
            .spawn(move || run(engine, &s, sink, opts.spin))
            .map_err(|e| Error::io("spawn engine thread", e))?;
        Ok(IoThread { shared, join: Mutex::new(Some(join)), kind })
    }

    /// The engine the thread drives.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    fn push(&self, cmds: impl IntoIterator<Item = Cmd>) -> std::result::Result<(), Vec<Cmd>> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if self.shared.closing.load(Ordering::SeqCst) {
            return Err(cmds.into_iter().collect());
        }
        let before = q.len();
        q.extend(cmds);
        let added = q.len() - before;
        drop(q);
        self.shared.pending.fetch_add(added, Ordering::SeqCst);
        if self.shared.parked.swap(false, Ordering::SeqCst) {
            self.shared.wakeups.fetch_add(1, Ordering::Relaxed);
            self.shared.doorbell.notify();
        }
        Ok(())
    }

    /// Enqueues one request; its completion reaches the sink.
    pub fn submit(&self, req: IoRequest) -> std::result::Result<(), Rejected> {
        self.push([Cmd::Io(req)]).map_err(|mut v| match v.pop() {
            Some(Cmd::Io(request)) => Rejected { error: closed(), request },
            _ => unreachable!("pushed one Io command"),
        })
    }

    /// Enqueues many requests with one doorbell at most. If the thread is closed, they all
    /// come back.
    pub fn submit_batch(&self, reqs: Vec<IoRequest>) -> std::result::Result<(), Vec<Rejected>> {
        self.push(reqs.into_iter().map(Cmd::Io)).map_err(|v| {
            v.into_iter()
                .filter_map(|c| match c {
                    Cmd::Io(request) => Some(Rejected { error: closed(), request }),
                    _ => None,
                })
                .collect()
        })
    }

    fn call<T>(&self, make: impl FnOnce(mpsc::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.push([make(tx)]).map_err(|_| closed())?;
        rx.recv().unwrap_or_else(|_| Err(closed()))
    }

    /// Adds a device to the engine (waits for the engine thread to do it).
    pub fn add_device(&self, dev: Arc<Device>) -> Result<DevId> {
        self.call(|tx| Cmd::AddDevice(dev, tx))
    }

    /// Removes a device: later requests for it fail with [`ErrorKind::Closed`].
    pub fn remove_device(&self, id: DevId) -> Result<()> {
        self.call(|tx| Cmd::RemoveDevice(id, tx))
    }

    /// Runs `f` with the engine on the engine thread and returns its result.
    pub fn with_engine<T: Send + 'static>(&self, f: impl FnOnce(&mut dyn IoEngine) -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.push([Cmd::With(Box::new(move |e| {
            let _ = tx.send(f(e));
        }))])
        .map_err(|_| closed())?;
        rx.recv().map_err(|_| closed())
    }

    /// Counters so far.
    pub fn stats(&self) -> IoThreadStats {
        IoThreadStats {
            wakeups: self.shared.wakeups.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
        }
    }

    /// True once [`IoThread::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// Stops taking requests (later ones are rejected with [`ErrorKind::Closed`]) without
    /// waiting; the thread finishes the accepted ones. Idempotent.
    pub fn stop_accepting(&self) {
        {
            let _q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.closing.store(true, Ordering::SeqCst);
        }
        self.shared.doorbell.notify();
    }

    /// Stops taking requests, waits until every accepted request has completed and reached
    /// the sink, and joins the thread. Idempotent.
    pub fn close(&self) {
        self.stop_accepting();
        let join = self.join.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(j) = join {
            let _ = j.join();
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.close();
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the I/O engine is closed")
}

fn run<E: IoEngine>(mut engine: E, s: &Shared, mut sink: CompletionSink, spin: Duration) {
    let mut cmds = Vec::new();
    let mut out = Vec::new();
    loop {
        {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *q, &mut cmds);
        }
        s.pending.fetch_sub(cmds.len(), Ordering::SeqCst);
        for cmd in cmds.drain(..) {
            match cmd {
                Cmd::Io(req) => engine.submit(req),
                Cmd::AddDevice(dev, tx) => {
                    let _ = tx.send(engine.add_device(dev));
                }
                Cmd::RemoveDevice(id, tx) => {
                    let _ = tx.send(engine.remove_device(id));
                }
                Cmd::With(f) => f(&mut engine),
            }
        }
        let closing = s.closing.load(Ordering::SeqCst);
        if closing && engine.in_flight() == 0 && s.pending.load(Ordering::SeqCst) == 0 {
            break;
        }
        if engine.in_flight() == 0 && !closing && !spin.is_zero() {
            // A caller that just got its completions usually submits again within
            // microseconds: catching that without a doorbell saves two syscalls and a
            // thread wakeup per request at low queue depths.
            let until = Instant::now() + spin;
            while s.pending.load(Ordering::SeqCst) == 0 && !s.closing.load(Ordering::SeqCst) && Instant::now() < until {
                std::hint::spin_loop();
            }
            if s.pending.load(Ordering::SeqCst) > 0 {
                continue;
            }
        }
        s.parked.store(true, Ordering::SeqCst);
        if s.pending.load(Ordering::SeqCst) > 0 || (s.closing.load(Ordering::SeqCst) && engine.in_flight() == 0) {
            s.parked.store(false, Ordering::SeqCst);
            continue;
        }
        // One call submits what was just queued and waits for a completion or the doorbell.
        let r = engine.poll(&mut out, None);
        s.parked.store(false, Ordering::SeqCst);
        if let Err(e) = r {
            fail_engine(e);
            deliver(s, &mut sink, &mut out);
            break;
        }
        if !out.is_empty() {
            deliver(s, &mut sink, &mut out);
        }
    }
    // Anything enqueued after the loop ended (only possible after an engine failure).
    let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
    s.closing.store(true, Ordering::SeqCst);
    for cmd in q.drain(..) {
        if let Cmd::Io(req) = cmd {
            out.push(IoCompletion::of(req, Err(closed())));
        }
    }
    drop(q);
    if !out.is_empty() {
        deliver(s, &mut sink, &mut out);
    }
}

fn fail_engine(e: Error) {
    crate::io::warn_once("engine-failed", &format!("the I/O engine failed: {e}; requests in flight are lost"));
}

fn deliver(s: &Shared, sink: &mut CompletionSink, out: &mut Vec<IoCompletion>) {
    s.batches.fetch_add(1, Ordering::Relaxed);
    sink(std::mem::take(out));
}
