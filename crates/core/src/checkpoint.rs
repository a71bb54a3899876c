//! Index checkpoints: every live key of the index, sorted, written to a chain of buckets
//! taken from the btree reserve. The journal records the newest checkpoint's head; replay
//! starts from it. Each bucket of the chain starts with a header block holding the crc64 of
//! every data block after it, so a damaged block is found before any key is used. See
//! docs/format.md, "Index checkpoints".

use crate::cache_set::storage::Storage;
use crate::crc64::crc64;
use crate::error::{Error, ErrorKind, Result};
use crate::index::Key;
use crate::le::{u32_at, u64_at};

/// XORed with the set magic to give the magic of every checkpoint bucket of a set.
pub const CHECKPOINT_MAGIC: u64 = 0x6b63_7070_6b63_6875;
/// Format version in every header.
pub const CHECKPOINT_VERSION: u32 = 1;
/// Header bytes before the table of block checksums.
pub const CHECKPOINT_HEADER_BYTES: usize = 72;

const OFF_CSUM: usize = 0;
const OFF_MAGIC: usize = 8;
const OFF_SEQ: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_BLOCKS: usize = 28;
const OFF_KEYS: usize = 32;
const OFF_BYTES: usize = 40;
const OFF_NEXT: usize = 48;
const OFF_LINK: usize = 56;
const OFF_TOTAL: usize = 64;

/// Sizes a checkpoint is cut to.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointGeometry {
    /// Bucket size in bytes.
    pub bucket_bytes: usize,
    /// Block size in bytes.
    pub block_bytes: usize,
    /// The set magic.
    pub set_magic: u64,
}

impl CheckpointGeometry {
    /// Data blocks one bucket carries: all but the header block, as far as the header has
    /// room for their checksums.
    pub fn data_blocks(&self) -> usize {
        let blocks = self.bucket_bytes / self.block_bytes;
        (blocks - 1).min((self.block_bytes - CHECKPOINT_HEADER_BYTES) / 8)
    }

    /// Bytes of keys one bucket carries.
    pub fn data_bytes(&self) -> usize {
        self.data_blocks() * self.block_bytes
    }

    fn magic(&self) -> u64 {
        self.set_magic ^ CHECKPOINT_MAGIC
    }
}

/// The keys destined for one bucket of a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct Chunk {
    /// The keys, bkey encoded back to back (no key spans two buckets).
    pub data: Vec<u8>,
    /// How many keys.
    pub keys: u64,
}

/// Cuts keys, pushed in index order, into per-bucket chunks.
pub struct Packer {
    cap: usize,
    chunks: Vec<Chunk>,
    one: Vec<u8>,
    total: u64,
}

impl Packer {
    /// A packer for buckets of geometry `g`; it starts with one empty chunk.
    pub fn new(g: &CheckpointGeometry) -> Packer {
        let cap = g.data_bytes();
        Packer {
            cap,
            chunks: vec![Chunk { data: Vec::with_capacity(cap), keys: 0 }],
            one: Vec::with_capacity(64),
            total: 0,
        }
    }

    /// Appends one key.
    pub fn push(&mut self, k: &Key) -> Result<()> {
        self.one.clear();
        k.write_bkey_bytes(&mut self.one)?;
        if self.chunks.last().expect("at least one chunk").data.len() + self.one.len() > self.cap {
            self.chunks.push(Chunk { data: Vec::with_capacity(self.cap), keys: 0 });
        }
        let cur = self.chunks.last_mut().expect("at least one chunk");
        cur.data.extend_from_slice(&self.one);
        cur.keys += 1;
        self.total += 1;
        Ok(())
    }

    /// Keys pushed so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The chunks, one per bucket (one empty chunk for no keys).
    pub fn finish(self) -> Vec<Chunk> {
        self.chunks
    }
}

/// Cuts `keys` (in index order) into per-bucket chunks. An empty index gives one empty chunk.
pub fn pack<'a>(g: &CheckpointGeometry, keys: impl IntoIterator<Item = &'a Key>) -> Result<Vec<Chunk>> {
    let mut p = Packer::new(g);
    for k in keys {
        p.push(k)?;
    }
    Ok(p.finish())
}

/// Serializes link `link` of a checkpoint into `out` (header block and the data blocks
/// used, nothing more): `next` is the following link's bucket (0 for the last).
pub fn encode_bucket(
    g: &CheckpointGeometry,
    seq: u64,
    link: u32,
    next: u64,
    total_keys: u64,
    chunk: &Chunk,
    out: &mut Vec<u8>,
) -> Result<()> {
    if chunk.data.len() > g.data_bytes() {
        return Err(Error::new(ErrorKind::InvalidArgument, "checkpoint chunk larger than a bucket"));
    }
    let blocks = chunk.data.len().div_ceil(g.block_bytes);
    out.clear();
    out.resize((1 + blocks) * g.block_bytes, 0);
    out[g.block_bytes..g.block_bytes + chunk.data.len()].copy_from_slice(&chunk.data);
    put64(out, OFF_MAGIC, g.magic());
    put64(out, OFF_SEQ, seq);
    out[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    out[OFF_BLOCKS..OFF_BLOCKS + 4].copy_from_slice(&(blocks as u32).to_le_bytes());
    put64(out, OFF_KEYS, chunk.keys);
    put64(out, OFF_BYTES, chunk.data.len() as u64);
    put64(out, OFF_NEXT, next);
    out[OFF_LINK..OFF_LINK + 4].copy_from_slice(&link.to_le_bytes());
    put64(out, OFF_TOTAL, total_keys);
    for i in 0..blocks {
        let b = (1 + i) * g.block_bytes;
        let c = crc64(&out[b..b + g.block_bytes]);
        put64(out, CHECKPOINT_HEADER_BYTES + 8 * i, c);
    }
    let end = CHECKPOINT_HEADER_BYTES + 8 * blocks;
    let c = crc64(&out[OFF_MAGIC..end]);
    put64(out, OFF_CSUM, c);
    Ok(())
}

/// A checkpoint read back: its keys in order and the buckets of its chain.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Keys, in index order.
    pub keys: Vec<Key>,
    /// Buckets of the chain, head first.
    pub buckets: Vec<u64>,
}

/// Reads and checks the whole checkpoint chain starting at `head` (which must carry `seq`),
/// then decodes its keys. `max_links` bounds the chain (a loop is corruption). Any damage
/// is an error naming the bucket and block.
pub fn read(st: &mut dyn Storage, g: &CheckpointGeometry, head: u64, seq: u64, nbuckets: u64) -> Result<Loaded> {
    let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("checkpoint {seq}: {m}"));
    let mut out = Loaded::default();
    let mut data = Vec::new();
    let mut hdr = vec![0u8; g.block_bytes];
    let mut bucket = head;
    let mut total = None;
    let mut keys = 0u64;
    loop {
        if bucket == 0 || bucket >= nbuckets || out.buckets.contains(&bucket) {
            return Err(bad(format!("link {} points at bucket {bucket}", out.buckets.len())));
        }
        let base = bucket * g.bucket_bytes as u64;
        st.read(base, &mut hdr)?;
        let blocks = u32_at(&hdr, OFF_BLOCKS) as usize;
        if u64_at(&hdr, OFF_MAGIC) != g.magic() || blocks > g.data_blocks() {
            return Err(bad(format!("bucket {bucket} is not a checkpoint bucket of this set")));
        }
        let end = CHECKPOINT_HEADER_BYTES + 8 * blocks;
        if crc64(&hdr[OFF_MAGIC..end]) != u64_at(&hdr, OFF_CSUM) {
            return Err(bad(format!("bucket {bucket}: header checksum mismatch")));
        }
        if u64_at(&hdr, OFF_SEQ) != seq || u32_at(&hdr, OFF_LINK) as usize != out.buckets.len() {
            return Err(bad(format!(
                "bucket {bucket} holds link {} of checkpoint {}",
                u32_at(&hdr, OFF_LINK),
                u64_at(&hdr, OFF_SEQ)
            )));
        }
        let bytes = u64_at(&hdr, OFF_BYTES) as usize;
        if bytes > blocks * g.block_bytes || bytes.div_ceil(g.block_bytes) != blocks {
            return Err(bad(format!("bucket {bucket}: {bytes} bytes of keys in {blocks} blocks")));
        }
        let t = u64_at(&hdr, OFF_TOTAL);
        if *total.get_or_insert(t) != t {
            return Err(bad(format!("bucket {bucket}: key count {t} differs from the head's")));
        }
        let start = data.len();
        data.resize(start + blocks * g.block_bytes, 0);
        if blocks > 0 {
            st.read(base + g.block_bytes as u64, &mut data[start..])?;
        }
        for i in 0..blocks {
            let b = &data[start + i * g.block_bytes..start + (i + 1) * g.block_bytes];
            if crc64(b) != u64_at(&hdr, CHECKPOINT_HEADER_BYTES + 8 * i) {
                return Err(bad(format!("bucket {bucket} block {}: checksum mismatch", i + 1)));
            }
        }
        data.truncate(start + bytes);
        keys += u64_at(&hdr, OFF_KEYS);
        out.buckets.push(bucket);
        bucket = u64_at(&hdr, OFF_NEXT);
        if bucket == 0 {
            break;
        }
    }
    if Some(keys) != total {
        return Err(bad(format!("chain holds {keys} keys, its header says {}", total.unwrap_or(0))));
    }
    out.keys = crate::journal::jset::decode_keys(&data).map_err(|e| bad(e.message().to_string()))?;
    if out.keys.len() as u64 != keys {
        return Err(bad(format!("decoded {} keys, headers say {keys}", out.keys.len())));
    }
    Ok(out)
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_set::storage::MemStorage;
    use crate::index::Ptr;

    fn keys(n: u64) -> Vec<Key> {
        (0..n).map(|i| Key::new(1, i * 8, 8, Ptr::new(0, 64 + i * 8, 1).unwrap()).with_dirty(i % 2 == 0)).collect()
    }

    fn write(st: &mut MemStorage, g: &CheckpointGeometry, ks: &[Key], buckets: &[u64], seq: u64) {
        let chunks = pack(g, ks).unwrap();
        assert_eq!(chunks.len(), buckets.len());
        let mut buf = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let next = buckets.get(i + 1).copied().unwrap_or(0);
            encode_bucket(g, seq, i as u32, next, ks.len() as u64, c, &mut buf).unwrap();
            st.write(buckets[i] * g.bucket_bytes as u64, &buf).unwrap();
        }
    }

    #[test]
    fn round_trip_over_several_buckets_and_damage() {
        let g = CheckpointGeometry { bucket_bytes: 8192, block_bytes: 4096, set_magic: 5 };
        let ks = keys(400);
        let n = pack(&g, &ks).unwrap().len();
        assert_eq!(n, 3, "170 keys of 24 bytes per 4 KiB data block");
        let buckets = [7, 3, 11];
        let mut st = MemStorage::new(64 * 8192);
        write(&mut st, &g, &ks, &buckets, 9);
        let l = read(&mut st, &g, 7, 9, 64).unwrap();
        assert_eq!(l.keys, ks);
        assert_eq!(l.buckets, buckets);
        assert!(read(&mut st, &g, 7, 8, 64).unwrap_err().message().contains("link 0 of checkpoint 9"));
        // A flipped byte in a data block of the middle link.
        let mut blk = vec![0u8; 4096];
        st.read(3 * 8192 + 4096, &mut blk).unwrap();
        blk[100] ^= 1;
        st.write(3 * 8192 + 4096, &blk).unwrap();
        let e = read(&mut st, &g, 7, 9, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("bucket 3 block 1"), "{e}");
    }

    #[test]
    fn empty_checkpoint() {
        let g = CheckpointGeometry { bucket_bytes: 8192, block_bytes: 4096, set_magic: 5 };
        let mut st = MemStorage::new(64 * 8192);
        write(&mut st, &g, &[], &[4], 1);
        let l = read(&mut st, &g, 4, 1, 64).unwrap();
        assert!(l.keys.is_empty());
    }
}
