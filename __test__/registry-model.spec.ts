// Model-based interleavings through CachedDevice: random reads, writes, FUA writes, flushes,
// discards and cache-mode switches with many requests in flight, in every mode, restarts
// (a clean close and a new Registry) between rounds, registration in every order (a set
// registered while requests to its devices are in flight among them), each read checked
// against a flat model of each backing device.
//
// Every block written carries who wrote it: 16-byte units [write id, device, block, check]
// repeated over the block, so a read tells which write (0: the content put there before the
// first registration) each block came from, and a torn or misplaced block shows.
//
// Overlapping requests are served in the order they were made, so a read returns, block by
// block, what the newest write made before it wrote; a write or discard made after the read
// (while it is in flight) may be seen too. After a discard a block is undefined until
// written again.
import test, { type ExecutionContext } from 'ava'
import { readSuperblock, Registry, type CacheMode, type CachedDevice, type CacheSet } from '../ts/index'
import { BLOCK, blocks, describe, writer } from './block-format'
import { haveTools, nbdkit } from './nbd-helpers'
import { formatSet, rng, writeFileBytes } from './registry-helpers'

const modes: CacheMode[] = ['writethrough', 'writeback', 'writearound', 'none']
const ROUNDS = Number(process.env.UBCACHE_MODEL_ROUNDS ?? 10)
const OPS = Number(process.env.UBCACHE_MODEL_OPS ?? 500)

interface Model {
  /** Per block: the id of the newest write made to it (0: the initial content; -1: discarded, undefined). */
  last: Int32Array
}

interface WriteRecord {
  dev: number
  start: number
  end: number
}

test(`model: ${ROUNDS} rounds of ${OPS} random requests through CachedDevice, every mode, restarts between rounds`, async (t) => {
  await model(t, ROUNDS, 'local')
})

test(`model with remote backing devices (NBD exports of nbdkit): ${Math.ceil(ROUNDS / 2)} rounds of ${OPS} random requests, every mode`, async (t) => {
  if (!haveTools('nbdkit')) return t.pass()
  await model(t, Math.ceil(ROUNDS / 2), 'remote')
})

test(`model with existing devices (no superblock, cached as they are): ${Math.ceil(ROUNDS / 2)} rounds of ${OPS} random requests, every mode`, async (t) => {
  await model(t, Math.ceil(ROUNDS / 2), 'existing')
})

/**
 * The model run. `remote`: each backing file is served by nbdkit and registered by its NBD
 * URI; `existing`: the backing files lose their superblocks, hold data from offset 0, and
 * are attached as existing devices (by the UUIDs they got, after the first round).
 */
async function model(t: ExecutionContext, ROUNDS: number, kind: 'local' | 'remote' | 'existing'): Promise<void> {
  const watchdogs: NodeJS.Timeout[] = []
  try {
    await rounds(t, ROUNDS, kind, watchdogs)
  } finally {
    // A round that threw leaves its watchdog running: it would keep the worker alive.
    for (const w of watchdogs) clearInterval(w)
  }
}

async function rounds(t: ExecutionContext, ROUNDS: number, kind: 'local' | 'remote' | 'existing', watchdogs: NodeJS.Timeout[]): Promise<void> {
  const remote = kind === 'remote'
  const existing = kind === 'existing'
  t.timeout(600_000)
  const seed = Number(process.env.UBCACHE_MODEL_SEED ?? Date.now() % 1_000_000)
  t.log(`seed ${seed} (UBCACHE_MODEL_SEED to repeat)`)
  const rand = rng(seed)
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]
  const f = await formatSet(2, { backingBytes: 8 << 20 })
  const paths = remote ? await Promise.all(f.backings.map(async (p, i) => (await nbdkit(t, `${p}.${i}.sock`, ['file', p])).uri)) : f.backings
  const nblocks = ((8 << 20) - (existing ? 0 : 8192)) / BLOCK
  const uuids: (string | undefined)[] = f.backings.map(() => undefined)
  const models: Model[] = f.backings.map(() => ({ last: new Int32Array(nblocks) }))
  // The initial content, written at the data offset before any registration.
  // (Over the superblock, for existing devices.)
  f.backings.forEach((p, d) => writeFileBytes(p, existing ? 0 : f.sbs[d].dataOffset * 512, blocks(0, d, 0, nblocks)))
  const writes = new Map<number, WriteRecord>()
  /** Every write and discard, for the account of a read that did not match. */
  const history: { id: number; kind: string; dev: number; start: number; end: number; where: string; done: boolean }[] = []
  let nextId = 1
  let failures = 0
  const fail = (msg: string): void => {
    failures++
    if (failures <= 10) t.log(msg)
  }
  let cachedAtClose: number[] | undefined
  let closedModes: CacheMode[] | undefined
  const totals = { reads: 0, writes: 0, fua: 0, flushes: 0, discards: 0, switches: 0, hits: 0, plainOps: 0, cleaned: 0 }

  /** Checks `data`, read from `dev` at block `start` when the newest write was `maxId`, against what the model expected. */
  function check(d: number, start: number, data: Uint8Array, expected: Int32Array, maxId: number, what: string): void {
    for (let i = 0; i < expected.length; i++) {
      const want = expected[i]
      if (want === -1) continue
      const block = start + i
      const got = writer(data, i, d, block)
      if (got === want) continue
      const later = got !== undefined && got > maxId ? writes.get(got) : undefined
      if (later && later.dev === d && later.start <= block && block < later.end) continue
      // A read does not hold back writes and discards made after it (the engine orders
      // requests behind earlier writes and discards only): a later discard may show too.
      if (history.some((h) => h.kind === 'discard' && h.id > maxId && h.dev === d && h.start <= block && block < h.end)) continue
      const past = history
        .filter((h) => h.dev === d && h.start <= block && block < h.end && h.id > want - 400)
        .map((h) => `${h.kind} ${h.id} at ${h.where}${h.done ? '' : ' (in flight)'}`)
      fail(`${what}: device ${d} block ${block}: read ${got === undefined ? `garbage (${describe(data, i)})` : `write ${got}`}, expected write ${want} (newest id at submission ${maxId}); block history: ${past.join(', ')}`)
      return
    }
  }

  /** Reads every block of every device and checks it against the model, exactly (nothing in flight). */
  async function verifyAll(devs: CachedDevice[], what: string): Promise<void> {
    const chunk = 64 << 10
    await Promise.all(
      devs.map(async (dev, d) => {
        const reads: Promise<void>[] = []
        for (let at = 0; at < dev.size; at += chunk) {
          const len = Math.min(chunk, dev.size - at)
          const start = at / BLOCK
          const expected = models[d].last.slice(start, start + len / BLOCK)
          reads.push(dev.read(at, len).then((data) => check(d, start, data, expected, nextId - 1, what)))
        }
        await Promise.all(reads)
      }),
    )
  }

  for (let round = 0; round < ROUNDS; round++) {
    const reg = new Registry()
    // Round 1 always registers the set mid-stream, so every run serves requests without it.
    // Existing devices are attached to a registered set only.
    const order = round === 0 || existing ? 'cache-first' : round === 1 ? 'mid-stream' : pick(['cache-first', 'backing-first', 'mid-stream'] as const)
    let set: CacheSet | undefined
    let registering: Promise<CacheSet> | undefined
    const devs: CachedDevice[] = []
    let phase: [string, number] = ['starting', Date.now()]
    const inflight = new Set<Promise<unknown>>()
    /** What each request in flight is and when it was made, for the stall report. */
    const made = new Map<Promise<unknown>, [string, number]>()
    const track = (p: Promise<unknown>, what: string): void => {
      const q = p.then(
        () => undefined,
        (err) => fail(`${what}: ${String(err)}`),
      )
      inflight.add(q)
      made.set(q, [what, Date.now()])
      void q.then(() => {
        inflight.delete(q)
        made.delete(q)
      })
    }
    // A request in flight for 20 s is a hang: say which, and what the set and devices hold.
    const watchdog = setInterval(() => {
      const stuck = [...made.values()].filter(([, at]) => Date.now() - at > 20_000)
      if (stuck.length === 0 && Date.now() - phase[1] < 20_000) return
      const report = `round ${round}, ${phase[0]} for ${Date.now() - phase[1]} ms: ${stuck.length} requests in flight for over 20 s: ${stuck.map(([w]) => w).join('; ')}; devices: ${devs
        .map((d) => `${d.state} ${d.cacheMode} set ${d.set ? 'yes' : 'no'} (${d._describe()})`)
        .join('; ')}; set: ${set?._engine.describe() ?? 'none'}; registering: ${registering ? 'yes' : 'no'}`
      t.log(report)
      console.error(report)
    }, 5_000)
    watchdogs.push(watchdog)
    if (order === 'cache-first') set = await reg.registerCache(f.cache)
    if (existing) {
      const s = set as CacheSet
      // What the UUID table recorded at the last close, before the attaches look at it.
      const entries = s.existingDevices()
      for (const [d, p] of paths.entries()) devs.push(await reg.attachExisting(p, s, uuids[d] ? { uuid: uuids[d] } : {}))
      if (closedModes) {
        uuids.forEach((u, d) => {
          const e = entries.find((x) => x.uuid === u)
          // Dirty data found again was recorded so (a state of dirty with none found is the safe side).
          if ((devs[d].dirtySectors() ?? 0) > 0) t.is(e?.state, 'dirty', `round ${round}: device ${d} state in the UUID table`)
          else t.true(e?.state === 'clean' || e?.state === 'dirty', `round ${round}: device ${d} state in the UUID table: ${e?.state}`)
          t.is(e?.mode, closedModes?.[d], `round ${round}: device ${d} mode in the UUID table`)
        })
      }
      devs.forEach((dev, d) => (uuids[d] = dev.uuid))
    } else {
      for (const p of paths) devs.push(await reg.registerBacking(p))
    }
    if (order === 'backing-first') set = await reg.registerCache(f.cache)
    devs.forEach((dev, d) => (dev.cacheMode = modes[(round + d) % modes.length]))

    if (set) {
      for (const dev of devs) t.is(dev.set, set, `round ${round}: attached`)
      // Warm: the set kept what it held at the last clean close, and a full read hits it.
      if (cachedAtClose) {
        t.deepEqual(
          devs.map((d) => d.cachedSectors()),
          cachedAtClose,
          `round ${round}: cached sectors as at the last close`,
        )
      }
      const before = set.stats().hitSectors
      await verifyAll(devs, `round ${round} start`)
      const hit = set.stats().hitSectors - before
      if (cachedAtClose) t.true(hit >= cachedAtClose.reduce((a, b) => a + b, 0), `round ${round}: ${hit} sectors hit`)
      totals.hits += hit
    }

    const window = 16 + Math.floor(rand() * 17)
    const midAt = Math.floor(rand() * 200)
    for (let op = 0; op < OPS; op++) {
      phase = [`op ${op}`, Date.now()]
      if (order === 'mid-stream' && op === midAt && !registering) registering = reg.registerCache(f.cache)
      const d = Math.floor(rand() * devs.length)
      const dev = devs[d]
      const model = models[d]
      if (dev.set === null) totals.plainOps++
      const hot = rand() < 0.7
      const n = 1 + Math.floor(rand() * 16)
      const start = hot ? Math.floor(rand() * (256 - n)) : Math.floor(rand() * (nblocks - n))
      const at = start * BLOCK
      const r = rand()
      const what = `round ${round} op ${op} (${order}, ${dev.cacheMode})`
      if (r < 0.35) {
        totals.reads++
        const expected = model.last.slice(start, start + n)
        const maxId = nextId - 1
        if (rand() < 0.3) {
          const into = rand() < 0.5 ? dev.allocBuffer(n * BLOCK) : new Uint8Array(n * BLOCK)
          track(
            dev.readInto(into, at).then(() => check(d, start, into, expected, maxId, `${what} readInto`)),
            what,
          )
        } else {
          track(
            dev.read(at, n * BLOCK).then((data) => check(d, start, data, expected, maxId, `${what} read`)),
            what,
          )
        }
      } else if (r < 0.75) {
        const id = nextId++
        const fua = rand() < 0.15
        totals.writes++
        if (fua) totals.fua++
        writes.set(id, { dev: d, start, end: start + n })
        model.last.fill(id, start, start + n)
        const h = { id, kind: fua ? 'fua write' : 'write', dev: d, start, end: start + n, where: what, done: false }
        history.push(h)
        track(dev.write(at, blocks(id, d, start, n), { fua }).finally(() => (h.done = true)), `${what} write ${id}`)
      } else if (r < 0.84) {
        totals.flushes++
        track(dev.flush(), `${what} flush`)
      } else if (r < 0.92) {
        totals.discards++
        model.last.fill(-1, start, start + n)
        const h = { id: nextId++, kind: 'discard', dev: d, start, end: start + n, where: what, done: false }
        history.push(h)
        track(dev.discard(at, n * BLOCK).finally(() => (h.done = true)), `${what} discard`)
      } else {
        totals.switches++
        dev.cacheMode = pick(modes)
      }
      if (inflight.size >= window) {
        // A device holding dirty data waits for its set: do not wait for it before registering it.
        if (order === 'mid-stream' && !registering) registering = reg.registerCache(f.cache)
        await Promise.race(inflight)
      }
    }
    phase = ['registering the set', Date.now()]
    if (registering) set = await registering
    phase = ['waiting for the requests in flight', Date.now()]
    await Promise.all(inflight)
    phase = ['cleaning devices, verifying, closing', Date.now()]
    if (!set) throw new Error('no set')
    for (const dev of devs) t.is(dev.set, set, `round ${round}: attached at the end`)
    // Now and then a device is left clean with its hot region cached (discarded, then written
    // through): the next round may write it without its set (registration mid-stream), which
    // makes the set's copy stale.
    for (let d = 0; d < devs.length; d++) {
      if (rand() < 0.5) continue
      const dev = devs[d]
      models[d].last.fill(-1)
      await dev.discard(0, dev.size)
      dev.cacheMode = 'writethrough'
      const rewrites: Promise<void>[] = []
      for (let start = 0; start < 256; start += 16) {
        const id = nextId++
        writes.set(id, { dev: d, start, end: start + 16 })
        models[d].last.fill(id, start, start + 16)
        rewrites.push(dev.write(start * BLOCK, blocks(id, d, start, 16)))
      }
      await Promise.all(rewrites)
      totals.cleaned++
    }
    await verifyAll(devs, `round ${round} end`)
    closedModes = devs.map((d) => d.cacheMode)
    await reg.close()
    // The counts at the close (read-miss fills land after their reads resolve).
    cachedAtClose = devs.map((d) => d.cachedSectors() ?? 0)
    const dirty = devs.map((d) => d.dirtySectors() ?? 0)
    clearInterval(watchdog)
    for (let d = 0; d < devs.length; d++) {
      if (existing) {
        // Nothing but data was written: no superblock appeared.
        const err = await readSuperblock(f.backings[d]).then(() => undefined, (e: { code?: string }) => e)
        t.is(err?.code, 'NOT_BCACHE', `round ${round}: device ${d} still has no superblock`)
        continue
      }
      const sb = (await readSuperblock(f.backings[d])).sb
      t.is(sb.state, dirty[d] > 0 ? 'dirty' : 'clean', `round ${round}: device ${d} state`)
      t.is(sb.cacheMode, closedModes?.[d], `round ${round}: device ${d} mode`)
    }
  }
  t.log(JSON.stringify(totals))
  t.is(failures, 0, `${failures} reads did not match the model`)
  t.true(totals.plainOps > 0 || ROUNDS < 4 || existing)
}
