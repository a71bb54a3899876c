//! The cache set survives restarts (warm) and crashes (nothing flushed lost, nothing stale
//! served), and refuses to start on damaged metadata it cannot do without.

use std::collections::BTreeMap;

use ubcache_core::cache_set::superblock;
use ubcache_core::cache_set::{CacheSet, CacheSetOptions, MemStorage, Storage};

const BS: u64 = 16; // bucket size in sectors (8 KiB)

fn fresh(nbuckets: u64) -> MemStorage {
    let mut st = MemStorage::new(nbuckets * BS * 512);
    st.write(4096, &superblock::format([1; 16], [2; 16], nbuckets, BS as u16, 8)).unwrap();
    st
}

fn opts() -> CacheSetOptions {
    CacheSetOptions { journal_delay_ms: 100_000, seed: 7 }
}

fn block(tag: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i.wrapping_mul(31) ^ tag.wrapping_mul(0x9e37)) as u8).collect()
}

/// Model: (inode, block number) -> tag of the data last written there.
type Model = BTreeMap<(u32, u64), u64>;

fn check<S: Storage>(cs: &mut CacheSet<S>, model: &Model) {
    for (&(inode, blk), &tag) in model {
        let r = cs.read(inode, blk * 8, 8).unwrap();
        assert_eq!(r.len(), 1, "inode {inode} block {blk}: {r:?}");
        assert_eq!(r[0].data.as_deref(), Some(&block(tag)[..]), "inode {inode} block {blk} tag {tag}");
    }
    cs.verify_index().unwrap();
    let gens: Vec<_> = cs.keys();
    for k in gens {
        for p in k.ptrs() {
            let b = cs.allocator().bucket(p.dev(), p.offset() / BS).unwrap();
            assert_eq!(b.gen, p.gen(), "key {k:?} points into a bucket whose gen moved on");
        }
    }
}

#[test]
fn fresh_set_then_restart_keeps_every_key() {
    let st = fresh(1024);
    let mut cs = CacheSet::open(st, opts()).unwrap();
    assert!(cs.open_report().fresh);
    assert!(cs.superblock().sync());
    assert_eq!(cs.superblock().seq, 1);
    let mut model = Model::new();
    for i in 0..600u64 {
        let (inode, blk) = ((i % 3) as u32, (i * 7919) % 500);
        cs.write(inode, blk * 8, &block(i)).unwrap();
        model.insert((inode, blk), i);
        if i % 50 == 0 {
            cs.flush().unwrap();
        }
    }
    cs.flush().unwrap();
    check(&mut cs, &model);
    let st = cs.close().unwrap();
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let r = cs.open_report().clone();
    assert!(!r.fresh);
    assert_eq!(r.replayed_keys, 0, "a clean close leaves nothing to replay: {r:?}");
    assert_eq!(r.checkpoint_keys as usize, cs.keys().len());
    assert_eq!(cs.superblock().seq, 2);
    check(&mut cs, &model);
    // Without a clean close the keys come from the journal.
    for i in 600..700u64 {
        cs.write(5, i * 8, &block(i)).unwrap();
        model.insert((5, i), i);
    }
    cs.flush().unwrap();
    let st = cs.abandon();
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let r = cs.open_report().clone();
    assert_eq!(r.checkpoint_seq + r.replayed_entries, r.head_seq, "replay reached the newest entry: {r:?}");
    assert!(r.replayed_keys > 0 || r.checkpoint_keys as usize == cs.keys().len(), "{r:?}");
    check(&mut cs, &model);
}

#[test]
fn unflushed_writes_are_not_required_but_flushed_ones_are() {
    let mut cs = CacheSet::open(fresh(1024), opts()).unwrap();
    cs.write(1, 0, &block(1)).unwrap();
    cs.flush().unwrap();
    cs.write(1, 8, &block(2)).unwrap();
    let st = cs.abandon();
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let mut m = Model::new();
    m.insert((1, 0), 1);
    check(&mut cs, &m);
}

// ---- Crash simulation over the fault engine ----

use std::collections::BTreeSet;
use std::sync::Arc;
use ubcache_core::cache_set::EngineStorage;
use ubcache_core::io::fault::{CrashMode, FaultEngine, FaultRule};
use ubcache_core::io::psync::PsyncEngine;
use ubcache_core::io::{DirectIo, IoEngine, OpenOptions};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Faulty = EngineStorage<FaultEngine<PsyncEngine>>;

fn fault_device(name: &str, nbuckets: u64) -> (Faulty, std::path::PathBuf) {
    let path = std::path::PathBuf::from(format!("/dev/shm/ubcache-cs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let o = OpenOptions { direct: DirectIo::Off, exclusive: false, create_size: Some(nbuckets * BS * 512), ..Default::default() };
    let dev = Arc::new(ubcache_core::io::Device::open(&path, &o).unwrap());
    dev.write_at(&superblock::format([3; 16], [4; 16], nbuckets, BS as u16, 8), 4096).unwrap();
    let mut e = FaultEngine::new(PsyncEngine::new(1).unwrap());
    let id = e.add_device(dev).unwrap();
    e.control().set_volatile(true);
    (EngineStorage::new(e, id), path)
}

/// Per block: the data that is durable (None: nothing), and data written since the last
/// successful flush, any of which a crash may or may not keep.
#[derive(Default, Clone)]
struct Slot {
    durable: Option<u64>,
    since: BTreeSet<u64>,
}

fn check_after_crash(cs: &mut CacheSet<Faulty>, model: &mut BTreeMap<(u32, u64), Slot>, ctx: &str) {
    for (&(inode, blk), slot) in model.iter_mut() {
        let r = cs.read(inode, blk * 8, 8).unwrap();
        let got = match (r.len(), &r[0].data) {
            (1, Some(d)) => {
                let tag = slot.durable.iter().chain(slot.since.iter()).copied().find(|&t| block(t) == *d);
                assert!(tag.is_some(), "{ctx}: inode {inode} block {blk} holds data never written there");
                tag
            }
            (1, None) => None,
            _ => panic!("{ctx}: inode {inode} block {blk} partly cached: {r:?}"),
        };
        if got.is_none() {
            assert!(slot.durable.is_none(), "{ctx}: inode {inode} block {blk}: flushed data {:?} lost", slot.durable);
        }
        if slot.since.is_empty() {
            assert_eq!(got, slot.durable, "{ctx}: inode {inode} block {blk}");
        }
        // What survived is durable now (the crash left the device synced).
        *slot = Slot { durable: got, since: BTreeSet::new() };
    }
    cs.verify_index().unwrap_or_else(|e| panic!("{ctx}: {e}"));
    for k in cs.keys() {
        for p in k.ptrs() {
            let b = cs.allocator().bucket(p.dev(), p.offset() / BS).unwrap();
            assert_eq!(b.gen, p.gen(), "{ctx}: key {k:?} points into a bucket whose gen moved on");
        }
    }
}

/// Random writes and flushes; the device fails every request from a random point on (the
/// power cut) and the crash drops or tears what was not flushed; reopen and check.
fn crash_campaign(name: &str, seed: u64, rounds: usize) -> usize {
    let mut gens_moved = 0u64;
    let (mut st, path) = fault_device(name, 1024);
    let mut rng = Rng(seed);
    let mut model: BTreeMap<(u32, u64), Slot> = BTreeMap::new();
    let mut tag = seed << 32;
    let mut crash_points = 0;
    let mut stats = [0u64; 6];
    for round in 0..rounds {
        let ctl = st.engine().control();
        let mut cs = match CacheSet::open(st, opts()) {
            Ok(cs) => cs,
            Err(e) => panic!("{name} round {round}: open failed: {e}"),
        };
        let r = cs.open_report();
        stats[0] += r.replayed_keys;
        stats[1] += r.stale_keys;
        stats[2] += r.checkpoint_keys;
        stats[3] += u64::from(r.checkpoint_fallback);
        stats[4] += u64::from(r.gap_at.is_some());
        if round > 0 {
            check_after_crash(&mut cs, &mut model, &format!("{name} round {round}"));
        }
        // The power goes at a random request from now on (sometimes after the workload).
        ctl.add_rule(FaultRule::eio().skip(rng.below(400)));
        let ops = 10 + rng.below(60);
        for _ in 0..ops {
            let r = if rng.below(6) == 0 {
                cs.flush().map(|_| {
                    for s in model.values_mut() {
                        if let Some(&last) = s.since.iter().max_by_key(|&&t| t) {
                            s.durable = Some(last);
                            s.since.clear();
                        }
                    }
                })
            } else {
                let inode = rng.below(2) as u32;
                let blk = rng.below(160);
                let n = 1 + rng.below(3);
                let mut data = Vec::new();
                for i in 0..n {
                    tag += 1;
                    data.extend(block(tag));
                    model.entry((inode, blk + i)).or_default().since.insert(tag);
                }
                // Tags increase, so the newest is the largest in `since`.
                cs.write(inode, blk * 8, &data)
            };
            if let Err(e) = r {
                assert!(ctl.injected() > 0, "{name} round {round}: error without a fault: {e}");
                break;
            }
        }
        gens_moved += (0..1024).map(|b| u64::from(cs.allocator().bucket(0, b).unwrap().gen)).sum::<u64>();
        let mut st2 = cs.abandon();
        let mode = if rng.below(2) == 0 { CrashMode::DropUnflushed } else { CrashMode::TearUnflushed { seed: rng.next() } };
        st2.engine().crash(mode).unwrap();
        ctl.clear_rules();
        crash_points += 1;
        st = st2;
    }
    let _ = std::fs::remove_file(&path);
    eprintln!("{name}: replayed {} keys, {} stale, {} from checkpoints, {} fallbacks, {} gaps", stats[0], stats[1], stats[2], stats[3], stats[4]);
    // The campaign must have exercised replay and bucket reuse, or it proved little.
    assert!(stats[0] > 0 && stats[2] > 0 && gens_moved > 0, "{name}: {stats:?} gens {gens_moved}");
    crash_points
}

/// Crash points per campaign (four campaigns run at once): thousands in a release build,
/// fewer in a debug build to keep it quick.
const ROUNDS: usize = if cfg!(debug_assertions) { 60 } else { 500 };

#[test]
fn crashes_lose_nothing_flushed_and_serve_nothing_stale() {
    let threads: Vec<_> = (0..4u64)
        .map(|t| std::thread::spawn(move || crash_campaign(&format!("c{t}"), 0x1234_5678 + t * 7777, ROUNDS)))
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 4 * ROUNDS);
}
