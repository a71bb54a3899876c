//! The figures of issue 16 about background work:
//!
//! - `writeback_bw_ratio`: writeback of 1 GiB of dirty data (written as 1 MiB writes, so
//!   64 KiB extents) at full speed to a backing file on the disk the benchmark runs from,
//!   opened O_DIRECT, over fio's sequential write bandwidth on the same file (1 MiB writes,
//!   QD 16, O_DIRECT, io_uring, a flush at the end, as writeback ends with one; measured
//!   on its second run, the first having allocated the file's blocks).
//! - `gc_event_loop_lag_p99_ms`: with 10M extents cached (512-byte blocks, one extent
//!   each), the p99 of how long one call into the engine keeps the thread while a GC pass
//!   walks them: in Node that call runs on the event loop, so it is the loop's lag.
//! - `detach_clean_s`: detaching a clean (writethrough) device that caches 1M of those
//!   extents, from `detach_begin` to the UUID table's write being durable.
//! - `moving_gc_mib_per_s`: 32 MiB of dirty data left a quarter of each of 2048 buckets
//!   (three blocks in four discarded), moved out by passes of GC and moving GC one after
//!   another until nothing is left to move: the data moved over the time taken.

use super::*;
use std::path::Path;

/// Runs `n` requests made by `make(i, tag)`, `depth` at a time; panics on an error.
fn pipeline(rig: &mut Rig, n: u64, depth: usize, mut make: impl FnMut(u64, u64) -> IoRequest) {
    let (mut next, mut in_flight) = (0u64, 0usize);
    while next < n || in_flight > 0 {
        while next < n && in_flight < depth {
            let tag = rig.tag();
            rig.submit(make(next, tag));
            next += 1;
            in_flight += 1;
        }
        rig.poll(Duration::from_millis(1));
        for c in std::mem::take(&mut rig.done) {
            assert!(c.result.is_ok(), "{c:?}");
            in_flight -= 1;
        }
    }
}

/// A set over fast files (no emulated latency): a cache of `nbuckets` and `block`-sector
/// blocks in /dev/shm, backing devices of `backing_bytes` in `backing_dir` (/dev/shm if None).
fn fast_set(name: &str, nbuckets: u64, block: u16, backing_bytes: &[u64], backing_dir: Option<&Path>) -> Paths {
    let mut p = files_with(name, nbuckets, block, backing_bytes);
    if let Some(dir) = backing_dir {
        for (i, b) in p.backing.iter_mut().enumerate() {
            let to = dir.join(format!("ubcache-bench-backing{i}-{}.img", std::process::id()));
            std::fs::rename(&*b, &to).or_else(|_| std::fs::copy(&*b, &to).map(|_| ())).unwrap();
            *b = to;
        }
    }
    p
}

fn open_fast(paths: &Paths, modes: Vec<CacheMode>, direct: bool) -> Rig {
    let o = RigOptions {
        modes,
        set: CacheSetOptions::default(),
        volatile: false,
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        // Sequential writes fill these caches: no cutoff.
        bypass: Some(BypassConfig { sequential_cutoff: 0, ..Default::default() }),
        backing_direct: direct,
        ..Default::default()
    };
    Rig::open(paths, &o).expect("open the set")
}

fn full_speed(rig: &mut Rig, dev: usize) {
    let inode = rig.engine.inode(rig.handles[dev]).unwrap();
    let full = WritebackConfig { percent: 0, delay: Duration::ZERO, ..Default::default() };
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full).unwrap();
}

fn dirty(rig: &Rig, dev: usize) -> u64 {
    let inode = rig.engine.inode(rig.handles[dev]).unwrap();
    rig.engine.set().unwrap().dirty_sectors(inode)
}

/// fio's sequential write bandwidth on `file` from `offset`, in bytes/s.
fn fio_seq_write(file: &Path, offset: u64, size: u64) -> f64 {
    let out = std::process::Command::new("fio")
        .args([
            "--name=seqwrite",
            &format!("--filename={}", file.display()),
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--rw=write",
            "--bs=1m",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=16",
            "--end_fsync=1",
            "--output-format=json",
        ])
        .output()
        .expect("fio (apt-get install fio)");
    assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio's JSON");
    j["jobs"][0]["write"]["bw_bytes"].as_f64().expect("jobs[0].write.bw_bytes")
}

/// Writeback's bandwidth and fio's, in bytes/s.
pub fn writeback_bw(bytes: u64) -> (f64, f64) {
    // 1 GiB of dirty data stays under bcache's writeback cutoff (40% of the buckets) in a
    // 3 GiB cache.
    let dir = std::env::var_os("UBCACHE_BENCH_DISK_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let paths = fast_set("wbbw", 3 * bytes / (64 << 10), 8, &[bytes], Some(&dir));
    // Twice: the first run allocates the sparse file's blocks, as writeback finds them.
    fio_seq_write(&paths.backing[0], DATA_OFFSET, bytes);
    let fio = fio_seq_write(&paths.backing[0], DATA_OFFSET, bytes);
    let mut rig = open_fast(&paths, vec![CacheMode::Writeback], true);
    let mib = 1u64 << 20;
    let h = DevId(rig.handles[0]);
    pipeline(&mut rig, bytes / mib, 8, |i, tag| {
        IoRequest::write(h, i * mib, AlignedBuf::from_slice(&vec![(i % 251) as u8; mib as usize]), tag)
    });
    rig.flush(0).unwrap();
    let want = bytes / 512;
    assert_eq!(dirty(&rig, 0), want, "every write went to the cache, dirty");
    let t = Instant::now();
    full_speed(&mut rig, 0);
    while dirty(&rig, 0) > 0 {
        rig.poll(Duration::from_millis(1));
    }
    let ours = bytes as f64 / t.elapsed().as_secs_f64();
    rig.close().unwrap();
    for b in &paths.backing {
        let _ = std::fs::remove_file(b);
    }
    (ours, fio)
}

/// GC's p99 and longest hold of the thread over `extents` extents, and the time to detach
/// a clean device holding `detach_extents` of them.
pub fn gc_lag_and_detach(extents: u64, detach_extents: u64) -> (Duration, Duration, Duration) {
    // One 512-byte block per extent: 10M extents are 5 GiB, in a cache of 8 GiB.
    let data = extents * 512;
    let nbuckets = (data * 8 / 5) / (64 << 10);
    let paths = fast_set("gclag", nbuckets, 1, &[(extents - detach_extents) * 512, detach_extents * 512], None);
    let mut rig = open_fast(&paths, vec![CacheMode::Writethrough], false);
    let t = Instant::now();
    for (dev, n) in [(0usize, extents - detach_extents), (1, detach_extents)] {
        let h = DevId(rig.handles[dev]);
        pipeline(&mut rig, n, 64, |i, tag| IoRequest::write(h, i * 512, AlignedBuf::from_slice(&[0x6b; 512]), tag));
    }
    let set = rig.engine.set().unwrap();
    let cached: u64 = (0..2).map(|d| set.cached_sectors(rig.engine.inode(rig.handles[d]).unwrap())).sum();
    eprintln!("  {extents} extents written in {:.1} s ({cached} sectors cached)", t.elapsed().as_secs_f64());
    // (A write that finds no free bucket at once goes to the backing device alone.)
    assert!(cached >= extents - extents / 1000, "{cached} of {extents} blocks cached, each an extent of its own");
    let runs = rig.engine.set().unwrap().stats().gc_runs;
    rig.engine.set_mut().unwrap().trigger_gc();
    let mut holds = Vec::new();
    let t = Instant::now();
    while rig.engine.set().unwrap().stats().gc_runs == runs {
        let c = Instant::now();
        rig.poll(Duration::ZERO);
        holds.push(c.elapsed());
    }
    eprintln!("  a GC pass over them: {:.2} s in {} calls", t.elapsed().as_secs_f64(), holds.len());
    let p99 = percentile(&mut holds, 0.99);
    let max = *holds.iter().max().unwrap();
    rig.settle();
    let tag = rig.tag();
    let t = Instant::now();
    rig.engine.detach_begin(tag, rig.handles[1]).unwrap();
    let mut events = Vec::new();
    while !events.iter().any(|e: &(u64, ubcache_core::Result<u32>)| e.0 == tag) {
        rig.poll(Duration::from_millis(1));
        rig.engine.take_events(&mut events);
    }
    let detach = t.elapsed();
    events.iter().find(|e| e.0 == tag).unwrap().1.clone().expect("the detach");
    rig.close().unwrap();
    (p99, max, detach)
}

/// Moving GC's rate in bytes/s, and the sectors it moved.
pub fn moving_gc_rate() -> (f64, u64) {
    let paths = fast_set("mgc", 4096, 8, &[128 << 20], None);
    let mut rig = open_fast(&paths, vec![CacheMode::Writeback], false);
    let h = DevId(rig.handles[0]);
    let blocks = (128u64 << 20) / BLOCK;
    pipeline(&mut rig, blocks, 64, |i, tag| {
        IoRequest::write(h, i * BLOCK, AlignedBuf::from_slice(&vec![(i % 251) as u8; BLOCK as usize]), tag)
    });
    let thin: Vec<u64> = (0..blocks).filter(|b| b % 4 != 0).collect();
    pipeline(&mut rig, thin.len() as u64, 64, |i, tag| IoRequest::discard(h, thin[i as usize] * BLOCK, BLOCK, tag));
    rig.flush(0).unwrap();
    rig.settle();
    let dirty_before = dirty(&rig, 0);
    let moved = |rig: &Rig| rig.engine.set().unwrap().moving_gc_stats().sectors_moved;
    let start = moved(&rig);
    let t = Instant::now();
    let mut last = (start, Duration::ZERO);
    loop {
        let runs = rig.engine.set().unwrap().stats().gc_runs;
        rig.engine.set_mut().unwrap().trigger_gc();
        loop {
            rig.poll(Duration::from_millis(1));
            let set = rig.engine.set().unwrap();
            if set.stats().gc_runs > runs && !set.moving_gc_running() {
                break;
            }
        }
        let now = moved(&rig);
        if now == last.0 {
            break;
        }
        last = (now, t.elapsed());
    }
    let sectors = last.0 - start;
    assert_eq!(dirty(&rig, 0), dirty_before, "moving kept the dirty data dirty");
    for b in (0..blocks).step_by(4 * 97) {
        assert_eq!(rig.read(0, b, 1).unwrap(), vec![(b % 251) as u8; BLOCK as usize], "block {b} after moving");
    }
    rig.close().unwrap();
    (sectors as f64 * 512.0 / last.1.as_secs_f64(), sectors)
}
