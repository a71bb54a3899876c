/**
 * The CLI commands of the daemon: `serve`, and the verbs that talk to a running one over
 * its management socket (`register`, `list`, `attach`, `detach`, `set`, `stats`, `stop`).
 * @module
 */
import { readFile } from 'node:fs/promises'
import { parseArgs } from 'node:util'
import { print, progressBar, UsageError } from '../cli-common'
import type { TlsOptions } from '../nbd/server'
import { controlRequest, defaultControlSocket } from './control'
import { Daemon, type DaemonConfig, readConfig } from './daemon'
import type { LogFormat } from './log'

export const DAEMON_USAGE = `ubcache serve [paths...] [options]
  Registers the devices given (cache and backing, any order), exports every cached device
  and flash-only volume over NBD, and runs until SIGINT, SIGTERM or ubcache stop.
      --config <file.json>      settings and devices (keys as the long options, camelCase;
                                exports: [{device, name, readOnly}])
      --socket <path>           NBD Unix socket (default <runtime dir>/nbd.sock, mode 0600)
      --listen <host:port>      also serve NBD over TCP
      --tls <off|on|require>    TLS through NBD_OPT_STARTTLS; require refuses plain clients
      --tls-cert <pem> --tls-key <pem>   certificate and key
      --tls-psk <file>          pre-shared keys, identity:hexkey lines
      --control <path>          management socket (default <runtime dir>/control.sock)
      --metrics <host:port>     Prometheus metrics at http://host:port/metrics
      --log-format <text|json>  one line per event on stderr
  The runtime dir is $UBCACHE_RUNTIME_DIR, else /run/ubcache (root) or $XDG_RUNTIME_DIR/ubcache.

Verbs (to a running daemon; --control <path> or $UBCACHE_CONTROL names its socket):
  ubcache register <path>                 register a cache or backing device
  ubcache list [--json]                   sets, devices and exports with their NBD URIs
  ubcache attach <backing> <set>          attach a backing device to a cache set
  ubcache attach --existing <path> <set> [--uuid U] [--label L] [--cache-mode M]
                                          cache a device that holds data as it is (no
                                          superblock written); --uuid to attach it again
  ubcache detach <backing>                write its dirty data back and detach it
  ubcache set <device> <tunable> <value>  a bcache tunable (cache_mode, writeback_percent,
                                          sequential_cutoff, ...) of a device or set
  ubcache stats <device> [--json] [--watch [--interval s]]
  ubcache stop                            stop the daemon cleanly
  Each exits 1 with one line when no daemon runs or it refuses the request.
`

/** `ubcache serve`: resolves to the exit code once the daemon has stopped. */
export async function cmdServe(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string' },
      socket: { type: 'string' },
      listen: { type: 'string' },
      tls: { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-psk': { type: 'string' },
      control: { type: 'string' },
      metrics: { type: 'string' },
      'log-format': { type: 'string' },
    },
  })
  const config: DaemonConfig = values.config ? await readConfig(values.config) : {}
  config.devices = [...(config.devices ?? []), ...positionals]
  if (values.socket !== undefined) config.socket = values.socket
  if (values.listen !== undefined) config.listen = values.listen
  if (values.tls !== undefined) config.tls = values.tls as DaemonConfig['tls']
  if (values['tls-cert'] !== undefined) config.tlsCert = values['tls-cert']
  if (values['tls-key'] !== undefined) config.tlsKey = values['tls-key']
  if (values['tls-psk'] !== undefined) config.tlsPsk = values['tls-psk']
  if (values.control !== undefined) config.control = values.control
  if (values.metrics !== undefined) config.metrics = values.metrics
  if (values['log-format'] !== undefined) config.logFormat = values['log-format'] as LogFormat
  if (config.logFormat !== undefined && config.logFormat !== 'text' && config.logFormat !== 'json') {
    throw new UsageError(`serve: --log-format must be text or json, not '${config.logFormat}'`)
  }
  const tls = await tlsOptions(config)
  const daemon = new Daemon(config, tls)
  let signals = 0
  const onSignal = (sig: NodeJS.Signals): void => {
    if (signals++ > 0) daemon.log.event('already stopping', { signal: sig })
    void daemon.stop(sig).catch(() => {})
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    await daemon.start()
    await daemon.stopped
    await daemon.stop('done')
    return 0
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}

async function tlsOptions(c: DaemonConfig): Promise<TlsOptions | undefined> {
  const mode = c.tls ?? (c.tlsPsk || c.tlsCert ? 'on' : 'off')
  if (mode !== 'off' && mode !== 'on' && mode !== 'require') throw new UsageError(`serve: --tls must be off, on or require, not '${String(mode)}'`)
  if (mode === 'off') {
    if (c.tlsPsk || c.tlsCert || c.tlsKey) throw new UsageError('serve: TLS files given with --tls=off')
    return undefined
  }
  if (c.tlsPsk) return { mode, psk: await readFile(c.tlsPsk, 'utf8') }
  if (!c.tlsCert || !c.tlsKey) throw new UsageError('serve: --tls needs --tls-psk <file>, or --tls-cert <pem> and --tls-key <pem>')
  return { mode, cert: await readFile(c.tlsCert), key: await readFile(c.tlsKey) }
}

/** Runs a management verb; resolves to the exit code. */
export async function cmdVerb(verb: string, argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      json: { type: 'boolean' },
      control: { type: 'string' },
      watch: { type: 'boolean' },
      interval: { type: 'string' },
      existing: { type: 'boolean' },
      uuid: { type: 'string' },
      label: { type: 'string' },
      'cache-mode': { type: 'string' },
    },
  })
  const control = values.control ?? defaultControlSocket()
  const need = (n: number, usage: string): void => {
    if (positionals.length !== n) throw new UsageError(`${verb} takes ${usage} (ubcache ${verb} ${usage})`)
  }
  const ask = (args: Record<string, unknown>, onProgress?: (p: unknown) => void): Promise<unknown> => controlRequest(control, verb, args, onProgress)
  const out = (result: unknown, line: string): void => print(values.json ? JSON.stringify(result) : line)
  switch (verb) {
    case 'register': {
      need(1, '<path>')
      const r = (await ask({ path: positionals[0] })) as Record<string, unknown>
      out(r, r.kind === 'cache' ? `${String(r.path)}: cache set ${String(r.set)} registered` : `${String(r.path)}: cached device ${String(r.uuid)} registered${r.set ? `, attached to ${String(r.set)}` : ''}, exported as '${String(r.export)}'`)
      return 0
    }
    case 'list': {
      need(0, '')
      const r = (await ask({})) as { sets: { uuid: string; path: string; state: string }[]; exports: { name: string; kind: string; device: string; size: number; uri: string }[]; devices: { path: string; set: string | null; cacheMode: string; state: string; dirtySectors: number }[] }
      if (values.json) {
        print(JSON.stringify(r))
        return 0
      }
      for (const s of r.sets) print(`set ${s.uuid}  ${s.path}  ${s.state}`)
      for (const d of r.devices) print(`device ${d.path}  set ${d.set ?? '-'}  ${d.cacheMode}  ${d.state}  ${d.dirtySectors} dirty sectors`)
      for (const e of r.exports) print(`export ${e.name}  ${e.kind} ${e.device}  ${e.size} bytes  ${e.uri}`)
      if (r.sets.length + r.devices.length + r.exports.length === 0) print('nothing registered')
      return 0
    }
    case 'attach': {
      if (values.existing) {
        need(2, '--existing <path> <set>')
        const r = (await ask({ backing: positionals[0], set: positionals[1], existing: true, uuid: values.uuid, label: values.label, cacheMode: values['cache-mode'] })) as Record<string, unknown>
        out(r, `${String(r.device)}: cached as it is in cache set ${String(r.set)} as UUID ${String(r.uuid)} (give --uuid ${String(r.uuid)} to attach it again), exported as '${String(r.export)}'`)
        return 0
      }
      if (values.uuid !== undefined || values.label !== undefined || values['cache-mode'] !== undefined) throw new UsageError('attach: --uuid, --label and --cache-mode go with --existing')
      need(2, '<backing> <set>')
      const r = (await ask({ backing: positionals[0], set: positionals[1] })) as Record<string, unknown>
      out(r, `${String(r.device)}: attached to cache set ${String(r.set)}`)
      return 0
    }
    case 'detach': {
      need(1, '<backing>')
      const bar = progressBar(process.stderr.isTTY === true && !values.json)
      try {
        const r = (await ask({ backing: positionals[0] }, (p) => {
          const { dirtySectors, total } = p as { dirtySectors: number; total: number }
          bar.update(total, dirtySectors)
        })) as Record<string, unknown>
        bar.done()
        out(r, `${String(r.device)}: detached from cache set ${String(r.set)} (${String(r.dirtySectorsBefore)} dirty sectors written back in ${String(r.seconds)} s)`)
      } finally {
        bar.done()
      }
      return 0
    }
    case 'set': {
      need(3, '<device> <tunable> <value>')
      const [device, tunable, value] = positionals
      const r = (await ask({ device, tunable, value })) as Record<string, unknown>
      out(r, `${device}: ${tunable} = ${JSON.stringify(r.value)}`)
      return 0
    }
    case 'stats': {
      need(1, '<device>')
      const watch = values.watch ? Number(values.interval ?? 1) : undefined
      if (watch !== undefined && !(watch > 0)) throw new UsageError(`stats: --interval takes seconds > 0, not '${values.interval}'`)
      for (;;) {
        const r = (await ask({ device: positionals[0] })) as Record<string, unknown>
        print(values.json ? JSON.stringify(r) : statsLine(r))
        if (watch === undefined) return 0
        await new Promise((res) => setTimeout(res, watch * 1000))
      }
    }
    case 'stop': {
      need(0, '')
      const r = await ask({})
      out(r, 'ubcache daemon stopping')
      return 0
    }
    default:
      throw new UsageError(`unknown verb '${verb}'`)
  }
}

/** One line of `ubcache stats` in text. */
function statsLine(r: Record<string, unknown>): string {
  if (r.kind === 'device') {
    const t = (r.accounting as { total?: Record<string, number> } | null)?.total
    const hits = t ? `${t.cacheHits} hits, ${t.cacheMisses} misses, hit ratio ${t.cacheHitRatio}%, ${t.bypassedSectors} sectors bypassed` : 'no cache set'
    return `${String(r.path)}: ${hits}; ${String(r.dirtySectors)} dirty, ${String(r.cachedSectors)} cached sectors; mode ${String((r.tunables as Record<string, unknown>).cache_mode)}`
  }
  if (r.kind === 'volume') return `volume ${String(r.uuid)}: ${String(r.cachedBytes)} bytes cached of ${String(r.size)}`
  const s = r.stats as Record<string, number | string>
  return `set ${String(r.uuid)}: ${s.state}; ${s.cacheHits} hits, ${s.cacheMisses} misses; ${s.dataBytes} data bytes, ${s.metaBytes} metadata bytes written; ${s.gcRuns} GC runs`
}
