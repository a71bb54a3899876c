//! The few superblock fields the cache set's open sequence needs, read from the 4096-byte
//! page at byte 4096, and a patcher that sets `CACHE_SYNC` and bumps `seq` (the full parser
//! and writer live in ts/superblock.ts; layout in docs/format.md, "Superblock").

use crate::crc64::crc64;
use crate::error::{Error, ErrorKind, Result};
use crate::le::{u16_at, u64_at};

/// Byte offset of the superblock on a device.
pub const SB_OFFSET: u64 = 4096;
/// Bytes of the superblock page.
pub const SB_BYTES: usize = 4096;
/// bcache's superblock magic.
pub const BCACHE_MAGIC: [u8; 16] =
    [0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81];
/// `flags` bit 0: the set has run; journal and prios are valid.
pub const CACHE_SYNC: u64 = 1;
const SB_JOURNAL_BUCKETS: usize = 256;

/// The cache device superblock fields the cache set uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSb {
    /// Cache set UUID.
    pub set_uuid: [u8; 16],
    /// Flags word (`CACHE_SYNC`, discard, replacement).
    pub flags: u64,
    /// Bumped on every superblock write.
    pub seq: u64,
    /// Buckets on the device.
    pub nbuckets: u64,
    /// Block size in sectors.
    pub block_size: u32,
    /// Bucket size in sectors.
    pub bucket_size: u32,
    /// Cache devices in the set.
    pub nr_in_set: u16,
    /// This device's index.
    pub nr_this_dev: u16,
    /// First bucket after the superblock.
    pub first_bucket: u64,
    /// Journal buckets (`d[0..keys]`).
    pub journal_buckets: Vec<u64>,
}

impl CacheSb {
    /// True when `CACHE_SYNC` is set.
    pub fn sync(&self) -> bool {
        self.flags & CACHE_SYNC != 0
    }

    /// Replacement policy bits (2-4).
    pub fn replacement(&self) -> u64 {
        (self.flags >> 2) & 7
    }

    /// Discard flag (bit 1).
    pub fn discard(&self) -> bool {
        self.flags & 2 != 0
    }

    /// The flags word with replacement policy bits `replacement` and the discard flag.
    pub fn flags_with(&self, replacement: u64, discard: bool) -> u64 {
        (self.flags & !(2 | 7 << 2)) | (replacement & 7) << 2 | u64::from(discard) << 1
    }
}

/// bcache's superblock checksum: crc64 over bytes 8 up to the end of `d[keys]`.
fn sb_csum(page: &[u8], keys: usize) -> u64 {
    crc64(&page[8..208 + 8 * keys])
}

fn bad(m: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("superblock: {m}"))
}

/// Parses a cache device superblock page (checks offset, magic, csum and the version).
pub fn parse(page: &[u8]) -> Result<CacheSb> {
    if page.len() < SB_BYTES {
        return Err(bad(format!("{} bytes, need {SB_BYTES}", page.len())));
    }
    if u64_at(page, 8) != 8 || page[24..40] != BCACHE_MAGIC {
        return Err(Error::new(ErrorKind::MagicMismatch, "superblock: not a bcache device"));
    }
    let keys = u16_at(page, 206) as usize;
    if keys > SB_JOURNAL_BUCKETS {
        return Err(bad(format!("{keys} journal buckets")));
    }
    if sb_csum(page, keys) != u64_at(page, 0) {
        return Err(Error::new(ErrorKind::ChecksumMismatch, "superblock: checksum mismatch"));
    }
    let version = u64_at(page, 16);
    let mut bucket_size = u32::from(u16_at(page, 194));
    match version {
        0 | 3 => {}
        5 => {
            let incompat = u64_at(page, 128);
            if incompat & 2 != 0 {
                bucket_size = 1u32.checked_shl(bucket_size).ok_or_else(|| bad("log2 bucket size too large".into()))?;
            } else if incompat & 1 != 0 {
                bucket_size |= u32::from(u16_at(page, 2256)) << 16;
            }
        }
        v => return Err(bad(format!("version {v} is not a cache device"))),
    }
    let mut set_uuid = [0u8; 16];
    set_uuid.copy_from_slice(&page[56..72]);
    Ok(CacheSb {
        set_uuid,
        flags: u64_at(page, 104),
        seq: u64_at(page, 112),
        nbuckets: u64_at(page, 184),
        block_size: u32::from(u16_at(page, 192)),
        bucket_size,
        nr_in_set: u16_at(page, 196),
        nr_this_dev: u16_at(page, 198),
        first_bucket: u64::from(u16_at(page, 204)),
        journal_buckets: (0..keys).map(|i| u64_at(page, 208 + 8 * i)).collect(),
    })
}

/// Sets `CACHE_SYNC`, bumps `seq` and recomputes the checksum of a superblock page in place.
pub fn mark_sync(page: &mut [u8]) -> Result<CacheSb> {
    let sb = parse(page)?;
    set_flags(page, sb.flags)
}

/// Rewrites the page with `flags` (and `CACHE_SYNC`), the next `seq` and its checksum.
pub fn set_flags(page: &mut [u8], flags: u64) -> Result<CacheSb> {
    let sb = parse(page)?;
    page[104..112].copy_from_slice(&(flags | CACHE_SYNC).to_le_bytes());
    page[112..120].copy_from_slice(&(sb.seq + 1).to_le_bytes());
    let keys = sb.journal_buckets.len();
    let c = sb_csum(page, keys);
    page[0..8].copy_from_slice(&c.to_le_bytes());
    parse(page)
}

/// A version 3 cache superblock laid out as `ubcache make` writes it: `first_bucket` the
/// first bucket past the superblock, `clamp(nbuckets >> 7, 2, 256)` journal buckets after it,
/// `CACHE_SYNC` clear. For tests and benchmarks that need a formatted device.
pub fn format(uuid: [u8; 16], set_uuid: [u8; 16], nbuckets: u64, bucket_size: u16, block_size: u16) -> Vec<u8> {
    let keys = (nbuckets >> 7).clamp(2, 256) as usize;
    format_with_journal(uuid, set_uuid, nbuckets, bucket_size, block_size, keys)
}

/// [`format`] with `journal_buckets` journal buckets (at most 256) instead of bcache's
/// default count.
pub fn format_with_journal(
    uuid: [u8; 16],
    set_uuid: [u8; 16],
    nbuckets: u64,
    bucket_size: u16,
    block_size: u16,
    journal_buckets: usize,
) -> Vec<u8> {
    let mut p = vec![0u8; SB_BYTES];
    p[8..16].copy_from_slice(&8u64.to_le_bytes());
    p[16..24].copy_from_slice(&3u64.to_le_bytes());
    p[24..40].copy_from_slice(&BCACHE_MAGIC);
    p[40..56].copy_from_slice(&uuid);
    p[56..72].copy_from_slice(&set_uuid);
    p[184..192].copy_from_slice(&nbuckets.to_le_bytes());
    p[192..194].copy_from_slice(&block_size.to_le_bytes());
    p[194..196].copy_from_slice(&bucket_size.to_le_bytes());
    p[196..198].copy_from_slice(&1u16.to_le_bytes());
    let first = 23 / bucket_size + 1;
    p[204..206].copy_from_slice(&first.to_le_bytes());
    let keys = journal_buckets.min(256);
    p[206..208].copy_from_slice(&(keys as u16).to_le_bytes());
    for i in 0..keys {
        p[208 + 8 * i..216 + 8 * i].copy_from_slice(&(u64::from(first) + i as u64).to_le_bytes());
    }
    let c = sb_csum(&p, keys);
    p[0..8].copy_from_slice(&c.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A superblock built byte by byte from docs/format.md, independent of [`format`].
    fn by_hand() -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[8] = 8; // offset
        p[16] = 3; // version
        p[24..40].copy_from_slice(&[
            0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
        ]);
        p[40..56].fill(1);
        p[56..72].fill(2);
        p[184..192].copy_from_slice(&1024u64.to_le_bytes());
        p[192] = 8; // block size
        p[194] = 16; // bucket size
        p[196] = 1; // nr_in_set
        p[204] = 2; // first bucket: 23/16 + 1
        p[206] = 8; // keys: 1024 >> 7
        for i in 0..8u64 {
            p[208 + 8 * i as usize] = 2 + i as u8;
        }
        let c = crate::crc64::crc64(&p[8..208 + 64]);
        p[0..8].copy_from_slice(&c.to_le_bytes());
        p
    }

    #[test]
    fn format_matches_the_documented_layout() {
        let p = by_hand();
        assert_eq!(format([1; 16], [2; 16], 1024, 16, 8), p);
        let sb = parse(&p).unwrap();
        assert_eq!(sb.journal_buckets, (2..10).collect::<Vec<_>>());
        assert_eq!((sb.bucket_size, sb.block_size, sb.first_bucket, sb.nbuckets), (16, 8, 2, 1024));
        assert!(!sb.sync());
    }

    #[test]
    fn mark_sync_sets_the_flag_bumps_seq_and_reseals() {
        let mut p = by_hand();
        let sb = mark_sync(&mut p).unwrap();
        assert!(sb.sync());
        assert_eq!(sb.seq, 1);
        assert_eq!(p[104], 1);
        assert_eq!(p[112], 1);
        assert_eq!(u64_at(&p, 0), crate::crc64::crc64(&p[8..272]));
        assert_eq!(mark_sync(&mut p).unwrap().seq, 2);
        p[150] = 1;
        assert_eq!(parse(&p).unwrap_err().kind(), ErrorKind::ChecksumMismatch);
    }
}
