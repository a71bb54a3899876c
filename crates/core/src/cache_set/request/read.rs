//! Reads (bcache's `cached_dev_read`): the range is split into the index's fragments;
//! hits are read from the cache with their bucket pinned until the read completes, so it
//! cannot be reused under the read; holes are read from the backing device at its data
//! offset, behind a placeholder when the miss is to fill the cache (a write that lands
//! meanwhile cuts the placeholder and the late fill becomes a no-op); ranges another miss
//! is already filling are read from the backing device. The pieces land in one buffer.
//!
//! A hit whose cache read fails is read again from the backing device if it is clean; a
//! dirty one fails the read (the cache held the only copy).
//!
//! With `data_csum`, a hit on an extent that carries a checksum is checked: the read takes
//! the whole extent (into a buffer of its own when the request wants only part of it), and
//! data that does not match counts as a failed cache read, as above; a clean extent is
//! dropped from the cache too. A dirty one stays (and keeps failing reads): dropping it
//! would serve the backing device's older data as if it were current.

use super::{split, Buf, CacheSet, Check, Part};
use crate::cache_set::accounting::Event;
use crate::error::{Error, ErrorKind};
use crate::index::{Fragment, FragmentKind, Key, Ptr, KEY_SIZE_MAX};
use crate::io::{AlignedBuf, IoCompletion, IoRequest};

impl CacheSet {
    pub(crate) fn read_start(&mut self, slot: u32) {
        let r = self.reqs.get(slot);
        let (inode, sector, sectors) = (r.inode, r.offset / 512, r.len / 512);
        let bypass = self.bypass_check(inode, false, sector, sectors);
        let dev = self.dev(inode).expect("request for an attached device");
        let (backing, data_offset, flash) = (dev.backing, dev.data_offset, dev.flash);
        let fill = !bypass && !flash && self.state == super::SetState::Running;
        // A placeholder covers at most one key's worth of whole blocks.
        let max_miss = KEY_SIZE_MAX / dev.block_sectors * dev.block_sectors;
        // Windows start on sector boundaries of the request, which are block boundaries of
        // both devices (requests and keys are whole blocks).
        let align = 512;
        let mut frags = std::mem::take(&mut self.reqs.frags);
        if let Err(e) = self.index.lookup(inode, sector, sectors, &self.alloc, &mut frags) {
            self.reqs.frags = frags;
            self.req_error(slot, e);
            return self.complete_request(slot);
        }
        // Data the cache held and evicted, read again: it was worth keeping (the
        // replacement policy's ghost record).
        let hole = frags.iter().find(|f| f.kind == FragmentKind::Hole).map(|f| f.start);
        let returning = fill && hole.is_some_and(|s| self.index.returning(inode, s));
        if returning {
            self.stats.returning_misses += 1;
        }
        // Admission: a miss may be kept out of the cache (tinylfu).
        let fill = fill && hole.is_none_or(|s| self.admit(inode, s, returning));
        let failed = self.failed_error();
        // One hit covering the whole read: the buffer goes out whole, no windows.
        if let [f] = frags.as_slice() {
            if let FragmentKind::Hit { ptr, offset, dirty } = f.kind {
                let check = self.hit_check(inode, f, ptr, offset);
                let whole = check.is_none_or(|(_, whole)| whole);
                if whole && (failed.is_none() || dirty) {
                    let bucket = ptr.bucket(self.geo.bucket_bits);
                    if self.alloc.pin(ptr.dev(), bucket).is_ok() {
                        if !self.promote_hit(inode, f.start, ptr, offset) {
                            let _ = self.alloc.touch(ptr);
                        }
                        self.reqs.frags = frags;
                        self.stats.hit_sectors += sectors;
                        self.count_read(inode, true, bypass);
                        let r = self.reqs.get(slot);
                        let Buf::Whole(buf) = std::mem::replace(&mut r.buf, Buf::Away) else {
                            unreachable!("a new read has its buffer")
                        };
                        let at = (ptr.offset() + offset) * 512;
                        let gen = ptr.gen();
                        let part = Part::CacheRead { bucket, gen, dirty, sector, check: check.map(|c| c.0) };
                        let cache = self.cache;
                        self.issue(slot, part, |tag| IoRequest::read(cache, at, buf, tag));
                        return;
                    }
                }
            }
        }
        let mut missed = false;
        for f in frags.iter() {
            let at = ((f.start - sector) * 512) as usize;
            match f.kind {
                FragmentKind::Hit { ptr, offset, dirty } if failed.is_none() || dirty => {
                    let bucket = ptr.bucket(self.geo.bucket_bits);
                    if let Err(e) = self.alloc.pin(ptr.dev(), bucket) {
                        self.req_error(slot, e);
                        continue;
                    }
                    if !self.promote_hit(inode, f.start, ptr, offset) {
                        let _ = self.alloc.touch(ptr);
                    }
                    self.stats.hit_sectors += f.len;
                    let cache = self.cache;
                    match self.hit_check(inode, f, ptr, offset) {
                        Some((check, false)) => {
                            // The fragment starts `offset` sectors into the extent at `ptr`.
                            let extent = ptr.offset() * 512;
                            let buf = self.reqs.fill_pool.get((check.size * 512) as usize);
                            let part = Part::CacheReadExtent {
                                bucket,
                                dirty,
                                sector: f.start,
                                len: f.len,
                                skip: offset,
                                at,
                                check,
                            };
                            self.issue(slot, part, |tag| IoRequest::read(cache, extent, buf, tag));
                        }
                        check => {
                            let win = self.reqs.get(slot).buf.window(at, (f.len * 512) as usize, align);
                            let dev_at = (ptr.offset() + offset) * 512;
                            let gen = ptr.gen();
                            let part =
                                Part::CacheRead { bucket, gen, dirty, sector: f.start, check: check.map(|c| c.0) };
                            self.issue(slot, part, |tag| IoRequest::read(cache, dev_at, win, tag));
                        }
                    }
                }
                FragmentKind::Hole if fill => {
                    missed = true;
                    self.stats.miss_sectors += f.len;
                    // A placeholder covers at most one key's worth.
                    let mut s = f.start;
                    while s < f.end() {
                        let n = (f.end() - s).min(max_miss);
                        let ph = self.index.insert_placeholder(inode, s, n, &self.alloc).ok();
                        let a = ((s - sector) * 512) as usize;
                        let win = self.reqs.get(slot).buf.window(a, (n * 512) as usize, align);
                        let off = data_offset + s * 512;
                        let part = Part::BackingRead { ph, hot: returning };
                        self.issue(slot, part, |tag| IoRequest::read(backing, off, win, tag));
                        s += n;
                    }
                }
                _ if flash => {
                    // A flash-only volume reads zeros where nothing was written.
                    let mut win = self.reqs.get(slot).buf.window(at, (f.len * 512) as usize, align);
                    win.fill(0);
                }
                _ => {
                    // A hole not to fill, a range another miss is filling, or (failed set)
                    // clean data: from the backing device.
                    missed = true;
                    self.stats.miss_sectors += f.len;
                    let win = self.reqs.get(slot).buf.window(at, (f.len * 512) as usize, align);
                    let off = data_offset + f.start * 512;
                    let part = Part::BackingRead { ph: None, hot: false };
                    self.issue(slot, part, |tag| IoRequest::read(backing, off, win, tag));
                }
            }
        }
        let tail_missed = fill && matches!(frags.last().map(|f| f.kind), Some(FragmentKind::Hole));
        self.reqs.frags = frags;
        if tail_missed {
            self.readahead(slot, inode, sector + sectors);
        }
        self.count_read(inode, !missed, bypass);
        self.maybe_finish(slot);
    }

    /// bcache's readahead: a miss that reaches the request's end goes on into what the
    /// cache does not hold after it, up to the device's `readahead` bytes (and its end), to
    /// fill the cache; not past `CUTOFF_CACHE_READA` (90% in use).
    fn readahead(&mut self, slot: u32, inode: u32, from: u64) {
        let dev = self.dev(inode).expect("attached");
        let block = dev.block_sectors.max(u64::from(self.geo.sb.block_size));
        let want = (dev.bypass.cfg.readahead / 512).min(dev.sectors.saturating_sub(from)).min(KEY_SIZE_MAX);
        let want = want / block * block;
        if want == 0 || self.space.in_use >= CUTOFF_CACHE_READA {
            return;
        }
        let (backing, data_offset) = (dev.backing, dev.data_offset);
        let mut frags = std::mem::take(&mut self.reqs.frags);
        let hole = match self.index.lookup(inode, from, want, &self.alloc, &mut frags) {
            Ok(()) => frags.first().filter(|f| f.kind == FragmentKind::Hole && f.start == from).map(|f| f.len),
            Err(_) => None,
        };
        self.reqs.frags = frags;
        let Some(len) = hole else { return };
        let Ok(ph) = self.index.insert_placeholder(inode, from, len, &self.alloc) else { return };
        self.account(inode, Event::Readahead);
        self.stats.readahead_sectors += len;
        let buf = self.reqs.fill_pool.get((len * 512) as usize);
        let off = data_offset + from * 512;
        self.issue(slot, Part::Readahead { ph }, |tag| IoRequest::read(backing, off, buf, tag));
    }

    /// With `data_csum`: the checksum of the extent under hit `f` (at `offset` into the
    /// extent `ptr` starts), if it has one, and whether `f` covers that extent whole.
    fn hit_check(&mut self, inode: u32, f: &Fragment, ptr: Ptr, offset: u64) -> Option<(Check, bool)> {
        if !self.opts.data_csum {
            return None;
        }
        let k = self.index.key_at(inode, f.start, &self.alloc)?;
        let crc = k.crc?;
        let start = f.start - offset;
        if k.start != start {
            return None;
        }
        Some((Check { crc, ptr, start, size: k.size }, f.start == k.start && f.len == k.size))
    }

    /// A hit's cache read failed (or its data failed its checksum): dirty data fails the
    /// request (the cache held the only copy); clean data is read again from the backing
    /// device into `buf` (the request's whole buffer when `whole`, else a window of it),
    /// which travels with the new read and comes back with it.
    fn hit_failed(&mut self, slot: u32, dirty: bool, sector: u64, e: Error, buf: AlignedBuf, whole: bool) {
        if dirty {
            if whole {
                self.reqs.get(slot).buf = Buf::Whole(buf);
            }
            let e =
                Error::new(ErrorKind::Io, format!("reading dirty data from the cache device failed: {}", e.message()));
            return self.req_error(slot, e);
        }
        self.stats.reread_from_backing += 1;
        let inode = self.reqs.get(slot).inode;
        let dev = self.dev(inode).expect("attached");
        let (off, backing) = (dev.data_offset + sector * 512, dev.backing);
        self.issue(slot, Part::BackingRead { ph: None, hot: false }, |tag| IoRequest::read(backing, off, buf, tag));
    }

    /// A hit's data did not match its checksum: counted, and a clean extent still in the
    /// index as it was read is dropped (the backing device has its data).
    fn csum_mismatch(&mut self, inode: u32, check: &Check) {
        self.stats.csum_errors += 1;
        if let Some(k) = self.index.key_at(inode, check.start, &self.alloc) {
            if k.start == check.start && !k.dirty && k.ptrs().contains(&check.ptr) {
                self.invalidate_range(inode, k.start, k.size);
            }
        }
    }

    /// bcache's `bch_mark_cache_accounting`.
    fn count_read(&mut self, inode: u32, hit: bool, bypass: bool) {
        self.account(inode, super::super::accounting::Event::Read { hit, bypass });
        let s = &mut self.stats;
        match (hit, bypass) {
            (true, false) => s.cache_hits += 1,
            (false, false) => s.cache_misses += 1,
            (true, true) => s.cache_bypass_hits += 1,
            (false, true) => s.cache_bypass_misses += 1,
        }
    }

    pub(crate) fn read_part_done(&mut self, slot: u32, part: usize, c: IoCompletion) {
        let (result, buf) = split(c);
        let buf = buf.expect("a read gives its buffer back");
        let r = self.reqs.get(slot);
        let whole = matches!(r.buf, Buf::Away);
        match std::mem::replace(&mut r.parts[part], Part::Journal) {
            Part::CacheRead { bucket, gen, dirty, sector, check } => {
                // bcache's `cache_read_races`: the bucket was reused under the read. The pin
                // taken for the read prevents it; the check stays, as a read of a reused
                // bucket would return another extent's data.
                let raced = self.alloc.bucket(0, bucket).is_ok_and(|b| b.gen != gen);
                let _ = self.alloc.unpin(0, bucket);
                if raced {
                    self.stats.cache_read_races += 1;
                }
                let started = self.reqs.get(slot).started;
                self.congestion_sample(false, started);
                let result = match (result, check) {
                    (Ok(_), _) if raced => {
                        Err(Error::new(ErrorKind::Io, "the cache bucket was reused during the read"))
                    }
                    (Ok(_), Some(c)) if Key::data_crc(&buf) != c.crc => {
                        let inode = self.reqs.get(slot).inode;
                        self.csum_mismatch(inode, &c);
                        Err(csum_error(sector))
                    }
                    (r, _) => r,
                };
                match result {
                    Ok(_) => {
                        if whole {
                            self.reqs.get(slot).buf = Buf::Whole(buf);
                        }
                    }
                    Err(e) => {
                        self.stats.cache_io_errors += 1;
                        self.hit_failed(slot, dirty, sector, e, buf, whole);
                    }
                }
            }
            Part::CacheReadExtent { bucket, dirty, sector, len, skip, at, check } => {
                let _ = self.alloc.unpin(0, bucket);
                let started = self.reqs.get(slot).started;
                self.congestion_sample(false, started);
                let inode = self.reqs.get(slot).inode;
                let n = (len * 512) as usize;
                let win = self.reqs.get(slot).buf.window(at, n, 512);
                let err = match result {
                    Err(e) => {
                        self.stats.cache_io_errors += 1;
                        Some(e)
                    }
                    Ok(_) if Key::data_crc(&buf) != check.crc => {
                        self.csum_mismatch(inode, &check);
                        Some(csum_error(sector))
                    }
                    Ok(_) => None,
                };
                match err {
                    None => {
                        let mut win = win;
                        let from = (skip * 512) as usize;
                        win.copy_from_slice(&buf[from..from + n]);
                    }
                    Some(e) => self.hit_failed(slot, dirty, sector, e, win, false),
                }
            }
            Part::Readahead { ph } => {
                // Only for the cache: a failure costs the request nothing.
                match result {
                    Ok(_) => self.fill_start(ph, &buf, false),
                    Err(_) => self.fill_finished(&ph, 0),
                }
            }
            Part::BackingRead { ph, hot } => {
                match result {
                    Ok(_) => {
                        if let Some(ph) = ph {
                            self.fill_start(ph, &buf, hot);
                        }
                    }
                    Err(e) => {
                        if let Some(ph) = ph {
                            self.fill_finished(&ph, 0);
                        }
                        self.req_error(slot, e);
                    }
                }
                if whole {
                    self.reqs.get(slot).buf = Buf::Whole(buf);
                }
            }
            p => debug_assert!(false, "read part {p:?}"),
        }
        self.maybe_finish(slot);
    }
}

/// Percentage of the cache in use past which reads do no readahead (bcache's
/// `CUTOFF_CACHE_READA`).
const CUTOFF_CACHE_READA: u64 = 90;

/// A hit's data did not match its checksum.
fn csum_error(sector: u64) -> Error {
    Error::new(ErrorKind::ChecksumMismatch, format!("the cache's data at sector {sector} does not match its checksum"))
}
