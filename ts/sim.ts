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

/** What a simulated cache did with a trace. */
export interface SimResult {
  policy: SimPolicy
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
 * compare with published results.
 * @throws {UbcacheError} `INVALID_ARGUMENT`: an unknown policy, a size below 1, a block
 *   number that is not whole.
 */
export async function simulateCache(policy: SimPolicy, trace: ArrayLike<number>, capacities: number[]): Promise<SimResult[]> {
  if (!SIM_POLICIES.includes(policy)) throw new InvalidArgumentError(`unknown policy '${String(policy)}' (known: ${SIM_POLICIES.join(', ')})`)
  for (const c of capacities) {
    if (!Number.isInteger(c) || c < 1 || c > 2 ** 32 - 1) throw new InvalidArgumentError(`cache size must be a whole number of blocks from 1, got ${c}`)
  }
  const t = trace instanceof Float64Array ? trace : Float64Array.from(trace)
  try {
    const rs = await native.simulateCache(policy, t, capacities)
    return rs.map((r, i) => ({ policy, capacity: capacities[i], hits: r.hits, misses: r.misses, hitRatio: r.hits + r.misses === 0 ? 0 : r.hits / (r.hits + r.misses) }))
  } catch (err) {
    throw asUbcacheError(err)
  }
}
