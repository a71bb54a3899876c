//! I/O engine benchmark against fio, on the same 1 GiB fully written file in the same run.
//!
//! Measures, each next to the matching fio run (interleaved, so both see the same machine):
//! - 4 KiB random reads at QD32: io_uring engine vs `fio --ioengine=io_uring --direct=1`
//!   (driven directly, and through the engine thread as a binding drives it);
//! - 4 KiB random reads at QD1: p50 latency, submit to completion, vs fio's `lat` p50
//!   (directly, and through the engine thread);
//! - 1 MiB sequential reads at QD4: bandwidth;
//! - the portable engine (4 workers) at QD32 vs `fio --ioengine=psync --numjobs=4`.
//!
//! Environment: `UBCACHE_BENCH_IO_FILE` (default /var/tmp/ubcache-bench-io/data-1g; must not
//! be on tmpfs), `UBCACHE_BENCH_SECONDS` per measurement (default 5),
//! `UBCACHE_BENCH_IO_ONLY=psync` to run only the portable-engine comparison (the JSON then
//! holds only its keys; by default everything runs and is reported),
//! `UBCACHE_BENCH_PSYNC_ROUNDS` (default 1): alternate fio and the portable engine that many
//! times and report the means, which evens out this comparison's drift on a shared machine.
//! The last stdout line is the JSON of figures; ratios are ours / fio's.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ubcache_core::io::psync::PsyncEngine;
use ubcache_core::io::uring::UringEngine;
use ubcache_core::io::{
    AlignedBuf, BufPool, BufPoolConfig, DevId, Device, EngineOptions, IoCompletion, IoEngine, IoRequest, IoThread,
    OpenOptions,
};

const FILE_SIZE: u64 = 1 << 30;
const PSYNC_THREADS: usize = 4;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn block(&mut self, bs: u64) -> u64 {
        (self.next() % (FILE_SIZE / bs)) * bs
    }
}

fn prepare(path: &Path) {
    if let Ok(m) = std::fs::metadata(path) {
        if m.len() == FILE_SIZE && m.blocks() * 512 >= FILE_SIZE {
            eprintln!("reusing {}", path.display());
            return;
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    eprintln!("writing {} (1 GiB)...", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = AlignedBuf::new(4 << 20);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..FILE_SIZE / (4 << 20) {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn check_not_tmpfs(path: &Path) {
    let c = std::ffi::CString::new(path.parent().unwrap().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills the struct we pass.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0 && s.f_type as i64 == 0x0102_1994 {
        eprintln!("{} is on tmpfs: O_DIRECT needs a real filesystem (set UBCACHE_BENCH_IO_FILE)", path.display());
        std::process::exit(2);
    }
}

fn fio(path: &Path, secs: u64, args: &[&str]) -> serde_json::Value {
    let out = Command::new("fio")
        .arg("--name=ref")
        .arg(format!("--filename={}", path.display()))
        .args(["--direct=1", "--time_based", "--ramp_time=1", "--norandommap", "--randrepeat=0", "--size=1g"])
        .args(["--lat_percentiles=1", "--output-format=json"])
        .arg(format!("--runtime={secs}"))
        .args(args)
        .output()
        .expect("fio must be installed");
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    v["jobs"][0]["read"].clone()
}

/// Ours: counts, latencies (ns) of requests issued at a fixed queue depth.
struct Run {
    ops: u64,
    bytes: u64,
    secs: f64,
    lat: Vec<u64>,
}

impl Run {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn bw(&self) -> f64 {
        self.bytes as f64 / self.secs
    }
    fn p50(&mut self) -> f64 {
        self.lat.sort_unstable();
        self.lat[self.lat.len() / 2] as f64
    }
}

/// Drives an engine directly from this thread, as fio drives its ring.
fn drive(e: &mut dyn IoEngine, id: DevId, pool: &BufPool, qd: usize, bs: u64, random: bool, secs: u64) -> Run {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut seq = 0u64;
    let mut next_off = |rng: &mut Rng| {
        if random {
            rng.block(bs)
        } else {
            let o = seq;
            seq = (seq + bs) % FILE_SIZE;
            o
        }
    };
    let mut started = vec![Instant::now(); qd];
    for (i, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        e.submit(IoRequest::read(id, next_off(&mut rng), pool.get(bs as usize), i as u64));
    }
    let warm = Instant::now() + Duration::from_millis(500);
    let mut t0 = None;
    let end = warm + Duration::from_secs(secs);
    let mut run = Run { ops: 0, bytes: 0, secs: 0.0, lat: Vec::with_capacity(1 << 20) };
    let mut out: Vec<IoCompletion> = Vec::with_capacity(qd);
    loop {
        e.poll(&mut out, None).unwrap();
        let now = Instant::now();
        if t0.is_none() && now >= warm {
            t0 = Some(now);
        }
        let done = now >= end;
        for c in out.drain(..) {
            let slot = c.user_data as usize;
            assert!(c.result.is_ok(), "{:?}", c.result);
            if t0.is_some() {
                run.ops += 1;
                run.bytes += bs;
                run.lat.push((now - started[slot]).as_nanos() as u64);
            }
            if !done {
                let buf = c.into_buf().unwrap();
                started[slot] = Instant::now();
                e.submit(IoRequest::read(id, next_off(&mut rng), buf, slot as u64));
            }
        }
        if done {
            run.secs = (now - t0.unwrap()).as_secs_f64();
            break;
        }
    }
    while e.in_flight() > 0 {
        e.poll(&mut out, None).unwrap();
        out.clear();
    }
    run
}

/// Same workload through the engine thread: requests enqueued from this thread,
/// completions back in batches through the sink, as the JavaScript binding does.
fn drive_thread(dev: Arc<Device>, pool: &BufPool, qd: usize, bs: u64, secs: u64) -> Run {
    let engine = UringEngine::new(&EngineOptions { buf_pool: Some(pool.clone()), ..Default::default() }).unwrap();
    let (tx, rx) = mpsc::channel::<Vec<IoCompletion>>();
    let t = IoThread::spawn(
        engine,
        Box::new(move |b| {
            let _ = tx.send(b);
        }),
    )
    .unwrap();
    let id = t.add_device(dev).unwrap();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut started = vec![Instant::now(); qd];
    for (i, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        t.submit(IoRequest::read(id, rng.block(bs), pool.get(bs as usize), i as u64)).unwrap();
    }
    let warm = Instant::now() + Duration::from_millis(500);
    let end = warm + Duration::from_secs(secs);
    let mut t0 = None;
    let mut run = Run { ops: 0, bytes: 0, secs: 0.0, lat: Vec::new() };
    let mut inflight = qd;
    let mut batch = VecDeque::new();
    loop {
        batch.extend(rx.recv().unwrap());
        let now = Instant::now();
        if t0.is_none() && now >= warm {
            t0 = Some(now);
        }
        let done = now >= end;
        let mut again = Vec::with_capacity(batch.len());
        for c in batch.drain(..) {
            inflight -= 1;
            let slot = c.user_data as usize;
            if t0.is_some() {
                run.ops += 1;
                run.bytes += bs;
                run.lat.push((now - started[slot]).as_nanos() as u64);
            }
            if !done {
                started[slot] = Instant::now();
                again.push(IoRequest::read(id, rng.block(bs), c.into_buf().unwrap(), slot as u64));
            }
        }
        inflight += again.len();
        if !again.is_empty() {
            t.submit_batch(again).unwrap();
        }
        if done {
            run.secs = (now - t0.unwrap()).as_secs_f64();
            break;
        }
    }
    while inflight > 0 {
        inflight -= rx.recv().unwrap().len();
    }
    t.close();
    run
}

/// The portable engine (4 workers) at QD32 against fio's psync with as many jobs:
/// (fio IOPS, engine IOPS), each the mean over `rounds` alternating runs.
fn psync_vs_fio(path: &Path, dev: &Arc<Device>, pool: &BufPool, secs: u64, rounds: u32) -> (f64, f64) {
    let mut psync = PsyncEngine::new(PSYNC_THREADS).unwrap();
    let pid = psync.add_device(dev.clone()).unwrap();
    eprintln!("portable engine: 4 KiB random reads, QD32, {PSYNC_THREADS} threads...");
    let jobs = format!("--numjobs={PSYNC_THREADS}");
    let (mut f_sum, mut sum) = (0.0, 0.0);
    for _ in 0..rounds {
        let f_ps = fio(path, secs, &["--ioengine=psync", "--rw=randread", "--bs=4k", &jobs, "--group_reporting"])
            ["iops"]
            .as_f64()
            .unwrap();
        let ps = drive(&mut psync, pid, pool, 32, 4096, true, secs).iops();
        eprintln!("  fio psync {f_ps:.0} IOPS, psync engine {ps:.0} IOPS ({:.3})", ps / f_ps);
        f_sum += f_ps;
        sum += ps;
    }
    (f_sum / rounds as f64, sum / rounds as f64)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let path = std::env::var_os("UBCACHE_BENCH_IO_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ubcache-bench-io/data-1g"));
    let secs: u64 = std::env::var("UBCACHE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let psync_rounds: u32 =
        std::env::var("UBCACHE_BENCH_PSYNC_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    check_not_tmpfs(&path);
    prepare(&path);

    let dev =
        Arc::new(Device::open(&path, &OpenOptions { write: false, exclusive: false, ..Default::default() }).unwrap());
    assert!(dev.is_direct(), "the benchmark file must allow O_DIRECT");
    let pool = BufPool::new(BufPoolConfig { arena_bytes: 64 << 20, ..Default::default() });
    let r = |a: f64, b: f64| (a / b * 1000.0).round() / 1000.0;
    if std::env::var("UBCACHE_BENCH_IO_ONLY").is_ok_and(|v| v == "psync") {
        let (f_ps, ps) = psync_vs_fio(&path, &dev, &pool, secs, psync_rounds);
        let json = serde_json::json!({
            "psync_randread_qd32_iops_ratio": r(ps, f_ps),
            "fio_psync_randread_qd32_iops": f_ps.round(),
            "psync_randread_qd32_iops": ps.round(),
            "seconds_per_measurement": secs,
        });
        println!("{json}");
        return;
    }
    let mut uring = UringEngine::new(&EngineOptions { buf_pool: Some(pool.clone()), ..Default::default() }).unwrap();
    let uid = uring.add_device(dev.clone()).unwrap();
    eprintln!(
        "io_uring engine: fixed buffers {}, fixed files {}; {} s per measurement",
        uring.has_fixed_buffers(),
        uring.has_fixed_files(),
        secs
    );

    eprintln!("4 KiB random reads, QD32...");
    let f_rr32 = fio(&path, secs, &["--ioengine=io_uring", "--rw=randread", "--bs=4k", "--iodepth=32"])["iops"]
        .as_f64()
        .unwrap();
    let rr32 = drive(&mut uring, uid, &pool, 32, 4096, true, secs).iops();
    let rr32_thread = drive_thread(dev.clone(), &pool, 32, 4096, secs).iops();
    eprintln!("  fio {f_rr32:.0} IOPS, engine {rr32:.0} IOPS, engine thread {rr32_thread:.0} IOPS");

    eprintln!("4 KiB random reads, QD1...");
    let f_qd1 = fio(&path, secs, &["--ioengine=io_uring", "--rw=randread", "--bs=4k", "--iodepth=1"]);
    let f_p50 = f_qd1["lat_ns"]["percentile"]["50.000000"].as_f64().unwrap();
    let p50 = drive(&mut uring, uid, &pool, 1, 4096, true, secs).p50();
    let p50_thread = drive_thread(dev.clone(), &pool, 1, 4096, secs).p50();
    eprintln!(
        "  fio p50 {:.1} us, engine p50 {:.1} us, engine thread p50 {:.1} us",
        f_p50 / 1e3,
        p50 / 1e3,
        p50_thread / 1e3
    );

    eprintln!("1 MiB sequential reads, QD4...");
    let f_bw =
        fio(&path, secs, &["--ioengine=io_uring", "--rw=read", "--bs=1m", "--iodepth=4"])["bw_bytes"].as_f64().unwrap();
    let bw = drive(&mut uring, uid, &pool, 4, 1 << 20, false, secs).bw();
    eprintln!("  fio {:.0} MB/s, engine {:.0} MB/s", f_bw / 1e6, bw / 1e6);

    let (f_ps, ps) = psync_vs_fio(&path, &dev, &pool, secs, psync_rounds);

    let json = serde_json::json!({
        "randread_qd32_iops_ratio_native": r(rr32, f_rr32),
        "randread_qd32_iops_ratio_thread": r(rr32_thread, f_rr32),
        "randread_qd1_p50_ratio": r(p50, f_p50),
        "randread_qd1_p50_ratio_thread": r(p50_thread, f_p50),
        "seqread_bw_ratio": r(bw, f_bw),
        "psync_randread_qd32_iops_ratio": r(ps, f_ps),
        "fio_randread_qd32_iops": f_rr32.round(),
        "randread_qd32_iops_native": rr32.round(),
        "fio_randread_qd1_p50_ns": f_p50,
        "randread_qd1_p50_ns_native": p50,
        "fio_seqread_bw_bytes_per_sec": f_bw.round(),
        "seqread_bw_bytes_per_sec_native": bw.round(),
        "fio_psync_randread_qd32_iops": f_ps.round(),
        "psync_randread_qd32_iops": ps.round(),
        "seconds_per_measurement": secs,
    });
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    writeln!(o, "{json}").unwrap();
}
