// `npm run bench:nbd`: `ubcache serve` over NBD beside nbdkit and qemu-nbd (issue 17's
// figures), all driven by fio's nbd engine over Unix sockets in the same run.
//
// Devices: a cache file and a raw image file in /dev/shm (memory, so that the servers, not a
// disk, are measured), a backing file on disk (UBCACHE_BENCH_NBD_DIR, default
// /var/tmp/ubcache-bench-nbd). The cached device is exported by `ubcache serve` in writeback
// mode with sequential_cutoff 0, and written in full through NBD (1 MiB writes), so every
// read hits the cache; the raw image, of the same size, is written in full too and served by
// `nbdkit file` and `qemu-nbd -f raw` (the raw cache device's place: a file holding the same
// bytes). Each measurement runs UBCACHE_BENCH_SECONDS (default 5) after 1 s of ramp, for
// UBCACHE_BENCH_ROUNDS rounds (default 3), the three servers in turn each round; figures
// are medians, ratios are against the faster of nbdkit and qemu-nbd in the same round.
//
// `nbdkit null` (no data) is run too, for 4 KiB random reads: the ceiling of this client on
// this machine, whatever the server (`client_ceiling_randread_qd32_iops`).
//
// Figures: 4 KiB random reads at QD32; 4 KiB random writes at QD32 (writeback: into the
// cache); 1 MiB sequential reads at QD8 (bandwidth). Targets (issue 17): randread ≥ 1.2,
// randwrite ≥ 1.0, seqread ≥ 1.0. Progress goes to stderr; the last stdout line is one JSON
// object.
//
// Environment: UBCACHE_BENCH_SECONDS, UBCACHE_BENCH_ROUNDS, UBCACHE_BENCH_NBD_MIB (export
// size, default 512), UBCACHE_BENCH_NBD_DIR.

import { execFileSync, spawn, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(root, 'dist', 'cli.js')
const secs = Number(process.env.UBCACHE_BENCH_SECONDS ?? 5)
const rounds = Math.max(1, Number(process.env.UBCACHE_BENCH_ROUNDS ?? 3))
const mib = Number(process.env.UBCACHE_BENCH_NBD_MIB ?? 512)
const dir = process.env.UBCACHE_BENCH_NBD_DIR ?? '/var/tmp/ubcache-bench-nbd'
const shm = fs.mkdtempSync('/dev/shm/ubcache-bench-nbd-')
const run = join(shm, 'run')
const log = (s) => process.stderr.write(s + '\n')

for (const tool of ['fio', 'nbdkit', 'qemu-nbd']) {
  if (spawnSync('which', [tool]).status !== 0) {
    log(`bench:nbd needs ${tool} (apt-get install fio nbdkit qemu-utils)`)
    process.exit(1)
  }
}

const children = new Set()
function cleanup() {
  for (const c of children) c.kill('SIGKILL')
  fs.rmSync(shm, { recursive: true, force: true })
}
process.on('SIGINT', () => {
  cleanup()
  process.exit(130)
})

/** Runs fio's nbd engine against `uri`; returns the job's JSON. */
function fio(uri, rw, bs, depth, extra = []) {
  const args = ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`, `--size=${mib}M`, '--output-format=json', ...extra]
  const out = execFileSync('fio', args, { encoding: 'utf8', maxBuffer: 64 << 20 })
  return JSON.parse(out.slice(out.indexOf('{'))).jobs[0]
}

function timed(uri, rw, bs, depth) {
  return fio(uri, rw, bs, depth, ['--time_based', `--runtime=${secs}`, '--ramp_time=1', '--randrepeat=0'])
}

async function waitFor(path, ms = 20000) {
  const end = Date.now() + ms
  while (!fs.existsSync(path)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${path}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

function start(cmd, args, env = {}) {
  const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } })
  let err = ''
  c.stderr.on('data', (d) => (err += d))
  children.add(c)
  const exited = new Promise((r) => c.on('exit', (code) => r(code)))
  return {
    async stop(sig = 'SIGTERM') {
      c.kill(sig)
      const code = await exited
      children.delete(c)
      return { code, err }
    },
    get err() {
      return err
    },
  }
}

const ubcacheEnv = { UBCACHE_RUNTIME_DIR: run }
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

async function main() {
  fs.mkdirSync(dir, { recursive: true })
  const cache = join(shm, 'cache.img')
  const backing = join(dir, 'backing.img')
  const raw = join(shm, 'raw.img')
  const dataOffset = 8192
  fs.writeFileSync(cache, '')
  fs.truncateSync(cache, Math.max(4 * mib, 2048) * 2 ** 20)
  fs.rmSync(backing, { force: true })
  fs.writeFileSync(backing, '')
  fs.truncateSync(backing, mib * 2 ** 20 + dataOffset)
  execFileSync('node', [cli, 'make', '-C', cache, '-B', backing, '--writeback', '--label', 'bench', '-o', String(dataOffset / 512)], { stdio: 'ignore' })

  const serve = () => start('node', [cli, 'serve', cache, backing], ubcacheEnv)
  let daemon = serve()
  const sock = join(run, 'nbd.sock')
  await waitFor(join(run, 'control.sock'))
  await waitFor(sock)
  execFileSync('node', [cli, 'set', 'bench', 'sequential_cutoff', '0'], { env: { ...process.env, ...ubcacheEnv } })
  execFileSync('node', [cli, 'set', 'bench', 'writeback_running', '0'], { env: { ...process.env, ...ubcacheEnv } })
  const ub = 'nbd+unix:///bench?socket=' + sock
  log(`bench:nbd: writing ${mib} MiB through ubcache serve (writeback, cached in full)`)
  fio(ub, 'write', '1M', 8)

  log(`bench:nbd: writing the ${mib} MiB raw image for nbdkit and qemu-nbd`)
  fs.writeFileSync(raw, '')
  fs.truncateSync(raw, mib * 2 ** 20)
  const kitSock = join(shm, 'nbdkit.sock')
  const qSock = join(shm, 'qemu.sock')
  const nullSock = join(shm, 'null.sock')
  const kit = start('nbdkit', ['-f', '-U', kitSock, 'file', raw])
  await waitFor(kitSock)
  const kitUri = 'nbd+unix:///?socket=' + kitSock
  fio(kitUri, 'write', '1M', 8)
  await kit.stop()

  const servers = {
    ubcache: { uri: ub, start: null },
    nbdkit: { uri: kitUri, start: () => start('nbdkit', ['-f', '-U', kitSock, 'file', raw]), sock: kitSock },
    qemu_nbd: { uri: `nbd+unix:///raw?socket=${qSock}`, start: () => start('qemu-nbd', ['-f', 'raw', '-k', qSock, '-x', 'raw', '-t', '--cache=writeback', raw]), sock: qSock },
    // No data at all: what this client can drive on this machine, whatever the server.
    nbdkit_null: { uri: `nbd+unix:///?socket=${nullSock}`, start: () => start('nbdkit', ['-f', '-U', nullSock, 'null', `${mib}M`]), sock: nullSock, only: ['randread'] },
  }
  const tests = [
    { key: 'randread', rw: 'randread', bs: '4k', depth: 32, metric: (j) => j.read.iops },
    { key: 'randwrite', rw: 'randwrite', bs: '4k', depth: 32, metric: (j) => j.write.iops },
    { key: 'seqread', rw: 'read', bs: '1M', depth: 8, metric: (j) => j.read.bw * 1024 },
  ]
  const results = {}
  for (let r = 1; r <= rounds; r++) {
    for (const [name, s] of Object.entries(servers)) {
      let proc
      if (s.start) {
        fs.rmSync(s.sock, { force: true })
        proc = s.start()
        await waitFor(s.sock)
      }
      for (const t of tests) {
        if (s.only && !s.only.includes(t.key)) continue
        const v = t.metric(timed(s.uri, t.rw, t.bs, t.depth))
        ;((results[name] ??= {})[t.key] ??= []).push(v)
        log(`round ${r}/${rounds} ${name} ${t.key}: ${t.key === 'seqread' ? `${(v / (1 << 20)).toFixed(0)} MiB/s` : `${(v / 1000).toFixed(1)}k IOPS`}`)
      }
      if (proc) await proc.stop()
    }
  }
  const stats = JSON.parse(execFileSync('node', [cli, 'stats', 'bench', '--json'], { env: { ...process.env, ...ubcacheEnv }, encoding: 'utf8' }))
  const res = await daemon.stop()
  daemon = null
  if (res.code !== 0) throw new Error(`ubcache serve exited ${res.code}: ${res.err}`)

  const ratio = (key) =>
    median(results.ubcache[key].map((v, i) => v / Math.max(results.nbdkit[key][i], results.qemu_nbd[key][i])))
  const hits = stats.accounting?.total
  const out = {
    nbd_randread_qd32_iops_ratio: Number(ratio('randread').toFixed(3)),
    nbd_randwrite_qd32_iops_ratio: Number(ratio('randwrite').toFixed(3)),
    nbd_seqread_bw_ratio: Number(ratio('seqread').toFixed(3)),
    nbdkit_randread_qd32_iops: Math.round(median(results.nbdkit.randread)),
    qemu_nbd_randread_qd32_iops: Math.round(median(results.qemu_nbd.randread)),
    ubcache_randread_qd32_iops: Math.round(median(results.ubcache.randread)),
    ubcache_randwrite_qd32_iops: Math.round(median(results.ubcache.randwrite)),
    nbdkit_randwrite_qd32_iops: Math.round(median(results.nbdkit.randwrite)),
    qemu_nbd_randwrite_qd32_iops: Math.round(median(results.qemu_nbd.randwrite)),
    ubcache_seqread_mib_s: Math.round(median(results.ubcache.seqread) / (1 << 20)),
    nbdkit_seqread_mib_s: Math.round(median(results.nbdkit.seqread) / (1 << 20)),
    qemu_nbd_seqread_mib_s: Math.round(median(results.qemu_nbd.seqread) / (1 << 20)),
    client_ceiling_randread_qd32_iops: Math.round(median(results.nbdkit_null.randread)),
    ubcache_hit_ratio_pct: hits?.cacheHitRatio ?? null,
    seconds: secs,
    rounds,
  }
  log(`bench:nbd: ubcache/faster of nbdkit,qemu-nbd: randread ${out.nbd_randread_qd32_iops_ratio} (target 1.2), randwrite ${out.nbd_randwrite_qd32_iops_ratio} (1.0), seqread ${out.nbd_seqread_bw_ratio} (1.0)`)
  console.log(JSON.stringify(out))
}

main()
  .catch((err) => {
    log(`bench:nbd failed: ${err.stack ?? err}`)
    process.exitCode = 1
  })
  .finally(cleanup)
