/**
 * `ubcache serve`: a registry of cache sets and cached devices, exported over NBD, managed
 * through a control socket (see {@link Daemon}).
 * @module
 */
import { readFile } from 'node:fs/promises'
import http from 'node:http'
import { basename, resolve as resolvePath } from 'node:path'
import { InvalidArgumentError, UbcacheError } from '../errors'
import { type BlockTarget, NbdExport } from '../nbd/export'
import { NbdServer, type TlsOptions } from '../nbd/server'
import { type ExistingDeviceOptions, Registry, type RegistryOptions } from '../registry'
import type { CacheMode } from '../superblock'
import { CachedDevice } from '../registry/cached-device'
import type { CacheSet } from '../registry/cache-set'
import type { FlashVolume } from '../registry/flash-volume'
import { ControlServer, defaultControlSocket, defaultNbdSocket, socketDir } from './control'
import { type LogFormat, Logger } from './log'
import { prometheusText } from './metrics'
import { readTunables, setTunable } from './tunables'
import { isNbdUri } from '../super-io'

/** An absolute path, or an NBD URI as it is. */
const resolve = (p: string): string => (isNbdUri(p) ? p : resolvePath(p))

/** An export's settings in a config file. */
export interface ExportConfig {
  /** The cached device's path, or a flash volume's UUID or label. */
  device: string
  /** Its export name (default: the label, else the file name or volume UUID). */
  name?: string
  readOnly?: boolean
}

/** A device cached as it is, with no superblock ({@link Registry.attachExisting}), in a config file. */
export interface ExistingConfig {
  /** Its path or NBD URI. */
  path: string
  /** The cache set (its UUID, or its cache device's path), registered through `devices`. */
  set: string
  /** The UUID the set knows it by: the one it got at its first attach (default: a new one). */
  uuid?: string
  /** A new device's label. */
  label?: string
  /** Cache mode to switch it to. */
  cacheMode?: CacheMode
}

/** What `ubcache serve` runs: the command line's options, or a `--config` JSON file's. */
export interface DaemonConfig {
  /** Devices to register at start, cache and backing, in any order. */
  devices?: string[]
  /** Devices with no superblock to cache as they are, once `devices` are registered. */
  existing?: ExistingConfig[]
  /** Names and read-only flags of exports. */
  exports?: ExportConfig[]
  /** The NBD Unix socket (default: `<runtime dir>/nbd.sock`); null for none (TCP only). */
  socket?: string | null
  /** Also listen for NBD on TCP (`host:port`). */
  listen?: string
  /** TLS for NBD clients (`STARTTLS`): `on`, or `require` to refuse clients without it. */
  tls?: 'off' | 'on' | 'require'
  /** PEM files of the TLS certificate and key. */
  tlsCert?: string
  tlsKey?: string
  /** A PSK file (`identity:hexkey` lines), for TLS with a pre-shared key. */
  tlsPsk?: string
  /** The management socket (default: `<runtime dir>/control.sock`). */
  control?: string
  /** Serve Prometheus metrics at `http://host:port/metrics`. */
  metrics?: string
  logFormat?: LogFormat
  /** Options of the registry (engine options, initial writeback and bypass tunables). */
  registry?: RegistryOptions
}

const CONFIG_KEYS = ['devices', 'existing', 'exports', 'socket', 'listen', 'tls', 'tlsCert', 'tlsKey', 'tlsPsk', 'control', 'metrics', 'logFormat', 'registry']

/** Reads and checks a `--config` file: unknown keys and wrong types are named. */
export async function readConfig(path: string): Promise<DaemonConfig> {
  let parsed: unknown
  try {
    parsed = JSON.parse(await readFile(path, 'utf8'))
  } catch (err) {
    throw new InvalidArgumentError(`${path}: ${(err as Error).message}`)
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new InvalidArgumentError(`${path}: the config must be a JSON object`)
  const c = parsed as Record<string, unknown>
  for (const k of Object.keys(c)) if (!CONFIG_KEYS.includes(k)) throw new InvalidArgumentError(`${path}: unknown key '${k}' (known: ${CONFIG_KEYS.join(', ')})`)
  const strings = (k: string): void => {
    if (c[k] !== undefined && c[k] !== null && typeof c[k] !== 'string') throw new InvalidArgumentError(`${path}: '${k}' must be a string`)
  }
  for (const k of ['socket', 'listen', 'tls', 'tlsCert', 'tlsKey', 'tlsPsk', 'control', 'metrics', 'logFormat']) strings(k)
  if (c.devices !== undefined && (!Array.isArray(c.devices) || c.devices.some((d) => typeof d !== 'string'))) throw new InvalidArgumentError(`${path}: 'devices' must be a list of paths`)
  if (c.existing !== undefined) {
    if (!Array.isArray(c.existing)) throw new InvalidArgumentError(`${path}: 'existing' must be a list`)
    for (const [i, e] of (c.existing as Record<string, unknown>[]).entries()) {
      if (typeof e !== 'object' || e === null || typeof e.path !== 'string' || typeof e.set !== 'string') throw new InvalidArgumentError(`${path}: existing[${i}] needs a 'path' and a 'set'`)
      for (const k of Object.keys(e)) {
        if (!['path', 'set', 'uuid', 'label', 'cacheMode'].includes(k)) throw new InvalidArgumentError(`${path}: existing[${i}]: unknown key '${k}' (known: path, set, uuid, label, cacheMode)`)
        if (typeof e[k] !== 'string') throw new InvalidArgumentError(`${path}: existing[${i}]: '${k}' must be a string`)
      }
    }
  }
  if (c.exports !== undefined) {
    if (!Array.isArray(c.exports)) throw new InvalidArgumentError(`${path}: 'exports' must be a list`)
    for (const [i, e] of (c.exports as Record<string, unknown>[]).entries()) {
      if (typeof e !== 'object' || e === null || typeof e.device !== 'string') throw new InvalidArgumentError(`${path}: exports[${i}] needs a 'device'`)
      for (const k of Object.keys(e)) if (!['device', 'name', 'readOnly'].includes(k)) throw new InvalidArgumentError(`${path}: exports[${i}]: unknown key '${k}'`)
    }
  }
  return c as DaemonConfig
}

/** Splits `host:port` (IPv6 as `[::1]:10809`). */
export function parseHostPort(s: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(s)
  const port = m ? Number(m[3]) : NaN
  if (!m || port > 65535) throw new InvalidArgumentError(`${what} must be host:port, got '${s}'`)
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port }
}

/** A device as the daemon serves it. */
type Served = CachedDevice | FlashVolume

/**
 * The daemon: registers devices, exports every cached device and flash volume over NBD,
 * answers the management socket's verbs, serves metrics, and stops cleanly (requests in
 * flight answered, writes flushed, a final checkpoint) on {@link Daemon.stop}.
 */
export class Daemon {
  readonly config: DaemonConfig
  readonly log: Logger
  readonly registry: Registry
  readonly nbd: NbdServer
  readonly #control: ControlServer
  readonly #exports = new Map<Served, NbdExport>()
  #metrics: http.Server | undefined
  #nbdSocket: string | undefined
  #tcp: string | undefined
  #controlPath: string
  #stopping: Promise<void> | undefined
  /** Resolves when the daemon has stopped. */
  readonly stopped: Promise<void>
  #stoppedResolve!: () => void

  constructor(config: DaemonConfig, tls?: TlsOptions) {
    this.config = config
    this.log = new Logger(config.logFormat ?? 'text')
    this.registry = new Registry(config.registry ?? {})
    this.nbd = new NbdServer({ tls, log: (event, fields) => this.log.event(event, fields) })
    this.#controlPath = config.control ?? defaultControlSocket()
    this.stopped = new Promise((r) => (this.#stoppedResolve = r))
    this.#control = new ControlServer({
      register: (a) => this.#register(str(a.path, 'path')),
      list: async () => this.list(),
      attach: (a) =>
        a.existing === true
          ? this.#attachExisting(str(a.backing, 'backing'), str(a.set, 'set'), { uuid: opt(a.uuid, 'uuid'), label: opt(a.label, 'label'), cacheMode: opt(a.cacheMode, 'cacheMode') as CacheMode | undefined })
          : this.#attach(str(a.backing, 'backing'), str(a.set, 'set')),
      detach: (a, progress, signal) => this.#detach(str(a.backing, 'backing'), progress, signal),
      set: async (a) => this.#set(str(a.device, 'device'), str(a.tunable, 'tunable'), str(a.value, 'value')),
      stats: async (a) => this.stats(str(a.device, 'device')),
      stop: async () => {
        setImmediate(() => void this.stop('ubcache stop'))
        return { stopping: true }
      },
    })
  }

  /** Starts it all; on failure undoes what started and rejects. */
  async start(): Promise<void> {
    const c = this.config
    try {
      await this.#control.listen(this.#controlPath)
      if (c.socket !== null) {
        const socket = c.socket ?? defaultNbdSocket()
        await socketDir(socket)
        this.#nbdSocket = await this.nbd.listen({ socket })
      }
      if (c.listen !== undefined) {
        const at = parseHostPort(c.listen, '--listen')
        await this.nbd.listen(at)
        const { host } = at
        this.#tcp = `${host === '0.0.0.0' || host === '::' ? 'localhost' : host}:${this.nbd.tcpPort()}`
      }
      if (this.#nbdSocket === undefined && this.#tcp === undefined) throw new InvalidArgumentError('nowhere to serve NBD: give a socket or --listen')
      for (const path of c.devices ?? []) await this.#register(path)
      for (const e of c.existing ?? []) await this.#attachExisting(e.path, e.set, { uuid: e.uuid, label: e.label, cacheMode: e.cacheMode })
      if (c.metrics !== undefined) await this.#serveMetrics(parseHostPort(c.metrics, '--metrics'))
      this.log.event('ready', { control: this.#controlPath, ...(this.#nbdSocket ? { socket: this.#nbdSocket } : {}), ...(this.#tcp ? { listen: this.#tcp } : {}), exports: this.nbd.exports.map((e) => e.name) })
    } catch (err) {
      await this.#shutdown()
      throw err
    }
  }

  /** The NBD URI of an export: on the Unix socket if there is one, else on TCP. */
  uri(name: string): string {
    return this.#nbdSocket !== undefined ? this.#unixUri(name) : (this.tcpUri(name) as string)
  }

  #unixUri(name: string): string {
    return `nbd${this.#tlsScheme()}+unix:///${encodeURIComponent(name)}?socket=${this.#nbdSocket}`
  }

  /** The NBD URI of an export on TCP, when the daemon listens there. */
  tcpUri(name: string): string | undefined {
    return this.#tcp === undefined ? undefined : `nbd${this.#tlsScheme()}://${this.#tcp}/${encodeURIComponent(name)}`
  }

  #tlsScheme(): string {
    return this.config.tls === 'require' || this.config.tls === 'on' ? 's' : ''
  }

  /** Makes exports match the registry: one per cached device and flash volume. */
  #sync(): void {
    const live = new Set<Served>()
    for (const d of this.registry.devices) live.add(d)
    for (const s of this.registry.sets) for (const v of s.volumes) live.add(v)
    for (const [dev, e] of this.#exports) {
      if (!live.has(dev)) {
        this.#exports.delete(dev)
        void this.nbd.remove(e.name)
        this.log.event('export removed', { export: e.name })
      }
    }
    for (const dev of live) {
      if (this.#exports.has(dev)) continue
      const e = this.#makeExport(dev)
      this.#exports.set(dev, e)
      this.nbd.add(e)
      this.log.event('exported', { export: e.name, size: e.size, blockSize: e.blockSize, readOnly: e.readOnly, uri: this.uri(e.name) })
    }
  }

  #makeExport(dev: Served): NbdExport {
    const isDevice = dev instanceof CachedDevice
    const cfg = (this.config.exports ?? []).find((x) =>
      isDevice ? resolve(x.device) === resolve(dev.path) || x.device === dev.uuid : x.device === dev.uuid || (dev.label !== '' && x.device === dev.label),
    )
    const taken = (n: string): boolean => this.nbd.exports.some((e) => e.name === n)
    // A remote backing device has no file name: its label or UUID names its export.
    let name = cfg?.name ?? (dev.label || (isDevice && !isNbdUri(dev.path) ? basename(dev.path) : dev.uuid))
    if (taken(name)) {
      if (cfg?.name !== undefined) this.log.event('export name taken', { name, device: isDevice ? dev.path : dev.uuid, using: dev.uuid })
      name = dev.uuid
    }
    const blockSize = isDevice ? dev.blockSize : dev.set.blockSize
    return new NbdExport({
      name,
      description: isDevice ? `cached device ${dev.path}` : `flash-only volume ${dev.uuid} of cache set ${dev.set.uuid}`,
      target: dev as BlockTarget,
      blockSize,
      readOnly: cfg?.readOnly === true,
      discardZeroes: !isDevice,
    })
  }

  async #register(given: string): Promise<unknown> {
    const path = resolve(given)
    const r = await this.registry.register(path)
    if (r instanceof CachedDevice) {
      this.log.event('registered', { path, kind: 'backing', uuid: r.uuid, set: r.set?.uuid ?? null, cacheMode: r.cacheMode })
    } else {
      this.log.event('registered', { path, kind: 'cache', set: r.uuid, devices: r.devices.length, volumes: r.volumes.length })
      for (const d of r.devices) this.log.event('attached', { device: d.path, set: r.uuid })
    }
    this.#sync()
    if (r instanceof CachedDevice) return { kind: 'backing', path, uuid: r.uuid, set: r.set?.uuid ?? null, export: this.#exports.get(r)?.name }
    return { kind: 'cache', path, set: r.uuid }
  }

  /** A cached device, cache set or flash volume by path, UUID, export name or label. */
  #find(ref: string): { device?: CachedDevice; set?: CacheSet; volume?: FlashVolume } {
    const abs = resolve(ref)
    for (const d of this.registry.devices) if (d.path === ref || resolve(d.path) === abs || d.uuid === ref) return { device: d }
    for (const s of this.registry.sets) if (s.path === ref || resolve(s.path) === abs || s.uuid === ref) return { set: s }
    for (const [dev, e] of this.#exports) {
      if (e.name === ref) return dev instanceof CachedDevice ? { device: dev } : { volume: dev }
    }
    for (const s of this.registry.sets) for (const v of s.volumes) if (v.uuid === ref) return { volume: v }
    for (const d of this.registry.devices) if (d.label !== '' && d.label === ref) return { device: d }
    throw new UbcacheError('ENOENT', `no registered device, cache set or export '${ref}' (see ubcache list)`)
  }

  #device(ref: string): CachedDevice {
    const f = this.#find(ref)
    if (f.device === undefined) throw new InvalidArgumentError(`'${ref}' is a ${f.set ? 'cache set' : 'flash-only volume'}, not a cached device`)
    return f.device
  }

  async #attach(backing: string, setRef: string): Promise<unknown> {
    const dev = this.#device(backing)
    const f = this.#find(setRef)
    if (f.set === undefined) throw new InvalidArgumentError(`'${setRef}' is not a registered cache set`)
    await f.set.attach(dev)
    this.log.event('attached', { device: dev.path, set: f.set.uuid })
    this.#sync()
    return { device: dev.path, set: f.set.uuid, state: dev.state }
  }

  /** Caches `given` as it is in the set `setRef` (its UUID or cache device's path). */
  async #attachExisting(given: string, setRef: string, options: ExistingDeviceOptions): Promise<unknown> {
    const path = resolve(given)
    const f = this.#find(setRef)
    if (f.set === undefined) throw new InvalidArgumentError(`'${setRef}' is not a registered cache set`)
    const defined = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as ExistingDeviceOptions
    const dev = await this.registry.attachExisting(path, f.set, defined)
    this.log.event('attached', { device: dev.path, set: f.set.uuid, existing: true, uuid: dev.uuid, cacheMode: dev.cacheMode })
    this.#sync()
    return { device: dev.path, set: f.set.uuid, uuid: dev.uuid, state: dev.state, export: this.#exports.get(dev)?.name }
  }

  async #detach(backing: string, progress: (p: unknown) => void, signal: AbortSignal): Promise<unknown> {
    const dev = this.#device(backing)
    const set = dev.set
    if (set === null) throw new InvalidArgumentError(`${dev.path} is not attached to a cache set`)
    const dirty = dev.dirtySectors() ?? 0
    const started = performance.now()
    progress({ dirtySectors: dirty, total: dirty })
    this.log.event('detaching', { device: dev.path, set: set.uuid, dirtySectors: dirty })
    await dev.detach({ signal, onProgress: (n) => progress({ dirtySectors: n, total: dirty }) })
    const seconds = Number(((performance.now() - started) / 1000).toFixed(3))
    this.log.event('detached', { device: dev.path, set: set.uuid, dirtySectors: dirty, seconds })
    return { device: dev.path, set: set.uuid, dirtySectorsBefore: dirty, seconds, state: dev.state }
  }

  #set(ref: string, tunable: string, value: string): unknown {
    const f = this.#find(ref)
    if (f.volume) throw new InvalidArgumentError(`'${ref}' is a flash-only volume: it has no tunables (set those of its cache set ${f.volume.set.uuid})`)
    const target = f.device ?? (f.set as CacheSet)
    const kind = f.device ? 'device' : 'set'
    setTunable(target, kind, tunable, value)
    const now = readTunables(target, kind)[tunable]
    this.log.event('tunable set', { [kind]: f.device?.path ?? f.set?.uuid, tunable, value: now })
    return { [kind]: f.device?.path ?? f.set?.uuid, tunable, value: now }
  }

  /** Stats and tunables of a cached device, cache set or flash volume. */
  stats(ref: string): Record<string, unknown> {
    const f = this.#find(ref)
    if (f.device) {
      const d = f.device
      return {
        kind: 'device',
        path: d.path,
        uuid: d.uuid,
        set: d.set?.uuid ?? null,
        state: d.state,
        export: this.#exports.get(d)?.name,
        dirtySectors: d.dirtySectors() ?? 0,
        cachedSectors: d.cachedSectors() ?? 0,
        writebackRate: d.writebackRate() ?? null,
        accounting: d.accounting() ?? null,
        tunables: readTunables(d, 'device'),
        nbd: this.#nbdCounts(d),
      }
    }
    if (f.volume) {
      const v = f.volume
      return { kind: 'volume', uuid: v.uuid, label: v.label, size: v.size, set: v.set.uuid, export: this.#exports.get(v)?.name, cachedBytes: v.cachedBytes(), nbd: this.#nbdCounts(v) }
    }
    const s = f.set as CacheSet
    return { kind: 'set', path: s.path, uuid: s.uuid, stats: s.stats(), accounting: s.accounting() ?? null, priorityStats: s.priorityStats() ?? null, tunables: readTunables(s, 'set') }
  }

  #nbdCounts(dev: Served): { connections: number } {
    const name = this.#exports.get(dev)?.name
    return { connections: this.nbd.connections().filter((c) => c.export === name).length }
  }

  /** Everything registered and exported, with NBD URIs. */
  list(): Record<string, unknown> {
    return {
      control: this.#controlPath,
      socket: this.#nbdSocket ?? null,
      listen: this.#tcp ?? null,
      sets: this.registry.sets.map((s) => ({ path: s.path, uuid: s.uuid, state: s.state, devices: s.devices.map((d) => d.uuid), volumes: s.volumes.map((v) => v.uuid) })),
      devices: this.registry.devices.map((d) => ({
        path: d.path,
        uuid: d.uuid,
        label: d.label,
        size: d.size,
        blockSize: d.blockSize,
        set: d.set?.uuid ?? null,
        cacheMode: d.cacheMode,
        state: d.state,
        dirtySectors: d.dirtySectors() ?? 0,
        export: this.#exports.get(d)?.name ?? null,
      })),
      exports: [...this.#exports].map(([dev, e]) => ({
        name: e.name,
        kind: dev instanceof CachedDevice ? 'cached device' : 'flash volume',
        device: dev instanceof CachedDevice ? dev.path : dev.uuid,
        size: e.size,
        blockSize: e.blockSize,
        readOnly: e.readOnly,
        uri: this.uri(e.name),
        ...(this.#tcp !== undefined && this.#nbdSocket !== undefined ? { tcpUri: this.tcpUri(e.name) } : {}),
      })),
      connections: this.nbd.connections(),
    }
  }

  async #serveMetrics(at: { host: string; port: number }): Promise<void> {
    const server = http.createServer((req, res) => {
      if (req.url !== '/metrics' && req.url !== '/') {
        res.writeHead(404).end('not found: try /metrics\n')
        return
      }
      try {
        const body = prometheusText(this.registry, (d) => this.#exports.get(d)?.name, this.nbd.connections())
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' }).end(body)
      } catch (err) {
        res.writeHead(500).end(`${(err as Error).message}\n`)
      }
    })
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(at.port, at.host, () => resolve())
    })
    this.#metrics = server
    const a = server.address() as { port: number }
    this.log.event('metrics', { url: `http://${at.host}:${a.port}/metrics` })
  }

  /** The port metrics are served on, once started. */
  metricsPort(): number | undefined {
    const a = this.#metrics?.address()
    return a && typeof a === 'object' ? a.port : undefined
  }

  /**
   * Stops cleanly: no new connections or requests, those in flight answered, then the
   * registry closed (flush, final checkpoint, superblocks up to date). Idempotent.
   */
  stop(why: string): Promise<void> {
    if (this.#stopping === undefined) {
      this.log.event('stopping', { reason: why })
      this.#stopping = this.#shutdown().then(
        () => {
          this.log.event('stopped', {})
          this.#stoppedResolve()
        },
        (err: unknown) => {
          this.log.event('stopped with an error', { error: (err as Error).message })
          this.#stoppedResolve()
          throw err
        },
      )
    }
    return this.#stopping
  }

  async #shutdown(): Promise<void> {
    await this.nbd.close()
    await this.#control.close()
    if (this.#metrics) {
      this.#metrics.closeAllConnections?.()
      await new Promise<void>((r) => (this.#metrics as http.Server).close(() => r()))
    }
    await this.registry.close()
  }
}

/** An optional string argument of a management request. */
function opt(v: unknown, what: string): string | undefined {
  return v === undefined || v === null ? undefined : str(v, what)
}

function str(v: unknown, what: string): string {
  if (typeof v !== 'string' || v === '') throw new InvalidArgumentError(`'${what}' must be a non-empty string`)
  return v
}
