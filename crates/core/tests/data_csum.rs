//! Data checksums (`data_csum`): bits flipped in the cache device never come back as data.
//! Clean data is read again from the backing device (and dropped from the cache), dirty
//! data fails the read, writeback refuses to copy it, and writes in place drop the
//! checksum they invalidate before they land.

mod set_common;

use std::time::{Duration, Instant};

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, WritebackConfig};
use ubcache_core::io::{AlignedBuf, DevId, IoRequest};
use ubcache_core::ErrorKind;

/// 256 buckets of 64 KiB; device 0 in writeback (writeback paused), device 1 in writethrough.
fn geo() -> Geo {
    Geo { nbuckets: 256, bucket_sectors: 128, backing_blocks: vec![1024, 1024], journal_buckets: None }
}

fn opts(csum: bool) -> RigOptions {
    RigOptions {
        modes: vec![CacheMode::Writeback, CacheMode::Writethrough],
        set: CacheSetOptions { journal_delay_ms: 2, data_csum: csum, ..Default::default() },
        writeback: Some(WritebackConfig { running: false, ..Default::default() }),
        ..Default::default()
    }
}

/// Byte offset on the cache device of block `b` of device `dev`, and whether it is dirty.
fn cached_at(rig: &mut Rig, dev: usize, b: u64) -> (u64, bool, Option<u64>) {
    let inode = rig.engine.inode(rig.handles[dev]).unwrap();
    let s = b * BLOCK / 512;
    let k = rig.engine.set_mut().unwrap().keys().into_iter().find(|k| k.inode == inode && k.start <= s && s < k.end());
    let k = k.unwrap_or_else(|| panic!("block {b} of device {dev} is not cached"));
    ((k.ptrs()[0].offset() + s - k.start) * 512, k.dirty, k.crc)
}

fn csum_errors(rig: &Rig) -> u64 {
    rig.engine.set().unwrap().stats().csum_errors
}

#[test]
fn flipped_bits_are_never_read_back_as_data() {
    let paths = format("csum-flip", geo());
    let mut rig = Rig::open(&paths, &opts(true)).unwrap();
    for dev in 0..2 {
        for b in 0..8 {
            rig.write(dev, b, &block_content(dev as u32, b, 1), false).unwrap();
        }
    }
    rig.flush(0).unwrap();
    rig.flush(1).unwrap();
    let (at_dirty, dirty, crc) = cached_at(&mut rig, 0, 3);
    assert!(dirty && crc.is_some(), "a dirty extent with its checksum");
    let (at_clean, dirty, crc) = cached_at(&mut rig, 1, 5);
    assert!(!dirty && crc.is_some(), "a clean extent with its checksum");
    flip(&paths.cache, at_dirty + 100);
    flip(&paths.cache, at_clean + 4000);
    // Clean: served from the backing device, and no longer cached.
    assert_eq!(rig.read(1, 5, 1).unwrap(), block_content(1, 5, 1));
    assert_eq!(csum_errors(&rig), 1);
    let inode = rig.engine.inode(rig.handles[1]).unwrap();
    assert_eq!(rig.engine.set().unwrap().cached_sectors(inode), 7 * BLOCK / 512, "the bad extent was dropped");
    assert_eq!(rig.read(1, 5, 1).unwrap(), block_content(1, 5, 1));
    // Dirty: the cache held the only copy; the read fails, over and over.
    for _ in 0..2 {
        let e = rig.read(0, 3, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.message().contains("checksum"), "{e}");
    }
    // A read of several blocks that covers it fails too; its neighbours alone read fine.
    assert!(rig.read(0, 2, 3).is_err());
    assert_eq!(rig.read(0, 2, 1).unwrap(), block_content(0, 2, 1));
    assert_eq!(rig.read(0, 4, 1).unwrap(), block_content(0, 4, 1));
    // Writeback does not copy it to the backing device: it stays dirty.
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    let full = WritebackConfig { percent: 0, delay: Duration::ZERO, ..Default::default() };
    rig.engine.set_mut().unwrap().set_writeback_config(inode, full).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while rig.engine.set().unwrap().dirty_sectors(inode) > BLOCK / 512 {
        assert!(Instant::now() < until, "writeback of the good blocks did not finish");
        rig.poll(Duration::from_millis(5));
    }
    for _ in 0..20 {
        rig.poll(Duration::from_millis(5));
    }
    assert_eq!(rig.engine.set().unwrap().dirty_sectors(inode), BLOCK / 512, "the bad block stays dirty");
    let data = std::fs::read(&paths.backing[0]).unwrap();
    let at = (DATA_OFFSET + 3 * BLOCK) as usize;
    assert_eq!(&data[at..at + BLOCK as usize], &block_content(0, 3, 0)[..], "nothing bad reached the backing device");
    assert!(rig.engine.set().unwrap().stats().writeback_errors > 0);
    // A new write over it replaces it.
    rig.write(0, 3, &block_content(0, 3, 2), false).unwrap();
    assert_eq!(rig.read(0, 3, 1).unwrap(), block_content(0, 3, 2));
}

#[test]
fn without_checksums_the_same_flip_is_read_back() {
    // What the checksums guard against: the same damage, unchecked, reads as data.
    let paths = format("csum-off", geo());
    let mut rig = Rig::open(&paths, &opts(false)).unwrap();
    rig.write(1, 5, &block_content(1, 5, 1), false).unwrap();
    rig.flush(1).unwrap();
    let (at, _, crc) = cached_at(&mut rig, 1, 5);
    assert_eq!(crc, None);
    flip(&paths.cache, at + 4000);
    assert_ne!(rig.read(1, 5, 1).unwrap(), block_content(1, 5, 1));
}

#[test]
fn a_read_of_part_of_an_extent_checks_the_whole_extent() {
    let paths = format("csum-part", geo());
    let mut rig = Rig::open(&paths, &opts(true)).unwrap();
    // One 64 KiB write: one extent of 16 blocks.
    let data: Vec<u8> = (0..16).flat_map(|b| block_content(1, 16 + b, 1)).collect();
    rig.write(1, 16, &data, false).unwrap();
    let (at, _, crc) = cached_at(&mut rig, 1, 16);
    assert!(crc.is_some());
    let hits = rig.engine.set().unwrap().stats().cache_hits;
    assert_eq!(rig.read(1, 20, 2).unwrap(), data[4 * BLOCK as usize..6 * BLOCK as usize]);
    assert_eq!(rig.read(1, 31, 1).unwrap(), data[15 * BLOCK as usize..]);
    assert_eq!(rig.engine.set().unwrap().stats().cache_hits, hits + 2);
    assert_eq!(csum_errors(&rig), 0);
    // Damage in block 25: a read of blocks 20..22 notices, and gets the backing copy.
    flip(&paths.cache, at + 9 * BLOCK + 7);
    assert_eq!(rig.read(1, 20, 2).unwrap(), data[4 * BLOCK as usize..6 * BLOCK as usize]);
    assert_eq!(csum_errors(&rig), 1);
    assert_eq!(rig.read(1, 25, 1).unwrap(), data[9 * BLOCK as usize..10 * BLOCK as usize]);
}

#[test]
fn a_write_in_place_drops_the_checksum_first_and_survives_a_restart() {
    let paths = format("csum-inplace", geo());
    let mut rig = Rig::open(&paths, &opts(true)).unwrap();
    for b in 0..4 {
        rig.write(0, b, &block_content(0, b, 1), false).unwrap();
    }
    rig.flush(0).unwrap();
    let (at, _, crc) = cached_at(&mut rig, 0, 2);
    assert!(crc.is_some());
    // Outside writeback, a write over dirty data goes in place.
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set_mut().unwrap().set_cache_mode(inode, CacheMode::Writethrough).unwrap();
    rig.write(0, 2, &block_content(0, 2, 2), false).unwrap();
    let (at2, dirty, crc) = cached_at(&mut rig, 0, 2);
    assert_eq!((at2, dirty, crc), (at, true, None), "written in place, its checksum dropped");
    assert_eq!(rig.read(0, 2, 1).unwrap(), block_content(0, 2, 2));
    // Several writes at once over one extent with a checksum, each in place.
    let data: Vec<u8> = (0..8).flat_map(|b| block_content(0, 8 + b, 1)).collect();
    rig.engine.set_mut().unwrap().set_cache_mode(inode, CacheMode::Writeback).unwrap();
    rig.write(0, 8, &data, false).unwrap();
    rig.engine.set_mut().unwrap().set_cache_mode(inode, CacheMode::Writethrough).unwrap();
    let mut tags = Vec::new();
    for b in [9u64, 12, 14] {
        let tag = rig.tag();
        let h = rig.handles[0];
        rig.submit(IoRequest::write(DevId(h), b * BLOCK, AlignedBuf::from_slice(&block_content(0, b, 3)), tag));
        tags.push(tag);
    }
    while !tags.is_empty() {
        rig.poll(Duration::from_millis(1));
        for c in std::mem::take(&mut rig.done) {
            c.result.unwrap();
            tags.retain(|&t| t != c.user_data);
        }
    }
    rig.flush(0).unwrap();
    let want = |b: u64| {
        block_content(
            0,
            b,
            if b == 2 {
                2
            } else if [9, 12, 14].contains(&b) {
                3
            } else {
                1
            },
        )
    };
    for b in (0..4).chain(8..16) {
        assert_eq!(rig.read(0, b, 1).unwrap(), want(b), "block {b}");
    }
    assert_eq!(csum_errors(&rig), 0);
    rig.close().unwrap();
    let mut rig = Rig::open(&paths, &opts(true)).unwrap();
    for b in (0..4).chain(8..16) {
        assert_eq!(rig.read(0, b, 1).unwrap(), want(b), "block {b} after a restart");
    }
    assert_eq!(csum_errors(&rig), 0);
}

#[test]
fn read_misses_fill_with_checksums() {
    let paths = format("csum-fill", geo());
    let mut rig = Rig::open(&paths, &opts(true)).unwrap();
    assert_eq!(rig.read(1, 40, 2).unwrap(), [block_content(1, 40, 0), block_content(1, 41, 0)].concat());
    rig.settle();
    let (at, dirty, crc) = cached_at(&mut rig, 1, 41);
    assert!(!dirty && crc.is_some(), "the fill carries a checksum");
    flip(&paths.cache, at + 1);
    assert_eq!(rig.read(1, 41, 1).unwrap(), block_content(1, 41, 0));
    assert_eq!(csum_errors(&rig), 1);
}

#[test]
fn a_write_in_place_over_the_rest_of_a_cut_extent_waits_for_the_cut_to_be_recorded() {
    // The crash campaign found it: a write cuts an extent with a checksum (the rest loses it
    // in memory, the journal still has it whole until the cut's entry is written); a write
    // in place over the rest then changed data the journal's checksum still covered.
    use ubcache_core::io::fault::CrashMode;
    let paths = format("csum-cut", geo());
    let o = RigOptions {
        set: CacheSetOptions { journal_delay_ms: 100_000, data_csum: true, ..Default::default() },
        ..opts(true)
    };
    let mut rig = Rig::open(&paths, &o).unwrap();
    let data: Vec<u8> = (0..8).flat_map(|b| block_content(0, b, 1)).collect();
    rig.write(0, 0, &data, false).unwrap();
    rig.flush(0).unwrap();
    // Writeback: block 0 goes to new space and cuts the extent (its entry not yet written).
    rig.write(0, 0, &block_content(0, 0, 2), false).unwrap();
    // Outside writeback, block 4 goes in place over the rest of the cut extent.
    let inode = rig.engine.inode(rig.handles[0]).unwrap();
    rig.engine.set_mut().unwrap().set_cache_mode(inode, CacheMode::Writethrough).unwrap();
    rig.write(0, 4, &block_content(0, 4, 2), false).unwrap();
    rig.crash(CrashMode::TearUnflushed { seed: 3 });
    let mut rig = Rig::open(&paths, &o).unwrap();
    for b in 0..8 {
        let got = rig.read(0, b, 1).unwrap_or_else(|e| panic!("block {b} after the crash: {e}"));
        for (s, sector) in got.chunks(512).enumerate() {
            let ok = [1, 2].iter().any(|&v| sector == &block_content(0, b, v)[s * 512..][..512]);
            assert!(ok, "block {b} sector {s}: neither version");
        }
    }
    assert_eq!(csum_errors(&rig), 0);
}
