/**
 * Jobs with `ioengine=raw` (the raw-device API) and `ioengine=ubcache` (through a cached
 * device): requests kept in flight at `iodepth`, timed, counted as fio counts them (see
 * {@link runIoJob}).
 * @module
 */
import { createHash } from 'node:crypto'
import { existsSync, writeFileSync, truncateSync } from 'node:fs'
import { openDevice, type RawDevice } from '../device'
import { makeBacking, makeCache } from '../format'
import { Registry } from '../registry'
import type { CachedDevice } from '../registry/cached-device'
import { BUCKET_MIN, BUCKET_POLICIES, SIM_POLICIES, simulateCache } from '../sim'
import { crc32c } from './crc32c'
import type { Job } from './jobfile'
import { JobFileError } from './jobfile'
import { LatencyStats } from './stats'
import { readTrace } from './trace'
import { type Io, jobIos, jobIosForever, jobRegion, minBlock, type Region } from './workload'

/** What one direction of a job did. */
export interface DirStats {
  ios: number
  bytes: number
  slat: LatencyStats
  clat: LatencyStats
  lat: LatencyStats
}

/** The cache's counters over a job (`ioengine=ubcache`). */
export interface CacheCounts {
  hits: number
  misses: number
  bypassHits: number
  bypassMisses: number
  bypassedSectors: number
  hitRatio: number
  dirtySectors: number
  writebackRate: number
  /** Sectors read from the cache over sectors read (per block, as the simulators count). */
  hitSectors: number
  missSectors: number
  blockHitRatio: number
  /**
   * The same reads' block accesses through simulated caches of the cache's size: the
   * optimum, Belady's MIN, LRU, FIFO, ARC, S3-FIFO and SIEVE (read workloads only).
   */
  simulated?: { cacheBlocks: number; blockSize: number; accesses: number; hitRatio: Record<string, number> }
}

/** What a job did. */
export interface IoReport {
  job: string
  engine: 'raw' | 'ubcache'
  numjobs: number
  iodepth: number
  /** Milliseconds measured (after the ramp). */
  runtimeMs: number
  read: DirStats
  write: DirStats
  trim: DirStats
  flushes: number
  verifyErrors: string[]
  /** `drain`: sectors written back after the job's I/O, and the seconds it took. */
  drained?: { sectors: number; seconds: number }
  cache?: CacheCounts
  /** One sample a second: IOPS each way, mean latency, the cache's hit ratio over the second. */
  timeline: { t: number; readIops: number; writeIops: number; meanLatUs: number; hitRatio: number | null }[]
}

/** A device to run a job on. */
interface Target {
  size: number
  /** Requests must be multiples of this (O_DIRECT). */
  align: number
  read(offset: number, length: number): Promise<unknown>
  write(offset: number, data: Uint8Array): Promise<void>
  flush(): Promise<void>
  discard(offset: number, length: number): Promise<void>
  readBack(offset: number, length: number): Promise<Buffer>
  /** Reads into `buffer` (from {@link Target.allocBuffer}: no copy) where the device can. */
  readInto?(buffer: Buffer, offset: number): Promise<unknown>
  allocBuffer?(size: number): Buffer
  /** ubcache: writes back every dirty sector, reporting how many are left as it goes. */
  drain?(progress: (dirtySectors: number) => void): Promise<void>
  counts?: () => Omit<CacheCounts, 'hitRatio' | 'blockHitRatio' | 'simulated'>
  /** ubcache: the cache's size in its blocks, and its block size. */
  cacheBlocks?: number
  cacheBlockSize?: number
  /** ubcache: blocks per bucket. */
  bucketBlocks?: number
  close(): Promise<void>
}

/** Nanoseconds, from the monotonic clock (cheaper than `hrtime.bigint()` per request). */
const now = (): number => performance.now() * 1e6
/** Block accesses recorded for the simulators at most (memory). */
const MAX_RECORDED = 20_000_000

/**
 * The block accesses of a run, kept as runs of consecutive blocks (a 1 MiB read is one
 * entry, not 256) in typed arrays that double as they fill: recording costs the measured
 * run a store per request and no garbage.
 */
class BlockRecorder {
  #starts = new Float64Array(4096)
  #counts = new Uint32Array(4096)
  #runs = 0
  /** Blocks recorded. */
  blocks = 0

  /** Records blocks `first` to `last`, as far as {@link MAX_RECORDED} allows. */
  add(first: number, last: number): void {
    const n = Math.min(last - first + 1, MAX_RECORDED - this.blocks)
    if (n <= 0) return
    if (this.#runs === this.#starts.length) {
      const starts = new Float64Array(this.#runs * 2)
      starts.set(this.#starts)
      const counts = new Uint32Array(this.#runs * 2)
      counts.set(this.#counts)
      this.#starts = starts
      this.#counts = counts
    }
    this.#starts[this.#runs] = first
    this.#counts[this.#runs++] = n
    this.blocks += n
  }

  /** Every block accessed, in order. */
  trace(): Float64Array {
    const out = new Float64Array(this.blocks)
    let k = 0
    for (let r = 0; r < this.#runs; r++) for (let i = 0; i < this.#counts[r]; i++) out[k++] = this.#starts[r] + i
    return out
  }
}

function newDir(): DirStats {
  return { ios: 0, bytes: 0, slat: new LatencyStats(), clat: new LatencyStats(), lat: new LatencyStats() }
}

async function rawTarget(job: Job): Promise<Target> {
  if (job.filename === undefined) throw new JobFileError(`[${job.name}] ioengine=raw needs filename=`)
  let dev: RawDevice
  const createSize = job.filesize ?? (job.size && 'bytes' in job.size ? job.size.bytes + ('bytes' in job.offset ? job.offset.bytes : 0) : undefined)
  try {
    dev = await openDevice(job.filename, {
      direct: job.direct ? 'auto' : 'off',
      exclusive: false,
      ...(createSize ? { createSize } : {}),
      ...(job.backingLatency ? { latency: job.backingLatency } : {}),
      ...(job.remoteConnections ? { remoteConnections: job.remoteConnections } : {}),
    })
  } catch (err) {
    throw new JobFileError(`[${job.name}] filename=${job.filename}: ${(err as Error).message}`)
  }
  return {
    size: dev.size,
    align: dev.direct ? dev.logicalBlockSize : 1,
    read: (o, l) => dev.read(o, l),
    write: (o, d) => dev.write(o, d),
    flush: () => dev.flush(),
    discard: (o, l) => dev.discard(o, l),
    readBack: (o, l) => dev.read(o, l),
    readInto: (b, o) => dev.readInto(b, o),
    allocBuffer: (n) => dev.allocBuffer(n),
    close: () => dev.close(),
  }
}

/**
 * The cached device of `cache=` and `backing=`: registered as they are, or, where a file
 * does not exist yet, made (the cache of `cache_size`, the backing of the job's size) and
 * formatted as one set first. Existing files without a bcache superblock are refused, not
 * formatted: they may hold data.
 */
async function ubcacheTarget(job: Job): Promise<Target> {
  const cache = job.cache
  const backing = job.backing ?? job.filename
  if (cache === undefined || backing === undefined) throw new JobFileError(`[${job.name}] ioengine=ubcache needs cache= and backing=`)
  const dataOffset = 8192
  if (!existsSync(cache)) {
    if (job.cacheSize === undefined) throw new JobFileError(`[${job.name}] cache=${cache} does not exist: give cache_size= to make it`)
    writeFileSync(cache, '')
    truncateSync(cache, job.cacheSize)
    // Small caches get smaller buckets (a set needs 128 of them).
    const set = await makeCache(cache, job.cacheSize < 256 << 20 ? { bucketSize: '64k' } : {})
    if (!existsSync(backing)) {
      const bytes = job.filesize ?? (job.size && 'bytes' in job.size ? job.size.bytes + ('bytes' in job.offset ? job.offset.bytes : 0) : undefined)
      if (bytes === undefined) throw new JobFileError(`[${job.name}] backing=${backing} does not exist: give filesize= (or size= in bytes) to make it`)
      writeFileSync(backing, '')
      truncateSync(backing, bytes + dataOffset)
      await makeBacking(backing, { setUuid: set.setUuid, dataOffset: dataOffset / 512 })
    }
  }
  // backing_latency slows the backing device only, as a disk behind an SSD cache.
  const reg = new Registry({
    ...(job.backingLatency ? { latency: job.backingLatency } : {}),
    ...(job.remoteConnections ? { remoteConnections: job.remoteConnections } : {}),
  })
  let dev: CachedDevice
  let set
  try {
    set = await reg.registerCache(cache)
    dev = await reg.registerBacking(backing)
  } catch (err) {
    await reg.close()
    throw new JobFileError(`[${job.name}] ioengine=ubcache cache=${cache} backing=${backing}: ${(err as Error).message}`)
  }
  if (job.cacheMode) dev.cacheMode = job.cacheMode
  if (job.cacheReplacementPolicy) set.configureCacheDevice({ replacement: job.cacheReplacementPolicy })
  if (job.sequentialCutoff !== undefined) dev.configureBypass({ sequentialCutoff: job.sequentialCutoff })
  const wb: { percent?: number; running?: boolean } = {}
  if (job.writebackPercent !== undefined) wb.percent = job.writebackPercent
  if (job.writebackRunning !== undefined) wb.running = job.writebackRunning
  if (Object.keys(wb).length) dev.configureWriteback(wb)
  const d = dev
  return {
    size: d.size,
    align: d.blockSize,
    read: (o, l) => d.read(o, l),
    write: (o, data) => d.write(o, data),
    flush: () => d.flush(),
    discard: (o, l) => d.discard(o, l),
    readBack: (o, l) => d.read(o, l),
    readInto: (b, o) => d.readInto(b, o),
    allocBuffer: (n) => d.allocBuffer(n),
    cacheBlocks: Math.floor(((set.superblock.nbuckets - set.superblock.firstBucket) * set.bucketSize) / set.blockSize),
    cacheBlockSize: set.blockSize,
    bucketBlocks: set.bucketSize / set.blockSize,
    drain: async (progress) => {
      // Writeback at full speed until nothing is dirty.
      d.configureWriteback({ running: true, percent: 0, delaySeconds: 0 })
      while ((d.dirtySectors() ?? 0) > 0) {
        progress(d.dirtySectors() ?? 0)
        await new Promise((r) => setTimeout(r, 50))
      }
    },
    counts: () => {
      const t = d.accounting()?.total
      const st = set.stats()
      return {
        hitSectors: st.hitSectors,
        missSectors: st.missSectors,
        hits: t?.cacheHits ?? 0,
        misses: t?.cacheMisses ?? 0,
        bypassHits: t?.cacheBypassHits ?? 0,
        bypassMisses: t?.cacheBypassMisses ?? 0,
        bypassedSectors: t?.bypassedSectors ?? 0,
        dirtySectors: d.dirtySectors() ?? 0,
        writebackRate: d.writebackRate()?.rate ?? 0,
      }
    },
    close: () => reg.close(),
  }
}

/** A block's verify header: magic, offset, length, then the checksum of the rest. */
const VERIFY_MAGIC = 0x75626376 // "ubcv"

/** Fills `b` (a write to `offset`) with data fio-style verify can check again later. */
function fillVerify(job: Job, b: Buffer, offset: number, seed: number): void {
  if (job.verify === 'pattern') {
    const p = job.verifyPattern as Buffer
    for (let i = 0; i < b.length; i += p.length) p.copy(b, i, 0, Math.min(p.length, b.length - i))
    return
  }
  let x = (offset / 512 + seed * 2654435761) >>> 0 || 1
  for (let i = 32; i + 4 <= b.length; i += 4) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    b.writeUInt32LE(x, i)
  }
  b.writeUInt32LE(VERIFY_MAGIC, 0)
  b.writeUInt32LE(b.length, 4)
  b.writeDoubleLE(offset, 8)
  const sum = job.verify === 'md5' ? createHash('md5').update(b.subarray(32)).digest() : crc32cBuf(b.subarray(32))
  sum.copy(b, 16)
}

function crc32cBuf(b: Uint8Array): Buffer {
  const out = Buffer.alloc(4)
  out.writeUInt32LE(crc32c(b), 0)
  return out
}

/** What is wrong with block data read back at `offset`, or undefined. */
function checkVerify(job: Job, b: Buffer, offset: number): string | undefined {
  if (job.verify === 'pattern') {
    const p = job.verifyPattern as Buffer
    for (let i = 0; i < b.length; i++) if (b[i] !== p[i % p.length]) return `pattern mismatch at byte ${offset + i}`
    return undefined
  }
  if (b.readUInt32LE(0) !== VERIFY_MAGIC) return `bad magic header at offset ${offset}`
  if (b.readDoubleLE(8) !== offset || b.readUInt32LE(4) !== b.length) return `header of offset ${b.readDoubleLE(8)} (${b.readUInt32LE(4)} bytes) found at offset ${offset}`
  const sum = job.verify === 'md5' ? createHash('md5').update(b.subarray(32)).digest() : crc32cBuf(b.subarray(32))
  if (!sum.equals(b.subarray(16, 16 + sum.length))) return `${job.verify} mismatch at offset ${offset}`
  return undefined
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/**
 * Runs a job on its device: `numjobs` instances, each with `iodepth` requests in flight,
 * for its size (`io_size`, `loops`) or, `time_based`, its `runtime`; statistics after
 * `ramp_time`. `rate_iops` paces each instance, `thinktime` waits after each request,
 * `fsync`/`fdatasync` flush every so many writes. With `verify`, written blocks carry a
 * header and checksum (or the pattern) and are read back and checked after the writes
 * (`verify_only`: only checked). `progress` is called about once a second.
 */
export async function runIoJob(job: Job, progress?: (p: { ios: number; elapsedS: number; etaS: number | undefined }) => void): Promise<IoReport> {
  const target = job.ioengine === 'raw' ? await rawTarget(job) : await ubcacheTarget(job)
  try {
    return await run(job, target, progress)
  } finally {
    await target.close()
  }
}

async function run(job: Job, target: Target, progress?: (p: { ios: number; elapsedS: number; etaS: number | undefined }) => void): Promise<IoReport> {
  const region: Region = jobRegion(job, target.size)
  const unit = minBlock(job)
  if (unit % target.align !== 0 || region.start % target.align !== 0) {
    throw new JobFileError(`[${job.name}] block size ${unit} and offset ${region.start} must be multiples of the device's ${target.align}-byte blocks`)
  }
  if (job.startdelay > 0) await sleep(job.startdelay * 1000)
  const report: IoReport = { job: job.name, engine: job.ioengine as 'raw' | 'ubcache', numjobs: job.numjobs, iodepth: job.iodepth, runtimeMs: 0, read: newDir(), write: newDir(), trim: newDir(), flushes: 0, verifyErrors: [], timeline: [] }
  const before = target.counts?.()
  const started = now()
  const rampEnd = started + job.rampTime * 1e9
  const deadline = job.runtime > 0 ? started + (job.runtime + job.rampTime) * 1e9 : Number.POSITIVE_INFINITY
  let measuredFrom = job.rampTime > 0 ? Number.NaN : started
  let total = 0
  const expected = job.timeBased ? undefined : estimateIos(job, region)
  const ticker = progress
    ? setInterval(() => {
        const el = (now() - started) / 1e9
        const eta = job.runtime > 0 ? Math.max(0, job.runtime + job.rampTime - el) : expected ? (el / Math.max(1, total)) * (expected - total) : undefined
        progress({ ios: total, elapsedS: el, etaS: eta })
      }, 1000)
    : undefined
  // The timeline: counters since the last sample.
  let tick = { reads: 0, writes: 0, latNs: 0, n: 0 }
  let lastCounts = before
  let lastSample = started
  const sampler = setInterval(() => {
    const t = now()
    const secs = (t - lastSample) / 1e9
    const c = target.counts?.()
    let hitRatio: number | null = null
    if (c && lastCounts) {
      const h = c.hits - lastCounts.hits
      const m = c.misses - lastCounts.misses
      hitRatio = h + m > 0 ? h / (h + m) : null
    }
    report.timeline.push({ t: (t - started) / 1e9, readIops: tick.reads / secs, writeIops: tick.writes / secs, meanLatUs: tick.n ? tick.latNs / tick.n / 1e3 : 0, hitRatio })
    tick = { reads: 0, writes: 0, latNs: 0, n: 0 }
    lastCounts = c
    lastSample = t
  }, 1000)
  const writeData = new Map<number, Buffer>()
  const dataFor = (len: number, offset: number): Buffer => {
    if (job.verify) {
      const b = Buffer.alloc(len)
      fillVerify(job, b, offset, job.randseed)
      return b
    }
    let b = writeData.get(len)
    if (!b) {
      b = Buffer.alloc(len)
      for (let i = 0; i < len; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ len) >>> 0, i)
      writeData.set(len, b)
    }
    return b
  }
  // The block accesses of a read workload, for the simulators (ubcache only; with writes in
  // the mix the cache also fills from them, which a read stream cannot show).
  const recording = target.cacheBlocks !== undefined && (job.rw === 'read' || job.rw === 'randread') && job.replay === undefined
  const cbs = target.cacheBlockSize ?? 4096
  const recorded = new BlockRecorder()
  const verifyPass = job.verify !== undefined
  const writePhase = !job.verifyOnly
  const instances = Array.from({ length: job.numjobs }, (_, i) => i)
  // A request's start and its accounting are apart so that the worker awaits the device's
  // promise itself: each async layer between them costs microtask turns, and requests made
  // later in a turn miss the batch that goes to the kernel (at QD32 on a RAM disk, 0.66 of
  // fio's IOPS with one more layer).
  const startIo = (io: Io, checking: boolean, bufs: Map<number, Buffer>): Promise<unknown> => {
    if (checking) return target.readBack(io.offset, io.length)
    if (io.op === 'read' && target.readInto) {
      // One buffer per length per worker, read into again and again (as fio reuses its buffers).
      let b = bufs.get(io.length)
      if (b === undefined) bufs.set(io.length, (b = target.allocBuffer?.(io.length) ?? Buffer.alloc(io.length)))
      return target.readInto(b, io.offset)
    }
    if (io.op === 'read') return target.read(io.offset, io.length)
    if (io.op === 'write') return target.write(io.offset, dataFor(io.length, io.offset))
    return target.discard(io.offset, io.length)
  }
  const finishIo = (io: Io, checking: boolean, got: unknown, t0: number, t1: number, t2: number): void => {
    total++
    if (checking || io.op === 'read') tick.reads++
    else if (io.op === 'write') tick.writes++
    tick.latNs += t2 - t0
    tick.n++
    if (recording && !checking && io.op === 'read') recorded.add(Math.floor(io.offset / cbs), Math.floor((io.offset + io.length - 1) / cbs))
    if (checking) {
      const bad = checkVerify(job, got as Buffer, io.offset)
      if (bad && report.verifyErrors.length < 20) report.verifyErrors.push(bad)
    }
    if (t0 < rampEnd) return
    if (Number.isNaN(measuredFrom)) measuredFrom = t0
    const d = checking || io.op === 'read' ? report.read : io.op === 'write' ? report.write : report.trim
    d.ios++
    d.bytes += io.length
    d.slat.add(t1 - t0)
    d.clat.add(t2 - t1)
    d.lat.add(t2 - t0)
  }
  const runPass = async (checking: boolean): Promise<void> => {
    await Promise.all(
      instances.map(async (inst) => {
        const gen = job.replay !== undefined ? replayed(job, region, target.align, inst) : job.timeBased && !checking ? jobIosForever(job, region, inst) : jobIos(job, region, inst)
        let writes = 0
        let nextAt = now()
        const gap = job.rateIops ? 1e9 / job.rateIops : 0
        const worker = async (): Promise<void> => {
          const bufs = new Map<number, Buffer>()
          let clock = now()
          for (;;) {
            if (clock >= deadline) return
            const r = gen.next()
            if (r.done) return
            const io = r.value
            if (checking && io.op !== 'write') continue
            if (!checking && job.verifyOnly) continue
            const due = (io as Io & { due?: number }).due
            if (due !== undefined) {
              const wait = started + due - now()
              if (wait > 1e6) await sleep(wait / 1e6)
              clock = now()
              if (clock >= deadline) return
            }
            if (gap) {
              const wait = nextAt - now()
              nextAt = Math.max(nextAt, now()) + gap
              if (wait > 0) await sleep(wait / 1e6)
              clock = now()
              if (clock >= deadline) return
            }
            const t0 = now()
            const p = startIo(io, checking, bufs)
            const t1 = now()
            const got = await p
            clock = now()
            finishIo(io, checking, got, t0, t1, clock)
            if (!checking && io.op === 'write') {
              writes++
              const every = job.fsync || job.fdatasync
              if (every && writes % every === 0) {
                await target.flush()
                report.flushes++
              }
            }
            if (job.thinktime > 0) {
              await sleep(job.thinktime / 1000)
              clock = now()
            }
          }
        }
        await Promise.all(Array.from({ length: job.iodepth }, worker))
      }),
    )
  }
  try {
    if (writePhase) await runPass(false)
    if (verifyPass && job.rw !== 'read' && job.rw !== 'randread') {
      if (writePhase) await target.flush()
      await runPass(true)
    }
  } finally {
    if (ticker) clearInterval(ticker)
    clearInterval(sampler)
  }
  report.runtimeMs = Math.max(1, (now() - (Number.isNaN(measuredFrom) ? started : measuredFrom)) / 1e6)
  const after = target.counts?.()
  if (job.drain && target.drain) {
    const dirty = after?.dirtySectors ?? 0
    const t0 = now()
    await target.drain((left) => progress?.({ ios: dirty - left, elapsedS: (now() - started) / 1e9, etaS: undefined }))
    report.drained = { sectors: dirty, seconds: (now() - t0) / 1e9 }
  }
  if (before && after) {
    const hits = after.hits - before.hits
    const misses = after.misses - before.misses
    const hitSectors = after.hitSectors - before.hitSectors
    const missSectors = after.missSectors - before.missSectors
    let simulated: CacheCounts['simulated']
    if (recording && recorded.blocks > 0 && target.cacheBlocks) {
      const trace = recorded.trace()
      const hitRatio: Record<string, number> = {}
      for (const p of SIM_POLICIES) hitRatio[p] = (await simulateCache(p, trace, [target.cacheBlocks]))[0].hitRatio
      // Whole buckets, as the cache must evict them.
      if (target.bucketBlocks) {
        const opts = { bucketBlocks: target.bucketBlocks }
        hitRatio[BUCKET_MIN] = (await simulateCache(BUCKET_MIN, trace, [target.cacheBlocks], opts))[0].hitRatio
        // bcache's lru and ubcache's s3fifo and tinylfu evicting whole buckets (docs/replacement.md).
        if (target.cacheBlocks >= 2 * target.bucketBlocks) {
          for (const p of BUCKET_POLICIES) hitRatio[p] = (await simulateCache(p, trace, [target.cacheBlocks], opts))[0].hitRatio
        }
      }
      simulated = { cacheBlocks: target.cacheBlocks, blockSize: cbs, accesses: recorded.blocks, hitRatio }
    }
    report.cache = {
      hitSectors,
      missSectors,
      blockHitRatio: hitSectors + missSectors === 0 ? 0 : hitSectors / (hitSectors + missSectors),
      ...(simulated ? { simulated } : {}),
      hits,
      misses,
      bypassHits: after.bypassHits - before.bypassHits,
      bypassMisses: after.bypassMisses - before.bypassMisses,
      bypassedSectors: after.bypassedSectors - before.bypassedSectors,
      hitRatio: hits + misses === 0 ? 0 : hits / (hits + misses),
      dirtySectors: after.dirtySectors,
      writebackRate: after.writebackRate,
    }
  }
  return report
}

function estimateIos(job: Job, region: Region): number {
  const perLoop = job.ioSize ?? region.bytes
  return Math.ceil((perLoop / Math.max(job.bs.read, job.bs.write)) * job.loops * job.numjobs)
}

/**
 * A trace's requests (instance 0 only), mapped into the job's region (offsets wrap around
 * it, aligned down to the device's blocks; lengths rounded up, clipped at its end), each
 * due at its time over `replay_speed`, in nanoseconds from the start.
 */
function* replayed(job: Job, region: Region, align: number, instance: number): Generator<Io & { due: number }> {
  if (instance > 0) return
  for (const t of readTrace(job.replay as string, minBlock(job))) {
    const at = t.offset % region.bytes
    const offset = at - (at % align)
    const length = Math.min(Math.ceil((t.length + (at - offset)) / align) * align, region.bytes - offset)
    yield { op: t.op, offset: region.start + offset, length, due: (t.time / job.replaySpeed) * 1e9 }
  }
}
