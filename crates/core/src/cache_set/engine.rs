//! The cache engine: one [`RingDriver`] (so one I/O engine) and at most one cache set,
//! serving the devices attached to it, driven by one thread.
//!
//! Devices are known by handles. A handle is a cached device of the set, or a backing
//! device with no cache set, whose requests go straight to its data offset. Requests come
//! in as [`IoRequest`]s whose `dev` is a handle; [`CacheEngine::submit`] hands them to the
//! set (or the backing device), sends the I/O that results straight to the device and
//! handles whatever completes at once. [`CacheEngine::reap`] takes the I/O engine's
//! completions when [`CacheEngine::fd`] turns readable; [`CacheEngine::tick`] runs the
//! background work whose time [`CacheEngine::next_deadline`] says has come. A thread
//! without an event loop calls [`CacheEngine::poll`], which waits.
//!
//! The engine is driven from the JavaScript thread by default (see docs/engine.md for the
//! measurements behind that choice): no request crosses a thread, and a hit read costs
//! one system call to submit and one wakeup of the loop the thread sleeps in anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CacheMode, CacheSet, CachedDevConfig, SetState};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{DevId, Device, IoCompletion, IoOp, IoRequest, RingDriver};

/// Tag bit of I/O for a device without a cache set (the set's tags never set it).
const PLAIN: u64 = 1 << 63;

/// What a handle names.
enum Route {
    /// Cached device `inode` of the set.
    Cached(u32),
    /// A backing device with no cache set.
    Plain { backing: DevId, data_offset: u64, size: u64, block: u64 },
}

/// A request to a device without a cache set, in flight.
struct PlainReq {
    user_data: u64,
    handle: u32,
    offset: u64,
}

/// See the module docs.
pub struct CacheEngine {
    driver: RingDriver,
    set: Option<CacheSet>,
    routes: Vec<Option<Route>>,
    plain: Vec<Option<PlainReq>>,
    plain_free: Vec<u32>,
    plain_done: Vec<IoCompletion>,
    io: Vec<IoRequest>,
    got: Vec<IoCompletion>,
    /// Requests that finished during a call that returns no completions (starting a set,
    /// an attach, a close):
    /// handed out by the next call that does.
    undelivered: Vec<IoCompletion>,
    /// Handles of cached devices by inode (to give completions their handle back).
    by_inode: Vec<u32>,
    /// Attaches waiting for the set's event: tag → handle.
    attaching: Vec<(u64, u32)>,
    events: Vec<(u64, Result<u32>)>,
    set_events: Vec<(u64, Result<u32>)>,
    close_tag: Option<u64>,
}

impl CacheEngine {
    /// An engine with no cache set, for backing devices served straight.
    pub fn new(driver: RingDriver) -> CacheEngine {
        CacheEngine {
            driver,
            set: None,
            routes: Vec::new(),
            plain: Vec::new(),
            plain_free: Vec::new(),
            plain_done: Vec::new(),
            io: Vec::new(),
            got: Vec::new(),
            undelivered: Vec::new(),
            by_inode: Vec::new(),
            attaching: Vec::new(),
            events: Vec::new(),
            set_events: Vec::new(),
            close_tag: None,
        }
    }

    /// An engine running `set` (as [`super::load`] returned it) on the cache device `cache`:
    /// the device joins the I/O engine and the set's startup begins.
    pub fn with_set(driver: RingDriver, mut set: CacheSet, cache: Arc<Device>) -> Result<CacheEngine> {
        let mut e = CacheEngine::new(driver);
        let id = e.driver.add_device(cache)?;
        set.start(id);
        e.set = Some(set);
        e.pump_aside()?;
        Ok(e)
    }

    /// The cache set, if the engine runs one.
    pub fn set(&self) -> Option<&CacheSet> {
        self.set.as_ref()
    }

    /// The cache set, to change tunables (cache modes).
    pub fn set_mut(&mut self) -> Option<&mut CacheSet> {
        self.set.as_mut()
    }

    /// The I/O driver.
    pub fn driver(&self) -> &RingDriver {
        &self.driver
    }

    /// The I/O driver, to tune polling.
    pub fn driver_mut(&mut self) -> &mut RingDriver {
        &mut self.driver
    }

    fn new_handle(&mut self, r: Route) -> u32 {
        match self.routes.iter().position(Option::is_none) {
            Some(i) => {
                self.routes[i] = Some(r);
                i as u32
            }
            None => {
                self.routes.push(Some(r));
                (self.routes.len() - 1) as u32
            }
        }
    }

    /// Attaches a backing device to the set. Returns its handle at once; `tag` comes back
    /// from [`CacheEngine::take_events`] when it can take requests (its UUID-table entry
    /// is durable).
    pub fn attach(&mut self, tag: u64, cfg: CachedDevConfig) -> Result<u32> {
        if self.set.is_none() {
            return Err(no_set());
        }
        let backing = self.driver.add_device(cfg.device.clone())?;
        let handle = self.new_handle(Route::Plain { backing, data_offset: 0, size: 0, block: 1 });
        self.attaching.push((tag, handle));
        self.set.as_mut().expect("a set").attach(tag, cfg, backing);
        self.pump_aside()?;
        Ok(handle)
    }

    /// Serves a backing device with no cache set: requests go to `data_offset` on.
    pub fn attach_plain(&mut self, device: Arc<Device>, data_offset: u64) -> Result<u32> {
        let size = device.size();
        if data_offset >= size || !data_offset.is_multiple_of(512) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: data offset {data_offset} does not lie inside the device ({size} bytes)",
                    device.path().display()
                ),
            ));
        }
        let block = u64::from(device.logical_block_size().max(512));
        let backing = self.driver.add_device(device)?;
        Ok(self.new_handle(Route::Plain { backing, data_offset, size: size - data_offset, block }))
    }

    /// Lets go of a device (nothing of it may be in flight); returns it to the caller's
    /// hands by closing its slot in the I/O engine.
    pub fn detach(&mut self, handle: u32) -> Result<()> {
        let route = self.routes.get(handle as usize).and_then(Option::as_ref).ok_or_else(|| bad_handle(handle))?;
        let backing = match route {
            Route::Cached(inode) => {
                let inode = *inode;
                self.set.as_mut().expect("a set").detach(inode)?
            }
            Route::Plain { backing, .. } => {
                if self.plain.iter().flatten().any(|p| p.handle == handle) {
                    return Err(Error::new(ErrorKind::Busy, format!("device {handle} has requests in flight")));
                }
                *backing
            }
        };
        self.routes[handle as usize] = None;
        if backing == super::volume::NO_BACKING {
            // A flash-only volume: nothing in the I/O engine to close.
            return Ok(());
        }
        self.driver.remove_device(backing)
    }

    /// bcache's `clear_stats`: the handle's accounting windows, or (None) the set's and all.
    pub fn clear_accounting(&mut self, handle: Option<u32>) -> Result<()> {
        match handle {
            Some(h) => {
                let (set, inode) = self.cached_mut(h)?;
                set.clear_accounting(Some(inode))
            }
            None => self.set.as_mut().ok_or_else(no_set)?.clear_accounting(None),
        }
    }

    /// The handle's dirty extents (see [`CacheSet::dirty_extents`]).
    pub fn dirty_extents(&mut self, handle: u32, max: usize) -> Result<Vec<(u64, u64)>> {
        let (set, inode) = self.cached_mut(handle)?;
        Ok(set.dirty_extents(inode, max))
    }

    /// The set's cache replacement policy and discard flag (see `CacheSet::set_cache_policy`).
    pub fn cache_policy(&self) -> Result<(crate::alloc::Replacement, bool)> {
        self.set.as_ref().map(|s| s.cache_policy()).ok_or_else(no_set)
    }

    /// Changes the set's cache replacement policy and discard flag, recorded in its superblock.
    pub fn set_cache_policy(&mut self, replacement: crate::alloc::Replacement, discard: bool) -> Result<()> {
        let set = self.set.as_mut().ok_or_else(no_set)?;
        set.set_cache_policy(replacement, discard)?;
        self.pump_aside()
    }

    /// Creates a flash-only volume of `sectors` named `uuid` in the set (see
    /// `cache_set::volume`). Returns its handle at once; `tag` comes back from
    /// [`CacheEngine::take_events`] when its UUID-table entry is durable.
    pub fn create_volume(&mut self, tag: u64, uuid: [u8; 16], label: [u8; 32], sectors: u64) -> Result<u32> {
        let set = self.set.as_mut().ok_or_else(no_set)?;
        set.create_volume(tag, uuid, label, sectors);
        self.volume_handle(tag)
    }

    /// Attaches the set's flash-only volume `uuid` (one created before a restart). Returns
    /// its handle; `tag` comes back from [`CacheEngine::take_events`] at once.
    pub fn attach_volume(&mut self, tag: u64, uuid: [u8; 16]) -> Result<u32> {
        let set = self.set.as_mut().ok_or_else(no_set)?;
        set.attach_volume(tag, uuid);
        self.volume_handle(tag)
    }

    fn volume_handle(&mut self, tag: u64) -> Result<u32> {
        // Requests before the event are refused by the set (no such inode yet).
        let handle = self.new_handle(Route::Cached(u32::MAX));
        self.attaching.push((tag, handle));
        self.pump_aside()?;
        Ok(handle)
    }

    /// Records the cache mode and state of the handle's cached device, one with no
    /// superblock to hold them (see `cache_set::existing`); `tag` comes back from
    /// [`CacheEngine::take_events`] once that is durable.
    pub fn record_entry(&mut self, tag: u64, handle: u32, mode: CacheMode, state: u8) -> Result<()> {
        let (set, inode) = self.cached_mut(handle)?;
        set.record_entry(tag, inode, mode, state);
        self.pump_aside()
    }

    /// Begins detaching the handle's cached device for good (see `cache_set::detach`): its
    /// dirty data is written back, then its cached data dropped and its UUID slot freed.
    /// `tag` comes back from [`CacheEngine::take_events`] when that is durable (or with
    /// the error that stopped it); the device then passes requests straight through until
    /// [`CacheEngine::detach`] lets go of it.
    pub fn detach_begin(&mut self, tag: u64, handle: u32) -> Result<()> {
        let (set, inode) = self.cached_mut(handle)?;
        set.detach_begin(tag, inode)?;
        self.pump_aside()
    }

    /// Cancels the handle's detach while it still writes back (its tag comes back with
    /// `Closed`).
    pub fn detach_cancel(&mut self, handle: u32) -> Result<()> {
        let (set, inode) = self.cached_mut(handle)?;
        set.detach_cancel(inode)?;
        self.pump_aside()
    }

    /// Begins a clean close of the set: requests in flight finish, new ones are refused, a
    /// final checkpoint is written. `tag` comes back from [`CacheEngine::take_events`] when
    /// it is done (the set's state is then [`SetState::Closed`]).
    pub fn close(&mut self, tag: u64) -> Result<()> {
        match self.set.as_mut() {
            Some(s) => {
                self.close_tag = Some(tag);
                s.close();
            }
            None => self.events.push((tag, Ok(0))),
        }
        self.pump_aside()
    }

    /// Takes `reqs` and returns what completed at once in `out`; returns how many.
    pub fn submit(&mut self, reqs: impl IntoIterator<Item = IoRequest>, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let before = out.len();
        for mut r in reqs {
            let handle = r.dev.0;
            match self.routes.get(handle as usize).and_then(Option::as_ref) {
                Some(Route::Cached(inode)) => {
                    r.dev = DevId(*inode);
                    self.set.as_mut().expect("a cached device has a set").submit(r);
                }
                Some(&Route::Plain { backing, data_offset, size, block }) if size > 0 => {
                    self.plain_submit(r, handle, backing, data_offset, size, block)
                }
                _ => {
                    let e = bad_handle(handle);
                    self.plain_done.push(IoCompletion::of(r, Err(e)));
                }
            }
        }
        self.pump(out)?;
        Ok(out.len() - before)
    }

    fn plain_submit(&mut self, r: IoRequest, handle: u32, backing: DevId, data_offset: u64, size: u64, block: u64) {
        let len = match &r.op {
            IoOp::Read { buf } | IoOp::Write { buf } => buf.len() as u64,
            IoOp::Discard { len } => *len,
            IoOp::Flush => 0,
            IoOp::Readv { .. } | IoOp::Writev { .. } => {
                let e = Error::new(ErrorKind::InvalidArgument, "vectored I/O is not offered on cached devices");
                return self.plain_done.push(IoCompletion::of(r, Err(e)));
            }
        };
        if !matches!(r.op, IoOp::Flush) {
            let bad = if len == 0 {
                Some(Error::new(ErrorKind::InvalidArgument, format!("request of 0 bytes at {}", r.offset)))
            } else if !r.offset.is_multiple_of(block) || !len.is_multiple_of(block) {
                Some(Error::new(
                    ErrorKind::Misaligned,
                    format!("{len} bytes at {}: not whole blocks of {block} bytes", r.offset),
                ))
            } else if r.offset.checked_add(len).is_none_or(|e| e > size) {
                Some(Error::new(
                    ErrorKind::OutOfRange,
                    format!("{len} bytes at {} pass the end of the device ({size} bytes)", r.offset),
                ))
            } else {
                None
            };
            if let Some(e) = bad {
                return self.plain_done.push(IoCompletion::of(r, Err(e)));
            }
        }
        let slot = match self.plain_free.pop() {
            Some(s) => s,
            None => {
                self.plain.push(None);
                (self.plain.len() - 1) as u32
            }
        };
        self.plain[slot as usize] = Some(PlainReq { user_data: r.user_data, handle, offset: r.offset });
        let offset = if matches!(r.op, IoOp::Flush) { 0 } else { r.offset + data_offset };
        self.io.push(IoRequest { dev: backing, offset, op: r.op, user_data: PLAIN | u64::from(slot), fua: r.fua });
    }

    fn plain_complete(&mut self, mut c: IoCompletion) {
        let slot = (c.user_data & !PLAIN) as u32;
        let Some(p) = self.plain.get_mut(slot as usize).and_then(Option::take) else { return };
        self.plain_free.push(slot);
        c.user_data = p.user_data;
        c.dev = DevId(p.handle);
        c.offset = p.offset;
        self.plain_done.push(c);
    }

    /// Sends out I/O, handles what completes at once, runs background work that is due,
    /// and collects finished requests into `out`.
    fn pump(&mut self, out: &mut Vec<IoCompletion>) -> Result<()> {
        for _ in 0..64 {
            if let Some(s) = self.set.as_mut() {
                s.take_io(&mut self.io);
            }
            if self.io.is_empty() {
                break;
            }
            let io = std::mem::take(&mut self.io);
            let mut got = std::mem::take(&mut self.got);
            self.driver.submit_into(io, &mut got)?;
            self.route(&mut got);
            self.got = got;
        }
        self.collect(out);
        Ok(())
    }

    /// [`CacheEngine::pump`] from a call that returns no completions: what finishes is kept
    /// for the next call that does (see [`CacheEngine::has_undelivered`]), never dropped.
    fn pump_aside(&mut self) -> Result<()> {
        let mut aside = std::mem::take(&mut self.undelivered);
        let r = self.pump(&mut aside);
        self.undelivered = aside;
        r
    }

    /// Whether requests finished that no call has returned yet: the driver should call
    /// [`CacheEngine::tick`] (or any call that returns completions) without waiting for the
    /// descriptor, which will not turn readable for them.
    pub fn has_undelivered(&self) -> bool {
        !self.undelivered.is_empty()
    }

    fn route(&mut self, got: &mut Vec<IoCompletion>) {
        let now = Instant::now();
        let any = !got.is_empty();
        for c in got.drain(..) {
            if c.user_data & PLAIN != 0 {
                self.plain_complete(c);
            } else if let Some(s) = self.set.as_mut() {
                s.complete(c);
            }
        }
        if any {
            if let Some(s) = self.set.as_mut() {
                s.tick(now);
            }
        }
    }

    fn collect(&mut self, out: &mut Vec<IoCompletion>) {
        out.append(&mut self.undelivered);
        let start = out.len();
        if let Some(s) = self.set.as_mut() {
            s.take_done(out);
            s.take_events(&mut self.set_events);
        }
        for c in &mut out[start..] {
            // The set speaks inodes; the caller, handles.
            if let Some(&h) = self.by_inode.get(c.dev.0 as usize) {
                c.dev = DevId(h);
            }
        }
        out.append(&mut self.plain_done);
        for (tag, r) in std::mem::take(&mut self.set_events) {
            if let Some(i) = self.attaching.iter().position(|a| a.0 == tag) {
                let (_, handle) = self.attaching.swap_remove(i);
                match r {
                    Ok(inode) => {
                        self.routes[handle as usize] = Some(Route::Cached(inode));
                        if self.by_inode.len() <= inode as usize {
                            self.by_inode.resize(inode as usize + 1, u32::MAX);
                        }
                        self.by_inode[inode as usize] = handle;
                        self.events.push((tag, Ok(handle)));
                    }
                    Err(e) => {
                        let route = self.routes[handle as usize].take();
                        if let Some(Route::Plain { backing, .. }) = route {
                            let _ = self.driver.remove_device(backing);
                        }
                        self.events.push((tag, Err(e)));
                    }
                }
            } else {
                self.events.push((tag, r));
            }
        }
        if let (Some(tag), Some(s)) = (self.close_tag, self.set.as_ref()) {
            match s.state() {
                SetState::Closed => {
                    self.close_tag = None;
                    self.events.push((tag, Ok(0)));
                }
                SetState::Failed(e) if s.in_flight() == 0 => {
                    self.close_tag = None;
                    self.events.push((tag, Err(e.clone())));
                }
                _ => {}
            }
        }
    }

    /// Takes completions that arrived (call when [`CacheEngine::fd`] is readable); returns
    /// how many requests finished.
    pub fn reap(&mut self, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let before = out.len();
        let mut got = std::mem::take(&mut self.got);
        self.driver.reap_into(&mut got)?;
        self.route(&mut got);
        self.got = got;
        self.pump(out)?;
        Ok(out.len() - before)
    }

    /// Runs background work that is due (see [`CacheEngine::next_deadline`]).
    pub fn tick(&mut self, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let before = out.len();
        if let Some(s) = self.set.as_mut() {
            s.tick(Instant::now());
        }
        self.pump(out)?;
        Ok(out.len() - before)
    }

    /// Waits up to `timeout` for requests to finish (and runs background work meanwhile),
    /// for a thread without an event loop. Returns how many finished.
    pub fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        let until = timeout.map(|t| Instant::now() + t);
        let before = out.len();
        loop {
            self.reap(out)?;
            if let Some(d) = self.next_deadline() {
                if d <= Instant::now() {
                    self.tick(out)?;
                }
            }
            if out.len() > before || !self.events.is_empty() {
                return Ok(out.len() - before);
            }
            let now = Instant::now();
            if until.is_some_and(|u| u <= now) {
                return Ok(0);
            }
            let mut wait = until.map(|u| u - now);
            if let Some(d) = self.next_deadline() {
                let d = d.saturating_duration_since(now);
                wait = Some(wait.map_or(d, |w| w.min(d)));
            }
            if self.driver.in_flight() == 0 {
                match wait {
                    // Nothing in flight and nothing due: nothing can finish.
                    None => return Ok(0),
                    Some(w) => std::thread::sleep(w),
                }
                continue;
            }
            let mut got = std::mem::take(&mut self.got);
            self.driver.wait_into(&mut got, wait)?;
            self.route(&mut got);
            self.got = got;
            self.pump(out)?;
        }
    }

    /// When [`CacheEngine::tick`] has work next (None: idle).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.set.as_ref().and_then(|s| s.next_deadline())
    }

    /// The descriptor to watch: readable when [`CacheEngine::reap`] has completions to take.
    pub fn fd(&self) -> i32 {
        self.driver.fd()
    }

    /// Control operations finished: `(tag, result)`, the handle for an attach.
    pub fn take_events(&mut self, out: &mut Vec<(u64, Result<u32>)>) {
        out.append(&mut self.events);
    }

    /// Requests and I/O in flight.
    pub fn in_flight(&self) -> usize {
        self.driver.in_flight() + self.set.as_ref().map_or(0, |s| s.in_flight())
    }

    /// The handle's cache mode (None for a device with no cache set).
    pub fn cache_mode(&self, handle: u32) -> Result<Option<super::CacheMode>> {
        match self.routes.get(handle as usize).and_then(Option::as_ref) {
            Some(Route::Cached(inode)) => Ok(Some(self.set.as_ref().expect("a set").cache_mode(*inode)?)),
            Some(Route::Plain { .. }) => Ok(None),
            None => Err(bad_handle(handle)),
        }
    }

    /// The set and the inode of a handle attached to it; an error naming it otherwise.
    fn cached(&self, handle: u32) -> Result<(&CacheSet, u32)> {
        let inode = self.cached_inode(handle)?;
        Ok((self.set.as_ref().expect("a cached route means a set"), inode))
    }

    /// [`CacheEngine::cached`], to change the set.
    fn cached_mut(&mut self, handle: u32) -> Result<(&mut CacheSet, u32)> {
        let inode = self.cached_inode(handle)?;
        Ok((self.set.as_mut().expect("a cached route means a set"), inode))
    }

    /// The inode of a handle attached to the set; an error naming it otherwise.
    fn cached_inode(&self, handle: u32) -> Result<u32> {
        match self.routes.get(handle as usize).and_then(Option::as_ref) {
            Some(Route::Cached(inode)) => Ok(*inode),
            Some(Route::Plain { .. }) => {
                Err(Error::new(ErrorKind::InvalidArgument, format!("device {handle} is not attached to a cache set")))
            }
            None => Err(bad_handle(handle)),
        }
    }

    /// The handle's writeback tunables.
    pub fn writeback_config(&self, handle: u32) -> Result<super::WritebackConfig> {
        let (set, inode) = self.cached(handle)?;
        set.writeback_config(inode)
    }

    /// Sets the handle's writeback tunables (validated; see [`super::WritebackConfig`]).
    pub fn set_writeback_config(&mut self, handle: u32, cfg: super::WritebackConfig) -> Result<()> {
        let (set, inode) = self.cached_mut(handle)?;
        set.set_writeback_config(inode, cfg)
    }

    /// The handle's request accounting (bcache's per-device stats windows).
    pub fn device_accounting(&self, handle: u32) -> Result<super::Accounting> {
        let (set, inode) = self.cached(handle)?;
        set.device_accounting(inode)
    }

    /// The handle's bypass tunables.
    pub fn bypass_config(&self, handle: u32) -> Result<super::BypassConfig> {
        let (set, inode) = self.cached(handle)?;
        set.bypass_config(inode)
    }

    /// Sets the handle's bypass tunables (validated; see [`super::BypassConfig`]).
    pub fn set_bypass_config(&mut self, handle: u32, cfg: super::BypassConfig) -> Result<()> {
        let (set, inode) = self.cached_mut(handle)?;
        set.set_bypass_config(inode, cfg)
    }

    /// The handle's writeback controller state (bcache's `writeback_rate_debug`).
    pub fn writeback_rate(&self, handle: u32) -> Result<super::WritebackRate> {
        let (set, inode) = self.cached(handle)?;
        set.writeback_rate(inode)
    }

    /// Switches the handle's cache mode.
    pub fn set_cache_mode(&mut self, handle: u32, mode: super::CacheMode) -> Result<()> {
        match self.routes.get(handle as usize).and_then(Option::as_ref) {
            Some(Route::Cached(inode)) => self.set.as_mut().expect("a set").set_cache_mode(*inode, mode),
            Some(Route::Plain { .. }) => {
                Err(Error::new(ErrorKind::InvalidArgument, format!("device {handle} is not attached to a cache set")))
            }
            None => Err(bad_handle(handle)),
        }
    }

    /// The inode (UUID-table slot) behind a handle, for a cached device.
    pub fn inode(&self, handle: u32) -> Option<u32> {
        match self.routes.get(handle as usize)? {
            Some(Route::Cached(i)) => Some(*i),
            _ => None,
        }
    }
}

fn no_set() -> Error {
    Error::new(ErrorKind::InvalidArgument, "this engine runs no cache set")
}

fn bad_handle(h: u32) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("no device {h} in this engine"))
}
