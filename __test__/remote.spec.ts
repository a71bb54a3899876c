// Remote backing devices: an NBD export (Debian's nbdkit) as the backing device of a cached
// device, formatted, registered and attached by its URI; the server killed and restarted
// under the cache.
import { randomBytes } from 'node:crypto'
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import test from 'ava'
import { CachedDevice, CacheSet, makeBacking, makeCache, openDevice, Registry } from '../ts/index'
import { cli, tempDir } from './helpers'
import { haveTools, makeDevices, nbdkit, serve } from './nbd-helpers'

const dir = tempDir('ubcache-remote-')
const have = haveTools('nbdkit')

test('the raw-device API reads and writes an NBD export by its URI', async (t) => {
  if (!have) return t.pass()
  const srv = await nbdkit(t, join(dir, 'raw.sock'), ['memory', '32M'])
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
  // Connections to a multi-conn server: 1 to 16.
  for (const n of [0, 17, 1.5]) {
    await t.throwsAsync(() => openDevice(srv.uri, { remoteConnections: n }), { code: 'INVALID_ARGUMENT', message: /remoteConnections must be a whole number from 1 to 16/ })
    t.throws(() => new Registry({ remoteConnections: n }), { code: 'INVALID_ARGUMENT' })
  }
  const two = await openDevice(srv.uri, { remoteConnections: 2 })
  t.deepEqual(Buffer.from(await two.read(1 << 20, 65536)), data)
  await two.close()
})

test('a cached device on an NBD export: made and shown by URI, hits served and writes absorbed while the server is down, writeback drains once it is back', async (t) => {
  if (!have) return t.pass()
  const img = join(dir, 'remote.img')
  writeFileSync(img, '')
  truncateSync(img, 64 << 20)
  const srv = await nbdkit(t, join(dir, 'cached.sock'), ['file', img])
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

test('errors from the remote: a failed read reaches the caller, failed writeback keeps the data dirty until the remote takes it', async (t) => {
  if (!have) return t.pass()
  const img = join(dir, 'eio.img')
  writeFileSync(img, '')
  truncateSync(img, 32 << 20)
  const inject = join(dir, 'inject-eio')
  const srv = await nbdkit(t, join(dir, 'eio.sock'), ['--filter=error', 'file', img, 'error=EIO', 'error-rate=100%', `error-file=${inject}`])
  const cache = join(dir, 'eio-cache.img')
  writeFileSync(cache, '')
  truncateSync(cache, 16 << 20)
  const set = await makeCache(cache, { bucketSize: '64k' })
  await makeBacking(srv.uri, { setUuid: set.setUuid, cacheMode: 'writeback' })
  const reg = new Registry({ writeback: { running: false } })
  try {
    await reg.register(cache)
    const dev = await reg.register(srv.uri)
    if (!(dev instanceof CachedDevice)) throw new Error('expected a cached device')
    const data = Buffer.alloc(65536, 0x3c)
    await dev.write(0, data)
    await dev.flush()
    writeFileSync(inject, '')
    // A miss fails with the server's EIO; a hit does not notice.
    const err = await t.throwsAsync(() => dev.read(4 << 20, 4096), { code: 'EIO' })
    t.true(err?.message.includes(srv.uri), err?.message)
    t.deepEqual(Buffer.from(await dev.read(0, 65536)), data)
    // Writeback against a failing remote: the data stays dirty.
    dev.configureWriteback({ running: true, percent: 0, delaySeconds: 0 })
    await new Promise((r) => setTimeout(r, 1500))
    t.is(dev.dirtySectors(), 128)
    // The remote recovers: writeback takes the data there.
    rmSync(inject)
    for (let i = 0; i < 600 && dev.dirtySectors()! > 0; i++) await new Promise((r) => setTimeout(r, 50))
    t.is(dev.dirtySectors(), 0)
    const off = dev.dataOffset
    t.deepEqual(readFileSync(img).subarray(off, off + 65536), data)
  } finally {
    await reg.close()
  }
})

test('qemu-nbd serving a qcow2 image is a backing device too', async (t) => {
  if (!haveTools('qemu-nbd', 'qemu-img', 'qemu-io')) return t.pass()
  const qcow = join(dir, 'disk.qcow2')
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M'])
  const sock = join(dir, 'qemu.sock')
  const child = spawn('qemu-nbd', ['--socket', sock, '--format', 'qcow2', '--persistent', '--shared=8', '--cache=writeback', qcow], { stdio: 'ignore' })
  t.teardown(() => {
    child.kill('SIGKILL')
  })
  for (let i = 0; i < 500 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 10))
  const uri = `nbd+unix:///?socket=${sock}`
  const cache = join(dir, 'qcache.img')
  writeFileSync(cache, '')
  truncateSync(cache, 16 << 20)
  const set = await makeCache(cache, { bucketSize: '64k' })
  await makeBacking(uri, { setUuid: set.setUuid })
  const reg = new Registry()
  const data = Buffer.alloc(1 << 20, 0x77)
  let off = 0
  try {
    await reg.register(cache)
    const dev = await reg.register(uri)
    if (!(dev instanceof CachedDevice)) throw new Error('expected a cached device')
    off = dev.dataOffset
    await dev.write(2 << 20, data)
    await dev.flush()
    t.deepEqual(Buffer.from(await dev.read(2 << 20, 1 << 20)), data)
  } finally {
    await reg.close()
  }
  // Writethrough: the image holds the data, as qemu-io reads it.
  await new Promise<void>((r) => {
    child.once('exit', () => r())
    child.kill('SIGTERM')
  })
  const out = execFileSync('qemu-io', ['-f', 'qcow2', '-c', `read -P 0x77 ${off + (2 << 20)} 1M`, qcow], { encoding: 'utf8' })
  t.regex(out, /read 1048576\/1048576 bytes/)
  t.notRegex(out, /Pattern verification failed/)
})

test('TLS (nbds://): an export behind nbdkit --tls=require cached with a pre-shared key, written back over TLS; ubcache serve as the remote; a wrong key refused with code TLS', async (t) => {
  if (!have) return t.pass()
  const img = join(dir, 'tls.img')
  writeFileSync(img, randomBytes(8 << 20))
  const original = readFileSync(img)
  const psk = join(dir, 'tls.psk')
  writeFileSync(psk, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 })
  const sock = join(dir, 'tls.sock')
  await nbdkit(t, sock, ['--tls=require', `--tls-psk=${psk}`, 'file', img])
  const uri = `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${psk}`
  const cache = join(dir, 'tlscache.img')
  writeFileSync(cache, '')
  truncateSync(cache, 32 << 20)
  await makeCache(cache, { bucketSize: '64k' })
  const reg = new Registry()
  const data = randomBytes(256 << 10)
  try {
    const set = await reg.register(cache)
    if (!(set instanceof CacheSet)) throw new Error('expected a set')
    const dev = await reg.attachExisting(uri, set, { cacheMode: 'writeback', label: 'tls' })
    dev.configureWriteback({ running: false })
    // A miss comes over TLS; the same read again is a hit.
    t.deepEqual(Buffer.from(await dev.read(4 << 20, 65536)), original.subarray(4 << 20, (4 << 20) + 65536))
    await dev.write(1 << 20, data)
    await dev.flush()
    t.true(readFileSync(img).equals(original), 'writeback holds the write in the cache')
    await dev.detach()
  } finally {
    await reg.close()
  }
  const want = Buffer.from(original)
  data.copy(want, 1 << 20)
  t.true(readFileSync(img).equals(want), 'detach wrote the dirty data back over TLS')
  // The wrong key: one error with code TLS, naming the URI.
  const wrong = join(dir, 'wrong.psk')
  writeFileSync(wrong, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 })
  const bad = `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${wrong}`
  const err = await t.throwsAsync(() => openDevice(bad), { code: 'TLS' })
  t.true(err?.message.startsWith(bad) && /handshake failed/.test(err.message), err?.message)
  // A plain URI to a server that requires TLS names what to do.
  await t.throwsAsync(() => openDevice(`nbd+unix:///?socket=${sock}`), { code: 'EACCES', message: /requires TLS \(use nbds:\/\/\)/ })

  // ubcache's own server as the remote, with TLS required: client and server agree.
  const d = makeDevices({ name: 'tlsdisk' })
  const dpsk = join(d.dir, 'keys.psk')
  writeFileSync(dpsk, `bob:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 })
  const s = await serve(d.dir, [d.cache, d.backing, '--tls', 'require', '--tls-psk', dpsk])
  t.teardown(() => s.kill())
  const remote = await openDevice(`nbds+unix://bob@/tlsdisk?socket=${s.socket}&tls-psk-file=${dpsk}`)
  const block = randomBytes(1 << 20)
  await remote.write(3 << 20, block)
  await remote.flush()
  t.deepEqual(Buffer.from(await remote.read(3 << 20, 1 << 20)), block)
  await remote.close()
  t.is(await s.stop(), 0)
})
