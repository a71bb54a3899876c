// Shared by the NBD and daemon tests: formatted devices, a daemon run as a child process
// (`ubcache serve`), the real NBD clients.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import type { ExecutionContext } from 'ava'
import { CLI, have, mustHaveTools, sparseFile, tempDir } from './helpers'

export const MiB = 1 << 20

// Every formatted pair registers an exit hook that removes its directory.
process.setMaxListeners(100)

/** Every external program the NBD tests drive; under CI all must be installed. */
export const NBD_TOOLS = ['nbdinfo', 'nbdcopy', 'qemu-io', 'qemu-img', 'fio', 'nbdkit']

/** Whether the tools are here; under CI their absence is a failure, not a skip. */
export function haveTools(...tools: string[]): boolean {
  const missing = tools.filter((t) => !have(t))
  if (missing.length && mustHaveTools) throw new Error(`CI needs ${missing.join(', ')} (scripts/setup.sh installs them)`)
  return missing.length === 0
}

/** A cache device and one backing device formatted as a set, in a fresh directory. */
export interface Devices {
  dir: string
  cache: string
  backing: string
  /** The export name of the backing device (its label). */
  name: string
}

/** Formats a cache (`cacheMiB`) and a backing device (`backingMiB`, label `name`) with `ubcache make`. */
export function makeDevices(opts: { name?: string; cacheMiB?: number; backingMiB?: number; block?: string } = {}): Devices {
  const dir = tempDir('ubcache-nbd-')
  const name = opts.name ?? 'disk'
  const cache = sparseFile(dir, 'cache.img', (opts.cacheMiB ?? 128) * MiB)
  const backing = sparseFile(dir, 'backing.img', (opts.backingMiB ?? 64) * MiB + 8192)
  const args = ['make', '-C', cache, '-B', backing, '--bucket', '256k', '--label', name, '-o', '16']
  if (opts.block) args.push('--block', opts.block)
  const r = spawnSync('node', [CLI, ...args], { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`ubcache make failed: ${r.stderr}`)
  return { dir, cache, backing, name }
}

/** A running `ubcache serve`. */
export interface Served {
  proc: ChildProcess
  /** The runtime directory (its sockets live there). */
  run: string
  socket: string
  control: string
  /** Everything it logged (JSON lines). */
  log: () => string
  /** The NBD URI of an export on the Unix socket. */
  uri: (name: string) => string
  /** Runs a CLI verb against it. */
  verb: (...args: string[]) => { status: number | null; stdout: string; stderr: string }
  /** `ubcache stop`, then waits for the exit; resolves to the exit code. */
  stop: () => Promise<number | null>
  /** SIGKILL, then waits for the exit. */
  kill: () => Promise<void>
  exited: Promise<number | null>
}

/** Starts `ubcache serve <args>` with its runtime directory in `dir`; resolves once it is ready. */
export async function serve(dir: string, args: string[], env: Record<string, string> = {}): Promise<Served> {
  const run = join(dir, 'run')
  mkdirSync(run, { recursive: true })
  const fullEnv = { ...process.env, UBCACHE_RUNTIME_DIR: run, ...env }
  const proc = spawn('node', [CLI, 'serve', '--log-format', 'json', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: fullEnv })
  let log = ''
  proc.stderr?.on('data', (d) => (log += d))
  proc.stdout?.on('data', (d) => (log += d))
  // 'close', not 'exit': by then everything the daemon wrote to its pipes has been read.
  const exited = new Promise<number | null>((r) => proc.on('close', (code) => r(code)))
  const ready = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`ubcache serve not ready in 30 s:\n${log}`)), 30_000)
    const check = (): void => {
      if (log.includes('"event":"ready"')) {
        clearTimeout(timer)
        resolve()
      }
    }
    proc.stderr?.on('data', check)
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`ubcache serve exited ${code} before it was ready:\n${log}`))
    })
  })
  await ready
  const socket = join(run, 'nbd.sock')
  const control = join(run, 'control.sock')
  const verb = (...a: string[]) => {
    const r = spawnSync('node', [CLI, ...a], { encoding: 'utf8', env: fullEnv, timeout: 120_000 })
    return { status: r.status, stdout: r.stdout, stderr: r.stderr }
  }
  return {
    proc,
    run,
    socket,
    control,
    log: () => log,
    uri: (name) => `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    verb,
    stop: async () => {
      if (proc.exitCode === null) verb('stop')
      return exited
    },
    kill: async () => {
      proc.kill('SIGKILL')
      await exited
    },
    exited,
  }
}

/** Runs a program; throws with its output when it fails. */
export function must(cmd: string, args: string[], opts: { input?: string | Buffer; timeout?: number } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input: opts.input, timeout: opts.timeout ?? 300_000, maxBuffer: 64 << 20 })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}${r.signal ? ` (${r.signal})` : ''}:\n${r.stdout}\n${r.stderr}`)
  return r.stdout
}

/** Whether the process may use FUSE and loop devices (root, /dev/fuse, losetup). */
export function canMountFuse(): boolean {
  return process.getuid?.() === 0 && existsSync('/dev/fuse') && have('nbdfuse') && have('losetup')
}

/** An nbdkit serving on a Unix socket (see {@link nbdkit}). */
export interface Nbdkit {
  uri: string
  kill(): Promise<void>
  restart(): Promise<void>
}

/** nbdkit on a fresh Unix socket `sock`, killed when the test ends; `restart` brings it back on the same one. */
export async function nbdkit(t: ExecutionContext, sock: string, args: string[]): Promise<Nbdkit> {
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
