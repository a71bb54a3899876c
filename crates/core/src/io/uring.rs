//! The io_uring engine.
//!
//! Requests live in a slab whose index is the SQE's `user_data`; each keeps its buffers and
//! how many bytes are done, so a short read or write is resubmitted for the remainder and
//! EAGAIN/EINTR results are simply resubmitted. Requests beyond what the submission queue
//! (or the completion queue, which must never overflow) can take wait in a backlog and go
//! out as completions make room. A CQ overflow is still handled: the kernel keeps the
//! overflowed entries (IORING_FEAT_NODROP) and `io_uring_enter` flushes them after a reap.
//!
//! Device descriptors go into a sparse registered-file table and the buffer pool's arena
//! (if any) is registered as one fixed buffer; both fall back to the plain opcodes when
//! registration is refused. The ring is set up like fio's (single issuer, cooperative task
//! running; deferred task running can be built but is off, see `UringEngine::new`) when the
//! kernel supports it; it is created disabled and enabled by the first `poll`, so that the
//! thread that drives it becomes its issuer.
//!
//! Discards on a block device use the BLKDISCARD ioctl, which io_uring cannot carry before
//! Linux 6.12; it runs on a short-lived helper thread that reports back through an eventfd
//! the ring polls, so the engine thread never blocks on it.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, EnterFlags, IoUring};

use crate::error::{Error, ErrorKind, Result};
use crate::io::device::iovecs_from;
use crate::io::{
    closed_device, poll_fds, warn_once, DevId, Device, EngineKind, EngineOptions, EventFd, IoCompletion, IoEngine,
    IoOp, IoRequest,
};

const WAKE_TAG: u64 = u64::MAX;
const SIDE_TAG: u64 = u64::MAX - 1;
const FILE_TABLE: u32 = 64;

struct DevSlot {
    dev: Arc<Device>,
    fixed: Option<u32>,
    closing: bool,
    inflight: usize,
}

struct Op {
    req: IoRequest,
    dev: usize,
    done: u64,
    total: u64,
    /// iovecs of a vectored op; the kernel reads them at submission, so they only have to
    /// live until the next resubmission rebuilds them.
    iov: Vec<libc::iovec>,
}

/// Finished helper-thread ops: slab index and outcome.
type SideDone = Vec<(u32, std::io::Result<()>)>;

/// Completions of BLKDISCARD helper threads.
struct Side {
    efd: Arc<EventFd>,
    done: Arc<Mutex<SideDone>>,
    pending: usize,
    armed: bool,
}

/// The io_uring engine (see the module docs).
pub struct UringEngine {
    ring: IoUring,
    devices: Vec<Option<DevSlot>>,
    ops: Vec<Option<Op>>,
    free: Vec<u32>,
    backlog: VecDeque<u32>,
    ready: Vec<IoCompletion>,
    cqes: Vec<(u64, i32)>,
    /// Requests accepted by `submit` and not yet returned by `poll`.
    in_flight: usize,
    /// SQEs the kernel holds (requests plus armed polls), kept below the CQ size.
    in_kernel: usize,
    cq_cap: usize,
    enabled: bool,
    waker: Option<Arc<EventFd>>,
    waker_armed: bool,
    woken: bool,
    side: Option<Side>,
    /// Eventfd registered with the ring (see [`IoEngine::completion_fd`]).
    notifier: Option<EventFd>,
    /// CQEs were reaped since the notifier was last reset.
    reaped: bool,
    fixed_buf: Option<(u64, usize)>,
    files_registered: bool,
    ext_arg: bool,
    max_transfer: u32,
    /// See [`EngineOptions::submit_batch`]; `usize::MAX` for 0.
    submit_batch: usize,
    /// Set up with deferred task running: completions are posted only by io_uring_enter.
    defer: bool,
    _pool: Option<crate::io::BufPool>,
}

// SAFETY: the raw pointers inside (iovecs, the ring's mappings) are only used by the thread
// that owns the engine; moving the engine moves all of them together.
unsafe impl Send for UringEngine {}

fn build_ring(entries: u32, fancy: bool, defer: bool) -> std::io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(entries * 2);
    if fancy {
        b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer().setup_r_disabled();
        if defer {
            b.setup_defer_taskrun();
        }
    }
    b.build(entries)
}

impl UringEngine {
    /// Sets up a ring of `opts.queue_depth` entries. Fails with the OS error (EPERM, ENOSYS,
    /// EINVAL, ENOMEM...) when io_uring cannot be set up, so the caller can fall back.
    pub fn new(opts: &EngineOptions) -> Result<UringEngine> {
        if let Some(errno) = opts.simulate_uring_setup_error {
            return Err(Error::io("io_uring_setup (simulated)", std::io::Error::from_raw_os_error(errno)));
        }
        let entries = opts.queue_depth.clamp(8, 4096).next_power_of_two();
        // Deferred task running, for a thread waiting in io_uring_enter and for an event loop
        // alike: completions wait for our next entry instead of interrupting the thread (an
        // event loop asleep in epoll was woken with EINTR, and woke again for the CQEs), and
        // the eventfd registered with the ring wakes the loop once per batch. Measured from
        // Node through the cache engine (bench:cache, 2-core VM, 2026-12-07): all-hit 4 KiB
        // reads QD1 p50 22.7 µs vs 31.3 µs, QD32 4.6 vs 5.1 µs CPU per read, writeback
        // writes 5.7 vs 7.2 µs CPU per write, writethrough QD32 0.86 vs 0.82× fio (medians of
        // 8 rounds each).
        // Off for now: with it, fresh-clone CI runs failed twice in a row (a device the
        // engine let go still open at the next exclusive open, "this process"; an attach
        // event never delivered): deferred work (a file's release among it) waits for
        // the next entry. See the issue note of 2026-12-07.
        let defer = false;
        let (ring, enabled, defer) = match build_ring(entries, true, defer) {
            Ok(r) => (r, false, defer),
            // Kernels before 6.1 reject the newer setup flags.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (build_ring(entries, false, false).map_err(|e| Error::io("io_uring_setup", e))?, true, false)
            }
            Err(e) => return Err(Error::io("io_uring_setup", e)),
        };
        let ext_arg = ring.params().is_feature_ext_arg();
        let cq_cap = ring.params().cq_entries() as usize;
        let files_registered = opts.register_files && ring.submitter().register_files_sparse(FILE_TABLE).is_ok();
        let mut fixed_buf = None;
        if let Some(pool) = &opts.buf_pool {
            if let Some((ptr, len)) = pool.arena() {
                let iov = libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len };
                // SAFETY: the engine keeps the pool (and so the arena) alive as long as the
                // ring, and the kernel only touches the arena through requests that carry one
                // of its buffers.
                match unsafe { ring.submitter().register_buffers(&[iov]) } {
                    Ok(()) => fixed_buf = Some((pool.id(), ptr as usize)),
                    Err(e) => {
                        warn_once(
                            "uring-fixed-buffers",
                            &format!("io_uring: cannot register the buffer arena ({e}); using plain reads and writes"),
                        );
                    }
                }
            }
        }
        Ok(UringEngine {
            ring,
            devices: Vec::new(),
            ops: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            ready: Vec::new(),
            cqes: Vec::new(),
            in_flight: 0,
            in_kernel: 0,
            cq_cap,
            enabled,
            waker: None,
            waker_armed: false,
            woken: false,
            side: None,
            notifier: None,
            reaped: false,
            fixed_buf,
            files_registered,
            ext_arg,
            max_transfer: opts.max_transfer.unwrap_or(u32::MAX).max(1),
            submit_batch: if opts.submit_batch == 0 { usize::MAX } else { opts.submit_batch },
            defer,
            _pool: opts.buf_pool.clone(),
        })
    }

    /// True when the buffer arena is registered (reads/writes into it use fixed opcodes).
    pub fn has_fixed_buffers(&self) -> bool {
        self.fixed_buf.is_some()
    }

    /// True when device descriptors are registered with the ring.
    pub fn has_fixed_files(&self) -> bool {
        self.files_registered
    }

    fn enable(&mut self) -> Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings().map_err(|e| Error::io("io_uring enable", e))?;
            self.enabled = true;
        }
        Ok(())
    }

    fn complete(&mut self, idx: u32, result: Result<u64>) {
        let Some(op) = self.ops[idx as usize].take() else { return };
        self.free.push(idx);
        if let Some(slot) = self.devices[op.dev].as_mut() {
            slot.inflight -= 1;
            if slot.closing && slot.inflight == 0 {
                self.release_slot(op.dev);
            }
        }
        self.ready.push(IoCompletion::of(op.req, result));
    }

    fn release_slot(&mut self, dev: usize) {
        if let Some(slot) = self.devices[dev].take() {
            if let Some(f) = slot.fixed {
                let _ = self.ring.submitter().register_files_update(f, &[-1]);
            }
        }
    }

    /// Builds the SQE that carries `op` from where it stands (`done` bytes in).
    fn sqe(op: &mut Op, slot: &DevSlot, fixed_buf: Option<(u64, usize)>, max_transfer: u32) -> squeue::Entry {
        macro_rules! on_fd {
            (|$fd:ident| $e:expr) => {
                match slot.fixed {
                    Some(f) => {
                        let $fd = types::Fixed(f);
                        $e
                    }
                    None => {
                        let $fd = types::Fd(slot.dev.fd());
                        $e
                    }
                }
            };
        }
        let off = op.req.offset + op.done;
        let done = op.done as usize;
        // FUA: RWF_DSYNC makes the block layer send the write with FUA, or follow it with a
        // flush where the device has no FUA.
        let wflags = if op.req.fua { libc::RWF_DSYNC } else { 0 };
        let left = (op.total - op.done).min(max_transfer as u64) as u32;
        match &mut op.req.op {
            IoOp::Read { buf } => {
                // SAFETY: done < len, so the pointer stays inside the buffer.
                let p = unsafe { buf.as_mut_ptr().add(done) };
                match buf.arena_slot() {
                    Some((pool, _)) if fixed_buf.is_some_and(|(id, _)| id == pool) => {
                        on_fd!(|fd| opcode::ReadFixed::new(fd, p, left, 0).offset(off).build())
                    }
                    _ => on_fd!(|fd| opcode::Read::new(fd, p, left).offset(off).build()),
                }
            }
            IoOp::Write { buf } => {
                // SAFETY: as above.
                let p = unsafe { buf.as_ptr().add(done) };
                match buf.arena_slot() {
                    Some((pool, _)) if fixed_buf.is_some_and(|(id, _)| id == pool) => {
                        on_fd!(|fd| opcode::WriteFixed::new(fd, p, left, 0).offset(off).rw_flags(wflags).build())
                    }
                    _ => on_fd!(|fd| opcode::Write::new(fd, p, left).offset(off).rw_flags(wflags).build()),
                }
            }
            IoOp::Readv { bufs } => {
                op.iov = iovecs_from(bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())), done, left as usize);
                let (p, n) = (op.iov.as_ptr(), op.iov.len() as u32);
                on_fd!(|fd| opcode::Readv::new(fd, p, n).offset(off).build())
            }
            IoOp::Writev { bufs } => {
                op.iov = iovecs_from(bufs.iter().map(|b| (b.as_ptr() as *mut u8, b.len())), done, left as usize);
                let (p, n) = (op.iov.as_ptr(), op.iov.len() as u32);
                on_fd!(|fd| opcode::Writev::new(fd, p, n).offset(off).rw_flags(wflags).build())
            }
            IoOp::Flush => on_fd!(|fd| opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build()),
            IoOp::Discard { len } => {
                let len = *len;
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                on_fd!(|fd| opcode::Fallocate::new(fd, len).offset(off).mode(mode).build())
            }
        }
    }

    /// Moves backlog entries and doorbell polls into the SQ, as far as the queues allow.
    fn fill_sq(&mut self) -> Result<()> {
        loop {
            let mut sq_full = false;
            {
                let mut sq = self.ring.submission();
                if let (Some(w), false) = (&self.waker, self.waker_armed) {
                    let e =
                        opcode::PollAdd::new(types::Fd(w.as_raw_fd()), libc::POLLIN as u32).build().user_data(WAKE_TAG);
                    // SAFETY: the eventfd is kept alive by `self.waker` until the ring is gone.
                    if unsafe { sq.push(&e) }.is_ok() {
                        self.waker_armed = true;
                        self.in_kernel += 1;
                    }
                }
                if let Some(side) = self.side.as_mut().filter(|s| s.pending > 0 && !s.armed) {
                    let e = opcode::PollAdd::new(types::Fd(side.efd.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(SIDE_TAG);
                    // SAFETY: the eventfd is kept alive by `self.side` until the ring is gone.
                    if unsafe { sq.push(&e) }.is_ok() {
                        side.armed = true;
                        self.in_kernel += 1;
                    }
                }
                // Each device's ops side by side, in their order: the block layer merges a
                // bio only into the request plugged just before it, so writes that
                // allocation laid end to end on the cache device (one open bucket per
                // writer) reach it as one request instead of one each. Ops on different
                // devices have no order to keep (completion is what orders them).
                if self.backlog.len() > 2 {
                    let ops = &self.ops;
                    let dev_of = |idx: &u32| ops[*idx as usize].as_ref().map_or(0, |op| op.dev);
                    let b = self.backlog.make_contiguous();
                    if b.windows(2).any(|w| dev_of(&w[0]) > dev_of(&w[1])) {
                        b.sort_by_key(dev_of);
                    }
                }
                while let Some(&idx) = self.backlog.front() {
                    if self.in_kernel >= self.cq_cap {
                        break;
                    }
                    if sq.is_full() {
                        sq_full = true;
                        break;
                    }
                    let op = self.ops[idx as usize].as_mut().expect("backlog holds live ops");
                    let slot = self.devices[op.dev].as_ref().expect("a device with ops in flight stays open");
                    let e = Self::sqe(op, slot, self.fixed_buf, self.max_transfer).user_data(idx as u64);
                    // SAFETY: the buffers and iovecs the SQE points to are owned by the op,
                    // which stays in the slab until its completion is reaped.
                    unsafe { sq.push(&e) }.expect("checked for room above");
                    self.backlog.pop_front();
                    self.in_kernel += 1;
                }
            }
            if !sq_full {
                return Ok(());
            }
            self.enter(0, None)?;
        }
    }

    /// io_uring_enter: submit what is queued, and with `want` > 0 wait for that many
    /// completions or the timeout.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<()> {
        let to_submit = self.ring.submission().len() as u32;
        let r = match timeout {
            Some(t) if want > 0 && self.ext_arg => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            Some(t) if want > 0 => {
                // Without EXT_ARG (before 5.11) a timed wait polls the ring's descriptor.
                // SAFETY: no argument pointer is passed.
                let r = unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(to_submit, 0, EnterFlags::GETEVENTS.bits(), None)
                };
                if r.is_ok() && self.ring.completion().is_empty() {
                    poll_fds(&[self.ring.as_raw_fd()], Some(t));
                }
                r
            }
            // GETEVENTS even when not waiting: with deferred task running, completions are
            // only posted when we enter with it.
            // SAFETY: no argument pointer is passed.
            _ => unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    want as u32,
                    EnterFlags::GETEVENTS.bits(),
                    None,
                )
            },
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // A signal, a timeout, a full CQ (EBUSY: overflowed entries wait to be
                // flushed after we reap) or short kernel memory: reap and try again later.
                Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EBUSY) | Some(libc::EAGAIN) => Ok(()),
                _ => Err(Error::io("io_uring_enter", e)),
            },
        }
    }

    /// Hands the backlog to the kernel, and collects what that entry posted (deferred task
    /// work runs on every entry), for the next `poll` to return. An error leaves the requests
    /// queued; the next `poll` meets it again and reports it.
    fn submit_now(&mut self) {
        if self.fill_sq().is_ok() && !self.ring.submission().is_empty() && self.enter(0, None).is_ok() {
            self.reap();
        }
    }

    /// True when a non-blocking poll needs io_uring_enter: SQEs to submit, or completions
    /// the kernel has not posted yet (deferred task work, task work pending, CQ overflow).
    fn must_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun() || sq.cq_overflow() || (self.defer && self.in_kernel > 0)
    }

    /// The blocking half of `poll`.
    fn poll_wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.fill_sq()?;
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let block = self.ready.is_empty() && !self.woken && left != Some(Duration::ZERO) && self.in_kernel > 0;
            if block {
                self.enter(1, left)?;
            } else if !self.ring.submission().is_empty() || self.in_kernel > 0 {
                self.enter(0, None)?;
            }
            self.reap();
            if !block || !self.ready.is_empty() || self.woken {
                // Resubmissions (short transfers, EAGAIN) reaped above go out now.
                if !self.backlog.is_empty() {
                    self.fill_sq()?;
                    self.enter(0, None)?;
                }
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.reaped |= !cqes.is_empty();
        for &(ud, res) in &cqes {
            self.in_kernel -= 1;
            match ud {
                WAKE_TAG => {
                    self.waker_armed = false;
                    self.woken = true;
                    if let Some(w) = &self.waker {
                        w.drain();
                    }
                }
                SIDE_TAG => self.reap_side(),
                idx => self.on_cqe(idx as u32, res),
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn reap_side(&mut self) {
        let Some(side) = self.side.as_mut() else { return };
        side.armed = false;
        side.efd.drain();
        let done: Vec<_> = std::mem::take(&mut *side.done.lock().unwrap_or_else(|e| e.into_inner()));
        side.pending -= done.len();
        for (idx, r) in done {
            let result = match r {
                Ok(()) => Ok(self.ops[idx as usize].as_ref().map_or(0, |o| o.total)),
                Err(e) => Err(self.op_error(idx, e)),
            };
            self.complete(idx, result);
        }
    }

    fn op_error(&self, idx: u32, e: std::io::Error) -> Error {
        let op = self.ops[idx as usize].as_ref().expect("live op");
        let path = self.devices[op.dev].as_ref().map(|s| s.dev.path().display().to_string()).unwrap_or_default();
        let what = match op.req.op {
            IoOp::Read { .. } => "read",
            IoOp::Write { .. } => "write",
            IoOp::Readv { .. } => "readv",
            IoOp::Writev { .. } => "writev",
            IoOp::Flush => "fdatasync",
            IoOp::Discard { .. } => "discard",
        };
        Error::io(format!("{path}: {what} at offset {}", op.req.offset + op.done), e)
    }

    fn on_cqe(&mut self, idx: u32, res: i32) {
        if res < 0 {
            if res == -libc::EAGAIN || res == -libc::EINTR {
                self.backlog.push_back(idx);
            } else {
                let e = self.op_error(idx, std::io::Error::from_raw_os_error(-res));
                self.complete(idx, Err(e));
            }
            return;
        }
        let op = self.ops[idx as usize].as_mut().expect("a CQE for a live op");
        match op.req.op {
            IoOp::Flush => self.complete(idx, Ok(0)),
            IoOp::Discard { len } => self.complete(idx, Ok(len)),
            _ if res == 0 => {
                let kind = if op.req.op.kind() == crate::io::OpKind::Read {
                    std::io::ErrorKind::UnexpectedEof
                } else {
                    std::io::ErrorKind::WriteZero
                };
                let e = self.op_error(idx, std::io::Error::new(kind, "the device transferred no bytes"));
                self.complete(idx, Err(e));
            }
            _ => {
                op.done += res as u64;
                if op.done >= op.total {
                    let total = op.total;
                    self.complete(idx, Ok(total));
                } else {
                    // Short transfer: go again for the rest.
                    self.backlog.push_back(idx);
                }
            }
        }
    }

    fn start_side_discard(&mut self, idx: u32) -> Result<()> {
        if self.side.is_none() {
            self.side = Some(Side { efd: Arc::new(EventFd::new()?), done: Arc::default(), pending: 0, armed: false });
        }
        let side = self.side.as_mut().expect("just set");
        let op = self.ops[idx as usize].as_ref().expect("live op");
        let dev = self.devices[op.dev].as_ref().expect("open device").dev.clone();
        let (off, len) = (op.req.offset, op.total);
        let (done, efd) = (side.done.clone(), side.efd.clone());
        side.pending += 1;
        let spawned = std::thread::Builder::new().name("ubcache-discard".into()).spawn(move || {
            let r = dev.discard(off, len);
            done.lock().unwrap_or_else(|e| e.into_inner()).push((idx, r));
            efd.notify();
        });
        if let Err(e) = spawned {
            side.pending -= 1;
            return Err(Error::io("spawn discard thread", e));
        }
        Ok(())
    }
}

impl IoEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        let slot = self.devices.iter().position(|d| d.is_none()).unwrap_or_else(|| {
            self.devices.push(None);
            self.devices.len() - 1
        });
        let mut fixed = None;
        if self.files_registered && (slot as u32) < FILE_TABLE {
            // Refused (e.g. by a single-issuer ring driven from another thread): plain fd.
            if self.ring.submitter().register_files_update(slot as u32, &[dev.fd()]).is_ok() {
                fixed = Some(slot as u32);
            }
        }
        self.devices[slot] = Some(DevSlot { dev, fixed, closing: false, inflight: 0 });
        Ok(DevId(slot as u32))
    }

    fn remove_device(&mut self, id: DevId) -> Result<()> {
        let i = id.0 as usize;
        match self.devices.get_mut(i).and_then(|s| s.as_mut()) {
            Some(slot) if !slot.closing => {
                slot.closing = true;
                if slot.inflight == 0 {
                    self.release_slot(i);
                }
                Ok(())
            }
            _ => Err(Error::new(ErrorKind::Closed, format!("device {} is not open in this engine", id.0))),
        }
    }

    fn device(&self, id: DevId) -> Option<Arc<Device>> {
        self.devices.get(id.0 as usize).and_then(|s| s.as_ref()).filter(|s| !s.closing).map(|s| s.dev.clone())
    }

    fn submit(&mut self, req: IoRequest) {
        self.in_flight += 1;
        let i = req.dev.0 as usize;
        let Some(slot) = self.devices.get_mut(i).and_then(|s| s.as_mut()).filter(|s| !s.closing) else {
            let e = closed_device(req.dev);
            self.ready.push(IoCompletion::of(req, Err(e)));
            return;
        };
        if let Err(e) = slot.dev.check(&req) {
            self.ready.push(IoCompletion::of(req, Err(e)));
            return;
        }
        slot.inflight += 1;
        let side = matches!(req.op, IoOp::Discard { .. }) && slot.dev.is_block_device();
        let total = req.op.len();
        let op = Op { req, dev: i, done: 0, total, iov: Vec::new() };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.ops[idx as usize] = Some(op);
                idx
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        };
        if side {
            if let Err(e) = self.start_side_discard(idx) {
                self.complete(idx, Err(e));
            }
        } else {
            self.backlog.push_back(idx);
            // Only once a poll has enabled the ring: the first thread to enter it becomes its
            // single issuer, and an engine may be filled on one thread and polled on another.
            if self.enabled && self.backlog.len() >= self.submit_batch {
                self.submit_now();
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        self.enable()?;
        if timeout == Some(Duration::ZERO) {
            // The event loop's path: no clock, and no system call unless there is something
            // to submit or the kernel holds completions it has not posted yet.
            self.fill_sq()?;
            if self.must_enter() {
                self.enter(0, None)?;
            }
            self.reap();
            if !self.backlog.is_empty() {
                // Resubmissions (short transfers, EAGAIN) reaped above go out now.
                self.fill_sq()?;
                if !self.ring.submission().is_empty() {
                    self.enter(0, None)?;
                }
            }
        } else {
            self.poll_wait(timeout)?;
        }
        self.woken = false;
        if let (Some(n), true) = (&self.notifier, std::mem::take(&mut self.reaped)) {
            // The kernel signals both when deferred work is queued and again when running
            // it posts CQEs; reset the fd now that all is reaped, so the caller's loop does
            // not wake for nothing, and signal again if more arrived meanwhile (the TASKRUN
            // flag is set before the kernel signals, so nothing is lost). A poll that reaped
            // nothing leaves the fd alone: that saves a syscall per submission.
            n.drain();
            if self.ring.submission().taskrun() || !self.ring.completion().is_empty() {
                n.notify();
            }
        }
        let n = self.ready.len();
        out.append(&mut self.ready);
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()> {
        if self.waker_armed {
            return Err(Error::new(ErrorKind::InvalidArgument, "the io_uring engine already has an armed waker"));
        }
        self.waker = Some(waker);
        Ok(())
    }

    fn spurious_wakeup(&mut self) {
        if self.reaped {
            // The next poll resets it.
            return;
        }
        if let Some(n) = &self.notifier {
            // The kernel may signal the eventfd late (from an RCU callback when it cannot
            // signal where the completion happens), after the poll that reaped it: reset it,
            // and signal again if something arrived meanwhile (the TASKRUN flag is set
            // before the kernel signals, as in `poll`).
            n.drain();
            if self.ring.submission().taskrun() || !self.ring.completion().is_empty() {
                n.notify();
            }
        }
    }

    fn completion_fd(&mut self) -> Result<std::os::fd::RawFd> {
        if !self.defer {
            // Without deferred task running the kernel posts completions itself, and the
            // ring's descriptor is readable exactly while the CQ holds some: nothing to reset.
            return Ok(self.ring.as_raw_fd());
        }
        if self.notifier.is_none() {
            let efd = EventFd::new()?;
            self.ring
                .submitter()
                .register_eventfd(efd.as_raw_fd())
                .map_err(|e| Error::io("io_uring register eventfd", e))?;
            self.notifier = Some(efd);
        }
        Ok(self.notifier.as_ref().expect("just set").as_raw_fd())
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into buffers of requests it holds: wait for every one
        // of them before the buffers are freed. Armed doorbell polls are cancelled by the
        // ring's close, so only count requests.
        let polls =
            |e: &UringEngine| usize::from(e.waker_armed) + usize::from(e.side.as_ref().is_some_and(|s| s.armed));
        let mut spins = 0u32;
        while self.in_kernel > polls(self) && self.enable().is_ok() {
            if self.enter(1, Some(Duration::from_millis(100))).is_err() {
                break;
            }
            self.reap();
            spins += 1;
            if spins > 600 {
                // A device that holds a request for a minute: leak the buffers rather than
                // let the kernel write into freed memory.
                for op in self.ops.drain(..).flatten() {
                    std::mem::forget(op);
                }
                break;
            }
        }
        // The ring's teardown runs later in a kernel worker, and until then its file table
        // keeps the devices open, with their exclusive locks: drop that table now, so a
        // device can be opened again as soon as its engine is gone.
        if self.files_registered {
            let _ = self.ring.submitter().unregister_files();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{AlignedBuf, IoEngine, OpenOptions};

    fn setup(tag: &str, size: usize) -> (std::path::PathBuf, Vec<u8>) {
        let dir = std::path::Path::new("/var/tmp").join(format!("ubcache-uring-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3]).collect();
        let p = dir.join("f");
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    fn drain(e: &mut UringEngine, n: usize) -> Vec<IoCompletion> {
        let mut out = Vec::new();
        while out.len() < n {
            e.poll(&mut out, None).unwrap();
        }
        out
    }

    /// Feeds synthetic results to a request the kernel has not seen, as if they came from
    /// CQEs, then lets the real kernel finish it: the retry and short-transfer paths.
    #[test]
    fn eagain_eintr_and_short_results_resubmit_the_rest() {
        let (p, data) = setup("retry", 1 << 20);
        let mut e = UringEngine::new(&EngineOptions::default()).unwrap();
        let id = e.add_device(Arc::new(Device::open(&p, &OpenOptions::default()).unwrap())).unwrap();
        e.submit(IoRequest::read(id, 8192, AlignedBuf::new(65536), 7));
        let idx = e.backlog.pop_front().unwrap();
        for res in [-libc::EAGAIN, -libc::EINTR, 4096, 8192] {
            e.on_cqe(idx, res);
            assert_eq!(e.backlog.pop_front(), Some(idx), "result {res} resubmits");
        }
        assert_eq!(e.ops[idx as usize].as_ref().unwrap().done, 12288);
        e.backlog.push_back(idx);
        let c = drain(&mut e, 1).pop().unwrap();
        assert_eq!(*c.result.as_ref().unwrap(), 65536);
        // The kernel read only what the synthetic results had not claimed.
        let b = c.into_buf().unwrap();
        assert!(b[..12288].iter().all(|&x| x == 0));
        assert!(b[12288..] == data[8192 + 12288..8192 + 65536]);

        // A hard error ends the request; a zero-byte result before the end is an error.
        e.submit(IoRequest::read(id, 0, AlignedBuf::new(4096), 8));
        let idx = e.backlog.pop_front().unwrap();
        e.on_cqe(idx, -libc::EIO);
        let c = drain(&mut e, 1).pop().unwrap();
        assert_eq!(c.result.unwrap_err().code(), "EIO");
        e.submit(IoRequest::read(id, 0, AlignedBuf::new(4096), 9));
        let idx = e.backlog.pop_front().unwrap();
        e.on_cqe(idx, 0);
        assert!(drain(&mut e, 1).pop().unwrap().result.is_err());
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }

    /// With the in-flight cap lifted, a tiny ring overflows its completion queue; the
    /// kernel keeps the extra completions and none is lost.
    #[test]
    fn completion_queue_overflow_loses_nothing() {
        let (p, data) = setup("overflow", 1 << 20);
        let mut e = UringEngine::new(&EngineOptions { queue_depth: 8, ..Default::default() }).unwrap();
        assert!(e.ring.params().is_feature_nodrop());
        e.cq_cap = usize::MAX;
        let id = e.add_device(Arc::new(Device::open(&p, &OpenOptions::default()).unwrap())).unwrap();
        for i in 0..300u64 {
            e.submit(IoRequest::read(id, (i % 256) * 4096, AlignedBuf::new(4096), i));
        }
        // Push everything to the kernel before reaping anything.
        e.enable().unwrap();
        for _ in 0..1000 {
            if e.backlog.is_empty() {
                break;
            }
            e.fill_sq().unwrap();
            e.enter(0, None).unwrap();
        }
        let mut overflowed = false;
        for _ in 0..100 {
            e.enter(0, None).unwrap();
            overflowed |= e.ring.submission().cq_overflow();
            if overflowed {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(overflowed, "300 completions into a 16-entry completion queue overflow it");
        let mut out = drain(&mut e, 300);
        out.sort_by_key(|c| c.user_data);
        assert_eq!(out.len(), 300);
        for (i, c) in out.into_iter().enumerate() {
            assert_eq!(c.user_data, i as u64);
            let off = (i % 256) * 4096;
            assert!(c.into_buf().unwrap()[..] == data[off..off + 4096]);
        }
        assert_eq!(e.in_flight(), 0);
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}
