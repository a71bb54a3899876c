//! Writes (bcache's `cached_dev_write`), by the path the cache mode chooses:
//! - writeback: to newly allocated cache space, the keys dirty (dirty data the write lands
//!   on is replaced, as bcache does); a write waits for space rather than fail. When too
//!   much of the cache is dirty or metadata (bcache's `CUTOFF_WRITEBACK`,
//!   `CUTOFF_WRITEBACK_SYNC`) it goes writethrough instead;
//! - writethrough: to the backing device and to the cache, complete when both are; the
//!   cache takes what space it has now and drops the rest of the range;
//! - writearound (and mode `none`): to the backing device only; the cache drops the range.
//!
//! Whatever the path, the parts of a write that land on dirty data go to the cache: a copy
//! on the backing device alone would be overwritten by a later writeback of the old data.
//! Outside writeback (the mode was switched, or the cache is past the cutoffs) they are
//! written in place, over that data: that needs no space, so a cache full of dirty data
//! never holds a write up. The key stays as it is; nothing is journalled for those parts.
//!
//! Keys enter the index when every part of the write has completed, and the journal
//! records them (or the range dropped). A FUA write completes once that entry is durable
//! (and, if it wrote in place, once every key before it is, the dirty key it wrote into
//! among them).

use super::{split, Buf, CacheSet, Part};
use crate::alloc::{DataWrite, SectorAlloc};
use crate::cache_set::{CacheMode, CrcCuts};
use crate::error::{Error, ErrorKind};
use crate::index::{FragmentKind, Key, KEY_SIZE_MAX};
use crate::io::{IoCompletion, IoRequest};

/// How the part of a write that is not over dirty data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Undecided,
    Writeback,
    Writethrough,
    Around,
}

/// Cache space a write allocated for `sectors` from `sector`, and whether its write failed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub sector: u64,
    pub alloc: SectorAlloc,
    pub failed: bool,
    /// The data's checksum, with `data_csum`.
    pub crc: Option<u64>,
}

impl CacheSet {
    pub(crate) fn write_start(&mut self, slot: u32) {
        if let Some(e) = self.failed_error() {
            self.req_error(slot, e);
            return self.complete_request(slot);
        }
        let r = self.reqs.get(slot);
        let (inode, sector, sectors) = (r.inode, r.offset / 512, r.len / 512);
        let bypass = self.bypass_check(inode, true, sector, sectors);
        self.reqs.get(slot).bypass = bypass;
        self.write_decide(slot, true);
    }

    /// Chooses the write's path and sends what can go now. In writeback, with the cache
    /// below the cutoffs (and `copy` allowed), the whole write goes to new cache space,
    /// dirty data it overwrites included, as bcache does. Otherwise the parts over dirty data
    /// are written in place and the rest follows the mode (writethrough or around).
    fn write_decide(&mut self, slot: u32, copy: bool) {
        let r = self.reqs.get(slot);
        let (inode, sector, sectors, fua, bypass) = (r.inode, r.offset / 512, r.len / 512, r.fua, r.bypass);
        let dev = self.dev(inode).expect("request for an attached device");
        let flash = dev.flash;
        // A bypassed write goes around the cache, whatever the mode.
        let mode = match dev.mode {
            _ if bypass => CacheMode::Writearound,
            m => m,
        };
        let mut frags = std::mem::take(&mut self.reqs.frags);
        if let Err(e) = self.index.lookup(inode, sector, sectors, &self.alloc, &mut frags) {
            self.reqs.frags = frags;
            self.req_error(slot, e);
            return self.complete_request(slot);
        }
        // A flash-only volume's data has nowhere else to go: always to new cache space.
        let writeback = flash
            || mode == CacheMode::Writeback
                && copy
                && (self.should_writeback(fua) || self.stripe_dirty(inode, sector, sectors));
        let mut in_place = Vec::new();
        let mut rest: Vec<(u64, u64)> = Vec::new();
        for f in &frags {
            match f.kind {
                FragmentKind::Hit { ptr, offset, dirty: true } if !writeback => {
                    in_place.push((f.start, f.len, ptr, offset))
                }
                _ => match rest.last_mut() {
                    Some((s, l)) if *s + *l == f.start => *l += f.len,
                    _ => rest.push((f.start, f.len)),
                },
            }
        }
        self.reqs.frags = frags;
        if !in_place.is_empty() {
            self.stats.dirty_overlaps += 1;
        }
        let path = match mode {
            _ if rest.is_empty() => Path::Around,
            _ if writeback => Path::Writeback,
            CacheMode::Writeback => {
                self.stats.writeback_cutoffs += 1;
                Path::Writethrough
            }
            CacheMode::Writethrough => Path::Writethrough,
            CacheMode::Writearound | CacheMode::None => Path::Around,
        };
        let r = self.reqs.get(slot);
        r.path = path;
        r.rest = rest;
        r.in_place = !in_place.is_empty();
        // An extent's checksum no longer holds once its data changes in place: it is dropped,
        // durably, before the write goes (after a crash the data may be either). Also with
        // `data_csum` off now: the extent may have been written while it was on.
        let mut gate = 0;
        if !in_place.is_empty() {
            let mut keys = Vec::new();
            for &(s, len, ..) in &in_place {
                self.index.clear_crc(inode, s, len, &mut keys);
            }
            for k in keys {
                gate = self.journal_add(k);
            }
            // An extent whose checksum a cut dropped (the rest of it after a write, a
            // discard or a move over part of it) still has it in the journal until the
            // entry recording the cut is durable: that entry too, before writing in place.
            // The cut's key went into the journal right after the cut, so the entries open
            // when a new drop is first seen cover it.
            let dropped = self.index.crcs_dropped();
            if dropped != self.crc_cuts.seen {
                self.crc_cuts = CrcCuts { seen: dropped, seq: self.journal_covering() };
            }
            gate = gate.max(self.crc_cuts.seq);
        }
        if gate > self.journal.durable {
            self.reqs.get(slot).in_place_gated = in_place;
            self.add_wait(slot);
            self.journal_wait(gate, super::super::journal::Waiter::InPlace(slot));
        } else {
            self.write_in_place(slot, in_place);
        }
        match path {
            Path::Writeback => {
                if self.write_alloc(slot, true) {
                    self.write_issue(slot);
                }
            }
            Path::Writethrough => {
                self.write_alloc(slot, false);
                self.write_issue(slot);
            }
            _ => self.write_issue(slot),
        }
    }

    /// Writes the parts of a write over dirty data in place.
    fn write_in_place(&mut self, slot: u32, parts: Vec<(u64, u64, crate::index::Ptr, u64)>) {
        let cache = self.cache;
        let bits = self.geo.bucket_bits;
        let r = self.reqs.get(slot);
        let (sector, fua) = (r.offset / 512, r.fua);
        for (s, len, ptr, offset) in parts {
            let bucket = ptr.bucket(bits);
            if let Err(e) = self.alloc.pin(ptr.dev(), bucket) {
                self.req_error(slot, e);
                continue;
            }
            let at = ((s - sector) * 512) as usize;
            let win = self.reqs.get(slot).buf.window(at, (len * 512) as usize, 512);
            let dev_at = (ptr.offset() + offset) * 512;
            self.issue(slot, Part::InPlace { bucket }, |tag| {
                if fua {
                    IoRequest::write_fua(cache, dev_at, win, tag)
                } else {
                    IoRequest::write(cache, dev_at, win, tag)
                }
            });
        }
    }

    /// The entry dropping the checksums is durable: the parts in place go.
    pub(crate) fn write_in_place_go(&mut self, slot: u32) {
        let parts = std::mem::take(&mut self.reqs.get(slot).in_place_gated);
        self.write_in_place(slot, parts);
        self.req_wait_done(slot);
    }

    /// Allocates cache space for what is left of the write's `rest`. With `wait`, a write
    /// that finds no space waits for the allocator and returns false; without, it takes
    /// what there is.
    fn write_alloc(&mut self, slot: u32, wait: bool) -> bool {
        let inode = self.reqs.get(slot).inode;
        let block = self.dev(inode).expect("attached").block_sectors.max(u64::from(self.geo.sb.block_size));
        let max = KEY_SIZE_MAX / block * block;
        let mut total = 0;
        loop {
            let r = self.reqs.get(slot);
            // The first sector of the rest not yet given space.
            let covered: u64 = r.pieces.iter().map(|p| u64::from(p.alloc.sectors)).sum();
            let mut skip = covered;
            let mut next = None;
            for &(s, l) in &r.rest {
                if skip < l {
                    next = Some((s + skip, l - skip));
                    break;
                }
                skip -= l;
            }
            let Some((s, l)) = next else { break };
            let w = DataWrite {
                inode: u64::from(inode),
                offset: s,
                sectors: l.min(max) as u32,
                write_point: u64::from(inode),
                flash_only: false,
                moving_gc: false,
                hot: false,
            };
            match self.alloc_sectors(&w) {
                Ok(a) => {
                    total += u64::from(a.sectors);
                    self.reqs.get(slot).pieces.push(Piece { sector: s, alloc: a, failed: false, crc: None });
                }
                Err(_) => {
                    self.gc_count_sectors(total);
                    self.space_wanted();
                    if wait {
                        self.stats.space_waits += 1;
                        self.space.waiters.push_back(slot);
                        let (runs, flash) = (self.stats.gc_runs, self.dev(inode).is_ok_and(|d| d.flash));
                        let r = self.reqs.get(slot);
                        r.waiting_space = true;
                        if flash && r.gc_runs_at_wait.is_none() {
                            // Whether the set is full is known after a GC pass (discards
                            // since the last one may have freed space).
                            self.reqs.get(slot).gc_runs_at_wait = Some(runs);
                            self.gc_wanted();
                        }
                    }
                    return false;
                }
            }
        }
        self.gc_count_sectors(total);
        true
    }

    /// A write that waited for space tries again: the allocator may have space now, or the
    /// cache may have become too full for writeback: then the space it took is given back
    /// and it goes the other way (in place over dirty data, writethrough for the rest).
    pub(crate) fn write_retry_space(&mut self, slot: u32) -> bool {
        self.reqs.get(slot).waiting_space = false;
        let r = self.reqs.get(slot);
        let (fua, inode, r_sector, r_sectors) = (r.fua, r.inode, r.offset / 512, r.len / 512);
        if self.dev(inode).is_ok_and(|d| d.flash) {
            let counted = self.reqs.get(slot).gc_runs_at_wait.is_some_and(|g| self.stats.gc_runs > g);
            if counted && self.space.in_use >= crate::cache_set::CUTOFF_CACHE_ADD {
                // Full of data that cannot be written back: the volume takes no more.
                let e = Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "the cache set is {}% full: flash-only volume {inode} cannot take more data",
                        self.space.in_use
                    ),
                );
                return self.write_give_up(slot, e);
            }
        } else if !self.should_writeback(fua) && !self.stripe_dirty(inode, r_sector, r_sectors) {
            let ptrs: Vec<_> = std::mem::take(&mut self.reqs.get(slot).pieces).iter().map(|p| p.alloc.ptr).collect();
            let _ = self.alloc.put_ptrs(&ptrs);
            self.write_decide(slot, false);
            return true;
        }
        if self.write_alloc(slot, true) {
            self.write_issue(slot);
            true
        } else {
            false
        }
    }

    /// Ends a write that waited for space and cannot have it: the space it took goes back.
    fn write_give_up(&mut self, slot: u32, e: Error) -> bool {
        let r = self.reqs.get(slot);
        r.committed = true;
        let ptrs: Vec<_> = std::mem::take(&mut r.pieces).iter().map(|p| p.alloc.ptr).collect();
        let _ = self.alloc.put_ptrs(&ptrs);
        self.req_error(slot, e);
        self.maybe_finish(slot);
        true
    }

    /// Sends the write's I/O for its `rest`: the cache pieces and, unless writeback, the
    /// backing write (of the whole range: in-place parts included, which is harmless).
    fn write_issue(&mut self, slot: u32) {
        let cache = self.cache;
        let r = self.reqs.get(slot);
        let (inode, offset, len, fua, path, in_place) = (r.inode, r.offset, r.len, r.fua, r.path, r.in_place);
        let npieces = r.pieces.len();
        let whole_piece = npieces == 1 && u64::from(r.pieces[0].alloc.sectors) * 512 == len;
        let dev = self.dev(inode).expect("attached");
        let (backing, data_offset) = (dev.backing, dev.data_offset);
        if path == Path::Writeback && whole_piece && !in_place {
            // The common case: one piece takes the whole buffer, no windows.
            let r = self.reqs.get(slot);
            let Buf::Whole(buf) = std::mem::replace(&mut r.buf, Buf::Away) else { unreachable!("buffer at hand") };
            if self.opts.data_csum {
                r.pieces[0].crc = Some(Key::data_crc(&buf));
            }
            let at = r.pieces[0].alloc.ptr.offset() * 512;
            self.issue(slot, Part::CacheWrite { piece: 0 }, |tag| IoRequest::write(cache, at, buf, tag));
            return;
        }
        if path == Path::Writethrough || path == Path::Around && !self.reqs.get(slot).rest.is_empty() {
            let win = self.reqs.get(slot).buf.window(0, len as usize, 512);
            let off = data_offset + offset;
            self.issue(slot, Part::BackingWrite, |tag| {
                if fua {
                    IoRequest::write_fua(backing, off, win, tag)
                } else {
                    IoRequest::write(backing, off, win, tag)
                }
            });
        }
        let start = offset / 512;
        for i in 0..npieces {
            let r = self.reqs.get(slot);
            let p = r.pieces[i];
            let n = p.alloc.sectors as usize * 512;
            let win = r.buf.window(((p.sector - start) * 512) as usize, n, 512);
            if self.opts.data_csum {
                r.pieces[i].crc = Some(Key::data_crc(&win));
            }
            let dev_at = p.alloc.ptr.offset() * 512;
            self.issue(slot, Part::CacheWrite { piece: i }, |tag| IoRequest::write(cache, dev_at, win, tag));
        }
        self.maybe_finish(slot);
    }

    pub(crate) fn write_part_done(&mut self, slot: u32, part: usize, c: IoCompletion) {
        let (result, buf) = split(c);
        let r = self.reqs.get(slot);
        if matches!(r.buf, Buf::Away) {
            r.buf = Buf::Whole(buf.expect("a write gives its buffer back"));
        }
        match std::mem::replace(&mut r.parts[part], Part::Journal) {
            Part::CacheWrite { piece } => {
                self.cache_unflushed = true;
                let started = r.started;
                self.congestion_sample(true, started);
                if let Err(e) = result {
                    self.stats.cache_io_errors += 1;
                    let r = self.reqs.get(slot);
                    r.pieces[piece].failed = true;
                    if r.path == Path::Writeback {
                        self.req_error(slot, e);
                    }
                }
            }
            Part::InPlace { bucket } => {
                self.cache_unflushed = true;
                let started = r.started;
                self.congestion_sample(true, started);
                let _ = self.alloc.unpin(0, bucket);
                if let Err(e) = result {
                    // The dirty data there may be torn: the cache held the only copy.
                    self.stats.cache_io_errors += 1;
                    self.req_error(slot, e);
                }
            }
            Part::BackingWrite => match result {
                Ok(_) => {
                    let (inode, fua) = (r.inode, r.fua);
                    if !fua {
                        if let Ok(d) = self.dev_mut(inode) {
                            d.backing_unflushed = true;
                        }
                    }
                }
                Err(e) => self.req_error(slot, e),
            },
            p => debug_assert!(false, "write part {p:?}"),
        }
        self.maybe_finish(slot);
    }

    /// Every part of the write is done: the index and the journal take its keys.
    pub(crate) fn write_commit(&mut self, slot: u32) {
        let r = self.reqs.get(slot);
        r.committed = true;
        let (inode, fua, path) = (r.inode, r.fua, r.path);
        let failed = r.error.is_some();
        let pieces = std::mem::take(&mut r.pieces);
        let rest = std::mem::take(&mut r.rest);
        let mut seq = 0;
        if let Some(e) = self.failed_error() {
            // Out of service meanwhile: nothing more is recorded; the write fails.
            self.req_error(slot, e);
        } else {
            match path {
                Path::Writeback if !failed => {
                    for p in &pieces {
                        let n = u64::from(p.alloc.sectors);
                        let key = Key::new(inode, p.sector, n, p.alloc.ptr).with_dirty(true).with_crc(p.crc);
                        match self.index.insert(&key, &mut self.alloc) {
                            Ok(_) => {
                                let _ = self.alloc.mark_dirty(p.alloc.ptr);
                                self.stats.data_bytes += n * 512;
                                seq = self.journal_add(key);
                            }
                            Err(e) => self.req_error(slot, e),
                        }
                    }
                }
                Path::Writeback => {}
                Path::Writethrough if !failed => {
                    let mut cached = Vec::new();
                    for p in pieces.iter().filter(|p| !p.failed) {
                        let n = u64::from(p.alloc.sectors);
                        let key = Key::new(inode, p.sector, n, p.alloc.ptr).with_crc(p.crc);
                        if self.index.insert(&key, &mut self.alloc).is_ok() {
                            self.stats.data_bytes += n * 512;
                            seq = self.journal_add(key);
                            cached.push((p.sector, n));
                        }
                    }
                    // What the cache did not take is dropped from it.
                    for (s, l) in subtract(&rest, &cached) {
                        seq = seq.max(self.invalidate_range(inode, s, l));
                    }
                }
                // The backing device may hold the new data in part (or, writing around, does):
                // the cache's copy of the range is dropped.
                _ => {
                    for &(s, l) in &rest {
                        seq = seq.max(self.invalidate_range(inode, s, l));
                    }
                }
            }
        }
        let ptrs: Vec<_> = pieces.iter().map(|p| p.alloc.ptr).collect();
        let _ = self.alloc.put_ptrs(&ptrs);
        if fua && self.reqs.get(slot).error.is_none() {
            // Durable with everything recorded before it: a range dropped earlier (by a
            // discard, or a write that went around) must not come back over this data after
            // a crash, and in place the key written into may still wait for its entry.
            self.wait_journal(slot, seq.max(self.journal_covering()));
        }
        self.maybe_finish(slot);
    }

    /// Drops what the cache holds for sectors `start .. start + len` of `inode` and records
    /// the drop in the journal if anything was there; returns the entry it went into (0:
    /// nothing to record).
    pub(crate) fn invalidate_range(&mut self, inode: u32, start: u64, len: u64) -> u64 {
        match self.index.invalidate(inode, start, len, &mut self.alloc) {
            Ok(0) => 0,
            Ok(_) => {
                let mut seq = 0;
                let mut s = start;
                while s < start + len {
                    let n = (start + len - s).min(KEY_SIZE_MAX);
                    seq = self.journal_add(Key::empty(inode, s, n));
                    s += n;
                }
                seq
            }
            Err(e) => {
                self.fail(Error::new(e.kind(), format!("dropping cached data: {}", e.message())));
                0
            }
        }
    }
}

/// The runs of `all` not covered by `taken` (both sorted, `taken` inside `all`).
fn subtract(all: &[(u64, u64)], taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, l) in all {
        let mut at = s;
        let end = s + l;
        for &(ts, tl) in taken.iter().filter(|(ts, tl)| *ts < end && ts + tl > s) {
            if ts > at {
                out.push((at, ts - at));
            }
            at = at.max(ts + tl);
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::subtract;

    #[test]
    fn subtract_leaves_the_gaps() {
        assert_eq!(subtract(&[(0, 16)], &[]), vec![(0, 16)]);
        assert_eq!(subtract(&[(0, 16)], &[(0, 16)]), vec![]);
        assert_eq!(subtract(&[(0, 16)], &[(0, 8)]), vec![(8, 8)]);
        assert_eq!(subtract(&[(0, 16), (24, 8)], &[(4, 4), (24, 2)]), vec![(0, 4), (8, 8), (26, 6)]);
    }
}
