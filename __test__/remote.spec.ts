// Remote backing devices: an NBD export (Debian's nbdkit) as the backing device of a cached
// device, formatted, registered and attached by its URI; the server killed and restarted
// under the cache.
import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { CachedDevice, CacheSet, makeBacking, makeCache, openDevice, Registry } from '../ts/index'
import { cli, tempDir } from './helpers'
import { haveTools } from './nbd-helpers'

const dir = tempDir('ubcache-remote-')
const have = haveTools('nbdkit')

interface Nbdkit {
  uri: string
  kill(): Promise<void>
  restart(): Promise<void>
}

/** nbdkit on a fresh Unix socket, killed when the test ends; `restart` brings it back on the same one. */
async function nbdkit(t: ExecutionContext, name: string, args: string[]): Promise<Nbdkit> {
  const sock = join(dir, `${name}.sock`)
  let child: ChildProcess | undefined
  const start = async (): Promise<void> => {
    rmSync(sock, { force: true })
    child = spawn('nbdkit', ['-f', '-U', sock, ...args], { stdio: 'ignore' })
    for (let i = 0; i < 500 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 10))
    if (!existsSync(sock)) throw new Error('nbdkit did not start')
  }
  const kill = async (): Promise<void> => {
    const c = child
    if (!c || c.exitCode !== null || c.signalCode !== null) return
    await new Promise<void>((r) => {
      c.once('exit', () => r())
      c.kill('SIGKILL')
    })
  }
  t.teardown(kill)
  await start()
  return { uri: `nbd+unix:///?socket=${sock}`, kill, restart: async () => (await kill(), await start()) }
}

test('the raw-device API reads and writes an NBD export by its URI', async (t) => {
  if (!have) return t.pass()
  const srv = await nbdkit(t, 'raw', ['memory', '32M'])
  const dev = await openDevice(srv.uri)
  t.is(dev.size, 32 << 20)
  const data = Buffer.alloc(65536, 0x5a)
  await dev.write(1 << 20, data)
  await dev.flush()
  t.deepEqual(Buffer.from(await dev.read(1 << 20, 65536)), data)
  await t.throwsAsync(() => dev.read(32 << 20, 4096), { code: 'OUT_OF_RANGE' })
  await dev.close()
  // Nobody there: one clear error naming the URI.
  const none = `nbd+unix:///?socket=${join(dir, 'nobody.sock')}`
  const err = await t.throwsAsync(() => openDevice(none))
  t.true(err?.message.startsWith(none), err?.message)
  const bad = await t.throwsAsync(() => openDevice('nbd+unix:///x'))
  t.regex(bad?.message ?? '', /socket= is missing/)
})

test('a cached device on an NBD export: made and shown by URI, hits served and writes absorbed while the server is down, writeback drains once it is back', async (t) => {
  if (!have) return t.pass()
  const img = join(dir, 'remote.img')
  writeFileSync(img, '')
  truncateSync(img, 64 << 20)
  const srv = await nbdkit(t, 'cached', ['file', img])
  const cache = join(dir, 'cache.img')
  writeFileSync(cache, '')
  truncateSync(cache, 64 << 20)
  const set = await makeCache(cache, { bucketSize: '64k' })
  // The CLI formats and shows a remote device as it does a file.
  const made = cli('make', '-B', srv.uri, '--cset-uuid', set.setUuid)
  t.is(made.status, 0, made.stderr)
  const shown = cli('show', srv.uri)
  t.regex(shown.stdout, /sb\.csum\s+\S+ \[match\]/)
  t.regex(shown.stdout, new RegExp(`cset\\.uuid\\s+${set.setUuid}`))
  const reg = new Registry({ remoteTimeoutMs: 800 })
  try {
    const s = await reg.register(cache)
    const dev = await reg.register(srv.uri)
    if (!(s instanceof CacheSet) || !(dev instanceof CachedDevice)) throw new Error('expected a set and a cached device')
    t.is(dev.set, s)
    dev.cacheMode = 'writeback'
    dev.configureWriteback({ running: false })
    const a = Buffer.alloc(65536, 0xa1)
    await dev.write(0, a)
    await dev.flush()
    // The server goes away: what the cache holds is still served, writes still absorbed.
    await srv.kill()
    t.deepEqual(Buffer.from(await dev.read(0, 65536)), a)
    // A miss waits for the server up to remoteTimeoutMs, then fails naming it.
    const t0 = performance.now()
    const miss = await t.throwsAsync(() => dev.read(8 << 20, 4096), { code: 'ETIMEDOUT' })
    t.true(miss?.message.includes(srv.uri), miss?.message)
    t.true(performance.now() - t0 >= 700, `${performance.now() - t0} ms`)
    const b = Buffer.alloc(65536, 0xb2)
    await dev.write(1 << 20, b)
    await dev.flush()
    t.true(dev.dirtySectors()! >= 256)
    // Back again: writeback writes everything dirty to it.
    await srv.restart()
    dev.configureWriteback({ running: true, percent: 0, delaySeconds: 0 })
    for (let i = 0; i < 600 && dev.dirtySectors()! > 0; i++) await new Promise((r) => setTimeout(r, 50))
    t.is(dev.dirtySectors(), 0)
    const off = dev.dataOffset
    const file = readFileSync(img)
    t.deepEqual(file.subarray(off, off + 65536), a)
    t.deepEqual(file.subarray(off + (1 << 20), off + (1 << 20) + 65536), b)
  } finally {
    await reg.close()
  }
})
