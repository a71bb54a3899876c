//! Binding of the I/O engine: a native engine thread that JavaScript feeds requests and that
//! returns completions in batches, one threadsafe-function call per batch. Conversion only:
//! requests, validation, completion of short transfers and errors all live in
//! `ubcache_core::io`.
//!
//! A batch reaches JavaScript as one flat array, three slots per completion:
//! `tag, result, payload`. `result` is the byte count (or -1 on error); `payload` is the
//! read data as a `Buffer` (above 16 KiB over the engine's aligned memory, no copy: the
//! memory returns to the pool when the `Buffer` is collected; smaller reads are copied),
//! `undefined` for other ops, or `[code, message]` on error.

use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use ubcache_core::io::fault::{FaultControl, FaultEngine, Latency, SeekModel};
use ubcache_core::io::{
    open_engine, BufPool, BufPoolConfig, DevId, Device, DirectIo, EngineChoice, EngineOptions, IoCompletion, IoEngine,
    IoOp, IoRequest, IoThread, IoThreadOptions, OpenOptions,
};
use ubcache_core::{Error as CoreError, ErrorKind};

pub(crate) fn throw<T>(env: &Env, err: CoreError) -> Result<T> {
    env.throw_error(err.message(), Some(err.code()))?;
    Err(napi::Error::new(Status::PendingException, err.message().to_string()))
}

pub(crate) fn invalid<T>(env: &Env, msg: String) -> Result<T> {
    throw(env, CoreError::new(ErrorKind::InvalidArgument, msg))
}

/// A JavaScript number that must be a byte offset or count (a non-negative safe integer).
pub(crate) fn to_u64(env: &Env, what: &str, v: f64) -> Result<u64> {
    whole(v, what).or_else(|e| throw(env, e))
}

/// `v` as a whole number of bytes (or an index): a non-negative safe integer.
pub(crate) fn whole(v: f64, what: &str) -> std::result::Result<u64, CoreError> {
    if v >= 0.0 && v.fract() == 0.0 && v <= 9_007_199_254_740_991.0 {
        Ok(v as u64)
    } else {
        Err(CoreError::new(ErrorKind::InvalidArgument, format!("{what} must be a non-negative safe integer, got {v}")))
    }
}

/// The engine `name` names: `auto` (the default), `io_uring` or `psync`.
pub(crate) fn engine_choice(env: &Env, name: Option<&str>) -> Result<EngineChoice> {
    match name {
        None | Some("auto") => Ok(EngineChoice::Auto),
        Some("io_uring") => Ok(EngineChoice::Uring),
        Some("psync") => Ok(EngineChoice::Psync),
        Some(other) => invalid(env, format!("engine must be auto, io_uring or psync, got {other}")),
    }
}

/// Builds the engine `options` ask for, with the buffer pool its reads take memory from, and
/// with an emulated slow device's latency the control that steers it;
/// `submit_batch` overrides [`EngineOptions::submit_batch`].
pub(crate) fn engine_of(
    env: &Env,
    options: &NativeEngineOptions,
    event_loop: bool,
    submit_batch: Option<usize>,
) -> Result<(Box<dyn IoEngine>, BufPool, Option<FaultControl>)> {
    let latency = match options.latency.as_ref().map(NativeLatency::to_core).transpose() {
        Ok(l) => l,
        Err(e) => return throw(env, e),
    };
    let choice = engine_choice(env, options.engine.as_deref())?;
    let pool = BufPool::new(BufPoolConfig {
        arena_bytes: options.arena_bytes.unwrap_or(16 << 20) as usize,
        ..Default::default()
    });
    let defaults = EngineOptions::default();
    let opts = EngineOptions {
        choice,
        queue_depth: options.queue_depth.unwrap_or(defaults.queue_depth),
        psync_threads: options.psync_threads.map_or(defaults.psync_threads, |n| n as usize),
        buf_pool: Some(pool.clone()),
        // The event loop hands completions over in chunks of 8 (ring.rs) and each chunk's
        // requests come back together: going out in pairs gets the device going sooner.
        // QD32 4 KiB reads from Node, 2-core VM: 150.4K IOPS against 148.1K with 4, 134.4K
        // with 1 (three alternating runs each).
        submit_batch: submit_batch.unwrap_or(if event_loop { 2 } else { defaults.submit_batch }),
        ..defaults
    };
    match open_engine(&opts) {
        Ok(e) => match latency {
            None => Ok((e, pool, None)),
            Some(l) => {
                let slow = FaultEngine::new(e);
                let ctl = slow.control();
                ctl.set_latency(Some(l));
                Ok((Box::new(slow), pool, Some(ctl)))
            }
        },
        Err(e) => throw(env, e),
    }
}

/// How to open a device, as `options` ask (default: for writing, O_DIRECT where supported,
/// exclusively).
pub(crate) fn open_options(env: &Env, options: Option<NativeOpenOptions>) -> Result<OpenOptions> {
    let o = options.unwrap_or(NativeOpenOptions {
        write: None,
        direct: None,
        exclusive: None,
        create_size: None,
        remote_timeout_ms: None,
        remote_connections: None,
    });
    let direct = match o.direct.as_deref() {
        None | Some("auto") => DirectIo::Auto,
        Some("require") => DirectIo::Require,
        Some("off") => DirectIo::Off,
        Some(other) => return invalid(env, format!("direct must be auto, require or off, got {other}")),
    };
    let create_size = match o.create_size {
        Some(v) => Some(to_u64(env, "createSize", v)?),
        None => None,
    };
    Ok(OpenOptions {
        write: o.write.unwrap_or(true),
        direct,
        exclusive: o.exclusive.unwrap_or(true),
        create_size,
        remote_timeout: o.remote_timeout_ms.map(|ms| Duration::from_millis(u64::from(ms.max(1)))),
        remote_connections: o.remote_connections,
    })
}

/// Describes an open device for JavaScript (its `id` still 0).
pub(crate) fn device_of(dev: &Device) -> NativeDevice {
    NativeDevice {
        id: 0,
        size: dev.size() as f64,
        logical_block_size: dev.logical_block_size(),
        direct: dev.is_direct(),
        block_device: dev.is_block_device(),
        writable: dev.is_writable(),
    }
}

/// Opens the device `path` names, and describes it for JavaScript (its `id` still 0).
pub(crate) fn open_device(
    env: &Env,
    path: &str,
    options: Option<NativeOpenOptions>,
) -> Result<(Arc<Device>, NativeDevice)> {
    let opts = open_options(env, options)?;
    let dev = match Device::open(path, &opts) {
        Ok(d) => Arc::new(d),
        Err(e) => return throw(env, e),
    };
    let info = device_of(&dev);
    Ok((dev, info))
}

/// Requests of a `submitBatch` descriptor: five numbers per request, op (0 read, 2 flush,
/// 3 discard), tag, device, offset, length.
pub(crate) fn requests_of(env: &Env, pool: &BufPool, desc: &[f64]) -> Result<Vec<IoRequest>> {
    let mut reqs = Vec::with_capacity(desc.len() / 5);
    for d in desc.chunks_exact(5) {
        let (tag, dev) = (d[1] as u64, DevId(d[2] as u32));
        let offset = to_u64(env, "offset", d[3])?;
        let length = to_u64(env, "length", d[4])?;
        reqs.push(match d[0] as u32 {
            0 => IoRequest::read(dev, offset, pool.get(length as usize), tag),
            2 => IoRequest::flush(dev, tag),
            3 => IoRequest::discard(dev, offset, length, tag),
            op => return invalid(env, format!("unknown batched op {op}")),
        });
    }
    Ok(reqs)
}

/// Reads up to this size reach JavaScript as a copy: copying 16 KiB costs less than the
/// weak handle and finalizer of an external buffer, and the aligned memory goes straight
/// back to the pool. Larger reads are handed over without copying.
const COPY_MAX: usize = 16 << 10;

/// One batch of completions on its way to JavaScript.
pub struct Batch(pub(crate) Vec<IoCompletion>);

impl ToNapiValue for Batch {
    unsafe fn to_napi_value(raw: sys::napi_env, val: Self) -> Result<sys::napi_value> {
        let env = Env::from_raw(raw);
        let mut arr = env.create_array((val.0.len() * 3) as u32)?;
        for (i, c) in val.0.into_iter().enumerate() {
            let i = (i * 3) as u32;
            arr.set(i, c.user_data as f64)?;
            match c.result {
                Ok(n) => {
                    arr.set(i + 1, n as f64)?;
                    if let IoOp::Read { buf } = c.op {
                        if buf.len() <= COPY_MAX {
                            arr.set(i + 2, BufferSlice::copy_from(&env, &buf[..])?)?;
                            continue;
                        }
                        let (ptr, len) = (buf.as_ptr() as *mut u8, buf.len());
                        // SAFETY: the buffer's heap memory does not move when the AlignedBuf
                        // is moved into the finalize hint, and lives until the finalizer drops it.
                        let b = unsafe { BufferSlice::from_external(&env, ptr, len, buf, |_, b| drop(b)) }?;
                        arr.set(i + 2, b)?;
                    }
                }
                Err(e) => {
                    arr.set(i + 1, -1.0)?;
                    arr.set(i + 2, vec![e.code().to_string(), e.message().to_string()])?;
                }
            }
        }
        // SAFETY: arr is a live value of this env.
        unsafe { Array::to_napi_value(raw, arr) }
    }
}

type CompletionFn = ThreadsafeFunction<Vec<IoCompletion>, (), Batch, Status, false, true, 0>;

/// Options of a native engine.
#[napi(object)]
pub struct NativeEngineOptions {
    /// `auto` (io_uring, else the portable engine), `io_uring` or `psync`.
    pub engine: Option<String>,
    /// io_uring submission-queue entries.
    pub queue_depth: Option<u32>,
    /// Worker threads of the portable engine.
    pub psync_threads: Option<u32>,
    /// Bytes of aligned memory registered with io_uring for buffers.
    pub arena_bytes: Option<u32>,
    /// Microseconds to poll instead of sleeping: the engine thread for new requests, the
    /// inline ring for a first completion after a submission.
    pub spin_micros: Option<u32>,
    /// Inline ring: poll adaptively instead (`BusyPoll::Adaptive` with its default cap);
    /// takes precedence over `spin_micros`.
    pub spin_auto: Option<bool>,
    /// Emulate a slow device: every request waits this long before it completes (a cache
    /// engine: requests to backing devices only).
    pub latency: Option<NativeLatency>,
}

/// The cost model of an emulated slow device (the fault engine's latency).
#[napi(object)]
pub struct NativeLatency {
    /// Microseconds any request costs.
    pub fixed_us: f64,
    /// Transfer rate in bytes per second (0: transfers are free).
    pub bytes_per_sec: f64,
    /// Microseconds of a seek across the whole device (0: no seeks); the shortest seek
    /// costs a tenth of it, longer ones grow with the square root of the distance.
    pub full_stroke_us: f64,
    /// One request at a time, as a disk arm serves them (default false: all in parallel).
    pub serial: Option<bool>,
}

impl NativeLatency {
    fn to_core(&self) -> std::result::Result<Latency, CoreError> {
        let us = |v: f64, what: &str| whole(v, what).map(Duration::from_micros);
        let full_stroke = us(self.full_stroke_us, "latency.fullStrokeUs")?;
        Ok(Latency {
            fixed: us(self.fixed_us, "latency.fixedUs")?,
            bytes_per_sec: whole(self.bytes_per_sec, "latency.bytesPerSec")?,
            seek: (!full_stroke.is_zero()).then(|| SeekModel { track_to_track: full_stroke / 10, full_stroke }),
            serial: self.serial.unwrap_or(false),
            ..Default::default()
        })
    }
}

/// How to open a device.
#[napi(object)]
pub struct NativeOpenOptions {
    /// Open for writing (default true).
    pub write: Option<bool>,
    /// `auto` (default), `require` or `off`.
    pub direct: Option<String>,
    /// Exclusive open (default true).
    pub exclusive: Option<bool>,
    /// Create a regular file of this many bytes if the path does not exist.
    pub create_size: Option<f64>,
    /// A remote (NBD) device: milliseconds a request waits for its reply before it fails
    /// with `ETIMEDOUT` (default 30000).
    pub remote_timeout_ms: Option<u32>,
    /// A remote (NBD) device whose server allows multi-conn: connections (1-16, default 4).
    pub remote_connections: Option<u32>,
}

/// A device opened in an engine.
#[napi(object)]
pub struct NativeDevice {
    /// Handle for requests.
    pub id: u32,
    /// Capacity in bytes.
    pub size: f64,
    /// Offsets and lengths must be multiples of this under O_DIRECT.
    pub logical_block_size: u32,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// A block device (not a regular file).
    pub block_device: bool,
    /// Opened for writing.
    pub writable: bool,
}

/// Counters of an engine thread.
#[napi(object)]
pub struct NativeEngineStats {
    /// Times a submitter woke the sleeping engine thread.
    pub wakeups: f64,
    /// Batches of completions delivered to JavaScript.
    pub batches: f64,
    /// I/O buffers handed out from freed ones.
    pub reused_buffers: f64,
    /// I/O buffers that needed new memory (the registered arena, then the heap).
    pub fresh_buffers: f64,
    /// Inline ring: submissions that polled for a first completion, and how many got one.
    pub busy_polls: f64,
    pub busy_poll_hits: f64,
}

impl NativeEngineStats {
    pub(crate) fn of(wakeups: usize, batches: usize, polls: (usize, usize), pool: &BufPool) -> NativeEngineStats {
        let p = pool.stats();
        NativeEngineStats {
            wakeups: wakeups as f64,
            batches: batches as f64,
            reused_buffers: p.reused as f64,
            fresh_buffers: p.fresh as f64,
            busy_polls: polls.0 as f64,
            busy_poll_hits: polls.1 as f64,
        }
    }
}

/// The engine thread and its buffer pool.
#[napi]
pub struct NativeIoEngine {
    thread: Arc<IoThread>,
    pool: BufPool,
}

#[napi]
impl NativeIoEngine {
    /// Starts an engine thread; `onComplete` receives every batch of completions.
    #[napi(
        constructor,
        ts_args_type = "options: NativeEngineOptions, onComplete: (batch: Array<number | Buffer | [string, string] | undefined>) => void"
    )]
    pub fn new(env: &Env, options: NativeEngineOptions, on_complete: Function<'_, (), ()>) -> Result<Self> {
        let (engine, pool, _) = engine_of(env, &options, false, None)?;
        let tsfn: CompletionFn = on_complete
            .build_threadsafe_function::<Vec<IoCompletion>>()
            .weak::<true>()
            .build_callback(|ctx| Ok(Batch(ctx.value)))?;
        let sink = Box::new(move |batch: Vec<IoCompletion>| {
            tsfn.call(batch, ThreadsafeFunctionCallMode::NonBlocking);
        });
        let mut topts = IoThreadOptions::default();
        if let Some(us) = options.spin_micros {
            topts.spin = std::time::Duration::from_micros(us as u64);
        }
        match IoThread::spawn_with(engine, sink, topts) {
            Ok(t) => Ok(NativeIoEngine { thread: Arc::new(t), pool }),
            Err(e) => throw(env, e),
        }
    }

    /// `io_uring` or `psync`.
    #[napi(getter)]
    pub fn kind(&self) -> String {
        self.thread.kind().name().to_string()
    }

    /// Opens a file or block device and adds it to the engine.
    #[napi]
    pub fn open_device(&self, env: &Env, path: String, options: Option<NativeOpenOptions>) -> Result<NativeDevice> {
        let (dev, info) = open_device(env, &path, options)?;
        match self.thread.add_device(dev) {
            Ok(id) => Ok(NativeDevice { id: id.0, ..info }),
            Err(e) => throw(env, e),
        }
    }

    /// Removes a device; its requests in flight still complete.
    #[napi]
    pub fn close_device(&self, env: &Env, id: u32) -> Result<()> {
        match self.thread.remove_device(DevId(id)) {
            Ok(()) => Ok(()),
            Err(e) => throw(env, e),
        }
    }

    fn submit(&self, env: &Env, req: IoRequest) -> Result<()> {
        match self.thread.submit(req) {
            Ok(()) => Ok(()),
            Err(r) => throw(env, r.error),
        }
    }

    /// Submits many reads, flushes and discards at once (one enqueue, at most one wakeup
    /// of the engine thread). `desc` holds five numbers per request: op (0 read, 2 flush,
    /// 3 discard), tag, device, offset, length.
    #[napi]
    pub fn submit_batch(&self, env: &Env, desc: &[f64]) -> Result<()> {
        let reqs = requests_of(env, &self.pool, desc)?;
        match self.thread.submit_batch(reqs) {
            Ok(()) => Ok(()),
            Err(mut rejected) => match rejected.pop() {
                Some(r) => throw(env, r.error),
                None => Ok(()),
            },
        }
    }

    /// Reads `length` bytes at `offset`; completes under `tag`.
    #[napi]
    pub fn read(&self, env: &Env, tag: f64, dev: u32, offset: f64, length: u32) -> Result<()> {
        let offset = to_u64(env, "offset", offset)?;
        self.submit(env, IoRequest::read(DevId(dev), offset, self.pool.get(length as usize), tag as u64))
    }

    /// Writes a copy of `data` at `offset` (one copy, into aligned memory).
    #[napi]
    pub fn write(&self, env: &Env, tag: f64, dev: u32, offset: f64, data: &[u8]) -> Result<()> {
        let offset = to_u64(env, "offset", offset)?;
        self.submit(env, IoRequest::write(DevId(dev), offset, self.pool.copy_from(data), tag as u64))
    }

    /// fdatasync.
    #[napi]
    pub fn flush(&self, env: &Env, tag: f64, dev: u32) -> Result<()> {
        self.submit(env, IoRequest::flush(DevId(dev), tag as u64))
    }

    /// Discards `length` bytes at `offset`.
    #[napi]
    pub fn discard(&self, env: &Env, tag: f64, dev: u32, offset: f64, length: f64) -> Result<()> {
        let offset = to_u64(env, "offset", offset)?;
        let length = to_u64(env, "length", length)?;
        self.submit(env, IoRequest::discard(DevId(dev), offset, length, tag as u64))
    }

    /// Stops taking requests and resolves once every accepted request has completed.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self) -> AsyncTask<CloseTask> {
        // Refuse new requests now; the wait for the accepted ones happens off this thread.
        self.thread.stop_accepting();
        AsyncTask::new(CloseTask(self.thread.clone()))
    }

    /// Counters of the engine thread: doorbell wakeups and completion batches so far.
    #[napi]
    pub fn stats(&self) -> NativeEngineStats {
        let s = self.thread.stats();
        NativeEngineStats::of(s.wakeups, s.batches, (0, 0), &self.pool)
    }

    /// True once `close` has been called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.thread.is_closed()
    }
}

/// Closes the engine thread off the JavaScript thread.
pub struct CloseTask(Arc<IoThread>);

impl Task for CloseTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> Result<()> {
        self.0.close();
        Ok(())
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> Result<()> {
        Ok(())
    }
}
