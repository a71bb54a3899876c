import test from 'ava'
import { spawnSync } from 'node:child_process'
import { closeSync, mkdirSync, openSync, readSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { CacheEngine, type CacheMode, makeBacking, makeCache, type Superblock } from '../ts/index'
import { code } from './registry-helpers'

// O_DIRECT needs a real filesystem; /var/tmp is one where /tmp may be tmpfs.
const dir = join('/var/tmp', `ubcache-cache-engine-spec-${process.pid}`)
mkdirSync(dir, { recursive: true })
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
let n = 0

const CACHE_BYTES = 64 << 20
const BACKING_BYTES = 8 << 20

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len)
  for (let i = 0; i < len; i++) b[i] = (Math.imul(i + 1, 2654435761) >>> 13) ^ seed
  return b
}

function sparse(name: string, bytes: number): string {
  const p = join(dir, `${name}-${n++}`)
  writeFileSync(p, '')
  truncateSync(p, bytes)
  return p
}

interface Set {
  cache: string
  backing: string
  sb: Superblock
}

/** A cache device (1024 buckets of 64 KiB) and a backing device of 8 MiB, formatted. */
async function formatSet(): Promise<Set> {
  const cache = sparse('cache', CACHE_BYTES)
  const backing = sparse('backing', BACKING_BYTES)
  await makeCache(cache, { bucketSize: '64k' })
  const sb = await makeBacking(backing)
  return { cache, backing, sb }
}

/** Attach options for the set's backing device; writeback paused, so dirty data stays put (__test__/writeback.spec.ts runs it). */
function attachOptions(s: Set, mode: CacheMode) {
  return { path: s.backing, uuid: s.sb.uuid, dataOffset: s.sb.dataOffset * 512, mode, writeback: { running: false } }
}

/** What the backing file holds at `offset` of its data. */
function backingBytes(s: Set, offset: number, length: number): Buffer {
  const fd = openSync(s.backing, 'r')
  try {
    const b = Buffer.alloc(length)
    readSync(fd, b, 0, length, s.sb.dataOffset * 512 + offset)
    return b
  } finally {
    closeSync(fd)
  }
}


/** Waits (up to 10 s) for `cond` to hold. */
async function until(cond: () => boolean): Promise<void> {
  for (const end = Date.now() + 10_000; !cond(); ) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${String(cond)}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

const modes: CacheMode[] = ['writethrough', 'writeback', 'writearound', 'none']

for (const mode of modes) {
  test(`${mode}: writes, reads and flushes; after close and reopen the data reads back, warm where the mode caches`, async (t) => {
    const s = await formatSet()
    const a = pattern(64 << 10, 1)
    const b = pattern(4096, 2)
    let engine = await CacheEngine.open(s.cache)
    t.true(engine.hasCacheSet)
    t.true(engine.openReport()?.fresh)
    let h = await engine.attach(attachOptions(s, mode))
    // A fresh set may still be writing its superblock: requests wait for it.
    t.true(['starting', 'running'].includes(engine.state))
    t.is(engine.cacheMode(h), mode)
    t.like(engine.device(h), { handle: h, path: s.backing, size: BACKING_BYTES - 8192, cached: true, writable: true })

    await engine.write(h, 0, a)
    await engine.write(h, 1 << 20, b, { fua: true })
    t.true((await engine.read(h, 0, a.length)).equals(a))
    // Writearound put `a` on the backing device only: that read missed, and its fill
    // reaches the cache in the background.
    if (mode === 'writearound') await until(() => engine.cachedSectors(h) === a.length / 512)
    const into = engine.allocBuffer(4096)
    t.is(await engine.readInto(h, into, 1 << 20), 4096)
    t.true(into.equals(b))
    // Reads side by side, in one tick.
    const parts = await Promise.all([0, 1, 2, 3].map((i) => engine.read(h, i * 16384, 16384)))
    t.true(Buffer.concat(parts).equals(a))
    await engine.flush(h)
    if (mode === 'writeback') t.true((engine.dirtySectors(h) ?? 0) >= (a.length + b.length) / 512)
    else t.is(engine.dirtySectors(h), 0)
    const before = engine.stats()
    t.is(before?.state, 'running')
    t.true(Number.isFinite(before?.longestTickUs) && (before?.longestTickUs ?? -1) >= 0, 'longestTickUs is a finite number >= 0')
    t.true(
      Number.isInteger(before?.prioDistanceCheckpoints) && (before?.prioDistanceCheckpoints ?? 0) <= (before?.checkpoints ?? 0),
      'prioDistanceCheckpoints counts some of the checkpoints',
    )
    if (mode === 'none') t.is(before?.cacheHits, 0)
    else t.true((before?.cacheHits ?? 0) > 0, `${mode} hits what it wrote or read`)
    const cachedBefore = engine.cachedSectors(h)
    await engine.close()
    t.is(engine.state, 'closed')

    // The write-through modes put the data on the backing device itself.
    if (mode !== 'writeback') {
      t.true(backingBytes(s, 0, a.length).equals(a))
      t.true(backingBytes(s, 1 << 20, b.length).equals(b))
    }

    engine = await CacheEngine.open(s.cache)
    const report = engine.openReport()
    t.true(report?.cleanShutdown)
    t.false(report?.fresh)
    h = await engine.attach(attachOptions(s, mode))
    t.true((await engine.read(h, 0, a.length)).equals(a))
    t.true((await engine.read(h, 1 << 20, b.length)).equals(b))
    const after = engine.stats()
    if (mode === 'none') {
      t.is(after?.cacheHits, 0)
      t.true((after?.missSectors ?? 0) >= (a.length + b.length) / 512)
    } else {
      // Warm: the cache kept what it held across the clean close, `a` at least (cached by
      // its write, or by the fill of the read that missed it in writearound); whether `b`
      // is cached depends on the mode and on its fill.
      t.is(engine.cachedSectors(h), cachedBefore)
      t.true((after?.cacheHits ?? 0) >= 1)
      t.true((after?.hitSectors ?? 0) >= a.length / 512)
    }
    await engine.close()
  })
}

test('cache modes switch at run time; the engine reports its I/O counters', async (t) => {
  const s = await formatSet()
  const engine = await CacheEngine.open(s.cache, { engine: 'psync', journalDelayMs: 5 })
  t.is(engine.kind, 'psync')
  const h = await engine.attach({ ...attachOptions(s, 'writethrough'), uuid: Buffer.from(s.sb.uuid.replace(/-/g, ''), 'hex') })
  engine.setCacheMode(h, 'writeback')
  t.is(engine.cacheMode(h), 'writeback')
  await engine.write(h, 8192, pattern(8192, 3))
  t.is(engine.dirtySectors(h), 16)
  t.is(engine.cachedSectors(h), 16)
  t.is(await code(() => engine.setCacheMode(h, 'sideways' as CacheMode)), 'INVALID_ARGUMENT')
  await engine.discard(h, 8192, 8192)
  t.is(engine.dirtySectors(h), 0)
  t.true(engine.engineStats().wakeups > 0)
  t.regex(engine.describe() ?? '', /state Running/)
  await engine.close()
})

test('bad input: misaligned, out of range, unknown handles, closed', async (t) => {
  const s = await formatSet()
  const engine = await CacheEngine.open(s.cache)
  const h = await engine.attach(attachOptions(s, 'writeback'))
  const size = engine.device(h).size
  t.is(await code(engine.read(h, 512, 4096)), 'MISALIGNED')
  t.is(await code(engine.read(h, 0, 1000)), 'MISALIGNED')
  t.is(await code(engine.write(h, 4096 + 512, Buffer.alloc(4096))), 'MISALIGNED')
  t.is(await code(engine.read(h, size, 4096)), 'OUT_OF_RANGE')
  t.is(await code(engine.write(h, size - 4096, Buffer.alloc(8192))), 'OUT_OF_RANGE')
  t.is(await code(engine.discard(h, size, 4096)), 'OUT_OF_RANGE')
  t.is(await code(engine.read(h, -4096, 4096)), 'INVALID_ARGUMENT')
  t.is(await code(engine.read(h, 0, 0)), 'INVALID_ARGUMENT')
  t.is(await code(engine.read(h + 7, 0, 4096)), 'INVALID_ARGUMENT')
  t.is(await code(engine.flush(h + 7)), 'INVALID_ARGUMENT')
  t.is(await code(() => engine.device(h + 7)), 'INVALID_ARGUMENT')
  t.is(await code(() => engine.cacheMode(h + 7)), 'INVALID_ARGUMENT')
  t.is(await code(engine.attach({ ...attachOptions(s, 'writeback'), uuid: 'not-a-uuid' })), 'INVALID_ARGUMENT')
  t.is(await code(engine.attach({ ...attachOptions(s, 'writeback'), mode: 'fast' as CacheMode })), 'INVALID_ARGUMENT')
  t.is(await code(engine.attach({ ...attachOptions(s, 'writeback'), label: 'x'.repeat(33) })), 'INVALID_ARGUMENT')
  t.is(await code(engine.attach({ ...attachOptions(s, 'writeback'), path: join(dir, 'missing') })), 'ENOENT')
  // The same backing device again: it is open already (exclusively).
  t.is(await code(engine.attach(attachOptions(s, 'writeback'))), 'EBUSY')
  // A good request among bad ones still completes.
  const [bad, good] = await Promise.allSettled([engine.read(h, 512, 512), engine.read(h, 0, 4096)])
  t.is(bad.status, 'rejected')
  t.is(good.status, 'fulfilled')
  t.is(engine.inFlight, 0)

  const closing = engine.close()
  t.true(engine.closed)
  t.is(await code(engine.read(h, 0, 4096)), 'CLOSED')
  await closing
  t.is(await code(engine.write(h, 0, Buffer.alloc(4096))), 'CLOSED')
  t.is(await code(engine.attach(attachOptions(s, 'writeback'))), 'CLOSED')
  t.is(await code(() => engine.allocBuffer(4096)), 'CLOSED')
  t.is(await code(() => engine.cacheMode(h)), 'CLOSED')
  t.is(engine.stats(), undefined)
  await engine.close()
})

test('opening: a missing device, one with no bcache superblock, a backing device', async (t) => {
  const s = await formatSet()
  t.is(await code(CacheEngine.open(join(dir, 'nothing-here'))), 'ENOENT')
  const blank = sparse('blank', 8 << 20)
  t.is(await code(CacheEngine.open(blank)), 'MAGIC_MISMATCH')
  t.not(await code(CacheEngine.open(s.backing)), 'EBUSY')
  t.is(await code(CacheEngine.open(s.cache, { engine: 'sideways' as 'psync' })), 'INVALID_ARGUMENT')
  t.is(await code(CacheEngine.open(s.cache, { journalDelayMs: -1 })), 'INVALID_ARGUMENT')
  t.is(await code(CacheEngine.open(s.cache, { ioErrorLimit: -1 })), 'INVALID_ARGUMENT')
  t.is(await code(CacheEngine.open(s.cache, { ioErrorHalflife: 1.5 })), 'INVALID_ARGUMENT')
  t.is(await code(CacheEngine.open(s.cache, { ioErrorLimit: 2 ** 33 })), 'INVALID_ARGUMENT')
  const engine = await CacheEngine.open(s.cache, { ioErrorLimit: 100, ioErrorHalflife: 8800 })
  t.is(engine.stats()?.ioErrors, 0)
  await engine.close()
})

test('a cache set runs in one engine at a time: a second open is refused (exclusive open)', async (t) => {
  const s = await formatSet()
  const first = await CacheEngine.open(s.cache)
  t.is(await code(CacheEngine.open(s.cache)), 'EBUSY')
  const h = await first.attach(attachOptions(s, 'writethrough'))
  // Its backing device is taken too, even by an engine that serves it without a cache set.
  const plain = await CacheEngine.open()
  t.is(await code(plain.attachPlain(s.backing, s.sb.dataOffset * 512)), 'EBUSY')
  await plain.close()
  await first.write(h, 0, pattern(4096, 9))
  await first.close()
  // Closed: the devices are free again.
  const second = await CacheEngine.open(s.cache)
  await second.attach(attachOptions(s, 'writethrough'))
  await second.close()
})

test('an engine without a cache set serves backing devices straight', async (t) => {
  const s = await formatSet()
  const engine = await CacheEngine.open()
  t.false(engine.hasCacheSet)
  t.is(engine.stats(), undefined)
  t.is(engine.openReport(), undefined)
  t.is(engine.state, 'running')
  t.is(await code(engine.attach(attachOptions(s, 'writeback'))), 'INVALID_ARGUMENT')
  const h = await engine.attachPlain(s.backing, s.sb.dataOffset * 512)
  t.is(engine.cacheMode(h), undefined)
  t.false(engine.device(h).cached)
  const data = pattern(16384, 5)
  await engine.write(h, 65536, data, { fua: true })
  t.true((await engine.read(h, 65536, data.length)).equals(data))
  t.is(await code(engine.read(h, 100, 512)), 'MISALIGNED')
  t.is(await code(engine.read(h, engine.device(h).size, 4096)), 'OUT_OF_RANGE')
  t.is(await code(() => engine.setCacheMode(h, 'writeback')), 'INVALID_ARGUMENT')
  await engine.flush(h)
  engine.detach(h)
  t.deepEqual(engine.handles, [])
  t.is(await code(engine.read(h, 0, 4096)), 'INVALID_ARGUMENT')
  await engine.close()
  t.is(engine.state, 'closed')
  t.true(backingBytes(s, 65536, data.length).equals(data))
})

test('detach lets a device go; attaching it again finds its cached data', async (t) => {
  const s = await formatSet()
  const engine = await CacheEngine.open(s.cache)
  let h = await engine.attach(attachOptions(s, 'writeback'))
  const data = pattern(8192, 11)
  await engine.write(h, 0, data)
  engine.detach(h)
  t.is(await code(() => engine.detach(h)), 'INVALID_ARGUMENT')
  h = await engine.attach(attachOptions(s, 'writeback'))
  t.is(engine.dirtySectors(h), 16)
  t.true((await engine.read(h, 0, data.length)).equals(data))
  await engine.close()
})

// A child process: it imports the TypeScript sources as the tests do.
function runChild(script: string, nodeArgs: string[] = []): { status: number | null; stdout: string; stderr: string } {
  const file = join(dir, `child-${n++}.ts`)
  writeFileSync(file, script)
  const r = spawnSync(process.execPath, [...nodeArgs, '--import', 'tsx', file], { encoding: 'utf8', timeout: 60_000, cwd: resolve(__dirname, '..') })
  return { status: r.status, stdout: r.stdout, stderr: r.stderr }
}

test('an idle engine does not keep the process alive; work in flight does', async (t) => {
  const s = await formatSet()
  const index = JSON.stringify(resolve(__dirname, '..', 'ts', 'index'))
  const r = runChild(`
    import { CacheEngine } from ${index}
    async function main() {
      const engine = await CacheEngine.open(${JSON.stringify(s.cache)}, { journalDelayMs: 200 })
      const h = await engine.attach(${JSON.stringify(attachOptions(s, 'writeback'))})
      await engine.write(h, 0, Buffer.alloc(4096, 1))
      await engine.flush(h)
      // Not awaited: the process must stay until it is done (and the journal delay passed).
      engine.write(h, 4096, Buffer.alloc(4096, 2)).then(() => console.log('late write done'))
      console.log('main done')
    }
    main().catch((e) => { console.error(e); process.exit(2) })
  `)
  t.is(r.status, 0, r.stderr)
  t.is(r.stdout, 'main done\nlate write done\n')
  // Never closed: the next open recovers the set from its journal, which the journal
  // delay's timer wrote before the process went (the late write was never flushed).
  const engine = await CacheEngine.open(s.cache)
  t.false(engine.openReport()?.cleanShutdown)
  const h = await engine.attach(attachOptions(s, 'writeback'))
  t.true((await engine.read(h, 0, 4096)).equals(Buffer.alloc(4096, 1)))
  t.true((await engine.read(h, 4096, 4096)).equals(Buffer.alloc(4096, 2)))
  await engine.close()
})

test('an engine nobody refers to is collected once idle, releasing its devices; work in flight keeps it', async (t) => {
  const s = await formatSet()
  const index = JSON.stringify(resolve(__dirname, '..', 'ts', 'index'))
  const r = runChild(
    `
    import { CacheEngine } from ${index}
    const gc = (globalThis as { gc?: () => void }).gc as () => void
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
    async function main() {
      let done = 0
      // Writes left in flight, never flushed, the engine dropped at once.
      await (async () => {
        const engine = await CacheEngine.open(${JSON.stringify(s.cache)}, { journalDelayMs: 100 })
        const h = await engine.attach(${JSON.stringify(attachOptions(s, 'writeback'))})
        for (let i = 0; i < 32; i++) void engine.write(h, i * 4096, Buffer.alloc(4096, i + 1)).then(() => done++)
      })()
      for (let k = 0; k < 40; k++) {
        gc()
        await sleep(10)
      }
      // Collected once idle: the cache and backing devices can be opened again.
      const engine = await CacheEngine.open(${JSON.stringify(s.cache)})
      const h = await engine.attach(${JSON.stringify(attachOptions(s, 'writeback'))})
      let ok = 0
      for (let i = 0; i < 32; i++) if ((await engine.read(h, i * 4096, 4096)).equals(Buffer.alloc(4096, i + 1))) ok++
      await engine.close()
      console.log(done, ok)
    }
    main().catch((e) => { console.error(e); process.exit(2) })
  `,
    ['--expose-gc'],
  )
  t.is(r.status, 0, r.stderr)
  t.is(r.stdout, '32 32\n')
})

test('detachFromSet writes dirty data back, drops the cached data and frees the slot, with progress; an aborted one keeps everything', async (t) => {
  const s = await formatSet()
  const engine = await CacheEngine.open(s.cache)
  const h = await engine.attach(attachOptions(s, 'writeback'))
  for (let i = 0; i < 16; i++) await engine.write(h, i * 65536, pattern(65536, i))
  t.is(engine.dirtySectors(h), 16 * 128)
  // Aborted at once: still attached, still dirty, still cached.
  const ac = new AbortController()
  const aborted = engine.detachFromSet(h, { signal: ac.signal })
  ac.abort()
  t.is(await code(aborted), 'CLOSED')
  t.true((engine.cachedSectors(h) ?? 0) >= 16 * 128)
  const seen: number[] = []
  await engine.detachFromSet(h, { onProgress: (d) => seen.push(d), progressMs: 1 })
  t.is(seen.at(-1), 0)
  t.is(engine.dirtySectors(h), 0)
  t.is(engine.cachedSectors(h), 0)
  for (let i = 0; i < 16; i++) t.true(backingBytes(s, i * 65536, 65536).equals(pattern(65536, i)), `chunk ${i} on the backing device`)
  // Passed straight through now.
  await engine.write(h, 0, pattern(4096, 99))
  t.true((await engine.read(h, 0, 4096)).equals(pattern(4096, 99)))
  t.is(engine.cachedSectors(h), 0)
  t.is(await code(engine.detachFromSet(h, { progressMs: 0 })), 'INVALID_ARGUMENT')
  engine.detach(h)
  await engine.close()
  // The set has forgotten the device: attached again, nothing of it is cached.
  const again = await CacheEngine.open(s.cache)
  const h2 = await again.attach(attachOptions(s, 'writeback'))
  t.is(again.cachedSectors(h2), 0)
  t.true((await again.read(h2, 65536, 65536)).equals(pattern(65536, 1)))
  await again.close()
})
