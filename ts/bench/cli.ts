/**
 * `ubcache bench`: runs a fio job file (see {@link cmdBench}).
 * @module
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { readFile, writeFile } from 'node:fs/promises'
import { basename, join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { print, UsageError } from '../cli-common'
import { type IoReport, runIoJob, type DirStats } from './io-run'
import { type Job, JobFileError, parseJobFile } from './jobfile'
import { htmlReport } from './report'
import { runSimJob, type SimReport } from './sim-run'
import { FIO_PERCENTILES } from './stats'

/** Where the shipped example jobs are (`bench/jobs` of the package). */
export const EXAMPLES_DIR = resolve(__dirname, '..', '..', 'bench', 'jobs')

/** The shipped examples: name and the first comment line of each. */
export function listExamples(): { name: string; about: string }[] {
  return readdirSync(EXAMPLES_DIR)
    .filter((f) => f.endsWith('.fio'))
    .sort()
    .map((f) => {
      const lines = readFileSync(join(EXAMPLES_DIR, f), 'utf8').split('\n')
      const about = lines.filter((l) => l.startsWith(';')).map((l) => l.slice(1).trim()).join(' ')
      return { name: f.slice(0, -4), about: about.split('. ')[0] }
    })
}

export const BENCH_USAGE = `ubcache bench <job file | example:NAME> [--output-format normal|json] [--sweep]
ubcache bench ... --report out.html   also write a self-contained HTML report (charts)
ubcache bench --list-examples
  Runs the jobs of a fio job file ([global] and job sections, fio's keys and units): jobs
  run together, a stonewall job starts after the ones before it have finished.
  ioengine=ubcache: through a cached device (cache=, backing=, cache_mode=,
  cache_replacement_policy=; files that do
  not exist are made and formatted, the cache of cache_size); ioengine=raw: the raw-device
  API on filename=; ioengine=sim: the job's access stream through simulated caches of
  cache_size (no device), with the hit ratio of OPT, Belady's MIN, LRU, FIFO, ARC, S3-FIFO
  and SIEVE (--sweep: at cache sizes from 0.5% to 100% of the blocks accessed).
  backing_latency=7200rpm (or fixed=5ms,mibps=200,seek=8ms,serial) emulates a slow
  backing device: ioengine=ubcache slows the backing device only, ioengine=raw its file.
  remote_connections=N: connections to an NBD backing (or raw) device's server when it
  allows multi-conn (default 4).
  replay= replays a block trace (blkparse, SPC, MSR CSV, ARC .lis). Output as fio's (IOPS,
  bandwidth, slat/clat/lat and percentiles) plus the cache's lines; --output-format=json in
  fio's JSON shape with a ubcache object; --report out.html writes an HTML report.`

/** `ubcache bench`: resolves to the exit code. */
export async function cmdBench(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { 'output-format': { type: 'string' }, sweep: { type: 'boolean' }, 'list-examples': { type: 'boolean' }, report: { type: 'string' } } })
  if (values['list-examples']) {
    for (const e of listExamples()) print(`example:${e.name.padEnd(16)} ${e.about}`)
    return 0
  }
  const format = values['output-format'] ?? 'normal'
  if (format !== 'normal' && format !== 'json') throw new UsageError(`bench: --output-format must be normal or json, not '${format}'`)
  if (positionals.length !== 1) throw new UsageError('bench takes one job file (ubcache bench <job file>)')
  let file = positionals[0]
  let made: string | undefined
  if (file.startsWith('example:')) {
    const name = file.slice('example:'.length)
    if (!listExamples().some((e) => e.name === name)) throw new UsageError(`bench: no example '${name}' (ubcache bench --list-examples lists them)`)
    file = join(EXAMPLES_DIR, `${name}.fio`)
    // Examples that make devices make them in a fresh directory, removed afterwards.
    if (process.env.UBCACHE_BENCH_DIR === undefined) {
      made = mkdtempSync('/var/tmp/ubcache-bench-')
      process.env.UBCACHE_BENCH_DIR = made
    }
  }
  try {
    return await runFile(file, format, values.sweep === true, values.report)
  } finally {
    if (made) {
      rmSync(made, { recursive: true, force: true })
      delete process.env.UBCACHE_BENCH_DIR
    }
  }
}

async function runFile(file: string, format: string, sweep: boolean, report: string | undefined): Promise<number> {
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    throw new JobFileError(`${file}: ${(err as Error).message}`)
  }
  const jobs = parseJobFile(text, file)
  // Groups: jobs run together until a stonewall job, which waits for the ones before it.
  const groups: Job[][] = []
  for (const j of jobs) {
    if (groups.length === 0 || j.stonewall) groups.push([])
    groups[groups.length - 1].push(j)
  }
  const tty = process.stdout.isTTY === true && format === 'normal'
  const sims: SimReport[] = []
  const ios: IoReport[] = []
  /** Every job's report in the order the jobs were written, with its group. */
  const ordered: Ran[] = []
  let failed = false
  for (const [gid, group] of groups.entries()) {
    const status = new Map<string, string>()
    const show = (): void => {
      if (tty) process.stdout.write(`\rJobs: ${[...status.values()].join(' ')}\u001b[K`)
    }
    const results = await Promise.all(
      group.map(async (j) => {
        if (j.ioengine === 'sim') return { j, sim: await runSimJob(j, { sweep }) }
        const io = await runIoJob(j, (p) => {
          status.set(j.name, `[${j.name}: ${p.ios} ios${p.etaS !== undefined ? `, eta ${eta(p.etaS)}` : ''}]`)
          show()
        })
        return { j, io }
      }),
    )
    if (tty && status.size) process.stdout.write('\r\u001b[K')
    const groupIos: IoReport[] = []
    for (const r of results) {
      if (r.io) groupIos.push(r.io)
      ordered.push(r.sim ? { sim: r.sim, gid } : { io: r.io as IoReport, gid })
      if (r.sim) {
        sims.push(r.sim)
        if (format === 'normal') printSim(r.j, r.sim, gid)
      } else if (r.io) {
        ios.push(r.io)
        if (format === 'normal') printIo(r.j, r.io, gid)
        if (r.io.verifyErrors.length) failed = true
      }
    }
    if (format === 'normal' && groupIos.length) printGroup(gid, groupIos)
  }
  if (format === 'json') print(JSON.stringify(jsonOutput(ordered)))
  if (report !== undefined) {
    await writeFile(report, htmlReport(`ubcache bench: ${basename(file)}`, text, ios, sims))
    if (format === 'normal') print(`report: ${report}`)
  }
  return failed ? 1 : 0
}

function eta(s: number): string {
  const m = Math.floor(s / 60)
  return `${String(m).padStart(2, '0')}m:${String(Math.round(s % 60)).padStart(2, '0')}s`
}

/** fio's number style: 12.3k, 1234. */
function si(n: number): string {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)}k`
  return `${Math.round(n)}`
}

/** fio's `Run status group` lines: bandwidth over the group, the range across its jobs, I/O, run times. */
function printGroup(gid: number, rs: IoReport[]): void {
  print(`\nRun status group ${gid} (all jobs):`)
  for (const [name, pick] of [['READ', (r: IoReport) => r.read], ['WRITE', (r: IoReport) => r.write], ['TRIM', (r: IoReport) => r.trim]] as const) {
    const with_ = rs.filter((r) => pick(r).ios > 0)
    if (with_.length === 0) continue
    const bytes = with_.reduce((s, r) => s + pick(r).bytes, 0)
    const runs = with_.map((r) => r.runtimeMs)
    const bws = with_.map((r) => pick(r).bytes / (r.runtimeMs / 1000))
    const total = bytes / (Math.max(...runs) / 1000)
    const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)}MiB/s`
    print(`  ${name.padStart(5)}: bw=${mib(total)} (${(total / 1e6).toFixed(1)}MB/s), ${mib(Math.min(...bws))}-${mib(Math.max(...bws))}, io=${(bytes / 2 ** 20).toFixed(1)}MiB, run=${Math.round(Math.min(...runs))}-${Math.round(Math.max(...runs))}msec`)
  }
  print('')
}

function printIo(job: Job, r: IoReport, gid: number): void {
  const err = r.verifyErrors.length ? 84 : 0
  print(`${r.job}: (groupid=${gid}, jobs=${r.numjobs}): err=${String(err).padStart(2)}: ioengine=${r.engine}, rw=${job.rw}, bs=${bytes(job.bs.read)}-${bytes(job.bs.write)}, iodepth=${r.iodepth}`)
  for (const [name, d] of [['read', r.read], ['write', r.write], ['trim', r.trim]] as [string, DirStats][]) {
    if (d.ios === 0) continue
    const secs = r.runtimeMs / 1000
    const bw = d.bytes / secs
    print(`  ${name}: IOPS=${si(d.ios / secs)}, BW=${(bw / 2 ** 20).toFixed(1)}MiB/s (${(bw / 1e6).toFixed(1)}MB/s)(${(d.bytes / 2 ** 20).toFixed(1)}MiB/${Math.round(r.runtimeMs)}msec)`)
    for (const [lname, l] of [['slat', d.slat], ['clat', d.clat], ['lat', d.lat]] as const) {
      print(`    ${lname} (usec): min=${(l.min / 1e3).toFixed(1)}, max=${(l.max / 1e3).toFixed(1)}, avg=${(l.mean / 1e3).toFixed(2)}, stdev=${(l.stdev / 1e3).toFixed(2)}`)
    }
    print('    clat percentiles (usec):')
    const cells = FIO_PERCENTILES.map((p) => `${p.toFixed(2).padStart(5)}th=[${Math.round(d.clat.percentile(p) / 1e3)}]`)
    for (let i = 0; i < cells.length; i += 4) print(`     | ${cells.slice(i, i + 4).join(', ')}${i + 4 < cells.length ? ',' : ''}`)
  }
  if (r.flushes) print(`  flushes: ${r.flushes}`)
  if (r.cache) {
    const c = r.cache
    print(`  cache: hits=${c.hits}, misses=${c.misses}, bypassed=${c.bypassHits + c.bypassMisses} (${c.bypassedSectors} sectors), hit ratio=${pct(c.hitRatio)}`)
    print(`  cache: per block hit ratio=${pct(c.blockHitRatio)} (${c.hitSectors} sectors hit, ${c.missSectors} missed), dirty=${((c.dirtySectors * 512) / 2 ** 20).toFixed(1)}MiB, writeback rate=${((c.writebackRate * 512) / 2 ** 20).toFixed(2)}MiB/s`)
    if (c.simulated) {
      const s = c.simulated
      print(`  simulated, same reads, ${s.cacheBlocks} blocks of ${bytes(s.blockSize)}: ubcache ${pct(c.blockHitRatio)}  ${Object.entries(s.hitRatio).map(([p, r]) => `${p} ${pct(r)}`).join('  ')}`)
    }
  }
  if (r.drained) {
    const mib = (r.drained.sectors * 512) / 2 ** 20
    print(`  drain: ${mib.toFixed(1)}MiB of dirty data written back in ${r.drained.seconds.toFixed(2)}s (${(mib / Math.max(r.drained.seconds, 1e-9)).toFixed(1)}MiB/s)`)
  }
  for (const e of r.verifyErrors) print(`  verify: ${e}`)
}

function pct(x: number): string {
  return `${(x * 100).toFixed(2)}%`
}

function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (n >= 1024 && i < units.length - 1 && n % 1024 === 0) {
    n /= 1024
    i++
  }
  return `${n}${units[i]}`
}

function printSim(job: Job, r: SimReport, gid: number): void {
  print(`${r.job}: (groupid=${gid}, jobs=${r.numjobs}): ioengine=sim, rw=${r.rw}, bs=${bytes(r.blockSize)}, distribution=${describe(job)}`)
  print(`  requests: ${r.requests} (read ${r.reads}, write ${r.writes}); block accesses: ${r.accesses}`)
  print(`  cache: ${r.cacheBlocks} blocks (${bytes(r.cacheBlocks * r.blockSize)}) over ${r.spaceBlocks} blocks (${bytes(r.spaceBlocks * r.blockSize)}), ${pct(r.cacheBlocks / r.spaceBlocks)} of the space`)
  print(`  hit ratio: ${r.policies.map((p) => `${p.policy} ${pct(p.hitRatio)}`).join('  ')}`)
  if (r.sweep) {
    print(`  sweep (cache size in blocks of ${bytes(r.blockSize)}, share of the ${r.footprint} blocks accessed):`)
    print(`    ${'blocks'.padStart(10)} ${'share'.padStart(7)} ${r.policies.map((p) => p.policy.padStart(7)).join(' ')}`)
    for (const row of r.sweep) {
      print(`    ${String(row.cacheBlocks).padStart(10)} ${pct(row.cacheBlocks / r.footprint).padStart(7)} ${r.policies.map((p) => pct(row.hitRatio[p.policy]).padStart(7)).join(' ')}`)
    }
  }
}

function describe(job: Job): string {
  const d = job.randomDistribution
  switch (d.kind) {
    case 'random':
      return 'random'
    case 'zipf':
      return `zipf:${d.theta}`
    case 'pareto':
      return `pareto:${d.h}`
    case 'normal':
      return `normal:${d.sigma}`
    case 'zoned':
      return `zoned:${d.zones.map((z) => `${z.accessPct}/${z.sizePct}`).join(':')}`
  }
}

function dirJson(d: DirStats, runtimeMs: number): Record<string, unknown> {
  const secs = runtimeMs / 1000
  return {
    io_bytes: d.bytes,
    io_kbytes: Math.round(d.bytes / 1024),
    bw_bytes: Math.round(d.bytes / secs),
    bw: Math.round(d.bytes / 1024 / secs),
    iops: d.ios / secs,
    runtime: Math.round(runtimeMs),
    total_ios: d.ios,
    slat_ns: d.slat.json(),
    clat_ns: d.clat.json(),
    lat_ns: d.lat.json(),
  }
}

/** fio's JSON shape (`jobs[]` with `jobname`, `read`, `write`), ubcache's figures under `ubcache`. */
/** A job that ran: its report and its group. */
type Ran = { io: IoReport; sim?: undefined; gid: number } | { sim: SimReport; io?: undefined; gid: number }

/** fio's JSON shape: the jobs in the order they were written. */
function jsonOutput(ran: Ran[]): unknown {
  return {
    'fio version': 'ubcache-bench',
    timestamp: Math.floor(Date.now() / 1000),
    jobs: ran.map((x) => (x.io ? ioJson(x.io, x.gid) : simJson(x.sim, x.gid))),
  }
}

function ioJson(r: IoReport, gid: number): unknown {
  return {
    jobname: r.job,
    groupid: gid,
    error: r.verifyErrors.length ? 84 : 0,
    job_options: { ioengine: r.engine, numjobs: String(r.numjobs), iodepth: String(r.iodepth) },
    read: dirJson(r.read, r.runtimeMs),
    write: dirJson(r.write, r.runtimeMs),
    trim: dirJson(r.trim, r.runtimeMs),
    ubcache: { engine: r.engine, flushes: r.flushes, verify_errors: r.verifyErrors, ...(r.cache ? { cache: r.cache } : {}), ...(r.drained ? { drained: r.drained } : {}) },
  }
}

function simJson(r: SimReport, gid: number): unknown {
  return {
    jobname: r.job,
    groupid: gid,
    job_options: { rw: r.rw, ioengine: 'sim', numjobs: String(r.numjobs) },
    read: { total_ios: r.reads },
    write: { total_ios: r.writes },
    ubcache: {
      engine: 'sim',
      block_accesses: r.accesses,
      block_size: r.blockSize,
      cache_blocks: r.cacheBlocks,
      space_blocks: r.spaceBlocks,
      hit_ratio: Object.fromEntries(r.policies.map((p) => [p.policy, p.hitRatio])),
      hits: Object.fromEntries(r.policies.map((p) => [p.policy, p.hits])),
      footprint_blocks: r.footprint,
      ...(r.sweep ? { sweep: r.sweep.map((x) => ({ cache_blocks: x.cacheBlocks, hit_ratio: x.hitRatio })) } : {}),
    },
  }
}
