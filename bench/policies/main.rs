//! Policy figures of issue 16 (`npm run bench:policies`): a cache set over a backing device
//! emulated slow by the fault engine (5 ms a request plus a seek model, requests served in
//! parallel as by a RAID or a network disk), the cache a tenth of the working set.
//!
//! - `zipf_warm_speedup`: 4 KiB random reads, Zipf θ = 1.2 over a 640 MiB working set, QD
//!   32, through the warm cache of 64 MiB, against the same reads on a device in mode `none`
//!   (nothing cached: every read goes to the slow device). `UBCACHE_BENCH_ZIPF_SCALE` sets
//!   the sizes in eighths of these (1: 80 MiB over an 8 MiB cache of 128 buckets, where
//!   the buckets the allocator keeps free or reserved, about 17, are 13% of the cache: 6.9x
//!   there, 11.2x at the default scale).
//! - `seq_pollution_hit_ratio_drop_pts`: the Zipf reads' hit ratio (requests served whole
//!   from the cache, per cent) in a window on their own, less the same in a window while a
//!   1 GiB sequential read of a second device sharing the cache runs (1 MiB reads, QD 4);
//!   with bcache's default sequential cutoff, and, for reference, with the cutoff off.
//! - `fg_p99_during_writeback_ratio`: p99 latency of 4 KiB random reads of dirty data
//!   (cache hits, QD 8) while writeback copies that data to the slow device at full speed,
//!   over the same with writeback paused.
//!
//! - The figures of background work (writeback bandwidth against fio, GC's hold of the
//!   thread over 10M extents, detaching a clean device of 1M extents, moving GC's rate):
//!   see `background.rs`.
//!
//! Files live in /dev/shm; `UBCACHE_BENCH_QUICK=1` shortens every phase (a smoke run).

#[path = "../../crates/core/tests/set_common/mod.rs"]
mod set_common;

mod background;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use set_common::{Geo, Paths, Rig, RigOptions, Rng, BLOCK, DATA_OFFSET};
use ubcache_core::cache_set::{superblock, BypassConfig, CacheMode, CacheSetOptions, WritebackConfig};
use ubcache_core::io::fault::{Latency, SeekModel};
use ubcache_core::io::{AlignedBuf, DevId, IoRequest};

/// Blocks of the Zipf device's working set (80 MiB).
const WORKING_SET: u64 = 20_480;
/// Cache buckets of 64 KiB: 8 MiB, a tenth of the working set (the writeback phase: 8 times).
const NBUCKETS: u64 = 128;
const BUCKET_SECTORS: u16 = 128;
/// The sequential device: 1 GiB.
const SEQ_BYTES: u64 = 1 << 30;

/// `UBCACHE_BENCH_PROMOTE=1`: the sets run with `promote_hits`.
fn promote() -> bool {
    std::env::var("UBCACHE_BENCH_PROMOTE").is_ok_and(|v| v != "0")
}

fn quick() -> bool {
    std::env::var("UBCACHE_BENCH_QUICK").is_ok_and(|v| v != "0")
}

/// A cache set on files in /dev/shm: a formatted cache, sparse backing devices.
fn files(name: &str, nbuckets: u64, backing_bytes: &[u64]) -> Paths {
    files_with(name, nbuckets, 8, backing_bytes)
}

/// [`files`] with blocks of `block` sectors.
fn files_with(name: &str, nbuckets: u64, block: u16, backing_bytes: &[u64]) -> Paths {
    let dir = PathBuf::from("/dev/shm").join(format!("ubcache-bench-policies-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache.img");
    let f = std::fs::File::create(&cache).unwrap();
    f.set_len(nbuckets * u64::from(BUCKET_SECTORS) * 512).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&superblock::format([0xc1; 16], [0x5e; 16], nbuckets, BUCKET_SECTORS, block), 4096).unwrap();
    let backing: Vec<PathBuf> = backing_bytes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let p = dir.join(format!("backing{i}.img"));
            std::fs::File::create(&p).unwrap().set_len(DATA_OFFSET + n).unwrap();
            p
        })
        .collect();
    let geo = Geo {
        nbuckets,
        bucket_sectors: BUCKET_SECTORS,
        backing_blocks: backing_bytes.iter().map(|n| n / BLOCK).collect(),
        journal_buckets: None,
    };
    Paths { dir, cache, backing, geo }
}

fn slow_disk() -> Latency {
    Latency {
        fixed: Duration::from_millis(5),
        bytes_per_sec: 200 << 20,
        seek: Some(SeekModel { track_to_track: Duration::from_micros(500), full_stroke: Duration::from_millis(10) }),
        ..Default::default()
    }
}

fn open(paths: &Paths, modes: Vec<CacheMode>, cutoff: u64) -> Rig {
    let o = RigOptions {
        modes,
        set: CacheSetOptions { promote_hits: promote(), ..Default::default() },
        volatile: false,
        bypass: Some(BypassConfig { sequential_cutoff: cutoff, ..Default::default() }),
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        ..Default::default()
    };
    let rig = Rig::open(paths, &o).expect("open the set");
    rig.ctl.set_latency_only(Some(paths.backing.clone()));
    rig.ctl.set_latency(Some(slow_disk()));
    rig
}

/// Zipf(θ) over `n` ranks, each rank a block scattered over the device.
struct Zipf {
    cdf: Vec<f64>,
    rng: Rng,
}

impl Zipf {
    fn new(n: u64, theta: f64, seed: u64) -> Zipf {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut sum = 0.0;
        for r in 1..=n {
            sum += 1.0 / (r as f64).powf(theta);
            cdf.push(sum);
        }
        cdf.iter_mut().for_each(|c| *c /= sum);
        Zipf { cdf, rng: Rng(seed | 1) }
    }

    fn block(&mut self) -> u64 {
        let u = (self.rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let rank = self.cdf.partition_point(|&c| c < u) as u64;
        let n = self.cdf.len() as u64;
        // A fixed scattering of ranks over blocks (7919 is prime, so coprime to n).
        (rank * 7919) % n
    }
}

/// One stream of reads: its device, depth and what it reads next.
struct Stream<'a> {
    dev: usize,
    depth: usize,
    next: Box<dyn FnMut() -> Option<(u64, u64)> + 'a>,
    in_flight: usize,
    done: u64,
    ended: bool,
}

/// Runs `streams` until `stop` says so (or every stream ended); returns the latency of each
/// read of stream 0 if `lat` is asked for.
fn run(
    rig: &mut Rig,
    streams: &mut [Stream],
    mut stop: impl FnMut(&Rig, &[Stream]) -> bool,
    lat: bool,
) -> Vec<Duration> {
    let mut sent: HashMap<u64, (usize, Instant)> = HashMap::new();
    let mut lats = Vec::new();
    loop {
        for (i, s) in streams.iter_mut().enumerate() {
            while !s.ended && s.in_flight < s.depth {
                let Some((off, len)) = (s.next)() else {
                    s.ended = true;
                    break;
                };
                let tag = rig.tag();
                sent.insert(tag, (i, Instant::now()));
                s.in_flight += 1;
                let h = DevId(rig.handles[s.dev]);
                rig.submit(IoRequest::read(h, off, AlignedBuf::new(len as usize), tag));
            }
        }
        if stop(rig, streams) || streams.iter().all(|s| s.ended && s.in_flight == 0) {
            break;
        }
        rig.poll(Duration::from_millis(1));
        for c in std::mem::take(&mut rig.done) {
            let Some((i, t)) = sent.remove(&c.user_data) else { continue };
            assert!(c.result.is_ok(), "{c:?}");
            streams[i].in_flight -= 1;
            streams[i].done += 1;
            if lat && i == 0 {
                lats.push(t.elapsed());
            }
        }
    }
    // Let what is in flight finish (not counted).
    while !sent.is_empty() {
        rig.poll(Duration::from_millis(1));
        for c in std::mem::take(&mut rig.done) {
            sent.remove(&c.user_data);
        }
    }
    lats
}

fn zipf_stream<'a>(z: &'a mut Zipf, depth: usize) -> Stream<'a> {
    Stream {
        dev: 0,
        depth,
        next: Box::new(move || Some((z.block() * BLOCK, BLOCK))),
        in_flight: 0,
        done: 0,
        ended: false,
    }
}

/// Reads for `d`; returns IOPS.
fn iops_for(rig: &mut Rig, z: &mut Zipf, d: Duration) -> f64 {
    let t = Instant::now();
    let mut s = [zipf_stream(z, 32)];
    run(rig, &mut s, |_, _| t.elapsed() >= d, false);
    s[0].done as f64 / t.elapsed().as_secs_f64()
}

/// Device 0's hit ratio (per cent of its reads served whole from the cache) over `f`.
fn hit_ratio(rig: &mut Rig, f: impl FnOnce(&mut Rig)) -> f64 {
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let before = rig.engine.set().unwrap().device_accounting(inode).unwrap().total;
    f(rig);
    let after = rig.engine.set().unwrap().device_accounting(inode).unwrap().total;
    let hits = (after.cache_hits - before.cache_hits) as f64;
    let misses = (after.cache_misses - before.cache_misses) as f64;
    100.0 * hits / (hits + misses).max(1.0)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn zipf_speedup(phase: Duration) -> (f64, f64, f64, f64) {
    let scale: u64 = std::env::var("UBCACHE_BENCH_ZIPF_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(8).max(1);
    let paths = files("zipf", NBUCKETS * scale, &[WORKING_SET * scale * BLOCK]);
    let mut z = Zipf::new(WORKING_SET * scale, 1.2, 42);
    // Uncached: mode none on a fresh set, every read from the slow device.
    let mut rig = open(&paths, vec![CacheMode::None], 4 << 20);
    let raw = iops_for(&mut rig, &mut z, phase);
    rig.close().unwrap();
    let mut rig = open(&paths, vec![CacheMode::Writethrough], 4 << 20);
    eprintln!("  warming the cache ({} s)...", (phase * 4).as_secs());
    iops_for(&mut rig, &mut z, phase * 4);
    let mut cached = 0.0;
    let ratio = hit_ratio(&mut rig, |rig| cached = iops_for(rig, &mut z, phase));
    rig.close().unwrap();
    (cached, raw, cached / raw, ratio)
}

fn seq_pollution(phase: Duration, cutoff: u64) -> (f64, f64) {
    let paths = files("seq", NBUCKETS, &[WORKING_SET * BLOCK, SEQ_BYTES]);
    let mut z = Zipf::new(WORKING_SET, 1.2, 7);
    let mut rig = open(&paths, vec![CacheMode::Writethrough, CacheMode::Writethrough], cutoff);
    iops_for(&mut rig, &mut z, phase * 4);
    let alone = hit_ratio(&mut rig, |rig| {
        iops_for(rig, &mut z, phase);
    });
    let seq_bytes = if quick() { SEQ_BYTES / 8 } else { SEQ_BYTES };
    let mut at = 0u64;
    let with = hit_ratio(&mut rig, |rig| {
        let mut s = [
            zipf_stream(&mut z, 28),
            Stream {
                dev: 1,
                depth: 4,
                next: Box::new(|| {
                    (at < seq_bytes).then(|| {
                        at += 1 << 20;
                        (at - (1 << 20), 1 << 20)
                    })
                }),
                in_flight: 0,
                done: 0,
                ended: false,
            },
        ];
        run(rig, &mut s, |_, s| s[1].ended && s[1].in_flight == 0, false);
    });
    rig.close().unwrap();
    (alone, with)
}

fn fg_during_writeback(reads: usize) -> (Duration, Duration, u64) {
    // A cache of 64 MiB: the 16 MiB of dirty data stay below bcache's writeback cutoff.
    let paths = files("wb", NBUCKETS * 8, &[WORKING_SET * BLOCK]);
    let mut rig = open(&paths, vec![CacheMode::Writeback], 4 << 20);
    // 16 MiB of dirty blocks (a 5 ms write each on the slow device, 64 at a time: about
    // half a second of writeback), written at random.
    let dirty_blocks = 4096u64;
    let mut rng = Rng(99);
    let blocks: Vec<u64> =
        (0..dirty_blocks).map(|i| i * (WORKING_SET / dirty_blocks) + rng.below(WORKING_SET / dirty_blocks)).collect();
    for &b in &blocks {
        rig.write(0, b, &vec![0x5a; BLOCK as usize], false).unwrap();
    }
    rig.flush(0).unwrap();
    let mut pick = Rng(5);
    let mut next = || Some((blocks[pick.below(blocks.len() as u64) as usize] * BLOCK, BLOCK));
    let mut off = {
        let mut s = [Stream { dev: 0, depth: 8, next: Box::new(&mut next), in_flight: 0, done: 0, ended: false }];
        run(&mut rig, &mut s, |_, s| s[0].done >= reads as u64, true)
    };
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let dirty_before = rig.engine.set().unwrap().dirty_sectors(inode);
    let full = WritebackConfig { percent: 0, delay: Duration::ZERO, ..Default::default() };
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full).unwrap();
    let mut s = [Stream { dev: 0, depth: 8, next: Box::new(&mut next), in_flight: 0, done: 0, ended: false }];
    let mut on = run(
        &mut rig,
        &mut s,
        |rig, s| s[0].done >= reads as u64 || rig.engine.set().unwrap().dirty_sectors(inode) == 0,
        true,
    );
    let dirty_after = rig.engine.set().unwrap().dirty_sectors(inode);
    rig.close().unwrap();
    let (p50_off, p50_on) = (percentile(&mut off, 0.5), percentile(&mut on, 0.5));
    eprintln!(
        "  p50 {:.1} us paused, {:.1} us writing back; {} reads beside writeback, dirty sectors {dirty_before} -> {dirty_after}",
        p50_off.as_secs_f64() * 1e6,
        p50_on.as_secs_f64() * 1e6,
        on.len()
    );
    (percentile(&mut off, 0.99), percentile(&mut on, 0.99), dirty_before - dirty_after)
}

/// Whether section `name` runs: `UBCACHE_BENCH_SECTIONS` (a comma-separated list of
/// zipf, seq, fg, wb, gc, mgc) picks some; every one runs by default.
fn section(name: &str) -> bool {
    std::env::var("UBCACHE_BENCH_SECTIONS").map_or(true, |v| v.split(',').any(|s| s.trim() == name))
}

/// A figure for the JSON line: its value, or null when its section did not run.
fn fig(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "null".to_string(), |v| format!("{v:.digits$}"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let phase = if quick() { Duration::from_millis(500) } else { Duration::from_secs(4) };
    eprintln!("bench/policies: slow backing device 5 ms + seek (0.5..10 ms), 200 MB/s; 64 KiB buckets; caches a tenth of the Zipf (θ=1.2) working set: 64 MiB of 640 MiB for the speedup, 8 MiB of 80 MiB for the pollution figure");
    let speedup = section("zipf").then(|| {
        let (cached, raw, speedup, hr) = zipf_speedup(phase);
        eprintln!(
            "zipf 4 KiB random reads, QD32: warm cache {cached:.0} IOPS (hit ratio {hr:.1}%), uncached {raw:.0} IOPS: {speedup:.2}x (target >= 10)"
        );
        speedup
    });
    let drop = section("seq").then(|| {
        let (alone, with) = seq_pollution(phase, 4 << 20);
        let drop = alone - with;
        eprintln!("zipf hit ratio {alone:.1}% alone, {with:.1}% beside a 1 GiB sequential read (cutoff 4 MiB): drop {drop:.2} points (target <= 2)");
        let (alone0, with0) = seq_pollution(phase, 0);
        eprintln!(
            "  for reference, sequential cutoff off: {alone0:.1}% alone, {with0:.1}% beside it: drop {:.2} points",
            alone0 - with0
        );
        drop
    });
    let fg = section("fg").then(|| {
        let reads = if quick() { 2000 } else { 20_000 };
        let (off, on, written) = fg_during_writeback(reads);
        let fg = on.as_secs_f64() / off.as_secs_f64();
        eprintln!(
            "4 KiB random hit reads, QD8, p99: {:.1} us with writeback paused, {:.1} us while it writes back at full speed ({written} sectors): {fg:.2}x (target <= 2)",
            off.as_secs_f64() * 1e6,
            on.as_secs_f64() * 1e6
        );
        fg
    });
    let wb = section("wb").then(|| {
        let wb_bytes = if quick() { 128 << 20 } else { 1 << 30 };
        let (ours, fio) = background::writeback_bw(wb_bytes);
        let wb = ours / fio;
        eprintln!(
            "writeback of {} MiB at full speed to a file on disk (O_DIRECT): {:.0} MiB/s; fio sequential 1 MiB writes QD16 on the same file: {:.0} MiB/s: {wb:.3}x (target >= 0.8)",
            wb_bytes >> 20,
            ours / 1048576.0,
            fio / 1048576.0
        );
        wb
    });
    let (lag, detach) = if section("gc") {
        let (extents, detach_extents) = if quick() { (1_000_000, 100_000) } else { (10_000_000, 1_000_000) };
        let (lag, longest, detach) = background::gc_lag_and_detach(extents, detach_extents);
        eprintln!(
            "GC over {extents} extents: engine calls hold the thread {:.3} ms at p99, {:.3} ms at most (target <= 5)",
            lag.as_secs_f64() * 1e3,
            longest.as_secs_f64() * 1e3
        );
        eprintln!(
            "detaching a clean device caching {detach_extents} extents: {:.3} s (target <= 0.1)",
            detach.as_secs_f64()
        );
        (Some(lag.as_secs_f64() * 1e3), Some(detach.as_secs_f64()))
    } else {
        (None, None)
    };
    let mgc = section("mgc").then(|| {
        let (rate, moved) = background::moving_gc_rate();
        eprintln!(
            "moving GC: {} MiB moved out of quarter-full buckets at {:.0} MiB/s",
            (moved * 512) >> 20,
            rate / 1048576.0
        );
        rate / 1048576.0
    });
    println!(
        "{{\"zipf_warm_speedup\":{},\"seq_pollution_hit_ratio_drop_pts\":{},\"writeback_bw_ratio\":{},\"fg_p99_during_writeback_ratio\":{},\"gc_event_loop_lag_p99_ms\":{},\"detach_clean_s\":{},\"moving_gc_mib_per_s\":{}}}",
        fig(speedup, 3),
        fig(drop, 3),
        fig(wb, 3),
        fig(fg, 3),
        fig(lag, 3),
        fig(detach, 4),
        fig(mgc, 1)
    );
}
