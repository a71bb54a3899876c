//! Binding of [`RingDriver`]: the JavaScript thread drives the I/O engine itself. Requests
//! go into the engine from the JavaScript call, and libuv watches the engine's completion
//! descriptor, so a batch of completions costs one wakeup of the event loop and no thread
//! handoff. The glue (libuv handles, the buffers shared with JavaScript, completion
//! delivery, slabs) is in inline.rs, shared with the cache engine's binding; its module
//! docs describe the submission and completion buffers.

use std::time::Duration;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ubcache_core::io::fault::FaultControl;
use ubcache_core::io::{BusyPoll, DevId, RingDriver, ADAPTIVE_POLL_CAP};

use crate::inline::{inline_methods, Callbacks, Glue};
use crate::io::{
    engine_of, open_device, throw, NativeDevice, NativeEngineOptions, NativeEngineStats, NativeOpenOptions,
};

/// A ring driver built as `options` ask (busy polling included), with its buffer pool;
/// `submit_batch` as [`engine_of`] takes it.
pub(crate) fn driver_of(
    env: &Env,
    options: &NativeEngineOptions,
    submit_batch: Option<usize>,
) -> Result<(RingDriver, ubcache_core::io::BufPool, Option<FaultControl>)> {
    let (engine, pool, slow) = engine_of(env, options, true, submit_batch)?;
    let mut driver = match RingDriver::new(engine) {
        Ok(d) => d,
        Err(e) => return throw(env, e),
    };
    driver.set_busy_poll(match (options.spin_auto, options.spin_micros) {
        (Some(true), _) => BusyPoll::Adaptive(ADAPTIVE_POLL_CAP),
        (_, Some(us)) if us > 0 => BusyPoll::Fixed(Duration::from_micros(us as u64)),
        _ => BusyPoll::Off,
    });
    Ok((driver, pool, slow))
}

/// An engine driven by the JavaScript thread (see the module docs).
#[napi]
pub struct NativeRing {
    glue: Box<Glue<RingDriver>>,
}

inline_methods!(NativeRing);

#[napi]
impl NativeRing {
    /// Opens an engine on this thread's event loop; `onComplete(count)` hears of each chunk
    /// of completions placed in the completion buffer, or `(0, [code, message])` if the
    /// engine broke. The engine holds `onComplete` strongly only while requests are in
    /// flight: keep it reachable from the object that owns the engine (a field), so that
    /// an idle engine nobody refers to can be collected.
    #[napi(
        constructor,
        ts_args_type = "options: NativeEngineOptions, onComplete: (count: number, fatal?: [string, string]) => void"
    )]
    pub fn new(env: &Env, options: NativeEngineOptions, on_complete: Function<'_, (), ()>) -> Result<Self> {
        let (driver, pool, _) = driver_of(env, &options, None)?;
        let cbs = Callbacks { on_complete, on_event: None, name: c"ubcache:io" };
        Ok(NativeRing { glue: Glue::new(env, driver, pool, cbs)? })
    }

    /// Opens a file or block device and adds it to the engine.
    #[napi]
    pub fn open_device(&self, env: &Env, path: String, options: Option<NativeOpenOptions>) -> Result<NativeDevice> {
        let (dev, info) = open_device(env, &path, options)?;
        let added = self.glue.driven.borrow_mut().add_device(dev);
        match added {
            Ok(id) => Ok(NativeDevice { id: id.0, ..info }),
            Err(e) => throw(env, e),
        }
    }

    /// Removes a device; its requests in flight still complete.
    #[napi]
    pub fn close_device(&self, env: &Env, id: u32) -> Result<()> {
        let removed = self.glue.driven.borrow_mut().remove_device(DevId(id));
        removed.or_else(|e| throw(env, e))
    }

    /// Refuses new requests (they complete with `CLOSED`) and stops watching the engine.
    /// Call it once nothing is in flight: requests still in flight are waited for here.
    #[napi]
    pub fn close(&self, env: &Env) -> Result<()> {
        let g = &self.glue;
        g.driven.borrow_mut().close();
        // Requests the caller did not wait for: finish them here rather than lose them.
        while g.driven.borrow().in_flight() > 0 {
            let got = g.driven.borrow_mut().wait(Some(Duration::from_secs(1)));
            match got {
                Ok(b) => g.push_done(b),
                Err(e) => return throw(env, e),
            }
        }
        g.deliver_all();
        g.shutdown();
        Ok(())
    }

    /// Counters: event-loop wakeups for completions, batches of completions, buffers.
    #[napi]
    pub fn stats(&self) -> NativeEngineStats {
        self.glue.engine_stats()
    }

    /// True once `close` has been called.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.glue.driven.borrow().is_closed()
    }
}
