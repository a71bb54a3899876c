//! A random workload of requests in flight, checked against the model as they complete.

use std::time::Duration;

use super::*;
use ubcache_core::cache_set::CacheMode;
use ubcache_core::io::{AlignedBuf, DevId, IoCompletion, IoRequest};

pub const MODES: [CacheMode; 4] =
    [CacheMode::Writeback, CacheMode::Writethrough, CacheMode::Writearound, CacheMode::None];

/// A request of the workload in flight, and what the model needs to check it.
pub enum Pending {
    Read(ReadCheck),
    Write { dev: usize, block: u64, blocks: u64, version: u64, fua: bool },
    Flush { dev: usize, at: u64 },
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
    /// The set is closing: requests that had not started may be refused (`Closed`).
    pub closing: bool,
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
            closing: false,
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
            let mode = rig.engine.cache_mode(rig.handles[dev]).unwrap();
            model.note_mode(mode.map_or("none", |m| m.name()));
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
            self.pending.insert(tag, Pending::Flush { dev, at });
            rig.submit(IoRequest::flush(h, tag));
        } else if roll < self.writes + self.flushes + self.discards {
            self.pending.insert(tag, Pending::Discard { dev, block, blocks });
            model.discard_submitted(dev, block, blocks);
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
            let range = match self.pending.get(&c.user_data) {
                Some(Pending::Write { dev, block, blocks, .. }) | Some(Pending::Discard { dev, block, blocks }) => {
                    Some((*dev, *block, *blocks))
                }
                _ => None,
            };
            self.complete(model, c);
            if let Some((dev, block, blocks)) = range {
                watch(rig, model, dev, block, blocks);
            }
        }
    }

    pub fn complete(&mut self, model: &mut Model, c: IoCompletion) {
        let Some(p) = self.pending.remove(&c.user_data) else {
            panic!("a completion nobody submitted: {:#x}", c.user_data)
        };
        let ok = c.result.is_ok();
        let c_tag = c.user_data;
        if let Err(e) = &c.result {
            let refused = self.closing && e.kind() == ubcache_core::error::ErrorKind::Closed;
            assert!(self.errors_ok || refused, "request failed: {e}");
        }
        match p {
            Pending::Read(r) => {
                if ok {
                    let data = c.into_buf().unwrap();
                    if let Err(e) = model.read_done(&r, &data) {
                        let bad =
                            e.split(" block ").nth(1).and_then(|x| x.split(' ').next()).and_then(|x| x.parse().ok());
                        let h = bad.map(|b| self.history(r.dev, b)).unwrap_or_default();
                        panic!("read of dev {} blocks {}+{} (tag {:#x}): {e}\n{h}", r.dev, r.block, r.blocks, c_tag);
                    }
                }
            }
            Pending::Write { dev, block, blocks, version, fua } => {
                self.trace(&format!("write v{version} done ok {ok}"), dev, block, blocks);
                model.write_done(dev, block, blocks, version, ok, fua)
            }
            Pending::Flush { dev, at } => {
                if ok {
                    model.flush_done(dev, at)
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
        self.run_for(rig, model, ops);
        self.finish(rig, model);
    }

    /// The requests in flight will never complete (the power was cut): the model keeps
    /// their writes as possibly landed.
    pub fn abandon(&mut self) {
        self.pending.clear();
    }

    /// Submits `ops` requests with up to `depth` in flight, leaving the last ones in flight.
    pub fn run_for(&mut self, rig: &mut Rig, model: &mut Model, ops: usize) {
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

/// With `UBCACHE_WATCH` set (and `UBCACHE_MODEL_LOG`), logs the index's keys for the blocks
/// a completed write or discard touched (slow: for finding out how a failure came about).
pub fn watch(rig: &mut Rig, model: &mut Model, dev: usize, block: u64, blocks: u64) {
    if std::env::var_os("UBCACHE_WATCH").is_none() {
        return;
    }
    let Some(inode) = rig.engine.inode(rig.handles[dev]) else { return };
    let set = rig.engine.set_mut().unwrap();
    let keys = set.keys();
    for b in block..block + blocks {
        let ks: Vec<String> = keys
            .iter()
            .filter(|k| k.inode == inode && k.end() > b * 8 && k.start < (b + 1) * 8)
            .map(|k| format!("{k:?}"))
            .collect();
        model.watch_log(dev, b, format!("index: {ks:?}"));
    }
}
