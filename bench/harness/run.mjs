// `npm run bench:harness`: the bench harness's own overhead (issue 18's figures).
//
// - raw_vs_fio_iops_ratio: a 4 KiB random-read job at QD32 for UBCACHE_BENCH_SECONDS (default
//   5) through `ubcache bench` with ioengine=raw (O_DIRECT), beside fio's io_uring engine
//   (--direct=1) on the same 1 GiB file on disk, alternating over UBCACHE_BENCH_ROUNDS rounds
//   (default 3), median of the paired ratios (target ≥ 0.9);
// - opt_10m_requests_s: OPT over a 10M-request Zipf trace (θ 1.1 over 1M blocks, a cache of
//   1%) through `simulateCache`, trace built beforehand (target ≤ 10 s);
// - sim_60s_job_s: `ubcache bench example:zipf-sim`, a 60 s simulated Zipf job over a 100 GiB
//   address space, wall time (target ≤ 5 s);
// - zipf_hit_ratio_vs_opt: `ubcache bench example:zipf-read`'s per-block hit ratio of ubcache
//   over OPT's on the same reads at the cache's size.
// Progress on stderr; the last stdout line is one JSON object.

import { execFileSync } from 'node:child_process'
import fs from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(root, 'dist', 'cli.js')
const require = createRequire(import.meta.url)
const lib = require(join(root, 'dist', 'index.js'))
const secs = Number(process.env.UBCACHE_BENCH_SECONDS ?? 5)
const rounds = Math.max(1, Number(process.env.UBCACHE_BENCH_ROUNDS ?? 3))
const dir = process.env.UBCACHE_BENCH_HARNESS_DIR ?? '/var/tmp/ubcache-bench-harness'
const log = (s) => process.stderr.write(s + '\n')
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

fs.mkdirSync(dir, { recursive: true })
const file = join(dir, 'data-1g')
if (!fs.existsSync(file) || fs.statSync(file).size !== 1 << 30) {
  log('bench:harness: writing a 1 GiB file')
  execFileSync('fio', ['--name=fill', `--filename=${file}`, '--rw=write', '--bs=1M', '--size=1G', '--direct=1', '--ioengine=psync'], { stdio: 'ignore' })
}
const job = join(dir, 'raw.fio')
fs.writeFileSync(job, `[raw]\nioengine=raw\nfilename=${file}\ndirect=1\nrw=randread\nbs=4k\niodepth=32\nnorandommap\nruntime=${secs}\ntime_based\nramp_time=1\n`)

const ratios = []
for (let r = 1; r <= rounds; r++) {
  const f = JSON.parse(execFileSync('fio', ['--name=ref', `--filename=${file}`, '--rw=randread', '--bs=4k', '--iodepth=32', '--direct=1', '--ioengine=io_uring', '--norandommap', '--time_based', `--runtime=${secs}`, '--ramp_time=1', '--output-format=json'], { encoding: 'utf8' })).jobs[0].read.iops
  const u = JSON.parse(execFileSync('node', [cli, 'bench', job, '--output-format', 'json'], { encoding: 'utf8' })).jobs[0].read.iops
  ratios.push(u / f)
  log(`round ${r}/${rounds}: fio ${(f / 1000).toFixed(1)}k IOPS, ubcache bench ioengine=raw ${(u / 1000).toFixed(1)}k IOPS (${(u / f).toFixed(3)})`)
}

log('bench:harness: OPT over 10M requests')
let x = 0x12345678
const rand = () => {
  x ^= x << 13
  x >>>= 0
  x ^= x >>> 17
  x ^= x << 5
  x >>>= 0
  return x / 2 ** 32
}
const trace = new Float64Array(10_000_000)
for (let i = 0; i < trace.length; i++) trace[i] = Math.min(999_999, Math.floor(1_000_000 ** rand()) - 1)
let t = performance.now()
const [opt] = await lib.simulateCache('opt', trace, [10_000])
const optS = (performance.now() - t) / 1000
log(`  ${optS.toFixed(2)} s, hit ratio ${(opt.hitRatio * 100).toFixed(2)}%`)

log('bench:harness: example:zipf-sim')
t = performance.now()
execFileSync('node', [cli, 'bench', 'example:zipf-sim'], { stdio: 'ignore' })
const simS = (performance.now() - t) / 1000
log(`  ${simS.toFixed(2)} s`)

log('bench:harness: example:zipf-read')
const zr = JSON.parse(execFileSync('node', [cli, 'bench', 'example:zipf-read', '--output-format', 'json'], { encoding: 'utf8' })).jobs[0].ubcache.cache
const vsOpt = zr.blockHitRatio / zr.simulated.hitRatio.opt
log(`  ubcache ${(zr.blockHitRatio * 100).toFixed(2)}%, OPT ${(zr.simulated.hitRatio.opt * 100).toFixed(2)}%, LRU ${(zr.simulated.hitRatio.lru * 100).toFixed(2)}%`)

console.log(
  JSON.stringify({
    raw_vs_fio_iops_ratio: Number(median(ratios).toFixed(3)),
    opt_10m_requests_s: Number(optS.toFixed(2)),
    sim_60s_job_s: Number(simS.toFixed(2)),
    zipf_hit_ratio_vs_opt: Number(vsOpt.toFixed(3)),
    zipf_hit_ratio_ubcache: zr.blockHitRatio,
    zipf_hit_ratio_opt: zr.simulated.hitRatio.opt,
    zipf_hit_ratio_lru: zr.simulated.hitRatio.lru,
  }),
)
