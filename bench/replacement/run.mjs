// `npm run bench:replacement`: hit ratios of the replacement policies through the real
// engine (a cache set on a file, an existing device attached to it, 4 KiB reads at QD 8),
// beside block-granular simulations of OPT, LRU, ARC, S3-FIFO and SIEVE on the same reads
// with the cache's size (the blocks the engine held at the end of its run), and the
// bucket-granular simulations of lru, s3fifo and tinylfu (64 KiB buckets).
//
// Workloads over a working set of UBCACHE_REPL_BLOCKS 4 KiB blocks (default 262144, 1 GiB),
// UBCACHE_REPL_REQUESTS reads each (default 400000), seeds fixed (UBCACHE_REPL_QD: the
// engine's queue depth, default 8):
// - zipf-scan: Zipf (θ 0.9) reads over the first half, one read in three from scans of
//   fresh blocks of the second half (runs of 256, read once: a scan the sequential cutoff
//   missed; the cutoff is off for all runs);
// - loop: Zipf (θ 0.9) reads, one in two from a loop over 12% of the working set (larger
//   than the largest cache);
// - shifting: Zipf (θ 1.0) reads whose hot set moves by a quarter of the working set four
//   times in the run;
// - cloudphysics: a public block trace, CloudPhysics' VSCSI sample (113,872 requests of a
//   VM's disk; 4 KiB block accesses over 269,210 blocks), as the PyPI
//   registry serves it in the mimircache 0.0.2.70 source package (data/trace.csv;
//   downloaded once into /var/tmp/ubcache-traces, or UBCACHE_REPL_TRACE names the file).
//   Every request's blocks are read in order (its writes too: what they leave in a cache),
//   the blocks numbered densely in order of first access, an access to the block just
//   accessed left out. Without network access the
//   workload is left out, with a line saying so.
// Caches of 1%, 5% and 10% of the working set (64 KiB buckets). Progress on stderr; a table,
// then the last stdout line is one JSON object:
// {"min_gain_vs_lru_pts", "scan_gain_vs_lru_pts", "share_at_or_above_arc", "mean_ratio_to_opt"}
// for the best new policy (s3fifo or tinylfu, the one whose worst gain over lru is
// largest; its name in "policy") against bcache's lru, block-granular ARC and OPT.

import { execFileSync } from 'node:child_process'
import fs from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const require = createRequire(import.meta.url)
const lib = require(join(root, 'dist', 'index.js'))
const W = Number(process.env.UBCACHE_REPL_BLOCKS ?? 262144)
const N = Number(process.env.UBCACHE_REPL_REQUESTS ?? 400000)
const dir = process.env.UBCACHE_REPL_DIR ?? '/var/tmp/ubcache-bench-replacement'
const SIZES = [0.01, 0.05, 0.1]
const POLICIES = ['lru', 's3fifo', 'tinylfu']
const NEW = ['s3fifo', 'tinylfu']
const SIMS = ['opt', 'lru', 'arc', 's3fifo', 'sieve']
// The same policies at bucket granularity (64 KiB buckets: 16 blocks), as the engine evicts.
const BUCKET_SIMS = ['bucket-lru', 'bucket-s3fifo', 'bucket-tinylfu']
const QD = Number(process.env.UBCACHE_REPL_QD ?? 8)
// UBCACHE_REPL_WORKLOADS: a comma-separated subset of the workloads below (default all).
const only = process.env.UBCACHE_REPL_WORKLOADS?.split(',')
const log = (s) => process.stderr.write(s + '\n')

// The harness's own generators: a seeded uniform source and Zipf ranks scattered over the blocks.
const { blockChooser, seededRandom } = require(join(root, 'dist', 'bench', 'distributions.js'))
const zipf = (n, theta, rand) => blockChooser({ kind: 'zipf', theta }, n, rand)

/** The CloudPhysics trace's CSV (`version,time,op,size,lbn`, lbn in 512-byte sectors), fetched from PyPI once. */
async function cloudPhysicsCsv() {
  const given = process.env.UBCACHE_REPL_TRACE
  if (given) return given
  const dest = '/var/tmp/ubcache-traces/cloudphysics-trace.csv'
  if (fs.existsSync(dest)) return dest
  try {
    log('bench:replacement: fetching the CloudPhysics trace from PyPI (mimircache 0.0.2.70)')
    const meta = await (await fetch('https://pypi.org/pypi/mimircache/json')).json()
    const sdist = meta.releases['0.0.2.70'].find((u) => u.filename.endsWith('.tar.gz'))
    const tgz = Buffer.from(await (await fetch(sdist.url)).arrayBuffer())
    fs.mkdirSync(dirname(dest), { recursive: true })
    const tmp = fs.mkdtempSync(join(dirname(dest), 'dl-'))
    fs.writeFileSync(join(tmp, 'm.tgz'), tgz)
    execFileSync('tar', ['xzf', join(tmp, 'm.tgz'), '-C', tmp, 'mimircache-0.0.2.70/data/trace.csv'])
    fs.renameSync(join(tmp, 'mimircache-0.0.2.70', 'data', 'trace.csv'), dest)
    fs.rmSync(tmp, { recursive: true, force: true })
    return dest
  } catch (err) {
    log(`bench:replacement: the CloudPhysics trace could not be fetched (${err.message}): that workload is left out`)
    return undefined
  }
}

/**
 * Every request's 4 KiB blocks in order, numbered densely by first access; an access to the
 * block just accessed is left out (the trace has runs of 512-byte requests inside one
 * block: a 4 KiB cache sees one access, and the engine at QD 8 would count the rest as
 * misses on a fill still in flight).
 */
function cloudPhysicsTrace(csv) {
  const lines = fs.readFileSync(csv, 'utf8').split('\n').slice(1)
  const ids = new Map()
  const out = []
  for (const line of lines) {
    const f = line.split(',')
    if (f.length < 5) continue
    const at = Number(f[4]) * 512
    const size = Math.max(Number(f[3]), 1)
    for (let b = Math.floor(at / 4096); b <= Math.floor((at + size - 1) / 4096); b++) {
      let id = ids.get(b)
      if (id === undefined) ids.set(b, (id = ids.size))
      if (out.length === 0 || out[out.length - 1] !== id) out.push(id)
    }
  }
  return { trace: Uint32Array.from(out), blocks: ids.size }
}

const WORKLOADS = {
  'zipf-scan': () => {
    const rand = seededRandom(11)
    const hot = zipf(W / 2, 0.9, rand)
    const t = new Uint32Array(N)
    let cursor = W / 2
    for (let i = 0; i < N; ) {
      // A run of 256 starts so often that a third of the reads are scans.
      if (rand() < 1 / 512) {
        for (let k = 0; k < 256 && i < N; k++) {
          t[i++] = cursor
          cursor = cursor + 1 < W ? cursor + 1 : W / 2
        }
      } else t[i++] = hot()
    }
    return { trace: t, blocks: W }
  },
  loop: () => {
    const rand = seededRandom(12)
    const hot = zipf(W, 0.9, rand)
    const loopLen = Math.floor(W * 0.12)
    const t = new Uint32Array(N)
    let at = 0
    for (let i = 0; i < N; i++) {
      if (rand() < 0.5) {
        t[i] = W - loopLen + at
        at = (at + 1) % loopLen
      } else t[i] = hot()
    }
    return { trace: t, blocks: W }
  },
  shifting: () => {
    const rand = seededRandom(13)
    const hot = zipf(W, 1.0, rand)
    const t = new Uint32Array(N)
    for (let i = 0; i < N; i++) t[i] = (hot() + Math.floor((i * 4) / N) * (W / 4)) % W
    return { trace: t, blocks: W }
  },
}
const csv = !only || only.includes('cloudphysics') ? await cloudPhysicsCsv() : undefined
if (csv) WORKLOADS.cloudphysics = () => cloudPhysicsTrace(csv)
for (const name of Object.keys(WORKLOADS)) if (only && !only.includes(name)) delete WORKLOADS[name]

/** Runs `trace` over `blocks` blocks through a cache set of `cacheBytes` with `policy`; the hit ratio and the blocks it held. */
async function engineRun(trace, blocks, policy, cacheBytes) {
  fs.rmSync(dir, { recursive: true, force: true })
  fs.mkdirSync(dir, { recursive: true })
  const cache = join(dir, 'cache.img')
  const backing = join(dir, 'backing.img')
  // Room for the set's own metadata (journal, prio chain, reserves) beside the data.
  fs.writeFileSync(cache, '')
  fs.truncateSync(cache, cacheBytes + (8 << 20))
  fs.writeFileSync(backing, '')
  fs.truncateSync(backing, blocks * 4096)
  await lib.makeCache(cache, { bucketSize: '64k', replacement: policy })
  const reg = new lib.Registry({ bypass: { sequentialCutoff: 0 } })
  try {
    const set = await reg.registerCache(cache)
    const dev = await reg.attachExisting(backing, set)
    const before = set.stats()
    let next = 0
    const worker = async () => {
      const buf = dev.allocBuffer(4096)
      while (next < trace.length) {
        const b = trace[next++]
        await dev.readInto(buf, b * 4096)
      }
    }
    await Promise.all(Array.from({ length: QD }, worker))
    const after = set.stats()
    log(`  returning misses ${after.returningMisses - before.returningMisses}, admission bypasses ${after.admissionBypasses - before.admissionBypasses}`)
    const hits = after.cacheHits - before.cacheHits
    const misses = after.cacheMisses - before.cacheMisses
    return { hitRatio: hits / (hits + misses), blocks: Math.floor((dev.cachedSectors() ?? 0) / 8) }
  } finally {
    await reg.close()
  }
}

const rows = []
for (const [name, make] of Object.entries(WORKLOADS)) {
  const { trace, blocks: size } = make()
  log(`bench:replacement: ${name}: ${trace.length} reads over ${size} blocks`)
  for (const share of SIZES) {
    const cacheBytes = Math.floor(size * share) * 4096
    const row = { workload: name, share, engine: {}, sim: {} }
    let blocks = 0
    for (const p of POLICIES) {
      const t0 = Date.now()
      const r = await engineRun(trace, size, p, cacheBytes)
      row.engine[p] = r.hitRatio
      blocks = Math.max(blocks, r.blocks)
      log(`bench:replacement: ${name} ${share * 100}% ${p}: hit ratio ${r.hitRatio.toFixed(4)}, ${r.blocks} blocks held (${((Date.now() - t0) / 1000).toFixed(1)} s)`)
    }
    row.blocks = blocks
    for (const p of SIMS) {
      const [r] = await lib.simulateCache(p, trace, [blocks])
      row.sim[p] = r.hitRatio
    }
    for (const p of BUCKET_SIMS) {
      const [r] = await lib.simulateCache(p, trace, [blocks], { bucketBlocks: 16 })
      row.sim[p] = r.hitRatio
    }
    log(`bench:replacement: ${name} ${share * 100}% sims at ${blocks} blocks: ${[...SIMS, ...BUCKET_SIMS].map((p) => `${p} ${row.sim[p].toFixed(4)}`).join(', ')}`)
    rows.push(row)
  }
}

const pct = (x) => (x * 100).toFixed(1).padStart(6)
console.log(`workload    cache  ${POLICIES.map((p) => `eng:${p}`.padStart(12)).join('')}${SIMS.map((p) => `sim:${p}`.padStart(11)).join('')}${BUCKET_SIMS.map((p) => p.replace('bucket-', 'b:').padStart(11)).join('')}`)
for (const r of rows) {
  console.log(`${r.workload.padEnd(11)} ${String(r.share * 100).padStart(4)}%  ${POLICIES.map((p) => pct(r.engine[p]).padStart(12)).join('')}${SIMS.map((p) => pct(r.sim[p]).padStart(11)).join('')}${BUCKET_SIMS.map((p) => pct(r.sim[p]).padStart(11)).join('')}`)
}
function summarize(best) {
  const gains = rows.map((r) => (r.engine[best] - r.engine.lru) * 100)
  const scanGains = rows.filter((r) => r.workload === 'zipf-scan').map((r) => (r.engine[best] - r.engine.lru) * 100)
  return {
    min_gain_vs_lru_pts: Number(Math.min(...gains).toFixed(2)),
    scan_gain_vs_lru_pts: Number(Math.min(...scanGains).toFixed(2)),
    share_at_or_above_arc: Number((rows.filter((r) => r.engine[best] >= r.sim.arc).length / rows.length).toFixed(3)),
    mean_ratio_to_opt: Number((rows.reduce((a, r) => a + r.engine[best] / r.sim.opt, 0) / rows.length).toFixed(3)),
  }
}
// The best new policy: the one whose worst gain over lru is largest.
const summaries = Object.fromEntries(NEW.map((p) => [p, summarize(p)]))
for (const p of NEW) log(`bench:replacement: ${p}: ${JSON.stringify(summaries[p])}`)
const best = NEW.reduce((a, b) => (summaries[b].min_gain_vs_lru_pts > summaries[a].min_gain_vs_lru_pts ? b : a))
log(`bench:replacement: best new policy: ${best}`)
console.log(JSON.stringify({ policy: best, ...summaries[best] }))
