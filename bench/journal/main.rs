//! bench/journal: journal replay rate, and the open time of a set holding 1M extents
//! (`npm run bench:journal`, i.e. `cargo bench -p ubcache-core --bench journal`).
//!
//! The set is built by the real cache engine, driven as the JavaScript binding drives it
//! (bench/engine/rig.rs): a 64 GiB cache device (131072 buckets of 512 KiB) and a 64 GiB
//! backing device, both sparse files in /dev/shm (tmpfs: buffered I/O), take random 4 KiB
//! writes to distinct blocks in writeback mode at QD32, each then its own extent. The data
//! written is all zeros, so only the metadata is worth copying out.
//!
//! Both figures time `cache_set::load` over a `MemStorage` holding a copy of the cache
//! device (its nonzero blocks: the metadata), so they are the CPU cost of reading the set
//! back, not of a disk:
//! - replay_keys_per_s: a fresh set takes the first half of the writes and a flush, and is
//!   abandoned as in a crash. Half of 1M stays below both checkpoint triggers (a quarter of
//!   the journal, 16 prio writes), so its keys all come back from the journal: journal read
//!   and decode plus key insertion, per replayed key;
//! - open_1m_extents_s: the set is reopened on the devices (recovery), takes the second
//!   half, is closed cleanly (a final checkpoint holds every extent) and loaded again: the
//!   whole `load` of a set holding 1M extents.
//!
//! The reference is a `BTreeMap` taking the same keys (inode and start sector to pointer),
//! in index order, in the same run.
//!
//! Last line on stdout: a JSON object with {"replay_keys_per_s", "open_1m_extents_s", ...}.
//! Environment: `UBCACHE_BENCH_JOURNAL_EXTENTS` (default 1000000).

#[path = "../engine/rig.rs"]
mod rig;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rig::{drive, format_cache, fresh_set_uuid, Load, Rig, RigConfig, Rng, Stop};
use ubcache_core::cache_set::{self, CacheMode, CacheSetOptions, OpenReport};
use ubcache_core::io::{AlignedBuf, DevId, DirectIo, IoRequest, MemStorage, Storage};

const BUCKET: u16 = 1024; // 512 KiB buckets, make-bcache's default
const NBUCKETS: u64 = 131_072; // a 64 GiB cache device (sparse)
const BLOCK: u64 = 4096;
const BACKING_BLOCKS: u64 = 16 << 20; // 64 GiB

/// The two sparse files, removed on drop (also on a panic).
struct Files {
    cache: PathBuf,
    backing: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cache);
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn sparse(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create a file in /dev/shm");
    f.set_len(size).expect("size it");
}

fn rig(files: &Files) -> Rig {
    Rig::open(&RigConfig {
        cache: &files.cache,
        cache_direct: DirectIo::Off,
        backing: &files.backing,
        backing_direct: DirectIo::Off,
        mode: CacheMode::Writeback,
        set: CacheSetOptions::default(),
        arena_bytes: 16 << 20,
    })
}

/// A copy of the cache device's nonzero blocks (the data is all zeros: only metadata).
fn image(path: &Path, size: u64) -> MemStorage {
    let f = std::fs::File::open(path).expect("open the cache file");
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut st = MemStorage::new(size);
    let mut buf = AlignedBuf::new(1 << 20);
    let mut at = 0i64;
    loop {
        // SAFETY: lseek on a valid descriptor.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (mut off, end) = (data as u64 / BLOCK * BLOCK, (hole as u64).min(size));
        while off < end {
            let n = ((end - off).min(buf.len() as u64) as usize).div_ceil(BLOCK as usize) * BLOCK as usize;
            f.read_exact_at(&mut buf[..n], off).expect("read the cache file");
            st.write(off, &buf[..n]).expect("copy into memory");
            off += n as u64;
        }
        at = end as i64;
    }
    st
}

/// `n` writes of zeros to blocks not written before, then a flush.
fn write_blocks(r: &mut Rig, n: u64, rng: &mut Rng, seen: &mut HashSet<u64>) -> rig::Run {
    let mut next = || loop {
        let b = rng.below(BACKING_BLOCKS);
        if seen.insert(b) {
            return b * BLOCK;
        }
    };
    let run = drive(
        r,
        Load {
            qd: 32,
            bs: BLOCK as usize,
            write: true,
            next: &mut next,
            warm: Duration::ZERO,
            stop: Stop::Ops(n),
            lat: false,
            marks: vec![],
            progress: Some(Duration::from_secs(5)),
            limit: Some(n),
            zero_data: true,
        },
    );
    r.drain();
    let tag = r.tag();
    let mut out = Vec::new();
    r.ce.submit([IoRequest::flush(DevId(r.handle), tag)], &mut out).expect("flush");
    while !out.iter().any(|c| c.user_data == tag) {
        r.turn(&mut out, Duration::from_millis(10));
    }
    let c = out.into_iter().find(|c| c.user_data == tag).unwrap();
    c.result.expect("flush failed");
    run
}

fn report_line(what: &str, t: Duration, r: &OpenReport) {
    eprintln!(
        "{what}: load {:.3} s: journal read {:.3} s ({} entries), checkpoint {} keys in {:.3} s, {} keys replayed from {} entries in {:.3} s, {} stale, GC {:.3} s",
        t.as_secs_f64(),
        r.journal_read_time.as_secs_f64(),
        r.journal_entries,
        r.checkpoint_keys,
        r.checkpoint_time.as_secs_f64(),
        r.replayed_keys,
        r.replayed_entries,
        r.replay_time.as_secs_f64(),
        r.stale_keys,
        r.gc_time.as_secs_f64()
    );
}

fn main() {
    rig::catch_signals();
    let extents: u64 =
        std::env::var("UBCACHE_BENCH_JOURNAL_EXTENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let files = Files {
        cache: dir.join(format!("ubcache-bench-journal-cache-{}", std::process::id())),
        backing: dir.join(format!("ubcache-bench-journal-backing-{}", std::process::id())),
    };
    let size = NBUCKETS * u64::from(BUCKET) * 512;
    sparse(&files.cache, size);
    sparse(&files.backing, rig::DATA_OFFSET + BACKING_BLOCKS * BLOCK);
    format_cache(&files.cache, NBUCKETS, BUCKET, fresh_set_uuid());
    // The buckets the writes will fill (handed out from the start of the device), written
    // once before the clock starts: on this VM, memory the guest has not touched lately costs
    // about ten times more to write the first time (dd of 1 GiB to /dev/shm: 0.5 s for the
    // first two, then 5 s each; fallocate does not touch the pages), which would otherwise be
    // what the build rate measured.
    let t = Instant::now();
    let prealloc = (extents * BLOCK * 9 / 8 + (256 << 20)).min(size);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&files.cache).expect("open the cache file");
        let zeros = vec![0u8; 8 << 20];
        let mut at = 1 << 20; // past the superblock
        while at < prealloc {
            f.write_all_at(&zeros, at).expect("write zeros");
            at += zeros.len() as u64;
        }
    }
    eprintln!("wrote the first {} MiB of the cache file in {:.1} s", prealloc >> 20, t.elapsed().as_secs_f64());

    // Random 4 KiB writes to distinct blocks of a 64 GiB device: nearly every one is its
    // own extent.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut seen = HashSet::with_capacity(extents as usize + 64);
    let half = extents / 2;

    let mut r = rig(&files);
    eprintln!("writing {half} random 4 KiB blocks, writeback, QD32, through the cache engine...");
    let run1 = write_blocks(&mut r, half, &mut rng, &mut seen);
    let s1 = r.stats();
    eprintln!(
        "  {} writes in {:.2} s ({:.0}/s); {} checkpoints (the fresh set's first among them, {} MB), {} prio writes ({} MB), journal {} MB, {} GC passes",
        run1.ops,
        run1.secs,
        run1.iops(),
        s1.checkpoints,
        s1.checkpoint_bytes >> 20,
        s1.prio_writes,
        s1.prio_bytes >> 20,
        s1.journal_bytes >> 20,
        s1.gc_runs
    );
    // Abandon the set as in a crash (everything written is durable: the flush).
    drop(r);

    let t = Instant::now();
    let mut st = image(&files.cache, size);
    eprintln!("copied the cache device's metadata into memory in {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let set = cache_set::load(&mut st, CacheSetOptions::default()).expect("load after a crash");
    let crash_load = t.elapsed();
    let rc = set.open_report().clone();
    report_line("after a crash", crash_load, &rc);
    let replay_time = rc.journal_read_time + rc.replay_time;
    let replay_rate = rc.replayed_keys as f64 / replay_time.as_secs_f64();
    eprintln!("  replay: {:.2} M keys/s (journal read + key insertion)", replay_rate / 1e6);
    if (rc.replayed_keys as f64) < half as f64 * 0.9 {
        eprintln!("  (a checkpoint was written meanwhile: only {} of {half} keys were replayed)", rc.replayed_keys);
    }
    drop(set);
    drop(st);

    // Reopen on the devices (recovery), the second half, a clean close: the final
    // checkpoint holds every extent.
    eprintln!("reopening on the devices, writing {} more blocks, closing cleanly...", extents - half);
    let t = Instant::now();
    let mut r = rig(&files);
    eprintln!(
        "  recovered and running in {:.2} s (load {:.3} s)",
        t.elapsed().as_secs_f64(),
        r.load_time.as_secs_f64()
    );
    let s0 = r.stats();
    let run2 = write_blocks(&mut r, extents - half, &mut rng, &mut seen);
    let s2 = r.stats();
    eprintln!(
        "  {} writes in {:.2} s ({:.0}/s); {} checkpoints ({} MB), {} prio writes ({} MB), journal {} MB, {} GC passes",
        run2.ops,
        run2.secs,
        run2.iops(),
        s2.checkpoints - s0.checkpoints,
        (s2.checkpoint_bytes - s0.checkpoint_bytes) >> 20,
        s2.prio_writes - s0.prio_writes,
        (s2.prio_bytes - s0.prio_bytes) >> 20,
        (s2.journal_bytes - s0.journal_bytes) >> 20,
        s2.gc_runs - s0.gc_runs
    );
    let t = Instant::now();
    r.close();
    eprintln!("  closed in {:.2} s", t.elapsed().as_secs_f64());
    let mut st = image(&files.cache, size);
    let t = Instant::now();
    let mut set = cache_set::load(&mut st, CacheSetOptions::default()).expect("load after a clean close");
    let open_time = t.elapsed();
    let ro = set.open_report().clone();
    report_line("after a clean close", open_time, &ro);
    let keys = set.keys();
    let n = keys.len() as u64;
    eprintln!("  {n} extents");
    assert!(n as f64 >= extents as f64 * 0.99, "the set holds {n} extents of {extents}");
    drop(set);
    drop(st);

    // Reference: the same keys into a BTreeMap, in index order.
    let t = Instant::now();
    let mut m = BTreeMap::new();
    for k in &keys {
        m.insert((k.inode, k.start), k.ptrs()[0]);
    }
    let bt = t.elapsed();
    eprintln!(
        "reference: BTreeMap insert of {} keys in index order {:.3} s ({:.2} M keys/s)",
        m.len(),
        bt.as_secs_f64(),
        m.len() as f64 / bt.as_secs_f64() / 1e6
    );
    let bt_rate = m.len() as f64 / bt.as_secs_f64();
    drop(m);
    drop(files);

    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let json = serde_json::json!({
        "replay_keys_per_s": replay_rate.round(),
        "open_1m_extents_s": r3(open_time.as_secs_f64()),
        "btreemap_insert_keys_per_s": bt_rate.round(),
        "btreemap_insert_1m_s": r3(bt.as_secs_f64() * 1e6 / n as f64),
        "replay_vs_btreemap_ratio": r3(replay_rate / bt_rate),
        "open_vs_btreemap_ratio": r3(open_time.as_secs_f64() / bt.as_secs_f64()),
        "replayed_keys": rc.replayed_keys,
        "checkpoint_keys_after_crash": rc.checkpoint_keys,
        "extents": n,
        "open_checkpoint_s": r3(ro.checkpoint_time.as_secs_f64()),
        "open_journal_read_s": r3(ro.journal_read_time.as_secs_f64()),
        "open_gc_s": r3(ro.gc_time.as_secs_f64()),
        "build_writes_per_s": ((run1.iops() + run2.iops()) / 2.0).round(),
    });
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    writeln!(o, "{json}").unwrap();
}
