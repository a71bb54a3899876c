//! bcache's on-disk `bkey` encoding of extent keys (journal entries, checkpoints).
//!
//! A bkey is a run of little-endian 64-bit words: `high`, `low`, one word per pointer and,
//! when `KEY_CSUM` is set, one word of data checksum. See docs/format.md for the layout.

use super::key::{Key, Ptr, KEY_CRC_MASK, KEY_OFFSET_MAX, KEY_PTRS_MAX};
use crate::error::{Error, ErrorKind, Result};

/// Most words one bkey may take (bcache's `KEY_MAX_U64S`).
pub const BKEY_U64S_MAX: usize = 8;

const KEY_INODE_BITS: u32 = 20;
const KEY_SIZE_SHIFT: u32 = 20;
const KEY_SIZE_BITS: u32 = 16;
const KEY_DIRTY_SHIFT: u32 = 36;
const KEY_CSUM_SHIFT: u32 = 56;
const KEY_PTRS_SHIFT: u32 = 60;
/// bcache sets the top bit of every key it builds (a relic of an old search scheme); we
/// write it the same way and ignore it when reading.
const KEY_HIGH_RELIC: u64 = 1 << 63;

#[inline]
fn field(word: u64, shift: u32, bits: u32) -> u64 {
    (word >> shift) & ((1u64 << bits) - 1)
}

/// Number of words of the bkey whose `high` word is `high`: two, plus `KEY_PTRS`, plus one
/// when `KEY_CSUM` is set.
pub fn bkey_u64s(high: u64) -> usize {
    2 + field(high, KEY_PTRS_SHIFT, 3) as usize + field(high, KEY_CSUM_SHIFT, 2).min(1) as usize
}

impl Key {
    /// Words this key takes as a bkey.
    pub fn bkey_u64s(&self) -> usize {
        2 + self.ptrs().len() + self.crc.is_some() as usize
    }

    /// The bkey `high` word: `KEY_PTRS`, `KEY_CSUM`, `KEY_DIRTY`, `KEY_SIZE`, `KEY_INODE`.
    fn bkey_high(&self) -> u64 {
        KEY_HIGH_RELIC
            | (self.ptrs().len() as u64) << KEY_PTRS_SHIFT
            | (self.crc.is_some() as u64) << KEY_CSUM_SHIFT
            | (self.dirty as u64) << KEY_DIRTY_SHIFT
            | self.size << KEY_SIZE_SHIFT
            | self.inode as u64
    }

    /// Appends the key's bkey words to `out`.
    pub fn encode_bkey(&self, out: &mut Vec<u64>) -> Result<()> {
        self.validate()?;
        out.push(self.bkey_high());
        out.push(self.end());
        out.extend(self.ptrs().iter().map(|p| p.raw()));
        if let Some(crc) = self.crc {
            out.push(crc);
        }
        Ok(())
    }

    /// Appends the key's bkey as little-endian bytes to `out`.
    pub fn write_bkey_bytes(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut words = Vec::with_capacity(BKEY_U64S_MAX);
        self.encode_bkey(&mut words)?;
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        Ok(())
    }

    /// Decodes the bkey at the front of `words`; returns the key and the words it took.
    pub fn decode_bkey(words: &[u64]) -> Result<(Key, usize)> {
        let bad = |msg: String| Error::new(ErrorKind::InvalidArgument, msg);
        let high = *words.first().ok_or_else(|| bad("bkey: no words left to decode".into()))?;
        let nptrs = field(high, KEY_PTRS_SHIFT, 3) as usize;
        let csum = field(high, KEY_CSUM_SHIFT, 2);
        if csum > 1 {
            return Err(bad(format!("bkey {high:#018x}: KEY_CSUM {csum} is not a checksum type ubcache knows")));
        }
        if nptrs > KEY_PTRS_MAX {
            return Err(bad(format!("bkey {high:#018x}: {nptrs} pointers, at most {KEY_PTRS_MAX} fit in a key")));
        }
        let u64s = bkey_u64s(high);
        if words.len() < u64s {
            return Err(bad(format!("bkey {high:#018x} needs {u64s} words, {} left", words.len())));
        }
        let end = words[1];
        let size = field(high, KEY_SIZE_SHIFT, KEY_SIZE_BITS);
        if end > KEY_OFFSET_MAX || size > end {
            return Err(bad(format!("bkey {high:#018x}: end sector {end} with size {size} is not a valid extent")));
        }
        let inode = field(high, 0, KEY_INODE_BITS) as u32;
        let mut key = Key::empty(inode, end - size, size).with_dirty(field(high, KEY_DIRTY_SHIFT, 1) != 0);
        for &w in &words[2..2 + nptrs] {
            key.push_ptr(Ptr::from_raw(w)?)?;
        }
        if csum == 1 {
            let crc = words[2 + nptrs];
            if crc > KEY_CRC_MASK {
                return Err(bad(format!("bkey {high:#018x}: checksum word {crc:#x} has its top bit set")));
            }
            key.crc = Some(crc);
        }
        key.validate()?;
        Ok((key, u64s))
    }

    /// Decodes the little-endian bkey at the front of `bytes`; returns the key and the bytes
    /// it took.
    pub fn read_bkey_bytes(bytes: &[u8]) -> Result<(Key, usize)> {
        let mut words = [0u64; BKEY_U64S_MAX];
        let n = (bytes.len() / 8).min(BKEY_U64S_MAX);
        for (i, w) in words[..n].iter_mut().enumerate() {
            *w = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8-byte chunk"));
        }
        let (key, u64s) = Key::decode_bkey(&words[..n])?;
        Ok((key, u64s * 8))
    }
}

// Replaying a run of bkeys (the keys of journal entries back to back): records that sort
// them by position without decoding each key twice, and the order to insert them in.

/// A replayed key as [`replay_order`] sorts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayRec {
    /// inode (bits 96..116), start (bits 32..95), position in journal order (bits 0..32).
    pub sort: u128,
    pub end: u64,
    /// The key's words, or `[u64::MAX, word offset, 0]` for a key of other than 3 words.
    pub words: [u64; 3],
}

/// Each key of a run of bkeys as a record: (inode, start, position) packed for sorting, its
/// end, and its words when it is a plain one-pointer key (nearly all are), else its offset.
/// Sorting whole records keeps the insertion pass sequential in memory. A key that does not
/// decode is reported by [`ReplayRec::key`].
pub fn replay_records(bytes: &[u8]) -> Vec<ReplayRec> {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let nwords = bytes.len() / 8;
    let mut recs: Vec<ReplayRec> = Vec::with_capacity(nwords / 3);
    let mut w = 0;
    while w + 1 < nwords {
        let (high, end) = (word(w), word(w + 1));
        let size = (high >> 20) & 0xffff;
        let u64s = bkey_u64s(high);
        let words = if u64s == 3 && w + 2 < nwords { [high, end, word(w + 2)] } else { [u64::MAX, w as u64, 0] };
        let pos = recs.len() as u128;
        let sort = (u128::from(high as u32 & 0xf_ffff) << 96) | (u128::from(end.saturating_sub(size)) << 32) | pos;
        recs.push(ReplayRec { sort, end, words });
        w += u64s;
    }
    recs
}

impl ReplayRec {
    /// The key, decoded from the record or from `bytes` (the run it came from).
    pub fn key(&self, bytes: &[u8]) -> Result<Key> {
        let r = if self.words[0] != u64::MAX {
            Key::decode_bkey(&self.words)
        } else {
            Key::read_bkey_bytes(&bytes[self.words[1] as usize * 8..]).map(|(k, n)| (k, n / 8))
        };
        r.map(|(k, _)| k).map_err(|e| Error::new(ErrorKind::Corrupt, format!("journal replay: {}", e.message())))
    }

    /// The key's inode.
    pub fn inode(&self) -> u32 {
        (self.sort >> 96) as u32
    }
    /// The key's first sector.
    pub fn start(&self) -> u64 {
        (self.sort >> 32) as u64
    }
}

/// The order to insert replayed keys in. Only keys that overlap another replayed key depend
/// on journal order (the newest must win); every other key commutes with the rest, so those
/// go first in index order, which is far kinder to the tree than journal order. Leaves the
/// commuting keys in `recs`, in index order, and returns the others in journal order.
pub fn replay_order(recs: &mut Vec<ReplayRec>) -> Vec<ReplayRec> {
    recs.sort_unstable_by_key(|r| r.sort);
    let mut clash = vec![false; recs.len()];
    // Clusters: runs (in index order) where each key starts before the run's furthest end.
    let mut run_start = 0;
    let mut run_end = (u32::MAX, 0u64);
    for pos in 0..=recs.len() {
        let next = recs.get(pos);
        let joins = next.is_some_and(|r| r.inode() == run_end.0 && r.start() < run_end.1);
        if !joins {
            if pos - run_start >= 2 {
                clash[run_start..pos].fill(true);
            }
            run_start = pos;
            if let Some(r) = next {
                run_end = (r.inode(), r.end);
            }
        } else if let Some(r) = next {
            run_end.1 = run_end.1.max(r.end);
        }
    }
    let mut clashing = Vec::new();
    let mut i = 0;
    recs.retain(|r| {
        i += 1;
        if clash[i - 1] {
            clashing.push(*r);
        }
        !clash[i - 1]
    });
    clashing.sort_unstable_by_key(|r| r.sort as u32);
    clashing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ExtentIndex, MemBuckets, ScanFilter, ScanPos};
    use proptest::prelude::*;

    #[test]
    fn replay_records_decode_every_key_shape() {
        let p = |o: u64| Ptr::new(0, o, 1).unwrap();
        let keys = vec![
            Key::new(3, 80, 8, p(16)).with_dirty(true),
            Key::new(1, 0, 4, p(32)).with_ptr(Ptr::new(1, 64, 2).unwrap()).unwrap(),
            Key::new(2, 8, 8, p(48)).with_crc(Some(12345)),
            Key::empty(2, 100, 16),
            Key::new(1, 40, 8, p(96)),
        ];
        let mut bytes = Vec::new();
        for k in &keys {
            k.write_bkey_bytes(&mut bytes).unwrap();
        }
        let recs = replay_records(&bytes);
        let got: Vec<Key> = recs.iter().map(|r| r.key(&bytes).unwrap()).collect();
        assert_eq!(got, keys);
        assert_eq!(
            recs.iter().map(|r| (r.inode(), r.start(), r.end)).collect::<Vec<_>>(),
            keys.iter().map(|k| (k.inode, k.start, k.end())).collect::<Vec<_>>()
        );
        // A key cut short is reported, not read past.
        let recs = replay_records(&bytes[..bytes.len() - 8]);
        assert!(recs.last().unwrap().key(&bytes[..bytes.len() - 8]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Replaying in `replay_order` gives the same index as replaying in journal order.
        #[test]
        fn replay_order_matches_journal_order(ks in proptest::collection::vec((0u32..2, 0u64..64, 1u64..12), 0..40)) {
            let keys: Vec<Key> = ks.iter().enumerate().map(|(n, &(inode, start, size))| {
                Key::new(inode, start, size, Ptr::new(0, 16 * n as u64, 0).unwrap())
            }).collect();
            let mut recs: Vec<ReplayRec> = keys.iter().enumerate().map(|(i, k)| ReplayRec {
                sort: (u128::from(k.inode) << 96) | (u128::from(k.start) << 32) | i as u128,
                end: k.end(),
                words: [0; 3],
            }).collect();
            let clashing = replay_order(&mut recs);
            let a: Vec<u32> = recs.iter().map(|r| r.sort as u32).collect();
            let b: Vec<u32> = clashing.iter().map(|r| r.sort as u32).collect();
            let mut all: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..keys.len() as u32).collect::<Vec<_>>());
            let mut bk = MemBuckets::new(4, 1, 1024);
            let mut journal = ExtentIndex::new();
            for k in &keys { journal.insert(k, &mut bk).unwrap(); }
            let mut reordered = ExtentIndex::new();
            for i in a.into_iter().chain(b) { reordered.insert(&keys[i as usize], &mut bk).unwrap(); }
            let dump = |ix: &mut ExtentIndex, bk: &MemBuckets| {
                let mut out = Vec::new();
                ix.scan(ScanPos::default(), ScanFilter::All, usize::MAX, bk, &mut out);
                out
            };
            prop_assert_eq!(dump(&mut journal, &bk), dump(&mut reordered, &bk));
        }
    }
}
