//! One journal entry in bcache's `jset` layout: a 240-byte header (checksum, magic, seq,
//! version, key count, last_seq, the UUID bucket and checkpoint pointers, the prio chain
//! heads) followed by keys in bkey encoding, padded to the block size. See docs/format.md,
//! "Journal".

use crate::crc64::Crc64;
use crate::error::{Error, ErrorKind, Result};
use crate::index::Key;
use crate::le::{u32_at, u64_at};

/// XORed with the set magic to give the magic of every journal entry of a set.
pub const JSET_MAGIC: u64 = 0x2452_35c1_a362_5032;
/// Version written in every entry (bcache's `BCACHE_JSET_VERSION`).
pub const JSET_VERSION: u32 = 1;
/// Bytes of the header before the first key.
pub const JSET_HEADER_BYTES: usize = 240;
/// Cache devices whose prio chain head an entry records.
pub const JSET_PRIO_SLOTS: usize = 8;

const OFF_CSUM: usize = 0;
const OFF_MAGIC: usize = 8;
const OFF_SEQ: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_KEYS: usize = 28;
const OFF_LAST_SEQ: usize = 32;
const OFF_UUID: usize = 40;
const OFF_ROOT: usize = 104;
/// bcache's `btree_level` and the padding after it: our flags.
const OFF_FLAGS: usize = 168;
/// Flag: written by a clean close.
const JSET_CLEAN: u64 = 1;
const OFF_PRIO: usize = 176;

/// Bit 63 of a metadata pointer's `high` word, as bcache sets on every key it builds.
const HIGH_RELIC: u64 = 1 << 63;
const KEY_PTRS_SHIFT: u32 = 60;

/// A pointer to a metadata bucket as a jset records it (the UUID bucket, the checkpoint's
/// head): a bkey with one pointer whose `low` word carries the structure's own sequence
/// number, so a bucket that was rewritten since is recognised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaPtr {
    /// Sequence number stamped in the structure the pointer leads to.
    pub seq: u64,
    /// Cache device.
    pub dev: u8,
    /// Bucket on that device.
    pub bucket: u64,
    /// The bucket's gen when the structure was written.
    pub gen: u8,
}

impl MetaPtr {
    fn encode(p: Option<&MetaPtr>, bucket_size: u32, out: &mut [u8]) -> Result<()> {
        out[..64].fill(0);
        let Some(p) = p else { return Ok(()) };
        let ptr = crate::index::Ptr::new(p.dev, p.bucket * u64::from(bucket_size), p.gen)?;
        out[0..8].copy_from_slice(&(HIGH_RELIC | 1 << KEY_PTRS_SHIFT).to_le_bytes());
        out[8..16].copy_from_slice(&p.seq.to_le_bytes());
        out[16..24].copy_from_slice(&ptr.raw().to_le_bytes());
        Ok(())
    }

    fn decode(b: &[u8], bucket_size: u32, what: &str) -> Result<Option<MetaPtr>> {
        let high = u64_at(b, 0);
        let nptrs = (high >> KEY_PTRS_SHIFT) & 7;
        if nptrs == 0 {
            return Ok(None);
        }
        let ptr = crate::index::Ptr::from_raw(u64_at(b, 16))
            .map_err(|e| corrupt(format!("journal entry: {what} pointer: {}", e.message())))?;
        if ptr.offset() % u64::from(bucket_size) != 0 {
            return Err(corrupt(format!("journal entry: {what} pointer {ptr:?} is not at a bucket start")));
        }
        Ok(Some(MetaPtr {
            seq: u64_at(b, 8),
            dev: ptr.dev(),
            bucket: ptr.offset() / u64::from(bucket_size),
            gen: ptr.gen(),
        }))
    }
}

/// A decoded journal entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jset {
    /// Sequence number; consecutive entries have consecutive numbers.
    pub seq: u64,
    /// Oldest entry still needed to replay on top of the checkpoints this entry keeps.
    pub last_seq: u64,
    /// The UUID table.
    pub uuid_bucket: Option<MetaPtr>,
    /// The newest index checkpoint (bcache's `btree_root` slot).
    pub checkpoint: Option<MetaPtr>,
    /// Head of each cache device's prio chain (0: none).
    pub prio_bucket: [u64; JSET_PRIO_SLOTS],
    /// Keys inserted since the previous entry, in order.
    pub keys: Vec<Key>,
    /// Written by a clean close: everything the set held was on stable storage, backing
    /// devices included, so its clean data matches them.
    pub clean: bool,
}

/// Bytes an entry holding keys of `key_words` u64 words in all takes, before padding.
pub fn jset_bytes(key_words: usize) -> usize {
    JSET_HEADER_BYTES + key_words * 8
}

impl Jset {
    /// Serializes the entry for the set with magic `set_magic` into `out` (cleared first),
    /// zero-padded to a multiple of `block_bytes`.
    pub fn encode(&self, set_magic: u64, bucket_size: u32, block_bytes: usize, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.resize(JSET_HEADER_BYTES, 0);
        for k in &self.keys {
            k.write_bkey_bytes(out)?;
        }
        let words = (out.len() - JSET_HEADER_BYTES) / 8;
        encode_header(self, set_magic, bucket_size, words, out)?;
        let end = out.len();
        seal(out, end);
        out.resize(end.div_ceil(block_bytes) * block_bytes, 0);
        Ok(())
    }

    /// Decodes the entry at the start of `buf` if it is a valid entry of this set (magic,
    /// version, length, checksum); returns it and its length padded to `block_bytes`.
    /// `Ok(None)` means no valid entry starts here (torn, stale or never written).
    pub fn decode(buf: &[u8], set_magic: u64, bucket_size: u32, block_bytes: usize) -> Result<Option<(Jset, usize)>> {
        let Some((mut j, keys, len)) = Jset::decode_header(buf, set_magic, bucket_size, block_bytes)? else {
            return Ok(None);
        };
        j.keys = decode_keys(keys).map_err(|e| corrupt(format!("journal entry {}: {}", j.seq, e.message())))?;
        Ok(Some((j, len)))
    }

    /// As [`Jset::decode`], but leaves the keys encoded: returns the entry without keys, the
    /// bytes of its keys and its padded length. Opening a set decodes only the keys it replays.
    pub fn decode_header(
        buf: &[u8],
        set_magic: u64,
        bucket_size: u32,
        block_bytes: usize,
    ) -> Result<Option<(Jset, &[u8], usize)>> {
        if buf.len() < JSET_HEADER_BYTES || u64_at(buf, OFF_MAGIC) != set_magic ^ JSET_MAGIC {
            return Ok(None);
        }
        if u32_at(buf, OFF_VERSION) != JSET_VERSION {
            return Ok(None);
        }
        let words = u32_at(buf, OFF_KEYS) as usize;
        let end = jset_bytes(words);
        if end > buf.len() {
            return Ok(None);
        }
        let mut c = Crc64::new();
        c.update(&buf[OFF_MAGIC..end]);
        if c.finish() != u64_at(buf, OFF_CSUM) {
            return Ok(None);
        }
        // From here on the bytes are what a writer of this set wrote: nonsense is corruption
        // that a checksum did not catch, reported rather than skipped.
        let mut j = Jset {
            seq: u64_at(buf, OFF_SEQ),
            last_seq: u64_at(buf, OFF_LAST_SEQ),
            uuid_bucket: MetaPtr::decode(&buf[OFF_UUID..OFF_UUID + 64], bucket_size, "UUID bucket")?,
            checkpoint: MetaPtr::decode(&buf[OFF_ROOT..OFF_ROOT + 64], bucket_size, "checkpoint")?,
            prio_bucket: [0; JSET_PRIO_SLOTS],
            keys: Vec::new(),
            clean: u64_at(buf, OFF_FLAGS) & JSET_CLEAN != 0,
        };
        for (i, p) in j.prio_bucket.iter_mut().enumerate() {
            *p = u64_at(buf, OFF_PRIO + 8 * i);
        }
        Ok(Some((j, &buf[JSET_HEADER_BYTES..end], end.div_ceil(block_bytes) * block_bytes)))
    }
}

/// Decodes a run of bkeys filling `bytes` exactly.
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<Key>> {
    let mut keys = Vec::with_capacity(bytes.len() / 24);
    let mut pos = 0;
    while pos < bytes.len() {
        let (k, n) = Key::read_bkey_bytes(&bytes[pos..])?;
        keys.push(k);
        pos += n;
    }
    if pos != bytes.len() {
        return Err(corrupt(format!("the last key runs {} bytes past the end", pos - bytes.len())));
    }
    Ok(keys)
}

/// Writes the header fields of `j` (all but the checksum) into `out[..240]`.
fn encode_header(j: &Jset, set_magic: u64, bucket_size: u32, words: usize, out: &mut [u8]) -> Result<()> {
    let words = u32::try_from(words).map_err(|_| inval(format!("journal entry of {words} words is too long")))?;
    out[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&(set_magic ^ JSET_MAGIC).to_le_bytes());
    out[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&j.seq.to_le_bytes());
    out[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&JSET_VERSION.to_le_bytes());
    out[OFF_KEYS..OFF_KEYS + 4].copy_from_slice(&words.to_le_bytes());
    out[OFF_LAST_SEQ..OFF_LAST_SEQ + 8].copy_from_slice(&j.last_seq.to_le_bytes());
    MetaPtr::encode(j.uuid_bucket.as_ref(), bucket_size, &mut out[OFF_UUID..OFF_UUID + 64])?;
    MetaPtr::encode(j.checkpoint.as_ref(), bucket_size, &mut out[OFF_ROOT..OFF_ROOT + 64])?;
    out[OFF_FLAGS..OFF_PRIO].copy_from_slice(&(if j.clean { JSET_CLEAN } else { 0 }).to_le_bytes());
    for (i, p) in j.prio_bucket.iter().enumerate() {
        out[OFF_PRIO + 8 * i..OFF_PRIO + 8 * i + 8].copy_from_slice(&p.to_le_bytes());
    }
    Ok(())
}

fn seal(out: &mut [u8], end: usize) {
    let mut c = Crc64::new();
    c.update(&out[OFF_MAGIC..end]);
    out[OFF_CSUM..OFF_CSUM + 8].copy_from_slice(&c.finish().to_le_bytes());
}

pub(crate) fn corrupt(m: String) -> Error {
    Error::new(ErrorKind::Corrupt, m)
}

fn inval(m: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Ptr;

    fn sample() -> Jset {
        let p = Ptr::new(0, 4096, 3).unwrap();
        Jset {
            seq: 42,
            last_seq: 40,
            uuid_bucket: Some(MetaPtr { seq: 7, dev: 0, bucket: 9, gen: 2 }),
            checkpoint: Some(MetaPtr { seq: 39, dev: 0, bucket: 12, gen: 5 }),
            prio_bucket: [17, 0, 0, 0, 0, 0, 0, 0],
            keys: vec![Key::new(1, 0, 8, p).with_dirty(true), Key::new(2, 64, 16, p)],
            clean: false,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let j = sample();
        let mut buf = Vec::new();
        j.encode(0x1122, 1024, 4096, &mut buf).unwrap();
        assert_eq!(buf.len(), 4096);
        assert_eq!(u64_at(&buf, 8), 0x1122 ^ JSET_MAGIC);
        assert_eq!(u64_at(&buf, 16), 42);
        assert_eq!(u32_at(&buf, 28), 6, "two keys of three words");
        assert_eq!(u64_at(&buf, 176), 17);
        assert_eq!(u64_at(&buf, 0), crate::crc64::crc64(&buf[8..240 + 48]));
        let (d, len) = Jset::decode(&buf, 0x1122, 1024, 4096).unwrap().unwrap();
        assert_eq!(len, 4096);
        assert_eq!(d, j);
        // The clean-close flag sits in bcache's btree_level word.
        let j = Jset { clean: true, ..sample() };
        j.encode(0x1122, 1024, 4096, &mut buf).unwrap();
        assert_eq!(u64_at(&buf, 168), 1);
        assert!(Jset::decode(&buf, 0x1122, 1024, 4096).unwrap().unwrap().0.clean);
    }

    #[test]
    fn damage_makes_no_entry() {
        let mut buf = Vec::new();
        sample().encode(0x1122, 1024, 4096, &mut buf).unwrap();
        assert!(Jset::decode(&buf, 0x1123, 1024, 4096).unwrap().is_none(), "other set");
        for off in [0, 8, 20, 100, 250, 280] {
            let mut b = buf.clone();
            b[off] ^= 0x40;
            assert!(Jset::decode(&b, 0x1122, 1024, 4096).unwrap().is_none(), "flip at {off}");
        }
        assert!(Jset::decode(&buf[..200], 0x1122, 1024, 4096).unwrap().is_none());
    }
}
