//! Requests to cached devices: what every request has in common (its slot, its buffer, its
//! parts in flight, how it completes) and the order overlapping requests are served in.
//! The state machine of each kind is in its own file: `read`, `write`, `flush` (flushes
//! and discards); `fill` inserts read misses into the cache.

pub(crate) mod fill;
mod flush;
mod order;
mod read;
mod write;

use std::sync::Arc;

use super::journal::Waiter;
use super::slots::Slots;
use super::{CacheSet, SetState, Tag};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{Fragment, Placeholder};
use crate::io::{AlignedBuf, BufPool, DevId, IoCompletion, IoOp, IoRequest, Slab};

pub(crate) use fill::Fill;
pub(crate) use order::Order;
pub(crate) use write::{Path, Piece};

/// What a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    Discard,
}

/// One I/O of a request, or something else it waits for.
#[derive(Debug)]
pub(crate) enum Part {
    /// A read from the cache of a hit: its bucket is pinned until it completes. With
    /// `check`, the data read is the whole extent, and must match its checksum.
    CacheRead { bucket: u64, gen: u8, dirty: bool, sector: u64, check: Option<Check> },
    /// A hit on part of an extent with a checksum: the whole extent is read into a buffer
    /// of its own and checked, then sectors `skip .. skip + len` of it are copied to byte
    /// `at` of the request's buffer.
    CacheReadExtent { bucket: u64, dirty: bool, sector: u64, len: u64, skip: u64, at: usize, check: Check },
    /// A read from the backing device; with a placeholder when the data is to fill the
    /// cache, `hot` when the cache held it before (it fills a bucket of hot data).
    BackingRead { ph: Option<Placeholder>, hot: bool },
    /// Readahead past the end of a read miss: read from the backing device into a buffer
    /// of its own, only to fill the cache.
    Readahead { ph: Placeholder },
    /// The write of allocation `piece` to the cache.
    CacheWrite { piece: usize },
    /// A write over dirty data, in place, its bucket pinned.
    InPlace { bucket: u64 },
    /// The write of the whole request to the backing device.
    BackingWrite,
    /// The discard passed down to the backing device.
    BackingDiscard,
    /// The journal entry covering the request must be durable.
    Journal,
}

/// A hit's extent, to check against its checksum (`data_csum`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Check {
    pub crc: u64,
    /// The extent's pointer at its start, and its first sector.
    pub ptr: crate::index::Ptr,
    pub start: u64,
    /// Its sectors.
    pub size: u64,
}

/// The request's buffer: whole while one I/O takes it, or shared by windows.
pub(crate) enum Buf {
    None,
    Whole(AlignedBuf),
    /// Travelling with the request's only I/O.
    Away,
    Shared {
        slab: Arc<Slab>,
        off: usize,
        len: usize,
    },
}

impl Buf {
    /// Bytes `at .. at + len` of the buffer, for one I/O (the buffer becomes shared).
    fn window(&mut self, at: usize, len: usize, align: usize) -> AlignedBuf {
        if let Buf::Whole(_) = self {
            let Buf::Whole(b) = std::mem::replace(self, Buf::None) else { unreachable!() };
            let (slab, off, len) = b.into_slab();
            *self = Buf::Shared { slab, off, len };
        }
        match self {
            Buf::Shared { slab, off, .. } => {
                // SAFETY: a request's reads take disjoint windows, and nothing reads the
                // buffer until they all completed; windows that writes take are only read.
                unsafe { AlignedBuf::in_slab_aligned(slab, *off + at, len, align) }
                    .expect("a request's windows lie inside its buffer, on block boundaries")
            }
            _ => unreachable!("window of a buffer that is not at hand"),
        }
    }

    /// The whole buffer back, for the completion.
    fn take(&mut self) -> Option<AlignedBuf> {
        match std::mem::replace(self, Buf::None) {
            Buf::Whole(b) => Some(b),
            Buf::Shared { slab, off, len } => {
                // SAFETY: every I/O on the buffer has completed.
                Some(unsafe { AlignedBuf::in_slab_aligned(&slab, off, len, 512) }.expect("the whole window"))
            }
            Buf::None | Buf::Away => None,
        }
    }
}

/// A request in flight.
pub(crate) struct Req {
    pub user_data: u64,
    pub inode: u32,
    pub kind: Kind,
    /// Bytes on the cached device.
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
    /// Submission order, for ordering overlapping requests.
    pub seqno: u64,
    pub buf: Buf,
    /// Parts not yet done.
    pub outstanding: u32,
    pub error: Option<Error>,
    pub parts: Vec<Part>,
    /// Writes: the path the part not over dirty data takes, that part (runs of sectors),
    /// the cache space allocated for it, and whether some of the write went in place.
    pub path: Path,
    pub rest: Vec<(u64, u64)>,
    pub pieces: Vec<Piece>,
    pub in_place: bool,
    /// With `data_csum`, writes in place wait here (sector, sectors, pointer, offset in
    /// it) until the entry dropping the checksums of the extents they change is durable.
    pub in_place_gated: Vec<(u64, u64, crate::index::Ptr, u64)>,
    /// The request orders later overlapping ones (a write or discard).
    pub ordering: bool,
    /// Written keys are in the index: what is left is waiting for the journal.
    pub committed: bool,
    /// Waiting for cache space: not finished whatever its parts did.
    pub waiting_space: bool,
    /// A flash-only volume's write waiting for space: the GC passes finished when it began
    /// to wait (it gives up only once a later pass still finds the set full).
    pub gc_runs_at_wait: Option<u64>,
    /// The request bypasses the cache (see `bypass`): reads do not fill, writes go around.
    pub bypass: bool,
    /// When it started, if the cache device's latency is timed (for congestion).
    pub started: Option<std::time::Instant>,
}

/// Every request in flight, by slot.
#[derive(Default)]
pub(crate) struct Requests {
    slots: Vec<Option<Req>>,
    free: Vec<u32>,
    live: usize,
    next_seqno: u64,
    pub order: Order,
    pub fills: Slots<Fill>,
    /// Scratch for lookups.
    pub frags: Vec<Fragment>,
    /// Part lists of finished requests, kept for the next ones (no allocation per request).
    spare_parts: Vec<Vec<Part>>,
    /// Where fills' copies of their data come from: recycled, as a fresh buffer of a
    /// megabyte is mapped, faulted in page by page, zeroed and unmapped again for every fill
    /// (1 MiB read misses that filled the cache cost about 0.9 ms of CPU each that way).
    pub fill_pool: BufPool,
}

impl Requests {
    /// Requests and fills in flight.
    pub fn in_flight(&self) -> usize {
        self.live + self.fills.len()
    }

    /// The next submission number (writeback takes one for each extent, to order the user
    /// requests that come after it).
    pub fn take_seqno(&mut self) -> u64 {
        self.next_seqno += 1;
        self.next_seqno - 1
    }

    pub fn get(&mut self, slot: u32) -> &mut Req {
        self.slots[slot as usize].as_mut().expect("a live request slot")
    }

    fn insert(&mut self, r: Req) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(r);
                s
            }
            None => {
                self.slots.push(Some(r));
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn remove(&mut self, slot: u32) -> Req {
        self.live -= 1;
        self.free.push(slot);
        let mut r = self.slots[slot as usize].take().expect("a live request slot");
        let mut parts = std::mem::take(&mut r.parts);
        if parts.capacity() <= 16 {
            parts.clear();
            self.spare_parts.push(parts);
        }
        r
    }

    /// An empty part list (one a finished request left, if any).
    fn parts(&mut self) -> Vec<Part> {
        self.spare_parts.pop().unwrap_or_default()
    }

    /// True when a write or fill of `inode` is in flight (either may still add keys).
    pub fn writes_or_fills_for(&self, inode: u32) -> bool {
        self.slots.iter().flatten().any(|r| r.inode == inode && r.kind == Kind::Write)
            || self.fills.iter().any(|f| f.inode() == inode)
    }

    /// True when a request or fill of `inode` is in flight.
    pub fn in_flight_for(&self, inode: u32) -> bool {
        self.slots.iter().flatten().any(|r| r.inode == inode) || self.fills.iter().any(|f| f.inode() == inode)
    }
}

/// A completion's result and buffer.
pub(crate) fn split(c: IoCompletion) -> (Result<u64>, Option<AlignedBuf>) {
    let IoCompletion { result, op, .. } = c;
    let buf = match op {
        IoOp::Read { buf } | IoOp::Write { buf } => Some(buf),
        _ => None,
    };
    (result, buf)
}

fn op_kind(op: &IoOp) -> Result<Kind> {
    Ok(match op {
        IoOp::Read { .. } => Kind::Read,
        IoOp::Write { .. } => Kind::Write,
        IoOp::Flush => Kind::Flush,
        IoOp::Discard { .. } => Kind::Discard,
        IoOp::Readv { .. } | IoOp::Writev { .. } => {
            return Err(Error::new(ErrorKind::InvalidArgument, "vectored I/O is not offered on cached devices"))
        }
    })
}

impl CacheSet {
    /// Takes a request from the user (see [`CacheSet::submit`]).
    pub(crate) fn submit_request(&mut self, io: IoRequest) {
        let inode = io.dev.0;
        let kind = match op_kind(&io.op) {
            Ok(k) => k,
            Err(e) => return self.done.push(IoCompletion::of(io, Err(e))),
        };
        let refuse = match &self.state {
            SetState::Closing | SetState::Closed => Some(Error::new(ErrorKind::Closed, "the cache set is closed")),
            _ => None,
        };
        if let Some(e) = refuse {
            return self.done.push(IoCompletion::of(io, Err(e)));
        }
        let dev = match self.dev(inode) {
            Ok(d) => d,
            Err(e) => return self.done.push(IoCompletion::of(io, Err(e))),
        };
        let len = match &io.op {
            IoOp::Read { buf } | IoOp::Write { buf } => buf.len() as u64,
            IoOp::Discard { len } => *len,
            _ => 0,
        };
        if kind != Kind::Flush {
            let what = match kind {
                Kind::Read => "read",
                Kind::Write => "write",
                _ => "discard",
            };
            if let Err(e) = dev.check_range(what, io.offset, len) {
                return self.done.push(IoCompletion::of(io, Err(e)));
            }
        }
        let seqno = self.reqs.take_seqno();
        self.wb_ios.requests_seen += 1;
        let buf = match io.op {
            IoOp::Read { buf } | IoOp::Write { buf } => Buf::Whole(buf),
            _ => Buf::None,
        };
        let ordering = matches!(kind, Kind::Write | Kind::Discard);
        let req = Req {
            user_data: io.user_data,
            inode,
            kind,
            offset: io.offset,
            len,
            fua: io.fua && kind == Kind::Write,
            seqno,
            buf,
            outstanding: 0,
            error: None,
            parts: self.reqs.parts(),
            path: Path::Undecided,
            rest: Vec::new(),
            pieces: Vec::new(),
            in_place: false,
            in_place_gated: Vec::new(),
            ordering,
            committed: false,
            waiting_space: false,
            gc_runs_at_wait: None,
            bypass: false,
            started: None,
        };
        let slot = self.reqs.insert(req);
        let (start, end) = (io.offset / 512, (io.offset + len) / 512);
        if ordering {
            self.reqs.order.add(inode, start, end, seqno, slot, false);
        }
        if self.state == SetState::Starting || self.reqs.order.must_wait(inode, start, end, seqno, kind == Kind::Read) {
            if self.state != SetState::Starting {
                self.stats.ordered_waits += 1;
            }
            self.reqs.order.block(slot);
            return;
        }
        self.start_request(slot);
    }

    fn start_request(&mut self, slot: u32) {
        if self.congestion.timed() {
            self.reqs.get(slot).started = Some(std::time::Instant::now());
        }
        match self.reqs.get(slot).kind {
            Kind::Read => self.read_start(slot),
            Kind::Write => self.write_start(slot),
            Kind::Flush => self.flush_start(slot),
            Kind::Discard => self.discard_start(slot),
        }
    }

    /// Starts requests that waited (for startup, or for earlier overlapping writes) and
    /// may go now, in submission order.
    pub(crate) fn unblock_requests(&mut self) {
        if self.state == SetState::Starting {
            return;
        }
        for slot in self.reqs.order.take_ready(&self.reqs.slots) {
            self.start_request(slot);
        }
    }

    /// Issues one I/O for part `part` of request `slot`.
    pub(crate) fn issue(&mut self, slot: u32, part: Part, req: impl FnOnce(u64) -> IoRequest) {
        let r = self.reqs.get(slot);
        let idx = r.parts.len() as u32;
        r.parts.push(part);
        r.outstanding += 1;
        let io = req(Tag::Part { req: slot, part: idx }.encode());
        self.push_io(io);
    }

    /// A part that is not an I/O (a journal wait) begins.
    pub(crate) fn add_wait(&mut self, slot: u32) {
        let r = self.reqs.get(slot);
        r.parts.push(Part::Journal);
        r.outstanding += 1;
    }

    /// Waits for journal entry `seq` to be durable before the request completes.
    pub(crate) fn wait_journal(&mut self, slot: u32, seq: u64) {
        if seq > self.journal.durable {
            self.add_wait(slot);
            self.journal_wait(seq, Waiter::Req(slot));
        }
    }

    pub(crate) fn part_done(&mut self, slot: u32, part: u32, c: IoCompletion) {
        let Some(Some(r)) = self.reqs.slots.get_mut(slot as usize) else {
            debug_assert!(false, "completion for request slot {slot}, which is not in flight");
            return;
        };
        r.outstanding -= 1;
        match r.kind {
            Kind::Read => self.read_part_done(slot, part as usize, c),
            Kind::Write => self.write_part_done(slot, part as usize, c),
            Kind::Flush | Kind::Discard => self.flush_part_done(slot, part as usize, c),
        }
    }

    /// Something a request waited for (its journal entry, a backing flush) is done.
    pub(crate) fn req_wait_done(&mut self, slot: u32) {
        let r = self.reqs.get(slot);
        r.outstanding -= 1;
        self.maybe_finish(slot);
    }

    /// A part the request waited for failed (the set went out of service).
    pub(crate) fn req_failed_part(&mut self, slot: u32, e: Error) {
        let r = self.reqs.get(slot);
        r.outstanding -= 1;
        r.error.get_or_insert(e);
        self.maybe_finish(slot);
    }

    /// Records an error for the request (the first one wins).
    pub(crate) fn req_error(&mut self, slot: u32, e: Error) {
        self.reqs.get(slot).error.get_or_insert(e);
    }

    /// Runs the request's next step once nothing is outstanding.
    pub(crate) fn maybe_finish(&mut self, slot: u32) {
        let r = self.reqs.get(slot);
        if r.outstanding > 0 || r.waiting_space {
            return;
        }
        match r.kind {
            Kind::Write if !r.committed => self.write_commit(slot),
            Kind::Discard if !r.committed => self.discard_commit(slot),
            _ => self.complete_request(slot),
        }
    }

    /// Hands the request back to the user.
    pub(crate) fn complete_request(&mut self, slot: u32) {
        let mut r = self.reqs.remove(slot);
        let result = match r.error.take() {
            Some(e) => Err(e),
            None => Ok(match r.kind {
                Kind::Flush => 0,
                _ => r.len,
            }),
        };
        let op = match r.kind {
            Kind::Read => IoOp::Read { buf: r.buf.take().unwrap_or_else(|| AlignedBuf::new(0)) },
            Kind::Write => IoOp::Write { buf: r.buf.take().unwrap_or_else(|| AlignedBuf::new(0)) },
            Kind::Flush => IoOp::Flush,
            Kind::Discard => IoOp::Discard { len: r.len },
        };
        self.done.push(IoCompletion { user_data: r.user_data, dev: DevId(r.inode), offset: r.offset, op, result });
        if r.ordering {
            self.reqs.order.remove(slot);
            self.unblock_requests();
        }
        self.close_progress();
    }

    /// The set went out of service: requests waiting to start fail now.
    pub(crate) fn reqs_fail(&mut self, e: &Error) {
        let _ = e;
        // Requests already running finish on their own completions; those waiting for
        // space would wait forever.
        self.space_fail_waiters();
    }

    /// Requests that have not started (waiting for startup or ordering) when the set closes.
    pub(crate) fn reqs_refuse_waiting(&mut self, e: &Error) {
        let blocked = self.reqs.order.take_all_blocked();
        for slot in blocked {
            self.req_error(slot, e.clone());
            self.complete_request(slot);
        }
    }
}
