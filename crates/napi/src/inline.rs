//! The glue that lets the JavaScript thread drive an engine itself, shared by the binding of
//! [`RingDriver`] (`NativeRing`, ring.rs) and that of the cache engine (`NativeCacheEngine`,
//! cache.rs). What they drive implements [`Driven`]; everything else is here, once: the
//! libuv handles napi does not offer (a `uv_poll` on the engine's completion descriptor, a
//! `uv_timer` for engines with background work), keeping the event loop alive exactly while
//! work is in flight or due, calling JavaScript from a libuv callback (`napi_make_callback`,
//! which also runs the microtasks the callback queued), the buffers shared with JavaScript
//! and the slabs reads land in.
//!
//! Requests and completions cross in two `ArrayBuffer`s shared with JavaScript, so no call
//! builds arrays or converts arguments per request:
//! - submission: [`DESC`] numbers per request, `op, tag, dev, offset, length, slab, at`
//!   (op 0 read, 2 flush, 3 discard; writes carry data and go by a call of their own, with
//!   their FUA flag). A read lands in bytes `at ..` of slab `slab`, an `ArrayBuffer` over
//!   engine memory that JavaScript got from `slab()`; the result is a view on it, with no copy.
//! - completion: two numbers per completion, `tag, result`, `result` the byte count or -1
//!   on error; the `[code, message]` of the errors of the chunk come from `takeErrors()`.
//!
//! `submit(n)` and `write` return how many completions they put in the completion buffer
//! (bad requests, I/O already finished); when that is a whole chunk (`chunk`), `more()`
//! returns the next one. The completion callback gets the count of each chunk it is called
//! with, or `(0, [code, message])` when the engine broke. Engines that finish control
//! operations (the cache engine's attach and close) hand them to a second callback, one
//! call per event, always from a libuv callback (never from inside a call JavaScript made).
//!
//! The callbacks close over the JavaScript object that owns the engine: they are held
//! strongly only while work is in flight or due (as the loop is kept alive), so an idle
//! engine that nothing refers to any more is garbage-collected, and its devices released.
//!
//! Timers: after every call into the engine and every reap, a `uv_timer` is armed for the
//! engine's [`Driven::next_deadline`] (0 ms when work is due now, or when events wait to be
//! delivered), and its callback runs [`Driven::tick`] and delivers what finished. A timer
//! only keeps the loop alive while it is armed, and it is stopped whenever nothing is due,
//! so an idle engine lets the process exit. A timer re-armed at 0 ms from its own callback
//! would run again in the same pass of the loop before libuv 1.48 (the loop would not get
//! a turn until the work is done): there it waits 1 ms instead.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{c_int, c_uint, c_void, CStr};
use std::os::fd::RawFd;
use std::ptr;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::Instant;

use napi::bindgen_prelude::*;
use ubcache_core::io::{AlignedBuf, BufPool, DevId, IoCompletion, IoRequest, RingDriver, Slab};
use ubcache_core::{Error as CoreError, ErrorKind, Result as CoreResult};

use crate::io::{throw, to_u64, whole, NativeEngineStats};

// libuv, as exported by the Node.js binary that loads this addon.
extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(lp: *mut sys::uv_loop_s, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(handle: *mut c_void, events: c_int, cb: unsafe extern "C" fn(*mut c_void, c_int, c_int)) -> c_int;
    fn uv_timer_init(lp: *mut sys::uv_loop_s, handle: *mut c_void) -> c_int;
    fn uv_timer_start(handle: *mut c_void, cb: unsafe extern "C" fn(*mut c_void), timeout: u64, repeat: u64) -> c_int;
    fn uv_timer_stop(handle: *mut c_void) -> c_int;
    fn uv_close(handle: *mut c_void, cb: unsafe extern "C" fn(*mut c_void));
    fn uv_ref(handle: *mut c_void);
    fn uv_unref(handle: *mut c_void);
    fn uv_strerror(err: c_int) -> *const std::ffi::c_char;
    fn uv_version() -> c_uint;
}

/// `UV_POLL` and `UV_TIMER` of libuv's `uv_handle_type` (stable across libuv 1.x).
const UV_POLL: c_int = 8;
const UV_TIMER: c_int = 13;
/// `UV_READABLE` of libuv's `uv_poll_event`.
const UV_READABLE: c_int = 1;
/// libuv 1.48.0, from which a timer re-armed at 0 ms in its callback waits for the next pass.
const UV_TIMER_READY_QUEUE: c_uint = (1 << 16) | (48 << 8);

/// Numbers per request in the submission buffer.
pub(crate) const DESC: usize = 7;
/// Requests the submission buffer holds.
pub(crate) const SQ_ENTRIES: usize = 1024;
/// Completions handed to JavaScript at a time (what the completion buffer holds). Small, so
/// that the requests their promises make go out while JavaScript handles the next ones,
/// and the device is never left idle while a whole batch is handled. 4 KiB random reads at
/// queue depth 32 from Node on a 2-core VM: 8 gave 149.3K IOPS, 16 145.2K and 4 146.1K
/// (means of three alternating runs).
pub(crate) const CHUNK: usize = 8;

/// What the JavaScript thread drives through the glue: the I/O engine's ring driver, or
/// the cache engine.
pub(crate) trait Driven: 'static {
    /// Has background work run by [`Driven::tick`] when [`Driven::next_deadline`] says.
    const TIMED: bool;
    /// Hands requests over; appends what completed at once to `out`.
    fn submit_into(&mut self, reqs: Vec<IoRequest>, out: &mut Vec<IoCompletion>) -> CoreResult<usize>;
    /// Takes what completed (the descriptor turned readable); appends it to `out`.
    fn reap_into(&mut self, out: &mut Vec<IoCompletion>) -> CoreResult<usize>;
    /// Requests not yet completed.
    fn in_flight(&self) -> usize;
    /// The descriptor that turns readable when [`Driven::reap_into`] has work.
    fn fd(&self) -> RawFd;
    /// Stops serving: later requests complete with `CLOSED`.
    fn close(&mut self);
    /// The ring driver underneath, while there is one (for its counters).
    fn ring(&self) -> Option<&RingDriver>;
    /// When [`Driven::tick`] has work next (`None`: idle).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Runs the background work that is due; appends what completed to `out`.
    fn tick(&mut self, _out: &mut Vec<IoCompletion>) -> CoreResult<usize> {
        Ok(0)
    }
    /// Control operations finished: `(tag, result)`.
    fn take_events(&mut self, _out: &mut Vec<(u64, CoreResult<u32>)>) {}
    /// Requests finished that only [`Driven::tick`] hands out now (the descriptor will not
    /// turn readable for them).
    fn has_undelivered(&self) -> bool {
        false
    }
}

impl Driven for RingDriver {
    const TIMED: bool = false;
    fn submit_into(&mut self, reqs: Vec<IoRequest>, out: &mut Vec<IoCompletion>) -> CoreResult<usize> {
        RingDriver::submit_into(self, reqs, out)
    }
    fn reap_into(&mut self, out: &mut Vec<IoCompletion>) -> CoreResult<usize> {
        RingDriver::reap_into(self, out)
    }
    fn in_flight(&self) -> usize {
        RingDriver::in_flight(self)
    }
    fn fd(&self) -> RawFd {
        RingDriver::fd(self)
    }
    fn close(&mut self) {
        RingDriver::close(self)
    }
    fn ring(&self) -> Option<&RingDriver> {
        Some(self)
    }
}

fn handle_layout() -> std::alloc::Layout {
    // SAFETY: pure queries of libuv.
    let size = unsafe { uv_handle_size(UV_POLL).max(uv_handle_size(UV_TIMER)) };
    std::alloc::Layout::from_size_align(size, 16).expect("uv handle size")
}

fn alloc_handle() -> Result<*mut c_void> {
    // SAFETY: the layout has a non-zero size.
    let h = unsafe { std::alloc::alloc_zeroed(handle_layout()) as *mut c_void };
    if h.is_null() {
        return Err(napi::Error::from_reason("out of memory for a libuv handle"));
    }
    Ok(h)
}

/// Frees a handle once libuv is done with it.
unsafe extern "C" fn free_handle(handle: *mut c_void) {
    // SAFETY: allocated by `alloc_handle`; libuv calls this once.
    unsafe { std::alloc::dealloc(handle as *mut u8, handle_layout()) };
}

fn uv_error(what: &str, code: c_int) -> CoreError {
    // SAFETY: uv_strerror returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(uv_strerror(code)) }.to_string_lossy();
    CoreError::new(ErrorKind::Io, format!("{what}: {msg}"))
}

/// Slabs JavaScript holds, by id. Weak: a slab lives as long as its `ArrayBuffer` (or a read
/// still landing in it); the `ArrayBuffer`'s finalizer frees the id.
#[derive(Default)]
struct Slabs {
    by_id: Vec<Weak<Slab>>,
    free: Vec<u32>,
}

/// What an `ArrayBuffer` over a slab holds until it is collected.
struct SlabHold {
    _slab: Arc<Slab>,
    id: u32,
    table: Rc<RefCell<Slabs>>,
}

unsafe extern "C" fn finalize_slab(_env: sys::napi_env, _data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` is the Box<SlabHold> leaked in `Glue::slab`; V8 calls this once.
    let hold = unsafe { Box::from_raw(hint as *mut SlabHold) };
    hold.table.borrow_mut().free.push(hold.id);
}

/// The JavaScript functions the glue calls.
pub(crate) struct Callbacks<'a> {
    /// `(count)` per chunk of completions, `(0, [code, message])` when the engine broke.
    pub on_complete: Function<'a, (), ()>,
    /// `(tag, handle)` per finished control operation, `(tag, -1, [code, message])` when
    /// it failed; `None` for engines without events.
    pub on_event: Option<Function<'a, (), ()>>,
    /// The async resource name the callbacks run under (`ubcache:io`).
    pub name: &'static CStr,
}

/// What the libuv callbacks reach through the handles' `data` pointer. Boxed, so its
/// address is stable; the handles are closed before it is dropped.
pub(crate) struct Glue<D: Driven> {
    pub driven: RefCell<D>,
    pub pool: BufPool,
    kind: &'static str,
    env: sys::napi_env,
    on_complete: sys::napi_ref,
    /// Null when the engine has no events.
    on_event: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    /// The shared buffers (references keep them alive) and their memory.
    sq_ref: sys::napi_ref,
    cq_ref: sys::napi_ref,
    sq: *const f64,
    cq: *mut f64,
    /// Completions not yet handed to JavaScript, and the errors of the chunk last handed.
    done: RefCell<VecDeque<IoCompletion>>,
    scratch: RefCell<Vec<IoCompletion>>,
    /// Writes copied in by `stage`, waiting for the submission that names them.
    staged: RefCell<Vec<Option<IoRequest>>>,
    errors: RefCell<Vec<String>>,
    /// Control operations finished and not yet handed to JavaScript.
    events: RefCell<VecDeque<(u64, CoreResult<u32>)>>,
    slabs: Rc<RefCell<Slabs>>,
    /// The `uv_poll_t`; null once closed.
    poll: Cell<*mut c_void>,
    /// The poll handle keeps the event loop alive (only while requests are in flight).
    refed: Cell<bool>,
    /// The `uv_timer_t` of a timed engine; null for others and once closed.
    timer: Cell<*mut c_void>,
    /// The deadline the timer is armed for.
    armed: Cell<Option<Instant>>,
    /// The timer's callback is running.
    in_timer: Cell<bool>,
    /// libuv runs a timer re-armed at 0 ms from its callback in the next pass of the loop.
    zero_rearm: bool,
    /// The handles are open (until `shutdown`).
    live: Cell<bool>,
    /// The callbacks are held strongly: work is in flight or due (see `update_hold`).
    held: Cell<bool>,
    wakeups: Cell<usize>,
}

/// The poll callback: the completion descriptor is readable.
unsafe extern "C" fn on_readable<D: Driven>(handle: *mut c_void, _status: c_int, _events: c_int) {
    // SAFETY: `data` (the first field of every uv handle) points to the live Glue; the
    // handle is stopped and closed before the Glue goes away.
    let glue = unsafe { &*(*(handle as *const *const Glue<D>)) };
    glue.wakeups.set(glue.wakeups.get() + 1);
    glue.run(|d, out| d.reap_into(out));
}

/// The timer callback: background work is due, or events wait to be delivered.
unsafe extern "C" fn on_timer<D: Driven>(handle: *mut c_void) {
    // SAFETY: as for `on_readable`.
    let glue = unsafe { &*(*(handle as *const *const Glue<D>)) };
    glue.armed.set(None);
    glue.in_timer.set(true);
    glue.run(|d, out| d.tick(out));
    glue.in_timer.set(false);
}

/// Env teardown (a worker thread exiting) with the engine still open: close the handles.
unsafe extern "C" fn on_env_cleanup<D: Driven>(arg: *mut c_void) {
    // SAFETY: registered with the live Glue and removed before it is dropped.
    let glue = unsafe { &*(arg as *const Glue<D>) };
    glue.close_handles();
}

/// A shared `ArrayBuffer` of `bytes` zeroed bytes, referenced, and its memory.
unsafe fn shared_buffer(env: sys::napi_env, bytes: usize) -> Result<(sys::napi_ref, *mut f64)> {
    let mut data = ptr::null_mut();
    let mut value = ptr::null_mut();
    let mut reference = ptr::null_mut();
    // SAFETY: napi calls on the JavaScript thread with live values of this env; V8 keeps an
    // ArrayBuffer's backing store in place for as long as the buffer lives.
    unsafe {
        check(sys::napi_create_arraybuffer(env, bytes, &mut data, &mut value))?;
        check(sys::napi_create_reference(env, value, 1, &mut reference))?;
    }
    Ok((reference, data as *mut f64))
}

impl<D: Driven> Glue<D> {
    /// Sets up the glue for `driven` on this thread's event loop.
    pub fn new(env: &Env, driven: D, pool: BufPool, cbs: Callbacks<'_>) -> Result<Box<Glue<D>>> {
        let kind = driven.ring().map_or("none", |r| r.kind().name());
        let fd = driven.fd();
        let raw = env.raw();
        let (mut on_complete, mut on_event, mut async_ctx) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
        let (sq_ref, sq, cq_ref, cq);
        // SAFETY: napi calls on the JavaScript thread with live values of this env.
        unsafe {
            check(sys::napi_create_reference(raw, cbs.on_complete.value().value, 1, &mut on_complete))?;
            if let Some(f) = &cbs.on_event {
                check(sys::napi_create_reference(raw, f.value().value, 1, &mut on_event))?;
            }
            let mut resource = ptr::null_mut();
            let mut name = ptr::null_mut();
            check(sys::napi_create_object(raw, &mut resource))?;
            check(sys::napi_create_string_utf8(raw, cbs.name.as_ptr(), cbs.name.count_bytes() as isize, &mut name))?;
            check(sys::napi_async_init(raw, resource, name, &mut async_ctx))?;
            (sq_ref, sq) = shared_buffer(raw, SQ_ENTRIES * DESC * 8)?;
            (cq_ref, cq) = shared_buffer(raw, CHUNK * 2 * 8)?;
        }
        let glue = Box::new(Glue {
            driven: RefCell::new(driven),
            pool,
            kind,
            env: raw,
            on_complete,
            on_event,
            async_ctx,
            sq_ref,
            cq_ref,
            sq,
            cq,
            done: RefCell::new(VecDeque::new()),
            scratch: RefCell::new(Vec::new()),
            staged: RefCell::new(Vec::new()),
            errors: RefCell::new(Vec::new()),
            events: RefCell::new(VecDeque::new()),
            slabs: Rc::new(RefCell::new(Slabs::default())),
            poll: Cell::new(ptr::null_mut()),
            refed: Cell::new(false),
            timer: Cell::new(ptr::null_mut()),
            armed: Cell::new(None),
            in_timer: Cell::new(false),
            // SAFETY: a pure query of libuv.
            zero_rearm: unsafe { uv_version() } >= UV_TIMER_READY_QUEUE,
            live: Cell::new(true),
            held: Cell::new(true),
            wakeups: Cell::new(0),
        });
        let data = &*glue as *const Glue<D>;
        // SAFETY: the handle memory is sized by libuv; `data` is set to the boxed Glue, which
        // outlives the handles (its Drop closes them first). A failed init frees the memory.
        unsafe {
            let mut lp = ptr::null_mut();
            check(sys::napi_get_uv_event_loop(raw, &mut lp))?;
            let h = alloc_handle()?;
            let rc = uv_poll_init(lp, h, fd);
            if rc != 0 {
                free_handle(h);
                return throw(env, uv_error("uv_poll_init", rc));
            }
            *(h as *mut *const Glue<D>) = data;
            glue.poll.set(h);
            let rc = uv_poll_start(h, UV_READABLE, on_readable::<D>);
            if rc != 0 {
                return throw(env, uv_error("uv_poll_start", rc));
            }
            // An idle engine does not keep the process alive.
            uv_unref(h);
            if D::TIMED {
                let t = alloc_handle()?;
                let rc = uv_timer_init(lp, t);
                if rc != 0 {
                    free_handle(t);
                    return throw(env, uv_error("uv_timer_init", rc));
                }
                // A timer keeps the loop alive only while armed, which it is only while
                // work is due (see the module docs).
                *(t as *mut *const Glue<D>) = data;
                glue.timer.set(t);
            }
            check(sys::napi_add_env_cleanup_hook(raw, Some(on_env_cleanup::<D>), data as *mut c_void))?;
        }
        glue.after_call();
        Ok(glue)
    }

    /// `io_uring` or `psync`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Runs `f` on the engine (a reap or a tick, from a libuv callback) and delivers what
    /// finished.
    fn run(&self, f: impl FnOnce(&mut D, &mut Vec<IoCompletion>) -> CoreResult<usize>) {
        let mut got = std::mem::take(&mut *self.scratch.borrow_mut());
        // The borrow ends before JavaScript runs, since it may submit from the callback.
        let ran = f(&mut self.driven.borrow_mut(), &mut got);
        self.done.borrow_mut().extend(got.drain(..));
        *self.scratch.borrow_mut() = got;
        if let Err(e) = ran {
            self.fatal(e);
        }
        self.take_events();
        if !self.done.borrow().is_empty() {
            self.deliver_all();
        }
        self.deliver_events();
        self.after_call();
    }

    fn take_events(&self) {
        if self.on_event.is_null() {
            return;
        }
        let mut got = Vec::new();
        self.driven.borrow_mut().take_events(&mut got);
        self.events.borrow_mut().extend(got);
    }

    /// After any call into the engine: keeps the event loop alive exactly while work is in
    /// flight or due, and arms the timer for the work that is due.
    pub fn after_call(&self) {
        self.take_events();
        self.update_ref();
        if D::TIMED {
            self.arm_timer();
        }
        self.update_hold();
    }

    /// Holds the callbacks strongly exactly while work is in flight or due. The callbacks
    /// close over the JavaScript object that owns this one, so while they are held the
    /// pair lives on even if nothing else refers to it (its completions must be delivered);
    /// when idle, an engine nobody refers to any more is collected, and dropping it
    /// releases its devices.
    fn update_hold(&self) {
        if !self.live.get() {
            return;
        }
        let hold = self.refed.get() || self.armed.get().is_some() || !self.events.borrow().is_empty();
        if hold != self.held.replace(hold) {
            self.hold_callbacks(hold);
        }
    }

    fn hold_callbacks(&self, hold: bool) {
        let mut count = 0;
        for r in [self.on_complete, self.on_event] {
            if r.is_null() {
                continue;
            }
            // SAFETY: references created in `new` and deleted only on drop; napi calls on
            // the JavaScript thread.
            unsafe {
                if hold {
                    sys::napi_reference_ref(self.env, r, &mut count);
                } else {
                    sys::napi_reference_unref(self.env, r, &mut count);
                }
            }
        }
    }

    /// Keeps the event loop alive exactly while requests are in flight.
    fn update_ref(&self) {
        let h = self.poll.get();
        if h.is_null() {
            return;
        }
        let busy = self.driven.borrow().in_flight() > 0;
        if busy != self.refed.get() {
            // SAFETY: h is an initialised, open poll handle.
            unsafe {
                if busy {
                    uv_ref(h)
                } else {
                    uv_unref(h)
                }
            };
            self.refed.set(busy);
        }
    }

    /// Arms the timer for the engine's next deadline (now, if events wait), or stops it.
    fn arm_timer(&self) {
        let t = self.timer.get();
        if t.is_null() {
            return;
        }
        let due = if self.events.borrow().is_empty() && !self.driven.borrow().has_undelivered() {
            self.driven.borrow().next_deadline()
        } else {
            Some(Instant::now())
        };
        let Some(due) = due else {
            if self.armed.take().is_some() {
                // SAFETY: t is an initialised, open timer handle.
                unsafe { uv_timer_stop(t) };
            }
            return;
        };
        if self.armed.get().is_some_and(|a| a <= due) {
            return;
        }
        let mut ms = due.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000) as u64;
        if ms == 0 && self.in_timer.get() && !self.zero_rearm {
            ms = 1;
        }
        // SAFETY: as above; the callback finds the Glue through `data`.
        unsafe { uv_timer_start(t, on_timer::<D>, ms, 0) };
        self.armed.set(Some(due));
    }

    pub fn close_handles(&self) {
        for h in [self.poll.replace(ptr::null_mut()), self.timer.replace(ptr::null_mut())] {
            if !h.is_null() {
                // SAFETY: h is an initialised, open handle; free_handle frees it once libuv
                // has let go of it (uv_close stops the handle first).
                unsafe { uv_close(h, free_handle) };
            }
        }
    }

    /// Closes the handles and holds the callbacks weakly from now on; idempotent.
    pub fn shutdown(&self) {
        if !self.live.replace(false) {
            return;
        }
        self.close_handles();
        // SAFETY: a napi call on the JavaScript thread; the hook was added in `new` and is
        // removed only here (`live` guards reentry).
        unsafe {
            sys::napi_remove_env_cleanup_hook(
                self.env,
                Some(on_env_cleanup::<D>),
                self as *const Glue<D> as *mut c_void,
            );
        }
        // Hold the callbacks weakly from now on, so the pair can be collected.
        if self.held.replace(false) {
            self.hold_callbacks(false);
        }
    }

    /// Moves up to a chunk of undelivered completions into the completion buffer; returns
    /// how many.
    pub fn fill_cq(&self) -> usize {
        let mut done = self.done.borrow_mut();
        let mut errors = self.errors.borrow_mut();
        errors.clear();
        let n = done.len().min(CHUNK);
        for (i, c) in done.drain(..n).enumerate() {
            let result = match c.result {
                Ok(bytes) => bytes as f64,
                Err(e) => {
                    errors.push(e.code().to_string());
                    errors.push(e.message().to_string());
                    -1.0
                }
            };
            // SAFETY: i < CHUNK, inside the completion buffer, which the reference
            // keeps alive; JavaScript only reads it between our calls.
            unsafe {
                *self.cq.add(2 * i) = c.user_data as f64;
                *self.cq.add(2 * i + 1) = result;
            }
        }
        n
    }

    /// Hands every undelivered completion to JavaScript, a chunk per call.
    pub fn deliver_all(&self) {
        loop {
            let n = self.fill_cq();
            if n == 0 {
                return;
            }
            // SAFETY: called on the JavaScript thread from a libuv callback (or a call that
            // JavaScript expects to call it back), outside any other napi call.
            unsafe { self.call_js(self.on_complete, &[n as f64], None) };
        }
    }

    /// Hands finished control operations to JavaScript, one call each.
    fn deliver_events(&self) {
        loop {
            let Some((tag, result)) = self.events.borrow_mut().pop_front() else { return };
            let (handle, err) = match result {
                Ok(h) => (f64::from(h), None),
                Err(e) => (-1.0, Some(e)),
            };
            // SAFETY: as for `deliver_all`.
            unsafe { self.call_js(self.on_event, &[tag as f64, handle], err) };
        }
    }

    /// Tells JavaScript the engine broke; its requests in flight are lost.
    fn fatal(&self, e: CoreError) {
        // SAFETY: as for `deliver_all`.
        unsafe { self.call_js(self.on_complete, &[0.0], Some(e)) };
    }

    /// Calls `func` with `(...nums, [code, message])`, or `(...nums, undefined)`.
    unsafe fn call_js(&self, func: sys::napi_ref, nums: &[f64], err: Option<CoreError>) {
        let env = self.env;
        // SAFETY: the caller is on the JavaScript thread outside any napi call; the scope
        // bounds every handle created here, and each napi call gets live values of this env.
        unsafe {
            let mut scope = ptr::null_mut();
            if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
                return;
            }
            let mut argv = vec![ptr::null_mut(); nums.len() + 1];
            for (v, n) in argv.iter_mut().zip(nums) {
                sys::napi_create_double(env, *n, v);
            }
            let last = nums.len();
            match err {
                Some(e) => {
                    if let Ok(v) =
                        Vec::<String>::to_napi_value(env, vec![e.code().to_string(), e.message().to_string()])
                    {
                        argv[last] = v;
                    }
                }
                None => {
                    sys::napi_get_undefined(env, &mut argv[last]);
                }
            }
            let mut f = ptr::null_mut();
            let mut result = ptr::null_mut();
            if !argv[last].is_null()
                && sys::napi_get_reference_value(env, func, &mut f) == sys::Status::napi_ok
                && !f.is_null()
            {
                // napi_make_callback wants an object as `this`.
                let mut global = ptr::null_mut();
                sys::napi_get_global(env, &mut global);
                let status =
                    sys::napi_make_callback(env, self.async_ctx, global, f, argv.len(), argv.as_ptr(), &mut result);
                if status == sys::Status::napi_pending_exception {
                    // A throwing callback is an uncaught exception, as for any event.
                    let mut err = ptr::null_mut();
                    sys::napi_get_and_clear_last_exception(env, &mut err);
                    sys::napi_fatal_exception(env, err);
                }
            }
            sys::napi_close_handle_scope(env, scope);
        }
    }

    /// Decodes `n` requests of the submission buffer.
    fn requests(&self, n: usize, out: &mut Vec<IoRequest>) -> CoreResult<()> {
        let slabs = self.slabs.borrow();
        for i in 0..n {
            // SAFETY: i < SQ_ENTRIES (checked by the caller), inside the submission buffer,
            // which the reference keeps alive; JavaScript only writes it between our calls.
            let d = unsafe { std::slice::from_raw_parts(self.sq.add(i * DESC), DESC) };
            let tag = d[1] as u64;
            let dev = DevId(d[2] as u32);
            let offset = whole(d[3], "offset")?;
            let length = whole(d[4], "length")?;
            out.push(match d[0] as u32 {
                0 => {
                    let id = whole(d[5], "slab")? as usize;
                    let at = whole(d[6], "slab offset")? as usize;
                    let slab = slabs.by_id.get(id).and_then(Weak::upgrade);
                    // SAFETY: JavaScript hands each window of a slab to one read at a time and
                    // reads it only after that read completed.
                    let buf = slab.and_then(|s| unsafe { AlignedBuf::in_slab(&s, at, length as usize) });
                    match buf {
                        Some(buf) => IoRequest::read(dev, offset, buf, tag),
                        None => {
                            return Err(CoreError::new(
                                ErrorKind::InvalidArgument,
                                format!("read of {length} bytes into slab {id} at {at}: no such window"),
                            ))
                        }
                    }
                }
                1 => {
                    let slot = whole(d[5], "staged write")? as usize;
                    match self.staged.borrow_mut().get_mut(slot).and_then(Option::take) {
                        Some(mut w) => {
                            w.user_data = tag;
                            w
                        }
                        None => {
                            return Err(CoreError::new(
                                ErrorKind::InvalidArgument,
                                format!("write {slot}: no such staged write"),
                            ))
                        }
                    }
                }
                2 => IoRequest::flush(dev, tag),
                3 => IoRequest::discard(dev, offset, length, tag),
                op => return Err(CoreError::new(ErrorKind::InvalidArgument, format!("unknown request op {op}"))),
            });
        }
        Ok(())
    }

    /// Hands `reqs` to the engine; returns how many completions went into the completion
    /// buffer.
    fn submit_reqs(&self, env: &Env, reqs: Vec<IoRequest>) -> Result<u32> {
        let mut got = std::mem::take(&mut *self.scratch.borrow_mut());
        let done = self.driven.borrow_mut().submit_into(reqs, &mut got);
        self.done.borrow_mut().extend(got.drain(..));
        *self.scratch.borrow_mut() = got;
        self.after_call();
        match done {
            Ok(_) => Ok(self.fill_cq() as u32),
            Err(e) => throw(env, e),
        }
    }

    /// Submits the first `count` requests of the submission buffer.
    pub fn submit(&self, env: &Env, count: u32) -> Result<u32> {
        let n = count as usize;
        if n > SQ_ENTRIES {
            return throw(
                env,
                CoreError::new(ErrorKind::InvalidArgument, format!("{n} requests exceed the submission buffer")),
            );
        }
        let mut reqs = Vec::with_capacity(n);
        let decoded = self.requests(n, &mut reqs);
        // Every staged write was named by this submission (or is failed with it).
        self.staged.borrow_mut().clear();
        if let Err(e) = decoded {
            return throw(env, e);
        }
        self.submit_reqs(env, reqs)
    }

    /// Copies `data` into engine memory as a write at `offset` (durable on completion with
    /// `fua`) and returns its slot, which the next submission names (op 1): writes made in
    /// one tick then go to the engine together, in order with the other requests.
    pub fn stage(&self, env: &Env, dev: u32, offset: f64, data: &[u8], fua: bool) -> Result<u32> {
        let offset = to_u64(env, "offset", offset)?;
        let mut req = IoRequest::write(DevId(dev), offset, self.pool.copy_from(data), 0);
        req.fua = fua;
        let mut staged = self.staged.borrow_mut();
        staged.push(Some(req));
        Ok((staged.len() - 1) as u32)
    }

    /// `[id, ArrayBuffer]`: a slab of at least `bytes` bytes of aligned engine memory.
    pub fn slab(&self, env: &Env, bytes: f64) -> Result<Vec<sys::napi_value>> {
        let bytes = to_u64(env, "slab size", bytes)? as usize;
        let slab = Slab::new(self.pool.get(bytes));
        let id = {
            let mut t = self.slabs.borrow_mut();
            match t.free.pop() {
                Some(id) => {
                    t.by_id[id as usize] = Arc::downgrade(&slab);
                    id
                }
                None => {
                    t.by_id.push(Arc::downgrade(&slab));
                    (t.by_id.len() - 1) as u32
                }
            }
        };
        let (data, len) = (slab.as_ptr(), slab.len());
        let hold = Box::into_raw(Box::new(SlabHold { _slab: slab, id, table: self.slabs.clone() }));
        let raw = env.raw();
        let mut ab = ptr::null_mut();
        let mut idv = ptr::null_mut();
        // SAFETY: the memory stays valid until the finalizer drops `hold` (which holds the
        // slab); napi calls on the JavaScript thread.
        unsafe {
            let status = sys::napi_create_external_arraybuffer(
                raw,
                data as *mut c_void,
                len,
                Some(finalize_slab),
                hold as *mut c_void,
                &mut ab,
            );
            if status != sys::Status::napi_ok {
                finalize_slab(raw, ptr::null_mut(), hold as *mut c_void);
                return Err(napi::Error::new(
                    Status::from(status),
                    "cannot create an external ArrayBuffer".to_string(),
                ));
            }
            check(sys::napi_create_uint32(raw, id, &mut idv))?;
        }
        Ok(vec![idv, ab])
    }

    /// Queues completions that were not reaped through the glue (a close that waited for
    /// them).
    pub fn push_done(&self, got: impl IntoIterator<Item = IoCompletion>) {
        self.done.borrow_mut().extend(got);
    }

    /// `[code, message, ...]` of the errors of the chunk in the completion buffer.
    pub fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.errors.borrow_mut())
    }

    /// Requests submitted and not yet delivered.
    pub fn in_flight(&self) -> u32 {
        (self.driven.borrow().in_flight() + self.done.borrow().len()) as u32
    }

    /// Counters of the ring underneath and the buffer pool.
    pub fn engine_stats(&self) -> NativeEngineStats {
        let d = self.driven.borrow();
        let (batches, polls) = d.ring().map_or((0, (0, 0)), |r| (r.batches(), r.busy_polls()));
        NativeEngineStats::of(self.wakeups.get(), batches, polls, &self.pool)
    }

    pub fn submission_buffer(&self, env: &Env) -> Result<sys::napi_value> {
        reference_value(env, self.sq_ref)
    }

    pub fn completion_buffer(&self, env: &Env) -> Result<sys::napi_value> {
        reference_value(env, self.cq_ref)
    }
}

impl<D: Driven> Drop for Glue<D> {
    fn drop(&mut self) {
        // The handles go first: closing the cache engine closes the descriptor they watch.
        self.shutdown();
        self.driven.get_mut().close();
        // SAFETY: the finalizer runs on the JavaScript thread; all were created in `new`.
        unsafe {
            sys::napi_delete_reference(self.env, self.on_complete);
            if !self.on_event.is_null() {
                sys::napi_delete_reference(self.env, self.on_event);
            }
            sys::napi_delete_reference(self.env, self.sq_ref);
            sys::napi_delete_reference(self.env, self.cq_ref);
            sys::napi_async_destroy(self.env, self.async_ctx);
        }
    }
}

fn reference_value(env: &Env, r: sys::napi_ref) -> Result<sys::napi_value> {
    let mut v = ptr::null_mut();
    // SAFETY: a reference created in `Glue::new` and deleted only on drop.
    check(unsafe { sys::napi_get_reference_value(env.raw(), r, &mut v) })?;
    Ok(v)
}

pub(crate) fn check(status: sys::napi_status) -> Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(napi::Error::new(Status::from(status), "napi call failed".to_string()))
    }
}

/// The methods of an engine driven inline that JavaScript's request machinery uses, the
/// same on every class that holds a `glue: Box<Glue<_>>` (see the module docs).
macro_rules! inline_methods {
    ($class:ident) => {
        #[napi]
        impl $class {
            /// `io_uring` or `psync`.
            #[napi(getter)]
            pub fn kind(&self) -> String {
                self.glue.kind().to_string()
            }

            /// The submission buffer: requests of seven numbers each, `op, tag, dev, offset,
            /// length, slab, at` (op 0 read, 2 flush, 3 discard).
            #[napi(ts_return_type = "ArrayBuffer")]
            pub fn submission_buffer(&self, env: &Env) -> Result<sys::napi_value> {
                self.glue.submission_buffer(env)
            }

            /// The completion buffer: `tag, result` pairs (`result` -1 on error).
            #[napi(ts_return_type = "ArrayBuffer")]
            pub fn completion_buffer(&self, env: &Env) -> Result<sys::napi_value> {
                self.glue.completion_buffer(env)
            }

            /// Requests the submission buffer holds.
            #[napi(getter)]
            pub fn capacity(&self) -> u32 {
                $crate::inline::SQ_ENTRIES as u32
            }

            /// Completions handed over at a time: a call that returns this many may have more.
            #[napi(getter)]
            pub fn chunk(&self) -> u32 {
                $crate::inline::CHUNK as u32
            }

            /// `[id, ArrayBuffer]`: a slab of at least `bytes` bytes of aligned engine memory
            /// that reads can land in. It lives as long as the `ArrayBuffer` (and any read
            /// into it).
            #[napi(ts_return_type = "[number, ArrayBuffer]")]
            pub fn slab(&self, env: &Env, bytes: f64) -> Result<Vec<sys::napi_value>> {
                self.glue.slab(env, bytes)
            }

            /// Submits the first `count` requests of the submission buffer at once. Returns
            /// how many completions it put in the completion buffer.
            #[napi]
            pub fn submit(&self, env: &Env, count: u32) -> Result<u32> {
                self.glue.submit(env, count)
            }

            /// Copies `data` into engine memory as a write at `offset` (with `fua`, durable
            /// when it completes); returns the slot the next `submit` names it by (op 1).
            #[napi]
            pub fn stage(&self, env: &Env, dev: u32, offset: f64, data: &[u8], fua: Option<bool>) -> Result<u32> {
                self.glue.stage(env, dev, offset, data, fua.unwrap_or(false))
            }

            /// The next chunk of completions when the last call filled the completion buffer:
            /// how many it put there (0: none left).
            #[napi]
            pub fn more(&self) -> u32 {
                self.glue.fill_cq() as u32
            }

            /// `[code, message, code, message, ...]` of the errors (results of -1) of the
            /// chunk in the completion buffer, in order.
            #[napi]
            pub fn take_errors(&self) -> Vec<String> {
                self.glue.take_errors()
            }

            /// Requests submitted and not yet delivered.
            #[napi(getter)]
            pub fn in_flight(&self) -> u32 {
                self.glue.in_flight()
            }
        }
    };
}
pub(crate) use inline_methods;
