//! bench/journal: journal replay rate, open time of a set holding 1M extents, and metadata
//! bytes written per 4 KiB random write in writeback (the worse of a fill phase and an
//! overwrite phase that includes index checkpoints). All on a sparse in-memory cache
//! device (zero data blocks take no memory), so the figures are the CPU cost of the
//! metadata paths, not of a disk.
//!
//! Last line on stdout: {"replay_keys_per_s", "open_1m_extents_s", "meta_bytes_per_write"}.

use std::collections::BTreeMap;
use std::time::Instant;

use ubcache_core::cache_set::superblock;
use ubcache_core::cache_set::{CacheSet, CacheSetOptions, MemStorage, Storage};

const BUCKET: u16 = 1024; // 512 KiB buckets, make-bcache's default
const NBUCKETS: u64 = 131_072; // a 64 GiB cache device (sparse in memory)
const EXTENTS: u64 = 1_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn device() -> MemStorage {
    let mut st = MemStorage::new(NBUCKETS * u64::from(BUCKET) * 512);
    st.write(4096, &superblock::format([1; 16], [2; 16], NBUCKETS, BUCKET, 8)).expect("superblock");
    st
}

fn main() {
    let opts = CacheSetOptions::default(); // journal_delay_ms = 100
    let mut cs = CacheSet::open(device(), opts.clone()).expect("open fresh");
    let base = cs.stats();
    let zero = vec![0u8; 4096];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Random 4 KiB writes over a 64 GiB volume: nearly every one is its own extent.
    let t = Instant::now();
    let mut blocks = std::collections::HashSet::new();
    while (blocks.len() as u64) < EXTENTS {
        let blk = rng.next() % (16 << 20);
        blocks.insert(blk);
        cs.write(1, blk * 8, &zero).expect("write");
    }
    let writes = blocks.len() as u64;
    cs.flush().expect("flush");
    let wt = t.elapsed();
    let s = cs.stats();
    let meta = s.meta_bytes() - base.meta_bytes();
    let meta_per_write = meta as f64 / writes as f64;
    eprintln!(
        "{writes} random 4 KiB writes in {:.2} s; metadata {} bytes (journal {}, checkpoints {} in {} checkpoints, prios {}, other {}): {:.1} bytes/write",
        wt.as_secs_f64(),
        meta,
        s.journal_bytes - base.journal_bytes,
        s.checkpoint_bytes - base.checkpoint_bytes,
        s.checkpoints - base.checkpoints,
        s.prio_bytes - base.prio_bytes,
        s.other_meta_bytes - base.other_meta_bytes,
        meta_per_write
    );

    // Replay: reopen without a clean close, so the keys since the last checkpoint (the fresh
    // set's, unless the journal filled a quarter) come from the journal.
    let st = cs.abandon();
    let t = Instant::now();
    let cs = CacheSet::open(st, opts.clone()).expect("reopen after crash");
    let crash_open = t.elapsed();
    let r = cs.open_report().clone();
    let replay_time = r.journal_read_time + r.replay_time;
    let replay_rate = r.replayed_keys as f64 / replay_time.as_secs_f64();
    eprintln!(
        "open after a crash: {:.3} s; {} keys from the checkpoint in {:.3} s, {} keys replayed from {} entries (read {:.3} s + insert {:.3} s) = {:.2} M keys/s; GC {:.3} s",
        crash_open.as_secs_f64(),
        r.checkpoint_keys,
        r.checkpoint_time.as_secs_f64(),
        r.replayed_keys,
        r.replayed_entries,
        r.journal_read_time.as_secs_f64(),
        r.replay_time.as_secs_f64(),
        replay_rate / 1e6,
        r.gc_time.as_secs_f64()
    );

    // Open after a clean close: the final checkpoint holds every extent.
    let st = cs.close().expect("close");
    let t = Instant::now();
    let mut cs = CacheSet::open(st, opts).expect("reopen after close");
    let open_time = t.elapsed();
    let r = cs.open_report().clone();
    let extents = cs.keys().len();
    eprintln!(
        "open after a clean close: {:.3} s for {extents} extents (journal read {:.3} s, checkpoint {:.3} s, replay {} keys {:.3} s, GC {:.3} s)",
        open_time.as_secs_f64(),
        r.journal_read_time.as_secs_f64(),
        r.checkpoint_time.as_secs_f64(),
        r.replayed_keys,
        r.replay_time.as_secs_f64(),
        r.gc_time.as_secs_f64()
    );
    assert!(extents as u64 >= EXTENTS, "the set holds {extents} extents");

    // Steady state: 1.5M more random writes over the same blocks (overwrites), long enough
    // to include index checkpoints of the 1M-extent index.
    let blocks: Vec<u64> = blocks.into_iter().collect();
    let base = cs.stats();
    let t = Instant::now();
    let more = 1_500_000u64;
    for _ in 0..more {
        let blk = blocks[(rng.next() % blocks.len() as u64) as usize];
        cs.write(1, blk * 8, &zero).expect("overwrite");
    }
    cs.flush().expect("flush");
    let s = cs.stats();
    let meta2 = s.meta_bytes() - base.meta_bytes();
    let steady = meta2 as f64 / more as f64;
    eprintln!(
        "{more} random 4 KiB overwrites in {:.2} s; metadata {} bytes (journal {}, checkpoints {} in {} checkpoints, prios {}, other {}): {:.1} bytes/write",
        t.elapsed().as_secs_f64(),
        meta2,
        s.journal_bytes - base.journal_bytes,
        s.checkpoint_bytes - base.checkpoint_bytes,
        s.checkpoints - base.checkpoints,
        s.prio_bytes - base.prio_bytes,
        s.other_meta_bytes - base.other_meta_bytes,
        steady
    );
    // Report the worse of the two phases.
    let meta_per_write = meta_per_write.max(steady);

    // Reference: inserting the same number of sorted (start, ptr) pairs into a BTreeMap.
    let t = Instant::now();
    let mut m = BTreeMap::new();
    for i in 0..extents as u64 {
        m.insert((1u32, i * 8), i);
    }
    eprintln!("reference: BTreeMap insert of {} sorted keys {:.3} s", m.len(), t.elapsed().as_secs_f64());

    println!(
        "{{\"replay_keys_per_s\": {:.0}, \"open_1m_extents_s\": {:.3}, \"meta_bytes_per_write\": {:.1}}}",
        replay_rate,
        open_time.as_secs_f64(),
        meta_per_write
    );
}
