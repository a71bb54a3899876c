//! crc64 throughput: ubcache's CRC-64/WE beside the `crc` crate's table implementation and a
//! memcpy of the same buffer, and `crc-fast` called directly, in the same run. Last line: one JSON object of figures.

use std::hint::black_box;
use std::time::Instant;

use ubcache_core::crc64::crc64;

const TABLE: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_WE);
const TABLE16: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_WE);

/// Best-of-`rounds` throughput in GB/s (10^9 bytes/s) of `f` over `buf`, each round
/// processing about `bytes_per_round` bytes.
fn gbps(buf: &[u8], bytes_per_round: usize, rounds: usize, mut f: impl FnMut(&[u8])) -> f64 {
    let iters = (bytes_per_round / buf.len()).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..iters {
            f(black_box(buf));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (iters * buf.len()) as f64 / best / 1e9
}

fn main() {
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 11) as u8;
    }
    let mut dst = vec![0u8; 1 << 20];
    eprintln!("crc64 kernel: {}", ubcache_core::crc64::implementation());

    let fast = |len: usize, bytes: usize| {
        gbps(&data[..len], bytes, 7, |b| {
            black_box(crc64(b));
        })
    };
    let crc_4k = fast(4096, 1 << 30);
    let crc_64k = fast(65536, 2 << 30);
    let crc_1m = fast(1 << 20, 2 << 30);
    let direct = |len: usize, bytes: usize| {
        gbps(&data[..len], bytes, 7, |b| {
            black_box(crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64We, b));
        })
    };
    let cf_4k = direct(4096, 1 << 30);
    let cf_64k = direct(65536, 2 << 30);
    let cf_1m = direct(1 << 20, 2 << 30);
    let table_64k = gbps(&data[..65536], 256 << 20, 3, |b| {
        black_box(TABLE.checksum(b));
    });
    let table16_64k = gbps(&data[..65536], 1 << 30, 3, |b| {
        black_box(TABLE16.checksum(b));
    });
    let memcpy_64k = {
        let src = &data[..65536];
        let iters = (2usize << 30) / src.len();
        let mut best = f64::INFINITY;
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..iters {
                dst[..65536].copy_from_slice(black_box(src));
                black_box(&mut dst);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        (iters * src.len()) as f64 / best / 1e9
    };

    eprintln!("crc64 (ubcache)      4 KiB  {crc_4k:7.2} GB/s");
    eprintln!("crc64 (ubcache)     64 KiB  {crc_64k:7.2} GB/s");
    eprintln!("crc64 (ubcache)      1 MiB  {crc_1m:7.2} GB/s");
    eprintln!(
        "crc-fast alone      4 KiB / 64 KiB / 1 MiB  {cf_4k:.2} / {cf_64k:.2} / {cf_1m:.2} GB/s ({})",
        crc_fast::get_calculator_target(crc_fast::CrcAlgorithm::Crc64We)
    );
    eprintln!("crc crate, table    64 KiB  {table_64k:7.2} GB/s");
    eprintln!("crc crate, slice16  64 KiB  {table16_64k:7.2} GB/s");
    eprintln!("memcpy              64 KiB  {memcpy_64k:7.2} GB/s");
    println!(
        "{{\"crc64_gbps_4k\":{:.3},\"crc64_gbps_64k\":{:.3},\"crc64_gbps_1m\":{:.3},\"table_gbps_64k\":{:.3},\"memcpy_gbps_64k\":{:.3}}}",
        crc_4k, crc_64k, crc_1m, table_64k, memcpy_64k
    );
}
