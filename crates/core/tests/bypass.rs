//! Bypass through a running set: streams past the sequential cutoff and requests met by a
//! congested cache device go to the backing device, and nothing stale is read after.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::cache_set::{BypassConfig, CacheMode, CacheSetOptions, CongestionConfig, WritebackConfig};
use ubcache_core::io::fault::Latency;
use ubcache_core::io::{AlignedBuf, DevId, IoRequest};

fn opts(mode: CacheMode, cutoff: u64) -> RigOptions {
    RigOptions {
        modes: vec![mode],
        // Dirty data stays dirty: what the cache holds is then known.
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        set: CacheSetOptions { journal_delay_ms: 2, ..Default::default() },
        bypass: Some(BypassConfig { sequential_cutoff: cutoff, ..Default::default() }),
        ..Default::default()
    }
}

fn blocks(dev: u32, start: u64, n: u64, v: u64) -> Vec<u8> {
    (start..start + n).flat_map(|b| block_content(dev, b, v)).collect()
}

fn cached(rig: &Rig) -> u64 {
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set().unwrap().cached_sectors(inode)
}

#[test]
fn a_sequential_read_fills_the_cache_up_to_the_cutoff_and_no_further() {
    let paths = format("seqread", Geo::small());
    let mut rig = Rig::open(&paths, &opts(CacheMode::Writethrough, 256 << 10)).unwrap();
    // 1 MiB in 64 KiB reads: the fourth brings the stream to the 256 KiB cutoff.
    for i in 0..16 {
        assert!(rig.read(0, i * 16, 16).unwrap() == blocks(0, i * 16, 16, 0), "read {i}");
    }
    rig.drain();
    assert_eq!(cached(&rig), 3 * 128, "the first three reads filled, the rest bypassed");
    let s = rig.engine.set().unwrap().stats();
    assert_eq!((s.sequential_bypasses, s.cache_bypass_misses, s.cache_misses), (13, 13, 3), "{s:?}");
    assert_eq!(s.bypassed_sectors, 13 * 128);
    // Read again (a new stream: it starts where none ended): the filled part hits.
    assert!(rig.read(0, 0, 48).unwrap() == blocks(0, 0, 48, 0));
    let s2 = rig.engine.set().unwrap().stats();
    assert_eq!(s2.cache_hits, s.cache_hits + 1);
    // With the cutoff off, the same stream (it goes on where the first ended) fills.
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let off = BypassConfig { sequential_cutoff: 0, ..Default::default() };
    rig.engine.set_mut().unwrap().set_bypass_config(inode, off).unwrap();
    for i in 0..16 {
        rig.read(0, 256 + i * 16, 16).unwrap();
    }
    rig.drain();
    let s3 = rig.engine.set().unwrap().stats();
    assert_eq!((s3.sequential_bypasses, s3.cache_misses), (13, 3 + 16), "{s3:?}");
    assert!(s3.fill_sectors > s2.fill_sectors, "{s3:?}");
    rig.close().unwrap();
}

/// A bypassed write goes around the cache, except over dirty data: read back, every block
/// is the newest version, in writeback and in writethrough.
#[test]
fn bypassed_writes_leave_nothing_stale_in_the_cache() {
    for mode in [CacheMode::Writeback, CacheMode::Writethrough] {
        let paths = format(&format!("seqwrite-{}", mode.name()), Geo::small());
        let mut rig = Rig::open(&paths, &opts(mode, 64 << 10)).unwrap();
        // Single blocks (not bypassed): cached, dirty in writeback.
        for b in [3u64, 9, 40] {
            rig.write(0, b, &block_content(0, b, 1), false).unwrap();
        }
        let inode = rig.engine.inode(rig.handles[0]).unwrap();
        let dirty_before = rig.engine.set().unwrap().dirty_sectors(inode);
        assert_eq!(
            dirty_before,
            if mode == CacheMode::Writeback { 24 } else { 0 },
            "{:?}",
            rig.engine.set().unwrap().stats()
        );
        // 64 KiB writes over them: each one reaches the cutoff by itself.
        rig.write(0, 0, &blocks(0, 0, 16, 2), false).unwrap();
        rig.write(0, 32, &blocks(0, 32, 16, 2), false).unwrap();
        let s = rig.engine.set().unwrap().stats();
        assert_eq!(s.sequential_bypasses, 2, "{mode:?}: {s:?}");
        // Only the dirty blocks (written in place) are still cached; nothing new became dirty.
        let dirty = rig.engine.set().unwrap().dirty_sectors(inode);
        assert_eq!(dirty, dirty_before, "{mode:?}");
        assert_eq!(cached(&rig), dirty_before, "{mode:?}: the clean copies were dropped");
        rig.flush(0).unwrap();
        for b in 0..48 {
            let v = if (0..16).contains(&b) || (32..48).contains(&b) { 2 } else { 0 };
            assert!(rig.read(0, b, 1).unwrap() == block_content(0, b, v), "{mode:?}: block {b}");
        }
        rig.close().unwrap();
        // And after a restart.
        let mut rig = Rig::open(&paths, &opts(mode, 64 << 10)).unwrap();
        assert!(rig.read(0, 0, 16).unwrap() == blocks(0, 0, 16, 2), "{mode:?}: after a restart");
        rig.close().unwrap();
    }
}

/// Runs `n` 4 KiB random reads over the first `span` blocks, `depth` at a time; checks
/// every one.
fn random_reads(rig: &mut Rig, n: u64, span: u64, depth: u64) {
    let h = DevId(rig.handles[0]);
    let mut x = 12345u64;
    let mut sent = 0;
    let mut want = std::collections::HashMap::new();
    let until = Instant::now() + Duration::from_secs(60);
    while sent < n || !want.is_empty() {
        while sent < n && (want.len() as u64) < depth {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let b = (x >> 33) % span;
            let tag = rig.tag();
            want.insert(tag, b);
            rig.submit(IoRequest::read(h, b * BLOCK, AlignedBuf::new(BLOCK as usize), tag));
            sent += 1;
        }
        rig.poll(Duration::from_millis(5));
        for c in std::mem::take(&mut rig.done) {
            let b = want.remove(&c.user_data).expect("a read of ours");
            assert!(c.result.is_ok(), "{c:?}");
            let ubcache_core::io::IoOp::Read { buf } = &c.op else { panic!("a read") };
            assert!(buf[..] == block_content(0, b, 0)[..], "block {b}");
        }
        assert!(Instant::now() < until, "reads did not finish");
    }
}

#[test]
fn a_slow_cache_device_turns_random_reads_away_and_a_fast_one_does_not() {
    let paths = format("congested", Geo::small());
    let mut o = opts(CacheMode::Writethrough, 0);
    o.set.congestion = CongestionConfig::BCACHE;
    let mut rig = Rig::open(&paths, &o).unwrap();
    // Fill 256 blocks, then read them at random: fast, no congestion.
    rig.read(0, 0, 256).unwrap();
    rig.drain();
    random_reads(&mut rig, 2000, 256, 32);
    let s = rig.engine.set().unwrap().stats();
    assert_eq!(s.congested_bypasses, 0, "{s:?}");
    // Every I/O now takes 20 ms, ten times the read threshold: the counter falls by 19 per
    // hit, and soon even 4 KiB reads bypass (the hits are still served from the cache).
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(20), ..Default::default() }));
    random_reads(&mut rig, 1500, 256, 64);
    let s2 = rig.engine.set().unwrap().stats();
    assert!(s2.congested_bypasses > 100, "{s2:?}");
    assert!(s2.cache_bypass_hits > 100, "{s2:?}");
    // Timing off: nothing bypasses any more, however slow.
    rig.engine
        .set_mut()
        .unwrap()
        .set_congestion_config(CongestionConfig { read_threshold_us: 0, write_threshold_us: 0 });
    random_reads(&mut rig, 300, 256, 64);
    assert_eq!(rig.engine.set().unwrap().stats().congested_bypasses, s2.congested_bypasses);
    rig.ctl.set_latency(None);
    rig.close().unwrap();
}

/// bcache's per-device and set accounting: each device counts its own requests, the set
/// all of them.
#[test]
fn each_device_accounts_for_its_own_requests_and_the_set_for_all() {
    let paths = format("accounting", Geo::small());
    let mut o = opts(CacheMode::Writethrough, 64 << 10);
    o.modes = vec![CacheMode::Writethrough, CacheMode::Writethrough];
    let mut rig = Rig::open(&paths, &o).unwrap();
    // Device 0: 4 misses, then the same 4 blocks hit.
    for round in 0..2 {
        for b in [1u64, 5, 9, 13] {
            rig.read(0, b, 1).unwrap();
        }
        if round == 0 {
            rig.drain();
        }
    }
    // Device 1: a 64 KiB read (bypassed: it reaches the cutoff by itself).
    rig.read(1, 0, 16).unwrap();
    rig.drain();
    let set = rig.engine.set().unwrap();
    let acc = |dev: usize| set.device_accounting(rig.engine.inode(rig.handles[dev]).unwrap()).unwrap();
    let (a0, a1, all) = (acc(0), acc(1), set.accounting());
    assert_eq!((a0.total.cache_hits, a0.total.cache_misses, a0.total.hit_ratio()), (4, 4, 50), "{a0:?}");
    assert_eq!((a1.total.cache_bypass_misses, a1.total.bypassed_sectors, a1.total.cache_hits), (1, 128, 0), "{a1:?}");
    assert_eq!(a0.five_minute, a0.total, "nothing decayed within the first 5 s");
    assert_eq!(all.total.cache_hits + all.total.cache_misses + all.total.cache_bypass_misses, 9);
    assert_eq!(all.day.bypassed_sectors, 128);
    rig.close().unwrap();
}

#[test]
fn readahead_fills_what_follows_a_miss_up_to_the_next_cached_data() {
    let paths = format("readahead", Geo::small());
    let mut o = opts(CacheMode::Writethrough, 0);
    o.bypass = Some(BypassConfig { sequential_cutoff: 0, readahead: 32 << 10, ..Default::default() });
    let mut rig = Rig::open(&paths, &o).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let readaheads = |rig: &Rig| rig.engine.set().unwrap().device_accounting(inode).unwrap().total.cache_readaheads;
    // A 4 KiB miss at block 10: blocks 11..19 (32 KiB) are read ahead into the cache.
    assert_eq!(rig.read(0, 10, 1).unwrap(), blocks(0, 10, 1, 0));
    rig.settle();
    assert_eq!(cached(&rig), 9 * BLOCK / 512);
    assert_eq!(readaheads(&rig), 1);
    let hits = rig.engine.set().unwrap().stats().cache_hits;
    assert_eq!(rig.read(0, 11, 8).unwrap(), blocks(0, 11, 8, 0));
    assert_eq!(rig.engine.set().unwrap().stats().cache_hits, hits + 1, "read ahead: a hit");
    // It stops at what the cache holds: block 40 is cached, a miss at 36 reads ahead 37..39.
    rig.write(0, 40, &block_content(0, 40, 1), false).unwrap();
    assert_eq!(rig.read(0, 36, 1).unwrap(), blocks(0, 36, 1, 0));
    rig.settle();
    assert_eq!(cached(&rig), (9 + 1 + 4) * BLOCK / 512);
    assert_eq!(rig.read(0, 36, 5).unwrap(), [blocks(0, 36, 4, 0), block_content(0, 40, 1)].concat());
    // A read whose end hits the cache reads nothing ahead; neither past the device's end.
    assert_eq!(rig.read(0, 39, 2).unwrap(), [blocks(0, 39, 1, 0), block_content(0, 40, 1)].concat());
    assert_eq!(readaheads(&rig), 2);
    assert_eq!(rig.read(0, 1022, 2).unwrap(), blocks(0, 1022, 2, 0));
    rig.settle();
    assert_eq!(readaheads(&rig), 2, "nothing after the device's last block");
    // Bad values are refused by name.
    let e = rig
        .engine
        .set_mut()
        .unwrap()
        .set_bypass_config(inode, BypassConfig { readahead: 1 << 40, ..Default::default() })
        .unwrap_err();
    assert!(e.message().contains("readahead"), "{e}");
}
