/**
 * Random block choices for the bench harness: a seeded generator and fio's
 * `random_distribution`s (see {@link blockChooser}).
 * @module
 */
import type { Distribution } from './jobfile'

/** A seeded generator of floats in [0, 1) (xoshiro128**), the same stream for the same seed. */
export function seededRandom(seed: number): () => number {
  let a = (seed ^ 0x9e3779b9) >>> 0
  let b = (seed * 0x85ebca6b + 0x12345) >>> 0
  let c = (seed ^ 0xc2b2ae35) >>> 0 || 1
  let d = (Math.imul(seed, 0x27d4eb2f) + 7) >>> 0
  const next = (): number => {
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9) >>> 0
    const t = (b << 9) >>> 0
    c ^= a
    d ^= b
    b ^= c
    a ^= d
    c = (c ^ t) >>> 0
    d = rotl(d, 11)
    return r
  }
  for (let i = 0; i < 8; i++) next()
  return () => next() / 2 ** 32
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0
}

/**
 * Zipf ranks 1..n with P(k) ∝ k^-θ, sampled in O(1) by rejection-inversion (Hörmann and
 * Derflinger, 1996), so that a 100 GiB address space costs no table.
 */
export function zipfRanks(n: number, theta: number, rand: () => number): () => number {
  const s = theta
  const h = (x: number): number => Math.exp(-s * Math.log(x))
  const helper1 = (x: number): number => (Math.abs(x) > 1e-8 ? Math.log1p(x) / x : 1 - x * (0.5 - x * (1 / 3 - 0.25 * x)))
  const helper2 = (x: number): number => (Math.abs(x) > 1e-8 ? Math.expm1(x) / x : 1 + x * 0.5 * (1 + x * (1 / 3) * (1 + 0.25 * x)))
  const hIntegral = (x: number): number => {
    const lx = Math.log(x)
    return helper2((1 - s) * lx) * lx
  }
  const hIntegralInverse = (x: number): number => {
    let t = x * (1 - s)
    if (t < -1) t = -1
    return Math.exp(helper1(t) * x)
  }
  const hX1 = hIntegral(1.5) - 1
  const hN = hIntegral(n + 0.5)
  const s2 = 2 - hIntegralInverse(hIntegral(2.5) - h(2))
  return () => {
    for (;;) {
      const u = hN + rand() * (hX1 - hN)
      const x = hIntegralInverse(u)
      let k = Math.floor(x + 0.5)
      if (k < 1) k = 1
      else if (k > n) k = n
      if (k - x <= s2 || u >= hIntegral(k + 0.5) - h(k)) return k
    }
  }
}

/** A bijection of [0, n) that spreads neighbours apart, so hot ranks are not one run of blocks. */
function scatter(n: number): (i: number) => number {
  if (n <= 2) return (i) => i
  // An odd multiplier near n·φ, nudged until it is coprime with n.
  let a = Math.floor(n * 0.6180339887) | 1
  const gcd = (x: number, y: number): number => (y === 0 ? x : gcd(y, x % y))
  while (gcd(a, n) !== 1) a += 2
  const big = BigInt(a)
  const bn = BigInt(n)
  return n < 2 ** 26 ? (i) => (a * i) % n : (i) => Number((big * BigInt(i)) % bn)
}

/**
 * Picks block numbers in [0, n) by `dist`, from `rand`:
 * - `random`: uniform;
 * - `zipf:θ`: rank k with probability ∝ k^-θ, ranks scattered over the blocks;
 * - `pareto:h`: fio's Pareto, (n-1)·u^(log h / log(1-h)), scattered;
 * - `normal:σ`: a Gaussian around the middle with a deviation of σ% of the blocks (redrawn
 *   outside them);
 * - `zoned:a/s:...`: a% of the choices uniform over the next s% of the blocks.
 */
export function blockChooser(dist: Distribution, n: number, rand: () => number): () => number {
  switch (dist.kind) {
    case 'random':
      return () => Math.floor(rand() * n)
    case 'zipf': {
      const ranks = zipfRanks(n, dist.theta, rand)
      const spread = scatter(n)
      return () => spread(ranks() - 1)
    }
    case 'pareto': {
      const pow = Math.log(dist.h) / Math.log(1 - dist.h)
      const spread = scatter(n)
      return () => spread(Math.min(n - 1, Math.floor((n - 1) * Math.pow(rand(), pow))))
    }
    case 'normal': {
      const mean = n / 2
      const dev = (dist.sigma / 100) * n
      return () => {
        for (;;) {
          // Box–Muller.
          const g = Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand())
          const b = Math.floor(mean + g * dev)
          if (b >= 0 && b < n) return b
        }
      }
    }
    case 'zoned': {
      const zones: { upTo: number; start: number; blocks: number }[] = []
      let acc = 0
      let start = 0
      for (const z of dist.zones) {
        acc += z.accessPct / 100
        const blocks = Math.max(1, Math.floor((z.sizePct / 100) * n))
        zones.push({ upTo: acc, start: Math.min(start, n - 1), blocks: Math.min(blocks, n - Math.min(start, n - 1)) })
        start += blocks
      }
      return () => {
        const r = rand()
        const z = zones.find((x) => r < x.upTo) ?? zones[zones.length - 1]
        return z.start + Math.floor(rand() * z.blocks)
      }
    }
  }
}
