#!/usr/bin/env node
/**
 * The `ubcache` command line. Every failure prints one line to stderr and exits 1; a bad
 * command line exits 1 too (with usage on `--help` only).
 * @module
 */
import { constants } from 'node:fs'
import { access, mkdtemp, rm, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { print, progressBar, UsageError } from './cli-common'
import { BENCH_USAGE, cmdBench } from './bench/cli'
import { cmdServe, cmdVerb, DAEMON_USAGE } from './daemon/verbs'
import { InvalidArgumentError, UbcacheError } from './errors'
import { makeSet } from './format'
import { type CachedDevice, Registry } from './registry'
import { formatSuperblock, superblockJson } from './show'
import { readSuperblock } from './super-io'
import { REPLACEMENTS, type Replacement } from './superblock'

const USAGE = `Usage: ubcache <command> [options]

Commands:
  make     Format cache (-C) and backing (-B) devices, as make-bcache does
  show     Print a device's superblock, as bcache-super-show does
  detach   Write a backing device's dirty data back and detach it from its cache set
  serve    Run the daemon: register devices, export them over NBD, take the verbs below
  bench    Run a fio job file (ioengine=sim: hit ratios of simulated caches beside OPT)
  register, list, attach, set, stats, stop, detach <backing>: verbs to a running daemon
  example  Format two temporary files as a cache set, write and read through it, restart warm
  help     Print this help

ubcache make [-C <cache>]... [-B <backing>]... [options]
  -C, --cache <path>                 format a cache device (repeat for several)
  -B, --bdev <path>                  format a backing device (repeat for several)
  -b, --bucket <size>                bucket size (default 512k)
  -w, --block <size>                 block size (default: device block size, 4k for files)
  -o, --data-offset <sectors>        data offset of backing devices (default 16)
      --cset-uuid <uuid>             cache set UUID (default random)
      --writeback                    backing devices start in writeback mode
      --discard                      cache devices discard buckets before reuse
      --cache_replacement_policy <p> lru, fifo, random, s3fifo or tinylfu (default lru)
      --label <text>                 device label (at most 32 bytes)
      --wipe-bcache                  overwrite an existing bcache superblock
      --json                         print the superblocks written as JSON

ubcache show <path> [--json]

ubcache detach <cache> <backing> [--json]   (without a daemon; with one: detach <backing>)
  Registers both, writes every dirty extent of <backing> back (a progress bar on a
  terminal), drops what the set caches of it, frees its slot, and writes state none into
  its superblock, as writing 1 to bcache's sysfs detach does. SIGINT or SIGTERM cancels
  the detach (the device stays attached) and stops cleanly; exit 130 or 143 then.

${DAEMON_USAGE}
${BENCH_USAGE}
`

async function cmdMake(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      cache: { type: 'string', short: 'C', multiple: true },
      bdev: { type: 'string', short: 'B', multiple: true },
      bucket: { type: 'string', short: 'b' },
      block: { type: 'string', short: 'w' },
      'data-offset': { type: 'string', short: 'o' },
      'cset-uuid': { type: 'string' },
      writeback: { type: 'boolean' },
      discard: { type: 'boolean' },
      cache_replacement_policy: { type: 'string' },
      label: { type: 'string' },
      'wipe-bcache': { type: 'boolean' },
      json: { type: 'boolean' },
    },
  })
  if (positionals.length) throw new UsageError(`make: unexpected argument '${positionals[0]}' (give devices with -C or -B)`)
  const caches = values.cache ?? []
  const backings = values.bdev ?? []
  if (caches.length === 0 && backings.length === 0) throw new UsageError('make: give at least one device with -C <cache> or -B <backing>')
  if (backings.length === 0) {
    if (values.writeback) throw new UsageError('make: --writeback applies to backing devices, but no -B was given')
    if (values['data-offset'] !== undefined) throw new UsageError('make: --data-offset applies to backing devices, but no -B was given')
  }
  if (caches.length === 0) {
    if (values.discard) throw new UsageError('make: --discard applies to cache devices, but no -C was given')
    if (values.cache_replacement_policy !== undefined) {
      throw new UsageError('make: --cache_replacement_policy applies to cache devices, but no -C was given')
    }
  }
  const policy = values.cache_replacement_policy
  if (policy !== undefined && !REPLACEMENTS.includes(policy as Replacement)) {
    throw new UsageError(`make: --cache_replacement_policy must be one of ${REPLACEMENTS.join(', ')}, not '${policy}'`)
  }
  let dataOffset: number | undefined
  if (values['data-offset'] !== undefined) {
    if (!/^\d+$/.test(values['data-offset'])) throw new UsageError(`make: --data-offset must be a number of sectors, not '${values['data-offset']}'`)
    dataOffset = Number(values['data-offset'])
  }
  const written = await makeSet({
    caches,
    backings,
    bucketSize: values.bucket,
    blockSize: values.block,
    dataOffset,
    setUuid: values['cset-uuid'],
    cacheMode: values.writeback ? 'writeback' : 'writethrough',
    discard: values.discard,
    replacement: policy as Replacement | undefined,
    label: values.label,
    wipe: values['wipe-bcache'],
  })
  if (values.json) {
    // Read back what was written: the JSON shows what is on disk, checks included.
    const shown = []
    for (const { path } of written) shown.push(superblockJson(path, await readSuperblock(path)))
    print(JSON.stringify(shown))
    return
  }
  for (const { path, sb } of written) {
    const kind = caches.includes(path) ? 'cache' : 'backing'
    print(`${path}: ${kind} device ${sb.uuid}, set ${sb.setUuid}`)
  }
}

async function cmdShow(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { json: { type: 'boolean' } },
  })
  if (positionals.length !== 1) throw new UsageError(`show: give exactly one device path (got ${positionals.length})`)
  const path = positionals[0]
  try {
    const parsed = await readSuperblock(path)
    print(values.json ? JSON.stringify(superblockJson(path, parsed)) : formatSuperblock(parsed))
  } catch (err) {
    if (values.json && err instanceof UbcacheError) {
      print(JSON.stringify({ path, error: { code: err.code, message: err.message } }))
    }
    throw err
  }
}

/**
 * The built-in example: a 64 MiB cache and a 32 MiB backing file formatted as one set,
 * registered, written and read through the cache in writeback mode (writeback paused),
 * closed, registered again and read from the warm cache, then written back to the backing
 * file at full speed, with the counts that show it.
 */
async function cmdExample(): Promise<void> {
  // O_DIRECT needs a filesystem that has it; /var/tmp is usually disk where /tmp may be tmpfs.
  const base = await access('/var/tmp', constants.W_OK).then(
    () => '/var/tmp',
    () => tmpdir(),
  )
  const dir = await mkdtemp(join(base, 'ubcache-example-'))
  try {
    const cache = join(dir, 'cache.img')
    const backing = join(dir, 'backing.img')
    await writeFile(cache, '')
    await writeFile(backing, '')
    await truncate(cache, 64 << 20)
    await truncate(backing, 32 << 20)
    print(`$ ubcache make -C ${cache} -B ${backing} --bucket 256k --writeback --label example`)
    await cmdMake(['-C', cache, '-B', backing, '--bucket', '256k', '--writeback', '--label', 'example'])

    const bytes = 4 << 20
    const chunk = 64 << 10
    const data = Buffer.alloc(bytes)
    for (let i = 0; i < bytes; i += 4) data.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ 0x5eed) >>> 0, i)

    print('\nRegistering both (the backing device attaches to the set by the UUID in its superblock),')
    print(`writing ${bytes >> 20} MiB through the cache in ${chunk >> 10} KiB writes, flushing, reading it back`)
    print('(writeback paused, so the dirty data stays in the cache until the end; sequential cutoff')
    print('off, as one stream of 4 MiB would otherwise reach bcache\'s default cutoff and bypass it):')
    const paused = { writeback: { running: false }, bypass: { sequentialCutoff: 0 } }
    let reg = new Registry(paused)
    let set = await reg.registerCache(cache)
    let dev = await reg.registerBacking(backing)
    const writes: Promise<void>[] = []
    for (let at = 0; at < bytes; at += chunk) writes.push(dev.write(at, data.subarray(at, at + chunk)))
    await Promise.all(writes)
    await dev.flush()
    const first = await readAll(dev, bytes, chunk)
    let s = set.stats()
    print(`  ${dev.path}: mode ${dev.cacheMode}, superblock state ${dev.state}, ${dev.dirtySectors()} dirty sectors`)
    print(`  read back ${first.equals(data) ? 'identical' : 'DIFFERENT'}: ${s.cacheHits} hits, ${s.cacheMisses} misses`)
    print(`  cache set: ${s.journalEntries} journal entries (${s.journalBytes} bytes), ${s.dataBytes >> 10} KiB of data written to the cache`)
    print('Closing: flush, final checkpoint, journal marked clean, backing superblock updated.')
    await reg.close()

    print('\nRegistering again and reading the same data:')
    reg = new Registry(paused)
    set = await reg.registerCache(cache)
    dev = await reg.registerBacking(backing)
    const report = set.openReport()
    const second = await readAll(dev, bytes, chunk)
    s = set.stats()
    print(`  the set opened from its checkpoint (${report?.checkpointKeys} keys; last shutdown clean: ${report?.cleanShutdown ? 'yes' : 'no'})`)
    print(`  read back ${second.equals(data) ? 'identical' : 'DIFFERENT'}: ${s.cacheHits} hits, ${s.cacheMisses} misses (${s.hitSectors} sectors from the warm cache)`)
    print(`  ${dev.dirtySectors()} dirty sectors: the cache holds the only copy of that data, so the superblock says ${dev.state}`)
    print('\nWriting the dirty data back to the backing file at full speed (writeback_percent 0):')
    const dirty = dev.dirtySectors() ?? 0
    const started = performance.now()
    dev.configureWriteback({ running: true, percent: 0, delaySeconds: 0 })
    while ((dev.dirtySectors() ?? 0) > 0) await new Promise((r) => setTimeout(r, 10))
    const secs = (performance.now() - started) / 1000
    s = set.stats()
    print(`  ${s.writebackSectors} sectors written back in ${secs.toFixed(2)} s, ${dev.dirtySectors()} dirty sectors left of ${dirty}; still cached: ${dev.cachedSectors()} sectors`)
    await reg.close()
    print(`  closed: the backing superblock says ${dev.state}`)

    print(`\n$ ubcache show ${backing}`)
    await cmdShow([backing])
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** `ubcache detach`: resolves to the exit code. */
async function cmdDetach(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { json: { type: 'boolean' } } })
  if (positionals.length !== 2) throw new UsageError('detach takes a cache device and a backing device (ubcache detach <cache> <backing>)')
  const [cachePath, backingPath] = positionals
  const abort = new AbortController()
  let signalled: NodeJS.Signals | undefined
  const onSignal = (sig: NodeJS.Signals): void => {
    signalled ??= sig
    abort.abort()
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  const reg = new Registry()
  const bar = progressBar(process.stderr.isTTY === true && !values.json)
  let result: Record<string, unknown> | undefined
  try {
    const set = await reg.registerCache(cachePath)
    const dev = await reg.registerBacking(backingPath)
    if (dev.set !== set) throw new UsageError(`${backingPath} is not attached to the cache set of ${cachePath} (${set.uuid})`)
    const dirty = dev.dirtySectors() ?? 0
    const started = performance.now()
    let left = dirty
    bar.update(dirty, dirty)
    let cancelled = false
    try {
      await dev.detach({ signal: abort.signal, onProgress: (n) => bar.update(dirty, (left = n)) })
      left = 0
    } catch (err) {
      if (!signalled) throw err
      cancelled = true
    }
    bar.done()
    result = {
      device: backingPath,
      set: set.uuid,
      detached: !cancelled,
      dirtySectorsBefore: dirty,
      dirtySectorsLeft: cancelled ? (dev.dirtySectors() ?? left) : 0,
      seconds: Number(((performance.now() - started) / 1000).toFixed(3)),
      ...(signalled ? { signal: signalled } : {}),
    }
  } finally {
    bar.done()
    // A clean stop, signal or not: flush, final checkpoint, superblocks up to date.
    await reg.close()
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
  if (values.json) print(JSON.stringify(result))
  else if (result.detached) print(`${backingPath}: detached from cache set ${String(result.set)} (${String(result.dirtySectorsBefore)} dirty sectors written back in ${String(result.seconds)} s); state none`)
  else print(`${backingPath}: detach cancelled by ${String(signalled)}; still attached, ${String(result.dirtySectorsLeft)} dirty sectors left; stopped cleanly`)
  return signalled === undefined ? 0 : signalled === 'SIGINT' ? 130 : 143
}

/** Reads `bytes` bytes of `dev` in `chunk`-byte reads, all in flight at once. */
async function readAll(dev: CachedDevice, bytes: number, chunk: number): Promise<Buffer> {
  const parts: Promise<Buffer>[] = []
  for (let at = 0; at < bytes; at += chunk) parts.push(dev.read(at, chunk))
  return Buffer.concat(await Promise.all(parts))
}

/** Runs the CLI on `argv` (without node and script); resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  try {
    switch (command) {
      case 'make':
        await cmdMake(rest)
        return 0
      case 'show':
        await cmdShow(rest)
        return 0
      case 'detach':
        // One device: the daemon's verb; a cache and a backing device: standalone.
        return rest.filter((a, i) => !a.startsWith('-') && rest[i - 1] !== '--control').length === 1 ? await cmdVerb('detach', rest) : await cmdDetach(rest)
      case 'serve':
        return await cmdServe(rest)
      case 'bench':
        return await cmdBench(rest)
      case 'register':
      case 'list':
      case 'attach':
      case 'set':
      case 'stats':
      case 'stop':
        return await cmdVerb(command, rest)
      case 'example':
        await cmdExample()
        return 0
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(USAGE)
        return 0
      case undefined:
        process.stderr.write(USAGE)
        return 1
      default:
        throw new UsageError(`unknown command '${command}' (try: ubcache help)`)
    }
  } catch (err) {
    process.stderr.write(`ubcache: ${describe(err)}\n`)
    return 1
  }
}

function describe(err: unknown): string {
  if (err instanceof UsageError || err instanceof InvalidArgumentError || err instanceof UbcacheError) return err.message
  const e = err as { code?: string; message?: string }
  // parseArgs reports unknown options and missing values with these codes.
  if (e?.code?.startsWith('ERR_PARSE_ARGS')) return e.message ?? String(err)
  return e?.message ?? String(err)
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code
  })
}
