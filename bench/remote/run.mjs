// `npm run bench:remote`: a cached device whose backing device is a remote NBD export
// (issue 19's figures). The remote is `nbdkit file` over a Unix socket under
// `--filter=delay` (UBCACHE_REMOTE_DELAY, default 1ms per request: a network round trip),
// nbdkit's default 16 threads; the cache is a tenth of the 512 MiB working set. In one run:
// - remote_seqread_bw_ratio: cold 1 MiB sequential reads at QD8 through a cached device
//   (`ubcache bench`, ioengine=ubcache) over fio's `nbd` engine reading the export directly;
// - remote_zipf_qd1_speedup, remote_zipf_qd32_speedup: Zipf (θ 1.2) 4 KiB random reads,
//   warm, through the cached device over fio reading the export directly, same depth;
// - remote_wb_randwrite_speedup: Zipf (θ 1.2) 4 KiB random writes at QD32 in writeback
//   over fio's writes to the export directly (uniform writes over ten times the cache fill
//   it with dirty data within a second, and then go at the remote's pace, as they must).
// - vs_nbdkit_cache_zipf_iops_ratio: the Zipf reads at QD32, warm, through fio's nbd engine:
//   `ubcache serve` with a remote backing device (nbdkit file under a 5 ms delay) over
//   `nbdkit --filter=cache --filter=delay file` with the same delay and cache size.
// UBCACHE_REMOTE_CONNECTIONS: connections of the client to the export (default 4).
// UBCACHE_BENCH_SECONDS per measured run (default 8). Progress on stderr; the last stdout
// line is one JSON object.

import { execFileSync, spawn } from 'node:child_process'
import fs from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(root, 'dist', 'cli.js')
const secs = Number(process.env.UBCACHE_BENCH_SECONDS ?? 8)
const delay = process.env.UBCACHE_REMOTE_DELAY ?? '1ms'
const dir = process.env.UBCACHE_BENCH_REMOTE_DIR ?? '/var/tmp/ubcache-bench-remote'
const log = (s) => process.stderr.write(s + '\n')
const WORKING = 512 << 20
// 256 KiB buckets: a miss is read from the remote a bucket at a time, so larger buckets make
// fewer round trips of a long read (64 KiB: 0.59 of fio's sequential bandwidth).
const bucket = process.env.UBCACHE_REMOTE_BUCKET ?? '256k'

fs.rmSync(dir, { recursive: true, force: true })
fs.mkdirSync(dir, { recursive: true })
const img = join(dir, 'export.img')
const cache = join(dir, 'cache.img')
const sock = join(dir, 'nbd.sock')
const uri = `nbd+unix:///?socket=${sock}`
log(`bench:remote: a ${WORKING >> 20} MiB export behind nbdkit --filter=delay (${delay} per request)`)
execFileSync('fio', ['--name=fill', `--filename=${img}`, '--rw=write', '--bs=1M', `--size=${WORKING}`, '--ioengine=psync', '--refill_buffers'], { stdio: 'ignore' })
const waitFor = (p) => {
  for (let i = 0; i < 1000 && !fs.existsSync(p); i++) execFileSync('sleep', ['0.01'])
}
const server = spawn('nbdkit', ['-f', '-U', sock, '--filter=delay', 'file', img, `delay-read=${delay}`, `delay-write=${delay}`], { stdio: 'ignore' })
process.on('exit', () => server.kill('SIGKILL'))
waitFor(sock)

// The cache: a tenth of the working set; the export formatted as its backing device.
fs.writeFileSync(cache, '')
fs.truncateSync(cache, Math.round(WORKING / 10 / 65536) * 65536)
const set = JSON.parse(execFileSync('node', [cli, 'make', '-C', cache, '--bucket', bucket, '--json'], { encoding: 'utf8' }))
const setUuid = set[0].setUuid
execFileSync('node', [cli, 'make', '-B', uri, '--cset-uuid', setUuid], { stdio: 'ignore' })

/** fio's nbd engine on the export `u`: its one job's JSON. */
const fioAt = (u, args) => {
  // The nbd engine says "connected to NBD server" on stdout before the JSON.
  const text = execFileSync('fio', ['--name=ref', '--ioengine=nbd', `--uri=${u}`, '--output-format=json', ...args], { encoding: 'utf8' })
  return JSON.parse(text.slice(text.indexOf('{'))).jobs[0]
}
const fio = (args) => fioAt(uri, args)
// Connections to the export (nbdkit file allows multi-conn); UBCACHE_REMOTE_CONNECTIONS,
// default the client's own (4).
const conns = process.env.UBCACHE_REMOTE_CONNECTIONS ? `remote_connections=${process.env.UBCACHE_REMOTE_CONNECTIONS}\n` : ''
const bench = (name, body) => {
  const f = join(dir, `${name}.fio`)
  fs.writeFileSync(f, `[${name}]\nioengine=ubcache\ncache=${cache}\nbacking=${uri}\n${conns}${body}`)
  return JSON.parse(execFileSync('node', [cli, 'bench', f, '--output-format', 'json'], { encoding: 'utf8', maxBuffer: 64 << 20 })).jobs[0]
}
const size = WORKING - (1 << 20)

log('cold 1 MiB sequential reads, QD8')
const seqU = bench('seq', `rw=read\nbs=1M\niodepth=8\nsize=${size}\nruntime=${secs}\ntime_based\n`).read.bw_bytes
const seqF = fio(['--rw=read', '--bs=1M', '--iodepth=8', `--size=${size}`, `--runtime=${secs}`, '--time_based']).read.bw_bytes
log(`  ubcache ${(seqU / 2 ** 20).toFixed(1)} MiB/s, fio nbd ${(seqF / 2 ** 20).toFixed(1)} MiB/s (${(seqU / seqF).toFixed(3)})`)

const zipf = `rw=randread\nbs=4k\nrandom_distribution=zipf:1.2\nnorandommap\nsize=${size}\n`
log('warming the cache: Zipf reads, QD32')
bench('warm', `${zipf}iodepth=32\nruntime=${Math.max(secs, 10)}\ntime_based\n`)
const out = {}
for (const qd of [1, 32]) {
  const u = bench(`zipf${qd}`, `${zipf}iodepth=${qd}\nruntime=${secs}\ntime_based\n`)
  const f = fio(['--rw=randread', '--bs=4k', '--random_distribution=zipf:1.2', '--norandommap', `--iodepth=${qd}`, `--size=${size}`, `--runtime=${secs}`, '--time_based']).read.iops
  const hit = u.ubcache?.cache?.hitRatio ?? u.ubcache?.cache?.blockHitRatio
  log(`  Zipf QD${qd}: ubcache ${u.read.iops.toFixed(0)} IOPS (hit ratio ${hit === undefined ? '?' : (hit * 100).toFixed(1) + '%'}), fio nbd ${f.toFixed(0)} IOPS (${(u.read.iops / f).toFixed(2)}x)`)
  out[qd] = u.read.iops / f
}

log('Zipf 4 KiB random writes, QD32, writeback')
const wbU = bench('wb', `rw=randwrite\nbs=4k\nrandom_distribution=zipf:1.2\nnorandommap\niodepth=32\nsize=${size}\ncache_mode=writeback\nruntime=${secs}\ntime_based\n`).write.iops
const wbF = fio(['--rw=randwrite', '--bs=4k', '--random_distribution=zipf:1.2', '--norandommap', '--iodepth=32', `--size=${size}`, `--runtime=${secs}`, '--time_based']).write.iops
log(`  ubcache ${wbU.toFixed(0)} IOPS, fio nbd ${wbF.toFixed(0)} IOPS (${(wbU / wbF).toFixed(2)}x)`)

// Against nbdkit's cache filter: the same file behind the same delay (UBCACHE_REMOTE_CACHE_DELAY,
// default 5ms), the same cache size, the Zipf reads at QD32 through fio's nbd engine, warm.
const slow = process.env.UBCACHE_REMOTE_CACHE_DELAY ?? '5ms'
log(`against nbdkit --filter=cache (${slow} per request to the file, the same cache size)`)
const cacheBytes = fs.statSync(cache).size
const zipfFio = ['--rw=randread', '--bs=4k', '--random_distribution=zipf:1.2', '--norandommap', '--iodepth=32', `--size=${size}`, `--runtime=${secs}`, '--time_based']
const kitSock = join(dir, 'kit.sock')
const kitImg = join(dir, 'kit.img')
fs.copyFileSync(img, kitImg)
const kit = spawn('nbdkit', ['-f', '-U', kitSock, '--filter=cache', '--filter=delay', 'file', kitImg, `delay-read=${slow}`, `delay-write=${slow}`, 'cache=writeback', 'cache-on-read=true', `cache-max-size=${cacheBytes}`], { stdio: 'ignore' })
process.on('exit', () => kit.kill('SIGKILL'))
waitFor(kitSock)
const kitUri = `nbd+unix:///?socket=${kitSock}`
fioAt(kitUri, zipfFio.map((a) => (a.startsWith('--runtime') ? `--runtime=${Math.max(secs, 10)}` : a)))
const kitIops = fioAt(kitUri, zipfFio).read.iops
kit.kill('SIGKILL')
log(`  nbdkit cache filter: ${kitIops.toFixed(0)} IOPS`)
// ubcache serve over a remote backing device slowed the same way.
const remSock = join(dir, 'remote-slow.sock')
const remImg = join(dir, 'remote-slow.img')
fs.copyFileSync(img, remImg)
const rem = spawn('nbdkit', ['-f', '-U', remSock, '--filter=delay', 'file', remImg, `delay-read=${slow}`, `delay-write=${slow}`], { stdio: 'ignore' })
process.on('exit', () => rem.kill('SIGKILL'))
waitFor(remSock)
const remUri = `nbd+unix:///?socket=${remSock}`
const cache2 = join(dir, 'cache2.img')
fs.writeFileSync(cache2, '')
fs.truncateSync(cache2, cacheBytes)
const set2 = JSON.parse(execFileSync('node', [cli, 'make', '-C', cache2, '--bucket', bucket, '--json'], { encoding: 'utf8' }))[0].setUuid
execFileSync('node', [cli, 'make', '-B', remUri, '--cset-uuid', set2, '--label', 'remote', '--writeback', '--wipe-bcache'], { stdio: 'ignore' })
const serveSock = join(dir, 'ubcache.sock')
const daemon = spawn('node', [cli, 'serve', '--socket', serveSock, cache2, remUri], { stdio: 'ignore', env: { ...process.env, UBCACHE_RUNTIME_DIR: dir } })
process.on('exit', () => daemon.kill('SIGKILL'))
waitFor(serveSock)
execFileSync('sleep', ['1'])
const ubUri = `nbd+unix:///remote?socket=${serveSock}`
fioAt(ubUri, zipfFio.map((a) => (a.startsWith('--runtime') ? `--runtime=${Math.max(secs, 10)}` : a)))
const ubIops = fioAt(ubUri, zipfFio).read.iops
daemon.kill('SIGTERM')
rem.kill('SIGKILL')
log(`  ubcache serve: ${ubIops.toFixed(0)} IOPS (${(ubIops / kitIops).toFixed(2)}x)`)

console.log(
  JSON.stringify({
    remote_seqread_bw_ratio: Number((seqU / seqF).toFixed(3)),
    remote_zipf_qd1_speedup: Number(out[1].toFixed(2)),
    remote_zipf_qd32_speedup: Number(out[32].toFixed(2)),
    remote_wb_randwrite_speedup: Number((wbU / wbF).toFixed(2)),
    vs_nbdkit_cache_zipf_iops_ratio: Number((ubIops / kitIops).toFixed(2)),
  }),
)
server.kill('SIGKILL')
