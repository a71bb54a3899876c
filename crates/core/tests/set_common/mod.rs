//! Shared rig of the cache set tests: devices in memory-backed files, a cache engine over
//! the fault engine, and a model of what every sector of every cached device may hold.
#![allow(dead_code)]

mod workload;
#[allow(unused_imports)]
pub use workload::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ubcache_core::cache_set::{self, superblock, CacheEngine, CacheMode, CacheSetOptions, CachedDevConfig, SetState};
use ubcache_core::io::fault::{CrashMode, CrashReport, FaultControl, FaultEngine};
use ubcache_core::io::{
    open_engine, AlignedBuf, DevId, Device, DirectIo, EngineChoice, EngineOptions, EngineStorage, IoCompletion,
    IoEngine, IoRequest, OpenOptions, RingDriver,
};
use ubcache_core::{Error, Result};

pub const BLOCK: u64 = 4096;
pub const SECTOR: u64 = 512;
/// Where a backing device's data starts (bcache's default 16 sectors).
pub const DATA_OFFSET: u64 = 8192;
const MAGIC: u32 = 0x5542_4353;

static N: AtomicUsize = AtomicUsize::new(0);

/// xorshift64: reproducible choices.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Sizes of a test cache set.
#[derive(Clone, Debug)]
pub struct Geo {
    pub nbuckets: u64,
    pub bucket_sectors: u16,
    /// Blocks of each backing device's data.
    pub backing_blocks: Vec<u64>,
    /// Journal buckets, if not bcache's default count.
    pub journal_buckets: Option<usize>,
}

impl Geo {
    /// A small set: 1024 buckets of 8 KiB (8 MiB of cache) and two devices of 4 MiB each,
    /// so the cache cannot hold both and reclaims.
    pub fn small() -> Geo {
        Geo { nbuckets: 1024, bucket_sectors: 16, backing_blocks: vec![1024, 1024], journal_buckets: None }
    }
}

/// Files of a test set, removed on drop.
pub struct Paths {
    pub dir: PathBuf,
    pub cache: PathBuf,
    pub backing: Vec<PathBuf>,
    pub geo: Geo,
}

impl Drop for Paths {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sector `sector` of block `block` of device `dev` holding `version`: a header naming all
/// four (version 0 is what the backing device held before anything was written).
pub fn sector_content(dev: u32, block: u64, sector: u32, version: u64, out: &mut [u8]) {
    out.fill(0);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&dev.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..20].copy_from_slice(&sector.to_le_bytes());
    out[20..28].copy_from_slice(&version.to_le_bytes());
    let mut x = version.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block ^ (u64::from(dev) << 40) ^ u64::from(sector);
    for b in out[28..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = b.len();
        b.copy_from_slice(&x.to_le_bytes()[..n]);
    }
}

/// A block of device `dev` written with `version`.
pub fn block_content(dev: u32, block: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    for (s, chunk) in v.chunks_mut(SECTOR as usize).enumerate() {
        sector_content(dev, block, s as u32, version, chunk);
    }
    v
}

/// What a sector read back holds: `Some((dev, block, sector, version))` if it is intact
/// content this harness wrote, `None` for all zeros; anything else is an error.
pub fn decode_sector(b: &[u8]) -> std::result::Result<Option<(u32, u64, u32, u64)>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if u32_at(0) != MAGIC {
        return Err("a sector the harness never wrote".into());
    }
    let (dev, block, sector, version) = (u32_at(4), u64_at(8), u32_at(16), u64_at(20));
    let mut want = vec![0u8; b.len()];
    sector_content(dev, block, sector, version, &mut want);
    if want != b {
        return Err(format!("sector of dev {dev} block {block} sector {sector} version {version} is damaged"));
    }
    Ok(Some((dev, block, sector, version)))
}

/// Formats a cache device and backing devices (every block at version 0) for `name`.
pub fn format(name: &str, geo: Geo) -> Paths {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("ubcache-set-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache.img");
    let size = geo.nbuckets * u64::from(geo.bucket_sectors) * 512;
    let f = std::fs::File::create(&cache).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let sb = match geo.journal_buckets {
        Some(n) => superblock::format_with_journal([0xc1; 16], [0x5e; 16], geo.nbuckets, geo.bucket_sectors, 8, n),
        None => superblock::format([0xc1; 16], [0x5e; 16], geo.nbuckets, geo.bucket_sectors, 8),
    };
    f.write_all_at(&sb, 4096).unwrap();
    let mut backing = Vec::new();
    for (i, &blocks) in geo.backing_blocks.iter().enumerate() {
        let p = dir.join(format!("backing{i}.img"));
        let mut data = vec![0u8; (DATA_OFFSET + blocks * BLOCK) as usize];
        for b in 0..blocks {
            let at = (DATA_OFFSET + b * BLOCK) as usize;
            data[at..at + BLOCK as usize].copy_from_slice(&block_content(i as u32, b, 0));
        }
        std::fs::write(&p, data).unwrap();
        backing.push(p);
    }
    Paths { dir, cache, backing, geo }
}

/// Opens a device, waiting a little if the engine of a set that just crashed still holds
/// it: the kernel tears an io_uring down in the background, and may hold the file (and its
/// exclusive lock) a moment after the engine is gone.
pub fn open_retrying(p: &Path) -> Result<Device> {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        match Device::open(p, &dev_opts()) {
            Err(e) if e.kind() == ubcache_core::ErrorKind::Busy && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(2))
            }
            r => return r,
        }
    }
}

/// The cache device's bytes, read and written straight (for tests that look at or damage
/// what is on it while no engine has it open).
pub fn storage(path: &Path) -> EngineStorage<Box<dyn IoEngine>> {
    let mut e = open_engine(&EngineOptions { choice: EngineChoice::Psync, ..Default::default() }).unwrap();
    let id = e.add_device(Arc::new(open_retrying(path).unwrap())).unwrap();
    EngineStorage::new(e, id)
}

/// Flips bits of the byte at `offset` of the file at `path`.
pub fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

/// Device options for files in memory (tmpfs has no O_DIRECT).
pub fn dev_opts() -> OpenOptions {
    OpenOptions { direct: DirectIo::Off, ..Default::default() }
}

/// A running cache engine over the fault engine, with its backing devices attached.
pub struct Rig {
    pub engine: CacheEngine,
    pub ctl: FaultControl,
    pub handles: Vec<u32>,
    pub done: Vec<IoCompletion>,
    next_tag: u64,
}

/// How to open a rig.
#[derive(Clone)]
pub struct RigOptions {
    pub set: CacheSetOptions,
    pub modes: Vec<CacheMode>,
    /// Track unflushed writes, for crashes.
    pub volatile: bool,
    /// Random extra latency per I/O (completions out of order).
    pub jitter: Duration,
    pub seed: u64,
    pub engine: EngineChoice,
    /// Writeback tunables every device is attached with (None: the defaults).
    pub writeback: Option<ubcache_core::cache_set::WritebackConfig>,
    /// Bypass tunables every device is attached with (None: the defaults).
    pub bypass: Option<ubcache_core::cache_set::BypassConfig>,
    /// Backing devices opened with O_DIRECT (files on a disk, for benchmarks).
    pub backing_direct: bool,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            set: CacheSetOptions { journal_delay_ms: 5, ..Default::default() },
            modes: vec![CacheMode::Writeback, CacheMode::Writethrough],
            volatile: true,
            jitter: Duration::ZERO,
            seed: 1,
            engine: EngineChoice::Auto,
            writeback: None,
            bypass: None,
            backing_direct: false,
        }
    }
}

impl Rig {
    /// Loads the set and starts it; attaches every backing device. Startup may be cut short
    /// by `stop_after`: then the rig is returned as soon as that many I/O rounds ran (for
    /// crashing during startup), attached or not.
    pub fn open(paths: &Paths, o: &RigOptions) -> Result<Rig> {
        Rig::open_until(paths, o, None)
    }

    pub fn open_until(paths: &Paths, o: &RigOptions, stop_after: Option<usize>) -> Result<Rig> {
        let inner = open_engine(&EngineOptions { choice: o.engine, ..Default::default() })?;
        let mut fe = FaultEngine::new(inner);
        let ctl = fe.control();
        ctl.set_volatile(o.volatile);
        if !o.jitter.is_zero() {
            ctl.set_latency(Some(ubcache_core::io::fault::Latency {
                jitter: o.jitter,
                jitter_seed: o.seed,
                ..Default::default()
            }));
        }
        let cache = Arc::new(open_retrying(&paths.cache)?);
        let id = fe.add_device(cache.clone())?;
        let mut st = EngineStorage::new(fe, id);
        let set = cache_set::load(&mut st, o.set.clone());
        let mut fe = st.into_engine();
        fe.remove_device(id)?;
        let set = set?;
        let driver = RingDriver::without_fd(Box::new(fe));
        let engine = CacheEngine::with_set(driver, set, cache)?;
        let mut rig = Rig { engine, ctl, handles: Vec::new(), done: Vec::new(), next_tag: 1 };
        let mut rounds = 0;
        let mut tags = Vec::new();
        for (i, p) in paths.backing.iter().enumerate() {
            let cfg = CachedDevConfig {
                uuid: [i as u8 + 1; 16],
                label: [0; 32],
                device: Arc::new(if o.backing_direct {
                    Device::open(p, &OpenOptions { direct: DirectIo::Require, ..Default::default() })?
                } else {
                    open_retrying(p)?
                }),
                data_offset: DATA_OFFSET,
                mode: o.modes[i % o.modes.len()],
                writeback: o.writeback.clone().unwrap_or_default(),
                bypass: o.bypass.clone().unwrap_or_default(),
                no_superblock: false,
            };
            let tag = rig.tag();
            rig.handles.push(rig.engine.attach(tag, cfg)?);
            tags.push(tag);
        }
        let mut events = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        while events.len() < tags.len() || rig.state() == SetState::Starting {
            if stop_after.is_some_and(|n| rounds >= n) {
                return Ok(rig);
            }
            rounds += 1;
            rig.engine.poll(&mut rig.done, Some(Duration::from_millis(20)))?;
            rig.engine.take_events(&mut events);
            if let SetState::Failed(e) = rig.state() {
                return Err(e);
            }
            if Instant::now() > until {
                return Err(Error::new(ubcache_core::ErrorKind::Io, "startup did not finish in 30 s"));
            }
        }
        for (_, r) in events {
            r?;
        }
        Ok(rig)
    }

    pub fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    pub fn state(&self) -> SetState {
        self.engine.set().expect("a set").state().clone()
    }

    pub fn submit(&mut self, r: IoRequest) {
        let mut out = std::mem::take(&mut self.done);
        self.engine.submit([r], &mut out).expect("engine broke");
        self.done = out;
    }

    /// Drives the engine for up to `timeout`; completions collect in `done`.
    pub fn poll(&mut self, timeout: Duration) {
        let mut out = std::mem::take(&mut self.done);
        self.engine.poll(&mut out, Some(timeout)).expect("engine broke");
        self.done = out;
    }

    /// Drives the engine until nothing is in flight.
    pub fn drain(&mut self) {
        let until = Instant::now() + Duration::from_secs(60);
        while self.engine.in_flight() > 0 {
            assert!(Instant::now() < until, "requests still in flight after 60 s");
            self.poll(Duration::from_millis(10));
        }
    }

    /// Waits until no I/O is in flight and no checkpoint runs: every metadata pointer the
    /// set shows is then recorded in a durable entry.
    pub fn settle(&mut self) {
        let until = Instant::now() + Duration::from_secs(60);
        while self.engine.in_flight() > 0 || self.engine.set().is_some_and(|s| s.checkpoint_running()) {
            assert!(
                Instant::now() < until,
                "still busy after 60 s: {}",
                self.engine.set().map(|s| s.describe()).unwrap_or_default()
            );
            self.poll(Duration::from_millis(10));
        }
    }

    /// Runs one request to completion (others may complete meanwhile, into `done`).
    pub fn run(&mut self, r: IoRequest) -> IoCompletion {
        let tag = r.user_data;
        self.submit(r);
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(i) = self.done.iter().position(|c| c.user_data == tag) {
                return self.done.remove(i);
            }
            assert!(Instant::now() < until, "request {tag} did not complete in 60 s");
            self.poll(Duration::from_millis(10));
        }
    }

    pub fn read(&mut self, dev: usize, block: u64, blocks: u64) -> Result<Vec<u8>> {
        let tag = self.tag();
        let h = self.handles[dev];
        let c = self.run(IoRequest::read(DevId(h), block * BLOCK, AlignedBuf::new((blocks * BLOCK) as usize), tag));
        if let Err(e) = &c.result {
            return Err(e.clone());
        }
        Ok(c.into_buf().unwrap().to_vec())
    }

    pub fn write(&mut self, dev: usize, block: u64, data: &[u8], fua: bool) -> Result<()> {
        let tag = self.tag();
        let h = self.handles[dev];
        let buf = AlignedBuf::from_slice(data);
        let r = if fua {
            IoRequest::write_fua(DevId(h), block * BLOCK, buf, tag)
        } else {
            IoRequest::write(DevId(h), block * BLOCK, buf, tag)
        };
        self.run(r).result.map(|_| ())
    }

    pub fn flush(&mut self, dev: usize) -> Result<()> {
        let tag = self.tag();
        let h = self.handles[dev];
        self.run(IoRequest::flush(DevId(h), tag)).result.map(|_| ())
    }

    /// A clean close; the devices can be opened again afterwards.
    pub fn close(mut self) -> Result<()> {
        let tag = self.tag();
        self.engine.close(tag)?;
        let until = Instant::now() + Duration::from_secs(60);
        let mut events = Vec::new();
        loop {
            self.poll(Duration::from_millis(10));
            self.engine.take_events(&mut events);
            if let Some((_, r)) = events.iter().find(|e| e.0 == tag) {
                return r.clone().map(|_| ());
            }
            if Instant::now() > until {
                return Err(Error::new(ubcache_core::ErrorKind::Io, "close did not finish in 60 s"));
            }
        }
    }

    /// Cuts the power with whatever is in flight: the engine is dropped and every write not
    /// yet durable is undone or torn.
    pub fn crash(self, mode: CrashMode) -> CrashReport {
        let Rig { engine, ctl, .. } = self;
        drop(engine);
        ctl.cut_power_after_drop(mode).expect("crash simulation")
    }
}

/// One write to a block, as the model saw it.
#[derive(Clone, Copy, Debug)]
struct Version {
    /// The version written, or (from `ADOPTED` on) contents adopted after a crash.
    version: u64,
    /// Submitted at this model event.
    submitted: u64,
    /// Completed (ok or not) at this model event.
    done: Option<u64>,
    ok: bool,
}

/// Versions from here on name contents read back after a crash (torn writes mix sectors).
const ADOPTED: u64 = 1 << 62;

/// What every sector of every device may hold. Versions of a block are kept in submission
/// order (the engine serves overlapping writes in that order), from the newest one known
/// durable on.
pub struct Model {
    /// Per device, per block: the versions from the durable floor on.
    blocks: Vec<Vec<Vec<Version>>>,
    /// Blocks discarded since their floor, with the model event of the newest discard's
    /// submission: zeros or any content of the block is allowed.
    discarded: Vec<Vec<Option<u64>>>,
    adopted: std::collections::HashMap<u64, Vec<u8>>,
    event: u64,
    next_version: u64,
    next_adopted: u64,
    /// What happened to each block (when `UBCACHE_MODEL_LOG` is set), for failure reports.
    log: Option<std::collections::HashMap<(usize, u64), Vec<String>>>,
    /// Marks the log's entries (e.g. the crash point).
    pub note: String,
    mode: String,
}

/// A read in flight, as the model checks it.
pub struct ReadCheck {
    pub dev: usize,
    pub block: u64,
    pub blocks: u64,
    /// Per block: the versions it may see as of its submission, and the model event then
    /// (writes submitted later may be seen too).
    allowed: Vec<Vec<u64>>,
    /// Per block: discarded as of its submission (a FUA write completing before the read
    /// does clears the model's flag, but the read may have been served before it landed).
    discarded: Vec<bool>,
    at: u64,
}

impl Model {
    pub fn new(geo: &Geo) -> Model {
        Model {
            blocks: geo
                .backing_blocks
                .iter()
                .map(|&n| vec![vec![Version { version: 0, submitted: 0, done: Some(0), ok: true }]; n as usize])
                .collect(),
            discarded: geo.backing_blocks.iter().map(|&n| vec![None; n as usize]).collect(),
            adopted: Default::default(),
            event: 1,
            next_version: 1,
            next_adopted: ADOPTED,
            log: std::env::var_os("UBCACHE_MODEL_LOG").map(|_| Default::default()),
            note: String::new(),
            mode: String::new(),
        }
    }

    fn log(&mut self, dev: usize, block: u64, what: String) {
        if let Some(l) = self.log.as_mut() {
            l.entry((dev, block)).or_default().push(format!("[{}] e{} {what}", self.note, self.event));
        }
    }

    /// Logs `what` for a block if it changed since the last such note.
    pub fn watch_log(&mut self, dev: usize, block: u64, what: String) {
        self.log(dev, block, what);
    }

    /// Notes the cache mode the next write is submitted in (for the log).
    pub fn note_mode(&mut self, mode: &str) {
        self.mode = mode.to_string();
    }

    /// What the model saw happen to a block (empty unless `UBCACHE_MODEL_LOG` is set).
    pub fn history(&self, dev: usize, block: u64) -> String {
        self.log.as_ref().and_then(|l| l.get(&(dev, block))).map(|v| v.join("\n  ")).unwrap_or_default()
    }

    pub fn devices(&self) -> usize {
        self.blocks.len()
    }

    pub fn device_blocks(&self, dev: usize) -> u64 {
        self.blocks[dev].len() as u64
    }

    fn tick(&mut self) -> u64 {
        self.event += 1;
        self.event
    }

    /// A write of `blocks` blocks from `block` is submitted; returns its data and version.
    pub fn write_submitted(&mut self, dev: usize, block: u64, blocks: u64) -> (Vec<u8>, u64) {
        let v = self.next_version;
        self.next_version += 1;
        let at = self.tick();
        let mut data = Vec::with_capacity((blocks * BLOCK) as usize);
        for b in block..block + blocks {
            data.extend_from_slice(&block_content(dev as u32, b, v));
            self.blocks[dev][b as usize].push(Version { version: v, submitted: at, done: None, ok: false });
            self.log(dev, b, format!("write v{v} submitted ({block}+{blocks}) in {}", self.mode));
        }
        (data, v)
    }

    /// The write of `version` completed; `fua` writes that succeed are durable at once.
    pub fn write_done(&mut self, dev: usize, block: u64, blocks: u64, version: u64, ok: bool, fua: bool) {
        let e = self.tick();
        for b in block..block + blocks {
            let vs = &mut self.blocks[dev][b as usize];
            let i = vs.iter().rposition(|w| w.version == version).expect("a version the model knows");
            vs[i].done = Some(e);
            vs[i].ok = ok;
            if ok && fua {
                let submitted = vs[i].submitted;
                vs.drain(..i);
                // A discard submitted after this write is served after it: it may still land.
                let d = &mut self.discarded[dev][b as usize];
                if d.is_some_and(|at| at < submitted) {
                    *d = None;
                }
            }
            self.log(dev, b, format!("write v{version} done ok {ok} fua {fua}"));
        }
    }

    /// A discard of the range was submitted: from now on (it may land any time, or be torn
    /// by a crash) the range may read back as anything it held, or zeros.
    pub fn discard_submitted(&mut self, dev: usize, block: u64, blocks: u64) {
        let at = self.tick();
        for b in block..block + blocks {
            self.discarded[dev][b as usize] = Some(at);
            self.log(dev, b, format!("discard submitted ({block}+{blocks})"));
        }
    }

    /// A discard of the range completed.
    pub fn discard_done(&mut self, dev: usize, block: u64, blocks: u64) {
        for b in block..block + blocks {
            self.log(dev, b, format!("discarded ({block}+{blocks})"));
        }
    }

    /// The model event a flush submitted now carries.
    pub fn flush_submitted(&mut self) -> u64 {
        self.tick()
    }

    /// A flush of `dev` submitted at `at` completed: every write to that device that
    /// completed before it is durable; the newest such one becomes each block's floor.
    pub fn flush_done(&mut self, dev: usize, at: u64) {
        let mut floors = Vec::new();
        for (d, blocks) in self.blocks.iter_mut().enumerate().filter(|(d, _)| *d == dev) {
            let dev = d;
            for (b, vs) in blocks.iter_mut().enumerate() {
                if let Some(i) = vs.iter().rposition(|w| w.ok && w.done.is_some_and(|d| d < at)) {
                    if i > 0 {
                        vs.drain(..i);
                        floors.push((dev, b as u64, vs[0].version));
                    }
                }
            }
        }
        for (dev, b, v) in floors {
            self.log(dev, b, format!("flush (submitted e{at}) makes v{v} durable"));
        }
    }

    /// A read is submitted: it sees the newest version that completed successfully before
    /// now, or a later one (in flight, or failed: those may have landed).
    pub fn read_submitted(&mut self, dev: usize, block: u64, blocks: u64) -> ReadCheck {
        let at = self.tick();
        let allowed = (block..block + blocks)
            .map(|b| {
                let vs = &self.blocks[dev][b as usize];
                let from = vs.iter().rposition(|w| w.ok && w.done.is_some()).unwrap_or(0);
                vs[from..].iter().map(|w| w.version).collect()
            })
            .collect();
        let discarded = (block..block + blocks).map(|b| self.discarded[dev][b as usize].is_some()).collect();
        ReadCheck { dev, block, blocks, allowed, discarded, at }
    }

    /// Checks what a read returned.
    pub fn read_done(&self, r: &ReadCheck, data: &[u8]) -> std::result::Result<(), String> {
        for i in 0..r.blocks {
            let b = r.block + i;
            let mut allowed = r.allowed[i as usize].clone();
            allowed.extend(self.blocks[r.dev][b as usize].iter().filter(|w| w.submitted > r.at).map(|w| w.version));
            let blk = &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
            self.check_block(r.dev, b, blk, &allowed, false, r.discarded[i as usize])?;
        }
        Ok(())
    }

    /// A block's contents are one of `allowed` (sectors of several, if `mixed`), or after a
    /// discard anything the block held or zeros.
    fn check_block(
        &self,
        dev: usize,
        b: u64,
        data: &[u8],
        allowed: &[u64],
        mixed: bool,
        discarded_then: bool,
    ) -> std::result::Result<(), String> {
        let discarded = discarded_then || self.discarded[dev][b as usize].is_some();
        if allowed.iter().any(|v| *v >= ADOPTED && self.adopted.get(v).is_some_and(|d| d[..] == data[..])) {
            return Ok(());
        }
        let ss = SECTOR as usize;
        // A sector (of a block read back after a crash) may hold what an adopted version held.
        let adopted_sector = |s: usize, sector: &[u8]| {
            mixed
                && allowed
                    .iter()
                    .filter(|a| **a >= ADOPTED)
                    .any(|a| self.adopted.get(a).is_some_and(|d| d[s * ss..(s + 1) * ss] == *sector))
        };
        let mut seen = None;
        for (s, sector) in data.chunks(ss).enumerate() {
            let got = decode_sector(sector).map_err(|e| format!("dev {dev} block {b} sector {s}: {e}"))?;
            match got {
                None if discarded || adopted_sector(s, sector) => {}
                None => return Err(format!("dev {dev} block {b} sector {s}: zeros, expected one of {allowed:?}")),
                Some((d, bb, sn, v)) => {
                    if (d as usize, bb, sn as usize) != (dev, b, s) {
                        return Err(format!(
                            "dev {dev} block {b} sector {s}: holds dev {d} block {bb} sector {sn} (version {v})"
                        ));
                    }
                    if discarded {
                        continue;
                    }
                    if !allowed.contains(&v) && !adopted_sector(s, sector) {
                        return Err(format!(
                            "dev {dev} block {b} sector {s}: version {v}, expected one of {allowed:?}"
                        ));
                    }
                    if !mixed && *seen.get_or_insert(v) != v {
                        return Err(format!("dev {dev} block {b}: sectors of versions {seen:?} and {v} mixed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// After a crash: each sector holds its floor or a later version (torn writes mix them).
    /// What is there becomes the block's durable contents.
    pub fn check_after_crash(&mut self, dev: usize, block: u64, data: &[u8]) -> std::result::Result<(), String> {
        for i in 0..(data.len() as u64 / BLOCK) {
            let b = block + i;
            let blk = &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
            let allowed: Vec<u64> = self.blocks[dev][b as usize].iter().map(|w| w.version).collect();
            if let Err(e) = self.check_block(dev, b, blk, &allowed, true, false) {
                return Err(format!("{e}\n  {}", self.history(dev, b)));
            }
            for v in &allowed {
                self.adopted.remove(v);
            }
            let id = self.next_adopted;
            self.next_adopted += 1;
            self.adopted.insert(id, blk.to_vec());
            self.blocks[dev][b as usize] = vec![Version { version: id, submitted: 0, done: Some(0), ok: true }];
            let first = decode_sector(&blk[..SECTOR as usize]).ok().flatten().map(|d| d.3);
            self.log(dev, b, format!("after a crash: read version {first:?} (sector 0), adopted as {id}"));
            self.discarded[dev][b as usize] = None;
        }
        Ok(())
    }
}
