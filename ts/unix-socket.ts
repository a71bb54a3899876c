/**
 * Listening on Unix sockets as the daemon's two servers (NBD and management) do: mode 0600,
 * a stale socket file replaced, a live one refused (see {@link listenUnix}).
 * @internal
 * @module
 */
import { chmod, lstat, unlink } from 'node:fs/promises'
import net from 'node:net'
import { UbcacheError } from './errors'

/** Starts `server` listening on a path, or on a TCP port (and host). */
export function listenOn(server: net.Server, port: number | string, host?: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    const done = (): void => {
      server.off('error', reject)
      resolve()
    }
    if (typeof port === 'string') server.listen(port, done)
    else server.listen(port, host, done)
  })
}

/** Whether something accepts connections on the Unix socket `path`. */
function isLive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path)
    s.once('connect', () => {
      s.destroy()
      resolve(true)
    })
    s.once('error', () => resolve(false))
  })
}

/**
 * Starts `server` listening on the Unix socket `path`, mode 0600 (made so, not chmod-ed
 * after the fact). A socket file nothing listens on any more is replaced; one something
 * listens on is refused with `EADDRINUSE` and `${path}: ${inUse}`; any other file there with
 * `EEXIST`.
 */
export async function listenUnix(server: net.Server, path: string, inUse: string): Promise<void> {
  const st = await lstat(path).catch(() => undefined)
  if (st !== undefined) {
    if (!st.isSocket()) throw new UbcacheError('EEXIST', `${path} exists and is not a socket`)
    if (await isLive(path)) throw new UbcacheError('EADDRINUSE', `${path}: ${inUse}`)
    await unlink(path)
  }
  const old = process.umask(0o177)
  try {
    await listenOn(server, path)
  } finally {
    process.umask(old)
  }
  await chmod(path, 0o600)
}
