//! Shared helpers of the io_* integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ubcache_core::io::{
    open_engine, run_sync, AlignedBuf, DevId, Device, EngineChoice, EngineOptions, IoCompletion, IoEngine, IoRequest,
    OpenOptions,
};

static N: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory on a real filesystem (O_DIRECT does not work on tmpfs), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let base = std::env::var_os("UBCACHE_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = base.join(format!("ubcache-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A file of `size` bytes filled with a pattern derived from `seed`.
    pub fn file(&self, name: &str, size: usize, seed: u8) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, pattern(size, seed)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64: reproducible pseudo-random choices for tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2654435761) >> 11) as u8 ^ seed).collect()
}

pub fn open(path: &Path) -> Arc<Device> {
    Arc::new(Device::open(path, &OpenOptions::default()).unwrap())
}

pub fn engine(choice: EngineChoice) -> Box<dyn IoEngine> {
    open_engine(&EngineOptions { choice, ..Default::default() }).unwrap()
}

pub const ENGINES: [EngineChoice; 2] = [EngineChoice::Uring, EngineChoice::Psync];

pub fn sync(e: &mut dyn IoEngine, req: IoRequest) -> IoCompletion {
    let mut others = Vec::new();
    let c = run_sync(e, req, &mut others).unwrap();
    assert!(others.is_empty());
    c
}

pub fn write(e: &mut dyn IoEngine, dev: DevId, off: u64, data: &[u8]) {
    let c = sync(e, IoRequest::write(dev, off, AlignedBuf::from_slice(data), 1));
    assert_eq!(c.result.unwrap(), data.len() as u64);
}

pub fn read(e: &mut dyn IoEngine, dev: DevId, off: u64, len: usize) -> Vec<u8> {
    let c = sync(e, IoRequest::read(dev, off, AlignedBuf::new(len), 2));
    assert_eq!(*c.result.as_ref().unwrap(), len as u64);
    c.into_buf().unwrap().to_vec()
}

pub fn flush(e: &mut dyn IoEngine, dev: DevId) {
    sync(e, IoRequest::flush(dev, 3)).result.unwrap();
}

/// Submits all requests, then polls until each has completed; returns completions by user_data.
pub fn run_all(e: &mut dyn IoEngine, reqs: Vec<IoRequest>) -> Vec<IoCompletion> {
    let n = reqs.len();
    for r in reqs {
        e.submit(r);
    }
    let mut out = Vec::new();
    while out.len() < n {
        e.poll(&mut out, None).unwrap();
    }
    assert_eq!(e.in_flight(), 0);
    out.sort_by_key(|c| c.user_data);
    out
}
