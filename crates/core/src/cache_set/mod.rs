//! A cache set on one cache device: the open sequence (bcache's `run_cache_set`), the
//! metadata it keeps on the device (journal, UUID table, prios and gens, index checkpoints)
//! and a minimal writeback data path, over the synchronous [`Storage`] seam.
//!
//! Open: with `CACHE_SYNC` clear a fresh set is initialized (first GC, prio chain, empty
//! UUID table and checkpoint, first journal entry). Otherwise the journal is read, the
//! newest valid entry gives the prio chain, UUID table and checkpoint; gens are loaded, the
//! checkpoint's keys and then the journal's keys after it are inserted (stale ones drop
//! out), and a first GC recounts bucket usage. Either way `CACHE_SYNC` is set and the
//! superblock `seq` bumped.
//!
//! Ordering rules that make a crash lose nothing flushed and never resurrect stale data:
//! data is written before the journal entry holding its key, and every journal write is
//! preceded and followed by a flush; a new prio chain is committed to the allocator (its
//! batch of buckets handed out) only once a journal entry recording it is durable; an old
//! checkpoint, UUID table or journal bucket is given up only once a durable entry no longer
//! needs it.

pub mod storage;
pub mod superblock;

use std::time::{Duration, Instant};

use crate::alloc::{self, Allocator, CacheConfig, DataWrite, PtrKind, Replacement, Reserve, SetConfig, Step};
use crate::checkpoint::{self, CheckpointGeometry, Packer};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{
    BucketAccounting, BucketGens, ExtentIndex, Fragment, FragmentKind, Key, Ptr, ScanFilter, ScanPos, KEY_SIZE_MAX,
};
use crate::journal::{self, FoundEntry, Journal, JournalGeometry, Jset, MetaPtr, JSET_PRIO_SLOTS};
use crate::uuids::{self, UuidEntry};
pub use storage::{EngineStorage, MemStorage, Storage};
pub use superblock::CacheSb;

/// Tunables of an open cache set.
#[derive(Clone, Debug)]
pub struct CacheSetOptions {
    /// How long inserted keys may wait for a journal write when nobody flushes (bcache's
    /// `journal_delay_ms`).
    pub journal_delay_ms: u64,
    /// Seed of the random replacement policy.
    pub seed: u64,
}

impl Default for CacheSetOptions {
    fn default() -> Self {
        CacheSetOptions { journal_delay_ms: 100, seed: 1 }
    }
}

/// What opening the set found and did.
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
    /// Keys replayed from the journal.
    pub replayed_keys: u64,
    /// Journal entries replayed.
    pub replayed_entries: u64,
    /// Keys (from checkpoint or journal) whose pointers were all stale.
    pub stale_keys: u64,
    /// Replay stopped before this seq because it was missing (entries after it ignored).
    pub gap_at: Option<u64>,
    /// Time spent reading and decoding the journal.
    pub journal_read_time: Duration,
    /// Time spent reading and inserting the checkpoint.
    pub checkpoint_time: Duration,
    /// Time spent inserting the journal's keys.
    pub replay_time: Duration,
    /// Time spent in the initial GC.
    pub gc_time: Duration,
}

/// Counters of bytes the set wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSetStats {
    /// Data bytes written to the cache device.
    pub data_bytes: u64,
    /// Journal entry bytes.
    pub journal_bytes: u64,
    /// Checkpoint bytes.
    pub checkpoint_bytes: u64,
    /// Prio chain bytes.
    pub prio_bytes: u64,
    /// UUID table and superblock bytes.
    pub other_meta_bytes: u64,
    /// Journal entries written.
    pub journal_entries: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}

impl CacheSetStats {
    /// All metadata bytes.
    pub fn meta_bytes(&self) -> u64 {
        self.journal_bytes + self.checkpoint_bytes + self.prio_bytes + self.other_meta_bytes
    }
}

/// A piece of a read: `len` sectors from `start`, with the cached data or `None` for a hole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadExtent {
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub len: u64,
    /// The data of a hit; `None` where the cache holds nothing.
    pub data: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CheckpointRef {
    ptr: MetaPtr,
    buckets: Vec<u64>,
}

/// The allocator's gens as the index asks for them; bucket accounting is left to GC.
struct Gens<'a> {
    a: &'a Allocator,
    bits: u32,
}

impl BucketGens for Gens<'_> {
    #[inline]
    fn bucket_bits(&self) -> u32 {
        self.bits
    }
    #[inline]
    fn bucket_gen(&self, dev: u8, bucket: u64) -> Option<u8> {
        self.a.bucket(dev, bucket).ok().map(|b| b.gen)
    }
}

impl BucketAccounting for Gens<'_> {
    fn add_sectors(&mut self, _dev: u8, _bucket: u64, _sectors: i64, _dirty: bool) {}
}

/// A replayed key as [`replay_order`] sorts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReplayRec {
    /// inode (bits 96..116), start (bits 32..95), position in journal order (bits 0..32).
    sort: u128,
    end: u64,
    /// The key's words, or `[u64::MAX, word offset, 0]` for a key of other than 3 words.
    words: [u64; 3],
}

/// Each key of a run of bkeys as a record: (inode, start, position) packed for sorting, its
/// end, and its words when it is a plain one-pointer key (nearly all are), else its offset.
/// Sorting whole records keeps the insertion pass sequential in memory. A key that does not
/// decode is reported by [`ReplayRec::key`].
fn replay_records(bytes: &[u8]) -> Vec<ReplayRec> {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let nwords = bytes.len() / 8;
    let mut recs: Vec<ReplayRec> = Vec::with_capacity(nwords / 3);
    let mut w = 0;
    while w + 1 < nwords {
        let (high, end) = (word(w), word(w + 1));
        let size = (high >> 20) & 0xffff;
        let u64s = crate::index::bkey_u64s(high);
        let words = if u64s == 3 && w + 2 < nwords { [high, end, word(w + 2)] } else { [u64::MAX, w as u64, 0] };
        let pos = recs.len() as u128;
        let sort = (u128::from(high as u32 & 0xf_ffff) << 96) | (u128::from(end.saturating_sub(size)) << 32) | pos;
        recs.push(ReplayRec { sort, end, words });
        w += u64s;
    }
    recs
}

impl ReplayRec {
    /// The key, decoded from the record or from `bytes` (the run it came from).
    fn key(&self, bytes: &[u8]) -> Result<Key> {
        let r = if self.words[0] != u64::MAX {
            Key::decode_bkey(&self.words)
        } else {
            Key::read_bkey_bytes(&bytes[self.words[1] as usize * 8..]).map(|(k, n)| (k, n / 8))
        };
        r.map(|(k, _)| k).map_err(|e| Error::new(ErrorKind::Corrupt, format!("journal replay: {}", e.message())))
    }

    fn inode(&self) -> u32 {
        (self.sort >> 96) as u32
    }
    fn start(&self) -> u64 {
        (self.sort >> 32) as u64
    }
}

/// The order to insert replayed keys in. Only keys that overlap another replayed key depend
/// on journal order (the newest must win); every other key commutes with the rest, so those
/// go first in index order, which is far kinder to the tree than journal order. Leaves the
/// commuting keys in `recs`, in index order, and returns the others in journal order.
fn replay_order(recs: &mut Vec<ReplayRec>) -> Vec<ReplayRec> {
    recs.sort_unstable_by_key(|r| r.sort);
    let mut clash = vec![false; recs.len()];
    // Clusters: runs (in index order) where each key starts before the run's furthest end.
    let mut run_start = 0;
    let mut run_end = (u32::MAX, 0u64);
    for pos in 0..=recs.len() {
        let next = recs.get(pos);
        let joins = next.is_some_and(|r| r.inode() == run_end.0 && r.start() < run_end.1);
        if !joins {
            if pos - run_start >= 2 {
                clash[run_start..pos].fill(true);
            }
            run_start = pos;
            if let Some(r) = next {
                run_end = (r.inode(), r.end);
            }
        } else if let Some(r) = next {
            run_end.1 = run_end.1.max(r.end);
        }
    }
    let mut clashing = Vec::new();
    let mut i = 0;
    recs.retain(|r| {
        i += 1;
        if clash[i - 1] {
            clashing.push(*r);
        }
        !clash[i - 1]
    });
    clashing.sort_unstable_by_key(|r| r.sort as u32);
    clashing
}

fn aptr(p: Ptr) -> alloc::Ptr {
    alloc::Ptr { dev: p.dev(), gen: p.gen(), offset: p.offset() }
}

/// An open cache set with one cache device.
pub struct CacheSet<S: Storage> {
    st: S,
    sb_page: Vec<u8>,
    sb: CacheSb,
    opts: CacheSetOptions,
    alloc: Allocator,
    index: ExtentIndex,
    journal: Journal,
    bucket_bytes: usize,
    block_bytes: usize,
    bucket_bits: u32,
    set_magic: u64,
    uuids: Vec<UuidEntry>,
    uuid_ptr: Option<MetaPtr>,
    checkpoint: Option<CheckpointRef>,
    prev_checkpoint: Option<CheckpointRef>,
    prio_head: u64,
    pending: Vec<Key>,
    pending_words: usize,
    pending_since: Option<Instant>,
    in_checkpoint: bool,
    stats: CacheSetStats,
    report: OpenReport,
}

fn ctx(what: &str, e: Error) -> Error {
    Error::new(
        if e.kind() == ErrorKind::Io { ErrorKind::Io } else { ErrorKind::Corrupt },
        format!("{what}: {}", e.message()),
    )
}

impl<S: Storage> CacheSet<S> {
    /// Opens the cache set on `st` (see the module docs).
    pub fn open(mut st: S, opts: CacheSetOptions) -> Result<CacheSet<S>> {
        let mut sb_page = vec![0u8; superblock::SB_BYTES];
        st.read(superblock::SB_OFFSET, &mut sb_page)?;
        let sb = superblock::parse(&sb_page)?;
        if sb.nr_in_set != 1 || sb.nr_this_dev != 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "cache device {} of {}: only sets of one cache device are supported",
                    sb.nr_this_dev, sb.nr_in_set
                ),
            ));
        }
        if !sb.bucket_size.is_power_of_two() || sb.block_size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("bucket size {} / block size {} sectors", sb.bucket_size, sb.block_size),
            ));
        }
        if sb.journal_buckets.is_empty() || sb.journal_buckets.iter().any(|&b| b < sb.first_bucket || b >= sb.nbuckets)
        {
            return Err(Error::new(ErrorKind::InvalidArgument, "superblock: journal buckets missing or out of range"));
        }
        let replacement = match sb.replacement() {
            1 => Replacement::Fifo,
            2 => Replacement::Random,
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
                discard: false,
            }],
            seed: opts.seed,
        })?;
        let bucket_bytes = sb.bucket_size as usize * 512;
        let block_bytes = sb.block_size as usize * 512;
        let set_magic = alloc::prio::set_magic(&sb.set_uuid);
        let g = JournalGeometry { buckets: sb.journal_buckets.clone(), bucket_bytes, block_bytes, set_magic };
        let t = Instant::now();
        let found = journal::read_journal(&mut st, &g)?;
        let journal_read_time = t.elapsed();
        let journal = if sb.sync() {
            Journal::resume(g, &found)?
        } else {
            // Entries of an earlier attempt may linger: start above them so none looks newer.
            Journal::new(g, found.last().map_or(0, |e| e.jset.seq))?
        };
        let mut cs = CacheSet {
            st,
            sb_page,
            sb: sb.clone(),
            opts,
            alloc,
            index: ExtentIndex::new(),
            journal,
            bucket_bytes,
            block_bytes,
            bucket_bits: sb.bucket_size.trailing_zeros(),
            set_magic,
            uuids: Vec::new(),
            uuid_ptr: None,
            checkpoint: None,
            prev_checkpoint: None,
            prio_head: 0,
            pending: Vec::new(),
            pending_words: 0,
            pending_since: None,
            in_checkpoint: false,
            stats: CacheSetStats::default(),
            report: OpenReport { journal_read_time, ..Default::default() },
        };
        if sb.sync() {
            cs.recover(found)?;
        } else {
            cs.init_fresh()?;
        }
        superblock::mark_sync(&mut cs.sb_page)?;
        cs.st.write(superblock::SB_OFFSET, &cs.sb_page)?;
        cs.st.flush()?;
        cs.stats.other_meta_bytes += superblock::SB_BYTES as u64;
        cs.sb = superblock::parse(&cs.sb_page)?;
        Ok(cs)
    }

    fn init_fresh(&mut self) -> Result<()> {
        self.report.fresh = true;
        self.run_gc()?;
        self.write_uuids(Vec::new())?;
        self.service_alloc()?;
        if self.prio_head == 0 {
            return Err(Error::new(ErrorKind::Corrupt, "fresh set: the allocator asked for no prio write"));
        }
        self.write_checkpoint()
    }

    fn recover(&mut self, found: Vec<FoundEntry>) -> Result<()> {
        let head = found
            .last()
            .ok_or_else(|| {
                Error::new(ErrorKind::Corrupt, "journal: no valid entry, though the set has run (CACHE_SYNC)")
            })?
            .jset
            .clone();
        self.report.journal_entries = found.len();
        self.report.head_seq = head.seq;

        // Prios and gens.
        let prio_head = head.prio_bucket[0];
        let bb = self.bucket_bytes as u64;
        let st = &mut self.st;
        self.alloc
            .read_prios(0, prio_head, |b, buf| st.read(b * bb, buf))
            .map_err(|e| ctx(&format!("prio chain at bucket {prio_head} unreadable"), e))?;
        self.prio_head = prio_head;

        // UUID table.
        let up =
            head.uuid_bucket.ok_or_else(|| Error::new(ErrorKind::Corrupt, "UUID table: the journal records none"))?;
        self.uuids = self.read_uuids(&up).map_err(|e| ctx("UUID table unreadable", e))?;
        self.uuid_ptr = Some(up);

        // Checkpoint, falling back to an older one the journal still covers.
        let t = Instant::now();
        let mut tried = Vec::new();
        let mut loaded = None;
        let mut first_err = None;
        let candidates = std::iter::once(head.checkpoint).chain(found.iter().rev().map(|e| e.jset.checkpoint));
        for c in candidates {
            let Some(c) = c else { continue };
            if tried.contains(&c) || c.seq + 1 < head.last_seq {
                continue;
            }
            tried.push(c);
            match self.read_checkpoint(&c) {
                Ok(l) => {
                    loaded = Some((c, l));
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((cptr, l)) = loaded else {
            let e = first_err.unwrap_or_else(|| Error::new(ErrorKind::Corrupt, "the journal records none"));
            return Err(ctx("index checkpoint unreadable", e));
        };
        self.report.checkpoint_fallback = Some(cptr) != head.checkpoint;
        self.report.checkpoint_seq = cptr.seq;
        self.report.checkpoint_keys = l.keys.len() as u64;
        let mut gens = Gens { a: &self.alloc, bits: self.bucket_bits };
        for k in &l.keys {
            if !self.index.insert(k, &mut gens)? {
                self.report.stale_keys += 1;
            }
        }
        self.checkpoint = Some(CheckpointRef { ptr: cptr, buckets: l.buckets });
        self.report.checkpoint_time = t.elapsed();
        let t = Instant::now();

        // Journal replay after the checkpoint, up to the first gap.
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
            if !self.index.insert(&k, &mut gens)? {
                self.report.stale_keys += 1;
            }
        }
        self.report.replay_time = t.elapsed();
        // The initial GC: bucket usage from the index as replayed.
        let t = Instant::now();
        self.run_gc()?;
        self.report.gc_time = t.elapsed();
        if self.report.gap_at.is_some() || self.report.checkpoint_fallback {
            // Entries after a gap, or a damaged checkpoint, must not be needed again: what was
            // recovered becomes the checkpoint new entries replay on.
            self.write_checkpoint()?;
        }
        Ok(())
    }

    fn read_uuids(&mut self, p: &MetaPtr) -> Result<Vec<UuidEntry>> {
        let base = p.bucket * self.bucket_bytes as u64;
        let mut buf = vec![0u8; uuids::header_len(self.block_bytes)];
        self.st.read(base, &mut buf)?;
        let need =
            (uuids::UUID_ENTRY_BYTES * (1 + uuids::announced(&buf))).div_ceil(self.block_bytes) * self.block_bytes;
        if need > buf.len() && need <= self.bucket_bytes {
            buf.resize(need, 0);
            self.st.read(base, &mut buf)?;
        }
        uuids::decode(&buf, self.set_magic, p.seq, p.bucket)
    }

    fn read_checkpoint(&mut self, p: &MetaPtr) -> Result<checkpoint::Loaded> {
        let g = self.checkpoint_geometry();
        checkpoint::read(&mut self.st, &g, p.bucket, p.seq, self.sb.nbuckets)
    }

    fn checkpoint_geometry(&self) -> CheckpointGeometry {
        CheckpointGeometry { bucket_bytes: self.bucket_bytes, block_bytes: self.block_bytes, set_magic: self.set_magic }
    }

    /// What opening found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Bytes written so far, by kind.
    pub fn stats(&self) -> CacheSetStats {
        let mut s = self.stats;
        s.journal_bytes = self.journal.bytes_written();
        s
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> &CacheSb {
        &self.sb
    }

    /// The allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// The UUID table.
    pub fn uuids(&self) -> &[UuidEntry] {
        &self.uuids
    }

    /// The storage underneath.
    pub fn storage(&mut self) -> &mut S {
        &mut self.st
    }

    /// Seq of the newest journal entry written.
    pub fn journal_seq(&self) -> u64 {
        self.journal.seq()
    }

    /// Where the journal records the current checkpoint, UUID table and prio chain head.
    pub fn metadata_pointers(&self) -> (Option<MetaPtr>, Option<MetaPtr>, u64) {
        (self.checkpoint.as_ref().map(|c| c.ptr), self.uuid_ptr, self.prio_head)
    }

    /// Buckets of the current checkpoint.
    pub fn checkpoint_buckets(&self) -> Vec<u64> {
        self.checkpoint.as_ref().map(|c| c.buckets.clone()).unwrap_or_default()
    }

    /// Every live key of the index, in order.
    pub fn keys(&mut self) -> Vec<Key> {
        let mut all = Vec::new();
        let mut out = Vec::new();
        let mut pos = ScanPos::default();
        loop {
            let gens = Gens { a: &self.alloc, bits: self.bucket_bits };
            let next = self.index.scan(pos, ScanFilter::All, 4096, &gens, &mut out);
            all.append(&mut out);
            match next {
                Some(p) => pos = p,
                None => return all,
            }
        }
    }

    /// Checks the index's consistency (no overlaps, counts right).
    pub fn verify_index(&self) -> std::result::Result<(), String> {
        self.index.verify()
    }

    /// Writes `data` to `sector` of `inode` in writeback mode: the data goes to the cache
    /// device, its key into the index as dirty and into the open journal entry. Durable
    /// only after [`CacheSet::flush`] (or the journal delay). `sector` and the length must
    /// be multiples of the block size.
    pub fn write(&mut self, inode: u32, sector: u64, data: &[u8]) -> Result<()> {
        let bs = self.sb.block_size as u64;
        if data.is_empty() || !data.len().is_multiple_of(self.block_bytes) || !sector.is_multiple_of(bs) {
            return Err(Error::new(
                ErrorKind::Misaligned,
                format!("write of {} bytes at sector {sector}: not whole blocks of {}", data.len(), self.block_bytes),
            ));
        }
        let sectors = (data.len() / 512) as u64;
        let max = KEY_SIZE_MAX / bs * bs;
        let mut done = 0u64;
        while done < sectors {
            let want = (sectors - done).min(max) as u32;
            let w = DataWrite {
                inode: u64::from(inode),
                offset: sector + done,
                sectors: want,
                write_point: u64::from(inode),
                flash_only: false,
                moving_gc: false,
            };
            let a = match self.alloc.alloc_sectors(&w) {
                Ok(a) => a,
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    self.service_alloc()?;
                    self.alloc.alloc_sectors(&w)?
                }
                Err(e) => return Err(e),
            };
            let bytes = &data[(done * 512) as usize..((done + u64::from(a.sectors)) * 512) as usize];
            if let Err(e) = self.st.write(a.ptr.offset * 512, bytes) {
                self.alloc.put_ptrs(&[a.ptr])?;
                return Err(e);
            }
            self.stats.data_bytes += bytes.len() as u64;
            let key =
                Key::new(inode, sector + done, u64::from(a.sectors), Ptr::new(a.ptr.dev, a.ptr.offset, a.ptr.gen)?)
                    .with_dirty(true);
            let mut gens = Gens { a: &self.alloc, bits: self.bucket_bits };
            self.index.insert(&key, &mut gens)?;
            self.alloc.mark_dirty(a.ptr)?;
            self.alloc.put_ptrs(&[a.ptr])?;
            self.pending_words += key.bkey_u64s();
            self.pending.push(key);
            self.pending_since.get_or_insert_with(Instant::now);
            done += u64::from(a.sectors);
        }
        self.service_alloc()?;
        let due = self.pending_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(self.opts.journal_delay_ms));
        if due || self.pending_words >= self.journal.geometry().max_key_words() {
            self.journal_write()?;
        }
        Ok(())
    }

    /// Reads `sectors` sectors of `inode` from `sector`: hits with their data from the cache
    /// device, holes as such.
    pub fn read(&mut self, inode: u32, sector: u64, sectors: u64) -> Result<Vec<ReadExtent>> {
        let mut frags: Vec<Fragment> = Vec::new();
        let gens = Gens { a: &self.alloc, bits: self.bucket_bits };
        self.index.lookup(inode, sector, sectors, &gens, &mut frags)?;
        let mut out = Vec::with_capacity(frags.len());
        for f in frags {
            let data = match f.kind {
                FragmentKind::Hit { ptr, offset, .. } => {
                    let mut buf = vec![0u8; (f.len * 512) as usize];
                    self.st.read((ptr.offset() + offset) * 512, &mut buf)?;
                    Some(buf)
                }
                _ => None,
            };
            out.push(ReadExtent { start: f.start, len: f.len, data });
        }
        Ok(out)
    }

    /// Writes the open journal entry if its keys have waited `journal_delay_ms`; for an
    /// engine loop to call when idle (writes check the delay themselves). Returns how long
    /// until the next entry is due, if keys are waiting.
    pub fn poll_journal(&mut self) -> Result<Option<Duration>> {
        let delay = Duration::from_millis(self.opts.journal_delay_ms);
        match self.pending_since {
            Some(t) if t.elapsed() >= delay => {
                self.journal_write()?;
                Ok(None)
            }
            Some(t) => Ok(Some(delay - t.elapsed().min(delay))),
            None => Ok(None),
        }
    }

    /// Makes every write so far durable: writes the open journal entry (data first) and
    /// returns once it is on stable storage.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return self.st.flush();
        }
        self.journal_write()
    }

    /// Replaces the UUID table: written to a new bucket, recorded by a journal entry, the
    /// old bucket given up.
    pub fn set_uuids(&mut self, entries: Vec<UuidEntry>) -> Result<()> {
        self.write_uuids(entries)
    }

    /// Closes the set cleanly: flushes, writes a final checkpoint (so the next open replays
    /// almost nothing) and hands the storage back.
    pub fn close(mut self) -> Result<S> {
        self.flush()?;
        self.alloc.close_open_buckets()?;
        self.write_checkpoint()?;
        Ok(self.st)
    }

    /// Drops the set without writing anything (as a crash would), handing the storage back.
    pub fn abandon(self) -> S {
        self.st
    }

    fn last_seq(&self) -> u64 {
        match (&self.prev_checkpoint, &self.checkpoint) {
            (Some(p), _) => p.ptr.seq + 1,
            (None, Some(c)) => c.ptr.seq + 1,
            (None, None) => self.journal.seq() + 1,
        }
    }

    /// Writes the open journal entry (or an empty one recording the current pointers), in
    /// as many entries as the keys need; then checkpoints if the journal is filling up.
    fn journal_write(&mut self) -> Result<()> {
        let max = self.journal.geometry().max_key_words();
        let mut rest = std::mem::take(&mut self.pending);
        self.pending_words = 0;
        self.pending_since = None;
        loop {
            let mut words = 0;
            let n = rest
                .iter()
                .take_while(|k| {
                    words += k.bkey_u64s();
                    words <= max
                })
                .count()
                .max(1)
                .min(rest.len());
            let keys: Vec<Key> = rest.drain(..n).collect();
            let mut prio_bucket = [0u64; JSET_PRIO_SLOTS];
            prio_bucket[0] = self.prio_head;
            let j = Jset {
                seq: self.journal.seq() + 1,
                last_seq: self.last_seq(),
                uuid_bucket: self.uuid_ptr,
                checkpoint: self.checkpoint.as_ref().map(|c| c.ptr),
                prio_bucket,
                keys,
            };
            if let Err(e) = self.journal.write(&mut self.st, &j) {
                // Keep the keys for a retry: they are in the index, not yet durable.
                let mut back = j.keys;
                back.append(&mut rest);
                self.pending_words = back.iter().map(|k| k.bkey_u64s()).sum();
                self.pending = back;
                return Err(e);
            }
            self.stats.journal_entries += 1;
            if rest.is_empty() {
                break;
            }
        }
        self.maybe_checkpoint()
    }

    /// Lets the allocator make progress: prio writes (journalled before they are
    /// committed), discards, GC.
    fn service_alloc(&mut self) -> Result<()> {
        let mut gc_done = false;
        loop {
            match self.alloc.poll(0)? {
                Step::WritePrios => self.write_prios()?,
                Step::Discard(b) => self.alloc.discard_done(0, b)?,
                Step::NeedGc if !gc_done => {
                    self.run_gc()?;
                    gc_done = true;
                }
                Step::NeedGc | Step::Idle | Step::Waiting => return Ok(()),
            }
        }
    }

    fn write_prios(&mut self) -> Result<()> {
        let w = self.alloc.prio_write_begin(0)?;
        let mut buf = vec![0u8; self.bucket_bytes];
        for (link, &b) in w.buckets.iter().enumerate() {
            let r = self
                .alloc
                .encode_prio_bucket(0, link, &mut buf)
                .and_then(|_| self.st.write(b * self.bucket_bytes as u64, &buf));
            if let Err(e) = r {
                self.alloc.prio_write_failed(0)?;
                return Err(e);
            }
            self.stats.prio_bytes += self.bucket_bytes as u64;
        }
        let old = std::mem::replace(&mut self.prio_head, w.buckets[0]);
        if let Err(e) = self.journal_write_no_checkpoint() {
            self.prio_head = old;
            self.alloc.prio_write_failed(0)?;
            return Err(e);
        }
        self.alloc.prio_write_committed(0)?;
        self.maybe_checkpoint()
    }

    fn journal_write_no_checkpoint(&mut self) -> Result<()> {
        let was = std::mem::replace(&mut self.in_checkpoint, true);
        let r = self.journal_write();
        self.in_checkpoint = was;
        r
    }

    /// Checkpoints when the entries since the newest checkpoint fill more than a quarter of
    /// the journal, or those replay would need (since the fallback checkpoint) more than half.
    fn maybe_checkpoint(&mut self) -> Result<()> {
        if self.in_checkpoint {
            return Ok(());
        }
        let j = &self.journal;
        let nr = j.nr_buckets();
        let since_newest = self.checkpoint.as_ref().map_or(nr, |c| j.buckets_in_use(c.ptr.seq + 1));
        if since_newest > (nr / 4).max(1) || j.buckets_in_use(self.last_seq()) * 2 > nr {
            self.write_checkpoint()?;
        }
        Ok(())
    }

    /// A bucket for metadata (checkpoint, UUID table), from the btree reserve if need be.
    fn alloc_meta_bucket(&mut self) -> Result<u64> {
        for _ in 0..3 {
            match self.alloc.bucket_alloc(0, Reserve::Btree) {
                Ok(b) => return Ok(b),
                Err(e) if e.kind() == ErrorKind::NoSpace => self.service_alloc()?,
                Err(e) => return Err(e),
            }
        }
        self.alloc.bucket_alloc(0, Reserve::Btree)
    }

    fn write_uuids(&mut self, entries: Vec<UuidEntry>) -> Result<()> {
        let seq = self.journal.seq() + 1;
        let buf = uuids::encode(&entries, self.set_magic, seq, self.bucket_bytes, self.block_bytes)?;
        let b = self.alloc_meta_bucket()?;
        let gen = self.alloc.bucket(0, b)?.gen;
        let r = self.st.write(b * self.bucket_bytes as u64, &buf);
        self.alloc.unpin(0, b)?;
        r?;
        self.stats.other_meta_bytes += buf.len() as u64;
        // The table's seq must be the entry that records it: nothing may journal between.
        let p = MetaPtr { seq: self.journal.seq() + 1, dev: 0, bucket: b, gen };
        if p.seq != seq {
            let buf = uuids::encode(&entries, self.set_magic, p.seq, self.bucket_bytes, self.block_bytes)?;
            self.st.write(b * self.bucket_bytes as u64, &buf)?;
        }
        let old = self.uuid_ptr.replace(p);
        self.journal_write()?;
        self.uuids = entries;
        if let Some(o) = old {
            self.alloc.bucket_free(0, o.bucket)?;
        }
        Ok(())
    }

    /// Writes every live key to a new checkpoint and records it in the journal; gives up
    /// the checkpoint that is no longer needed.
    fn write_checkpoint(&mut self) -> Result<()> {
        let was = std::mem::replace(&mut self.in_checkpoint, true);
        let r = self.write_checkpoint_inner();
        self.in_checkpoint = was;
        r
    }

    fn write_checkpoint_inner(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.journal_write()?;
        }
        let seq = self.journal.seq();
        let g = self.checkpoint_geometry();
        let mut packer = Packer::new(&g);
        let mut out = Vec::new();
        let mut pos = ScanPos::default();
        loop {
            let gens = Gens { a: &self.alloc, bits: self.bucket_bits };
            let next = self.index.scan(pos, ScanFilter::All, 4096, &gens, &mut out);
            for k in &out {
                packer.push(k)?;
            }
            match next {
                Some(p) => pos = p,
                None => break,
            }
        }
        let total = packer.total();
        let chunks = packer.finish();
        let mut buckets = Vec::with_capacity(chunks.len());
        for _ in 0..chunks.len() {
            match self.alloc_meta_bucket() {
                Ok(b) => buckets.push(b),
                Err(e) => {
                    for &b in &buckets {
                        self.alloc.unpin(0, b)?;
                        self.alloc.bucket_free(0, b)?;
                    }
                    return Err(e);
                }
            }
        }
        let gen = self.alloc.bucket(0, buckets[0])?.gen;
        let mut buf = Vec::new();
        let mut res = Ok(());
        for (i, c) in chunks.iter().enumerate() {
            let next = buckets.get(i + 1).copied().unwrap_or(0);
            res = checkpoint::encode_bucket(&g, seq, i as u32, next, total, c, &mut buf)
                .and_then(|_| self.st.write(buckets[i] * self.bucket_bytes as u64, &buf));
            if res.is_err() {
                break;
            }
            self.stats.checkpoint_bytes += buf.len() as u64;
        }
        for &b in &buckets {
            self.alloc.unpin(0, b)?;
        }
        res?;
        let new = CheckpointRef { ptr: MetaPtr { seq, dev: 0, bucket: buckets[0], gen }, buckets };
        // Keep the previous checkpoint as a fallback while the journal has room for the
        // entries since it.
        let old = self.checkpoint.take();
        let old_prev = self.prev_checkpoint.take();
        let keep =
            old.as_ref().is_some_and(|o| self.journal.buckets_in_use(o.ptr.seq + 1) * 2 <= self.journal.nr_buckets());
        let mut release: Vec<u64> = old_prev.iter().flat_map(|c| c.buckets.iter().copied()).collect();
        if keep {
            self.prev_checkpoint = old;
        } else if let Some(o) = old {
            release.extend(o.buckets);
        }
        self.checkpoint = Some(new);
        self.journal_write()?;
        self.stats.checkpoints += 1;
        for b in release {
            self.alloc.bucket_free(0, b)?;
        }
        Ok(())
    }

    /// A GC pass: every live key's pointers and every metadata bucket marked afresh.
    fn run_gc(&mut self) -> Result<()> {
        self.alloc.gc_start();
        let mut out = Vec::new();
        let mut pos = ScanPos::default();
        loop {
            let gens = Gens { a: &self.alloc, bits: self.bucket_bits };
            let next = self.index.scan(pos, ScanFilter::All, 4096, &gens, &mut out);
            for k in &out {
                let kind = if k.dirty { PtrKind::Dirty } else { PtrKind::Clean };
                for &p in k.ptrs() {
                    self.alloc.gc_mark_ptr(aptr(p), k.size as u32, kind)?;
                }
            }
            match next {
                Some(p) => pos = p,
                None => break,
            }
        }
        let mut meta: Vec<u64> = self.sb.journal_buckets.clone();
        meta.extend(self.uuid_ptr.iter().map(|p| p.bucket));
        for c in self.checkpoint.iter().chain(self.prev_checkpoint.iter()) {
            meta.extend(c.buckets.iter().copied());
        }
        for b in meta {
            self.alloc.gc_mark_metadata_bucket(0, b)?;
        }
        self.alloc.gc_finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MemBuckets, Ptr};
    use proptest::prelude::*;

    #[test]
    fn replay_records_decode_every_key_shape() {
        let p = |o: u64| Ptr::new(0, o, 1).unwrap();
        let keys = vec![
            Key::new(3, 80, 8, p(16)).with_dirty(true),
            Key::new(1, 0, 4, p(32)).with_ptr(Ptr::new(1, 64, 2).unwrap()).unwrap(),
            Key::new(2, 8, 8, p(48)).with_crc(Some(12345)),
            Key::empty(2, 100, 16),
            Key::new(1, 40, 8, p(96)),
        ];
        let mut bytes = Vec::new();
        for k in &keys {
            k.write_bkey_bytes(&mut bytes).unwrap();
        }
        let recs = replay_records(&bytes);
        let got: Vec<Key> = recs.iter().map(|r| r.key(&bytes).unwrap()).collect();
        assert_eq!(got, keys);
        assert_eq!(
            recs.iter().map(|r| (r.inode(), r.start(), r.end)).collect::<Vec<_>>(),
            keys.iter().map(|k| (k.inode, k.start, k.end())).collect::<Vec<_>>()
        );
        // A key cut short is reported, not read past.
        let recs = replay_records(&bytes[..bytes.len() - 8]);
        assert!(recs.last().unwrap().key(&bytes[..bytes.len() - 8]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Replaying in `replay_order` gives the same index as replaying in journal order.
        #[test]
        fn replay_order_matches_journal_order(ks in proptest::collection::vec((0u32..2, 0u64..64, 1u64..12), 0..40)) {
            let keys: Vec<Key> = ks.iter().enumerate().map(|(n, &(inode, start, size))| {
                Key::new(inode, start, size, Ptr::new(0, 16 * n as u64, 0).unwrap())
            }).collect();
            let mut recs: Vec<ReplayRec> = keys.iter().enumerate().map(|(i, k)| ReplayRec {
                sort: (u128::from(k.inode) << 96) | (u128::from(k.start) << 32) | i as u128,
                end: k.end(),
                words: [0; 3],
            }).collect();
            let clashing = replay_order(&mut recs);
            let a: Vec<u32> = recs.iter().map(|r| r.sort as u32).collect();
            let b: Vec<u32> = clashing.iter().map(|r| r.sort as u32).collect();
            let mut all: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..keys.len() as u32).collect::<Vec<_>>());
            let mut bk = MemBuckets::new(4, 1, 1024);
            let mut journal = ExtentIndex::new();
            for k in &keys { journal.insert(k, &mut bk).unwrap(); }
            let mut reordered = ExtentIndex::new();
            for i in a.into_iter().chain(b) { reordered.insert(&keys[i as usize], &mut bk).unwrap(); }
            let dump = |ix: &mut ExtentIndex, bk: &MemBuckets| {
                let mut out = Vec::new();
                ix.scan(ScanPos::default(), ScanFilter::All, usize::MAX, bk, &mut out);
                out
            };
            prop_assert_eq!(dump(&mut journal, &bk), dump(&mut reordered, &bk));
        }
    }
}
