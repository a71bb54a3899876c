import test from 'ava'
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs'
import { CachedDevice, Registry } from '../ts/index'
import { error, formatSet, pattern } from './registry-helpers'

/** Flips a bit in the middle of where `data` lies in the file at `path` (it must be there once). */
function flipWhere(path: string, data: Buffer): void {
  const file = readFileSync(path)
  const at = file.indexOf(data)
  if (at < 0 || file.indexOf(data, at + 1) >= 0) throw new Error('the data is not in the cache file exactly once')
  const fd = openSync(path, 'r+')
  try {
    writeSync(fd, Buffer.from([file[at + 2000] ^ 0x10]), 0, 1, at + 2000)
  } finally {
    closeSync(fd)
  }
}

async function open(cache: string, backing: string): Promise<{ reg: Registry; dev: CachedDevice }> {
  const reg = new Registry({ dataCsum: true })
  await reg.register(cache)
  const dev = await reg.register(backing)
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  return { reg, dev }
}

test('dataCsum: a bit flipped in the cache is never read back; clean data comes from the backing device, dirty data fails with EIO', async (t) => {
  const f = await formatSet(1)
  let { reg, dev } = await open(f.cache, f.backings[0])
  dev.cacheMode = 'writethrough'
  const clean = pattern(4096, 71)
  await dev.write(0, clean)
  dev.cacheMode = 'writeback'
  dev.configureWriteback({ running: false })
  const dirty = pattern(4096, 93)
  await dev.write(1 << 20, dirty)
  await dev.flush()
  t.is(dev.set?.stats().csumErrors, 0)
  await reg.close()
  flipWhere(f.cache, clean)
  flipWhere(f.cache, dirty)
  ;({ reg, dev } = await open(f.cache, f.backings[0]))
  dev.configureWriteback({ running: false })
  t.true((await dev.read(0, 4096)).equals(clean), 'clean data from the backing device')
  const e = await error(dev.read(1 << 20, 4096))
  t.is(e.code, 'EIO')
  t.regex(e.message, /checksum/)
  t.true((dev.set?.stats().csumErrors ?? 0) >= 2)
  await reg.close()
  const bad = new Registry({ dataCsum: 'yes' as unknown as boolean })
  t.regex((await error(bad.registerCache(f.cache))).message, /dataCsum must be true or false/)
  await bad.close()
})
