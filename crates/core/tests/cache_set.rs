//! The cache set engine against a model of the cached devices: random interleavings of
//! reads, writes, FUA writes, flushes, discards and cache-mode switches with many requests
//! in flight, in every mode, with clean restarts between rounds (the cache stays warm).

mod set_common;

use std::time::Duration;

use set_common::*;
use ubcache_core::cache_set::{CacheMode, CacheSetOptions, SetState};
use ubcache_core::io::{AlignedBuf, DevId, IoCompletion, IoRequest};
use ubcache_core::ErrorKind;

const MODES: [CacheMode; 4] = [CacheMode::Writeback, CacheMode::Writethrough, CacheMode::Writearound, CacheMode::None];

/// A request of the workload in flight, and what the model needs to check it.
pub enum Pending {
    Read(ReadCheck),
    Write { dev: usize, block: u64, blocks: u64, version: u64, fua: bool },
    Flush { at: u64 },
    Discard { dev: usize, block: u64, blocks: u64 },
}

/// Drives a random workload: `ops` requests, up to `depth` in flight, checked against `model`.
pub struct Workload {
    pub rng: Rng,
    pub depth: usize,
    pub pending: std::collections::HashMap<u64, Pending>,
    /// Largest request, in blocks.
    pub max_blocks: u64,
    /// Blocks each device's requests fall in (a hot range, so the cache gets hits).
    pub span: u64,
    /// Percentages of the mix.
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub fua: u64,
    pub mode_switches: u64,
    /// Errors are expected (faults injected): failed requests are fine, wrong data is not.
    pub errors_ok: bool,
    log: std::collections::HashMap<(usize, u64), Vec<String>>,
    modes: Vec<String>,
    ops: u64,
}

impl Workload {
    pub fn new(seed: u64) -> Workload {
        Workload {
            rng: Rng(seed | 1),
            depth: 16,
            pending: Default::default(),
            max_blocks: 4,
            span: 512,
            writes: 45,
            flushes: 5,
            discards: 2,
            fua: 10,
            mode_switches: 1,
            errors_ok: false,
            log: Default::default(),
            modes: Vec::new(),
            ops: 0,
        }
    }

    /// Notes what touches each block, to tell how a failed check came about.
    fn trace(&mut self, what: &str, dev: usize, block: u64, blocks: u64) {
        if blocks > 64 {
            self.modes.push(format!("{} {what} dev {dev}", self.ops));
            return;
        }
        for b in block..block + blocks {
            self.log.entry((dev, b)).or_default().push(format!("{} {what} ({block}+{blocks})", self.ops));
        }
    }

    fn history(&self, dev: usize, block: u64) -> String {
        let ev = self.log.get(&(dev, block)).map(|v| v.join("\n  ")).unwrap_or_default();
        format!("history of dev {dev} block {block}:\n  {ev}\nmode switches: {}", self.modes.join(", "))
    }

    /// Submits one random request (or switches a mode).
    pub fn step(&mut self, rig: &mut Rig, model: &mut Model) {
        self.ops += 1;
        let dev = self.rng.below(model.devices() as u64) as usize;
        let span = self.span.min(model.device_blocks(dev));
        let blocks = 1 + self.rng.below(self.max_blocks);
        let block = self.rng.below(span - blocks + 1);
        let tag = rig.tag();
        let h = DevId(rig.handles[dev]);
        let roll = self.rng.below(100);
        if roll < self.mode_switches {
            let mode = MODES[self.rng.below(4) as usize];
            rig.engine.set_cache_mode(rig.handles[dev], mode).unwrap();
            self.trace(&format!("mode {mode:?}"), dev, 0, u64::MAX / 2);
            return;
        }
        let roll = roll - self.mode_switches;
        if roll < self.writes {
            let fua = self.rng.chance(self.fua);
            let (data, version) = model.write_submitted(dev, block, blocks);
            self.trace(&format!("write v{version} fua {fua} tag {tag}"), dev, block, blocks);
            let buf = AlignedBuf::from_slice(&data);
            self.pending.insert(tag, Pending::Write { dev, block, blocks, version, fua });
            rig.submit(if fua {
                IoRequest::write_fua(h, block * BLOCK, buf, tag)
            } else {
                IoRequest::write(h, block * BLOCK, buf, tag)
            });
        } else if roll < self.writes + self.flushes {
            let at = model.flush_submitted();
            self.pending.insert(tag, Pending::Flush { at });
            rig.submit(IoRequest::flush(h, tag));
        } else if roll < self.writes + self.flushes + self.discards {
            self.pending.insert(tag, Pending::Discard { dev, block, blocks });
            self.trace(&format!("discard tag {tag}"), dev, block, blocks);
            rig.submit(IoRequest::discard(h, block * BLOCK, blocks * BLOCK, tag));
        } else {
            self.pending.insert(tag, Pending::Read(model.read_submitted(dev, block, blocks)));
            self.trace(&format!("read tag {tag:#x}"), dev, block, blocks);
            rig.submit(IoRequest::read(h, block * BLOCK, AlignedBuf::new((blocks * BLOCK) as usize), tag));
        }
    }

    /// Checks and retires the completions collected so far.
    pub fn retire(&mut self, rig: &mut Rig, model: &mut Model) {
        for c in std::mem::take(&mut rig.done) {
            self.complete(model, c);
        }
    }

    pub fn complete(&mut self, model: &mut Model, c: IoCompletion) {
        let Some(p) = self.pending.remove(&c.user_data) else {
            panic!("a completion nobody submitted: {:#x}", c.user_data)
        };
        let ok = c.result.is_ok();
        let c_tag = c.user_data;
        if let Err(e) = &c.result {
            assert!(self.errors_ok, "request failed: {e}");
        }
        match p {
            Pending::Read(r) => {
                if ok {
                    let data = c.into_buf().unwrap();
                    if let Err(e) = model.read_done(&r, &data) {
                        let bad = e.split(" block ").nth(1).and_then(|x| x.split(' ').next()).and_then(|x| x.parse().ok());
                        let h = bad.map(|b| self.history(r.dev, b)).unwrap_or_default();
                        panic!("read of dev {} blocks {}+{} (tag {:#x}): {e}\n{h}", r.dev, r.block, r.blocks, c_tag);
                    }
                }
            }
            Pending::Write { dev, block, blocks, version, fua } => {
                self.trace(&format!("write v{version} done ok {ok}"), dev, block, blocks);
                model.write_done(dev, block, blocks, version, ok, fua)
            }
            Pending::Flush { at } => {
                if ok {
                    model.flush_done(at)
                }
            }

            Pending::Discard { dev, block, blocks } => {
                self.trace("discard done", dev, block, blocks);
                model.discard_done(dev, block, blocks)
            }
        }
    }

    /// Runs `ops` requests with up to `depth` in flight, then waits for all of them.
    pub fn run(&mut self, rig: &mut Rig, model: &mut Model, ops: usize) {
        for _ in 0..ops {
            let until = std::time::Instant::now() + Duration::from_secs(30);
            while self.pending.len() >= self.depth {
                rig.poll(Duration::from_millis(5));
                self.retire(rig, model);
                if std::time::Instant::now() > until {
                    panic!("{} requests stuck: {}", self.pending.len(), rig.engine.set().unwrap().describe());
                }
            }
            self.step(rig, model);
            self.retire(rig, model);
        }
        self.finish(rig, model);
    }

    pub fn finish(&mut self, rig: &mut Rig, model: &mut Model) {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !self.pending.is_empty() {
            assert!(
                std::time::Instant::now() < until,
                "{} requests never completed: {}",
                self.pending.len(),
                rig.engine.set().unwrap().describe()
            );
            rig.poll(Duration::from_millis(5));
            self.retire(rig, model);
        }
    }
}

/// Reads every block of every device and checks it against the model.
pub fn check_all(rig: &mut Rig, model: &mut Model) {
    for dev in 0..model.devices() {
        let n = model.device_blocks(dev);
        let mut b = 0;
        while b < n {
            let k = (n - b).min(64);
            let r = model.read_submitted(dev, b, k);
            let data = rig.read(dev, b, k).unwrap();
            if let Err(e) = model.read_done(&r, &data) {
                panic!("full check: {e}");
            }
            b += k;
        }
    }
}

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
            let o = opts(vec![MODES[(seed + round) as usize % 4], MODES[(seed + round + 2) as usize % 4]], seed * 10 + round);
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
    let geo = Geo { nbuckets: 600, bucket_sectors: 8 * 2, backing_blocks: vec![1024, 1024] };
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
        assert!(s.gc_runs > 0 && s.prio_writes > 1, "{mode:?}: reclaim ran: {s:?}");
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
