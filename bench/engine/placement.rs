//! Where the engine should run (`UBCACHE_BENCH_ENGINE_ONLY=thread`; docs/engine.md's
//! decision): the same workloads driven (a) inline, the driver thread submitting and
//! reaping itself (rig.rs `drive`, as today), and (b) with the engine on an engine thread of
//! its own that the driver talks to through queues and eventfds, completions coming back in
//! batches (thread.rs `CacheThread`, `drive_thread`).
//!
//! Both run on the same set, opened on the engine thread (its io_uring ring is single-issuer):
//! (a) is `drive` run on that thread through `CacheThread::with`, (b) is `drive_thread` from
//! this one. Each round runs fio, then (a) and (b) in turn (their order alternating from
//! round to round), so each has its fio run beside it and the two meet the same machine:
//! - fully cached 4 KiB random reads over a 512 MiB region written before in writeback mode,
//!   QD32 IOPS and QD1 p50, vs fio randread on the raw cache device over that region's
//!   bytes (and at QD1 vs fio polling too);
//! - writeback 4 KiB random writes at QD32, each to a block never written, a fresh set per
//!   run, vs fio randwrite on the raw cache device.
//!
//! CPU: each thread's CPU clock over each run (warm-up included), per request at the run's
//! rate; for (a) the engine thread is the driver. Also the process's (every thread).
//! `UBCACHE_BENCH_ENGINE_THREAD_SPIN_US` (default 0): the engine thread spins this long for
//! new requests before it sleeps (IoThreadOptions::spin).

use std::time::Duration;

use super::{delta, env_u64, fio, median, meta_per_write, r3, Bench, Pairs, BLOCK, HIT_REGION};
use crate::rig::{drive, format_cache, fresh_set_uuid, Load, Rig, Rng, Run, Stop};
use crate::thread::{drive_thread, measure_cpu, CacheThread, Cpu, ThreadCounters, ThreadRigConfig};
use ubcache_core::cache_set::{CacheMode, CacheSetOptions};
use ubcache_core::io::DirectIo;

impl Bench {
    /// Formats a fresh set of `bytes` on the cache device and opens it in `mode` on an
    /// engine thread.
    fn fresh_thread(&self, bytes: u64, mode: CacheMode, spin: Duration) -> CacheThread {
        let bucket_bytes = u64::from(self.bucket_sectors) * 512;
        format_cache(&self.cache.path, bytes / bucket_bytes, self.bucket_sectors, fresh_set_uuid());
        CacheThread::spawn(ThreadRigConfig {
            cache: self.cache.path.clone(),
            cache_direct: self.cache.direct,
            backing: self.backing.clone(),
            backing_direct: DirectIo::Require,
            mode,
            set: CacheSetOptions::default(),
            arena_bytes: 64 << 20,
            spin,
        })
    }
}

/// Writes the first `HIT_REGION` bytes of the cached device in writeback mode (1 MiB writes,
/// QD4) as bench/engine's hit figures do; returns the byte range of the cache device its
/// data lies in.
fn fill_hit_region(rig: &mut Rig) -> (u64, u64) {
    rig.set_mode(CacheMode::Writeback);
    let mut seq = 0u64;
    let mut next = || {
        let o = seq;
        seq += 1 << 20;
        o
    };
    let run = drive(
        rig,
        Load {
            qd: 4,
            bs: 1 << 20,
            write: true,
            next: &mut next,
            warm: Duration::ZERO,
            stop: Stop::Ops((HIT_REGION >> 20) - 3),
            lat: false,
            marks: vec![],
            progress: None,
            limit: None,
            zero_data: false,
        },
    );
    rig.drain();
    let cached = rig.set().cached_sectors(rig.inode) * 512;
    eprintln!("  written in {:.2} s: {} MiB cached", run.secs, cached >> 20);
    assert!(cached >= HIT_REGION, "the region is not all cached: {cached} bytes");
    let inode = rig.inode;
    let keys = rig.ce.set_mut().unwrap().keys();
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for k in keys.iter().filter(|k| k.inode == inode && k.start * 512 < HIT_REGION) {
        for p in k.ptrs() {
            lo = lo.min(p.offset() * 512);
            hi = hi.max((p.offset() + k.size) * 512);
        }
    }
    (lo / BLOCK * BLOCK, hi.div_ceil(BLOCK) * BLOCK)
}

fn hit_load(next: &mut dyn FnMut() -> u64, qd: usize, secs: u64) -> Load<'_> {
    Load {
        qd,
        bs: BLOCK as usize,
        write: false,
        next,
        warm: Bench::warm(),
        stop: Stop::Time(Duration::from_secs(secs)),
        lat: qd == 1,
        marks: vec![],
        progress: None,
        limit: None,
        zero_data: false,
    }
}

fn wb_load(next: &mut dyn FnMut() -> u64, secs: u64, dev_blocks: u64) -> Load<'_> {
    Load {
        qd: 32,
        bs: BLOCK as usize,
        write: true,
        next,
        warm: Bench::warm(),
        stop: Stop::Time(Duration::from_secs(secs)),
        lat: false,
        marks: vec![],
        progress: None,
        // One pass over the cached device: every write to a block never written.
        limit: Some(dev_blocks),
        zero_data: false,
    }
}

fn hit_fraction(run: &Run) -> f64 {
    let d = delta(&run.before, &run.after);
    d.cache_hits as f64 / (d.cache_hits + d.cache_misses).max(1) as f64
}

/// CPU of one measurement, per request.
#[derive(Default)]
struct CpuPer {
    engine: Vec<f64>,
    driver: Vec<f64>,
    process: Vec<f64>,
}

impl CpuPer {
    fn push(&mut self, c: &Cpu, iops: f64) {
        self.engine.push(Cpu::us_per_req(c.engine, c.wall, iops));
        self.driver.push(Cpu::us_per_req(c.driver, c.wall, iops));
        self.process.push(Cpu::us_per_req(c.process, c.wall, iops));
    }
    fn line(c: &Cpu, iops: f64) -> String {
        format!(
            "CPU/request: engine thread {:.2} us, driver {:.2} us, process {:.2} us",
            Cpu::us_per_req(c.engine, c.wall, iops),
            Cpu::us_per_req(c.driver, c.wall, iops),
            Cpu::us_per_req(c.process, c.wall, iops)
        )
    }
}

/// The engine thread's hand-offs over a run (warm-up included), per request completed.
fn handoff_line(n: &ThreadCounters) -> String {
    let per = |x: u64| x as f64 / n.completions.max(1) as f64;
    format!(
        "per request: {:.3} doorbells, {:.3} completion wakeups, {:.3} engine sleeps; {:.2} completions per batch",
        per(n.doorbells),
        per(n.completion_rings),
        per(n.sleeps),
        n.completions as f64 / n.batches.max(1) as f64
    )
}

/// Runs the comparison; its figures go through `put`.
pub fn run(b: &Bench, put: &mut dyn FnMut(&str, f64)) {
    let secs = b.secs;
    let spin = Duration::from_micros(env_u64("UBCACHE_BENCH_ENGINE_THREAD_SPIN_US", 0));
    put("thread_spin_us", spin.as_micros() as f64);
    eprintln!(
        "where the engine runs: inline (the driver thread submits and reaps) vs an engine thread of its own (queues, eventfds, batched completions); engine-thread spin {} us",
        spin.as_micros()
    );
    let cache_path = b.cache.path.clone();

    // Fully cached random reads.
    {
        let mut ct = b.fresh_thread(b.cache_bytes, CacheMode::Writeback, spin);
        eprintln!("  filling a {} MiB region on the engine thread (1 MiB writes, QD4, writeback)...", HIT_REGION >> 20);
        let (lo, hi) = ct.with(fill_hit_region);
        eprintln!("  the region's data lies in bytes {lo}..{hi} of the cache device; fio reads that range");
        let region_blocks = HIT_REGION / BLOCK;
        for qd in [32usize, 1] {
            eprintln!(
                "  4 KiB random reads, all hits, QD{qd} ({}), inline vs engine thread...",
                if qd == 1 { "p50" } else { "IOPS" }
            );
            let depth = format!("--iodepth={qd}");
            let (mut p_in, mut p_th, mut p_spin_th, mut p_spin_in) =
                (Pairs::default(), Pairs::default(), Pairs::default(), Pairs::default());
            let mut th_over_in = Vec::new();
            let (mut cpu_in, mut cpu_th) = (CpuPer::default(), CpuPer::default());
            for i in 0..b.rounds {
                let f = fio(&cache_path, secs, lo, hi - lo, &["--rw=randread", "--bs=4k", &depth], "read");
                let f_spin = (qd == 1).then(|| {
                    let a = ["--rw=randread", "--bs=4k", "--iodepth=1", "--iodepth_batch_complete_min=0"];
                    fio(&cache_path, secs, lo, hi - lo, &a, "read")["lat_ns"]["percentile"]["50.000000"]
                        .as_f64()
                        .unwrap()
                });
                let fv = if qd == 32 {
                    f["iops"].as_f64().unwrap()
                } else {
                    f["lat_ns"]["percentile"]["50.000000"].as_f64().unwrap()
                };
                let seed = 0x0123_4567_89ab_cdef ^ (qd as u64) << 40 ^ i as u64;
                let inline = |ct: &CacheThread| {
                    measure_cpu(ct.cpu_clock(), || {
                        ct.with(move |rig| {
                            let mut rng = Rng(seed);
                            let mut next = || rng.below(region_blocks) * BLOCK;
                            drive(rig, hit_load(&mut next, qd, secs))
                        })
                    })
                };
                let threaded = |ct: &mut CacheThread| {
                    let n0 = ct.counters();
                    let clock = ct.cpu_clock();
                    let mut rng = Rng(seed ^ 0x5555);
                    let mut next = || rng.below(region_blocks) * BLOCK;
                    let (run, cpu) = measure_cpu(clock, || drive_thread(ct, hit_load(&mut next, qd, secs)));
                    (run, cpu, ct.counters().minus(&n0))
                };
                let ((mut r_in, c_in), (mut r_th, c_th, n_th)) = if i % 2 == 0 {
                    let a = inline(&ct);
                    (a, threaded(&mut ct))
                } else {
                    let t = threaded(&mut ct);
                    (inline(&ct), t)
                };
                for (w, r) in [("inline", &r_in), ("engine thread", &r_th)] {
                    let h = hit_fraction(r);
                    assert!(h >= 0.999, "{w}: only {:.3}% hits", h * 100.0);
                }
                cpu_in.push(&c_in, r_in.iops());
                cpu_th.push(&c_th, r_th.iops());
                let (v_in, v_th) = if qd == 32 { (r_in.iops(), r_th.iops()) } else { (r_in.p50(), r_th.p50()) };
                p_in.push(fv, v_in);
                p_th.push(fv, v_th);
                th_over_in.push(v_th / v_in);
                if qd == 32 {
                    eprintln!(
                        "    round {}: fio {fv:.0} IOPS; inline {v_in:.0} IOPS ({:.3}); engine thread {v_th:.0} IOPS ({:.3}); thread/inline {:.3}",
                        i + 1,
                        v_in / fv,
                        v_th / fv,
                        v_th / v_in
                    );
                } else {
                    let fs = f_spin.unwrap();
                    p_spin_in.push(fs, v_in);
                    p_spin_th.push(fs, v_th);
                    eprintln!(
                        "    round {}: fio p50 {:.1} us (polling {:.1}); inline p50 {:.1} us ({:.3}; {:.3} to fio polling), {:.0} IOPS; engine thread p50 {:.1} us ({:.3}; {:.3}), p99 {:.1} us, {:.0} IOPS; thread/inline {:.3}",
                        i + 1,
                        fv / 1e3,
                        fs / 1e3,
                        v_in / 1e3,
                        v_in / fv,
                        v_in / fs,
                        r_in.iops(),
                        v_th / 1e3,
                        v_th / fv,
                        v_th / fs,
                        r_th.pct(0.99) / 1e3,
                        r_th.iops(),
                        v_th / v_in
                    );
                }
                eprintln!("      inline: {}", CpuPer::line(&c_in, r_in.iops()));
                eprintln!("      engine thread: {}; {}", CpuPer::line(&c_th, r_th.iops()), handoff_line(&n_th));
            }
            let k = if qd == 32 { "hit_randread_qd32_iops" } else { "hit_randread_qd1_p50" };
            let unit = if qd == 32 { "" } else { "_ns" };
            put(&format!("{k}_ratio_thread"), r3(p_th.ratio()));
            put(&format!("{k}{unit}_thread"), p_th.ours().round());
            put(&format!("{k}_ratio_inline_beside_thread"), r3(p_in.ratio()));
            put(&format!("{k}{unit}_inline_beside_thread"), p_in.ours().round());
            put(
                if qd == 32 { "fio_randread_qd32_iops_beside_thread" } else { "fio_randread_qd1_p50_ns_beside_thread" },
                p_in.fio().round(),
            );
            put(&format!("{k}_thread_over_inline"), r3(median(&th_over_in)));
            if qd == 1 {
                put(&format!("{k}_ratio_thread_fio_polling"), r3(p_spin_th.ratio()));
                put(&format!("{k}_ratio_inline_beside_thread_fio_polling"), r3(p_spin_in.ratio()));
            }
            let kc = if qd == 32 { "hit_randread_qd32" } else { "hit_randread_qd1" };
            put(&format!("{kc}_cpu_us_per_req_inline"), r3(median(&cpu_in.engine)));
            put(&format!("{kc}_cpu_us_per_req_thread_engine"), r3(median(&cpu_th.engine)));
            put(&format!("{kc}_cpu_us_per_req_thread_driver"), r3(median(&cpu_th.driver)));
            put(&format!("{kc}_cpu_us_per_req_process_inline"), r3(median(&cpu_in.process)));
            put(&format!("{kc}_cpu_us_per_req_process_thread"), r3(median(&cpu_th.process)));
        }
        drop(ct);
    }

    // Writeback random writes, each to a block never written: a fresh set per run.
    {
        eprintln!(
            "  4 KiB random writes, QD32, writeback, each to a block never written (a fresh set per run), inline vs engine thread..."
        );
        let (mut p_in, mut p_th) = (Pairs::default(), Pairs::default());
        let mut th_over_in = Vec::new();
        let (mut cpu_in, mut cpu_th) = (CpuPer::default(), CpuPer::default());
        let (mut meta_in, mut meta_th) = (Vec::new(), Vec::new());
        let start = b.data_start(b.cache_bytes);
        let dev_blocks = (super::BACKING_SIZE - crate::rig::DATA_OFFSET) / BLOCK;
        for i in 0..b.rounds {
            let dev_bytes = dev_blocks * BLOCK;
            let f = fio(&cache_path, secs, start, dev_bytes, &["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write")
                ["iops"]
                .as_f64()
                .unwrap();
            let mut perm: Vec<u32> = (0..dev_blocks as u32).collect();
            let mut rng = Rng(0xfeed_5eed_0000_0001 + i as u64);
            for j in (1..perm.len()).rev() {
                perm.swap(j, rng.below(j as u64 + 1) as usize);
            }
            let perm = std::sync::Arc::new(perm);
            let inline = || {
                let ct = b.fresh_thread(b.cache_bytes, CacheMode::Writeback, spin);
                let perm = perm.clone();
                let r = measure_cpu(ct.cpu_clock(), || {
                    ct.with(move |rig| {
                        let mut k = 0usize;
                        let mut next = || {
                            let o = u64::from(perm[k]) * BLOCK;
                            k += 1;
                            o
                        };
                        let run = drive(rig, wb_load(&mut next, secs, dev_blocks));
                        run
                    })
                });
                drop(ct);
                r
            };
            let threaded = || {
                let mut ct = b.fresh_thread(b.cache_bytes, CacheMode::Writeback, spin);
                let n0 = ct.counters();
                let mut k = 0usize;
                let mut next = || {
                    let o = u64::from(perm[k]) * BLOCK;
                    k += 1;
                    o
                };
                let clock = ct.cpu_clock();
                let (run, cpu) = measure_cpu(clock, || drive_thread(&mut ct, wb_load(&mut next, secs, dev_blocks)));
                let n = ct.counters().minus(&n0);
                drop(ct);
                (run, cpu, n)
            };
            let ((r_in, c_in), (r_th, c_th, n_th)) = if i % 2 == 0 {
                let a = inline();
                (a, threaded())
            } else {
                let t = threaded();
                (inline(), t)
            };
            for (w, r) in [("inline", &r_in), ("engine thread", &r_th)] {
                assert_eq!(delta(&r.before, &r.after).dirty_overlaps, 0, "{w}: a write landed on dirty data");
            }
            let (v_in, v_th) = (r_in.iops(), r_th.iops());
            p_in.push(f, v_in);
            p_th.push(f, v_th);
            th_over_in.push(v_th / v_in);
            cpu_in.push(&c_in, v_in);
            cpu_th.push(&c_th, v_th);
            meta_in.push(meta_per_write(&r_in));
            meta_th.push(meta_per_write(&r_th));
            eprintln!(
                "    round {}: fio {f:.0} IOPS; inline {v_in:.0} IOPS ({:.3}), {:.1} meta B/write; engine thread {v_th:.0} IOPS ({:.3}), {:.1} meta B/write; thread/inline {:.3}",
                i + 1,
                v_in / f,
                meta_per_write(&r_in),
                v_th / f,
                meta_per_write(&r_th),
                v_th / v_in
            );
            eprintln!("      inline: {}", CpuPer::line(&c_in, v_in));
            eprintln!("      engine thread: {}; {}", CpuPer::line(&c_th, v_th), handoff_line(&n_th));
        }
        put("wb_randwrite_qd32_iops_ratio_thread", r3(p_th.ratio()));
        put("wb_randwrite_qd32_iops_thread", p_th.ours().round());
        put("wb_randwrite_qd32_iops_ratio_inline_beside_thread", r3(p_in.ratio()));
        put("wb_randwrite_qd32_iops_inline_beside_thread", p_in.ours().round());
        put("fio_cache_randwrite_qd32_iops_beside_thread", p_in.fio().round());
        put("wb_randwrite_qd32_thread_over_inline", r3(median(&th_over_in)));
        put("wb_randwrite_qd32_cpu_us_per_req_inline", r3(median(&cpu_in.engine)));
        put("wb_randwrite_qd32_cpu_us_per_req_thread_engine", r3(median(&cpu_th.engine)));
        put("wb_randwrite_qd32_cpu_us_per_req_thread_driver", r3(median(&cpu_th.driver)));
        put("wb_randwrite_qd32_cpu_us_per_req_process_inline", r3(median(&cpu_in.process)));
        put("wb_randwrite_qd32_cpu_us_per_req_process_thread", r3(median(&cpu_th.process)));
        put("meta_bytes_per_write_inline_beside_thread", (median(&meta_in) * 10.0).round() / 10.0);
        put("meta_bytes_per_write_thread", (median(&meta_th) * 10.0).round() / 10.0);
    }
}
