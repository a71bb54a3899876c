/**
 * An NBD server over a set of exports (see {@link NbdServer}).
 * @module
 */
import { unlink } from 'node:fs/promises'
import net from 'node:net'
import type { Duplex } from 'node:stream'
import { createSecureContext } from 'node:tls'
import { InvalidArgumentError } from '../errors'
import { listenOn, listenUnix } from '../unix-socket'
import type { NbdExport } from './export'
import { handshake, HandshakeClosed, type TlsSetup } from './handshake'
import { Transmission } from './transmission'

/** Where a server listens. */
export type Listen = { socket: string } | { host: string; port: number }

/** TLS settings: a certificate and key, or a pre-shared key file (nbdkit's `--tls-psk`). */
export interface TlsOptions {
  /** `require` refuses clients that do not start TLS (nbdkit's `--tls=require`); `on` lets them choose. */
  mode: 'on' | 'require'
  /** PEM certificate (chain) and private key. */
  cert?: string | Buffer
  key?: string | Buffer
  /** Pre-shared keys: `identity:hexkey` lines, the format of nbdkit's and GnuTLS's PSK files. */
  psk?: string
}

/** Options of {@link NbdServer}. */
export interface NbdServerOptions {
  tls?: TlsOptions
  /** Called with one event per line-worthy happening: connections, errors. */
  log?: (event: string, fields: Record<string, unknown>) => void
  /** Milliseconds a client has to finish the handshake (default 30000). */
  handshakeTimeoutMs?: number
}

/** A connection as the server tracks it. */
interface Client {
  id: number
  socket: net.Socket
  transmission?: Transmission
}

/** Parses a PSK file (`identity:hexkey` per line). */
export function parsePskFile(text: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>()
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim()
    if (line === '' || line.startsWith('#')) continue
    const m = /^([^:]+):([0-9a-fA-F]+)$/.exec(line)
    if (!m || m[2].length % 2) throw new InvalidArgumentError(`PSK file line ${i + 1}: expected identity:hexkey`)
    keys.set(m[1], Buffer.from(m[2], 'hex'))
  }
  if (keys.size === 0) throw new InvalidArgumentError('PSK file holds no keys')
  return keys
}

function tlsSetup(o: TlsOptions): TlsSetup {
  if (o.psk !== undefined) {
    // GnuTLS clients (libnbd, qemu) offer TLS 1.3 PSK as well; Node serves PSK over TLS 1.2.
    const context = createSecureContext({ ciphers: 'PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256', maxVersion: 'TLSv1.2', minVersion: 'TLSv1.2' })
    return { mode: o.mode, context, psk: parsePskFile(o.psk) }
  }
  if (o.cert === undefined || o.key === undefined) throw new InvalidArgumentError('TLS needs a certificate and key, or a PSK file')
  return { mode: o.mode, context: createSecureContext({ cert: o.cert, key: o.key }) }
}

/**
 * Serves exports over NBD: the fixed-newstyle handshake, then transmission, on every
 * connection to where it listens (a Unix socket, mode 0600, or TCP). Exports come and go
 * with {@link NbdServer.add} and {@link NbdServer.remove}; removing one ends its connections
 * once their requests in flight are answered, as {@link NbdServer.close} does for all.
 */
export class NbdServer {
  readonly #exports = new Map<string, NbdExport>()
  readonly #servers: net.Server[] = []
  readonly #clients = new Set<Client>()
  readonly #tls: TlsSetup | undefined
  readonly #log: (event: string, fields: Record<string, unknown>) => void
  readonly #handshakeMs: number
  #nextId = 1
  #stopping = false
  readonly #sockets: string[] = []

  constructor(options: NbdServerOptions = {}) {
    this.#tls = options.tls ? tlsSetup(options.tls) : undefined
    this.#log = options.log ?? (() => {})
    this.#handshakeMs = options.handshakeTimeoutMs ?? 30_000
  }

  /** Adds (or replaces) an export. */
  add(e: NbdExport): void {
    this.#exports.set(e.name, e)
  }

  /** Removes an export; resolves once its connections have ended. */
  async remove(name: string): Promise<void> {
    const e = this.#exports.get(name)
    if (e === undefined) return
    this.#exports.delete(name)
    const ends: Promise<void>[] = []
    for (const c of this.#clients) if (c.transmission?.export === e) ends.push(c.transmission.stop('the export was removed'))
    await Promise.all(ends)
  }

  /** The exports, by name. */
  get exports(): NbdExport[] {
    return [...this.#exports.values()]
  }

  /** Connections now: in transmission, with their export and counts. */
  connections(): { id: number; export: string | undefined; inFlight: number; requests: number }[] {
    return [...this.#clients].map((c) => ({
      id: c.id,
      export: c.transmission?.export.name,
      inFlight: c.transmission?.inFlight ?? 0,
      requests: c.transmission?.counts.requests ?? 0,
    }))
  }

  /** Starts listening; a Unix socket is made mode 0600 (a stale socket file is replaced). */
  async listen(where: Listen): Promise<string> {
    const server = net.createServer({ allowHalfOpen: true }, (s) => this.#accept(s))
    if ('socket' in where) {
      await listenUnix(server, where.socket, 'another server is listening there')
      this.#sockets.push(where.socket)
      this.#servers.push(server)
      return where.socket
    }
    await listenOn(server, where.port, where.host)
    this.#servers.push(server)
    const a = server.address() as net.AddressInfo
    return `${a.address}:${a.port}`
  }

  /** The TCP port of the first TCP listener (when asked for port 0, the one given). */
  tcpPort(): number | undefined {
    for (const s of this.#servers) {
      const a = s.address()
      if (a && typeof a === 'object') return a.port
    }
    return undefined
  }

  #accept(socket: net.Socket): void {
    if (this.#stopping) {
      socket.destroy()
      return
    }
    socket.setNoDelay?.(true)
    const client: Client = { id: this.#nextId++, socket }
    this.#clients.add(client)
    this.#log('client connected', { client: client.id })
    socket.on('close', () => this.#clients.delete(client))
    socket.on('error', () => {})
    const timer = setTimeout(() => socket.destroy(), this.#handshakeMs)
    const host = {
      lookup: (name: string) => this.#exports.get(name),
      list: () => this.exports,
      tls: this.#tls,
      stopping: () => this.#stopping,
    }
    handshake(socket, host).then(
      (agreed) => {
        clearTimeout(timer)
        if (this.#stopping) {
          agreed.stream.destroy()
          return
        }
        this.#log('client started', { client: client.id, export: agreed.export.name, structured: agreed.structured, tls: agreed.tls })
        client.transmission = new Transmission(agreed.stream as Duplex, agreed.export, agreed.structured, agreed.rest, {
          onError: (command, offset, length, err) => this.#log('request failed', { client: client.id, export: agreed.export.name, command, offset, length, error: (err as Error)?.message ?? String(err) }),
          onClose: (reason) => {
            this.#clients.delete(client)
            this.#log('client disconnected', { client: client.id, export: agreed.export.name, ...(reason ? { reason } : {}) })
          },
        })
      },
      (err: unknown) => {
        clearTimeout(timer)
        this.#clients.delete(client)
        const reason = err instanceof HandshakeClosed ? err.message : String(err)
        this.#log('client disconnected', { client: client.id, reason })
        socket.end()
        setTimeout(() => socket.destroy(), 1000).unref()
      },
    )
  }

  /** Stops listening and ends every connection once its requests in flight are answered. */
  async close(): Promise<void> {
    this.#stopping = true
    // A server's close completes only once its connections have ended: end them meanwhile.
    const closed = Promise.all(this.#servers.map((s) => new Promise<void>((r) => s.close(() => r()))))
    const ends: Promise<void>[] = []
    for (const c of this.#clients) {
      if (c.transmission) ends.push(c.transmission.stop('the server is stopping'))
      else c.socket.destroy()
    }
    await Promise.all(ends)
    await closed
    for (const path of this.#sockets) await unlink(path).catch(() => {})
  }
}
