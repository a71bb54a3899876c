//! Driving an engine from the caller's own thread, for an event loop (Node's libuv).
//!
//! The engine thread ([`crate::io::IoThread`]) costs two thread handoffs per request: the
//! submitter rings its doorbell, and its completions cross back to the submitter's thread.
//! On a small machine those wakeups dominate a 4 KiB read. A [`RingDriver`] has no thread:
//! [`RingDriver::submit_batch`] puts requests straight into the engine (for io_uring, one
//! `io_uring_enter` on the caller's thread), and the engine's completion descriptor
//! ([`RingDriver::fd`]: the io_uring ring's own descriptor, readable while its completion
//! queue holds entries; the portable engine's eventfd) tells the caller's event loop when
//! to call [`RingDriver::reap`]. A batch of
//! completions then costs one wakeup of the loop the caller was sleeping in anyway.
//!
//! Use a driver from one thread only: the io_uring ring is set up for a single issuer, the
//! thread that first submits.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{closed_device, DevId, Device, EngineKind, IoCompletion, IoEngine, IoOp, IoRequest};

/// Whether a submission polls for its first completion before it returns to the caller's
/// event loop (see [`RingDriver::set_busy_poll`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyPoll {
    /// Never: completions come through the descriptor.
    Off,
    /// Up to this long whenever requests are in flight and none has completed yet.
    Fixed(Duration),
    /// Only for a lone request (nothing else in flight), and only while lone requests have
    /// recently completed within the cap: then up to twice their recent latency, at most the
    /// cap. A device slower than the cap is never polled for, so it costs no CPU.
    Adaptive(Duration),
}

/// The cap of [`BusyPoll::Adaptive`] that the JavaScript binding uses by default: an NVMe
/// 4 KiB read (10-30 µs) is polled for, a SATA SSD's (80 µs and up) or a disk's is not.
pub const ADAPTIVE_POLL_CAP: Duration = Duration::from_micros(50);

/// Weight of a new sample in the running latency of lone requests, as a shift (1/8).
const LONE_EWMA_SHIFT: u32 = 3;
/// While lone requests are slower than the cap, one in this many is polled for anyway.
const PROBE_EVERY: u32 = 16;

/// An engine driven by its caller's thread (see the module docs).
pub struct RingDriver {
    engine: Box<dyn IoEngine>,
    fd: RawFd,
    closed: bool,
    batches: usize,
    busy_poll: BusyPoll,
    /// When the lone request in flight was submitted (adaptive polling only).
    lone_since: Option<Instant>,
    /// Running latency of lone requests, submission to reap, in nanoseconds.
    lone_latency_ns: u64,
    /// What the lone request in flight was polled for (zero: not polled).
    lone_budget: Duration,
    /// Lone requests left unpolled since the last probe (adaptive polling off for now).
    unprobed: u32,
    /// Inside the busy-poll loop: a completion reaped now was waited for by polling.
    in_poll: bool,
    busy_polls: usize,
    busy_poll_hits: usize,
}

impl RingDriver {
    /// Takes over `engine`. Fails for engines that cannot signal a descriptor.
    pub fn new(mut engine: Box<dyn IoEngine>) -> Result<RingDriver> {
        let fd = engine.completion_fd()?;
        Ok(RingDriver {
            engine,
            fd,
            closed: false,
            batches: 0,
            busy_poll: BusyPoll::Off,
            lone_since: None,
            lone_latency_ns: 0,
            lone_budget: Duration::ZERO,
            unprobed: 0,
            in_poll: false,
            busy_polls: 0,
            busy_poll_hits: 0,
        })
    }

    /// Takes over `engine` for a caller that waits in [`RingDriver::wait`] rather than in an
    /// event loop, so it works with engines that cannot signal a descriptor (the fault
    /// engine); [`RingDriver::fd`] is then -1.
    pub fn without_fd(engine: Box<dyn IoEngine>) -> RingDriver {
        RingDriver {
            engine,
            fd: -1,
            closed: false,
            batches: 0,
            busy_poll: BusyPoll::Off,
            lone_since: None,
            lone_latency_ns: 0,
            lone_budget: Duration::ZERO,
            unprobed: 0,
            in_poll: false,
            busy_polls: 0,
            busy_poll_hits: 0,
        }
    }

    /// Whether [`RingDriver::submit_into`] keeps polling for a first completion when none is
    /// ready, instead of returning to the caller's event loop (default [`BusyPoll::Off`]).
    /// Sleeping in the loop and waking for the completion costs a 4 KiB read at queue
    /// depth 1 about a third more time than polling for it (measured from Node on a 2-core
    /// VM), and the sleeping path's system calls already keep the thread about 70% busy at
    /// that depth. Polling holds the calling thread, so a fixed budget suits a caller with
    /// little else to do while its reads are in flight; the adaptive one polls only where
    /// it pays: one request at a time, on a device that answers within the cap. (Tried
    /// instead: sleeping in `io_uring_enter` rather than in the loop's epoll, from a libuv
    /// prepare callback; 34.8 against 38.2 µs per read, while polling gets about 27 µs, and
    /// it would also have to watch the loop's own descriptor so as not to hold up its
    /// other events.)
    pub fn set_busy_poll(&mut self, poll: BusyPoll) {
        self.busy_poll = poll;
        self.lone_since = None;
        if let BusyPoll::Adaptive(cap) = poll {
            // Until lone requests have been timed, assume they make the cap: the first ones
            // are polled for and measured.
            self.lone_latency_ns = cap.as_nanos().min(u64::MAX as u128) as u64;
        }
    }

    /// Submissions that polled for a first completion, and how many of them got one.
    pub fn busy_polls(&self) -> (usize, usize) {
        (self.busy_polls, self.busy_poll_hits)
    }

    /// The budget to poll with after a submission that found nothing completed, with
    /// `before` requests in flight before it; `transfers` when it only read or wrote.
    fn poll_budget(&mut self, before: usize, transfers: bool) -> Duration {
        let in_flight = self.engine.in_flight();
        match self.busy_poll {
            BusyPoll::Off => Duration::ZERO,
            _ if in_flight == 0 => Duration::ZERO,
            BusyPoll::Fixed(budget) => budget,
            BusyPoll::Adaptive(cap) => {
                if before != 0 || in_flight != 1 {
                    // Requests overlap: they keep the device busy without polling.
                    return Duration::ZERO;
                }
                if !transfers {
                    // A flush or discard takes far longer than a transfer (milliseconds for
                    // a flush): not polled for, and not timed, so that it does not stop the
                    // polling for the reads and writes around it.
                    return Duration::ZERO;
                }
                self.lone_since = Some(Instant::now());
                let recent = Duration::from_nanos(self.lone_latency_ns);
                self.lone_budget = if recent <= cap {
                    cap.min(recent * 2)
                } else {
                    // Slow lately: still poll one lone request in PROBE_EVERY (for the cap),
                    // so a device that is fast again is noticed.
                    self.unprobed += 1;
                    if self.unprobed >= PROBE_EVERY {
                        self.unprobed = 0;
                        cap
                    } else {
                        Duration::ZERO
                    }
                };
                self.lone_budget
            }
        }
    }

    /// Times a lone request that just completed (adaptive polling). Only a request reaped
    /// while it was polled for gives its true latency; one that outlasted its poll counts as
    /// twice the cap; one reaped after a sleep in the event loop says nothing (the wakeup
    /// alone costs tens of microseconds on a VM, and counting it kept polling off for good).
    fn lone_done(&mut self) {
        if let Some(since) = self.lone_since.take() {
            let ns = since.elapsed().as_nanos().min(u64::MAX as u128 / 2) as u64;
            let budget = std::mem::replace(&mut self.lone_budget, Duration::ZERO);
            let cap = match self.busy_poll {
                BusyPoll::Adaptive(cap) => cap.as_nanos().min(u64::MAX as u128 / 4) as u64,
                _ => return,
            };
            let sample = if self.in_poll {
                ns
            } else if !budget.is_zero() {
                // Outlasted its poll: count it as twice the cap, so that a few in a row
                // turn polling off (the probes turn it on again).
                cap.saturating_mul(2).max(ns.min(cap.saturating_mul(2)))
            } else {
                return;
            };
            // Moves an eighth of the way, rounding away from the old value so that small
            // values move too.
            let old = self.lone_latency_ns;
            let step = (1u64 << LONE_EWMA_SHIFT) - 1;
            self.lone_latency_ns = if sample >= old {
                old + (((sample - old) + step) >> LONE_EWMA_SHIFT)
            } else {
                old - ((old - sample + step) >> LONE_EWMA_SHIFT)
            };
        }
    }

    /// The descriptor to watch for readability; when it is readable, call [`RingDriver::reap`].
    /// It stays valid as long as the driver (-1 for one made [`RingDriver::without_fd`]).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Which engine runs the I/O.
    pub fn kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Makes `dev` addressable by requests.
    pub fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        if self.closed {
            return Err(Error::new(ErrorKind::Closed, "the I/O engine is closed"));
        }
        self.engine.add_device(dev)
    }

    /// Stops taking requests for `id`; requests in flight still complete.
    pub fn remove_device(&mut self, id: DevId) -> Result<()> {
        self.engine.remove_device(id)
    }

    /// Hands `reqs` to the device now. Completions that are already known (bad requests,
    /// I/O that finished at once, or with [`RingDriver::set_busy_poll`] the first to finish
    /// within the budget) are returned here, not through the descriptor.
    /// After [`RingDriver::close`], every request completes with [`ErrorKind::Closed`].
    pub fn submit_batch(&mut self, reqs: impl IntoIterator<Item = IoRequest>) -> Result<Vec<IoCompletion>> {
        let mut out = Vec::new();
        self.submit_into(reqs, &mut out)?;
        Ok(out)
    }

    /// [`RingDriver::submit_batch`] appending the completions to `out`; returns how many.
    pub fn submit_into(
        &mut self,
        reqs: impl IntoIterator<Item = IoRequest>,
        out: &mut Vec<IoCompletion>,
    ) -> Result<usize> {
        if self.closed {
            let before = out.len();
            out.extend(reqs.into_iter().map(|r| {
                let e = closed_device(r.dev);
                IoCompletion::of(r, Err(e))
            }));
            return Ok(out.len() - before);
        }
        let before = self.engine.in_flight();
        let mut transfers = true;
        for r in reqs {
            transfers &= !matches!(r.op, IoOp::Flush | IoOp::Discard { .. });
            self.engine.submit(r);
        }
        if self.engine.in_flight() > 1 {
            // Requests overlap: the lone request's timing no longer measures the device alone.
            self.lone_since = None;
        }
        let got = self.poll_into(out, Some(Duration::ZERO))?;
        if got > 0 || self.busy_poll == BusyPoll::Off {
            return Ok(got);
        }
        let budget = self.poll_budget(before, transfers);
        if budget.is_zero() {
            return Ok(got);
        }
        self.busy_polls += 1;
        let until = Instant::now() + budget;
        self.in_poll = true;
        let r = loop {
            std::hint::spin_loop();
            let got = match self.poll_into(out, Some(Duration::ZERO)) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if got > 0 {
                self.busy_poll_hits += 1;
                break Ok(got);
            }
            if Instant::now() >= until {
                break Ok(got);
            }
        };
        self.in_poll = false;
        r
    }

    /// Collects finished completions without waiting (call it when [`RingDriver::fd`] is
    /// readable; a call with nothing finished returns nothing).
    pub fn reap(&mut self) -> Result<Vec<IoCompletion>> {
        let mut out = Vec::new();
        self.reap_into(&mut out)?;
        Ok(out)
    }

    /// [`RingDriver::reap`] appending to `out` (no allocation when `out` has room); returns
    /// how many. Cheap when nothing finished: no system call for io_uring.
    pub fn reap_into(&mut self, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let n = self.poll_into(out, Some(Duration::ZERO))?;
        if n == 0 {
            self.engine.spurious_wakeup();
        }
        Ok(n)
    }

    /// Waits up to `timeout` (`None`: no limit) for completions, for callers without an
    /// event loop (tests, tools).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Vec<IoCompletion>> {
        let mut out = Vec::new();
        self.poll_into(&mut out, timeout)?;
        Ok(out)
    }

    /// [`RingDriver::wait`] appending to `out`; returns how many.
    pub fn wait_into(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        self.poll_into(out, timeout)
    }

    fn poll_into(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        let n = self.engine.poll(out, timeout)?;
        if n > 0 {
            self.batches += 1;
            if self.engine.in_flight() == 0 {
                self.lone_done();
            }
        }
        Ok(n)
    }

    /// Requests submitted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Non-empty batches of completions returned so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Refuses later requests (they complete with [`ErrorKind::Closed`]); requests in flight
    /// still complete through [`RingDriver::reap`]. Dropping the driver waits for any the
    /// kernel still holds.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// True once [`RingDriver::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{open_engine, AlignedBuf, EngineChoice, EngineOptions, OpenOptions};

    fn readable(fd: RawFd, ms: u64) -> bool {
        crate::io::poll_fds(&[fd], Some(Duration::from_millis(ms)))
    }

    fn file(tag: &str) -> (std::path::PathBuf, Vec<u8>) {
        let dir = std::path::Path::new("/var/tmp").join(format!("ubcache-driver-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| i.wrapping_mul(2654435761).to_le_bytes()[3]).collect();
        let p = dir.join("f");
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    /// Every engine a driver takes.
    const DRIVEN: [EngineChoice; 2] = [EngineChoice::Uring, EngineChoice::Psync];

    /// A driver over `choice` with the file from `file(tag)` added.
    fn driver(tag: &str, choice: EngineChoice) -> (RingDriver, DevId, std::path::PathBuf, Vec<u8>) {
        let (p, data) = file(tag);
        let engine = open_engine(&EngineOptions { choice, ..Default::default() }).unwrap();
        let mut d = RingDriver::new(engine).unwrap();
        let id = d.add_device(Arc::new(Device::open(&p, &OpenOptions::default()).unwrap())).unwrap();
        (d, id, p, data)
    }

    #[test]
    fn busy_polling_returns_the_first_completion_from_the_submit_call() {
        for choice in DRIVEN {
            let (mut d, id, p, data) = driver(&format!("busy-{choice:?}"), choice);
            // A budget no 4 KiB read of a file comes near: the call must return its completion.
            d.set_busy_poll(BusyPoll::Fixed(Duration::from_secs(5)));
            for i in 0..20u64 {
                let got = d.submit_batch([IoRequest::read(id, i * 8192, AlignedBuf::new(4096), i)]).unwrap();
                assert_eq!(got.len(), 1, "{choice:?}: read {i} completed within the submit call");
                let c = got.into_iter().next().unwrap();
                assert_eq!(c.user_data, i);
                let off = (i * 8192) as usize;
                assert!(c.into_buf().unwrap()[..] == data[off..off + 4096]);
            }
            assert_eq!(d.in_flight(), 0);
            // Nothing in flight: no polling at all, even with a budget.
            let t = std::time::Instant::now();
            assert!(d.submit_batch(std::iter::empty()).unwrap().is_empty());
            assert!(t.elapsed() < Duration::from_secs(1), "no busy polling with nothing in flight");
            let _ = std::fs::remove_dir_all(p.parent().unwrap());
        }
    }

    /// Adaptive polling polls for lone requests of a device that answers within the cap, never
    /// for overlapping ones, and stops polling once lone requests take longer than the cap.
    #[test]
    fn adaptive_polling_polls_only_for_lone_requests_within_the_cap() {
        for choice in DRIVEN {
            let (mut d, id, p, data) = driver(&format!("adaptive-{choice:?}"), choice);
            let read = |i: u64| IoRequest::read(id, i * 8192 % (1 << 20), AlignedBuf::new(4096), i);
            let check = |c: IoCompletion| {
                let off = (c.user_data * 8192 % (1 << 20)) as usize;
                assert!(c.into_buf().unwrap()[..] == data[off..off + 4096]);
            };
            // A cap no read of a file comes near: every lone read completes within its call
            // (polled for, or done by the time the submission returned).
            d.set_busy_poll(BusyPoll::Adaptive(Duration::from_secs(5)));
            for i in 0..20u64 {
                let got = d.submit_batch([read(i)]).unwrap();
                assert_eq!(got.len(), 1, "{choice:?}: lone read {i} completed within the submit call");
                got.into_iter().for_each(check);
            }
            let (polls, hits) = d.busy_polls();
            assert_eq!(polls, hits, "{choice:?}: every poll got its completion");
            // Overlapping requests are never polled for.
            let mut got = d.submit_batch((20..28u64).map(read)).unwrap();
            assert_eq!(d.busy_polls().0, polls, "{choice:?}: no polling for 8 requests at once");
            while got.len() < 8 {
                got.extend(d.wait(Some(Duration::from_secs(5))).unwrap());
            }
            got.into_iter().for_each(check);
            // Flushes are neither polled for nor timed (they would hold polling off for the
            // reads and writes around them).
            let (latency, polls) = (d.lone_latency_ns, d.busy_polls().0);
            for i in 0..3u64 {
                let mut got = d.submit_batch([IoRequest::flush(id, 100 + i)]).unwrap();
                while got.is_empty() {
                    got = d.wait(Some(Duration::from_secs(5))).unwrap();
                }
                assert!(got[0].result.is_ok());
            }
            assert_eq!((d.lone_latency_ns, d.busy_polls().0), (latency, polls), "{choice:?}: flushes left alone");
            // A cap below any device's latency: one probe at most, then the measured latency
            // (above the cap) turns polling off.
            d.set_busy_poll(BusyPoll::Adaptive(Duration::from_nanos(1)));
            let (polls, _) = d.busy_polls();
            for i in 30..60u64 {
                let mut got = d.submit_batch([read(i)]).unwrap();
                while got.is_empty() {
                    got = d.wait(Some(Duration::from_secs(5))).unwrap();
                }
                got.into_iter().for_each(check);
            }
            let probes = d.busy_polls().0 - polls;
            assert!(
                probes <= 2 + 30 / PROBE_EVERY as usize,
                "{choice:?}: polling stopped for a device slower than the cap: {probes} polls"
            );
            // A device that was slow and is fast again: the probes notice, and polling comes
            // back (the sleeps in between, whose times include the wakeup, do not count).
            let cap = Duration::from_secs(5);
            d.set_busy_poll(BusyPoll::Adaptive(cap));
            d.lone_latency_ns = 2 * cap.as_nanos() as u64;
            let mut i = 0u64;
            while d.lone_latency_ns > cap.as_nanos() as u64 {
                assert!(i < 20_000, "{choice:?}: the probes never brought the estimate down");
                let mut got = d.submit_batch([read(i)]).unwrap();
                while got.is_empty() {
                    got = d.wait(Some(Duration::from_secs(5))).unwrap();
                }
                got.into_iter().for_each(check);
                i += 1;
            }
            let before = d.busy_polls().0;
            for i in 0..20u64 {
                let got = d.submit_batch([read(i)]).unwrap();
                assert_eq!(got.len(), 1, "{choice:?}: polled again");
                got.into_iter().for_each(check);
            }
            let _ = before;
            assert!(d.lone_latency_ns <= cap.as_nanos() as u64, "{choice:?}: the estimate came back under the cap");
            let _ = std::fs::remove_dir_all(p.parent().unwrap());
        }
    }

    /// Reads through the descriptor-driven loop an event loop would run: every request
    /// completes once, with the right data, and the descriptor goes quiet when all is reaped.
    #[test]
    fn completions_arrive_through_the_descriptor() {
        for choice in DRIVEN {
            let (mut d, id, p, data) = driver(&format!("{choice:?}"), choice);
            let reqs: Vec<_> = (0..64u64).map(|i| IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i)).collect();
            let mut got = d.submit_batch(reqs).unwrap();
            // A bad request completes at once, through the return value.
            let bad = d.submit_batch([IoRequest::read(id, 1 << 20, AlignedBuf::new(4096), 99)]).unwrap();
            assert_eq!(bad.len(), 1);
            assert_eq!(bad[0].result.as_ref().unwrap_err().code(), "OUT_OF_RANGE");
            while got.len() < 64 {
                assert!(readable(d.fd(), 5000), "{choice:?}: the descriptor signals outstanding completions");
                got.extend(d.reap().unwrap());
            }
            assert_eq!(d.in_flight(), 0);
            got.sort_by_key(|c| c.user_data);
            for (i, c) in got.into_iter().enumerate() {
                assert_eq!(c.user_data, i as u64);
                let off = i * 4096;
                assert!(c.into_buf().unwrap()[..] == data[off..off + 4096]);
            }
            // Nothing left: at most one stale signal, then quiet.
            if readable(d.fd(), 0) {
                assert!(d.reap().unwrap().is_empty());
            }
            assert!(!readable(d.fd(), 20), "{choice:?}: quiet once everything is reaped");
            std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
        }
    }

    /// Closing with requests in flight: they still complete, later ones fail with CLOSED.
    #[test]
    fn close_completes_in_flight_and_refuses_new() {
        let (mut d, id, p, _) = driver("close", EngineChoice::Uring);
        let mut got =
            d.submit_batch((0..32u64).map(|i| IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i))).unwrap();
        d.close();
        let late = d.submit_batch([IoRequest::read(id, 0, AlignedBuf::new(4096), 100)]).unwrap();
        assert_eq!(late[0].result.as_ref().unwrap_err().code(), "CLOSED");
        while got.len() < 32 {
            got.extend(d.wait(Some(Duration::from_secs(5))).unwrap());
        }
        assert!(got.iter().all(|c| c.result.is_ok()));
        assert_eq!(d.in_flight(), 0);
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}
