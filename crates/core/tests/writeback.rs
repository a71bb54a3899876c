//! Writeback: dirty extents reach the backing device and become clean, in LBA order, at
//! the pace the tunables set, never over newer data.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, WritebackConfig};
use ubcache_core::io::fault::Latency;
use ubcache_core::io::{DevId, OpKind};
use ubcache_core::ErrorKind;

fn opts(wb: WritebackConfig) -> RigOptions {
    RigOptions {
        modes: vec![CacheMode::Writeback],
        set: CacheSetOptions { journal_delay_ms: 2, ..Default::default() },
        writeback: Some(wb),
        ..Default::default()
    }
}

fn full_speed() -> WritebackConfig {
    WritebackConfig { percent: 0, delay: Duration::ZERO, ..Default::default() }
}

/// Block `b` of backing device `dev` as the file holds it.
fn on_backing(paths: &Paths, dev: usize, b: u64) -> Vec<u8> {
    let data = std::fs::read(&paths.backing[dev]).unwrap();
    let at = (DATA_OFFSET + b * BLOCK) as usize;
    data[at..at + BLOCK as usize].to_vec()
}

fn dirty(rig: &Rig, dev: usize) -> u64 {
    let inode = rig.engine.inode(rig.handles[dev]).unwrap();
    rig.engine.set().unwrap().dirty_sectors(inode)
}

/// Polls until `dev` has nothing dirty (or panics after 10 s).
fn wait_clean(rig: &mut Rig, dev: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    while dirty(rig, dev) > 0 {
        assert!(Instant::now() < until, "still {} dirty sectors after 10 s", dirty(rig, dev));
        rig.poll(Duration::from_millis(5));
    }
}

#[test]
fn dirty_data_reaches_the_backing_device_and_stays_cached_clean() {
    let paths = format("wb-basic", Geo::small());
    let mut rig = Rig::open(&paths, &opts(full_speed())).unwrap();
    let blocks: Vec<u64> = vec![40, 3, 17, 18, 19, 100, 7];
    for (i, &b) in blocks.iter().enumerate() {
        rig.write(0, b, &block_content(0, b, 10 + i as u64), false).unwrap();
    }
    wait_clean(&mut rig, 0);
    let stats = rig.engine.set().unwrap().stats();
    assert_eq!(stats.writeback_sectors, blocks.len() as u64 * BLOCK / 512);
    for (i, &b) in blocks.iter().enumerate() {
        assert_eq!(on_backing(&paths, 0, b), block_content(0, b, 10 + i as u64), "block {b} on the backing device");
        // Still a hit: writeback leaves the data cached.
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 10 + i as u64));
    }
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let set = rig.engine.set().unwrap();
    assert!(set.cached_sectors(inode) >= blocks.len() as u64 * BLOCK / 512);
    let r = set.writeback_rate(inode).unwrap();
    assert!(r.full_speed && r.written == stats.writeback_sectors && r.dirty == 0, "{r:?}");
    rig.close().unwrap();
    // The clean state was recorded: nothing is dirty after a restart.
    let rig = Rig::open(&paths, &opts(WritebackConfig { running: false, ..Default::default() })).unwrap();
    assert_eq!(dirty(&rig, 0), 0);
}

#[test]
fn the_backing_device_gets_extents_in_lba_order_whatever_order_their_reads_complete() {
    let paths = format("wb-order", Geo::small());
    // Random extra latency per I/O: cache reads complete out of order.
    let o =
        RigOptions { jitter: Duration::from_micros(300), ..opts(WritebackConfig { running: false, ..full_speed() }) };
    let mut rig = Rig::open(&paths, &o).unwrap();
    // Written in scattered order, one block apart so each stays an extent of its own.
    let mut blocks: Vec<u64> = (0..48).map(|i| i * 2).collect();
    let mut rng = Rng(7);
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &b in &blocks {
        rig.write(0, b, &block_content(0, b, 3), false).unwrap();
    }
    rig.flush(0).unwrap();
    rig.ctl.start_trace();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full_speed()).unwrap();
    wait_clean(&mut rig, 0);
    let trace = rig.ctl.take_trace();
    // Writes to anything but the cache device (the engine's first): the backing device.
    let writes: Vec<u64> =
        trace.iter().filter(|(d, k, _)| *k == OpKind::Write && *d != DevId(0)).map(|&(_, _, off)| off).collect();
    assert_eq!(writes.len(), blocks.len(), "{trace:?}");
    let mut sorted = writes.clone();
    sorted.sort_unstable();
    assert_eq!(writes, sorted, "backing writes out of LBA order");
    for &b in &blocks {
        assert_eq!(on_backing(&paths, 0, b), block_content(0, b, 3));
    }
}

#[test]
fn a_paused_writeback_writes_nothing_until_resumed() {
    let paths = format("wb-pause", Geo::small());
    let mut rig = Rig::open(&paths, &opts(WritebackConfig { running: false, ..full_speed() })).unwrap();
    for b in 0..8 {
        rig.write(0, b, &block_content(0, b, 5), false).unwrap();
    }
    for _ in 0..20 {
        rig.poll(Duration::from_millis(5));
    }
    assert_eq!(dirty(&rig, 0), 8 * BLOCK / 512);
    assert_eq!(on_backing(&paths, 0, 3), block_content(0, 3, 0));
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full_speed()).unwrap();
    wait_clean(&mut rig, 0);
    assert_eq!(on_backing(&paths, 0, 3), block_content(0, 3, 5));
}

#[test]
fn writes_during_writeback_are_never_overwritten_by_the_older_data() {
    let paths = format("wb-race", Geo::small());
    let mut rig = Rig::open(&paths, &opts(full_speed())).unwrap();
    // Rewrite the same blocks while writeback runs: whatever the interleaving, the newest
    // version ends up on the backing device and in the cache.
    for v in 1..=30u64 {
        for b in 0..6 {
            rig.write(0, b, &block_content(0, b, v), false).unwrap();
        }
        rig.poll(Duration::from_micros(200));
    }
    wait_clean(&mut rig, 0);
    for b in 0..6 {
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 30));
        assert_eq!(on_backing(&paths, 0, b), block_content(0, b, 30), "block {b}");
    }
}

#[test]
fn the_rate_follows_bcaches_controller() {
    let paths = format("wb-rate", Geo::small());
    // Paused, so the controller runs on its own clock without writing anything back.
    let cfg = WritebackConfig { running: true, percent: 1, ..Default::default() };
    let mut rig = Rig::open(&paths, &opts(WritebackConfig { running: false, ..cfg.clone() })).unwrap();
    for b in 0..64 {
        rig.write(0, b, &block_content(0, b, 1), false).unwrap();
    }
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let set = rig.engine.set_mut().unwrap();
    set.set_writeback_config(inode, WritebackConfig { running: false, ..cfg.clone() }).unwrap();
    let t0 = Instant::now();
    let mut rates = Vec::new();
    for i in 0..4 {
        set.tick(t0 + Duration::from_secs(5 * i));
        rates.push(set.writeback_rate(inode).unwrap());
    }
    let r = rates[0];
    let dirty = 64 * BLOCK / 512;
    assert_eq!(r.dirty, dirty);
    // Target: 1% of the cache, shared with the other devices in proportion to their size.
    let g = &paths.geo;
    let cache = g.nbuckets * u64::from(g.bucket_sectors);
    let total: u64 = g.backing_blocks.iter().map(|b| b * BLOCK / 512).sum();
    let target = cache / 100 * (g.backing_blocks[0] * BLOCK / 512) / total;
    assert_eq!(r.target, target);
    let error = dirty as i64 - target as i64;
    assert_eq!(r.proportional, error / 40);
    assert_eq!(r.integral, 0);
    assert_eq!(r.rate, (error / 40).max(8) as u64);
    // Each later update adds error × 5 s to the integral, scaled by 1/10000.
    assert_eq!(rates[3].integral, (3 * error * 5) / 10_000);
    assert_eq!(rates[3].rate, ((error / 40) + (3 * error * 5) / 10_000).max(8) as u64);
    assert!(!r.full_speed);
}

/// bcache's fragment term: a cache past 50% in use whose dirty data is spread thin (one
/// dirty block in each of many buckets) writes back fast although its dirty data is under
/// the target, instead of sitting past the writeback cutoff at the minimum rate.
#[test]
fn dirty_data_spread_thin_over_a_cache_past_half_full_raises_the_rate() {
    for consider in [true, false] {
        let geo = Geo { nbuckets: 256, bucket_sectors: 64, backing_blocks: vec![4096], journal_buckets: None };
        let paths = format("wb-fragment", geo);
        let cfg = WritebackConfig { running: false, consider_fragment: consider, ..Default::default() };
        let mut rig = Rig::open(&paths, &opts(cfg.clone())).unwrap();
        let h = rig.handles[0];
        // Buckets of dirty data (FUA writes stay in writeback up to 70% in use, the rest go
        // writethrough) ...
        for batch in 0..20u64 {
            for b in batch * 64..batch * 64 + 64 {
                let tag = rig.tag();
                let buf = ubcache_core::io::AlignedBuf::from_slice(&block_content(0, b, 1));
                rig.submit(ubcache_core::io::IoRequest::write_fua(DevId(h), b * BLOCK, buf, tag));
            }
            rig.drain();
        }
        // ... then seven blocks of every eight discarded: one dirty block per bucket.
        for b in (0..1280u64).filter(|b| b % 8 != 0) {
            let tag = rig.tag();
            rig.submit(ubcache_core::io::IoRequest::discard(DevId(h), b * BLOCK, BLOCK, tag));
        }
        rig.drain();
        assert!(rig.done.iter().all(|c| c.result.is_ok()));
        let inode = rig.engine.inode(h).unwrap();
        let set = rig.engine.set_mut().unwrap();
        set.trigger_gc();
        rig.settle();
        for _ in 0..50 {
            rig.poll(Duration::from_millis(5));
        }
        let set = rig.engine.set_mut().unwrap();
        let in_use = set.in_use_percent();
        assert!(in_use > 57, "{in_use}% in use");
        set.set_writeback_config(inode, cfg.clone()).unwrap();
        set.tick(Instant::now());
        let r = set.writeback_rate(inode).unwrap();
        assert!(r.dirty >= 100 * 8, "{r:?}");
        assert!(r.dirty < r.target, "{r:?}");
        if consider {
            // Dirty sectors per bucket in use × 10 × (in_use − 57): above the minimum.
            assert!(r.proportional > 8 && r.rate == r.proportional as u64, "{r:?}");
        } else {
            assert_eq!(r.rate, 8, "{r:?}");
        }
    }
}

#[test]
fn bad_tunables_are_refused_by_name() {
    let paths = format("wb-bad", Geo::small());
    let mut rig = Rig::open(&paths, &opts(WritebackConfig::default())).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let set = rig.engine.set_mut().unwrap();
    for (cfg, name) in [
        (WritebackConfig { percent: 41, ..Default::default() }, "writeback_percent"),
        (WritebackConfig { rate_minimum: 0, ..Default::default() }, "writeback_rate_minimum"),
        (WritebackConfig { p_term_inverse: 0, ..Default::default() }, "writeback_rate_p_term_inverse"),
        (WritebackConfig { rate_update: Duration::ZERO, ..Default::default() }, "writeback_rate_update_seconds"),
        (WritebackConfig { fp_term_low: 10, ..Default::default() }, "writeback_rate_fp_term_low"),
        (WritebackConfig { fp_term_mid: 1000, ..Default::default() }, "writeback_rate_fp_term_mid"),
        (WritebackConfig { fp_term_high: 1 << 32, ..Default::default() }, "writeback_rate_fp_term_high"),
    ] {
        let e = set.set_writeback_config(inode, cfg).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains(name), "{e}");
    }
    assert_eq!(set.writeback_config(inode).unwrap(), WritebackConfig::default());
}

/// Foreground reads keep their latency while writeback runs: a read of an extent on its way
/// to a slow backing device is served from the cache at once, and a write to it waits.
#[test]
fn reads_of_an_extent_being_written_back_do_not_wait_for_it() {
    let paths = format("wb-read", Geo::small());
    let mut rig = Rig::open(&paths, &opts(WritebackConfig { running: false, ..full_speed() })).unwrap();
    rig.write(0, 5, &block_content(0, 5, 1), false).unwrap();
    // The backing device takes 300 ms a request; the cache none.
    rig.ctl.set_latency_only(Some(paths.backing.clone()));
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(300), ..Default::default() }));
    rig.ctl.start_trace();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full_speed()).unwrap();
    // Until the extent's backing write is on its way.
    let until = Instant::now() + Duration::from_secs(5);
    while !rig.ctl.take_trace().iter().any(|&(_, kind, off)| kind == OpKind::Write && off == DATA_OFFSET + 5 * BLOCK) {
        assert!(Instant::now() < until, "writeback never wrote the extent");
        rig.poll(Duration::from_millis(1));
    }
    let t = Instant::now();
    assert_eq!(rig.read(0, 5, 1).unwrap(), block_content(0, 5, 1));
    assert!(t.elapsed() < Duration::from_millis(150), "the read waited {:?} for writeback", t.elapsed());
    assert!(dirty(&rig, 0) > 0, "still dirty: the read did not come after writeback");
    // A write to it waits until the extent is clean, then lands over it.
    rig.write(0, 5, &block_content(0, 5, 2), false).unwrap();
    rig.ctl.set_latency(None);
    wait_clean(&mut rig, 0);
    assert_eq!(rig.read(0, 5, 1).unwrap(), block_content(0, 5, 2));
    assert_eq!(on_backing(&paths, 0, 5), block_content(0, 5, 2));
    rig.close().unwrap();
}

/// bcache's `trigger_gc` and `gc_after_writeback`, and GC's time figures.
#[test]
fn gc_runs_when_triggered_and_after_writeback_cleaned_a_device() {
    let paths = format("wb-gc", Geo::small());
    let mut o = opts(WritebackConfig { running: false, ..full_speed() });
    o.set.gc_after_writeback = true;
    let mut rig = Rig::open(&paths, &o).unwrap();
    let runs = |rig: &Rig| rig.engine.set().unwrap().stats().gc_runs;
    let wait_runs = |rig: &mut Rig, n: u64| {
        let until = Instant::now() + Duration::from_secs(10);
        while runs(rig) < n {
            assert!(Instant::now() < until, "no GC pass after 10 s");
            rig.poll(Duration::from_millis(2));
        }
    };
    let before = runs(&rig);
    assert!(rig.engine.set().unwrap().gc_times().since_last.is_some(), "opening ran a pass");
    rig.engine.set_mut().unwrap().trigger_gc();
    wait_runs(&mut rig, before + 1);
    let t = rig.engine.set().unwrap().gc_times();
    assert!(t.max_duration >= t.average_duration && t.since_last.unwrap() < Duration::from_secs(10), "{t:?}");
    for b in 0..8 {
        rig.write(0, b, &block_content(0, b, 1), false).unwrap();
    }
    let before = runs(&rig);
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full_speed()).unwrap();
    wait_clean(&mut rig, 0);
    wait_runs(&mut rig, before + 1);
    rig.close().unwrap();
}

#[test]
fn with_expensive_partial_stripes_full_stripes_go_first_and_partly_dirty_ones_fill_in_the_cache() {
    let paths = format("wb-stripes", Geo::small());
    // 64 KiB stripes: 16 blocks.
    let striped =
        WritebackConfig { running: false, stripe_size: 64 << 10, partial_stripes_expensive: true, ..full_speed() };
    let mut rig = Rig::open(&paths, &opts(striped.clone())).unwrap();
    // Stripe 0 partly dirty, stripe 2 whole, stripe 5 partly: the whole one is written first.
    let mut blocks: Vec<u64> = (0..4).chain(32..48).chain(80..83).collect();
    let mut rng = Rng(3);
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &b in &blocks {
        rig.write(0, b, &block_content(0, b, 2), false).unwrap();
    }
    rig.flush(0).unwrap();
    rig.ctl.start_trace();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine
        .set_mut()
        .unwrap()
        .set_writeback_config(inode, WritebackConfig { running: true, ..striped.clone() })
        .unwrap();
    wait_clean(&mut rig, 0);
    let trace = rig.ctl.take_trace();
    let writes: Vec<u64> = trace
        .iter()
        .filter(|(d, k, _)| *k == OpKind::Write && *d != DevId(0))
        .map(|&(_, _, off)| (off - DATA_OFFSET) / BLOCK)
        .collect();
    assert_eq!(writes.len(), blocks.len(), "{writes:?}");
    assert_eq!(&writes[..16], &(32..48).collect::<Vec<_>>()[..], "the full stripe first: {writes:?}");
    assert_eq!(&writes[16..], &[0, 1, 2, 3, 80, 81, 82], "then the rest in LBA order");
    for &b in &blocks {
        assert_eq!(on_backing(&paths, 0, b), block_content(0, b, 2));
    }
    // A bad stripe size is refused by name.
    let e = rig
        .engine
        .set_mut()
        .unwrap()
        .set_writeback_config(inode, WritebackConfig { stripe_size: 1000, ..striped })
        .unwrap_err();
    assert!(e.message().contains("stripe_size"), "{e}");
}

#[test]
fn past_the_writeback_cutoff_writes_to_a_partly_dirty_stripe_still_go_to_the_cache() {
    for expensive in [true, false] {
        let paths = format("wb-stripe-cutoff", Geo::small());
        let cfg = WritebackConfig {
            running: false,
            stripe_size: 64 << 10,
            partial_stripes_expensive: expensive,
            ..full_speed()
        };
        let mut rig = Rig::open(&paths, &opts(cfg)).unwrap();
        rig.write(0, 0, &block_content(0, 0, 1), false).unwrap();
        // Device 1's dirty data takes the cache well past bcache's 40% writeback cutoff (FUA
        // writes stay in writeback up to 70%: ordinary ones would stop at about 40%, and a
        // later GC pass could find the cache just under the cutoff again).
        for b in 0..1024 {
            rig.write(1, b, &block_content(1, b, 1), true).unwrap();
        }
        rig.engine.set_mut().unwrap().trigger_gc();
        let until = Instant::now() + Duration::from_secs(10);
        while rig.engine.set().unwrap().in_use_percent() <= 45 {
            assert!(Instant::now() < until, "in use: {}%", rig.engine.set().unwrap().in_use_percent());
            rig.poll(Duration::from_millis(2));
        }
        rig.write(0, 5, &block_content(0, 5, 1), false).unwrap();
        rig.write(0, 40, &block_content(0, 40, 1), false).unwrap();
        // Block 5 shares stripe 0 with dirty block 0: dirty too when partial stripes are
        // expensive. Block 40's stripe holds nothing dirty: writethrough either way.
        let want = if expensive { 2 } else { 1 };
        assert_eq!(dirty(&rig, 0), want * BLOCK / 512, "partial_stripes_expensive {expensive}");
        assert_eq!(on_backing(&paths, 0, 40), block_content(0, 40, 1));
        assert_eq!(rig.read(0, 5, 1).unwrap(), block_content(0, 5, 1));
    }
}
