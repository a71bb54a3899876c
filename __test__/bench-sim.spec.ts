// The bench harness's workloads and `ioengine=sim`, and `ubcache bench` on the command line.
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import test from 'ava'
import { parseJobFile } from '../ts/bench/jobfile'
import { runSimJob } from '../ts/bench/sim-run'
import { readTrace } from '../ts/bench/trace'
import { jobIos, jobRegion } from '../ts/bench/workload'
import { cli, tempDir } from './helpers'

const dir = tempDir()
const job = (text: string) => parseJobFile(`[j]\nioengine=sim\n${text}`)[0]

test('sequential jobs walk the region in order and wrap; io_size and loops set the amount', (t) => {
  const j = job('rw=read\nbs=4k\noffset=8k\nsize=16k\nio_size=24k\nloops=2\ncache_size=4k\n')
  const region = jobRegion(j, undefined)
  t.deepEqual(region, { start: 8192, bytes: 16384 })
  const offs = [...jobIos(j, region)].map((io) => io.offset / 4096)
  t.deepEqual(offs, [2, 3, 4, 5, 2, 3, 2, 3, 4, 5, 2, 3])
})

test('random jobs visit every block once per pass (fio random map) unless norandommap', (t) => {
  const j = job('rw=randread\nbs=4k\nsize=400k\nloops=3\nrandom_distribution=zipf:1.2\ncache_size=4k\n')
  const ios = [...jobIos(j, jobRegion(j, undefined))]
  t.is(ios.length, 300)
  for (let pass = 0; pass < 3; pass++) {
    const seen = new Set(ios.slice(pass * 100, pass * 100 + 100).map((io) => io.offset))
    t.is(seen.size, 100, `pass ${pass}`)
  }
  const free = job('rw=randread\nbs=4k\nsize=400k\nrandom_distribution=zipf:1.2\nnorandommap\ncache_size=4k\n')
  const again = [...jobIos(free, jobRegion(free, undefined))]
  t.true(new Set(again.map((io) => io.offset)).size < 80, 'zipf without a map repeats hot blocks')
})

test('rwmixread, bssplit and percentages of a device', (t) => {
  const j = job('rw=randrw\nrwmixread=70\nbssplit=4k/75:16k/25\nsize=64M\nio_size=40M\ncache_size=4k\n')
  const ios = [...jobIos(j, jobRegion(j, undefined))]
  const reads = ios.filter((io) => io.op === 'read').length / ios.length
  t.true(Math.abs(reads - 0.7) < 0.02, `reads ${reads}`)
  const small = ios.filter((io) => io.length === 4096).length / ios.length
  t.true(Math.abs(small - 0.75) < 0.02, `4k share ${small}`)
  for (const io of ios) t.true(io.offset % 4096 === 0 && io.offset + io.length <= 64 << 20)
  const p = parseJobFile('[p]\nioengine=sim\noffset=25%\nsize=50%\ncache_size=4k\n')[0]
  t.deepEqual(jobRegion(p, 1 << 20), { start: 1 << 18, bytes: 1 << 19 })
  t.throws(() => jobRegion(p, undefined), { message: /percentage needs a device/ })
})

test('ioengine=sim: a loop one block larger than the cache defeats LRU and FIFO, not OPT', async (t) => {
  const j = job('rw=read\nbs=4k\nsize=16k\nloops=10\ncache_size=12k\n')
  const r = await runSimJob(j)
  t.is(r.requests, 40)
  t.is(r.cacheBlocks, 3)
  const by = Object.fromEntries(r.policies.map((p) => [p.policy, p.hits]))
  t.is(by.lru, 0)
  t.is(by.fifo, 0)
  t.true(by.opt >= 20)
  t.true(by.belady >= 20)
  await t.throwsAsync(runSimJob(job('size=16k\n')), { message: /needs cache_size=/ })
  await t.throwsAsync(runSimJob(job('size=16k\ncache_size=4k\ntime_based\nruntime=1\n')), { message: /needs rate_iops=/ })
})

test('ubcache bench runs a sim job: fio-like text, fio JSON shape with a ubcache object; bad job files get one line', (t) => {
  const f = join(dir, 'z.fio')
  writeFileSync(f, '[global]\nioengine=sim\nbs=4k\nsize=1Gi\ncache_size=2M\n[zipf]\nrw=randread\nrandom_distribution=zipf:1.2\nnorandommap\nio_size=256M\n')
  const text = cli('bench', f)
  t.is(text.status, 0, text.stderr)
  t.regex(text.stdout, /^zipf: \(groupid=0, jobs=1\): ioengine=sim, rw=randread, bs=4KiB, distribution=zipf:1.2/)
  t.regex(text.stdout, /hit ratio: opt \d+\.\d\d%  belady .* lru .* sieve \d+\.\d\d%/)
  const json = cli('bench', f, '--output-format', 'json')
  t.is(json.status, 0, json.stderr)
  const out = JSON.parse(json.stdout)
  t.is(out.jobs[0].jobname, 'zipf')
  t.is(out.jobs[0].read.total_ios, 65536)
  const hr = out.jobs[0].ubcache.hit_ratio
  for (const p of ['lru', 'fifo', 'arc', 's3fifo', 'sieve', 'belady']) t.true(hr.opt >= hr[p], p)
  t.true(hr.lru > 0.2 && hr.lru < hr.opt)
  writeFileSync(f, '[j]\nioengine=sim\nsize=1M\ncache_size=4k\nblock_size=4k\n')
  const bad = cli('bench', f)
  t.is(bad.status, 1)
  t.regex(bad.stderr, /^ubcache: .*z\.fio:5: \[j\] block_size=4k: unknown key 'block_size'\n$/)
  const missing = cli('bench', join(dir, 'none.fio'))
  t.is(missing.status, 1)
  t.regex(missing.stderr, /none\.fio: ENOENT/)
})

test('ioengine=raw: verify=crc32c writes checkable blocks; verify_only catches a corrupted one (exit 1)', (t) => {
  const img = join(dir, 'raw.img')
  const f = join(dir, 'v.fio')
  const body = `[global]\nioengine=raw\nfilename=${img}\nbs=4k\nsize=4M\niodepth=8\nrw=randwrite\nverify=crc32c\n`
  writeFileSync(f, `${body}[w]\n`)
  const w = cli('bench', f)
  t.is(w.status, 0, w.stdout + w.stderr)
  t.regex(w.stdout, /^w: \(groupid=0, jobs=1\): err= 0: ioengine=raw/)
  t.regex(w.stdout, /write: IOPS=\S+, BW=/)
  writeFileSync(f, `${body}[check]\nverify_only\n`)
  t.is(cli('bench', f).status, 0)
  const fd = openSync(img, 'r+')
  writeSync(fd, Buffer.alloc(16, 0xee), 0, 16, 5 * 4096 + 100)
  closeSync(fd)
  const bad = cli('bench', f)
  t.is(bad.status, 1)
  t.regex(bad.stdout, /verify: crc32c mismatch at offset 20480/)
  t.regex(bad.stdout, /err=84/)
})

test('ioengine=ubcache makes and formats missing files, reports the cache; runtime and rate_iops hold; JSON in fio shape', (t) => {
  const f = join(dir, 'u.fio')
  writeFileSync(
    f,
    `[global]\nioengine=ubcache\ncache=${join(dir, 'c.img')}\nbacking=${join(dir, 'b.img')}\ncache_size=64M\nsize=16M\nbs=4k\n[fill]\nrw=write\ncache_mode=writeback\n[paced]\nstonewall\nrw=randread\nruntime=2\ntime_based\nrate_iops=250\n`,
  )
  const r = cli('bench', f, '--output-format', 'json')
  t.is(r.status, 0, r.stderr)
  const out = JSON.parse(r.stdout)
  const [fill, paced] = out.jobs
  t.is(fill.jobname, 'fill')
  t.is(fill.write.total_ios, 4096)
  t.is(fill.write.io_bytes, 16 << 20)
  t.true(fill.write.clat_ns.percentile['99.000000'] >= fill.write.clat_ns.percentile['50.000000'])
  t.is(paced.jobname, 'paced')
  // 2 s at 250 IOPS: the pace and the runtime both hold (a loose bound: timers are coarse).
  t.true(paced.read.total_ios >= 400 && paced.read.total_ios <= 520, String(paced.read.total_ios))
  t.true(paced.read.runtime >= 1900 && paced.read.runtime <= 2600, String(paced.read.runtime))
  t.true(paced.ubcache.cache.hits > 0, JSON.stringify(paced.ubcache))
  // The same reads through the simulators: block-granular, and whole buckets as the engine
  // evicts (Belady's rule on buckets, and bcache's lru, s3fifo and tinylfu).
  const sim = paced.ubcache.cache.simulated
  t.deepEqual(Object.keys(sim.hitRatio), ['opt', 'belady', 'lru', 'fifo', 'arc', 's3fifo', 'sieve', 'bucket-min', 'bucket-lru', 'bucket-s3fifo', 'bucket-tinylfu'])
  for (const p of ['bucket-lru', 'bucket-s3fifo', 'bucket-tinylfu']) t.true(sim.hitRatio[p] <= sim.hitRatio['bucket-min'] + 1e-9, `${p} ${JSON.stringify(sim.hitRatio)}`)
  const text = cli('bench', f)
  t.regex(text.stdout, /cache: hits=\d+, misses=\d+, bypassed=\d+ \(\d+ sectors\), hit ratio=\d+\.\d\d%/)
  t.regex(text.stdout, /paced: \(groupid=1,/)
})

test('traces: blkparse, SPC, MSR Cambridge and ARC .lis are read with their units; bad lines are named', (t) => {
  const blk = readTrace('b.txt', 4096, [
    '  8,0    3        1     0.000000000   697  Q   R 223490 + 8 [kjournald]',
    '  8,0    3        2     0.000012000   697  D   R 223490 + 8 [kjournald]',
    '  8,0    3        3     0.500000000   697  Q  WS 1000 + 16 [fio]',
    '  8,0    3        4     0.600000000   697  Q   D 2048 + 2048 [fstrim]',
    'CPU3 (8,0):',
  ].join('\n'))
  t.deepEqual(blk, [
    { time: 0, op: 'read', offset: 223490 * 512, length: 4096 },
    { time: 0.5, op: 'write', offset: 1000 * 512, length: 8192 },
    { time: 0.6, op: 'trim', offset: 2048 * 512, length: 2048 * 512 },
  ])
  const spc = readTrace('s.spc', 4096, '0,20941264,8192,W,0.551706\n1,3436288,4096,r,0.554041\n')
  t.deepEqual(spc, [
    { time: 0, op: 'write', offset: 20941264 * 512, length: 8192 },
    { time: 0.554041 - 0.551706, op: 'read', offset: 2 ** 44 + 3436288 * 512, length: 4096 },
  ])
  const msr = readTrace('m.csv', 4096, '128166372003061629,hm,0,Read,7014609920,24576,41286\n128166372016382155,hm,1,Write,1317441536,8192,1963\n')
  t.is(msr.length, 2)
  t.deepEqual({ ...msr[0], time: 0 }, { time: 0, op: 'read', offset: 7014609920, length: 24576 })
  t.is(msr[1].op, 'write')
  t.is(msr[1].offset, 2 ** 44 + 1317441536)
  t.true(Math.abs(msr[1].time - (128166372016382155 - 128166372003061629) / 1e7) < 1e-3)
  const lis = readTrace('a.lis', 4096, '100 4 0 1\n7 1 0 2\n')
  t.deepEqual(lis, [
    { time: 0, op: 'read', offset: 409600, length: 16384 },
    { time: 1, op: 'read', offset: 28672, length: 4096 },
  ])
  t.throws(() => readTrace('x.txt', 4096, 'hello world\n'), { message: /^x\.txt:1: not a trace line of a known format/ })
  t.throws(() => readTrace('a.lis', 4096, '1 2 0 3\n1 2 x 3\n'), { message: /^a\.lis:2: not a lis line/ })
})

test('replay= through ioengine=sim: an ARC .lis loop one block over the cache', async (t) => {
  const lisFile = join(dir, 'loop.lis')
  writeFileSync(lisFile, Array.from({ length: 40 }, (_, i) => `${i % 4} 1 0 ${i}`).join('\n'))
  const j = parseJobFile(`[r]\nioengine=sim\nbs=4k\ncache_size=12k\nreplay=${lisFile}\n`)[0]
  const r = await runSimJob(j)
  t.is(r.requests, 40)
  t.is(r.spaceBlocks, 4)
  const by = Object.fromEntries(r.policies.map((p) => [p.policy, p.hits]))
  t.is(by.lru, 0)
  t.true(by.opt >= 20)
})

test('shipped examples: --list-examples, example:NAME, --sweep; an unknown example or unset variable is one line', (t) => {
  const list = cli('bench', '--list-examples')
  t.is(list.status, 0)
  for (const name of ['trace-replay', 'zipf-db', 'zipf-read', 'zipf-sim']) t.regex(list.stdout, new RegExp(`^example:${name} `, 'm'))
  const r = cli('bench', 'example:trace-replay', '--sweep', '--output-format', 'json')
  t.is(r.status, 0, r.stderr)
  const job = JSON.parse(r.stdout).jobs[0]
  t.is(job.read.total_ios, 30000)
  const sweep = job.ubcache.sweep as { cache_blocks: number; hit_ratio: Record<string, number> }[]
  t.is(sweep.length, 10)
  for (let i = 1; i < sweep.length; i++) t.true(sweep[i].hit_ratio.lru >= sweep[i - 1].hit_ratio.lru)
  // The scans hurt LRU: the scan-resistant policies do better at a small cache.
  t.true(sweep[3].hit_ratio.s3fifo > sweep[3].hit_ratio.lru + 0.05)
  const none = cli('bench', 'example:nope')
  t.is(none.status, 1)
  t.is(none.stderr, "ubcache: bench: no example 'nope' (ubcache bench --list-examples lists them)\n")
  const f = join(dir, 'env.fio')
  writeFileSync(f, '[j]\nioengine=sim\nsize=1M\ncache_size=${UBCACHE_NOT_SET_ANYWHERE}\n')
  const env = cli('bench', f)
  t.is(env.status, 1)
  t.regex(env.stderr, /env\.fio:4: environment variable UBCACHE_NOT_SET_ANYWHERE is not set/)
})

test('ubcache keys: sequential_cutoff, writeback tunables, filesize, and drain writes every dirty sector back', (t) => {
  const f = join(dir, 'drain.fio')
  writeFileSync(
    f,
    `[burst]\nioengine=ubcache\ncache=${join(dir, 'dc.img')}\nbacking=${join(dir, 'db.img')}\ncache_size=64M\nfilesize=64M\ncache_mode=writeback\nwriteback_running=0\nsequential_cutoff=0\nsize=16M\nbs=4k\nrw=randwrite\nio_size=8M\niodepth=16\ndrain=1\n`,
  )
  const r = cli('bench', f, '--output-format', 'json')
  t.is(r.status, 0, r.stderr)
  const u = JSON.parse(r.stdout).jobs[0].ubcache
  t.is(u.drained.sectors, 16384, 'every write was dirty in the cache (cutoff 0, writeback paused)')
  t.true(u.drained.seconds > 0)
  t.is(u.cache.dirtySectors, 16384)
  const text = cli('bench', f)
  t.regex(text.stdout, /drain: 8\.0MiB of dirty data written back in \d+\.\d\ds/)
  t.regex(text.stdout, /Run status group 0 \(all jobs\):\n\s+WRITE: bw=/)
  const bad = join(dir, 'bad-drain.fio')
  writeFileSync(bad, '[j]\nioengine=sim\nsize=1M\ncache_size=4k\ndrain=1\n')
  t.regex(cli('bench', bad).stderr, /drain applies to ioengine=ubcache/)
})

test('backing_latency: the raw engine waits out the emulated disk; a cached device serves its hits at cache speed', (t) => {
  const f = join(dir, 'lat.fio')
  writeFileSync(
    f,
    `[global]\nbs=4k\nsize=256k\nrw=randread\niodepth=4\nruntime=1\ntime_based\nbacking_latency=fixed=20ms\n` +
      `[disk]\nioengine=raw\nfilename=${join(dir, 'slow.img')}\n` +
      `[cached]\nstonewall\nioengine=ubcache\ncache=${join(dir, 'lc.img')}\nbacking=${join(dir, 'lb.img')}\ncache_size=16M\n`,
  )
  const r = cli('bench', f, '--output-format', 'json')
  t.is(r.status, 0, r.stderr)
  const [disk, cached] = JSON.parse(r.stdout).jobs
  // Four at a time, 20 ms each, in parallel: at most 200 in a second, none faster than 20 ms.
  t.true(disk.read.clat_ns.min >= 20e6, String(disk.read.clat_ns.min))
  t.true(disk.read.total_ios <= 220, String(disk.read.total_ios))
  // The 64 blocks are read from the slow disk (in about 0.3 s); after that every read is a hit.
  t.true(cached.read.total_ios > 2000, String(cached.read.total_ios))
  t.true(cached.read.clat_ns.max >= 20e6, 'the first reads missed')
  t.true(cached.read.clat_ns.min < 20e6, 'hits do not wait for the disk')
  const serial = join(dir, 'serial.fio')
  writeFileSync(serial, `[d]\nioengine=raw\nfilename=${join(dir, 'slow.img')}\nbs=4k\nsize=256k\nrw=randread\niodepth=4\nruntime=1\ntime_based\nbacking_latency=fixed=20ms,serial\n`)
  const sr = cli('bench', serial, '--output-format', 'json')
  t.is(sr.status, 0, sr.stderr)
  const s = JSON.parse(sr.stdout).jobs[0]
  // One at a time: four in flight wait for each other.
  t.true(s.read.total_ios <= 60, String(s.read.total_ios))
  t.true(s.read.clat_ns.mean >= 60e6, String(s.read.clat_ns.mean))
})

test('JSON lists the jobs in the order they were written, each with its group', (t) => {
  const f = join(dir, 'order.fio')
  writeFileSync(
    f,
    `[sim-first]\nioengine=sim\nrw=randread\nsize=4M\ncache_size=1M\nio_size=1M\n` +
      `[raw-second]\nstonewall\nioengine=raw\nfilename=${join(dir, 'order.img')}\nrw=read\nsize=1M\n` +
      `[sim-third]\nioengine=sim\nrw=randread\nsize=4M\ncache_size=1M\nio_size=1M\n`,
  )
  const r = cli('bench', f, '--output-format', 'json')
  t.is(r.status, 0, r.stderr)
  const jobs = JSON.parse(r.stdout).jobs as { jobname: string; groupid: number }[]
  t.deepEqual(
    jobs.map((j) => [j.jobname, j.groupid]),
    [
      ['sim-first', 0],
      ['raw-second', 1],
      ['sim-third', 1],
    ],
  )
})
