//! Extent index benchmark: random lookups and inserts at 1M and 10M extents, memory per
//! extent measured with a counting allocator, and the same lookups on a
//! `BTreeMap<u64, Extent>` holding the same extents, in the same run.
//!
//! Workload: extents of 4 KiB..512 KiB (8..1024 sectors, 4 KiB aligned) at random offsets
//! over a 1 TiB cached device. 10M such extents cannot coexist in 1 TiB (they would need
//! ~2.6 TB; random overwrites settle near 8M keys), so the population is built from N
//! distinct random starts, each extent clipped at the next start, inserted in random order
//! ("build"). Then "overwrite" inserts 1M unclipped random extents into the full index, so
//! most of them cut, split or replace old keys.
//!
//! Lookups ask for random 4 KiB reads, and for random reads of 4 KiB..512 KiB; each gets
//! every fragment (hits and holes) with the gen of each hit checked. The index and the map
//! run the same sequences in alternating blocks, so both see the same machine load; then the
//! index runs them again through `lookup_many` in batches of 64.
//!
//! Rates are per second of this thread's CPU time (the machine is shared; wall-clock rates
//! are printed next to them and match on an idle machine). The JSON's `lookups_per_s` is
//! single 4 KiB lookups, `inserts_per_s` the slower of build and overwrite.
//!
//! Run: `cargo bench -p ubcache-core --bench index`. Environment: INDEX_BENCH_SIZES (comma-
//! separated extent counts, default 1000000,10000000), INDEX_BENCH_LOOKUPS (per kind,
//! default 4000000), INDEX_BENCH_SKIP_MAP (no BTreeMap), INDEX_BENCH_STRIPES (also measure
//! dm-pcache-style 4 MiB striping; needs ~1.3 GB), INDEX_BENCH_VERIFY (check the index after).
//! The last stdout line is the JSON of the last size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ubcache_core::index::{
    BucketAccounting, BucketGens, ExtentIndex, Fragment, FragmentKind, Key, LookupReq, Ptr, ScanFilter, ScanPos,
};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size(), Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size(), Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        ALLOCATED.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new, Relaxed);
        ALLOCATED.fetch_sub(l.size(), Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocated() -> usize {
    ALLOCATED.load(Relaxed)
}

/// CPU time of this thread: on a shared machine, wall-clock time also counts the time other
/// processes held the core.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall-clock and thread CPU time of a piece of work.
struct Timer(Instant, Duration);

impl Timer {
    fn start() -> Timer {
        Timer(Instant::now(), thread_cpu())
    }
    /// (wall, cpu) rates of `n` operations.
    fn rates(&self, n: usize) -> Rate {
        let wall = self.0.elapsed().as_secs_f64();
        let cpu = (thread_cpu() - self.1).as_secs_f64();
        Rate { wall: n as f64 / wall, cpu: n as f64 / cpu }
    }
}

/// Time accumulated over several timed blocks.
#[derive(Default)]
struct Elapsed {
    wall: Duration,
    cpu: Duration,
}

impl Elapsed {
    fn add(&mut self, t: &Timer) {
        self.wall += t.0.elapsed();
        self.cpu += thread_cpu() - t.1;
    }
    fn rate(&self, n: usize) -> Rate {
        Rate { wall: n as f64 / self.wall.as_secs_f64(), cpu: n as f64 / self.cpu.as_secs_f64() }
    }
}

#[derive(Clone, Copy, Default)]
struct Rate {
    wall: f64,
    cpu: f64,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}M/s (wall-clock {:.2}M/s)", self.cpu / 1e6, self.wall / 1e6)
    }
}

const SPACE_BLOCKS: u64 = 1 << 28; // 1 TiB in 4 KiB blocks
const BLOCK: u64 = 8; // sectors
const MAX_BLOCKS: u64 = 128; // 512 KiB
const BUCKET_BITS: u32 = 10; // 512 KiB buckets
const DEFAULT_LOOKUPS: usize = 4_000_000;
const OVERWRITES: usize = 1_000_000;
const LOOKUP_BLOCK: usize = 51_200;
const LOOKUP_BATCH: usize = 64;
const LOOKUP_MODES: [&str; 2] = ["4 KiB", "4 KiB..512 KiB"];

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
    /// A random extent length in sectors: 4 KiB..512 KiB.
    fn len(&mut self) -> u64 {
        (1 + self.below(MAX_BLOCKS)) * BLOCK
    }
}

/// The allocator stand-in: gens and sector counts of 512 KiB buckets, with a bump pointer
/// handing out cache space.
struct Buckets {
    gens: Vec<u8>,
    sectors: Vec<i32>,
    bucket: u64,
    used: u64,
}

impl Buckets {
    fn new() -> Buckets {
        Buckets { gens: vec![0], sectors: vec![0], bucket: 0, used: 0 }
    }

    fn alloc(&mut self, len: u64) -> Ptr {
        if self.used + len > 1 << BUCKET_BITS {
            self.bucket += 1;
            self.used = 0;
            self.gens.push(0);
            self.sectors.push(0);
        }
        let p = Ptr::new(0, (self.bucket << BUCKET_BITS) + self.used, 0).unwrap();
        self.used += len;
        p
    }
}

impl BucketGens for Buckets {
    #[inline]
    fn bucket_bits(&self) -> u32 {
        BUCKET_BITS
    }
    #[inline]
    fn bucket_gen(&self, _dev: u8, bucket: u64) -> Option<u8> {
        self.gens.get(bucket as usize).copied()
    }
    #[inline]
    fn prefetch_gen(&self, _dev: u8, bucket: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(g) = self.gens.get(bucket as usize) {
            // SAFETY: prefetching a valid address has no effect but on the cache.
            unsafe { std::arch::x86_64::_mm_prefetch(g as *const u8 as *const i8, std::arch::x86_64::_MM_HINT_T0) };
        }
    }
}

impl BucketAccounting for Buckets {
    #[inline]
    fn add_sectors(&mut self, _dev: u8, bucket: u64, sectors: i64, _dirty: bool) {
        if let Some(s) = self.sectors.get_mut(bucket as usize) {
            *s += sectors as i32;
        }
    }
}

/// What the reference map stores per extent (keyed by end sector, like bcache).
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Extent {
    size: u32,
    dirty: bool,
    ptr: Ptr,
}

/// The same lookup as `ExtentIndex::lookup` (fragments, gen check) on the map.
fn map_lookup(map: &BTreeMap<u64, Extent>, start: u64, len: u64, gens: &Buckets, out: &mut Vec<Fragment>) {
    out.clear();
    let end = start + len;
    let mut pos = start;
    for (&e_end, x) in map.range(start + 1..) {
        let es = e_end - x.size as u64;
        if es >= end {
            break;
        }
        if gens.ptr_stale(x.ptr) {
            continue;
        }
        let fs = es.max(start);
        if fs > pos {
            out.push(Fragment { start: pos, len: fs - pos, kind: FragmentKind::Hole });
        }
        let fe = e_end.min(end);
        out.push(Fragment {
            start: fs,
            len: fe - fs,
            kind: FragmentKind::Hit { ptr: x.ptr, offset: fs - es, dirty: x.dirty },
        });
        pos = fe;
    }
    if pos < end {
        out.push(Fragment { start: pos, len: end - pos, kind: FragmentKind::Hole });
    }
}

fn digest(out: &[Fragment]) -> u64 {
    out.iter()
        .map(|f| match f.kind {
            FragmentKind::Hit { ptr, offset, .. } => ptr.offset() + offset + f.len,
            _ => f.len,
        })
        .sum()
}

struct Figures {
    extents: usize,
    lookups_per_s: Rate,
    range_lookups_per_s: Rate,
    batched_lookups_per_s: Rate,
    batched_range_lookups_per_s: Rate,
    build_per_s: Rate,
    overwrite_per_s: Rate,
    bytes_per_extent: f64,
    btreemap_lookups_per_s: Rate,
    btreemap_range_lookups_per_s: Rate,
    btreemap_bytes_per_extent: f64,
    btreemap_bulk_bytes_per_extent: f64,
    /// A scan for 16 dirty keys among all the clean ones, and a scan of every key.
    dirty_scan: Duration,
    full_scan: Duration,
}

fn run(n: usize, seed: u64) -> Figures {
    let mut rng = SplitMix(seed);
    eprintln!("== {n} extents");

    // N distinct random starts, each extent clipped at the next start.
    let t = Instant::now();
    let mut starts: Vec<u64> = (0..n + n / 8).map(|_| rng.below(SPACE_BLOCKS)).collect();
    starts.sort_unstable();
    starts.dedup();
    while starts.len() > n {
        let i = rng.below(starts.len() as u64) as usize;
        starts.swap_remove(i);
    }
    starts.sort_unstable();
    assert_eq!(starts.len(), n, "not enough distinct starts");
    let mut pop: Vec<(u64, u64)> = (0..n)
        .map(|i| {
            let next = starts.get(i + 1).copied().unwrap_or(SPACE_BLOCKS);
            let blocks = (1 + rng.below(MAX_BLOCKS)).min(next - starts[i]);
            (starts[i] * BLOCK, blocks * BLOCK)
        })
        .collect();
    drop(starts);
    for i in (1..pop.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        pop.swap(i, j);
    }
    let mean = pop.iter().map(|&(_, l)| l).sum::<u64>() as f64 / n as f64 / 2.0;
    eprintln!("population ready in {:.1?}: mean extent {mean:.1} KiB (clipped at the next start)", t.elapsed());

    let mut b = Buckets::new();
    let ptrs: Vec<Ptr> = pop.iter().map(|&(_, len)| b.alloc(len)).collect();

    // Build.
    let before = allocated();
    let mut idx = ExtentIndex::new();
    let t = Timer::start();
    for (&(start, len), &p) in pop.iter().zip(&ptrs) {
        idx.insert(&Key::new(0, start, len, p), &mut b).unwrap();
    }
    let build_per_s = t.rates(n);
    let index_bytes = allocated() - before;
    assert_eq!(idx.len(), n);
    let bytes_per_extent = index_bytes as f64 / n as f64;
    eprintln!(
        "build: {n} random inserts: {build_per_s}; index holds {:.1} MiB = {bytes_per_extent:.2} B/extent (own estimate {:.2})",
        index_bytes as f64 / (1 << 20) as f64,
        idx.heap_bytes() as f64 / n as f64
    );

    if let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        if let Some(l) = smaps.lines().find(|l| l.starts_with("AnonHugePages")) {
            eprintln!("process {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }

    // The same extents in a BTreeMap, inserted in the same order.
    let with_map = std::env::var_os("INDEX_BENCH_SKIP_MAP").is_none();
    let mut map = BTreeMap::new();
    let mut btreemap_bytes_per_extent = 0.0;
    let mut btreemap_bulk_bytes_per_extent = 0.0;
    if with_map {
        let before = allocated();
        let bulk: BTreeMap<u64, Extent> = pop
            .iter()
            .zip(&ptrs)
            .map(|(&(start, len), &ptr)| (start + len, Extent { size: len as u32, dirty: false, ptr }))
            .collect();
        btreemap_bulk_bytes_per_extent = (allocated() - before) as f64 / n as f64;
        drop(bulk);
        let before = allocated();
        for (&(start, len), &ptr) in pop.iter().zip(&ptrs) {
            map.insert(start + len, Extent { size: len as u32, dirty: false, ptr });
        }
        btreemap_bytes_per_extent = (allocated() - before) as f64 / n as f64;
        eprintln!(
            "BTreeMap<u64, Extent>: {btreemap_bytes_per_extent:.2} B/extent \
             (built from sorted input, nodes full: {btreemap_bulk_bytes_per_extent:.2})"
        );
    }

    // Lookups: 4 KiB reads, and reads of 4 KiB..512 KiB. The index and the map run the
    // same sequences in alternating blocks, so both see the same machine load.
    let lookups: usize =
        std::env::var("INDEX_BENCH_LOOKUPS").map_or(DEFAULT_LOOKUPS, |v| v.parse().expect("INDEX_BENCH_LOOKUPS"));
    let mut out = Vec::with_capacity(64);
    let mut index_lookups = [Rate::default(); 2];
    let mut map_lookups = [Rate::default(); 2];
    for (m, mode) in LOOKUP_MODES.iter().enumerate() {
        let (mut ti, mut tm) = (Elapsed::default(), Elapsed::default());
        let mut frags = 0usize;
        for block in 0..lookups / LOOKUP_BLOCK {
            let block_seed = seed ^ (block as u64) << 32 ^ (m as u64) << 60;
            let mut lr = SplitMix(block_seed);
            let mut sum = 0u64;
            let t = Timer::start();
            for _ in 0..LOOKUP_BLOCK {
                let start = lr.below(SPACE_BLOCKS) * BLOCK;
                let len = if m == 0 { BLOCK } else { lr.len() };
                idx.lookup(0, start, len, &b, &mut out).unwrap();
                frags += out.len();
                sum = sum.wrapping_add(digest(&out));
            }
            ti.add(&t);
            let index_sum = black_box(sum);
            if !with_map {
                continue;
            }
            let mut lr = SplitMix(block_seed);
            let mut sum = 0u64;
            let t = Timer::start();
            for _ in 0..LOOKUP_BLOCK {
                let start = lr.below(SPACE_BLOCKS) * BLOCK;
                let len = if m == 0 { BLOCK } else { lr.len() };
                map_lookup(&map, start, len, &b, &mut out);
                sum = sum.wrapping_add(digest(&out));
            }
            tm.add(&t);
            assert_eq!(black_box(sum), index_sum, "the index and the BTreeMap disagree");
        }
        index_lookups[m] = ti.rate(lookups);
        map_lookups[m] = tm.rate(lookups);
        eprintln!(
            "lookups of {mode} ({:.2} fragments each): index {}, BTreeMap {}",
            frags as f64 / lookups as f64,
            index_lookups[m],
            map_lookups[m]
        );
    }
    drop(map);

    // The same lookups through lookup_many, a batch of 64 at a time (what the engine does
    // with the requests it drains from its queue).
    let mut index_batched = [Rate::default(); 2];
    let mut bounds = Vec::with_capacity(LOOKUP_BATCH + 1);
    let mut reqs = Vec::with_capacity(LOOKUP_BATCH);
    for (m, mode) in LOOKUP_MODES.iter().enumerate() {
        let mut tb = Elapsed::default();
        for block in 0..lookups / LOOKUP_BLOCK {
            let block_seed = seed ^ (block as u64) << 32 ^ (m as u64) << 60;
            let mut lr = SplitMix(block_seed);
            let mut sum = 0u64;
            let t = Timer::start();
            for _ in 0..LOOKUP_BLOCK / LOOKUP_BATCH {
                reqs.clear();
                for _ in 0..LOOKUP_BATCH {
                    let start = lr.below(SPACE_BLOCKS) * BLOCK;
                    let len = if m == 0 { BLOCK } else { lr.len() };
                    reqs.push(LookupReq { inode: 0, start, len });
                }
                idx.lookup_many(&reqs, &b, &mut out, &mut bounds).unwrap();
                sum = sum.wrapping_add(digest(&out));
            }
            tb.add(&t);
            black_box(sum);
        }
        index_batched[m] = tb.rate(lookups);
        eprintln!("lookups of {mode} in batches of {LOOKUP_BATCH}: index {}", index_batched[m]);
    }
    if std::env::var_os("INDEX_BENCH_STRIPES").is_some() {
        striped(&pop, &ptrs, &mut b, seed);
    }
    drop(pop);
    drop(ptrs);

    // Overwrites: unclipped random extents over the full index.
    let writes: Vec<(u64, u64, Ptr)> = (0..OVERWRITES)
        .map(|_| {
            let len = rng.len();
            (rng.below(SPACE_BLOCKS - MAX_BLOCKS) * BLOCK, len, b.alloc(len))
        })
        .collect();
    let keys_before = idx.len();
    let t = Timer::start();
    for &(start, len, p) in &writes {
        idx.insert(&Key::new(0, start, len, p), &mut b).unwrap();
    }
    let overwrite_per_s = t.rates(OVERWRITES);
    eprintln!(
        "overwrites: {OVERWRITES} random inserts with fix-up: {overwrite_per_s} (keys {keys_before} -> {})",
        idx.len()
    );
    // Writeback's scan for dirty keys among all these clean ones: 16 dirty extents.
    for _ in 0..16 {
        let start = rng.below(SPACE_BLOCKS - MAX_BLOCKS) * BLOCK;
        idx.insert(&Key::new(0, start, BLOCK, b.alloc(BLOCK)).with_dirty(true), &mut b).unwrap();
    }
    let scan_all = |idx: &mut ExtentIndex, b: &Buckets, filter: ScanFilter| {
        let (mut keys, mut pos, mut found) = (Vec::new(), ScanPos::default(), 0usize);
        loop {
            let next = idx.scan(pos, filter, 64, b, &mut keys);
            found += keys.iter().filter(|k| k.dirty).count();
            match next {
                Some(p) => pos = p,
                None => return found,
            }
        }
    };
    // The first dirty scan clears the map's regions that hold nothing dirty; time the next.
    assert!(scan_all(&mut idx, &b, ScanFilter::Dirty) >= 16);
    let t = Instant::now();
    let found = scan_all(&mut idx, &b, ScanFilter::Dirty);
    let dirty_scan = t.elapsed();
    let t = Instant::now();
    assert_eq!(scan_all(&mut idx, &b, ScanFilter::All), found);
    let full_scan = t.elapsed();
    eprintln!(
        "dirty scan: {found} dirty keys among {} in {dirty_scan:.1?} (a scan of every key: {full_scan:.1?})",
        idx.len()
    );
    if std::env::var_os("INDEX_BENCH_VERIFY").is_some() {
        idx.verify().unwrap();
        eprintln!("index verified");
    }

    Figures {
        extents: n,
        lookups_per_s: index_lookups[0],
        range_lookups_per_s: index_lookups[1],
        batched_lookups_per_s: index_batched[0],
        batched_range_lookups_per_s: index_batched[1],
        build_per_s,
        overwrite_per_s,
        bytes_per_extent,
        btreemap_lookups_per_s: map_lookups[0],
        btreemap_range_lookups_per_s: map_lookups[1],
        btreemap_bytes_per_extent,
        btreemap_bulk_bytes_per_extent,
        dirty_scan,
        full_scan,
    }
}

/// dm-pcache stripes its key space into 4 MiB subtrees. Measured here by giving each
/// stripe a tree of its own (one inode per stripe), with the same extents and 4 KiB lookups.
fn striped(pop: &[(u64, u64)], ptrs: &[Ptr], b: &mut Buckets, seed: u64) {
    const STRIPE_SECTORS: u64 = 8192;
    let n = pop.len();
    let before = allocated();
    let mut idx = ExtentIndex::new();
    let t = Timer::start();
    for (&(start, len), &p) in pop.iter().zip(ptrs) {
        // Split at stripe boundaries, as a striped index must.
        let mut s = start;
        while s < start + len {
            let e = (start + len).min((s / STRIPE_SECTORS + 1) * STRIPE_SECTORS);
            let q = Ptr::new(0, p.offset() + (s - start), 0).unwrap();
            idx.insert(&Key::new((s / STRIPE_SECTORS) as u32, s % STRIPE_SECTORS, e - s, q), b).unwrap();
            s = e;
        }
    }
    let build = t.rates(n);
    let bytes = (allocated() - before) as f64 / n as f64;
    let mut out = Vec::new();
    let mut lr = SplitMix(seed);
    let t = Timer::start();
    let lookups = 2_000_000;
    for _ in 0..lookups {
        let s = lr.below(SPACE_BLOCKS) * BLOCK;
        idx.lookup((s / STRIPE_SECTORS) as u32, s % STRIPE_SECTORS, BLOCK, b, &mut out).unwrap();
        black_box(&out);
    }
    eprintln!(
        "striped into 4 MiB subtrees: {} keys, {bytes:.2} B/extent, build {build}, 4 KiB lookups {}",
        idx.len(),
        t.rates(lookups)
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::var("INDEX_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().expect("INDEX_BENCH_SIZES: comma-separated counts")).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000]);
    let mut last = None;
    for (i, &n) in sizes.iter().enumerate() {
        let f = run(n, 0x5eed + i as u64);
        println!(
            "{} extents: 4 KiB lookups {} (BTreeMap {}, x{:.2}); 4..512 KiB lookups {} (BTreeMap {}, x{:.2}); \
             batched: 4 KiB {}, 4..512 KiB {}; inserts: build {}, overwrite {}; \
             {:.2} B/extent (BTreeMap {:.2}, bulk-built {:.2})",
            f.extents,
            f.lookups_per_s,
            f.btreemap_lookups_per_s,
            f.lookups_per_s.cpu / f.btreemap_lookups_per_s.cpu,
            f.range_lookups_per_s,
            f.btreemap_range_lookups_per_s,
            f.range_lookups_per_s.cpu / f.btreemap_range_lookups_per_s.cpu,
            f.batched_lookups_per_s,
            f.batched_range_lookups_per_s,
            f.build_per_s,
            f.overwrite_per_s,
            f.bytes_per_extent,
            f.btreemap_bytes_per_extent,
            f.btreemap_bulk_bytes_per_extent
        );
        last = Some(f);
    }
    let f = last.expect("at least one size");
    // Rates per second of thread CPU time (equal to wall-clock on an idle machine); inserts
    // are the slower of building and overwriting.
    println!(
        "{{\"extents\": {}, \"lookups_per_s\": {:.0}, \"inserts_per_s\": {:.0}, \"bytes_per_extent\": {:.2}, \
         \"btreemap_lookups_per_s\": {:.0}, \"btreemap_bytes_per_extent\": {:.2}, \"dirty_scan_us\": {:.1}, \"full_scan_ms\": {:.1}}}",
        f.extents,
        f.lookups_per_s.cpu,
        f.build_per_s.cpu.min(f.overwrite_per_s.cpu),
        f.bytes_per_extent,
        f.btreemap_lookups_per_s.cpu,
        f.btreemap_bytes_per_extent,
        f.dirty_scan.as_secs_f64() * 1e6,
        f.full_scan.as_secs_f64() * 1e3
    );
}
