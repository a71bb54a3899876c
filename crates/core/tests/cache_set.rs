//! The cache set engine against a model of the cached devices: random interleavings of
//! reads, writes, FUA writes, flushes, discards and cache-mode switches with many requests
//! in flight, in every mode, with clean restarts between rounds (the cache stays warm).

mod set_common;

use std::time::Duration;

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, SetState};
use ubcache_core::io::{AlignedBuf, DevId, IoRequest};
use ubcache_core::ErrorKind;

fn opts(modes: Vec<CacheMode>, seed: u64) -> RigOptions {
    RigOptions { modes, seed, jitter: Duration::from_micros(200), ..Default::default() }
}

#[test]
fn every_mode_reads_back_what_was_written_across_restarts() {
    let paths = format("modes", Geo::small());
    let mut model = Model::new(&paths.geo);
    for (round, mode) in MODES.iter().enumerate() {
        let o = opts(vec![*mode, MODES[(round + 1) % 4]], round as u64);
        let mut rig = Rig::open(&paths, &o).unwrap();
        assert_eq!(rig.state(), SetState::Running);
        let mut w = Workload::new(round as u64 * 7 + 1);
        w.run(&mut rig, &mut model, 1500);
        check_all(&mut rig, &mut model);
        rig.set_verify();
        rig.close().unwrap();
    }
    // Reopened after a clean close, the cache serves from where it was: hits.
    let mut rig = Rig::open(&paths, &opts(vec![CacheMode::Writeback], 9)).unwrap();
    assert!(rig.engine.set().unwrap().open_report().clean_shutdown);
    check_all(&mut rig, &mut model);
    let s = rig.engine.set().unwrap().stats();
    assert!(s.hit_sectors > 0, "a warm cache serves hits after a restart: {s:?}");
    rig.close().unwrap();
}

#[test]
fn model_interleavings_with_modes_switching_and_deep_queues() {
    for seed in 1..=4u64 {
        let paths = format(&format!("interleave{seed}"), Geo::small());
        let mut model = Model::new(&paths.geo);
        for round in 0..3u64 {
            eprintln!("seed {seed} round {round}");
            let o = opts(
                vec![MODES[(seed + round) as usize % 4], MODES[(seed + round + 2) as usize % 4]],
                seed * 10 + round,
            );
            let mut rig = Rig::open(&paths, &o).unwrap();
            let mut w = Workload::new(seed * 1000 + round);
            w.depth = 8 << (round % 3);
            w.mode_switches = 3;
            w.span = if round == 1 { 1024 } else { 256 };
            w.run(&mut rig, &mut model, 2500);
            check_all(&mut rig, &mut model);
            rig.set_verify();
            rig.close().unwrap();
        }
    }
}

#[test]
fn writing_ten_times_the_cache_keeps_working_and_never_serves_stale_data() {
    // 2 MiB of cache, two devices of 4 MiB: every mode must reclaim to go on.
    let geo = Geo { nbuckets: 600, bucket_sectors: 8 * 2, backing_blocks: vec![1024, 1024], journal_buckets: None };
    for mode in MODES {
        let paths = format(&format!("reclaim-{}", mode.name()), geo.clone());
        let mut model = Model::new(&paths.geo);
        let o = opts(vec![mode], 3);
        let mut rig = Rig::open(&paths, &o).unwrap();
        let mut w = Workload::new(77);
        w.span = 1024;
        w.writes = 70;
        w.max_blocks = 8;
        w.discards = 0;
        w.mode_switches = 0;
        // About 10 × 4.8 MiB of writes.
        w.run(&mut rig, &mut model, 4000);
        check_all(&mut rig, &mut model);
        rig.set_verify();
        let s = rig.engine.set().unwrap().stats();
        if mode == CacheMode::None {
            // Nothing enters the cache in mode none: there is nothing to reclaim.
            assert_eq!(s.data_bytes, 0, "{s:?}");
        } else {
            assert!(s.gc_runs > 0 && s.prio_writes > 1, "{mode:?}: reclaim ran: {s:?}");
        }
        rig.close().unwrap();
    }
}

#[test]
fn bad_requests_get_typed_errors_and_the_set_runs_on() {
    let paths = format("bad", Geo::small());
    let mut rig = Rig::open(&paths, &RigOptions::default()).unwrap();
    let h = DevId(rig.handles[0]);
    let size = 1024 * BLOCK;
    let cases: Vec<(IoRequest, ErrorKind)> = vec![
        (IoRequest::read(h, 100, AlignedBuf::new(4096), 1), ErrorKind::Misaligned),
        (IoRequest::read(h, 0, AlignedBuf::new(1000), 2), ErrorKind::Misaligned),
        (IoRequest::write(h, size - 4096, AlignedBuf::new(8192), 3), ErrorKind::OutOfRange),
        (IoRequest::read(h, u64::MAX - 4095, AlignedBuf::new(4096), 4), ErrorKind::OutOfRange),
        (IoRequest::discard(h, size, 4096, 5), ErrorKind::OutOfRange),
        (IoRequest::read(h, 0, AlignedBuf::new(0), 6), ErrorKind::InvalidArgument),
        (IoRequest::read(DevId(99), 0, AlignedBuf::new(4096), 7), ErrorKind::InvalidArgument),
    ];
    for (req, kind) in cases {
        let tag = req.user_data;
        let c = rig.run(req);
        assert_eq!(c.user_data, tag);
        let e = c.result.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
    }
    rig.write(0, 3, &block_content(0, 3, 99), false).unwrap();
    assert_eq!(rig.read(0, 3, 1).unwrap(), block_content(0, 3, 99));
    assert_eq!(rig.state(), SetState::Running);
    rig.set_verify();
    // A closed set refuses requests with CLOSED.
    let tag = rig.tag();
    rig.engine.close(tag).unwrap();
    let c = rig.run(IoRequest::read(h, 0, AlignedBuf::new(4096), 1000));
    assert_eq!(c.result.unwrap_err().kind(), ErrorKind::Closed);
}

#[test]
fn a_backing_device_too_small_for_its_data_offset_is_refused() {
    let mut geo = Geo::small();
    geo.backing_blocks = vec![16];
    let paths = format("tiny", geo);
    std::fs::write(&paths.backing[0], vec![0u8; 4096]).unwrap();
    let e = match Rig::open(&paths, &RigOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a backing device smaller than its data offset attached"),
    };
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("data offset"), "{e}");
}

#[test]
fn opening_with_options_that_differ_from_defaults() {
    // Journal written flush-write-flush instead of FUA; a longer journal delay.
    let paths = format("nofua", Geo::small());
    let mut model = Model::new(&paths.geo);
    let mut o = opts(vec![CacheMode::Writeback, CacheMode::Writethrough], 5);
    o.set = CacheSetOptions { journal_fua: false, journal_delay_ms: 50, ..Default::default() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    let mut w = Workload::new(5);
    w.run(&mut rig, &mut model, 1500);
    check_all(&mut rig, &mut model);
    rig.close().unwrap();
}

trait Verify {
    fn set_verify(&mut self);
}

impl Verify for Rig {
    /// The index is consistent: keys do not overlap, counts add up.
    fn set_verify(&mut self) {
        self.engine.set().unwrap().verify_index().unwrap();
    }
}

#[test]
fn the_replacement_policy_and_discard_change_at_once_and_persist_in_the_superblock() {
    use ubcache_core::alloc::Replacement;
    let paths = format("policy", Geo::small());
    let mut rig = Rig::open(&paths, &RigOptions::default()).unwrap();
    assert_eq!(rig.engine.cache_policy().unwrap(), (Replacement::Lru, false));
    rig.engine.set_cache_policy(Replacement::Fifo, true).unwrap();
    // A second change while the first superblock write is in flight.
    rig.engine.set_cache_policy(Replacement::Random, true).unwrap();
    assert_eq!(rig.engine.cache_policy().unwrap(), (Replacement::Random, true));
    // The allocator goes on under the new policy (discards included).
    for b in 0..600 {
        rig.write(0, b % 1024, &block_content(0, b % 1024, 1 + b / 1024), false).unwrap();
    }
    rig.close().unwrap();
    let page = std::fs::read(&paths.cache).unwrap()[4096..8192].to_vec();
    let sb = ubcache_core::cache_set::superblock::parse(&page).unwrap();
    assert_eq!((sb.replacement(), sb.discard()), (2, true));
    let rig = Rig::open(&paths, &RigOptions::default()).unwrap();
    assert_eq!(rig.engine.cache_policy().unwrap(), (Replacement::Random, true));
}

/// Writes that start where an earlier write into a bucket now full ended (hot blocks beside
/// each other, rewritten) once opened a new bucket in that closed slot each time, beside
/// the writer's open one: open buckets piled up to 128, each pinned, and a small cache sat
/// past the writeback cutoff with almost nothing in it.
#[test]
fn rewriting_neighbouring_blocks_keeps_few_buckets_open() {
    let geo = Geo { nbuckets: 204, bucket_sectors: 512, backing_blocks: vec![32768], journal_buckets: None };
    let paths = format("open-buckets", geo);
    let o = RigOptions { modes: vec![CacheMode::Writethrough], ..Default::default() };
    let mut rig = Rig::open(&paths, &o).unwrap();
    let h = rig.handles[0];
    let mut rng = Rng(11);
    let data = vec![0x5au8; BLOCK as usize];
    for _ in 0..6000 {
        // Half the writes go to 128 hot pairs of neighbouring blocks, the rest anywhere.
        let b = if rng.chance(50) { (rng.below(128) * 256) + rng.below(2) } else { rng.below(32768) };
        let tag = rig.tag();
        let c = rig.run(IoRequest::write(DevId(h), b * BLOCK, AlignedBuf::from_slice(&data), tag));
        assert!(c.result.is_ok(), "{:?}", c.result);
    }
    rig.drain();
    let s = rig.engine.set().unwrap();
    let open = s.allocator().open_buckets_in_use();
    // A sixteenth of 203 buckets at most.
    assert!(open <= 12, "{open} buckets open");
    let pinned = (0..204).filter(|&b| s.allocator().bucket(0, b).unwrap().pin > 0).count();
    assert!(pinned <= 40, "{pinned} buckets pinned (free lists, open buckets)");
    assert!(s.in_use_percent() < 40, "{}% in use with nothing dirty", s.in_use_percent());
}
