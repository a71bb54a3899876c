//! bench/engine: the cache engine alone, in Rust, against fio on the raw devices, in the
//! same run (`npm run bench:engine`, i.e. `cargo bench -p ubcache-core --bench engine`).
//!
//! Devices. The cache device is a loop device over a file in /dev/shm when run as root
//! (`losetup --direct-io=on` where it works), detached at the end even on a panic or
//! SIGINT; otherwise a file on disk (the output says which). The backing device is a file
//! of 1 GiB on this machine's disk, written in full once and reused
//! (`UBCACHE_BENCH_ENGINE_BACKING`, default /var/tmp/ubcache-bench-engine/backing-1g; not
//! tmpfs). Each set is formatted with `superblock::format` (4 KiB blocks, 512 KiB buckets
//! unless `UBCACHE_BENCH_ENGINE_BUCKET_KIB`), loaded with `cache_set::load` through an
//! `EngineStorage` over the io_uring engine that then runs it, and driven as the JavaScript
//! binding drives it (see rig.rs): a `RingDriver` with adaptive busy polling, `submit`,
//! `reap` when the ring's descriptor is readable, `tick` when background work is due, this
//! thread sleeping in poll(2).
//!
//! Figures (each ours / fio's on the raw device named, alternating fio and ours for
//! `UBCACHE_BENCH_ROUNDS` rounds (default 3) of `UBCACHE_BENCH_SECONDS` (default 3) each,
//! median of the paired ratios; fio gets 1 s of ramp, ours 0.5 s of warm-up):
//! - fill_seqread_bw_ratio: 1 MiB sequential reads at QD4 with nothing cached, mode none
//!   (every read a miss, served from the backing device) vs fio's sequential reads of the
//!   backing file. Our 1 MiB buffers sit in transparent huge pages, fio's in 4 KiB pages:
//!   a read of ours is one segment, fio's up to 256 (two requests when they pass the
//!   disk's 254-segment limit; the bench counts requests per read each way), and this VM's
//!   virtio disk is much faster with few segments: fio itself reads 0.97 GB/s with its
//!   buffers in malloc'd memory, 1.89 GB/s with `--mem=shmhuge` (which needs hugetlbfs
//!   pages reserved, so the bench does not use it). Expect a ratio near 2 here for that
//!   reason alone;
//! - hit_randread_qd32_iops_ratio, hit_randread_qd1_p50_ratio: 4 KiB random reads over a
//!   512 MiB region written before in writeback mode (the set's counters must show ≥ 99.9%
//!   hits) vs fio randread on the raw cache device over the byte range that region's data
//!   occupies there; p50 latency is submission to completion, vs fio's `lat` p50 (and,
//!   under `_fio_polling`, vs fio spinning for completions with
//!   `--iodepth_batch_complete_min=0`, as our adaptive busy polling does at QD1: on a VM
//!   whose idle vCPUs are slow to wake, a sleeping fio loses tens of microseconds). (The
//!   region is written rather than read once in writethrough mode because on a young set
//!   the allocator's LRU drops the oldest clean buckets at each prio write while empty ones
//!   abound, so a read-once fill would not stay whole.)
//! - wt_randwrite_qd32_iops_ratio: writethrough 4 KiB random writes over the whole cached
//!   device, on a fresh set, vs fio randwrite on the raw backing file;
//! - wb_randwrite_qd32_iops_ratio, meta_bytes_per_write: writeback 4 KiB random writes,
//!   each to a block never written before (a random permutation of the cached device's
//!   blocks, on a set formatted afresh for each round; the measurement ends after the
//!   seconds asked for or one pass over the 1 GiB device, whichever comes first), so every
//!   write takes the allocating path and is journalled (a write over dirty data goes in
//!   place, allocating and journalling nothing); vs fio randwrite on the raw cache device.
//!   Metadata bytes are the set's counters (`CacheSetStats::meta_bytes`: journal,
//!   checkpoints, prios, UUID table and superblock) over the measurement, per write; the
//!   block layer's count (/sys/block/<loop>/stat: bytes written to the cache device less
//!   the data the set wrote) is printed beside them as a check;
//! - steady_state_ratio: writeback 4 KiB random writes at QD32 over 1/16 of a set of
//!   `UBCACHE_BENCH_ENGINE_STEADY_GIB` (default 1) GiB formatted on the same device, until
//!   10× the set's size is written: throughput of the last tenth / the first tenth. Writes
//!   over dirty data replace it in new space (bcache's copy on write) until the writeback
//!   cutoffs, then in place; GC reclaims the buckets the replaced data leaves, so this
//!   measures that reclaim keeps up (the first tenth includes the region's first writes).
//! - journal (`fua_write_qd{1,32}_*` keys): writeback 4 KiB random FUA writes at QD1 and
//!   QD32, each complete once the journal entry holding its key is durable, with the
//!   journal written with FUA after a preflush (the default) and as flush-write-flush
//!   (`CacheSetOptions::journal_fua: false`), on fresh sets in alternating order; fio
//!   randwrite with `--fdatasync=1` on the raw cache device beside them.
//! - where the engine runs (placement.rs; `_thread`, `_inline_beside_thread` and
//!   `_thread_over_inline` keys, CPU per request as `_cpu_us_per_req_*`): the hit reads at
//!   QD32 and QD1 and the writeback writes, driven inline (as above, from the thread that
//!   opened the set) and with the set on an engine thread of its own that this thread feeds
//!   through a queue and an eventfd doorbell, its completions coming back in batches through
//!   a queue and an eventfd (thread.rs), alternating with fio in the same rounds.
//!
//! The last stdout line is one JSON object; progress goes to stderr.
//! Other environment: `UBCACHE_BENCH_ENGINE_CACHE_GIB` (size of the cache device, default
//! 4), `UBCACHE_BENCH_ENGINE_ONLY` (comma-separated subset of fill,hit,wt,wb,journal,thread,steady),
//! `UBCACHE_BENCH_ENGINE_THREAD_SPIN_US` (see placement.rs),
//! `UBCACHE_BENCH_PERF_WINDOWS=1` (print the CLOCK_MONOTONIC window of each of our
//! measurements, for `perf record -k CLOCK_MONOTONIC` then `perf report --time <window>`).

#[path = "placement.rs"]
mod placement;
#[path = "rig.rs"]
mod rig;
#[path = "thread.rs"]
mod thread;

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rig::{drive, format_cache, fresh_set_uuid, Load, Rig, RigConfig, Rng, Stop, DATA_OFFSET};
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, CacheSetStats};
use ubcache_core::io::{AlignedBuf, DirectIo};

const GIB: u64 = 1 << 30;
const BACKING_SIZE: u64 = GIB;
const BLOCK: u64 = 4096;
const HIT_REGION: u64 = 512 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn median(xs: &[f64]) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn statfs_type(dir: &Path) -> i64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills the struct we pass.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return 0;
    }
    s.f_type as i64
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The backing file: 1 GiB, every byte written once (reused when it is).
fn prepare_backing(path: &Path) {
    if let Ok(m) = std::fs::metadata(path) {
        if m.len() == BACKING_SIZE && m.blocks() * 512 >= BACKING_SIZE {
            eprintln!("reusing the backing file {}", path.display());
            return;
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    eprintln!("writing the backing file {} (1 GiB)...", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = AlignedBuf::new(4 << 20);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..BACKING_SIZE / (4 << 20) {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// The cache device: a loop device over a file in /dev/shm (root), or a file on disk.
/// Dropping it detaches the loop device and removes the file.
struct CacheDev {
    path: PathBuf,
    file: PathBuf,
    loop_dev: Option<PathBuf>,
    what: String,
    direct: DirectIo,
}

impl CacheDev {
    fn create(size: u64) -> CacheDev {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let file = if root {
            PathBuf::from("/dev/shm/ubcache-bench-engine-cache")
        } else {
            PathBuf::from("/var/tmp/ubcache-bench-engine/cache")
        };
        if root {
            // Loop devices a killed earlier run left over this file.
            if let Ok(o) = Command::new("losetup").arg("-j").arg(&file).output() {
                for line in String::from_utf8_lossy(&o.stdout).lines() {
                    if let Some(dev) = line.split(':').next() {
                        eprintln!("detaching {dev}, left over by an earlier run");
                        let _ = Command::new("losetup").arg("-d").arg(dev).status();
                    }
                }
            }
        }
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&file);
        let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&file).unwrap();
        f.set_len(size).unwrap();
        // Every page (or block) written once before anything is measured, so neither side
        // pays for first touches. Written, not fallocated: fallocate leaves tmpfs pages
        // untouched, and on this VM memory the guest has not touched lately costs about ten
        // times more to write the first time (dd of 1 GiB to /dev/shm: 0.5 s, then 5 s).
        let t = std::time::Instant::now();
        let zeros = vec![0u8; 8 << 20];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], at).unwrap();
            at += n as u64;
        }
        f.sync_all().unwrap();
        drop(f);
        eprintln!(
            "wrote the {} GiB cache file {} once in {:.1} s",
            size / GIB,
            file.display(),
            t.elapsed().as_secs_f64()
        );
        if !root {
            let what = format!(
                "a {} GiB file on disk ({}): not root, so no loop device over /dev/shm",
                size / GIB,
                file.display()
            );
            return CacheDev { path: file.clone(), file, loop_dev: None, what, direct: DirectIo::Auto };
        }
        let mut dio = true;
        let mut out = Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(&file).output().unwrap();
        if !out.status.success() {
            eprintln!("losetup --direct-io=on failed ({}); without it", String::from_utf8_lossy(&out.stderr).trim());
            dio = false;
            out = Command::new("losetup").args(["--find", "--show"]).arg(&file).output().unwrap();
            assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let what = format!(
            "{} over {} ({} GiB in /dev/shm), loop direct I/O {}",
            dev.display(),
            file.display(),
            size / GIB,
            if dio { "on" } else { "off" }
        );
        CacheDev { path: dev.clone(), file, loop_dev: Some(dev), what, direct: DirectIo::Require }
    }
}

impl Drop for CacheDev {
    fn drop(&mut self) {
        if let Some(dev) = &self.loop_dev {
            match Command::new("losetup").arg("-d").arg(dev).status() {
                Ok(s) if s.success() => eprintln!("detached {}", dev.display()),
                r => eprintln!("losetup -d {} failed: {r:?}", dev.display()),
            }
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Read requests the block device holding `path` has completed so far (field 1 of its
/// /sys/dev/block/<major>:<minor>/stat), when there is one.
fn disk_reads(path: &Path) -> Option<u64> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let s = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// One fio run; returns the job's figures for `dir` ("read" or "write").
fn fio(file: &Path, secs: u64, offset: u64, size: u64, args: &[&str], dir: &str) -> serde_json::Value {
    let out = Command::new("fio")
        .arg("--name=ref")
        .arg(format!("--filename={}", file.display()))
        .args(["--direct=1", "--ioengine=io_uring", "--time_based", "--ramp_time=1", "--norandommap", "--randrepeat=0"])
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .args(["--lat_percentiles=1", "--output-format=json"])
        .arg(format!("--runtime={secs}"))
        .args(args)
        .output()
        .expect("fio must be installed");
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    v["jobs"][0][dir].clone()
}

struct Bench {
    cache: CacheDev,
    cache_bytes: u64,
    backing: PathBuf,
    bucket_sectors: u16,
    steady_bytes: u64,
    secs: u64,
    rounds: usize,
    only: Option<Vec<String>>,
}

impl Bench {
    fn wants(&self, what: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|w| w == what))
    }

    /// Formats a fresh set of `bytes` on the cache device and opens it in `mode`.
    fn fresh_set(&self, bytes: u64, mode: CacheMode) -> Rig {
        self.fresh_set_with(bytes, mode, CacheSetOptions::default())
    }

    /// [`Bench::fresh_set`] with options of its own.
    fn fresh_set_with(&self, bytes: u64, mode: CacheMode, set: CacheSetOptions) -> Rig {
        let bucket_bytes = u64::from(self.bucket_sectors) * 512;
        format_cache(&self.cache.path, bytes / bucket_bytes, self.bucket_sectors, fresh_set_uuid());
        Rig::open(&RigConfig {
            cache: &self.cache.path,
            cache_direct: self.cache.direct,
            backing: &self.backing,
            backing_direct: DirectIo::Require,
            mode,
            set,
            arena_bytes: 64 << 20,
        })
    }

    fn warm() -> Duration {
        Duration::from_millis(500)
    }

    /// First byte of the data area of a set of `bytes` (past the superblock's bucket and the
    /// journal's).
    fn data_start(&self, bytes: u64) -> u64 {
        let bucket_bytes = u64::from(self.bucket_sectors) * 512;
        let nbuckets = bytes / bucket_bytes;
        let first = 23 / u64::from(self.bucket_sectors) + 1;
        (first + (nbuckets >> 7).clamp(2, 256)) * bucket_bytes
    }
}

/// The counters this bench reads, as differences between `a` and `b` (counters it does not
/// read keep `b`'s value: the set may gain counters).
fn delta(a: &CacheSetStats, b: &CacheSetStats) -> CacheSetStats {
    CacheSetStats {
        data_bytes: b.data_bytes - a.data_bytes,
        journal_bytes: b.journal_bytes - a.journal_bytes,
        journal_entries: b.journal_entries - a.journal_entries,
        journal_preflushes: b.journal_preflushes - a.journal_preflushes,
        checkpoint_bytes: b.checkpoint_bytes - a.checkpoint_bytes,
        prio_bytes: b.prio_bytes - a.prio_bytes,
        other_meta_bytes: b.other_meta_bytes - a.other_meta_bytes,
        checkpoints: b.checkpoints - a.checkpoints,
        prio_distance_checkpoints: b.prio_distance_checkpoints - a.prio_distance_checkpoints,
        prio_writes: b.prio_writes - a.prio_writes,
        gc_runs: b.gc_runs - a.gc_runs,
        cache_hits: b.cache_hits - a.cache_hits,
        cache_misses: b.cache_misses - a.cache_misses,
        writeback_cutoffs: b.writeback_cutoffs - a.writeback_cutoffs,
        dirty_overlaps: b.dirty_overlaps - a.dirty_overlaps,
        space_waits: b.space_waits - a.space_waits,
        ..*b
    }
}

/// Metadata bytes written to the cache device over a run of `bs`-byte writes by the block
/// layer's count: bytes written to it less the data the set wrote (its `data_bytes`, plus
/// the writes that went in place over dirty data, which it does not count). A check on the
/// set's own counters; None when the cache device is not a block device.
fn dev_meta(run: &rig::Run, bs: u64) -> Option<u64> {
    let d = delta(&run.before, &run.after);
    run.dev_written.map(|w| w.saturating_sub(d.data_bytes + d.dirty_overlaps * bs))
}

/// Metadata bytes per write, by the set's counters (journal, checkpoints, prios, other).
fn meta_per_write(run: &rig::Run) -> f64 {
    delta(&run.before, &run.after).meta_bytes() as f64 / run.ops.max(1) as f64
}

fn meta_line(run: &rig::Run, bs: u64) -> String {
    let d = delta(&run.before, &run.after);
    let w = run.ops.max(1) as f64;
    let dev = match dev_meta(run, bs) {
        Some(m) => format!(" (block layer's count: {:.1})", m as f64 / w),
        None => String::new(),
    };
    format!(
        "metadata {:.1} B/write{dev}: journal {:.1} ({} entries), checkpoints {:.1} ({} B in {}, {} for the prio-write distance), prios {:.1} ({} B in {}), other {:.1}; {} GC passes; longest background call {} us",
        d.meta_bytes() as f64 / w,
        d.journal_bytes as f64 / w,
        d.journal_entries,
        d.checkpoint_bytes as f64 / w,
        d.checkpoint_bytes,
        d.checkpoints,
        d.prio_distance_checkpoints,
        d.prio_bytes as f64 / w,
        d.prio_bytes,
        d.prio_writes,
        d.other_meta_bytes as f64 / w,
        d.gc_runs,
        run.after.longest_tick_us
    )
}

/// Paired figures of one comparison.
#[derive(Default)]
struct Pairs {
    fio: Vec<f64>,
    ours: Vec<f64>,
}

impl Pairs {
    fn push(&mut self, f: f64, o: f64) {
        self.fio.push(f);
        self.ours.push(o);
    }
    fn ratio(&self) -> f64 {
        let r: Vec<f64> = self.fio.iter().zip(&self.ours).map(|(f, o)| o / f).collect();
        median(&r)
    }
    fn fio(&self) -> f64 {
        median(&self.fio)
    }
    fn ours(&self) -> f64 {
        median(&self.ours)
    }
}

fn main() {
    rig::catch_signals();
    let secs = env_u64("UBCACHE_BENCH_SECONDS", 3);
    let rounds = env_u64("UBCACHE_BENCH_ROUNDS", 3).max(1) as usize;
    let cache_bytes = env_u64("UBCACHE_BENCH_ENGINE_CACHE_GIB", 4).max(1) * GIB;
    let bucket_kib = env_u64("UBCACHE_BENCH_ENGINE_BUCKET_KIB", 512);
    assert!(
        bucket_kib.is_power_of_two() && (4..=16384).contains(&bucket_kib),
        "bucket size must be a power of two KiB"
    );
    let steady_bytes = env_u64("UBCACHE_BENCH_ENGINE_STEADY_GIB", 1).max(1) * GIB;
    assert!(steady_bytes <= cache_bytes, "the steady-state set must fit the cache device");
    let backing = std::env::var_os("UBCACHE_BENCH_ENGINE_BACKING")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ubcache-bench-engine/backing-1g"));
    let only = std::env::var("UBCACHE_BENCH_ENGINE_ONLY").ok().map(|s| s.split(',').map(str::to_string).collect());
    std::fs::create_dir_all(backing.parent().unwrap()).unwrap();
    if statfs_type(backing.parent().unwrap()) == TMPFS_MAGIC {
        panic!("{} is on tmpfs: the backing device must be on this machine's disk", backing.display());
    }
    prepare_backing(&backing);

    let cache = CacheDev::create(cache_bytes);
    let b = Bench {
        cache,
        cache_bytes,
        backing,
        bucket_sectors: (bucket_kib * 2) as u16,
        steady_bytes,
        secs,
        rounds,
        only,
    };
    eprintln!("cache device: {}", b.cache.what);
    eprintln!("backing device: {} (1 GiB, O_DIRECT, data offset {DATA_OFFSET})", b.backing.display());
    eprintln!("{} KiB buckets, 4 KiB blocks; {} rounds of {} s per measurement", bucket_kib, rounds, secs);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&b)));
    let json = match result {
        Ok(j) => j,
        Err(p) => {
            drop(b);
            std::panic::resume_unwind(p);
        }
    };
    drop(b);
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    writeln!(o, "{json}").unwrap();
}

fn run(b: &Bench) -> serde_json::Value {
    let secs = b.secs;
    let measure = Stop::Time(Duration::from_secs(secs));
    let mut json = serde_json::Map::new();
    let cache_path = b.cache.path.clone();
    let mut put = |k: &str, v: f64| {
        json.insert(k.to_string(), serde_json::json!(v));
    };

    let mut rig = b.fresh_set(b.cache_bytes, CacheMode::None);
    let dev_bytes = rig.dev_bytes();
    let dev_blocks = dev_bytes / BLOCK;
    eprintln!("set of {} GiB loaded in {:.3} s and started", b.cache_bytes / GIB, rig.load_time.as_secs_f64());

    // Cold sequential reads through the miss path (mode none: nothing is filled).
    if b.wants("fill") {
        eprintln!("1 MiB sequential reads, QD4, nothing cached, mode none (bytes/s)...");
        let mut p = Pairs::default();
        for i in 0..b.rounds {
            let f = fio(&b.backing, secs, DATA_OFFSET, dev_bytes, &["--rw=read", "--bs=1m", "--iodepth=4"], "read")
                ["bw_bytes"]
                .as_f64()
                .unwrap();
            let mut seq = 0u64;
            let mut next = || {
                let o = seq;
                seq = (seq + (1 << 20)) % (dev_bytes / (1 << 20) * (1 << 20));
                o
            };
            let run = drive(
                &mut rig,
                Load {
                    qd: 4,
                    bs: 1 << 20,
                    write: false,
                    next: &mut next,
                    warm: Bench::warm(),
                    stop: measure,
                    lat: false,
                    marks: vec![],
                    progress: None,
                    limit: None,
                    zero_data: false,
                },
            );
            let d = delta(&run.before, &run.after);
            assert_eq!(d.cache_hits, 0, "mode none with nothing cached must miss");
            let bw = run.ops as f64 * (1 << 20) as f64 / run.secs;
            p.push(f, bw);
            eprintln!("  round {}: fio {:.0} MB/s, ours {:.0} MB/s ({:.3})", i + 1, f / 1e6, bw / 1e6, bw / f);
        }
        // How many disk requests a 1 MiB read becomes, each way: 256 reads by fio (no ramp),
        // then by us, counted by the disk holding the backing file.
        let r0 = disk_reads(&b.backing);
        let out = Command::new("fio")
            .arg("--name=probe")
            .arg(format!("--filename={}", b.backing.display()))
            .args(["--direct=1", "--ioengine=io_uring", "--rw=read", "--bs=1m", "--iodepth=4", "--io_size=256m"])
            .arg(format!("--offset={DATA_OFFSET}"))
            .output()
            .expect("fio");
        assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
        let r1 = disk_reads(&b.backing);
        let mut seq = 0u64;
        let mut next = || {
            let o = seq;
            seq += 1 << 20;
            o
        };
        let load = Load {
            qd: 4,
            bs: 1 << 20,
            write: false,
            next: &mut next,
            warm: Duration::ZERO,
            stop: Stop::Ops(256),
            lat: false,
            marks: vec![],
            progress: None,
            limit: Some(256),
            zero_data: false,
        };
        drive(&mut rig, load);
        rig.drain();
        let r2 = disk_reads(&b.backing);
        if let (Some(r0), Some(r1), Some(r2)) = (r0, r1, r2) {
            eprintln!(
                "  disk requests per 1 MiB read: fio {:.2}, ours {:.2} (ours in transparent huge pages, one segment each; fio's in 4 KiB pages)",
                (r1 - r0) as f64 / 256.0,
                (r2 - r1) as f64 / 256.0
            );
        }
        put("fill_seqread_bw_ratio", r3(p.ratio()));
        put("fio_seqread_bw_bytes_per_sec", p.fio().round());
        put("fill_seqread_bw_bytes_per_sec", p.ours().round());
    }

    if b.wants("hit") {
        // Fill: write the region in writeback mode. (Reading it once in writethrough mode
        // would fill it too, but on a young set the allocator's LRU drops the oldest clean
        // buckets at each prio write while empty ones abound, so some of it would be gone;
        // dirty data cannot be dropped.)
        rig.set_mode(CacheMode::Writeback);
        eprintln!("filling a {} MiB region: 1 MiB sequential writes, QD4, writeback...", HIT_REGION >> 20);
        let mut seq = 0u64;
        let mut next = || {
            let o = seq;
            seq += 1 << 20;
            o
        };
        let run = drive(
            &mut rig,
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
        let d = delta(&run.before, &rig.stats());
        let cached = rig.set().cached_sectors(rig.inode) * 512;
        eprintln!(
            "  written in {:.2} s ({:.0} MB/s): {} MiB cached, {} MiB dirty; {} cut off to writethrough",
            run.secs,
            HIT_REGION as f64 / run.secs / 1e6,
            cached >> 20,
            rig.set().dirty_sectors(rig.inode) >> 11,
            d.writeback_cutoffs
        );
        assert!(cached >= HIT_REGION, "the region is not all cached: {cached} bytes");
        // Where the region's data lies on the cache device: fio reads that range.
        let inode = rig.inode;
        let keys = rig.ce.set_mut().unwrap().keys();
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        for k in keys.iter().filter(|k| k.inode == inode && k.start * 512 < HIT_REGION) {
            for p in k.ptrs() {
                lo = lo.min(p.offset() * 512);
                hi = hi.max((p.offset() + k.size) * 512);
            }
        }
        let (lo, hi) = (lo / BLOCK * BLOCK, hi.div_ceil(BLOCK) * BLOCK);
        eprintln!(
            "  the region's data lies in bytes {lo}..{hi} of the cache device ({} MiB); fio reads that range",
            (hi - lo) >> 20
        );
        let region_blocks = HIT_REGION / BLOCK;

        for (qd, name) in [(32usize, "QD32 (IOPS)"), (1, "QD1 (p50 latency)")] {
            eprintln!("4 KiB random reads, all hits, {name}...");
            let depth = format!("--iodepth={qd}");
            let mut p = Pairs::default();
            // At QD1 also against fio polling for its completions as we do (it spins in
            // io_uring_enter with iodepth_batch_complete_min=0 instead of sleeping).
            let mut p_spin = Pairs::default();
            let mut rng = Rng(0x0123_4567_89ab_cdef ^ qd as u64);
            for i in 0..b.rounds {
                let f = fio(&cache_path, secs, lo, hi - lo, &["--rw=randread", "--bs=4k", &depth], "read");
                let f_spin = (qd == 1).then(|| {
                    let a = ["--rw=randread", "--bs=4k", "--iodepth=1", "--iodepth_batch_complete_min=0"];
                    fio(&cache_path, secs, lo, hi - lo, &a, "read")["lat_ns"]["percentile"]["50.000000"]
                        .as_f64()
                        .unwrap()
                });
                let polls_before = rig.ce.driver().busy_polls();
                let mut next = || rng.below(region_blocks) * BLOCK;
                let mut run = drive(
                    &mut rig,
                    Load {
                        qd,
                        bs: BLOCK as usize,
                        write: false,
                        next: &mut next,
                        warm: Bench::warm(),
                        stop: measure,
                        lat: qd == 1,
                        marks: vec![],
                        progress: None,
                        limit: None,
                        zero_data: false,
                    },
                );
                let d = delta(&run.before, &run.after);
                let hit = d.cache_hits as f64 / (d.cache_hits + d.cache_misses).max(1) as f64;
                assert!(hit >= 0.999, "only {:.3}% hits", hit * 100.0);
                if qd == 32 {
                    let fi = f["iops"].as_f64().unwrap();
                    p.push(fi, run.iops());
                    eprintln!(
                        "  round {}: fio {fi:.0} IOPS, ours {:.0} IOPS ({:.3}); {:.2}% hits",
                        i + 1,
                        run.iops(),
                        run.iops() / fi,
                        hit * 100.0
                    );
                } else {
                    let fp = f["lat_ns"]["percentile"]["50.000000"].as_f64().unwrap();
                    let fp99 = f["lat_ns"]["percentile"]["99.000000"].as_f64().unwrap_or(f64::NAN);
                    let ours = run.p50();
                    let ours99 = run.pct(0.99);
                    p.push(fp, ours);
                    let fs = f_spin.unwrap();
                    p_spin.push(fs, ours);
                    let (polls, polled) = rig.ce.driver().busy_polls();
                    let (polls, polled) = (polls - polls_before.0, polled - polls_before.1);
                    eprintln!(
                        "  round {}: fio p50 {:.1} us (p99 {:.1}; polling: p50 {:.1}), ours p50 {:.1} us (p99 {:.1}) ({:.3}; {:.3} to fio polling); {:.0} IOPS; {:.2}% hits; {polls} busy polls, {polled} found a completion",
                        i + 1,
                        fp / 1e3,
                        fp99 / 1e3,
                        fs / 1e3,
                        ours / 1e3,
                        ours99 / 1e3,
                        ours / fp,
                        ours / fs,
                        run.iops(),
                        hit * 100.0
                    );
                }
            }
            if qd == 32 {
                put("hit_randread_qd32_iops_ratio", r3(p.ratio()));
                put("fio_randread_qd32_iops", p.fio().round());
                put("hit_randread_qd32_iops", p.ours().round());
            } else {
                put("hit_randread_qd1_p50_ratio", r3(p.ratio()));
                put("fio_randread_qd1_p50_ns", p.fio().round());
                put("hit_randread_qd1_p50_ns", p.ours().round());
                put("hit_randread_qd1_p50_ratio_fio_polling", r3(p_spin.ratio()));
                put("fio_polling_randread_qd1_p50_ns", p_spin.fio().round());
            }
        }
    }

    rig.drain();
    drop(rig);

    if b.wants("wt") {
        // A fresh set: writes over dirty data would go in place.
        let mut rig = b.fresh_set(b.cache_bytes, CacheMode::Writethrough);
        eprintln!("4 KiB random writes, QD32, writethrough, over the whole cached device, on a fresh set (IOPS)...");
        let mut p = Pairs::default();
        let mut rng = Rng(0x5eed_0f37_17e5);
        for i in 0..b.rounds {
            let f =
                fio(&b.backing, secs, DATA_OFFSET, dev_bytes, &["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write")
                    ["iops"]
                    .as_f64()
                    .unwrap();
            let mut next = || rng.below(dev_blocks) * BLOCK;
            let run = drive(
                &mut rig,
                Load {
                    qd: 32,
                    bs: BLOCK as usize,
                    write: true,
                    next: &mut next,
                    warm: Bench::warm(),
                    stop: measure,
                    lat: false,
                    marks: vec![],
                    progress: None,
                    limit: None,
                    zero_data: false,
                },
            );
            let d = delta(&run.before, &run.after);
            p.push(f, run.iops());
            eprintln!(
                "  round {}: fio {f:.0} IOPS (backing file), ours {:.0} IOPS ({:.3}); {}; {} space waits",
                i + 1,
                run.iops(),
                run.iops() / f,
                meta_line(&run, BLOCK),
                d.space_waits
            );
        }
        put("wt_randwrite_qd32_iops_ratio", r3(p.ratio()));
        put("fio_backing_randwrite_qd32_iops", p.fio().round());
        put("wt_randwrite_qd32_iops", p.ours().round());
        rig.drain();
    }

    if b.wants("wb") {
        eprintln!(
            "4 KiB random writes, QD32, writeback, each to a block never written (a fresh {} GiB set per round; {} s or one pass over the cached device, whichever ends first) (IOPS)...",
            b.cache_bytes / GIB,
            secs
        );
        let mut p = Pairs::default();
        let mut meta = Vec::new();
        let start = b.data_start(b.cache_bytes);
        for i in 0..b.rounds {
            let f = fio(&cache_path, secs, start, dev_bytes, &["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write")
                ["iops"]
                .as_f64()
                .unwrap();
            let mut rig = b.fresh_set(b.cache_bytes, CacheMode::Writeback);
            let mut perm: Vec<u32> = (0..dev_blocks as u32).collect();
            let mut rng = Rng(0xfeed_5eed_0000_0001 + i as u64);
            for j in (1..perm.len()).rev() {
                perm.swap(j, rng.below(j as u64 + 1) as usize);
            }
            let mut k = 0usize;
            let mut next = || {
                let o = u64::from(perm[k]) * BLOCK;
                k += 1;
                o
            };
            let run = drive(
                &mut rig,
                Load {
                    qd: 32,
                    bs: BLOCK as usize,
                    write: true,
                    next: &mut next,
                    warm: Bench::warm(),
                    stop: measure,
                    lat: false,
                    marks: vec![],
                    progress: None,
                    // One pass over the cached device: every write to a block never written.
                    limit: Some(dev_blocks),
                    zero_data: false,
                },
            );
            let d = delta(&run.before, &run.after);
            assert_eq!(d.dirty_overlaps, 0, "a write landed on dirty data");
            let mpw = meta_per_write(&run);
            meta.push(mpw);
            p.push(f, run.iops());
            eprintln!(
                "  round {}: fio {f:.0} IOPS (raw cache device), ours {:.0} IOPS ({:.3}); {} writes in {:.2} s, {} cut off to writethrough, {} waited for space; {}",
                i + 1,
                run.iops(),
                run.iops() / f,
                run.ops,
                run.secs,
                d.writeback_cutoffs,
                d.space_waits,
                meta_line(&run, BLOCK)
            );
            rig.drain();
        }
        put("wb_randwrite_qd32_iops_ratio", r3(p.ratio()));
        put("fio_cache_randwrite_qd32_iops", p.fio().round());
        put("wb_randwrite_qd32_iops", p.ours().round());
        put("meta_bytes_per_write", (median(&meta) * 10.0).round() / 10.0);
    }

    if b.wants("journal") {
        // FUA writes in writeback: each completes when the journal entry holding its key is
        // durable, so this measures the journal's commit, written with FUA (after a
        // preflush) or as flush-write-flush (`journal_fua: false`), on fresh sets in turn.
        let start = b.data_start(b.cache_bytes);
        for qd in [1usize, 32] {
            eprintln!(
                "4 KiB random FUA writes, QD{qd}, writeback: the journal written with FUA vs flush-write-flush (IOPS, p50)..."
            );
            let (mut on, mut off, mut on_p50, mut off_p50, mut fio_iops) = (vec![], vec![], vec![], vec![], vec![]);
            for i in 0..b.rounds {
                let f = fio(
                    &cache_path,
                    secs,
                    start,
                    dev_bytes,
                    &["--rw=randwrite", "--bs=4k", &format!("--iodepth={qd}"), "--fdatasync=1"],
                    "write",
                )["iops"]
                    .as_f64()
                    .unwrap();
                fio_iops.push(f);
                let order = if i % 2 == 0 { [true, false] } else { [false, true] };
                let mut line = format!("  round {}: fio with fdatasync after each write {f:.0} IOPS", i + 1);
                for journal_fua in order {
                    let opts = CacheSetOptions { journal_fua, ..CacheSetOptions::default() };
                    let mut rig = b.fresh_set_with(b.cache_bytes, CacheMode::Writeback, opts);
                    rig.fua_writes = true;
                    let mut rng = Rng(0x0f0a_0000_0000_0001 + i as u64);
                    let mut next = || rng.below(dev_blocks) * BLOCK;
                    let mut run = drive(
                        &mut rig,
                        Load {
                            qd,
                            bs: BLOCK as usize,
                            write: true,
                            next: &mut next,
                            warm: Bench::warm(),
                            stop: measure,
                            lat: true,
                            marks: vec![],
                            progress: None,
                            limit: None,
                            zero_data: false,
                        },
                    );
                    let d = delta(&run.before, &run.after);
                    let p50 = run.p50();
                    line += &format!(
                        "; journal {}: {:.0} IOPS, p50 {:.1} us, {} entries, {} preflushes",
                        if journal_fua { "FUA" } else { "flush-write-flush" },
                        run.iops(),
                        p50 / 1000.0,
                        d.journal_entries,
                        d.journal_preflushes
                    );
                    if journal_fua {
                        on.push(run.iops());
                        on_p50.push(p50);
                    } else {
                        off.push(run.iops());
                        off_p50.push(p50);
                    }
                    rig.drain();
                }
                eprintln!("{line}");
            }
            let ratio: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
            eprintln!(
                "  QD{qd}: FUA journal {:.0} IOPS, flush-write-flush {:.0} IOPS: {:.3}",
                median(&on),
                median(&off),
                median(&ratio)
            );
            put(&format!("fua_write_qd{qd}_iops_journal_fua"), median(&on).round());
            put(&format!("fua_write_qd{qd}_iops_journal_flush"), median(&off).round());
            put(&format!("fua_write_qd{qd}_journal_fua_over_flush"), r3(median(&ratio)));
            put(&format!("fua_write_qd{qd}_p50_ns_journal_fua"), median(&on_p50).round());
            put(&format!("fua_write_qd{qd}_p50_ns_journal_flush"), median(&off_p50).round());
            put(&format!("fio_fdatasync_randwrite_qd{qd}_iops"), median(&fio_iops).round());
        }
    }

    if b.wants("thread") {
        placement::run(b, &mut put);
    }

    if b.wants("steady") {
        let region = b.steady_bytes / 16;
        let total = 10 * b.steady_bytes / BLOCK;
        eprintln!(
            "steady state: 4 KiB random writes, QD32, writeback, over the first {} MiB of the cached device (1/16 of a fresh {} GiB set) until {} GiB are written...",
            region >> 20,
            b.steady_bytes / GIB,
            total * BLOCK / GIB
        );
        eprintln!(
            "  (a write over dirty data goes in place, so once the region is all dirty no write allocates; a region of 1/16 keeps dirty data far below the 40% writeback cutoff)"
        );
        let mut rig = b.fresh_set(b.steady_bytes, CacheMode::Writeback);
        let mut rng = Rng(0x57ea_d157_a7e0_0001);
        let blocks = region / BLOCK;
        let mut next = || rng.below(blocks) * BLOCK;
        let marks: Vec<u64> = (1..=10).map(|i| total * i / 10).collect();
        let run = drive(
            &mut rig,
            Load {
                qd: 32,
                bs: BLOCK as usize,
                write: true,
                next: &mut next,
                warm: Duration::ZERO,
                stop: Stop::Ops(total),
                lat: false,
                marks,
                progress: Some(Duration::from_secs(5)),
                limit: None,
                zero_data: false,
            },
        );
        let d = delta(&run.before, &run.after);
        let mut tenths = Vec::new();
        let mut prev = 0.0;
        for &m in &run.marks {
            tenths.push((total / 10) as f64 / (m - prev));
            prev = m;
        }
        let ratio = tenths[9] / tenths[0];
        eprintln!(
            "  {} writes in {:.1} s; IOPS per tenth: {}",
            run.ops,
            run.secs,
            tenths.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(", ")
        );
        eprintln!(
            "  {} over dirty data (in place), {} cut off to writethrough, {} waited for space; {}",
            d.dirty_overlaps,
            d.writeback_cutoffs,
            d.space_waits,
            meta_line(&run, BLOCK)
        );
        eprintln!("  last tenth / first tenth: {ratio:.3}");
        rig.drain();
        drop(rig);
        put("steady_state_ratio", r3(ratio));
        put("steady_first_tenth_iops", tenths[0].round());
        put("steady_last_tenth_iops", tenths[9].round());
        put("steady_meta_bytes_per_write", (meta_per_write(&run) * 10.0).round() / 10.0);
    }

    json.insert("seconds_per_measurement".into(), serde_json::json!(secs));
    json.insert("rounds".into(), serde_json::json!(b.rounds));
    json.insert("bucket_kib".into(), serde_json::json!(u64::from(b.bucket_sectors) / 2));
    json.insert("cache_device".into(), serde_json::json!(if b.cache.loop_dev.is_some() { "loop" } else { "file" }));
    json.insert("loadavg".into(), serde_json::json!(loadavg()));
    serde_json::Value::Object(json)
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}
