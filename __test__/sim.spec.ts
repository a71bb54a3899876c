// The cache simulators: against libCacheSim (PyPI `libcachesim`, an independent
// implementation) on generated traces, and bad input. Hand-checked traces, optimality
// against brute force and the policies' known properties are tested in Rust (sim/tests.rs).
import { spawnSync } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import test from 'ava'
import { BUCKET_MIN, BUCKET_POLICIES, SIM_POLICIES, simulateCache } from '../ts/index'
import { mustHaveTools, tempDir } from './helpers'

const dir = tempDir()
const CHECK = resolve(__dirname, '..', 'scripts', 'sim-crosscheck.py')

function haveLibCacheSim(): boolean {
  const ok = spawnSync('python3', ['-c', 'import libcachesim'], { stdio: 'ignore' }).status === 0
  if (!ok && mustHaveTools) throw new Error('CI needs the libcachesim Python package (scripts/setup.sh installs it)')
  return ok
}

/** A seeded generator (xorshift32). */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1
  return () => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    return x / 2 ** 32
  }
}

/** Zipf-like (θ ≈ 1) over `n` blocks, by inverse transform on a power law. */
function zipf(len: number, n: number, seed: number): number[] {
  const r = rng(seed)
  return Array.from({ length: len }, () => Math.min(n - 1, Math.floor(n ** r()) - 1))
}

/** A hot set read in turns with long scans of blocks read once, and a loop. */
function scans(len: number, seed: number): number[] {
  const r = rng(seed)
  const out: number[] = []
  let scan = 1_000_000
  while (out.length < len) {
    for (let i = 0; i < 400; i++) out.push(Math.floor(r() * 300))
    for (let i = 0; i < 250; i++) out.push(scan++)
    for (let i = 0; i < 150; i++) out.push(500_000 + (i % 120))
  }
  return out.slice(0, len)
}

const TRACES: [string, number[]][] = [
  ['zipf', zipf(40_000, 5_000, 7)],
  ['scans', scans(40_000, 11)],
  ['uniform', Array.from({ length: 20_000 }, ((r) => () => Math.floor(r() * 2_000))(rng(3)))],
]
const CAPS = [50, 200, 1000]
/** Policies whose every choice is fixed by their definition: libCacheSim must count the same hits. */
const EXACT = ['lru', 'fifo', 'belady', 'sieve']
/**
 * Policies whose implementations differ in details, with hits within this share of the
 * requests. ARC: the rounding of its target size. S3-FIFO: ours follows the paper's
 * pseudocode (evict from the small queue while it holds 10% or more); libCacheSim evicts
 * from the main queue while it is over 90%, and before its first eviction admits new blocks
 * to the main queue once the small one is full.
 */
const TOLERANCE: Record<string, number> = { arc: 0.01, s3fifo: 0.03 }

for (const [name, trace] of TRACES) {
  test(`the simulators agree with libCacheSim on a ${name} trace`, async (t) => {
    if (!haveLibCacheSim()) return t.pass('libcachesim missing')
    const file = join(dir, `${name}.txt`)
    writeFileSync(file, trace.join('\n'))
    const r = spawnSync('python3', [CHECK, file, CAPS.join(',')], { encoding: 'utf8', timeout: 300_000 })
    t.is(r.status, 0, r.stderr)
    const theirs = JSON.parse(r.stdout) as Record<string, number[]>
    const ours: Record<string, number[]> = {}
    for (const p of SIM_POLICIES) ours[p] = (await simulateCache(p, trace, CAPS)).map((x) => x.hits)
    t.log(name, JSON.stringify({ ours, libCacheSim: { ...theirs, belady: theirs.opt } }))
    for (const p of EXACT) t.deepEqual(ours[p], theirs[p === 'belady' ? 'opt' : p], p)
    for (const [p, tol] of Object.entries(TOLERANCE)) {
      for (const [i, cap] of CAPS.entries()) {
        t.true(Math.abs(ours[p][i] - theirs[p][i]) <= tol * trace.length, `${p} at ${cap}: ours ${ours[p][i]}, libCacheSim ${theirs[p][i]}`)
      }
    }
    // The optimum that may leave misses out beats every policy, MIN included.
    for (const [i] of CAPS.entries()) for (const p of SIM_POLICIES) t.true(ours.opt[i] >= ours[p][i], p)
  })
}

test('simulateCache refuses bad input with INVALID_ARGUMENT', async (t) => {
  await t.throwsAsync(simulateCache('nope' as never, [1], [1]), { code: 'INVALID_ARGUMENT', message: /unknown policy 'nope'/ })
  await t.throwsAsync(simulateCache('lru', [1], [0]), { code: 'INVALID_ARGUMENT', message: /at least 1|from 1/ })
  await t.throwsAsync(simulateCache('opt', [1, 2.5], [4]), { code: 'INVALID_ARGUMENT', message: /trace\[1\] = 2.5/ })
  const [r] = await simulateCache('lru', [], [4])
  t.deepEqual(r, { policy: 'lru', capacity: 4, hits: 0, misses: 0, hitRatio: 0 })
})

test('bucket-min: Belady by whole buckets; one block per bucket is MIN, larger buckets hit no more', async (t) => {
  const [, trace] = TRACES[0]
  const caps = [64, 256]
  const min = (await simulateCache('belady', trace, caps)).map((r) => r.hits)
  t.deepEqual((await simulateCache(BUCKET_MIN, trace, caps, { bucketBlocks: 1 })).map((r) => r.hits), min)
  let prev = min
  for (const b of [4, 16, 64]) {
    const hits = (await simulateCache(BUCKET_MIN, trace, caps, { bucketBlocks: b })).map((r) => r.hits)
    hits.forEach((h, i) => t.true(h <= min[i], `bucket ${b}`))
    prev = hits
  }
  t.true(prev[0] > 0)
  await t.throwsAsync(simulateCache(BUCKET_MIN, trace, caps), { code: 'INVALID_ARGUMENT', message: /needs bucketBlocks/ })
})

test('bucket-granular lru, s3fifo and tinylfu: one block per bucket, lru is block LRU; never above bucket-min; scans hurt lru most', async (t) => {
  const [, trace] = TRACES[0]
  const caps = [64, 256]
  // With one block per bucket, bucket LRU is LRU exactly.
  t.deepEqual(
    (await simulateCache('bucket-lru', trace, caps, { bucketBlocks: 1 })).map((r) => r.hits),
    (await simulateCache('lru', trace, caps)).map((r) => r.hits),
  )
  const opt = (await simulateCache('opt', trace, caps)).map((r) => r.hits)
  for (const p of BUCKET_POLICIES) {
    const rs = await simulateCache(p, trace, caps, { bucketBlocks: 4 })
    rs.forEach((r, i) => {
      t.is(r.hits + r.misses, trace.length)
      t.true(r.hits <= opt[i], `${p} at ${caps[i]}: ${r.hits} hits, OPT ${opt[i]}`)
      t.true(r.hits > 0, p)
    })
  }
  // A hot set read again and again, with one-time scans between: S3-FIFO keeps the hot set.
  const mixed: number[] = []
  for (let round = 0; round < 200; round++) {
    for (let h = 0; h < 32; h++) mixed.push(h)
    for (let s = 0; s < 64; s++) mixed.push(1_000_000 + round * 64 + s)
  }
  const [lru] = await simulateCache('bucket-lru', mixed, [64], { bucketBlocks: 4 })
  const [s3] = await simulateCache('bucket-s3fifo', mixed, [64], { bucketBlocks: 4 })
  t.true(s3.hitRatio > lru.hitRatio + 0.1, `s3fifo ${s3.hitRatio}, lru ${lru.hitRatio}`)
  await t.throwsAsync(simulateCache('bucket-s3fifo', trace, caps), { code: 'INVALID_ARGUMENT', message: /bucket-s3fifo needs bucketBlocks/ })
  await t.throwsAsync(simulateCache('bucket-lru', trace, [4], { bucketBlocks: 4 }), { code: 'INVALID_ARGUMENT', message: /fewer than two buckets/ })
})
