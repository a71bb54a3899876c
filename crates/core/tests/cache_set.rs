//! The cache set survives restarts (warm) and crashes (nothing flushed lost, nothing stale
//! served), and refuses to start on damaged metadata it cannot do without.

mod io_common;

use io_common::Rng;
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

type Faulty = EngineStorage<FaultEngine<PsyncEngine>>;

fn fault_device(name: &str, nbuckets: u64) -> (Faulty, std::path::PathBuf) {
    let path = std::path::PathBuf::from(format!("/dev/shm/ubcache-cs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let o = OpenOptions {
        direct: DirectIo::Off,
        exclusive: false,
        create_size: Some(nbuckets * BS * 512),
        ..Default::default()
    };
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
        let mode =
            if rng.below(2) == 0 { CrashMode::DropUnflushed } else { CrashMode::TearUnflushed { seed: rng.next() } };
        st2.engine().crash(mode).unwrap();
        ctl.clear_rules();
        crash_points += 1;
        st = st2;
    }
    let _ = std::fs::remove_file(&path);
    eprintln!(
        "{name}: replayed {} keys, {} stale, {} from checkpoints, {} fallbacks, {} gaps",
        stats[0], stats[1], stats[2], stats[3], stats[4]
    );
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

// ---- Damaged metadata ----

use ubcache_core::journal::{read_journal, JournalGeometry};

fn geometry(cs: &mut CacheSet<MemStorage>) -> JournalGeometry {
    let sb = cs.superblock().clone();
    JournalGeometry {
        buckets: sb.journal_buckets,
        bucket_bytes: BS as usize * 512,
        block_bytes: 4096,
        set_magic: u64::from_le_bytes(sb.set_uuid[..8].try_into().unwrap()),
    }
}

fn flip(st: &mut MemStorage, offset: u64) {
    let base = offset / 4096 * 4096;
    let mut b = vec![0u8; 4096];
    st.read(base, &mut b).unwrap();
    b[(offset - base) as usize] ^= 0x5a;
    st.write(base, &b).unwrap();
}

fn is_hole<S: Storage>(cs: &mut CacheSet<S>, inode: u32, blk: u64) -> bool {
    let r = cs.read(inode, blk * 8, 8).unwrap();
    r.len() == 1 && r[0].data.is_none()
}

/// Writes blocks 0..n of inode 1 with one flush (journal entry) each; returns where each
/// write's entry lies (byte offset on the device) and its seq.
fn entries_per_write(cs: &mut CacheSet<MemStorage>, n: u64) -> Vec<(u64, u64)> {
    let mut at = Vec::new();
    for i in 0..n {
        cs.write(1, i * 8, &block(i)).unwrap();
        cs.flush().unwrap();
        let g = geometry(cs);
        let found = read_journal(cs.storage(), &g).unwrap();
        let e =
            found.iter().rev().find(|e| e.keys().unwrap().iter().any(|k| k.inode == 1 && k.start == i * 8)).unwrap();
        at.push((g.buckets[e.bucket_idx] * g.bucket_bytes as u64 + e.offset as u64, e.jset.seq));
    }
    at
}

#[test]
fn torn_newest_entry_is_ignored() {
    let mut cs = CacheSet::open(fresh(4096), opts()).unwrap();
    entries_per_write(&mut cs, 2);
    let g = geometry(&mut cs);
    let found = read_journal(cs.storage(), &g).unwrap();
    let newest = found.last().unwrap().clone();
    let b_in_newest = newest.keys().unwrap().iter().any(|k| k.start == 8);
    let mut st = cs.abandon();
    flip(&mut st, g.buckets[newest.bucket_idx] * g.bucket_bytes as u64 + newest.offset as u64 + 100);
    let mut cs = CacheSet::open(st, opts()).unwrap();
    assert_eq!(cs.open_report().head_seq, newest.jset.seq - 1);
    assert_eq!(cs.read(1, 0, 8).unwrap()[0].data.as_deref(), Some(&block(0)[..]));
    assert_eq!(is_hole(&mut cs, 1, 1), b_in_newest, "only the torn entry's keys are missing");
    // The set goes on from there and survives another restart.
    cs.write(1, 16, &block(9)).unwrap();
    cs.flush().unwrap();
    let mut cs = CacheSet::open(cs.abandon(), opts()).unwrap();
    assert_eq!(cs.read(1, 16, 8).unwrap()[0].data.as_deref(), Some(&block(9)[..]));
}

#[test]
fn replay_stops_at_a_gap_and_the_set_goes_on() {
    let mut cs = CacheSet::open(fresh(4096), opts()).unwrap();
    let at = entries_per_write(&mut cs, 3);
    let mut st = cs.abandon();
    flip(&mut st, at[1].0 + 20); // the middle entry's seq
    let mut cs = CacheSet::open(st, opts()).unwrap();
    assert_eq!(cs.open_report().gap_at, Some(at[1].1), "{:?}", cs.open_report());
    assert_eq!(cs.read(1, 0, 8).unwrap()[0].data.as_deref(), Some(&block(0)[..]));
    assert!(is_hole(&mut cs, 1, 1) && is_hole(&mut cs, 1, 2), "nothing after the gap is replayed");
    // Writes after the recovery are not lost behind the old gap.
    cs.write(1, 40, &block(40)).unwrap();
    cs.flush().unwrap();
    let mut cs = CacheSet::open(cs.abandon(), opts()).unwrap();
    assert_eq!(cs.open_report().gap_at, None);
    assert_eq!(cs.read(1, 40, 8).unwrap()[0].data.as_deref(), Some(&block(40)[..]));
    assert_eq!(cs.read(1, 0, 8).unwrap()[0].data.as_deref(), Some(&block(0)[..]));
}

#[test]
fn bad_checkpoint_falls_back_to_the_previous_one() {
    let mut cs = CacheSet::open(fresh(4096), opts()).unwrap();
    let mut model = Model::new();
    let first = cs.metadata_pointers().0.unwrap();
    let mut i = 0u64;
    // Write until two checkpoints newer than the fresh set's were taken.
    let mut seen = vec![first];
    while seen.len() < 3 {
        cs.write(2, (i % 300) * 8, &block(i)).unwrap();
        model.insert((2, i % 300), i);
        cs.flush().unwrap();
        let c = cs.metadata_pointers().0.unwrap();
        if *seen.last().unwrap() != c {
            seen.push(c);
        }
        i += 1;
    }
    // A few more writes after it, so the fallback has more to replay.
    for j in 0..5 {
        cs.write(3, j * 8, &block(1000 + j)).unwrap();
        model.insert((3, j), 1000 + j);
    }
    cs.flush().unwrap();
    let cur = cs.metadata_pointers().0.unwrap();
    let buckets = cs.checkpoint_buckets();
    let mut st = cs.abandon();
    flip(&mut st, buckets[0] * BS * 512 + 4096 + 100); // a data block of the head bucket
    let mut cs = CacheSet::open(st, opts()).unwrap();
    let r = cs.open_report().clone();
    assert!(r.checkpoint_fallback, "{r:?}");
    assert!(r.checkpoint_seq < cur.seq);
    assert!(r.replayed_keys > 5, "a longer replay: {r:?}");
    check(&mut cs, &model);
    // The recovered state was checkpointed again: the next open needs no fallback.
    let mut cs = CacheSet::open(cs.abandon(), opts()).unwrap();
    assert!(!cs.open_report().checkpoint_fallback);
    check(&mut cs, &model);
}

#[test]
fn no_readable_checkpoint_refuses_to_start() {
    let mut cs = CacheSet::open(fresh(1024), opts()).unwrap();
    for i in 0..40 {
        cs.write(1, i * 8, &block(i)).unwrap();
        cs.flush().unwrap();
    }
    let g = geometry(&mut cs);
    let mut st = cs.abandon();
    // Damage every checkpoint any journal entry still names.
    let found = read_journal(&mut st, &g).unwrap();
    let heads: BTreeSet<u64> = found.iter().filter_map(|e| e.jset.checkpoint.map(|c| c.bucket)).collect();
    for b in heads {
        flip(&mut st, b * BS * 512 + 16);
    }
    let err = CacheSet::open(st, opts()).err().expect("opened without a checkpoint");
    assert!(err.message().contains("index checkpoint"), "{err}");
    assert_eq!(err.kind(), ubcache_core::ErrorKind::Corrupt);
}

#[test]
fn bad_uuid_table_or_prio_chain_refuses_to_start_naming_it() {
    for what in ["UUID table", "prio chain"] {
        let mut cs = CacheSet::open(fresh(1024), opts()).unwrap();
        cs.write(1, 0, &block(1)).unwrap();
        cs.flush().unwrap();
        let (_, uuid, prio) = cs.metadata_pointers();
        let bucket = if what == "UUID table" { uuid.unwrap().bucket } else { prio };
        let mut st = cs.abandon();
        flip(&mut st, bucket * BS * 512 + 12); // magic
        let err = CacheSet::open(st, opts()).err().unwrap_or_else(|| panic!("{what}: opened"));
        assert!(err.message().contains(what), "{what}: {err}");
        assert_eq!(err.kind(), ubcache_core::ErrorKind::Corrupt);
    }
}

#[test]
fn uuid_table_survives_restart() {
    use ubcache_core::uuids::{UuidEntry, UUID_FLASH_ONLY};
    let mut cs = CacheSet::open(fresh(1024), opts()).unwrap();
    let e = UuidEntry { uuid: [5; 16], flags: UUID_FLASH_ONLY, sectors: 1 << 20, first_reg: 17, ..Default::default() };
    cs.set_uuids(vec![UuidEntry::default(), e.clone()]).unwrap();
    let old = cs.metadata_pointers().1.unwrap();
    cs.set_uuids(vec![UuidEntry::default(), e.clone(), e.clone()]).unwrap();
    assert_ne!(cs.metadata_pointers().1.unwrap().bucket, old.bucket, "rewritten to a new bucket");
    let cs = CacheSet::open(cs.abandon(), opts()).unwrap();
    assert_eq!(cs.uuids(), &[UuidEntry::default(), e.clone(), e][..]);
}

#[test]
fn keys_are_batched_until_the_delay_or_a_flush() {
    let mut cs = CacheSet::open(fresh(4096), opts()).unwrap();
    let before = cs.stats().journal_entries;
    for i in 0..6 {
        cs.write(1, i * 8, &block(i)).unwrap();
    }
    assert!(cs.poll_journal().unwrap().is_some(), "keys wait for the delay");
    let mid = cs.stats().journal_entries;
    assert!(mid - before <= 2, "at most the allocator's own prio entries: {}", mid - before);
    cs.flush().unwrap();
    assert_eq!(cs.stats().journal_entries, mid + 1, "one entry for the batch");
    // With no delay every write is journalled by itself.
    let st = cs.close().unwrap();
    let mut cs = CacheSet::open(st, CacheSetOptions { journal_delay_ms: 0, seed: 7 }).unwrap();
    let before = cs.stats().journal_entries;
    for i in 0..5 {
        cs.write(2, i * 8, &block(i)).unwrap();
    }
    assert!(cs.stats().journal_entries >= before + 5);
    assert_eq!(cs.poll_journal().unwrap(), None);
}
