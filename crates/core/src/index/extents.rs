//! The extent index proper: one B+tree per inode, the operations the cache engine needs
//! (lookup, insert with overlap fix-up, invalidation, placeholders for read misses,
//! writeback's clean marking, ordered scans), lazy removal of stale keys, and bucket
//! accounting as extents come and go.

use super::btree::{Cursor, Entry, Tree, Trim, SEEK_GROUP};
use super::buckets::{BucketAccounting, BucketGens, GensOnly};
use super::key::{Fragment, FragmentKind, Key, Ptr, KEY_INODE_MAX, KEY_OFFSET_MAX, KEY_PTRS_MAX, KEY_SIZE_MAX};
use super::side::{SideEntry, SideTable};
use super::word::{self, Word, TICKET_MASK};
use crate::error::{Error, ErrorKind, Result};

/// A read miss in flight: placeholder keys stand on the parts of its range that held
/// nothing when the miss started. Hand it back to [`ExtentIndex::fill`] once the data is
/// in the cache, or to [`ExtentIndex::cancel_placeholder`] if the read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a placeholder stays in the index until it is filled or cancelled"]
pub struct Placeholder {
    /// Inode of the miss.
    pub inode: u32,
    /// First sector of the miss.
    pub start: u64,
    /// Length of the miss in sectors.
    pub len: u64,
    /// Sectors on which placeholder keys were put (the holes of the range).
    pub reserved: u64,
    ticket: u64,
}

/// One range for [`ExtentIndex::lookup_many`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupReq {
    /// Cached device or flash volume.
    pub inode: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
}

/// What a fill achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillOutcome {
    /// Sectors whose placeholder was still there and now point at the cached data.
    pub filled: u64,
    /// Some reserved sectors were overwritten or invalidated while the read was in flight;
    /// their part of the fill was dropped (bcache's `cache_miss_collisions`).
    pub collided: bool,
}

/// A position for [`ExtentIndex::scan`]: keys that end after `offset` in `inode`, then
/// every key of the inodes above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScanPos {
    /// Inode to start in.
    pub inode: u32,
    /// Sector to start after.
    pub offset: u64,
}

/// Which keys a scan returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanFilter {
    /// Every live key (GC).
    All,
    /// Dirty keys only (writeback).
    Dirty,
}

/// Counters kept by the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Fills that lost some of their range to a write or invalidation in flight.
    pub cache_miss_collisions: u64,
    /// Keys removed because every pointer was stale.
    pub stale_keys_dropped: u64,
}

struct Volume {
    inode: u32,
    tree: Tree,
    sectors: u64,
    dirty_sectors: u64,
    dirty_map: DirtyMap,
}

/// Sectors per region of a [`DirtyMap`] (1 MiB).
const DIRTY_REGION_SHIFT: u32 = 11;

/// Where a volume may hold dirty data: a bit per 1 MiB region, set by every insert of a dirty
/// key for each region the key overlaps, cleared by a dirty scan that finds no dirty extent
/// overlapping the region. A dirty extent only ever shrinks (trims, splits) or turns clean,
/// so every region it overlaps keeps its bit, and writeback's scan for dirty keys visits
/// the regions that hold some instead of every extent of the volume.
#[derive(Default)]
struct DirtyMap(Vec<u64>);

impl DirtyMap {
    fn mark(&mut self, start: u64, end: u64) {
        for r in start >> DIRTY_REGION_SHIFT..=(end - 1) >> DIRTY_REGION_SHIFT {
            let w = (r / 64) as usize;
            if w >= self.0.len() {
                self.0.resize(w + 1, 0);
            }
            self.0[w] |= 1 << (r % 64);
        }
    }

    fn clear(&mut self, r: u64) {
        if let Some(w) = self.0.get_mut((r / 64) as usize) {
            *w &= !(1 << (r % 64));
        }
    }

    /// The first region from `r` on whose bit is set.
    fn next(&self, r: u64) -> Option<u64> {
        let mut w = (r / 64) as usize;
        let mut bits = *self.0.get(w)? & (!0u64 << (r % 64));
        loop {
            if bits != 0 {
                return Some(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            bits = *self.0.get(w)?;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.0.capacity() * 8
    }
}

/// Volumes by inode, in a table indexed by the inode itself: inodes are UUID table slots,
/// small numbers, and the lookup is on every request.
#[derive(Default)]
struct Volumes(Vec<Option<Box<Volume>>>);

impl Volumes {
    #[inline]
    fn find(&self, inode: u32) -> Option<usize> {
        matches!(self.0.get(inode as usize), Some(Some(_))).then_some(inode as usize)
    }

    fn find_or_create(&mut self, inode: u32) -> usize {
        let i = inode as usize;
        if i >= self.0.len() {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i].get_or_insert_with(|| {
            Box::new(Volume { inode, tree: Tree::new(), sectors: 0, dirty_sectors: 0, dirty_map: DirtyMap::default() })
        });
        i
    }

    /// The volumes from inode `from` on, in inode order.
    fn iter_from(&self, from: u32) -> impl Iterator<Item = (usize, &Volume)> {
        self.0.iter().enumerate().skip(from as usize).filter_map(|(i, v)| Some((i, v.as_deref()?)))
    }

    fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<Option<Box<Volume>>>()
            + self
                .iter_from(0)
                .map(|(_, v)| std::mem::size_of::<Volume>() + v.tree.heap_bytes() + v.dirty_map.heap_bytes())
                .sum::<usize>()
    }
}

impl std::ops::Index<usize> for Volumes {
    type Output = Volume;
    #[inline]
    fn index(&self, i: usize) -> &Volume {
        self.0[i].as_deref().expect("extent index: volume found before")
    }
}

impl std::ops::IndexMut<usize> for Volumes {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut Volume {
        self.0[i].as_deref_mut().expect("extent index: volume found before")
    }
}

/// The extent index of a cache set: for each cached device or flash volume (inode), which
/// sector ranges are cached and where. Keys never overlap; the newest write wins.
pub struct ExtentIndex {
    vols: Volumes,
    side: SideTable,
    next_ticket: u64,
    stats: IndexStats,
    /// Scratch: stale extents met during a walk, as (volume, start, end).
    stale: Vec<(usize, u64, u64)>,
    /// Scratch: fragments for placeholder insertion.
    frags: Vec<Fragment>,
    /// The last [`ExtentIndex::lookup`] met stale extents: data the cache held and evicted.
    met_stale: bool,
    /// Where stale extents dropped started (off until given a capacity).
    ghost: super::ghost::Ghost,
}

impl Default for ExtentIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// Hears the tree's cuts: keeps bucket accounting, per-inode sector counts and the side
/// table right.
struct Trimmer<'a, B: ?Sized> {
    b: &'a mut B,
    side: &'a mut SideTable,
    sectors: &'a mut u64,
    dirty_sectors: &'a mut u64,
    released: u64,
}

impl<B: BucketGens + BucketAccounting + ?Sized> Trim for Trimmer<'_, B> {
    fn release(&mut self, e: &Entry, _skip: u64, len: u64, whole: bool) {
        let dirty = word::is_dirty(e.word);
        let bits = self.b.bucket_bits();
        match word::decode(e.word) {
            Word::Placeholder(_) => return,
            Word::Direct(p) => {
                if !self.b.ptr_stale(p) {
                    self.b.add_sectors(p.dev(), p.bucket(bits), -(len as i64), dirty);
                }
            }
            Word::Indirect(slot) => {
                for &p in self.side.get(slot).ptrs() {
                    if !self.b.ptr_stale(p) {
                        self.b.add_sectors(p.dev(), p.bucket(bits), -(len as i64), dirty);
                    }
                }
                if whole {
                    self.side.free(slot);
                }
            }
        }
        *self.sectors -= len;
        if dirty {
            *self.dirty_sectors -= len;
        }
        self.released += len;
    }

    fn keep(&mut self, e: &Entry, skip: u64, split: bool) -> u64 {
        let dirty = word::is_dirty(e.word);
        match word::decode(e.word) {
            Word::Placeholder(_) => e.word,
            Word::Direct(p) => word::direct(p.advance(skip), dirty),
            Word::Indirect(slot) => {
                // The checksum covered the extent as written, not a piece of it.
                if self.side.get_mut(slot).crc.take().is_some() {
                    self.side.crcs_dropped += 1;
                }
                let side = self.side.get_mut(slot);
                if split {
                    let mut piece = side.clone();
                    piece.advance(skip);
                    word::indirect(self.side.alloc(piece), dirty)
                } else {
                    side.advance(skip);
                    e.word
                }
            }
        }
    }
}

/// For removals that only ever meet placeholders.
struct NoBuckets;

impl BucketGens for NoBuckets {
    fn bucket_bits(&self) -> u32 {
        0
    }
    fn bucket_gen(&self, _dev: u8, _bucket: u64) -> Option<u8> {
        None
    }
}

impl BucketAccounting for NoBuckets {
    fn add_sectors(&mut self, _dev: u8, _bucket: u64, _sectors: i64, _dirty: bool) {
        debug_assert!(false, "placeholder removal must not account sectors");
    }
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Checks that `start..start + len` of `inode` is addressable; returns the end. The errors
/// are built out of line: lookups call this, and formatting them inline costs every lookup
/// instructions and stack traffic.
#[inline]
fn check_range(inode: u32, start: u64, len: u64) -> Result<u64> {
    if inode > KEY_INODE_MAX {
        return Err(inode_error(inode));
    }
    match start.checked_add(len) {
        Some(end) if end <= KEY_OFFSET_MAX => Ok(end),
        _ => Err(range_error(inode, start, len)),
    }
}

#[cold]
#[inline(never)]
fn inode_error(inode: u32) -> Error {
    invalid(format!("inode {inode} exceeds the 20-bit KEY_INODE field"))
}

#[cold]
#[inline(never)]
fn range_error(inode: u32, start: u64, len: u64) -> Error {
    Error::new(ErrorKind::OutOfRange, format!("range {start}+{len} of inode {inode} ends past sector {KEY_OFFSET_MAX}"))
}

/// bcache never lets an extent's data straddle two buckets; accounting and gen checks
/// rely on it.
fn check_in_buckets(key: &Key, bits: u32) -> Result<()> {
    if bits >= 64 {
        return Err(invalid(format!("bucket_bits {bits} is not a bucket size")));
    }
    for p in key.ptrs() {
        if p.offset() >> bits != (p.offset() + key.size - 1) >> bits {
            return Err(invalid(format!(
                "key {key}: data at {p:?} crosses a bucket boundary (buckets of {} sectors)",
                1u64 << bits
            )));
        }
    }
    Ok(())
}

fn make_word(side: &mut SideTable, ptrs: &[Ptr], crc: Option<u64>, dirty: bool) -> u64 {
    if ptrs.len() == 1 && crc.is_none() {
        word::direct(ptrs[0], dirty)
    } else {
        word::indirect(side.alloc(SideEntry::new(ptrs, crc)), dirty)
    }
}

/// The key an entry describes, or None for a placeholder.
fn entry_key(side: &SideTable, inode: u32, e: &Entry) -> Option<Key> {
    let start = e.start();
    let dirty = word::is_dirty(e.word);
    match word::decode(e.word) {
        Word::Placeholder(_) => None,
        Word::Direct(p) => Some(Key::new(inode, start, e.size as u64, p).with_dirty(dirty)),
        Word::Indirect(slot) => {
            let s = side.get(slot);
            let mut k = Key::empty(inode, start, e.size as u64).with_dirty(dirty).with_crc(s.crc);
            for &p in s.ptrs() {
                k.push_ptr(p).expect("side entries hold at most KEY_PTRS_MAX pointers");
            }
            Some(k)
        }
    }
}

/// Appends the fragments of `start..end` to `out`, walking from `c` (the first extent
/// ending after `start`); stale extents met are noted in `stale` as holes.
#[allow(clippy::too_many_arguments)]
#[inline]
fn fragments<G: BucketGens + ?Sized>(
    tree: &Tree,
    side: &mut SideTable,
    stale: &mut Vec<(usize, u64, u64)>,
    vi: usize,
    mut c: Cursor,
    start: u64,
    end: u64,
    gens: &G,
    out: &mut Vec<Fragment>,
) {
    let mut pos = start;
    while let Some(e) = tree.get(c) {
        let es = e.start();
        if es >= end {
            break;
        }
        let kind = match word::decode(e.word) {
            Word::Direct(p) if !gens.ptr_stale(p) => {
                Some(FragmentKind::Hit { ptr: p, offset: 0, dirty: word::is_dirty(e.word) })
            }
            Word::Direct(_) => None,
            Word::Placeholder(_) => Some(FragmentKind::Pending),
            Word::Indirect(slot) => {
                let s = side.get_mut(slot);
                if s.retain_live(|p| gens.ptr_stale(p)) > 0 {
                    Some(FragmentKind::Hit { ptr: s.ptrs()[0], offset: 0, dirty: word::is_dirty(e.word) })
                } else {
                    None
                }
            }
        };
        match kind {
            None => stale.push((vi, es, e.end)),
            Some(kind) => {
                let fs = es.max(start);
                if fs > pos {
                    out.push(Fragment { start: pos, len: fs - pos, kind: FragmentKind::Hole });
                }
                let fe = e.end.min(end);
                let kind = match kind {
                    FragmentKind::Hit { ptr, dirty, .. } => FragmentKind::Hit { ptr, offset: fs - es, dirty },
                    k => k,
                };
                out.push(Fragment { start: fs, len: fe - fs, kind });
                pos = fe;
            }
        }
        tree.advance(&mut c);
    }
    if pos < end {
        out.push(Fragment { start: pos, len: end - pos, kind: FragmentKind::Hole });
    }
}

/// Whether the extent an entry describes is live. Indirect entries lose their stale
/// pointers on the way (they were accounted away when their buckets were invalidated).
#[inline]
fn entry_live<G: BucketGens + ?Sized>(side: &mut SideTable, w: u64, gens: &G) -> bool {
    match word::decode(w) {
        Word::Placeholder(_) => true,
        Word::Direct(p) => !gens.ptr_stale(p),
        Word::Indirect(slot) => side.get_mut(slot).retain_live(|p| gens.ptr_stale(p)) > 0,
    }
}

/// Hands out the key of entry `e` of volume `vi` into `out` unless `out` already holds `max`
/// (then returns where the next scan starts); a stale entry is noted for removal instead.
#[allow(clippy::too_many_arguments)]
#[inline]
fn hand_out<G: BucketGens + ?Sized>(
    side: &mut SideTable,
    stale: &mut Vec<(usize, u64, u64)>,
    vi: usize,
    inode: u32,
    e: &Entry,
    max: usize,
    gens: &G,
    out: &mut Vec<Key>,
) -> Option<ScanPos> {
    if !entry_live(side, e.word, gens) {
        stale.push((vi, e.start(), e.end));
        return None;
    }
    let k = entry_key(side, inode, e)?;
    if let Some(last) = out.last().filter(|_| out.len() == max) {
        return Some(ScanPos { inode: last.inode, offset: last.end() });
    }
    out.push(k);
    None
}

/// `ExtentIndex::scan` of every key.
#[allow(clippy::too_many_arguments)]
fn scan_all<G: BucketGens + ?Sized>(
    vols: &Volumes,
    side: &mut SideTable,
    stale: &mut Vec<(usize, u64, u64)>,
    from: ScanPos,
    max: usize,
    gens: &G,
    out: &mut Vec<Key>,
) -> Option<ScanPos> {
    for (vi, vol) in vols.iter_from(from.inode) {
        let tree = &vol.tree;
        let mut c = if vol.inode == from.inode { tree.seek(from.offset) } else { tree.first() };
        while let Some(e) = tree.get(c) {
            tree.advance(&mut c);
            if let Some(next) = hand_out(side, stale, vi, vol.inode, &e, max, gens, out) {
                return Some(next);
            }
        }
    }
    None
}

/// `ExtentIndex::scan` for dirty keys: walks only the regions the volumes' dirty maps name,
/// clearing the bit of a region it walks whole without meeting a dirty extent.
#[allow(clippy::too_many_arguments)]
fn scan_dirty<G: BucketGens + ?Sized>(
    vols: &mut Volumes,
    side: &mut SideTable,
    stale: &mut Vec<(usize, u64, u64)>,
    from: ScanPos,
    max: usize,
    gens: &G,
    out: &mut Vec<Key>,
) -> Option<ScanPos> {
    for vi in from.inode as usize..vols.0.len() {
        let Some(vol) = vols.0[vi].as_deref_mut() else { continue };
        let start = if vol.inode == from.inode { from.offset } else { 0 };
        let mut pos = start;
        while let Some(r) = vol.dirty_map.next(pos >> DIRTY_REGION_SHIFT) {
            let (rs, re) = (r << DIRTY_REGION_SHIFT, (r + 1) << DIRTY_REGION_SHIFT);
            let lo = pos.max(rs);
            let tree = &vol.tree;
            let mut c = tree.seek(lo);
            let mut dirty_seen = false;
            while let Some(e) = tree.get(c) {
                if e.start() >= re {
                    break;
                }
                tree.advance(&mut c);
                if !word::is_dirty(e.word) {
                    continue;
                }
                dirty_seen = true;
                // One that began in an earlier region was handed out with it (the scan's own
                // start excepted, where an extent over it is handed out as `scan` does).
                if e.start() < lo && lo != start {
                    continue;
                }
                if let Some(next) = hand_out(side, stale, vi, vol.inode, &e, max, gens, out) {
                    return Some(next);
                }
            }
            if !dirty_seen && lo == rs {
                vol.dirty_map.clear(r);
            }
            pos = re;
        }
    }
    None
}

impl ExtentIndex {
    /// An empty index.
    pub fn new() -> ExtentIndex {
        ExtentIndex {
            vols: Volumes::default(),
            side: SideTable::default(),
            next_ticket: 1,
            stats: IndexStats::default(),
            stale: Vec::new(),
            frags: Vec::new(),
            met_stale: false,
            ghost: Default::default(),
        }
    }

    fn vol_index(&self, inode: u32) -> Option<usize> {
        self.vols.find(inode)
    }

    fn vol_or_create(&mut self, inode: u32) -> usize {
        self.vols.find_or_create(inode)
    }

    /// Keys in the index, placeholders included (stale keys not yet met are counted too).
    pub fn len(&self) -> usize {
        self.vols.iter_from(0).map(|(_, v)| v.tree.len()).sum()
    }

    /// True when the index holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sectors of `inode` the index holds data for (dirty or clean; stale keys not yet met
    /// included).
    pub fn sectors(&self, inode: u32) -> u64 {
        self.vol_index(inode).map_or(0, |i| self.vols[i].sectors)
    }

    /// Dirty sectors of `inode`: what writeback still has to copy to the backing device.
    pub fn dirty_sectors(&self, inode: u32) -> u64 {
        self.vol_index(inode).map_or(0, |i| self.vols[i].dirty_sectors)
    }

    /// Counters.
    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// How many data checksums the index has dropped because a write, discard or move cut
    /// the extent they covered (the count only grows). Until the entry recording that cut is
    /// durable, the journal still holds the extent whole with its checksum.
    pub fn crcs_dropped(&self) -> u64 {
        self.side.crcs_dropped
    }

    /// Heap bytes held by the index's own structures (an estimate from capacities; the
    /// benchmark measures with a counting allocator instead).
    pub fn heap_bytes(&self) -> usize {
        self.vols.heap_bytes() + self.side.heap_bytes()
    }

    /// The pieces of `start..start + len` of `inode`, in order, without gaps or overlaps:
    /// hits with their pointer, holes, and ranges with a read miss pending. Keys whose
    /// pointers are all stale count as holes and are removed on the way. `out` is cleared
    /// first.
    ///
    /// Inlined into the caller: the common answers take few instructions, and a call with
    /// its saved registers costs single lookups in a row a measurable share (see `btree.rs`
    /// on the reorder window); the general walk stays out of line.
    #[inline(always)]
    pub fn lookup<G: BucketGens + ?Sized>(
        &mut self,
        inode: u32,
        start: u64,
        len: u64,
        gens: &G,
        out: &mut Vec<Fragment>,
    ) -> Result<()> {
        out.clear();
        self.met_stale = false;
        if len == 0 {
            return Ok(());
        }
        let end = check_range(inode, start, len)?;
        let Some(vi) = self.vol_index(inode) else {
            out.push(Fragment { start, len, kind: FragmentKind::Hole });
            return Ok(());
        };
        let tree = &self.vols[vi].tree;
        let (c, first) = tree.seek_entry(start);
        // The two common answers, without the general walk: the first extent ending after
        // `start` begins at or after `end` (a hole), or it covers the whole range with one
        // live pointer (a hit).
        match first {
            None => {
                out.push(Fragment { start, len, kind: FragmentKind::Hole });
                return Ok(());
            }
            Some(e) if e.start() >= end => {
                out.push(Fragment { start, len, kind: FragmentKind::Hole });
                return Ok(());
            }
            Some(e) if e.start() <= start && e.end >= end => {
                if let Word::Direct(p) = word::decode(e.word) {
                    if !gens.ptr_stale(p) {
                        let kind =
                            FragmentKind::Hit { ptr: p, offset: start - e.start(), dirty: word::is_dirty(e.word) };
                        out.push(Fragment { start, len, kind });
                        return Ok(());
                    }
                }
            }
            Some(_) => {}
        }
        self.lookup_walk(vi, c, start, end, gens, out);
        Ok(())
    }

    /// The rest of `lookup`: every fragment from cursor `c` on.
    #[inline(never)]
    fn lookup_walk<G: BucketGens + ?Sized>(
        &mut self,
        vi: usize,
        c: Cursor,
        start: u64,
        end: u64,
        gens: &G,
        out: &mut Vec<Fragment>,
    ) {
        let ExtentIndex { vols, side, stale, .. } = self;
        let tree = &vols[vi].tree;
        fragments(tree, side, stale, vi, c, start, end, gens, out);
        if !self.stale.is_empty() {
            self.met_stale = true;
            self.drop_stale(gens);
        }
    }

    /// Keeps a ghost record of up to `extents` evicted extents (0: none): where the stale
    /// extents dropped (by lookups and GC) started. See [`ExtentIndex::returning`].
    pub fn set_ghost_capacity(&mut self, extents: usize) {
        self.ghost.set_capacity(extents);
    }

    /// True when a miss at `start` of `inode` reads data the cache evicted not long ago: the
    /// last lookup met (and dropped) a stale extent in its range, or the ghost record holds
    /// where it started (then forgets it).
    pub fn returning(&mut self, inode: u32, start: u64) -> bool {
        self.met_stale || self.ghost.take(inode, start)
    }

    /// [`lookup`](Self::lookup) for a batch of ranges: the same fragments, request after
    /// request, in `out`; those of `reqs[i]` are `out[bounds[i]..bounds[i + 1]]`. The
    /// searches of up to 16 requests in a row for the same inode go down the tree together,
    /// so their cache misses overlap: several times the throughput of one lookup at a time
    /// on a large index. Nothing is looked up if any request is out of range.
    pub fn lookup_many<G: BucketGens + ?Sized>(
        &mut self,
        reqs: &[LookupReq],
        gens: &G,
        out: &mut Vec<Fragment>,
        bounds: &mut Vec<usize>,
    ) -> Result<()> {
        out.clear();
        bounds.clear();
        for r in reqs.iter().filter(|r| r.len > 0) {
            check_range(r.inode, r.start, r.len)?;
        }
        bounds.push(0);
        let mut starts = [0u64; SEEK_GROUP];
        let mut cursors = [Cursor::END; SEEK_GROUP];
        let mut i = 0;
        while i < reqs.len() {
            let inode = reqs[i].inode;
            let mut j = i;
            while j < reqs.len() && j - i < SEEK_GROUP && reqs[j].inode == inode {
                starts[j - i] = reqs[j].start;
                j += 1;
            }
            let group = &reqs[i..j];
            match self.vol_index(inode) {
                None => {
                    for r in group {
                        if r.len > 0 {
                            out.push(Fragment { start: r.start, len: r.len, kind: FragmentKind::Hole });
                        }
                        bounds.push(out.len());
                    }
                }
                Some(vi) => {
                    let ExtentIndex { vols, side, stale, .. } = self;
                    let tree = &vols[vi].tree;
                    tree.seek_many(&starts[..group.len()], &mut cursors);
                    // Start loading the gens every request will check.
                    let bits = gens.bucket_bits();
                    for (r, &c) in group.iter().zip(&cursors) {
                        let mut c = c;
                        while let Some(e) = tree.get(c).filter(|e| e.start() < r.start + r.len) {
                            if let Word::Direct(p) = word::decode(e.word) {
                                gens.prefetch_gen(p.dev(), p.bucket(bits));
                            }
                            tree.advance(&mut c);
                        }
                    }
                    for (r, &c) in group.iter().zip(&cursors) {
                        if r.len > 0 {
                            fragments(tree, side, stale, vi, c, r.start, r.start + r.len, gens, out);
                        }
                        bounds.push(out.len());
                    }
                }
            }
            i = j;
        }
        if !self.stale.is_empty() {
            self.drop_stale(gens);
        }
        Ok(())
    }

    /// The whole key holding `sector` of `inode` (all pointers, checksum), if a live one
    /// does.
    pub fn key_at<G: BucketGens + ?Sized>(&mut self, inode: u32, sector: u64, gens: &G) -> Option<Key> {
        let vi = self.vol_index(inode)?;
        let tree = &self.vols[vi].tree;
        let e = tree.get(tree.seek(sector))?;
        if e.start() > sector {
            return None;
        }
        if !entry_live(&mut self.side, e.word, gens) {
            self.stale.push((vi, e.start(), e.end));
            self.drop_stale(gens);
            return None;
        }
        entry_key(&self.side, inode, &e)
    }

    /// Removes the stale extents recorded in `self.stale`.
    fn drop_stale<G: BucketGens + ?Sized>(&mut self, gens: &G) {
        let mut g = GensOnly(gens);
        let ExtentIndex { vols, side, stale, stats, ghost, .. } = self;
        // A batch of lookups may have met the same stale extent more than once.
        stale.sort_unstable();
        stale.dedup();
        for (vi, s, e) in stale.drain(..) {
            ghost.record(vols[vi].inode, s);
            let Volume { tree, sectors, dirty_sectors, .. } = &mut vols[vi];
            let mut t = Trimmer { b: &mut g, side: &mut *side, sectors, dirty_sectors, released: 0 };
            tree.replace(s, e, None, &mut t);
            stats.stale_keys_dropped += 1;
        }
    }

    /// Inserts `key`, the newest data for its range: whatever the range held before is cut
    /// away (heads and tails of older keys are kept, an older key covering it all is split
    /// in two), placeholders included, so a pending miss fill will not land there. Stale
    /// pointers of `key` are dropped; if none is left the range is only invalidated and the
    /// result is `false`. A key with no pointers invalidates its range.
    pub fn insert<B: BucketGens + BucketAccounting + ?Sized>(&mut self, key: &Key, b: &mut B) -> Result<bool> {
        key.validate()?;
        if key.size == 0 {
            return Ok(false);
        }
        let bits = b.bucket_bits();
        check_in_buckets(key, bits)?;
        let mut live = key.clone();
        live.retain_ptrs(|p| !b.ptr_stale(p));
        if live.ptrs().is_empty() {
            self.invalidate(key.inode, key.start, key.size, b)?;
            return Ok(false);
        }
        let vi = self.vol_or_create(key.inode);
        let ExtentIndex { vols, side, .. } = self;
        let w = make_word(side, live.ptrs(), live.crc, live.dirty);
        let Volume { tree, sectors, dirty_sectors, dirty_map, .. } = &mut vols[vi];
        let mut t =
            Trimmer { b: &mut *b, side, sectors: &mut *sectors, dirty_sectors: &mut *dirty_sectors, released: 0 };
        tree.replace(key.start, key.end(), Some(w), &mut t);
        *sectors += key.size;
        if key.dirty {
            *dirty_sectors += key.size;
            dirty_map.mark(key.start, key.end());
        }
        for p in live.ptrs() {
            b.add_sectors(p.dev(), p.bucket(bits), key.size as i64, key.dirty);
        }
        Ok(true)
    }

    /// Drops everything the index holds for `start..start + len` of `inode` (writearound
    /// writes, discards, detach), placeholders included. Returns the data sectors dropped.
    pub fn invalidate<B: BucketGens + BucketAccounting + ?Sized>(
        &mut self,
        inode: u32,
        start: u64,
        len: u64,
        b: &mut B,
    ) -> Result<u64> {
        if len == 0 {
            return Ok(0);
        }
        let end = check_range(inode, start, len)?;
        let Some(vi) = self.vol_index(inode) else { return Ok(0) };
        let ExtentIndex { vols, side, .. } = self;
        let Volume { tree, sectors, dirty_sectors, .. } = &mut vols[vi];
        let mut t = Trimmer { b, side, sectors, dirty_sectors, released: 0 };
        tree.replace(start, end, None, &mut t);
        Ok(t.released)
    }

    /// Starts a read miss on `start..start + len` of `inode` (at most [`KEY_SIZE_MAX`]
    /// sectors): puts placeholder keys on the parts of the range that hold nothing (not
    /// over cached data, not over another miss in flight).
    pub fn insert_placeholder<G: BucketGens + ?Sized>(
        &mut self,
        inode: u32,
        start: u64,
        len: u64,
        gens: &G,
    ) -> Result<Placeholder> {
        if len == 0 || len > KEY_SIZE_MAX {
            return Err(invalid(format!("a read miss covers 1..={KEY_SIZE_MAX} sectors, not {len}")));
        }
        check_range(inode, start, len)?;
        let mut frags = std::mem::take(&mut self.frags);
        self.lookup(inode, start, len, gens, &mut frags)?;
        let ticket = self.next_ticket;
        self.next_ticket = (ticket + 1) & TICKET_MASK;
        let w = word::placeholder(ticket);
        let vi = self.vol_or_create(inode);
        let ExtentIndex { vols, side, .. } = self;
        let Volume { tree, sectors, dirty_sectors, .. } = &mut vols[vi];
        let mut nb = NoBuckets;
        let mut t = Trimmer { b: &mut nb, side, sectors, dirty_sectors, released: 0 };
        let mut reserved = 0;
        for f in frags.iter().filter(|f| f.kind == FragmentKind::Hole) {
            tree.replace(f.start, f.end(), Some(w), &mut t);
            reserved += f.len;
        }
        self.frags = frags;
        Ok(Placeholder { inode, start, len, reserved, ticket })
    }

    /// Completes a read miss: `key` (same inode, start and size as `ph`, not dirty) says
    /// where the data read from the backing device now sits in the cache. Only the sectors
    /// still under `ph`'s placeholders take it; anything written or invalidated meanwhile
    /// is newer and stays. The miss is over afterwards ([`ExtentIndex::finish_fill`]).
    pub fn fill<B: BucketGens + BucketAccounting + ?Sized>(
        &mut self,
        ph: &Placeholder,
        key: &Key,
        b: &mut B,
    ) -> Result<FillOutcome> {
        if key.inode != ph.inode || key.start != ph.start || key.size != ph.len {
            return Err(invalid(format!(
                "fill key {key} does not match the miss {}:{}+{}",
                ph.inode, ph.start, ph.len
            )));
        }
        let mut runs = Vec::new();
        let filled = self.fill_part(ph, key, b, &mut runs)?;
        Ok(self.finish_fill(ph, filled))
    }

    /// Fills the part of miss `ph` that `key` covers (a clean key inside the miss's range,
    /// for data that came back in pieces): the sectors of that part still under `ph`'s
    /// placeholders take the data. Appends to `runs` each `(start, len)` that took it, in
    /// order: exactly what the index now holds from this key, which is what the journal
    /// must record (the rest was overwritten meanwhile, and replaying it would bring old
    /// data back over newer). Returns the sectors filled.
    pub fn fill_part<B: BucketGens + BucketAccounting + ?Sized>(
        &mut self,
        ph: &Placeholder,
        key: &Key,
        b: &mut B,
        runs: &mut Vec<(u64, u64)>,
    ) -> Result<u64> {
        key.validate()?;
        if key.inode != ph.inode || key.start < ph.start || key.end() > ph.start + ph.len || key.dirty {
            return Err(invalid(format!(
                "fill key {key} is not a clean part of the miss {}:{}+{}",
                ph.inode, ph.start, ph.len
            )));
        }
        if key.ptrs().is_empty() {
            return Err(invalid(format!("fill key {key} has no pointer")));
        }
        let bits = b.bucket_bits();
        check_in_buckets(key, bits)?;
        let mut live = key.clone();
        live.retain_ptrs(|p| !b.ptr_stale(p));
        if live.ptrs().is_empty() {
            // The cache copy is gone already; the range just stays uncached.
            return Ok(0);
        }
        let mut filled = 0;
        if let Some(vi) = self.vol_index(ph.inode) {
            let ExtentIndex { vols, side, .. } = self;
            let Volume { tree, sectors, .. } = &mut vols[vi];
            let pw = word::placeholder(ph.ticket);
            let end = key.end();
            // Placeholders are cut to the holes of the miss; a key part may start inside one.
            let mut c = tree.seek(key.start);
            while let Some(e) = tree.get(c) {
                let es = e.start();
                if es >= end {
                    break;
                }
                if e.word != pw {
                    tree.advance(&mut c);
                    continue;
                }
                // The piece of this placeholder that the key covers.
                let (ps, pe) = (es.max(key.start), e.end.min(end));
                if ps != es || pe != e.end {
                    // Cut the placeholder so the piece is an entry of its own, then look again.
                    let mut nb = NoBuckets;
                    let (mut dirty_none, mut sect_none) = (0u64, 0u64);
                    let mut t = Trimmer {
                        b: &mut nb,
                        side: &mut *side,
                        sectors: &mut sect_none,
                        dirty_sectors: &mut dirty_none,
                        released: 0,
                    };
                    tree.replace(ps, pe, Some(pw), &mut t);
                    c = tree.seek(ps);
                    continue;
                }
                let n = e.size as u64;
                let skip = es - key.start;
                let mut ptrs = [live.ptrs()[0]; KEY_PTRS_MAX];
                for (d, p) in ptrs.iter_mut().zip(live.ptrs()) {
                    *d = p.advance(skip);
                }
                let crc = if skip == 0 && n == key.size { live.crc } else { None };
                let w = make_word(side, &ptrs[..live.ptrs().len()], crc, false);
                tree.set_word(c, w);
                for p in live.ptrs() {
                    b.add_sectors(p.dev(), p.bucket(bits), n as i64, false);
                }
                *sectors += n;
                filled += n;
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == es => *l += n,
                    _ => runs.push((es, n)),
                }
                tree.advance(&mut c);
            }
        }
        Ok(filled)
    }

    /// Ends miss `ph` after its fills: placeholders of it that are left (parts that were
    /// not filled) go, and fewer sectors filled than reserved counts a collision.
    pub fn finish_fill(&mut self, ph: &Placeholder, filled: u64) -> FillOutcome {
        self.cancel_placeholder(ph);
        let collided = filled < ph.reserved;
        if collided {
            self.stats.cache_miss_collisions += 1;
        }
        FillOutcome { filled, collided }
    }

    /// Withdraws a read miss (the backing read failed): its remaining placeholders go.
    pub fn cancel_placeholder(&mut self, ph: &Placeholder) {
        let Some(vi) = self.vol_index(ph.inode) else { return };
        let pw = word::placeholder(ph.ticket);
        let end = ph.start + ph.len;
        let mut mine = Vec::new();
        {
            let tree = &self.vols[vi].tree;
            let mut c = tree.seek(ph.start);
            while let Some(e) = tree.get(c) {
                if e.start() >= end {
                    break;
                }
                if e.word == pw {
                    mine.push((e.start(), e.end));
                }
                tree.advance(&mut c);
            }
        }
        let ExtentIndex { vols, side, .. } = self;
        let Volume { tree, sectors, dirty_sectors, .. } = &mut vols[vi];
        let mut nb = NoBuckets;
        let mut t = Trimmer { b: &mut nb, side, sectors, dirty_sectors, released: 0 };
        for (s, e) in mine {
            tree.replace(s, e, None, &mut t);
        }
    }

    /// Writeback finished copying `key` (as returned by a dirty scan) to the backing
    /// device: the extents still holding that data (a pointer in common, at the same place)
    /// become clean. Parts overwritten meanwhile stay as they are. Returns the sectors
    /// cleaned, and pushes onto `cleaned` a clean key for each extent cleaned (its live
    /// pointers, at its place): exactly what the journal must record, as replaying a clean
    /// key over the whole of `key` would bring its data back over later writes.
    pub fn mark_clean<B: BucketGens + BucketAccounting + ?Sized>(
        &mut self,
        key: &Key,
        b: &mut B,
        cleaned_keys: &mut Vec<Key>,
    ) -> Result<u64> {
        key.validate()?;
        if key.ptrs().is_empty() {
            return Ok(0);
        }
        let Some(vi) = self.vol_index(key.inode) else { return Ok(0) };
        let bits = b.bucket_bits();
        let ExtentIndex { vols, side, .. } = self;
        let Volume { tree, dirty_sectors, .. } = &mut vols[vi];
        let mut cleaned = 0;
        let mut c = tree.seek(key.start);
        while let Some(e) = tree.get(c) {
            let es = e.start();
            if es >= key.end() {
                break;
            }
            if word::is_dirty(e.word) && es >= key.start && e.end <= key.end() {
                // Cache space is never handed out twice under one gen, so sharing a live
                // pointer (at the same position) means holding the same data. A dead extent
                // has nothing left to clean.
                let dec = word::decode(e.word);
                let ptrs: &[Ptr] = match &dec {
                    Word::Direct(p) => std::slice::from_ref(p),
                    Word::Indirect(slot) => side.get(*slot).ptrs(),
                    Word::Placeholder(_) => &[],
                };
                let skip = es - key.start;
                if key.ptrs().iter().map(|kp| kp.advance(skip)).any(|p| ptrs.contains(&p) && !b.ptr_stale(p)) {
                    let n = e.size as u64;
                    let mut clean: Option<Key> = None;
                    for &p in ptrs {
                        if !b.ptr_stale(p) {
                            b.add_sectors(p.dev(), p.bucket(bits), -(n as i64), true);
                            b.add_sectors(p.dev(), p.bucket(bits), n as i64, false);
                            match clean.as_mut() {
                                None => clean = Some(Key::new(key.inode, es, n, p)),
                                Some(k) => k.push_ptr(p)?,
                            }
                        }
                    }
                    cleaned_keys.extend(clean);
                    tree.set_word(c, e.word & !word::DIRTY);
                    *dirty_sectors -= n;
                    cleaned += n;
                }
            }
            tree.advance(&mut c);
        }
        Ok(cleaned)
    }

    /// Dirty sectors of `inode` in `start..end` (extents counted for their part inside).
    pub fn dirty_sectors_in(&self, inode: u32, start: u64, end: u64) -> u64 {
        let Some(vi) = self.vol_index(inode) else { return 0 };
        let vol = &self.vols[vi];
        if vol.dirty_sectors == 0 {
            return 0;
        }
        let tree = &vol.tree;
        let mut n = 0;
        let mut c = tree.seek(start);
        while let Some(e) = tree.get(c) {
            if e.start() >= end {
                break;
            }
            if word::is_dirty(e.word) {
                n += e.end.min(end) - e.start().max(start);
            }
            tree.advance(&mut c);
        }
        n
    }

    /// Drops the data checksum of the extents of `start..start + len` of `inode` that carry
    /// one (their data is about to be rewritten in place); pushes each such extent's key,
    /// now without checksum, onto `out` (what the journal must record first). Returns how
    /// many there were.
    pub fn clear_crc(&mut self, inode: u32, start: u64, len: u64, out: &mut Vec<Key>) -> usize {
        let Some(vi) = self.vol_index(inode) else { return 0 };
        let end = start + len;
        let ExtentIndex { vols, side, .. } = self;
        let tree = &vols[vi].tree;
        let mut n = 0;
        let mut c = tree.seek(start);
        while let Some(e) = tree.get(c) {
            if e.start() >= end {
                break;
            }
            tree.advance(&mut c);
            if let Word::Indirect(slot) = word::decode(e.word) {
                if side.get(slot).crc.is_some() {
                    side.get_mut(slot).crc = None;
                    out.extend(entry_key(side, inode, &e));
                    n += 1;
                }
            }
        }
        n
    }

    /// Moving GC copied the `len` sectors that live pointer `src` holds for `start..` of
    /// `inode` to `dst`: extents of that range still holding the same data (a pointer to the
    /// same place) point at `dst` instead, keeping their dirty state and any other pointers.
    /// Parts rewritten, invalidated or gone stale meanwhile are left alone. Pushes each key
    /// now indexed onto `moved` (exactly what the journal must record); returns the sectors
    /// moved.
    #[allow(clippy::too_many_arguments)]
    pub fn move_ptr<B: BucketGens + BucketAccounting + ?Sized>(
        &mut self,
        inode: u32,
        start: u64,
        len: u64,
        src: Ptr,
        dst: Ptr,
        b: &mut B,
        moved: &mut Vec<Key>,
    ) -> Result<u64> {
        if len == 0 || b.ptr_stale(src) || b.ptr_stale(dst) {
            return Ok(0);
        }
        let Some(vi) = self.vol_index(inode) else { return Ok(0) };
        let end = start + len;
        // The data at sector s sits at src + (s - start): a pointer p of an extent starting
        // at es holds the same data when it names that place.
        let same_place = |p: Ptr, es: u64| {
            p.dev() == src.dev()
                && p.gen() == src.gen()
                && p.offset() as i128 - es as i128 == src.offset() as i128 - start as i128
        };
        let mut found: Vec<Key> = Vec::new();
        {
            let ExtentIndex { vols, side, .. } = &mut *self;
            let tree = &vols[vi].tree;
            let mut c = tree.seek(start);
            while let Some(e) = tree.get(c) {
                let es = e.start();
                if es >= end {
                    break;
                }
                tree.advance(&mut c);
                let Some(k) = entry_key(side, inode, &e) else { continue };
                if !k.ptrs().iter().any(|&p| same_place(p, es) && !b.ptr_stale(p)) {
                    continue;
                }
                let (ss, se) = (es.max(start), e.end.min(end));
                let mut nk = Key::new(inode, ss, se - ss, dst.advance(ss - start)).with_dirty(k.dirty);
                if ss == es && se == e.end {
                    nk = nk.with_crc(k.crc);
                }
                for &p in k.ptrs() {
                    if !same_place(p, es) && !b.ptr_stale(p) {
                        nk.push_ptr(p.advance(ss - es))?;
                    }
                }
                found.push(nk);
            }
        }
        let mut n = 0;
        for k in found {
            if self.insert(&k, b)? {
                n += k.size;
                moved.push(k);
            }
        }
        Ok(n)
    }

    /// Live keys in (inode, sector) order from `from`, at most `max` of them, into `out`
    /// (cleared first). Writeback walks dirty keys this way, GC walks all of them; stale
    /// keys met on the way are removed. Returns where to continue, or None when the walk
    /// reached the end of the index.
    pub fn scan<G: BucketGens + ?Sized>(
        &mut self,
        from: ScanPos,
        filter: ScanFilter,
        max: usize,
        gens: &G,
        out: &mut Vec<Key>,
    ) -> Option<ScanPos> {
        out.clear();
        if max == 0 {
            return Some(from);
        }
        let ExtentIndex { vols, side, stale, .. } = self;
        let next = match filter {
            ScanFilter::Dirty => scan_dirty(vols, side, stale, from, max, gens, out),
            ScanFilter::All => scan_all(vols, side, stale, from, max, gens, out),
        };
        if !self.stale.is_empty() {
            self.drop_stale(gens);
        }
        next
    }

    /// The regions of `inode` the dirty map says may hold dirty data (for tests).
    pub fn dirty_regions(&self, inode: u32) -> usize {
        self.vol_index(inode).map_or(0, |vi| self.vols[vi].dirty_map.0.iter().map(|w| w.count_ones() as usize).sum())
    }

    /// GC's mark pass: reports every live extent's sectors to `b` (`add_sectors` with the
    /// full size, per live pointer), as if the index were inserted again into buckets whose
    /// counts were zeroed first; stale keys met are dropped. Returns the live keys counted.
    pub fn mark_buckets<B: BucketGens + BucketAccounting + ?Sized>(&mut self, b: &mut B) -> usize {
        let bits = b.bucket_bits();
        let mut live = 0;
        let ExtentIndex { vols, side, stale, .. } = self;
        for (vi, vol) in vols.iter_from(0) {
            let tree = &vol.tree;
            let mut c = tree.first();
            while let Some(e) = tree.get(c) {
                tree.advance(&mut c);
                if matches!(word::decode(e.word), Word::Placeholder(_)) {
                    continue;
                }
                if !entry_live(side, e.word, b) {
                    stale.push((vi, e.start(), e.end));
                    continue;
                }
                let dirty = word::is_dirty(e.word);
                let one;
                let ptrs: &[Ptr] = match word::decode(e.word) {
                    Word::Direct(p) => {
                        one = [p];
                        &one
                    }
                    Word::Indirect(slot) => side.get(slot).ptrs(),
                    Word::Placeholder(_) => &[],
                };
                for p in ptrs {
                    b.add_sectors(p.dev(), p.bucket(bits), e.size as i64, dirty);
                }
                live += 1;
            }
        }
        if !self.stale.is_empty() {
            let gens: &B = b;
            self.drop_stale(gens);
        }
        live
    }

    /// Checks the index's internal consistency (tree structure, non-overlap, side table,
    /// sector counts); returns a description of the first problem found.
    pub fn verify(&self) -> std::result::Result<(), String> {
        let mut indirect = 0;
        let mut seen = std::collections::HashSet::new();
        for (i, vol) in self.vols.iter_from(0) {
            if i != vol.inode as usize {
                return Err(format!("volume of inode {} filed under {i}", vol.inode));
            }
            vol.tree.check().map_err(|e| format!("inode {}: {e}", vol.inode))?;
            let (mut sectors, mut dirty) = (0, 0);
            let mut c = vol.tree.first();
            while let Some(e) = vol.tree.get(c) {
                match word::decode(e.word) {
                    Word::Placeholder(_) => {
                        if word::is_dirty(e.word) {
                            return Err(format!("inode {}: dirty placeholder at {}", vol.inode, e.start()));
                        }
                        vol.tree.advance(&mut c);
                        continue;
                    }
                    Word::Indirect(slot) => {
                        indirect += 1;
                        if !seen.insert(slot) {
                            return Err(format!("inode {}: side slot {slot} shared", vol.inode));
                        }
                        let _ = self.side.get(slot);
                    }
                    Word::Direct(_) => {}
                }
                sectors += e.size as u64;
                if word::is_dirty(e.word) {
                    dirty += e.size as u64;
                }
                vol.tree.advance(&mut c);
            }
            if sectors != vol.sectors || dirty != vol.dirty_sectors {
                return Err(format!(
                    "inode {}: counts {} sectors ({} dirty), keys hold {sectors} ({dirty})",
                    vol.inode, vol.sectors, vol.dirty_sectors
                ));
            }
        }
        if indirect != self.side.live() {
            return Err(format!("{} side slots in use, {indirect} keys use one", self.side.live()));
        }
        Ok(())
    }
}
