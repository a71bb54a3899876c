// `npm run bench:io`: the I/O engine against fio on one 1 GiB fully written file.
//
// 1. The native bench (`cargo bench -p ubcache-core --bench io`) prepares the file and
//    measures the engine alone next to fio (io_uring and psync).
// 2. This script measures the TypeScript raw-device API (dist/, built by `npm run build`)
//    on the same file, each workload right after fio runs it again, so both see the same
//    machine. The main figures use the default `inline` mode (the JavaScript thread drives
//    the ring); the `_js_thread` figures use `mode: 'thread'` (a native engine thread).
// The last stdout line is the JSON of figures; ratios are ours / fio's.
//
// Environment: UBCACHE_BENCH_IO_FILE, UBCACHE_BENCH_SECONDS (see bench/io/main.rs).

import { spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const require = createRequire(import.meta.url)
const { openDevice } = require(join(root, 'dist', 'index.js'))

const file = process.env.UBCACHE_BENCH_IO_FILE ?? '/var/tmp/ubcache-bench-io/data-1g'
const secs = Number(process.env.UBCACHE_BENCH_SECONDS ?? 5)
const FILE_SIZE = 1 << 30

// 1. Native part (prints its progress on stderr, its figures as the last stdout line).
const cargo = spawnSync('cargo', ['bench', '-p', 'ubcache-core', '--bench', 'io'], {
  cwd: root,
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

/** Keeps `qd` reads in flight through the TypeScript API for `secs` after a warm-up. */
async function measure(dev, qd, bs, random) {
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
    for (;;) {
      const t0 = process.hrtime.bigint()
      await dev.read(nextOffset(), bs)
      const now = performance.now()
      if (now >= end) return
      if (now >= warmEnd) {
        ops++
        if (qd === 1) lat.push(Number(process.hrtime.bigint() - t0))
      }
    }
  }
  await Promise.all(Array.from({ length: qd }, worker))
  lat.sort((a, b) => a - b)
  return { iops: ops / secs, bw: (ops * bs) / secs, p50: lat.length ? lat[lat.length >> 1] : NaN }
}

const dev = await openDevice(file, { readOnly: true, exclusive: false })
const devThread = await openDevice(file, { readOnly: true, exclusive: false, mode: 'thread' })
console.error(`TypeScript raw-device API (${dev.engine.kind}, ${dev.engine.mode}, direct ${dev.direct}), ${secs} s per measurement`)

console.error('4 KiB random reads, QD32...')
const fRr32 = fio(['--ioengine=io_uring', '--rw=randread', '--bs=4k', '--iodepth=32']).iops
const jsRr32 = (await measure(dev, 32, 4096, true)).iops
const thRr32 = (await measure(devThread, 32, 4096, true)).iops
console.error(`  fio ${fRr32.toFixed(0)} IOPS, TypeScript ${jsRr32.toFixed(0)} IOPS (engine thread: ${thRr32.toFixed(0)})`)

console.error('4 KiB random reads, QD1...')
const fP50 = fio(['--ioengine=io_uring', '--rw=randread', '--bs=4k', '--iodepth=1']).lat_ns.percentile['50.000000']
const jsP50 = (await measure(dev, 1, 4096, true)).p50
const thP50 = (await measure(devThread, 1, 4096, true)).p50
console.error(
  `  fio p50 ${(fP50 / 1e3).toFixed(1)} us, TypeScript p50 ${(jsP50 / 1e3).toFixed(1)} us (engine thread: ${(thP50 / 1e3).toFixed(1)})`,
)

console.error('1 MiB sequential reads, QD4...')
const fBw = fio(['--ioengine=io_uring', '--rw=read', '--bs=1m', '--iodepth=4']).bw_bytes
const jsBw = (await measure(dev, 4, 1 << 20, false)).bw
const thBw = (await measure(devThread, 4, 1 << 20, false)).bw
console.error(
  `  fio ${(fBw / 1e6).toFixed(0)} MB/s, TypeScript ${(jsBw / 1e6).toFixed(0)} MB/s (engine thread: ${(thBw / 1e6).toFixed(0)})`,
)
await dev.close()
await devThread.close()

const r = (a, b) => Math.round((a / b) * 1000) / 1000
console.log(
  JSON.stringify({
    randread_qd32_iops_ratio_js: r(jsRr32, fRr32),
    randread_qd32_iops_ratio_native: native.randread_qd32_iops_ratio_native,
    randread_qd1_p50_ratio: r(jsP50, fP50),
    seqread_bw_ratio: r(jsBw, fBw),
    psync_randread_qd32_iops_ratio: native.psync_randread_qd32_iops_ratio,
    randread_qd32_iops_ratio_js_thread: r(thRr32, fRr32),
    randread_qd1_p50_ratio_js_thread: r(thP50, fP50),
    seqread_bw_ratio_js_thread: r(thBw, fBw),
    randread_qd1_p50_ratio_native: native.randread_qd1_p50_ratio,
    seqread_bw_ratio_native: native.seqread_bw_ratio,
    randread_qd32_iops_ratio_thread: native.randread_qd32_iops_ratio_thread,
    randread_qd1_p50_ratio_thread: native.randread_qd1_p50_ratio_thread,
    fio_randread_qd32_iops_js_run: Math.round(fRr32),
    randread_qd32_iops_js: Math.round(jsRr32),
    fio_randread_qd1_p50_ns_js_run: fP50,
    randread_qd1_p50_ns_js: jsP50,
    fio_seqread_bw_bytes_per_sec_js_run: Math.round(fBw),
    seqread_bw_bytes_per_sec_js: Math.round(jsBw),
    fio_randread_qd32_iops: native.fio_randread_qd32_iops,
    randread_qd32_iops_native: native.randread_qd32_iops_native,
    fio_randread_qd1_p50_ns: native.fio_randread_qd1_p50_ns,
    randread_qd1_p50_ns_native: native.randread_qd1_p50_ns_native,
    fio_seqread_bw_bytes_per_sec: native.fio_seqread_bw_bytes_per_sec,
    seqread_bw_bytes_per_sec_native: native.seqread_bw_bytes_per_sec_native,
    fio_psync_randread_qd32_iops: native.fio_psync_randread_qd32_iops,
    psync_randread_qd32_iops: native.psync_randread_qd32_iops,
    seconds_per_measurement: secs,
    loadavg: (await import('node:os')).loadavg().map((x) => Math.round(x * 100) / 100),
  }),
)
