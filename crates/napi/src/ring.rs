//! Binding of [`RingDriver`]: the JavaScript thread drives the engine itself. Requests go
//! into the engine from the JavaScript call, and libuv watches the engine's completion
//! descriptor (`uv_poll`), so a batch of completions costs one wakeup of the event loop
//! and no thread handoff. Everything here is conversion plus the libuv glue that napi does
//! not offer: the poll handle, keeping the loop alive while requests are in flight, calling
//! JavaScript from a libuv callback (`napi_make_callback`, which also runs the microtasks
//! the callback queued).
//!
//! Requests and completions cross in two `ArrayBuffer`s shared with JavaScript, so no call
//! builds arrays or converts arguments per request:
//! - submission: [`DESC`] numbers per request, `op, tag, dev, offset, length, slab, at`
//!   (op 0 read, 2 flush, 3 discard). A read lands in bytes `at ..` of slab `slab`, an
//!   `ArrayBuffer` over engine memory that JavaScript got from `slab()`; the result is a
//!   view on it, with no copy.
//! - completion: two numbers per completion, `tag, result`, `result` the byte count or -1
//!   on error; the `[code, message]` of the errors of the chunk come from `takeErrors()`.
//!
//! `submit(n)` and `write` return how many completions they put in the completion buffer
//! (bad requests, I/O already finished); when that is a whole chunk (`chunk`), `more()`
//! returns the next one. The callback gets the count of each chunk it is called with.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ubcache_core::io::{
    AlignedBuf, BufPool, BusyPoll, DevId, IoCompletion, IoRequest, RingDriver, Slab, ADAPTIVE_POLL_CAP,
};
use ubcache_core::{Error as CoreError, ErrorKind};

use crate::io::{
    engine_of, open_device, throw, to_u64, whole, NativeDevice, NativeEngineOptions, NativeEngineStats,
    NativeOpenOptions,
};

// libuv, as exported by the Node.js binary that loads this addon.
extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(lp: *mut sys::uv_loop_s, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(handle: *mut c_void, events: c_int, cb: unsafe extern "C" fn(*mut c_void, c_int, c_int)) -> c_int;
    fn uv_close(handle: *mut c_void, cb: unsafe extern "C" fn(*mut c_void));
    fn uv_ref(handle: *mut c_void);
    fn uv_unref(handle: *mut c_void);
    fn uv_strerror(err: c_int) -> *const std::ffi::c_char;
}

/// `UV_POLL` of libuv's `uv_handle_type` (stable across libuv 1.x).
const UV_POLL: c_int = 8;
/// `UV_READABLE` of libuv's `uv_poll_event`.
const UV_READABLE: c_int = 1;

/// Numbers per request in the submission buffer.
const DESC: usize = 7;
/// Requests the submission buffer holds.
const SQ_ENTRIES: usize = 1024;
/// Completions handed to JavaScript at a time (what the completion buffer holds). Small, so
/// that the requests their promises make go out while JavaScript handles the next ones,
/// and the device is never left idle while a whole batch is handled. 4 KiB random reads at
/// queue depth 32 from Node on a 2-core VM: 8 gave 149.3K IOPS, 16 145.2K and 4 146.1K
/// (means of three alternating runs).
const CHUNK: usize = 8;

fn handle_layout() -> std::alloc::Layout {
    // SAFETY: pure queries of libuv.
    let size = unsafe { uv_handle_size(UV_POLL) };
    std::alloc::Layout::from_size_align(size, 16).expect("uv handle size")
}

fn alloc_handle() -> *mut c_void {
    // SAFETY: the layout has a non-zero size.
    unsafe { std::alloc::alloc_zeroed(handle_layout()) as *mut c_void }
}

/// Frees a handle once libuv is done with it.
unsafe extern "C" fn free_handle(handle: *mut c_void) {
    // SAFETY: allocated by `alloc_handle`; libuv calls this once.
    unsafe { std::alloc::dealloc(handle as *mut u8, handle_layout()) };
}

fn uv_error(what: &str, code: c_int) -> CoreError {
    // SAFETY: uv_strerror returns a static NUL-terminated string for any code.
    let msg = unsafe { std::ffi::CStr::from_ptr(uv_strerror(code)) }.to_string_lossy();
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
    // SAFETY: `hint` is the Box<SlabHold> leaked in `NativeRing::slab`; V8 calls this once.
    let hold = unsafe { Box::from_raw(hint as *mut SlabHold) };
    hold.table.borrow_mut().free.push(hold.id);
}

/// What the libuv callbacks reach through the handles' `data` pointer. Boxed, so its address
/// is stable; the handles are closed before it is dropped.
struct Glue {
    driver: RefCell<RingDriver>,
    pool: BufPool,
    env: sys::napi_env,
    callback: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    /// The shared buffers (references keep them alive) and their memory.
    sq_ref: sys::napi_ref,
    cq_ref: sys::napi_ref,
    sq: *const f64,
    cq: *mut f64,
    /// Completions not yet handed to JavaScript, and the errors of the chunk last handed.
    done: RefCell<VecDeque<IoCompletion>>,
    scratch: RefCell<Vec<IoCompletion>>,
    errors: RefCell<Vec<String>>,
    slabs: Rc<RefCell<Slabs>>,
    /// The `uv_poll_t`; null once closed.
    handle: Cell<*mut c_void>,
    /// The poll handle keeps the event loop alive (only while requests are in flight).
    refed: Cell<bool>,
    wakeups: Cell<usize>,
}

/// The poll callback: the completion descriptor is readable.
unsafe extern "C" fn on_readable(handle: *mut c_void, _status: c_int, _events: c_int) {
    // SAFETY: `data` (the first field of every uv handle) points to the live Glue; the
    // handle is stopped and closed before the Glue goes away.
    let glue = unsafe { &*(*(handle as *const *const Glue)) };
    glue.wakeups.set(glue.wakeups.get() + 1);
    glue.reap_and_deliver();
}

/// Env teardown (a worker thread exiting) with the ring still open: close the handle.
unsafe extern "C" fn on_env_cleanup(arg: *mut c_void) {
    // SAFETY: registered with the live Glue and removed before it is dropped.
    let glue = unsafe { &*(arg as *const Glue) };
    glue.close_handles();
}

impl Glue {
    fn reap_and_deliver(&self) {
        let mut got = std::mem::take(&mut *self.scratch.borrow_mut());
        // The borrow ends before JavaScript runs, since it may submit from the callback.
        let reaped = self.driver.borrow_mut().reap_into(&mut got);
        match reaped {
            Ok(0) => {}
            Ok(_) => {
                self.done.borrow_mut().extend(got.drain(..));
                self.deliver_all();
            }
            Err(e) => self.fatal(e),
        }
        *self.scratch.borrow_mut() = got;
        self.update_ref();
    }

    /// Keeps the event loop alive exactly while requests are in flight.
    fn update_ref(&self) {
        let h = self.handle.get();
        if h.is_null() {
            return;
        }
        let busy = self.driver.borrow().in_flight() > 0;
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

    fn close_handles(&self) {
        let h = self.handle.replace(ptr::null_mut());
        if !h.is_null() {
            // SAFETY: h is an initialised, open poll handle; free_handle frees it once libuv
            // has let go of it (uv_close stops the handle first).
            unsafe { uv_close(h, free_handle) };
        }
    }

    /// Moves up to a chunk of undelivered completions into the completion buffer; returns
    /// how many.
    fn fill_cq(&self) -> usize {
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
    fn deliver_all(&self) {
        loop {
            let n = self.fill_cq();
            if n == 0 {
                return;
            }
            // SAFETY: called on the JavaScript thread from a libuv callback, outside any napi
            // call.
            unsafe { self.call_js(n as f64, None) };
        }
    }

    /// Tells JavaScript the engine broke; its requests in flight are lost.
    fn fatal(&self, e: CoreError) {
        // SAFETY: as for `deliver_all`.
        unsafe { self.call_js(0.0, Some(e)) };
    }

    /// Calls the JavaScript callback with `(count)`, or `(0, [code, message])`.
    unsafe fn call_js(&self, count: f64, fatal: Option<CoreError>) {
        let env = self.env;
        // SAFETY: the caller is on the JavaScript thread outside any napi call; the scope
        // bounds every handle created here, and each napi call gets live values of this env.
        unsafe {
            let mut scope = ptr::null_mut();
            if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
                return;
            }
            let mut argv = [ptr::null_mut(); 2];
            sys::napi_create_double(env, count, &mut argv[0]);
            match fatal {
                Some(e) => {
                    if let Ok(v) =
                        Vec::<String>::to_napi_value(env, vec![e.code().to_string(), e.message().to_string()])
                    {
                        argv[1] = v;
                    }
                }
                None => {
                    sys::napi_get_undefined(env, &mut argv[1]);
                }
            }
            let mut func = ptr::null_mut();
            let mut result = ptr::null_mut();
            if !argv[1].is_null()
                && sys::napi_get_reference_value(env, self.callback, &mut func) == sys::Status::napi_ok
                && !func.is_null()
            {
                // napi_make_callback wants an object as `this`.
                let mut global = ptr::null_mut();
                sys::napi_get_global(env, &mut global);
                let status = sys::napi_make_callback(env, self.async_ctx, global, func, 2, argv.as_ptr(), &mut result);
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
    fn requests(&self, n: usize, out: &mut Vec<IoRequest>) -> std::result::Result<(), CoreError> {
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
                2 => IoRequest::flush(dev, tag),
                3 => IoRequest::discard(dev, offset, length, tag),
                op => return Err(CoreError::new(ErrorKind::InvalidArgument, format!("unknown request op {op}"))),
            });
        }
        Ok(())
    }
}

/// An engine driven by the JavaScript thread (see the module docs).
#[napi]
pub struct NativeRing {
    glue: Box<Glue>,
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

#[napi]
impl NativeRing {
    /// Opens an engine on this thread's event loop; `onComplete(count)` hears of each chunk
    /// of completions placed in the completion buffer, or `(0, [code, message])` if the
    /// engine broke.
    #[napi(
        constructor,
        ts_args_type = "options: NativeEngineOptions, onComplete: (count: number, fatal?: [string, string]) => void"
    )]
    pub fn new(env: &Env, options: NativeEngineOptions, on_complete: Function<'_, (), ()>) -> Result<Self> {
        let (engine, pool) = engine_of(env, &options, true)?;
        let mut driver = match RingDriver::new(engine) {
            Ok(d) => d,
            Err(e) => return throw(env, e),
        };
        driver.set_busy_poll(match (options.spin_auto, options.spin_micros) {
            (Some(true), _) => BusyPoll::Adaptive(ADAPTIVE_POLL_CAP),
            (_, Some(us)) if us > 0 => BusyPoll::Fixed(Duration::from_micros(us as u64)),
            _ => BusyPoll::Off,
        });
        let fd = driver.fd();
        let raw = env.raw();
        let mut callback = ptr::null_mut();
        let mut async_ctx = ptr::null_mut();
        let (sq_ref, sq, cq_ref, cq);
        // SAFETY: napi calls on the JavaScript thread with live values of this env.
        unsafe {
            check(sys::napi_create_reference(raw, on_complete.value().value, 1, &mut callback))?;
            let mut resource = ptr::null_mut();
            let mut name = ptr::null_mut();
            check(sys::napi_create_object(raw, &mut resource))?;
            check(sys::napi_create_string_utf8(raw, c"ubcache:io".as_ptr(), 10, &mut name))?;
            check(sys::napi_async_init(raw, resource, name, &mut async_ctx))?;
            (sq_ref, sq) = shared_buffer(raw, SQ_ENTRIES * DESC * 8)?;
            (cq_ref, cq) = shared_buffer(raw, CHUNK * 2 * 8)?;
        }
        let glue = Box::new(Glue {
            driver: RefCell::new(driver),
            pool,
            env: raw,
            callback,
            async_ctx,
            sq_ref,
            cq_ref,
            sq,
            cq,
            done: RefCell::new(VecDeque::new()),
            scratch: RefCell::new(Vec::new()),
            errors: RefCell::new(Vec::new()),
            slabs: Rc::new(RefCell::new(Slabs::default())),
            handle: Cell::new(ptr::null_mut()),
            refed: Cell::new(false),
            wakeups: Cell::new(0),
        });
        let ring = NativeRing { glue };
        // SAFETY: the handle memory is sized by libuv; `data` is set to the boxed Glue, which
        // outlives the handles (Drop closes them first). A failed init frees the memory again.
        unsafe {
            let mut lp = ptr::null_mut();
            check(sys::napi_get_uv_event_loop(raw, &mut lp))?;
            let h = alloc_handle();
            if h.is_null() {
                return Err(napi::Error::from_reason("out of memory for a uv_poll_t"));
            }
            let rc = uv_poll_init(lp, h, fd);
            if rc != 0 {
                free_handle(h);
                return throw(env, uv_error("uv_poll_init", rc));
            }
            *(h as *mut *const Glue) = &*ring.glue;
            ring.glue.handle.set(h);
            let rc = uv_poll_start(h, UV_READABLE, on_readable);
            if rc != 0 {
                return throw(env, uv_error("uv_poll_start", rc));
            }
            // An idle ring does not keep the process alive.
            uv_unref(h);
            check(sys::napi_add_env_cleanup_hook(
                raw,
                Some(on_env_cleanup),
                &*ring.glue as *const Glue as *mut c_void,
            ))?;
        }
        Ok(ring)
    }

    /// `io_uring` or `psync`.
    #[napi(getter)]
    pub fn kind(&self) -> String {
        self.glue.driver.borrow().kind().name().to_string()
    }

    /// The submission buffer: requests of `DESC` numbers each (see the module docs).
    #[napi(ts_return_type = "ArrayBuffer")]
    pub fn submission_buffer(&self, env: &Env) -> Result<sys::napi_value> {
        reference_value(env, self.glue.sq_ref)
    }

    /// The completion buffer: `tag, result` pairs.
    #[napi(ts_return_type = "ArrayBuffer")]
    pub fn completion_buffer(&self, env: &Env) -> Result<sys::napi_value> {
        reference_value(env, self.glue.cq_ref)
    }

    /// Requests the submission buffer holds.
    #[napi(getter)]
    pub fn capacity(&self) -> u32 {
        SQ_ENTRIES as u32
    }

    /// Completions handed over at a time: a call that returns this many may have more.
    #[napi(getter)]
    pub fn chunk(&self) -> u32 {
        CHUNK as u32
    }

    /// `[id, ArrayBuffer]`: a slab of at least `bytes` bytes of aligned engine memory that reads
    /// can land in. It lives as long as the `ArrayBuffer` (and any read into it).
    #[napi(ts_return_type = "[number, ArrayBuffer]")]
    pub fn slab(&self, env: &Env, bytes: f64) -> Result<Vec<sys::napi_value>> {
        let bytes = to_u64(env, "slab size", bytes)? as usize;
        let slab = Slab::new(self.glue.pool.get(bytes));
        let id = {
            let mut t = self.glue.slabs.borrow_mut();
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
        let hold = Box::into_raw(Box::new(SlabHold { _slab: slab, id, table: self.glue.slabs.clone() }));
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

    /// Opens a file or block device and adds it to the engine.
    #[napi]
    pub fn open_device(&self, env: &Env, path: String, options: Option<NativeOpenOptions>) -> Result<NativeDevice> {
        let (dev, info) = open_device(env, &path, options)?;
        let added = self.glue.driver.borrow_mut().add_device(dev);
        match added {
            Ok(id) => Ok(NativeDevice { id: id.0, ..info }),
            Err(e) => throw(env, e),
        }
    }

    /// Removes a device; its requests in flight still complete.
    #[napi]
    pub fn close_device(&self, env: &Env, id: u32) -> Result<()> {
        let removed = self.glue.driver.borrow_mut().remove_device(DevId(id));
        removed.or_else(|e| throw(env, e))
    }

    fn submit_reqs(&self, env: &Env, reqs: Vec<IoRequest>) -> Result<u32> {
        let g = &self.glue;
        let mut got = std::mem::take(&mut *g.scratch.borrow_mut());
        let done = g.driver.borrow_mut().submit_into(reqs, &mut got);
        g.done.borrow_mut().extend(got.drain(..));
        *g.scratch.borrow_mut() = got;
        g.update_ref();
        match done {
            Ok(_) => Ok(g.fill_cq() as u32),
            Err(e) => throw(env, e),
        }
    }

    /// Submits the first `count` requests of the submission buffer with one `io_uring_enter`.
    /// Returns how many completions it put in the completion buffer.
    #[napi]
    pub fn submit(&self, env: &Env, count: u32) -> Result<u32> {
        let n = count as usize;
        if n > SQ_ENTRIES {
            return throw(
                env,
                CoreError::new(ErrorKind::InvalidArgument, format!("{n} requests exceed the submission buffer")),
            );
        }
        let mut reqs = Vec::with_capacity(n);
        if let Err(e) = self.glue.requests(n, &mut reqs) {
            return throw(env, e);
        }
        self.submit_reqs(env, reqs)
    }

    /// Writes a copy of `data` at `offset`. Returns how many completions it put in the
    /// completion buffer.
    #[napi]
    pub fn write(&self, env: &Env, tag: f64, dev: u32, offset: f64, data: &[u8]) -> Result<u32> {
        let offset = to_u64(env, "offset", offset)?;
        let req = IoRequest::write(DevId(dev), offset, self.glue.pool.copy_from(data), tag as u64);
        self.submit_reqs(env, vec![req])
    }

    /// The next chunk of completions when the last call filled the completion buffer:
    /// how many it put there (0: none left).
    #[napi]
    pub fn more(&self) -> u32 {
        self.glue.fill_cq() as u32
    }

    /// `[code, message, code, message, ...]` of the errors (results of -1) of the chunk in
    /// the completion buffer, in order.
    #[napi]
    pub fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.glue.errors.borrow_mut())
    }

    /// Requests submitted and not yet delivered.
    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        (self.glue.driver.borrow().in_flight() + self.glue.done.borrow().len()) as u32
    }

    /// Refuses new requests (they complete with `CLOSED`) and stops watching the engine.
    /// Call it once nothing is in flight: requests still in flight are waited for here.
    #[napi]
    pub fn close(&self, env: &Env) -> Result<()> {
        self.glue.driver.borrow_mut().close();
        // Requests the caller did not wait for: finish them here rather than lose them.
        while self.glue.driver.borrow().in_flight() > 0 {
            let mut left = Vec::new();
            let got = self.glue.driver.borrow_mut().wait(Some(Duration::from_secs(1)));
            match got {
                Ok(b) => left.extend(b),
                Err(e) => return throw(env, e),
            }
            self.glue.done.borrow_mut().extend(left);
        }
        self.glue.deliver_all();
        self.shutdown();
        Ok(())
    }

    /// Counters: event-loop wakeups for completions, batches of completions, buffers.
    #[napi]
    pub fn stats(&self) -> NativeEngineStats {
        let d = self.glue.driver.borrow();
        NativeEngineStats::of(self.glue.wakeups.get(), d.batches(), d.busy_polls(), &self.glue.pool)
    }

    /// True once `close` has been called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.glue.driver.borrow().is_closed()
    }
}

impl NativeRing {
    /// Closes the handles and lets go of the callback; idempotent.
    fn shutdown(&self) {
        let g = &self.glue;
        if g.handle.get().is_null() {
            return;
        }
        g.close_handles();
        // SAFETY: napi calls on the JavaScript thread; the hook, reference and async context
        // were created in `new` and are released only here (handle non-null guards reentry).
        unsafe {
            sys::napi_remove_env_cleanup_hook(g.env, Some(on_env_cleanup), &**g as *const Glue as *mut c_void);
            // The callback closes over the JavaScript object that owns this one: hold it
            // weakly from now on, so the pair can be collected.
            let mut count = 0;
            sys::napi_reference_unref(g.env, g.callback, &mut count);
        }
    }
}

impl Drop for NativeRing {
    fn drop(&mut self) {
        self.glue.driver.borrow_mut().close();
        self.shutdown();
        // SAFETY: the finalizer runs on the JavaScript thread; all were created in `new`.
        unsafe {
            sys::napi_delete_reference(self.glue.env, self.glue.callback);
            sys::napi_delete_reference(self.glue.env, self.glue.sq_ref);
            sys::napi_delete_reference(self.glue.env, self.glue.cq_ref);
            sys::napi_async_destroy(self.glue.env, self.glue.async_ctx);
        }
    }
}

fn reference_value(env: &Env, r: sys::napi_ref) -> Result<sys::napi_value> {
    let mut v = ptr::null_mut();
    // SAFETY: a reference created in `new` and deleted only on drop.
    check(unsafe { sys::napi_get_reference_value(env.raw(), r, &mut v) })?;
    Ok(v)
}

fn check(status: sys::napi_status) -> Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(napi::Error::new(Status::from(status), "napi call failed".to_string()))
    }
}
