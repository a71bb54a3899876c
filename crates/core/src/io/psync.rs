//! The portable engine: a small pool of threads doing pread/pwrite/fdatasync behind the
//! [`IoEngine`] trait, for kernels and sandboxes where io_uring cannot be set up.
//!
//! Workers take requests from a shared queue, run them with [`Device::execute`] (which
//! completes short transfers and retries EINTR/EAGAIN), and post completions to a list; the
//! first completion posted to an empty list rings an eventfd, so the polling thread wakes
//! once per batch rather than once per request.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{closed_device, poll_fds, DevId, Device, EngineKind, EventFd, IoCompletion, IoEngine, IoRequest};
use std::os::fd::AsRawFd;

struct Job {
    dev: Arc<Device>,
    req: IoRequest,
}

struct Queue {
    jobs: VecDeque<Job>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    done: Mutex<Vec<IoCompletion>>,
    notify: EventFd,
}

/// The thread-pool engine. Dropping it lets the workers finish the requests already queued,
/// then joins them.
pub struct PsyncEngine {
    devices: Vec<Option<Arc<Device>>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    ready: Vec<IoCompletion>,
    in_flight: usize,
    waker: Option<Arc<EventFd>>,
}

impl PsyncEngine {
    /// An engine with `threads` workers (at least one).
    pub fn new(threads: usize) -> Result<PsyncEngine> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closing: false }),
            work: Condvar::new(),
            done: Mutex::new(Vec::new()),
            notify: EventFd::new()?,
        });
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("ubcache-psync-{i}"))
                .spawn(move || worker(&s))
                .map_err(|e| Error::io("spawn psync worker", e))?;
            workers.push(h);
        }
        Ok(PsyncEngine { devices: Vec::new(), shared, workers, ready: Vec::new(), in_flight: 0, waker: None })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closing {
                    return;
                }
                q = s.work.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Job { dev, mut req } = job;
        let result = dev.execute(&mut req);
        // Let go of the device before the completion is visible, so a closed device's
        // descriptor (and exclusive lock) is gone once its last completion is seen.
        drop(dev);
        let mut done = s.done.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = done.is_empty();
        done.push(IoCompletion::of(req, result));
        drop(done);
        if was_empty {
            s.notify.notify();
        }
    }
}

impl IoEngine for PsyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Psync
    }

    fn add_device(&mut self, dev: Arc<Device>) -> Result<DevId> {
        let slot = self.devices.iter().position(|d| d.is_none()).unwrap_or_else(|| {
            self.devices.push(None);
            self.devices.len() - 1
        });
        self.devices[slot] = Some(dev);
        Ok(DevId(slot as u32))
    }

    fn remove_device(&mut self, id: DevId) -> Result<()> {
        match self.devices.get_mut(id.0 as usize).and_then(Option::take) {
            Some(_) => Ok(()),
            None => Err(Error::new(ErrorKind::Closed, format!("device {} is not open in this engine", id.0))),
        }
    }

    fn device(&self, id: DevId) -> Option<Arc<Device>> {
        self.devices.get(id.0 as usize).and_then(|d| d.clone())
    }

    fn submit(&mut self, req: IoRequest) {
        self.in_flight += 1;
        let Some(dev) = self.device(req.dev) else {
            let e = closed_device(req.dev);
            self.ready.push(IoCompletion::of(req, Err(e)));
            return;
        };
        if let Err(e) = dev.check(&req) {
            self.ready.push(IoCompletion::of(req, Err(e)));
            return;
        }
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).jobs.push_back(Job { dev, req });
        self.shared.work.notify_one();
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>, timeout: Option<Duration>) -> Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut n = self.ready.len();
        out.append(&mut self.ready);
        loop {
            self.shared.notify.drain();
            {
                let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
                n += done.len();
                out.append(&mut done);
            }
            if n > 0 || timeout == Some(Duration::ZERO) {
                break;
            }
            if self.waker.as_ref().is_some_and(|w| w.drain() > 0) {
                break;
            }
            // Nothing outstanding and no doorbell: nothing could end the wait.
            if self.in_flight == n && self.waker.is_none() {
                break;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                break;
            }
            let mut fds = vec![self.shared.notify.as_raw_fd()];
            if let Some(w) = &self.waker {
                fds.push(w.as_raw_fd());
            }
            poll_fds(&fds, left);
        }
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn set_waker(&mut self, waker: Arc<EventFd>) -> Result<()> {
        self.waker = Some(waker);
        Ok(())
    }

    fn completion_fd(&mut self) -> Result<std::os::fd::RawFd> {
        // Workers already ring this eventfd for the first completion of a batch, and `poll`
        // drains it before it takes the list.
        Ok(self.shared.notify.as_raw_fd())
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        self.shared.work.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
