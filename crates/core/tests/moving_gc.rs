//! Moving GC: the live data of mostly empty buckets moves to fresh ones, every byte
//! preserved (clean or dirty, across restarts and crashes, with writes landing meanwhile),
//! and the buckets it leaves come back as free space.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, MovingGcStats, WritebackConfig};
use ubcache_core::io::fault::CrashMode;
use ubcache_core::io::{AlignedBuf, DevId, IoRequest};

/// 256 buckets of 64 KiB (16 blocks each) and one 8 MiB backing device.
fn geo() -> Geo {
    Geo { nbuckets: 256, bucket_sectors: 128, backing_blocks: vec![2048], journal_buckets: None }
}

fn opts(mode: CacheMode) -> RigOptions {
    RigOptions {
        modes: vec![mode],
        set: CacheSetOptions { journal_delay_ms: 2, ..Default::default() },
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        ..Default::default()
    }
}

fn stats(rig: &Rig) -> MovingGcStats {
    rig.engine.set().unwrap().moving_gc_stats()
}

/// Buckets holding live data.
fn buckets_in_use(rig: &Rig) -> usize {
    let set = rig.engine.set().unwrap();
    let a = set.allocator();
    (0..a.nbuckets(0).unwrap())
        .filter(|&b| {
            let i = a.bucket(0, b).unwrap();
            i.sectors_used > 0 && i.mark != ubcache_core::alloc::GcMark::Metadata
        })
        .count()
}

/// Runs a GC pass and waits until it and the moving pass it starts (if any) have finished.
fn gc_and_move(rig: &mut Rig) -> MovingGcStats {
    let runs = rig.engine.set().unwrap().stats().gc_runs;
    rig.engine.set_mut().unwrap().trigger_gc();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        rig.poll(Duration::from_millis(2));
        let set = rig.engine.set().unwrap();
        if set.stats().gc_runs > runs && !set.moving_gc_running() {
            return set.moving_gc_stats();
        }
        assert!(Instant::now() < until, "GC and moving GC still busy after 20 s: {:?}", set.moving_gc_stats());
    }
}

/// Fills 64 buckets with blocks 0..1024 (version 1), then discards three blocks in four:
/// every bucket is left a quarter full.
fn fill_and_thin(rig: &mut Rig) {
    for b in 0..1024 {
        rig.write(0, b, &block_content(0, b, 1), false).unwrap();
    }
    for b in 0..1024u64 {
        if b % 4 != 0 {
            let tag = rig.tag();
            let h = rig.handles[0];
            rig.run(IoRequest::discard(DevId(h), b * BLOCK, BLOCK, tag)).result.unwrap();
        }
    }
    rig.flush(0).unwrap();
}

fn check_kept(rig: &mut Rig, version: impl Fn(u64) -> u64) {
    for b in (0..1024).step_by(4) {
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, version(b)), "block {b}");
    }
}

fn dirty(rig: &Rig) -> u64 {
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set().unwrap().dirty_sectors(inode)
}

#[test]
fn dirty_data_moves_out_of_sparse_buckets_and_their_space_comes_back() {
    let paths = format("mgc-dirty", geo());
    let mut rig = Rig::open(&paths, &opts(CacheMode::Writeback)).unwrap();
    fill_and_thin(&mut rig);
    assert_eq!(dirty(&rig), 256 * BLOCK / 512);
    let in_use_before = buckets_in_use(&rig);
    let first = gc_and_move(&mut rig);
    // A pass moves up to a 32nd of the cache (8 buckets' worth: 32 quarter-full buckets).
    assert!(first.passes == 1 && first.sectors_moved > 900 && first.sectors_moved <= 1024, "{first:?}");
    // Every pass empties the sparsest buckets; run until none is left.
    let mut s = first;
    for _ in 0..8 {
        s = gc_and_move(&mut rig);
    }
    // (Nearly) every block of the 64 buckets moved: the quarter still live of each. The
    // buckets written to are full, and not chosen again.
    assert!(s.sectors_moved >= 62 * 32 && s.sectors_moved <= 256 * BLOCK / 512, "{s:?}");
    assert_eq!(s.moves_dropped, 0, "{s:?}");
    rig.engine.set_mut().unwrap().trigger_gc();
    rig.settle();
    let in_use = buckets_in_use(&rig);
    assert!(in_use <= 64 / 4 + 2 && in_use < in_use_before, "buckets in use: {in_use_before} then {in_use}");
    // Dirty data stays dirty, in place for writeback; nothing reached the backing device.
    assert_eq!(dirty(&rig), 256 * BLOCK / 512);
    check_kept(&mut rig, |_| 1);
    rig.close().unwrap();

    let mut rig = Rig::open(&paths, &opts(CacheMode::Writeback)).unwrap();
    assert_eq!(dirty(&rig), 256 * BLOCK / 512, "the moved keys were journalled dirty");
    check_kept(&mut rig, |_| 1);
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let full = WritebackConfig { percent: 0, delay: Duration::ZERO, ..Default::default() };
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while dirty(&rig) > 0 {
        assert!(Instant::now() < until, "writeback did not finish");
        rig.poll(Duration::from_millis(5));
    }
    rig.close().unwrap();
    let data = std::fs::read(&paths.backing[0]).unwrap();
    for b in (0..1024u64).step_by(4) {
        let at = (DATA_OFFSET + b * BLOCK) as usize;
        assert_eq!(&data[at..at + BLOCK as usize], &block_content(0, b, 1)[..], "block {b} on the backing device");
    }
}

#[test]
fn clean_data_moves_and_stays_a_hit() {
    let paths = format("mgc-clean", geo());
    let mut rig = Rig::open(&paths, &opts(CacheMode::Writethrough)).unwrap();
    fill_and_thin(&mut rig);
    let s = gc_and_move(&mut rig);
    assert!(s.sectors_moved > 0, "{s:?}");
    let hits = rig.engine.set().unwrap().stats().cache_hits;
    check_kept(&mut rig, |_| 1);
    let after = rig.engine.set().unwrap().stats().cache_hits;
    assert_eq!(after - hits, 256, "every kept block is still cached");
}

#[test]
fn writes_landing_during_moves_are_never_lost() {
    let paths = format("mgc-race", geo());
    // Random extra latency per I/O keeps moves in flight while writes arrive.
    let o = RigOptions { jitter: Duration::from_micros(400), ..opts(CacheMode::Writeback) };
    let mut rig = Rig::open(&paths, &o).unwrap();
    fill_and_thin(&mut rig);
    rig.engine.set_mut().unwrap().trigger_gc();
    // Rewrite kept blocks (dirty: in place) while the pass runs, without waiting for each.
    let mut version = vec![1u64; 1024];
    let mut rng = Rng(11);
    let mut tags = Vec::new();
    for round in 0..6u64 {
        for _ in 0..40 {
            let b = rng.below(256) * 4;
            if tags.iter().any(|&(_, tb)| tb == b) {
                continue;
            }
            version[b as usize] = 2 + round;
            let tag = rig.tag();
            let h = rig.handles[0];
            let buf = AlignedBuf::from_slice(&block_content(0, b, 2 + round));
            rig.submit(IoRequest::write(DevId(h), b * BLOCK, buf, tag));
            tags.push((tag, b));
        }
        while !tags.is_empty() {
            rig.poll(Duration::from_millis(1));
            let done = std::mem::take(&mut rig.done);
            for c in done {
                c.result.as_ref().unwrap();
                tags.retain(|&(t, _)| t != c.user_data);
            }
        }
        if round % 2 == 1 {
            rig.engine.set_mut().unwrap().trigger_gc();
        }
    }
    let s = gc_and_move(&mut rig);
    assert!(s.sectors_moved > 0, "{s:?}");
    check_kept(&mut rig, |b| version[b as usize]);
    rig.flush(0).unwrap();
    // A crash now: everything flushed reads back as written.
    rig.crash(CrashMode::DropUnflushed);
    let mut rig = Rig::open(&paths, &opts(CacheMode::Writeback)).unwrap();
    check_kept(&mut rig, |b| version[b as usize]);
}

#[test]
fn moving_gc_can_be_turned_off() {
    let paths = format("mgc-off", geo());
    let mut o = opts(CacheMode::Writeback);
    o.set.copy_gc_enabled = false;
    let mut rig = Rig::open(&paths, &o).unwrap();
    fill_and_thin(&mut rig);
    let runs = rig.engine.set().unwrap().stats().gc_runs;
    rig.engine.set_mut().unwrap().trigger_gc();
    while rig.engine.set().unwrap().stats().gc_runs == runs {
        rig.poll(Duration::from_millis(2));
    }
    rig.settle();
    assert_eq!(stats(&rig), MovingGcStats::default());
    check_kept(&mut rig, |_| 1);
}

/// Where block `b` of device 0 is cached (the pointer of its key at the block).
fn cached_ptr(rig: &mut Rig, b: u64) -> u64 {
    let s = b * BLOCK / 512;
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let k = rig.engine.set_mut().unwrap().keys().into_iter().find(|k| k.inode == inode && k.start <= s && s < k.end());
    let k = k.expect("cached");
    k.ptrs()[0].offset() + (s - k.start)
}

#[test]
fn with_promote_hits_a_hit_in_an_old_bucket_moves_its_extent_to_a_fresh_one() {
    let paths = format("mgc-promote", geo());
    let mut o = opts(CacheMode::Writethrough);
    o.set.promote_hits = true;
    o.bypass = Some(ubcache_core::cache_set::BypassConfig { sequential_cutoff: 0, ..Default::default() });
    let mut rig = Rig::open(&paths, &o).unwrap();
    // 6 MiB written: the first buckets age (a prio step per 16 KiB written).
    for b in 0..1536 {
        rig.write(0, b, &block_content(0, b, 1), false).unwrap();
    }
    let old: Vec<u64> = (0..64).step_by(4).map(|b| cached_ptr(&mut rig, b)).collect();
    let young = cached_ptr(&mut rig, 1530);
    for b in (0..64).step_by(4) {
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 1), "block {b}");
    }
    assert_eq!(rig.read(0, 1530, 1).unwrap(), block_content(0, 1530, 1));
    rig.settle();
    let s = stats(&rig);
    assert_eq!(s.promotions, 16, "{s:?}");
    let now: Vec<u64> = (0..64).step_by(4).map(|b| cached_ptr(&mut rig, b)).collect();
    assert!(old.iter().zip(&now).all(|(a, b)| a != b), "moved: {old:?} -> {now:?}");
    assert_eq!(cached_ptr(&mut rig, 1530), young, "a hit in a young bucket stays");
    for b in (0..64).step_by(4) {
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 1), "block {b} after its move");
    }
    rig.flush(0).unwrap();
    rig.crash(CrashMode::DropUnflushed);
    let mut rig = Rig::open(&paths, &o).unwrap();
    for b in 0..1536 {
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 1), "block {b} after a crash");
    }
}
