/**
 * Dropping what a cache set holds of a backing device that was written without it.
 *
 * bcache marks a backing device `stale` when it runs without its cache set, and when the
 * device attaches again in state `stale` or `none` it invalidates the device's entry in the
 * set's UUID table, so nothing cached from before is read again (`bch_cached_dev_attach`).
 * The engine has no such invalidation yet, so the registry does the equivalent through
 * requests: it writes the backing device's own data back over the ranges concerned in
 * `writearound` mode, which sends it to the backing device (where it already is) and drops
 * the cache's copy, journalled like any write. When the ranges written away from the set are
 * known (the device was registered in state `clean` and written since, in this process) only
 * they are rewritten; otherwise the whole device is, stopping early once the set holds
 * nothing of it. Dirty data in those ranges is overwritten in place with the backing
 * device's data, as the invalidation would have discarded it.
 * @internal
 * @module
 */
import { open } from 'node:fs/promises'
import { openDevice } from '../device'
import { isNbdUri } from '../super-io'
import type { CacheEngine } from '../cache-engine'
import { asUbcacheError } from '../errors'
import type { CacheMode } from '../superblock'

/** Bytes rewritten per request. */
const CHUNK = 1 << 20

/** What to purge: the cached device and where its data lies on the backing device. */
export interface PurgeTarget {
  engine: CacheEngine
  handle: number
  path: string
  /** Byte offset of the data on the backing device. */
  dataOffset: number
  /** Bytes of data, a whole number of blocks. */
  size: number
  /** The device's cache mode, restored afterwards. */
  mode: CacheMode
}

/**
 * Rewrites `ranges` (byte `[start, end)` pairs, block-aligned), or the whole device when
 * undefined, through the set in `writearound` mode, then flushes, so the set holds nothing
 * older than the backing device there. Resolves to the bytes rewritten.
 */
export async function purgeCached(t: PurgeTarget, ranges: [number, number][] | undefined): Promise<number> {
  const whole = ranges === undefined
  const todo = whole ? [[0, t.size] as [number, number]] : merge(ranges)
  let rewritten = 0
  t.engine.setCacheMode(t.handle, 'writearound')
  const source = await openSource(t.path)
  try {
    for (const [start, end] of todo) {
      for (let at = start; at < end; at += CHUNK) {
        // Over the whole device, stop once the set holds nothing of it (dirty data counts:
        // it must be overwritten wherever it is).
        if (whole && t.engine.cachedSectors(t.handle) === 0) break
        const len = Math.min(CHUNK, end - at)
        const buf = await source.read(t.dataOffset + at, len)
        await t.engine.write(t.handle, at, buf)
        rewritten += len
      }
    }
    await t.engine.flush(t.handle)
  } finally {
    await source.close()
    t.engine.setCacheMode(t.handle, t.mode)
  }
  return rewritten
}

/** Reads of the backing device beside the engine's: a file, or a remote device through its own client. */
async function openSource(path: string): Promise<{ read(at: number, len: number): Promise<Buffer>; close(): Promise<void> }> {
  if (isNbdUri(path)) {
    const dev = await openDevice(path, { readOnly: true, exclusive: false, direct: 'off' })
    return { read: async (at, len) => Buffer.from(await dev.read(at, len)), close: () => dev.close() }
  }
  const fh = await open(path, 'r').catch((err) => {
    throw asUbcacheError(err, path)
  })
  return {
    read: async (at, len) => {
      const buf = Buffer.alloc(len)
      const { bytesRead } = await fh.read(buf, 0, len, at)
      if (bytesRead !== len) throw asUbcacheError(new Error(`short read of ${bytesRead} bytes at ${at}`), path)
      return buf
    },
    close: () => fh.close(),
  }
}

/** Sorted, merged copies of byte ranges. */
export function merge(ranges: [number, number][]): [number, number][] {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0])
  const out: [number, number][] = []
  for (const [s, e] of sorted) {
    const last = out[out.length - 1]
    if (last && s <= last[1]) last[1] = Math.max(last[1], e)
    else out.push([s, e])
  }
  return out
}
