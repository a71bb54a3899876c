//! `npm run bench:sim` (`cargo bench -p ubcache-core --bench sim`): how fast the cache
//! simulators run, for the bench harness (issue 18's figure: OPT over a 10M-request trace in
//! ≤ 10 s). The trace: 10M block numbers, Zipf-like (θ ≈ 1 by inverse transform on a power
//! law) over 1M blocks, from a fixed seed; each simulator at a cache of 1% and 10% of the
//! blocks. `UBCACHE_BENCH_SIM_REQUESTS` changes the length. Last line: one JSON object.

use std::time::Instant;

use ubcache_core::sim::{simulate, POLICIES};

fn main() {
    let n: usize = std::env::var("UBCACHE_BENCH_SIM_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let blocks = 1_000_000u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let trace: Vec<u64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            ((blocks as f64).powf(u) as u64).saturating_sub(1).min(blocks - 1)
        })
        .collect();
    let mut out = serde_json::Map::new();
    out.insert("requests".into(), (n as u64).into());
    for pct in [1usize, 10] {
        let cap = blocks as usize * pct / 100;
        for p in POLICIES {
            let t = Instant::now();
            let r = simulate(p, &trace, cap).expect("simulate");
            let s = t.elapsed().as_secs_f64();
            eprintln!("{p:>7} at {pct:>2}%: {s:6.2} s, hit ratio {:.4}", r.hit_ratio());
            out.insert(format!("{p}_{pct}pct_s"), serde_json::json!((s * 1000.0).round() / 1000.0));
            out.insert(
                format!("{p}_{pct}pct_hit_ratio"),
                serde_json::json!((r.hit_ratio() * 10000.0).round() / 10000.0),
            );
        }
    }
    let opt = out["opt_1pct_s"].as_f64().unwrap().max(out["opt_10pct_s"].as_f64().unwrap());
    out.insert(format!("opt_{}m_requests_s", n / 1_000_000), serde_json::json!(opt));
    println!("{}", serde_json::Value::Object(out));
}
