// `ubcache serve` with real NBD clients: nbdinfo, nbdcopy, qemu-io, qemu-img, fio's nbd
// engine; TLS; read-modify-write under concurrent unaligned writes (a raw client); the CLI
// verbs against a running daemon and without one.
import { spawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import test from 'ava'
import { Registry } from '../ts/index'
import { CLI, sparseFile } from './helpers'
import { haveTools, makeDevices, MiB, must, serve } from './nbd-helpers'

const tools = haveTools('nbdinfo', 'nbdcopy', 'qemu-io', 'qemu-img', 'fio')

test('nbdinfo reports size, block sizes and flags; --list lists every export', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'disk-a' })
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  const info = JSON.parse(must('nbdinfo', ['--json', s.uri('disk-a')]))
  const e = info.exports[0]
  t.is(info.protocol, 'newstyle-fixed')
  t.true(info.structured)
  t.is(e['export-name'], 'disk-a')
  t.is(e['export-size'], 64 * MiB)
  t.is(e.block_size_minimum, 4096)
  t.is(e.block_size_preferred, 4096)
  t.is(e.block_size_maximum, 32 * MiB)
  for (const f of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_cache', 'can_multi_conn']) t.true(e[f], f)
  t.false(e.is_read_only)
  const list = must('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${s.socket}`])
  t.deepEqual(
    JSON.parse(list).exports.map((x: { 'export-name': string }) => x['export-name']),
    ['disk-a'],
  )
  // An unknown export is refused with NBD_REP_ERR_UNKNOWN, and the server carries on.
  const bad = spawnSync('nbdinfo', [s.uri('nope')], { encoding: 'utf8' })
  t.not(bad.status, 0)
  t.regex(bad.stderr, /unknown|not (found|available)|No such/i)
  t.is(await s.stop(), 0)
})

test('nbdcopy an image in and out, byte-equal; qemu-img compare agrees', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'copy' })
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  t.is(s.verb('set', 'copy', 'cache_mode', 'writeback').status, 0)
  const src = join(d.dir, 'src.img')
  writeFileSync(src, randomBytes(64 * MiB))
  must('nbdcopy', [src, s.uri('copy')])
  const out = join(d.dir, 'out.img')
  must('nbdcopy', [s.uri('copy'), out])
  t.true(readFileSync(src).equals(readFileSync(out)))
  must('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, `nbd+unix:///copy?socket=${s.socket}`])
  const st = JSON.parse(s.verb('stats', 'copy', '--json').stdout)
  t.true(st.accounting.total.cacheHits > 0, 'the copy out was served from the cache')
  t.is(await s.stop(), 0)
})

test('qemu-io: patterns, zeroes, discard, aio and flush at aligned and unaligned offsets', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'qio' })
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  t.is(s.verb('set', 'qio', 'cache_mode', 'writeback').status, 0)
  const io = (...cmds: string[]): string => {
    const out = must('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), `nbd+unix:///qio?socket=${s.socket}`])
    t.notRegex(out, /Pattern verification failed|error|failed/i, out)
    return out
  }
  io('write -P 0xab 0 1M', 'write -P 0xcd 4096 8192', 'flush')
  io('read -P 0xab 0 4096', 'read -P 0xcd 4096 8192', 'read -P 0xab 12288 1036288')
  // Unaligned: qemu aligns to the advertised 4 KiB itself; the server's own read-modify-write
  // is tested with a raw client below.
  io('write -P 0x11 1000 3000', 'read -P 0xab 0 1000', 'read -P 0x11 1000 3000', 'read -P 0xab 4000 96', 'read -P 0xcd 4096 4096')
  io('write -z 1M 512k', 'read -P 0 1M 512k', 'write -z 100 200', 'read -P 0 100 200', 'read -P 0xab 0 100')
  io('aio_write -P 0x22 2M 64k', 'aio_write -P 0x33 3M 64k', 'aio_flush', 'read -P 0x22 2M 64k', 'read -P 0x33 3M 64k')
  io('write -f -P 0x44 5M 4k', 'read -P 0x44 5M 4k')
  io('discard 8M 1M', 'write -P 0x55 8M 4k', 'read -P 0x55 8M 4k')
  t.is(await s.stop(), 0)
})

test('fio verify=crc32c at QD32, random and sequential, in every cache mode, then again after a restart', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'fio', backingMiB: 64, cacheMiB: 128 })
  let s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  const modes = ['writethrough', 'writeback', 'writearound', 'none']
  const jobs: string[][] = []
  let region = 0
  for (const mode of modes) {
    t.is(s.verb('set', 'fio', 'cache_mode', mode).status, 0)
    for (const rw of ['randwrite', 'write']) {
      const job = ['--name=v', '--ioengine=nbd', `--rw=${rw}`, '--bs=4k', '--iodepth=32', `--offset=${region * 8}M`, '--size=8M', '--verify=crc32c', '--verify_state_save=0', '--randseed=' + (7 + region)]
      region++
      must('fio', [...job, `--uri=${s.uri('fio')}`, '--do_verify=1'])
      jobs.push(job)
    }
  }
  t.is(await s.stop(), 0)
  s = await serve(d.dir, [d.cache, d.backing])
  for (const job of jobs) must('fio', [...job, `--uri=${s.uri('fio')}`, '--verify_only'])
  t.is(await s.stop(), 0)
})

/** A minimal NBD client: handshake with NBD_OPT_GO (no block size request), simple replies. */
async function rawClient(socket: string, name: string): Promise<{ request(type: number, offset: number, length: number, data?: Buffer): Promise<{ error: number; data: Buffer }>; close(): void }> {
  const c = net.connect(socket)
  let buf = Buffer.alloc(0)
  let want: { n: number; resolve: (b: Buffer) => void } | undefined
  const waiting = new Map<bigint, { type: number; length: number; resolve: (r: { error: number; data: Buffer }) => void }>()
  let reading = false
  const pump = (): void => {
    for (;;) {
      if (want) {
        if (buf.length < want.n) return
        const w = want
        want = undefined
        const out = buf.subarray(0, w.n)
        buf = buf.subarray(w.n)
        w.resolve(out)
        continue
      }
      if (!reading || buf.length < 16) return
      const handle = buf.readBigUInt64BE(8)
      const error = buf.readUInt32BE(4)
      const p = waiting.get(handle)
      if (!p) throw new Error(`reply to unknown handle ${handle}`)
      const dataLen = p.type === 0 && error === 0 ? p.length : 0
      if (buf.length < 16 + dataLen) return
      const data = Buffer.from(buf.subarray(16, 16 + dataLen))
      buf = buf.subarray(16 + dataLen)
      waiting.delete(handle)
      p.resolve({ error, data })
    }
  }
  c.on('data', (d) => {
    buf = Buffer.concat([buf, d])
    pump()
  })
  const read = (n: number): Promise<Buffer> =>
    new Promise((resolve) => {
      want = { n, resolve }
      pump()
    })
  c.on('error', () => {})
  // Requests unanswered when the server closes the connection resolve with error -1.
  c.on('close', () => {
    for (const p of waiting.values()) p.resolve({ error: -1, data: Buffer.alloc(0) })
    waiting.clear()
  })
  await new Promise((r) => c.once('connect', r))
  await read(18)
  c.write(Buffer.from([0, 0, 0, 3]))
  const nameB = Buffer.from(name)
  const opt = Buffer.alloc(16 + 4 + nameB.length + 2)
  opt.write('IHAVEOPT', 0)
  opt.writeUInt32BE(7, 8)
  opt.writeUInt32BE(4 + nameB.length + 2, 12)
  opt.writeUInt32BE(nameB.length, 16)
  nameB.copy(opt, 20)
  c.write(opt)
  for (;;) {
    const h = await read(20)
    const type = h.readUInt32BE(12)
    await read(h.readUInt32BE(16))
    if (type === 1) break
    if (type >= 0x80000000) throw new Error(`GO refused: ${type}`)
  }
  reading = true
  let next = 1n
  return {
    request(type, offset, length, data) {
      const handle = next++
      const h = Buffer.alloc(28)
      h.writeUInt32BE(0x25609513, 0)
      h.writeUInt16BE(type, 6)
      h.writeBigUInt64BE(handle, 8)
      h.writeBigUInt64BE(BigInt(offset), 16)
      h.writeUInt32BE(length, 24)
      const p = new Promise<{ error: number; data: Buffer }>((resolve) => waiting.set(handle, { type, length, resolve }))
      c.write(data ? Buffer.concat([h, data]) : h)
      return p
    },
    close() {
      c.destroy()
    },
  }
}

test('unaligned writes in flight together are merged by read-modify-write without losing any', async (t) => {
  const d = makeDevices({ name: 'rmw', backingMiB: 8 })
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  t.is(s.verb('set', 'rmw', 'cache_mode', 'writeback').status, 0)
  const c = await rawClient(s.socket, 'rmw')
  const region = 64 * 1024
  const model = Buffer.alloc(region)
  // Disjoint byte ranges, many sharing 4 KiB blocks, all sent before any reply: each block's
  // merges must see each other.
  const writes: Promise<{ error: number }>[] = []
  let at = 0
  let seed = 1
  while (at < region) {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff
    const len = Math.min(1 + (seed % 700), region - at)
    const data = Buffer.alloc(len, (seed >> 8) & 0xff)
    data.copy(model, at)
    writes.push(c.request(1, at, len, data))
    at += len
  }
  for (const r of await Promise.all(writes)) t.is(r.error, 0)
  // Unaligned reads too, across block boundaries.
  const reads = await Promise.all([c.request(0, 0, region), c.request(0, 123, 5000), c.request(0, 4095, 2)])
  t.true(reads[0].data.equals(model))
  t.true(reads[1].data.equals(model.subarray(123, 5123)))
  t.true(reads[2].data.equals(model.subarray(4095, 4097)))
  // Past the end: EINVAL for a read, ENOSPC for a write; unknown command: EINVAL.
  t.is((await c.request(0, 8 * MiB - 512, 1024)).error, 22)
  t.is((await c.request(1, 8 * MiB - 512, 1024, Buffer.alloc(1024))).error, 28)
  t.is((await c.request(99, 0, 0)).error, 22)
  c.close()
  t.is(await s.stop(), 0)
})

test('TLS: a client with the pre-shared key connects; under --tls=require a plain client is refused', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'tls' })
  const psk = join(d.dir, 'keys.psk')
  writeFileSync(psk, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 })
  const s = await serve(d.dir, [d.cache, d.backing, '--tls', 'require', '--tls-psk', psk])
  t.teardown(() => s.kill())
  const tlsUri = `nbds+unix://alice@/tls?socket=${s.socket}&tls-psk-file=${psk}`
  const info = JSON.parse(must('nbdinfo', ['--json', tlsUri]))
  t.true(info.TLS)
  t.is(info.exports[0]['export-size'], 64 * MiB)
  const src = join(d.dir, 'src.img')
  writeFileSync(src, randomBytes(4 * MiB))
  must('nbdcopy', [src, tlsUri])
  const out = join(d.dir, 'out.img')
  must('nbdcopy', [tlsUri, out])
  t.true(readFileSync(out).subarray(0, 4 * MiB).equals(readFileSync(src)))
  const plain = spawnSync('nbdinfo', [s.uri('tls')], { encoding: 'utf8' })
  t.not(plain.status, 0, 'a plain client must be refused')
  const wrongKey = join(d.dir, 'wrong.psk')
  writeFileSync(wrongKey, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 })
  const wrong = spawnSync('nbdinfo', [`nbds+unix://alice@/tls?socket=${s.socket}&tls-psk-file=${wrongKey}`], { encoding: 'utf8' })
  t.not(wrong.status, 0, 'a client with the wrong key must be refused')
  t.is(await s.stop(), 0)
})

test('TLS with a certificate: a client trusting its CA connects', async (t) => {
  if (!tools || !haveTools('openssl')) return t.pass('tools missing')
  const d = makeDevices({ name: 'cert' })
  const pki = join(d.dir, 'pki')
  must('mkdir', ['-p', pki])
  must('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost', '-keyout', join(pki, 'server-key.pem'), '-out', join(pki, 'server-cert.pem')])
  must('cp', [join(pki, 'server-cert.pem'), join(pki, 'ca-cert.pem')])
  const s = await serve(d.dir, [d.cache, d.backing, '--tls', 'require', '--tls-cert', join(pki, 'server-cert.pem'), '--tls-key', join(pki, 'server-key.pem')])
  t.teardown(() => s.kill())
  const info = JSON.parse(must('nbdinfo', ['--json', `nbds+unix:///cert?socket=${s.socket}&tls-certificates=${pki}&tls-verify-peer=false`]))
  t.true(info.TLS)
  t.is(await s.stop(), 0)
})

test('flash-only volumes are exported beside cached devices', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'dev' })
  const reg = new Registry()
  const set = await reg.registerCache(d.cache)
  await set.createVolume(16 * MiB, { label: 'vol' })
  await reg.close()
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  const list = JSON.parse(s.verb('list', '--json').stdout)
  t.deepEqual(list.exports.map((e: { name: string }) => e.name).sort(), ['dev', 'vol'])
  const vol = list.exports.find((e: { name: string }) => e.name === 'vol')
  t.is(vol.uri, s.uri('vol'))
  t.is(vol.kind, 'flash volume')
  const io = must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 1M', '-c', 'write -z 1M 1M', '-c', 'read -P 0x77 0 1M', '-c', 'read -P 0 1M 1M', s.uri('vol')])
  t.notRegex(io, /fail/i)
  t.is(JSON.parse(must('nbdinfo', ['--json', s.uri('vol')])).exports[0]['export-size'], 16 * MiB)
  t.is(await s.stop(), 0)
})

test('CLI verbs against a running daemon: register, list, attach, set, stats, metrics, detach, stop', async (t) => {
  const d = makeDevices({ name: 'verbs' })
  const s = await serve(d.dir, [d.cache, '--metrics', '127.0.0.1:0'])
  t.teardown(() => s.kill())
  let r = s.verb('register', d.backing)
  t.is(r.status, 0, r.stderr)
  t.regex(r.stdout, /exported as 'verbs'/)
  r = s.verb('list', '--json')
  const list = JSON.parse(r.stdout)
  t.is(list.exports[0].uri, `nbd+unix:///verbs?socket=${s.socket}`)
  t.is(list.devices[0].set, list.sets[0].uuid)
  r = s.verb('list')
  t.regex(r.stdout, /export verbs/)
  t.is(s.verb('set', 'verbs', 'cache_mode', 'writeback').status, 0)
  t.is(s.verb('set', 'verbs', 'writeback_running', '0').status, 0)
  r = s.verb('set', 'verbs', 'sequential_cutoff', '8M', '--json')
  t.is(JSON.parse(r.stdout).value, 8 * MiB)
  r = s.verb('set', 'verbs', 'no_such_tunable', '1')
  t.is(r.status, 1)
  t.regex(r.stderr, /^ubcache: unknown tunable 'no_such_tunable'/)
  t.is(r.stderr.trim().split('\n').length, 1)
  r = s.verb('set', 'verbs', 'writeback_percent', '99')
  t.is(r.status, 1)
  t.regex(r.stderr, /writeback_percent/)
  r = s.verb('set', list.sets[0].uuid, 'congested_read_threshold_us', '2000')
  t.is(r.status, 0, r.stderr)
  // Dirty data through NBD, then stats, metrics and a detach that writes it back.
  must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 4M', '-c', 'flush', s.uri('verbs')])
  r = s.verb('stats', 'verbs', '--json')
  const st = JSON.parse(r.stdout)
  t.is(st.tunables.cache_mode, 'writeback')
  t.true(st.dirtySectors >= 8192)
  t.regex(s.verb('stats', 'verbs').stdout, /dirty/)
  t.regex(s.verb('stats', list.sets[0].uuid).stdout, /^set /)
  const port = /"url":"http:\/\/127\.0\.0\.1:(\d+)\/metrics"/.exec(s.log())?.[1]
  t.truthy(port, s.log())
  const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text()
  t.regex(metrics, /# TYPE ubcache_device_dirty_sectors gauge\nubcache_device_dirty_sectors\{device="[^"]+",export="verbs",set="[^"]+"\} \d+/)
  t.regex(metrics, /ubcache_set_cache_hits_total\{set="[^"]+"\} \d+/)
  r = s.verb('attach', d.backing, list.sets[0].uuid)
  t.is(r.status, 0, r.stderr)
  r = s.verb('detach', 'verbs', '--json')
  t.is(r.status, 0, r.stderr)
  const det = JSON.parse(r.stdout)
  t.true(det.dirtySectorsBefore >= 8192)
  t.is(det.state, 'none')
  // After the detach the device is served straight: the data is on the backing device.
  must('qemu-io', ['-f', 'raw', '-c', 'read -P 0x3c 0 4M', s.uri('verbs')])
  r = s.verb('detach', 'verbs')
  t.is(r.status, 1)
  t.regex(r.stderr, /not attached/)
  r = s.verb('stats', 'nothing-here')
  t.is(r.status, 1)
  t.regex(r.stderr, /no registered device/)
  r = s.verb('stop')
  t.is(r.status, 0)
  t.is(await s.exited, 0)
  t.regex(s.log(), /"event":"stopped"/)
})

test('an existing device (no superblock) through the daemon: attach --existing, exported, dirty across a restart from a config file, detached', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'unused' })
  const data = join(d.dir, 'data.img')
  writeFileSync(data, Buffer.alloc(16 * MiB, 0x5a))
  let s = await serve(d.dir, [d.cache])
  t.teardown(() => s.kill())
  const set = JSON.parse(s.verb('list', '--json').stdout).sets[0].uuid as string
  let r = s.verb('attach', '--existing', data, set, '--label', 'data', '--cache-mode', 'writeback')
  t.is(r.status, 0, r.stderr)
  const uuid = /as UUID ([0-9a-f-]{36})/.exec(r.stdout)?.[1] as string
  t.truthy(uuid, r.stdout)
  t.regex(r.stdout, /exported as 'data'/)
  t.is(s.verb('set', 'data', 'writeback_running', '0').status, 0)
  must('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 16M', '-c', 'write -P 0x3c 1M 2M', '-c', 'flush', s.uri('data')])
  // A second attach of a registered device is refused with one line.
  r = s.verb('attach', '--existing', data, set)
  t.is(r.status, 1)
  t.regex(r.stderr, /already registered/)
  t.is(r.stderr.trim().split('\n').length, 1)
  t.is(s.verb('attach', data, set, '--uuid', uuid).status, 1, 'a --uuid without --existing')
  t.is(await s.stop(), 0)
  t.true(readFileSync(data).equals(Buffer.alloc(16 * MiB, 0x5a)), 'dirty data stays in the cache; nothing else written')
  // The config file names it with its UUID: the dirty data is found again.
  const cfg = join(d.dir, 'existing.json')
  // (Writeback tunables are not persisted, as bcache's are not: paused again by the config.)
  writeFileSync(cfg, JSON.stringify({ devices: [d.cache], existing: [{ path: data, set, uuid }], registry: { writeback: { running: false } } }))
  s = await serve(d.dir, ['--config', cfg])
  t.true(JSON.parse(s.verb('stats', 'data', '--json').stdout).dirtySectors >= 4096, 'the dirty data found again')
  must('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0x3c 1M 2M', '-c', 'read -P 0x5a 3M 13M', s.uri('data')])
  r = s.verb('detach', 'data', '--json')
  t.is(r.status, 0, r.stderr)
  t.true(JSON.parse(r.stdout).dirtySectorsBefore >= 4096)
  t.is(await s.stop(), 0)
  const after = readFileSync(data)
  t.true(after.subarray(MiB, 3 * MiB).equals(Buffer.alloc(2 * MiB, 0x3c)), 'written back')
  t.true(after.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x5a)))
  // A bad entry in the config is named.
  writeFileSync(cfg, JSON.stringify({ devices: [d.cache], existing: [{ path: data, set, mode: 'writeback' }] }))
  const bad = spawnSync('node', [CLI, 'serve', '--config', cfg], { encoding: 'utf8', env: { ...process.env, UBCACHE_RUNTIME_DIR: join(d.dir, 'other') }, timeout: 30_000 })
  t.is(bad.status, 1)
  t.regex(bad.stderr, /existing\[0\]: unknown key 'mode'/)
})

test('CLI verbs without a daemon: one line, exit 1', (t) => {
  const env = { ...process.env, UBCACHE_RUNTIME_DIR: join(makeDevices().dir, 'nothing') }
  for (const args of [['list'], ['list', '--json'], ['register', '/dev/null'], ['attach', 'a', 'b'], ['detach', 'a'], ['set', 'a', 'cache_mode', 'none'], ['stats', 'a'], ['stop']]) {
    const r = spawnSync('node', [CLI, ...args], { encoding: 'utf8', env })
    t.is(r.status, 1, args.join(' '))
    t.is(r.stderr.trim().split('\n').length, 1, r.stderr)
    t.regex(r.stderr, /^ubcache: no ubcache daemon is running/, args.join(' '))
  }
})

test('serve refuses a second daemon on the same sockets and a bad config with one line', async (t) => {
  const d = makeDevices({ name: 'twice' })
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  const again = spawnSync('node', [CLI, 'serve'], { encoding: 'utf8', env: { ...process.env, UBCACHE_RUNTIME_DIR: s.run }, timeout: 30_000 })
  t.is(again.status, 1)
  t.regex(again.stderr, /already running/)
  const cfg = sparseFile(d.dir, 'bad.json', 0)
  writeFileSync(cfg, JSON.stringify({ devices: [], sockett: 'x' }))
  const bad = spawnSync('node', [CLI, 'serve', '--config', cfg], { encoding: 'utf8', env: { ...process.env, UBCACHE_RUNTIME_DIR: join(d.dir, 'other') }, timeout: 30_000 })
  t.is(bad.status, 1)
  t.regex(bad.stderr, /unknown key 'sockett'/)
  t.is(bad.stderr.trim().split('\n').length, 1, bad.stderr)
  t.is(await s.stop(), 0)
})

test('a stop answers the requests in flight and ends connected clients; the data is there after a restart', async (t) => {
  const d = makeDevices({ name: 'stop', backingMiB: 8 })
  let s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  t.is(s.verb('set', 'stop', 'cache_mode', 'writeback').status, 0)
  const idle = await rawClient(s.socket, 'stop')
  const busy = await rawClient(s.socket, 'stop')
  const data = Buffer.alloc(256 * 1024, 0x6d)
  const first = await busy.request(1, 0, data.length, data)
  t.is(first.error, 0)
  const writes = [1, 2, 3].map((i) => busy.request(1, i * data.length, data.length, data))
  const stopped = s.stop()
  // Each write is answered, done or ESHUTDOWN (it arrived after the stop began), or left
  // unanswered when the server had not read it before ending the connection (-1).
  const answers = await Promise.all(writes)
  for (const r of answers) t.true(r.error === 0 || r.error === 108 || r.error === -1, String(r.error))
  t.is(await stopped, 0)
  idle.close()
  busy.close()
  s = await serve(d.dir, [d.cache, d.backing])
  const c = await rawClient(s.socket, 'stop')
  const back = await c.request(0, 0, 4 * data.length)
  t.is(back.error, 0)
  t.true(back.data.subarray(0, data.length).equals(data))
  for (const [i, r] of answers.entries()) {
    if (r.error === 0) t.true(back.data.subarray((i + 1) * data.length, (i + 2) * data.length).equals(data), `write ${i + 1} answered but not there`)
  }
  c.close()
  t.is(await s.stop(), 0)
})

test('a config file names exports and makes them read-only; --listen serves TCP too', async (t) => {
  if (!tools) return t.pass('tools missing')
  const d = makeDevices({ name: 'cfg' })
  const cfg = join(d.dir, 'ubcache.json')
  writeFileSync(cfg, JSON.stringify({ devices: [d.cache, d.backing], exports: [{ device: d.backing, name: 'ro-disk', readOnly: true }], listen: '127.0.0.1:0', logFormat: 'json' }))
  const s = await serve(d.dir, ['--config', cfg])
  t.teardown(() => s.kill())
  const list = JSON.parse(s.verb('list', '--json').stdout)
  t.is(list.exports.length, 1)
  const e = list.exports[0]
  t.is(e.name, 'ro-disk')
  t.true(e.readOnly)
  t.regex(e.tcpUri, /^nbd:\/\/127\.0\.0\.1:\d+\/ro-disk$/)
  const info = JSON.parse(must('nbdinfo', ['--json', e.tcpUri])).exports[0]
  t.true(info.is_read_only)
  t.false(info.can_trim)
  t.false(info.can_zero)
  t.is(info['export-size'], 64 * MiB)
  const c = await rawClient(s.socket, 'ro-disk')
  t.is((await c.request(1, 0, 4096, Buffer.alloc(4096))).error, 1, 'EPERM for a write')
  t.is((await c.request(4, 0, 4096)).error, 1, 'EPERM for a trim')
  t.is((await c.request(0, 0, 4096)).error, 0)
  c.close()
  t.is(await s.stop(), 0)
})

test('SIGTERM and SIGINT stop the daemon cleanly; stats --watch prints a line per interval', async (t) => {
  const d = makeDevices({ name: 'sig' })
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    const s = await serve(d.dir, [d.cache, d.backing])
    t.teardown(() => s.kill())
    if (sig === 'SIGTERM') {
      const watch = spawn('node', [CLI, 'stats', 'sig', '--watch', '--interval', '0.2'], { env: { ...process.env, UBCACHE_RUNTIME_DIR: s.run } })
      let out = ''
      watch.stdout.on('data', (b) => (out += b))
      // Three lines, however slowly a loaded machine starts the CLI (at most 30 s).
      for (let waited = 0; out.trim().split('\n').length < 3 && waited < 30_000; waited += 100) await new Promise((r) => setTimeout(r, 100))
      watch.kill()
      t.true(out.trim().split('\n').length >= 3, out)
      t.regex(out, /dirty/)
    }
    s.proc.kill(sig)
    t.is(await s.exited, 0, s.log())
    t.regex(s.log(), new RegExp(`"event":"stopping","reason":"${sig}"[^\\n]*\\n[^]*"event":"stopped"`))
  }
})

test('CAN_MULTI_CONN holds: a flush on one connection makes the writes answered on another durable (SIGKILL after it)', async (t) => {
  const d = makeDevices({ name: 'multi', backingMiB: 16 })
  for (const mode of ['writeback', 'writethrough']) {
    let s = await serve(d.dir, [d.cache, d.backing])
    t.teardown(() => s.kill())
    t.is(s.verb('set', 'multi', 'cache_mode', mode).status, 0)
    const a = await rawClient(s.socket, 'multi')
    const b = await rawClient(s.socket, 'multi')
    const blocks = Array.from({ length: 32 }, (_, i) => Buffer.alloc(64 * 1024, (i * 7 + (mode === 'writeback' ? 1 : 2)) & 0xff))
    const written = await Promise.all(blocks.map((data, i) => (i % 2 ? a : b).request(1, i * data.length, data.length, data)))
    for (const r of written) t.is(r.error, 0)
    t.is((await b.request(3, 0, 0)).error, 0, 'flush on one connection')
    await s.kill()
    a.close()
    b.close()
    s = await serve(d.dir, [d.cache, d.backing])
    const c = await rawClient(s.socket, 'multi')
    const back = await c.request(0, 0, 32 * 64 * 1024)
    t.is(back.error, 0)
    t.true(back.data.equals(Buffer.concat(blocks)), `${mode}: every write answered before the flush is there after SIGKILL`)
    c.close()
    t.is(await s.stop(), 0)
  }
})
