/**
 * fio job files (see {@link parseJobFile}): fio's INI format, the keys the bench harness
 * takes with fio's meaning, units and defaults, and ubcache's own keys.
 * @module
 */
import { readFileSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import type { LatencyModel } from '../device'
import { UbcacheError } from '../errors'

/** A job file that cannot be run: `where` names the file and line, section, key and value. */
export class JobFileError extends UbcacheError {
  constructor(message: string) {
    super('INVALID_JOB_FILE', message)
    this.name = 'JobFileError'
  }
}

export type RwMode = 'read' | 'write' | 'randread' | 'randwrite' | 'rw' | 'randrw' | 'trim' | 'randtrim'
export type IoEngineName = 'ubcache' | 'raw' | 'sim'
export type VerifyMode = 'crc32c' | 'md5' | 'pattern'

/** An access distribution for random offsets (fio's `random_distribution`). */
export type Distribution =
  | { kind: 'random' }
  | { kind: 'zipf'; theta: number }
  | { kind: 'pareto'; h: number }
  | { kind: 'normal'; sigma: number }
  | { kind: 'zoned'; zones: { accessPct: number; sizePct: number }[] }

/** A size given as bytes, or as a percentage of the file (`size=50%`). */
export type SizeOrPct = { bytes: number } | { pct: number }

/** One job with every key resolved: fio's defaults where the file is silent. */
export interface Job {
  name: string
  rw: RwMode
  rwmixread: number
  /** Block size for reads and writes (`bs=4k` or `bs=4k,64k`). */
  bs: { read: number; write: number }
  bsrange?: { min: number; max: number }
  bssplit?: { bs: number; pct: number }[]
  size?: SizeOrPct
  offset: SizeOrPct
  ioSize?: number
  iodepth: number
  numjobs: number
  /** Seconds (0: none). */
  runtime: number
  timeBased: boolean
  rampTime: number
  startdelay: number
  loops: number
  randomDistribution: Distribution
  randseed: number
  norandommap: boolean
  rateIops?: number
  /** Microseconds between I/Os. */
  thinktime: number
  fsync: number
  fdatasync: number
  verify?: VerifyMode
  verifyPattern?: Buffer
  verifyOnly: boolean
  stonewall: boolean
  filename?: string
  direct: boolean
  groupReporting: boolean
  ioengine: IoEngineName
  cache?: string
  backing?: string
  cacheMode?: 'writethrough' | 'writeback' | 'writearound' | 'none'
  /** ubcache: the cache device's replacement policy (bcache's `cache_replacement_policy`). */
  cacheReplacementPolicy?: 'lru' | 'fifo' | 'random' | 's3fifo' | 'tinylfu'
  cacheSize?: number
  /** Bytes of a file the job makes (fio's `filesize`; default the job's region). */
  filesize?: number
  /** ubcache: bcache's `sequential_cutoff` for the cached device (bytes; 0 caches every stream). */
  sequentialCutoff?: number
  /** ubcache: bcache's `writeback_percent` and `writeback_running`. */
  writebackPercent?: number
  writebackRunning?: boolean
  /** ubcache: after its I/O, writeback runs at full speed until nothing is dirty (the drain is timed). */
  drain: boolean
  /** The emulated slow backing device (see {@link parseLatency}). */
  backingLatency?: BackingLatency
  /** ubcache and raw, a remote (NBD URI) device: connections to a multi-conn server. */
  remoteConnections?: number
  replay?: string
  replaySpeed: number
}

/** An emulated backing device's cost model (`backing_latency=`): the engine's latency model. */
export type BackingLatency = LatencyModel

/** How each key is read: its type, and for enums the values. */
type KeySpec =
  | { t: 'size' }
  | { t: 'sizepct' }
  | { t: 'int'; min?: number; max?: number }
  | { t: 'float'; min?: number; max?: number }
  | { t: 'time'; unit: 's' | 'us' }
  | { t: 'bool' }
  | { t: 'str' }
  | { t: 'enum'; values: readonly string[] }
  | { t: 'special' }

const RW_MODES = ['read', 'write', 'randread', 'randwrite', 'rw', 'readwrite', 'randrw', 'trim', 'randtrim'] as const

/** Every key the harness knows. */
const KEYS: Record<string, KeySpec> = {
  rw: { t: 'enum', values: RW_MODES },
  readwrite: { t: 'enum', values: RW_MODES },
  rwmixread: { t: 'int', min: 0, max: 100 },
  rwmixwrite: { t: 'int', min: 0, max: 100 },
  bs: { t: 'special' },
  blocksize: { t: 'special' },
  bsrange: { t: 'special' },
  bssplit: { t: 'special' },
  size: { t: 'sizepct' },
  offset: { t: 'sizepct' },
  io_size: { t: 'size' },
  iodepth: { t: 'int', min: 1, max: 65536 },
  numjobs: { t: 'int', min: 1, max: 1024 },
  runtime: { t: 'time', unit: 's' },
  time_based: { t: 'bool' },
  ramp_time: { t: 'time', unit: 's' },
  startdelay: { t: 'time', unit: 's' },
  loops: { t: 'int', min: 1 },
  random_distribution: { t: 'special' },
  randseed: { t: 'int', min: 0 },
  norandommap: { t: 'bool' },
  rate_iops: { t: 'int', min: 1 },
  thinktime: { t: 'time', unit: 'us' },
  fsync: { t: 'int', min: 0 },
  fdatasync: { t: 'int', min: 0 },
  verify: { t: 'enum', values: ['crc32c', 'md5', 'pattern', '0', 'null'] },
  verify_pattern: { t: 'special' },
  verify_only: { t: 'bool' },
  stonewall: { t: 'bool' },
  wait_for_previous: { t: 'bool' },
  name: { t: 'str' },
  filename: { t: 'str' },
  direct: { t: 'bool' },
  group_reporting: { t: 'bool' },
  ioengine: { t: 'enum', values: ['ubcache', 'raw', 'sim'] },
  cache: { t: 'str' },
  backing: { t: 'str' },
  cache_mode: { t: 'enum', values: ['writethrough', 'writeback', 'writearound', 'none'] },
  cache_replacement_policy: { t: 'enum', values: ['lru', 'fifo', 'random', 's3fifo', 'tinylfu'] },
  cache_size: { t: 'size' },
  filesize: { t: 'size' },
  sequential_cutoff: { t: 'size' },
  writeback_percent: { t: 'int', min: 0, max: 40 },
  writeback_running: { t: 'bool' },
  drain: { t: 'bool' },
  backing_latency: { t: 'special' },
  remote_connections: { t: 'int', min: 1, max: 16 },
  replay: { t: 'str' },
  replay_speed: { t: 'float', min: 0 },
}

/** The keys a job file may use, for `--help` and messages. */
export const JOB_KEYS = Object.keys(KEYS)

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 1024, kb: 1024, kib: 1024, ki: 1024, m: 1024 ** 2, mb: 1024 ** 2, mib: 1024 ** 2, mi: 1024 ** 2, g: 1024 ** 3, gb: 1024 ** 3, gib: 1024 ** 3, gi: 1024 ** 3, t: 1024 ** 4, tb: 1024 ** 4, tib: 1024 ** 4, ti: 1024 ** 4, p: 1024 ** 5, pb: 1024 ** 5, pib: 1024 ** 5, pi: 1024 ** 5 }

/** A size with fio's suffixes (base 1024: `4k`, `1M`, `1Mi`, `1MiB`, `1MB`), or undefined. */
export function parseFioSize(v: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(v)
  if (!m) return undefined
  const mult = SIZE_UNITS[m[2].toLowerCase()]
  if (mult === undefined) return undefined
  const n = Math.round(Number(m[1]) * mult)
  return Number.isSafeInteger(n) ? n : undefined
}

const TIME_UNITS: Record<string, number> = { us: 1e-6, usec: 1e-6, ms: 1e-3, msec: 1e-3, s: 1, sec: 1, m: 60, min: 60, h: 3600, d: 86400 }

/** A time with fio's suffixes in seconds, bare numbers in `unit`; or undefined. */
export function parseFioTime(v: string, unit: 's' | 'us'): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(v)
  if (!m) return undefined
  const n = Number(m[1])
  if (m[2] === '') return unit === 's' ? n : n * 1e-6
  const mult = TIME_UNITS[m[2].toLowerCase()]
  return mult === undefined ? undefined : n * mult
}

/**
 * Reads the emulated backing device: `7200rpm` (half a rotation per request, a 16 ms
 * full-stroke seek, 150 MiB/s, one request at a time), or `fixed=5ms,mibps=200,seek=8ms`
 * with any of the three and `serial` for one request at a time (`seek` is the full stroke).
 */
export function parseLatency(v: string): BackingLatency | undefined {
  if (/^\s*\d+\s*rpm\s*$/i.test(v)) {
    const rpm = Number(/\d+/.exec(v)?.[0])
    if (!(rpm > 0)) return undefined
    // Half a rotation on average, a full-stroke seek of 16 ms, 150 MiB/s, one arm.
    return { fixedUs: 60e6 / rpm / 2, mibps: 150, fullStrokeUs: 16_000, serial: true }
  }
  const out: BackingLatency = {}
  for (const part of v.split(',')) {
    const [k, val] = part.split('=').map((x) => x.trim())
    if (k === 'serial' && val === undefined) {
      out.serial = true
      continue
    }
    if (val === undefined) return undefined
    if (k === 'mibps') {
      const n = Number(val)
      if (!(n > 0) || !Number.isFinite(n)) return undefined
      out.mibps = n
      continue
    }
    const t = parseFioTime(val, 'us')
    if (t === undefined) return undefined
    if (k === 'fixed') out.fixedUs = t * 1e6
    else if (k === 'seek') out.fullStrokeUs = t * 1e6
    else return undefined
  }
  return out
}

function parseDistribution(v: string): Distribution | undefined {
  const colon = v.indexOf(':')
  const kind = colon < 0 ? v : v.slice(0, colon)
  const arg = colon < 0 ? undefined : v.slice(colon + 1)
  switch (kind) {
    case 'random':
      return arg === undefined ? { kind: 'random' } : undefined
    case 'zipf': {
      const theta = Number(arg)
      return arg !== undefined && theta > 0 && theta !== 1 ? { kind: 'zipf', theta } : undefined
    }
    case 'pareto': {
      const h = Number(arg)
      return arg !== undefined && h > 0 && h < 1 ? { kind: 'pareto', h } : undefined
    }
    case 'normal': {
      const sigma = Number(arg)
      return arg !== undefined && sigma > 0 && sigma <= 100 ? { kind: 'normal', sigma } : undefined
    }
    case 'zoned': {
      if (arg === undefined) return undefined
      const zones: { accessPct: number; sizePct: number }[] = []
      for (const z of arg.split(':')) {
        const m = /^(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?)$/.exec(z)
        if (!m) return undefined
        zones.push({ accessPct: Number(m[1]), sizePct: Number(m[2]) })
      }
      const a = zones.reduce((s, z) => s + z.accessPct, 0)
      const s = zones.reduce((t, z) => t + z.sizePct, 0)
      return Math.abs(a - 100) < 1e-9 && s <= 100 + 1e-9 ? { kind: 'zoned', zones } : undefined
    }
    default:
      return undefined
  }
}

/** Where a line came from, for messages. */
interface Origin {
  file: string
  line: number
}

interface RawSection {
  name: string
  entries: { key: string; value: string | undefined; at: Origin }[]
}

/** fio's `${VAR}` (and `$VAR`) in values: the environment variable, which must be set. */
function expandEnv(v: string, at: Origin): string {
  return v.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (_, a: string | undefined, b: string | undefined) => {
    const name = (a ?? b) as string
    const val = process.env[name]
    if (val === undefined) throw new JobFileError(`${at.file}:${at.line}: environment variable ${name} is not set`)
    return val
  })
}

/** Reads the sections of a job file, following `include` lines. */
function readSections(text: string, file: string, depth: number, out: RawSection[], read: (p: string) => string): void {
  if (depth > 16) throw new JobFileError(`${file}: include nested more than 16 deep`)
  let current = out.at(-1)
  for (const [i, raw] of text.split(/\r?\n/).entries()) {
    const at = { file, line: i + 1 }
    const line = raw.trim()
    if (line === '' || line.startsWith(';') || line.startsWith('#')) continue
    const inc = /^include\s+(.+)$/.exec(line)
    if (inc) {
      const path = resolve(dirname(file), inc[1].trim())
      let sub: string
      try {
        sub = read(path)
      } catch (err) {
        throw new JobFileError(`${file}:${at.line}: include ${inc[1].trim()}: ${(err as Error).message}`)
      }
      readSections(sub, path, depth + 1, out, read)
      current = out.at(-1)
      continue
    }
    const sec = /^\[([^\]]+)\]$/.exec(line)
    if (sec) {
      current = { name: sec[1].trim(), entries: [] }
      out.push(current)
      continue
    }
    if (current === undefined) throw new JobFileError(`${file}:${at.line}: '${line}' is outside any section (start with [global] or [jobname])`)
    const eq = line.indexOf('=')
    const key = (eq < 0 ? line : line.slice(0, eq)).trim().toLowerCase()
    const value = eq < 0 ? undefined : expandEnv(line.slice(eq + 1).trim(), at)
    current.entries.push({ key, value, at })
  }
}

/** fio's defaults. */
function defaults(name: string): Job {
  return {
    name,
    rw: 'read',
    rwmixread: 50,
    bs: { read: 4096, write: 4096 },
    offset: { bytes: 0 },
    iodepth: 1,
    numjobs: 1,
    runtime: 0,
    timeBased: false,
    rampTime: 0,
    startdelay: 0,
    loops: 1,
    randomDistribution: { kind: 'random' },
    randseed: 0x89,
    norandommap: false,
    thinktime: 0,
    fsync: 0,
    fdatasync: 0,
    verifyOnly: false,
    stonewall: false,
    direct: false,
    groupReporting: false,
    ioengine: 'ubcache',
    replaySpeed: 1,
    drain: false,
  }
}

/** Applies one `key=value` to `job`; throws naming the section, key and value. */
function apply(job: Job, section: string, key: string, value: string | undefined, at: Origin): void {
  const where = `${at.file}:${at.line}: [${section}] ${key}${value === undefined ? '' : `=${value}`}`
  const spec = Object.hasOwn(KEYS, key) ? KEYS[key] : undefined
  if (spec === undefined) throw new JobFileError(`${where}: unknown key '${key}'`)
  const bad = (what: string): never => {
    throw new JobFileError(`${where}: ${what}`)
  }
  if (spec.t === 'bool') {
    const prop = key === 'wait_for_previous' ? 'stonewall' : camel(key)
    if (value === undefined || value === '1' || value === 'true') (job as unknown as Record<string, unknown>)[prop] = true
    else if (value === '0' || value === 'false') (job as unknown as Record<string, unknown>)[prop] = false
    else bad('must be 0 or 1')
    return
  }
  if (value === undefined || value === '') bad('needs a value')
  const v = value as string
  switch (key) {
    case 'rw':
    case 'readwrite': {
      const mode = v.split(':')[0]
      if (!RW_MODES.includes(mode as never)) bad(`must be one of ${RW_MODES.join(', ')}`)
      job.rw = (mode === 'readwrite' ? 'rw' : mode) as RwMode
      return
    }
    case 'rwmixwrite': {
      const n = Number(v)
      if (!Number.isInteger(n) || n < 0 || n > 100) bad('must be a whole number from 0 to 100')
      job.rwmixread = 100 - n
      return
    }
    case 'bs':
    case 'blocksize': {
      const parts = v.split(',')
      const r = parseFioSize(parts[0])
      const w = parts[1] === undefined || parts[1] === '' ? r : parseFioSize(parts[1])
      if (parts.length > 3 || !r || !w) bad('must be a size such as 4k, or read,write sizes (4k,64k)')
      job.bs = { read: r as number, write: w as number }
      return
    }
    case 'bsrange': {
      const m = /^([^-:]+)[-:]([^-:,]+)$/.exec(v)
      const min = m ? parseFioSize(m[1]) : undefined
      const max = m ? parseFioSize(m[2]) : undefined
      if (!min || !max || min > max) bad('must be min-max sizes such as 1k-64k')
      job.bsrange = { min: min as number, max: max as number }
      return
    }
    case 'bssplit': {
      const split: { bs: number; pct: number }[] = []
      for (const part of v.split(':')) {
        const [b, p] = part.split('/')
        const bs = parseFioSize(b)
        const pct = p === undefined || p === '' ? NaN : Number(p)
        if (!bs || !(pct >= 0 && pct <= 100)) bad('must be size/percent pairs such as 4k/60:64k/40')
        split.push({ bs: bs as number, pct })
      }
      const total = split.reduce((s, x) => s + x.pct, 0)
      if (Math.abs(total - 100) > 1e-9) bad(`percentages add up to ${total}, not 100`)
      job.bssplit = split
      return
    }
    case 'random_distribution': {
      const d = parseDistribution(v)
      if (d === undefined) bad('must be random, zipf:θ (θ > 0, not 1), pareto:h (0 < h < 1), normal:σ (0 < σ ≤ 100) or zoned:access%/size%:...')
      job.randomDistribution = d as Distribution
      return
    }
    case 'verify_pattern': {
      const hex = /^0x([0-9a-fA-F]+)$/.exec(v)
      if (hex && hex[1].length % 2 === 0) job.verifyPattern = Buffer.from(hex[1], 'hex')
      else if (/^\d+$/.test(v) && Number(v) < 256) job.verifyPattern = Buffer.from([Number(v)])
      else if (/^".*"$/.test(v)) job.verifyPattern = Buffer.from(v.slice(1, -1))
      else bad('must be 0x hex bytes, a byte value or a "quoted string"')
      return
    }
    case 'backing_latency': {
      const l = parseLatency(v)
      if (l === undefined) bad('must be NNNNrpm, or fixed=TIME,mibps=N,seek=TIME[,serial] (e.g. fixed=5ms,mibps=200,seek=8ms)')
      job.backingLatency = l
      return
    }
    case 'verify':
      if (v === '0' || v === 'null') job.verify = undefined
      else if (!['crc32c', 'md5', 'pattern'].includes(v)) bad('must be crc32c, md5 or pattern')
      else job.verify = v as VerifyMode
      return
  }
  const prop = camel(key)
  const rec = job as unknown as Record<string, unknown>
  switch (spec.t) {
    case 'size': {
      const n = parseFioSize(v)
      if (n === undefined) bad('must be a size such as 4k, 64M or 1Gi')
      rec[prop] = n
      return
    }
    case 'sizepct': {
      const pm = /^(\d+(?:\.\d+)?)%$/.exec(v)
      if (pm) {
        const pct = Number(pm[1])
        if (pct > 100) bad('a percentage must be at most 100%')
        rec[prop] = { pct }
        return
      }
      const n = parseFioSize(v)
      if (n === undefined) bad('must be a size such as 64M, or a percentage of the file such as 50%')
      rec[prop] = { bytes: n }
      return
    }
    case 'int': {
      const n = Number(v)
      if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || (spec.min !== undefined && n < spec.min) || (spec.max !== undefined && n > spec.max)) {
        bad(`must be a whole number${spec.min !== undefined ? ` from ${spec.min}` : ''}${spec.max !== undefined ? ` to ${spec.max}` : ''}`)
      }
      rec[prop] = n
      return
    }
    case 'float': {
      const n = Number(v)
      if (!Number.isFinite(n) || (spec.min !== undefined && n <= spec.min)) bad(`must be a number above ${spec.min ?? 0}`)
      rec[prop] = n
      return
    }
    case 'time': {
      const s = parseFioTime(v, spec.unit)
      if (s === undefined) bad(`must be a time such as 30, 500ms or 2m${spec.unit === 'us' ? ' (bare numbers are microseconds)' : ' (bare numbers are seconds)'}`)
      rec[prop] = spec.unit === 'us' ? (s as number) * 1e6 : s
      return
    }
    case 'enum':
      if (!spec.values.includes(v)) bad(`must be one of ${spec.values.join(', ')}`)
      rec[prop] = v
      return
    case 'str':
      rec[prop] = v
      return
  }
}

/** `io_size` → `ioSize`; a few keys are named differently on {@link Job}. */
function camel(key: string): string {
  const renamed: Record<string, string> = { time_based: 'timeBased', ramp_time: 'rampTime', verify_only: 'verifyOnly', group_reporting: 'groupReporting', cache_mode: 'cacheMode', cache_replacement_policy: 'cacheReplacementPolicy', cache_size: 'cacheSize', sequential_cutoff: 'sequentialCutoff', writeback_percent: 'writebackPercent', writeback_running: 'writebackRunning', replay_speed: 'replaySpeed', rate_iops: 'rateIops', io_size: 'ioSize' }
  return renamed[key] ?? key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())
}

/**
 * Parses a job file's text: `[global]` sections set keys for the jobs after them, every
 * other section is a job; `;` and `#` start comment lines; `include FILE` reads another file
 * in place (relative to the including one). Every key takes fio's meaning, units and
 * defaults. The first problem — an unknown key, a bad value, a missing include — throws a
 * {@link JobFileError} of one line naming the file, line, section, key and value.
 */
export function parseJobFile(text: string, file = '<job file>', read: (path: string) => string = (p) => readFileSync(p, 'utf8')): Job[] {
  const sections: RawSection[] = []
  readSections(text, file, 0, sections, read)
  const jobs: Job[] = []
  let global: RawSection['entries'] = []
  for (const s of sections) {
    if (s.name === 'global') {
      global = [...global, ...s.entries]
      // Check them now, so that an error names the global section.
      const probe = defaults('global')
      for (const e of s.entries) apply(probe, 'global', e.key, e.value, e.at)
      continue
    }
    const job = defaults(s.name)
    for (const e of global) apply(job, 'global', e.key, e.value, e.at)
    for (const e of s.entries) apply(job, s.name, e.key, e.value, e.at)
    const where = `${file}: [${s.name}]`
    if (job.timeBased && job.runtime === 0) throw new JobFileError(`${where}: time_based needs a runtime`)
    if (job.verifyOnly && job.verify === undefined) throw new JobFileError(`${where}: verify_only needs verify=`)
    if (job.verify === 'pattern' && job.verifyPattern === undefined) throw new JobFileError(`${where}: verify=pattern needs verify_pattern=`)
    if (job.ioengine === 'ubcache' && job.cache === undefined && job.backing === undefined && job.filename === undefined) {
      throw new JobFileError(`${where}: ioengine=ubcache needs cache= and backing= (or filename=)`)
    }
    if (job.drain && job.ioengine !== 'ubcache') throw new JobFileError(`${where}: drain applies to ioengine=ubcache`)
    if (job.ioengine === 'raw' && job.filename === undefined) throw new JobFileError(`${where}: ioengine=raw needs filename=`)
    if (job.replay !== undefined && file !== '<job file>') job.replay = resolve(dirname(file), job.replay)
    if (job.ioengine === 'sim' && job.size === undefined && job.replay === undefined) throw new JobFileError(`${where}: ioengine=sim needs size= (the address space) or replay=`)
    jobs.push(job)
  }
  if (jobs.length === 0) throw new JobFileError(`${file}: no jobs (only [global] sections)`)
  return jobs
}
