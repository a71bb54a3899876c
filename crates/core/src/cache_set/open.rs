//! Opening a cache set (bcache's `run_cache_set`), in two halves.
//!
//! [`load`] reads everything back through the synchronous [`Storage`] seam, on whatever
//! thread calls it: the superblock; with `CACHE_SYNC` set, the journal, whose newest valid
//! entry names the prio chain (gens and prios are loaded), the UUID table and the
//! checkpoint; the checkpoint's keys, then the journal's keys after it (stale ones drop
//! out); a first GC, which counts bucket usage and primes the prio and btree reserves from
//! unused buckets. Without `CACHE_SYNC` the set is fresh. Nothing is written: the loaded
//! set can be handed to the thread that will drive it.
//!
//! [`CacheSet::start`] then makes that state durable through the engine before any request
//! is served: a prio write (so the gens the first GC bumped are on disk before any bucket
//! is reused), for a fresh set an empty UUID table and checkpoint, after a recovery that
//! met a gap or a damaged checkpoint a checkpoint of what it recovered (entries past a gap
//! must never be needed again), a journal entry recording all of it, and finally the
//! superblock with `CACHE_SYNC` set and `seq` bumped.

use std::time::{Duration, Instant};

use super::checkpoint::Reason;
use super::meta::{CheckpointRef, Meta};
use super::{
    CacheSet, CacheSetOptions, CacheSetStats, GcState, Geometry, JournalWriter, Requests, SetState, Space,
    CKPT_PRIO_LIMIT, CKPT_PRIO_SOFT,
};
use crate::alloc::{self, Allocator, CacheConfig, Replacement, SetConfig};
use crate::checkpoint::{self, CheckpointGeometry};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{replay_order, replay_records, ExtentIndex};
use crate::io::{DevId, Storage};
use crate::journal::{self, FoundEntry, Journal, JournalGeometry, MetaPtr};
use crate::uuids::{self, UuidEntry};

/// What opening found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// `CACHE_SYNC` was clear: a fresh set was initialized.
    pub fresh: bool,
    /// Valid journal entries found.
    pub journal_entries: usize,
    /// Seq of the newest valid entry.
    pub head_seq: u64,
    /// Keys loaded from the checkpoint.
    pub checkpoint_keys: u64,
    /// Seq of the checkpoint loaded.
    pub checkpoint_seq: u64,
    /// The newest checkpoint was damaged; an older one was loaded and more journal replayed.
    pub checkpoint_fallback: bool,
    /// Checkpoints kept from reuse because replay may still start from them.
    pub checkpoints_kept: usize,
    /// Keys replayed from the journal.
    pub replayed_keys: u64,
    /// Journal entries replayed.
    pub replayed_entries: u64,
    /// Keys (from checkpoint or journal) whose pointers were all stale.
    pub stale_keys: u64,
    /// Replay stopped before this seq because it was missing (entries after it ignored).
    pub gap_at: Option<u64>,
    /// Prio writes since the oldest checkpoint kept was begun.
    pub prio_distance: u64,
    /// Sequence number of the prio chain read.
    pub prio_seq: u64,
    /// The set was closed cleanly last time (its newest entry says so).
    pub clean_shutdown: bool,
    /// Clean keys dropped because the set was not closed cleanly: the backing devices may
    /// hold newer data for them (a write that reached a backing device before its key or
    /// invalidation reached the journal), or older (a key that reached the journal before
    /// its write was durable on the backing device). Dirty data is kept.
    pub clean_keys_dropped: u64,
    /// Time spent reading and decoding the journal.
    pub journal_read_time: Duration,
    /// Time spent reading and inserting the checkpoint.
    pub checkpoint_time: Duration,
    /// Time spent inserting the journal's keys.
    pub replay_time: Duration,
    /// Time spent in the initial GC.
    pub gc_time: Duration,
}

/// What the startup still has to do (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Startup {
    fresh: bool,
    /// A checkpoint must be recorded before the set runs.
    checkpoint: bool,
    prio_done: bool,
    uuid_done: bool,
    checkpoint_done: bool,
    super_sent: bool,
}

fn ctx(what: &str, e: Error) -> Error {
    Error::new(
        if e.kind() == ErrorKind::Io { ErrorKind::Io } else { ErrorKind::Corrupt },
        format!("{what}: {}", e.message()),
    )
}

/// Reads the cache set on `st` back (see the module docs). The set returned is in
/// [`SetState::Starting`]; give it its device with [`CacheSet::start`].
pub fn load(st: &mut dyn Storage, opts: CacheSetOptions) -> Result<CacheSet> {
    let mut sb_page = vec![0u8; super::superblock::SB_BYTES];
    st.read(super::superblock::SB_OFFSET, &mut sb_page)?;
    let sb = super::superblock::parse(&sb_page)?;
    if sb.nr_in_set != 1 || sb.nr_this_dev != 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("cache device {} of {}: only sets of one cache device are supported", sb.nr_this_dev, sb.nr_in_set),
        ));
    }
    if !sb.bucket_size.is_power_of_two() || sb.block_size == 0 || !sb.block_size.is_power_of_two() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "bucket size {} / block size {} sectors: both must be powers of two",
                sb.bucket_size, sb.block_size
            ),
        ));
    }
    if sb.journal_buckets.is_empty() || sb.journal_buckets.iter().any(|&b| b < sb.first_bucket || b >= sb.nbuckets) {
        return Err(Error::new(ErrorKind::InvalidArgument, "superblock: journal buckets missing or out of range"));
    }
    let replacement = match sb.replacement() {
        1 => Replacement::Fifo,
        2 => Replacement::Random,
        3 => Replacement::S3Fifo,
        4 => Replacement::TinyLfu,
        _ => Replacement::Lru,
    };
    let alloc = Allocator::new(&SetConfig {
        set_uuid: sb.set_uuid,
        bucket_size: sb.bucket_size,
        block_size: sb.block_size,
        caches: vec![CacheConfig {
            nbuckets: sb.nbuckets,
            first_bucket: sb.first_bucket,
            replacement,
            discard: sb.discard(),
        }],
        seed: opts.seed,
    })?;
    let geo = Geometry {
        bucket_bytes: sb.bucket_size as usize * 512,
        block_bytes: sb.block_size as usize * 512,
        bucket_bits: sb.bucket_size.trailing_zeros(),
        set_magic: alloc::prio::set_magic(&sb.set_uuid),
        sb: sb.clone(),
    };
    let g = JournalGeometry {
        buckets: sb.journal_buckets.clone(),
        bucket_bytes: geo.bucket_bytes,
        block_bytes: geo.block_bytes,
        set_magic: geo.set_magic,
    };
    let t = Instant::now();
    let found = journal::read_journal(st, &g)?;
    let journal_read_time = t.elapsed();
    let ring = if sb.sync() {
        Journal::resume(g, &found)?
    } else {
        // Entries of an earlier attempt may linger: start above them so none looks newer.
        Journal::new(g, found.last().map_or(0, |e| e.jset.seq))?
    };
    let delay = Duration::from_millis(opts.journal_delay_ms);
    let journal = JournalWriter::new(ring, opts.journal_fua, delay);
    let mut cs = CacheSet {
        geo,
        alloc,
        index: ExtentIndex::new(),
        journal,
        meta: Meta::new(0, Vec::new(), None, sb_page),
        gc: GcState::default(),
        ckpt: Default::default(),
        space: Space::default(),
        reqs: Requests::default(),
        wb_ios: Default::default(),
        moving: Default::default(),
        congestion: super::bypass::Congestion::new(opts.congestion, opts.seed),
        accounting: super::accounting::Collector::new(Instant::now()),
        io_errors: Default::default(),
        devs: Vec::new(),
        state: SetState::Starting,
        startup: Startup::default(),
        closing: Default::default(),
        cache: DevId(u32::MAX),
        cache_unflushed: false,
        crc_cuts: Default::default(),
        stats: CacheSetStats::default(),
        admission: Default::default(),
        report: OpenReport { journal_read_time, ..Default::default() },
        io_out: Vec::new(),
        done: Vec::new(),
        events: Vec::new(),
        opts,
    };
    cs.policy_state_follow();
    if sb.sync() {
        cs.recover(st, found)?;
    } else {
        cs.report.fresh = true;
        cs.startup.fresh = true;
        cs.startup.checkpoint = true;
    }
    let t = Instant::now();
    cs.gc_run();
    cs.report.gc_time = t.elapsed();
    if let SetState::Failed(e) = &cs.state {
        return Err(e.clone());
    }
    Ok(cs)
}

impl CacheSet {
    fn recover(&mut self, st: &mut dyn Storage, found: Vec<FoundEntry>) -> Result<()> {
        let head = found
            .last()
            .ok_or_else(|| {
                Error::new(ErrorKind::Corrupt, "journal: no valid entry, though the set has run (CACHE_SYNC)")
            })?
            .jset
            .clone();
        self.report.journal_entries = found.len();
        self.report.head_seq = head.seq;
        let bb = self.geo.bucket_bytes as u64;

        // Prios and gens.
        let prio_head = head.prio_bucket[0];
        self.alloc
            .read_prios(0, prio_head, |b, buf| st.read(b * bb, buf))
            .map_err(|e| ctx(&format!("prio chain at bucket {prio_head} unreadable"), e))?;
        self.meta.prio_head = prio_head;
        self.report.prio_seq = self.alloc.prio_seq(0)?;

        // UUID table.
        let up =
            head.uuid_bucket.ok_or_else(|| Error::new(ErrorKind::Corrupt, "UUID table: the journal records none"))?;
        self.meta.uuids = read_uuids(st, &self.geo, &up).map_err(|e| ctx("UUID table unreadable", e))?;
        self.meta.uuid_ptr = Some(up);

        // Checkpoint: the newest the journal names, else an older one it still covers.
        let g = CheckpointGeometry {
            bucket_bytes: self.geo.bucket_bytes,
            block_bytes: self.geo.block_bytes,
            set_magic: self.geo.set_magic,
        };
        let nbuckets = self.geo.sb.nbuckets;
        let t = Instant::now();
        let mut candidates: Vec<MetaPtr> = Vec::new();
        for c in std::iter::once(head.checkpoint).chain(found.iter().rev().map(|e| e.jset.checkpoint)).flatten() {
            if !candidates.contains(&c) && c.seq + 1 >= head.last_seq {
                candidates.push(c);
            }
        }
        let mut loaded = None;
        let mut first_err = None;
        for (i, c) in candidates.iter().enumerate() {
            match checkpoint::read(st, &g, c.bucket, c.seq, nbuckets) {
                Ok(l) => {
                    loaded = Some((i, *c, l));
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((i, cptr, l)) = loaded else {
            let e = first_err.unwrap_or_else(|| Error::new(ErrorKind::Corrupt, "the journal records none"));
            return Err(ctx("index checkpoint unreadable", e));
        };
        self.report.checkpoint_fallback = i > 0;
        self.report.checkpoint_seq = cptr.seq;
        self.report.checkpoint_keys = l.keys.len() as u64;
        for k in &l.keys {
            if !self.index.insert(k, &mut self.alloc)? {
                self.report.stale_keys += 1;
            }
        }
        // Older checkpoints replay may still fall back to keep their buckets.
        let mut kept = Vec::new();
        for c in candidates.iter().skip(i + 1).filter(|c| c.seq < cptr.seq) {
            if let Ok((buckets, prio_seq)) = checkpoint::chain(st, &g, c.bucket, c.seq, nbuckets) {
                kept.push(CheckpointRef { ptr: *c, buckets, prio_seq });
            }
        }
        kept.sort_by_key(|c| c.ptr.seq);
        kept.push(CheckpointRef { ptr: cptr, buckets: l.buckets, prio_seq: l.prio_seq });
        self.report.checkpoints_kept = kept.len();
        self.meta.checkpoints = kept;
        self.report.checkpoint_time = t.elapsed();

        // Journal replay after the checkpoint, up to the first gap.
        let t = Instant::now();
        let mut bytes: Vec<u8> = Vec::new();
        for (expect, e) in (cptr.seq + 1..).zip(found.iter().filter(|e| e.jset.seq > cptr.seq)) {
            if e.jset.seq != expect {
                self.report.gap_at = Some(expect);
                break;
            }
            bytes.extend_from_slice(&e.key_bytes);
            self.report.replayed_entries += 1;
        }
        let mut recs = replay_records(&bytes);
        self.report.replayed_keys = recs.len() as u64;
        let clashing = replay_order(&mut recs);
        for r in recs.iter().chain(clashing.iter()) {
            let k = r.key(&bytes)?;
            if !self.index.insert(&k, &mut self.alloc)? {
                self.report.stale_keys += 1;
            }
        }
        self.report.replay_time = t.elapsed();
        self.report.clean_shutdown = head.clean;
        if !head.clean {
            self.drop_clean_keys()?;
        }

        self.report.prio_distance = self.prio_write_distance();
        if self.report.prio_distance >= CKPT_PRIO_LIMIT {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "the journal's replay spans {} prio writes (at most {CKPT_PRIO_LIMIT}): bucket gens may have wrapped, \
                     so stale keys could not be told from live ones",
                    self.report.prio_distance
                ),
            ));
        }
        // Entries past a gap, or a damaged checkpoint, must not be needed again: what was
        // recovered becomes the checkpoint new entries replay on. So does a replay that
        // spans many prio writes.
        self.startup.checkpoint = self.report.gap_at.is_some()
            || self.report.checkpoint_fallback
            || self.report.prio_distance >= CKPT_PRIO_SOFT;
        Ok(())
    }

    /// After an unclean shutdown, only dirty data is trusted (see
    /// [`OpenReport::clean_keys_dropped`]).
    fn drop_clean_keys(&mut self) -> Result<()> {
        let mut clean = Vec::new();
        let mut out = Vec::new();
        let mut pos = crate::index::ScanPos::default();
        loop {
            let next = self.index.scan(pos, crate::index::ScanFilter::All, 4096, &self.alloc, &mut out);
            clean.extend(out.iter().filter(|k| !k.dirty).map(|k| (k.inode, k.start, k.size)));
            match next {
                Some(p) => pos = p,
                None => break,
            }
        }
        self.report.clean_keys_dropped = clean.len() as u64;
        for (inode, start, size) in clean {
            self.index.invalidate(inode, start, size, &mut self.alloc)?;
        }
        Ok(())
    }

    /// Starts the set on `cache`, the cache device's id in the engine that will drive it:
    /// the startup writes go out (see the module docs); requests wait until it is done.
    pub fn start(&mut self, cache: DevId) {
        self.cache = cache;
        if self.startup.fresh {
            self.uuid_write(Vec::new(), None);
        }
        if self.startup.checkpoint {
            self.checkpoint_wanted(if self.startup.fresh { Reason::Fresh } else { Reason::Recovery });
        }
        if !self.prio_write_start(true) && !matches!(self.state, SetState::Failed(_)) {
            self.fail(Error::new(ErrorKind::NoSpace, "startup: no free bucket for the prio chain"));
        }
    }

    /// A step of the startup finished: write the superblock once all are, then run.
    pub(crate) fn startup_progress(&mut self) {
        if self.state != SetState::Starting {
            return;
        }
        let s = &mut self.startup;
        if !s.prio_done && self.stats.prio_writes > 0 {
            s.prio_done = true;
        }
        if !s.uuid_done && (!s.fresh || self.meta.uuid_ptr.is_some() && !self.meta.busy()) {
            s.uuid_done = true;
        }
        if !s.checkpoint_done && (!s.checkpoint || self.stats.checkpoints > 0) {
            s.checkpoint_done = true;
        }
        if !(s.prio_done && s.uuid_done && s.checkpoint_done) {
            return;
        }
        if !s.super_sent {
            s.super_sent = true;
            self.super_write();
            return;
        }
        if self.meta.sb_writing {
            return;
        }
        self.state = SetState::Running;
        self.unblock_requests();
    }

    /// Attaches a cached device known to the UUID table as `inode`, or adds it to the
    /// table; `tag` comes back from [`CacheSet::take_events`] with the inode once the
    /// device can take requests (after the table is recorded if it changed).
    pub fn attach(&mut self, tag: u64, cfg: super::CachedDevConfig, backing: DevId) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        let sectors = cfg.device.size().saturating_sub(cfg.data_offset) / 512;
        let block = u64::from(cfg.device.logical_block_size().max(self.geo.block_bytes as u32)) / 512;
        if !cfg.data_offset.is_multiple_of(512) || cfg.data_offset >= cfg.device.size() {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: data offset {} lies past the device's {} bytes (or is not a whole sector)",
                    cfg.device.path().display(),
                    cfg.data_offset,
                    cfg.device.size()
                ),
            );
            return self.events.push((tag, Err(e)));
        }
        if let Some(e) = self.failed_error() {
            return self.events.push((tag, Err(e)));
        }
        if let Err(e) = cfg.writeback.validate().and_then(|_| cfg.bypass.validate()) {
            return self.events.push((tag, Err(e)));
        }
        let mut table = self.meta.latest_uuids().to_vec();
        let slot = table.iter().position(|u| u.uuid == cfg.uuid);
        if slot.is_some_and(|i| table[i].flash_only()) {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "UUID {} names a flash-only volume of this set, not a backing device",
                    uuids::uuid_string(&cfg.uuid)
                ),
            );
            return self.events.push((tag, Err(e)));
        }
        if let Err(e) = super::existing::check_attach(slot.map(|i| &table[i]), &cfg, sectors) {
            return self.events.push((tag, Err(e)));
        }
        let inode = match slot {
            Some(i) => {
                table[i].last_reg = now;
                i
            }
            None => {
                let free = table.iter().position(|u| u.uuid == [0; 16]).unwrap_or(table.len());
                let e = if cfg.no_superblock {
                    super::existing::new_entry(&cfg, sectors, now)
                } else {
                    UuidEntry { uuid: cfg.uuid, label: cfg.label, first_reg: now, last_reg: now, ..Default::default() }
                };
                if free == table.len() {
                    if table.len() >= uuids::capacity(self.geo.bucket_bytes).min(crate::index::KEY_INODE_MAX as usize) {
                        let e = Error::new(ErrorKind::NoSpace, "the UUID table is full");
                        return self.events.push((tag, Err(e)));
                    }
                    table.push(e);
                } else {
                    table[free] = e;
                }
                free
            }
        };
        if self.devs.len() <= inode {
            self.devs.resize_with(inode + 1, || None);
        }
        if self.devs[inode].is_some() {
            let e = Error::new(ErrorKind::Busy, format!("cached device {inode} is already attached"));
            return self.events.push((tag, Err(e)));
        }
        let d = super::device::CachedDev::new(inode as u32, backing, cfg.data_offset, sectors, block, cfg.mode);
        self.devs[inode] = Some(super::device::CachedDev {
            wb: super::writeback::Writeback::new(cfg.writeback.clone()),
            bypass: super::bypass::Bypass::new(cfg.bypass.clone()),
            ..d
        });
        // Until the table is recorded the device is attached but, being new, has nothing
        // cached; requests are served all the same.
        self.uuid_write(table, Some((tag, inode as u32)));
    }

    /// The UUID table recording an attach is durable.
    pub(crate) fn uuid_event_done(&mut self, tag: u64, inode: u32) {
        self.detach_recorded(inode);
        self.events.push((tag, Ok(inode)));
    }

    /// Detaches cached device `inode` from the engine (its requests must have completed);
    /// its entry and cached data stay for the next attach.
    pub fn detach(&mut self, inode: u32) -> Result<DevId> {
        if let Ok(d) = self.dev(inode) {
            if matches!(d.detach, Some(super::detach::Detach::WritingBack { .. } | super::detach::Detach::Recording)) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("cached device {inode} is detaching from the set (cancel that, or wait for it)"),
                ));
            }
        }
        if self.reqs.in_flight_for(inode) || self.writeback_busy_for(inode) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("cached device {inode} has requests or writeback in flight (pause writeback, then retry)"),
            ));
        }
        let d = self.devs.get_mut(inode as usize).and_then(Option::take).ok_or_else(|| super::no_device(inode))?;
        Ok(d.backing)
    }
}

fn read_uuids(st: &mut dyn Storage, geo: &Geometry, p: &MetaPtr) -> Result<Vec<UuidEntry>> {
    let base = p.bucket * geo.bucket_bytes as u64;
    let mut buf = vec![0u8; uuids::header_len(geo.block_bytes)];
    st.read(base, &mut buf)?;
    let need = (uuids::UUID_ENTRY_BYTES * (1 + uuids::announced(&buf))).div_ceil(geo.block_bytes) * geo.block_bytes;
    if need > buf.len() && need <= geo.bucket_bytes {
        buf.resize(need, 0);
        st.read(base, &mut buf)?;
    }
    uuids::decode(&buf, geo.set_magic, p.seq, p.bucket)
}
