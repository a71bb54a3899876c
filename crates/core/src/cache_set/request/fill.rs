//! Read-miss fills (bcache's `cached_dev_cache_miss` and its replace key): data read from
//! the backing device behind a placeholder is copied, written to the cache, and the
//! sectors still under the placeholder when the write completes take it. A write or
//! invalidation that landed meanwhile cut the placeholder; its sectors keep the newer
//! state and the fill leaves them alone (`cache_miss_collisions`). The journal records
//! exactly the sectors filled. The read itself has completed long before: a fill never
//! holds up the request that caused it, and one that finds no space is dropped.

use super::CacheSet;
use crate::alloc::{DataWrite, SectorAlloc};
use crate::cache_set::Tag;
use crate::index::{Key, Placeholder};
use crate::io::{AlignedBuf, DevId, IoCompletion, IoRequest, Slab};
use std::sync::Arc;

/// A fill in flight.
pub(crate) struct Fill {
    ph: Placeholder,
    pieces: Vec<SectorAlloc>,
    /// Each piece's checksum, with `data_csum`.
    crcs: Vec<Option<u64>>,
    ok: Vec<bool>,
    left: u32,
    /// The copy of the data, which the pieces' writes take windows of.
    _data: Arc<Slab>,
}

impl Fill {
    pub fn inode(&self) -> u32 {
        self.ph.inode
    }
}

impl CacheSet {
    /// Ends miss `ph` with `filled` sectors in the cache; a shortfall counts a collision.
    pub(crate) fn fill_finished(&mut self, ph: &Placeholder, filled: u64) {
        if self.index.finish_fill(ph, filled).collided {
            self.account(ph.inode, crate::cache_set::accounting::Event::Collision);
        }
    }

    /// Starts filling miss `ph` with `data` (the backing device's contents of its range);
    /// `hot`: data the cache held before, written with hot data.
    pub(crate) fn fill_start(&mut self, ph: Placeholder, data: &[u8], hot: bool) {
        if self.state != super::SetState::Running {
            self.fill_finished(&ph, 0);
            return;
        }
        // The cache takes space it is given now, never waits for it: clean data can always
        // be read again.
        let mut pieces = Vec::new();
        let mut done = 0u64;
        while done < ph.len {
            let w = DataWrite {
                inode: u64::from(ph.inode),
                offset: ph.start + done,
                sectors: (ph.len - done) as u32,
                write_point: u64::from(ph.inode),
                flash_only: false,
                moving_gc: false,
                hot,
            };
            match self.alloc_sectors(&w) {
                Ok(a) => {
                    done += u64::from(a.sectors);
                    pieces.push(a);
                }
                Err(_) => break,
            }
        }
        self.gc_count_sectors(done);
        if pieces.is_empty() {
            self.fill_finished(&ph, 0);
            self.space_wanted();
            return;
        }
        let mut crcs = Vec::with_capacity(pieces.len());
        let mut at = 0usize;
        for a in &pieces {
            let len = a.sectors as usize * 512;
            crcs.push(self.opts.data_csum.then(|| Key::data_crc(&data[at..at + len])));
            at += len;
        }
        let copy = self.reqs.fill_pool.copy_from(&data[..(done * 512) as usize]);
        let (slab, _, _) = copy.into_slab();
        let n = pieces.len();
        let slot =
            self.reqs.fills.insert(Fill { ph, pieces, crcs, ok: vec![false; n], left: n as u32, _data: slab.clone() });
        let f = self.reqs.fills.get(slot).expect("just inserted");
        let reqs = piece_writes(self.cache, &slab, &f.pieces, |piece| Tag::Fill { fill: slot, piece }.encode());
        for r in reqs {
            self.push_io(r);
        }
    }

    pub(crate) fn fill_done(&mut self, slot: u32, piece: u32, c: IoCompletion) {
        let Some(f) = self.reqs.fills.get_mut(slot) else {
            debug_assert!(false, "completion for fill {slot}, which is not in flight");
            return;
        };
        f.left -= 1;
        match c.result {
            Ok(_) => f.ok[piece as usize] = true,
            Err(_) => self.stats.cache_io_errors += 1,
        }
        self.cache_unflushed = true;
        if self.reqs.fills.get(slot).is_some_and(|f| f.left > 0) {
            return;
        }
        let f = self.reqs.fills.remove(slot);
        let running = self.state == super::SetState::Running;
        let mut filled = 0;
        let mut runs = Vec::new();
        let mut start = f.ph.start;
        for ((a, ok), crc) in f.pieces.iter().zip(&f.ok).zip(&f.crcs) {
            let n = u64::from(a.sectors);
            if *ok && running {
                let key = Key::new(f.ph.inode, start, n, a.ptr).with_crc(*crc);
                runs.clear();
                match self.index.fill_part(&f.ph, &key, &mut self.alloc, &mut runs) {
                    Ok(got) => {
                        filled += got;
                        self.stats.data_bytes += n * 512;
                        for &(s, len) in &runs {
                            // The index keeps the checksum only of a piece filled whole.
                            let whole = s == start && len == n;
                            let k = Key::new(f.ph.inode, s, len, a.ptr.advance(s - start)).with_crc(if whole {
                                *crc
                            } else {
                                None
                            });
                            self.journal_add(k);
                        }
                    }
                    Err(e) => debug_assert!(false, "fill of {key}: {e}"),
                }
            }
            start += n;
        }
        let ptrs: Vec<_> = f.pieces.iter().map(|a| a.ptr).collect();
        let _ = self.alloc.put_ptrs(&ptrs);
        self.fill_finished(&f.ph, filled);
        self.stats.fill_sectors += filled;
        self.close_progress();
    }
}

/// The cache writes of `data` at `pieces`: piece `i` takes the next window of the slab, and
/// the tag `tag(i)`.
pub(crate) fn piece_writes(
    cache: DevId,
    data: &Arc<Slab>,
    pieces: &[SectorAlloc],
    tag: impl Fn(u32) -> u64,
) -> Vec<IoRequest> {
    let mut at = 0usize;
    let mut reqs = Vec::with_capacity(pieces.len());
    for (i, a) in pieces.iter().enumerate() {
        let len = a.sectors as usize * 512;
        // SAFETY: the pieces are disjoint windows of the data, which only these writes read.
        let win = unsafe { AlignedBuf::in_slab_aligned(data, at, len, 512) }.expect("window inside the data");
        reqs.push(IoRequest::write(cache, a.ptr.offset() * 512, win, tag(i as u32)));
        at += len;
    }
    reqs
}
