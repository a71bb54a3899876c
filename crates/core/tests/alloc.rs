//! Bucket allocator tests: an engine simulator drives the allocator (prio writes to an
//! in-memory disk, discards, GC fed from a model of the index) and checks it against that
//! model over long random sequences.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use ubcache_core::alloc::{
    lru_weight, prio, s3fifo, Allocator, CacheConfig, DataWrite, GcMark, PrioWrite, Ptr, PtrKind, Replacement, Reserve,
    SetConfig, Step, BTREE_PRIO, BUCKET_GC_GEN_MAX, INITIAL_PRIO, MAX_GC_SECTORS_USED,
};
use ubcache_core::index::{BucketAccounting, BucketGens, ExtentIndex, Key};
use ubcache_core::ErrorKind;

const UUID: [u8; 16] = *b"0123456789abcdef";

fn config(devs: usize, nbuckets: u64, replacement: Replacement, discard: bool) -> SetConfig {
    SetConfig {
        set_uuid: UUID,
        bucket_size: 16,
        block_size: 4,
        caches: (0..devs).map(|_| CacheConfig { nbuckets, first_bucket: 3, replacement, discard }).collect(),
        seed: 11,
    }
}

/// The engine's side: carries out the allocator's steps against an in-memory disk and
/// remembers which gens are durable (in the last committed prio chain).
struct Sim {
    a: Allocator,
    disk: Vec<HashMap<u64, Vec<u8>>>,
    head: Vec<Option<u64>>,
    durable: Vec<Vec<u8>>,
    /// Buckets the first GC pass put straight on the reserves (gens not yet durable).
    primed: HashSet<(u8, u64)>,
    bucket_bytes: usize,
    discards: u64,
}

impl Sim {
    fn new(cfg: &SetConfig) -> Sim {
        let a = Allocator::new(cfg).unwrap();
        let n = cfg.caches.len();
        let mut s = Sim {
            a,
            disk: vec![HashMap::new(); n],
            head: vec![None; n],
            durable: cfg.caches.iter().map(|c| vec![0; c.nbuckets as usize]).collect(),
            primed: HashSet::new(),
            bucket_bytes: cfg.bucket_size as usize * 512,
            discards: 0,
        };
        s.a.gc_start();
        s.a.gc_finish().unwrap();
        for dev in 0..n as u8 {
            for r in Reserve::ALL {
                for b in s.a.free_list(dev, r).unwrap() {
                    s.primed.insert((dev, b));
                }
            }
        }
        s
    }

    /// Runs every device's allocator until it waits on the engine; true if one needs GC.
    fn drive(&mut self) -> bool {
        let mut need_gc = false;
        for dev in 0..self.a.caches() as u8 {
            loop {
                match self.a.poll(dev).unwrap() {
                    Step::Idle | Step::Waiting => break,
                    Step::Discard(b) => {
                        self.discards += 1;
                        self.a.discard_done(dev, b).unwrap();
                    }
                    Step::WritePrios => self.write_prios(dev),
                    Step::NeedGc => {
                        need_gc = true;
                        break;
                    }
                }
            }
        }
        need_gc
    }

    fn write_prios(&mut self, dev: u8) {
        let w = self.a.prio_write_begin(dev).unwrap();
        self.finish_prio_write(dev, &w);
    }

    /// Writes the chain of a prio write begun (or forced), records it, commits it.
    fn finish_prio_write(&mut self, dev: u8, w: &PrioWrite) {
        for (link, &b) in w.buckets.iter().enumerate() {
            let mut buf = vec![0u8; self.bucket_bytes];
            self.a.encode_prio_bucket(dev, link, &mut buf).unwrap();
            self.disk[dev as usize].insert(b, buf);
        }
        // The journal records the head; only then is the write committed.
        self.head[dev as usize] = Some(w.buckets[0]);
        self.a.prio_write_committed(dev).unwrap();
        self.durable[dev as usize] =
            read_chain(&self.disk[dev as usize], w.buckets[0], self.a.pset_magic(), self.durable[dev as usize].len())
                .into_iter()
                .map(|(_, g)| g)
                .collect();
    }

    /// A GC pass reporting `live` pointers.
    fn gc(&mut self, live: &[Live]) -> Vec<u8> {
        self.a.gc_start();
        let stale = live.iter().map(|l| self.a.gc_mark_ptr(l.ptr, l.sectors, l.kind).unwrap()).collect();
        self.a.gc_finish().unwrap();
        stale
    }
}

/// Decodes a whole prio chain by hand from the format: (prio, gen) per bucket.
fn read_chain(disk: &HashMap<u64, Vec<u8>>, head: u64, magic: u64, nbuckets: usize) -> Vec<(u16, u8)> {
    let mut out = Vec::with_capacity(nbuckets);
    let mut b = head;
    while out.len() < nbuckets {
        let buf = &disk[&b];
        let h = prio::decode_prio_set_header(buf, magic, b).unwrap();
        let per = prio::prios_per_bucket(buf.len());
        for i in 0..per.min(nbuckets - out.len()) {
            out.push(prio::prio_entry(buf, i));
        }
        b = h.next_bucket;
    }
    out
}

/// Allocates, letting the allocator work in between when the free list is empty.
fn alloc_retry(s: &mut Sim, dev: u8, reserve: Reserve) -> u64 {
    for _ in 0..100 {
        match s.a.bucket_alloc(dev, reserve) {
            Ok(b) => return b,
            Err(_) => {
                s.drive();
            }
        }
    }
    panic!("no bucket for {reserve:?} on {dev}");
}

fn sectors_retry(s: &mut Sim, w: &DataWrite) -> ubcache_core::alloc::SectorAlloc {
    for _ in 0..100 {
        match s.a.alloc_sectors(w) {
            Ok(g) => return g,
            Err(_) => {
                s.drive();
            }
        }
    }
    panic!("no space for {w:?}");
}

#[derive(Clone, Debug)]
struct Live {
    ptr: Ptr,
    sectors: u32,
    kind: PtrKind,
    seen_stale: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(u8, Reserve),
    Release(usize),
    Pin(usize),
    Unpin(usize),
    Free(usize),
    Drop(usize),
    Dirty(usize),
    Writeback(usize),
    Touch(usize),
    Sectors { dev_hint: usize, write_point: u64, sectors: u32, flash: bool, continues: bool },
    Poll,
    Gc { drop_stale: bool },
}

fn op() -> impl Strategy<Value = Op> {
    let reserve = prop_oneof![Just(Reserve::None), Just(Reserve::Btree), Just(Reserve::MovingGc)];
    prop_oneof![
        6 => (0u8..2, reserve).prop_map(|(d, r)| Op::Alloc(d, r)),
        5 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Pin),
        1 => any::<usize>().prop_map(Op::Unpin),
        1 => any::<usize>().prop_map(Op::Free),
        3 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Dirty),
        1 => any::<usize>().prop_map(Op::Writeback),
        1 => any::<usize>().prop_map(Op::Touch),
        3 => (any::<usize>(), 0u64..4, 1u32..24, any::<bool>(), any::<bool>())
            .prop_map(|(dev_hint, write_point, sectors, flash, continues)| Op::Sectors { dev_hint, write_point, sectors, flash, continues }),
        6 => Just(Op::Poll),
        1 => any::<bool>().prop_map(|drop_stale| Op::Gc { drop_stale }),
    ]
}

/// What the model knows: pins it holds and the pointers the index holds.
#[derive(Default)]
struct Model {
    pins: HashMap<(u8, u64), u32>,
    live: Vec<Live>,
    /// Where each write stream (write point, flash) ended, to issue continuing writes.
    stream_end: HashMap<(u64, bool), (u64, u64)>,
}

impl Model {
    fn pin(&mut self, k: (u8, u64)) {
        *self.pins.entry(k).or_default() += 1;
    }
    fn unpin_any(&mut self, i: usize) -> Option<(u8, u64)> {
        if self.pins.is_empty() {
            return None;
        }
        let mut keys: Vec<_> = self.pins.keys().copied().collect();
        keys.sort();
        let k = keys[i % keys.len()];
        let n = self.pins.get_mut(&k).unwrap();
        *n -= 1;
        if *n == 0 {
            self.pins.remove(&k);
        }
        Some(k)
    }
}

fn bucket_of(a: &Allocator, p: Ptr) -> u64 {
    a.ptr_bucket(p).unwrap()
}

fn check_allocated(s: &Sim, m: &Model, dev: u8, b: u64) {
    assert!(!m.pins.contains_key(&(dev, b)), "bucket {dev}:{b} handed out while the model holds a pin on it");
    for l in &m.live {
        if l.ptr.dev() == dev && bucket_of(&s.a, l.ptr) == b {
            assert!(s.a.ptr_stale(l.ptr).unwrap() > 0, "bucket {dev}:{b} reused while {:?} still looks valid", l.ptr);
        }
    }
    if !s.primed.contains(&(dev, b)) {
        let gen = s.a.bucket(dev, b).unwrap().gen;
        assert_eq!(
            s.durable[dev as usize][b as usize], gen,
            "bucket {dev}:{b} reused before its gen {gen} was durable"
        );
    }
}

fn check_all(s: &Sim, m: &mut Model) {
    s.a.check_invariants().unwrap();
    let devs = s.a.caches() as u8;
    let mut free: HashSet<(u8, u64)> = HashSet::new();
    for dev in 0..devs {
        for r in Reserve::ALL {
            free.extend(s.a.free_list(dev, r).unwrap().into_iter().map(|b| (dev, b)));
        }
        free.extend(s.a.free_inc(dev).unwrap().into_iter().map(|b| (dev, b)));
        for b in 0..s.a.nbuckets(dev).unwrap() {
            let info = s.a.bucket(dev, b).unwrap();
            assert!(
                info.gen.wrapping_sub(info.last_gc) <= BUCKET_GC_GEN_MAX,
                "{dev}:{b} gen ran past the GC window: {info:?}"
            );
        }
    }
    for (&(dev, b), &n) in &m.pins {
        assert!(!free.contains(&(dev, b)), "pinned bucket {dev}:{b} is on a free list");
        assert!(s.a.bucket(dev, b).unwrap().pin as u32 >= n, "bucket {dev}:{b} lost pins");
    }
    for l in &mut m.live {
        let info = s.a.bucket(l.ptr.dev(), bucket_of(&s.a, l.ptr)).unwrap();
        let valid = s.a.ptr_valid(l.ptr);
        assert_eq!(valid, info.gen == l.ptr.gen());
        assert!(!(valid && l.seen_stale), "stale pointer {:?} looks valid again: gen wrapped", l.ptr);
        l.seen_stale |= !valid;
        if valid && l.kind == PtrKind::Dirty {
            assert!(
                !free.contains(&(l.ptr.dev(), bucket_of(&s.a, l.ptr))),
                "bucket with dirty data {:?} was invalidated",
                l.ptr
            );
        }
    }
}

fn run(devs: usize, replacement: Replacement, discard: bool, ops: Vec<Op>) {
    let cfg = config(devs, 600, replacement, discard);
    let mut s = Sim::new(&cfg);
    let mut m = Model::default();
    let bucket_size = cfg.bucket_size;
    for op in ops {
        match op {
            Op::Alloc(dev, reserve) => {
                let dev = dev % devs as u8;
                let before_prio = s.a.free_list(dev, Reserve::Prio).unwrap();
                let before_btree = s.a.free_list(dev, Reserve::Btree).unwrap();
                if let Ok(b) = s.a.bucket_alloc(dev, reserve) {
                    check_allocated(&s, &m, dev, b);
                    if reserve == Reserve::None {
                        assert_eq!(
                            s.a.free_list(dev, Reserve::Prio).unwrap(),
                            before_prio,
                            "RESERVE_NONE took a prio bucket"
                        );
                        assert_eq!(
                            s.a.free_list(dev, Reserve::Btree).unwrap(),
                            before_btree,
                            "RESERVE_NONE took a btree bucket"
                        );
                    }
                    let info = s.a.bucket(dev, b).unwrap();
                    let kind = if reserve == Reserve::Btree { PtrKind::Metadata } else { PtrKind::Clean };
                    assert_eq!(
                        info.mark,
                        if kind == PtrKind::Metadata { GcMark::Metadata } else { GcMark::Reclaimable }
                    );
                    if replacement == Replacement::S3Fifo && kind != PtrKind::Metadata {
                        // New data joins S3-FIFO's small queue, unread.
                        assert!(!s3fifo::in_main(info.prio) && s3fifo::freq(info.prio) == 0, "prio {:#x}", info.prio);
                    } else {
                        assert_eq!(info.prio, if kind == PtrKind::Metadata { BTREE_PRIO } else { INITIAL_PRIO });
                    }
                    m.pin((dev, b));
                    let ptr = s.a.bucket_ptr(dev, b).unwrap();
                    m.live.push(Live { ptr, sectors: bucket_size, kind, seen_stale: false });
                }
            }
            Op::Release(i) | Op::Unpin(i) => {
                if let Some((dev, b)) = m.unpin_any(i) {
                    s.a.unpin(dev, b).unwrap();
                }
            }
            Op::Pin(i) => {
                if !m.live.is_empty() {
                    let p = m.live[i % m.live.len()].ptr;
                    if s.a.ptr_valid(p) {
                        let b = bucket_of(&s.a, p);
                        s.a.pin(p.dev(), b).unwrap();
                        m.pin((p.dev(), b));
                    }
                }
            }
            Op::Free(i) => {
                let metas: Vec<usize> = (0..m.live.len())
                    .filter(|&j| m.live[j].kind == PtrKind::Metadata && s.a.ptr_valid(m.live[j].ptr))
                    .collect();
                if !metas.is_empty() {
                    let l = m.live.remove(metas[i % metas.len()]);
                    s.a.bucket_free(l.ptr.dev(), bucket_of(&s.a, l.ptr)).unwrap();
                }
            }
            Op::Drop(i) => {
                if !m.live.is_empty() {
                    m.live.remove(i % m.live.len());
                }
            }
            Op::Dirty(i) | Op::Writeback(i) | Op::Touch(i) => {
                if !m.live.is_empty() {
                    let j = i % m.live.len();
                    let l = &mut m.live[j];
                    if s.a.ptr_valid(l.ptr) && l.kind != PtrKind::Metadata {
                        match op {
                            Op::Dirty(_) => {
                                s.a.mark_dirty(l.ptr).unwrap();
                                l.kind = PtrKind::Dirty;
                            }
                            Op::Writeback(_) => l.kind = PtrKind::Clean,
                            _ => {
                                let before = s.a.bucket(l.ptr.dev(), bucket_of(&s.a, l.ptr)).unwrap().prio;
                                s.a.touch(l.ptr).unwrap();
                                let after = s.a.bucket(l.ptr.dev(), bucket_of(&s.a, l.ptr)).unwrap().prio;
                                if replacement == Replacement::S3Fifo {
                                    // One read more, in the same queue and epoch.
                                    assert_eq!(s3fifo::freq(after), (s3fifo::freq(before) + 1).min(s3fifo::FREQ_MAX));
                                    assert_eq!(after & !(3 << 13), before & !(3 << 13));
                                } else {
                                    assert_eq!(after, INITIAL_PRIO);
                                }
                            }
                        }
                    }
                }
            }
            Op::Sectors { dev_hint, write_point, sectors, flash, continues } => {
                let (inode, offset) = match m.stream_end.get(&(write_point, flash)) {
                    Some(&end) if continues => end,
                    _ => (write_point + if flash { 100 } else { 0 }, (dev_hint % 1000) as u64 * 64),
                };
                let w =
                    DataWrite { inode, offset, sectors, write_point, flash_only: flash, moving_gc: false, hot: false };
                if let Ok(got) = s.a.alloc_sectors(&w) {
                    assert!(got.sectors >= 1 && got.sectors <= sectors);
                    assert!(s.a.ptr_valid(got.ptr), "fresh allocation {got:?} is not valid");
                    let b = bucket_of(&s.a, got.ptr);
                    assert_eq!(
                        bucket_of(
                            &s.a,
                            Ptr::new(got.ptr.dev(), got.ptr.offset() + u64::from(got.sectors) - 1, got.ptr.gen())
                                .unwrap()
                        ),
                        b,
                        "allocation crosses a bucket"
                    );
                    assert!(s.a.bucket(got.ptr.dev(), b).unwrap().pin >= 1);
                    m.pin((got.ptr.dev(), b));
                    m.live.push(Live { ptr: got.ptr, sectors: got.sectors, kind: PtrKind::Clean, seen_stale: false });
                    m.stream_end.insert((write_point, flash), (inode, offset + u64::from(got.sectors)));
                }
            }
            Op::Poll => {
                if s.drive() {
                    s.gc(&m.live);
                    s.drive();
                }
            }
            Op::Gc { drop_stale } => {
                let stale = s.gc(&m.live);
                for (l, st) in m.live.iter().zip(&stale) {
                    assert_eq!(*st, s.a.ptr_stale(l.ptr).unwrap(), "GC and ptr_stale disagree on {:?}", l.ptr);
                }
                if drop_stale {
                    let a = &s.a;
                    m.live.retain(|l| a.ptr_valid(l.ptr));
                }
            }
        }
        check_all(&s, &mut m);
    }
    if discard {
        // Every bucket that reached a free list went through a discard.
        assert!(s.discards > 0 || s.a.meta_sectors_written(0).unwrap() == 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_sequences_lru(ops in prop::collection::vec(op(), 1..400)) {
        run(1, Replacement::Lru, false, ops);
    }

    #[test]
    fn random_sequences_fifo_two_devices(ops in prop::collection::vec(op(), 1..400)) {
        run(2, Replacement::Fifo, false, ops);
    }

    #[test]
    fn random_sequences_random_with_discard(ops in prop::collection::vec(op(), 1..400)) {
        run(1, Replacement::Random, true, ops);
    }

    #[test]
    fn random_sequences_s3fifo(ops in prop::collection::vec(op(), 1..400)) {
        run(1, Replacement::S3Fifo, false, ops);
    }
}

/// A long deterministic churn over a few buckets (GC marks the rest as metadata), with one
/// stale pointer kept in the index throughout: gens must stop at the GC window, ask for GC,
/// and go on after it, and the stale pointer must never look valid again.
#[test]
fn gen_wrap_is_held_back_until_gc() {
    let cfg = config(1, 600, Replacement::Fifo, false);
    let mut s = Sim::new(&cfg);
    let b0 = alloc_retry(&mut s, 0, Reserve::None);
    let old = s.a.bucket_ptr(0, b0).unwrap();
    s.a.unpin(0, b0).unwrap();
    let gc = |s: &mut Sim| {
        s.a.gc_start();
        s.a.gc_mark_ptr(old, 16, PtrKind::Clean).unwrap();
        for b in 100..600 {
            s.a.gc_mark_metadata_bucket(0, b).unwrap();
        }
        s.a.gc_finish().unwrap();
    };
    gc(&mut s);
    let mut gcs = 0;
    let mut allocated = 0u64;
    while allocated < 100 * 200 {
        match s.a.bucket_alloc(0, Reserve::None) {
            Ok(b) => {
                s.a.unpin(0, b).unwrap();
                allocated += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace);
                if s.drive() {
                    assert!(s.a.gc_wanted());
                    gcs += 1;
                    gc(&mut s);
                }
            }
        }
        let info = s.a.bucket(0, b0).unwrap();
        assert!(info.gen.wrapping_sub(info.last_gc) <= BUCKET_GC_GEN_MAX);
        if info.gen != old.gen() {
            assert!(s.a.ptr_stale(old).unwrap() > 0, "the old pointer must never look valid again");
        }
    }
    // 200 rounds over the cycling buckets need at least two GCs to keep gens in the window;
    // the bucket the stale pointer holds back stops at the window's edge.
    assert!(gcs >= 2, "only {gcs} GC passes");
    let info = s.a.bucket(0, b0).unwrap();
    assert_eq!(info.gen.wrapping_sub(old.gen()), BUCKET_GC_GEN_MAX);
    s.a.check_invariants().unwrap();
}

/// Buckets with random prios, gens and sectors, loaded as a restart loads them.
fn aged_sim(replacement: Replacement, seed: u64, nbuckets: u64) -> (Sim, Vec<(u16, u8)>) {
    let cfg = config(1, nbuckets, replacement, false);
    let mut a = Allocator::new(&cfg).unwrap();
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let entries: Vec<(u16, u8)> = (0..nbuckets).map(|_| ((next() % 40000) as u16, next() as u8)).collect();
    let bucket_bytes = cfg.bucket_size as usize * 512;
    let per = prio::prios_per_bucket(bucket_bytes);
    let links = prio::prio_buckets(nbuckets, bucket_bytes);
    let mut disk = HashMap::new();
    for link in 0..links {
        let mut buf = vec![0u8; bucket_bytes];
        let chunk = &entries[link * per..((link + 1) * per).min(entries.len())];
        let next_bucket = if link + 1 < links { 4 + link as u64 + 1 } else { 0 };
        prio::encode_prio_set(&mut buf, a.pset_magic(), 5, next_bucket, chunk.iter().copied()).unwrap();
        disk.insert(4 + link as u64, buf);
    }
    a.read_prios(0, 4, |b, out| {
        out.copy_from_slice(&disk[&b]);
        Ok(())
    })
    .unwrap();
    a.gc_start();
    for b in 3..nbuckets {
        let ptr = a.bucket_ptr(0, b).unwrap();
        // A set comes up with room for its first prio write (bcache: unused buckets "there
        // should always be some of"): one unused bucket per link after the old chain. Without
        // them the allocator rightly asks for GC instead (no_prio_write_is_asked_for_...).
        if (4 + links as u64..4 + 2 * links as u64).contains(&b) {
            continue;
        }
        // Few unused buckets: they weigh nothing, and a batch of ties would prove nothing.
        match next() % 200 {
            0 => {}
            1..=20 => {
                a.gc_mark_ptr(ptr, 8, PtrKind::Dirty).unwrap();
            }
            21..=40 => {
                a.gc_mark_ptr(ptr, 16, PtrKind::Metadata).unwrap();
            }
            41..=60 => a.pin(0, b).unwrap(),
            _ => {
                a.gc_mark_ptr(ptr, (next() % 16) as u32 + 1, PtrKind::Clean).unwrap();
            }
        }
    }
    a.gc_finish().unwrap();
    let sim = Sim {
        a,
        disk: vec![disk],
        head: vec![Some(4)],
        durable: vec![entries.iter().map(|e| e.1).collect()],
        primed: HashSet::new(),
        bucket_bytes,
        discards: 0,
    };
    (sim, entries)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// LRU takes exactly the eligible buckets of lowest weighted prio.
    #[test]
    fn lru_picks_lowest_weighted_prio(seed in any::<u64>(), nbuckets in 600u64..3000) {
        let (mut s, _) = aged_sim(Replacement::Lru, seed, nbuckets);
        let before: Vec<_> = (0..nbuckets).map(|b| s.a.bucket(0, b).unwrap()).collect();
        let min_prio = s.a.min_prio();
        let eligible = |b: u64| {
            let i = before[b as usize];
            b >= 3 && matches!(i.mark, GcMark::Unused | GcMark::Reclaimable) && i.pin == 0 && i.gen.wrapping_sub(i.last_gc) < BUCKET_GC_GEN_MAX
        };
        // bcache's bucket_prio (with one added to its floor, so that a full bucket never
        // weighs as little as an empty one), written out independently of the allocator's code.
        let key = |b: u64| {
            let i = before[b as usize];
            let floor = u64::from(INITIAL_PRIO.saturating_sub(min_prio)) / 8 + 1;
            let w = (u64::from(i.prio.saturating_sub(min_prio)) + floor) * u64::from(i.sectors_used);
            assert_eq!(w, lru_weight(i.prio, i.sectors_used, min_prio));
            w
        };
        s.a.poll(0).unwrap();
        let picked: HashSet<u64> = s.a.free_inc(0).unwrap().into_iter().collect();
        let want = s.a.free_inc_capacity(0).unwrap().min((0..nbuckets).filter(|&b| eligible(b)).count());
        prop_assert_eq!(picked.len(), want);
        let worst_picked = picked.iter().map(|&b| { prop_assert!(eligible(b)); Ok(key(b)) }).collect::<Result<Vec<_>, _>>()?.into_iter().max().unwrap_or(0);
        for b in (0..nbuckets).filter(|&b| eligible(b) && !picked.contains(&b)) {
            prop_assert!(key(b) >= worst_picked, "bucket {} of weight {} was passed over for one of {}", b, key(b), worst_picked);
        }
        for &b in &picked {
            let now = s.a.bucket(0, b).unwrap();
            prop_assert_eq!(now.gen, before[b as usize].gen.wrapping_add(1));
            prop_assert_eq!(now.prio, INITIAL_PRIO);
            prop_assert_eq!(now.pin, 1);
        }
    }

    /// FIFO takes eligible buckets in bucket order, resuming where the last batch stopped.
    #[test]
    fn fifo_goes_in_order(seed in any::<u64>(), nbuckets in 600u64..2000) {
        let (mut s, _) = aged_sim(Replacement::Fifo, seed, nbuckets);
        let mut cursor = 3u64;
        for _round in 0..3 {
            let before: Vec<_> = (0..nbuckets).map(|b| s.a.bucket(0, b).unwrap()).collect();
            let eligible = |b: u64| {
                let i = before[b as usize];
                matches!(i.mark, GcMark::Unused | GcMark::Reclaimable) && i.pin == 0 && i.gen.wrapping_sub(i.last_gc) < BUCKET_GC_GEN_MAX
            };
            let cap = s.a.free_inc_capacity(0).unwrap();
            let mut expect = Vec::new();
            let mut checked = 0;
            while expect.len() < cap && checked < nbuckets {
                if cursor >= nbuckets { cursor = 3; }
                if eligible(cursor) { expect.push(cursor); }
                cursor += 1;
                checked += 1;
            }
            let step = s.a.poll(0).unwrap();
            prop_assert_eq!(s.a.free_inc(0).unwrap(), expect.clone());
            if step != Step::WritePrios { break; }
            s.write_prios(0);
            // Hand out everything so the next batch is needed.
            loop {
                match s.a.bucket_alloc(0, Reserve::None) {
                    Ok(b) => s.a.unpin(0, b).unwrap(),
                    Err(_) => {
                        let step = s.a.poll(0).unwrap();
                        if step != Step::Idle && !s.a.free_inc(0).unwrap().is_empty() && matches!(step, Step::WritePrios | Step::NeedGc) { break; }
                        if s.a.free_list(0, Reserve::None).unwrap().is_empty() && s.a.free_inc(0).unwrap().is_empty() { break; }
                    }
                }
            }
            if !s.a.free_inc(0).unwrap().is_empty() {
                // The allocator already selected the next batch while we drained: check it.
                let got = s.a.free_inc(0).unwrap();
                let mut expect = Vec::new();
                let mut checked = 0;
                let now: Vec<_> = (0..nbuckets).map(|b| s.a.bucket(0, b).unwrap()).collect();
                while expect.len() < got.len() && checked < nbuckets {
                    if cursor >= nbuckets { cursor = 3; }
                    // Picked buckets have moved on one gen; the rest are as they were.
                    let i = now[cursor as usize];
                    if got.contains(&cursor) || (matches!(i.mark, GcMark::Unused | GcMark::Reclaimable) && i.pin == 0 && i.gen.wrapping_sub(i.last_gc) < BUCKET_GC_GEN_MAX) {
                        expect.push(cursor);
                    }
                    cursor += 1;
                    checked += 1;
                }
                prop_assert_eq!(got, expect);
                break;
            }
        }
    }

    /// Prios and gens survive a write through the allocator and a read into a fresh one; any
    /// flipped byte, a foreign set, or a broken link is refused and changes nothing.
    #[test]
    fn prio_chain_round_trip_and_corruption(seed in any::<u64>(), nbuckets in 600u64..4000, flip in any::<usize>(), bit in 0u8..8) {
        let (mut s, _) = aged_sim(Replacement::Lru, seed, nbuckets);
        prop_assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
        s.write_prios(0);
        let head = s.head[0].unwrap();
        let chain = s.a.prio_chain(0).unwrap().to_vec();
        prop_assert_eq!(chain.len(), s.a.prio_chain_len(0).unwrap());
        prop_assert_eq!(chain[0], head);
        let want: Vec<_> = (0..nbuckets).map(|b| { let i = s.a.bucket(0, b).unwrap(); (i.prio, i.gen) }).collect();
        let cfg = config(1, nbuckets, Replacement::Lru, false);
        let disk = s.disk[0].clone();
        let read = |disk: &HashMap<u64, Vec<u8>>, b: u64, out: &mut [u8]| -> ubcache_core::Result<()> {
            out.copy_from_slice(disk.get(&b).ok_or_else(|| ubcache_core::Error::new(ErrorKind::Io, "no such bucket"))?);
            Ok(())
        };

        let mut fresh = Allocator::new(&cfg).unwrap();
        fresh.read_prios(0, head, |b, out| read(&disk, b, out)).unwrap();
        let got: Vec<_> = (0..nbuckets).map(|b| { let i = fresh.bucket(0, b).unwrap(); (i.prio, i.gen) }).collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(fresh.prio_chain(0).unwrap(), &chain[..]);
        for b in 0..nbuckets {
            let i = fresh.bucket(0, b).unwrap();
            prop_assert_eq!(i.last_gc, i.gen);
        }

        // One flipped bit anywhere in the chain.
        let mut bad = disk.clone();
        let link = chain[flip % chain.len()];
        let buf = bad.get_mut(&link).unwrap();
        let at = (flip / chain.len()) % buf.len();
        buf[at] ^= 1 << bit;
        let mut fresh = Allocator::new(&cfg).unwrap();
        let e = fresh.read_prios(0, head, |b, out| read(&bad, b, out)).unwrap_err();
        prop_assert_eq!(e.kind(), ErrorKind::ChecksumMismatch);
        prop_assert!((0..nbuckets).all(|b| fresh.bucket(0, b).unwrap() == Allocator::new(&cfg).unwrap().bucket(0, b).unwrap()));

        // Another cache set's UUID.
        let mut other = cfg.clone();
        other.set_uuid[3] ^= 0x40;
        let mut fresh = Allocator::new(&other).unwrap();
        let e = fresh.read_prios(0, head, |b, out| read(&disk, b, out)).unwrap_err();
        prop_assert_eq!(e.kind(), ErrorKind::MagicMismatch);
    }
}

#[test]
fn broken_links_are_refused() {
    let cfg = SetConfig { bucket_size: 8, ..config(1, 6000, Replacement::Lru, false) };
    let (magic, bb) = (prio::pset_magic(&UUID), 4096);
    assert_eq!(prio::prio_buckets(6000, bb), 5);
    let mut disk: HashMap<u64, Vec<u8>> = HashMap::new();
    let put = |disk: &mut HashMap<u64, Vec<u8>>, at: u64, seq: u64, next: u64| {
        let mut buf = vec![0u8; bb];
        prio::encode_prio_set(&mut buf, magic, seq, next, [(1, 1)]).unwrap();
        disk.insert(at, buf);
    };
    let read = |disk: &HashMap<u64, Vec<u8>>| {
        let mut a = Allocator::new(&cfg).unwrap();
        let d = disk.clone();
        a.read_prios(0, 10, move |b, out| {
            out.copy_from_slice(&d[&b]);
            Ok(())
        })
    };
    // A loop: 10 -> 11 -> 10.
    put(&mut disk, 10, 1, 11);
    put(&mut disk, 11, 1, 10);
    assert_eq!(read(&disk).unwrap_err().kind(), ErrorKind::Corrupt);
    // Out of range.
    put(&mut disk, 11, 1, 6000);
    assert_eq!(read(&disk).unwrap_err().kind(), ErrorKind::Corrupt);
    // Links of two different writes.
    put(&mut disk, 11, 2, 12);
    assert_eq!(read(&disk).unwrap_err().kind(), ErrorKind::Corrupt);
    // Whole and consistent.
    for (at, next) in [(11, 12), (12, 13), (13, 14), (14, 0)] {
        put(&mut disk, at, 1, next);
    }
    read(&disk).unwrap();
}

#[test]
fn reserve_none_never_takes_metadata_reserves() {
    let mut s = Sim::new(&config(1, 2048, Replacement::Lru, false));
    s.drive();
    let prio_before = s.a.free_list(0, Reserve::Prio).unwrap();
    let btree_before = s.a.free_list(0, Reserve::Btree).unwrap();
    assert_eq!(prio_before.len(), s.a.free_list_capacity(0, Reserve::Prio).unwrap());
    assert_eq!(btree_before.len(), 8);
    let mut held = Vec::new();
    // Hold every data bucket we can get, polling the allocator as the engine would, until
    // it can find nothing more without GC.
    loop {
        match s.a.bucket_alloc(0, Reserve::None) {
            Ok(b) => held.push(b),
            Err(_) => {
                if s.drive() && s.a.free_list(0, Reserve::None).unwrap().is_empty() {
                    break;
                }
            }
        }
    }
    assert!(held.len() > 100);
    assert_eq!(s.a.bucket_alloc(0, Reserve::None).unwrap_err().kind(), ErrorKind::NoSpace);
    assert_eq!(s.a.free_list(0, Reserve::Btree).unwrap().len(), 8);
    assert!(!s.a.free_list(0, Reserve::Prio).unwrap().is_empty());
    // The btree reserve is still there for btree nodes.
    let b = s.a.bucket_alloc(0, Reserve::Btree).unwrap();
    assert_eq!(s.a.free_list(0, Reserve::Btree).unwrap().len(), 7);
    assert_eq!(s.a.bucket(0, b).unwrap().mark, GcMark::Metadata);
}

#[test]
fn sizes_follow_bcache() {
    let s = Sim::new(&SetConfig { bucket_size: 1024, ..config(1, 1 << 20, Replacement::Lru, false) });
    assert_eq!(s.a.free_list_capacity(0, Reserve::Btree).unwrap(), 8);
    assert_eq!(s.a.free_list_capacity(0, Reserve::Prio).unwrap(), 7);
    assert_eq!(s.a.free_list_capacity(0, Reserve::MovingGc).unwrap(), 1024);
    assert_eq!(s.a.free_list_capacity(0, Reserve::None).unwrap(), 1024);
    assert_eq!(s.a.free_inc_capacity(0).unwrap(), 4096);
    assert_eq!(s.a.prio_chain_len(0).unwrap(), 7);
}

#[test]
fn bad_configs_are_refused() {
    let ok = config(1, 1024, Replacement::Lru, false);
    for bad in [
        SetConfig { caches: vec![], ..ok.clone() },
        SetConfig { caches: vec![ok.caches[0].clone(); 9], ..ok.clone() },
        SetConfig { block_size: 3, ..ok.clone() },
        SetConfig { bucket_size: 4, ..ok.clone() },
        SetConfig { bucket_size: 18, block_size: 4, ..ok.clone() },
        SetConfig { bucket_size: 24, block_size: 8, ..ok.clone() },
        SetConfig { caches: vec![CacheConfig { nbuckets: 100, ..ok.caches[0].clone() }], ..ok.clone() },
        SetConfig { caches: vec![CacheConfig { first_bucket: 0, ..ok.caches[0].clone() }], ..ok.clone() },
        SetConfig { caches: vec![CacheConfig { first_bucket: 1000, ..ok.caches[0].clone() }], ..ok.clone() },
        // 2^44 sectors: past the 43-bit pointer offset.
        SetConfig {
            bucket_size: 1 << 14,
            caches: vec![CacheConfig { nbuckets: 1 << 30, ..ok.caches[0].clone() }],
            ..ok.clone()
        },
    ] {
        assert_eq!(Allocator::new(&bad).err().map(|e| e.kind()), Some(ErrorKind::InvalidArgument), "{bad:?}");
    }
    let mut a = Allocator::new(&ok).unwrap();
    assert_eq!(a.bucket_alloc(1, Reserve::None).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(a.bucket(0, 1024).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(a.unpin(0, 5).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(a.prio_write_begin(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(a.gc_finish().unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert!(a.gc_mark_ptr(Ptr::new(0, 0, 0).unwrap(), 1, PtrKind::Clean).is_err());
    // Nothing is handed out before the first GC pass says what is in use.
    assert_eq!(a.poll(0).unwrap(), Step::NeedGc);
    assert_eq!(a.bucket_alloc(0, Reserve::None).unwrap_err().kind(), ErrorKind::NoSpace);
}

/// A set that comes up with no unused bucket has nowhere to write prios: the allocator must
/// say so (NeedGc) instead of invalidating a batch and asking for a prio write that cannot be
/// placed, and go on once a GC finds unused buckets for the prio reserve.
#[test]
fn no_prio_write_is_asked_for_without_room_for_it() {
    for replacement in [Replacement::Lru, Replacement::Fifo, Replacement::Random] {
        let cfg = config(1, 1024, replacement, false);
        let mut s = Sim {
            a: Allocator::new(&cfg).unwrap(),
            disk: vec![HashMap::new()],
            head: vec![None],
            durable: vec![vec![0; 1024]],
            primed: HashSet::new(),
            bucket_bytes: cfg.bucket_size as usize * 512,
            discards: 0,
        };
        // Every bucket holds clean data: nothing can be primed.
        let ptrs: Vec<Ptr> = (3..1024).map(|b| s.a.bucket_ptr(0, b).unwrap()).collect();
        let live: Vec<Live> =
            ptrs.iter().map(|&ptr| Live { ptr, sectors: 8, kind: PtrKind::Clean, seen_stale: false }).collect();
        // (gen, pin) of every bucket: invalidating anything would move both.
        let state = |s: &Sim| (0..1024).map(|b| s.a.bucket(0, b).unwrap()).map(|i| (i.gen, i.pin)).collect::<Vec<_>>();
        let before = state(&s);
        for _ in 0..2 {
            s.gc(&live);
            assert!(Reserve::ALL.iter().all(|&r| s.a.free_list(0, r).unwrap().is_empty()));
            assert_eq!(s.a.poll(0).unwrap(), Step::NeedGc, "{replacement:?}");
            assert!(s.a.gc_wanted());
            assert!(s.a.free_inc(0).unwrap().is_empty(), "{replacement:?}: a batch nothing can release");
            assert!(state(&s) == before, "{replacement:?}: a bucket was invalidated");
            assert_eq!(s.a.prio_write_begin(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
        }
        // The index drops a few buckets' keys: GC tops up the prio reserve (only that) from them.
        s.gc(&live[100..]);
        let prio = s.a.free_list(0, Reserve::Prio).unwrap();
        assert_eq!(prio.len(), s.a.prio_chain_len(0).unwrap());
        assert!(prio.iter().all(|&b| (3..103).contains(&b)));
        assert!(s.a.free_list(0, Reserve::Btree).unwrap().is_empty());
        assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios, "{replacement:?}");
        s.write_prios(0);
        s.drive();
        let b = s.a.bucket_alloc(0, Reserve::None).unwrap();
        assert_eq!(s.durable[0][b as usize], s.a.bucket(0, b).unwrap().gen);
        s.a.check_invariants().unwrap();
    }
}

/// A batch whose prio reserve was taken after it filled asks for GC, not for the write.
#[test]
fn a_batch_that_lost_its_prio_reserve_asks_for_gc() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    while s.a.bucket_alloc(0, Reserve::Prio).is_ok() {}
    assert_eq!(s.a.poll(0).unwrap(), Step::NeedGc);
    assert!(s.a.gc_wanted());
    s.a.gc_start();
    assert_eq!(s.a.poll(0).unwrap(), Step::Waiting);
    s.a.gc_finish().unwrap();
    assert_eq!(s.a.free_list(0, Reserve::Prio).unwrap().len(), s.a.prio_chain_len(0).unwrap());
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    s.write_prios(0);
    s.a.check_invariants().unwrap();
}

#[test]
fn prio_write_waits_for_commit_and_failure_retries() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    let batch = s.a.free_inc(0).unwrap();
    assert_eq!(batch.len(), s.a.free_inc_capacity(0).unwrap());
    let w = s.a.prio_write_begin(0).unwrap();
    assert_eq!(s.a.poll(0).unwrap(), Step::Waiting);
    // Nothing from the batch is handed out before the commit.
    while let Ok(b) = s.a.bucket_alloc(0, Reserve::None) {
        assert!(!batch.contains(&b));
    }
    s.a.prio_write_failed(0).unwrap();
    for &b in &w.buckets {
        assert_eq!(s.a.bucket(0, b).unwrap().pin, 1);
        assert!(
            Reserve::ALL.iter().any(|&r| s.a.free_list(0, r).unwrap().contains(&b)),
            "failed prio bucket {b} went back"
        );
    }
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    s.write_prios(0);
    assert_eq!(s.a.prio_chain(0).unwrap().len(), 1);
    let first_chain = s.a.prio_chain(0).unwrap().to_vec();
    assert_eq!(s.a.bucket(0, first_chain[0]).unwrap().mark, GcMark::Metadata);
    assert_eq!(s.a.bucket(0, first_chain[0]).unwrap().prio, BTREE_PRIO);
    s.drive();
    assert!(s.a.free_list(0, Reserve::None).unwrap().iter().all(|b| batch.contains(b) || s.primed.contains(&(0, *b))));
    // The next chain frees the previous one, and only then.
    let mut n = 0;
    while s.a.prio_chain(0).unwrap() == first_chain {
        match s.a.bucket_alloc(0, Reserve::None) {
            Ok(b) => s.a.unpin(0, b).unwrap(),
            Err(_) => {
                assert_eq!(s.a.bucket(0, first_chain[0]).unwrap().mark, GcMark::Metadata);
                s.drive();
            }
        }
        n += 1;
        assert!(n < 10_000);
    }
    assert_eq!(s.a.bucket(0, first_chain[0]).unwrap().mark, GcMark::Unused);
    assert_eq!(s.a.meta_sectors_written(0).unwrap(), 3 * 16);
}

/// Opening a set ends with a forced prio write, before any batch is full: it makes the gens
/// the first GC pass bumped durable, and allocation goes on from there as usual.
#[test]
fn forced_prio_write_after_the_first_gc() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    assert_eq!(s.a.prio_seq(0).unwrap(), 0);
    assert!(s.a.free_inc(0).unwrap().is_empty(), "no batch yet");
    let w = s.a.prio_write_force(0).unwrap();
    assert_eq!((w.seq, s.a.prio_seq(0).unwrap()), (1, 1));
    assert_eq!(w.buckets.len(), s.a.prio_chain_len(0).unwrap());
    // The device was filling: the batch it would have invalidated next rides on this write.
    let batch = s.a.free_inc(0).unwrap();
    assert!(!batch.is_empty());
    assert_eq!(s.a.poll(0).unwrap(), Step::Waiting);
    assert_eq!(s.a.free_inc(0).unwrap(), batch);
    while let Ok(b) = s.a.bucket_alloc(0, Reserve::None) {
        assert!(!batch.contains(&b), "bucket {b} handed out before its gen was durable");
    }
    // Only one prio write at a time, forced or asked for.
    assert_eq!(s.a.prio_write_force(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.a.prio_write_begin(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    s.finish_prio_write(0, &w);
    assert_eq!(s.a.prio_chain(0).unwrap(), &w.buckets[..]);
    // Every gen on disk is the allocator's, the primed reserves' bumps included.
    for b in 0..1024 {
        assert_eq!(s.durable[0][b as usize], s.a.bucket(0, b).unwrap().gen, "bucket {b}");
    }
    // The allocator goes on as usual: batches, prio writes, allocations, with no more GC.
    for _ in 0..300 {
        let b = alloc_retry(&mut s, 0, Reserve::None);
        assert_eq!(s.durable[0][b as usize], s.a.bucket(0, b).unwrap().gen, "bucket {b} not durable");
        s.a.unpin(0, b).unwrap();
    }
    assert!(s.a.prio_seq(0).unwrap() > 1, "later batches wrote prios of their own");
    s.a.check_invariants().unwrap();

    // The sequence number is what read_prios finds on disk.
    let head = s.head[0].unwrap();
    let disk = s.disk[0].clone();
    let mut fresh = Allocator::new(&config(1, 1024, Replacement::Lru, false)).unwrap();
    fresh
        .read_prios(0, head, |b, buf| {
            buf.copy_from_slice(&disk[&b]);
            Ok(())
        })
        .unwrap();
    assert_eq!(fresh.prio_seq(0).unwrap(), s.a.prio_seq(0).unwrap());
    assert_eq!(fresh.prio_seq(1).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(fresh.prio_write_force(1).unwrap_err().kind(), ErrorKind::OutOfRange);
}

/// A forced write may find the device in any state: with a full batch it is that batch's
/// write, and while draining the device goes on draining, but does not invalidate the next
/// batch before the commit. A failed forced write leaves things as they were.
#[test]
fn forced_prio_write_in_every_state_and_failure() {
    let mut s = Sim::new(&config(1, 4096, Replacement::Fifo, false));
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    let batch = s.a.free_inc(0).unwrap();
    let w = s.a.prio_write_force(0).unwrap();
    s.a.prio_write_failed(0).unwrap();
    assert_eq!(s.a.free_inc(0).unwrap(), batch, "a failed write keeps the batch waiting");
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    let w2 = s.a.prio_write_force(0).unwrap();
    assert_eq!(w2.seq, w.seq + 1);
    s.finish_prio_write(0, &w2);
    // Committed: the batch drains to the free lists until they are full.
    assert_eq!(s.a.poll(0).unwrap(), Step::Idle);
    let free: Vec<u64> = Reserve::ALL.iter().flat_map(|&r| s.a.free_list(0, r).unwrap()).collect();
    assert!(!free.is_empty() && free.iter().all(|b| batch.contains(b) || s.primed.contains(&(0, *b))));
    let waiting = s.a.free_inc(0).unwrap();
    assert!(!waiting.is_empty(), "part of the batch still waits for room");
    // Forced while draining: draining goes on as allocations make room...
    let w3 = s.a.prio_write_force(0).unwrap();
    let mut n = 0;
    while !s.a.free_inc(0).unwrap().is_empty() {
        n += 1;
        assert!(n < 10_000, "free_inc never empties: invalidation went on under the write in flight");
        match s.a.bucket_alloc(0, Reserve::None) {
            Ok(b) => {
                assert!(waiting.contains(&b) || free.contains(&b));
                s.a.unpin(0, b).unwrap();
            }
            Err(_) => assert!(matches!(s.a.poll(0).unwrap(), Step::Idle | Step::Waiting)),
        }
    }
    // ... but the next batch waits for the commit.
    assert_eq!(s.a.poll(0).unwrap(), Step::Waiting);
    assert!(s.a.free_inc(0).unwrap().is_empty());
    s.finish_prio_write(0, &w3);
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    for _ in 0..500 {
        let b = alloc_retry(&mut s, 0, Reserve::None);
        assert_eq!(s.durable[0][b as usize], s.a.bucket(0, b).unwrap().gen, "bucket {b} not durable");
        s.a.unpin(0, b).unwrap();
    }
    s.a.check_invariants().unwrap();
}

/// A forced write needs a free bucket per link, as any prio write: with too few it fails
/// with NoSpace and changes nothing.
#[test]
fn forced_prio_write_needs_room_for_its_chain() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    while s.a.bucket_alloc(0, Reserve::Prio).is_ok() {}
    let seq = s.a.prio_seq(0).unwrap();
    let written = s.a.meta_sectors_written(0).unwrap();
    assert_eq!(s.a.prio_write_force(0).unwrap_err().kind(), ErrorKind::NoSpace);
    assert_eq!((s.a.prio_seq(0).unwrap(), s.a.meta_sectors_written(0).unwrap()), (seq, written));
    assert_eq!(s.a.prio_write_failed(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.a.prio_write_committed(0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    s.a.check_invariants().unwrap();
}

#[test]
fn discard_happens_between_free_inc_and_free_lists() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Fifo, true));
    assert_eq!(s.a.poll(0).unwrap(), Step::WritePrios);
    s.write_prios(0);
    let Step::Discard(b) = s.a.poll(0).unwrap() else { panic!("expected a discard") };
    assert_eq!(s.a.poll(0).unwrap(), Step::Waiting);
    assert!(s.a.discard_done(0, b + 1).is_err());
    s.a.discard_done(0, b).unwrap();
    assert!(Reserve::ALL.iter().any(|&r| s.a.free_list(0, r).unwrap().contains(&b)));
}

#[test]
fn alloc_set_spreads_over_devices_all_or_nothing() {
    let mut s = Sim::new(&config(3, 1024, Replacement::Lru, false));
    s.drive();
    let ptrs = s.a.alloc_set(Reserve::Btree, 3).unwrap();
    let devs: HashSet<u8> = ptrs.iter().map(|p| p.dev()).collect();
    assert_eq!(devs.len(), 3);
    for p in &ptrs {
        assert!(s.a.ptr_valid(*p));
        assert_eq!(p.offset() % 16, 0);
        let info = s.a.bucket(p.dev(), p.offset() / 16).unwrap();
        assert_eq!((info.mark, info.pin), (GcMark::Metadata, 1));
    }
    assert!(s.a.alloc_set(Reserve::Btree, 4).is_err());
    assert!(s.a.alloc_set(Reserve::Btree, 0).is_err());
    // Empty device 2 of everything a btree allocation can use; a 3-way set must then fail
    // and give back what it took on the others.
    while s.a.bucket_alloc(2, Reserve::Btree).is_ok() {}
    let before: Vec<usize> = (0..2)
        .map(|d| s.a.free_list(d, Reserve::None).unwrap().len() + s.a.free_list(d, Reserve::Btree).unwrap().len())
        .collect();
    assert_eq!(s.a.alloc_set(Reserve::Btree, 3).unwrap_err().kind(), ErrorKind::NoSpace);
    for d in 0..2u8 {
        let after = s.a.free_list(d, Reserve::None).unwrap().len() + s.a.free_list(d, Reserve::Btree).unwrap().len();
        assert_eq!(after + 1, before[d as usize], "device {d} gave one bucket");
    }
    s.a.check_invariants().unwrap();
    // The taken buckets were released: unpinned and unused, to be invalidated again.
    let pinned_unused = (0..2u8)
        .flat_map(|d| (3..1024).map(move |b| (d, b)))
        .filter(|&(d, b)| {
            let i = s.a.bucket(d, b).unwrap();
            i.pin == 0 && i.mark == GcMark::Unused && i.gen > 0
        })
        .count();
    assert!(pinned_unused >= 2);
    // Two of three still works.
    assert_eq!(s.a.alloc_set(Reserve::Btree, 2).unwrap().len(), 2);
}

fn write(inode: u64, offset: u64, sectors: u32, write_point: u64, flash_only: bool) -> DataWrite {
    DataWrite { inode, offset, sectors, write_point, flash_only, moving_gc: false, hot: false }
}

#[test]
fn sector_allocator_keeps_streams_together_and_kinds_apart() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    s.drive();
    // A sequential stream fills one bucket in order.
    let a1 = sectors_retry(&mut s, &write(1, 0, 4, 7, false));
    let a2 = sectors_retry(&mut s, &write(1, 4, 4, 9, false));
    assert_eq!(a2.ptr.offset(), a1.ptr.offset() + 4, "a continuing write goes right after the last");
    // Another writer gets its own bucket.
    let b1 = sectors_retry(&mut s, &write(2, 1000, 4, 8, false));
    assert_ne!(b1.ptr.offset() / 16, a1.ptr.offset() / 16);
    // Same writer, not sequential: its own bucket again.
    let b2 = sectors_retry(&mut s, &write(2, 5000, 4, 8, false));
    assert_eq!(b2.ptr.offset(), b1.ptr.offset() + 4);
    // Flash-only data never shares a bucket with cached data, even from the same writer.
    let f1 = sectors_retry(&mut s, &write(3, 0, 4, 8, true));
    for p in [a1, a2, b1, b2] {
        assert_ne!(f1.ptr.offset() / 16, p.ptr.offset() / 16);
    }
    // A write larger than what is left gets only the rest; the bucket is then closed.
    let rest = sectors_retry(&mut s, &write(1, 8, 100, 7, false));
    assert_eq!(rest.sectors, 8);
    assert_eq!(rest.ptr.offset(), a1.ptr.offset() + 8);
    let bucket = a1.ptr.offset() / 16;
    // Pins: one per handed-out key (3); the open bucket's own pin went to the last key.
    assert_eq!(s.a.bucket(0, bucket).unwrap().pin, 3);
    let next = sectors_retry(&mut s, &write(1, 16, 4, 7, false));
    assert_ne!(next.ptr.offset() / 16, bucket);
    s.a.put_ptrs(&[a1.ptr, a2.ptr, rest.ptr]).unwrap();
    assert_eq!(s.a.bucket(0, bucket).unwrap().pin, 0);
    assert_eq!(s.a.sectors_written(0).unwrap(), 4 + 4 + 4 + 4 + 4 + 8 + 4);
    assert_eq!(s.a.alloc_sectors(&write(1, 0, 0, 7, false)).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.a.open_buckets_in_use(), 3);
    s.a.close_open_buckets().unwrap();
    assert_eq!(s.a.open_buckets_in_use(), 0);
    s.a.put_ptrs(&[b1.ptr, b2.ptr, f1.ptr, next.ptr]).unwrap();
    for b in 3..1024 {
        let i = s.a.bucket(0, b).unwrap();
        assert!(i.pin <= 1, "bucket {b} still pinned {}", i.pin);
    }
    s.a.check_invariants().unwrap();
}

#[test]
fn a_writers_random_writes_go_end_to_end_into_the_bucket_it_used_last() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    s.drive();
    let x = sectors_retry(&mut s, &write(1, 0, 2, 5, false));
    let y = sectors_retry(&mut s, &write(2, 0, 2, 6, false));
    assert_ne!(x.ptr.offset() / 16, y.ptr.offset() / 16);
    // Writer 5 continues writer 6's stream: the bucket it used last is now y's.
    let y2 = sectors_retry(&mut s, &write(2, 2, 2, 5, false));
    assert_eq!(y2.ptr.offset(), y.ptr.offset() + 2);
    // Its random writes follow on there, one after another, not in x's bucket (bcache's
    // loop would take the writer's oldest bucket, and alternate).
    let mut at = y2.ptr.offset() + 2;
    for off in [900, 40, 7000] {
        let r = sectors_retry(&mut s, &write(1, off, 2, 5, false));
        assert_eq!(r.ptr.offset(), at, "random write at {off}");
        at += 2;
    }
    s.a.check_invariants().unwrap();
}

/// The allocator is the index's bucket accounting: inserting keys raises the sectors used of
/// the bucket they point into, overwriting or dropping them lowers it, never below zero, and
/// neither the GC mark nor the pins move. GC then recounts the same figures from scratch.
#[test]
fn index_accounting_keeps_sectors_used_live() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    s.drive();
    assert_eq!(s.a.bucket_bits(), 4);
    let mut idx = ExtentIndex::new();
    let a1 = sectors_retry(&mut s, &write(1, 0, 8, 7, false));
    let b = bucket_of(&s.a, a1.ptr);
    let fresh = s.a.bucket(0, b).unwrap();
    assert_eq!((fresh.sectors_used, fresh.mark), (0, GcMark::Reclaimable), "a data bucket starts empty");
    assert_eq!(s.a.bucket_gen(0, b), Some(fresh.gen));
    assert!(!BucketGens::ptr_stale(&s.a, a1.ptr));

    assert!(idx.insert(&Key::new(1, 0, 8, a1.ptr), &mut s.a).unwrap());
    let now = s.a.bucket(0, b).unwrap();
    assert_eq!(now.sectors_used, 8);
    assert_eq!((now.mark, now.pin, now.gen, now.prio), (fresh.mark, fresh.pin, fresh.gen, fresh.prio));
    let a2 = sectors_retry(&mut s, &write(1, 8, 8, 7, false));
    assert_eq!(bucket_of(&s.a, a2.ptr), b, "the stream continues in its bucket");
    assert!(idx.insert(&Key::new(1, 8, 8, a2.ptr).with_dirty(true), &mut s.a).unwrap());
    let now = s.a.bucket(0, b).unwrap();
    assert_eq!(now.sectors_used, 16);
    assert_eq!(now.mark, GcMark::Reclaimable, "accounting dirty sectors does not mark the bucket dirty");
    s.a.put_ptrs(&[a1.ptr, a2.ptr]).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().pin, 0);

    // Newer data for sectors 4..12 lands elsewhere: 8 of b's sectors are dead.
    let a3 = sectors_retry(&mut s, &write(1, 4, 8, 9, false));
    let b3 = bucket_of(&s.a, a3.ptr);
    assert_ne!(b3, b);
    assert!(idx.insert(&Key::new(1, 4, 8, a3.ptr), &mut s.a).unwrap());
    s.a.put_ptrs(&[a3.ptr]).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 8);
    assert_eq!(s.a.bucket(0, b3).unwrap().sectors_used, 8);
    assert_eq!(idx.invalidate(1, 0, 2, &mut s.a).unwrap(), 2);
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 6);

    // GC recounts what the index holds: the same figures.
    s.a.close_open_buckets().unwrap();
    s.a.gc_start();
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 0);
    assert_eq!(idx.mark_buckets(&mut s.a), 3);
    s.a.gc_finish().unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 6);
    assert_eq!(s.a.bucket(0, b3).unwrap().sectors_used, 8);

    // Never below zero: a bucket declared empty while keys still point into it.
    s.a.bucket_free(0, b).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 0);
    idx.invalidate(1, 0, 16, &mut s.a).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 0);
    assert_eq!(s.a.bucket(0, b3).unwrap().sectors_used, 0);
    // Saturation both ways, and no panic out of range.
    s.a.add_sectors(0, b, -1000, false);
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 0);
    s.a.add_sectors(0, b, i64::MAX, true);
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, MAX_GC_SECTORS_USED);
    s.a.add_sectors(0, b, i64::MIN, true);
    assert_eq!(s.a.bucket(0, b).unwrap().sectors_used, 0);
    s.a.add_sectors(0, 1 << 40, 5, false);
    s.a.add_sectors(3, 5, 5, false);
    assert_eq!((s.a.bucket_gen(0, 1024), s.a.bucket_gen(1, 5)), (None, None));
    s.a.prefetch_gen(0, b);
    s.a.prefetch_gen(0, 1 << 40);
    s.a.check_invariants().unwrap();
}

#[test]
fn open_buckets_are_bounded() {
    let mut s = Sim::new(&config(1, 4096, Replacement::Lru, false));
    s.drive();
    let mut got = Vec::new();
    for wp in 0..300u64 {
        loop {
            match s.a.alloc_sectors(&write(wp, wp * 1000, 4, wp, wp % 2 == 0)) {
                Ok(g) => {
                    got.push(g);
                    break;
                }
                Err(_) => {
                    assert!(!s.drive());
                }
            }
        }
        assert!(s.a.open_buckets_in_use() <= 128);
    }
    assert_eq!(s.a.open_buckets_in_use(), 128);
}

#[test]
fn prios_age_with_sectors_written() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    s.drive();
    let b = alloc_retry(&mut s, 0, Reserve::None);
    // Its data is in the index before it is unpinned; an empty bucket would be reused first.
    s.a.add_sectors(0, b, 16, false);
    s.a.unpin(0, b).unwrap();
    let pinned = alloc_retry(&mut s, 0, Reserve::None);
    let meta = alloc_retry(&mut s, 0, Reserve::Btree);
    s.a.unpin(0, meta).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().prio, INITIAL_PRIO);
    // One step is 1/1024 of the capacity: (1024 - 3) buckets * 16 sectors / 1024.
    let step = (1024 - 3) * 16 / 1024;
    s.a.rescale_priorities(step as u64);
    assert_eq!(s.a.bucket(0, b).unwrap().prio, INITIAL_PRIO);
    s.a.rescale_priorities(1);
    assert_eq!(s.a.bucket(0, b).unwrap().prio, INITIAL_PRIO - 1);
    assert_eq!(s.a.bucket(0, pinned).unwrap().prio, INITIAL_PRIO, "pinned buckets do not age");
    assert_eq!(s.a.bucket(0, meta).unwrap().prio, BTREE_PRIO, "metadata does not age");
    assert_eq!(s.a.min_prio(), INITIAL_PRIO - 1);
    for _ in 0..10 {
        s.a.rescale_priorities(step as u64);
    }
    assert_eq!(s.a.bucket(0, b).unwrap().prio, INITIAL_PRIO - 11);
    // A huge write ages one step per call, and returns at once.
    s.a.rescale_priorities(u64::MAX);
    assert_eq!(s.a.bucket(0, b).unwrap().prio, INITIAL_PRIO - 12);
    s.a.touch(s.a.bucket_ptr(0, b).unwrap()).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().prio, INITIAL_PRIO);
    // alloc_sectors drives the aging too.
    for i in 0..200u64 {
        if let Ok(g) = s.a.alloc_sectors(&write(1, i * 4, 4, 1, false)) {
            s.a.put_ptrs(&[g.ptr]).unwrap();
        } else {
            s.drive();
        }
    }
    assert!(s.a.bucket(0, b).unwrap().prio < INITIAL_PRIO);
}

#[test]
fn stale_pointers_change_nothing() {
    let mut s = Sim::new(&config(1, 1024, Replacement::Lru, false));
    s.drive();
    let b = alloc_retry(&mut s, 0, Reserve::None);
    let fresh = s.a.bucket_ptr(0, b).unwrap();
    let stale = Ptr::new(0, fresh.offset(), fresh.gen().wrapping_sub(1)).unwrap();
    assert_eq!(s.a.ptr_stale(stale).unwrap(), 1);
    assert!(!s.a.ptr_valid(stale) && s.a.ptr_valid(fresh));
    s.a.rescale_priorities(1 << 20);
    let before = s.a.bucket(0, b).unwrap();
    s.a.mark_dirty(stale).unwrap();
    s.a.touch(stale).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap(), before);
    s.a.mark_dirty(fresh).unwrap();
    assert_eq!(s.a.bucket(0, b).unwrap().mark, GcMark::Dirty);
    assert!(!s.a.ptr_valid(Ptr::new(0, 1024 * 16, fresh.gen()).unwrap()), "a pointer past the device is not valid");
}

#[test]
fn priority_stats_add_up() {
    let (s, _) = aged_sim(Replacement::Lru, 42, 2000);
    let st = s.a.priority_stats(0).unwrap();
    let mut counts = [0u64; 4];
    let mut unused = 0;
    for b in 3..2000 {
        let i = s.a.bucket(0, b).unwrap();
        counts[i.mark as usize] += 1;
        unused += u64::from(i.sectors_used == 0);
    }
    assert_eq!(st.clean_percent, counts[GcMark::Reclaimable as usize] * 100 / 2000);
    assert_eq!(st.dirty_percent, counts[GcMark::Dirty as usize] * 100 / 2000);
    assert_eq!(st.metadata_percent, counts[GcMark::Metadata as usize] * 100 / 2000);
    assert_eq!(st.unused_percent, unused * 100 / 2000);
    assert!(st.quantiles.windows(2).all(|w| w[0] <= w[1]), "ages are sorted youngest first: {:?}", st.quantiles);
    assert!(st.average > 0 && st.sectors_per_quantile > 0);
    let empty = Sim::new(&config(1, 1024, Replacement::Lru, false));
    let st = empty.a.priority_stats(0).unwrap();
    assert_eq!((st.unused_percent, st.average, st.quantiles), (99, 0, [0; 31]));
}

/// S3-FIFO's model: every data bucket with the time of its (re)insertion (one tick per data
/// bucket allocated, as the allocator's epoch on a cache this small), its queue and reads.
struct S3Model {
    now: u64,
    resident: HashMap<u64, (u64, bool, u16)>,
    /// Buckets holding dirty data: in their queue, never evicted or moved.
    dirty: HashSet<u64>,
}

impl S3Model {
    /// Evicts `n` buckets as S3-FIFO does: from the small queue while it holds more than a
    /// tenth of the data buckets (a read bucket moves to the main queue's tail instead),
    /// else from the main queue (a read bucket goes back to its tail with one read fewer).
    /// Queues are in (time, bucket) order. Returns the buckets evicted.
    fn evict(&mut self, n: usize) -> HashSet<u64> {
        let target = self.resident.len() as u64 * 10 / 100;
        let mut out = HashSet::new();
        while out.len() < n {
            let small = self.resident.iter().filter(|(_, e)| !e.1).count() as u64;
            let head = |main: bool| {
                self.resident
                    .iter()
                    .filter(|(b, e)| e.1 == main && !self.dirty.contains(b))
                    .map(|(&b, e)| (e.0, b))
                    .min()
            };
            let (from_small, (_, b)) = match (head(false), head(true)) {
                (Some(s), _) if small > target => (true, s),
                (_, Some(m)) => (false, m),
                (Some(s), None) => (true, s),
                (None, None) => break,
            };
            let e = self.resident.get_mut(&b).unwrap();
            if e.2 > 0 {
                *e = (self.now, true, if from_small { 0 } else { e.2 - 1 });
            } else {
                self.resident.remove(&b);
                out.insert(b);
            }
        }
        out
    }
}

/// S3-FIFO against its queue model: buckets allocated one after another, random reads of
/// resident buckets, and at every batch the buckets evicted are exactly the model's (buckets
/// with nothing live go first, then the queues). Then a restart from the prio chain keeps the
/// queues: the next batch still follows the model.
#[test]
fn s3fifo_follows_its_queue_model() {
    for seed in 1..=6u64 {
        let cfg = config(1, 700, Replacement::S3Fifo, false);
        let mut s = Sim::new(&cfg);
        let mut m = S3Model { now: 0, resident: HashMap::new(), dirty: HashSet::new() };
        let mut rng = (seed * 0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut batches = 0;
        let mut restarted = false;
        let mut evicted = 0;
        while batches < 60 {
            match s.a.bucket_alloc(0, Reserve::None) {
                Ok(b) => {
                    s.a.unpin(0, b).unwrap();
                    m.now += 1;
                    m.resident.insert(b, (m.now, false, 0));
                    // Now and then a bucket takes dirty data: it must stay whatever its queue says.
                    if next() % 40 == 0 {
                        s.a.mark_dirty(s.a.bucket_ptr(0, b).unwrap()).unwrap();
                        m.dirty.insert(b);
                    }
                    // Reads of resident buckets, hot ones (low numbers) more often.
                    for _ in 0..(next() % 3) {
                        let keys: Vec<u64> = m.resident.keys().copied().collect();
                        let pick = keys[(next() % keys.len() as u64) as usize];
                        let hot = keys.iter().copied().filter(|&k| k % 7 == 0).collect::<Vec<_>>();
                        let k = if next() % 2 == 0 && !hot.is_empty() {
                            hot[(next() % hot.len() as u64) as usize]
                        } else {
                            pick
                        };
                        s.a.touch(s.a.bucket_ptr(0, k).unwrap()).unwrap();
                        let e = m.resident.get_mut(&k).unwrap();
                        e.2 = (e.2 + 1).min(3);
                    }
                }
                Err(_) => {
                    let step = s.a.poll(0).unwrap();
                    let picked: HashSet<u64> = s.a.free_inc(0).unwrap().into_iter().collect();
                    if step == Step::WritePrios && !picked.is_empty() {
                        let data: HashSet<u64> =
                            picked.iter().copied().filter(|b| m.resident.contains_key(b)).collect();
                        if !data.is_empty() {
                            // Nothing with no live data was passed over for a data bucket.
                            for b in 3..700 {
                                let i = s.a.bucket(0, b).unwrap();
                                assert!(!(i.mark == GcMark::Unused && i.pin == 0 && i.gen.wrapping_sub(i.last_gc) < BUCKET_GC_GEN_MAX && !m.resident.contains_key(&b)), "seed {seed}: unused bucket {b} left while data was evicted: {i:?}, picked {picked:?}, chain {:?}", s.a.prio_chain(0));
                            }
                        }
                        let main_before = m.resident.values().filter(|e| e.1).count();
                        let want = m.evict(data.len());
                        assert_eq!(data, want, "seed {seed} batch {batches}: evicted buckets");
                        assert!(data.is_disjoint(&m.dirty), "seed {seed}: a dirty bucket was evicted");
                        evicted += data.len();
                        if batches == 59 {
                            assert!(main_before > 0, "seed {seed}: buckets read again reached the main queue");
                        }
                        batches += 1;
                        s.write_prios(0);
                        if batches == 40 && !restarted {
                            // A restart: a new allocator reads the prio chain back.
                            restarted = true;
                            let head = s.head[0].unwrap();
                            let disk = s.disk[0].clone();
                            let mut a = Allocator::new(&cfg).unwrap();
                            a.read_prios(0, head, |b, out| {
                                out.copy_from_slice(&disk[&b]);
                                Ok(())
                            })
                            .unwrap();
                            for (&b, e) in &m.resident {
                                let before = s.a.bucket(0, b).unwrap();
                                let after = a.bucket(0, b).unwrap();
                                assert_eq!(
                                    after.prio, before.prio,
                                    "seed {seed}: bucket {b} prio after a restart ({e:?})"
                                );
                            }
                        }
                    } else if step != Step::WritePrios {
                        s.drive();
                    }
                }
            }
        }
        assert!(evicted > 200, "seed {seed}: {evicted} data buckets evicted");
        assert!(
            !m.dirty.is_empty() && m.dirty.iter().all(|b| m.resident.contains_key(b)),
            "seed {seed}: dirty buckets stayed"
        );
    }
}
