//! bcache's `bch_crc64`: CRC-64/WE (ECMA-182 polynomial 0x42f0e1eba9ea3693, MSB-first,
//! init and xorout all ones). Every on-disk checksum in bcache uses it: superblock, prio
//! buckets, journal entries, btree nodes.
//!
//! The work is done by `crc-fast`, which picks a carry-less-multiply kernel at run time
//! (VPCLMULQDQ/AVX-512, PCLMULQDQ, or NEON PMULL) and falls back to tables elsewhere.

use crc_fast::{CrcAlgorithm, Digest};

/// One-shot CRC-64/WE of `data`.
#[inline]
pub fn crc64(data: &[u8]) -> u64 {
    crc_fast::checksum(CrcAlgorithm::Crc64We, data)
}

/// Incremental CRC-64/WE, for checksums built from pieces (a journal entry's header and its
/// keys, a bucket written block by block). Feeding the pieces in order gives the same value
/// as [`crc64`] over their concatenation.
#[derive(Clone)]
pub struct Crc64 {
    digest: Digest,
}

impl Default for Crc64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc64 {
    /// A checksum over nothing yet.
    pub fn new() -> Self {
        Crc64 { digest: Digest::new(CrcAlgorithm::Crc64We) }
    }

    /// Adds `data` after everything fed so far.
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.digest.update(data);
    }

    /// The checksum of everything fed so far; more may still be fed afterwards.
    #[inline]
    pub fn finish(&self) -> u64 {
        self.digest.finalize()
    }

    /// Forgets everything fed so far.
    pub fn reset(&mut self) {
        self.digest.reset();
    }
}

/// Name of the kernel `crc-fast` selected on this CPU, for benchmark reports.
pub fn implementation() -> String {
    crc_fast::get_calculator_target(CrcAlgorithm::Crc64We)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TABLE: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_WE);

    #[test]
    fn check_value() {
        assert_eq!(crc64(b"123456789"), 0x62ec_59e3_f1a4_f00a);
    }

    #[test]
    fn empty_input() {
        assert_eq!(crc64(b""), TABLE.checksum(b""));
        assert_eq!(Crc64::new().finish(), crc64(b""));
    }

    #[test]
    fn known_vectors_match_table_implementation() {
        let mut buf = vec![0u8; 1 << 20];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761) >> 13) as u8;
        }
        for len in [1usize, 7, 8, 15, 16, 63, 64, 65, 255, 256, 4095, 4096, 65536, 1 << 20] {
            assert_eq!(crc64(&buf[..len]), TABLE.checksum(&buf[..len]), "len {len}");
            assert_eq!(crc64(&buf[3..len.max(3)]), TABLE.checksum(&buf[3..len.max(3)]), "unaligned len {len}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut c = Crc64::new();
        c.update(b"garbage");
        c.reset();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0x62ec_59e3_f1a4_f00a);
    }

    proptest! {
        #[test]
        fn one_shot_matches_table(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert_eq!(crc64(&data), TABLE.checksum(&data));
        }

        #[test]
        fn incremental_equals_one_shot(
            data in proptest::collection::vec(any::<u8>(), 0..20000),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            points.sort_unstable();
            let mut c = Crc64::new();
            let mut prev = 0;
            for p in points {
                c.update(&data[prev..p]);
                prev = p;
            }
            c.update(&data[prev..]);
            prop_assert_eq!(c.finish(), crc64(&data));
        }
    }
}
