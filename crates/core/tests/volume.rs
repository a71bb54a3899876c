//! Flash-only volumes: thin volumes in the cache alone, in the UUID table, surviving
//! restarts and crashes, with reads, writes, flushes and discards as a cached device has.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, WritebackConfig};
use ubcache_core::io::fault::CrashMode;
use ubcache_core::io::{AlignedBuf, DevId, IoRequest};
use ubcache_core::{ErrorKind, Result};

const UUID: [u8; 16] = [0xf1; 16];

/// 256 buckets of 64 KiB (16 MiB) and one backing device.
fn geo() -> Geo {
    Geo { nbuckets: 256, bucket_sectors: 128, backing_blocks: vec![256], journal_buckets: None }
}

fn opts() -> RigOptions {
    RigOptions {
        modes: vec![CacheMode::Writethrough],
        set: CacheSetOptions { journal_delay_ms: 2, ..Default::default() },
        ..Default::default()
    }
}

/// Waits for control operation `tag`; its result.
fn event(rig: &mut Rig, tag: u64) -> Result<u32> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    loop {
        rig.engine.take_events(&mut events);
        if let Some((_, r)) = events.iter().find(|e| e.0 == tag) {
            return r.clone();
        }
        assert!(Instant::now() < until, "no event {tag} in 10 s");
        rig.poll(Duration::from_millis(2));
    }
}

fn create(rig: &mut Rig, uuid: [u8; 16], sectors: u64) -> Result<u32> {
    let tag = rig.tag();
    let h = rig.engine.create_volume(tag, uuid, [0; 32], sectors)?;
    event(rig, tag).map(|_| h)
}

fn attach(rig: &mut Rig, uuid: [u8; 16]) -> Result<u32> {
    let tag = rig.tag();
    let h = rig.engine.attach_volume(tag, uuid)?;
    event(rig, tag).map(|_| h)
}

fn write(rig: &mut Rig, h: u32, block: u64, data: &[u8]) -> Result<()> {
    let tag = rig.tag();
    rig.run(IoRequest::write(DevId(h), block * BLOCK, AlignedBuf::from_slice(data), tag)).result.map(|_| ())
}

fn read(rig: &mut Rig, h: u32, block: u64, blocks: u64) -> Result<Vec<u8>> {
    let tag = rig.tag();
    let c = rig.run(IoRequest::read(DevId(h), block * BLOCK, AlignedBuf::new((blocks * BLOCK) as usize), tag));
    c.result.clone()?;
    Ok(c.into_buf().unwrap().to_vec())
}

fn flush(rig: &mut Rig, h: u32) -> Result<()> {
    let tag = rig.tag();
    rig.run(IoRequest::flush(DevId(h), tag)).result.map(|_| ())
}

fn discard(rig: &mut Rig, h: u32, block: u64, blocks: u64) -> Result<()> {
    let tag = rig.tag();
    rig.run(IoRequest::discard(DevId(h), block * BLOCK, blocks * BLOCK, tag)).result.map(|_| ())
}

#[test]
fn a_volume_keeps_its_data_across_restarts_and_reads_zeros_where_unwritten() {
    let paths = format("vol-basic", geo());
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    // 1 GiB: thin, far bigger than the cache.
    let h = create(&mut rig, UUID, 2 << 20).unwrap();
    let vols = rig.engine.set().unwrap().volumes();
    assert_eq!(vols.len(), 1);
    assert!(vols[0].1.flash_only() && vols[0].1.sectors == 2 << 20 && vols[0].1.uuid == UUID);
    assert_eq!(read(&mut rig, h, 100, 2).unwrap(), vec![0; 2 * BLOCK as usize], "never written: zeros");
    for b in [0u64, 1, 7, 100_000, 262_143] {
        write(&mut rig, h, b, &block_content(9, b, 1)).unwrap();
    }
    write(&mut rig, h, 7, &block_content(9, 7, 2)).unwrap();
    assert_eq!(read(&mut rig, h, 7, 1).unwrap(), block_content(9, 7, 2));
    assert_eq!(read(&mut rig, h, 0, 2).unwrap(), [block_content(9, 0, 1), block_content(9, 1, 1)].concat());
    discard(&mut rig, h, 1, 1).unwrap();
    assert_eq!(read(&mut rig, h, 1, 1).unwrap(), vec![0; BLOCK as usize], "discarded: zeros");
    flush(&mut rig, h).unwrap();
    let inode = vols[0].0;
    let set = rig.engine.set().unwrap();
    assert_eq!(set.dirty_sectors(inode), 4 * BLOCK / 512, "a volume's data is dirty, and stays so");
    // Nothing went to the backing device of the set's cached device.
    assert_eq!(
        std::fs::read(&paths.backing[0]).unwrap()[DATA_OFFSET as usize..][..BLOCK as usize],
        block_content(0, 0, 0)
    );
    // The cached device beside it works as before.
    rig.write(0, 3, &block_content(0, 3, 1), false).unwrap();
    assert_eq!(rig.read(0, 3, 1).unwrap(), block_content(0, 3, 1));
    rig.close().unwrap();

    let mut rig = Rig::open(&paths, &opts()).unwrap();
    let h = attach(&mut rig, UUID).unwrap();
    for (b, v) in [(0u64, 1u64), (7, 2), (100_000, 1), (262_143, 1)] {
        assert_eq!(read(&mut rig, h, b, 1).unwrap(), block_content(9, b, v), "block {b} after a restart");
    }
    assert_eq!(read(&mut rig, h, 1, 1).unwrap(), vec![0; BLOCK as usize]);
    assert_eq!(rig.read(0, 3, 1).unwrap(), block_content(0, 3, 1));
    // A second volume takes another slot.
    let h2 = create(&mut rig, [0xf2; 16], 1 << 16).unwrap();
    write(&mut rig, h2, 0, &block_content(8, 0, 1)).unwrap();
    assert_eq!(read(&mut rig, h, 0, 1).unwrap(), block_content(9, 0, 1));
    assert_eq!(rig.engine.set().unwrap().volumes().len(), 2);
    // Letting go of a handle leaves the volume in the set.
    rig.engine.detach(h2).unwrap();
    let h2 = attach(&mut rig, [0xf2; 16]).unwrap();
    assert_eq!(read(&mut rig, h2, 0, 1).unwrap(), block_content(8, 0, 1));
}

#[test]
fn flushed_writes_of_a_volume_survive_a_crash() {
    let paths = format("vol-crash", geo());
    let o = RigOptions { volatile: true, ..opts() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    let h = create(&mut rig, UUID, 1 << 16).unwrap();
    for b in 0..32 {
        write(&mut rig, h, b, &block_content(9, b, 1)).unwrap();
    }
    flush(&mut rig, h).unwrap();
    // Unflushed: may or may not survive, but never as anything else.
    for b in 0..8 {
        write(&mut rig, h, b, &block_content(9, b, 2)).unwrap();
    }
    rig.crash(CrashMode::TearUnflushed { seed: 5 });
    let mut rig = Rig::open(&paths, &o).unwrap();
    let h = attach(&mut rig, UUID).unwrap();
    for b in 0..32 {
        let got = read(&mut rig, h, b, 1).unwrap();
        if b < 8 {
            for (s, sector) in got.chunks(512).enumerate() {
                let old = &block_content(9, b, 1)[s * 512..][..512];
                let new = &block_content(9, b, 2)[s * 512..][..512];
                assert!(sector == old || sector == new, "block {b} sector {s}: neither version");
            }
        } else {
            assert_eq!(got, block_content(9, b, 1), "block {b}");
        }
    }
}

#[test]
fn bad_requests_of_volumes_get_clear_errors() {
    let paths = format("vol-bad", geo());
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    assert_eq!(create(&mut rig, UUID, 0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(create(&mut rig, UUID, 3).unwrap_err().kind(), ErrorKind::InvalidArgument, "not whole blocks");
    assert_eq!(create(&mut rig, [0; 16], 64).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(attach(&mut rig, UUID).unwrap_err().kind(), ErrorKind::NotFound);
    let h = create(&mut rig, UUID, 1 << 10).unwrap();
    let e = create(&mut rig, UUID, 1 << 10).unwrap_err();
    assert!(e.kind() == ErrorKind::InvalidArgument && e.message().contains("already"), "{e}");
    assert_eq!(attach(&mut rig, UUID).unwrap_err().kind(), ErrorKind::Busy, "attached already");
    assert_eq!(read(&mut rig, h, 128, 1).unwrap_err().kind(), ErrorKind::OutOfRange);
    let tag = rig.tag();
    let e = rig.run(IoRequest::write(DevId(h), 512, AlignedBuf::new(4096), tag)).result.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misaligned);
    let inode = rig.engine.inode(h).unwrap();
    let set = rig.engine.set_mut().unwrap();
    assert!(set.set_cache_mode(inode, CacheMode::Writethrough).unwrap_err().message().contains("flash-only"));
    assert!(set.set_writeback_config(inode, WritebackConfig::default()).is_err());
    let tag = rig.tag();
    assert_eq!(rig.engine.detach_begin(tag, h).unwrap_err().kind(), ErrorKind::InvalidArgument);
    // A backing device cannot take a volume's UUID.
    let e = create(&mut rig, [1; 16], 64).unwrap_err();
    assert!(e.message().contains("already"), "the cached device's UUID: {e}");
}

#[test]
fn a_volume_that_fills_the_cache_gets_no_space_not_a_hang() {
    let paths = format("vol-full", geo());
    let mut rig = Rig::open(&paths, &opts()).unwrap();
    // 64 MiB of volume over a 16 MiB cache.
    let h = create(&mut rig, UUID, 64 << 11).unwrap();
    let mut err = None;
    for b in 0..(16 << 8) {
        if let Err(e) = write(&mut rig, h, b, &block_content(9, b, 1)) {
            err = Some((b, e));
            break;
        }
    }
    let (b, e) = err.expect("the cache cannot hold it all");
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(b > 2048, "only {b} blocks written before NoSpace");
    // What was written reads back; overwriting needs space too, reading does not.
    assert_eq!(read(&mut rig, h, 0, 1).unwrap(), block_content(9, 0, 1));
    assert_eq!(read(&mut rig, h, b - 1, 1).unwrap(), block_content(9, b - 1, 1));
    // Discarding makes room again.
    discard(&mut rig, h, 0, 1024).unwrap();
    rig.engine.set_mut().unwrap().trigger_gc();
    rig.settle();
    write(&mut rig, h, b, &block_content(9, b, 1)).unwrap();
}
