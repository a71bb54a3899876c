// SIGKILL: a child process (kill-child.js, on the built package) writes through cached
// devices with periodic flushes and FUA writes, reporting each that resolved; the parent
// kills it at random moments (now and then before it is even ready), then registers the
// devices again itself (the set must open without error) and checks every block: a whole
// block written for it (no garbage, nothing torn), and no older than the newest write
// reported durable. Registering straight after the kill also checks that an exclusive open
// waits out the dead child's locks (its io_uring is torn down after it is reaped). Cache
// modes vary across kills and devices; the child switches them too.
//
// UBCACHE_KILLS sets the number of kills (default 20; `npm run soak:kill` runs 100),
// UBCACHE_KILL_SEED the seed.
import test from 'ava'
import { spawn } from 'node:child_process'
import { resolve } from 'node:path'
import { type CacheMode, Registry } from '../ts/index'
import { BLOCK, blocks, writer } from './block-format'
import { formatSet, rng, writeFileBytes } from './registry-helpers'

const KILLS = Number(process.env.UBCACHE_KILLS ?? 20)
const modes: CacheMode[] = ['writethrough', 'writeback', 'writearound', 'none']
const CHILD = resolve(__dirname, 'kill-child.js')

interface Run {
  lines: number
  durable: number
  ready: boolean
  stderr: string
  status: number | null
  signal: string | null
}

test.serial(`SIGKILL at random moments, ${KILLS} times: the set opens and every flushed or FUA write reads back`, async (t) => {
  t.timeout(Math.max(120_000, KILLS * 6_000))
  const seed = Number(process.env.UBCACHE_KILL_SEED ?? Date.now() % 1_000_000)
  t.log(`seed ${seed} (UBCACHE_KILL_SEED to repeat)`)
  const rand = rng(seed)
  const f = await formatSet(2, { backingBytes: 8 << 20 })
  const nblocks = ((8 << 20) - 8192) / BLOCK
  f.backings.forEach((p, d) => writeFileBytes(p, f.sbs[d].dataOffset * 512, blocks(0, d, 0, nblocks)))
  /** Per device and block: the newest id reported durable. */
  const durable = f.backings.map(() => new Float64Array(nblocks))
  const stats = { kills: 0, beforeReady: 0, durableReports: 0, newerThanDurable: 0, blocksChecked: 0, uncleanOpens: 0, replayedEntries: 0 }
  let bad = 0

  for (let k = 0; k < KILLS; k++) {
    const devModes = f.backings.map((_, d) => modes[(k + 2 * d) % modes.length])
    const early = rand() < 0.2
    const cfg = { cache: f.cache, backings: f.backings, modes: devModes, base: (k + 1) * 10_000_000, seed: Math.floor(rand() * 2 ** 31), order: rand() < 0.5 ? 'cache-first' : 'backing-first' }
    const run: Run = { lines: 0, durable: 0, ready: false, stderr: '', status: null, signal: null }
    const child = spawn(process.execPath, [CHILD, JSON.stringify(cfg)], { stdio: ['ignore', 'pipe', 'pipe'] })
    let pending = ''
    let onReady: (() => void) | undefined
    child.stdout.on('data', (chunk: Buffer) => {
      pending += chunk.toString()
      let nl: number
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl)
        pending = pending.slice(nl + 1)
        run.lines++
        const msg = JSON.parse(line) as { t: string; d: number; w: [number, number, number][] }
        if (msg.t === 'ready') {
          run.ready = true
          onReady?.()
        } else if (msg.t === 'durable') {
          run.durable++
          const dur = durable[msg.d]
          for (const [start, n, id] of msg.w) for (let b = start; b < start + n; b++) if (dur[b] < id) dur[b] = id
        }
      }
    })
    child.stderr.on('data', (chunk: Buffer) => (run.stderr += chunk.toString()))
    const exited = new Promise<void>((res) =>
      child.on('exit', (status, signal) => {
        run.status = status
        run.signal = signal
        res()
      }),
    )
    if (early) {
      stats.beforeReady++
      await Promise.race([new Promise((r) => setTimeout(r, 20 + rand() * 200)), exited])
    } else {
      await Promise.race([new Promise<void>((r) => (onReady = r)), exited])
      await Promise.race([new Promise((r) => setTimeout(r, 50 + rand() * 700)), exited])
    }
    child.kill('SIGKILL')
    await exited
    if (run.signal !== 'SIGKILL') {
      t.fail(`kill ${k}: the child exited by itself (status ${run.status}): ${run.stderr}`)
      break
    }
    stats.kills++
    stats.durableReports += run.durable

    // Register again: the set must open, and every block be what was written, no older than durable.
    const reg = new Registry()
    const order = rand() < 0.5
    const devs = []
    const set = order ? await reg.registerCache(f.cache) : undefined
    for (const p of f.backings) devs.push(await reg.registerBacking(p))
    const theSet = set ?? (await reg.registerCache(f.cache))
    const report = theSet.openReport()
    if (report && !report.cleanShutdown) stats.uncleanOpens++
    stats.replayedEntries += report?.replayedEntries ?? 0
    for (let d = 0; d < devs.length; d++) {
      const dev = devs[d]
      t.is(dev.set, theSet)
      const chunk = 256 << 10
      const reads: Promise<void>[] = []
      for (let at = 0; at < nblocks * BLOCK; at += chunk) {
        const len = Math.min(chunk, nblocks * BLOCK - at)
        reads.push(
          dev.read(at, len).then((data) => {
            for (let i = 0; i < len / BLOCK; i++) {
              const block = at / BLOCK + i
              const got = writer(data, i, d, block)
              stats.blocksChecked++
              const want = durable[d][block]
              if (got === undefined || got < want) {
                bad++
                if (bad <= 10) t.log(`kill ${k} (${devModes[d]}): device ${d} block ${block}: read ${got === undefined ? 'garbage' : `write ${got}`}, durable ${want}`)
              } else if (got > want) {
                stats.newerThanDurable++
              }
              // The clean close below makes what was read durable.
              if (got !== undefined && got > want) durable[d][block] = got
            }
          }),
        )
      }
      await Promise.all(reads)
    }
    await reg.close()
  }
  t.log(JSON.stringify(stats))
  t.is(bad, 0, `${bad} blocks lost a flushed or FUA write, or were garbage`)
  t.is(stats.kills, KILLS)
  t.true(stats.durableReports > 0)
})
