//! The B+tree that holds one inode's extents, kept free of overlaps.
//!
//! Entries are `(end, word, size)`: the extent covers `end - size .. end`, and `word` is
//! the index's packed description of where its data is (see `extents.rs`); the tree never
//! looks inside it. Leaves store the three fields as separate arrays (18 bytes an entry,
//! no heap allocation per key), sorted by end; because extents never overlap they are
//! sorted by start as well.
//!
//! Separators are looser than in a textbook B+tree: `seps[i]` of an inner node only
//! promises that every extent under child `i` ends at or before it and every extent under
//! child `i + 1` starts at or after it. Cutting an extent's head or tail, or removing it,
//! therefore never touches a separator, and an insert only has to raise the separators
//! that fall inside the (free by then) range of the new extent.
//!
//! Nodes live in two arenas and refer to each other by 32-bit index; leaves are also
//! linked forward, in order, for iteration. A leaf that would overflow first shares its
//! entries with a sibling that has room (B*-tree style) and only splits when neither has:
//! under random inserts leaves stay about 80% full instead of two thirds, which takes the
//! benchmark's 10M-extent index from 28.1 to 24.0 bytes an extent and shrinks the bottom
//! inner level by as much. It costs random inserts into a cached 1M-extent index about 10%
//! (4.0M/s against 4.5M/s), nothing measurable at 10M, where inserts wait on memory.
//!
//! Layout, for searches that pay one trip to memory per lookup. A leaf is 19 cache lines:
//! line 0 holds `tops` (the last end of each group of 8 entries but the last), `len` and
//! `next`; then `ends` (8 lines, one group a line), `words` (8 lines), `sizes` (2 lines).
//! An inner node is 32 lines, of which a search reads only the first 16: `base` (the first
//! separator), `len`, `keys` (each separator as a 32-bit offset from `base`) and `children`
//! (u32). The full 64-bit `seps` follow; changes are made there and `sync` derives the
//! compact copy. A node whose separators span 2^32 - 1 sectors or more (the root of a
//! large device, or sparse extents) is WIDE and searched through `seps` instead; bottom
//! inner nodes of a large index span far less. A search thus pulls 16 lines of a bottom
//! inner node into cache instead of 25; with the fuller leaves, the part of the bottom
//! level searches read at 10M extents went from about 4.2 MB to 2.3 MB.
//!
//! A search reads the inner levels above the bottom one from cache (they are few nodes,
//! read by every search); as soon as it knows the bottom inner node it starts loading all
//! of its searched half, and as soon as it knows the leaf it starts loading all of that
//! (non-temporally for lookups, so leaves read once do not push inner nodes and bucket gens
//! out of the outer caches), because a second dependent trip to memory costs as much as the
//! first. A lookup asks for the leaf's lines in the order it needs them: line 0 and the two
//! lines of `sizes` first, then the ends and words of each group side by side, rather than
//! in address order, where `sizes` came last and most of `words` behind all of `ends`
//! (10M extents, alternating runs on a shared 2-vCPU VM: index / BTreeMap 2.41-2.67, mean
//! 2.53 over 7 runs, against 2.32-2.49, mean 2.42 over 11 runs of the address order; only
//! moving `sizes` first: 2.44 and 2.52). In an inner node it runs a branch-free binary
//! search; in the leaf it counts the `tops` at or below the sector, then the ends of that
//! one group: two steps of independent compares instead of a chain of six.
//!
//! Single lookups one after another are bound by the reorder window as much as by memory:
//! while one waits for its leaf (and then its bucket gen), the core runs ahead into the
//! next one's descent, and the fewer instructions between the two, the sooner the next
//! bottom inner node is on its way. So the lookup path has as few as it can: `descend` and
//! `seek_entry` read nodes without bounds checks and take the entry found from the leaf
//! already in hand; `ExtentIndex::lookup` builds its errors out of line and is inlined into
//! its caller, with only the general walk (ranges over several extents) left as a call.
//! At 10M extents, alternating runs on the shared 2-vCPU VM: unchecked descent and
//! `seek_entry` 3.32M/s (3.11-3.45, index / BTreeMap 2.54) against 3.16M/s (2.95-3.31,
//! 2.47), 4 runs each; errors out of line 2.54 against 2.48; then inlining 3.94M/s
//! (3.88-4.03, 3.23) against 3.16M/s (3.11-3.24, 2.67); all three against the code before
//! them, 5 runs each on a busier machine, 3.25M/s (2.83-3.72, 3.35) against 2.72M/s
//! (2.50-2.93, 2.62). Every change below that added instructions to this path lost about
//! 10%, whatever it saved in memory traffic.
//!
//! Measured alternatives that lost on the benchmark's 10M-extent index: a two-line summary
//! per inner node searched before (not instead of) loading the rest, leaves of 32 or 128
//! entries, searching a leaf's line 0 before loading the rest of it, a branch-free choice
//! between hole and hit; counting all of a node's compact keys with vector compares instead
//! of the binary search (index / BTreeMap 2.39 against 2.67: the count waits for every line
//! of a bottom node that is not in cache, the binary search for five); starting to load only
//! the keys of the bottom inner node, or only its first 12 lines (no gain, or a loss);
//! sharing a full inner node's children with a sibling before splitting it, as leaves do
//! (bottom inner nodes 84% full instead of 74% at 10M random inserts, 1793 instead of 2048
//! of them, yet index / BTreeMap 2.42-2.63 over 3 runs, and with the lookup order of leaf
//! lines 2.33 and 2.39 against 2.40 and 2.41 in the same rounds: no steady gain); asking
//! for a bottom inner node's lines in the order its binary search reads them (line 0, then
//! the keys lines of the first probes) instead of in address order (2.31, 2.65, 2.57
//! against 2.59, 2.51, 2.51).
//! Prefetching only the lines of a bottom inner node its children use (about 12 of 16),
//! its length kept in a tag byte beside the node in the arena so it is known before the
//! node, with the binary search bounded by that length so it never reads the padding: 2.33
//! (2.29-2.40) against 2.61 (2.50-2.75), 4 runs each; only the tag and shorter prefetch,
//! 2.38, only the bounded search (a loop), 2.28, against 2.51, 3 runs each. Above the bottom
//! inner level, counting every eighth key and then the eight of the group it picks instead
//! of the binary search (two steps of independent loads instead of seven dependent ones):
//! 2.25 (2.20-2.31) against 2.49 (2.43-2.57). Prefetching the nodes above the bottom inner
//! level as that one is (all 16 lines: 2.50; the keys only: 2.47; against 2.67, 3 runs
//! each). Huge pages need no fix: the 10M benchmark's process has 224 MiB on transparent
//! huge pages for a 228 MiB index. The bucket gen (1 byte per bucket, about 1.8 MB in the
//! benchmark) cannot be asked for earlier: its bucket comes from the word, which arrives
//! with the line of ends that gives the slot, right before the gen is read.
//! Where the time of a 10M-extent lookup went before those (cpu-clock samples): the leaf, a miss
//! to DRAM, about 35%; the bottom inner node (its first line, its search, and the leaf's
//! prefetches issued right behind it) about 30% even at 2.3 MB; the bucket gen check 13%.

use super::arena::{prefetch, prefetch_nta, Arena, Node, NIL};

/// Entries a leaf can hold.
pub(crate) const LEAF_CAP: usize = 64;
/// Children an inner node can hold.
pub(crate) const INNER_CAP: usize = 126;
const LEAF_MIN: usize = LEAF_CAP / 3;
/// Free slots each of two leaves keeps when one shares its entries with the other rather
/// than splitting: with less, the next insert into either would overflow again.
const SHARE_ROOM: usize = 4;
const INNER_MIN: usize = INNER_CAP / 3;
/// Padding for unused key slots: above any sector, so searches can run over whole arrays.
const PAD: u64 = u64::MAX;
/// Searches `seek_many` runs side by side: enough misses in flight to hide memory latency,
/// few enough to stay within what the core can track.
pub(crate) const SEEK_GROUP: usize = 16;
/// With at least INNER_MIN children per inner node, 2^32 leaves need fewer levels.
const MAX_HEIGHT: usize = 12;

/// One extent as the tree stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub end: u64,
    pub word: u64,
    pub size: u16,
}

impl Entry {
    #[inline]
    pub fn start(&self) -> u64 {
        self.end - self.size as u64
    }
}

/// What the tree asks of its user when an insert or invalidation cuts existing extents.
pub(crate) trait Trim {
    /// Sectors `skip .. skip + len` of extent `e` stop being referenced; `whole` when the
    /// entry is gone.
    fn release(&mut self, e: &Entry, skip: u64, len: u64, whole: bool);
    /// The word for the piece of `e` that starts `skip` sectors into it. `split` when another
    /// piece goes on using `e.word` itself.
    fn keep(&mut self, e: &Entry, skip: u64, split: bool) -> u64;
}

/// Entries of a leaf are searched a cache line (8 ends) at a time.
const LGROUP: usize = 8;
const LGROUPS: usize = LEAF_CAP / LGROUP;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Leaf {
    /// `tops[g]` is `ends[LGROUP * g + LGROUP - 1]`, the last end of group `g` (the last
    /// group needs none): with `len` and `next`, exactly the first cache line.
    tops: [u64; LGROUPS - 1],
    len: u32,
    next: u32,
    ends: [u64; LEAF_CAP],
    words: [u64; LEAF_CAP],
    sizes: [u16; LEAF_CAP],
}

impl Node for Leaf {
    const BLANK: Leaf = Leaf {
        tops: [PAD; LGROUPS - 1],
        len: 0,
        next: NIL,
        ends: [PAD; LEAF_CAP],
        words: [0; LEAF_CAP],
        sizes: [0; LEAF_CAP],
    };
}

const _: () = assert!(std::mem::size_of::<Leaf>() == 19 * 64);

impl Leaf {
    /// Recomputes `tops` after `ends` changed.
    #[inline]
    fn retop(&mut self) {
        for g in 0..LGROUPS - 1 {
            self.tops[g] = self.ends[g * LGROUP + LGROUP - 1];
        }
    }

    /// `rank(&self.ends, s)` through `tops`: reads the first line, then one line of ends.
    #[inline(always)]
    fn slot_of(&self, s: u64) -> usize {
        let base = count_le(&self.tops, s).min(LGROUPS - 1) * LGROUP;
        base + count_le::<LGROUP>(self.ends[base..base + LGROUP].try_into().expect("a group of ends"), s)
    }

    /// Starts loading the whole leaf non-temporally, in the order a lookup needs its lines:
    /// line 0 and the two lines of `sizes` (read by every lookup), then the ends and the
    /// words of each group side by side (a lookup reads one group's line of each). Loaded
    /// in address order, the sizes and most words came in last.
    #[inline(always)]
    fn prefetch_lookup(&self) {
        prefetch_nta(&self.tops);
        prefetch_nta(&self.sizes);
        for g in 0..LGROUPS {
            prefetch_nta(&self.ends[g * LGROUP]);
            prefetch_nta(&self.words[g * LGROUP]);
        }
    }

    #[inline]
    fn start(&self, i: usize) -> u64 {
        self.ends[i] - self.sizes[i] as u64
    }

    #[inline]
    fn entry(&self, i: usize) -> Entry {
        Entry { end: self.ends[i], word: self.words[i], size: self.sizes[i] }
    }

    #[inline]
    fn set(&mut self, i: usize, e: Entry) {
        self.ends[i] = e.end;
        self.words[i] = e.word;
        self.sizes[i] = e.size;
    }

    /// Makes `entries` the leaf's contents (its `next` stays).
    fn fill(&mut self, entries: &[Entry]) {
        for (i, e) in entries.iter().enumerate() {
            self.set(i, *e);
        }
        self.ends[entries.len()..].fill(PAD);
        self.len = entries.len() as u32;
        self.retop();
    }
}

/// Separators of an inner node as offsets from its first one, when they all fit in 32 bits.
const KEY_PAD: u32 = u32::MAX;
const MAX_DELTA: u64 = KEY_PAD as u64 - 1;
/// `Inner::base` of a node whose separators do not fit in `keys`.
const WIDE: u64 = u64::MAX;

/// An inner node. What a search reads comes first and fills exactly 16 cache lines: `base`,
/// `len`, the separators as 32-bit offsets from `base` (`keys`) and `children`. `seps` holds
/// the separators in full: changes are made there, and `sync` derives `base` and `keys`
/// from them. A node whose separators span more than 2^32 - 2 sectors is WIDE and
/// searched through `seps`.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Inner {
    /// `seps[0]`, or WIDE.
    base: u64,
    len: u32,
    /// `keys[i] = seps[i] - base`; slots from `len - 1` on are KEY_PAD.
    keys: [u32; INNER_CAP - 1],
    children: [u32; INNER_CAP],
    /// `seps[i]` lies between child `i` and child `i + 1`; slots from `len - 1` on are PAD.
    seps: [u64; INNER_CAP],
}

impl Node for Inner {
    const BLANK: Inner = Inner {
        base: WIDE,
        len: 0,
        keys: [KEY_PAD; INNER_CAP - 1],
        children: [NIL; INNER_CAP],
        seps: [PAD; INNER_CAP],
    };
}

const _: () = assert!(std::mem::offset_of!(Inner, children) + 4 * INNER_CAP <= 16 * 64);
const _: () = assert!(std::mem::size_of::<Inner>() == 32 * 64);

impl Inner {
    /// Derives `base` and `keys` from `seps`; after every change to `seps` or `len`.
    #[inline]
    fn sync(&mut self) {
        let n = (self.len as usize).saturating_sub(1);
        let base = self.seps[0];
        self.keys.fill(KEY_PAD);
        if n > 0 && self.seps[n - 1] - base <= MAX_DELTA {
            self.base = base;
            for i in 0..n {
                self.keys[i] = (self.seps[i] - base) as u32;
            }
        } else {
            self.base = WIDE;
        }
    }

    /// The child to follow for sector `s`: the number of separators `<= s`.
    #[inline(always)]
    fn child_slot(&self, s: u64) -> usize {
        if self.base != WIDE {
            // Offsets past the widest one count every key; sectors below base count none.
            let r = rank(&self.keys, s.wrapping_sub(self.base).min(MAX_DELTA) as u32);
            if s < self.base {
                0
            } else {
                r
            }
        } else {
            rank(&self.seps, s)
        }
    }

    /// Starts loading what `child_slot` and the child id after it read.
    #[inline(always)]
    fn prefetch_search(&self) {
        prefetch(&self.keys);
        prefetch(&self.children);
    }
}

/// Copies the entries of `leaf` to `out`, with `from..to` replaced by `repl`; returns how many.
fn gather(leaf: &Leaf, from: usize, to: usize, repl: &[Entry], out: &mut [Entry]) -> usize {
    let old = leaf.len as usize;
    let mut n = 0;
    for e in (0..from).map(|i| leaf.entry(i)).chain(repl.iter().copied()).chain((to..old).map(|i| leaf.entry(i))) {
        out[n] = e;
        n += 1;
    }
    n
}

/// Number of keys `<= s` in a sorted array padded with PAD, without data-dependent branches.
#[inline(always)]
fn rank<T: Copy + PartialOrd, const N: usize>(keys: &[T; N], s: T) -> usize {
    let mut lo = 0usize;
    let mut n = N;
    while n > 1 {
        let half = n / 2;
        lo = std::hint::select_unpredictable(keys[lo + half - 1] <= s, lo + half, lo);
        n -= half;
    }
    lo + (keys[lo] <= s) as usize
}

/// Number of keys `<= s` in a short array: every key compared, no branches and no chain
/// of dependent loads.
#[inline(always)]
fn count_le<const N: usize>(keys: &[u64; N], s: u64) -> usize {
    keys.iter().map(|&k| (k <= s) as usize).sum()
}

/// The inner nodes met on the way down to a leaf, and which child was taken at each.
#[derive(Clone, Copy)]
struct Path {
    node: [u32; MAX_HEIGHT],
    idx: [u32; MAX_HEIGHT],
}

impl Path {
    const EMPTY: Path = Path { node: [NIL; MAX_HEIGHT], idx: [0; MAX_HEIGHT] };
}

/// A position in the tree: an entry, or the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    leaf: u32,
    slot: u32,
}

impl Cursor {
    pub const END: Cursor = Cursor { leaf: NIL, slot: 0 };
}

/// One inode's extents.
pub(crate) struct Tree {
    leaves: Arena<Leaf>,
    inners: Arena<Inner>,
    root: u32,
    /// Inner levels above the leaves (0: the root is a leaf).
    height: usize,
    len: usize,
}

impl Tree {
    pub fn new() -> Tree {
        let mut leaves = Arena::new();
        let root = leaves.alloc(Leaf::BLANK);
        Tree { leaves, inners: Arena::new(), root, height: 0, len: 0 }
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes of heap the tree holds.
    pub fn heap_bytes(&self) -> usize {
        self.leaves.heap_bytes() + self.inners.heap_bytes()
    }

    /// Starts loading the parts of the node at `depth` a search reads, all at once, instead
    /// of one cache miss per step of the search. Only the bottom two levels: the inner
    /// levels above them are few nodes, read on every search and in cache anyway. For
    /// inserts, which write the leaf (so it gets the normal hint); `descend` does the same
    /// for lookups.
    #[inline(always)]
    fn prefetch_node(&self, node: u32, depth: usize) {
        if depth == self.height {
            // The whole leaf: the slot found in `ends` is read from `words` and `sizes`
            // right after, and a second round trip to memory would cost as much as the
            // first.
            prefetch(self.leaves.get(node));
        } else if depth + 1 == self.height {
            self.inners.get(node).prefetch_search();
        }
    }

    /// The leaf for sector `s`, with the leaf (and the bottom inner node before it) already
    /// being loaded for a lookup. Few instructions on purpose: while a lookup waits for its
    /// leaf, the core runs ahead into the next lookup's descent, as far as its reorder
    /// window reaches, and every instruction spent here pushes the next lookup's prefetches
    /// further out of it.
    #[inline(always)]
    fn descend(&self, s: u64) -> u32 {
        let mut node = self.root;
        let h = self.height;
        for d in 0..h {
            // SAFETY: the root and every child id of an inner node in the tree come from
            // `alloc` of their arena (an invariant `check` verifies).
            let inner = unsafe { self.inners.get_unchecked(node) };
            node = inner.children[inner.child_slot(s)];
            if d + 2 == h {
                // SAFETY: as above.
                unsafe { self.inners.get_unchecked(node) }.prefetch_search();
            }
        }
        if h > 0 {
            // The whole leaf, as for an insert; but a lookup reads one leaf among hundreds
            // of thousands, once: loaded non-temporally it does not push the inner nodes
            // and the bucket gens out of the outer caches.
            // SAFETY: as above.
            unsafe { self.leaves.get_unchecked(node) }.prefetch_lookup();
        }
        node
    }

    fn descend_path(&self, s: u64, path: &mut Path) -> u32 {
        let mut node = self.root;
        for d in 0..self.height {
            let inner = self.inners.get(node);
            let i = inner.child_slot(s);
            path.node[d] = node;
            path.idx[d] = i as u32;
            node = inner.children[i];
            self.prefetch_node(node, d + 1);
        }
        node
    }

    /// The leaf for sector `s`, its id, and the slot of the first extent in it that ends
    /// after `s` (the leaf's length when none does).
    #[inline(always)]
    fn leaf_slot(&self, s: u64) -> (u32, &Leaf, usize) {
        let leaf_id = self.descend(s);
        // SAFETY: `descend` returns the id of a leaf of the tree.
        let leaf = unsafe { self.leaves.get_unchecked(leaf_id) };
        (leaf_id, leaf, leaf.slot_of(s))
    }

    /// The first extent that ends after sector `s`.
    #[inline]
    pub fn seek(&self, s: u64) -> Cursor {
        let (leaf_id, leaf, slot) = self.leaf_slot(s);
        if slot < leaf.len as usize {
            Cursor { leaf: leaf_id, slot: slot as u32 }
        } else {
            Cursor { leaf: leaf.next, slot: 0 }
        }
    }

    /// `seek`, with the entry at the cursor (`get`) read from the leaf already in hand.
    #[inline(always)]
    pub fn seek_entry(&self, s: u64) -> (Cursor, Option<Entry>) {
        let (leaf_id, leaf, slot) = self.leaf_slot(s);
        if slot < leaf.len as usize {
            (Cursor { leaf: leaf_id, slot: slot as u32 }, Some(leaf.entry(slot)))
        } else {
            let c = Cursor { leaf: leaf.next, slot: 0 };
            (c, self.get(c))
        }
    }

    /// `seek` for several sectors at once. The searches go down the tree together, in
    /// stages that each start loading exactly what the next stage reads (separators, then
    /// one child slot, then the child; in the leaf the ends, then the entry found), so the
    /// cache misses of a whole group are in flight at the same time.
    pub fn seek_many(&self, starts: &[u64], out: &mut [Cursor]) {
        debug_assert!(out.len() >= starts.len());
        let n = starts.len().min(out.len());
        let mut nodes = [self.root; SEEK_GROUP];
        let mut idx = [0usize; SEEK_GROUP];
        for (g, chunk) in starts[..n].chunks(SEEK_GROUP).enumerate() {
            let k = chunk.len();
            nodes[..k].fill(self.root);
            for d in 0..self.height {
                for j in 0..k {
                    let inner = self.inners.get(nodes[j]);
                    idx[j] = inner.child_slot(chunk[j]);
                    prefetch(&inner.children[idx[j]]);
                }
                for j in 0..k {
                    nodes[j] = self.inners.get(nodes[j]).children[idx[j]];
                    if d + 1 < self.height {
                        prefetch(&self.inners.get(nodes[j]).keys);
                    } else {
                        prefetch(&self.leaves.get(nodes[j]).ends);
                    }
                }
            }
            for j in 0..k {
                let leaf = self.leaves.get(nodes[j]);
                idx[j] = rank(&leaf.ends, chunk[j]);
                if idx[j] < leaf.len as usize {
                    prefetch(&leaf.words[idx[j]]);
                    prefetch(&leaf.sizes[idx[j]]);
                }
            }
            for j in 0..k {
                let leaf = self.leaves.get(nodes[j]);
                out[g * SEEK_GROUP + j] = if idx[j] < leaf.len as usize {
                    Cursor { leaf: nodes[j], slot: idx[j] as u32 }
                } else {
                    Cursor { leaf: leaf.next, slot: 0 }
                };
            }
        }
    }

    /// The first extent of the tree.
    pub fn first(&self) -> Cursor {
        self.seek(0)
    }

    /// The entry at `c`, or None at the end.
    #[inline]
    pub fn get(&self, c: Cursor) -> Option<Entry> {
        if c.leaf == NIL {
            return None;
        }
        Some(self.leaves.get(c.leaf).entry(c.slot as usize))
    }

    /// Moves `c` to the next entry.
    #[inline]
    pub fn advance(&self, c: &mut Cursor) {
        let leaf = self.leaves.get(c.leaf);
        if c.slot + 1 < leaf.len {
            c.slot += 1;
        } else {
            *c = Cursor { leaf: leaf.next, slot: 0 };
        }
    }

    /// Replaces the word of the entry at `c` (same extent, new description).
    pub fn set_word(&mut self, c: Cursor, word: u64) {
        self.leaves.get_mut(c.leaf).words[c.slot as usize] = word;
    }

    /// Makes `s..e` hold exactly `new` (an extent `s..e` with that word) or nothing: extents
    /// inside the range go, extents sticking out are cut at its edges, an extent covering
    /// all of it is split in two. `t` hears of every cut.
    pub fn replace<T: Trim>(&mut self, s: u64, e: u64, new: Option<u64>, t: &mut T) {
        debug_assert!(s < e);
        debug_assert!(new.is_none() || e - s <= u16::MAX as u64);
        while let Some((ps, pe)) = self.replace_in_leaf(s, e, new, t) {
            // The range reaches into another leaf: clear one leaf's share, then try again.
            let again = self.replace_in_leaf(ps, pe, None, t);
            debug_assert!(again.is_none());
        }
    }

    /// Does `replace` when every extent it touches sits in one leaf; otherwise changes
    /// nothing and returns a smaller range that does sit in one leaf, to clear first.
    fn replace_in_leaf<T: Trim>(&mut self, s: u64, e: u64, new: Option<u64>, t: &mut T) -> Option<(u64, u64)> {
        let mut path = Path::EMPTY;
        let leaf_id = self.descend_path(s, &mut path);
        let leaf = self.leaves.get(leaf_id);
        let len = leaf.len as usize;
        let slot = rank(&leaf.ends, s);
        let mut j = slot;
        while j < len && leaf.start(j) < e {
            j += 1;
        }
        if j == len && leaf.next != NIL {
            let next = self.leaves.get(leaf.next);
            let (ns, ne) = (next.start(0), next.ends[0]);
            if ns < e {
                return Some(if slot < len { (s, leaf.ends[len - 1]) } else { (s.max(ns), e.min(ne)) });
            }
        }

        let mut repl = [Entry { end: 0, word: 0, size: 0 }; 3];
        let mut n = 0;
        let mut tail = None;
        if slot < j {
            let first = leaf.entry(slot);
            let (fs, fe) = (first.start(), first.end);
            if j - slot == 1 && fs < s && fe > e {
                t.release(&first, s - fs, e - s, false);
                let head = t.keep(&first, 0, false);
                let rest = t.keep(&first, e - fs, true);
                repl[0] = Entry { end: s, word: head, size: (s - fs) as u16 };
                n = 1;
                tail = Some(Entry { end: fe, word: rest, size: (fe - e) as u16 });
            } else {
                let last = leaf.entry(j - 1);
                let (ls, le) = (last.start(), last.end);
                if fs < s {
                    t.release(&first, s - fs, fe - s, false);
                    repl[0] = Entry { end: s, word: t.keep(&first, 0, false), size: (s - fs) as u16 };
                    n = 1;
                } else if j - slot > 1 || fe <= e {
                    t.release(&first, 0, first.size as u64, true);
                }
                for k in slot + 1..j.saturating_sub(1) {
                    let mid = leaf.entry(k);
                    t.release(&mid, 0, mid.size as u64, true);
                }
                if le > e {
                    t.release(&last, 0, e - ls, false);
                    tail = Some(Entry { end: le, word: t.keep(&last, e - ls, false), size: (le - e) as u16 });
                } else if j - slot > 1 {
                    t.release(&last, 0, last.size as u64, true);
                }
            }
        }
        if let Some(word) = new {
            repl[n] = Entry { end: e, word, size: (e - s) as u16 };
            n += 1;
            // Separators that fall inside s..e now bound nothing: move them to e so the new
            // extent belongs to this leaf.
            for d in 0..self.height {
                let inner = self.inners.get_mut(path.node[d]);
                let i = path.idx[d] as usize;
                if i + 1 < inner.len as usize && inner.seps[i] < e {
                    inner.seps[i] = e;
                    inner.sync();
                }
            }
        }
        if let Some(tail) = tail {
            repl[n] = tail;
            n += 1;
        }
        if n > 0 || j > slot {
            self.splice(&path, leaf_id, slot, j, &repl[..n]);
        }
        None
    }

    /// Replaces entries `from..to` of a leaf with `repl`, then splits or rebalances.
    fn splice(&mut self, path: &Path, leaf_id: u32, from: usize, to: usize, repl: &[Entry]) {
        let leaf = self.leaves.get_mut(leaf_id);
        let old = leaf.len as usize;
        let new_len = old - (to - from) + repl.len();
        self.len = self.len - old + new_len;
        if new_len > LEAF_CAP {
            if !self.share_leaf(path, leaf_id, from, to, repl) {
                self.split_leaf(path, leaf_id, from, to, repl);
            }
            return;
        }
        if repl.len() != to - from {
            let dst = from + repl.len();
            leaf.ends.copy_within(to..old, dst);
            leaf.words.copy_within(to..old, dst);
            leaf.sizes.copy_within(to..old, dst);
        }
        for (k, r) in repl.iter().enumerate() {
            leaf.set(from + k, *r);
        }
        for k in new_len..old {
            leaf.ends[k] = PAD;
        }
        leaf.len = new_len as u32;
        leaf.retop();
        // Only removals rebalance: a leaf left short by a biased split fills up again.
        if new_len < old && new_len < LEAF_MIN && self.height > 0 {
            self.rebalance_leaf(path, leaf_id);
        }
    }

    /// A leaf would overflow: shares its entries with a sibling under the same parent
    /// instead, if one has room enough that neither is left nearly full (B*-tree style), so
    /// leaves stay fuller and fewer. Returns false, changing nothing, if neither sibling has.
    fn share_leaf(&mut self, path: &Path, leaf_id: u32, from: usize, to: usize, repl: &[Entry]) -> bool {
        if self.height == 0 {
            return false;
        }
        let d = self.height - 1;
        let (pid, i) = (path.node[d], path.idx[d] as usize);
        let p = self.inners.get(pid);
        let plen = p.len as usize;
        let new_len = self.leaves.get(leaf_id).len as usize - (to - from) + repl.len();
        let fits = |id: u32| new_len + self.leaves.get(id).len as usize <= 2 * (LEAF_CAP - SHARE_ROOM);
        let li = if i + 1 < plen && fits(p.children[i + 1]) {
            i
        } else if i > 0 && fits(p.children[i - 1]) {
            i - 1
        } else {
            return false;
        };
        let (l_id, r_id) = (p.children[li], p.children[li + 1]);
        let mut all = [Entry { end: 0, word: 0, size: 0 }; 2 * LEAF_CAP];
        let (l, r) = self.leaves.pair_mut(l_id, r_id);
        let mut total = 0;
        for (id, leaf) in [(l_id, &*l), (r_id, &*r)] {
            total += if id == leaf_id {
                gather(leaf, from, to, repl, &mut all[total..])
            } else {
                gather(leaf, 0, 0, &[], &mut all[total..])
            };
        }
        let k = total / 2;
        l.fill(&all[..k]);
        r.fill(&all[k..total]);
        let p = self.inners.get_mut(pid);
        p.seps[li] = all[k - 1].end;
        p.sync();
        true
    }

    fn split_leaf(&mut self, path: &Path, leaf_id: u32, from: usize, to: usize, repl: &[Entry]) {
        let mut all = [Entry { end: 0, word: 0, size: 0 }; LEAF_CAP + 3];
        let leaf = self.leaves.get(leaf_id);
        let old = leaf.len as usize;
        let total = gather(leaf, from, to, repl, &mut all);
        // Appending at the very end (replay of sorted keys) leaves full leaves behind.
        let k = if leaf.next == NIL && to == old { (total - 1).min(LEAF_CAP) } else { total / 2 };
        let next = leaf.next;

        let mut right = Leaf::BLANK;
        for (i, e) in all[k..total].iter().enumerate() {
            right.set(i, *e);
        }
        right.len = (total - k) as u32;
        right.next = next;
        right.retop();
        let right_id = self.leaves.alloc(right);
        let leaf = self.leaves.get_mut(leaf_id);
        for (i, e) in all[..k].iter().enumerate() {
            leaf.set(i, *e);
        }
        for i in k..LEAF_CAP {
            leaf.ends[i] = PAD;
        }
        leaf.len = k as u32;
        leaf.next = right_id;
        leaf.retop();
        self.insert_child(path, self.height, all[k - 1].end, right_id);
    }

    /// Puts `child` right after the node at `depth` on `path`, with `sep` between them.
    fn insert_child(&mut self, path: &Path, depth: usize, sep: u64, child: u32) {
        if depth == 0 {
            let mut root = Inner::BLANK;
            root.children[0] = self.root;
            root.children[1] = child;
            root.seps[0] = sep;
            root.len = 2;
            root.sync();
            self.root = self.inners.alloc(root);
            self.height += 1;
            assert!(self.height < MAX_HEIGHT, "extent index: tree too tall");
            return;
        }
        let pid = path.node[depth - 1];
        let i = path.idx[depth - 1] as usize;
        let right_edge = (0..depth - 1).all(|d| path.idx[d] + 1 == self.inners.get(path.node[d]).len);
        let p = self.inners.get_mut(pid);
        let plen = p.len as usize;
        if plen < INNER_CAP {
            p.seps.copy_within(i..plen - 1, i + 1);
            p.seps[i] = sep;
            p.children.copy_within(i + 1..plen, i + 2);
            p.children[i + 1] = child;
            p.len += 1;
            p.sync();
            return;
        }
        let mut seps = [PAD; INNER_CAP];
        let mut children = [NIL; INNER_CAP + 1];
        seps[..i].copy_from_slice(&p.seps[..i]);
        seps[i] = sep;
        seps[i + 1..].copy_from_slice(&p.seps[i..INNER_CAP - 1]);
        children[..=i].copy_from_slice(&p.children[..=i]);
        children[i + 1] = child;
        children[i + 2..].copy_from_slice(&p.children[i + 1..]);
        let total = INNER_CAP + 1;
        let k = if right_edge && i + 1 == plen { total - 2 } else { total / 2 };
        let mut right = Inner::BLANK;
        right.children[..total - k].copy_from_slice(&children[k..]);
        right.seps[..total - k - 1].copy_from_slice(&seps[k..total - 1]);
        right.len = (total - k) as u32;
        right.sync();
        p.children[..k].copy_from_slice(&children[..k]);
        p.children[k..].fill(NIL);
        p.seps[..k - 1].copy_from_slice(&seps[..k - 1]);
        p.seps[k - 1..].fill(PAD);
        p.len = k as u32;
        p.sync();
        let up = seps[k - 1];
        let right_id = self.inners.alloc(right);
        self.insert_child(path, depth - 1, up, right_id);
    }

    /// A leaf fell under LEAF_MIN: merge it with a sibling, or even the two out.
    fn rebalance_leaf(&mut self, path: &Path, leaf_id: u32) {
        let d = self.height - 1;
        let pid = path.node[d];
        let i = path.idx[d] as usize;
        let p = self.inners.get(pid);
        debug_assert_eq!(p.children[i], leaf_id);
        let li = i.saturating_sub(1);
        let (l_id, r_id) = (p.children[li], p.children[li + 1]);
        let (l, r) = self.leaves.pair_mut(l_id, r_id);
        let (ll, rl) = (l.len as usize, r.len as usize);
        if ll + rl <= LEAF_CAP {
            l.ends[ll..ll + rl].copy_from_slice(&r.ends[..rl]);
            l.words[ll..ll + rl].copy_from_slice(&r.words[..rl]);
            l.sizes[ll..ll + rl].copy_from_slice(&r.sizes[..rl]);
            l.len = (ll + rl) as u32;
            l.next = r.next;
            l.retop();
            self.leaves.free(r_id);
            self.remove_child(path, d, li);
            return;
        }
        let k = (ll + rl) / 2;
        if ll < k {
            let m = k - ll;
            l.ends[ll..k].copy_from_slice(&r.ends[..m]);
            l.words[ll..k].copy_from_slice(&r.words[..m]);
            l.sizes[ll..k].copy_from_slice(&r.sizes[..m]);
            r.ends.copy_within(m..rl, 0);
            r.words.copy_within(m..rl, 0);
            r.sizes.copy_within(m..rl, 0);
            r.ends[rl - m..rl].fill(PAD);
        } else {
            let m = ll - k;
            r.ends.copy_within(0..rl, m);
            r.words.copy_within(0..rl, m);
            r.sizes.copy_within(0..rl, m);
            r.ends[..m].copy_from_slice(&l.ends[k..ll]);
            r.words[..m].copy_from_slice(&l.words[k..ll]);
            r.sizes[..m].copy_from_slice(&l.sizes[k..ll]);
            l.ends[k..ll].fill(PAD);
        }
        l.len = k as u32;
        r.len = (ll + rl - k) as u32;
        l.retop();
        r.retop();
        let sep = l.ends[k - 1];
        let p = self.inners.get_mut(pid);
        p.seps[li] = sep;
        p.sync();
    }

    /// Drops child `li + 1` of the node at `depth` on `path` (and the separator before it).
    fn remove_child(&mut self, path: &Path, depth: usize, li: usize) {
        let pid = path.node[depth];
        let p = self.inners.get_mut(pid);
        let plen = p.len as usize;
        p.seps.copy_within(li + 1..plen - 1, li);
        p.seps[plen - 2] = PAD;
        p.children.copy_within(li + 2..plen, li + 1);
        p.children[plen - 1] = NIL;
        p.len -= 1;
        p.sync();
        if depth == 0 {
            if p.len == 1 {
                self.root = p.children[0];
                self.inners.free(pid);
                self.height -= 1;
            }
            return;
        }
        if (p.len as usize) < INNER_MIN {
            self.rebalance_inner(path, depth);
        }
    }

    /// An inner node fell under INNER_MIN: merge it with a sibling, or even the two out.
    fn rebalance_inner(&mut self, path: &Path, depth: usize) {
        let pid = path.node[depth - 1];
        let i = path.idx[depth - 1] as usize;
        let li = i.saturating_sub(1);
        let p = self.inners.get(pid);
        let psep = p.seps[li];
        let (l_id, r_id) = (p.children[li], p.children[li + 1]);
        let (l, r) = self.inners.pair_mut(l_id, r_id);
        let (ll, rl) = (l.len as usize, r.len as usize);
        let total = ll + rl;
        let mut children = [NIL; 2 * INNER_CAP];
        let mut seps = [PAD; 2 * INNER_CAP];
        children[..ll].copy_from_slice(&l.children[..ll]);
        children[ll..total].copy_from_slice(&r.children[..rl]);
        seps[..ll - 1].copy_from_slice(&l.seps[..ll - 1]);
        seps[ll - 1] = psep;
        seps[ll..total - 1].copy_from_slice(&r.seps[..rl - 1]);
        if total <= INNER_CAP {
            l.children[..total].copy_from_slice(&children[..total]);
            l.seps[..total - 1].copy_from_slice(&seps[..total - 1]);
            l.len = total as u32;
            l.sync();
            self.inners.free(r_id);
            self.remove_child(path, depth - 1, li);
            return;
        }
        let k = total / 2;
        l.children[..k].copy_from_slice(&children[..k]);
        l.children[k..].fill(NIL);
        l.seps[..k - 1].copy_from_slice(&seps[..k - 1]);
        l.seps[k - 1..].fill(PAD);
        l.len = k as u32;
        r.children[..total - k].copy_from_slice(&children[k..total]);
        r.children[total - k..].fill(NIL);
        r.seps[..total - k - 1].copy_from_slice(&seps[k..total - 1]);
        r.seps[total - k - 1..].fill(PAD);
        r.len = (total - k) as u32;
        l.sync();
        r.sync();
        let p = self.inners.get_mut(pid);
        p.seps[li] = seps[k - 1];
        p.sync();
    }

    /// Checks every structural promise; returns what is broken.
    pub fn check(&self) -> Result<(), String> {
        let mut leaves = Vec::new();
        let count = self.check_node(self.root, self.height, 0, u64::MAX, true, &mut leaves)?;
        if count != self.len {
            return Err(format!("tree holds {count} entries, counts {}", self.len));
        }
        let mut last_end = 0;
        for (n, &id) in leaves.iter().enumerate() {
            let leaf = self.leaves.get(id);
            let want_next = leaves.get(n + 1).copied().unwrap_or(NIL);
            if leaf.next != want_next {
                return Err(format!("leaf {id}: next {} should be {want_next}", leaf.next));
            }
            for i in 0..leaf.len as usize {
                if leaf.start(i) < last_end {
                    return Err(format!("leaf {id} slot {i}: starts at {} before {last_end}", leaf.start(i)));
                }
                last_end = leaf.ends[i];
            }
        }
        Ok(())
    }

    fn check_node(
        &self,
        id: u32,
        height: usize,
        lo: u64,
        hi: u64,
        root: bool,
        leaves: &mut Vec<u32>,
    ) -> Result<usize, String> {
        if height == 0 {
            let leaf = self.leaves.get(id);
            let len = leaf.len as usize;
            if len > LEAF_CAP || (!root && len == 0) {
                return Err(format!("leaf {id}: bad length {len}"));
            }
            for i in 0..len {
                if leaf.sizes[i] == 0 {
                    return Err(format!("leaf {id} slot {i}: empty extent"));
                }
                if leaf.sizes[i] as u64 > leaf.ends[i] {
                    return Err(format!("leaf {id} slot {i}: extent starts before sector 0"));
                }
                if leaf.start(i) < lo || leaf.ends[i] > hi {
                    return Err(format!(
                        "leaf {id} slot {i}: {}..{} outside separators {lo}..{hi}",
                        leaf.start(i),
                        leaf.ends[i]
                    ));
                }
                if i > 0 && leaf.start(i) < leaf.ends[i - 1] {
                    return Err(format!("leaf {id} slot {i}: overlaps slot {}", i - 1));
                }
            }
            if leaf.ends[len..].iter().any(|&e| e != PAD) {
                return Err(format!("leaf {id}: unused slots not padded"));
            }
            if (0..LGROUPS - 1).any(|g| leaf.tops[g] != leaf.ends[g * LGROUP + LGROUP - 1]) {
                return Err(format!("leaf {id}: group tops out of step with the ends"));
            }
            leaves.push(id);
            return Ok(len);
        }
        let inner = self.inners.get(id);
        let len = inner.len as usize;
        if !(2..=INNER_CAP).contains(&len) {
            return Err(format!("inner {id}: bad length {len}"));
        }
        if inner.seps[len - 1..].iter().any(|&s| s != PAD) {
            return Err(format!("inner {id}: unused separators not padded"));
        }
        let mut synced = *inner;
        synced.sync();
        if synced.base != inner.base || synced.keys != inner.keys {
            return Err(format!("inner {id}: compact separators out of step with the separators"));
        }
        let mut count = 0;
        for c in 0..len {
            let clo = if c == 0 { lo } else { inner.seps[c - 1] };
            let chi = if c + 1 == len { hi } else { inner.seps[c] };
            if clo > chi || clo < lo || chi > hi {
                return Err(format!("inner {id}: separator {c} out of order ({clo}..{chi} within {lo}..{hi})"));
            }
            count += self.check_node(inner.children[c], height - 1, clo, chi, false, leaves)?;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Words are cache offsets: the piece `skip` sectors in maps to `word + skip`.
    #[derive(Default)]
    struct Offsets {
        released: u64,
        wholes: u64,
    }

    impl Trim for Offsets {
        fn release(&mut self, _e: &Entry, _skip: u64, len: u64, whole: bool) {
            self.released += len;
            self.wholes += whole as u64;
        }
        fn keep(&mut self, e: &Entry, skip: u64, _split: bool) -> u64 {
            e.word + skip
        }
    }

    /// The same operation on a map of start -> (end, word).
    fn model_replace(m: &mut BTreeMap<u64, (u64, u64)>, s: u64, e: u64, new: Option<u64>) {
        let before = m.range(..s).next_back().filter(|(_, &(end, _))| end > s);
        let hit: Vec<_> = before.into_iter().chain(m.range(s..e)).map(|(&k, &v)| (k, v)).collect();
        for (start, (end, w)) in hit {
            m.remove(&start);
            if start < s {
                m.insert(start, (s, w));
            }
            if end > e {
                m.insert(e, (end, w + (e - start)));
            }
        }
        if let Some(w) = new {
            m.insert(s, (e, w));
        }
    }

    fn contents(t: &Tree) -> BTreeMap<u64, (u64, u64)> {
        let mut out = BTreeMap::new();
        let mut c = t.first();
        while let Some(e) = t.get(c) {
            out.insert(e.start(), (e.end, e.word));
            t.advance(&mut c);
        }
        out
    }

    fn node_counts(t: &Tree) -> (usize, usize) {
        (t.leaves.live(), t.inners.live())
    }

    /// Deterministic xorshift, so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_replaces_match_a_map_through_splits_and_merges() {
        let mut t = Tree::new();
        let mut m = BTreeMap::new();
        let mut trim = Offsets::default();
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let mut max_height = 0;
        // Grow to a three-level tree with many small extents, then churn, then shrink it
        // with wide invalidations so inner nodes merge and the root collapses.
        let phases: [(usize, u64, u64, u64); 3] =
            [(80_000, 1_500_000, 16, 0), (20_000, 1_500_000, 64, 10), (2_000, 1_500_000, 4_000, 50)];
        for (ops, space, maxlen, pct_clear) in phases {
            for n in 0..ops {
                let s = rng.below(space);
                let len = 1 + rng.below(maxlen);
                let clear = rng.below(100) < pct_clear;
                let new = if clear || len > u16::MAX as u64 { None } else { Some(rng.below(1 << 40)) };
                t.replace(s, s + len, new, &mut trim);
                model_replace(&mut m, s, s + len, new);
                max_height = max_height.max(t.height);
                if n % 2_000 == 0 {
                    t.check().unwrap();
                    assert_eq!(t.len(), m.len());
                }
            }
            t.check().unwrap();
            assert_eq!(contents(&t), m);
        }
        assert!(max_height >= 2, "the test never built a tree with inner levels (height {max_height})");
        // Sweep from the left: inner nodes empty out next to full siblings and borrow.
        for x in (0..1_500_000).step_by(3_000) {
            t.replace(x, x + 3_000, None, &mut trim);
            model_replace(&mut m, x, x + 3_000, None);
            if x % 60_000 == 0 {
                t.check().unwrap();
                assert_eq!(t.len(), m.len());
            }
        }
        assert_eq!(contents(&t), m);
        t.replace(0, 1 << 40, None, &mut trim);
        t.check().unwrap();
        assert_eq!(t.len(), 0);
        assert_eq!(t.height, 0);
        assert_eq!(node_counts(&t), (1, 0));
    }

    #[test]
    fn lookups_find_the_first_extent_ending_after_a_sector() {
        let mut t = Tree::new();
        let mut trim = Offsets::default();
        for i in 0..5_000u64 {
            t.replace(i * 10 + 2, i * 10 + 7, Some(i), &mut trim);
        }
        t.check().unwrap();
        for s in [0u64, 1, 2, 6, 7, 8, 12, 49_996, 49_997] {
            let want = (s + 3) / 10;
            let got = t.get(t.seek(s)).map(|e| e.word);
            assert_eq!(got, (want < 5_000).then_some(want), "seek({s})");
        }
    }

    #[test]
    fn sorted_appends_leave_full_leaves() {
        let mut t = Tree::new();
        let mut trim = Offsets::default();
        let n = 100_000u64;
        for i in 0..n {
            t.replace(i * 8, i * 8 + 8, Some(i), &mut trim);
        }
        t.check().unwrap();
        let (leaves, _) = node_counts(&t);
        assert!(leaves as u64 <= n / LEAF_CAP as u64 + 2, "{leaves} leaves for {n} sorted appends");
    }

    #[test]
    fn random_inserts_share_with_siblings_before_splitting() {
        // Splitting at every overflow leaves leaves about two thirds full under random
        // inserts; sharing with a sibling first keeps them nearer four fifths.
        let mut t = Tree::new();
        let mut m = BTreeMap::new();
        let mut trim = Offsets::default();
        let mut rng = Rng(0x3c6ef372fe94f82b);
        for _ in 0..100_000 {
            let s = rng.below(1 << 40) & !7;
            let new = Some(rng.below(1 << 40));
            t.replace(s, s + 8, new, &mut trim);
            model_replace(&mut m, s, s + 8, new);
        }
        t.check().unwrap();
        assert_eq!(contents(&t), m);
        let (leaves, _) = node_counts(&t);
        let fill = t.len() as f64 / (leaves * LEAF_CAP) as f64;
        assert!(fill > 0.75, "leaves {:.0}% full on average", fill * 100.0);
    }

    #[test]
    fn four_overlap_cases_cut_and_split() {
        let mut t = Tree::new();
        let mut trim = Offsets::default();
        t.replace(100, 200, Some(1000), &mut trim);
        // Contained: the new extent splits the old one in two.
        t.replace(140, 150, Some(5000), &mut trim);
        assert_eq!(
            contents(&t).into_iter().collect::<Vec<_>>(),
            vec![(100, (140, 1000)), (140, (150, 5000)), (150, (200, 1050))]
        );
        // Head of the new one over the tail of an old one, tail over the head of the next.
        t.replace(130, 160, Some(7000), &mut trim);
        assert_eq!(
            contents(&t).into_iter().collect::<Vec<_>>(),
            vec![(100, (130, 1000)), (130, (160, 7000)), (160, (200, 1060))]
        );
        // Contain: the new extent covers old ones whole.
        t.replace(90, 210, Some(9000), &mut trim);
        assert_eq!(contents(&t).into_iter().collect::<Vec<_>>(), vec![(90, (210, 9000))]);
        assert_eq!(trim.wholes, 4);
        t.check().unwrap();
    }

    #[test]
    fn leaf_slot_search_agrees_with_a_search_of_all_ends() {
        let mut rng = Rng(0x2545f4914f6cdd1d);
        for len in 0..=LEAF_CAP {
            let mut leaf = Leaf::BLANK;
            let mut ends: Vec<u64> = (0..len).map(|_| 1 + rng.below(1 << 20)).collect();
            ends.sort_unstable();
            ends.dedup();
            leaf.ends[..ends.len()].copy_from_slice(&ends);
            leaf.len = ends.len() as u32;
            leaf.retop();
            let probes = ends.iter().flat_map(|&x| [x - 1, x, x + 1]).chain((0..100).map(|_| rng.below(1 << 20)));
            for s in probes.chain([0, u64::MAX - 1]) {
                assert_eq!(leaf.slot_of(s), rank(&leaf.ends, s), "len {len}, s {s}");
            }
        }
    }

    #[test]
    fn lookup_prefetch_covers_every_line_of_a_leaf() {
        // `prefetch_lookup` names line 0, `sizes`, and each group's first end and word.
        use std::mem::offset_of;
        let line = |off: usize| off / 64;
        let mut lines = vec![line(offset_of!(Leaf, tops))];
        lines.extend([0, 64].map(|b| line(offset_of!(Leaf, sizes) + b)));
        for g in 0..LGROUPS {
            lines.push(line(offset_of!(Leaf, ends) + 8 * g * LGROUP));
            lines.push(line(offset_of!(Leaf, words) + 8 * g * LGROUP));
        }
        assert_eq!(std::mem::size_of_val(&Leaf::BLANK.tops), 56);
        assert_eq!(std::mem::size_of_val(&Leaf::BLANK.sizes), 128);
        assert_eq!(offset_of!(Leaf, ends) % 64, 0);
        assert_eq!(offset_of!(Leaf, words) % 64, 0);
        assert_eq!(offset_of!(Leaf, sizes) % 64, 0);
        lines.sort_unstable();
        assert_eq!(lines, (0..std::mem::size_of::<Leaf>() / 64).collect::<Vec<_>>());
    }

    #[test]
    fn leaf_tops_follow_splits_merges_and_borrows() {
        // check() compares every leaf's tops with its ends; grow, churn and shrink a tree
        // through every leaf-changing path and check after each phase.
        let mut t = Tree::new();
        let mut trim = Offsets::default();
        let mut rng = Rng(0x853c49e6748fea9b);
        for i in 0..20_000u64 {
            t.replace(i * 16, i * 16 + 8, Some(i), &mut trim);
        }
        t.check().unwrap();
        for _ in 0..20_000 {
            let s = rng.below(20_000 * 16);
            t.replace(s, s + 1 + rng.below(40), Some(rng.below(1 << 30)), &mut trim);
        }
        t.check().unwrap();
        for x in (0..20_000 * 16).step_by(500) {
            t.replace(x, x + 300, None, &mut trim);
        }
        t.check().unwrap();
        let mut c = t.first();
        while let Some(e) = t.get(c) {
            assert_eq!(t.get(t.seek(e.start())), Some(e));
            t.advance(&mut c);
        }
    }

    /// Inner nodes whose separators fit in 32-bit offsets, and wide ones.
    fn inner_kinds(t: &Tree) -> (usize, usize) {
        let (mut compact, mut wide) = (0, 0);
        let mut level = vec![t.root];
        for _ in 0..t.height {
            let mut next = Vec::new();
            for &id in &level {
                let inner = t.inners.get(id);
                if inner.base == WIDE {
                    wide += 1;
                } else {
                    compact += 1;
                }
                next.extend_from_slice(&inner.children[..inner.len as usize]);
            }
            level = next;
        }
        (compact, wide)
    }

    #[test]
    fn compact_separators_pick_the_same_child_as_full_ones() {
        let mut rng = Rng(0x6a09e667f3bcc909);
        let top = crate::index::KEY_OFFSET_MAX;
        // Spans well inside 32 bits, right at the limit, just past it, and the whole range.
        for span in [1_000u64, MAX_DELTA - 1, MAX_DELTA, MAX_DELTA + 1, 1 << 40, top] {
            for len in [2usize, 3, 17, INNER_CAP] {
                let lo = rng.below(top - span.min(top - 1));
                let mut seps: Vec<u64> = (0..len - 1).map(|_| lo + rng.below(span + 1)).collect();
                seps[0] = lo;
                if len > 2 {
                    seps[1] = lo + span;
                }
                seps.sort_unstable();
                let mut inner = Inner::BLANK;
                inner.seps[..len - 1].copy_from_slice(&seps);
                inner.len = len as u32;
                inner.sync();
                let fits = seps[len - 2] - seps[0] <= MAX_DELTA;
                assert_eq!(inner.base != WIDE, fits, "span {span}, len {len}");
                let probes = seps.iter().flat_map(|&x| [x.saturating_sub(1), x, x + 1]);
                for s in probes.chain([0, lo + span / 2, lo + MAX_DELTA, lo + MAX_DELTA + 1, top, u64::MAX - 1]) {
                    assert_eq!(inner.child_slot(s), rank(&inner.seps, s), "span {span}, len {len}, s {s}");
                }
            }
        }
    }

    #[test]
    fn wide_key_ranges_match_a_map() {
        // Extents in clusters from sector 0 to the top of the key space: some inner nodes
        // span less than 2^32 sectors, others more, and nodes change kind as they split,
        // merge and have separators raised. check() holds compact and full separators in step.
        let top = crate::index::KEY_OFFSET_MAX;
        let bases = [0u64, (1 << 32) - 5_000, 1 << 41, 3 << 50, top - (1 << 34), top - 40_000];
        let mut t = Tree::new();
        let mut m = BTreeMap::new();
        let mut trim = Offsets::default();
        let mut rng = Rng(0xbb67ae8584caa73b);
        let (mut saw_compact, mut saw_wide) = (false, false);
        for n in 0..60_000 {
            let base = bases[rng.below(bases.len() as u64) as usize];
            // Mostly dense near the cluster's base, sometimes anywhere up to 2^36 past it.
            let reach = if rng.below(4) == 0 { 1 << 36 } else { 400_000 };
            let s = (base + rng.below(reach)).min(top - 1_000);
            let len = 1 + rng.below(if n % 50 == 0 { 100_000 } else { 64 });
            let new = if len > u16::MAX as u64 || rng.below(10) == 0 { None } else { Some(rng.below(1 << 40)) };
            t.replace(s, s + len, new, &mut trim);
            model_replace(&mut m, s, s + len, new);
            if n % 3_000 == 0 {
                t.check().unwrap();
                let (c, w) = inner_kinds(&t);
                saw_compact |= c > 0;
                saw_wide |= w > 0;
            }
        }
        t.check().unwrap();
        assert_eq!(contents(&t), m);
        assert!(saw_compact && saw_wide, "compact nodes: {saw_compact}, wide nodes: {saw_wide}");
        for (&start, &(end, _)) in m.iter().step_by(7) {
            assert_eq!(t.get(t.seek(start)).map(|e| e.end), Some(end));
            assert_eq!(t.get(t.seek(end - 1)).map(|e| e.end), Some(end));
        }
        // Shrink it back: merges across the wide gaps.
        for base in bases {
            t.replace(base.min(top - (1 << 37)), base.min(top - (1 << 37)) + (1 << 37), None, &mut trim);
            model_replace(&mut m, base.min(top - (1 << 37)), base.min(top - (1 << 37)) + (1 << 37), None);
            t.check().unwrap();
            assert_eq!(contents(&t), m);
        }
    }

    #[test]
    fn rank_counts_keys_at_or_below() {
        let mut keys = [PAD; 8];
        keys[..5].copy_from_slice(&[3, 5, 9, 10, 20]);
        assert_eq!(rank(&keys, 0), 0);
        assert_eq!(rank(&keys, 3), 1);
        assert_eq!(rank(&keys, 4), 1);
        assert_eq!(rank(&keys, 9), 3);
        assert_eq!(rank(&keys, 19), 4);
        assert_eq!(rank(&keys, 20), 5);
        assert_eq!(rank(&keys, u64::MAX - 1), 5);
        let full: [u64; 4] = [1, 2, 3, 4];
        assert_eq!(rank(&full, 4), 4);
        assert_eq!(rank(&full, 0), 0);
    }
}
