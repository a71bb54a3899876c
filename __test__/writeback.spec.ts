import test from 'ava'
import { CachedDevice, DEFAULT_WRITEBACK, readSuperblock, Registry } from '../ts/index'
import { error, fileBytes, formatSet, pattern } from './registry-helpers'

async function open(): Promise<{ reg: Registry; dev: CachedDevice; backing: string }> {
  const f = await formatSet(1)
  const reg = new Registry()
  await reg.register(f.cache)
  const dev = await reg.register(f.backings[0])
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  dev.cacheMode = 'writeback'
  return { reg, dev, backing: f.backings[0] }
}

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms
  while (!ok()) {
    if (Date.now() > end) throw new Error(`${what}: not after ${ms} ms`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

test('writeback at full speed: dirty data reaches the backing device, stays cached, and the backing superblock says clean at the close', async (t) => {
  const { reg, dev, backing } = await open()
  t.deepEqual(dev.writebackConfig(), { ...DEFAULT_WRITEBACK })
  dev.configureWriteback({ percent: 0, delaySeconds: 0 })
  t.is(dev.writebackConfig().percent, 0)
  const blocks = [0, 9, 3, 100, 101, 102, 50]
  for (const [i, b] of blocks.entries()) await dev.write(b * 4096, pattern(4096, 10 + i))
  await until('clean', () => dev.dirtySectors() === 0)
  for (const [i, b] of blocks.entries()) {
    t.true(fileBytes(backing, dev.dataOffset + b * 4096, 4096).equals(pattern(4096, 10 + i)), `block ${b} on the backing device`)
    t.true((await dev.read(b * 4096, 4096)).equals(pattern(4096, 10 + i)))
  }
  t.is(dev.set?.stats().writebackSectors, blocks.length * 8)
  const rate = dev.writebackRate()
  t.truthy(rate)
  t.true(rate?.fullSpeed)
  t.is(rate?.written, blocks.length * 8)
  await reg.close()
  t.is((await readSuperblock(backing)).sb.state, 'clean')
})

test('a paused writeback writes nothing back until resumed; tunables set before the set serves the device apply when it does', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry()
  const backing = f.backings[0]
  // The backing device first: served straight until its set arrives.
  const dev = await reg.register(backing)
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  t.is(dev.set, null)
  dev.configureWriteback({ running: false, percent: 0, delaySeconds: 0 })
  t.is(dev.writebackRate(), undefined)
  await reg.register(f.cache)
  await until('attached', () => dev.set !== null)
  dev.cacheMode = 'writeback'
  t.false(dev.writebackConfig().running)
  for (let b = 0; b < 8; b++) await dev.write(b * 4096, pattern(4096, b + 1))
  await new Promise((r) => setTimeout(r, 100))
  t.is(dev.dirtySectors(), 64)
  t.false(fileBytes(backing, dev.dataOffset, 4096).equals(pattern(4096, 1)))
  dev.configureWriteback({ running: true })
  await until('clean', () => dev.dirtySectors() === 0)
  t.true(fileBytes(backing, dev.dataOffset, 4096).equals(pattern(4096, 1)))
  await reg.close()
})

test('bad writeback tunables are refused naming the tunable, and change nothing', async (t) => {
  const { reg, dev } = await open()
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ percent: 41 }, /writeback_percent.*0\.\.40/],
    [{ percent: -1 }, /writeback_percent/],
    [{ percent: 1.5 }, /writeback_percent/],
    [{ rateMinimum: 0 }, /writeback_rate_minimum/],
    [{ rateUpdateSeconds: 61 }, /writeback_rate_update_seconds/],
    [{ ratePTermInverse: 0 }, /writeback_rate_p_term_inverse/],
    [{ running: 'yes' }, /writeback_running/],
    [{ turbo: true }, /unknown writeback tunable 'turbo'/],
    [{ percent: 5, delaySeconds: -1 }, /writeback_delay/],
    [{ considerFragment: 1 }, /writeback_consider_fragment/],
    // The fragment weights must rise low < mid < high (checked by the core, together).
    [{ rateFpTermLow: 10 }, /writeback_rate_fp_term_low/],
    [{ rateFpTermMid: 1000 }, /writeback_rate_fp_term_mid/],
    [{ rateFpTermHigh: 0 }, /writeback_rate_fp_term_high/],
  ]
  for (const [changes, msg] of cases) {
    const e = await error(() => dev.configureWriteback(changes))
    t.is(e.code, 'INVALID_ARGUMENT', JSON.stringify(changes))
    t.regex(e.message, msg)
  }
  t.deepEqual(dev.writebackConfig(), { ...DEFAULT_WRITEBACK })
  await reg.close()
  t.is((await error(() => dev.configureWriteback({ percent: 1 }))).code, 'CLOSED')
  t.is(dev.writebackRate(), undefined)
})

test("priorityStats and cacheAvailablePercent: bcache's view of the cache device's buckets", async (t) => {
  const f = await formatSet(1)
  const reg = new Registry({ writeback: { running: false } })
  await reg.register(f.cache)
  const dev = await reg.register(f.backings[0])
  if (!(dev instanceof CachedDevice) || dev.set === null) throw new Error('not attached')
  dev.cacheMode = 'writeback'
  for (let at = 0; at < 4 << 20; at += 65536) await dev.write(at, pattern(65536, at))
  const p = dev.set.priorityStats()
  t.truthy(p)
  t.is(p?.quantiles.length, 31)
  // 4 MiB dirty in 64 KiB buckets of a 64 MiB cache: about 6% of the buckets.
  t.true((p?.dirtyPercent ?? 0) >= 5 && (p?.dirtyPercent ?? 0) <= 8, JSON.stringify(p))
  t.true((p?.unusedPercent ?? 0) > 80)
  const s = dev.set.stats()
  t.is(s.cacheAvailablePercent, 100 - s.inUsePercent)
  await reg.close()
  t.is(dev.set?.priorityStats(), undefined)
})

test("set.triggerGc runs a GC pass (bcache's trigger_gc); its time figures are in the stats; gcAfterWriteback is checked", async (t) => {
  const { reg, dev } = await open()
  const set = dev.set
  if (!set) throw new Error('not attached')
  const runs = set.stats().gcRuns
  t.true(set.stats().gcLastMsAgo >= 0, 'opening ran a pass')
  set.triggerGc()
  await until('a GC pass', () => set.stats().gcRuns > runs)
  const s = set.stats()
  t.true(s.gcMaxDurationMs >= s.gcAverageDurationMs && s.gcAverageDurationMs >= 0)
  t.true(s.gcLastMsAgo >= 0 && s.gcLastMsAgo < 10_000)
  await reg.close()
  t.is((await error(() => set.triggerGc())).code, 'CLOSED')
  const bad = new Registry({ gcAfterWriteback: 'yes' as unknown as boolean })
  t.regex((await error(bad.registerCache(set.path))).message, /gcAfterWriteback/)
  await bad.close()
})

test('moving GC empties mostly empty buckets after a GC pass: dirty data keeps every byte and stays dirty; copyGcEnabled is checked', async (t) => {
  const { reg, dev } = await open()
  const set = dev.set
  if (!set) throw new Error('not attached')
  dev.configureWriteback({ running: false })
  // 32 buckets of 64 KiB written, then three blocks in four discarded: each a quarter full.
  for (let b = 0; b < 512; b++) await dev.write(b * 4096, pattern(4096, b + 1))
  for (let b = 0; b < 512; b++) if (b % 4 !== 0) await dev.discard(b * 4096, 4096)
  await dev.flush()
  const before = set.stats()
  set.triggerGc()
  await until('a moving GC pass', () => set.stats().movingGcPasses > before.movingGcPasses)
  const s = set.stats()
  t.is(s.movingGcSectors - before.movingGcSectors, 128 * 8, 'every live block of the 32 buckets moved')
  t.true(s.movingGcBuckets - before.movingGcBuckets >= 32 && s.movingGcLastMs >= 0)
  t.is(dev.dirtySectors(), 128 * 8)
  for (let b = 0; b < 512; b += 4) t.true((await dev.read(b * 4096, 4096)).equals(pattern(4096, b + 1)), `block ${b}`)
  await reg.close()
  const bad = new Registry({ copyGcEnabled: 1 as unknown as boolean })
  t.regex((await error(bad.registerCache(set.path))).message, /copyGcEnabled must be true or false/)
  await bad.close()
})

test('the cache device\'s replacement policy and discard change at once, persist in its superblock, and are checked', async (t) => {
  const { reg, dev } = await open()
  const set = dev.set
  if (!set) throw new Error('not attached')
  t.deepEqual(set.cacheDeviceConfig(), { replacement: 'lru', discard: false })
  set.configureCacheDevice({ replacement: 'fifo', discard: true })
  t.deepEqual(set.cacheDeviceConfig(), { replacement: 'fifo', discard: true })
  t.regex((await error(() => set.configureCacheDevice({ replacement: 'mru' as 'lru' }))).message, /cache_replacement_policy/)
  t.regex((await error(() => set.configureCacheDevice({ discard: 'no' as unknown as boolean }))).message, /discard must be true or false/)
  t.regex((await error(() => set.configureCacheDevice({ trim: true } as never))).message, /unknown cache device tunable 'trim'/)
  await reg.close()
  const sb = (await readSuperblock(set.path)).sb
  t.is(sb.replacement, 'fifo')
  t.true(sb.discard)
  const reg2 = new Registry()
  const set2 = await reg2.registerCache(set.path)
  t.deepEqual(set2.cacheDeviceConfig(), { replacement: 'fifo', discard: true })
  await reg2.close()
})

test('dev.dirtyExtents(): the ranges only the cache holds, merged, in order', async (t) => {
  const { reg, dev } = await open()
  dev.configureWriteback({ running: false })
  t.deepEqual(dev.dirtyExtents(), [])
  for (const b of [3, 4, 5, 10, 20, 21]) await dev.write(b * 4096, pattern(4096, b))
  t.deepEqual(dev.dirtyExtents(), [
    { offset: 3 * 4096, length: 3 * 4096 },
    { offset: 10 * 4096, length: 4096 },
    { offset: 20 * 4096, length: 2 * 4096 },
  ])
  t.deepEqual(dev.dirtyExtents(1), [{ offset: 3 * 4096, length: 3 * 4096 }])
  await reg.close()
  t.deepEqual(dev.dirtyExtents(), [])
})

test('promoteHits is checked, and counted in the stats', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry({ promoteHits: true })
  const set = await reg.registerCache(f.cache)
  t.is(set.stats().movingGcPromotions, 0)
  await reg.close()
  const bad = new Registry({ promoteHits: 'yes' as unknown as boolean })
  t.regex((await error(bad.registerCache(f.cache))).message, /promoteHits must be true or false/)
  await bad.close()
})
