//! bcache's `bch_crc64`: CRC-64/WE (ECMA-182 polynomial 0x42f0e1eba9ea3693, MSB-first,
//! init and xorout all ones). Every on-disk checksum in bcache uses it: superblock, prio
//! buckets, journal entries, btree nodes.
//!
//! Two engines do the work:
//!
//! * On x86-64 CPUs with AVX2 and VPCLMULQDQ, inputs of 16 bytes or more go to our own
//!   folding kernel (`vpclmul` below), which multiplies 256-bit registers (two 128-bit lanes
//!   at a time) with eight independent accumulators. `crc-fast` only uses VPCLMULQDQ together
//!   with AVX-512VL, so on AVX2-only machines (Zen 3, many VMs) it stays on 128-bit PCLMULQDQ;
//!   on a Zen 3 VM this kernel is about twice as fast from 4 KiB up and faster from 16 bytes.
//!   CPUs with AVX-512VL keep `crc-fast`'s own VPCLMULQDQ kernel.
//! * Everything else (short inputs, other CPUs, other architectures) goes to `crc-fast`,
//!   which picks a carry-less-multiply kernel at run time (VPCLMULQDQ/AVX-512, PCLMULQDQ or
//!   NEON PMULL) and falls back to tables elsewhere.
//!
//! Both engines work on the raw CRC register (before the final xorout), so an incremental
//! [`Crc64`] can hand any piece to either of them.

use crc_fast::{CrcAlgorithm, Digest};

/// The generator polynomial without its x^64 term, MSB-first.
const POLY: u64 = 0x42f0_e1eb_a9ea_3693;
/// Initial register value.
const INIT: u64 = !0;
/// Value XORed into the register to give the checksum.
const XOROUT: u64 = !0;

/// Inputs (and incremental pieces) at least this long use the VPCLMULQDQ kernel when the CPU
/// has it; it needs one whole 16-byte block, and from there on it beats `crc-fast`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const SIMD_MIN_LEN: usize = 16;

/// One-shot CRC-64/WE of `data`.
#[inline]
pub fn crc64(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= SIMD_MIN_LEN && vpclmul::preferred() {
        // SAFETY: `preferred()` implies `supported()`: the CPU was found at run time to have
        // every feature the kernel is compiled with (avx2, vpclmulqdq, pclmulqdq, sse4.1).
        return unsafe { vpclmul::update(INIT, data) } ^ XOROUT;
    }
    crc_fast::checksum(CrcAlgorithm::Crc64We, data)
}

/// Advances the raw CRC register `reg` (no xorout applied) over `data`, with the fastest
/// engine this CPU has for a piece of that length.
#[inline]
pub(crate) fn update(reg: u64, data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= SIMD_MIN_LEN && vpclmul::preferred() {
        // SAFETY: `preferred()` implies the kernel's target features were found at run time.
        return unsafe { vpclmul::update(reg, data) };
    }
    fallback_update(reg, data)
}

/// Advances the raw CRC register `reg` over `data` with `crc-fast`. Any length, any CPU.
#[inline]
fn fallback_update(reg: u64, data: &[u8]) -> u64 {
    if data.is_empty() {
        return reg;
    }
    let mut digest = Digest::new_with_init_state(CrcAlgorithm::Crc64We, reg);
    digest.update(data);
    digest.get_state()
}

/// Incremental CRC-64/WE, for checksums built from pieces (a journal entry's header and its
/// keys, a bucket written block by block). Feeding the pieces in order gives the same value
/// as [`crc64`] over their concatenation.
#[derive(Clone, Debug)]
pub struct Crc64 {
    /// The raw CRC register over everything fed so far (xorout not applied).
    reg: u64,
}

impl Default for Crc64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc64 {
    /// A checksum over nothing yet.
    pub fn new() -> Self {
        Crc64 { reg: INIT }
    }

    /// Adds `data` after everything fed so far.
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.reg = update(self.reg, data);
    }

    /// The checksum of everything fed so far; more may still be fed afterwards.
    #[inline]
    pub fn finish(&self) -> u64 {
        self.reg ^ XOROUT
    }

    /// Forgets everything fed so far.
    pub fn reset(&mut self) {
        self.reg = INIT;
    }
}

/// Name of the kernel that checksums large inputs on this CPU, for benchmark reports. When
/// our AVX2/VPCLMULQDQ kernel is in use, the `crc-fast` kernel that handles shorter inputs
/// is named after it.
pub fn implementation() -> String {
    let fast = crc_fast::get_calculator_target(CrcAlgorithm::Crc64We);
    #[cfg(target_arch = "x86_64")]
    if vpclmul::preferred() {
        return format!("{} (< {SIMD_MIN_LEN} B: crc-fast {fast})", vpclmul::NAME);
    }
    fast
}

/// x^n mod P, as a polynomial of degree < 64 (bit i = coefficient of x^i).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn xpow_mod(n: u32) -> u64 {
    let mut r: u64 = 1;
    let mut i = 0;
    while i < n {
        let carry = r >> 63;
        r <<= 1;
        if carry != 0 {
            r ^= POLY;
        }
        i += 1;
    }
    r
}

/// floor(x^128 / P) without its x^64 term: the Barrett constant for reducing 128 bits to 64.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn barrett_mu() -> u64 {
    // Long division of x^128 by P = x^64 + POLY. The quotient's x^64 bit is always set and
    // leaves the dividend as POLY * x^64; the remaining 64 quotient bits follow.
    let p: u128 = (1u128 << 64) | POLY as u128;
    let mut rem: u128 = (POLY as u128) << 64;
    let mut q: u64 = 0;
    let mut i = 64;
    while i > 0 {
        i -= 1;
        if (rem >> (64 + i)) & 1 != 0 {
            q |= 1 << i;
            rem ^= p << i;
        }
    }
    q
}

/// The AVX2 + VPCLMULQDQ folding kernel.
///
/// The message is a polynomial M over GF(2) whose first bit is its highest coefficient; the
/// CRC register after it is (M * x^64) mod P (with the incoming register XORed into the first
/// 64 message bits). Each 16-byte block is loaded with its bytes reversed, so bit i of the
/// 128-bit lane is the coefficient of x^i and the block's first byte is the high byte.
///
/// A 128-bit accumulator A = A_hi * x^64 + A_lo is moved D bits further along the message by
/// A * x^D ≡ A_hi * (x^(D+64) mod P) + A_lo * (x^D mod P): two 64x64 carry-less products of
/// at most 127 bits, so the accumulator stays 128 bits wide. The main loop keeps eight
/// 256-bit accumulators (sixteen lanes, 256 bytes per iteration) so that the multiplier's
/// latency is hidden; they are folded into one 256-bit, then one 128-bit accumulator, a tail
/// shorter than 16 bytes is merged with a byte shift, and Barrett reduction gives the 64-bit
/// register.
#[cfg(target_arch = "x86_64")]
mod vpclmul {
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::{barrett_mu, xpow_mod, POLY};

    /// Name reported by [`super::implementation`].
    pub(super) const NAME: &str = "ubcache-x86_64-avx2-vpclmulqdq";

    /// 256-bit accumulators in the main loop.
    const ACCS: usize = 8;
    /// Bytes consumed per main-loop iteration.
    const BLOCK: usize = 32 * ACCS;

    /// x^(D+64) mod P and x^D mod P for folding D bits forward.
    const fn fold_pair(d: u32) -> (u64, u64) {
        (xpow_mod(d + 64), xpow_mod(d))
    }
    /// One 128-bit lane forward by 128 bits (16 bytes).
    const K128: (u64, u64) = fold_pair(128);
    /// One 256-bit register forward by 256 bits (32 bytes).
    const K256: (u64, u64) = fold_pair(256);
    /// The main loop's stride: each lane forward by `BLOCK` bytes.
    const KBLOCK: (u64, u64) = fold_pair(BLOCK as u32 * 8);
    /// Accumulator `i` of the main loop forward to the last one: by `(ACCS - 1 - i) * 32`
    /// bytes. The last entry (distance 0) is unused.
    const KREDUCE: [(u64, u64); ACCS] = {
        let mut k = [(0, 0); ACCS];
        let mut i = 0;
        while i + 1 < ACCS {
            k[i] = fold_pair(((ACCS - 1 - i) * 256) as u32);
            i += 1;
        }
        k
    };
    /// x^128 mod P, for the first step of the final reduction.
    const X128: u64 = xpow_mod(128);
    /// Barrett constant floor(x^128 / P) - x^64.
    const MU: u64 = barrett_mu();

    /// What this CPU offers, detected once: 0 = not yet checked, 1 = the kernel runs here and
    /// is the best choice, 2 = it runs but `crc-fast` has its own VPCLMULQDQ kernel (with
    /// AVX-512VL, which this kernel cannot use), 3 = it cannot run.
    static CPU: AtomicU8 = AtomicU8::new(0);

    #[inline]
    fn cpu() -> u8 {
        match CPU.load(Ordering::Relaxed) {
            0 => {
                let runs = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("vpclmulqdq")
                    && is_x86_feature_detected!("pclmulqdq")
                    && is_x86_feature_detected!("sse4.1");
                // The same test crc-fast makes before picking its AVX-512 VPCLMULQDQ kernel.
                let crc_fast_has_vpclmul = is_x86_feature_detected!("avx512vl");
                let v = match (runs, crc_fast_has_vpclmul) {
                    (true, false) => 1,
                    (true, true) => 2,
                    (false, _) => 3,
                };
                CPU.store(v, Ordering::Relaxed);
                v
            }
            v => v,
        }
    }

    /// Whether this CPU has every feature [`update`] is compiled with (tests run the kernel
    /// whenever it can run, even where dispatch prefers `crc-fast`).
    #[cfg(test)]
    pub(super) fn supported() -> bool {
        matches!(cpu(), 1 | 2)
    }

    /// Whether [`update`] should be used here: the CPU has every feature it is compiled with,
    /// and `crc-fast` has nothing wider.
    #[inline]
    pub(super) fn preferred() -> bool {
        cpu() == 1
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn pair256(k: (u64, u64)) -> __m256i {
        _mm256_set_epi64x(k.1 as i64, k.0 as i64, k.1 as i64, k.0 as i64)
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn pair128(k: (u64, u64)) -> __m128i {
        _mm_set_epi64x(k.1 as i64, k.0 as i64)
    }

    /// Both lanes of `a` moved forward by the distance `k` (from [`pair256`]) stands for.
    #[inline]
    #[target_feature(enable = "avx2,vpclmulqdq")]
    fn fold256(a: __m256i, k: __m256i) -> __m256i {
        _mm256_xor_si256(_mm256_clmulepi64_epi128(a, k, 0x01), _mm256_clmulepi64_epi128(a, k, 0x10))
    }

    /// `a` moved forward by the distance `k` (from [`pair128`]) stands for.
    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    fn fold128(a: __m128i, k: __m128i) -> __m128i {
        _mm_xor_si128(_mm_clmulepi64_si128(a, k, 0x01), _mm_clmulepi64_si128(a, k, 0x10))
    }

    /// Loads 32 bytes with each 16-byte lane's bytes reversed.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load256(block: &[u8; 32], rev: __m256i) -> __m256i {
        // SAFETY: `block` is 32 readable bytes; the load is unaligned.
        let v = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
        _mm256_shuffle_epi8(v, rev)
    }

    /// Loads 16 bytes with their order reversed.
    #[inline]
    #[target_feature(enable = "ssse3")]
    fn load128(block: &[u8; 16], rev: __m128i) -> __m128i {
        // SAFETY: `block` is 16 readable bytes; the load is unaligned.
        let v = unsafe { _mm_loadu_si128(block.as_ptr().cast()) };
        _mm_shuffle_epi8(v, rev)
    }

    /// The raw CRC register after `data`, starting from the raw register `reg`. Any length;
    /// inputs shorter than 16 bytes go to `crc-fast`.
    #[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.1")]
    pub(super) fn update(reg: u64, data: &[u8]) -> u64 {
        let Some(last) = data.last_chunk::<16>() else {
            return super::fallback_update(reg, data);
        };
        let rev128 = _mm_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let rev256 = _mm256_broadcastsi128_si256(rev128);
        // The register goes into the first 64 message bits: the high half of the first lane.
        let init128 = _mm_set_epi64x(reg as i64, 0);
        let init256 = _mm256_zextsi128_si256(init128);

        // Fold everything but the last `data.len() % 16` bytes into `x`.
        let (x, rest) = if data.len() >= BLOCK {
            let (blocks, rest) = data.as_chunks::<BLOCK>();
            let mut acc = [_mm256_setzero_si256(); ACCS];
            let kblock = pair256(KBLOCK);
            for (b, block) in blocks.iter().enumerate() {
                for (a, c) in acc.iter_mut().zip(block.as_chunks::<32>().0) {
                    let v = load256(c, rev256);
                    *a = if b == 0 { v } else { _mm256_xor_si256(fold256(*a, kblock), v) };
                }
                if b == 0 {
                    acc[0] = _mm256_xor_si256(acc[0], init256);
                }
            }
            let mut y = acc[ACCS - 1];
            for (a, k) in acc[..ACCS - 1].iter().zip(KREDUCE) {
                y = _mm256_xor_si256(y, fold256(*a, pair256(k)));
            }
            let (chunks, rest) = rest.as_chunks::<32>();
            let k256 = pair256(K256);
            for c in chunks {
                y = _mm256_xor_si256(fold256(y, k256), load256(c, rev256));
            }
            (lanes_to_128(y), rest)
        } else if data.len() >= 32 {
            let (chunks, rest) = data.as_chunks::<32>();
            let k256 = pair256(K256);
            let mut y = init256;
            for (n, c) in chunks.iter().enumerate() {
                let v = load256(c, rev256);
                y = _mm256_xor_si256(if n == 0 { y } else { fold256(y, k256) }, v);
            }
            (lanes_to_128(y), rest)
        } else if let Some((first, rest)) = data.split_first_chunk::<16>() {
            (_mm_xor_si128(load128(first, rev128), init128), rest)
        } else {
            // Unreachable: `last` above proved data.len() >= 16.
            return super::fallback_update(reg, data);
        };

        let k128 = pair128(K128);
        let (chunks, tail) = rest.as_chunks::<16>();
        let mut x = x;
        for c in chunks {
            x = _mm_xor_si128(fold128(x, k128), load128(c, rev128));
        }

        if !tail.is_empty() {
            // r < 16 bytes remain. x * x^(8r) splits into the r bytes that spill over the top
            // (folded forward by 128 bits) and x shifted up by r bytes, whose low r bytes take
            // the tail. The tail is read as the last 16 bytes of `data`, which lie after the
            // first 16 bytes because data.len() >= 16 + r.
            let r = tail.len();
            let last = load128(last, rev128);
            // PSHUFB controls (a byte with its high bit set gives zero, otherwise its low
            // four bits pick the source byte). shl[j] = j - r moves byte j - r to j: a shift
            // up by r bytes, zero-filled in bytes j < r, which are exactly the negative ones.
            // shr = shl ^ 0x80 turns those into (j - r) mod 16 = j + 16 - r and zeroes the
            // rest: a shift down by 16 - r bytes, leaving the r bytes that spill over.
            let iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let shl = _mm_sub_epi8(iota, _mm_set1_epi8(r as i8));
            let shr = _mm_xor_si128(shl, _mm_set1_epi8(i8::MIN));
            let up = _mm_shuffle_epi8(x, shl);
            let spill = _mm_shuffle_epi8(x, shr);
            // `shl` has its high bit set exactly in the low r bytes, where `up` is zero.
            let merged = _mm_blendv_epi8(up, last, shl);
            x = _mm_xor_si128(fold128(spill, k128), merged);
        }

        reduce(x)
    }

    /// Folds the low (earlier) lane of `y` onto the high one.
    #[inline]
    #[target_feature(enable = "avx2,pclmulqdq")]
    fn lanes_to_128(y: __m256i) -> __m128i {
        let lo = _mm256_castsi256_si128(y);
        let hi = _mm256_extracti128_si256::<1>(y);
        _mm_xor_si128(fold128(lo, pair128(K128)), hi)
    }

    /// (x * x^64) mod P: the CRC register for a message folded into the 128-bit `x`.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.1")]
    fn reduce(x: __m128i) -> u64 {
        // x * x^64 = x_hi * x^128 + x_lo * x^64 ≡ x_hi * (x^128 mod P) + x_lo * x^64 =: R.
        let t = _mm_clmulepi64_si128(x, _mm_set_epi64x(0, X128 as i64), 0x01);
        let r = _mm_xor_si128(t, _mm_slli_si128::<8>(x));
        // R mod P = R_lo + (R_hi * x^64 mod P). Barrett: q = floor(R_hi * mu / x^64)
        // = R_hi + high64(R_hi * MU), then R_hi * x^64 mod P = low64(q * POLY).
        let consts = _mm_set_epi64x(POLY as i64, MU as i64);
        let hi = _mm_srli_si128::<8>(r);
        let q = _mm_xor_si128(_mm_srli_si128::<8>(_mm_clmulepi64_si128(r, consts, 0x01)), hi);
        let p = _mm_clmulepi64_si128(q, consts, 0x10);
        _mm_cvtsi128_si64(_mm_xor_si128(r, p)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TABLE: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_WE);

    /// Reference raw-register update from the `crc` crate.
    fn reference_update(reg: u64, data: &[u8]) -> u64 {
        let mut d = TABLE.digest_with_initial(reg);
        d.update(data);
        d.finalize() ^ XOROUT
    }

    fn test_data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
    }

    /// Lengths 0..=600, and every length within 17 of a multiple of 16 up to 4 KiB + 32
    /// (covers every 16-, 32-, 128- and 256-byte boundary of the kernel).
    fn interesting_lengths() -> Vec<usize> {
        let mut v: Vec<usize> = (0..=600).collect();
        for k in 38..=258 {
            for d in [-17isize, -16, -15, -1, 0, 1, 15, 16, 17] {
                v.push((k * 16 + d) as usize);
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The SIMD kernel run directly, or `None` where the CPU (or architecture) lacks it.
    fn simd_update(reg: u64, data: &[u8]) -> Option<u64> {
        #[cfg(target_arch = "x86_64")]
        if vpclmul::supported() {
            // SAFETY: `supported()` found the kernel's target features on this CPU.
            return Some(unsafe { vpclmul::update(reg, data) });
        }
        let _ = (reg, data);
        None
    }

    const REGS: [u64; 4] = [INIT, 0, 0x0123_4567_89ab_cdef, 0x8000_0000_0000_0001];

    #[test]
    fn check_value() {
        assert_eq!(crc64(b"123456789"), 0x62ec_59e3_f1a4_f00a);
        assert_eq!(reference_update(INIT, b"123456789") ^ XOROUT, 0x62ec_59e3_f1a4_f00a);
    }

    #[test]
    fn constants() {
        assert_eq!(xpow_mod(0), 1);
        assert_eq!(xpow_mod(63), 1 << 63);
        assert_eq!(xpow_mod(64), POLY);
        // x^128 = mu * P + (x^128 mod P): check with a bitwise carry-less multiply.
        let clmul =
            |a: u128, b: u128| -> u128 { (0..128).filter(|i| (b >> i) & 1 != 0).fold(0, |acc, i| acc ^ (a << i)) };
        let p = (1u128 << 64) | POLY as u128;
        // (x^64 + mu_low) * P = x^128 + POLY * x^64 + mu_low * P; without the x^128 term it
        // must equal the remainder x^128 mod P.
        let rem = ((POLY as u128) << 64) ^ clmul(barrett_mu() as u128, p);
        assert_eq!(rem, xpow_mod(128) as u128);
    }

    #[test]
    fn empty_input() {
        assert_eq!(crc64(b""), TABLE.checksum(b""));
        assert_eq!(Crc64::new().finish(), crc64(b""));
        assert_eq!(fallback_update(12345, b""), 12345);
        assert_eq!(update(12345, b""), 12345);
    }

    #[test]
    fn known_vectors_match_table_implementation() {
        let buf = test_data(1 << 20);
        for len in [1usize, 7, 8, 15, 16, 63, 64, 65, 255, 256, 4095, 4096, 65536, 1 << 20] {
            assert_eq!(crc64(&buf[..len]), TABLE.checksum(&buf[..len]), "len {len}");
            assert_eq!(crc64(&buf[3..len.max(3)]), TABLE.checksum(&buf[3..len.max(3)]), "unaligned len {len}");
        }
    }

    #[test]
    fn every_interesting_length_matches_table() {
        let buf = test_data(5000);
        for len in interesting_lengths() {
            let d = &buf[..len];
            let want = TABLE.checksum(d);
            assert_eq!(crc64(d), want, "len {len}");
            let mut c = Crc64::new();
            c.update(d);
            assert_eq!(c.finish(), want, "incremental len {len}");
        }
    }

    #[test]
    fn simd_kernel_matches_reference() {
        let buf = test_data(5000);
        if simd_update(INIT, b"").is_none() {
            eprintln!("skipping: CPU lacks AVX2/VPCLMULQDQ");
            return;
        }
        for len in interesting_lengths() {
            for reg in REGS {
                let d = &buf[..len];
                assert_eq!(simd_update(reg, d), Some(reference_update(reg, d)), "len {len} reg {reg:x}");
            }
        }
    }

    #[test]
    fn fallback_matches_reference() {
        let buf = test_data(5000);
        for len in interesting_lengths() {
            for reg in REGS {
                let d = &buf[..len];
                assert_eq!(fallback_update(reg, d), reference_update(reg, d), "len {len} reg {reg:x}");
            }
        }
    }

    #[test]
    fn unaligned_starts() {
        let buf = test_data(70_000);
        for off in 0..=31 {
            for len in [0usize, 15, 16, 17, 255, 256, 257, 1000, 4096, 4097, 65536 + 5] {
                let d = &buf[off..off + len];
                let want = TABLE.checksum(d);
                assert_eq!(crc64(d), want, "off {off} len {len}");
                assert_eq!(fallback_update(INIT, d) ^ XOROUT, want, "fallback off {off} len {len}");
                if let Some(got) = simd_update(INIT, d) {
                    assert_eq!(got ^ XOROUT, want, "simd off {off} len {len}");
                }
            }
        }
    }

    #[test]
    fn one_mebibyte() {
        let mut buf = test_data((1 << 20) + 3);
        buf[12345] ^= 0x5a;
        let d = &buf[3..];
        let want = TABLE.checksum(d);
        assert_eq!(crc64(d), want);
        assert_eq!(fallback_update(INIT, d) ^ XOROUT, want);
        if let Some(got) = simd_update(INIT, d) {
            assert_eq!(got ^ XOROUT, want);
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

    #[test]
    fn clone_continues_independently() {
        let buf = test_data(10_000);
        let mut a = Crc64::new();
        a.update(&buf[..3000]);
        let mut b = a.clone();
        a.update(&buf[3000..]);
        b.update(&buf[3000..6000]);
        assert_eq!(a.finish(), TABLE.checksum(&buf));
        assert_eq!(b.finish(), TABLE.checksum(&buf[..6000]));
    }

    fn split_check(data: &[u8], cuts: &[prop::sample::Index]) -> Result<(), TestCaseError> {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
        points.sort_unstable();
        let mut c = Crc64::new();
        let mut prev = 0;
        for p in points {
            c.update(&data[prev..p]);
            prev = p;
        }
        c.update(&data[prev..]);
        prop_assert_eq!(c.finish(), crc64(data));
        prop_assert_eq!(c.finish(), TABLE.checksum(data));
        Ok(())
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
            split_check(&data, &cuts)?;
        }

        #[test]
        fn simd_kernel_any_register(
            reg in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            if let Some(got) = simd_update(reg, &data) {
                prop_assert_eq!(got, reference_update(reg, &data));
            }
            prop_assert_eq!(fallback_update(reg, &data), reference_update(reg, &data));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn incremental_large_pieces(
            len in 0usize..400_000,
            seed in any::<u8>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect();
            split_check(&data, &cuts)?;
        }
    }
}
