//! Cache simulators (`ubcache_core::sim`) for JavaScript: a trace of block numbers in, hit
//! and miss counts out, computed on a libuv worker thread.

use napi::bindgen_prelude::*;
use napi_derive::napi;
use ubcache_core::{sim, Error as CoreError, ErrorKind, Result as CoreResult};

use crate::cache::js_error;

/// Hits and misses of a simulated cache.
#[napi(object)]
pub struct NativeSimResult {
    pub hits: f64,
    pub misses: f64,
}

pub struct SimTask {
    policy: String,
    trace: Vec<u64>,
    capacities: Vec<usize>,
    bucket: Option<usize>,
}

impl Task for SimTask {
    type Output = CoreResult<Vec<sim::SimResult>>;
    type JsValue = Vec<NativeSimResult>;

    fn compute(&mut self) -> Result<Self::Output> {
        Ok(self
            .capacities
            .iter()
            .map(|&c| match (self.policy.as_str(), self.bucket) {
                ("bucket-min", Some(b)) => sim::simulate_bucket_min(&self.trace, c, b),
                ("bucket-min", None) => {
                    Err(CoreError::new(ErrorKind::InvalidArgument, "bucket-min needs a bucket size"))
                }
                (p, Some(b)) if sim::BUCKET_POLICIES.contains(&p) => sim::simulate_buckets(p, &self.trace, c, b),
                (p, None) if sim::BUCKET_POLICIES.contains(&p) => {
                    Err(CoreError::new(ErrorKind::InvalidArgument, format!("{p} needs a bucket size")))
                }
                _ => sim::simulate(&self.policy, &self.trace, c),
            })
            .collect())
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> Result<Self::JsValue> {
        match output {
            Ok(rs) => {
                Ok(rs.into_iter().map(|r| NativeSimResult { hits: r.hits as f64, misses: r.misses as f64 }).collect())
            }
            Err(e) => Err(js_error(&env, &e)),
        }
    }
}

/// Runs `trace` (block numbers, whole and below 2^53) through the policy `policy` (`opt`,
/// `belady`, `bucket-min`, `bucket-lru`, `bucket-s3fifo`, `bucket-tinylfu` (the `bucket-`
/// ones with `bucket_blocks`), `lru`, `fifo`, `arc`, `s3fifo`, `sieve`)
/// once per cache size in `capacities` (blocks);
/// resolves to one result per size. Rejects with `INVALID_ARGUMENT` for an unknown policy, a
/// size of 0 or a block number that is not a whole number.
#[napi(ts_return_type = "Promise<NativeSimResult[]>")]
pub fn simulate_cache(
    env: &Env,
    policy: String,
    trace: Float64Array,
    capacities: Vec<u32>,
    bucket_blocks: Option<u32>,
) -> Result<AsyncTask<SimTask>> {
    let mut blocks = Vec::with_capacity(trace.len());
    for (i, &b) in trace.iter().enumerate() {
        if !(b >= 0.0 && b.fract() == 0.0 && b < 9_007_199_254_740_992.0) {
            let e = CoreError::new(ErrorKind::InvalidArgument, format!("trace[{i}] = {b} is not a whole block number"));
            env.throw_error(e.message(), Some(e.code()))?;
            return Err(napi::Error::new(Status::PendingException, e.message().to_string()));
        }
        blocks.push(b as u64);
    }
    Ok(AsyncTask::new(SimTask {
        policy,
        trace: blocks,
        capacities: capacities.into_iter().map(|c| c as usize).collect(),
        bucket: bucket_blocks.map(|b| b as usize),
    }))
}
