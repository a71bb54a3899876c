use proptest::prelude::*;

use super::*;

fn hits(name: &str, trace: &[u64], cap: usize) -> u64 {
    simulate(name, trace, cap).unwrap().hits
}

#[test]
fn hand_checked_traces() {
    let t = [1, 2, 1, 3, 2, 1];
    // LRU: 1m 2m 1h 3m(evicts 2) 2m(evicts 1) 1m(evicts 3).
    assert_eq!(hits("lru", &t, 2), 1);
    // FIFO: 1m 2m 1h 3m(evicts 1) 2h 1m(evicts 2).
    assert_eq!(hits("fifo", &t, 2), 2);
    // OPT: 3 is never used again, so it is left out: 1 and 2 hit.
    assert_eq!(hits("opt", &t, 2), 3);
    // SIEVE: at 3 the hand clears 1's bit and evicts 2; at 2 it evicts 1; at 1 it evicts 3.
    assert_eq!(hits("sieve", &t, 2), 1);
    // A loop one larger than the cache: LRU and FIFO never hit; OPT keeps all but one.
    let lp: Vec<u64> = (0..10).flat_map(|_| 0..4u64).collect();
    assert_eq!(hits("lru", &lp, 3), 0);
    assert_eq!(hits("fifo", &lp, 3), 0);
    assert!(hits("opt", &lp, 3) >= 20);
    // ARC: a block seen twice is kept over a scan of blocks seen once.
    let mut scan = vec![100, 100];
    scan.extend(0..50u64);
    scan.push(100);
    assert_eq!(hits("arc", &scan, 4), 2);
    assert_eq!(hits("lru", &scan, 4), 1);
    // S3-FIFO: a one-time scan goes through the small queue and leaves the hot block alone.
    let mut s = Vec::new();
    for round in 0..20u64 {
        s.extend([7, 8]);
        s.extend((0..5).map(|i| 1000 + round * 5 + i));
    }
    assert!(hits("s3fifo", &s, 10) >= hits("fifo", &s, 10));
}

#[test]
fn bucket_granular_min_evicts_whole_buckets() {
    // Two buckets of two blocks. 1 and 2 fill the first, 3 and 4 the second; 5 needs a bucket:
    // the first's soonest block (1, at 6) comes later than the second's (3, at 5), so the
    // first goes, 1 and 2 with it: 3 hits, then 1 and 2 miss. MIN evicts only 4 (never used
    // again) and hits 3, 1 and 2.
    let t = [1, 2, 3, 4, 5, 3, 1, 2];
    assert_eq!(bucket_min_hits(&t, 4, 2), 1);
    assert_eq!(belady_admit_all_hits(&t, 4), 3);
    assert_eq!(bucket_min_hits(&t, 4, 1), 3);
}

#[test]
fn bad_input() {
    assert!(simulate("lru", &[1], 0).is_err());
    assert!(simulate("opt", &[1], 0).is_err());
    let e = simulate("nope", &[1], 1).unwrap_err();
    assert!(e.message().contains("unknown policy 'nope'"));
    assert_eq!(simulate("opt", &[], 4).unwrap(), SimResult::default());
}

/// The best any cache of `cap` blocks can do on `t`, by trying every choice.
fn brute_opt(t: &[u64], cap: usize) -> u64 {
    fn go(t: &[u64], cap: usize, cached: &mut Vec<u64>) -> u64 {
        let Some((&b, rest)) = t.split_first() else { return 0 };
        if cached.contains(&b) {
            return 1 + go(rest, cap, cached);
        }
        let mut best = go(rest, cap, cached); // leave it out
        if cached.len() < cap {
            cached.push(b);
            best = best.max(go(rest, cap, cached));
            cached.pop();
        } else {
            for k in 0..cached.len() {
                let old = std::mem::replace(&mut cached[k], b);
                best = best.max(go(rest, cap, cached));
                cached[k] = old;
            }
        }
        best
    }
    go(t, cap, &mut Vec::new())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn opt_is_optimal_on_small_traces(t in proptest::collection::vec(0u64..5, 0..11), cap in 1usize..4) {
        prop_assert_eq!(opt_hits(&t, cap), brute_opt(&t, cap));
    }

    #[test]
    fn opt_bounds_every_policy_and_lru_grows_with_size(t in proptest::collection::vec(0u64..40, 0..600), cap in 1usize..30) {
        let opt = hits("opt", &t, cap);
        let belady = hits("belady", &t, cap);
        for p in ["belady", "lru", "fifo", "arc", "s3fifo", "sieve"] {
            let r = simulate(p, &t, cap).unwrap();
            prop_assert_eq!(r.hits + r.misses, t.len() as u64);
            prop_assert!(r.hits <= opt, "{} {} > opt {}", p, r.hits, opt);
            if p == "belady" {
                continue;
            }
            // MIN is optimal among caches that admit every miss, which these do.
            prop_assert!(r.hits <= belady, "{} {} > belady {}", p, r.hits, belady);
            let mut pol = policy(p, cap).unwrap();
            for &b in &t {
                pol.access(b);
                prop_assert!(pol.len() <= cap, "{} holds {} > {}", p, pol.len(), cap);
            }
        }
        // Belady's rule by whole buckets: one block per bucket is MIN; larger buckets hit no more.
        prop_assert_eq!(bucket_min_hits(&t, cap, 1), belady);
        for b in [2usize, 4, 8] {
            prop_assert!(bucket_min_hits(&t, cap, b) <= belady);
        }
        // LRU's stack property: a larger cache never hits less.
        prop_assert!(hits("lru", &t, cap + 1) >= hits("lru", &t, cap));
        prop_assert!(hits("opt", &t, cap + 1) >= opt);
    }
}
