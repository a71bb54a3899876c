// Existing devices cached as they are (no bcache superblock, data at offset 0): an ext4
// image attached without reformatting, changed through the cache by e2fsprogs' own writes,
// its dirty data kept across a restart in the set's UUID-table entry, detached (written
// back), and clean under fsck.ext4 -n; and the refusals of bad attaches.
import { execFileSync } from 'node:child_process'
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import test from 'ava'
import { makeBacking, readSuperblock, Registry } from '../ts/index'
import { have, mustHaveTools } from './helpers'
import { haveTools, nbdkit } from './nbd-helpers'
import { code, dir, error, formatSet, pattern, sparse } from './registry-helpers'

const MiB = 1 << 20

/** A 32 MiB ext4 image holding a few files, made by mkfs.ext4 -d. */
function ext4Image(): string {
  const src = join(dir, `tree-${Math.random().toString(36).slice(2, 8)}`)
  execFileSync('mkdir', ['-p', join(src, 'docs')])
  writeFileSync(join(src, 'hello.txt'), 'hello, existing device\n')
  writeFileSync(join(src, 'docs', 'big.bin'), pattern(3 * MiB, 11))
  const img = sparse('ext4', 32 * MiB)
  execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', src, img])
  return img
}

test('an ext4 image attached without reformatting: written through the cache, dirty across a restart, detached, fsck clean', async (t) => {
  if (!have('mkfs.ext4') || !have('debugfs')) {
    if (mustHaveTools) t.fail('e2fsprogs missing')
    return t.pass()
  }
  t.timeout(120_000)
  const img = ext4Image()
  const before = readFileSync(img)
  // What e2fsprogs makes of the filesystem, on a copy: the blocks that differ are what a
  // program writing through the cache would write.
  const changed = join(dir, 'changed.img')
  copyFileSync(img, changed)
  writeFileSync(join(dir, 'note.txt'), 'written through the cache\n')
  execFileSync('debugfs', ['-w', '-R', `write ${join(dir, 'note.txt')} note.txt`, changed], { stdio: 'ignore' })
  execFileSync('debugfs', ['-w', '-R', 'rm docs/big.bin', changed], { stdio: 'ignore' })
  const after = readFileSync(changed)
  const diffs: number[] = []
  for (let at = 0; at < after.length; at += 4096) if (!after.subarray(at, at + 4096).equals(before.subarray(at, at + 4096))) diffs.push(at)
  t.true(diffs.length > 0)

  const f = await formatSet(0)
  let reg = new Registry({ writeback: { running: false } })
  let set = await reg.registerCache(f.cache)
  let dev = await reg.attachExisting(img, set, { cacheMode: 'writeback', label: 'ext4 data' })
  t.false(dev.hasSuperblock)
  t.is(dev.dataOffset, 0)
  t.is(dev.size, 32 * MiB)
  t.is(dev.label, 'ext4 data')
  // It reads as the filesystem it is, from its first byte (the ext4 superblock at 1024).
  t.deepEqual(await dev.read(0, 8192), before.subarray(0, 8192))
  t.is(Buffer.from(await dev.read(0, 4096)).readUInt16LE(1024 + 56), 0xef53, 'ext4 magic')
  for (const at of diffs) await dev.write(at, after.subarray(at, at + 4096))
  await dev.flush()
  t.is(dev.state, 'dirty')
  t.true((dev.dirtySectors() ?? 0) >= diffs.length * 8)
  const uuid = dev.uuid
  t.deepEqual(
    set.existingDevices().map((e) => ({ ...e })),
    [{ uuid, label: 'ext4 data', size: 32 * MiB, mode: 'writeback', state: 'dirty' }],
  )
  await reg.close()
  // Writeback paused: the image itself is untouched, nothing but data is ever written to it.
  t.true(readFileSync(img).equals(before), 'the image holds its old data; the cache holds the new')
  t.is(await code(readSuperblock(img)), 'NOT_BCACHE')

  reg = new Registry({ writeback: { running: false } })
  set = await reg.registerCache(f.cache)
  t.like(set.existingDevices()[0], { uuid, state: 'dirty', mode: 'writeback' })
  // An attach without the UUID would make a new entry and miss the dirty data: refused.
  t.regex((await error(reg.attachExisting(img, set))).message, new RegExp(`not attached now that may be this one \\(UUID ${uuid}, label 'ext4 data'.*pass \\{ uuid: '${uuid}' \\}`))
  dev = await reg.attachExisting(img, set, { uuid })
  t.is(dev.cacheMode, 'writeback')
  t.true(Buffer.from(await dev.read(0, 32 * MiB)).equals(after), 'the filesystem as e2fsprogs changed it, through the cache')
  const progress: number[] = []
  await dev.detach({ onProgress: (n) => progress.push(n) })
  t.is(dev.set, null)
  t.deepEqual(set.existingDevices(), [], 'detached: forgotten')
  await reg.close()
  t.true(readFileSync(img).equals(after), 'written back')
  execFileSync('fsck.ext4', ['-n', '-f', img], { stdio: 'ignore' })
  t.is(execFileSync('debugfs', ['-R', 'cat note.txt', img], { stdio: ['ignore', 'pipe', 'ignore'] }).toString(), 'written through the cache\n')
  t.is(execFileSync('debugfs', ['-R', 'cat hello.txt', img], { stdio: ['ignore', 'pipe', 'ignore'] }).toString(), 'hello, existing device\n')
})

test('existing devices: hits after a restart, the mode and state in the UUID table, a second device beside it', async (t) => {
  const f = await formatSet(0)
  const a = sparse('disk-a', 4 * MiB)
  const b = sparse('disk-b', 8 * MiB)
  writeFileSync(a, pattern(4 * MiB, 1))
  let reg = new Registry({ bypass: { sequentialCutoff: 0 } })
  let set = await reg.registerCache(f.cache)
  const da = await reg.attachExisting(a, set.uuid)
  const db = await reg.attachExisting(b, set, { cacheMode: 'writearound' })
  t.not(da.uuid, db.uuid)
  t.is(da.cacheMode, 'writethrough')
  t.deepEqual(await da.read(0, 4 * MiB), pattern(4 * MiB, 1))
  await db.write(MiB, pattern(MiB, 2))
  da.cacheMode = 'none'
  const cached = da.cachedSectors()
  t.true((cached ?? 0) > 0)
  const ids = { a: da.uuid, b: db.uuid }
  await reg.close()
  t.deepEqual(readFileSync(b).subarray(MiB, 2 * MiB), pattern(MiB, 2), 'writearound went to the device')

  reg = new Registry({ bypass: { sequentialCutoff: 0 } })
  set = await reg.registerCache(f.cache)
  const table = new Map(set.existingDevices().map((e) => [e.uuid, e]))
  t.like(table.get(ids.a), { mode: 'none', state: 'clean', size: 4 * MiB })
  t.like(table.get(ids.b), { mode: 'writearound', state: 'clean', size: 8 * MiB })
  const again = await reg.attachExisting(a, set, { uuid: ids.a })
  t.is(again.cacheMode, 'none')
  t.is(again.cachedSectors(), cached, 'warm')
  const hits = set.stats().hitSectors
  t.deepEqual(await again.read(0, 4 * MiB), pattern(4 * MiB, 1))
  t.true(set.stats().hitSectors - hits >= (cached ?? 0), 'served from the cache')
  await reg.close()
})

test('existing devices: bad attaches get clear errors and leave nothing behind', async (t) => {
  const f = await formatSet(1)
  const disk = sparse('disk', 4 * MiB)
  const reg = new Registry()
  t.teardown(() => reg.close())
  // No such set registered.
  t.regex((await error(reg.attachExisting(disk, f.set.setUuid))).message, /is not registered here: register its cache device first/)
  const set = await reg.registerCache(f.cache)
  // A bcache backing device is registered, not cached as raw data.
  t.regex((await error(reg.attachExisting(f.backings[0], set))).message, /holds a bcache superblock: register it/)
  await reg.registerBacking(f.backings[0])
  const formatted = sparse('formatted', 4 * MiB)
  await makeBacking(formatted, { setUuid: set.uuid })
  t.is(await code(reg.attachExisting(formatted, set)), 'INVALID_ARGUMENT')
  // The cache device itself, a missing file, bad options.
  t.is(await code(reg.attachExisting(f.cache, set)), 'EBUSY')
  t.is(await code(reg.attachExisting(join(dir, 'missing'), set)), 'ENOENT')
  t.regex((await error(reg.attachExisting(disk, set, { mode: 'writeback' } as never))).message, /unknown option 'mode'/)
  t.regex((await error(reg.attachExisting(disk, set, { uuid: 'not-a-uuid' }))).message, /uuid must be/)
  t.regex((await error(reg.attachExisting(disk, set, { label: 'x'.repeat(33) }))).message, /at most 32 bytes/)
  t.regex((await error(reg.attachExisting(disk, set, { cacheMode: 'fast' as never }))).message, /cache mode 'fast'/)
  // None of that registered anything: the disk attaches now, once.
  const dev = await reg.attachExisting(disk, set)
  t.is(await code(reg.attachExisting(disk, set)), 'EBUSY')
  t.is(await code(reg.register(disk)), 'EBUSY')
  await dev.detach()
  t.deepEqual(set.existingDevices(), [])
  // A resized device is not the one the set recorded.
  const small = sparse('small', 4 * MiB)
  const uuid = (await reg.attachExisting(small, set, { label: 'small' })).uuid
  const reg2 = new Registry()
  await reg.close()
  const set2 = await reg2.registerCache(f.cache)
  writeFileSync(small, Buffer.alloc(6 * MiB))
  t.regex((await error(reg2.attachExisting(small, set2, { uuid }))).message, /6291456 bytes, but cache set .* recorded 4194304 bytes/)
  // The entry of a device with a superblock (not registered now) cannot be taken over.
  t.regex((await error(reg2.attachExisting(small, set2, { uuid: f.sbs[0].uuid }))).message, /names a device this set caches with a superblock/)
  await reg2.close()
})

test('an NBD export that holds data, cached as it is by its URI: written back to the export on detach', async (t) => {
  if (!haveTools('nbdkit')) return t.pass()
  const f = await formatSet(0)
  const disk = sparse('export', 16 * MiB)
  writeFileSync(disk, pattern(16 * MiB, 5))
  const server = await nbdkit(t, `${disk}.sock`, ['file', disk])
  const reg = new Registry({ writeback: { running: false } })
  t.teardown(() => reg.close())
  const set = await reg.registerCache(f.cache)
  const dev = await reg.attachExisting(server.uri, set, { cacheMode: 'writeback', label: 'remote' })
  t.is(dev.size, 16 * MiB)
  t.deepEqual(await dev.read(MiB, MiB), pattern(16 * MiB, 5).subarray(MiB, 2 * MiB))
  await dev.write(0, pattern(MiB, 6))
  t.is(dev.dirtySectors(), MiB / 512)
  t.deepEqual(readFileSync(disk).subarray(0, MiB), pattern(16 * MiB, 5).subarray(0, MiB), 'not written back yet')
  await dev.detach()
  t.deepEqual(readFileSync(disk).subarray(0, MiB), pattern(MiB, 6), 'written back on detach')
  t.is(await code(readSuperblock(server.uri)), 'NOT_BCACHE')
})
