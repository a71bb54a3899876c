//! An asynchronous NBD client: many requests in flight, replies matched by cookie in
//! whatever order they come, and a connection that is lost made again.
//!
//! A client has one connection, or up to [`NbdOptions::connections`] when the server
//! advertises `NBD_FLAG_CAN_MULTI_CONN` (a flush on any covers the writes answered on all),
//! sharing one queue. Two threads serve each connection. The *sender* connects (with
//! backoff after a failure), runs the handshake (TLS for `nbds`, see `tls`), and writes its
//! share of the queued requests; the *reader* reads replies into the requests' own buffers
//! and hands completions over: to the engine (a queue and an eventfd,
//! [`NbdClient::take_completions`]) or to a caller waiting on one request
//! ([`NbdClient::execute`]).
//!
//! Faults: when a connection breaks (the server died, a reply broke the protocol), every
//! request sent on it and not yet answered is queued again, in the order it was first
//! made, ahead of newer ones, and goes out on the next connection up; a flush that was on
//! it is sent again after the writes it followed. A request answered before the loss stays
//! answered. A request not answered within [`NbdOptions::request_timeout`] of being made
//! fails with [`ErrorKind::TimedOut`], naming the remote and why it was not answered; a
//! reply that still comes for it is read and dropped.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{AlignedBuf, EventFd, IoCompletion, IoOp, IoRequest};
use crate::nbd::proto::{self, protocol, ExportInfo, ReplyHeader};
use crate::nbd::tls;
use crate::nbd::uri::{NbdAddress, NbdUri};

/// How a client behaves when the remote is slow or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdOptions {
    /// A request not answered this long after it was made fails with `ETIMEDOUT`
    /// (default 30 s). While the remote is unreachable, requests wait this long for it.
    pub request_timeout: Duration,
    /// Each connection attempt (connect and handshake) gives up after this (default 5 s).
    pub connect_timeout: Duration,
    /// Reconnection waits start at 50 ms and double up to this (default 2 s).
    pub max_backoff: Duration,
    /// Connections to a server that advertises `NBD_FLAG_CAN_MULTI_CONN` (default 4, as
    /// nbdcopy opens); requests go out on whichever is free. One for other servers.
    pub connections: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(2),
            connections: 4,
        }
    }
}

/// Counters of a client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections made after the first.
    pub reconnects: u64,
    /// Requests sent again on a new connection.
    pub resent: u64,
    /// Requests failed for want of a reply in time.
    pub timed_out: u64,
    /// Connections dropped because the server broke the protocol.
    pub protocol_errors: u64,
    /// True while connected.
    pub connected: bool,
    /// Connections open now.
    pub connections: u32,
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Sock::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        }
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl tls::Transport for Sock {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(on),
            Sock::Unix(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(b),
            Sock::Unix(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects to `uri` and runs the handshake (with TLS for `nbds`), within `timeout`.
fn connect(uri: &NbdUri, timeout: Duration) -> Result<(Sock, ExportInfo)> {
    let who = uri.text.as_str();
    let mut sock = match &uri.address {
        NbdAddress::Unix(p) => {
            Sock::Unix(UnixStream::connect(p).map_err(|e| Error::io(format!("{who}: connect to {}", p.display()), e))?)
        }
        NbdAddress::Tcp { host, port } => {
            let addrs =
                (host.as_str(), *port).to_socket_addrs().map_err(|e| Error::io(format!("{who}: resolve {host}"), e))?;
            let mut last = None;
            let mut got = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = got.ok_or_else(|| {
                let e = last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound));
                Error::io(format!("{who}: connect to {host}:{port}"), e)
            })?;
            let _ = s.set_nodelay(true);
            Sock::Tcp(s)
        }
    };
    sock.set_timeouts(Some(timeout)).map_err(|e| Error::io(format!("{who}: socket"), e))?;
    let no_zeroes = proto::greet(&mut sock, who)?;
    if uri.tls.is_some() {
        proto::starttls(&mut sock, who)?;
        // From here the client speaks to the TLS relay (see `tls`).
        sock = Sock::Unix(tls::start(sock, uri, timeout)?);
        sock.set_timeouts(Some(timeout)).map_err(|e| Error::io(format!("{who}: socket"), e))?;
    }
    let info = proto::negotiate(&mut sock, &uri.export, no_zeroes, who)?;
    sock.set_timeouts(None).map_err(|e| Error::io(format!("{who}: socket"), e))?;
    Ok((sock, info))
}

/// Where a request's completion goes.
enum Sink {
    Engine,
    Caller(mpsc::Sender<IoCompletion>),
}

struct Entry {
    /// The request; taken out while the reader fills its buffers.
    req: Option<IoRequest>,
    sink: Sink,
    /// The connection (its generation, unique across connections) it was sent on (None:
    /// waiting to be sent).
    sent_on: Option<u64>,
    deadline: Instant,
    /// A structured reply's error chunk, reported when the reply is done.
    error: Option<Error>,
    /// Failed for want of a reply: a late reply is read and dropped.
    abandoned: bool,
    /// Bytes of a read (for draining an abandoned one).
    read_len: u64,
}

struct St {
    next_cookie: u64,
    queue: VecDeque<u64>,
    entries: HashMap<u64, Entry>,
    done: Vec<IoCompletion>,
    /// The last generation given to a connection.
    gen: u64,
    /// The live connections by generation, their sockets (for shutdown).
    socks: HashMap<u64, Sock>,
    closing: bool,
    last_error: Option<String>,
    /// Why this client last dropped a connection itself (a protocol violation, a stalled
    /// reply), which a later refused connection must not hide.
    dropped_because: Option<String>,
    stats: NbdStats,
}

struct Shared {
    uri: NbdUri,
    info: ExportInfo,
    opts: NbdOptions,
    st: Mutex<St>,
    /// Senders wait here for requests, a lost connection, or closing.
    work: Condvar,
    /// Senders wait out their reconnection backoff here (woken by closing).
    backoff: Condvar,
    notify: EventFd,
    waker: Mutex<Option<Arc<EventFd>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes request `cookie` with `result`.
    fn deliver(&self, st: &mut St, cookie: u64, result: Result<u64>) {
        let Some(mut e) = st.entries.remove(&cookie) else { return };
        let Some(req) = e.req.take() else { return };
        self.hand_over(st, e.sink, IoCompletion::of(req, result));
    }

    /// Gives `c` to the caller waiting for it, or queues it for the engine and rings its
    /// doorbells. Called with the lock held (`st`), so the eventfd is set exactly while
    /// `done` holds completions, and an idle poll need not read it.
    fn hand_over(&self, st: &mut St, sink: Sink, c: IoCompletion) {
        match sink {
            Sink::Caller(tx) => {
                let _ = tx.send(c);
            }
            Sink::Engine => {
                st.done.push(c);
                self.notify.notify();
                if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    w.notify();
                }
            }
        }
    }

    /// The connection of generation `gen` is gone: requests sent on it go out again, first.
    fn lost(&self, gen: u64, why: Option<Error>) {
        let mut st = self.lock();
        let Some(s) = st.socks.remove(&gen) else { return };
        s.shutdown();
        st.stats.connections = st.socks.len() as u32;
        st.stats.connected = !st.socks.is_empty();
        if let Some(e) = &why {
            if e.kind() == ErrorKind::Protocol {
                st.stats.protocol_errors += 1;
                st.dropped_because = Some(e.message().to_string());
            }
            st.last_error = Some(e.message().to_string());
        } else if !st.closing {
            st.last_error = Some(format!("{}: the connection was closed", self.uri.text));
        }
        let mut again: Vec<u64> = Vec::new();
        let mut drop_abandoned = Vec::new();
        for (&c, e) in st.entries.iter_mut() {
            if e.sent_on == Some(gen) {
                if e.abandoned {
                    drop_abandoned.push(c);
                } else {
                    e.sent_on = None;
                    e.error = None;
                    again.push(c);
                }
            }
        }
        for c in drop_abandoned {
            st.entries.remove(&c);
        }
        again.sort_unstable();
        st.stats.resent += again.len() as u64;
        for c in again.into_iter().rev() {
            st.queue.push_front(c);
        }
        drop(st);
        self.work.notify_all();
    }

    /// Fails every request past its deadline.
    fn expire(&self, st: &mut St) {
        let now = Instant::now();
        // A reply stalled half-way holds its request in the reader: only dropping the
        // connection frees it (it is then failed below on the next pass, or sent again).
        let stalled: Vec<u64> = st
            .entries
            .values()
            .filter(|e| !e.abandoned && e.req.is_none() && e.deadline <= now)
            .filter_map(|e| e.sent_on)
            .collect();
        for g in stalled {
            if let Some(s) = st.socks.get(&g) {
                s.shutdown();
                st.dropped_because = Some("a reply stalled part-way through".to_string());
            }
        }
        let late: Vec<u64> = st
            .entries
            .iter()
            .filter(|(_, e)| !e.abandoned && e.req.is_some() && e.deadline <= now)
            .map(|(&c, _)| c)
            .collect();
        if late.is_empty() {
            return;
        }
        let mut why = match (st.socks.is_empty(), &st.last_error) {
            (false, _) => "the server did not answer".to_string(),
            (true, Some(e)) => format!("the server is unreachable ({e})"),
            (true, None) => "the server is unreachable".to_string(),
        };
        if let Some(p) = &st.dropped_because {
            why = format!("{why}; a connection was dropped because {p}");
        }
        for c in late {
            st.stats.timed_out += 1;
            let t = self.opts.request_timeout;
            let err = Error::new(ErrorKind::TimedOut, format!("{}: no reply within {t:?}: {why}", self.uri.text));
            let sent = st.entries.get(&c).and_then(|e| e.sent_on).is_some_and(|g| st.socks.contains_key(&g));
            if sent {
                // The reply may still come: keep a tombstone so that it is read and dropped.
                let e = st.entries.get_mut(&c).expect("listed");
                let req = e.req.take().expect("listed with its request");
                e.abandoned = true;
                let sink = std::mem::replace(&mut e.sink, Sink::Engine);
                self.hand_over(st, sink, IoCompletion::of(req, Err(err)));
            } else {
                st.queue.retain(|&q| q != c);
                self.deliver(st, c, Err(err));
            }
        }
    }
}

/// A connection to one export (see the module docs).
pub struct NbdClient {
    shared: Arc<Shared>,
    /// One sender thread per connection.
    senders: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("uri", &self.shared.uri.text).field("info", &self.shared.info).finish()
    }
}

impl NbdClient {
    /// Connects to `uri`: an unreachable server or a refused export fails now, with an
    /// error naming the URI; later losses are ridden out (see the module docs).
    pub fn connect(uri: &NbdUri, opts: NbdOptions) -> Result<NbdClient> {
        let (sock, info) = connect(uri, opts.connect_timeout)?;
        let shared = Arc::new(Shared {
            uri: uri.clone(),
            info,
            opts,
            st: Mutex::new(St {
                next_cookie: 1,
                queue: VecDeque::new(),
                entries: HashMap::new(),
                done: Vec::new(),
                gen: 0,
                socks: HashMap::new(),
                closing: false,
                last_error: None,
                dropped_because: None,
                stats: NbdStats::default(),
            }),
            work: Condvar::new(),
            backoff: Condvar::new(),
            notify: EventFd::new()?,
            waker: Mutex::new(None),
        });
        // The first connection is made now; the others connect on their own threads, so a
        // server that takes fewer clients than asked for delays nothing.
        let lanes = if info.has(proto::FLAG_CAN_MULTI_CONN) { opts.connections.clamp(1, 16) } else { 1 };
        let mut senders = Vec::new();
        let mut first = Some(sock);
        for lane in 0..lanes {
            let (s2, sock) = (shared.clone(), first.take());
            match std::thread::Builder::new().name(format!("ubcache-nbd-{lane}")).spawn(move || sender_loop(s2, sock)) {
                Ok(h) => senders.push(h),
                Err(e) if lane == 0 => return Err(Error::io("spawn the NBD client thread", e)),
                Err(_) => break,
            }
        }
        Ok(NbdClient { shared, senders: Mutex::new(senders) })
    }

    /// What the server said about the export at the first connection.
    pub fn info(&self) -> ExportInfo {
        self.shared.info
    }

    /// The URI, for messages.
    pub fn uri(&self) -> &NbdUri {
        &self.shared.uri
    }

    /// Counters.
    pub fn stats(&self) -> NbdStats {
        self.shared.lock().stats
    }

    /// Requests not yet handed back (in flight, or completed and not yet taken).
    pub fn pending(&self) -> usize {
        let st = self.shared.lock();
        st.entries.values().filter(|e| !e.abandoned).count() + st.done.len()
    }

    /// Readable while completions wait in [`NbdClient::take_completions`].
    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify.as_raw_fd()
    }

    /// Another doorbell rung with every completion (an engine thread's).
    pub fn set_waker(&self, waker: Arc<EventFd>) {
        *self.shared.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }

    /// Queues `req` (checked against the device by the caller); its completion comes
    /// through [`NbdClient::take_completions`].
    pub fn submit(&self, req: IoRequest) {
        self.enqueue(req, Sink::Engine);
    }

    /// Moves finished completions to `out`; returns how many.
    pub fn take_completions(&self, out: &mut Vec<IoCompletion>) -> usize {
        let mut st = self.shared.lock();
        let n = st.done.len();
        if n > 0 {
            // Set only while `done` holds completions (see `Shared::hand_over`).
            self.shared.notify.drain();
            out.append(&mut st.done);
        }
        n
    }

    /// Runs `req` and waits for it (for the synchronous paths: superblock reads, tools).
    pub fn execute(&self, req: IoRequest) -> IoCompletion {
        let (tx, rx) = mpsc::channel();
        self.enqueue(req, Sink::Caller(tx));
        rx.recv().expect("every request completes exactly once")
    }

    fn enqueue(&self, req: IoRequest, sink: Sink) {
        let mut st = self.shared.lock();
        if st.closing {
            let c =
                IoCompletion::of(req, Err(Error::new(ErrorKind::Closed, format!("{}: closed", self.shared.uri.text))));
            self.shared.hand_over(&mut st, sink, c);
            return;
        }
        let cookie = st.next_cookie;
        st.next_cookie += 1;
        let read_len = if matches!(req.op, IoOp::Read { .. } | IoOp::Readv { .. }) { req.op.len() } else { 0 };
        st.entries.insert(
            cookie,
            Entry {
                req: Some(req),
                sink,
                sent_on: None,
                deadline: Instant::now() + self.shared.opts.request_timeout,
                error: None,
                abandoned: false,
                read_len,
            },
        );
        st.queue.push_back(cookie);
        let unconnected = st.socks.is_empty();
        drop(st);
        // One sender wakes; it wakes another if it leaves requests queued. With no
        // connection, a new request cuts the reconnection backoff short.
        self.shared.work.notify_one();
        if unconnected {
            self.shared.backoff.notify_all();
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.closing = true;
            for (_, s) in st.socks.drain() {
                s.shutdown();
            }
        }
        self.shared.work.notify_all();
        self.shared.backoff.notify_all();
        for h in self.senders.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = h.join();
        }
        // Closing: nothing more will be answered.
        let mut st = self.shared.lock();
        let left: Vec<u64> = st.entries.keys().copied().collect();
        for c in left {
            let e = Error::new(ErrorKind::Closed, format!("{}: closed", self.shared.uri.text));
            self.shared.deliver(&mut st, c, Err(e));
        }
    }
}

/// Bytes of one request on the wire: header, and a write's data.
fn encode(req: &IoRequest, cookie: u64, info: &ExportInfo, who: &str) -> std::result::Result<Vec<u8>, Error> {
    let len = req.op.len();
    let too_big = || {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{who}: a request of {len} bytes is over the server's maximum of {}", info.max_block),
        )
    };
    let fua = if req.fua && info.has(proto::FLAG_SEND_FUA) { proto::CMD_FLAG_FUA } else { 0 };
    Ok(match &req.op {
        IoOp::Read { .. } | IoOp::Readv { .. } => {
            if len > u64::from(info.max_block) {
                return Err(too_big());
            }
            proto::request(proto::CMD_READ, 0, cookie, req.offset, len as u32).to_vec()
        }
        IoOp::Write { buf } => {
            if len > u64::from(info.max_block) {
                return Err(too_big());
            }
            let mut v = Vec::with_capacity(28 + buf.len());
            v.extend_from_slice(&proto::request(proto::CMD_WRITE, fua, cookie, req.offset, len as u32));
            v.extend_from_slice(buf);
            v
        }
        IoOp::Writev { bufs } => {
            if len > u64::from(info.max_block) {
                return Err(too_big());
            }
            let mut v = Vec::with_capacity(28 + len as usize);
            v.extend_from_slice(&proto::request(proto::CMD_WRITE, fua, cookie, req.offset, len as u32));
            for b in bufs {
                v.extend_from_slice(b);
            }
            v
        }
        IoOp::Flush => proto::request(proto::CMD_FLUSH, 0, cookie, 0, 0).to_vec(),
        IoOp::Discard { len } => {
            let l = u32::try_from(*len).map_err(|_| too_big())?;
            proto::request(proto::CMD_TRIM, 0, cookie, req.offset, l).to_vec()
        }
    })
}

/// Connects again and again with backoff until it works or the client closes.
fn reconnect(shared: &Shared) -> Option<Sock> {
    let mut backoff = Duration::from_millis(50);
    loop {
        {
            let mut st = shared.lock();
            if st.closing {
                return None;
            }
            shared.expire(&mut st);
        }
        match connect(&shared.uri, shared.opts.connect_timeout) {
            Ok((sock, info)) => {
                if info.size != shared.info.size {
                    let mut st = shared.lock();
                    st.last_error = Some(format!(
                        "{}: the export is now {} bytes, was {}: not using it",
                        shared.uri.text, info.size, shared.info.size
                    ));
                } else if info.structured != shared.info.structured {
                    shared.lock().last_error =
                        Some(format!("{}: the server changed its reply format", shared.uri.text));
                } else {
                    return Some(sock);
                }
            }
            Err(e) => shared.lock().last_error = Some(e.message().to_string()),
        }
        let st = shared.lock();
        if st.closing {
            return None;
        }
        let _ = shared.backoff.wait_timeout(st, backoff);
        backoff = (backoff * 2).min(shared.opts.max_backoff);
    }
}

/// One connection's sender: (re)connects it, starts its reader, and writes its share of
/// the queue until the client closes. `first` is the connection made by `connect`, if this
/// is the first sender.
fn sender_loop(shared: Arc<Shared>, first: Option<Sock>) {
    let who = shared.uri.text.clone();
    let mut first_conn = true;
    let mut sock = first;
    let mut reader: Option<JoinHandle<()>> = None;
    loop {
        // (Re)connected: start the reader of this generation.
        let mut out = match sock.take() {
            Some(s) => s,
            None => match reconnect(&shared) {
                Some(s) => s,
                None => break,
            },
        };
        let Ok(read_half) = out.try_clone() else {
            shared.lock().last_error = Some(format!("{who}: could not clone the socket"));
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let gen = {
            let mut st = shared.lock();
            if st.closing {
                out.shutdown();
                break;
            }
            st.gen += 1;
            let gen = st.gen;
            if !first_conn {
                st.stats.reconnects += 1;
            }
            first_conn = false;
            match out.try_clone() {
                Ok(s) => {
                    st.socks.insert(gen, s);
                }
                Err(_) => {
                    drop(st);
                    out.shutdown();
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            st.stats.connections = st.socks.len() as u32;
            st.stats.connected = true;
            gen
        };
        if let Some(h) = reader.take() {
            let _ = h.join();
        }
        let s2 = shared.clone();
        reader = Some(std::thread::spawn(move || reader_loop(s2, read_half, gen)));
        // Send until this connection is lost.
        loop {
            let mut st = shared.lock();
            let batch = loop {
                if st.closing || !st.socks.contains_key(&gen) {
                    break None;
                }
                shared.expire(&mut st);
                if !st.queue.is_empty() {
                    // This connection's share of the queue goes out in one write; the other
                    // connections, woken too, take the rest.
                    let share = st.queue.len().div_ceil(st.socks.len().max(1));
                    let mut bytes = Vec::new();
                    let mut taken = 0;
                    while let Some(c) = (taken < share).then(|| st.queue.pop_front()).flatten() {
                        taken += 1;
                        let Some(e) = st.entries.get_mut(&c) else { continue };
                        let Some(req) = e.req.as_ref() else { continue };
                        match encode(req, c, &shared.info, &who) {
                            Ok(b) => {
                                e.sent_on = Some(gen);
                                bytes.extend_from_slice(&b);
                            }
                            Err(err) => shared.deliver(&mut st, c, Err(err)),
                        }
                        if bytes.len() >= 4 << 20 {
                            break;
                        }
                    }
                    if !st.queue.is_empty() {
                        shared.work.notify_one();
                    }
                    break Some(bytes);
                }
                st = shared.work.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
            };
            drop(st);
            let Some(bytes) = batch else { break };
            if bytes.is_empty() {
                continue;
            }
            if let Err(e) = out.write_all(&bytes) {
                shared.lost(gen, Some(Error::io(format!("{who}: send"), e)));
                break;
            }
        }
        out.shutdown();
        if shared.lock().closing {
            break;
        }
    }
    if let Some(h) = reader.take() {
        let _ = h.join();
    }
}

fn reader_loop(shared: Arc<Shared>, mut sock: Sock, gen: u64) {
    let who = shared.uri.text.clone();
    let structured = shared.info.structured;
    let res = (|| -> Result<()> {
        loop {
            let h = match proto::read_reply_header(&mut sock, structured) {
                Ok(Ok(h)) => h,
                Ok(Err(what)) => return Err(protocol(&who, what)),
                Err(e) => return Err(Error::io(format!("{who}: receive"), e)),
            };
            let (cookie, done) = match h {
                ReplyHeader::Simple { cookie, .. } => (cookie, true),
                ReplyHeader::Chunk { cookie, flags, .. } => (cookie, flags & proto::REPLY_FLAG_DONE != 0),
            };
            // Take the request out while its data is read (no lock held on the socket).
            let (mut req, abandoned, read_len) = {
                let mut st = shared.lock();
                let Some(e) = st.entries.get_mut(&cookie).filter(|e| e.sent_on == Some(gen)) else {
                    return Err(protocol(
                        &who,
                        format_args!("a reply to cookie {cookie}, which has no request in flight"),
                    ));
                };
                (e.req.take(), e.abandoned, e.read_len)
            };
            let outcome = read_reply_body(&mut sock, &h, req.as_mut(), read_len, &who);
            let mut st = shared.lock();
            match outcome {
                Err(e) => {
                    // Put the request back so that it goes out again (queued now if the
                    // loss was noticed while this reader held it).
                    if let (Some(e2), Some(r)) = (st.entries.get_mut(&cookie), req) {
                        e2.req = Some(r);
                        if e2.sent_on.is_none() && !st.queue.contains(&cookie) {
                            st.queue.push_front(cookie);
                        }
                    }
                    drop(st);
                    shared.work.notify_one();
                    return Err(e);
                }
                Ok(status) => {
                    // The connection may have been declared lost while the body was read
                    // (`lost` dropped an abandoned entry, or queued this one again and another
                    // connection's sender skipped it for want of its request).
                    let Some(e) = st.entries.get_mut(&cookie) else { continue };
                    e.req = req;
                    if let Err(err) = status {
                        e.error.get_or_insert(err);
                    }
                    if !done && e.sent_on.is_none() && !st.queue.contains(&cookie) {
                        st.queue.push_front(cookie);
                        drop(st);
                        shared.work.notify_one();
                        continue;
                    }
                    if done {
                        if abandoned {
                            st.entries.remove(&cookie);
                        } else {
                            let e = st.entries.get_mut(&cookie).expect("present");
                            let r = match e.error.take() {
                                Some(err) => Err(err),
                                None => Ok(e.req.as_ref().map_or(0, |r| r.op.len())),
                            };
                            shared.deliver(&mut st, cookie, r);
                        }
                    }
                }
            }
        }
    })();
    let closing = shared.lock().closing;
    shared.lost(gen, if closing { None } else { res.err() });
}

/// Reads what follows a reply header. The outer error breaks the connection; the inner
/// one is the request's own failure (an errno from the server).
fn read_reply_body(
    sock: &mut Sock,
    h: &ReplyHeader,
    req: Option<&mut IoRequest>,
    read_len: u64,
    who: &str,
) -> Result<std::result::Result<(), Error>> {
    let rx = |e: std::io::Error| Error::io(format!("{who}: receive"), e);
    let server_error = |errno: u32, msg: &str| {
        let mut e = Error::io(
            format!(
                "{who}: the server failed the request{}",
                if msg.is_empty() { String::new() } else { format!(" ({msg})") }
            ),
            std::io::Error::from_raw_os_error(proto::errno_of(errno)),
        );
        if errno == 0 {
            e = protocol(who, "an error reply with error 0");
        }
        e
    };
    match *h {
        ReplyHeader::Simple { error, .. } => {
            if error != 0 {
                return Ok(Err(server_error(error, "")));
            }
            if read_len > 0 {
                match req {
                    Some(r) => fill(sock, r, 0, read_len as usize).map_err(rx)?,
                    None => drain(sock, read_len).map_err(rx)?,
                }
            }
            Ok(Ok(()))
        }
        ReplyHeader::Chunk { ty, len, .. } => match ty {
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(protocol(who, format_args!("a NONE chunk of {len} bytes")));
                }
                Ok(Ok(()))
            }
            proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE => {
                if read_len == 0 {
                    return Err(protocol(who, "data in the reply to a request that reads nothing"));
                }
                let mut o = [0u8; 8];
                if len < 8 {
                    return Err(protocol(who, format_args!("a data chunk of {len} bytes")));
                }
                sock.read_exact(&mut o).map_err(rx)?;
                let at = u64::from_be_bytes(o);
                let (start, end) = match req.as_ref() {
                    Some(r) => (r.offset, r.offset + read_len),
                    None => (at, at + read_len),
                };
                let n = if ty == proto::REPLY_TYPE_OFFSET_DATA {
                    u64::from(len - 8)
                } else {
                    if len != 12 {
                        return Err(protocol(who, format_args!("a hole chunk of {len} bytes")));
                    }
                    let mut s = [0u8; 4];
                    sock.read_exact(&mut s).map_err(rx)?;
                    u64::from(u32::from_be_bytes(s))
                };
                if at < start || at + n > end {
                    return Err(protocol(
                        who,
                        format_args!("a chunk for bytes {at}..{} of a read of {start}..{end}", at + n),
                    ));
                }
                if ty == proto::REPLY_TYPE_OFFSET_DATA {
                    match req {
                        Some(r) => fill(sock, r, (at - start) as usize, n as usize).map_err(rx)?,
                        None => drain(sock, n).map_err(rx)?,
                    }
                } else if let Some(r) = req {
                    zero(r, (at - start) as usize, n as usize);
                }
                Ok(Ok(()))
            }
            proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                let min = if ty == proto::REPLY_TYPE_ERROR { 6 } else { 14 };
                if len < min || len > 4096 + min {
                    return Err(protocol(who, format_args!("an error chunk of {len} bytes")));
                }
                let mut b = vec![0u8; len as usize];
                sock.read_exact(&mut b).map_err(rx)?;
                let errno = u32::from_be_bytes(b[..4].try_into().expect("4"));
                let mlen = u16::from_be_bytes([b[4], b[5]]) as u32;
                if mlen + min != len {
                    return Err(protocol(
                        who,
                        format_args!("an error chunk whose message length {mlen} does not fit {len}"),
                    ));
                }
                let msg = String::from_utf8_lossy(&b[6..6 + mlen as usize]).into_owned();
                Ok(Err(server_error(errno, &msg)))
            }
            t if t & 0x8000 != 0 => {
                // An error type this client does not know: still an error, and its length says how much to skip.
                drain(sock, u64::from(len)).map_err(rx)?;
                Ok(Err(server_error(libc::EIO as u32, &format!("error chunk type {t}"))))
            }
            t => Err(protocol(who, format_args!("a chunk of unknown type {t}"))),
        },
    }
}

/// Reads `n` bytes into the request's buffers from byte `at` of the read.
fn fill(sock: &mut Sock, req: &mut IoRequest, at: usize, n: usize) -> std::io::Result<()> {
    let mut skip = at;
    let mut left = n;
    let mut each = |b: &mut AlignedBuf| -> std::io::Result<()> {
        if left == 0 {
            return Ok(());
        }
        if skip >= b.len() {
            skip -= b.len();
            return Ok(());
        }
        let take = (b.len() - skip).min(left);
        sock.read_exact(&mut b[skip..skip + take])?;
        skip = 0;
        left -= take;
        Ok(())
    };
    match &mut req.op {
        IoOp::Read { buf } => each(buf),
        IoOp::Readv { bufs } => bufs.iter_mut().try_for_each(each),
        _ => Ok(()),
    }
}

fn zero(req: &mut IoRequest, at: usize, n: usize) {
    let mut skip = at;
    let mut left = n;
    let mut each = |b: &mut AlignedBuf| {
        if left == 0 || skip >= b.len() {
            skip = skip.saturating_sub(b.len());
            return;
        }
        let take = (b.len() - skip).min(left);
        b[skip..skip + take].fill(0);
        skip = 0;
        left -= take;
    };
    match &mut req.op {
        IoOp::Read { buf } => each(buf),
        IoOp::Readv { bufs } => bufs.iter_mut().for_each(each),
        _ => {}
    }
}

fn drain(sock: &mut Sock, mut n: u64) -> std::io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let k = n.min(scratch.len() as u64) as usize;
        sock.read_exact(&mut scratch[..k])?;
        n -= k as u64;
    }
    Ok(())
}
