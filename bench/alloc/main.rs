//! Bucket allocator figures on a 1M-bucket cache (512 KiB buckets, so a 512 GiB device):
//! - alloc_buckets_per_s: steady-state allocate-and-invalidate cycles with LRU replacement,
//!   median of 10 rounds of 200k, by this thread's CPU time (wall time printed beside it).
//!   Each cycle allocates a bucket from RESERVE_NONE and releases it full of clean data; the
//!   allocator invalidates batches by LRU over all buckets and every batch goes through a full
//!   prio write (every link serialized and checksummed into a bucket buffer, as the engine
//!   would before submitting it), then is handed out. Only the device I/O is left out.
//! - bytes_per_bucket: heap bytes the allocator holds after that run, counted by a global
//!   allocator wrapper, divided by the bucket count.
//! - lru_select_ms: one LRU selection of a free_inc batch over 1M buckets with random prios
//!   and sectors used (median of 5, CPU time).
//!
//! The reference is std's sort of 1M (weight, index) keys, a full-order LRU, in the same run.
//!
//! Run: cargo bench -p ubcache-core --bench alloc

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use ubcache_core::alloc::{prio, Allocator, CacheConfig, PtrKind, Replacement, Reserve, SetConfig, Step};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NBUCKETS: u64 = 1 << 20;

/// CPU time of this thread: on a machine shared with other jobs, wall time also counts the
/// time the scheduler gave to them.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A stopwatch reading both clocks.
#[derive(Clone, Copy)]
struct Watch {
    wall: Instant,
    cpu: f64,
}

impl Watch {
    fn start() -> Watch {
        Watch { wall: Instant::now(), cpu: cpu_now() }
    }
    /// (wall seconds, cpu seconds) since start.
    fn read(&self) -> (f64, f64) {
        (self.wall.elapsed().as_secs_f64(), cpu_now() - self.cpu)
    }
}
const BUCKET_SIZE: u32 = 1024;

fn config(replacement: Replacement) -> SetConfig {
    SetConfig {
        set_uuid: *b"ubcache-bench-01",
        bucket_size: BUCKET_SIZE,
        block_size: 8,
        caches: vec![CacheConfig { nbuckets: NBUCKETS, first_bucket: 1, replacement, discard: false }],
        seed: 7,
    }
}

/// Time spent per phase of the allocator's work, in seconds.
#[derive(Default, Debug)]
struct Phases {
    poll: f64,
    encode: f64,
    batches: u64,
}

/// Does what the engine does for the allocator until it has nothing to ask.
fn drive(a: &mut Allocator, buf: &mut [u8], ph: &mut Phases) {
    loop {
        let t = cpu_now();
        let step = a.poll(0).unwrap();
        ph.poll += cpu_now() - t;
        match step {
            Step::Idle | Step::Waiting => return,
            Step::Discard(b) => a.discard_done(0, b).unwrap(),
            Step::WritePrios => {
                let t = cpu_now();
                let w = a.prio_write_begin(0).unwrap();
                for link in 0..w.buckets.len() {
                    a.encode_prio_bucket(0, link, buf).unwrap();
                }
                a.prio_write_committed(0).unwrap();
                ph.encode += cpu_now() - t;
                ph.batches += 1;
            }
            Step::NeedGc => {
                a.gc_start();
                a.gc_finish().unwrap();
            }
        }
    }
}

fn started(replacement: Replacement, buf: &mut [u8]) -> Allocator {
    let mut a = Allocator::new(&config(replacement)).unwrap();
    a.gc_start();
    a.gc_finish().unwrap();
    drive(&mut a, buf, &mut Phases::default());
    a
}

/// Allocate-and-release cycles per second: `rounds` rounds of `n` allocations each; returns the
/// median (wall, CPU) rates and prints the spread.
fn cycles(a: &mut Allocator, buf: &mut [u8], rounds: usize, n: u64, name: &str) -> (f64, f64) {
    let mut ph = Phases::default();
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let w = Watch::start();
        let mut done = 0;
        while done < n {
            match a.bucket_alloc(0, Reserve::None) {
                Ok(b) => {
                    a.unpin(0, b).unwrap();
                    done += 1;
                }
                Err(_) => drive(a, buf, &mut ph),
            }
        }
        let (wall, cpu) = w.read();
        walls.push(n as f64 / wall);
        cpus.push(n as f64 / cpu);
    }
    walls.sort_by(|x, y| x.partial_cmp(y).unwrap());
    cpus.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let (wall, cpu) = (walls[rounds / 2], cpus[rounds / 2]);
    if !name.is_empty() {
        eprintln!(
            "{name:<6} {rounds} x {n} cycles, {} batches; CPU per batch: poll (invalidate + drain) {:.2} ms, prio write {:.2} ms",
            ph.batches,
            ph.poll * 1e3 / ph.batches as f64,
            ph.encode * 1e3 / ph.batches as f64,
        );
        eprintln!(
            "{name:<6} alloc+invalidate buckets/s: CPU time median {cpu:.0} (best {:.0}, worst {:.0}); wall time median {wall:.0} (best {:.0}); {:.0} ns CPU per bucket",
            cpus[rounds - 1],
            cpus[0],
            walls[rounds - 1],
            1e9 / cpu
        );
    }
    (wall, cpu)
}

fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// An allocator whose buckets have random prios, gens and sectors used, loaded the way a
/// restart loads them (a prio chain, then GC marks).
fn aged(buf: &mut [u8], seed: u64) -> Allocator {
    let cfg = config(Replacement::Lru);
    let mut a = Allocator::new(&cfg).unwrap();
    let bucket_bytes = BUCKET_SIZE as usize * 512;
    let per = prio::prios_per_bucket(bucket_bytes);
    let links = prio::prio_buckets(NBUCKETS, bucket_bytes);
    let mut s = seed;
    let mut disk: Vec<Vec<u8>> = Vec::new();
    for link in 0..links {
        let count = per.min(NBUCKETS as usize - link * per);
        let entries: Vec<(u16, u8)> =
            (0..count).map(|_| ((rng(&mut s) % 32769) as u16, (rng(&mut s) % 256) as u8)).collect();
        let next = if link + 1 < links { 2 + link as u64 + 1 } else { 0 };
        prio::encode_prio_set(buf, a.pset_magic(), 1, next, entries).unwrap();
        disk.push(buf.to_vec());
    }
    a.read_prios(0, 2, |b, out| {
        out.copy_from_slice(&disk[(b - 2) as usize]);
        Ok(())
    })
    .unwrap();
    drop(disk);
    a.gc_start();
    for b in 2 + links as u64..NBUCKETS {
        if rng(&mut s).is_multiple_of(8) {
            continue;
        }
        let ptr = a.bucket_ptr(0, b).unwrap();
        a.gc_mark_ptr(ptr, (rng(&mut s) % u64::from(BUCKET_SIZE)) as u32 + 1, PtrKind::Clean).unwrap();
    }
    a.gc_finish().unwrap();
    a
}

fn main() {
    let mut buf = vec![0u8; BUCKET_SIZE as usize * 512];
    {
        let links = prio::prio_buckets(NBUCKETS, buf.len());
        let t = Watch::start();
        let mut x = 0;
        for _ in 0..20 {
            for _ in 0..links {
                x ^= ubcache_core::crc64::crc64(&buf);
            }
        }
        let (wall, cpu) = t.read();
        eprintln!(
            "reference: crc64 of one prio chain ({links} x {} KiB): {:.2} ms CPU, {:.2} ms wall ({x:x})",
            buf.len() >> 10,
            cpu * 1e3 / 20.0,
            wall * 1e3 / 20.0
        );
    }

    // Throughput, LRU (the headline) and the other policies for comparison.
    let before = LIVE.load(Ordering::Relaxed);
    let mut lru = started(Replacement::Lru, &mut buf);
    cycles(&mut lru, &mut buf, 1, 200_000, "");
    let (lru_wall, lru_cpu) = cycles(&mut lru, &mut buf, 10, 200_000, "LRU");
    let live = LIVE.load(Ordering::Relaxed) - before;
    let bytes_per_bucket = live as f64 / NBUCKETS as f64;
    lru.check_invariants().unwrap();
    drop(lru);
    eprintln!("memory: {live} bytes live for {NBUCKETS} buckets = {bytes_per_bucket:.2} bytes/bucket");
    for (name, r) in [("FIFO", Replacement::Fifo), ("random", Replacement::Random)] {
        let mut a = started(r, &mut buf);
        cycles(&mut a, &mut buf, 1, 200_000, "");
        cycles(&mut a, &mut buf, 10, 200_000, name);
    }

    // One LRU batch selection over aged, partly full buckets.
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for rep in 0..5 {
        let mut a = aged(&mut buf, 0x1234_5678 + rep);
        let t = Watch::start();
        let step = a.poll(0).unwrap();
        let (wall, cpu) = t.read();
        walls.push(wall * 1e3);
        cpus.push(cpu * 1e3);
        assert_eq!(step, Step::WritePrios, "a full batch must have been selected");
        assert_eq!(a.free_inc(0).unwrap().len(), a.free_inc_capacity(0).unwrap());
    }
    walls.sort_by(|x, y| x.partial_cmp(y).unwrap());
    cpus.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let (select_wall, select_cpu) = (walls[2], cpus[2]);
    eprintln!("LRU select of a 4096-bucket batch over {NBUCKETS} buckets, median of 5: {select_cpu:.2} ms CPU (runs {cpus:.2?}), {select_wall:.2} ms wall (runs {walls:.2?})");

    // Reference: a full sort of 1M (weight, index) keys.
    let mut s = 99u64;
    let mut keys: Vec<u64> = (0..NBUCKETS).map(|i| ((rng(&mut s) % (1 << 30)) << 32) | i).collect();
    let t = Watch::start();
    keys.sort_unstable();
    let (_, sort_cpu) = t.read();
    eprintln!(
        "reference: sort_unstable of 1M LRU keys: {:.2} ms CPU (LRU select takes {:.0}% of that)",
        sort_cpu * 1e3,
        select_cpu / (sort_cpu * 1e3) * 100.0
    );
    eprintln!("wall-clock figures: alloc_buckets_per_s {lru_wall:.0}, lru_select_ms {select_wall:.3} (the JSON below uses CPU time)");

    println!(
        "{{\"alloc_buckets_per_s\": {:.0}, \"bytes_per_bucket\": {:.2}, \"lru_select_ms\": {:.3}}}",
        lru_cpu, bytes_per_bucket, select_cpu
    );
}
