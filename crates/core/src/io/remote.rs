//! Remote devices behind the engine seam: [`RemoteEngine`] wraps the local engine and
//! sends requests for devices opened from NBD URIs to their [`NbdClient`]s, so every layer
//! above (the raw-device API, the cache engine, the fault engine) drives a remote backing
//! device exactly as it drives a file.
//!
//! Each remote device is added to the inner engine too, which gives it its id (and holds a
//! descriptor-less slot); its requests never reach the inner engine. Completions of remote
//! requests are collected on every poll. An event loop watches one descriptor: an epoll set
//! over the inner engine's and every client's. An engine thread's doorbell is rung by the
//! clients as well, so a thread waiting in the inner engine wakes for them.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::io::{poll_fds, DevId, Device, EngineKind, EventFd, IoCompletion, IoEngine, IoRequest};
use crate::nbd::NbdClient;

/// Longest a poll waits in the inner engine at a time while remote requests are in flight
/// and no doorbell tells of their completions (a caller polling with a timeout, no thread).
const REMOTE_POLL_SLICE: Duration = Duration::from_millis(1);

/// The local engine with remote devices beside it (see the module docs).
pub struct RemoteEngine<E: IoEngine> {
    inner: E,
    remotes: HashMap<DevId, Arc<NbdClient>>,
    /// Clients of removed devices whose requests have not all come back yet.
    retired: Vec<Arc<NbdClient>>,
    /// Requests at remote devices not yet handed back.
    remote_in_flight: usize,
    /// Completions made without reaching a device (bad requests).
    ready: Vec<IoCompletion>,
    waker: Option<Arc<EventFd>>,
    epoll: Option<OwnedFd>,
}

impl<E: IoEngine> RemoteEngine<E> {
    /// Wraps `inner`.
    pub fn new(inner: E) -> Self {
        RemoteEngine {
            inner,
            remotes: HashMap::new(),
            retired: Vec::new(),
            remote_in_flight: 0,
            ready: Vec::new(),
            waker: None,
            epoll: None,
        }
    }

    fn watch(&self, fd: RawFd, add: bool) -> Result<()> {
        let Some(ep) = &self.epoll else { return Ok(()) };
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
        let op = if add { libc::EPOLL_CTL_ADD } else { libc::EPOLL_CTL_DEL };
        // SAFETY: both descriptors are open; `ev` lives for the call.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(Error::io("remote devices: epoll_ctl", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Moves remote completions to `out`; returns how many.
    fn collect(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut n = self.ready.len();
        out.append(&mut self.ready);
        for c in self.remotes.values().chain(self.retired.iter()) {
            n += c.take_completions(out);
        }
        if !self.retired.is_empty() {
            let (gone, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.retired).into_iter().partition(|c| c.pending() == 0);
            for c in gone {
                let _ = self.watch(c.notify_fd(), false);
            }
            self.retired = kept;
        }
        self.remote_in_flight = self.remote_in_flight.saturating_sub(n);
        n
    }
}

impl<E: IoEngine> IoEngine for RemoteEngine<E> {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        let id = self.inner.add_device(dev.clone())?;
        if let Some(c) = dev.remote() {
            if let Err(e) = self.watch(c.notify_fd(), true) {
                let _ = self.inner.remove_device(id);
                return Err(e);
            }
            if let Some(w) = &self.waker {
                c.set_waker(w.clone());
            }
            self.remotes.insert(id, c.clone());
        }
        Ok(id)
    }

    fn remove_device(&mut self, id: DevId) -> Result<()> {
        self.inner.remove_device(id)?;
        if let Some(c) = self.remotes.remove(&id) {
            if c.pending() == 0 {
                let _ = self.watch(c.notify_fd(), false);
            } else {
                // Requests still in flight come back later (CLOSED once its last user goes).
                self.retired.push(c);
            }
        }
        Ok(())
    }

    fn device(&self, id: DevId) -> Option<Arc<Device>> {
        self.inner.device(id)
    }

    fn submit(&mut self, req: IoRequest) {
        let Some(c) = self.remotes.get(&req.dev) else {
            self.inner.submit(req);
            return;
        };
        self.remote_in_flight += 1;
        let checked = match self.inner.device(req.dev) {
            Some(d) => d.check(&req),
            None => Err(crate::io::closed_device(req.dev)),
        };
        match checked {
            Ok(()) => c.submit(req),
            Err(e) => {
                self.ready.push(IoCompletion::of(req, Err(e)));
                // An event loop learns of it through the client's doorbell.
                if let Some(w) = &self.waker {
                    w.notify();
                }
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        if self.remote_in_flight == 0 && self.remotes.is_empty() {
            return self.inner.poll(out, timeout);
        }
        let mut got = self.collect(out);
        if got > 0 || self.remote_in_flight == 0 || self.waker.is_some() {
            let wait = if got > 0 { Some(Duration::ZERO) } else { timeout };
            got += self.inner.poll(out, wait)?;
            got += self.collect(out);
        } else {
            // No doorbell: wait in slices, looking at the clients between them.
            let until = timeout.map(|t| Instant::now() + t);
            loop {
                let left = until.map(|u| u.saturating_duration_since(Instant::now()));
                if self.inner.in_flight() == 0 {
                    // Only remote requests: sleep on the clients' doorbells.
                    let fds: Vec<RawFd> =
                        self.remotes.values().chain(self.retired.iter()).map(|c| c.notify_fd()).collect();
                    poll_fds(&fds, left);
                    got += self.collect(out);
                    if got > 0 || left.is_some_and(|l| l.is_zero()) || until.is_some_and(|u| Instant::now() >= u) {
                        break;
                    }
                    continue;
                }
                let slice = left.map_or(REMOTE_POLL_SLICE, |l| l.min(REMOTE_POLL_SLICE));
                got += self.inner.poll(out, Some(slice))?;
                got += self.collect(out);
                if got > 0 || left.is_some_and(|l| l.is_zero()) {
                    break;
                }
            }
        }
        Ok(got)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.remote_in_flight
    }

    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()> {
        for c in self.remotes.values() {
            c.set_waker(waker.clone());
        }
        self.waker = Some(waker.clone());
        self.inner.set_waker(waker)
    }

    fn completion_fd(&mut self) -> Result<RawFd> {
        if self.epoll.is_none() {
            let inner = self.inner.completion_fd()?;
            // SAFETY: plain system call; the descriptor is owned at once.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if ep < 0 {
                return Err(Error::io("remote devices: epoll_create1", std::io::Error::last_os_error()));
            }
            self.epoll = Some(unsafe { OwnedFd::from_raw_fd(ep) });
            self.watch(inner, true)?;
            let fds: Vec<RawFd> = self.remotes.values().map(|c| c.notify_fd()).collect();
            for fd in fds {
                self.watch(fd, true)?;
            }
        }
        Ok(self.epoll.as_ref().expect("just made").as_raw_fd())
    }

    fn spurious_wakeup(&mut self) {
        self.inner.spurious_wakeup();
    }
}
