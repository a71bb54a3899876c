// The bench harness's job files (fio's INI format and keys) and access distributions.
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import test from 'ava'
import { blockChooser, seededRandom, zipfRanks } from '../ts/bench/distributions'
import { JobFileError, parseFioSize, parseFioTime, parseJobFile } from '../ts/bench/jobfile'
import { tempDir } from './helpers'

const dir = tempDir()

test('every key, with fio units and defaults; [global] applies to the jobs after it', (t) => {
  const text = `
; a comment
# another
[global]
ioengine=sim
size=1Gi
bs=4k
iodepth=32
randseed=42

[db]
rw=randrw
rwmixread=70
bsrange=4k-64k
offset=10%
io_size=512M
numjobs=2
runtime=2m
time_based
ramp_time=500ms
startdelay=1
loops=3
random_distribution=zipf:1.2
norandommap
rate_iops=5000
thinktime=250
fsync=16
verify=crc32c
stonewall
name=database
direct=1
group_reporting
backing_latency=7200rpm
cache_size=64M

[scan]
rw=read
bs=1M,64k
bssplit=4k/60:64k/40
size=50%
random_distribution=zoned:60/10:30/20:10/70
fdatasync=8
verify=pattern
verify_pattern=0xdeadbeef
verify_only=1
filename=/dev/null
replay_speed=2.5
backing_latency=fixed=5ms,mibps=200,seek=8ms
`
  const [db, scan] = parseJobFile(text, 'jobs.fio')
  t.is(db.name, 'database')
  t.is(db.ioengine, 'sim')
  t.is(db.rw, 'randrw')
  t.is(db.rwmixread, 70)
  t.deepEqual(db.bs, { read: 4096, write: 4096 })
  t.deepEqual(db.bsrange, { min: 4096, max: 65536 })
  t.deepEqual(db.size, { bytes: 2 ** 30 })
  t.deepEqual(db.offset, { pct: 10 })
  t.is(db.ioSize, 512 * 2 ** 20)
  t.is(db.iodepth, 32)
  t.is(db.numjobs, 2)
  t.is(db.runtime, 120)
  t.true(db.timeBased)
  t.is(db.rampTime, 0.5)
  t.is(db.startdelay, 1)
  t.is(db.loops, 3)
  t.deepEqual(db.randomDistribution, { kind: 'zipf', theta: 1.2 })
  t.is(db.randseed, 42)
  t.true(db.norandommap)
  t.is(db.rateIops, 5000)
  t.is(db.thinktime, 250)
  t.is(db.fsync, 16)
  t.is(db.verify, 'crc32c')
  t.true(db.stonewall)
  t.true(db.direct)
  t.true(db.groupReporting)
  t.is(db.cacheSize, 64 * 2 ** 20)
  t.is(Math.round(db.backingLatency?.fixedUs ?? 0), 4167)
  t.true(db.backingLatency?.serial)
  t.is(scan.name, 'scan')
  t.deepEqual(scan.bs, { read: 2 ** 20, write: 65536 })
  t.deepEqual(scan.bssplit, [
    { bs: 4096, pct: 60 },
    { bs: 65536, pct: 40 },
  ])
  t.deepEqual(scan.size, { pct: 50 })
  t.deepEqual(scan.randomDistribution, {
    kind: 'zoned',
    zones: [
      { accessPct: 60, sizePct: 10 },
      { accessPct: 30, sizePct: 20 },
      { accessPct: 10, sizePct: 70 },
    ],
  })
  t.is(scan.fdatasync, 8)
  t.deepEqual(scan.verifyPattern, Buffer.from('deadbeef', 'hex'))
  t.true(scan.verifyOnly)
  t.is(scan.filename, '/dev/null')
  t.is(scan.replaySpeed, 2.5)
  t.deepEqual(scan.backingLatency, { fixedUs: 5000, mibps: 200, fullStrokeUs: 8000 })
  // fio's defaults where a job is silent.
  const [d] = parseJobFile('[only]\nioengine=sim\nsize=1M\n')
  t.is(d.rw, 'read')
  t.is(d.iodepth, 1)
  t.deepEqual(d.bs, { read: 4096, write: 4096 })
  t.is(d.rwmixread, 50)
  t.deepEqual(d.randomDistribution, { kind: 'random' })
  t.is(d.loops, 1)
  t.is(d.cacheReplacementPolicy, undefined)
  t.is(parseJobFile('[p]\nioengine=ubcache\ncache=c.img\nbacking=b.img\ncache_replacement_policy=tinylfu\n')[0].cacheReplacementPolicy, 'tinylfu')
})

test('fio units', (t) => {
  t.is(parseFioSize('4k'), 4096)
  t.is(parseFioSize('4K'), 4096)
  t.is(parseFioSize('1M'), 2 ** 20)
  t.is(parseFioSize('1Mi'), 2 ** 20)
  t.is(parseFioSize('1MiB'), 2 ** 20)
  t.is(parseFioSize('2g'), 2 * 2 ** 30)
  t.is(parseFioSize('512'), 512)
  t.is(parseFioSize('1.5k'), 1536)
  t.is(parseFioSize('4x'), undefined)
  t.is(parseFioTime('30', 's'), 30)
  t.true(Math.abs((parseFioTime('250', 'us') ?? 0) - 250e-6) < 1e-15)
  t.is(parseFioTime('500ms', 's'), 0.5)
  t.is(parseFioTime('2m', 's'), 120)
  t.is(parseFioTime('1h', 's'), 3600)
  t.true(Math.abs((parseFioTime('10us', 's') ?? 0) - 10e-6) < 1e-15)
  t.is(parseFioTime('soon', 's'), undefined)
})

test('include reads another file in place; comments and blank lines are skipped', (t) => {
  const sub = join(dir, 'inc')
  mkdirSync(sub, { recursive: true })
  writeFileSync(join(sub, 'common.fio'), '[global]\nioengine=sim\nsize=8M\n; shared\n')
  writeFileSync(join(sub, 'main.fio'), 'include common.fio\n\n[a]\nrw=randread\n')
  const jobs = parseJobFile('include common.fio\n[a]\nrw=randread\n', join(sub, 'main.fio'))
  t.is(jobs.length, 1)
  t.deepEqual(jobs[0].size, { bytes: 8 << 20 })
  t.is(jobs[0].rw, 'randread')
})

test('bad input: one line naming the file, line, section, key and value', (t) => {
  const bad = (text: string, re: RegExp): void => {
    const e = t.throws(() => parseJobFile(text, 'x.fio'), { instanceOf: JobFileError })
    t.is(e?.code, 'INVALID_JOB_FILE')
    t.regex(e?.message ?? '', re)
    t.false(e?.message.includes('\n'))
  }
  bad('[j]\nioengine=sim\nsize=1M\nblocksize_typo=4k\n', /^x\.fio:4: \[j\] blocksize_typo=4k: unknown key 'blocksize_typo'$/)
  bad('[j]\nrw=sideways\n', /^x\.fio:2: \[j\] rw=sideways: must be one of read, write/)
  bad('[j]\nbs=4q\n', /\[j\] bs=4q: must be a size/)
  bad('[j]\niodepth=0\n', /\[j\] iodepth=0: must be a whole number from 1/)
  bad('[j]\nrwmixread=101\n', /rwmixread=101: must be a whole number from 0 to 100/)
  bad('[j]\nruntime=soon\n', /runtime=soon: must be a time/)
  bad('[j]\nrandom_distribution=zipf:1\n', /random_distribution=zipf:1: must be random, zipf/)
  bad('[j]\nrandom_distribution=zoned:50/10:40/10\n', /zoned/)
  bad('[j]\nbssplit=4k/50:8k/40\n', /add up to 90, not 100/)
  bad('[j]\nsize=150%\n', /at most 100%/)
  bad('[j]\ntime_based=maybe\n', /must be 0 or 1/)
  bad('[j]\nverify=sha9\n', /verify=sha9: must be crc32c, md5 or pattern/)
  bad('[j]\nbacking_latency=fast\n', /backing_latency=fast: must be NNNNrpm/)
  bad('[j]\nremote_connections=17\n', /remote_connections=17: must be a whole number from 1 to 16/)
  bad('[j]\ncache_replacement_policy=clock\n', /cache_replacement_policy=clock: must be one of lru, fifo, random, s3fifo, tinylfu$/)
  bad('[global]\nsize=lots\n[j]\n', /^x\.fio:2: \[global\] size=lots/)
  bad('rw=read\n', /outside any section/)
  bad('[global]\nsize=1M\n', /no jobs/)
  bad('[j]\nioengine=sim\nsize=1M\ntime_based\n', /time_based needs a runtime/)
  bad('[j]\nioengine=sim\nsize=1M\nverify_only\n', /verify_only needs verify=/)
  bad('[j]\nioengine=raw\n', /ioengine=raw needs filename=/)
  bad('[j]\nrw=read\n', /ioengine=ubcache needs cache= and backing=/)
  bad('include /nonexistent/jobs.fio\n', /include \/nonexistent\/jobs\.fio: ENOENT/)
  bad('[j]\nsize\n', /size: needs a value/)
})

/** The 99.9% quantile of χ² with `dof` degrees of freedom (Wilson–Hilferty). */
function chi2Critical(dof: number): number {
  const z = 3.09
  const a = 2 / (9 * dof)
  return dof * (1 - a + z * Math.sqrt(a)) ** 3
}

/** χ² of `observed` counts against `expected` probabilities, bins with expected < 5 merged. */
function chi2(observed: number[], probs: number[], total: number): { stat: number; dof: number } {
  const bins: { o: number; e: number }[] = []
  let o = 0
  let e = 0
  for (let i = 0; i < observed.length; i++) {
    o += observed[i]
    e += probs[i] * total
    if (e >= 5) {
      bins.push({ o, e })
      o = 0
      e = 0
    }
  }
  // What is left (expected under 5) joins the last bin.
  const last = bins[bins.length - 1]
  last.o += o
  last.e += e
  return { stat: bins.reduce((s, b) => s + (b.o - b.e) ** 2 / b.e, 0), dof: bins.length - 1 }
}

test('generated offsets follow the stated distribution (χ² at 99.9%)', (t) => {
  const N = 200_000
  // Zipf ranks against k^-θ / H(n, θ).
  for (const theta of [0.8, 1.2, 2.0]) {
    const n = 1000
    const draw = zipfRanks(n, theta, seededRandom(7))
    const counts = new Array(n).fill(0)
    for (let i = 0; i < N; i++) counts[draw() - 1]++
    const w = Array.from({ length: n }, (_, k) => (k + 1) ** -theta)
    const h = w.reduce((a, b) => a + b, 0)
    const { stat, dof } = chi2(counts, w.map((x) => x / h), N)
    t.true(stat < chi2Critical(dof), `zipf:${theta}: χ² ${stat.toFixed(1)} ≥ ${chi2Critical(dof).toFixed(1)} (dof ${dof})`)
  }
  // Uniform, zoned and normal over 100 blocks.
  const n = 100
  const hist = (choose: () => number): number[] => {
    const c = new Array(n).fill(0)
    for (let i = 0; i < N; i++) {
      const b = choose()
      t.true(b >= 0 && b < n)
      c[b]++
    }
    return c
  }
  const uni = chi2(hist(blockChooser({ kind: 'random' }, n, seededRandom(1))), new Array(n).fill(1 / n), N)
  t.true(uni.stat < chi2Critical(uni.dof), `random: χ² ${uni.stat}`)
  const zoned = hist(blockChooser({ kind: 'zoned', zones: [{ accessPct: 60, sizePct: 10 }, { accessPct: 30, sizePct: 20 }, { accessPct: 10, sizePct: 70 }] }, n, seededRandom(2)))
  const zp = Array.from({ length: n }, (_, b) => (b < 10 ? 0.6 / 10 : b < 30 ? 0.3 / 20 : 0.1 / 70))
  const z = chi2(zoned, zp, N)
  t.true(z.stat < chi2Critical(z.dof), `zoned: χ² ${z.stat}`)
  const sigma = 10
  const normal = hist(blockChooser({ kind: 'normal', sigma }, n, seededRandom(3)))
  const cdf = (x: number): number => 0.5 * (1 + erf((x - n / 2) / ((sigma / 100) * n * Math.SQRT2)))
  const inside = cdf(n) - cdf(0)
  const np = Array.from({ length: n }, (_, b) => (cdf(b + 1) - cdf(b)) / inside)
  const nr = chi2(normal, np, N)
  t.true(nr.stat < chi2Critical(nr.dof), `normal: χ² ${nr.stat}`)
  // Pareto: the rank before scattering is ⌊(n-1)·u^p⌋, so P(rank ≤ k) = ((k+1)/(n-1))^(1/p).
  const h = 0.2
  const p = Math.log(h) / Math.log(1 - h)
  const rand = seededRandom(4)
  const pc = new Array(n).fill(0)
  for (let i = 0; i < N; i++) pc[Math.min(n - 1, Math.floor((n - 1) * Math.pow(rand(), p)))]++
  const pcdf = (k: number): number => Math.min(1, (k / (n - 1)) ** (1 / p))
  const pp = Array.from({ length: n }, (_, k) => pcdf(k + 1) - pcdf(k))
  const pr = chi2(pc, pp, N)
  t.true(pr.stat < chi2Critical(pr.dof), `pareto: χ² ${pr.stat}`)
  // The chooser scatters the same ranks: a permutation, so every block count is a rank count.
  const spread = hist(blockChooser({ kind: 'pareto', h }, n, seededRandom(4)))
  t.deepEqual([...spread].sort((a, b) => a - b), [...pc].sort((a, b) => a - b))
})

test('the same seed gives the same choices; zipf over 100 GiB of blocks needs no table', (t) => {
  const a = blockChooser({ kind: 'zipf', theta: 1.1 }, 26_214_400, seededRandom(9))
  const b = blockChooser({ kind: 'zipf', theta: 1.1 }, 26_214_400, seededRandom(9))
  for (let i = 0; i < 1000; i++) {
    const x = a()
    t.is(x, b())
    t.true(x >= 0 && x < 26_214_400)
  }
})

/** erf, Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7). */
function erf(x: number): number {
  const s = Math.sign(x)
  const ax = Math.abs(x)
  const k = 1 / (1 + 0.3275911 * ax)
  const y = 1 - ((((1.061405429 * k - 1.453152027) * k + 1.421413741) * k - 0.284496736) * k + 0.254829592) * k * Math.exp(-ax * ax)
  return s * y
}
