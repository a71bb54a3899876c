//! The cache set survives restarts (warm) and crashes (nothing flushed lost, nothing stale
//! served), and refuses to start on damaged metadata it cannot do without.

use std::collections::BTreeMap;

use ubcache_core::cache_set::superblock;
use ubcache_core::cache_set::{CacheSet, CacheSetOptions, MemStorage, Storage};

const BS: u64 = 16; // bucket size in sectors (8 KiB)

fn fresh(nbuckets: u64) -> MemStorage {
    let mut st = MemStorage::new(nbuckets * BS * 512);
    st.write(4096, &superblock::format([1; 16], [2; 16], nbuckets, BS as u16, 8)).unwrap();
    st
}

fn opts() -> CacheSetOptions {
    CacheSetOptions { journal_delay_ms: 100_000, seed: 7 }
}

fn block(tag: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i.wrapping_mul(31) ^ tag.wrapping_mul(0x9e37)) as u8).collect()
}

/// Model: (inode, block number) -> tag of the data last written there.
type Model = BTreeMap<(u32, u64), u64>;

fn check<S: Storage>(cs: &mut CacheSet<S>, model: &Model) {
    for (&(inode, blk), &tag) in model {
        let r = cs.read(inode, blk * 8, 8).unwrap();
        assert_eq!(r.len(), 1, "inode {inode} block {blk}: {r:?}");
        assert_eq!(r[0].data.as_deref(), Some(&block(tag)[..]), "inode {inode} block {blk} tag {tag}");
    }
    cs.verify_index().unwrap();
    let gens: Vec<_> = cs.keys();
    for k in gens {
        for p in k.ptrs() {
            let b = cs.allocator().bucket(p.dev(), p.offset() / BS).unwrap();
            assert_eq!(b.gen, p.gen(), "key {k:?} points into a bucket whose gen moved on");
        }
    }
}

#[test]
fn fresh_set_then_restart_keeps_every_key() {
    let st = fresh(1024);
    let mut cs = CacheSet::open(st, opts()).unwrap();
    assert!(cs.open_report().fresh);
    assert!(cs.superblock().sync());
    assert_eq!(cs.superblock().seq, 1);
    let mut model = Model::new();
    for i in 0..600u64 {
        let (inode, blk) = ((i % 3) as u32, (i * 7919) % 500);
        cs.write(inode, blk * 8, &block(i)).unwrap();
        model.insert((inode, blk), i);
        if i % 50 == 0 {
            cs.flush().unwrap();
        }
    }
    cs.flush().unwrap();
    check(&mut cs, &model);
    let st = cs.close().unwrap();
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let r = cs.open_report().clone();
    assert!(!r.fresh);
    assert_eq!(r.replayed_keys, 0, "a clean close leaves nothing to replay: {r:?}");
    assert_eq!(r.checkpoint_keys as usize, cs.keys().len());
    assert_eq!(cs.superblock().seq, 2);
    check(&mut cs, &model);
    // Without a clean close the keys come from the journal.
    for i in 600..700u64 {
        cs.write(5, i * 8, &block(i)).unwrap();
        model.insert((5, i), i);
    }
    cs.flush().unwrap();
    let st = cs.abandon();
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let r = cs.open_report().clone();
    assert_eq!(r.checkpoint_seq + r.replayed_entries, r.head_seq, "replay reached the newest entry: {r:?}");
    assert!(r.replayed_keys > 0 || r.checkpoint_keys as usize == cs.keys().len(), "{r:?}");
    check(&mut cs, &model);
}

#[test]
fn unflushed_writes_are_not_required_but_flushed_ones_are() {
    let mut cs = CacheSet::open(fresh(1024), opts()).unwrap();
    cs.write(1, 0, &block(1)).unwrap();
    cs.flush().unwrap();
    cs.write(1, 8, &block(2)).unwrap();
    let st = cs.abandon();
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let mut m = Model::new();
    m.insert((1, 0), 1);
    check(&mut cs, &m);
}
