// End-to-end tests of `ubcache serve` under real clients: a filesystem on the export (through
// nbdfuse and a loop device) that must survive a clean restart of the daemon, and fio's
// verification of every flushed block after the daemon is SIGKILLed during writes.
import { type ChildProcess, spawn } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { mustHaveTools } from './helpers'
import { canMountFuse, haveTools, MiB, makeDevices, type Served, serve } from './nbd-helpers'

interface Exec {
  status: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

/**
 * Runs a program to completion without blocking the event loop (the daemon's output pipes
 * must keep draining), killed after `timeout` ms.
 */
function exec(cmd: string, args: string[], opts: { timeout?: number; cwd?: string } = {}): Promise<Exec> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: opts.cwd })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', (d) => (stdout += d))
    p.stderr.on('data', (d) => (stderr += d))
    const timer = setTimeout(() => p.kill('SIGKILL'), opts.timeout ?? 60_000)
    p.on('error', (err) => {
      clearTimeout(timer)
      reject(err)
    })
    p.on('close', (status, signal) => {
      clearTimeout(timer)
      resolve({ status, signal, stdout, stderr })
    })
  })
}

/** {@link exec}, throwing with the output unless the program exits 0; resolves to its stdout. */
async function run(cmd: string, args: string[], opts: { timeout?: number; cwd?: string } = {}): Promise<string> {
  const r = await exec(cmd, args, opts)
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}${r.signal ? ` (${r.signal})` : ''}:\n${r.stdout}\n${r.stderr}`)
  return r.stdout
}

/** The bytes (KiB) fio read, from its `--output-format=terse` line (field 6, version 3). */
function terseReadKiB(stdout: string): number {
  const line = stdout.split('\n').find((l) => l.startsWith('3;'))
  if (line === undefined) throw new Error(`no terse line in fio's output:\n${stdout}`)
  return Number(line.split(';')[5])
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** Resolves true once `ok()`, false after `ms`. */
async function until(ok: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms
  while (!ok()) {
    if (Date.now() > end) return false
    await sleep(20)
  }
  return true
}

/** Cleanups run last-in first-out in one teardown, each whatever the others did. */
function cleanups(t: ExecutionContext): (fn: () => Promise<unknown> | unknown) => void {
  const stack: (() => Promise<unknown> | unknown)[] = []
  t.teardown(async () => {
    for (const fn of stack.reverse()) {
      try {
        await fn()
      } catch (err) {
        t.log(`cleanup: ${(err as Error).message}`)
      }
    }
  })
  return (fn) => stack.push(fn)
}

/** Kills the daemon if it still runs (a failed test must not leave it behind). */
async function reap(s: Served | undefined): Promise<void> {
  if (s !== undefined && s.proc.exitCode === null && s.proc.signalCode === null) await s.kill()
}

/** Request errors and errors at stop the daemon logged (JSON lines). */
function loggedErrors(log: string): string[] {
  return log.split('\n').filter((l) => /"event":"(request failed|stopped with an error)"/.test(l))
}

/** A `ubcache set` on the running daemon that must succeed. */
function set(t: ExecutionContext, s: Served, device: string, tunable: string, value: string): void {
  const r = s.verb('set', device, tunable, value)
  t.is(r.status, 0, `ubcache set ${device} ${tunable} ${value}: ${r.stderr}`)
}

function deviceStats(s: Served, name: string): { dirtySectors: number; tunables: Record<string, unknown> } {
  const r = s.verb('stats', name, '--json')
  if (r.status !== 0) throw new Error(`ubcache stats ${name}: ${r.stderr}`)
  return JSON.parse(r.stdout)
}

/** An export as a file through nbdfuse; `close` unmounts it. */
interface Fuse {
  file: string
  close: () => Promise<void>
}

/**
 * Mounts the export `uri` as the file `<mnt>/nbd` with nbdfuse (in the foreground, as a
 * child), resolving once nbdfuse says it is ready (its pid file).
 */
async function nbdfuse(dir: string, uri: string): Promise<Fuse> {
  const mnt = join(dir, 'fuse')
  mkdirSync(mnt, { recursive: true })
  const pidfile = join(dir, 'nbdfuse.pid')
  rmSync(pidfile, { force: true })
  const file = join(mnt, 'nbd')
  const proc: ChildProcess = spawn('nbdfuse', ['-P', pidfile, file, uri], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  proc.stdout?.on('data', (d) => (out += d))
  proc.stderr?.on('data', (d) => (out += d))
  const exited = new Promise<void>((r) => proc.on('close', () => r()))
  const gone = (): boolean => proc.exitCode !== null || proc.signalCode !== null
  const unmount = async (): Promise<void> => {
    if (!gone()) {
      const r = await exec('fusermount3', ['-u', mnt], { timeout: 10_000 })
      if (r.status !== 0 || !(await until(gone, 10_000))) {
        proc.kill('SIGKILL')
        await exec('fusermount3', ['-uz', mnt], { timeout: 10_000 })
      }
      await exited
    } else {
      // nbdfuse died: never leave its mount point behind.
      await exec('fusermount3', ['-uz', mnt], { timeout: 10_000 })
    }
  }
  const ready = await until(() => existsSync(pidfile) || gone(), 20_000)
  if (!ready || gone() || !existsSync(file)) {
    await unmount()
    throw new Error(`nbdfuse ${uri} not ready:\n${out}`)
  }
  return { file, close: unmount }
}

/**
 * A loop device over a file, with 4096-byte sectors: the export advertises a minimum block
 * size of 4096 and libnbd (nbdfuse) refuses requests not aligned to it, so the 512-byte
 * sectors of a default loop device would fail.
 */
async function loop(file: string): Promise<{ dev: string; close: () => Promise<void> }> {
  const dev = (await run('losetup', ['-f', '--show', '-b', '4096', file], { timeout: 30_000 })).trim()
  if (!dev.startsWith('/dev/loop')) throw new Error(`losetup printed '${dev}'`)
  let open = true
  return {
    dev,
    close: async () => {
      if (!open) return
      open = false
      await run('losetup', ['-d', dev], { timeout: 30_000 })
    },
  }
}

/** Mounts `dev` on `dir`; `close` unmounts it (lazily if it is busy). */
async function mount(dev: string, dir: string, options: string[] = []): Promise<{ close: () => Promise<void> }> {
  mkdirSync(dir, { recursive: true })
  await run('mount', [...options, dev, dir], { timeout: 30_000 })
  let mounted = true
  return {
    close: async () => {
      if (!mounted) return
      mounted = false
      const r = await exec('umount', [dir], { timeout: 30_000 })
      if (r.status !== 0) {
        await exec('umount', ['-l', dir], { timeout: 30_000 })
        throw new Error(`umount ${dir} exited ${r.status}: ${r.stderr}`)
      }
    },
  }
}

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex')

test.serial('a filesystem: ext4 through nbdfuse and a loop device survives a restart of the daemon in writeback mode, fsck clean, files intact', async (t) => {
  if (!canMountFuse()) {
    if (mustHaveTools) throw new Error('CI must be able to mount FUSE and loop devices (root, /dev/fuse, nbdfuse, losetup)')
    t.log('skipped: needs root, /dev/fuse, nbdfuse and losetup')
    t.pass()
    return
  }
  if (!haveTools('nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'fsck.ext4', 'mount', 'umount')) {
    t.log('skipped: nbdfuse, fusermount3, losetup or e2fsprogs missing')
    t.pass()
    return
  }
  const d = makeDevices({ cacheMiB: 128, backingMiB: 64 })
  const defer = cleanups(t)
  let served: Served | undefined = await serve(d.dir, [d.cache, d.backing])
  defer(() => reap(served))
  set(t, served, d.name, 'cache_mode', 'writeback')
  // Every write cached (no bypass of sequential ones) and kept dirty until the stop.
  set(t, served, d.name, 'sequential_cutoff', '0')
  set(t, served, d.name, 'writeback_running', '0')

  // Expose, mkfs, mount, write, sync, and take it all down again.
  let fuse = await nbdfuse(d.dir, served.uri(d.name))
  defer(() => fuse.close())
  let lo = await loop(fuse.file)
  defer(() => lo.close())
  await run('mkfs.ext4', ['-q', '-F', lo.dev], { timeout: 60_000 })
  const fsDir = join(d.dir, 'fs')
  let m = await mount(lo.dev, fsDir)
  defer(() => m.close())

  const files = new Map<string, string>()
  const sizes = [1, 4096, 65536 + 17, MiB, 3 * MiB + 4095, 5 * MiB]
  for (const [i, size] of sizes.entries()) {
    const data = randomBytes(size)
    files.set(`f${i}.bin`, sha256(data))
    await writeFile(join(fsDir, `f${i}.bin`), data)
  }
  await mkdir(join(fsDir, 'many'))
  for (let i = 0; i < 64; i++) {
    const data = randomBytes(100 + i * 97)
    files.set(join('many', `s${i}`), sha256(data))
    await writeFile(join(fsDir, 'many', `s${i}`), data)
  }
  await run('sync', ['-f', fsDir], { timeout: 60_000 })
  await m.close()
  await lo.close()
  await fuse.close()

  const before = deviceStats(served, d.name)
  t.is(before.tunables.cache_mode, 'writeback')
  t.true(before.dirtySectors > 0, `the files are dirty data in the cache (${before.dirtySectors} dirty sectors)`)
  t.log(`${before.dirtySectors} dirty sectors at the stop`)
  const firstLog = served.log
  t.is(await served.stop(), 0, `ubcache stop exits 0:\n${firstLog()}`)
  t.deepEqual(loggedErrors(firstLog()), [])

  // The daemon again, the export again, fsck, and the files read back.
  served = await serve(d.dir, [d.cache, d.backing])
  const after = deviceStats(served, d.name)
  t.log(`after the restart: cache_mode ${String(after.tunables.cache_mode)}, ${after.dirtySectors} dirty sectors`)
  fuse = await nbdfuse(d.dir, served.uri(d.name))
  lo = await loop(fuse.file)
  const fsck = await exec('fsck.ext4', ['-n', '-f', lo.dev], { timeout: 60_000 })
  t.is(fsck.status, 0, `fsck.ext4 -n -f is clean:\n${fsck.stdout}\n${fsck.stderr}`)
  m = await mount(lo.dev, fsDir, ['-o', 'ro'])
  const names = [...(await readdir(fsDir)).filter((n) => n !== 'lost+found' && n !== 'many'), ...(await readdir(join(fsDir, 'many'))).map((n) => join('many', n))]
  t.deepEqual(names.sort(), [...files.keys()].sort())
  for (const [name, hash] of files) t.is(sha256(await readFile(join(fsDir, name))), hash, `${name} reads back`)
  await m.close()
  await lo.close()
  await fuse.close()
  const secondLog = served.log
  t.is(await served.stop(), 0, `ubcache stop exits 0 after the restart:\n${secondLog()}`)
  t.deepEqual(loggedErrors(secondLog()), [])
})

test.serial('SIGKILL of the daemon during fio writes with periodic flushes: after the restart every flushed block reads back (fio verify_only)', async (t) => {
  if (!haveTools('fio')) {
    t.log('skipped: fio missing')
    t.pass()
    return
  }
  const defer = cleanups(t)
  for (const mode of ['writeback', 'writethrough']) {
    const d = makeDevices({ cacheMiB: 128, backingMiB: 64 })
    let served: Served | undefined = await serve(d.dir, [d.cache, d.backing])
    defer(() => reap(served))
    set(t, served, d.name, 'cache_mode', mode)
    set(t, served, d.name, 'sequential_cutoff', '0')
    const fio = (uri: string, job: string[]): string[] => ['--ioengine=nbd', `--uri=${uri}`, '--iodepth=16', '--verify_state_save=0', '--output-format=terse', ...job]
    // Region A: the first half, every block written once with a checksum, flushed every 32 writes and at the end.
    const regionA = ['--name=a', '--rw=randwrite', '--bssplit=4k/50:16k/30:64k/20', '--offset=0', '--size=32m', '--randseed=4242', '--verify=crc32c', '--fsync=32', '--end_fsync=1']
    await run('fio', fio(served.uri(d.name), [...regionA, '--do_verify=0']), { cwd: d.dir, timeout: 60_000 })

    // Region B: random writes with a flush every 16, until the daemon is killed under them.
    const regionB = ['--name=b', '--rw=randwrite', '--bs=4k', '--offset=32m', '--size=32m', '--fsync=16', '--time_based', '--runtime=30']
    const clients = (): number => (served?.log().match(/"event":"client started"/g) ?? []).length
    const before = clients()
    const writing = exec('fio', fio(served.uri(d.name), regionB), { cwd: d.dir, timeout: 40_000 })
    const started = await until(() => clients() > before, 10_000)
    t.true(started, `${mode}: fio's phase B connected`)
    await sleep(1500)
    const killedLog = served.log()
    await served.kill()
    const b = await writing
    t.not(b.status, 0, `${mode}: fio's phase B was cut off by the kill, not finished (exit ${b.status})`)
    t.is(b.signal, null, `${mode}: fio's phase B ended by itself after the kill`)
    t.deepEqual(loggedErrors(killedLog), [], `${mode}: no request failed before the kill`)

    // The restart: region A reads back whole, region B reads without error, the stop is clean.
    served = await serve(d.dir, [d.cache, d.backing])
    const verify = await exec('fio', fio(served.uri(d.name), [...regionA, '--verify_only', '--verify_fatal=1']), { cwd: d.dir, timeout: 60_000 })
    t.is(verify.status, 0, `${mode}: every flushed block of region A reads back:\n${verify.stdout}\n${verify.stderr}`)
    if (verify.status === 0) t.is(terseReadKiB(verify.stdout), 32 * 1024, `${mode}: fio verified all of region A`)
    const readB = await exec('fio', fio(served.uri(d.name), ['--name=rb', '--rw=read', '--bs=1m', '--offset=32m', '--size=32m']), { cwd: d.dir, timeout: 60_000 })
    t.is(readB.status, 0, `${mode}: region B reads without error:\n${readB.stdout}\n${readB.stderr}`)
    if (readB.status === 0) t.is(terseReadKiB(readB.stdout), 32 * 1024, `${mode}: fio read all of region B`)
    const log = served.log
    t.is(await served.stop(), 0, `${mode}: ubcache stop exits 0 after the restart:\n${log()}`)
    t.deepEqual(loggedErrors(log()), [], `${mode}: no request failed after the restart`)
    t.log(`${mode}: killed during phase B (fio exit ${b.status}); region A verified, region B read`)
  }
})
