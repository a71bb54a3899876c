//! Extent index tests: the bkey encoding, the overlap cases one by one, placeholders, stale
//! pointers, and random interleavings of every operation checked against a per-sector model.

use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use ubcache_core::index::*;
use ubcache_core::ErrorKind;

const BUCKET_BITS: u32 = 7;
const BUCKET_SECTORS: u64 = 1 << BUCKET_BITS;
const NBUCKETS: u64 = 48;
const INODES: u32 = 3;
const SPACE: u64 = 1024;

fn ptr(dev: u8, offset: u64, gen: u8) -> Ptr {
    Ptr::new(dev, offset, gen).unwrap()
}

/// The pointer `skip` sectors further into its extent.
fn ptr_at(p: Ptr, skip: u64) -> Ptr {
    ptr(p.dev(), p.offset() + skip, p.gen())
}

fn hole(start: u64, len: u64) -> Fragment {
    Fragment { start, len, kind: FragmentKind::Hole }
}

fn hit(start: u64, len: u64, ptr: Ptr, offset: u64, dirty: bool) -> Fragment {
    Fragment { start, len, kind: FragmentKind::Hit { ptr, offset, dirty } }
}

fn lookup(idx: &mut ExtentIndex, b: &MemBuckets, inode: u32, start: u64, len: u64) -> Vec<Fragment> {
    let mut out = Vec::new();
    idx.lookup(inode, start, len, b, &mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------
// bkey encoding

#[test]
fn bkey_fields_sit_where_bcache_puts_them() {
    let key = Key::new(5, 100, 8, ptr(1, 4096, 3)).with_dirty(true);
    let mut words = Vec::new();
    key.encode_bkey(&mut words).unwrap();
    // high: relic bit 63, KEY_PTRS=1 at 60, KEY_DIRTY at 36, KEY_SIZE=8 at 20, KEY_INODE=5.
    assert_eq!(words[0], 1 << 63 | 1 << 60 | 1 << 36 | 8 << 20 | 5);
    // low: KEY_OFFSET is the end sector.
    assert_eq!(words[1], 108);
    // ptr: PTR_DEV at 51, PTR_OFFSET at 8, PTR_GEN at 0.
    assert_eq!(words[2], 1 << 51 | 4096 << 8 | 3);
    assert_eq!(words.len(), 3);
    assert_eq!(bkey_u64s(words[0]), 3);

    let crc = Key::data_crc(b"123456789");
    assert_eq!(crc, 0x62ec59e3f1a4f00a & KEY_CRC_MASK);
    let with_crc = key.clone().with_crc(Some(crc));
    let mut bytes = Vec::new();
    with_crc.write_bkey_bytes(&mut bytes).unwrap();
    assert_eq!(bytes.len(), 32);
    assert_eq!(u64::from_le_bytes(bytes[0..8].try_into().unwrap()) >> 56 & 3, 1, "KEY_CSUM");
    assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), crc);
    assert_eq!(Key::read_bkey_bytes(&bytes).unwrap(), (with_crc, 32));
}

#[test]
fn bkey_decoding_rejects_what_it_cannot_hold() {
    let high = |ptrs: u64, csum: u64, size: u64| 1u64 << 63 | ptrs << 60 | csum << 56 | size << 20;
    let cases: Vec<(&str, Vec<u64>)> = vec![
        ("empty", vec![]),
        ("truncated", vec![high(2, 0, 8), 8, 0]),
        ("csum type 2", vec![high(0, 2, 0), 8]),
        ("7 pointers", vec![high(7, 0, 8), 8, 0, 0, 0, 0, 0, 0, 0]),
        ("device 256", vec![high(1, 0, 8), 8, 256 << 51]),
        ("size beyond end", vec![high(0, 0, 9), 8]),
        ("end past MAX_KEY_OFFSET", vec![high(0, 0, 1), 1 << 63]),
        ("crc top bit", vec![high(1, 1, 8), 8, 0, 1 << 63]),
        ("pointers on an empty extent", vec![high(1, 0, 0), 8, 0]),
    ];
    for (what, words) in cases {
        let err = Key::decode_bkey(&words).expect_err(what);
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{what}: {err}");
    }
    // A key with no pointers is how bcache records an invalidation.
    let (k, n) = Key::decode_bkey(&[high(0, 0, 8) | 7, 108]).unwrap();
    assert_eq!((k.inode, k.start, k.size, k.ptrs().len(), n), (7, 100, 8, 0, 2));
}

fn arb_key() -> impl Strategy<Value = Key> {
    (
        0..=KEY_INODE_MAX,
        0..KEY_OFFSET_MAX - KEY_SIZE_MAX,
        1..=KEY_SIZE_MAX,
        any::<bool>(),
        prop::collection::vec((any::<u8>(), 0..=PTR_OFFSET_MAX - KEY_SIZE_MAX, any::<u8>()), 0..=KEY_PTRS_MAX),
        prop::option::of(0..=KEY_CRC_MASK),
    )
        .prop_map(|(inode, start, size, dirty, ptrs, crc)| {
            let mut k = Key::empty(inode, start, size).with_dirty(dirty);
            for (d, o, g) in ptrs {
                k.push_ptr(ptr(d, o, g)).unwrap();
            }
            // bcache's KEY_MAX_U64S: a checksum takes the place of a pointer.
            k.crc = if k.ptrs().len() < KEY_PTRS_MAX { crc } else { None };
            k
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn bkey_round_trips(key in arb_key()) {
        let mut words = Vec::new();
        key.encode_bkey(&mut words).unwrap();
        prop_assert_eq!(words.len(), key.bkey_u64s());
        prop_assert!(words.len() <= BKEY_U64S_MAX);
        prop_assert_eq!(bkey_u64s(words[0]), words.len());
        words.push(0xdead_beef); // whatever follows is not part of the key
        prop_assert_eq!(Key::decode_bkey(&words).unwrap(), (key.clone(), words.len() - 1));
        let mut bytes = Vec::new();
        key.write_bkey_bytes(&mut bytes).unwrap();
        prop_assert_eq!(Key::read_bkey_bytes(&bytes).unwrap(), (key, bytes.len()));
    }

    #[test]
    fn bkey_decoding_never_panics(words in prop::collection::vec(any::<u64>(), 0..10)) {
        if let Ok((key, n)) = Key::decode_bkey(&words) {
            let mut again = Vec::new();
            key.encode_bkey(&mut again).unwrap();
            prop_assert_eq!(again.len(), n);
            prop_assert_eq!(&again[1..], &words[1..n]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The operations one by one

fn buckets() -> MemBuckets {
    MemBuckets::new(BUCKET_BITS, 2, NBUCKETS as usize)
}

#[test]
fn the_four_overlap_cases() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    let old = ptr(0, 0, 0);
    idx.insert(&Key::new(1, 100, 100, old), &mut b).unwrap();

    // The new key sits inside the old one: the old one is split in two.
    let a = ptr(0, 128, 0);
    idx.insert(&Key::new(1, 140, 10, a), &mut b).unwrap();
    assert_eq!(
        lookup(&mut idx, &b, 1, 90, 120),
        vec![
            hole(90, 10),
            hit(100, 40, old, 0, false),
            hit(140, 10, a, 0, false),
            hit(150, 50, ptr(0, 50, 0), 0, false),
            hole(200, 10)
        ]
    );
    // Cuts the tail of one and the head of the next.
    let c = ptr(0, 256, 0);
    idx.insert(&Key::new(1, 130, 30, c), &mut b).unwrap();
    assert_eq!(
        lookup(&mut idx, &b, 1, 100, 100),
        vec![hit(100, 30, old, 0, false), hit(130, 30, c, 0, false), hit(160, 40, ptr(0, 60, 0), 0, false)]
    );
    // Covers everything: the old keys go whole.
    let d = ptr(1, 0, 0);
    idx.insert(&Key::new(1, 90, 120, d).with_dirty(true), &mut b).unwrap();
    assert_eq!(lookup(&mut idx, &b, 1, 0, 300), vec![hole(0, 90), hit(90, 120, d, 0, true), hole(210, 90)]);
    assert_eq!(idx.len(), 1);
    assert_eq!((idx.sectors(1), idx.dirty_sectors(1)), (120, 120));
    // Accounting followed: only the last key's sectors remain anywhere.
    for (dev, bucket, s) in b.iter() {
        let want = if (dev, bucket) == (1, 0) { (0, 120) } else { (0, 0) };
        assert_eq!((s.clean_sectors, s.dirty_sectors), want, "bucket {dev}:{bucket}");
    }
    idx.verify().unwrap();
}

#[test]
fn a_write_during_a_miss_makes_the_fill_a_collision() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    let cached = ptr(0, 0, 0);
    idx.insert(&Key::new(0, 20, 10, cached), &mut b).unwrap();

    // Miss on 0..64: placeholders go on the holes only.
    let ph = idx.insert_placeholder(0, 0, 64, &b).unwrap();
    assert_eq!(ph.reserved, 54);
    assert_eq!(
        lookup(&mut idx, &b, 0, 0, 64),
        vec![
            Fragment { start: 0, len: 20, kind: FragmentKind::Pending },
            hit(20, 10, cached, 0, false),
            Fragment { start: 30, len: 34, kind: FragmentKind::Pending },
        ]
    );
    // A second miss on the same range finds nothing to reserve.
    let ph2 = idx.insert_placeholder(0, 0, 64, &b).unwrap();
    assert_eq!(ph2.reserved, 0);

    // A write lands on 40..50 while the backing read is in flight.
    let w = ptr(0, 128, 0);
    idx.insert(&Key::new(0, 40, 10, w).with_dirty(true), &mut b).unwrap();

    // The fill only takes what is still reserved: 0..20, 30..40 and 50..64.
    let fill = ptr(0, 256, 0);
    let out = idx.fill(&ph, &Key::new(0, 0, 64, fill), &mut b).unwrap();
    assert_eq!(out, FillOutcome { filled: 44, collided: true });
    assert_eq!(idx.stats().cache_miss_collisions, 1);
    assert_eq!(
        lookup(&mut idx, &b, 0, 0, 64),
        vec![
            hit(0, 20, ptr(0, 256, 0), 0, false),
            hit(20, 10, cached, 0, false),
            hit(30, 10, ptr(0, 286, 0), 0, false),
            hit(40, 10, w, 0, true),
            hit(50, 14, ptr(0, 306, 0), 0, false),
        ]
    );
    // Filling again does nothing.
    let again = idx.fill(&ph, &Key::new(0, 0, 64, ptr(0, 384, 0)), &mut b).unwrap();
    assert_eq!(again.filled, 0);
    let b2 = b.bucket(0, 2).unwrap();
    assert_eq!((b2.clean_sectors, b2.dirty_sectors), (44, 0));
    idx.verify().unwrap();
}

#[test]
fn invalidation_and_cancel_drop_placeholders() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    let ph = idx.insert_placeholder(2, 1000, 100, &b).unwrap();
    assert_eq!(idx.invalidate(2, 1050, 10, &mut b).unwrap(), 0);
    let out = idx.fill(&ph, &Key::new(2, 1000, 100, ptr(0, 0, 0)), &mut b).unwrap();
    assert_eq!(out, FillOutcome { filled: 90, collided: true });
    assert_eq!(lookup(&mut idx, &b, 2, 1050, 10), vec![hole(1050, 10)]);

    let ph = idx.insert_placeholder(2, 5000, 10, &b).unwrap();
    idx.cancel_placeholder(&ph);
    assert_eq!(lookup(&mut idx, &b, 2, 5000, 10), vec![hole(5000, 10)]);
    idx.verify().unwrap();
}

#[test]
fn stale_keys_are_never_returned_and_go_lazily() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    idx.insert(&Key::new(0, 0, 8, ptr(0, 0, 0)), &mut b).unwrap();
    idx.insert(&Key::new(0, 8, 8, ptr(0, 128, 0)), &mut b).unwrap();
    // A key replicated on both devices survives losing one copy.
    let two = Key::new(0, 16, 8, ptr(0, 8, 0)).with_ptr(ptr(1, 0, 0)).unwrap().with_crc(Some(42));
    idx.insert(&two, &mut b).unwrap();
    assert_eq!(idx.len(), 3);

    b.invalidate(0, 0);
    assert_eq!(b.bucket(0, 0).unwrap().clean_sectors, 0);
    assert_eq!(
        lookup(&mut idx, &b, 0, 0, 24),
        vec![hole(0, 8), hit(8, 8, ptr(0, 128, 0), 0, false), hit(16, 8, ptr(1, 0, 0), 0, false)]
    );
    assert_eq!(idx.len(), 2);
    assert_eq!(idx.stats().stale_keys_dropped, 1);
    let k = idx.key_at(0, 20, &b).unwrap();
    assert_eq!(k.ptrs(), &[ptr(1, 0, 0)]);
    assert_eq!(k.crc, Some(42));

    // Scans skip and drop stale keys as well.
    b.invalidate(1, 0);
    let mut keys = Vec::new();
    assert_eq!(idx.scan(ScanPos::default(), ScanFilter::All, 10, &b, &mut keys), None);
    assert_eq!(keys.iter().map(|k| k.start).collect::<Vec<_>>(), vec![8]);
    assert_eq!(idx.len(), 1);
    // Nothing was accounted twice for the dead sectors.
    assert_eq!(b.bucket(0, 1).unwrap().clean_sectors, 8);
    assert!(b.iter().all(|(_, _, s)| s.clean_sectors >= 0 && s.dirty_sectors == 0));
    idx.verify().unwrap();

    // Inserting a key whose only pointer is already stale just invalidates its range.
    assert!(!idx.insert(&Key::new(0, 0, 16, ptr(0, 16, 0)), &mut b).unwrap());
    assert_eq!(lookup(&mut idx, &b, 0, 0, 16), vec![hole(0, 16)]);
}

#[test]
fn writeback_walks_dirty_keys_in_order_and_cleans_them() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    for (i, start) in [500u64, 10, 300, 40].into_iter().enumerate() {
        let k = Key::new(3, start, 10, ptr(0, i as u64 * BUCKET_SECTORS, 0)).with_dirty(i % 2 == 0);
        idx.insert(&k, &mut b).unwrap();
    }
    idx.insert(&Key::new(1, 0, 10, ptr(1, 0, 0)).with_dirty(true), &mut b).unwrap();
    assert_eq!(idx.dirty_sectors(3), 20);

    let mut keys = Vec::new();
    let mut pos = ScanPos { inode: 2, offset: 0 };
    let mut seen = Vec::new();
    while let Some(next) = idx.scan(pos, ScanFilter::Dirty, 1, &b, &mut keys) {
        seen.extend(keys.iter().map(|k| (k.inode, k.start)));
        pos = next;
    }
    seen.extend(keys.iter().map(|k| (k.inode, k.start)));
    assert_eq!(seen, vec![(3, 300), (3, 500)]);

    // The key at 300 is overwritten in part before writeback finishes with it.
    let dirty = idx.key_at(3, 300, &b).unwrap();
    idx.insert(&Key::new(3, 305, 2, ptr(1, BUCKET_SECTORS, 0)).with_dirty(true), &mut b).unwrap();
    let mut cleaned = Vec::new();
    assert_eq!(idx.mark_clean(&dirty, &mut b, &mut cleaned).unwrap(), 8);
    assert_eq!(cleaned.iter().map(|k| k.size).sum::<u64>(), 8);
    assert!(cleaned.iter().all(|k| !k.dirty && k.inode == dirty.inode));
    assert_eq!(idx.dirty_sectors(3), 12);
    assert_eq!(b.bucket(0, 2).unwrap().dirty_sectors, 0);
    assert_eq!(b.bucket(0, 2).unwrap().clean_sectors, 8);
    assert_eq!(
        lookup(&mut idx, &b, 3, 300, 10),
        vec![
            hit(300, 5, ptr(0, 256, 0), 0, false),
            hit(305, 2, ptr(1, BUCKET_SECTORS, 0), 0, true),
            hit(307, 3, ptr(0, 263, 0), 0, false),
        ]
    );
    idx.verify().unwrap();
}

#[test]
fn batched_lookups_return_what_single_lookups_do() {
    // Big enough for inner levels; some buckets go stale after the inserts.
    let mut b = MemBuckets::new(BUCKET_BITS, 1, 4_096);
    let mut idx = ExtentIndex::new();
    let mut x = 7u64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..40_000u64 {
        let inode = (rnd(10) / 9) as u32; // mostly inode 0, some inode 1
        let len = 1 + rnd(32);
        let p = ptr(0, (i % 4_096) * BUCKET_SECTORS, 0);
        idx.insert(&Key::new(inode, rnd(2_000_000), len, p), &mut b).unwrap();
    }
    for bucket in (0..4_096).step_by(7) {
        b.invalidate(0, bucket);
    }
    let reqs: Vec<LookupReq> =
        (0..2_000).map(|_| LookupReq { inode: (rnd(10) / 8) as u32, start: rnd(2_000_100), len: rnd(200) }).collect();
    // The batch runs first, while the stale keys are still there to be met.
    let (mut out, mut bounds) = (Vec::new(), Vec::new());
    idx.lookup_many(&reqs, &b, &mut out, &mut bounds).unwrap();
    assert!(idx.stats().stale_keys_dropped > 0);
    for (i, r) in reqs.iter().enumerate() {
        let want = lookup(&mut idx, &b, r.inode, r.start, r.len);
        assert_eq!(&out[bounds[i]..bounds[i + 1]], &want[..], "request {i}: {r:?}");
    }
    idx.verify().unwrap();
}

#[test]
fn gc_mark_recounts_what_inserts_accounted() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    idx.insert(&Key::new(0, 0, 64, ptr(0, 0, 0)).with_dirty(true), &mut b).unwrap();
    idx.insert(&Key::new(0, 16, 8, ptr(0, 128, 0)), &mut b).unwrap();
    let two = Key::new(1, 0, 32, ptr(0, 256, 0)).with_ptr(ptr(1, 0, 0)).unwrap();
    idx.insert(&two, &mut b).unwrap();
    idx.insert(&Key::new(1, 100, 8, ptr(0, 384, 0)), &mut b).unwrap();
    let ph = idx.insert_placeholder(1, 200, 8, &b).unwrap();
    b.invalidate(0, 3);
    let incremental: Vec<_> = b.iter().map(|(d, n, s)| (d, n, *s)).collect();

    let mut fresh = MemBuckets::new(BUCKET_BITS, 2, NBUCKETS as usize);
    for (d, n, s) in b.iter() {
        while fresh.bucket(d, n).unwrap().gen != s.gen {
            fresh.invalidate(d, n);
        }
    }
    assert_eq!(idx.mark_buckets(&mut fresh), 4);
    assert_eq!(fresh.iter().map(|(d, n, s)| (d, n, *s)).collect::<Vec<_>>(), incremental);
    // The stale key went, the placeholder stayed.
    assert_eq!(idx.len(), 5);
    assert_eq!(idx.stats().stale_keys_dropped, 1);
    idx.cancel_placeholder(&ph);
    idx.verify().unwrap();
}

#[test]
fn the_index_can_move_to_the_engine_thread() {
    fn send<T: Send>() {}
    send::<ExtentIndex>();
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let mut b = buckets();
    let mut idx = ExtentIndex::new();
    let crossing = Key::new(0, 0, 16, ptr(0, BUCKET_SECTORS - 8, 0));
    assert_eq!(idx.insert(&crossing, &mut b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let too_big = Key::new(0, 0, KEY_SIZE_MAX + 1, ptr(0, 0, 0));
    assert_eq!(idx.insert(&too_big, &mut b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let bad_inode = Key::new(KEY_INODE_MAX + 1, 0, 8, ptr(0, 0, 0));
    assert_eq!(idx.insert(&bad_inode, &mut b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let past_end = Key::new(0, KEY_OFFSET_MAX - 4, 8, ptr(0, 0, 0));
    assert_eq!(idx.insert(&past_end, &mut b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(Ptr::new(0, PTR_OFFSET_MAX + 1, 0).unwrap_err().kind(), ErrorKind::OutOfRange);
    let mut out = Vec::new();
    assert_eq!(idx.lookup(0, u64::MAX - 1, 8, &b, &mut out).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(idx.insert_placeholder(0, 0, 0, &b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(idx.insert_placeholder(0, 0, KEY_SIZE_MAX + 1, &b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let ph = idx.insert_placeholder(0, 0, 8, &b).unwrap();
    let wrong = Key::new(0, 0, 16, ptr(0, 0, 0));
    assert_eq!(idx.fill(&ph, &wrong, &mut b).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let mut full = Key::new(0, 0, 8, ptr(0, 0, 0));
    for d in 1..KEY_PTRS_MAX as u8 {
        full.push_ptr(ptr(d, 0, 0)).unwrap();
    }
    assert_eq!(full.push_ptr(ptr(0, 0, 0)).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert!(idx.lookup(0, 0, 0, &b, &mut out).is_ok() && out.is_empty());
    idx.verify().unwrap();
}

// ---------------------------------------------------------------------------------------
// Random interleavings against a per-sector model

#[derive(Clone, Debug, PartialEq, Eq)]
enum Sect {
    /// Data with all its pointers as inserted (this sector's position in each).
    Data { ptrs: Vec<Ptr>, dirty: bool },
    /// Reserved by placeholder number `n` (index in `Harness::phs`).
    Pending(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Nothing,
    Pending,
    Hit { ptr: Ptr, dirty: bool },
}

#[derive(Clone, Debug)]
enum Op {
    Insert { inode: u32, start: u64, len: u64, dirty: bool, replica: bool, crc: bool },
    Invalidate { inode: u32, start: u64, len: u64 },
    Placeholder { inode: u32, start: u64, len: u64 },
    Fill { n: usize, replica: bool, crc: bool },
    Cancel { n: usize },
    Lookup { inode: u32, start: u64, len: u64 },
    LookupMany { reqs: Vec<(u32, u64, u64)> },
    InvalidateBucket { n: usize },
    Scan { dirty: bool, batch: usize },
    MarkClean { n: usize },
    Move { n: usize, off: u64, len: u64 },
}

fn arb_op() -> impl Strategy<Value = Op> {
    let inode = 0..INODES;
    prop_oneof![
        5 => (inode.clone(), 0..SPACE, 1..=64u64, any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(inode, start, len, dirty, replica, crc)| Op::Insert { inode, start, len, dirty, replica, crc }),
        2 => (inode.clone(), 0..SPACE, 1..=300u64).prop_map(|(inode, start, len)| Op::Invalidate { inode, start, len }),
        2 => (inode.clone(), 0..SPACE, 1..=64u64).prop_map(|(inode, start, len)| Op::Placeholder { inode, start, len }),
        2 => (any::<usize>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(n, replica, crc)| Op::Fill { n, replica, crc }),
        1 => any::<usize>().prop_map(|n| Op::Cancel { n }),
        3 => (inode.clone(), 0..SPACE, 1..=256u64).prop_map(|(inode, start, len)| Op::Lookup { inode, start, len }),
        1 => prop::collection::vec((inode, 0..SPACE, 0..=128u64), 0..40).prop_map(|reqs| Op::LookupMany { reqs }),
        1 => any::<usize>().prop_map(|n| Op::InvalidateBucket { n }),
        1 => (any::<bool>(), 1..5usize).prop_map(|(dirty, batch)| Op::Scan { dirty, batch }),
        1 => any::<usize>().prop_map(|n| Op::MarkClean { n }),
        1 => (any::<usize>(), any::<u64>(), any::<u64>()).prop_map(|(n, off, len)| Op::Move { n, off, len }),
    ]
}

struct Harness {
    idx: ExtentIndex,
    b: MemBuckets,
    model: BTreeMap<(u32, u64), Sect>,
    /// Open bucket and sectors used in it, per cache device.
    open: [(u64, u64); 2],
    used_buckets: Vec<(u8, u64)>,
    phs: Vec<Placeholder>,
    scanned: Vec<Key>,
    /// Keys of the last scan of everything (moving GC's candidates).
    scanned_all: Vec<Key>,
    collisions: u64,
    crc_seed: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            idx: ExtentIndex::new(),
            b: buckets(),
            model: BTreeMap::new(),
            open: [(NBUCKETS - 1, BUCKET_SECTORS); 2],
            used_buckets: Vec::new(),
            phs: Vec::new(),
            scanned: Vec::new(),
            scanned_all: Vec::new(),
            collisions: 0,
            crc_seed: 1,
        }
    }

    /// Fresh cache space, like the allocator: fill buckets in turn, invalidating each one
    /// (bumping its gen) before reuse.
    fn alloc(&mut self, dev: u8, len: u64) -> Ptr {
        let (bucket, used) = &mut self.open[dev as usize];
        if *used + len > BUCKET_SECTORS {
            *bucket = (*bucket + 1) % NBUCKETS;
            *used = 0;
            self.b.invalidate(dev, *bucket).unwrap();
            self.used_buckets.push((dev, *bucket));
        }
        let gen = self.b.bucket(dev, *bucket).unwrap().gen;
        let p = ptr(dev, (*bucket << BUCKET_BITS) + *used, gen);
        *used += len;
        p
    }

    fn crc(&mut self) -> u64 {
        self.crc_seed = self.crc_seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.crc_seed & KEY_CRC_MASK
    }

    fn live(&self, p: Ptr) -> bool {
        self.b.bucket(p.dev(), p.bucket(BUCKET_BITS)).map(|s| s.gen) == Some(p.gen())
    }

    fn seen(&self, inode: u32, s: u64) -> Seen {
        match self.model.get(&(inode, s)) {
            None => Seen::Nothing,
            Some(Sect::Pending(_)) => Seen::Pending,
            Some(Sect::Data { ptrs, dirty }) => match ptrs.iter().find(|&&p| self.live(p)) {
                Some(&ptr) => Seen::Hit { ptr, dirty: *dirty },
                None => Seen::Nothing,
            },
        }
    }

    fn set_data(&mut self, inode: u32, start: u64, ptrs: &[Ptr], skip: u64, len: u64, dirty: bool) {
        for i in 0..len {
            let ptrs = ptrs.iter().map(|&p| ptr_at(p, skip + i)).collect();
            self.model.insert((inode, start + i), Sect::Data { ptrs, dirty });
        }
    }

    fn make_key(&mut self, inode: u32, start: u64, len: u64, replica: bool, crc: bool) -> Key {
        let mut k = Key::new(inode, start, len, self.alloc(0, len));
        if replica {
            let p = self.alloc(1, len);
            k.push_ptr(p).unwrap();
        }
        if crc {
            k.crc = Some(self.crc());
        }
        k
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Insert { inode, start, len, dirty, replica, crc } => {
                let key = self.make_key(inode, start, len, replica, crc).with_dirty(dirty);
                prop_assert!(self.idx.insert(&key, &mut self.b).unwrap());
                self.set_data(inode, start, key.ptrs(), 0, len, dirty);
            }
            Op::Invalidate { inode, start, len } => {
                let (mut live, mut all) = (0, 0);
                for s in start..start + len {
                    if let Some(Sect::Data { .. }) = self.model.remove(&(inode, s)) {
                        all += 1;
                    }
                    live += matches!(self.seen(inode, s), Seen::Hit { .. }) as u64;
                }
                let dropped = self.idx.invalidate(inode, start, len, &mut self.b).unwrap();
                prop_assert!(live <= dropped && dropped <= all, "dropped {} of {} ({} live)", dropped, all, live);
            }
            Op::Placeholder { inode, start, len } => {
                let n = self.phs.len();
                let free: Vec<u64> = (start..start + len).filter(|&s| self.seen(inode, s) == Seen::Nothing).collect();
                let ph = self.idx.insert_placeholder(inode, start, len, &self.b).unwrap();
                prop_assert_eq!(ph.reserved, free.len() as u64);
                for s in free {
                    self.model.insert((inode, s), Sect::Pending(n));
                }
                self.phs.push(ph);
            }
            Op::Fill { n, replica, crc } => {
                if self.phs.is_empty() {
                    return Ok(());
                }
                let n = n % self.phs.len();
                let ph = self.phs[n];
                let key = self.make_key(ph.inode, ph.start, ph.len, replica, crc);
                let mine: Vec<u64> = (ph.start..ph.start + ph.len)
                    .filter(|&s| self.model.get(&(ph.inode, s)) == Some(&Sect::Pending(n)))
                    .collect();
                let out = self.idx.fill(&ph, &key, &mut self.b).unwrap();
                prop_assert_eq!(out.filled, mine.len() as u64);
                prop_assert_eq!(out.collided, out.filled < ph.reserved);
                self.collisions += out.collided as u64;
                prop_assert_eq!(self.idx.stats().cache_miss_collisions, self.collisions);
                for s in mine {
                    self.set_data(ph.inode, s, key.ptrs(), s - ph.start, 1, false);
                }
            }
            Op::Cancel { n } => {
                if self.phs.is_empty() {
                    return Ok(());
                }
                let n = n % self.phs.len();
                self.idx.cancel_placeholder(&self.phs[n]);
                self.model.retain(|_, s| *s != Sect::Pending(n));
            }
            Op::Lookup { inode, start, len } => {
                let frags = lookup(&mut self.idx, &self.b, inode, start, len);
                self.check_fragments(inode, start, len, &frags)?;
            }
            Op::LookupMany { ref reqs } => {
                let reqs: Vec<LookupReq> =
                    reqs.iter().map(|&(inode, start, len)| LookupReq { inode, start, len }).collect();
                let (mut out, mut bounds) = (Vec::new(), Vec::new());
                self.idx.lookup_many(&reqs, &self.b, &mut out, &mut bounds).unwrap();
                prop_assert_eq!(bounds.len(), reqs.len() + 1);
                for (i, r) in reqs.iter().enumerate() {
                    self.check_fragments(r.inode, r.start, r.len, &out[bounds[i]..bounds[i + 1]])?;
                }
            }
            Op::InvalidateBucket { n } => {
                if let Some(&(dev, bucket)) = self.used_buckets.get(n % self.used_buckets.len().max(1)) {
                    self.b.invalidate(dev, bucket).unwrap();
                }
            }
            Op::Scan { dirty, batch } => {
                let filter = if dirty { ScanFilter::Dirty } else { ScanFilter::All };
                let mut all = Vec::new();
                let mut keys = Vec::new();
                let mut pos = ScanPos::default();
                loop {
                    let next = self.idx.scan(pos, filter, batch, &self.b, &mut keys);
                    prop_assert!(keys.len() <= batch);
                    all.append(&mut keys);
                    match next {
                        Some(p) => pos = p,
                        None => break,
                    }
                }
                for w in all.windows(2) {
                    prop_assert!((w[0].inode, w[0].end()) <= (w[1].inode, w[1].start), "keys overlap: {:?}", w);
                }
                let mut covered = HashMap::new();
                for k in &all {
                    prop_assert!(!dirty || k.dirty);
                    for s in k.start..k.end() {
                        let Some(Sect::Data { ptrs, dirty }) = self.model.get(&(k.inode, s)) else {
                            return Err(TestCaseError::fail(format!("scan returned {k:?}, model has no data at {s}")));
                        };
                        let live: Vec<Ptr> = ptrs.iter().copied().filter(|&p| self.live(p)).collect();
                        let got: Vec<Ptr> = k.ptrs().iter().map(|&p| ptr_at(p, s - k.start)).collect();
                        prop_assert_eq!(got, live, "pointers of {:?} at {}", k, s);
                        prop_assert_eq!(*dirty, k.dirty);
                        covered.insert((k.inode, s), ());
                    }
                }
                for &(inode, s) in self.model.keys() {
                    let want = match self.seen(inode, s) {
                        Seen::Hit { dirty: d, .. } => !dirty || d,
                        _ => false,
                    };
                    prop_assert_eq!(covered.contains_key(&(inode, s)), want, "sector {}:{}", inode, s);
                }
                if dirty {
                    self.scanned = all;
                } else {
                    self.scanned_all = all;
                }
            }
            Op::MarkClean { n } => {
                if self.scanned.is_empty() {
                    return Ok(());
                }
                let key = self.scanned[n % self.scanned.len()].clone();
                let mut want = 0;
                for s in key.start..key.end() {
                    let mine: Vec<Ptr> = key.ptrs().iter().map(|&p| ptr_at(p, s - key.start)).collect();
                    if let Some(Sect::Data { ptrs, dirty }) = self.model.get_mut(&(key.inode, s)) {
                        let live =
                            |p: &Ptr| self.b.bucket(p.dev(), p.bucket(BUCKET_BITS)).map(|s| s.gen) == Some(p.gen());
                        if *dirty && ptrs.iter().any(|p| mine.contains(p) && live(p)) {
                            *dirty = false;
                            want += 1;
                        }
                    }
                }
                let mut cleaned = Vec::new();
                prop_assert_eq!(self.idx.mark_clean(&key, &mut self.b, &mut cleaned).unwrap(), want);
                prop_assert_eq!(cleaned.iter().map(|k| k.size).sum::<u64>(), want);
            }
            Op::Move { n, off, len } => {
                // Moving GC copied part of a key it scanned (which may have changed since)
                // to fresh space: sectors still holding that data point there instead.
                if self.scanned_all.is_empty() {
                    return Ok(());
                }
                let key = self.scanned_all[n % self.scanned_all.len()].clone();
                let start = key.start + off % key.size;
                let len = 1 + len % (key.end() - start);
                let src = ptr_at(key.ptrs()[0], start - key.start);
                let dst = self.alloc(0, len);
                let mut want = 0;
                if self.live(src) && self.live(dst) {
                    for s in start..start + len {
                        let here = ptr_at(src, s - start);
                        let live =
                            |p: &Ptr| self.b.bucket(p.dev(), p.bucket(BUCKET_BITS)).map(|b| b.gen) == Some(p.gen());
                        if let Some(Sect::Data { ptrs, .. }) = self.model.get_mut(&(key.inode, s)) {
                            if ptrs.contains(&here) {
                                let mut now = vec![ptr_at(dst, s - start)];
                                now.extend(ptrs.iter().copied().filter(|p| *p != here && live(p)));
                                *ptrs = now;
                                want += 1;
                            }
                        }
                    }
                }
                let mut moved = Vec::new();
                let got = self.idx.move_ptr(key.inode, start, len, src, dst, &mut self.b, &mut moved).unwrap();
                prop_assert_eq!(got, want, "moving {:?} {}+{}", key, start, len);
                prop_assert_eq!(moved.iter().map(|k| k.size).sum::<u64>(), want);
                for k in &moved {
                    prop_assert_eq!(k.ptrs()[0], ptr_at(dst, k.start - start));
                    let Some(Sect::Data { dirty, .. }) = self.model.get(&(k.inode, k.start)) else {
                        return Err(TestCaseError::fail(format!("moved key {k:?} where the model has no data")));
                    };
                    prop_assert_eq!(k.dirty, *dirty);
                }
            }
        }
        self.check_invariants()
    }

    fn check_fragments(&self, inode: u32, start: u64, len: u64, frags: &[Fragment]) -> Result<(), TestCaseError> {
        let mut pos = start;
        for f in frags {
            prop_assert_eq!(f.start, pos, "fragments out of order or with gaps: {:?}", frags);
            prop_assert!(f.len > 0);
            pos = f.end();
        }
        prop_assert_eq!(pos, start + len, "fragments do not cover the range: {:?}", frags);
        for w in frags.windows(2) {
            prop_assert!(!(w[0].kind == FragmentKind::Hole && w[1].kind == FragmentKind::Hole));
        }
        for f in frags {
            for s in f.start..f.end() {
                let want = self.seen(inode, s);
                let got = match f.kind {
                    FragmentKind::Hole => Seen::Nothing,
                    FragmentKind::Pending => Seen::Pending,
                    FragmentKind::Hit { ptr, offset, dirty } => {
                        Seen::Hit { ptr: ptr_at(ptr, offset + s - f.start), dirty }
                    }
                };
                prop_assert_eq!(got, want, "sector {}:{} in {:?}", inode, s, frags);
            }
        }
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        if let Err(e) = self.idx.verify() {
            return Err(TestCaseError::fail(e));
        }
        // Every bucket holds exactly the live sectors pointing into it.
        let mut want: HashMap<(u8, u64), (i64, i64)> = HashMap::new();
        for sect in self.model.values() {
            if let Sect::Data { ptrs, dirty } = sect {
                for &p in ptrs.iter().filter(|&&p| self.live(p)) {
                    let e = want.entry((p.dev(), p.bucket(BUCKET_BITS))).or_default();
                    if *dirty {
                        e.1 += 1;
                    } else {
                        e.0 += 1;
                    }
                }
            }
        }
        for (dev, bucket, s) in self.b.iter() {
            let w = want.get(&(dev, bucket)).copied().unwrap_or_default();
            prop_assert_eq!((s.clean_sectors, s.dirty_sectors), w, "sectors of bucket {}:{}", dev, bucket);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_interleavings_match_a_per_sector_model(ops in prop::collection::vec(arb_op(), 1..150)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op)?;
        }
        // Finally the whole space, every inode.
        for inode in 0..INODES {
            h.apply(&Op::Lookup { inode, start: 0, len: SPACE + 64 })?;
        }
        h.apply(&Op::Scan { dirty: false, batch: 3 })?;
    }
}

/// Every key a scan for dirty keys returns, from the start, in batches of `batch`.
fn dirty_scan(idx: &mut ExtentIndex, b: &MemBuckets, batch: usize) -> Vec<(u32, u64, u64)> {
    let mut all = Vec::new();
    let mut keys = Vec::new();
    let mut pos = ScanPos::default();
    loop {
        let next = idx.scan(pos, ScanFilter::Dirty, batch, b, &mut keys);
        all.extend(keys.iter().map(|k| (k.inode, k.start, k.end())));
        match next {
            Some(p) => pos = p,
            None => return all,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The dirty map: a scan for dirty keys visits only 1 MiB regions that may hold some,
    /// and returns exactly the dirty keys a scan of everything finds, however keys were
    /// inserted across region boundaries, split, cleaned and dropped, and again after its
    /// own clearing of regions found empty.
    #[test]
    fn dirty_scans_return_every_dirty_key_and_only_those(
        ops in prop::collection::vec((0u8..5, 0u64..24, 0u64..2048, 1u64..=128, 0u32..2), 1..90),
        batches in prop::collection::vec(1usize..6, 1..4),
    ) {
        let mut b = buckets();
        let mut idx = ExtentIndex::new();
        let mut used = 0u64;
        for (kind, region, off, len, inode) in ops {
            let start = region * 2048 + off;
            match kind {
                0..=2 if used < 2 * NBUCKETS => {
                    let p = ptr((used % 2) as u8, (used / 2) * BUCKET_SECTORS, 0);
                    used += 1;
                    idx.insert(&Key::new(inode, start, len, p).with_dirty(kind != 0), &mut b).unwrap();
                }
                3 => {
                    idx.invalidate(inode, start, len * 8, &mut b).unwrap();
                }
                _ => {
                    let dirty = dirty_scan(&mut idx, &b, 4);
                    if let Some(&(i, s, _)) = dirty.get((start as usize) % dirty.len().max(1)) {
                        let k = idx.key_at(i, s, &b).unwrap();
                        let mut cleaned = Vec::new();
                        idx.mark_clean(&k, &mut b, &mut cleaned).unwrap();
                    }
                }
            }
        }
        let mut keys = Vec::new();
        idx.scan(ScanPos::default(), ScanFilter::All, usize::MAX, &b, &mut keys);
        let want: Vec<(u32, u64, u64)> = keys.iter().filter(|k| k.dirty).map(|k| (k.inode, k.start, k.end())).collect();
        for &batch in &batches {
            prop_assert_eq!(&dirty_scan(&mut idx, &b, batch), &want, "batch {}", batch);
        }
        // Regions a scan found empty were cleared: what is left covers the dirty keys.
        let mut regions = std::collections::HashSet::new();
        for &(i, s, e) in &want {
            for r in s >> 11..=(e - 1) >> 11 {
                regions.insert((i, r));
            }
        }
        let marked: usize = (0..2).map(|i| idx.dirty_regions(i)).sum();
        prop_assert_eq!(marked, regions.len(), "regions marked vs regions with dirty data");
        idx.verify().unwrap();
    }
}
