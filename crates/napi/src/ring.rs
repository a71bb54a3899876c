//! Binding of [`RingDriver`]: the JavaScript thread drives the engine itself. Requests go
//! into the engine from the JavaScript call, and libuv watches the engine's completion
//! descriptor (`uv_poll`), so a batch of completions costs one wakeup of the event loop
//! and no thread handoff. Everything here is conversion plus the libuv glue that napi does
//! not offer: the poll handle, keeping the loop alive while requests are in flight, and
//! calling JavaScript from the poll callback (`napi_make_callback`, which also runs the
//! microtasks the callback queued).
//!
//! Batches use the format of the engine-thread binding (see `io.rs`).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::ptr;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ubcache_core::io::{BufPool, DevId, IoCompletion, IoRequest, RingDriver};
use ubcache_core::Error as CoreError;

use crate::io::{
    engine_of, open_device, requests_of, throw, to_u64, Batch, NativeDevice, NativeEngineOptions, NativeEngineStats,
    NativeOpenOptions,
};

// libuv, as exported by the Node.js binary that loads this addon.
extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(lp: *mut sys::uv_loop_s, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(handle: *mut c_void, events: c_int, cb: unsafe extern "C" fn(*mut c_void, c_int, c_int)) -> c_int;
    fn uv_poll_stop(handle: *mut c_void) -> c_int;
    fn uv_close(handle: *mut c_void, cb: unsafe extern "C" fn(*mut c_void));
    fn uv_ref(handle: *mut c_void);
    fn uv_unref(handle: *mut c_void);
    fn uv_strerror(err: c_int) -> *const std::ffi::c_char;
}

/// `UV_POLL` of libuv's `uv_handle_type` (stable across libuv 1.x).
const UV_POLL: c_int = 8;
/// `UV_READABLE` of libuv's `uv_poll_event`.
const UV_READABLE: c_int = 1;

fn handle_layout() -> Layout {
    // SAFETY: a pure query of libuv.
    let size = unsafe { uv_handle_size(UV_POLL) };
    Layout::from_size_align(size, 16).expect("uv_poll_t size")
}

fn uv_error(what: &str, code: c_int) -> CoreError {
    // SAFETY: uv_strerror returns a static NUL-terminated string for any code.
    let msg = unsafe { std::ffi::CStr::from_ptr(uv_strerror(code)) }.to_string_lossy();
    CoreError::new(ubcache_core::ErrorKind::Io, format!("{what}: {msg}"))
}

/// What the poll callback reaches through the handle's `data` pointer. Boxed, so its
/// address is stable; the handle is closed before it is dropped.
struct Glue {
    driver: RefCell<RingDriver>,
    pool: BufPool,
    env: sys::napi_env,
    callback: sys::napi_ref,
    async_ctx: sys::napi_async_context,
    /// The `uv_poll_t`; null once closed.
    handle: Cell<*mut c_void>,
    /// The handle keeps the event loop alive (only while requests are in flight).
    refed: Cell<bool>,
    wakeups: Cell<usize>,
}

/// Frees a poll handle once libuv is done with it.
unsafe extern "C" fn free_handle(handle: *mut c_void) {
    // SAFETY: allocated in `NativeRing::new` with this layout; libuv calls this once.
    unsafe { dealloc(handle as *mut u8, handle_layout()) };
}

/// The poll callback: the completion descriptor is readable.
unsafe extern "C" fn on_readable(handle: *mut c_void, _status: c_int, _events: c_int) {
    // SAFETY: `data` (the first field of every uv handle) points to the live Glue; the
    // handle is stopped and closed before the Glue goes away.
    let glue = unsafe { &*(*(handle as *const *const Glue)) };
    glue.wakeups.set(glue.wakeups.get() + 1);
    // The borrow ends before JavaScript runs, since it may submit from the callback.
    let reaped = glue.driver.borrow_mut().reap();
    match reaped {
        Ok(batch) if batch.is_empty() => {}
        Ok(batch) => glue.deliver(Some(batch), None),
        Err(e) => glue.deliver(None, Some(e)),
    }
    glue.update_ref();
}

/// Env teardown (a worker thread exiting) with the ring still open: close the handle.
unsafe extern "C" fn on_env_cleanup(arg: *mut c_void) {
    // SAFETY: registered with the live Glue and removed before it is dropped.
    let glue = unsafe { &*(arg as *const Glue) };
    glue.close_handle();
}

impl Glue {
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

    fn close_handle(&self) {
        let h = self.handle.replace(ptr::null_mut());
        if !h.is_null() {
            // SAFETY: h is an initialised, open poll handle; free_handle frees it once
            // libuv has let go of it.
            unsafe {
                uv_poll_stop(h);
                uv_close(h, free_handle);
            }
        }
    }

    /// Calls the JavaScript callback with a batch, or with the error that broke the engine.
    fn deliver(&self, batch: Option<Vec<IoCompletion>>, fatal: Option<CoreError>) {
        let env = self.env;
        // SAFETY: called on the JavaScript thread from a libuv callback, outside any napi
        // call; the scope bounds every handle created here, and each napi call gets live
        // values of this env.
        unsafe {
            let mut scope = ptr::null_mut();
            if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
                return;
            }
            let mut undefined = ptr::null_mut();
            sys::napi_get_undefined(env, &mut undefined);
            // With a batch: (batch); with an engine failure: (undefined, [code, message]).
            let argv = match (batch, fatal) {
                (Some(b), _) => Batch::to_napi_value(env, Batch(b)).map(|v| [v, undefined]),
                (None, Some(e)) => {
                    Vec::<String>::to_napi_value(env, vec![e.code().to_string(), e.message().to_string()])
                        .map(|v| [undefined, v])
                }
                (None, None) => Ok([undefined, undefined]),
            };
            let mut func = ptr::null_mut();
            let mut result = ptr::null_mut();
            if let Ok(argv) = argv {
                if sys::napi_get_reference_value(env, self.callback, &mut func) == sys::Status::napi_ok
                    && !func.is_null()
                {
                    // napi_make_callback wants an object as `this`.
                    let mut global = ptr::null_mut();
                    sys::napi_get_global(env, &mut global);
                    let status =
                        sys::napi_make_callback(env, self.async_ctx, global, func, 2, argv.as_ptr(), &mut result);
                    if status == sys::Status::napi_pending_exception {
                        // A throwing callback is an uncaught exception, as for any event.
                        let mut err = ptr::null_mut();
                        sys::napi_get_and_clear_last_exception(env, &mut err);
                        sys::napi_fatal_exception(env, err);
                    }
                }
            }
            sys::napi_close_handle_scope(env, scope);
        }
    }
}

/// An engine driven by the JavaScript thread (see the module docs).
#[napi]
pub struct NativeRing {
    glue: Box<Glue>,
}

#[napi]
impl NativeRing {
    /// Opens an engine on this thread's event loop; `onComplete` receives every batch of
    /// completions the loop collects, or `(undefined, [code, message])` if the engine broke.
    #[napi(
        constructor,
        ts_args_type = "options: NativeEngineOptions, onComplete: (batch: Array<number | Buffer | [string, string] | undefined> | undefined, fatal?: [string, string]) => void"
    )]
    pub fn new(env: &Env, options: NativeEngineOptions, on_complete: Function<'_, (), ()>) -> Result<Self> {
        let (engine, pool) = engine_of(env, &options)?;
        let driver = match RingDriver::new(engine) {
            Ok(d) => d,
            Err(e) => return throw(env, e),
        };
        let fd = driver.fd();
        let raw = env.raw();
        let mut callback = ptr::null_mut();
        let mut async_ctx = ptr::null_mut();
        // SAFETY: napi calls on the JavaScript thread with live values of this env.
        unsafe {
            check(sys::napi_create_reference(raw, on_complete.value().value, 1, &mut callback))?;
            let mut resource = ptr::null_mut();
            let mut name = ptr::null_mut();
            check(sys::napi_create_object(raw, &mut resource))?;
            check(sys::napi_create_string_utf8(raw, c"ubcache:io".as_ptr(), 10, &mut name))?;
            check(sys::napi_async_init(raw, resource, name, &mut async_ctx))?;
        }
        let glue = Box::new(Glue {
            driver: RefCell::new(driver),
            pool,
            env: raw,
            callback,
            async_ctx,
            handle: Cell::new(ptr::null_mut()),
            refed: Cell::new(false),
            wakeups: Cell::new(0),
        });
        let ring = NativeRing { glue };
        // SAFETY: the handle memory is sized by libuv; `data` is set to the boxed Glue, which
        // outlives the handle (Drop closes it first). A failed init frees the memory again.
        unsafe {
            let mut lp = ptr::null_mut();
            check(sys::napi_get_uv_event_loop(raw, &mut lp))?;
            let h = alloc_zeroed(handle_layout()) as *mut c_void;
            if h.is_null() {
                return Err(napi::Error::from_reason("out of memory for a uv_poll_t"));
            }
            let rc = uv_poll_init(lp, h, fd);
            if rc != 0 {
                dealloc(h as *mut u8, handle_layout());
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

    fn submit(&self, env: &Env, reqs: Vec<IoRequest>) -> Result<Option<Batch>> {
        let done = self.glue.driver.borrow_mut().submit_batch(reqs);
        self.glue.update_ref();
        match done {
            Ok(b) if b.is_empty() => Ok(None),
            Ok(b) => Ok(Some(Batch(b))),
            Err(e) => throw(env, e),
        }
    }

    /// Submits reads, flushes and discards (the descriptor format of the engine thread's
    /// `submitBatch`) with one `io_uring_enter`. Returns the completions already known.
    #[napi(ts_return_type = "Array<number | Buffer | [string, string] | undefined> | undefined")]
    pub fn submit_batch(&self, env: &Env, desc: &[f64]) -> Result<Option<Batch>> {
        let reqs = requests_of(env, &self.glue.pool, desc)?;
        self.submit(env, reqs)
    }

    /// Writes a copy of `data` at `offset`. Returns the completions already known.
    #[napi(ts_return_type = "Array<number | Buffer | [string, string] | undefined> | undefined")]
    pub fn write(&self, env: &Env, tag: f64, dev: u32, offset: f64, data: &[u8]) -> Result<Option<Batch>> {
        let offset = to_u64(env, "offset", offset)?;
        let req = IoRequest::write(DevId(dev), offset, self.glue.pool.copy_from(data), tag as u64);
        self.submit(env, vec![req])
    }

    /// Requests submitted and not yet delivered.
    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.glue.driver.borrow().in_flight() as u32
    }

    /// Refuses new requests (they complete with `CLOSED`) and stops watching the engine.
    /// Call it once nothing is in flight: requests still in flight are waited for here.
    #[napi]
    pub fn close(&self, env: &Env) -> Result<()> {
        self.glue.driver.borrow_mut().close();
        // Requests the caller did not wait for: finish them here rather than lose them.
        let mut left = Vec::new();
        while self.glue.driver.borrow().in_flight() > 0 {
            let got = self.glue.driver.borrow_mut().wait(Some(std::time::Duration::from_secs(1)));
            match got {
                Ok(b) => left.extend(b),
                Err(e) => return throw(env, e),
            }
        }
        if !left.is_empty() {
            self.glue.deliver(Some(left), None);
        }
        self.shutdown();
        Ok(())
    }

    /// Counters: event-loop wakeups for completions, and batches of completions.
    #[napi]
    pub fn stats(&self) -> NativeEngineStats {
        NativeEngineStats {
            wakeups: self.glue.wakeups.get() as f64,
            batches: self.glue.driver.borrow().batches() as f64,
        }
    }

    /// True once `close` has been called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.glue.driver.borrow().is_closed()
    }
}

impl NativeRing {
    /// Closes the poll handle and lets go of the callback; idempotent.
    fn shutdown(&self) {
        let g = &self.glue;
        if g.handle.get().is_null() {
            return;
        }
        g.close_handle();
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
        // SAFETY: the finalizer runs on the JavaScript thread; both were created in `new`.
        unsafe {
            sys::napi_delete_reference(self.glue.env, self.glue.callback);
            sys::napi_async_destroy(self.glue.env, self.glue.async_ctx);
        }
    }
}

fn check(status: sys::napi_status) -> Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(napi::Error::new(Status::from(status), "napi call failed".to_string()))
    }
}
