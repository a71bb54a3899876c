/**
 * `ubcache bench`: runs a fio job file (see {@link cmdBench}).
 * @module
 */
import { readFile } from 'node:fs/promises'
import { parseArgs } from 'node:util'
import { print, UsageError } from '../cli-common'
import { type Job, JobFileError, parseJobFile } from './jobfile'
import { runSimJob, type SimReport } from './sim-run'

export const BENCH_USAGE = `ubcache bench <job file> [--output-format normal|json]
  Runs the jobs of a fio job file ([global] and job sections, fio's keys and units).
  ioengine=sim: the job's access stream through simulated caches of cache_size (no device),
  reporting the hit ratio of OPT, Belady's MIN, LRU, FIFO, ARC, S3-FIFO and SIEVE.
  (ioengine=raw and ioengine=ubcache, fio-style latency output and the HTML report are not
  in this version yet.)`

/** `ubcache bench`: resolves to the exit code. */
export async function cmdBench(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { 'output-format': { type: 'string' } } })
  const format = values['output-format'] ?? 'normal'
  if (format !== 'normal' && format !== 'json') throw new UsageError(`bench: --output-format must be normal or json, not '${format}'`)
  if (positionals.length !== 1) throw new UsageError('bench takes one job file (ubcache bench <job file>)')
  const file = positionals[0]
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    throw new JobFileError(`${file}: ${(err as Error).message}`)
  }
  const jobs = parseJobFile(text, file)
  for (const j of jobs) {
    if (j.ioengine !== 'sim') throw new JobFileError(`${file}: [${j.name}] ioengine=${j.ioengine}: this version of ubcache bench runs ioengine=sim jobs only`)
  }
  const reports: SimReport[] = []
  for (const j of jobs) {
    const r = await runSimJob(j)
    reports.push(r)
    if (format === 'normal') printSim(j, r)
  }
  if (format === 'json') print(JSON.stringify(jsonOutput(reports)))
  return 0
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

function printSim(job: Job, r: SimReport): void {
  print(`${r.job}: (groupid=0, jobs=${r.numjobs}): ioengine=sim, rw=${r.rw}, bs=${bytes(r.blockSize)}, distribution=${describe(job)}`)
  print(`  requests: ${r.requests} (read ${r.reads}, write ${r.writes}); block accesses: ${r.accesses}`)
  print(`  cache: ${r.cacheBlocks} blocks (${bytes(r.cacheBlocks * r.blockSize)}) over ${r.spaceBlocks} blocks (${bytes(r.spaceBlocks * r.blockSize)}), ${pct(r.cacheBlocks / r.spaceBlocks)} of the space`)
  print(`  hit ratio: ${r.policies.map((p) => `${p.policy} ${pct(p.hitRatio)}`).join('  ')}`)
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

/** fio's JSON shape (`jobs[]` with `jobname`), ubcache's figures under `ubcache`. */
function jsonOutput(reports: SimReport[]): unknown {
  return {
    'fio version': 'ubcache-bench',
    timestamp: Math.floor(Date.now() / 1000),
    jobs: reports.map((r) => ({
      jobname: r.job,
      groupid: 0,
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
      },
    })),
  }
}
