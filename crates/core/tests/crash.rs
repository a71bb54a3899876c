//! The crash campaign: the real engine over the fault engine, power cut at random moments
//! with requests in flight — while running, while starting up (opening), while closing,
//! and after injected I/O errors — in all four cache modes and both journal write modes.
//! After every crash the set must open again, and every sector must read back as its
//! newest flushed (or FUA) version or a later one: nothing flushed lost, nothing read
//! that was never written there.
//!
//! `UBCACHE_CRASH_POINTS` sets the crash points per test (default 2500; four tests, so
//! 10,000 per run); `UBCACHE_CRASH_SEED` varies the seeds of a longer campaign.

mod set_common;

use std::time::Duration;

use set_common::*;
use ubcache_core::alloc::{GcMark, Replacement};
use ubcache_core::cache_set::{BypassConfig, CacheMode, CacheSetOptions, SetState, WritebackConfig};
use ubcache_core::io::fault::{CrashMode, FaultRule};
use ubcache_core::io::OpKind;

fn points() -> usize {
    std::env::var("UBCACHE_CRASH_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2500)
}

fn base_seed() -> u64 {
    std::env::var("UBCACHE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A small set where the data does not fit: 4 MiB of cache, two devices of 2 MiB each and
/// a third of 1 MiB, so reclaim, GC and checkpoints all happen within a few hundred writes.
fn geo() -> Geo {
    Geo { nbuckets: 520, bucket_sectors: 16, backing_blocks: vec![512, 512, 256], journal_buckets: None }
}

#[derive(Default, Debug)]
struct Tally {
    points: usize,
    /// Points run with S3-FIFO's queues (s3fifo or tinylfu) selected.
    fifo_queue_points: usize,
    during_startup: usize,
    during_close: usize,
    with_errors: usize,
    failed_sets: usize,
    requests: usize,
    torn_sectors: u64,
    unflushed: usize,
    /// Sectors written back and marked clean before the crashes.
    written_back: u64,
    /// Requests that bypassed the cache by the sequential cutoff.
    bypassed: u64,
    /// Detaches of device 0 begun midway through a point's workload, and those finished
    /// (data dropped, UUID slot freed) before the crash.
    detaches: usize,
    detached: usize,
    /// Sectors moving GC moved before the crashes (GC is asked for midway in 30% of points;
    /// moving GC follows each pass).
    moved: u64,
    /// Points run with data checksums.
    csum_points: usize,
    /// Sectors read ahead past read misses.
    read_ahead: u64,
    /// Hits that moved their extent to a fresh bucket (`promote_hits`).
    promoted: u64,
}

/// Runs `n` crash points on one set; `modes` are the devices' cache modes (switched at
/// random as the workload goes).
fn campaign(name: &str, seed: u64, modes: Vec<CacheMode>, n: usize) -> Tally {
    let paths = format(name, geo());
    let mut model = Model::new(&paths.geo);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut t = Tally::default();
    let mut o = RigOptions {
        modes,
        set: CacheSetOptions { journal_delay_ms: 2, ..Default::default() },
        jitter: Duration::from_micros(100),
        ..Default::default()
    };
    while t.points < n {
        t.points += 1;
        model.note = format!("point {}", t.points);
        o.seed = rng.next();
        o.set.journal_fua = rng.chance(70);
        // Data checksums on a third of the points: a crash must leave no extent whose data
        // fails its checksum (a torn write in place, a fill recorded before its data).
        o.set.data_csum = rng.chance(33);
        // A quarter with hits in old buckets moving their extent to fresh ones.
        o.set.promote_hits = rng.chance(25);
        // Writeback: at full speed with a short or no wait between passes, paused, or as
        // bcache paces it (which in a run this short writes little back).
        o.writeback = match rng.below(4) {
            0 | 1 => {
                Some(WritebackConfig { percent: 0, delay: Duration::from_millis(rng.below(3)), ..Default::default() })
            }
            2 => Some(WritebackConfig { running: false, ..Default::default() }),
            _ => None,
        };
        // A quarter of the points with a cutoff of a few blocks: requests of that many
        // blocks, and streams that reach it, bypass the cache (reads do not fill, writes go
        // around it or, over dirty data, into it in place).
        o.bypass = match rng.below(4) {
            0 => Some(BypassConfig { sequential_cutoff: 4096 * (1 + rng.below(4)), ..Default::default() }),
            // Readahead of a few blocks past read misses.
            1 => Some(BypassConfig { readahead: 4096 * (1 + rng.below(4)), ..Default::default() }),
            _ => None,
        };
        // A third of the points with expensive partial stripes of a few blocks: full stripes
        // are written back first, writes to partly dirty stripes stay in the cache.
        if rng.chance(33) {
            if let Some(wb) = o.writeback.as_mut() {
                wb.stripe_size = 4096 * (2 + rng.below(6));
                wb.partial_stripes_expensive = true;
            }
        }
        let mode =
            if rng.chance(50) { CrashMode::TearUnflushed { seed: rng.next() } } else { CrashMode::DropUnflushed };
        // Crash while opening: cut the startup short after a few I/O rounds.
        if rng.chance(10) {
            model.note = format!("point {} (crash in startup)", t.points);
            t.during_startup += 1;
            let rounds = rng.below(6) as usize;
            match Rig::open_until(&paths, &o, Some(rounds)) {
                Ok(rig) => {
                    let r = rig.crash(mode);
                    t.unflushed += r.unflushed_writes;
                }
                Err(e) => panic!("point {}: opening failed: {e}", t.points),
            }
            reopen_and_check(&paths, &o, &mut model, t.points);
            continue;
        }
        let mut rig = Rig::open(&paths, &o).unwrap_or_else(|e| panic!("point {}: open: {e}", t.points));
        t.csum_points += usize::from(o.set.data_csum);
        // The replacement policy: switched now and then (the switch rewrites every data
        // bucket's prio, and the superblock may or may not record it before the crash),
        // so that S3-FIFO's queues, ghost record and admission meet crashes and restarts.
        if rng.chance(40) {
            let r = [Replacement::Lru, Replacement::S3Fifo, Replacement::TinyLfu][rng.below(3) as usize];
            if let Some(set) = rig.engine.set_mut() {
                let _ = set.set_cache_policy(r, false);
            }
        }
        if rig.engine.set().is_some_and(|s| s.cache_policy().0.fifo_queues()) {
            t.fifo_queue_points += 1;
        }
        let mut w = Workload::new(rng.next());
        w.depth = 1 + rng.below(24) as usize;
        w.span = 64 + rng.below(512);
        w.max_blocks = 1 + rng.below(8);
        w.mode_switches = 2;
        w.discards = 3;
        w.flushes = 2 + rng.below(10);
        if rng.chance(15) {
            // I/O errors: the set may go out of service; nothing wrong may be read either way.
            t.with_errors += 1;
            w.errors_ok = true;
            let op = if rng.chance(50) { OpKind::Write } else { OpKind::Flush };
            rig.ctl.add_rule(FaultRule::eio().op(op).skip(rng.below(40)).times(1 + rng.below(3)));
        }
        let ops = rng.below(150) as usize;
        let detach = rng.chance(15).then(|| rig.tag());
        let gc = rng.chance(30);
        w.run_for(&mut rig, &mut model, ops / 2);
        if gc {
            if let Some(set) = rig.engine.set_mut() {
                set.trigger_gc();
            }
        }
        if let Some(tag) = detach {
            // Detaching for good midway: the device's requests go on (bypassing the
            // cache), its dirty data is written back, then its cached data dropped.
            if rig.engine.detach_begin(tag, rig.handles[0]).is_ok() {
                t.detaches += 1;
            }
        }
        w.run_for(&mut rig, &mut model, ops - ops / 2);
        t.requests += ops;
        if rng.chance(10) {
            // Crash while closing.
            t.during_close += 1;
            let tag = rig.tag();
            w.closing = true;
            let _ = rig.engine.close(tag);
            for _ in 0..rng.below(8) {
                rig.poll(Duration::from_millis(1));
                w.retire(&mut rig, &mut model);
            }
        } else {
            // Let some in-flight work complete, or not.
            for _ in 0..rng.below(4) {
                rig.poll(Duration::from_millis(1));
                w.retire(&mut rig, &mut model);
            }
        }
        if matches!(rig.state(), SetState::Failed(_)) {
            t.failed_sets += 1;
        }
        t.written_back += rig.engine.set().map_or(0, |s| s.stats().writeback_sectors);
        t.bypassed += rig.engine.set().map_or(0, |s| s.stats().sequential_bypasses);
        t.moved += rig.engine.set().map_or(0, |s| s.moving_gc_stats().sectors_moved);
        t.read_ahead += rig.engine.set().map_or(0, |s| s.stats().readahead_sectors);
        t.promoted += rig.engine.set().map_or(0, |s| s.moving_gc_stats().promotions);
        if let Some(tag) = detach {
            let mut events = Vec::new();
            rig.engine.take_events(&mut events);
            t.detached += events.iter().filter(|e| e.0 == tag && e.1.is_ok()).count();
        }
        model.note = format!("point {} crashed {mode:?}", t.points);
        let r = rig.crash(mode);
        t.torn_sectors += r.sectors_kept;
        t.unflushed += r.unflushed_writes;
        w.abandon();
        reopen_and_check(&paths, &o, &mut model, t.points);
    }
    t
}

/// Opens the set after a crash and reads every sector of every device against the model.
fn reopen_and_check(paths: &Paths, o: &RigOptions, model: &mut Model, point: usize) {
    let mut rig = Rig::open(paths, o).unwrap_or_else(|e| panic!("point {point}: reopening after the crash: {e}"));
    for dev in 0..model.devices() {
        let n = model.device_blocks(dev);
        let mut b = 0;
        while b < n {
            let k = (n - b).min(64);
            watch(&mut rig, model, dev, b, k);
            let data = rig.read(dev, b, k).unwrap_or_else(|e| panic!("point {point}: reading dev {dev} {b}+{k}: {e}"));
            if let Err(e) = model.check_after_crash(dev, b, &data) {
                let report = rig.engine.set().unwrap().open_report().clone();
                let inode = rig.engine.inode(rig.handles[dev]).unwrap();
                let set = rig.engine.set_mut().unwrap();
                let keys: Vec<String> = set
                    .keys()
                    .into_iter()
                    .filter(|k| {
                        let bad: u64 = e
                            .split(" block ")
                            .nth(1)
                            .and_then(|x| x.split(' ').next())
                            .and_then(|x| x.parse().ok())
                            .unwrap_or(0);
                        k.inode == inode && k.end() > bad * 8 && k.start < (bad + 1) * 8
                    })
                    .map(|k| {
                        let p = k.ptrs()[0];
                        let info = set.allocator().bucket(0, p.offset() / 16).unwrap();
                        format!("{k:?} bucket {} {info:?}", p.offset() / 16)
                    })
                    .collect();
                panic!("point {point}: after the crash: {e}\nopen report: {report:?}\nkeys: {keys:#?}");
            }
            b += k;
        }
    }
    let set = rig.engine.set_mut().unwrap();
    set.verify_index().unwrap_or_else(|e| panic!("point {point}: index: {e}"));
    // Every live key (scan drops those whose gen moved on) points into a bucket the
    // allocator holds as data of its kind: one it would hand out would be reused under it.
    for k in set.keys() {
        for p in k.ptrs() {
            let b = set.allocator().bucket(p.dev(), p.offset() / 16).unwrap();
            let ok =
                if k.dirty { b.mark == GcMark::Dirty } else { matches!(b.mark, GcMark::Dirty | GcMark::Reclaimable) };
            assert!(ok, "point {point}: key {k:?} in a bucket marked {:?}", b.mark);
        }
    }
    // The reopened set is left as a crash would leave it (it wrote its startup only).
    rig.crash(CrashMode::DropUnflushed);
}

fn report(name: &str, t: &Tally) {
    eprintln!("{name}: {t:?}");
    assert!(t.points >= points(), "{name}: {} crash points", t.points);
    // Half the points run writeback at full speed: it must have run.
    assert!(t.written_back > 0 || points() < 100, "{name}: nothing was written back");
    assert!(t.bypassed > 0 || points() < 100, "{name}: nothing bypassed the cache");
    assert!(t.detaches > 0 || points() < 100, "{name}: no detach begun");
    assert!(t.moved > 0 || points() < 100, "{name}: moving GC moved nothing");
    assert!(t.read_ahead > 0 || points() < 100, "{name}: nothing was read ahead");
    assert!(t.fifo_queue_points > 0 || points() < 100, "{name}: no point ran s3fifo or tinylfu");
}

#[test]
fn crashes_in_writeback_and_writethrough() {
    let t = campaign("cwb", base_seed() + 1, vec![CacheMode::Writeback, CacheMode::Writethrough], points());
    report("writeback/writethrough", &t);
}

#[test]
fn crashes_in_writearound_and_none() {
    let t =
        campaign("cwa", base_seed() + 2, vec![CacheMode::Writearound, CacheMode::None, CacheMode::Writeback], points());
    report("writearound/none", &t);
}

#[test]
fn crashes_with_every_mode_mixed() {
    let t = campaign(
        "cmix",
        base_seed() + 3,
        vec![CacheMode::Writeback, CacheMode::Writearound, CacheMode::Writethrough],
        points(),
    );
    report("mixed", &t);
}

#[test]
fn crashes_in_writeback_only() {
    let t = campaign("cwbo", base_seed() + 4, vec![CacheMode::Writeback], points());
    report("writeback", &t);
}
