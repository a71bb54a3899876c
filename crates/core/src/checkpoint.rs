//! Index checkpoints: the live keys of the index, written as a chain of buckets taken from
//! the btree reserve. The journal records the newest checkpoint's head; replay starts after
//! it. Each bucket of the chain starts with a header block holding the crc64 of every data
//! block after it, so a damaged block is found before any key is used. See docs/format.md,
//! "Index checkpoints".
//!
//! A checkpoint is written while the set keeps serving requests: [`Writer`] takes keys in
//! index order a slice at a time and hands back a bucket's worth whenever one is full, so
//! a checkpoint of millions of keys never holds the engine long nor sits in memory whole.
//! The chain is therefore linked backwards: each bucket points at the one written before
//! it, and the head, written last, carries the total key count. The keys are a fuzzy
//! snapshot (slices taken at different moments); replaying the journal from the
//! checkpoint's `seq` on makes them exact, since every change made after the first slice
//! was taken is in an entry after that `seq`.

use crate::crc64::crc64;
use crate::error::{Error, ErrorKind, Result};
use crate::index::Key;
use crate::io::storage::Storage;
use crate::le::{u32_at, u64_at};

/// XORed with the set magic to give the magic of every checkpoint bucket of a set.
pub const CHECKPOINT_MAGIC: u64 = 0x6b63_7070_6b63_6875;
/// Format version in every header.
pub const CHECKPOINT_VERSION: u32 = 2;
/// Header bytes before the table of block checksums.
pub const CHECKPOINT_HEADER_BYTES: usize = 80;

const OFF_CSUM: usize = 0;
const OFF_MAGIC: usize = 8;
const OFF_SEQ: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_BLOCKS: usize = 28;
const OFF_KEYS: usize = 32;
const OFF_BYTES: usize = 40;
const OFF_NEXT: usize = 48;
const OFF_LINK: usize = 56;
const OFF_FLAGS: usize = 60;
/// Flag: this bucket is the head of its chain (written last, named by the journal).
const FLAG_HEAD: u32 = 1;
const OFF_THROUGH: usize = 64;
const OFF_PRIO_SEQ: usize = 72;

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

/// Writes one checkpoint: cuts keys, pushed in index order, into buckets and encodes each
/// bucket once the bucket to put it in is known (see the module docs).
pub struct Writer {
    g: CheckpointGeometry,
    seq: u64,
    prio_seq: u64,
    cur: Chunk,
    one: Vec<u8>,
    link: u32,
    prev_bucket: u64,
    through: u64,
}

impl Writer {
    /// A checkpoint covering journal entries up to `seq`, taken when the newest prio write
    /// begun had sequence number `prio_seq`.
    pub fn new(g: &CheckpointGeometry, seq: u64, prio_seq: u64) -> Writer {
        Writer {
            g: *g,
            seq,
            prio_seq,
            cur: Chunk { data: Vec::with_capacity(g.data_bytes()), keys: 0 },
            one: Vec::with_capacity(64),
            link: 0,
            prev_bucket: 0,
            through: 0,
        }
    }

    /// The journal seq the checkpoint covers.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends one key. Returns the bucket's worth of keys it filled, if this key did not
    /// fit after them: write it with [`Writer::encode`] before pushing more.
    pub fn push(&mut self, k: &Key) -> Result<Option<Chunk>> {
        self.one.clear();
        k.write_bkey_bytes(&mut self.one)?;
        let full = self.cur.data.len() + self.one.len() > self.g.data_bytes();
        let out = if full {
            let fresh = Chunk { data: Vec::with_capacity(self.g.data_bytes()), keys: 0 };
            Some(std::mem::replace(&mut self.cur, fresh))
        } else {
            None
        };
        self.cur.data.extend_from_slice(&self.one);
        self.cur.keys += 1;
        Ok(out)
    }

    /// Takes the keys pushed since the last full chunk: the head's, written last.
    pub fn finish(&mut self) -> Chunk {
        std::mem::take(&mut self.cur)
    }

    /// Encodes `chunk` as the next link of the chain, to be written at the start of
    /// `bucket`: header block and the data blocks used, nothing more. The `head` is the
    /// last link (the chunk [`Writer::finish`] gave).
    pub fn encode(&mut self, chunk: &Chunk, bucket: u64, head: bool, out: &mut Vec<u8>) -> Result<()> {
        if chunk.data.len() > self.g.data_bytes() {
            return Err(Error::new(ErrorKind::InvalidArgument, "checkpoint chunk larger than a bucket"));
        }
        let g = &self.g;
        let blocks = chunk.data.len().div_ceil(g.block_bytes);
        self.through += chunk.keys;
        out.clear();
        out.resize((1 + blocks) * g.block_bytes, 0);
        out[g.block_bytes..g.block_bytes + chunk.data.len()].copy_from_slice(&chunk.data);
        put64(out, OFF_MAGIC, g.magic());
        put64(out, OFF_SEQ, self.seq);
        out[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        out[OFF_BLOCKS..OFF_BLOCKS + 4].copy_from_slice(&(blocks as u32).to_le_bytes());
        put64(out, OFF_KEYS, chunk.keys);
        put64(out, OFF_BYTES, chunk.data.len() as u64);
        put64(out, OFF_NEXT, self.prev_bucket);
        out[OFF_LINK..OFF_LINK + 4].copy_from_slice(&self.link.to_le_bytes());
        out[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&(if head { FLAG_HEAD } else { 0 }).to_le_bytes());
        put64(out, OFF_THROUGH, self.through);
        put64(out, OFF_PRIO_SEQ, self.prio_seq);
        for i in 0..blocks {
            let b = (1 + i) * g.block_bytes;
            let c = crc64(&out[b..b + g.block_bytes]);
            put64(out, CHECKPOINT_HEADER_BYTES + 8 * i, c);
        }
        let end = CHECKPOINT_HEADER_BYTES + 8 * blocks;
        let c = crc64(&out[OFF_MAGIC..end]);
        put64(out, OFF_CSUM, c);
        self.link += 1;
        self.prev_bucket = bucket;
        Ok(())
    }
}

/// A checkpoint read back: its keys in order and the buckets of its chain.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Keys, in index order.
    pub keys: Vec<Key>,
    /// Buckets of the chain, head first.
    pub buckets: Vec<u64>,
    /// The prio write sequence number when the checkpoint was begun.
    pub prio_seq: u64,
}

/// Reads and checks the whole checkpoint chain whose head (its last-written bucket) is
/// `head` and which must carry `seq`, then decodes its keys. A chain longer than the device
/// has buckets, or looping, is corruption. Any damage is an error naming the bucket and block.
pub fn read(st: &mut dyn Storage, g: &CheckpointGeometry, head: u64, seq: u64, nbuckets: u64) -> Result<Loaded> {
    let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("checkpoint {seq}: {m}"));
    let mut out = Loaded::default();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut hdr = vec![0u8; g.block_bytes];
    let mut bucket = head;
    let mut expect: Option<(u32, u64)> = None;
    let mut total = 0;
    loop {
        if bucket == 0 || bucket >= nbuckets || out.buckets.contains(&bucket) {
            return Err(bad(format!("the chain reaches bucket {bucket} after {} links", out.buckets.len())));
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
        let version = u32_at(&hdr, OFF_VERSION);
        if version != CHECKPOINT_VERSION {
            return Err(bad(format!(
                "bucket {bucket}: format version {version}, this build reads {CHECKPOINT_VERSION}"
            )));
        }
        let (link, through, keys) = (u32_at(&hdr, OFF_LINK), u64_at(&hdr, OFF_THROUGH), u64_at(&hdr, OFF_KEYS));
        let is_head = u32_at(&hdr, OFF_FLAGS) & FLAG_HEAD != 0;
        if u64_at(&hdr, OFF_SEQ) != seq
            || expect.is_some_and(|(l, t)| (l, t) != (link, through))
            || is_head != expect.is_none()
        {
            return Err(bad(format!(
                "bucket {bucket} holds link {link} ({through} keys through it) of checkpoint {}, expected {}",
                u64_at(&hdr, OFF_SEQ),
                expect.map_or("the head".to_string(), |(l, t)| format!("link {l} ({t} keys)"))
            )));
        }
        if expect.is_none() {
            out.prio_seq = u64_at(&hdr, OFF_PRIO_SEQ);
            total = through;
        }
        let bytes = u64_at(&hdr, OFF_BYTES) as usize;
        if bytes > blocks * g.block_bytes || bytes.div_ceil(g.block_bytes) != blocks || keys > through {
            return Err(bad(format!("bucket {bucket}: {bytes} bytes of {keys} keys in {blocks} blocks")));
        }
        let mut data = vec![0u8; blocks * g.block_bytes];
        if blocks > 0 {
            st.read(base + g.block_bytes as u64, &mut data)?;
        }
        for i in 0..blocks {
            let b = &data[i * g.block_bytes..(i + 1) * g.block_bytes];
            if crc64(b) != u64_at(&hdr, CHECKPOINT_HEADER_BYTES + 8 * i) {
                return Err(bad(format!("bucket {bucket} block {}: checksum mismatch", i + 1)));
            }
        }
        data.truncate(bytes);
        chunks.push(data);
        out.buckets.push(bucket);
        let next = u64_at(&hdr, OFF_NEXT);
        if link == 0 {
            if next != 0 || through != keys {
                return Err(bad(format!("bucket {bucket}: the first link counts {through} keys but holds {keys}")));
            }
            break;
        }
        expect = Some((link - 1, through - keys));
        bucket = next;
    }
    let mut bytes = Vec::with_capacity(chunks.iter().map(Vec::len).sum());
    for c in chunks.iter().rev() {
        bytes.extend_from_slice(c);
    }
    out.keys = crate::journal::jset::decode_keys(&bytes).map_err(|e| bad(e.message().to_string()))?;
    if out.keys.len() as u64 != total {
        return Err(bad(format!("decoded {} keys, the head counts {total}", out.keys.len())));
    }
    Ok(out)
}

/// The buckets of the checkpoint chain whose head is `head` and the prio sequence number it
/// carries, from the headers alone (data blocks are not read or checked): for keeping an
/// older checkpoint's buckets from reuse while replay may still fall back to it.
pub fn chain(
    st: &mut dyn Storage,
    g: &CheckpointGeometry,
    head: u64,
    seq: u64,
    nbuckets: u64,
) -> Result<(Vec<u64>, u64)> {
    let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("checkpoint {seq}: {m}"));
    let mut hdr = vec![0u8; g.block_bytes];
    let (mut buckets, mut prio_seq, mut bucket, mut expect) = (Vec::new(), 0, head, None);
    loop {
        if bucket == 0 || bucket >= nbuckets || buckets.contains(&bucket) {
            return Err(bad(format!("the chain reaches bucket {bucket}")));
        }
        st.read(bucket * g.bucket_bytes as u64, &mut hdr)?;
        let blocks = u32_at(&hdr, OFF_BLOCKS) as usize;
        let end = CHECKPOINT_HEADER_BYTES + 8 * blocks.min(g.data_blocks());
        let link = u32_at(&hdr, OFF_LINK);
        let is_head = u32_at(&hdr, OFF_FLAGS) & FLAG_HEAD != 0;
        if u64_at(&hdr, OFF_MAGIC) != g.magic()
            || is_head != expect.is_none()
            || blocks > g.data_blocks()
            || crc64(&hdr[OFF_MAGIC..end]) != u64_at(&hdr, OFF_CSUM)
            || u64_at(&hdr, OFF_SEQ) != seq
            || expect.is_some_and(|l| l != link)
        {
            return Err(bad(format!("bucket {bucket} is not link {expect:?} of it")));
        }
        if expect.is_none() {
            prio_seq = u64_at(&hdr, OFF_PRIO_SEQ);
        }
        buckets.push(bucket);
        if link == 0 {
            return Ok((buckets, prio_seq));
        }
        expect = Some(link - 1);
        bucket = u64_at(&hdr, OFF_NEXT);
    }
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Ptr;
    use crate::io::storage::MemStorage;

    fn keys(n: u64) -> Vec<Key> {
        (0..n).map(|i| Key::new(1, i * 8, 8, Ptr::new(0, 64 + i * 8, 1).unwrap()).with_dirty(i % 2 == 0)).collect()
    }

    /// Writes `ks` through a Writer into `buckets` (in write order); returns the head.
    fn write(st: &mut MemStorage, g: &CheckpointGeometry, ks: &[Key], buckets: &[u64], seq: u64) -> u64 {
        let mut w = Writer::new(g, seq, 77);
        let mut buf = Vec::new();
        let mut used = 0;
        for k in ks {
            if let Some(c) = w.push(k).unwrap() {
                w.encode(&c, buckets[used], false, &mut buf).unwrap();
                st.write(buckets[used] * g.bucket_bytes as u64, &buf).unwrap();
                used += 1;
            }
        }
        let c = w.finish();
        w.encode(&c, buckets[used], true, &mut buf).unwrap();
        st.write(buckets[used] * g.bucket_bytes as u64, &buf).unwrap();
        assert_eq!(used + 1, buckets.len(), "buckets used");
        buckets[used]
    }

    #[test]
    fn round_trip_over_several_buckets_and_damage() {
        let g = CheckpointGeometry { bucket_bytes: 8192, block_bytes: 4096, set_magic: 5 };
        let ks = keys(400);
        let buckets = [7, 3, 11];
        let mut st = MemStorage::new(64 * 8192);
        let head = write(&mut st, &g, &ks, &buckets, 9);
        assert_eq!(head, 11);
        let l = read(&mut st, &g, head, 9, 64).unwrap();
        assert_eq!(l.keys, ks);
        assert_eq!(l.buckets, [11, 3, 7]);
        assert_eq!(l.prio_seq, 77);
        assert!(read(&mut st, &g, head, 8, 64).unwrap_err().message().contains("of checkpoint 9"));
        // Starting anywhere but the head is refused.
        assert!(read(&mut st, &g, 3, 9, 64).is_err());
        assert_eq!(chain(&mut st, &g, head, 9, 64).unwrap(), (vec![11, 3, 7], 77));
        assert!(chain(&mut st, &g, 3, 9, 64).is_err());
        // A flipped byte in a data block of the middle link.
        let mut blk = vec![0u8; 4096];
        st.read(3 * 8192 + 4096, &mut blk).unwrap();
        blk[100] ^= 1;
        st.write(3 * 8192 + 4096, &blk).unwrap();
        let e = read(&mut st, &g, head, 9, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("bucket 3 block 1"), "{e}");
    }

    #[test]
    fn a_lost_link_is_found() {
        let g = CheckpointGeometry { bucket_bytes: 8192, block_bytes: 4096, set_magic: 5 };
        let ks = keys(400);
        let mut st = MemStorage::new(64 * 8192);
        let head = write(&mut st, &g, &ks, &[7, 3, 11], 9);
        // The first link written never made it: its bucket holds something else.
        st.write(7 * 8192, &[0u8; 8192]).unwrap();
        let e = read(&mut st, &g, head, 9, 64).unwrap_err();
        assert!(e.message().contains("bucket 7 is not a checkpoint bucket"), "{e}");
    }

    #[test]
    fn empty_checkpoint() {
        let g = CheckpointGeometry { bucket_bytes: 8192, block_bytes: 4096, set_magic: 5 };
        let mut st = MemStorage::new(64 * 8192);
        let head = write(&mut st, &g, &[], &[4], 1);
        let l = read(&mut st, &g, head, 1, 64).unwrap();
        assert!(l.keys.is_empty());
        assert_eq!(l.buckets, [4]);
    }
}
