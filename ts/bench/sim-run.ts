/**
 * `ioengine=sim`: a job's access stream through simulated caches, no device (see
 * {@link runSimJob}).
 * @module
 */
import { SIM_POLICIES, type SimPolicy, simulateCache } from '../sim'
import type { Job } from './jobfile'
import { JobFileError } from './jobfile'
import { readTrace } from './trace'
import { type Io, jobIos, jobIosForever, jobRegion, minBlock } from './workload'

/** Hit ratios of every simulated policy for one job. */
export interface SimReport {
  job: string
  rw: string
  numjobs: number
  /** Requests made (all instances), and how many were reads. */
  requests: number
  reads: number
  writes: number
  /** Cache blocks accessed (a request touches every block it covers). */
  accesses: number
  blockSize: number
  /** The simulated cache, in blocks, and the address space, in blocks. */
  cacheBlocks: number
  spaceBlocks: number
  /** One per policy of {@link SIM_POLICIES}, in that order. */
  policies: { policy: SimPolicy; hits: number; misses: number; hitRatio: number }[]
  /** Blocks accessed at least once. */
  footprint: number
  /** With `sweep`: hit ratios at cache sizes from 0.5% to 100% of the footprint. */
  sweep?: { cacheBlocks: number; hitRatio: Record<SimPolicy, number> }[]
}

/** Cache sizes of a sweep, as shares of the footprint. */
export const SWEEP_SHARES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1]

/** The most requests a simulated job may make (the trace is held in memory). */
const MAX_REQUESTS = 50_000_000

/**
 * Runs a job with `ioengine=sim`: its requests (every instance of `numjobs`, interleaved)
 * become a stream of cache-block accesses (blocks of the job's smallest block size), which
 * each policy of {@link SIM_POLICIES} and the two optima serve with a cache of
 * `cache_size`. Reads and writes both go through the cache (as in writeback); trims are
 * not accesses. A `time_based` job makes `runtime` × `rate_iops` requests; a `replay=` job
 * makes the trace's (see {@link readTrace}).
 */
export async function runSimJob(job: Job, options: { sweep?: boolean } = {}): Promise<SimReport> {
  if (job.cacheSize === undefined) throw new JobFileError(`[${job.name}] ioengine=sim needs cache_size= (the simulated cache)`)
  const unit = minBlock(job)
  const region = job.replay !== undefined ? undefined : jobRegion(job, undefined)
  const cacheBlocks = Math.floor(job.cacheSize / unit)
  if (cacheBlocks < 1) throw new JobFileError(`[${job.name}] cache_size=${job.cacheSize} holds no block of ${unit} bytes`)
  let limit = Number.POSITIVE_INFINITY
  if (job.timeBased) {
    if (job.rateIops === undefined) throw new JobFileError(`[${job.name}] a time_based job with ioengine=sim needs rate_iops= (simulated time has no device to set the pace)`)
    limit = Math.round(job.runtime * job.rateIops) * job.numjobs
  }
  const streams: Iterator<Io>[] =
    region === undefined
      ? [(readTrace(job.replay as string, unit) as Io[])[Symbol.iterator]()]
      : Array.from({ length: job.numjobs }, (_, i) => (job.timeBased ? jobIosForever(job, region, i) : jobIos(job, region, i)))
  const trace: number[] = []
  let requests = 0
  let reads = 0
  let writes = 0
  for (let live = streams.length; live > 0 && requests < limit; ) {
    live = 0
    for (const s of streams) {
      if (requests >= limit) break
      const r = s.next()
      if (r.done) continue
      live++
      requests++
      if (requests > MAX_REQUESTS) throw new JobFileError(`[${job.name}] over ${MAX_REQUESTS} requests: too many to simulate in memory (lower io_size, loops or runtime)`)
      const io = r.value
      if (io.op === 'trim') continue
      if (io.op === 'read') reads++
      else writes++
      const first = Math.floor(io.offset / unit)
      const last = Math.floor((io.offset + io.length - 1) / unit)
      for (let b = first; b <= last; b++) trace.push(b)
    }
  }
  const blocks = Float64Array.from(trace)
  let top = 0
  for (const b of trace) if (b > top) top = b
  const policies: SimReport['policies'] = []
  for (const p of SIM_POLICIES) {
    const [r] = await simulateCache(p, blocks, [cacheBlocks])
    policies.push({ policy: p, hits: r.hits, misses: r.misses, hitRatio: r.hitRatio })
  }
  const footprint = new Set(trace).size
  let sweep: SimReport['sweep']
  if (options.sweep) {
    const sizes = [...new Set(SWEEP_SHARES.map((f) => Math.max(1, Math.round(f * footprint))))]
    const rows = sizes.map((cacheBlocks) => ({ cacheBlocks, hitRatio: {} as Record<SimPolicy, number> }))
    for (const p of SIM_POLICIES) {
      const rs = await simulateCache(p, blocks, sizes)
      rs.forEach((r, i) => (rows[i].hitRatio[p] = r.hitRatio))
    }
    sweep = rows
  }
  return {
    footprint,
    ...(sweep ? { sweep } : {}),
    job: job.name,
    rw: job.rw,
    numjobs: job.numjobs,
    requests,
    reads,
    writes,
    accesses: blocks.length,
    blockSize: unit,
    cacheBlocks,
    spaceBlocks: region === undefined ? top + 1 : Math.floor(region.bytes / unit),
    policies,
  }
}
