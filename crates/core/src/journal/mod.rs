//! The journal, after bcache's `journal.c`: a ring of entries ([`Jset`]) in the journal
//! buckets a cache device's superblock lists. Each entry records the keys inserted since the
//! previous one and where the set's other metadata lives now (prio chains, UUID table,
//! index checkpoint), so opening a set reads the newest entry and replays keys from the
//! checkpoint on.
//!
//! Entries are written one after another into the current bucket; when it is full the writer
//! moves to the next bucket of the ring, which must hold no entry at or after `last_seq`
//! (a checkpoint covers its keys). Every write is made durable before the next starts, so a
//! crash can tear at most the newest entry, which then fails its checksum and is ignored.
//! This module knows the ring and the entry format; when entries are written and what they
//! record is the cache set's journal writer (`cache_set::journal`).

pub mod jset;

pub use jset::{Jset, MetaPtr, JSET_HEADER_BYTES, JSET_MAGIC, JSET_PRIO_SLOTS, JSET_VERSION};

use crate::error::{Error, ErrorKind, Result};
use crate::index::Key;
use crate::io::storage::Storage;

/// An entry found on disk, with where it lies. Its keys are left encoded until asked for.
#[derive(Clone, Debug)]
pub struct FoundEntry {
    /// The entry, without its keys.
    pub jset: Jset,
    /// Its keys, bkey encoded.
    pub key_bytes: Vec<u8>,
    /// Index into the journal bucket list (`d[]`).
    pub bucket_idx: usize,
    /// Byte offset within the bucket.
    pub offset: usize,
    /// Bytes it takes, padded to the block size.
    pub len: usize,
}

/// Geometry the journal needs.
#[derive(Clone, Debug)]
pub struct JournalGeometry {
    /// Journal buckets, in ring order (the superblock's `d[]`).
    pub buckets: Vec<u64>,
    /// Bucket size in bytes.
    pub bucket_bytes: usize,
    /// Block size in bytes: entries start on block boundaries.
    pub block_bytes: usize,
    /// The set magic (first 8 bytes of the set UUID, little endian).
    pub set_magic: u64,
}

impl JournalGeometry {
    fn bucket_size(&self) -> u32 {
        (self.bucket_bytes / 512) as u32
    }

    /// Most u64 words of keys one entry carries: an eighth of a bucket (at least a block),
    /// so an entry that does not fit the rest of a bucket wastes little of it.
    pub fn max_key_words(&self) -> usize {
        let bytes = (self.bucket_bytes / 8).max(self.block_bytes).min(self.bucket_bytes);
        (bytes - JSET_HEADER_BYTES) / 8
    }
}

impl FoundEntry {
    /// Decodes the entry's keys.
    pub fn keys(&self) -> Result<Vec<Key>> {
        jset::decode_keys(&self.key_bytes)
            .map_err(|e| Error::new(ErrorKind::Corrupt, format!("journal entry {}: {}", self.jset.seq, e.message())))
    }
}

/// Reads every journal bucket and returns the valid entries, by ascending seq (one per seq).
pub fn read_journal(st: &mut dyn Storage, g: &JournalGeometry) -> Result<Vec<FoundEntry>> {
    let mut found: Vec<FoundEntry> = Vec::new();
    let mut buf = vec![0u8; g.bucket_bytes];
    for (idx, &b) in g.buckets.iter().enumerate() {
        st.read(b * g.bucket_bytes as u64, &mut buf)
            .map_err(|e| Error::new(e.kind(), format!("reading journal bucket {b}: {}", e.message())))?;
        let mut off = 0;
        while off + JSET_HEADER_BYTES <= g.bucket_bytes {
            match Jset::decode_header(&buf[off..], g.set_magic, g.bucket_size(), g.block_bytes)? {
                Some((jset, keys, len)) => {
                    found.push(FoundEntry { jset, key_bytes: keys.to_vec(), bucket_idx: idx, offset: off, len });
                    off += len;
                }
                None => off += g.block_bytes,
            }
        }
    }
    found.sort_by_key(|e| e.jset.seq);
    found.dedup_by_key(|e| e.jset.seq);
    Ok(found)
}

/// The journal writer's state.
pub struct Journal {
    g: JournalGeometry,
    cur: usize,
    offset: usize,
    /// Highest seq written to each journal bucket (0: none that matters).
    bucket_seq: Vec<u64>,
    /// Seq of the newest entry written.
    seq: u64,
    buf: Vec<u8>,
    bytes_written: u64,
}

impl Journal {
    /// A journal over `g` for a fresh set: the next entry goes to the start of the first
    /// bucket with seq `seq + 1`.
    pub fn new(g: JournalGeometry, seq: u64) -> Result<Journal> {
        if g.buckets.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "a cache set needs at least one journal bucket"));
        }
        if g.bucket_bytes < JSET_HEADER_BYTES + g.block_bytes || !g.bucket_bytes.is_multiple_of(g.block_bytes) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("journal: bucket of {} bytes with blocks of {}", g.bucket_bytes, g.block_bytes),
            ));
        }
        let n = g.buckets.len();
        Ok(Journal { g, cur: 0, offset: 0, bucket_seq: vec![0; n], seq, buf: Vec::new(), bytes_written: 0 })
    }

    /// A journal continuing after what [`read_journal`] found: the next entry follows the
    /// newest one.
    pub fn resume(g: JournalGeometry, found: &[FoundEntry]) -> Result<Journal> {
        let mut j = Journal::new(g, 0)?;
        for e in found {
            let s = &mut j.bucket_seq[e.bucket_idx];
            *s = (*s).max(e.jset.seq);
        }
        if let Some(last) = found.last() {
            j.cur = last.bucket_idx;
            j.offset = last.offset + last.len;
            j.seq = last.jset.seq;
        }
        Ok(j)
    }

    /// Geometry.
    pub fn geometry(&self) -> &JournalGeometry {
        &self.g
    }

    /// Seq of the newest entry written (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes of entries written since this journal was opened.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Journal buckets holding an entry at or after `last_seq`, the current one included.
    pub fn buckets_in_use(&self, last_seq: u64) -> usize {
        (0..self.bucket_seq.len()).filter(|&i| i == self.cur || self.bucket_seq[i] >= last_seq).count()
    }

    /// Buckets of the ring.
    pub fn nr_buckets(&self) -> usize {
        self.bucket_seq.len()
    }

    /// True when an entry of `bytes` (padded) can be written without overwriting an entry
    /// at or after `last_seq`.
    pub fn has_room(&self, bytes: usize, last_seq: u64) -> bool {
        self.offset + bytes <= self.g.bucket_bytes || self.bucket_seq[self.next_bucket()] < last_seq
    }

    fn next_bucket(&self) -> usize {
        (self.cur + 1) % self.bucket_seq.len()
    }

    /// Encodes `j` (its seq must be the next one) into `out` and claims its place in the
    /// ring: returns the byte offset on the cache device to write it at. The journal's state
    /// moves on at once; the caller writes the entry (after a flush of the data its keys
    /// point at) and makes it durable before preparing the next one, and takes the cache set
    /// out of service if that write fails. Fails with `NoSpace` when the next bucket still
    /// holds an entry at or after `j.last_seq`.
    pub fn prepare(&mut self, j: &Jset, out: &mut Vec<u8>) -> Result<u64> {
        if j.seq != self.seq + 1 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("journal entry {} written after {}", j.seq, self.seq),
            ));
        }
        j.encode(self.g.set_magic, self.g.bucket_size(), self.g.block_bytes, out)?;
        if out.len() > self.g.bucket_bytes {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("journal entry of {} bytes does not fit a bucket of {}", out.len(), self.g.bucket_bytes),
            ));
        }
        let (mut cur, mut offset) = (self.cur, self.offset);
        if offset + out.len() > self.g.bucket_bytes {
            let next = self.next_bucket();
            if self.bucket_seq[next] >= j.last_seq {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "journal full: bucket {} still holds entry {} and replay starts at {}",
                        self.g.buckets[next], self.bucket_seq[next], j.last_seq
                    ),
                ));
            }
            cur = next;
            offset = 0;
        }
        let at = self.g.buckets[cur] * self.g.bucket_bytes as u64 + offset as u64;
        self.cur = cur;
        self.offset = offset + out.len();
        self.bucket_seq[cur] = if offset == 0 { j.seq } else { self.bucket_seq[cur].max(j.seq) };
        self.seq = j.seq;
        self.bytes_written += out.len() as u64;
        Ok(at)
    }

    /// Writes `j` synchronously and makes it durable: a flush before (the data its keys
    /// point at) and after (the entry itself). For tools and tests; the cache set writes
    /// through [`Journal::prepare`].
    pub fn write(&mut self, st: &mut dyn Storage, j: &Jset) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.prepare(j, &mut buf).and_then(|at| {
            st.flush()?;
            st.write(at, &buf)?;
            st.flush()
        });
        self.buf = buf;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Key, Ptr};
    use crate::io::storage::MemStorage;
    use proptest::prelude::*;

    fn geometry() -> JournalGeometry {
        JournalGeometry { buckets: vec![3, 4, 5, 6], bucket_bytes: 16384, block_bytes: 4096, set_magic: 0xabc }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a model of what must survive: after any sequence of writes, reading the
        /// journal finds every entry from the newest entry's `last_seq` on, intact, and
        /// nothing newer.
        #[test]
        fn ring_keeps_every_needed_entry(plan in proptest::collection::vec((0usize..200, 0u64..6), 1..60)) {
            let g = geometry();
            let mut st = MemStorage::new(8 * 16384);
            let mut j = Journal::new(g.clone(), 0).unwrap();
            let mut written: Vec<Jset> = Vec::new();
            let mut last_seq = 1;
            for (n, (nkeys, lag)) in plan.into_iter().enumerate() {
                let seq = j.seq() + 1;
                let keys: Vec<Key> = (0..nkeys as u64)
                    .map(|i| Key::new(1, (seq * 1000 + i) * 8, 8, Ptr::new(0, 64 + i * 8, n as u8).unwrap()))
                    .collect();
                let words: usize = keys.iter().map(|k| k.bkey_u64s()).sum();
                let keys = if words > g.max_key_words() { keys[..g.max_key_words() / 3].to_vec() } else { keys };
                // The set keeps `lag` entries back when it can; when the ring is full it
                // checkpoints, which moves last_seq up to the new entry.
                last_seq = last_seq.max(seq.saturating_sub(lag)).max(1);
                let bytes = jset::jset_bytes(keys.iter().map(|k| k.bkey_u64s()).sum()).div_ceil(4096) * 4096;
                if !j.has_room(bytes, last_seq) {
                    last_seq = seq;
                }
                let e = Jset { seq, last_seq, prio_bucket: [seq; 8], keys, ..Default::default() };
                j.write(&mut st, &e).unwrap();
                written.push(e);
            }
            let found = read_journal(&mut st, &g).unwrap();
            let newest = written.last().unwrap();
            prop_assert_eq!(found.last().unwrap().jset.seq, newest.seq);
            for w in written.iter().filter(|w| w.seq >= newest.last_seq) {
                let f = found.iter().find(|f| f.jset.seq == w.seq);
                prop_assert!(f.is_some(), "entry {} lost", w.seq);
                let f = f.unwrap();
                prop_assert_eq!(&f.keys().unwrap(), &w.keys);
                prop_assert_eq!(f.jset.prio_bucket, w.prio_bucket);
            }
            let resumed = Journal::resume(g, &found).unwrap();
            prop_assert_eq!(resumed.seq(), newest.seq);
        }
    }
}
