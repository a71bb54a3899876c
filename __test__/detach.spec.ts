import test from 'ava'
import { CachedDevice, readSuperblock, Registry } from '../ts/index'
import { code, fileBytes, formatSet, pattern } from './registry-helpers'

async function open() {
  const f = await formatSet(1)
  const reg = new Registry({ writeback: { running: false } })
  const set = await reg.registerCache(f.cache)
  const dev = await reg.register(f.backings[0])
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  dev.cacheMode = 'writeback'
  return { f, reg, set, dev, backing: f.backings[0] }
}

test('detach writes the dirty data back, frees the set of the device and serves it straight; it can attach again', async (t) => {
  const { f, reg, set, dev, backing } = await open()
  for (let i = 0; i < 32; i++) await dev.write(i * 65536, pattern(65536, i))
  t.is(dev.dirtySectors(), 32 * 128)
  t.is((await readSuperblock(backing)).sb.state, 'dirty')
  const progress: number[] = []
  // Reads and writes go on while it detaches.
  const busy = (async () => {
    for (let i = 0; i < 20; i++) t.true((await dev.read(i * 65536, 65536)).equals(pattern(65536, i)))
  })()
  await dev.detach({ onProgress: (d) => progress.push(d) })
  await busy
  t.is(progress.at(-1), 0)
  t.is(dev.set, null)
  t.false(set.devices.includes(dev))
  const sb = (await readSuperblock(backing)).sb
  t.is(sb.state, 'none')
  t.is(sb.setUuid, '00000000-0000-0000-0000-000000000000')
  for (let i = 0; i < 32; i++) t.true(fileBytes(backing, dev.dataOffset + i * 65536, 65536).equals(pattern(65536, i)), `chunk ${i} on the backing device`)
  // Served straight: a write lands on the backing device.
  await dev.write(0, pattern(4096, 77))
  await dev.flush()
  t.true(fileBytes(backing, dev.dataOffset, 4096).equals(pattern(4096, 77)))
  t.is(await code(dev.detach()), 'INVALID_ARGUMENT')
  // Attached again: a device the set does not know, nothing of it cached.
  await set.attach(dev)
  t.is(dev.set, set)
  t.is(dev.cachedSectors(), 0)
  t.is((await readSuperblock(backing)).sb.state, 'clean')
  t.true((await dev.read(0, 4096)).equals(pattern(4096, 77)))
  t.true((await dev.read(65536, 65536)).equals(pattern(65536, 1)))
  await reg.close()
  t.truthy(f)
})

test('an aborted detach leaves the device attached with its dirty data', async (t) => {
  const { reg, set, dev, backing } = await open()
  for (let i = 0; i < 8; i++) await dev.write(i * 65536, pattern(65536, i + 40))
  const ac = new AbortController()
  const p = dev.detach({ signal: ac.signal })
  ac.abort()
  t.is(await code(p), 'CLOSED')
  t.is(dev.set, set)
  t.true(set.devices.includes(dev))
  t.true((dev.dirtySectors() ?? 0) > 0, 'still dirty: writeback is paused again')
  t.is((await readSuperblock(backing)).sb.state, 'dirty')
  for (let i = 0; i < 8; i++) t.true((await dev.read(i * 65536, 65536)).equals(pattern(65536, i + 40)))
  await reg.close()
})
