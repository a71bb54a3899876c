// The child of registry-kill.spec.ts: registers a cache set and its backing devices (from the
// built package, dist/), then writes through the cached devices until it is killed, with up
// to 32 writes in flight, FUA writes now and then, a flush of each device every few writes
// and an occasional cache-mode switch. It reports on stdout, one JSON line each (a pipe is
// written synchronously on Linux, so a line printed is a line the parent gets):
//   {"t":"ready"}
//   {"t":"durable","d":<device>,"w":[[startBlock, blocks, id], ...]}
// a flush that resolved, with the writes that had resolved before it was made, or a FUA
// write that resolved. Every block written carries [id, device, block, check] in 16-byte
// units; ids grow with every write (from argv's base), so a block's id tells its age.
//
// argv: JSON {cache, backings: [path...], modes: [mode...], base, seed, order}
'use strict'
const { Registry } = require('../dist/index.js')
const { BLOCK, blocks } = require('./block-format.js')

const cfg = JSON.parse(process.argv[2])

let seed = cfg.seed >>> 0
function rand() {
  seed = (seed + 0x6d2b79f5) >>> 0
  let t = seed
  t = Math.imul(t ^ (t >>> 15), t | 1)
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

const say = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const MODES = ['writethrough', 'writeback', 'writearound', 'none']

async function main() {
  // Half the children write dirty data back at full speed while they run (the others at
  // bcache's pace, which in a run this short writes little back).
  const reg = new Registry(rand() < 0.5 ? { writeback: { percent: 0, delaySeconds: 0 } } : {})
  const devs = []
  if (cfg.order === 'cache-first') await reg.register(cfg.cache)
  for (const p of cfg.backings) devs.push(await reg.register(p))
  if (cfg.order !== 'cache-first') await reg.register(cfg.cache)
  devs.forEach((d, i) => (d.cacheMode = cfg.modes[i]))
  say({ t: 'ready' })
  const nblocks = Math.floor(devs[0].size / BLOCK)
  // Per device: writes resolved since the last flush was made, and whether one is in flight.
  const done = devs.map(() => [])
  const flushing = devs.map(() => false)
  let id = cfg.base
  let inflight = 0
  let wake
  for (let k = 0; ; k++) {
    const d = Math.floor(rand() * devs.length)
    const dev = devs[d]
    const n = 1 + Math.floor(rand() * 8)
    const start = rand() < 0.7 ? Math.floor(rand() * (256 - n)) : Math.floor(rand() * (nblocks - n))
    const w = ++id
    const fua = rand() < 0.1
    inflight++
    dev.write(start * BLOCK, blocks(w, d, start, n), { fua }).then(
      () => {
        inflight--
        done[d].push([start, n, w])
        if (fua) say({ t: 'durable', d, w: [[start, n, w]] })
        wake?.()
      },
      (err) => {
        console.error(`write ${w}: ${err.stack}`)
        process.exit(3)
      },
    )
    if (k % 12 === 11 && !flushing[d]) {
      const covered = done[d]
      done[d] = []
      flushing[d] = true
      dev.flush().then(
        () => {
          flushing[d] = false
          say({ t: 'durable', d, w: covered })
        },
        (err) => {
          console.error(`flush: ${err.stack}`)
          process.exit(3)
        },
      )
    }
    if (rand() < 0.003) dev.cacheMode = MODES[Math.floor(rand() * MODES.length)]
    while (inflight >= 24) await new Promise((r) => (wake = r))
  }
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err))
  process.exit(2)
})
