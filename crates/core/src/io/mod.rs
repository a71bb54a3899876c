//! The I/O layer: engines that take batches of requests against open devices and hand back
//! completions without blocking the caller.
//!
//! - [`IoEngine`] is the seam every layer above talks to. Two real engines implement it:
//!   [`uring::UringEngine`] (io_uring) and [`psync::PsyncEngine`] (a small thread pool doing
//!   pread/pwrite, for kernels or sandboxes without io_uring). [`open_engine`] picks one,
//!   falling back from io_uring to the portable engine with one warning.
//! - [`fault::FaultEngine`] wraps any engine to fail chosen requests, add the latency of a
//!   slow disk, and simulate a crash that loses or tears writes not yet flushed.
//! - [`thread::IoThread`] is the engine thread: it owns an engine, takes requests from any
//!   thread (a queue plus an eventfd) and delivers completions in batches through one
//!   callback, so a binding pays one cross-thread wakeup per batch, not per I/O.
//! - [`driver::RingDriver`] is the other way to run an engine: the caller's own thread
//!   (a JavaScript event loop) submits straight into the engine and is told of completions
//!   through a descriptor it watches, so no thread handoff sits on the I/O path.
//!
//! Every request ends in exactly one [`IoCompletion`]; bad input, device errors and closing
//! all arrive as an error on that completion, never as a panic.

pub mod buf;
pub mod device;
pub mod driver;
pub mod fault;
pub mod psync;
pub mod remote;
pub mod storage;
pub mod thread;
pub mod uring;

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

pub use buf::{AlignedBuf, BufPool, BufPoolConfig, Slab, BUF_ALIGN};
pub use device::{device_info, Device, DeviceInfo, DirectIo, OpenOptions};
pub use driver::{BusyPoll, RingDriver, ADAPTIVE_POLL_CAP};
pub use storage::{EngineStorage, MemStorage, Storage};
pub use thread::{IoThread, IoThreadOptions};

/// Identifies a device added to an engine (an index into the engine's device table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId(pub u32);

/// What a request does. Buffers travel with the request and come back on its completion.
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len()` bytes at the offset into `buf`.
    Read { buf: AlignedBuf },
    /// Write all of `buf` at the offset.
    Write { buf: AlignedBuf },
    /// Read into the buffers in order, as one contiguous range starting at the offset.
    Readv { bufs: Vec<AlignedBuf> },
    /// Write the buffers in order, as one contiguous range starting at the offset.
    Writev { bufs: Vec<AlignedBuf> },
    /// fdatasync: every write completed before this was submitted is durable when it completes.
    Flush,
    /// Drop `len` bytes at the offset (BLKDISCARD on devices, punch-hole on files).
    Discard { len: u64 },
}

/// The kind of an [`IoOp`], without its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`IoOp::Read`] or [`IoOp::Readv`].
    Read,
    /// [`IoOp::Write`] or [`IoOp::Writev`].
    Write,
    /// [`IoOp::Flush`].
    Flush,
    /// [`IoOp::Discard`].
    Discard,
}

impl IoOp {
    /// The op's kind (vectored and plain reads/writes are the same kind).
    pub fn kind(&self) -> OpKind {
        match self {
            IoOp::Read { .. } | IoOp::Readv { .. } => OpKind::Read,
            IoOp::Write { .. } | IoOp::Writev { .. } => OpKind::Write,
            IoOp::Flush => OpKind::Flush,
            IoOp::Discard { .. } => OpKind::Discard,
        }
    }

    /// Bytes the op covers on the device (0 for a flush).
    pub fn len(&self) -> u64 {
        match self {
            IoOp::Read { buf } | IoOp::Write { buf } => buf.len() as u64,
            IoOp::Readv { bufs } | IoOp::Writev { bufs } => bufs.iter().map(|b| b.len() as u64).sum(),
            IoOp::Flush => 0,
            IoOp::Discard { len } => *len,
        }
    }

    /// True when the op covers no bytes (a flush).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One request: an op on a device at a byte offset, tagged with the caller's `user_data`.
#[derive(Debug)]
pub struct IoRequest {
    /// Target device.
    pub dev: DevId,
    /// Byte offset on the device (ignored by flush).
    pub offset: u64,
    /// What to do.
    pub op: IoOp,
    /// Caller's tag, returned on the completion.
    pub user_data: u64,
    /// Force unit access, for writes: the write is durable when it completes (`RWF_DSYNC`:
    /// a FUA write on devices that honour FUA, a write and a flush of it otherwise).
    /// Ignored by other ops.
    pub fua: bool,
}

impl IoRequest {
    /// A read of `buf.len()` bytes.
    pub fn read(dev: DevId, offset: u64, buf: AlignedBuf, user_data: u64) -> Self {
        IoRequest { dev, offset, op: IoOp::Read { buf }, user_data, fua: false }
    }
    /// A write of all of `buf`.
    pub fn write(dev: DevId, offset: u64, buf: AlignedBuf, user_data: u64) -> Self {
        IoRequest { dev, offset, op: IoOp::Write { buf }, user_data, fua: false }
    }
    /// A flush (fdatasync).
    pub fn flush(dev: DevId, user_data: u64) -> Self {
        IoRequest { dev, offset: 0, op: IoOp::Flush, user_data, fua: false }
    }
    /// A write of all of `buf` that is durable when it completes (see [`IoRequest::fua`]).
    pub fn write_fua(dev: DevId, offset: u64, buf: AlignedBuf, user_data: u64) -> Self {
        IoRequest { dev, offset, op: IoOp::Write { buf }, user_data, fua: true }
    }
    /// A discard of `len` bytes.
    pub fn discard(dev: DevId, offset: u64, len: u64, user_data: u64) -> Self {
        IoRequest { dev, offset, op: IoOp::Discard { len }, user_data, fua: false }
    }
}

/// The outcome of one request: its buffers back, and bytes transferred or the error.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub user_data: u64,
    /// The device it targeted.
    pub dev: DevId,
    /// The offset it targeted.
    pub offset: u64,
    /// The op, with its buffers (filled, for a successful read).
    pub op: IoOp,
    /// Bytes transferred (the full length; short transfers are completed by the engine),
    /// or what went wrong.
    pub result: Result<u64>,
}

impl IoCompletion {
    /// Completion of `req` with `result`.
    pub fn of(req: IoRequest, result: Result<u64>) -> Self {
        IoCompletion { user_data: req.user_data, dev: req.dev, offset: req.offset, op: req.op, result }
    }

    /// The read buffer of a read completion.
    pub fn into_buf(self) -> Option<AlignedBuf> {
        match self.op {
            IoOp::Read { buf } | IoOp::Write { buf } => Some(buf),
            _ => None,
        }
    }
}

/// Which engine is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// [`uring::UringEngine`].
    Uring,
    /// [`psync::PsyncEngine`].
    Psync,
    /// [`fault::FaultEngine`] around another engine.
    Fault,
}

impl EngineKind {
    /// Short name ("io_uring", "psync", "fault").
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Psync => "psync",
            EngineKind::Fault => "fault",
        }
    }
}

/// An I/O engine: takes requests against its devices and returns completions.
///
/// `submit` never blocks and never fails: a request that cannot be carried out completes
/// with an error. `poll` pushes queued work to the device, collects what finished, and can
/// wait. One thread drives an engine at a time (it is `Send`, not `Sync`).
pub trait IoEngine: Send {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// Makes `dev` addressable by requests; the engine keeps a reference until it is removed.
    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId>;

    /// Stops accepting requests for `id`: later ones complete with [`ErrorKind::Closed`];
    /// requests already in flight still complete normally.
    fn remove_device(&mut self, id: DevId) -> Result<()>;

    /// The device behind `id`, if it is still open in this engine.
    fn device(&self, id: DevId) -> Option<Arc<Device>>;

    /// Queues a request. It reaches the device at the next `poll` at the latest.
    fn submit(&mut self, req: IoRequest);

    /// Pushes queued requests to the device and appends finished completions to `out`.
    /// With `timeout` `Some(ZERO)` it never blocks; otherwise, if nothing finished, it waits
    /// until something does, the waker (see [`IoEngine::set_waker`]) is notified, or the
    /// timeout passes (`None`: no limit). Returns how many completions were appended.
    /// (Under a deep queue the portable engine wakes a blocked `poll` once per batch of
    /// completions rather than per completion; see [`psync`].)
    /// An `Err` means the engine itself broke (not one request); its requests are lost.
    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize>;

    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;

    /// An eventfd whose notification makes a blocked `poll` return, so an engine thread
    /// can sleep on device completions and new requests at once.
    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()>;

    /// A descriptor that turns readable whenever `poll` may have completions to return, for
    /// a thread that waits in an event loop rather than in `poll` (see [`driver`]). `poll`
    /// resets it. Engines that need a thread of their own to make progress (e.g. the fault
    /// engine's timed delays) refuse.
    fn completion_fd(&mut self) -> Result<RawFd> {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("the {} engine cannot be driven from an event loop", self.kind().name()),
        ))
    }

    /// The completion descriptor woke its loop and `poll` found nothing: reset it if it
    /// still reads readable with nothing to come of it (a signal can arrive after the poll
    /// that would have reset it), so a level-triggered loop does not spin on it.
    fn spurious_wakeup(&mut self) {}
}

impl<E: IoEngine + ?Sized> IoEngine for Box<E> {
    fn kind(&self) -> EngineKind {
        (**self).kind()
    }
    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        (**self).add_device(dev)
    }
    fn remove_device(&mut self, id: DevId) -> Result<()> {
        (**self).remove_device(id)
    }
    fn device(&self, id: DevId) -> Option<Arc<Device>> {
        (**self).device(id)
    }
    fn submit(&mut self, req: IoRequest) {
        (**self).submit(req)
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        (**self).poll(out, timeout)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()> {
        (**self).set_waker(waker)
    }
    fn completion_fd(&mut self) -> Result<RawFd> {
        (**self).completion_fd()
    }
    fn spurious_wakeup(&mut self) {
        (**self).spurious_wakeup()
    }
}

/// Submits `req` and drives `engine` until it completes; other completions that arrive
/// meanwhile are appended to `others`. For tests, tools and the simple synchronous paths.
pub fn run_sync(engine: &mut dyn IoEngine, req: IoRequest, others: &mut Vec<IoCompletion>) -> Result<IoCompletion> {
    let tag = req.user_data;
    engine.submit(req);
    let mut got = Vec::new();
    loop {
        engine.poll(&mut got, None)?;
        let mut found = None;
        for c in got.drain(..) {
            if found.is_none() && c.user_data == tag {
                found = Some(c);
            } else {
                others.push(c);
            }
        }
        if let Some(c) = found {
            return Ok(c);
        }
    }
}

/// Which engine [`open_engine`] should build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring, or the portable engine (one warning) if io_uring cannot be set up.
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// The portable pread/pwrite engine.
    Psync,
}

/// Settings for [`open_engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Engine to use.
    pub choice: EngineChoice,
    /// io_uring submission-queue entries (the completion queue gets twice as many).
    pub queue_depth: u32,
    /// Worker threads of the portable engine.
    pub psync_threads: usize,
    /// Pool whose arena the io_uring engine registers as a fixed buffer.
    pub buf_pool: Option<BufPool>,
    /// Register device descriptors with io_uring (saves an fd lookup per I/O).
    pub register_files: bool,
    /// io_uring only: the most bytes one SQE carries. Larger requests go out in pieces
    /// through the same path that completes short transfers (for devices with a transfer
    /// limit, and to test that path). `None`: no limit.
    pub max_transfer: Option<u32>,
    /// io_uring only: requests queued by [`IoEngine::submit`] go to the kernel as soon as
    /// this many are waiting, instead of all at the next `poll`. A caller handling a burst
    /// of completions then refills the device as it goes rather than after the whole burst;
    /// measured on a virtio disk at QD32, 4 KiB random reads: 4 → 1.0–1.15× fio's IOPS, all
    /// at the next poll (0) → 0.74×. 0: only at `poll`.
    pub submit_batch: usize,
    /// For tests: pretend `io_uring_setup` failed with this errno.
    pub simulate_uring_setup_error: Option<i32>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            choice: EngineChoice::Auto,
            queue_depth: 256,
            psync_threads: 4,
            buf_pool: None,
            register_files: true,
            max_transfer: None,
            submit_batch: 4,
            simulate_uring_setup_error: None,
        }
    }
}

/// Builds the engine `opts` asks for. Under [`EngineChoice::Auto`], an io_uring setup refused
/// with EPERM, ENOSYS or EINVAL (seccomp, `io_uring_disabled`, old kernels) selects the
/// portable engine and warns once; other setup errors are returned.
pub fn open_engine(opts: &EngineOptions) -> Result<Box<dyn IoEngine>> {
    // Remote devices (NBD) may be added to any engine.
    let local = open_local_engine(opts)?;
    Ok(Box::new(remote::RemoteEngine::new(local)))
}

fn open_local_engine(opts: &EngineOptions) -> Result<Box<dyn IoEngine>> {
    match opts.choice {
        EngineChoice::Psync => Ok(Box::new(psync::PsyncEngine::new(opts.psync_threads)?)),
        EngineChoice::Uring => Ok(Box::new(uring::UringEngine::new(opts)?)),
        EngineChoice::Auto => match uring::UringEngine::new(opts) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) if uring_refused(&e) => {
                warn_once(
                    "io_uring",
                    &format!("io_uring unavailable ({}); using the portable pread/pwrite engine", e.message()),
                );
                Ok(Box::new(psync::PsyncEngine::new(opts.psync_threads)?))
            }
            Err(e) => Err(e),
        },
    }
}

fn uring_refused(e: &Error) -> bool {
    use std::error::Error as _;
    let errno = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).and_then(|s| s.raw_os_error());
    matches!(errno, Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EINVAL))
}

static WARNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// Prints `msg` to stderr the first time a warning with `key` is raised in this process.
/// Returns whether it was printed.
pub fn warn_once(key: &'static str, msg: &str) -> bool {
    let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if w.get_or_insert_with(HashSet::new).insert(key) {
        eprintln!("ubcache: warning: {msg}");
        true
    } else {
        false
    }
}

/// True once a warning with `key` has been raised in this process.
pub fn warned(key: &'static str) -> bool {
    WARNED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|w| w.contains(key))
}

/// A Linux eventfd used as a doorbell between threads.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking eventfd with a zero counter.
    pub fn new() -> Result<EventFd> {
        // SAFETY: plain syscall; a valid fd on success is owned by us.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(EventFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Rings the doorbell.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. Failure means the counter is saturated,
        // which still leaves the fd readable, so it is ignored.
        unsafe { libc::write(self.fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Resets the doorbell; returns how many rings it had (0 if none).
    pub fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (no rings) leaves it 0.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    /// Waits until the doorbell rang or `timeout` passed (without resetting it).
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        poll_fds(&[self.fd.as_raw_fd()], timeout)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or the timeout passes; true if one is readable.
pub(crate) fn poll_fds(fds: &[RawFd], timeout: Option<Duration>) -> bool {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_millis().min(i32::MAX as u128) as i32 + i32::from(t.subsec_nanos() % 1_000_000 != 0),
    };
    loop {
        // SAFETY: pfds is a live array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return r > 0;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// The error for a request against a device that is not (or no longer) in the engine.
pub(crate) fn closed_device(id: DevId) -> Error {
    Error::new(ErrorKind::Closed, format!("device {} is closed", id.0))
}
