/**
 * Latency statistics as fio reports them (see {@link LatencyStats}).
 * @module
 */

/** Sub-buckets per power of two: percentiles are within 1/64 (1.6%) of the true value. */
const SUB = 64

/** fio's default percentile list. */
export const FIO_PERCENTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99]

/**
 * Count, min, max, mean and standard deviation of latencies in nanoseconds, and a
 * log-linear histogram for percentiles (64 buckets per power of two: within 1.6%).
 */
export class LatencyStats {
  n = 0
  min = Number.POSITIVE_INFINITY
  max = 0
  #sum = 0
  #sumsq = 0
  readonly #hist = new Float64Array(64 * SUB)

  add(ns: number): void {
    const v = Math.max(1, ns)
    this.n++
    if (v < this.min) this.min = v
    if (v > this.max) this.max = v
    this.#sum += v
    this.#sumsq += v * v
    // The power of two: from the leading zeros while it fits 32 bits (4.3 s), else a log.
    const e = v < 4294967296 ? 31 - Math.clz32(v) : Math.floor(Math.log2(v))
    const p = 2 ** e
    const m = Math.min(SUB - 1, Math.floor(((v - p) * SUB) / p))
    this.#hist[e * SUB + m]++
  }

  get mean(): number {
    return this.n === 0 ? 0 : this.#sum / this.n
  }

  get stdev(): number {
    if (this.n < 2) return 0
    const m = this.mean
    return Math.sqrt(Math.max(0, (this.#sumsq - this.n * m * m) / (this.n - 1)))
  }

  /** The value at percentile `p` (0..100): the middle of its bucket, within min and max. */
  percentile(p: number): number {
    if (this.n === 0) return 0
    const rank = Math.max(1, Math.ceil((p / 100) * this.n))
    let seen = 0
    for (let i = 0; i < this.#hist.length; i++) {
      seen += this.#hist[i]
      if (seen >= rank) {
        const e = Math.floor(i / SUB)
        const m = i % SUB
        const mid = 2 ** e * (1 + (m + 0.5) / SUB)
        return Math.min(this.max, Math.max(this.min, Math.round(mid)))
      }
    }
    return this.max
  }

  /** Counts per power of two of nanoseconds (`[2^e, 2^(e+1))`), from the first non-empty to the last. */
  histogram(): { fromNs: number; count: number }[] {
    const out: { fromNs: number; count: number }[] = []
    for (let e = 0; e < 64; e++) {
      let c = 0
      for (let m = 0; m < SUB; m++) c += this.#hist[e * SUB + m]
      out.push({ fromNs: 2 ** e, count: c })
    }
    const first = out.findIndex((x) => x.count > 0)
    if (first < 0) return []
    let last = out.length - 1
    while (out[last].count === 0) last--
    return out.slice(first, last + 1)
  }

  /** fio's JSON shape of a latency (`clat_ns`, ...). */
  json(): Record<string, unknown> {
    const percentile: Record<string, number> = {}
    for (const p of FIO_PERCENTILES) percentile[p.toFixed(6)] = this.percentile(p)
    return { min: this.n ? this.min : 0, max: this.max, mean: this.mean, stddev: this.stdev, N: this.n, percentile }
  }
}
