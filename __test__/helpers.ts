import { spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

export const CLI = resolve(__dirname, '..', 'dist', 'cli.js')

/** A temporary directory removed when the process exits. */
export function tempDir(prefix = 'ubcache-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** A sparse file of `bytes` bytes. */
export function sparseFile(dir: string, name: string, bytes: number): string {
  const p = join(dir, name)
  writeFileSync(p, '')
  truncateSync(p, bytes)
  return p
}

export interface RunResult {
  status: number | null
  stdout: string
  stderr: string
}

/** Runs a command to completion, never through a shell. */
export function run(cmd: string, args: string[]): RunResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
  if (r.error) throw r.error
  return { status: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** Runs the built `ubcache` CLI. */
export function cli(...args: string[]): RunResult {
  return run(process.execPath, [CLI, ...args])
}

/** Whether a program is on PATH. */
export function have(program: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${program}`], { stdio: 'ignore' }).status === 0
}

/** `key value` lines of bcache-super-show (or ubcache show), as a map. */
export function superShowFields(text: string): Map<string, string> {
  const m = new Map<string, string>()
  for (const line of text.split('\n')) {
    const match = /^(\S+)\t+(.*)$/.exec(line)
    if (match) m.set(match[1], match[2])
  }
  return m
}

/** In CI the interop tools are installed: a missing one is a failure, not a skip. */
export const mustHaveTools = process.env.CI === 'true'
