import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import test from 'ava'
import { makeBacking, makeCache, makeSet, readSuperblock, SuperblockError, UbcacheError } from '../ts/index'
import { mustHaveTools, sparseFile, tempDir } from './helpers'

const dir = tempDir()
const MiB = 1 << 20

test('makeCache writes a valid v3 superblock with the journal after first_bucket', async (t) => {
  const p = sparseFile(dir, 'c1.img', 256 * MiB)
  const written = await makeCache(p, { bucketSize: '512k', blockSize: 4096, label: 'fast', replacement: 'fifo', discard: true })
  const { sb } = await readSuperblock(p)
  t.deepEqual(sb, { ...written, flags: sb.flags })
  t.is(sb.version, 3)
  t.is(sb.bucketSize, 1024)
  t.is(sb.blockSize, 8)
  t.is(sb.nbuckets, 512)
  t.is(sb.firstBucket, 1)
  // run_cache_set's rule: nbuckets >> 7, clamped to 2..256.
  t.deepEqual(sb.journalBuckets, [1, 2, 3, 4])
  t.is(sb.replacement, 'fifo')
  t.true(sb.discard)
  t.false(sb.cacheSync)
  t.is(sb.label, 'fast')
})

test('small buckets: first bucket moves past the superblock, journal capped at 256', async (t) => {
  const p = sparseFile(dir, 'c2.img', 512 * MiB)
  const sb = await makeCache(p, { bucketSize: 4096, blockSize: 512 })
  t.is(sb.bucketSize, 8)
  t.is(sb.firstBucket, 3)
  t.is(sb.nbuckets, 131072)
  t.is(sb.journalBuckets.length, 256)
  t.is(sb.journalBuckets[0], 3)
  t.is(sb.journalBuckets[255], 258)
})

test('makeBacking: version 1 at the default offset, 4 otherwise', async (t) => {
  const a = sparseFile(dir, 'b1.img', 16 * MiB)
  const b = sparseFile(dir, 'b2.img', 16 * MiB)
  t.is((await makeBacking(a)).version, 1)
  const sb = await makeBacking(b, { dataOffset: 2048, cacheMode: 'writeback', label: 'slow' })
  t.is(sb.version, 4)
  const back = (await readSuperblock(b)).sb
  t.is(back.dataOffset, 2048)
  t.is(back.cacheMode, 'writeback')
  t.is(back.state, 'none')
})

test('makeSet gives every device the set UUID and numbers the caches', async (t) => {
  const c0 = sparseFile(dir, 's-c0.img', 128 * MiB)
  const c1 = sparseFile(dir, 's-c1.img', 128 * MiB)
  const b0 = sparseFile(dir, 's-b0.img', 64 * MiB)
  const setUuid = '11111111-2222-4333-8444-555555555555'
  await makeSet({ caches: [c0, c1], backings: [b0], setUuid, cacheMode: 'writeback' })
  const sbs = await Promise.all([c0, c1, b0].map(async (p) => (await readSuperblock(p)).sb))
  t.deepEqual(sbs.map((s) => s.setUuid), [setUuid, setUuid, setUuid])
  t.deepEqual(sbs.map((s) => [s.nrInSet, s.nrThisDev]), [[2, 0], [2, 1], [0, 0]])
  t.is(new Set(sbs.map((s) => s.uuid)).size, 3)
  t.is(sbs[2].cacheMode, 'writeback')
})

test('refuses to overwrite a bcache superblock unless wiped', async (t) => {
  const p = sparseFile(dir, 'w.img', 64 * MiB)
  const first = await makeCache(p)
  const err = await t.throwsAsync(makeBacking(p), { instanceOf: UbcacheError })
  t.is(err?.code, 'ALREADY_BCACHE')
  t.is((await readSuperblock(p)).sb.uuid, first.uuid)
  const second = await makeBacking(p, { wipe: true })
  t.is((await readSuperblock(p)).sb.uuid, second.uuid)
})

test('bad input is refused before anything is written', async (t) => {
  const p = sparseFile(dir, 'bad.img', 64 * MiB)
  const cases: [() => Promise<unknown>, RegExp][] = [
    [() => makeCache(p, { bucketSize: 3000 * 512 }), /not a power of two/],
    [() => makeCache(p, { bucketSize: 2048 }), /below the page size/],
    [() => makeCache(p, { bucketSize: 4096, blockSize: 8192 }), /larger than the page size|larger than bucket size/],
    [() => makeCache(p, { blockSize: 1000 }), /not a power of two/],
    [() => makeCache(p, { bucketSize: 'lots' }), /cannot parse size/],
    [() => makeCache(p, { label: 'x'.repeat(33) }), /33 bytes is longer than 32/],
    [() => makeCache(p, { setUuid: 'not-a-uuid' }), /not a UUID/],
    [() => makeCache(p, { setUuid: '00000000-0000-0000-0000-000000000000' }), /all-zero/],
    [() => makeCache(p, { bucketSize: '1M' }), /too small for a cache.*64 buckets/],
    [() => makeBacking(p, { dataOffset: 8 }), /at least 16/],
    [() => makeSet({ caches: [p], backings: [p] }), /given more than once/],
    [() => makeSet({}), /nothing to format/],
  ]
  for (const [fn, msg] of cases) {
    const err = await t.throwsAsync(fn())
    t.regex(err?.message ?? '', msg)
    t.is((err as UbcacheError).code, 'INVALID_ARGUMENT', String(msg))
  }
  t.true(readFileSync(p).subarray(4096, 8192).every((b) => b === 0))
})

test('missing path and directories get errors with codes', async (t) => {
  const e1 = await t.throwsAsync(makeCache(`${dir}/nope.img`), { instanceOf: UbcacheError })
  t.is(e1?.code, 'ENOENT')
  const e2 = await t.throwsAsync(makeCache(dir), { instanceOf: UbcacheError })
  t.is(e2?.code, 'NOT_A_DEVICE')
  const e3 = await t.throwsAsync(readSuperblock(dir), { instanceOf: UbcacheError })
  t.is(e3?.code, 'NOT_A_DEVICE')
})

test('readSuperblock names the device and the failed check', async (t) => {
  const p = sparseFile(dir, 'plain.img', 8 * MiB)
  const err = await t.throwsAsync(readSuperblock(p), { instanceOf: SuperblockError })
  t.is(err?.code, 'NOT_BCACHE')
  t.true(err?.message.startsWith(`${p}: Not a bcache superblock`))
  const tiny = sparseFile(dir, 'tiny.img', 100)
  t.is((await t.throwsAsync(readSuperblock(tiny), { instanceOf: SuperblockError }))?.code, 'NOT_BCACHE')
})

test('a loop block device: size from BLKGETSIZE64, block size from the device', async (t) => {
  const isRoot = process.getuid?.() === 0
  let loop = ''
  try {
    if (!isRoot) throw new Error('not root')
    const img = sparseFile(dir, 'loop.img', 96 * MiB)
    loop = execFileSync('losetup', ['--find', '--show', '--sector-size', '4096', img], { encoding: 'utf8' }).trim()
  } catch (err) {
    if (mustHaveTools) throw err
    t.log(`loop devices unavailable (${(err as Error).message}); skipped`)
    t.pass()
    return
  }
  try {
    const err = await t.throwsAsync(makeCache(loop, { blockSize: 512 }))
    t.regex(err?.message ?? '', /smaller than the device's logical block size \(4096\)/)
    const sb = await makeCache(loop, { bucketSize: '256k' })
    t.is(sb.blockSize, 8)
    t.is(sb.nbuckets, (96 * MiB) / (256 * 1024))
    const back = await readSuperblock(loop)
    t.is(back.sb.uuid, sb.uuid)
  } finally {
    execFileSync('losetup', ['-d', loop])
  }
})
