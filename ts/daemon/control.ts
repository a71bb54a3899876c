/**
 * The management socket: JSON messages between the CLI verbs and a running daemon (see
 * {@link ControlServer} and {@link controlRequest}).
 *
 * A client connects, sends one request as a line of JSON (`{"verb":"list","args":{}}`) and
 * reads lines back: any number of `{"progress":…}` while the work goes on, then one
 * `{"ok":true,"result":…}` or `{"ok":false,"error":{"code":…,"message":…}}`, and the
 * connection ends.
 * @module
 */
import { mkdir, unlink } from 'node:fs/promises'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { asUbcacheError, UbcacheError } from '../errors'
import { listenUnix } from '../unix-socket'

/**
 * Where the daemon keeps its sockets: `$UBCACHE_RUNTIME_DIR`, else `/run/ubcache` for root,
 * `$XDG_RUNTIME_DIR/ubcache` or `$TMPDIR/ubcache-<uid>` for others.
 */
export function runtimeDir(): string {
  const env = process.env.UBCACHE_RUNTIME_DIR
  if (env) return env
  const uid = process.getuid?.() ?? 0
  if (uid === 0) return '/run/ubcache'
  if (process.env.XDG_RUNTIME_DIR) return join(process.env.XDG_RUNTIME_DIR, 'ubcache')
  return join(tmpdir(), `ubcache-${uid}`)
}

/** The NBD socket a daemon listens on unless told otherwise. */
export function defaultNbdSocket(): string {
  return join(runtimeDir(), 'nbd.sock')
}

/** The management socket a daemon listens on and the CLI verbs talk to unless told otherwise. */
export function defaultControlSocket(): string {
  return process.env.UBCACHE_CONTROL ?? join(runtimeDir(), 'control.sock')
}

/** Makes the directory of a socket (mode 0700) if missing. */
export async function socketDir(path: string): Promise<void> {
  const dir = join(path, '..')
  await mkdir(dir, { recursive: true, mode: 0o700 })
}

/** A request's handler: resolves to the result, may report progress on the way. */
export type ControlHandler = (args: Record<string, unknown>, progress: (p: unknown) => void, signal: AbortSignal) => Promise<unknown>

/** The daemon's end of the management socket. */
export class ControlServer {
  readonly #server: net.Server
  readonly #handlers: Record<string, ControlHandler>
  readonly #conns = new Set<net.Socket>()
  #path: string | undefined

  constructor(handlers: Record<string, ControlHandler>) {
    this.#handlers = handlers
    this.#server = net.createServer((s) => this.#accept(s))
  }

  /** Listens on the Unix socket `path` (mode 0600; a stale socket file is replaced). */
  async listen(path: string): Promise<void> {
    await socketDir(path)
    await listenUnix(this.#server, path, 'a daemon is already running there')
    this.#path = path
  }

  #accept(s: net.Socket): void {
    this.#conns.add(s)
    const abort = new AbortController()
    s.on('close', () => {
      this.#conns.delete(s)
      abort.abort()
    })
    s.on('error', () => {})
    let buf = ''
    let started = false
    s.setEncoding('utf8')
    s.on('data', (chunk: string) => {
      if (started) return
      buf += chunk
      if (buf.length > 1 << 20) {
        s.end(JSON.stringify({ ok: false, error: { code: 'INVALID_ARGUMENT', message: 'request over 1 MiB' } }) + '\n')
        return
      }
      const nl = buf.indexOf('\n')
      if (nl < 0) return
      started = true
      void this.#serve(s, buf.slice(0, nl), abort.signal)
    })
  }

  async #serve(s: net.Socket, line: string, signal: AbortSignal): Promise<void> {
    const send = (o: unknown): void => {
      if (!s.destroyed) s.write(JSON.stringify(o) + '\n')
    }
    try {
      let req: { verb?: unknown; args?: unknown }
      try {
        req = JSON.parse(line)
      } catch {
        throw new UbcacheError('INVALID_ARGUMENT', 'the request is not JSON')
      }
      const verb = typeof req?.verb === 'string' ? req.verb : undefined
      const handler = verb !== undefined && Object.hasOwn(this.#handlers, verb) ? this.#handlers[verb] : undefined
      if (handler === undefined) throw new UbcacheError('INVALID_ARGUMENT', `unknown verb ${JSON.stringify(req?.verb)} (known: ${Object.keys(this.#handlers).join(', ')})`)
      const args = typeof req.args === 'object' && req.args !== null ? (req.args as Record<string, unknown>) : {}
      const result = await handler(args, (p) => send({ progress: p }), signal)
      send({ ok: true, result: result ?? null })
    } catch (err) {
      const e = asUbcacheError(err)
      send({ ok: false, error: { code: e.code, message: e.message } })
    }
    s.end()
  }

  /** Stops listening and removes the socket file; connections still open are ended. */
  async close(): Promise<void> {
    await new Promise<void>((r) => this.#server.close(() => r()))
    for (const s of this.#conns) s.destroy()
    if (this.#path) await unlink(this.#path).catch(() => {})
  }
}

/**
 * Sends one request to the daemon at `socket`; resolves to its result.
 * @throws {UbcacheError} `NOT_RUNNING` when no daemon listens there; the daemon's error
 *   (with its code) when it refuses.
 */
export function controlRequest(socket: string, verb: string, args: Record<string, unknown> = {}, onProgress?: (p: unknown) => void): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const c = net.connect(socket)
    let buf = ''
    let done = false
    const finish = (fn: () => void): void => {
      if (done) return
      done = true
      c.destroy()
      fn()
    }
    c.setEncoding('utf8')
    c.once('connect', () => c.write(JSON.stringify({ verb, args }) + '\n'))
    c.on('data', (chunk: string) => {
      buf += chunk
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 1)
        let msg: { progress?: unknown; ok?: boolean; result?: unknown; error?: { code: string; message: string } }
        try {
          msg = JSON.parse(line)
        } catch {
          finish(() => reject(new UbcacheError('EPROTO', `the daemon at ${socket} sent a line that is not JSON`)))
          return
        }
        if ('progress' in msg) onProgress?.(msg.progress)
        else if (msg.ok) finish(() => resolve(msg.result))
        else finish(() => reject(new UbcacheError(msg.error?.code ?? 'EIO', msg.error?.message ?? 'the daemon refused the request')))
      }
    })
    c.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
        finish(() => reject(new UbcacheError('NOT_RUNNING', `no ubcache daemon is running (nothing listens on ${socket}; start one with ubcache serve)`)))
      } else finish(() => reject(new UbcacheError(err.code ?? 'EIO', `${socket}: ${err.message}`)))
    })
    c.on('close', () => finish(() => reject(new UbcacheError('EIO', `the daemon at ${socket} closed the connection before answering`))))
  })
}
