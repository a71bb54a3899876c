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
