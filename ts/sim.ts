/**
 * Cache simulators over an access stream of block numbers: Belady's offline optimum and the
 * online policies a block cache is measured against (see {@link simulateCache}).
 * @module
 */
import { asUbcacheError, InvalidArgumentError } from './errors'
import native from './native'

/**
 * The simulated policies. Two offline optima: `opt` may leave a missed block out of the
 * cache (the best any cache can do, bypass included), `belady` is Belady's MIN admitting
 * every miss (the best a cache that admits everything can do; libCacheSim's `Belady`).
 */
export const SIM_POLICIES = ['opt', 'belady', 'lru', 'fifo', 'arc', 's3fifo', 'sieve'] as const
/** One of {@link SIM_POLICIES}. */
export type SimPolicy = (typeof SIM_POLICIES)[number]

/**
 * Belady's rule at bucket granularity: a cache that, like bcache, fills one bucket at a time
 * and evicts whole buckets, the one whose next needed block is furthest ahead (a reference,
 * not a proven optimum); needs `bucketBlocks`.
 */
export const BUCKET_MIN = 'bucket-min'

/**
 * Online policies at bucket granularity, as a cache set evicts: `bucket-lru` (the bucket
 * least recently read or filled), `bucket-s3fifo` and `bucket-tinylfu` (ubcache's `s3fifo`
 * and `tinylfu`, docs/replacement.md); need `bucketBlocks`, and a cache of two buckets or more.
 */
export const BUCKET_POLICIES = ['bucket-lru', 'bucket-s3fifo', 'bucket-tinylfu'] as const
/** One of {@link BUCKET_POLICIES}. */
export type BucketPolicy = (typeof BUCKET_POLICIES)[number]

/** What a simulated cache did with a trace. */
export interface SimResult {
  policy: SimPolicy | typeof BUCKET_MIN | BucketPolicy
  /** Cache size in blocks. */
  capacity: number
  hits: number
  misses: number
  /** hits / (hits + misses); 0 for an empty trace. */
  hitRatio: number
}

/**
 * Runs `trace` (block numbers: whole, non-negative, below 2^53) through a cache of each size
 * in `capacities` (blocks, every block the same size) under `policy`, natively on a worker
 * thread; resolves to one result per size, in order. Hit ratios are per block, so they
 * compare with published results. `bucket-min` and {@link BUCKET_POLICIES} take
 * `options.bucketBlocks`.
 * @throws {UbcacheError} `INVALID_ARGUMENT`: an unknown policy, a size below 1, a block
 *   number that is not whole.
 */
export async function simulateCache(policy: SimPolicy | typeof BUCKET_MIN | BucketPolicy, trace: ArrayLike<number>, capacities: number[], options: { bucketBlocks?: number } = {}): Promise<SimResult[]> {
  const bucketed = policy === BUCKET_MIN || (BUCKET_POLICIES as readonly string[]).includes(policy)
  if (!bucketed && !(SIM_POLICIES as readonly string[]).includes(policy)) {
    throw new InvalidArgumentError(`unknown policy '${String(policy)}' (known: ${SIM_POLICIES.join(', ')}, ${BUCKET_MIN}, ${BUCKET_POLICIES.join(', ')})`)
  }
  const b = options.bucketBlocks
  if (bucketed && (b === undefined || !Number.isInteger(b) || b < 1 || b > 2 ** 32 - 1)) {
    throw new InvalidArgumentError(`${policy} needs bucketBlocks, a whole number of blocks from 1, got ${String(b)}`)
  }
  for (const c of capacities) {
    if (!Number.isInteger(c) || c < 1 || c > 2 ** 32 - 1) throw new InvalidArgumentError(`cache size must be a whole number of blocks from 1, got ${c}`)
  }
  const t = trace instanceof Float64Array ? trace : Float64Array.from(trace)
  try {
    const rs = await native.simulateCache(policy, t, capacities, bucketed ? b : undefined)
    return rs.map((r, i) => ({ policy, capacity: capacities[i], hits: r.hits, misses: r.misses, hitRatio: r.hits + r.misses === 0 ? 0 : r.hits / (r.hits + r.misses) }))
  } catch (err) {
    throw asUbcacheError(err)
  }
}
