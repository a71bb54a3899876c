//! Cache simulators over an access stream of block numbers: Belady's offline optimum (MIN)
//! and the online policies a block cache is measured against (LRU, FIFO, ARC, S3-FIFO,
//! SIEVE). Each counts hits for a cache of a given number of blocks, every block the same
//! size, so hit ratios compare with published results. The bench harness reports ubcache's
//! hit ratio beside them.

mod arc;
mod buckets;
mod nodes;
mod opt;
mod s3fifo;
mod sieve;
mod simple;

pub use arc::Arc;
pub use buckets::{simulate_buckets, BucketSim, BUCKET_POLICIES};
pub use opt::{belady_admit_all_hits, bucket_min_hits, opt_hits};
pub use s3fifo::S3Fifo;
pub use sieve::Sieve;
pub use simple::{Fifo, Lru};

use crate::{Error, ErrorKind, Result};

/// An online replacement policy: told every access, answers whether it hit.
pub trait Policy {
    /// Accesses `block`: true on a hit; on a miss the block is admitted (evicting if full).
    fn access(&mut self, block: u64) -> bool;
    /// Blocks cached now.
    fn len(&self) -> usize;
    /// Whether nothing is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The policies by name, as the harness and the binding take them.
pub const POLICIES: [&str; 7] = ["opt", "belady", "lru", "fifo", "arc", "s3fifo", "sieve"];

/// Hits and misses of one simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimResult {
    pub hits: u64,
    pub misses: u64,
}

impl SimResult {
    /// Hits over accesses (0 for an empty trace).
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// The online policy `name` for a cache of `capacity` blocks.
pub fn policy(name: &str, capacity: usize) -> Result<Box<dyn Policy>> {
    if capacity == 0 {
        return Err(Error::new(ErrorKind::InvalidArgument, "a simulated cache needs a capacity of at least one block"));
    }
    Ok(match name {
        "lru" => Box::new(Lru::new(capacity)),
        "fifo" => Box::new(Fifo::new(capacity)),
        "arc" => Box::new(Arc::new(capacity)),
        "s3fifo" => Box::new(S3Fifo::new(capacity)),
        "sieve" => Box::new(Sieve::new(capacity)),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("unknown policy '{name}' (known: {})", POLICIES.join(", ")),
            ))
        }
    })
}

/// Runs `trace` through Belady's rule at bucket granularity ([`bucket_min_hits`]): a cache of
/// `capacity` blocks that fills and evicts whole buckets of `bucket` blocks.
pub fn simulate_bucket_min(trace: &[u64], capacity: usize, bucket: usize) -> Result<SimResult> {
    if capacity == 0 || bucket == 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "a simulated cache needs a capacity and a bucket size of at least one block",
        ));
    }
    let hits = bucket_min_hits(trace, capacity, bucket);
    Ok(SimResult { hits, misses: trace.len() as u64 - hits })
}

/// Runs `trace` through the policy `name` (or the offline optima: `opt`, which may leave a
/// missed block out, and `belady`, which admits every miss) with `capacity` blocks.
pub fn simulate(name: &str, trace: &[u64], capacity: usize) -> Result<SimResult> {
    if name == "opt" || name == "belady" {
        if capacity == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "a simulated cache needs a capacity of at least one block",
            ));
        }
        let hits = if name == "opt" { opt_hits(trace, capacity) } else { belady_admit_all_hits(trace, capacity) };
        return Ok(SimResult { hits, misses: trace.len() as u64 - hits });
    }
    let mut p = policy(name, capacity)?;
    Ok(run(p.as_mut(), trace))
}

/// Counts the hits and misses of `trace` through the online policy `p`.
pub(crate) fn run(p: &mut dyn Policy, trace: &[u64]) -> SimResult {
    let mut r = SimResult::default();
    for &b in trace {
        if p.access(b) {
            r.hits += 1;
        } else {
            r.misses += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests;
