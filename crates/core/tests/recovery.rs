//! Opening a set whose metadata was damaged or cut short, and the ordering rules that keep
//! a crash from losing anything flushed: each test here fails if its rule is taken away.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::alloc::GcMark;
use ubcache_core::cache_set::{superblock, CacheMode, CacheSetOptions, CachedDevConfig, SetState, WritebackConfig};
use ubcache_core::io::fault::{CrashMode, FaultRule, Latency};
use ubcache_core::io::{AlignedBuf, DevId, IoRequest, OpKind, Storage};
use ubcache_core::journal::{read_journal, FoundEntry, JournalGeometry};
use ubcache_core::ErrorKind;

/// Writeback mode with writeback paused: these tests need their dirty keys to stay dirty
/// (a key written back is clean, and a clean key is dropped after a crash, which changes
/// what a replay has to do); writeback across crashes is the crash campaign's.
fn wb() -> RigOptions {
    RigOptions {
        modes: vec![CacheMode::Writeback],
        set: CacheSetOptions { journal_delay_ms: 100_000, ..Default::default() },
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        ..Default::default()
    }
}

/// Completions held back this long: a test's requests are then still in flight when its
/// next call runs, however fast the machine.
fn slow(rig: &Rig) {
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(30), ..Default::default() }));
}

/// The journal as it lies on the cache device.
fn journal(paths: &Paths) -> (Vec<FoundEntry>, JournalGeometry) {
    let mut st = storage(&paths.cache);
    let mut page = vec![0u8; 4096];
    st.read(4096, &mut page).unwrap();
    let sb = superblock::parse(&page).unwrap();
    let g = JournalGeometry {
        buckets: sb.journal_buckets.clone(),
        bucket_bytes: sb.bucket_size as usize * 512,
        block_bytes: sb.block_size as usize * 512,
        set_magic: ubcache_core::alloc::prio::set_magic(&sb.set_uuid),
    };
    (read_journal(&mut st, &g).unwrap(), g)
}

fn entry_at(g: &JournalGeometry, e: &FoundEntry) -> u64 {
    g.buckets[e.bucket_idx] * g.bucket_bytes as u64 + e.offset as u64
}

fn data(dev: u32, block: u64, v: u64) -> Vec<u8> {
    block_content(dev, block, v)
}

#[test]
fn a_torn_newest_entry_is_ignored_and_the_set_goes_on() {
    // A journal long enough that no checkpoint (recorded in an entry of its own) comes
    // after the second write's entry.
    let paths = format("torn", Geo { journal_buckets: Some(64), ..Geo::small() });
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    rig.write(0, 0, &data(0, 0, 1), false).unwrap();
    rig.flush(0).unwrap();
    rig.write(0, 1, &data(0, 1, 2), false).unwrap();
    rig.flush(0).unwrap();
    rig.crash(CrashMode::DropUnflushed);
    let (found, g) = journal(&paths);
    let newest = found.last().unwrap().clone();
    assert!(newest.keys().unwrap().iter().any(|k| k.start == 8), "the second write's key is in the newest entry");
    flip(&paths.cache, entry_at(&g, &newest) + 100);
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let r = rig.engine.set().unwrap().open_report().clone();
    assert_eq!(r.head_seq, newest.jset.seq - 1, "{r:?}");
    assert_eq!(rig.read(0, 0, 1).unwrap(), data(0, 0, 1));
    assert_eq!(rig.read(0, 1, 1).unwrap(), data(0, 1, 0), "the torn entry's key is gone: the backing device's data");
    // The set goes on from there, and what it writes survives another crash.
    rig.write(0, 2, &data(0, 2, 3), false).unwrap();
    rig.flush(0).unwrap();
    rig.crash(CrashMode::DropUnflushed);
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    assert_eq!(rig.read(0, 2, 1).unwrap(), data(0, 2, 3));
    rig.close().unwrap();
}

#[test]
fn replay_stops_at_a_gap_and_what_comes_after_the_recovery_survives() {
    // A journal long enough that these few entries do not bring on a checkpoint.
    let paths = format("gap", Geo { journal_buckets: Some(64), ..Geo::small() });
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    for b in 0..6 {
        rig.write(0, b, &data(0, b, 10 + b), false).unwrap();
        rig.flush(0).unwrap();
    }
    rig.crash(CrashMode::DropUnflushed);
    let (found, g) = journal(&paths);
    let base = found.last().unwrap().jset.checkpoint.unwrap().seq;
    let with =
        |blk: u64| found.iter().rev().find(|e| e.keys().unwrap().iter().any(|k| k.start == blk * 8)).unwrap().clone();
    // An entry after the checkpoint replay starts from, with a later one after it.
    let b = (0..5).find(|&b| with(b).jset.seq > base).expect("entries after the checkpoint");
    let (e1, e2) = (with(b), with(5));
    assert!(e2.jset.seq > e1.jset.seq);
    flip(&paths.cache, entry_at(&g, &e1) + 20); // its seq: the entry is gone
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let r = rig.engine.set().unwrap().open_report().clone();
    assert_eq!(r.gap_at, Some(e1.jset.seq), "{r:?}");
    if b > 0 {
        assert_eq!(rig.read(0, 0, 1).unwrap(), data(0, 0, 10));
    }
    assert_eq!(rig.read(0, 5, 1).unwrap(), data(0, 5, 0), "nothing after the gap is replayed");
    // The recovered state was checkpointed before the set ran: a write now survives a
    // crash, though its entry lies after the old gap.
    rig.write(0, 40, &data(0, 40, 40), false).unwrap();
    rig.flush(0).unwrap();
    rig.crash(CrashMode::DropUnflushed);
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    assert_eq!(rig.engine.set().unwrap().open_report().gap_at, None);
    assert_eq!(rig.read(0, 40, 1).unwrap(), data(0, 40, 40));
    if b > 0 {
        assert_eq!(rig.read(0, 0, 1).unwrap(), data(0, 0, 10));
    }
    rig.close().unwrap();
}

/// Writes until two checkpoints are kept; returns the model of what was written.
fn two_checkpoints(rig: &mut Rig) -> Vec<(u64, u64)> {
    let mut written = Vec::new();
    let mut i = 0u64;
    let until = Instant::now() + Duration::from_secs(30);
    while rig.engine.set().unwrap().checkpoint_chains().len() < 2 || written.len() < 50 {
        assert!(Instant::now() < until, "no second checkpoint");
        let b = (i * 7) % 300;
        rig.write(0, b, &data(0, b, 100 + i), false).unwrap();
        rig.flush(0).unwrap();
        written.retain(|&(x, _)| x != b);
        written.push((b, 100 + i));
        i += 1;
    }
    // The newest checkpoint recorded, a write after it: replay has a key to apply.
    rig.settle();
    let b = (i * 7) % 300;
    rig.write(0, b, &data(0, b, 100 + i), false).unwrap();
    rig.flush(0).unwrap();
    written.retain(|&(x, _)| x != b);
    written.push((b, 100 + i));
    written
}

#[test]
fn a_damaged_checkpoint_falls_back_to_the_one_before_even_after_a_reopen() {
    let paths = format("fallback", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let written = two_checkpoints(&mut rig);
    rig.crash(CrashMode::DropUnflushed);
    // Reopened, the older checkpoint is still one replay may fall back to: its buckets
    // are kept from reuse (GC marks them metadata) for as long as entries name it.
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    // The set may begin a checkpoint of its own (the journal since the loaded one is long):
    // the newest is then the one to damage, once it is recorded.
    rig.settle();
    let set = rig.engine.set().unwrap();
    let chains = set.checkpoint_chains();
    assert_eq!(set.open_report().checkpoints_kept, 2, "{:?}", set.open_report());
    assert_eq!(chains.len(), 2);
    for b in chains.iter().flatten() {
        assert_eq!(set.allocator().bucket(0, *b).unwrap().mark, GcMark::Metadata, "checkpoint bucket {b}");
    }
    assert!(set.open_report().replayed_keys > 0, "{:?}", set.open_report());
    let newest_head = set.metadata_pointers().0.unwrap();
    rig.crash(CrashMode::DropUnflushed);
    // Damage a data block of the newest checkpoint's head.
    flip(&paths.cache, newest_head.bucket * 16 * 512 + 4096 + 100);
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let r = rig.engine.set().unwrap().open_report().clone();
    assert!(r.checkpoint_fallback, "{r:?}");
    assert!(r.checkpoint_seq < newest_head.seq);
    assert!(r.replayed_keys > 0, "a longer replay: {r:?}");
    for &(b, v) in &written {
        assert_eq!(rig.read(0, b, 1).unwrap(), data(0, b, v), "block {b}");
    }
    rig.crash(CrashMode::DropUnflushed);
    // The recovered state was checkpointed again: no fallback needed next time.
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    assert!(!rig.engine.set().unwrap().open_report().checkpoint_fallback);
    for &(b, v) in &written {
        assert_eq!(rig.read(0, b, 1).unwrap(), data(0, b, v), "block {b}");
    }
    rig.close().unwrap();
}

#[test]
fn no_readable_checkpoint_refuses_to_open() {
    let paths = format("nockpt", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    two_checkpoints(&mut rig);
    rig.crash(CrashMode::DropUnflushed);
    let (found, _) = journal(&paths);
    let mut heads: Vec<u64> = found.iter().filter_map(|e| e.jset.checkpoint.map(|c| c.bucket)).collect();
    heads.sort_unstable();
    heads.dedup();
    for b in heads {
        flip(&paths.cache, b * 16 * 512 + 16);
    }
    let e = Rig::open(&paths, &wb()).err().expect("opened without a checkpoint");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.message().contains("index checkpoint"), "{e}");
}

#[test]
fn a_bad_uuid_table_or_prio_chain_refuses_to_open_naming_it() {
    for what in ["UUID table", "prio chain"] {
        let paths = format(&format!("badmeta-{}", what.len()), Geo::small());
        let mut rig = Rig::open(&paths, &wb()).unwrap();
        rig.write(0, 0, &data(0, 0, 1), false).unwrap();
        rig.flush(0).unwrap();
        rig.crash(CrashMode::DropUnflushed);
        // What the newest durable entry names.
        let (found, _) = journal(&paths);
        let head = &found.last().unwrap().jset;
        let bucket = if what == "UUID table" { head.uuid_bucket.unwrap().bucket } else { head.prio_bucket[0] };
        flip(&paths.cache, bucket * 16 * 512 + 12); // in its magic
        let e = Rig::open(&paths, &wb()).err().unwrap_or_else(|| panic!("{what}: opened"));
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.message().contains(what), "{what}: {e}");
    }
}

#[test]
fn cached_devices_keep_their_slots_and_data_across_restarts() {
    let paths = format("slots", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let inodes: Vec<u32> = rig.handles.iter().map(|&h| rig.engine.inode(h).unwrap()).collect();
    rig.write(1, 5, &data(1, 5, 7), false).unwrap();
    let uuids = rig.engine.set().unwrap().uuids().to_vec();
    assert_eq!(uuids.len(), 2);
    rig.close().unwrap();
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    // The same entries (`last_reg` is the attach's time, which may have moved on a second).
    let ids = |u: &[ubcache_core::uuids::UuidEntry]| u.iter().map(|e| (e.uuid, e.first_reg)).collect::<Vec<_>>();
    assert_eq!(ids(rig.engine.set().unwrap().uuids()), ids(&uuids));
    let again: Vec<u32> = rig.handles.iter().map(|&h| rig.engine.inode(h).unwrap()).collect();
    assert_eq!(again, inodes, "each device gets its slot back");
    assert_eq!(rig.read(1, 5, 1).unwrap(), data(1, 5, 7));
    assert!(rig.engine.set().unwrap().stats().hit_sectors >= 8, "served from the cache");
    rig.close().unwrap();
}

#[test]
fn keys_wait_for_the_journal_delay_or_a_flush() {
    // A journal long enough that no checkpoint adds an entry of its own.
    let paths = format("batch", Geo { journal_buckets: Some(64), ..Geo::small() });
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    rig.settle();
    let s0 = rig.engine.set().unwrap().stats();
    for b in 0..6 {
        rig.write(0, b, &data(0, b, 1), false).unwrap();
    }
    rig.settle();
    let s1 = rig.engine.set().unwrap().stats();
    let mid = s1.journal_entries;
    // Keys wait (the delay is long and nobody flushed): only prio writes record entries.
    assert!(
        mid - s0.journal_entries <= s1.prio_writes - s0.prio_writes + s1.checkpoints - s0.checkpoints,
        "entries {s0:?} -> {s1:?}"
    );
    rig.flush(0).unwrap();
    assert_eq!(rig.engine.set().unwrap().stats().journal_entries, mid + 1, "one entry for the batch");
    rig.close().unwrap();
    // With a short delay the entry is written without a flush.
    let o = RigOptions { set: CacheSetOptions { journal_delay_ms: 1, ..Default::default() }, ..wb() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    let before = rig.engine.set().unwrap().stats().journal_entries;
    rig.write(0, 9, &data(0, 9, 1), false).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while rig.engine.set().unwrap().stats().journal_entries == before {
        assert!(Instant::now() < until, "the delay never wrote the entry");
        rig.poll(Duration::from_millis(1));
    }
    rig.close().unwrap();
}

/// Rule: a key enters the index when its data write completes, not when it is sent.
#[test]
fn a_key_enters_the_index_only_when_its_data_write_completed() {
    let paths = format("keylate", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(80), ..Default::default() }));
    let h = DevId(rig.handles[0]);
    rig.submit(IoRequest::write(h, 0, AlignedBuf::from_slice(&data(0, 0, 5)), 77));
    rig.poll(Duration::from_millis(20));
    assert!(rig.done.is_empty());
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 0, "no key before the data is written");
    rig.drain();
    assert!(rig.done.iter().any(|c| c.user_data == 77 && c.result.is_ok()));
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 8, "the key is in once the write completed");
    rig.ctl.set_latency(None);
    rig.close().unwrap();
}

/// Rule: a hit read keeps its bucket from reuse until it completes.
#[test]
fn a_hit_read_pins_its_bucket_until_it_completes() {
    let paths = format("pin", Geo::small());
    let mut rig = Rig::open(&paths, &RigOptions { modes: vec![CacheMode::Writethrough], ..wb() }).unwrap();
    rig.write(0, 3, &data(0, 3, 9), false).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let key = rig.engine.set_mut().unwrap().keys().into_iter().find(|k| k.inode == inode && k.start == 24).unwrap();
    let bucket = key.ptrs()[0].offset() / 16;
    let pins = rig.engine.set().unwrap().allocator().bucket(0, bucket).unwrap().pin;
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(60), ..Default::default() }));
    let h = DevId(rig.handles[0]);
    rig.submit(IoRequest::read(h, 3 * BLOCK, AlignedBuf::new(4096), 90));
    rig.poll(Duration::from_millis(10));
    let during = rig.engine.set().unwrap().allocator().bucket(0, bucket).unwrap().pin;
    assert_eq!(during, pins + 1, "the read holds a pin on bucket {bucket}");
    let c = rig.run(IoRequest::flush(h, 91));
    c.result.unwrap();
    rig.ctl.set_latency(None);
    rig.drain();
    let r = rig.done.iter().position(|c| c.user_data == 90).map(|i| rig.done.remove(i)).unwrap();
    assert_eq!(&r.into_buf().unwrap()[..], &data(0, 3, 9)[..]);
    assert_eq!(rig.engine.set().unwrap().allocator().bucket(0, bucket).unwrap().pin, pins, "unpinned after");
    rig.close().unwrap();
}

/// Rule: a metadata write error takes the set out of service; nothing flushed is lost.
#[test]
fn a_journal_write_error_takes_the_set_out_of_service() {
    let paths = format("metaerr", Geo::small());
    let o = RigOptions { modes: vec![CacheMode::Writeback, CacheMode::Writethrough], ..wb() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    rig.write(0, 1, &data(0, 1, 1), false).unwrap();
    rig.flush(0).unwrap();
    rig.write(1, 2, &data(1, 2, 2), false).unwrap(); // writethrough: clean in the cache
    rig.flush(1).unwrap();
    let sb = rig.engine.set().unwrap().superblock().clone();
    let (first, last) = (sb.journal_buckets[0] * 16 * 512, (sb.journal_buckets.last().unwrap() + 1) * 16 * 512);
    rig.ctl.add_rule(FaultRule::eio().op(OpKind::Write).range(first, last));
    // The next journal write fails (this write's key or a prio write's record, whichever
    // comes first): the flush must fail, the write may have.
    let _ = rig.write(0, 3, &data(0, 3, 3), false);
    let e = rig.flush(0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(matches!(rig.state(), SetState::Failed(_)), "{:?}", rig.state());
    // Writes are refused; clean data is read from the backing device, dirty from the cache.
    assert!(rig.write(0, 4, &data(0, 4, 4), false).is_err());
    assert_eq!(rig.read(1, 2, 1).unwrap(), data(1, 2, 2));
    assert_eq!(rig.read(0, 1, 1).unwrap(), data(0, 1, 1));
    rig.ctl.clear_rules();
    rig.crash(CrashMode::DropUnflushed);
    let mut rig = Rig::open(&paths, &o).unwrap();
    assert_eq!(rig.read(0, 1, 1).unwrap(), data(0, 1, 1), "flushed before the failure");
    assert_eq!(rig.read(1, 2, 1).unwrap(), data(1, 2, 2));
    rig.close().unwrap();
}

/// Rule: opening a set ends with a durable prio write (the first GC's gen bumps on disk).
#[test]
fn opening_ends_with_a_durable_prio_write() {
    let paths = format("openprio", Geo::small());
    let rig = Rig::open(&paths, &wb()).unwrap();
    rig.close().unwrap();
    for _ in 0..3 {
        let rig = Rig::open(&paths, &wb()).unwrap();
        let set = rig.engine.set().unwrap();
        let read = set.open_report().prio_seq;
        let now = set.allocator().prio_seq(0).unwrap();
        assert!(now > read, "a prio write was begun at open");
        assert!(set.stats().prio_writes >= 1);
        // Crashed right after opening: the next open reads the chain the startup wrote.
        rig.crash(CrashMode::DropUnflushed);
        let again = Rig::open(&paths, &wb()).unwrap();
        assert!(again.engine.set().unwrap().open_report().prio_seq >= now, "the startup's prio write was durable");
        again.crash(CrashMode::DropUnflushed);
    }
}

/// Rule: a checkpoint is begun before gens could move far within what replay reads.
#[test]
fn prio_writes_never_run_far_ahead_of_the_oldest_checkpoint() {
    // A long journal (the quarter-full trigger rarely fires) over a small cache (many prio
    // writes): only the prio-write distance forces checkpoints here.
    let geo = Geo { nbuckets: 520, bucket_sectors: 16, backing_blocks: vec![1024], journal_buckets: Some(200) };
    let paths = format("priodist", geo);
    // Writethrough: every write takes new space (writeback would overwrite its dirty data in place).
    let mut rig = Rig::open(&paths, &RigOptions { modes: vec![CacheMode::Writethrough], ..wb() }).unwrap();
    let mut max = 0;
    for i in 0..6000u64 {
        let b = i % 512;
        rig.write(0, b, &data(0, b, i), false).unwrap();
        max = max.max(rig.engine.set().unwrap().prio_distance());
    }
    let s = rig.engine.set().unwrap().stats();
    assert!(s.prio_writes > 80, "{s:?}");
    assert!(s.prio_distance_checkpoints > 0, "checkpoints were begun for the distance: {s:?}");
    assert!(max <= 56, "prio writes since the oldest checkpoint: {max}");
    rig.close().unwrap();
}

#[test]
fn fills_of_disjoint_misses_in_flight_together_both_land() {
    let paths = format("fills", Geo::small());
    let mut rig = Rig::open(&paths, &RigOptions { modes: vec![CacheMode::Writethrough], ..wb() }).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let h = DevId(rig.handles[0]);
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(5), ..Default::default() }));
    for i in 0..8u64 {
        rig.submit(IoRequest::read(h, i * 16 * BLOCK, AlignedBuf::new(4 * BLOCK as usize), 500 + i));
    }
    rig.drain();
    rig.ctl.set_latency(None);
    let s = rig.engine.set().unwrap().stats();
    assert_eq!(s.cache_miss_collisions, 0, "{s:?}");
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 8 * 32, "every miss filled: {s:?}");
    rig.close().unwrap();
}

#[test]
fn a_fua_write_in_writethrough_is_cached_too() {
    let paths = format("fuawt", Geo::small());
    let mut rig = Rig::open(&paths, &RigOptions { modes: vec![CacheMode::Writethrough], ..wb() }).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.write(0, 7, &data(0, 7, 3), true).unwrap();
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 8);
    assert_eq!(rig.read(0, 7, 1).unwrap(), data(0, 7, 3));
    assert!(rig.engine.set().unwrap().stats().hit_sectors >= 8);
    rig.close().unwrap();
}

/// Rule: no completion is ever dropped. Requests that finish while the engine works for a
/// call that returns no completions (an attach reaps the ring) come back from the next call
/// that does, and the driver is told to make one.
#[test]
fn requests_finishing_during_an_attach_are_handed_out_later() {
    let paths = format("undelivered", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    rig.engine.detach(rig.handles[1]).unwrap();
    let h = DevId(rig.handles[0]);
    // Else a fast device finishes a write during the next one's submit, which reaps it.
    slow(&rig);
    let tags: Vec<u64> = (0..8).map(|i| 500 + i).collect();
    for (i, &t) in tags.iter().enumerate() {
        let mut out = Vec::new();
        rig.engine
            .submit([IoRequest::write(h, i as u64 * BLOCK, AlignedBuf::from_slice(&data(0, i as u64, 1)), t)], &mut out)
            .unwrap();
        rig.done.extend(out);
    }
    assert!(rig.done.is_empty(), "no write finished during a submit: {:?}", rig.done);
    // Let the writes finish on the device, then attach while nobody has reaped them.
    std::thread::sleep(Duration::from_millis(100));
    let cfg = CachedDevConfig {
        uuid: [2; 16],
        label: [0; 32],
        device: std::sync::Arc::new(open_retrying(&paths.backing[1]).unwrap()),
        data_offset: DATA_OFFSET,
        mode: CacheMode::Writeback,
        writeback: Default::default(),
        bypass: Default::default(),
        no_superblock: false,
    };
    let tag = rig.tag();
    rig.handles[1] = rig.engine.attach(tag, cfg).unwrap();
    assert!(rig.engine.has_undelivered(), "the attach reaped the writes (the scenario under test)");
    let until = Instant::now() + Duration::from_secs(10);
    while !tags.iter().all(|t| rig.done.iter().any(|c| c.user_data == *t)) {
        assert!(
            Instant::now() < until,
            "writes never came back: {:?}",
            rig.done.iter().map(|c| c.user_data).collect::<Vec<_>>()
        );
        rig.poll(Duration::from_millis(10));
    }
    assert!(!rig.engine.has_undelivered());
    for c in rig.done.iter().filter(|c| tags.contains(&c.user_data)) {
        assert!(c.result.is_ok(), "{c:?}");
    }
    rig.drain();
    rig.close().unwrap();
}

/// Rule: a FUA write is durable together with everything recorded before it. Here a
/// discard dropped a dirty key (in an entry not yet written) and a FUA write in mode
/// `none` went to the backing device only: without waiting for the discard's entry, replay
/// brings the old dirty key back over the FUA data.
#[test]
fn a_fua_write_around_waits_for_the_discard_before_it() {
    let paths = format("fuadiscard", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    rig.write(0, 7, &data(0, 7, 1), false).unwrap();
    rig.flush(0).unwrap();
    let h = DevId(rig.handles[0]);
    let tag = rig.tag();
    assert!(rig.run(IoRequest::discard(h, 7 * BLOCK, BLOCK, tag)).result.is_ok());
    rig.engine.set_cache_mode(rig.handles[0], CacheMode::None).unwrap();
    rig.write(0, 7, &data(0, 7, 2), true).unwrap();
    rig.crash(CrashMode::DropUnflushed);
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    assert_eq!(rig.read(0, 7, 1).unwrap(), data(0, 7, 2), "the FUA write was lost to a replayed key");
    rig.close().unwrap();
}

/// Rule: no completion is ever dropped, at a close either: a write waiting behind an
/// overlapping one is refused by the close, and comes back (`Closed`) from the next call
/// that returns completions, as does the write it waited for (`Ok`).
#[test]
fn requests_finishing_during_a_close_are_handed_out_later() {
    let paths = format("undelivered-close", Geo::small());
    let mut rig = Rig::open(&paths, &wb()).unwrap();
    let h = DevId(rig.handles[0]);
    // The first write must still be in flight when the close runs.
    slow(&rig);
    let (first, second) = (700, 701);
    let mut out = Vec::new();
    for (t, v) in [(first, 1), (second, 2)] {
        rig.engine.submit([IoRequest::write(h, 0, AlignedBuf::from_slice(&data(0, 0, v)), t)], &mut out).unwrap();
    }
    assert!(out.is_empty(), "{out:?}");
    let tag = rig.tag();
    rig.engine.close(tag).unwrap();
    assert!(rig.engine.has_undelivered(), "the close refused the waiting write (the scenario under test)");
    let until = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while !events.iter().any(|e: &(u64, _)| e.0 == tag) {
        assert!(Instant::now() < until, "the close never finished");
        rig.poll(Duration::from_millis(10));
        rig.engine.take_events(&mut events);
    }
    let result = |t: u64| rig.done.iter().find(|c| c.user_data == t).map(|c| c.result.clone());
    assert!(matches!(result(first), Some(Ok(_))), "{:?}", result(first));
    assert!(matches!(result(second), Some(Err(e)) if e.kind() == ErrorKind::Closed), "{:?}", result(second));
}

/// Fills copy the data into recycled buffers (kept to spare a fresh mapping per fill): each
/// fill caches exactly its own blocks, whatever its buffer held before.
#[test]
fn a_fill_into_a_reused_copy_buffer_caches_its_own_data() {
    let paths = format("fillreuse", Geo::small());
    let mut rig = Rig::open(&paths, &RigOptions { modes: vec![CacheMode::Writethrough], ..wb() }).unwrap();
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let expect = |start: u64, n: u64| (start..start + n).flat_map(|b| data(0, b, 0)).collect::<Vec<u8>>();
    assert!(rig.read(0, 0, 64).unwrap() == expect(0, 64), "blocks 0..64");
    rig.drain();
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 64 * 8, "the first fill landed");
    assert!(rig.read(0, 200, 2).unwrap() == expect(200, 2), "blocks 200..202");
    rig.drain();
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 66 * 8, "the second fill landed");
    let hits = rig.engine.set().unwrap().stats().hit_sectors;
    assert!(rig.read(0, 200, 2).unwrap() == expect(200, 2), "the second fill cached its own blocks");
    assert!(rig.read(0, 0, 64).unwrap() == expect(0, 64), "blocks 0..64");
    assert_eq!(rig.engine.set().unwrap().stats().hit_sectors - hits, 66 * 8, "both read back from the cache");
    rig.close().unwrap();
}

/// Rule: cache-device I/O errors take the set out of service once they reach
/// `io_error_limit`; below it, a clean hit whose read fails is served from the backing
/// device and the set runs on. With `io_error_halflife`, old errors fade.
#[test]
fn cache_io_errors_past_the_limit_take_the_set_out_of_service() {
    let paths = format("ioerr", Geo::small());
    let set = CacheSetOptions { io_error_limit: 3, ..wb().set };
    let o = RigOptions { modes: vec![CacheMode::Writethrough], set, ..wb() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    for b in 0..8 {
        rig.write(0, b, &data(0, b, 1), false).unwrap(); // writethrough: clean in the cache
    }
    rig.flush(0).unwrap();
    // The cache device is the engine's first device.
    let cache_reads = || FaultRule::eio().op(OpKind::Read).dev(DevId(0));
    rig.ctl.add_rule(cache_reads().times(2));
    for b in 0..2 {
        assert_eq!(rig.read(0, b, 1).unwrap(), data(0, b, 1), "served from the backing device");
    }
    assert_eq!(rig.ctl.injected(), 2);
    let stats = rig.engine.set().unwrap().stats();
    assert_eq!((stats.io_errors_milli, stats.reread_from_backing), (2000, 2));
    assert!(matches!(rig.state(), SetState::Running), "{:?}", rig.state());
    rig.ctl.add_rule(cache_reads().times(1));
    assert_eq!(rig.read(0, 2, 1).unwrap(), data(0, 2, 1));
    match rig.state() {
        SetState::Failed(e) => assert!(e.message().contains("too many I/O errors on the cache device (3"), "{e}"),
        s => panic!("still {s:?} after 3 errors"),
    }
    // Out of service: writes are refused, clean data comes from the backing device.
    assert!(rig.write(0, 9, &data(0, 9, 2), false).is_err());
    assert_eq!(rig.read(0, 5, 1).unwrap(), data(0, 5, 1));
    rig.crash(CrashMode::DropUnflushed);

    // Errors that fade: every I/O takes 1/128 off the count (halflife 88 I/Os).
    let paths = format("ioerr-decay", Geo::small());
    let set = CacheSetOptions { io_error_limit: 2, io_error_halflife: 88, ..wb().set };
    let o = RigOptions { modes: vec![CacheMode::Writethrough], set, ..wb() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    for b in 0..8 {
        rig.write(0, b, &data(0, b, 1), false).unwrap();
    }
    rig.ctl.add_rule(cache_reads().times(1));
    assert_eq!(rig.read(0, 0, 1).unwrap(), data(0, 0, 1));
    for i in 0..200 {
        assert_eq!(rig.read(0, 1 + i % 7, 1).unwrap(), data(0, 1 + i % 7, 1));
    }
    let milli = rig.engine.set().unwrap().stats().io_errors_milli;
    assert!(milli < 300, "one error after 200 I/Os counts {milli}/1000");
    rig.ctl.add_rule(cache_reads().times(1));
    assert_eq!(rig.read(0, 0, 1).unwrap(), data(0, 0, 1));
    assert!(matches!(rig.state(), SetState::Running), "the first error has faded: {:?}", rig.state());
    rig.close().unwrap();
}

/// Rule: a set out of service reports, per device, the extents only its cache holds (dirty
/// data), and still serves them from the cache while it can read it.
#[test]
fn a_set_out_of_service_reports_its_dirty_extents() {
    let paths = format("lost", Geo::small());
    let set = CacheSetOptions { io_error_limit: 1, ..wb().set };
    let o = RigOptions { set, ..wb() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    for b in [3u64, 4, 5, 10, 20, 21, 22, 23] {
        rig.write(0, b, &data(0, b, 1), false).unwrap();
    }
    rig.flush(0).unwrap();
    let h = rig.handles[0];
    let want = vec![(24, 24), (80, 8), (160, 32)];
    assert_eq!(rig.engine.dirty_extents(h, 100).unwrap(), want);
    assert_eq!(rig.engine.dirty_extents(h, 2).unwrap(), want[..2]);
    // One failed cache write takes the set out of service (limit 1).
    rig.ctl.add_rule(FaultRule::eio().op(OpKind::Write).dev(DevId(0)).times(1));
    assert!(rig.write(0, 40, &data(0, 40, 1), false).is_err());
    assert!(matches!(rig.state(), SetState::Failed(_)), "{:?}", rig.state());
    assert_eq!(rig.engine.dirty_extents(h, 100).unwrap(), want);
    assert_eq!(rig.read(0, 20, 4).unwrap(), (20..24).flat_map(|b| data(0, b, 1)).collect::<Vec<_>>());
    rig.crash(CrashMode::DropUnflushed);
}
