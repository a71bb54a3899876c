// `npm run bench:cache`: reads and writes through a cached device from TypeScript (issue
// 15's figures), each against fio on the raw device named, run by this script in the same
// rounds.
//
// Devices, as bench:engine sets them up: the cache device is a loop device over a file in
// /dev/shm when run as root (`losetup --direct-io=on` where it works; detached at the end,
// even on an error or SIGINT), otherwise a file on disk; the backing device is a 1 GiB file
// on this machine's disk (not tmpfs), written in full once and reused
// (UBCACHE_BENCH_CACHE_BACKING, default /var/tmp/ubcache-bench-cache/backing-1g). Each set
// is formatted afresh where a figure needs one: the cache device with `makeCache` (512 KiB
// buckets, 4 KiB blocks), the backing file with `makeBacking` (the set's UUID, the cache
// mode wanted, data at 8 KiB), then registered through the `Registry` facade and used
// through its `CachedDevice` (or, with UBCACHE_BENCH_CACHE_API=engine or a build without
// the registry, through `CacheEngine` and a device handle; the output says which).
//
// Figures (ours / fio's; `UBCACHE_BENCH_ROUNDS` rounds (default 3) of `UBCACHE_BENCH_SECONDS`
// (default 3) per measurement, fio first, median of the paired ratios; fio gets 1 s of
// ramp, ours 0.5 s of warm-up):
// - miss_seqread_bw_ratio_js: 1 MiB sequential reads at QD4 with nothing cached, mode
//   `none` (every read a miss, served from the backing device), with `readInto` on one
//   engine buffer per reader (`allocBuffer`), as fio reuses its buffers, vs fio's sequential
//   reads of the backing file; fill_seqread_bw_ratio_js: the same reads in writethrough mode
//   on a fresh set, so each one also fills the cache (one pass over the device at most, so
//   every read misses), vs the same fio run;
// - hit_randread_qd32_iops_ratio_js, hit_randread_qd1_p50_ratio_js: 4 KiB random reads
//   (`read`: each result its own Buffer; `_into`: `readInto` one engine buffer per reader)
//   over a 512 MiB region written before in writeback mode (the set's counters must show
//   ≥ 99.9% hits), vs fio randread on the raw cache device over the bytes just past the
//   journal where that region's data lies; QD1 p50 is submission to completion, also
//   against fio polling for its completions (`--iodepth_batch_complete_min=0`, `_fio_polling`);
// - wt_randwrite_qd32_iops_ratio_js: writethrough 4 KiB random writes over the whole cached
//   device, vs fio randwrite on the raw backing file;
// - wb_randwrite_qd32_iops_ratio_js, meta_bytes_per_write: writeback 4 KiB random writes,
//   each to a block never written (a random permutation, a fresh set per round, at most one
//   pass over the device), vs fio randwrite on the raw cache device; metadata bytes per
//   write from the set's counters (`metaBytes` / writes) over the measurement.
// Requests are kept in flight by N async loops, each awaiting one request at a time (no
// allocation per request beyond what the API makes). CPU per request is the process's
// (`process.cpuUsage`, every thread) over the run, warm-up included.
//
// Targets (issue 15): hit QD32 ≥ 0.7, QD1 p50 ≤ 1.25, writeback ≥ 0.6, writethrough ≥ 0.85,
// miss ≥ 0.9. The last stdout line is one JSON object; progress goes to stderr.
//
// Environment: UBCACHE_BENCH_SECONDS, UBCACHE_BENCH_ROUNDS, UBCACHE_BENCH_CACHE_BACKING,
// UBCACHE_BENCH_CACHE_GIB (cache device size, default 4), UBCACHE_BENCH_CACHE_ONLY
// (comma-separated subset of miss,hit,wt,wb), UBCACHE_BENCH_CACHE_API (registry|engine),
// UBCACHE_BENCH_PERF_WINDOWS=1 (print each measurement's CLOCK_MONOTONIC window, for
// `perf record -k CLOCK_MONOTONIC` then `perf report --time <window>`).

import { spawnSync } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import fs from 'node:fs'
import { createRequire } from 'node:module'
import os from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const require = createRequire(import.meta.url)
const lib = require(join(root, 'dist', 'index.js'))

const secs = Number(process.env.UBCACHE_BENCH_SECONDS ?? 3)
const rounds = Math.max(1, Number(process.env.UBCACHE_BENCH_ROUNDS ?? 3))
const cacheGiB = Math.max(1, Number(process.env.UBCACHE_BENCH_CACHE_GIB ?? 4))
const backingPath = process.env.UBCACHE_BENCH_CACHE_BACKING ?? '/var/tmp/ubcache-bench-cache/backing-1g'
const only = process.env.UBCACHE_BENCH_CACHE_ONLY?.split(',')
const wants = (what) => !only || only.includes(what)
const api = process.env.UBCACHE_BENCH_CACHE_API ?? (lib.Registry ? 'registry' : 'engine')
if (api !== 'registry' && api !== 'engine') throw new Error(`UBCACHE_BENCH_CACHE_API must be registry or engine, got ${api}`)
if (api === 'registry' && !lib.Registry) throw new Error('this build has no Registry: run with UBCACHE_BENCH_CACHE_API=engine')
const apiName = api === 'registry' ? 'Registry / CachedDevice' : 'CacheEngine (device handle)'

const KIB = 1024
const MIB = 1 << 20
const GIB = 1 << 30
const BACKING_SIZE = GIB
const BLOCK = 4096
const DATA_OFFSET = 8192
const DEV_BYTES = BACKING_SIZE - DATA_OFFSET
const DEV_BLOCKS = DEV_BYTES / BLOCK
const HIT_REGION = 512 * MIB
const BUCKET = 512 * KIB
const TMPFS_MAGIC = 0x01021994

// --- devices --------------------------------------------------------------------------------

/** The backing file: 1 GiB on disk, every byte written once (reused when it is). */
function prepareBacking() {
  fs.mkdirSync(dirname(backingPath), { recursive: true })
  if (fs.statfsSync(dirname(backingPath)).type === TMPFS_MAGIC) {
    throw new Error(`${backingPath} is on tmpfs: the backing device must be on this machine's disk`)
  }
  try {
    const st = fs.statSync(backingPath)
    if (st.size === BACKING_SIZE && st.blocks * 512 >= BACKING_SIZE) {
      console.error(`reusing the backing file ${backingPath}`)
      return
    }
  } catch {}
  console.error(`writing the backing file ${backingPath} (1 GiB)...`)
  const fd = fs.openSync(backingPath, 'w')
  const chunk = Buffer.alloc(4 * MIB)
  for (let at = 0; at < BACKING_SIZE; at += chunk.length) fs.writeSync(fd, randomFillSync(chunk), 0, chunk.length, at)
  fs.fsyncSync(fd)
  fs.closeSync(fd)
}

const isRoot = process.getuid?.() === 0
const cacheFile = isRoot ? '/dev/shm/ubcache-bench-cache-cache' : '/var/tmp/ubcache-bench-cache/cache'
let loopDev
let cleaned = false

/** Detaches the loop device and removes the cache file (on every way out). */
function cleanup() {
  if (cleaned) return
  cleaned = true
  if (loopDev) {
    // A device still open (an error left the registry open) is detached when last closed.
    const r = spawnSync('losetup', ['-d', loopDev], { encoding: 'utf8' })
    console.error(r.status === 0 ? `detached ${loopDev}` : `losetup -d ${loopDev} failed: ${r.stderr.trim()}`)
  }
  try {
    fs.rmSync(cacheFile, { force: true })
  } catch {}
}
process.on('exit', cleanup)
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    console.error(`${sig}: stopping`)
    process.exit(130)
  })
}

/** The cache device: a loop device over a file in /dev/shm (root), or a file on disk. */
function createCache() {
  if (isRoot) {
    // Loop devices a killed earlier run left over this file.
    const r = spawnSync('losetup', ['-j', cacheFile], { encoding: 'utf8' })
    for (const line of (r.stdout ?? '').split('\n').filter(Boolean)) {
      const dev = line.split(':')[0]
      console.error(`detaching ${dev}, left over by an earlier run`)
      spawnSync('losetup', ['-d', dev])
    }
  }
  fs.mkdirSync(dirname(cacheFile), { recursive: true })
  fs.rmSync(cacheFile, { force: true })
  // Every page written once before anything is measured (fallocate leaves tmpfs pages
  // untouched, and memory the guest has not touched lately is slow to write the first time).
  const t = performance.now()
  const fd = fs.openSync(cacheFile, 'w')
  const zeros = Buffer.alloc(8 * MIB)
  const size = cacheGiB * GIB
  for (let at = 0; at < size; at += zeros.length) fs.writeSync(fd, zeros, 0, zeros.length, at)
  fs.fsyncSync(fd)
  fs.closeSync(fd)
  console.error(`wrote the ${cacheGiB} GiB cache file ${cacheFile} once in ${((performance.now() - t) / 1000).toFixed(1)} s`)
  if (!isRoot) return { path: cacheFile, what: `a ${cacheGiB} GiB file on disk (${cacheFile}): not root, so no loop device over /dev/shm`, kind: 'file' }
  let dio = true
  let r = spawnSync('losetup', ['--find', '--show', '--direct-io=on', cacheFile], { encoding: 'utf8' })
  if (r.status !== 0) {
    console.error(`losetup --direct-io=on failed (${r.stderr.trim()}); without it`)
    dio = false
    r = spawnSync('losetup', ['--find', '--show', cacheFile], { encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`losetup failed: ${r.stderr}`)
  }
  loopDev = r.stdout.trim()
  return {
    path: loopDev,
    what: `${loopDev} over ${cacheFile} (${cacheGiB} GiB in /dev/shm), loop direct I/O ${dio ? 'on' : 'off'}`,
    kind: 'loop',
  }
}

// --- fio ------------------------------------------------------------------------------------

/** One fio run on `file` over `size` bytes from `offset`; returns the job's figures for `dir`. */
function fio(file, offset, size, args, dir = 'read') {
  const r = spawnSync(
    'fio',
    [
      '--name=ref',
      `--filename=${file}`,
      '--direct=1',
      '--ioengine=io_uring',
      '--time_based',
      '--ramp_time=1',
      '--norandommap',
      '--randrepeat=0',
      `--offset=${offset}`,
      `--size=${size}`,
      '--lat_percentiles=1',
      '--output-format=json',
      `--runtime=${secs}`,
      ...args,
    ],
    { encoding: 'utf8' },
  )
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`)
  return JSON.parse(r.stdout).jobs[0][dir]
}

// --- the cached device ------------------------------------------------------------------------

let cache
/** Where the set's data area begins on the cache device (past the superblock's bucket and the journal's). */
let dataStart = 0

/**
 * Formats a fresh set (cache device and backing superblock) with the backing device in
 * `mode`, opens it through the API chosen and returns what the measurements use.
 */
async function openSet(mode) {
  const csb = await lib.makeCache(cache.path, { bucketSize: BUCKET, blockSize: BLOCK, wipe: true })
  const bsb = await lib.makeBacking(backingPath, { setUuid: csb.setUuid, cacheMode: mode, blockSize: BLOCK, wipe: true })
  if (bsb.dataOffset * 512 !== DATA_OFFSET) throw new Error(`unexpected data offset ${bsb.dataOffset}`)
  // The journal takes nbuckets/128 buckets (2 to 256) after the first, as bcache sets it up.
  const nb = csb.nbuckets
  dataStart = (csb.firstBucket + Math.min(256, Math.max(2, nb >> 7))) * csb.bucketSize * 512
  // What is measured is the cache path: long sequential streams must not bypass it, and
  // writeback (which runs by default and would copy the benchmark's dirty data to the
  // backing file meanwhile) is paused, as fio's writes to the raw cache device copy nothing.
  const bypass = { sequentialCutoff: 0 }
  const writeback = { running: false }
  if (api === 'registry') {
    const reg = new lib.Registry({ bypass, writeback })
    const set = await reg.register(cache.path)
    const dev = await reg.register(backingPath)
    if (dev.set !== set) throw new Error(`the backing device did not attach to its set: ${dev.attachError?.message}`)
    if (dev.cacheMode !== mode) dev.cacheMode = mode
    return {
      size: dev.size,
      read: (o, n) => dev.read(o, n),
      readInto: (b, o) => dev.readInto(b, o),
      write: (o, d) => dev.write(o, d),
      allocBuffer: (n) => dev.allocBuffer(n),
      stats: () => set.stats(),
      cachedSectors: () => dev.cachedSectors(),
      engineStats: () => set._engine?.engineStats?.(),
      close: () => reg.close(),
    }
  }
  const engine = await lib.CacheEngine.open(cache.path)
  const h = await engine.attach({ path: backingPath, uuid: bsb.uuid, dataOffset: bsb.dataOffset * 512, mode, bypass, writeback })
  return {
    size: engine.device(h).size,
    read: (o, n) => engine.read(h, o, n),
    readInto: (b, o) => engine.readInto(h, b, o),
    write: (o, d) => engine.write(h, o, d),
    allocBuffer: (n) => engine.allocBuffer(n),
    stats: () => engine.stats(),
    cachedSectors: () => engine.cachedSectors(h),
    engineStats: () => engine.engineStats(),
    close: () => engine.close(),
  }
}

const COUNTERS = ['cacheHits', 'cacheMisses', 'metaBytes', 'journalBytes', 'journalEntries', 'checkpointBytes', 'prioBytes',
  'otherMetaBytes', 'checkpoints', 'prioWrites', 'gcRuns', 'fillSectors', 'missSectors', 'dataBytes', 'writebackCutoffs',
  'dirtyOverlaps', 'spaceWaits', 'orderedWaits']

function delta(a, b) {
  const d = {}
  for (const k of COUNTERS) d[k] = (b[k] ?? 0) - (a[k] ?? 0)
  return d
}

// UBCACHE_BENCH_PERF_WINDOWS=1: print each measurement's CLOCK_MONOTONIC window, for
// `perf record -k CLOCK_MONOTONIC` then `perf report --time <window>`.
const perfWindows = process.env.UBCACHE_BENCH_PERF_WINDOWS !== undefined
const monotonic = () => Number(process.hrtime.bigint()) / 1e9

let seed = 0x2545f491
/** xorshift32: cheap enough not to show in the figures. */
function randomBelow(n) {
  seed ^= seed << 13
  seed ^= seed >>> 17
  seed ^= seed << 5
  return (seed >>> 0) % n
}

function sequential(limitBytes, bs) {
  const wrap = Math.floor(limitBytes / bs) * bs
  let at = 0
  return () => {
    const o = at
    at = (at + bs) % wrap
    return o
  }
}

/**
 * Keeps `qd` requests of `bs` bytes in flight (`kind`: `read`, `readInto` into one engine
 * buffer per loop, or `write` of one buffer per loop), at the offsets `next` gives, for
 * `secs` after `warmMs`, or until `limit` requests were made in all; the measurement ends at
 * the first completion past either. Returns its figures and the set's counters over it.
 */
async function closedLoop(c, { qd, bs, kind, next, warmMs = 500, secs: s = secs, lat = false, limit = Infinity }) {
  const lats = lat ? [] : undefined
  let ops = 0
  let submitted = 0
  let t0 = -1
  let t1 = 0
  let stopping = false
  let before
  let after
  let window0 = 0
  const cpu0 = process.cpuUsage()
  const wall0 = performance.now()
  const warmEnd = wall0 + warmMs
  const end = warmEnd + s * 1000
  const worker = async (i) => {
    let buf
    if (kind === 'readInto') buf = c.allocBuffer(bs)
    else if (kind === 'write') {
      buf = Buffer.allocUnsafe(bs)
      randomFillSync(buf)
      buf[0] = i
    }
    while (!stopping && submitted < limit) {
      submitted++
      const off = next()
      const ts = lat ? performance.now() : 0
      if (kind === 'read') await c.read(off, bs)
      else if (kind === 'readInto') await c.readInto(buf, off)
      else await c.write(off, buf)
      if (stopping) return
      const now = performance.now()
      if (t0 < 0) {
        if (now < warmEnd) continue
        t0 = now
        before = c.stats()
        if (perfWindows) window0 = monotonic()
      }
      ops++
      if (lats) lats.push(now - ts)
      if (now >= end || submitted >= limit) {
        stopping = true
        t1 = now
        after = c.stats()
        if (perfWindows) console.error(`perf window: ${window0.toFixed(6)},${monotonic().toFixed(6)}`)
      }
    }
  }
  await Promise.all(Array.from({ length: qd }, (_, i) => worker(i)))
  const cpu = process.cpuUsage(cpu0)
  const wall = performance.now() - wall0
  if (t0 < 0 || ops === 0) throw new Error('nothing was measured (the warm-up used up the requests)')
  const el = (t1 - t0) / 1000
  const iops = ops / el
  let p50 = NaN
  let p99 = NaN
  if (lats) {
    lats.sort((a, b) => a - b)
    p50 = lats[lats.length >> 1] * 1e6
    p99 = lats[Math.min(lats.length - 1, Math.floor(lats.length * 0.99))] * 1e6
  }
  // Process CPU over the whole run (warm-up included), per request at the measured rate.
  const cpuUs = ((cpu.user + cpu.system) / 1000 / wall / iops) * 1e6
  return { ops, secs: el, iops, bw: (ops * bs) / el, p50, p99, cpuUs, d: delta(before, after) }
}

// --- figures ----------------------------------------------------------------------------------

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const r3 = (x) => Math.round(x * 1000) / 1000

/** Paired figures of one comparison: the median of ours / fio's, and each side's median. */
class Pairs {
  fio = []
  ours = []
  push(f, o) {
    this.fio.push(f)
    this.ours.push(o)
  }
  get ratio() {
    return median(this.ours.map((o, i) => o / this.fio[i]))
  }
}

const json = {}
const put = (k, v) => {
  json[k] = v
}
const mb = (x) => `${(x / 1e6).toFixed(0)} MB/s`
const us = (ns) => `${(ns / 1e3).toFixed(1)} us`

async function main() {
  prepareBacking()
  cache = createCache()
  console.error(`cache device: ${cache.what}`)
  console.error(`backing device: ${backingPath} (1 GiB, data at ${DATA_OFFSET})`)
  console.error(`through ${apiName}; 512 KiB buckets, 4 KiB blocks; ${rounds} rounds of ${secs} s per measurement`)
  const summary = []

  if (wants('miss')) {
    console.error('1 MiB sequential reads, QD4, readInto reused engine buffers: nothing cached, mode none (miss) and writethrough (fill), fresh sets...')
    const miss = new Pairs()
    const fill = new Pairs()
    for (let i = 0; i < rounds; i++) {
      const f = fio(backingPath, DATA_OFFSET, DEV_BYTES, ['--rw=read', '--bs=1m', '--iodepth=4']).bw_bytes
      let c = await openSet('none')
      const m = await closedLoop(c, { qd: 4, bs: MIB, kind: 'readInto', next: sequential(DEV_BYTES, MIB) })
      await c.close()
      if (m.d.cacheHits !== 0) throw new Error(`mode none with nothing cached hit ${m.d.cacheHits} times`)
      c = await openSet('writethrough')
      // One pass at most: every read misses and fills.
      const fl = await closedLoop(c, { qd: 4, bs: MIB, kind: 'readInto', next: sequential(DEV_BYTES, MIB), warmMs: 250, limit: Math.floor(DEV_BYTES / MIB) })
      await c.close()
      if (fl.d.cacheHits !== 0 || fl.d.fillSectors === 0) throw new Error(`fill run: ${fl.d.cacheHits} hits, ${fl.d.fillSectors} sectors filled`)
      miss.push(f, m.bw)
      fill.push(f, fl.bw)
      console.error(
        `  round ${i + 1}: fio ${mb(f)} (backing file); miss ${mb(m.bw)} (${r3(m.bw / f)}), ${m.cpuUs.toFixed(1)} us CPU/read; fill ${mb(fl.bw)} (${r3(fl.bw / f)}) over ${(fl.secs).toFixed(2)} s, ${(fl.d.fillSectors / 2048).toFixed(0)} MiB filled, ${fl.cpuUs.toFixed(1)} us CPU/read`,
      )
    }
    put('miss_seqread_bw_ratio_js', r3(miss.ratio))
    put('fill_seqread_bw_ratio_js', r3(fill.ratio))
    put('fio_seqread_bw_bytes_per_sec', Math.round(median(miss.fio)))
    put('miss_seqread_bw_bytes_per_sec_js', Math.round(median(miss.ours)))
    put('fill_seqread_bw_bytes_per_sec_js', Math.round(median(fill.ours)))
    summary.push(`miss 1 MiB seq reads: ${mb(median(miss.ours))} vs fio ${mb(median(miss.fio))}: ${r3(miss.ratio)} (target ≥ 0.9)`)
    summary.push(`fill 1 MiB seq reads: ${mb(median(fill.ours))}: ${r3(fill.ratio)}`)
  }

  if (wants('hit')) {
    const c = await openSet('writeback')
    console.error(`filling a ${HIT_REGION / MIB} MiB region: 1 MiB sequential writes, QD4, writeback...`)
    const w = await closedLoop(c, { qd: 4, bs: MIB, kind: 'write', next: sequential(HIT_REGION, MIB), warmMs: 0, secs: Infinity, limit: HIT_REGION / MIB })
    const cached = c.cachedSectors() * 512
    console.error(`  written at ${mb(w.bw)}: ${cached / MIB} MiB cached`)
    if (cached < HIT_REGION) throw new Error(`the region is not all cached: ${cached} bytes`)
    // Its data lies just past the journal: fio reads that range (with a little room for the
    // metadata buckets written among it).
    const lo = dataStart
    const span = HIT_REGION + 16 * MIB
    console.error(`  fio reads bytes ${lo}..${lo + span} of the cache device`)
    const blocks = HIT_REGION / BLOCK
    const rand = () => randomBelow(blocks) * BLOCK
    const hitCheck = (r, what) => {
      const h = r.d.cacheHits / Math.max(1, r.d.cacheHits + r.d.cacheMisses)
      if (h < 0.999) throw new Error(`${what}: only ${(h * 100).toFixed(3)}% hits`)
      return h
    }

    console.error('4 KiB random reads, all hits, QD32 (IOPS)...')
    const p = new Pairs()
    const pInto = new Pairs()
    const cpu32 = []
    const cpu32Into = []
    for (let i = 0; i < rounds; i++) {
      const f = fio(cache.path, lo, span, ['--rw=randread', '--bs=4k', '--iodepth=32']).iops
      const e0 = c.engineStats()
      const r = await closedLoop(c, { qd: 32, bs: BLOCK, kind: 'read', next: rand })
      const e1 = c.engineStats()
      const ri = await closedLoop(c, { qd: 32, bs: BLOCK, kind: 'readInto', next: rand })
      const h = hitCheck(r, 'read')
      hitCheck(ri, 'readInto')
      p.push(f, r.iops)
      pInto.push(f, ri.iops)
      cpu32.push(r.cpuUs)
      cpu32Into.push(ri.cpuUs)
      const eng = engineLine(e0, e1)
      console.error(
        `  round ${i + 1}: fio ${f.toFixed(0)} IOPS (raw cache device); read ${r.iops.toFixed(0)} IOPS (${r3(r.iops / f)}), ${r.cpuUs.toFixed(2)} us CPU/read; readInto ${ri.iops.toFixed(0)} IOPS (${r3(ri.iops / f)}), ${ri.cpuUs.toFixed(2)} us CPU/read; ${(h * 100).toFixed(2)}% hits${eng}`,
      )
    }
    put('hit_randread_qd32_iops_ratio_js', r3(p.ratio))
    put('hit_randread_qd32_iops_ratio_js_into', r3(pInto.ratio))
    put('fio_randread_qd32_iops', Math.round(median(p.fio)))
    put('hit_randread_qd32_iops_js', Math.round(median(p.ours)))
    put('hit_randread_qd32_iops_js_into', Math.round(median(pInto.ours)))
    put('hit_randread_qd32_cpu_us_per_read_js', r3(median(cpu32)))
    put('hit_randread_qd32_cpu_us_per_read_js_into', r3(median(cpu32Into)))
    summary.push(`hit 4 KiB random reads QD32: read ${median(p.ours).toFixed(0)} IOPS, readInto ${median(pInto.ours).toFixed(0)} IOPS vs fio ${median(p.fio).toFixed(0)}: ${r3(p.ratio)}, readInto ${r3(pInto.ratio)} (target ≥ 0.7)`)

    console.error('4 KiB random reads, all hits, QD1 (p50 latency)...')
    const q = new Pairs()
    const qSpin = new Pairs()
    const cpu1 = []
    for (let i = 0; i < rounds; i++) {
      const f = fio(cache.path, lo, span, ['--rw=randread', '--bs=4k', '--iodepth=1']).lat_ns.percentile['50.000000']
      const fs_ = fio(cache.path, lo, span, ['--rw=randread', '--bs=4k', '--iodepth=1', '--iodepth_batch_complete_min=0']).lat_ns.percentile['50.000000']
      const e0 = c.engineStats()
      const r = await closedLoop(c, { qd: 1, bs: BLOCK, kind: 'read', next: rand, lat: true })
      const e1 = c.engineStats()
      const h = hitCheck(r, 'read')
      q.push(f, r.p50)
      qSpin.push(fs_, r.p50)
      cpu1.push(r.cpuUs)
      console.error(
        `  round ${i + 1}: fio p50 ${us(f)} (polling ${us(fs_)}); ours p50 ${us(r.p50)} (${r3(r.p50 / f)}; ${r3(r.p50 / fs_)} to fio polling), p99 ${us(r.p99)}, ${r.iops.toFixed(0)} IOPS, ${r.cpuUs.toFixed(2)} us CPU/read; ${(h * 100).toFixed(2)}% hits${engineLine(e0, e1)}`,
      )
    }
    put('hit_randread_qd1_p50_ratio_js', r3(q.ratio))
    put('hit_randread_qd1_p50_ratio_js_fio_polling', r3(qSpin.ratio))
    put('fio_randread_qd1_p50_ns', Math.round(median(q.fio)))
    put('fio_polling_randread_qd1_p50_ns', Math.round(median(qSpin.fio)))
    put('hit_randread_qd1_p50_ns_js', Math.round(median(q.ours)))
    put('hit_randread_qd1_cpu_us_per_read_js', r3(median(cpu1)))
    summary.push(`hit 4 KiB random reads QD1: p50 ${us(median(q.ours))} vs fio ${us(median(q.fio))} (polling ${us(median(qSpin.fio))}): ${r3(q.ratio)}, ${r3(qSpin.ratio)} to fio polling (target ≤ 1.25)`)
    await c.close()
  }

  if (wants('wt')) {
    const c = await openSet('writethrough')
    console.error('4 KiB random writes, QD32, writethrough, over the whole cached device (IOPS)...')
    const p = new Pairs()
    const cpu = []
    for (let i = 0; i < rounds; i++) {
      const f = fio(backingPath, DATA_OFFSET, DEV_BYTES, ['--rw=randwrite', '--bs=4k', '--iodepth=32'], 'write').iops
      const r = await closedLoop(c, { qd: 32, bs: BLOCK, kind: 'write', next: () => randomBelow(DEV_BLOCKS) * BLOCK })
      p.push(f, r.iops)
      cpu.push(r.cpuUs)
      console.error(
        `  round ${i + 1}: fio ${f.toFixed(0)} IOPS (raw backing file); ours ${r.iops.toFixed(0)} IOPS (${r3(r.iops / f)}), ${r.cpuUs.toFixed(2)} us CPU/write; ${r.d.writebackCutoffs} cut off, ${r.d.spaceWaits} space waits`,
      )
    }
    await c.close()
    put('wt_randwrite_qd32_iops_ratio_js', r3(p.ratio))
    put('fio_backing_randwrite_qd32_iops', Math.round(median(p.fio)))
    put('wt_randwrite_qd32_iops_js', Math.round(median(p.ours)))
    put('wt_randwrite_qd32_cpu_us_per_write_js', r3(median(cpu)))
    summary.push(`writethrough 4 KiB random writes QD32: ${median(p.ours).toFixed(0)} IOPS vs fio ${median(p.fio).toFixed(0)} on the backing file: ${r3(p.ratio)} (target ≥ 0.85)`)
  }

  if (wants('wb')) {
    console.error('4 KiB random writes, QD32, writeback, each to a block never written (a fresh set per round; one pass at most) (IOPS)...')
    const p = new Pairs()
    const cpu = []
    const meta = []
    for (let i = 0; i < rounds; i++) {
      const f = fio(cache.path, dataStart || 34078720, DEV_BYTES, ['--rw=randwrite', '--bs=4k', '--iodepth=32'], 'write').iops
      const c = await openSet('writeback')
      const perm = new Uint32Array(DEV_BLOCKS)
      for (let j = 0; j < DEV_BLOCKS; j++) perm[j] = j
      for (let j = DEV_BLOCKS - 1; j > 0; j--) {
        const k = randomBelow(j + 1)
        const t = perm[j]
        perm[j] = perm[k]
        perm[k] = t
      }
      let k = 0
      const r = await closedLoop(c, { qd: 32, bs: BLOCK, kind: 'write', next: () => perm[k++] * BLOCK, limit: DEV_BLOCKS })
      await c.close()
      if (r.d.dirtyOverlaps !== 0) throw new Error(`${r.d.dirtyOverlaps} writes landed on dirty data`)
      const mpw = r.d.metaBytes / r.ops
      p.push(f, r.iops)
      cpu.push(r.cpuUs)
      meta.push(mpw)
      const d = r.d
      console.error(
        `  round ${i + 1}: fio ${f.toFixed(0)} IOPS (raw cache device); ours ${r.iops.toFixed(0)} IOPS (${r3(r.iops / f)}), ${r.ops} writes in ${r.secs.toFixed(2)} s, ${r.cpuUs.toFixed(2)} us CPU/write; metadata ${mpw.toFixed(1)} B/write (journal ${(d.journalBytes / r.ops).toFixed(1)} in ${d.journalEntries} entries, checkpoints ${(d.checkpointBytes / r.ops).toFixed(1)}, prios ${(d.prioBytes / r.ops).toFixed(1)}, other ${(d.otherMetaBytes / r.ops).toFixed(1)}); ${d.writebackCutoffs} cut off, ${d.spaceWaits} space waits`,
      )
    }
    put('wb_randwrite_qd32_iops_ratio_js', r3(p.ratio))
    put('fio_cache_randwrite_qd32_iops', Math.round(median(p.fio)))
    put('wb_randwrite_qd32_iops_js', Math.round(median(p.ours)))
    put('wb_randwrite_qd32_cpu_us_per_write_js', r3(median(cpu)))
    put('meta_bytes_per_write', Math.round(median(meta) * 10) / 10)
    summary.push(`writeback 4 KiB random writes QD32: ${median(p.ours).toFixed(0)} IOPS vs fio ${median(p.fio).toFixed(0)} on the cache device: ${r3(p.ratio)} (target ≥ 0.6); ${(Math.round(median(meta) * 10) / 10).toFixed(1)} metadata bytes/write`)
  }

  console.error(`\nthrough ${apiName}, cache device ${cache.what}:`)
  for (const s of summary) console.error(`  ${s}`)
  const targets = {
    hit_randread_qd32_iops_ratio_js: ['>=', 0.7],
    hit_randread_qd1_p50_ratio_js: ['<=', 1.25],
    wb_randwrite_qd32_iops_ratio_js: ['>=', 0.6],
    wt_randwrite_qd32_iops_ratio_js: ['>=', 0.85],
    miss_seqread_bw_ratio_js: ['>=', 0.9],
  }
  const missed = Object.entries(targets)
    .filter(([k, [op, v]]) => k in json && (op === '>=' ? json[k] < v : json[k] > v))
    .map(([k]) => k)
  console.error(missed.length ? `targets missed: ${missed.join(', ')}` : 'every target measured was met')
  put('targets_missed', missed)
  put('api', api === 'registry' ? 'CachedDevice' : 'CacheEngine')
  put('cache_device', cache.kind)
  put('seconds_per_measurement', secs)
  put('rounds', rounds)
  put('loadavg', os.loadavg().map((x) => Math.round(x * 100) / 100))
}

/** Event-loop wakeups and completion batches of the engine between two `engineStats()`. */
function engineLine(a, b) {
  if (!a || !b) return ''
  const parts = []
  for (const [k, v] of Object.entries(b)) {
    if (typeof v === 'number' && typeof a[k] === 'number' && /wake|batch|poll|fresh/i.test(k)) parts.push(`${k} +${v - a[k]}`)
  }
  return parts.length ? `; engine: ${parts.join(', ')}` : ''
}

let failed = false
try {
  await main()
} catch (err) {
  console.error(err)
  failed = true
}
cleanup()
// On an error a set may still be open with requests in flight: leave at once.
if (failed) process.exit(1)
console.log(JSON.stringify(json))
