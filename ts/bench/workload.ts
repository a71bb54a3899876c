/**
 * The I/Os a job makes (see {@link jobIos}): fio's `rw`, `rwmixread`, block sizes, region,
 * `io_size`, `loops`, random distributions and random map, as a stream of requests.
 * @module
 */
import { blockChooser, seededRandom } from './distributions'
import type { Job } from './jobfile'
import { JobFileError } from './jobfile'

/** One request of a job. */
export interface Io {
  op: 'read' | 'write' | 'trim'
  /** Bytes from the start of the device or file. */
  offset: number
  length: number
}

/** The region a job works on, in bytes: [start, start + bytes). */
export interface Region {
  start: number
  bytes: number
}

/** A job's region on a device or file of `deviceBytes` (fio: `offset`, then `size` or the rest). */
export function jobRegion(job: Job, deviceBytes: number | undefined): Region {
  const of = (v: { bytes: number } | { pct: number }, what: string): number => {
    if ('bytes' in v) return v.bytes
    if (deviceBytes === undefined) throw new JobFileError(`[${job.name}] ${what}=${v.pct}%: a percentage needs a device or file of known size`)
    return Math.floor((deviceBytes * v.pct) / 100)
  }
  const start = of(job.offset, 'offset')
  const bytes = job.size === undefined ? (deviceBytes ?? 0) - start : of(job.size, 'size')
  if (bytes <= 0) throw new JobFileError(`[${job.name}] nothing to do: the region is empty (offset ${start}, size ${bytes})`)
  if (deviceBytes !== undefined && start + bytes > deviceBytes) {
    throw new JobFileError(`[${job.name}] offset ${start} + size ${bytes} passes the end of the device (${deviceBytes} bytes)`)
  }
  return { start, bytes }
}

/** The smallest block size the job uses: offsets are multiples of it. */
export function minBlock(job: Job): number {
  if (job.bssplit) return Math.min(...job.bssplit.map((x) => x.bs))
  if (job.bsrange) return job.bsrange.min
  return Math.min(job.bs.read, job.bs.write)
}

/**
 * The requests of one job instance (`instance` of `numjobs`, each with its own seed), in
 * order: `io_size` bytes (default the region's size) per loop, `loops` times. Sequential
 * modes walk the region from its start and wrap; random modes pick blocks of the smallest
 * block size by the job's distribution and, unless `norandommap`, visit every block once
 * per pass of the region before any twice (fio's random map). Mixed modes read with
 * probability `rwmixread`%.
 */
export function* jobIos(job: Job, region: Region, instance = 0): Generator<Io> {
  const rand = seededRandom(job.randseed + instance * 7919)
  const unit = minBlock(job)
  const blocks = Math.floor(region.bytes / unit)
  if (blocks === 0) throw new JobFileError(`[${job.name}] the region (${region.bytes} bytes) is smaller than a block (${unit})`)
  const random = job.rw.startsWith('rand')
  const mixed = job.rw === 'rw' || job.rw === 'randrw'
  const baseOp: Io['op'] = job.rw.includes('trim') ? 'trim' : job.rw.includes('write') ? 'write' : 'read'
  const choose = blockChooser(job.randomDistribution, blocks, rand)
  const perLoop = job.ioSize ?? region.bytes
  const sizeOf = (op: Io['op']): number => {
    if (job.bssplit) {
      let r = rand() * 100
      for (const s of job.bssplit) {
        r -= s.pct
        if (r < 0) return s.bs
      }
      return job.bssplit[job.bssplit.length - 1].bs
    }
    if (job.bsrange) {
      const steps = Math.floor((job.bsrange.max - job.bsrange.min) / unit)
      return job.bsrange.min + Math.floor(rand() * (steps + 1)) * unit
    }
    return op === 'write' ? job.bs.write : job.bs.read
  }
  for (let loop = 0; loop < job.loops; loop++) {
    // The random map: blocks done in this pass (a bitmap), refreshed when every block is done.
    let done = random && !job.norandommap ? new Uint8Array(blocks) : undefined
    let left = blocks
    let seq = 0
    for (let moved = 0; moved < perLoop; ) {
      const op: Io['op'] = mixed ? (rand() * 100 < job.rwmixread ? 'read' : 'write') : baseOp
      let length = Math.min(sizeOf(op), region.bytes)
      let block: number
      if (!random) {
        if ((seq + 1) * unit > region.bytes || seq * unit + length > region.bytes) seq = 0
        block = seq
        seq += Math.ceil(length / unit)
      } else {
        block = choose()
        if (done) {
          if (left === 0) {
            done = new Uint8Array(blocks)
            left = blocks
          }
          // Taken: the next free block after it (fio looks for the next free bit the same way).
          let probe = 0
          while (done[block] && probe < blocks) {
            block = block + 1 === blocks ? 0 : block + 1
            probe++
          }
          done[block] = 1
          left--
        }
        if (block * unit + length > region.bytes) length = region.bytes - block * unit
      }
      yield { op, offset: region.start + block * unit, length }
      moved += length
    }
  }
}

/** A job's requests over and over, a new seed each pass (`time_based`: the runtime ends it). */
export function* jobIosForever(job: Job, region: Region, instance: number): Generator<Io> {
  for (let pass = 0; ; pass++) yield* jobIos({ ...job, randseed: job.randseed + pass * 104729 }, region, instance)
}
