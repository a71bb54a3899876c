// Shared by the registry tests: devices in a directory on a real filesystem, patterns,
// error codes.
import { closeSync, mkdirSync, openSync, readSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { type BackingFormatOptions, type CacheFormatOptions, makeBacking, makeCache, type Superblock, UbcacheError } from '../ts/index'

// O_DIRECT needs a real filesystem; /var/tmp is one where /tmp may be tmpfs.
export const dir = join('/var/tmp', `ubcache-registry-${process.pid}-${Math.random().toString(36).slice(2, 8)}`)
mkdirSync(dir, { recursive: true })
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
let n = 0

/** A sparse file of `bytes` bytes with a fresh name. */
export function sparse(name: string, bytes: number): string {
  const p = join(dir, `${name}-${n++}`)
  writeFileSync(p, '')
  truncateSync(p, bytes)
  return p
}

/** `len` bytes of a pattern that differs with `seed`. */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len)
  for (let i = 0; i < len; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ Math.imul(seed + 7, 40503)) >>> 0, i)
  return b
}

/** A formatted cache device and backing devices recording its set. */
export interface Formatted {
  cache: string
  set: Superblock
  backings: string[]
  sbs: Superblock[]
}

/** A cache device (64 MiB, 64 KiB buckets) and `count` backing devices of `backingBytes` recording its set. */
export async function formatSet(count = 1, opts: { backingBytes?: number; cache?: CacheFormatOptions; backing?: BackingFormatOptions } = {}): Promise<Formatted> {
  const cache = sparse('cache', 64 << 20)
  const set = await makeCache(cache, { bucketSize: '64k', ...opts.cache })
  const backings: string[] = []
  const sbs: Superblock[] = []
  for (let i = 0; i < count; i++) {
    const b = sparse('backing', opts.backingBytes ?? 8 << 20)
    sbs.push(await makeBacking(b, { setUuid: set.setUuid, ...opts.backing }))
    backings.push(b)
  }
  return { cache, set, backings, sbs }
}

/** Reads `length` bytes at byte `at` of a file. */
export function fileBytes(path: string, at: number, length: number): Buffer {
  const fd = openSync(path, 'r')
  try {
    const b = Buffer.alloc(length)
    readSync(fd, b, 0, length, at)
    return b
  } finally {
    closeSync(fd)
  }
}

/** Writes `data` at byte `at` of a file, durably. */
export function writeFileBytes(path: string, at: number, data: Buffer): void {
  const fd = openSync(path, 'r+')
  try {
    writeSync(fd, data, 0, data.length, at)
  } finally {
    closeSync(fd)
  }
}

/** The code of the UbcacheError `p` rejects (or `fn` throws) with. */
export async function code(p: Promise<unknown> | (() => unknown)): Promise<string> {
  const e = await error(p)
  return e.code
}

/** The UbcacheError `p` rejects (or `fn` throws) with. */
export async function error(p: Promise<unknown> | (() => unknown)): Promise<UbcacheError> {
  let err: unknown
  try {
    await (typeof p === 'function' ? p() : p)
  } catch (e) {
    err = e
  }
  if (!(err instanceof UbcacheError)) throw new Error(`expected a UbcacheError, got ${String(err)}`)
  return err
}

/** A small deterministic random generator (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
