import test from 'ava'
import { spawn } from 'node:child_process'
import { renameSync, symlinkSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import {
  CachedDevice,
  CacheSet,
  type CacheMode,
  makeBacking,
  makeCache,
  readSuperblock,
  Registry,
  SuperblockError,
  writeSuperblock,
} from '../ts/index'
import { have, mustHaveTools, run, superShowFields } from './helpers'
import { code, error, fileBytes, formatSet, pattern, sparse, writeFileBytes } from './registry-helpers'

const modes: CacheMode[] = ['writethrough', 'writeback', 'writearound', 'none']
/** Writeback paused: dirty data stays in the cache, for tests of what the cache holds. */
const paused = { writeback: { running: false } }

test('register a set then its backing device: attached by set UUID; read, write, flush, discard; close and register again, warm', async (t) => {
  const f = await formatSet(1)
  let reg = new Registry()
  const set = await reg.register(f.cache)
  t.true(set instanceof CacheSet)
  const dev = await reg.register(f.backings[0])
  t.true(dev instanceof CachedDevice)
  if (!(set instanceof CacheSet) || !(dev instanceof CachedDevice)) return
  t.is(set.uuid, f.set.setUuid)
  t.is(set.path, f.cache)
  t.is(set.blockSize, 4096)
  t.is(set.bucketSize, 65536)
  t.deepEqual(reg.sets, [set])
  t.deepEqual(reg.devices, [dev])
  t.deepEqual(set.devices, [dev])
  t.is(dev.set, set)
  t.is(dev.path, f.backings[0])
  t.is(dev.uuid, f.sbs[0].uuid)
  t.is(dev.size, (8 << 20) - 8192)
  t.is(dev.blockSize, 4096)
  t.is(dev.dataOffset, 8192)
  t.is(dev.cacheMode, 'writethrough')
  // bcache's first attach: the set UUID and state clean go into the backing superblock.
  t.is(dev.state, 'clean')
  t.is((await readSuperblock(f.backings[0])).sb.state, 'clean')
  t.true(set.openReport()?.fresh)

  const a = pattern(65536, 1)
  await dev.write(0, a)
  await dev.write(1 << 20, pattern(8192, 2), { fua: true })
  t.true((await dev.read(0, a.length)).equals(a))
  const into = dev.allocBuffer(8192)
  t.is(await dev.readInto(into, 1 << 20), 8192)
  t.true(into.equals(pattern(8192, 2)))
  const plainInto = new Uint8Array(4096)
  t.is(await dev.readInto(plainInto, 4096), 4096)
  t.true(Buffer.from(plainInto).equals(a.subarray(4096, 8192)))
  await dev.flush()
  await dev.discard(1 << 20, 8192)
  t.true(set.stats().cacheHits > 0)
  t.is(dev.dirtySectors(), 0)
  // Writethrough: the data is on the backing device at its data offset.
  t.true(fileBytes(f.backings[0], 8192, a.length).equals(a))
  const cached = dev.cachedSectors() ?? 0
  t.true(cached >= a.length / 512)
  await reg.close()
  t.true(reg.closed)
  t.is(set.stats().state, 'closed')
  t.is(dev.cachedSectors(), cached)

  reg = new Registry()
  const dev2 = await reg.registerBacking(f.backings[0])
  const set2 = await reg.registerCache(f.cache)
  t.is(dev2.set, set2)
  t.true(set2.openReport()?.cleanShutdown)
  t.is(dev2.cachedSectors(), cached)
  t.true((await dev2.read(0, a.length)).equals(a))
  t.true(set2.stats().hitSectors >= a.length / 512)
  t.is(set2.stats().missSectors, 0)
  await reg.close()
})

for (const mode of modes) {
  test(`${mode}: data written at the data offset before registration reads back; what the device holds after a clean stop reads back after re-registration`, async (t) => {
    const f = await formatSet(1, { backing: { cacheMode: mode } })
    const before = pattern(1 << 20, 10)
    writeFileBytes(f.backings[0], f.sbs[0].dataOffset * 512 + (2 << 20), before)
    let reg = new Registry(paused)
    await reg.registerCache(f.cache)
    let dev = await reg.registerBacking(f.backings[0])
    t.is(dev.cacheMode, mode)
    t.true((await dev.read(2 << 20, before.length)).equals(before))
    const written = pattern(256 << 10, 11)
    await dev.write(4 << 20, written)
    await dev.write(2 << 20, pattern(4096, 12))
    if (mode === 'writeback') {
      // Marked dirty before the first write that could leave dirty data.
      t.is(dev.state, 'dirty')
      t.is((await readSuperblock(f.backings[0])).sb.state, 'dirty')
    } else {
      t.is(dev.state, 'clean')
    }
    const dirty = dev.dirtySectors()
    await reg.close()
    const sb = (await readSuperblock(f.backings[0])).sb
    t.is(sb.state, (dirty ?? 0) > 0 ? 'dirty' : 'clean')
    t.is(sb.cacheMode, mode)
    t.is(sb.setUuid, f.set.setUuid)

    reg = new Registry(paused)
    await reg.registerCache(f.cache)
    dev = await reg.registerBacking(f.backings[0])
    t.is(dev.dirtySectors(), dirty)
    t.true((await dev.read(4 << 20, written.length)).equals(written))
    t.true((await dev.read(2 << 20, 4096)).equals(pattern(4096, 12)))
    t.true((await dev.read(2 << 20, before.length)).subarray(4096).equals(before.subarray(4096)))
    await reg.close()
  })
}

test('a backing device registered before its set is served straight, then attaches when the set comes; requests made meanwhile wait and go to the set', async (t) => {
  const f = await formatSet(2)
  const reg = new Registry()
  const d0 = await reg.registerBacking(f.backings[0])
  t.is(d0.set, null)
  t.is(d0.state, 'none')
  const a = pattern(65536, 20)
  await d0.write(0, a)
  // Straight to the backing device, at its data offset.
  t.true(fileBytes(f.backings[0], 8192, a.length).equals(a))
  // Requests in flight while the set registers.
  const inflight: Promise<unknown>[] = []
  for (let i = 0; i < 16; i++) inflight.push(d0.write(65536 + i * 4096, pattern(4096, 100 + i)))
  const registering = reg.registerCache(f.cache)
  for (let i = 0; i < 16; i++) inflight.push(d0.read(65536 + i * 4096, 4096))
  const set = await registering
  const results = await Promise.all(inflight)
  for (let i = 0; i < 16; i++) t.true((results[16 + i] as Buffer).equals(pattern(4096, 100 + i)), `read ${i}`)
  t.is(d0.set, set)
  t.is(d0.state, 'clean')
  const d1 = await reg.registerBacking(f.backings[1])
  t.is(d1.set, set)
  t.deepEqual(set.devices, [d0, d1])
  t.true((await d0.read(0, a.length)).equals(a))
  await reg.close()
})

test('a clean device written without its set: the set drops what it held of it when it attaches again (bcache\'s stale state)', async (t) => {
  const f = await formatSet(1)
  let reg = new Registry()
  await reg.registerCache(f.cache)
  let dev = await reg.registerBacking(f.backings[0])
  const old = pattern(131072, 30)
  await dev.write(0, old)
  t.true((dev.cachedSectors() ?? 0) >= 256)
  await reg.close()

  // Written while its set is not registered: marked stale first.
  reg = new Registry()
  dev = await reg.registerBacking(f.backings[0])
  t.is(dev.state, 'clean')
  const fresh = pattern(8192, 31)
  await dev.write(4096, fresh)
  t.is(dev.state, 'stale')
  t.is((await readSuperblock(f.backings[0])).sb.state, 'stale')
  await reg.registerCache(f.cache)
  t.is(dev.state, 'clean')
  const got = await dev.read(0, old.length)
  t.true(got.subarray(4096, 12288).equals(fresh), 'the write made without the set reads back, not the set\'s older copy')
  t.true(got.subarray(0, 4096).equals(old.subarray(0, 4096)))
  t.true(got.subarray(12288).equals(old.subarray(12288)))
  await reg.close()

  // Stale from another process's session: the ranges are unknown, the whole device is checked.
  reg = new Registry()
  dev = await reg.registerBacking(f.backings[0])
  await dev.write(65536, pattern(4096, 32))
  await reg.close()
  t.is((await readSuperblock(f.backings[0])).sb.state, 'stale')
  reg = new Registry()
  await reg.registerCache(f.cache)
  dev = await reg.registerBacking(f.backings[0])
  t.is(dev.state, 'clean')
  const again = await dev.read(0, old.length)
  t.true(again.subarray(65536, 69632).equals(pattern(4096, 32)))
  t.true(again.subarray(4096, 12288).equals(fresh))
  await reg.close()
})

test('a dirty device registered before its set is not served until the set comes: requests wait, then read the dirty data', async (t) => {
  const f = await formatSet(1, { backing: { cacheMode: 'writeback' } })
  let reg = new Registry(paused)
  await reg.registerCache(f.cache)
  let dev = await reg.registerBacking(f.backings[0])
  const a = pattern(16384, 40)
  await dev.write(0, a)
  t.is(dev.state, 'dirty')
  await reg.close()
  // The backing device does not have it: the cache holds the only copy.
  t.false(fileBytes(f.backings[0], 8192, a.length).equals(a))

  reg = new Registry(paused)
  dev = await reg.registerBacking(f.backings[0])
  t.is(dev.set, null)
  let settled = false
  const reading = dev.read(0, a.length).finally(() => (settled = true))
  const writing = dev.write(16384, pattern(4096, 41))
  await new Promise((r) => setTimeout(r, 50))
  t.false(settled, 'waits for the set')
  const set = await reg.registerCache(f.cache)
  t.true((await reading).equals(a))
  await writing
  t.is(dev.set, set)
  t.true((await dev.read(16384, 4096)).equals(pattern(4096, 41)))
  await reg.close()

  // Closed before its set came: what waited fails with CLOSED.
  reg = new Registry()
  dev = await reg.registerBacking(f.backings[0])
  const waiting = dev.read(0, 4096)
  await reg.close()
  t.is(await code(waiting), 'CLOSED')
})

test('cache mode switches take effect at once and are persisted in the backing superblock', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry({ journalDelayMs: 5 })
  await reg.registerCache(f.cache)
  const dev = await reg.registerBacking(f.backings[0])
  dev.cacheMode = 'writeback'
  t.is(dev.cacheMode, 'writeback')
  const w = dev.write(0, pattern(8192, 50))
  dev.cacheMode = 'writearound'
  const w2 = dev.write(65536, pattern(8192, 51))
  await Promise.all([w, w2])
  // The first went writeback (dirty, and marked so first), the second around the cache.
  t.is(dev.dirtySectors(), 16)
  t.is(dev.state, 'dirty')
  t.is(fileBytes(f.backings[0], 8192 + 65536, 8192).equals(pattern(8192, 51)), true)
  dev.cacheMode = 'none'
  dev.cacheMode = 'writethrough'
  t.is(await code(() => (dev.cacheMode = 'fast' as CacheMode)), 'INVALID_ARGUMENT')
  await reg.close()
  const sb = (await readSuperblock(f.backings[0])).sb
  t.is(sb.cacheMode, 'writethrough')
  t.is(sb.state, 'dirty')
  t.is(await code(() => (dev.cacheMode = 'none')), 'CLOSED')
})

test('a superblock write that fails is reported by the next call', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry()
  await reg.registerCache(f.cache)
  const dev = await reg.registerBacking(f.backings[0])
  const away = `${f.backings[0]}.away`
  // The engine keeps its descriptor; the superblock write opens the path, which is gone.
  renameSync(f.backings[0], away)
  dev.cacheMode = 'writeback'
  const e = await error(async () => {
    for (let i = 0; i < 100; i++) {
      await dev.read(0, 4096)
      await new Promise((r) => setTimeout(r, 5))
    }
  })
  t.is(e.code, 'ENOENT')
  t.regex(e.message, /\.away|backing/)
  // Reported once; the device goes on.
  renameSync(away, f.backings[0])
  t.is((await dev.read(0, 4096)).length, 4096)
  // A writeback write needs the superblock marked dirty first: it fails if that cannot be written.
  renameSync(f.backings[0], away)
  t.is(await code(dev.write(0, pattern(4096, 60))), 'ENOENT')
  renameSync(away, f.backings[0])
  await dev.write(0, pattern(4096, 61))
  t.is(dev.state, 'dirty')
  await reg.close()
})

test('set.attach writes the set UUID and state clean into a device formatted for no set; refuses one attached elsewhere', async (t) => {
  const c1 = sparse('c1', 64 << 20)
  const c2 = sparse('c2', 64 << 20)
  const s1 = await makeCache(c1, { bucketSize: '64k' })
  const s2 = await makeCache(c2, { bucketSize: '64k' })
  const b = sparse('b', 8 << 20)
  const zero = sparse('z', 8 << 20)
  const bsb = await makeBacking(b) // a set UUID of its own, state none
  // As the kernel leaves a detached device: no set UUID.
  await writeSuperblock(zero, { ...(await makeBacking(zero)), setUuid: '00000000-0000-0000-0000-000000000000' })
  const reg = new Registry()
  const set1 = await reg.registerCache(c1)
  const set2 = await reg.registerCache(c2)
  const dev = await reg.registerBacking(b)
  t.is(dev.set, null)
  const z = await reg.registerBacking(zero)
  t.is(z.set, null)
  await dev.write(0, pattern(4096, 70))
  await set1.attach(dev)
  t.is(dev.set, set1)
  await set1.attach(dev) // again: nothing to do
  const sb = (await readSuperblock(b)).sb
  t.is(sb.setUuid, s1.setUuid)
  t.is(sb.state, 'clean')
  t.true(sb.seq > bsb.seq)
  t.true((await dev.read(0, 4096)).equals(pattern(4096, 70)))
  await set2.attach(z)
  t.is((await readSuperblock(zero)).sb.setUuid, s2.setUuid)
  const busy = await error(set2.attach(dev))
  t.is(busy.code, 'EBUSY')
  t.regex(busy.message, new RegExp(`attached to cache set ${s1.setUuid}`))
  t.is(await code(set1.attach({} as CachedDevice)), 'INVALID_ARGUMENT')
  await reg.close()
})

test('set.attach refuses a device whose dirty data lives in another set', async (t) => {
  const f = await formatSet(1, { backing: { cacheMode: 'writeback' } })
  let reg = new Registry()
  await reg.registerCache(f.cache)
  let dev = await reg.registerBacking(f.backings[0])
  await dev.write(0, pattern(4096, 80))
  await reg.close()
  const other = sparse('other', 64 << 20)
  await makeCache(other, { bucketSize: '64k' })
  reg = new Registry()
  const set = await reg.registerCache(other)
  dev = await reg.registerBacking(f.backings[0])
  const e = await error(set.attach(dev))
  t.is(e.code, 'INVALID_ARGUMENT')
  t.regex(e.message, /dirty data in cache set/)
  await reg.close()
})

test('refusals leave the registry unharmed: already registered, not bcache, bad superblock, block size below the set\'s, missing', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry()
  const set = await reg.registerCache(f.cache)
  // Already registered: by the same path or another naming the same file.
  t.is(await code(reg.register(f.cache)), 'EBUSY')
  symlinkSync(f.cache, `${f.cache}.link`)
  t.is(await code(reg.register(`${f.cache}.link`)), 'EBUSY')
  const dev = await reg.registerBacking(f.backings[0])
  const again = await error(reg.register(f.backings[0]))
  t.is(again.code, 'EBUSY')
  t.regex(again.message, /already registered/)

  // No bcache superblock.
  const blank = sparse('blank', 8 << 20)
  const nb = await error(reg.register(blank))
  t.true(nb instanceof SuperblockError)
  t.is(nb.code, 'NOT_BCACHE')
  t.regex(nb.message, /blank/)
  // Fixed: the same path registers.
  await makeBacking(blank, { setUuid: f.set.setUuid })
  const fixed = await reg.registerBacking(blank)
  t.is(fixed.set, set)

  // A damaged superblock keeps its check's code.
  const bad = sparse('bad', 8 << 20)
  await makeBacking(bad)
  writeFileBytes(bad, 4096 + 72, Buffer.from('tampered'))
  t.is(await code(reg.register(bad)), 'BAD_CHECKSUM')

  // Block size below the set's.
  const small = sparse('small', 8 << 20)
  await makeBacking(small, { setUuid: f.set.setUuid, blockSize: 512 })
  const bs = await error(reg.register(small))
  t.is(bs.code, 'INVALID_ARGUMENT')
  t.regex(bs.message, /512 bytes.*4096 bytes/)
  t.is(await code(reg.register(join(f.cache, 'nope'))), 'ENOTDIR')
  t.is(await code(reg.register(`${f.cache}.missing`)), 'ENOENT')
  t.is(await code(reg.register('')), 'INVALID_ARGUMENT')
  t.is(await code(reg.registerCache(f.backings[0] + '')), 'EBUSY')
  const other = sparse('other-b', 8 << 20)
  await makeBacking(other)
  t.is(await code(reg.registerCache(other)), 'INVALID_ARGUMENT')
  // A copy of a registered device (same UUID).
  const copy = sparse('copy', 8 << 20)
  writeFileBytes(copy, 4096, fileBytes(f.backings[0], 4096, 4096))
  t.is(await code(reg.register(copy)), 'EBUSY')

  // The registry is unharmed.
  t.deepEqual(reg.devices, [dev, fixed])
  t.deepEqual(reg.sets, [set])
  await dev.write(0, pattern(4096, 90))
  t.true((await dev.read(0, 4096)).equals(pattern(4096, 90)))
  await reg.close()
  t.is(await code(reg.register(f.cache)), 'CLOSED')
})

test('a device open in another registry or process is refused with EBUSY, and registers once it is free', async (t) => {
  const f = await formatSet(1)
  const first = new Registry()
  await first.registerCache(f.cache)
  await first.registerBacking(f.backings[0])
  const second = new Registry()
  t.is(await code(second.register(f.cache)), 'EBUSY')
  t.is(await code(second.register(f.backings[0])), 'EBUSY')
  t.deepEqual(second.sets, [])
  await first.close()

  // Another process holds them.
  const index = JSON.stringify(resolve(__dirname, '..', 'dist', 'index.js'))
  const script = join(f.cache + '.child.js')
  writeFileSync(
    script,
    `const { Registry } = require(${index})
     const reg = new Registry()
     reg.register(${JSON.stringify(f.cache)}).then(() => reg.register(${JSON.stringify(f.backings[0])})).then(() => {
       console.log('ready'); setInterval(() => {}, 1000)
     }, (e) => { console.error(e); process.exit(2) })`,
  )
  const child = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'inherit'] })
  await new Promise<void>((res, rej) => {
    child.stdout.on('data', (d: Buffer) => d.toString().includes('ready') && res())
    child.on('exit', (c) => rej(new Error(`child exited ${c}`)))
  })
  t.is(await code(second.register(f.cache)), 'EBUSY')
  t.is(await code(second.register(f.backings[0])), 'EBUSY')
  child.kill('SIGKILL')
  await new Promise((r) => child.on('exit', r))
  const set = await second.registerCache(f.cache)
  t.true(set.openReport()?.cleanShutdown === false)
  await second.registerBacking(f.backings[0])
  await second.close()
})

test('I/O on a closed device, misaligned, out of range, bad arguments: codes, with the device in the message', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry()
  await reg.registerCache(f.cache)
  const dev = await reg.registerBacking(f.backings[0])
  const size = dev.size
  for (const p of [dev.read(512, 4096), dev.read(0, 1000), dev.write(4096 + 512, Buffer.alloc(4096)), dev.discard(0, 512), dev.readInto(Buffer.alloc(4096), 100)]) {
    const e = await error(p)
    t.is(e.code, 'MISALIGNED')
    t.true(e.message.includes(f.backings[0]))
  }
  for (const p of [dev.read(size, 4096), dev.write(size - 4096, Buffer.alloc(8192)), dev.discard(size, 4096), dev.readInto(Buffer.alloc(8192), size - 4096)]) {
    const e = await error(p)
    t.is(e.code, 'OUT_OF_RANGE')
    t.true(e.message.includes(f.backings[0]))
  }
  t.is(await code(dev.read(-4096, 4096)), 'INVALID_ARGUMENT')
  t.is(await code(dev.read(0, 0)), 'INVALID_ARGUMENT')
  t.is(await code(dev.read(0.5, 4096)), 'INVALID_ARGUMENT')
  t.is(await code(dev.write(0, 'text' as unknown as Buffer)), 'INVALID_ARGUMENT')
  t.is(await code(dev.readInto(null as unknown as Buffer, 0)), 'INVALID_ARGUMENT')
  t.is(await code(() => dev.allocBuffer(-1)), 'INVALID_ARGUMENT')
  const closing = reg.close()
  t.is(await code(dev.read(0, 4096)), 'CLOSED')
  await closing
  t.true(dev.closed)
  for (const p of [dev.read(0, 4096), dev.write(0, Buffer.alloc(4096)), dev.flush(), dev.discard(0, 4096), dev.readInto(Buffer.alloc(4096), 0)]) {
    const e = await error(p)
    t.is(e.code, 'CLOSED')
    t.true(e.message.includes(f.backings[0]))
  }
  t.is(await code(() => dev.allocBuffer(4096)), 'CLOSED')
  await reg.close()
})

test('bcache-super-show reads the backing state the registry writes', async (t) => {
  if (!have('bcache-super-show')) {
    if (mustHaveTools) t.fail('bcache-super-show is not installed')
    else t.pass('bcache-super-show is not installed')
    return
  }
  const f = await formatSet(1, { backing: { cacheMode: 'writeback' } })
  const reg = new Registry()
  await reg.registerCache(f.cache)
  const dev = await reg.registerBacking(f.backings[0])
  const show = () => superShowFields(run('bcache-super-show', [f.backings[0]]).stdout)
  t.is(show().get('dev.data.cache_state'), '1 [clean]')
  t.regex(show().get('sb.csum') ?? '', /\[match\]/)
  await dev.write(0, pattern(4096, 95))
  t.is(show().get('dev.data.cache_state'), '2 [dirty]')
  dev.cacheMode = 'writearound'
  await reg.close()
  t.is(show().get('dev.data.cache_mode'), '2 [writearound]')
  t.is(show().get('cset.uuid'), f.set.setUuid)
})

test("set.stop() (bcache's stop): its devices and volumes refuse requests, everything is durable, and they can be registered again, warm", async (t) => {
  const f = await formatSet(1)
  const reg = new Registry(paused)
  const set = await reg.registerCache(f.cache)
  const dev = await reg.registerBacking(f.backings[0])
  dev.cacheMode = 'writeback'
  const vol = await set.createVolume(1 << 20)
  await dev.write(0, pattern(4096, 5))
  await vol.write(0, pattern(4096, 6))
  const stopping = set.stop()
  t.is(set.stop(), stopping, 'idempotent')
  await stopping
  t.is(await code(dev.read(0, 4096)), 'CLOSED')
  t.is(await code(vol.read(0, 4096)), 'CLOSED')
  t.deepEqual(reg.sets, [])
  t.deepEqual(reg.devices, [])
  t.is((await readSuperblock(f.backings[0])).sb.state, 'dirty', 'the set still holds its dirty data')
  // Registered again (in the other order), the data is where it was.
  const dev2 = await reg.registerBacking(f.backings[0])
  const set2 = await reg.registerCache(f.cache)
  t.is(dev2.set, set2)
  t.true(set2.openReport()?.cleanShutdown, 'the stop was clean')
  t.true((await dev2.read(0, 4096)).equals(pattern(4096, 5)))
  t.true((await set2.volumes[0].read(0, 4096)).equals(pattern(4096, 6)))
  await reg.close()
})

test('an emulated slow backing device: misses wait out its latency, hits do not; the cache device is never slowed; bad models are refused', async (t) => {
  const f = await formatSet(1, { backing: { cacheMode: 'writeback' } })
  // Writeback paused: its backing writes would be slow too, and a read may wait for the
  // writeback of the extent it reads.
  const reg = new Registry({ latency: { fixedUs: 400_000 }, writeback: { running: false } })
  try {
    await reg.register(f.cache)
    const dev = await reg.register(f.backings[0])
    if (!(dev instanceof CachedDevice)) throw new Error('expected a cached device')
    const timed = async (f: () => Promise<unknown>): Promise<number> => {
      const t0 = performance.now()
      await f()
      return performance.now() - t0
    }
    const miss = await timed(() => dev.read(0, 4096))
    t.true(miss >= 400, `a miss took ${miss.toFixed(1)} ms`)
    // The first dirty data marks the backing superblock dirty, on the slow device: untimed.
    await dev.write(131072, pattern(4096, 4))
    for (let i = 0; i < 500 && dev.state !== 'dirty'; i++) await new Promise((r) => setTimeout(r, 10))
    t.is(dev.state, 'dirty')
    // Writeback writes land on the cache device only, and their hits are read from it.
    const write = await timed(() => dev.write(65536, pattern(4096, 3)))
    t.true(write < 400, `a writeback write took ${write.toFixed(1)} ms`)
    let data: Buffer | undefined
    const hit = await timed(async () => {
      data = await dev.read(65536, 4096)
    })
    t.true(hit < 400, `a hit took ${hit.toFixed(1)} ms`)
    t.deepEqual(data, pattern(4096, 3))
  } finally {
    await reg.close()
  }
  for (const [latency, re] of [
    [{ fixedUs: -1 }, /latency.fixedUs must be a number of microseconds/],
    [{ mibps: 0 }, /latency.mibps must be a positive number/],
    [{ fixed: 5 }, /latency: unknown key fixed/],
  ] as const) {
    const bad = new Registry({ latency: latency as never })
    t.regex((await error(() => bad.register(f.cache))).message, re)
    await bad.close()
  }
})
