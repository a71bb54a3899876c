// `npm run bench:io`: the I/O engine against fio on one 1 GiB fully written file.
//
// 1. The native bench (`cargo bench -p ubcache-core --bench io`) prepares the file and
//    measures the engine alone next to fio (io_uring and psync).
// 2. This script measures the TypeScript raw-device API (dist/, built by `npm run build`)
//    on the same file, each workload right after fio runs it again, so both see the same
//    machine. The main figures use the default `inline` mode (the JavaScript thread drives
//    the ring; at QD1 its default `spinMicros: 'auto'` polls for a lone read's completion);
//    the `_js_thread` figures use `mode: 'thread'` (a native engine thread);
//    `randread_qd1_p50_ratio_js_nopoll` is QD1 inline with `spinMicros: 0` (never polls:
//    every completion wakes the event loop). The main figures read with `dev.read`, which
//    gives every result memory of its own; the `_js_into` figures use `dev.readInto` on one
//    buffer per reader from `dev.allocBuffer`, reused for every read, as fio reuses its own.
// The last stdout line is the JSON of figures; ratios are ours / fio's.
//
// The TypeScript measurements alternate with fio UBCACHE_BENCH_ROUNDS times (default 3) and
// report the median of the ratios to the fio run just before each (fio alone swings by tens
// of percent between runs on a shared VM).
//
// Environment: UBCACHE_BENCH_IO_FILE, UBCACHE_BENCH_SECONDS (default here 3; see
// bench/io/main.rs), UBCACHE_BENCH_ROUNDS, UBCACHE_BENCH_PSYNC_ROUNDS (default: ROUNDS).

import { spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const require = createRequire(import.meta.url)
const { openDevice } = require(join(root, 'dist', 'index.js'))

const file = process.env.UBCACHE_BENCH_IO_FILE ?? '/var/tmp/ubcache-bench-io/data-1g'
const secs = Number(process.env.UBCACHE_BENCH_SECONDS ?? 3)
const rounds = Math.max(1, Number(process.env.UBCACHE_BENCH_ROUNDS ?? 3))
const FILE_SIZE = 1 << 30

// 1. Native part (prints its progress on stderr, its figures as the last stdout line).
const cargo = spawnSync('cargo', ['bench', '-p', 'ubcache-core', '--bench', 'io'], {
  cwd: root,
  env: {
    ...process.env,
    UBCACHE_BENCH_SECONDS: String(secs),
    UBCACHE_BENCH_PSYNC_ROUNDS: process.env.UBCACHE_BENCH_PSYNC_ROUNDS ?? String(rounds),
  },
  stdio: ['ignore', 'pipe', 'inherit'],
  encoding: 'utf8',
})
if (cargo.status !== 0) {
  console.error('native bench failed')
  process.exit(1)
}
const nativeLines = cargo.stdout.trim().split('\n')
const native = JSON.parse(nativeLines[nativeLines.length - 1])

function fio(args) {
  const r = spawnSync(
    'fio',
    [
      '--name=ref',
      `--filename=${file}`,
      '--direct=1',
      '--time_based',
      '--ramp_time=1',
      '--norandommap',
      '--randrepeat=0',
      '--size=1g',
      '--lat_percentiles=1',
      '--output-format=json',
      `--runtime=${secs}`,
      ...args,
    ],
    { encoding: 'utf8' },
  )
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`)
  return JSON.parse(r.stdout).jobs[0].read
}

let seed = 0x2545f491
function randomBlock(bs) {
  // xorshift32: cheap enough not to show in the figures.
  seed ^= seed << 13
  seed ^= seed >>> 17
  seed ^= seed << 5
  return ((seed >>> 0) % (FILE_SIZE / bs)) * bs
}

/**
 * Keeps `qd` reads in flight through the TypeScript API for `secs` after a warm-up, on a
 * device (and engine) opened with `options` for this measurement alone, so that each
 * starts alike (an engine's registered buffers, for one, are used up by the reads before);
 * `into`: each reader reads into one engine buffer of its own (`readInto`) instead of `read`.
 */
async function measure(options, qd, bs, random, into = false) {
  const dev = await openDevice(file, { readOnly: true, exclusive: false, ...options })
  let seq = 0
  const nextOffset = () => {
    if (random) return randomBlock(bs)
    const o = seq
    seq = (seq + bs) % FILE_SIZE
    return o
  }
  const warmEnd = performance.now() + 500
  const end = warmEnd + secs * 1000
  let ops = 0
  const lat = []
  const worker = async () => {
    const buf = into ? dev.allocBuffer(bs) : undefined
    for (;;) {
      // Latency is only reported at QD1: deeper runs skip the clock (and its BigInt) per read.
      const t0 = qd === 1 ? process.hrtime.bigint() : 0n
      if (buf) await dev.readInto(buf, nextOffset())
      else await dev.read(nextOffset(), bs)
      const now = performance.now()
      if (now >= end) return
      if (now >= warmEnd) {
        ops++
        if (qd === 1) lat.push(Number(process.hrtime.bigint() - t0))
      }
    }
  }
  await Promise.all(Array.from({ length: qd }, worker))
  await dev.close()
  lat.sort((a, b) => a - b)
  return { iops: ops / secs, bw: (ops * bs) / secs, p50: lat.length ? lat[lat.length >> 1] : NaN }
}

const probe = await openDevice(file, { readOnly: true, exclusive: false })
console.error(
  `TypeScript raw-device API (${probe.engine.kind}, ${probe.engine.mode}, direct ${probe.direct}), ${rounds} rounds of ${secs} s per measurement`,
)
await probe.close()

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/**
 * fio, then ours inline, then ours with the engine thread (then `extra`: readInto, or
 * polling off), `rounds` times over: fio's own figures swing by tens of percent from run to
 * run on a shared machine, so each ratio is taken against the fio run just before it, and
 * the medians are reported.
 */
async function compare(what, fioArgs, fioValue, qd, bs, random, ours, extra) {
  console.error(`${what}...`)
  const f = []
  const js = []
  const th = []
  const ex = []
  for (let i = 0; i < rounds; i++) {
    f.push(fioValue(fio(fioArgs)))
    js.push(ours(await measure({}, qd, bs, random)))
    th.push(ours(await measure({ mode: 'thread' }, qd, bs, random)))
    if (extra === 'into') ex.push(ours(await measure({}, qd, bs, random, true)))
    if (extra === 'nopoll') ex.push(ours(await measure({ spinMicros: 0 }, qd, bs, random)))
    const more = extra ? `, ${extra === 'into' ? 'readInto' : 'spinMicros 0'}: ${ex[i].toFixed(0)}` : ''
    console.error(
      `  round ${i + 1}: fio ${f[i].toFixed(0)}, TypeScript ${js[i].toFixed(0)} (engine thread: ${th[i].toFixed(0)}${more})`,
    )
  }
  return {
    fio: median(f),
    js: median(js),
    thread: median(th),
    extra: extra ? median(ex) : undefined,
    ratio: median(js.map((v, i) => v / f[i])),
    ratioThread: median(th.map((v, i) => v / f[i])),
    ratioExtra: extra ? median(ex.map((v, i) => v / f[i])) : undefined,
  }
}

const rr32 = await compare(
  '4 KiB random reads, QD32 (IOPS)',
  ['--ioengine=io_uring', '--rw=randread', '--bs=4k', '--iodepth=32'],
  (j) => j.iops,
  32,
  4096,
  true,
  (m) => m.iops,
  'into',
)
const qd1 = await compare(
  '4 KiB random reads, QD1 (p50 latency, ns)',
  ['--ioengine=io_uring', '--rw=randread', '--bs=4k', '--iodepth=1'],
  (j) => j.lat_ns.percentile['50.000000'],
  1,
  4096,
  true,
  (m) => m.p50,
  'nopoll',
)
const seqr = await compare(
  '1 MiB sequential reads, QD4 (bytes/s)',
  ['--ioengine=io_uring', '--rw=read', '--bs=1m', '--iodepth=4'],
  (j) => j.bw_bytes,
  4,
  1 << 20,
  false,
  (m) => m.bw,
  'into',
)
const r = (a, b) => Math.round((a / b) * 1000) / 1000
console.log(
  JSON.stringify({
    randread_qd32_iops_ratio_js: r(rr32.ratio, 1),
    randread_qd32_iops_ratio_native: native.randread_qd32_iops_ratio_native,
    randread_qd1_p50_ratio: r(qd1.ratio, 1),
    seqread_bw_ratio: r(seqr.ratio, 1),
    psync_randread_qd32_iops_ratio: native.psync_randread_qd32_iops_ratio,
    randread_qd32_iops_ratio_js_thread: r(rr32.ratioThread, 1),
    randread_qd1_p50_ratio_js_thread: r(qd1.ratioThread, 1),
    seqread_bw_ratio_js_thread: r(seqr.ratioThread, 1),
    randread_qd1_p50_ratio_js_nopoll: r(qd1.ratioExtra, 1),
    randread_qd32_iops_ratio_js_into: r(rr32.ratioExtra, 1),
    seqread_bw_ratio_js_into: r(seqr.ratioExtra, 1),
    randread_qd1_p50_ratio_native: native.randread_qd1_p50_ratio,
    seqread_bw_ratio_native: native.seqread_bw_ratio,
    randread_qd32_iops_ratio_thread: native.randread_qd32_iops_ratio_thread,
    randread_qd1_p50_ratio_thread: native.randread_qd1_p50_ratio_thread,
    fio_randread_qd32_iops_js_run: Math.round(rr32.fio),
    randread_qd32_iops_js: Math.round(rr32.js),
    fio_randread_qd1_p50_ns_js_run: qd1.fio,
    randread_qd1_p50_ns_js: qd1.js,
    randread_qd1_p50_ns_js_nopoll: qd1.extra,
    randread_qd32_iops_js_into: Math.round(rr32.extra),
    fio_seqread_bw_bytes_per_sec_js_run: Math.round(seqr.fio),
    seqread_bw_bytes_per_sec_js: Math.round(seqr.js),
    seqread_bw_bytes_per_sec_js_into: Math.round(seqr.extra),
    fio_randread_qd32_iops: native.fio_randread_qd32_iops,
    randread_qd32_iops_native: native.randread_qd32_iops_native,
    fio_randread_qd1_p50_ns: native.fio_randread_qd1_p50_ns,
    randread_qd1_p50_ns_native: native.randread_qd1_p50_ns_native,
    fio_seqread_bw_bytes_per_sec: native.fio_seqread_bw_bytes_per_sec,
    seqread_bw_bytes_per_sec_native: native.seqread_bw_bytes_per_sec_native,
    fio_psync_randread_qd32_iops: native.fio_psync_randread_qd32_iops,
    psync_randread_qd32_iops: native.psync_randread_qd32_iops,
    seconds_per_measurement: secs,
    rounds,
    loadavg: (await import('node:os')).loadavg().map((x) => Math.round(x * 100) / 100),
  }),
)
