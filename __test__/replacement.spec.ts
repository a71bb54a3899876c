// The replacement policies through the real engine: s3fifo and tinylfu keep dirty data
// whatever they evict, keep their queues across a restart (the hit ratio of a warm Zipf
// workload within a few points), count returning misses and admission bypasses; the policy
// is recorded in the superblock and shown by `ubcache show`.
import test from 'ava'
import { makeCache, readSuperblock, Registry, type Replacement } from '../ts/index'
import { cli } from './helpers'
import { pattern, sparse } from './registry-helpers'
import { blockChooser, seededRandom } from '../ts/bench/distributions'

const MiB = 1 << 20
const BLOCKS = 16384 // a 64 MiB working set of 4 KiB blocks

/** Zipf (θ 0.9) block numbers over BLOCKS blocks, as the bench harness draws them, from `seed`. */
const zipf = (seed: number): (() => number) => blockChooser({ kind: 'zipf', theta: 0.9 }, BLOCKS, seededRandom(seed))

for (const policy of ['s3fifo', 'tinylfu'] as Replacement[]) {
  test(`${policy}: dirty data stays, a restart keeps the hit ratio, the policy is recorded`, async (t) => {
    t.timeout(120_000)
    const cache = sparse('cache', 8 * MiB)
    await makeCache(cache, { bucketSize: '64k', replacement: policy })
    t.is((await readSuperblock(cache)).sb.replacement, policy)
    t.regex(cli('show', cache).stdout, new RegExp(`dev\\.cache\\.replacement\\s+${policy === 's3fifo' ? 3 : 4} \\[${policy}\\]`))
    const disk = sparse('disk', BLOCKS * 4096)
    const next = zipf(7)
    const opts = { bypass: { sequentialCutoff: 0 }, writeback: { running: false } }
    let reg = new Registry(opts)
    let set = await reg.registerCache(cache)
    t.is(set.cacheDeviceConfig().replacement, policy)
    let dev = await reg.attachExisting(disk, set, { cacheMode: 'writeback' })
    const uuid = dev.uuid
    // Dirty data the policy must never evict, whatever it reads after.
    const dirty = pattern(MiB, 3)
    await dev.write(60 * MiB, dirty)
    const buf = dev.allocBuffer(4096)
    const reads = async (n: number): Promise<number> => {
      const before = set.stats()
      for (let i = 0; i < n; i++) await dev.readInto(buf, next() * 4096)
      const after = set.stats()
      return (after.cacheHits - before.cacheHits) / (after.cacheHits - before.cacheHits + after.cacheMisses - before.cacheMisses)
    }
    await reads(30_000)
    const warm = await reads(10_000)
    const stats = set.stats()
    t.true(stats.returningMisses > 0, 'evicted data returned')
    if (policy === 'tinylfu') t.true(stats.admissionBypasses > 0, 'first misses kept out')
    else t.is(stats.admissionBypasses, 0)
    t.is(dev.dirtySectors(), MiB / 512)
    t.deepEqual(await dev.read(60 * MiB, MiB), dirty)
    await reg.close()

    reg = new Registry(opts)
    set = await reg.registerCache(cache)
    dev = await reg.attachExisting(disk, set, { uuid })
    const restarted = await reads(10_000)
    t.log(`${policy}: hit ratio ${(warm * 100).toFixed(1)}% before the restart, ${(restarted * 100).toFixed(1)}% after`)
    t.true(warm > 0.3, `warm: ${warm}`)
    t.true(restarted > warm - 0.05, `after a restart ${restarted}, before ${warm}`)
    t.deepEqual(await dev.read(60 * MiB, MiB), dirty)
    // Switching policy on a running set: recorded, and the cache keeps working.
    set.configureCacheDevice({ replacement: 'lru' })
    await reads(2_000)
    await reg.close()
    t.is((await readSuperblock(cache)).sb.replacement, 'lru')
  })
}
