import test from 'ava'
import { CachedDevice, DEFAULT_BYPASS, DEFAULT_CONGESTION, Registry } from '../ts/index'
import { error, formatSet, pattern } from './registry-helpers'

async function open(options: ConstructorParameters<typeof Registry>[0] = {}) {
  const f = await formatSet(1, { backingBytes: 48 << 20 })
  const reg = new Registry(options)
  const set = await reg.registerCache(f.cache)
  const dev = await reg.register(f.backings[0])
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  return { reg, set, dev, cache: f.cache }
}

test("a sequential stream past bcache's 4 MiB cutoff bypasses the cache; random reads between its requests do not", async (t) => {
  const { reg, set, dev } = await open()
  t.deepEqual(dev.bypassConfig(), { ...DEFAULT_BYPASS })
  const mib = 1 << 20
  // 8 MiB in 256 KiB reads, a 4 KiB read elsewhere after each: the stream reaches the
  // cutoff with its 16th read; the random reads fill.
  for (let i = 0; i < 32; i++) {
    await dev.read(i * 256 * 1024, 256 * 1024)
    await dev.read(16 * mib + ((i * 7919) % 1000) * 4096, 4096)
  }
  const s = set.stats()
  t.is(s.sequentialBypasses, 17)
  t.is(s.cacheBypassMisses, 17)
  t.is(s.cacheMisses, 15 + 32)
  t.is(s.bypassedSectors, 17 * 512)
  // The device's accounting (bcache's stats windows) says the same.
  const a = dev.accounting()
  t.like(a?.total, { cacheBypassMisses: 17, cacheMisses: 15 + 32, bypassedSectors: 17 * 512, cacheHits: 0, cacheHitRatio: 0 })
  t.deepEqual(a?.fiveMinute, a?.total)
  t.is(set.accounting()?.day.cacheBypassMisses, 17)
  // What was not bypassed is cached (fills land shortly after the reads).
  await new Promise((r) => setTimeout(r, 100))
  t.true((dev.cachedSectors() ?? 0) <= 15 * 512 + 32 * 8, `${dev.cachedSectors()}`)
  // The first 3.75 MiB read again: a stream of its own, not bypassed, served from the
  // cache (as far as the fills found space: they never wait for it).
  await dev.read(0, 15 * 256 * 1024)
  const s2 = set.stats()
  t.is(s2.sequentialBypasses, 17)
  t.true(s2.hitSectors > s.hitSectors, `${s2.hitSectors}`)
  await reg.close()
})

test('bypass tunables: set per device or for the whole registry, read and write cutoffs of their own, bad values refused by name', async (t) => {
  const { reg, set, dev } = await open({ bypass: { sequentialCutoff: 0 } })
  t.is(dev.bypassConfig().sequentialCutoff, 0)
  const mib = 1 << 20
  for (let i = 0; i < 8; i++) await dev.read(i * mib, mib)
  t.is(set.stats().sequentialBypasses, 0, 'cutoff 0: nothing bypasses')
  dev.configureBypass({ sequentialCutoffWrite: 128 * 1024 })
  t.deepEqual(dev.bypassConfig(), { sequentialCutoff: 0, sequentialCutoffRead: null, sequentialCutoffWrite: 128 * 1024, sequentialMerge: true, readahead: 0 })
  for (let i = 0; i < 4; i++) await dev.write(32 * mib + i * 65536, pattern(65536, i + 1))
  t.is(set.stats().sequentialBypasses, 3, 'the 2nd, 3rd and 4th 64 KiB writes')
  for (let i = 0; i < 4; i++) t.true((await dev.read(32 * mib + i * 65536, 65536)).equals(pattern(65536, i + 1)), `write ${i} reads back`)
  dev.configureBypass({ sequentialCutoffWrite: null })
  t.is(dev.bypassConfig().sequentialCutoffWrite, null)
  t.is((await error(() => dev.configureBypass({ sequentialCutoff: -1 }))).code, 'INVALID_ARGUMENT')
  t.regex((await error(() => dev.configureBypass({ sequentialCutoff: 2 ** 32 }))).message, /sequential_cutoff \(sequentialCutoff\)/)
  t.regex((await error(() => dev.configureBypass({ sequentialCutoff: null as unknown as number }))).message, /sequential_cutoff/)
  t.regex((await error(() => dev.configureBypass({ sequentialCutoffRead: 1.5 }))).message, /sequential_cutoff_read/)
  t.regex((await error(() => dev.configureBypass({ cutoff: 1 } as never))).message, /unknown bypass tunable 'cutoff'/)
  t.regex((await error(() => new Registry({ bypass: { sequentialCutoff: 'big' as unknown as number } }))).message, /sequential_cutoff/)
  t.is(dev.bypassConfig().sequentialCutoff, 0, 'a refused change changes nothing')

  t.deepEqual(set.congestionConfig(), { ...DEFAULT_CONGESTION })
  set.configureCongestion({ writeThresholdUs: 20000 })
  t.deepEqual(set.congestionConfig(), { readThresholdUs: 0, writeThresholdUs: 20000 })
  t.regex((await error(() => set.configureCongestion({ readThresholdUs: -5 }))).message, /congested_read_threshold_us/)
  t.regex((await error(() => set.configureCongestion({ latency: 1 } as never))).message, /unknown congestion tunable/)
  await reg.close()
  t.is((await error(() => set.congestionConfig())).code, 'CLOSED')
})

test('the congestion thresholds given at registration reach the set', async (t) => {
  const { reg, set, cache } = await open({ congestedReadThresholdUs: 500, congestedWriteThresholdUs: 0 })
  t.deepEqual(set.congestionConfig(), { readThresholdUs: 500, writeThresholdUs: 0 })
  await reg.close()
  const bad = new Registry({ congestedReadThresholdUs: -1 })
  t.regex((await error(bad.registerCache(cache))).message, /congestedReadThresholdUs/)
  await bad.close()
})

test('readahead (bcache\'s, off by default): a miss reads on into the cache; counted in the accounting windows; checked', async (t) => {
  const f = await formatSet(1)
  const reg = new Registry()
  await reg.register(f.cache)
  const dev = await reg.register(f.backings[0])
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  t.is(dev.bypassConfig().readahead, 0)
  dev.configureBypass({ readahead: 64 << 10 })
  t.is(dev.bypassConfig().readahead, 64 << 10)
  await dev.read(0, 4096)
  const s = dev.set?.stats()
  t.is(s?.readaheadSectors, 128)
  t.is(dev.accounting()?.total.cacheReadaheads, 1)
  t.regex(String((await error(() => dev.configureBypass({ readahead: -1 }))).message), /readahead/)
  t.regex(String((await error(() => dev.configureWriteback({ stripeSize: 1000 }))).message), /stripe_size/)
  t.regex(String((await error(() => dev.configureWriteback({ partialStripesExpensive: 1 as unknown as boolean }))).message), /partial_stripes_expensive/)
  dev.configureWriteback({ stripeSize: 1 << 20, partialStripesExpensive: true })
  t.is(dev.writebackConfig().stripeSize, 1 << 20)
  await reg.close()
})

test("clear_stats (bcache's): dev.clearStats() and set.clearStats() empty the accounting windows; sequentialMerge is a bypass tunable", async (t) => {
  const { reg, set, dev } = await open()
  await dev.write(0, pattern(4096, 1))
  await dev.read(0, 4096)
  t.true((dev.accounting()?.total.cacheHits ?? 0) > 0)
  dev.clearStats()
  t.is(dev.accounting()?.total.cacheHits, 0)
  t.true((set.accounting()?.total.cacheHits ?? 0) > 0, "the set's windows are its own")
  await dev.read(0, 4096)
  set.clearStats()
  t.is(set.accounting()?.total.cacheHits, 0)
  t.is(dev.accounting()?.total.cacheHits, 0)
  t.true(dev.bypassConfig().sequentialMerge)
  dev.configureBypass({ sequentialMerge: false })
  t.false(dev.bypassConfig().sequentialMerge)
  t.regex(String((await error(() => dev.configureBypass({ sequentialMerge: 0 as unknown as boolean }))).message), /sequential_merge/)
  await reg.close()
  t.is((await error(() => dev.clearStats())).code, 'CLOSED')
})
