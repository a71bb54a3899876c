//! The prio bucket format (bcache's `prio_set`): every bucket's prio and gen, spread over a
//! chain of buckets on the cache device. Each prio bucket starts with a 40-byte header and
//! then holds 3-byte entries for consecutive buckets; the chain's head is recorded in the
//! journal. See `docs/format.md`, "Prio buckets".

use super::bucket::Bucket;
use crate::crc64::crc64;
use crate::error::{Error, ErrorKind, Result};

/// XORed with the set magic (the first 8 bytes of the set UUID, little endian) to give the
/// magic of every prio bucket of that cache set.
pub const PSET_MAGIC: u64 = 0x6750_e15f_8733_7f91;
/// Bytes before the first entry: csum, magic, seq, version, pad, next_bucket.
pub const PRIO_SET_HEADER_BYTES: usize = 40;
/// Bytes per entry: prio (u16 LE) then gen (u8), packed.
pub const PRIO_ENTRY_BYTES: usize = 3;
/// Version written in the header (bcache leaves it zero and never checks it).
pub const PRIO_SET_VERSION: u32 = 0;

const OFF_CSUM: usize = 0;
const OFF_MAGIC: usize = 8;
const OFF_SEQ: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_PAD: usize = 28;
const OFF_NEXT: usize = 32;

/// The set magic: the set UUID's first 8 bytes read as a little-endian u64.
pub fn set_magic(set_uuid: &[u8; 16]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&set_uuid[..8]);
    u64::from_le_bytes(b)
}

/// Magic of the prio buckets of the cache set with this UUID.
pub fn pset_magic(set_uuid: &[u8; 16]) -> u64 {
    set_magic(set_uuid) ^ PSET_MAGIC
}

/// How many bucket entries fit in one prio bucket of `bucket_bytes` bytes.
pub fn prios_per_bucket(bucket_bytes: usize) -> usize {
    bucket_bytes.saturating_sub(PRIO_SET_HEADER_BYTES) / PRIO_ENTRY_BYTES
}

/// How many prio buckets a chain needs for `nbuckets` buckets (0 if a bucket cannot hold one
/// entry).
pub fn prio_buckets(nbuckets: u64, bucket_bytes: usize) -> usize {
    let per = prios_per_bucket(bucket_bytes) as u64;
    if per == 0 {
        return 0;
    }
    nbuckets.div_ceil(per) as usize
}

/// One prio bucket's header, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrioSetHeader {
    pub csum: u64,
    pub magic: u64,
    pub seq: u64,
    pub version: u32,
    pub next_bucket: u64,
}

/// Writes one prio bucket into `buf` (the whole bucket): the header, the `(prio, gen)` entries
/// in order, zeroes after them, and the checksum last. Fails if `buf` is too small or more
/// entries are given than fit.
pub fn encode_prio_set<I>(buf: &mut [u8], magic: u64, seq: u64, next_bucket: u64, entries: I) -> Result<()>
where
    I: IntoIterator<Item = (u16, u8)>,
{
    if buf.len() < PRIO_SET_HEADER_BYTES + PRIO_ENTRY_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("prio bucket buffer of {} bytes cannot hold a header and one entry", buf.len()),
        ));
    }
    let per = prios_per_bucket(buf.len());
    write_header(buf, magic, seq, next_bucket);
    let body = &mut buf[PRIO_SET_HEADER_BYTES..];
    let mut used = 0;
    let mut slots = body.chunks_exact_mut(PRIO_ENTRY_BYTES);
    for (prio, gen) in entries {
        let Some(slot) = slots.next() else {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("more than {per} entries for one prio bucket")));
        };
        let p = prio.to_le_bytes();
        slot.copy_from_slice(&[p[0], p[1], gen]);
        used += 1;
    }
    body[used * PRIO_ENTRY_BYTES..].fill(0);
    seal(buf);
    Ok(())
}

/// Writes everything of the header but the checksum.
pub(crate) fn write_header(buf: &mut [u8], magic: u64, seq: u64, next_bucket: u64) {
    buf[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&magic.to_le_bytes());
    buf[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    buf[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&PRIO_SET_VERSION.to_le_bytes());
    buf[OFF_PAD..OFF_PAD + 4].fill(0);
    buf[OFF_NEXT..OFF_NEXT + 8].copy_from_slice(&next_bucket.to_le_bytes());
}

/// Writes the `(prio, gen)` entries of `src` at the start of `out` (a prio bucket's body:
/// `src.len() * 3` bytes, plus scratch bytes after them that may be overwritten with zeroes).
pub(crate) fn encode_entries(src: &[Bucket], out: &mut [u8]) {
    assert!(out.len() >= src.len() * PRIO_ENTRY_BYTES, "prio bucket body too small");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("ssse3") {
            // SAFETY: the CPU has SSSE3, checked just above.
            done = unsafe { encode_entries_ssse3(src, out) };
        }
    }
    encode_entries_scalar(&src[done..], &mut out[done * PRIO_ENTRY_BYTES..]);
}

/// Four entries (12 bytes) per store, in fixed-size pieces the compiler checks once.
pub(crate) fn encode_entries_scalar(src: &[Bucket], out: &mut [u8]) {
    let used = src.len() * PRIO_ENTRY_BYTES;
    let mut outs = out[..used].chunks_exact_mut(12);
    let mut ins = src.chunks_exact(4);
    for (o, four) in (&mut outs).zip(&mut ins) {
        let mut w = [0u8; 12];
        for (k, b) in four.iter().enumerate() {
            let p = b.prio.to_le_bytes();
            w[k * 3] = p[0];
            w[k * 3 + 1] = p[1];
            w[k * 3 + 2] = b.gen;
        }
        o.copy_from_slice(&w);
    }
    for (o, b) in outs.into_remainder().chunks_exact_mut(3).zip(ins.remainder()) {
        let p = b.prio.to_le_bytes();
        o.copy_from_slice(&[p[0], p[1], b.gen]);
    }
}

/// Four buckets (32 bytes) become 12 bytes of entries with two byte shuffles: from each
/// 8-byte bucket, bytes 0 and 1 (prio, little endian) and byte 6 (gen). Each 16-byte store
/// leaves 4 zero bytes that the next store overwrites. Returns how many entries it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn encode_entries_ssse3(src: &[Bucket], out: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    const _: () = assert!(std::mem::size_of::<Bucket>() == 8);
    let first_two = _mm_setr_epi8(0, 1, 6, 8, 9, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    let last_two = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 0, 1, 6, 8, 9, 14, -1, -1, -1, -1);
    let mut k = 0;
    while k + 4 <= src.len() && k * PRIO_ENTRY_BYTES + 16 <= out.len() {
        // SAFETY: src[k..k + 4] is in bounds (32 plain bytes: Bucket is repr(C), 8 bytes, no
        // padding) and out[3k..3k + 16] is in bounds, both checked by the loop condition;
        // loadu and storeu have no alignment requirement.
        unsafe {
            let a = _mm_loadu_si128(src.as_ptr().add(k).cast::<__m128i>());
            let b = _mm_loadu_si128(src.as_ptr().add(k + 2).cast::<__m128i>());
            let v = _mm_or_si128(_mm_shuffle_epi8(a, first_two), _mm_shuffle_epi8(b, last_two));
            _mm_storeu_si128(out.as_mut_ptr().add(k * PRIO_ENTRY_BYTES).cast::<__m128i>(), v);
        }
        k += 4;
    }
    k
}

/// Recomputes and stores the checksum: crc64 over everything after the csum field.
pub fn seal(buf: &mut [u8]) {
    let csum = crc64(&buf[OFF_MAGIC..]);
    buf[OFF_CSUM..OFF_CSUM + 8].copy_from_slice(&csum.to_le_bytes());
}

/// Reads and checks a prio bucket's header: the checksum first (a torn or foreign bucket),
/// then the magic (a bucket of another cache set). `bucket` only names the bucket in errors.
pub fn decode_prio_set_header(buf: &[u8], magic: u64, bucket: u64) -> Result<PrioSetHeader> {
    if buf.len() < PRIO_SET_HEADER_BYTES + PRIO_ENTRY_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("prio bucket {bucket}: buffer of {} bytes is too small", buf.len()),
        ));
    }
    let h = PrioSetHeader {
        csum: le64(buf, OFF_CSUM),
        magic: le64(buf, OFF_MAGIC),
        seq: le64(buf, OFF_SEQ),
        version: u32::from_le_bytes(buf[OFF_VERSION..OFF_VERSION + 4].try_into().unwrap()),
        next_bucket: le64(buf, OFF_NEXT),
    };
    let want = crc64(&buf[OFF_MAGIC..]);
    if h.csum != want {
        return Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!("prio bucket {bucket}: checksum {:#018x}, computed {want:#018x}", h.csum),
        ));
    }
    if h.magic != magic {
        return Err(Error::new(
            ErrorKind::MagicMismatch,
            format!("prio bucket {bucket}: magic {:#018x}, expected {magic:#018x}", h.magic),
        ));
    }
    Ok(h)
}

/// The `i`-th `(prio, gen)` entry of a prio bucket.
#[inline]
pub fn prio_entry(buf: &[u8], i: usize) -> (u16, u8) {
    let o = PRIO_SET_HEADER_BYTES + i * PRIO_ENTRY_BYTES;
    (u16::from_le_bytes([buf[o], buf[o + 1]]), buf[o + 2])
}

fn le64(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(buf[off..off + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_bcache() {
        // 512 KiB buckets: (524288 - 40) / 3 entries.
        assert_eq!(prios_per_bucket(512 << 10), 174_749);
        assert_eq!(prio_buckets(1 << 20, 512 << 10), 7);
        assert_eq!(prio_buckets(174_749, 512 << 10), 1);
        assert_eq!(prio_buckets(174_750, 512 << 10), 2);
    }

    #[test]
    fn header_layout_is_little_endian_at_fixed_offsets() {
        let mut buf = vec![0xAAu8; 4096];
        encode_prio_set(&mut buf, 0x1122_3344_5566_7788, 9, 77, [(0x0102, 3), (0xFFFF, 255)]).unwrap();
        assert_eq!(&buf[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&buf[16..24], &9u64.to_le_bytes());
        assert_eq!(&buf[24..32], &[0; 8]);
        assert_eq!(&buf[32..40], &77u64.to_le_bytes());
        assert_eq!(&buf[40..46], &[0x02, 0x01, 3, 0xFF, 0xFF, 255]);
        assert!(buf[46..].iter().all(|&b| b == 0));
        assert_eq!(&buf[0..8], &crc64(&buf[8..]).to_le_bytes());
        let h = decode_prio_set_header(&buf, 0x1122_3344_5566_7788, 5).unwrap();
        assert_eq!((h.seq, h.next_bucket, h.version), (9, 77, 0));
        assert_eq!(prio_entry(&buf, 1), (0xFFFF, 255));
    }

    #[test]
    fn corruption_and_foreign_magic_are_refused() {
        let mut buf = vec![0u8; 4096];
        encode_prio_set(&mut buf, 42, 1, 0, [(1, 1)]).unwrap();
        let e = decode_prio_set_header(&buf, 43, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MagicMismatch);
        buf[100] ^= 1;
        let e = decode_prio_set_header(&buf, 42, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch);
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let mut buf = vec![0u8; 46];
        assert!(encode_prio_set(&mut buf, 0, 0, 0, [(1, 1), (2, 2)]).is_ok());
        assert!(encode_prio_set(&mut buf, 0, 0, 0, [(1, 1), (2, 2), (3, 3)]).is_err());
    }

    #[test]
    fn fast_entry_encoding_matches_the_format() {
        for n in [0usize, 1, 3, 4, 5, 17, 1000, 1003] {
            let src: Vec<Bucket> = (0..n)
                .map(|i| Bucket {
                    prio: (i as u16).wrapping_mul(40503),
                    gen: (i * 7) as u8,
                    pin: 3,
                    gc: 0xFFFF,
                    last_gc: 9,
                })
                .collect();
            for slack in [0usize, 1, 5, 20] {
                let mut fast = vec![0xEEu8; n * 3 + slack];
                encode_entries(&src, &mut fast);
                let mut want = vec![0xEEu8; n * 3 + slack];
                encode_prio_set_body(&src, &mut want);
                assert_eq!(&fast[..n * 3], &want[..n * 3], "n {n} slack {slack}");
            }
        }
    }

    fn encode_prio_set_body(src: &[Bucket], out: &mut [u8]) {
        for (i, b) in src.iter().enumerate() {
            out[i * 3..i * 3 + 2].copy_from_slice(&b.prio.to_le_bytes());
            out[i * 3 + 2] = b.gen;
        }
    }

    #[test]
    fn set_magic_is_first_half_of_uuid_le() {
        let mut u = [0u8; 16];
        u[0] = 1;
        u[7] = 0x80;
        u[8] = 0xFF;
        assert_eq!(set_magic(&u), 0x8000_0000_0000_0001);
        assert_eq!(pset_magic(&u), 0x8000_0000_0000_0001 ^ PSET_MAGIC);
    }
}
