// A protocol fuzzer against `ubcache serve` run as a child process. Malformed handshakes, each
// on its own connection, and malformed requests on connections that finished a proper
// handshake (NBD_OPT_GO or NBD_OPT_EXPORT_NAME, with and without structured replies), all at
// once. Every answer is checked against what the NBD spec (NetworkBlockDevice/nbd
// doc/proto.md) names: the option reply or the error number, or a closed connection; never a
// crash, a hang, harm to the other connections, or a write applied without the client being
// told. A shadow of the whole export is kept (canary ranges that no valid write touches, and
// each connection's own range); at the end a fresh client (nbdcopy) reads the export back and
// every byte the shadow knows must match. Then nbdinfo and a write/read round trip, and the
// daemon must still stop with exit code 0.
//
// UBCACHE_FUZZ_CASES (default 100000) sets the number of cases, UBCACHE_FUZZ_SEED the seed
// (decimal or 0x hex; random otherwise, and printed). The numbers here are the spec's, written
// out again rather than imported from ts/nbd/protocol.ts, so that the test is an independent
// reading of it.
import { readFileSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import test from 'ava'
import { haveTools, MiB, makeDevices, must, serve } from './nbd-helpers'

const CASES = Math.max(1, Math.floor(Number(process.env.UBCACHE_FUZZ_CASES ?? 100_000)))
const SEED = process.env.UBCACHE_FUZZ_SEED !== undefined && process.env.UBCACHE_FUZZ_SEED !== '' ? Number(process.env.UBCACHE_FUZZ_SEED) >>> 0 : (Math.random() * 2 ** 32) >>> 0
/** The share of cases that are handshakes, each on its own connection. */
const HANDSHAKE_SHARE = 0.12
/** Handshake cases in flight at once. */
const HANDSHAKE_PARALLEL = 16
/** Connections in transmission fuzzed at once, each with its own range of the export. */
const WORKERS = 4
/** A reply not seen within this long is a hang. */
const HANG_MS = 15_000
/** A close that is due (the server has all it needs to decide) not seen within this long is a hang. */
const CLOSE_MS = 5_000

// ---------------------------------------------------------------------------------------
// The protocol's numbers (doc/proto.md).

const NBDMAGIC = 0x4e42444d41474943n
const IHAVEOPT = 0x49484156454f5054n
const OPT_REPLY_MAGIC = 0x3e889045565a9n
const REQUEST_MAGIC = 0x25609513
const SIMPLE_MAGIC = 0x67446698
const STRUCTURED_MAGIC = 0x668e33ef
const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11 }
const REP = { ACK: 1, SERVER: 2, INFO: 3, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_PLATFORM: 0x80000004, ERR_UNKNOWN: 0x80000006, ERR_TOO_BIG: 0x80000009 }
const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 }
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 }
const CMD_NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS', 'RESIZE']
const FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16, PAYLOAD_LEN: 32 }
const TFLAG = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, SEND_DF: 128, SEND_CACHE: 1024, SEND_FAST_ZERO: 2048 }
const REPLY_FLAG_DONE = 1
const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, ERROR: 0x8001, ERROR_OFFSET: 0x8002 }
const E = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 }
const ERRNO_NAMES = new Map(Object.entries(E).map(([k, v]) => [v, k]))
const ANY_ERROR = Object.values(E)
/** 2^25: the payload every server must take, and the maximum this one advertises. */
const MAX_PAYLOAD = 32 * MiB
/** Option data past this is refused (the server's documented cap; names are at most 4 KiB). */
const MAX_OPTION = 64 * 1024
const EMPTY = Buffer.alloc(0)

// ---------------------------------------------------------------------------------------
// A seeded generator (xoshiro128**, seeded by splitmix32): one stream per worker and per
// handshake case, so a case is rebuilt from the seed and its number.

class Rng {
  readonly #s = new Uint32Array(4)
  constructor(seed: number, stream: number) {
    let a = (seed ^ Math.imul(stream + 1, 0x9e3779b1)) | 0
    const next = (): number => {
      a = (a + 0x9e3779b9) | 0
      let z = a
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b)
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35)
      return (z ^ (z >>> 16)) >>> 0
    }
    for (let i = 0; i < 4; i++) this.#s[i] = next()
    for (let i = 0; i < 8; i++) this.u32()
  }
  u32(): number {
    const s = this.#s
    const x = Math.imul(s[1], 5)
    const r = Math.imul((x << 7) | (x >>> 25), 9) >>> 0
    const t = s[1] << 9
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = (s[3] << 11) | (s[3] >>> 21)
    return r
  }
  float(): number {
    return this.u32() / 2 ** 32
  }
  /** 0 ≤ result < n. */
  int(n: number): number {
    return Math.floor(this.float() * n)
  }
  chance(p: number): boolean {
    return this.float() < p
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]
  }
  weighted<K extends string>(table: Record<K, number>): K {
    const entries = Object.entries(table) as [K, number][]
    let total = 0
    for (const [, w] of entries) total += w
    let x = this.float() * total
    for (const [k, w] of entries) {
      x -= w
      if (x < 0) return k
    }
    return entries[entries.length - 1][0]
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n)
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff
    return b
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32())
  }
}

/** Random bytes that write payloads are cut from. */
const POOL = (() => {
  const r = new Rng(SEED, 0xf00d)
  const b = Buffer.allocUnsafe(4 * MiB)
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(r.u32(), i)
  return b
})()

function poolSlice(rng: Rng, n: number): Buffer {
  if (n <= POOL.length) {
    const at = rng.int(POOL.length - n + 1)
    return POOL.subarray(at, at + n)
  }
  const b = Buffer.allocUnsafe(n)
  for (let at = 0; at < n; at += POOL.length) POOL.copy(b, at, 0, Math.min(POOL.length, n - at))
  return b
}

// ---------------------------------------------------------------------------------------
// Encoders and names.

function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2)
  b.writeUInt16BE(v & 0xffff, 0)
  return b
}
function u32(v: number): Buffer {
  const b = Buffer.allocUnsafe(4)
  b.writeUInt32BE(v >>> 0, 0)
  return b
}

function optionBytes(option: number, data: Buffer, length = data.length, magic = IHAVEOPT): Buffer {
  const b = Buffer.allocUnsafe(16 + data.length)
  b.writeBigUInt64BE(magic, 0)
  b.writeUInt32BE(option >>> 0, 8)
  b.writeUInt32BE(length >>> 0, 12)
  data.copy(b, 16)
  return b
}

function requestHeader(flags: number, type: number, hi: number, lo: number, offset: bigint, length: number, magic = REQUEST_MAGIC): Buffer {
  const b = Buffer.allocUnsafe(28)
  b.writeUInt32BE(magic >>> 0, 0)
  b.writeUInt16BE(flags & 0xffff, 4)
  b.writeUInt16BE(type & 0xffff, 6)
  b.writeUInt32BE(hi >>> 0, 8)
  b.writeUInt32BE(lo >>> 0, 12)
  b.writeBigUInt64BE(BigInt.asUintN(64, offset), 16)
  b.writeUInt32BE(length >>> 0, 24)
  return b
}

function hex(b: Buffer, max = 64): string {
  const s = b.subarray(0, max).toString('hex')
  return b.length > max ? `${s}… (${b.length} bytes)` : s || '(none)'
}
const errnoName = (e: number): string => ERRNO_NAMES.get(e) ?? `error ${e}`
const cmdName = (t: number): string => CMD_NAMES[t] ?? `command ${t}`
const repName = (t: number): string => {
  for (const [k, v] of Object.entries(REP)) if (v === t) return `NBD_REP_${k}`
  return `reply type 0x${t.toString(16)}`
}
const optName = (o: number): string => {
  for (const [k, v] of Object.entries(OPT)) if (v === o) return `NBD_OPT_${k}`
  return `option ${o}`
}
const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))
const tick = (): Promise<void> => new Promise((r) => setImmediate(r))

// ---------------------------------------------------------------------------------------
// What went wrong, by kind: a count and the first example (with the bytes to reproduce it).

class Failures {
  readonly byCategory = new Map<string, { count: number; example: string }>()
  add(category: string, example: string): void {
    if (!this.byCategory.has(category) && this.byCategory.size >= 100) category = 'other failures (more than 100 kinds)'
    const f = this.byCategory.get(category)
    if (f) f.count++
    else this.byCategory.set(category, { count: 1, example })
  }
  get size(): number {
    return this.byCategory.size
  }
  count(category: string): number {
    return this.byCategory.get(category)?.count ?? 0
  }
  /** How long to wait for a close: not long once the same hang has been seen twice. */
  closeWait(hangCategory: string): number {
    return this.count(hangCategory) >= 2 ? 500 : CLOSE_MS
  }
  report(): string {
    const lines = [`seed ${SEED} (UBCACHE_FUZZ_SEED=${SEED} UBCACHE_FUZZ_CASES=${CASES} to run it again):`]
    for (const [c, f] of this.byCategory) lines.push(`  ${f.count}× ${c}\n      e.g. ${f.example}`)
    return lines.join('\n')
  }
}

// ---------------------------------------------------------------------------------------
// The shadow: what each byte of the export must read as, where known.

class Shadow {
  readonly data: Buffer
  readonly known: Uint8Array
  constructor(size: number) {
    this.data = Buffer.alloc(size)
    this.known = new Uint8Array(size)
  }
  write(off: number, b: Buffer): void {
    b.copy(this.data, off)
    this.known.fill(1, off, off + b.length)
  }
  zero(off: number, len: number): void {
    this.data.fill(0, off, off + len)
    this.known.fill(1, off, off + len)
  }
  forget(off: number, len: number): void {
    this.known.fill(0, off, off + len)
  }
  /** The first byte of `b` (read at `off`) that differs from a known byte, or -1. */
  mismatch(off: number, b: Buffer): number {
    const d = this.data
    const k = this.known
    for (let i = 0; i < b.length; i++) if (k[off + i] && d[off + i] !== b[i]) return i
    return -1
  }
}

/** The ranges of the export: canaries no valid write touches, the sentinel's, each worker's. */
interface Layout {
  size: number
  minBlock: number
  name: string
  tflags: number
  canA: [number, number]
  canB: [number, number]
  sentinel: [number, number]
  workers: [number, number][]
}

function regionOf(l: Layout, off: number): string {
  if (off < l.canA[1]) return 'canary A'
  if (off >= l.canB[0]) return 'canary B'
  if (off < l.sentinel[1]) return 'the sentinel range'
  const i = l.workers.findIndex(([a, b]) => off >= a && off < b)
  return `worker ${i}'s range`
}

// ---------------------------------------------------------------------------------------
// A connection's bytes as they arrive.

class Wire {
  readonly sock: net.Socket
  #chunks: Buffer[] = []
  #have = 0
  /** The server ended its side (or the socket closed). */
  ended = false
  closed = false
  readonly closedP: Promise<void>
  onBytes: (() => void) | undefined
  #wake: (() => void) | undefined

  constructor(path: string) {
    this.sock = net.connect(path)
    this.sock.on('data', (d: Buffer) => {
      this.#chunks.push(d)
      this.#have += d.length
      this.#notify()
    })
    this.sock.on('end', () => {
      this.ended = true
      this.#notify()
    })
    this.sock.on('error', () => {})
    this.closedP = new Promise((resolve) =>
      this.sock.on('close', () => {
        this.closed = true
        this.ended = true
        this.#notify()
        resolve()
      }),
    )
  }

  #notify(): void {
    this.onBytes?.()
    const w = this.#wake
    this.#wake = undefined
    w?.()
  }

  get avail(): number {
    return this.#have
  }

  /** Makes the first chunk at least `n` bytes (n ≤ avail). */
  #gather(n: number): Buffer {
    const c0 = this.#chunks[0]
    if (c0.length >= n) return c0
    let total = 0
    let k = 0
    while (total < n) total += this.#chunks[k++].length
    const merged = Buffer.concat(this.#chunks.slice(0, k), total)
    this.#chunks.splice(0, k, merged)
    return merged
  }

  /** At least the first `n` bytes, not consumed. */
  peek(n: number): Buffer {
    return this.#gather(n)
  }

  take(n: number): Buffer {
    if (n === 0) return EMPTY
    const c = this.#gather(n)
    const out = c.subarray(0, n)
    if (c.length === n) this.#chunks.shift()
    else this.#chunks[0] = c.subarray(n)
    this.#have -= n
    return out
  }

  takeAll(): Buffer {
    return this.take(this.#have)
  }

  /** Resolves at the next bytes or end; false after `ms` without either. */
  changed(ms: number): Promise<boolean> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#wake = undefined
        resolve(false)
      }, ms)
      this.#wake = () => {
        clearTimeout(timer)
        resolve(true)
      }
    })
  }

  /** The next `n` bytes; throws if the connection ends first or nothing comes for HANG_MS. */
  async need(n: number): Promise<Buffer> {
    while (this.#have < n) {
      if (this.ended) throw new Error(`the server closed the connection after ${this.#have} of ${n} bytes`)
      if (!(await this.changed(HANG_MS))) throw new Error(`no answer in ${HANG_MS} ms (${this.#have} of ${n} bytes)`)
    }
    return this.take(n)
  }

  async connected(): Promise<void> {
    if (!this.sock.connecting) return
    await new Promise<void>((resolve, reject) => {
      this.sock.once('connect', () => resolve())
      this.sock.once('error', reject)
    })
  }

  /** Resolves true once the server has closed (or the socket closed), false after `ms`. */
  async waitEnd(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms
    while (!this.ended) {
      const left = deadline - Date.now()
      if (left <= 0) return false
      await this.changed(left)
    }
    return true
  }
}

// ---------------------------------------------------------------------------------------
// Transmission: requests, what each may be answered with, and the replies checked as they come.

interface Req {
  kind: string
  type: number
  flags: number
  offset: bigint
  length: number
  hi: number
  lo: number
  head: Buffer
  payload?: Buffer
  /** Success is an acceptable answer. */
  ok: boolean
  /** Errors that are acceptable answers. */
  errs: readonly number[]
  /** May go unanswered when the server closes the connection (a write over the maximum). */
  optional?: boolean
  /** The shadow's update on success. */
  mutate?: 'write' | 'zero' | 'trim'
  /** A read whose data is compared with the shadow. */
  check?: boolean
  /** Gets the data of a successful read. */
  onData?: (b: Buffer) => void
  // Structured reply state.
  pieces?: [number, Buffer][]
  err?: number
}

interface Ctx {
  failures: Failures
  shadow: Shadow
  layout: Layout
  counts: { requests: number; connections: number; terminal: number; handshakes: number; unmodeled: number; replies: Record<string, number>; outcomes: Record<string, number> }
}

function describeReq(r: Req, structured: boolean): string {
  return `${cmdName(r.type)} flags 0x${r.flags.toString(16)} offset ${r.offset} length ${r.length} (${structured ? 'structured' : 'simple'} replies): request ${hex(r.head)}${r.payload ? ` + ${r.payload.length} payload bytes` : ''}`
}

class TxConn {
  readonly w: Wire
  readonly structured: boolean
  readonly size: number
  readonly tflags: number
  readonly ctx: Ctx
  readonly hi: number
  #lo = 1
  readonly pending = new Map<number, Req>()
  /** What was sent last, for reports of bytes nobody asked for: its kind and the bytes. */
  kind = 'batch'
  context = ''
  dead: string | undefined
  #settled: (() => void) | undefined

  constructor(w: Wire, structured: boolean, size: number, tflags: number, ctx: Ctx, hi: number) {
    this.w = w
    this.structured = structured
    this.size = size
    this.tflags = tflags
    this.ctx = ctx
    this.hi = hi
    w.onBytes = () => this.#parse()
    this.#parse()
  }

  nextLo(): number {
    return this.#lo++
  }

  #fail(r: Req, what: string): void {
    this.ctx.failures.add(`${r.kind} ${cmdName(r.type)} (${this.structured ? 'structured' : 'simple'} replies): ${what}`, describeReq(r, this.structured))
  }

  /** The server sent something that cannot be framed: give the connection up. */
  #desync(what: string): void {
    if (this.dead) return
    const bytes = this.w.takeAll()
    this.dead = what
    this.ctx.failures.add(`${this.kind}: ${what.replace(/\d{3,}/g, 'N')}`, `${what}; ${this.context}; the server sent ${hex(bytes)}`)
    this.w.sock.destroy()
    this.#wakeSettle()
  }

  #wakeSettle(): void {
    const s = this.#settled
    this.#settled = undefined
    s?.()
  }

  #parse(): void {
    const w = this.w
    while (!this.dead && w.avail >= 4) {
      const magic = w.peek(4).readUInt32BE(0)
      if (magic === SIMPLE_MAGIC) {
        if (w.avail < 16) break
        const h = w.peek(16)
        const err = h.readUInt32BE(4)
        const hi = h.readUInt32BE(8)
        const lo = h.readUInt32BE(12)
        const r = this.pending.get(lo)
        if (r === undefined || r.hi !== hi) {
          this.#desync(`a simple reply (error ${err}) for a cookie that is not in flight`)
          break
        }
        let data: Buffer | undefined
        if (r.type === CMD.READ && this.structured) {
          // "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early
          // NBD_EINVAL due to bad flags)".
          this.#fail(r, `a simple reply (${err ? errnoName(err) : 'success'}) to NBD_CMD_READ under structured replies`)
          this.pending.delete(lo)
          if (err === 0) {
            this.#desync('a simple reply to a read under structured replies')
            break
          }
          w.take(16)
          continue
        }
        if (r.type === CMD.READ && err === 0) {
          if (w.avail < 16 + r.length) break
          w.take(16)
          data = w.take(r.length)
        } else w.take(16)
        this.pending.delete(lo)
        this.#complete(r, err, data)
      } else if (magic === STRUCTURED_MAGIC) {
        if (!this.structured) {
          this.#desync('a structured reply chunk on a connection that did not negotiate them')
          break
        }
        if (w.avail < 20) break
        const h = w.peek(20)
        const flags = h.readUInt16BE(4)
        const type = h.readUInt16BE(6)
        const hi = h.readUInt32BE(8)
        const lo = h.readUInt32BE(12)
        const len = h.readUInt32BE(16)
        const r = this.pending.get(lo)
        if (r === undefined || r.hi !== hi) {
          this.#desync(`a structured chunk (type 0x${type.toString(16)}) for a cookie that is not in flight`)
          break
        }
        if (len > MAX_PAYLOAD + 64) {
          this.#desync(`a structured chunk of ${len} bytes`)
          break
        }
        if (w.avail < 20 + len) break
        w.take(20)
        const p = w.take(len)
        const problem = this.#chunk(r, flags, type, p)
        if (problem !== undefined) {
          this.#fail(r, problem)
          this.pending.delete(lo)
          this.#desync(problem)
          break
        }
        if (flags & REPLY_FLAG_DONE) {
          this.pending.delete(lo)
          this.#finishStructured(r)
        }
      } else {
        this.#desync(`a reply with magic 0x${magic.toString(16)}`)
        break
      }
    }
    if (this.pending.size === 0 || this.w.ended || this.dead) this.#wakeSettle()
  }

  /** Takes one chunk of a structured reply; what is wrong with it, if anything. */
  #chunk(r: Req, flags: number, type: number, p: Buffer): string | undefined {
    if (flags & ~REPLY_FLAG_DONE) return `a chunk with unknown flags 0x${flags.toString(16)}`
    const inRange = (off: bigint, n: number): boolean => off >= r.offset && off + BigInt(n) <= r.offset + BigInt(r.length)
    switch (type) {
      case CHUNK.NONE:
        if (p.length !== 0) return `an NBD_REPLY_TYPE_NONE chunk with ${p.length} bytes`
        if (!(flags & REPLY_FLAG_DONE)) return 'an NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE'
        return undefined
      case CHUNK.OFFSET_DATA: {
        if (r.type !== CMD.READ) return `an NBD_REPLY_TYPE_OFFSET_DATA chunk for ${cmdName(r.type)}`
        if (p.length < 9) return `an NBD_REPLY_TYPE_OFFSET_DATA chunk of ${p.length} bytes (at least 9)`
        const off = p.readBigUInt64BE(0)
        if (!inRange(off, p.length - 8)) return `data at ${off} (${p.length - 8} bytes) outside the request`
        ;(r.pieces ??= []).push([Number(off - r.offset), p.subarray(8)])
        return undefined
      }
      case CHUNK.OFFSET_HOLE: {
        if (r.type !== CMD.READ) return `an NBD_REPLY_TYPE_OFFSET_HOLE chunk for ${cmdName(r.type)}`
        if (p.length !== 12) return `an NBD_REPLY_TYPE_OFFSET_HOLE chunk of ${p.length} bytes`
        const off = p.readBigUInt64BE(0)
        const n = p.readUInt32BE(8)
        if (n === 0 || !inRange(off, n)) return `a hole at ${off} (${n} bytes) outside the request`
        ;(r.pieces ??= []).push([Number(off - r.offset), Buffer.alloc(n)])
        return undefined
      }
      case CHUNK.ERROR:
      case CHUNK.ERROR_OFFSET: {
        if (p.length < 6) return `an error chunk of ${p.length} bytes`
        const e = p.readUInt32BE(0)
        const m = p.readUInt16BE(4)
        const want = 6 + m + (type === CHUNK.ERROR_OFFSET ? 8 : 0)
        if (p.length !== want) return `an error chunk of ${p.length} bytes whose message says ${want}`
        if (e === 0) return 'an error chunk with error 0'
        r.err ??= e
        return undefined
      }
      default:
        if (type & 0x8000 && p.length >= 4 && p.readUInt32BE(0) !== 0) {
          r.err ??= p.readUInt32BE(0)
          return undefined
        }
        return `a chunk of unknown type 0x${type.toString(16)}`
    }
  }

  #finishStructured(r: Req): void {
    if (r.err !== undefined) return this.#complete(r, r.err, undefined)
    if (r.type !== CMD.READ) return this.#complete(r, 0, undefined)
    const pieces = (r.pieces ?? []).sort((a, b) => a[0] - b[0])
    let at = 0
    for (const [off, b] of pieces) {
      if (off !== at) return this.#fail(r, off < at ? 'overlapping data chunks' : `no data for bytes ${at}..${off} of a read that succeeded`)
      at += b.length
    }
    if (at !== r.length) return this.#fail(r, `data for ${at} of ${r.length} bytes of a read that succeeded`)
    this.#complete(r, 0, pieces.length === 1 ? pieces[0][1] : Buffer.concat(pieces.map((x) => x[1])))
  }

  #complete(r: Req, err: number, data: Buffer | undefined): void {
    const ctx = this.ctx
    const key = err === 0 ? 'ok' : errnoName(err)
    ctx.counts.replies[key] = (ctx.counts.replies[key] ?? 0) + 1
    const expected = `${r.ok ? (r.errs.length ? 'success or ' : 'success') : ''}${r.errs.length === ANY_ERROR.length ? 'any error' : r.errs.map(errnoName).join(' or ')}`
    const off = Number(r.offset)
    if (err === 0) {
      if (!r.ok) {
        this.#fail(r, `expected ${expected}, got success`)
        // A refused write that was applied after all: the final comparison shows what it did.
        return
      }
      if (r.type === CMD.READ) {
        const b = data ?? EMPTY
        if (b.length !== r.length) return this.#fail(r, `a read of ${r.length} bytes returned ${b.length}`)
        r.onData?.(b)
        if (r.check) {
          const i = ctx.shadow.mismatch(off, b)
          if (i >= 0) {
            this.#fail(r, `read data differs from what was written (in ${regionOf(ctx.layout, off + i)})`)
            ctx.failures.add(
              'data: a read returned bytes that differ from the shadow',
              `at ${off + i} (${regionOf(ctx.layout, off + i)}): read ${hex(b.subarray(i, i + 16))}, expected ${hex(ctx.shadow.data.subarray(off + i, off + i + 16))}`,
            )
            ctx.shadow.forget(off, r.length)
          }
        }
      }
      if (r.mutate === 'write' && r.payload) ctx.shadow.write(off, r.payload)
      else if (r.mutate === 'zero') ctx.shadow.zero(off, r.length)
      else if (r.mutate === 'trim') ctx.shadow.forget(off, r.length)
      return
    }
    if (!r.errs.includes(err)) {
      this.#fail(r, `expected ${expected}, got ${errnoName(err)}`)
      // A valid request that failed unexpectedly leaves its range unknown.
      if (r.mutate !== undefined && r.ok) ctx.shadow.forget(off, r.length)
    }
  }

  /** Sends requests (registered as in flight first), in one write or in pieces. */
  async send(reqs: Req[], extra: Buffer | undefined, rng: Rng | undefined): Promise<void> {
    const parts: Buffer[] = []
    for (const r of reqs) {
      this.pending.set(r.lo, r)
      parts.push(r.head)
      if (r.payload && r.payload.length) parts.push(r.payload)
    }
    if (extra) parts.push(extra)
    const all = Buffer.concat(parts)
    this.ctx.counts.requests += reqs.length
    if (rng === undefined || !rng.chance(0.15) || all.length < 2) {
      this.w.sock.write(all)
      return
    }
    // In pieces, cut anywhere (inside headers too), a turn of the event loop apart.
    let at = 0
    while (at < all.length && !this.w.closed) {
      const n = 1 + rng.int(rng.chance(0.5) ? 40 : 5000)
      this.w.sock.write(all.subarray(at, at + n))
      at += n
      if (rng.chance(0.3)) await tick()
    }
  }

  /** Resolves once nothing is in flight; or says what went wrong. */
  async settle(): Promise<'ok' | 'dead' | 'closed' | 'timeout'> {
    const deadline = Date.now() + HANG_MS
    for (;;) {
      if (this.dead) return 'dead'
      if (this.pending.size === 0) return 'ok'
      if (this.w.ended) {
        this.#parse()
        if (this.pending.size === 0) return 'ok'
        return 'closed'
      }
      const left = deadline - Date.now()
      if (left <= 0) return 'timeout'
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left)
        this.#settled = () => {
          clearTimeout(timer)
          resolve()
        }
      })
    }
  }

  /** Reports the requests still in flight (after a close or a timeout). */
  reportUnanswered(why: string): void {
    for (const r of this.pending.values()) {
      if (r.optional) continue
      this.#fail(r, why)
    }
    this.pending.clear()
  }
}

/** A proper handshake (varied: structured or not, GO or EXPORT_NAME, with INFO and LIST first or not). */
async function openClient(path: string, rng: Rng, ctx: Ctx, opts: { structured?: boolean; exportName?: boolean } = {}): Promise<TxConn> {
  const l = ctx.layout
  const w = new Wire(path)
  const fail = (what: string): never => {
    w.sock.destroy()
    throw new Error(`a well-formed handshake failed: ${what}`)
  }
  try {
    await w.connected()
    const hello = await w.need(18)
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) fail(`greeting ${hex(hello)}`)
    const sflags = hello.readUInt16BE(16)
    if (!(sflags & 1)) fail('the server does not offer fixed newstyle')
    const noZeroes = (sflags & 2) !== 0 && rng.chance(0.5)
    w.sock.write(u32(1 | (noZeroes ? 2 : 0)))
    const reply = async (option: number): Promise<{ type: number; data: Buffer }> => {
      const h = await w.need(20)
      if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC || h.readUInt32BE(8) !== option) fail(`option reply ${hex(h)} to ${optName(option)}`)
      return { type: h.readUInt32BE(12), data: await w.need(h.readUInt32BE(16)) }
    }
    const structured = opts.structured ?? rng.chance(0.5)
    if (structured) {
      w.sock.write(optionBytes(OPT.STRUCTURED_REPLY, EMPTY))
      const r = await reply(OPT.STRUCTURED_REPLY)
      if (r.type !== REP.ACK) fail(`NBD_OPT_STRUCTURED_REPLY answered ${repName(r.type)}`)
    }
    const name = Buffer.from(l.name)
    const infoRequest = (infos: number[]): Buffer => Buffer.concat([u32(name.length), name, u16(infos.length), ...infos.map(u16)])
    if (rng.chance(0.05)) {
      w.sock.write(optionBytes(OPT.LIST, EMPTY))
      for (;;) {
        const r = await reply(OPT.LIST)
        if (r.type === REP.ACK) break
        if (r.type !== REP.SERVER) fail(`NBD_OPT_LIST answered ${repName(r.type)}`)
      }
    }
    if (rng.chance(0.05)) {
      w.sock.write(optionBytes(OPT.INFO, infoRequest([INFO.BLOCK_SIZE])))
      for (;;) {
        const r = await reply(OPT.INFO)
        if (r.type === REP.ACK) break
        if (r.type !== REP.INFO) fail(`NBD_OPT_INFO answered ${repName(r.type)}`)
      }
    }
    let size = -1
    let tflags = -1
    if (opts.exportName ?? rng.chance(0.15)) {
      w.sock.write(optionBytes(OPT.EXPORT_NAME, name))
      const b = await w.need(noZeroes ? 10 : 134)
      size = Number(b.readBigUInt64BE(0))
      tflags = b.readUInt16BE(8)
    } else {
      const infos = rng.pick([[INFO.BLOCK_SIZE], [], [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE]])
      w.sock.write(optionBytes(OPT.GO, infoRequest(infos)))
      for (;;) {
        const r = await reply(OPT.GO)
        if (r.type === REP.ACK) break
        if (r.type !== REP.INFO) fail(`NBD_OPT_GO answered ${repName(r.type)}: ${r.data.toString()}`)
        if (r.data.length >= 12 && r.data.readUInt16BE(0) === INFO.EXPORT) {
          size = Number(r.data.readBigUInt64BE(2))
          tflags = r.data.readUInt16BE(10)
        }
      }
    }
    if (size !== l.size || tflags !== l.tflags) fail(`export size ${size} flags 0x${tflags.toString(16)}, expected ${l.size} and 0x${l.tflags.toString(16)}`)
    ctx.counts.connections++
    return new TxConn(w, structured, size, tflags, ctx, rng.u32())
  } catch (err) {
    w.sock.destroy()
    throw err
  }
}

/** The flags a command may carry, given the transmission flags (FUA is valid on every command). */
function validFlags(type: number, tflags: number): number {
  let f = tflags & TFLAG.SEND_FUA ? FLAG.FUA : 0
  if (type === CMD.WRITE_ZEROES) {
    f |= FLAG.NO_HOLE
    if (tflags & TFLAG.SEND_FAST_ZERO) f |= FLAG.FAST_ZERO
  }
  if (type === CMD.READ && tflags & TFLAG.SEND_DF) f |= FLAG.DF
  return f
}

const TX_KINDS = {
  read: 12,
  'read-fua': 2,
  write: 12,
  zeroes: 4,
  trim: 3,
  flush: 2,
  'flush-nonzero': 1,
  cache: 2,
  unknown: 8,
  'bad-flags': 10,
  'read-past-end': 5,
  'write-past-end': 5,
  'trim-past-end': 3,
  'zeroes-past-end': 3,
  'cache-past-end': 1,
  'zero-length': 4,
  'read-over-max': 3,
  'no-payload-over-max': 2,
  'huge-offset': 4,
}

const TERMINAL_KINDS = {
  'bad-magic': 4,
  'option-after-go': 2,
  'truncated-header': 3,
  'write-cut-short': 3,
  'write-over-max': 1,
  disc: 2,
  'disc-fua': 1,
  'hard-close': 1,
  garbage: 1,
}

/** One connection's worth of fuzzing at a time, over its own range of the export. */
class TxFuzzer {
  readonly rng: Rng
  readonly ctx: Ctx
  readonly lo: number
  readonly hi: number
  readonly path: string
  c: TxConn | undefined
  /** Ranges of this batch's valid writes, zeroes and trims, and of its checked reads. */
  #muts: [number, number][] = []
  #reads: [number, number][] = []

  constructor(id: number, ctx: Ctx, path: string) {
    this.rng = new Rng(SEED, 1000 + id)
    this.ctx = ctx
    ;[this.lo, this.hi] = ctx.layout.workers[id]
    this.path = path
  }

  get #l(): Layout {
    return this.ctx.layout
  }

  #unaligned(off: number | bigint, len: number): boolean {
    const bs = this.#l.minBlock
    return BigInt(off) % BigInt(bs) !== 0n || len % bs !== 0
  }

  #req(kind: string, type: number, flags: number, offset: bigint | number, length: number, o: Partial<Req> & { ok: boolean; errs: readonly number[] }): Req {
    const c = this.c as TxConn
    const lo = c.nextLo()
    const head = requestHeader(flags, type, c.hi, lo, BigInt(offset), length)
    return { kind, type, flags, offset: BigInt(offset), length, hi: c.hi, lo, head, ...o }
  }

  /** A range inside [lo, hi): block-aligned or not, small mostly, at the edges sometimes. */
  #range(lo: number, hi: number, big = MiB): [number, number] {
    const rng = this.rng
    const bs = this.#l.minBlock
    const span = hi - lo
    const r = rng.float()
    if (r < 0.5) {
      const len = Math.min(bs * (1 + rng.int(rng.chance(0.9) ? 8 : 64)), Math.floor(span / bs) * bs)
      const first = Math.ceil(lo / bs) * bs
      const last = Math.floor((hi - len) / bs) * bs
      if (len > 0 && last >= first) return [first + bs * rng.int((last - first) / bs + 1), len]
    }
    const len = Math.min(span, r < 0.8 ? 1 + rng.int(600) : r < 0.97 ? 1 + rng.int(20_000) : 1 + rng.int(big))
    const e = rng.float()
    const off = e < 0.08 ? lo : e < 0.16 ? hi - len : lo + rng.int(span - len + 1)
    return [off, len]
  }

  #free(a: number, b: number, mutating: boolean): boolean {
    for (const [x, y] of this.#muts) if (a < y && x < b) return false
    if (mutating) for (const [x, y] of this.#reads) if (a < y && x < b) return false
    return true
  }

  /** A range of this worker's own that no other request of the batch conflicts with, claimed. */
  #claim(mutating: boolean): [number, number] | undefined {
    for (let i = 0; i < 6; i++) {
      const [off, len] = this.#range(this.lo, this.hi)
      if (!this.#free(off, off + len, mutating)) continue
      ;(mutating ? this.#muts : this.#reads).push([off, off + len])
      return [off, len]
    }
    return undefined
  }

  /** Any range a read may check: a canary (nothing valid writes there) or one of this worker's own. */
  #readable(): [number, number] | undefined {
    if (this.rng.chance(0.3)) {
      const [a, b] = this.rng.pick([this.#l.canA, this.#l.canB])
      return this.#range(a, b)
    }
    return this.#claim(false)
  }

  /** Any in-range place: own range or a canary (refused requests only). */
  #anywhere(): [number, number] {
    const l = this.#l
    const [a, b] = this.rng.pick([l.canA, l.canB, [this.lo, this.hi] as [number, number]])
    return this.#range(a, b)
  }

  /** An offset past (or at) the end, or far past it. */
  #pastEnd(len: () => number, maxLen: number): [bigint, number] {
    const rng = this.rng
    const size = this.#l.size
    const x = rng.float()
    if (x < 0.6) {
      // Starts inside canary B (or at the end), runs past the end.
      const off = size - rng.int(Math.min(64 * 1024, size - this.#l.canB[0]) + 1)
      const n = Math.min(maxLen, size - off + 1 + Math.min(len(), 64 * 1024))
      return [BigInt(off), n]
    }
    if (x < 0.9) return [BigInt(size + rng.int(MiB)), Math.min(maxLen, len())]
    return [BigInt(size) + BigInt(rng.u32()) * 4096n, Math.min(maxLen, len())]
  }

  #small(): number {
    const rng = this.rng
    return rng.chance(0.5) ? this.#l.minBlock * (1 + rng.int(4)) : 1 + rng.int(rng.chance(0.9) ? 8192 : MiB)
  }

  /** One request that keeps the framing (the connection carries on after it). */
  #gen(): Req {
    const rng = this.rng
    const l = this.#l
    const c = this.c as TxConn
    const kind = rng.weighted(TX_KINDS)
    const fua = l.tflags & TFLAG.SEND_FUA ? FLAG.FUA : 0
    switch (kind) {
      case 'read':
      case 'read-fua': {
        const rg = this.#readable()
        if (!rg) break
        const [off, len] = rg
        return this.#req(kind, CMD.READ, kind === 'read-fua' ? fua : 0, off, len, { ok: true, errs: this.#unaligned(off, len) ? [E.EINVAL] : [], check: true })
      }
      case 'write': {
        const rg = this.#claim(true)
        if (!rg) break
        const [off, len] = rg
        return this.#req(kind, CMD.WRITE, rng.chance(0.3) ? fua : 0, off, len, { ok: true, errs: this.#unaligned(off, len) ? [E.EINVAL] : [], mutate: 'write', payload: poolSlice(rng, len) })
      }
      case 'zeroes': {
        const rg = this.#claim(true)
        if (!rg) break
        const [off, len] = rg
        return this.#req(kind, CMD.WRITE_ZEROES, rng.pick([0, fua, FLAG.NO_HOLE, fua | FLAG.NO_HOLE]), off, len, { ok: true, errs: this.#unaligned(off, len) ? [E.EINVAL] : [], mutate: 'zero' })
      }
      case 'trim': {
        const rg = this.#claim(true)
        if (!rg) break
        const [off, len] = rg
        return this.#req(kind, CMD.TRIM, rng.pick([0, fua]), off, len, { ok: true, errs: this.#unaligned(off, len) ? [E.EINVAL] : [], mutate: 'trim' })
      }
      case 'flush':
        return this.#req(kind, CMD.FLUSH, rng.pick([0, fua]), 0, 0, { ok: true, errs: [] })
      case 'flush-nonzero':
        // The client MUST send zeros; a server may refuse or ignore them.
        return this.#req(kind, CMD.FLUSH, 0, rng.int(l.size), 1 + rng.int(MiB), { ok: true, errs: [E.EINVAL] })
      case 'cache': {
        // A server may answer NBD_CMD_CACHE with EINVAL always (the spec says so).
        const [off, len] = this.#anywhere()
        return this.#req(kind, CMD.CACHE, rng.pick([0, fua]), off, len, { ok: true, errs: [E.EINVAL] })
      }
      case 'unknown': {
        const type = rng.chance(0.3) ? rng.pick([CMD.BLOCK_STATUS, 8, 9, 10, 11, 12, 0x7fff, 0x8000, 0xffff]) : 7 + rng.int(0xffff - 7 + 1)
        const offset = rng.chance(0.7) ? BigInt(rng.int(l.size)) : rng.u64()
        const length = rng.chance(0.5) ? rng.int(65536) : rng.u32()
        return this.#req(kind, type, rng.chance(0.5) ? 0 : rng.u32() & 0xffff, offset, length, { ok: false, errs: [E.EINVAL] })
      }
      case 'bad-flags': {
        const type = rng.pick([CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.FLUSH, CMD.CACHE])
        const valid = validFlags(type, l.tflags)
        let bad = 0
        while (bad === 0) bad = (rng.chance(0.6) ? 1 << rng.int(16) : rng.u32() & 0xffff) & ~valid
        const flags = bad | (rng.u32() & valid)
        const [off, len] = type === CMD.FLUSH ? [0, 0] : this.#anywhere()
        // DF is documented for reads, only not offered here: ignoring it would do no harm.
        const ok = type === CMD.READ && bad === FLAG.DF
        return this.#req(kind, type, flags, off, len, { ok, errs: [E.EINVAL], payload: type === CMD.WRITE ? poolSlice(rng, len) : undefined })
      }
      case 'read-past-end': {
        const [off, len] = this.#pastEnd(() => this.#small(), MAX_PAYLOAD)
        return this.#req(kind, CMD.READ, 0, off, len, { ok: false, errs: [E.EINVAL] })
      }
      case 'write-past-end': {
        const [off, len] = this.#pastEnd(() => this.#small(), 2 * MiB)
        return this.#req(kind, CMD.WRITE, rng.pick([0, fua]), off, len, { ok: false, errs: this.#unaligned(off, len) ? [E.ENOSPC, E.EINVAL] : [E.ENOSPC], payload: poolSlice(rng, len) })
      }
      case 'trim-past-end': {
        const [off, len] = this.#pastEnd(() => this.#small(), MAX_PAYLOAD)
        // "It SHOULD return NBD_EINVAL if it receives a read or trim request including one or
        // more sectors beyond the size of the device."
        return this.#req(kind, CMD.TRIM, rng.pick([0, fua]), off, len, { ok: false, errs: [E.EINVAL] })
      }
      case 'zeroes-past-end': {
        const [off, len] = this.#pastEnd(() => this.#small(), MAX_PAYLOAD)
        return this.#req(kind, CMD.WRITE_ZEROES, rng.pick([0, fua, FLAG.NO_HOLE]), off, len, { ok: false, errs: this.#unaligned(off, len) ? [E.ENOSPC, E.EINVAL] : [E.ENOSPC] })
      }
      case 'cache-past-end': {
        const [off, len] = this.#pastEnd(() => this.#small(), MAX_PAYLOAD)
        return this.#req(kind, CMD.CACHE, 0, off, len, { ok: false, errs: ANY_ERROR })
      }
      case 'zero-length': {
        // Unspecified, but the server SHOULD NOT disconnect.
        const type = rng.pick([CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE])
        const off = rng.chance(0.1) ? l.size : this.#anywhere()[0]
        return this.#req(kind, type, 0, off, 0, { ok: true, errs: ANY_ERROR })
      }
      case 'read-over-max': {
        const len = rng.chance(0.3) ? rng.pick([MAX_PAYLOAD + 1, 2 ** 32 - 1, 2 ** 31, 64 * MiB]) : MAX_PAYLOAD + 1 + rng.int(2 ** 32 - MAX_PAYLOAD - 1)
        const off = rng.chance(0.5) ? 0n : rng.chance(0.7) ? BigInt(rng.int(l.size)) : rng.u64()
        return this.#req(kind, CMD.READ, 0, off, len, { ok: false, errs: c.structured ? [E.EOVERFLOW, E.EINVAL] : [E.EINVAL] })
      }
      case 'no-payload-over-max': {
        const type = rng.pick([CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE])
        const len = MAX_PAYLOAD + 1 + rng.int(2 ** 32 - MAX_PAYLOAD - 1)
        const off = rng.chance(0.6) ? 0n : BigInt(rng.int(l.size))
        const errs = type === CMD.TRIM ? [E.EINVAL, E.EOVERFLOW] : type === CMD.WRITE_ZEROES ? [E.ENOSPC, E.EINVAL, E.EOVERFLOW] : ANY_ERROR
        return this.#req(kind, type, 0, off, len, { ok: false, errs })
      }
      case 'huge-offset': {
        const type = rng.pick([CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE])
        let len = 1 + rng.int(8192)
        let off: bigint
        const v = rng.int(6)
        if (v === 0) off = 2n ** 63n
        else if (v === 1) off = 2n ** 64n - 1n
        else if (v === 2) {
          // Wraps around 2^64 into canary A, for a server adding in 64 bits.
          off = 2n ** 64n - BigInt(l.minBlock * (1 + rng.int(4)))
          len = Number(2n ** 64n - off) + l.minBlock * (1 + rng.int(8))
        } else if (v === 3) off = 2n ** 53n + 1n
        else if (v === 4) off = BigInt(l.size) + 2n ** 32n
        else off = rng.u64() | 2n ** 62n
        const unal = this.#unaligned(off, len)
        const errs = {
          [CMD.READ]: [E.EINVAL],
          [CMD.WRITE]: unal ? [E.ENOSPC, E.EINVAL] : [E.ENOSPC],
          [CMD.TRIM]: [E.EINVAL],
          [CMD.WRITE_ZEROES]: unal ? [E.ENOSPC, E.EINVAL] : [E.ENOSPC],
          [CMD.CACHE]: ANY_ERROR,
        }[type] as number[]
        return this.#req(kind, type, 0, off, len, { ok: false, errs, payload: type === CMD.WRITE ? poolSlice(rng, len) : undefined })
      }
    }
    // No free range for a valid request this batch: an unknown command instead.
    return this.#req('unknown', 100 + rng.int(1000), 0, 0, 0, { ok: false, errs: [E.EINVAL] })
  }

  async #connect(): Promise<boolean> {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        this.c = await openClient(this.path, this.rng, this.ctx)
        return true
      } catch (err) {
        this.ctx.failures.add('a well-formed handshake failed', `${(err as Error).message}`)
        if (this.ctx.failures.byCategory.get('a well-formed handshake failed')!.count > 20) return false
        await delay(100)
      }
    }
    return false
  }

  /** Runs `cases` cases; stops early if the server cannot be reached. */
  async run(cases: number, alive: () => boolean): Promise<void> {
    let done = 0
    while (done < cases && alive()) {
      if (this.c === undefined && !(await this.#connect())) return
      const c = this.c as TxConn
      const n = Math.min(cases - done, 1 + this.rng.int(48))
      this.#muts = []
      this.#reads = []
      const reqs: Req[] = []
      for (let i = 0; i < n; i++) reqs.push(this.#gen())
      c.kind = 'batch'
      c.context = `a batch of ${n} requests`
      await c.send(reqs, undefined, this.rng)
      done += n
      const how = await c.settle()
      if (how !== 'ok') {
        if (how === 'timeout') c.reportUnanswered(`no reply in ${HANG_MS} ms (a hang)`)
        if (how === 'closed') c.reportUnanswered('the server closed the connection without replying')
        c.w.sock.destroy()
        this.c = undefined
        continue
      }
      if (done < cases && this.rng.chance(0.12)) {
        await this.#terminal(c)
        done++
        this.ctx.counts.terminal++
        c.w.sock.destroy()
        this.c = undefined
      }
    }
    if (this.c) {
      // A clean end: NBD_CMD_DISC, and the server closes.
      const c = this.c
      c.kind = 'disc'
      c.context = 'NBD_CMD_DISC'
      c.w.sock.write(requestHeader(0, CMD.DISC, c.hi, c.nextLo(), 0n, 0))
      if (!(await c.w.waitEnd(HANG_MS))) this.ctx.failures.add('disc: the server did not close after NBD_CMD_DISC', `${HANG_MS} ms`)
      c.w.sock.destroy()
      this.c = undefined
    }
  }

  /** One case that ends the connection; checks what the server sends before it closes. */
  async #terminal(c: TxConn): Promise<void> {
    const rng = this.rng
    const l = this.#l
    const kind = rng.weighted(TERMINAL_KINDS)
    const lo = c.nextLo()
    let bytes: Buffer
    let reqs: Req[] = []
    let end = false
    switch (kind) {
      case 'bad-magic': {
        const magic = rng.pick([0x12560953, SIMPLE_MAGIC, STRUCTURED_MAGIC, 0x21e41c71, 0x25609514, (REQUEST_MAGIC ^ (1 << rng.int(32))) >>> 0, rng.u32(), 0])
        const [off, len] = this.#anywhere()
        const type = rng.pick([CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.FLUSH])
        bytes = requestHeader(0, type, c.hi, lo, BigInt(off), len, magic === REQUEST_MAGIC ? 0 : magic)
        // A write's payload too, over a canary or this worker's range: nothing may land.
        if (type === CMD.WRITE && rng.chance(0.5)) bytes = Buffer.concat([bytes, poolSlice(rng, len)])
        break
      }
      case 'option-after-go': {
        const name = Buffer.from(l.name)
        // A client that runs the handshake again: one option, short (under the 28 bytes of a
        // request header) or not, or the whole sequence.
        const infos = Array.from({ length: rng.int(4) }, () => u16(rng.int(4)))
        const go = (opt: number): Buffer => optionBytes(opt, Buffer.concat([u32(name.length), name, u16(infos.length), ...infos]))
        const opt = rng.pick([OPT.GO, OPT.INFO, OPT.LIST, OPT.ABORT, OPT.STRUCTURED_REPLY, OPT.EXPORT_NAME, 0])
        if (opt === 0) bytes = Buffer.concat([optionBytes(OPT.STRUCTURED_REPLY, EMPTY), go(OPT.GO)])
        else bytes = opt === OPT.GO || opt === OPT.INFO ? go(opt) : optionBytes(opt, opt === OPT.EXPORT_NAME ? name : EMPTY)
        break
      }
      case 'truncated-header': {
        const [off, len] = this.#anywhere()
        bytes = requestHeader(0, rng.pick([CMD.READ, CMD.WRITE, CMD.DISC, CMD.FLUSH]), c.hi, lo, BigInt(off), len).subarray(0, 1 + rng.int(27))
        end = true
        break
      }
      case 'write-cut-short': {
        // Over a canary or this worker's range (not claimed: it must not land).
        const [off, len] = rng.chance(0.6) ? this.#range(...rng.pick([l.canA, l.canB]), 2 * MiB) : this.#range(this.lo, this.hi, 2 * MiB)
        const sent = rng.int(len)
        bytes = Buffer.concat([requestHeader(rng.pick([0, FLAG.FUA]), CMD.WRITE, c.hi, lo, BigInt(off), len), poolSlice(rng, sent)])
        end = true
        break
      }
      case 'write-over-max': {
        const len = MAX_PAYLOAD + 1 + rng.int(2 ** 32 - MAX_PAYLOAD - 1)
        const [off] = this.#anywhere()
        const r = this.#req(kind, CMD.WRITE, 0, off, len, { ok: false, errs: [E.EINVAL, E.EOVERFLOW, E.ENOSPC], optional: true })
        reqs = [r]
        bytes = poolSlice(rng, rng.int(4096))
        break
      }
      case 'disc': {
        // Requests in flight first: each must be answered before the close.
        this.#muts = []
        this.#reads = []
        const k = rng.chance(0.5) ? 0 : 1 + rng.int(16)
        for (let i = 0; i < k; i++) reqs.push(this.#gen())
        bytes = requestHeader(0, CMD.DISC, c.hi, lo, 0n, 0)
        if (rng.chance(0.3)) {
          // Reads after the DISC (the client MUST NOT): answered or not, the server still closes.
          const after: Buffer[] = [bytes]
          for (let i = 0; i < 1 + rng.int(4); i++) {
            const [off, len] = this.#anywhere()
            const r = this.#req(kind, CMD.READ, 0, off, len, { ok: true, errs: ANY_ERROR, optional: true })
            c.pending.set(r.lo, r)
            after.push(r.head)
          }
          bytes = Buffer.concat(after)
        }
        break
      }
      case 'disc-fua':
        // FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in
        // which case the server MUST accept all commands with this bit set".
        bytes = requestHeader(l.tflags & TFLAG.SEND_FUA ? FLAG.FUA : 0, CMD.DISC, c.hi, lo, 0n, 0)
        break
      case 'hard-close': {
        // Reads and refusals in flight, then the client goes away: only the server's survival counts.
        const parts: Buffer[] = []
        for (let i = 0; i < 1 + rng.int(32); i++) {
          const [off, len] = this.#anywhere()
          parts.push(requestHeader(0, rng.pick([CMD.READ, CMD.CACHE, 99]), c.hi, c.nextLo(), BigInt(off), len))
        }
        c.w.sock.write(Buffer.concat(parts))
        if (rng.chance(0.5)) await tick()
        c.w.sock.destroy()
        return
      }
      case 'garbage': {
        bytes = rng.bytes(28 + rng.int(200))
        if (bytes.readUInt32BE(0) === REQUEST_MAGIC) bytes[0] ^= 0xff
        break
      }
    }
    c.kind = kind
    c.context = `sent ${hex(Buffer.concat([...reqs.map((r) => r.head), bytes]), 96)} (${c.structured ? 'structured' : 'simple'} replies)${end ? ' then shut down the write side' : ''}`
    await c.send(reqs, bytes, undefined)
    if (end) {
      if (rng.chance(0.2)) {
        // Gone altogether: nothing to check but that the server lives on.
        c.w.sock.destroy()
        return
      }
      c.w.sock.end()
    }
    const hang = `${kind}: the server did not close the connection (a hang)`
    const wait = reqs.length && kind === 'disc' ? HANG_MS : this.ctx.failures.closeWait(hang)
    const closed = await c.w.waitEnd(wait)
    // Bytes that came with the close are parsed by now; requests still in flight were never answered.
    if (c.dead) return
    if (!closed) {
      this.ctx.failures.add(hang, `${c.context}; waited ${wait} ms`)
      c.reportUnanswered('no reply before the hang')
      return
    }
    c.reportUnanswered('the server closed the connection without replying')
  }
}

// ---------------------------------------------------------------------------------------
// Handshakes: a generated byte stream, and a model of what the spec says the server answers.

interface Facts {
  name: string
  size: number
  tflags: number
}

const HS_KINDS = {
  go: 6,
  info: 5,
  'go-bad': 10,
  'info-bad': 6,
  'go-unknown': 5,
  'export-name': 3,
  'export-name-unknown': 4,
  list: 5,
  'list-data': 4,
  structured: 6,
  'structured-data': 3,
  starttls: 4,
  'starttls-data': 2,
  abort: 3,
  'abort-data': 2,
  meta: 4,
  extended: 2,
  unknown: 8,
  'bad-magic': 4,
  'huge-length': 3,
  'length-mismatch': 3,
  truncated: 4,
  random: 3,
  big: 1,
}

function otherName(rng: Rng, name: string): Buffer {
  switch (rng.int(8)) {
    case 0:
      return EMPTY
    case 1:
      return Buffer.from(`${name}\0`)
    case 2:
      return Buffer.from(name.toUpperCase())
    case 3:
      return Buffer.from(`${name} `)
    case 4:
      return Buffer.from(name.slice(0, -1))
    case 5:
      return Buffer.alloc(rng.chance(0.5) ? 4096 : 4097, 'a')
    case 6:
      return rng.bytes(1 + rng.int(40))
    default:
      return Buffer.from(`x${rng.u32().toString(36)}`)
  }
}

function infoData(rng: Rng, name: Buffer, mutate: boolean): Buffer {
  const n = rng.int(5)
  const infos: number[] = []
  for (let i = 0; i < n; i++) infos.push(rng.chance(0.8) ? rng.int(4) : rng.int(65536))
  const b = Buffer.concat([u32(name.length), name, u16(n), ...infos.map(u16)])
  if (!mutate) return b
  switch (rng.int(7)) {
    case 0:
      b.writeUInt32BE(name.length + 1 + rng.int(100), 0)
      return b
    case 1:
      b.writeUInt32BE(rng.pick([0xffffffff, 0x80000000, b.length - 5, b.length - 6, b.length, 0]) >>> 0, 0)
      return b
    case 2:
      b.writeUInt32BE(Math.max(0, name.length - 1 - rng.int(4)), 0)
      return b
    case 3:
      b.writeUInt16BE(rng.chance(0.3) ? 0xffff : (n + 1 + rng.int(3)) & 0xffff, 4 + name.length)
      return b
    case 4:
      return b.subarray(0, rng.int(b.length))
    case 5:
      return Buffer.concat([b, rng.bytes(1 + rng.int(9))])
    default:
      b[rng.int(b.length)] ^= 1 << rng.int(8)
      return b
  }
}

/** A handshake's client bytes, and how the client leaves. */
function genHandshake(rng: Rng, facts: Facts): { bytes: Buffer; leave: 'end' | 'destroy' | 'abandon' } {
  const parts: Buffer[] = []
  const name = Buffer.from(facts.name)
  const f = rng.float()
  let flags: number
  if (f < 0.42) flags = 1
  else if (f < 0.84) flags = 3
  else if (f < 0.88) flags = 0
  else if (f < 0.92) flags = 2
  else if (f < 0.97) flags = rng.u32() | 4
  else {
    parts.push(rng.bytes(rng.int(4)))
    return { bytes: Buffer.concat(parts), leave: 'end' }
  }
  parts.push(u32(flags))
  const options = 1 + rng.int(6)
  let last = false
  for (let i = 0; i < options && !last; i++) {
    const kind = rng.weighted(HS_KINDS)
    switch (kind) {
      case 'go':
      case 'info':
        parts.push(optionBytes(kind === 'go' ? OPT.GO : OPT.INFO, infoData(rng, name, false)))
        last = kind === 'go'
        break
      case 'go-bad':
      case 'info-bad':
        parts.push(optionBytes(kind === 'go-bad' ? OPT.GO : OPT.INFO, infoData(rng, rng.chance(0.7) ? name : otherName(rng, facts.name), true)))
        break
      case 'go-unknown':
        parts.push(optionBytes(rng.pick([OPT.GO, OPT.INFO]), infoData(rng, otherName(rng, facts.name), false)))
        break
      case 'export-name':
        parts.push(optionBytes(OPT.EXPORT_NAME, name))
        last = true
        break
      case 'export-name-unknown':
        parts.push(optionBytes(OPT.EXPORT_NAME, otherName(rng, facts.name)))
        break
      case 'list':
      case 'structured':
      case 'starttls':
      case 'abort':
        parts.push(optionBytes({ list: OPT.LIST, structured: OPT.STRUCTURED_REPLY, starttls: OPT.STARTTLS, abort: OPT.ABORT }[kind], EMPTY))
        break
      case 'list-data':
      case 'structured-data':
      case 'starttls-data':
      case 'abort-data': {
        const opt = { 'list-data': OPT.LIST, 'structured-data': OPT.STRUCTURED_REPLY, 'starttls-data': OPT.STARTTLS, 'abort-data': OPT.ABORT }[kind]
        parts.push(optionBytes(opt, rng.bytes(1 + rng.int(100))))
        break
      }
      case 'meta': {
        const data = rng.chance(0.5)
          ? Buffer.concat([u32(name.length), name, u32(1), u32(15), Buffer.from('base:allocation')])
          : rng.bytes(rng.int(64))
        parts.push(optionBytes(rng.pick([OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]), data))
        break
      }
      case 'extended':
        parts.push(optionBytes(OPT.EXTENDED_HEADERS, rng.chance(0.7) ? EMPTY : rng.bytes(1 + rng.int(8))))
        break
      case 'unknown': {
        const opt = rng.chance(0.5) ? rng.pick([0, OPT.PEEK_EXPORT, 12, 13, 0x7fffffff, 0x80000000, 0xffffffff]) : rng.u32()
        parts.push(optionBytes(opt >= 1 && opt <= 11 ? 0x1000 + opt : opt, rng.bytes(rng.int(64))))
        break
      }
      case 'bad-magic': {
        const magic = rng.pick([NBDMAGIC, IHAVEOPT ^ (1n << BigInt(rng.int(64))), OPT_REPLY_MAGIC, rng.u64(), 0n])
        parts.push(optionBytes(rng.pick([OPT.GO, OPT.LIST, OPT.ABORT, OPT.EXPORT_NAME]), rng.chance(0.5) ? infoData(rng, name, false) : EMPTY, undefined, magic))
        break
      }
      case 'huge-length': {
        const len = rng.pick([MAX_OPTION + 1, 1 << 20, 0x7fffffff, 0xffffffff, MAX_OPTION + 1 + rng.int(2 ** 31)])
        parts.push(optionBytes(rng.pick([OPT.GO, OPT.INFO, OPT.LIST, OPT.EXPORT_NAME, OPT.ABORT, 77]), rng.bytes(rng.int(256)), len))
        last = true
        break
      }
      case 'length-mismatch': {
        const data = rng.chance(0.5) ? infoData(rng, name, false) : rng.bytes(rng.int(32))
        const len = Math.max(0, data.length + (rng.chance(0.5) ? -1 - rng.int(8) : 1 + rng.int(40)))
        parts.push(optionBytes(rng.pick([OPT.GO, OPT.INFO, OPT.LIST, OPT.STRUCTURED_REPLY, OPT.EXPORT_NAME]), data, len))
        break
      }
      case 'truncated': {
        const opt = optionBytes(rng.pick([OPT.GO, OPT.INFO, OPT.LIST]), infoData(rng, name, false))
        parts.push(opt.subarray(0, rng.int(opt.length)))
        last = true
        break
      }
      case 'random':
        parts.push(rng.bytes(1 + rng.int(64)))
        last = true
        break
      case 'big': {
        // Option data at the cap exactly (answered), or just over it (refused or closed).
        const len = rng.chance(0.5) ? MAX_OPTION : MAX_OPTION + 1
        const opt = rng.pick([OPT.LIST, 0x4242, OPT.GO])
        const data = opt === OPT.GO ? Buffer.concat([u32(len - 6), Buffer.alloc(len - 6, 'b'), u16(0)]) : Buffer.alloc(len, 7)
        parts.push(optionBytes(opt, data))
        break
      }
    }
  }
  if (last && rng.chance(0.7)) {
    // After a GO or EXPORT_NAME: a disconnect, an option after GO, a cut header or garbage.
    const x = rng.float()
    if (x < 0.35) parts.push(requestHeader(0, CMD.DISC, 1, 2, 0n, 0))
    else if (x < 0.8) parts.push(optionBytes(rng.pick([OPT.GO, OPT.INFO, OPT.LIST, OPT.ABORT]), rng.chance(0.5) ? infoData(rng, name, false) : EMPTY))
    else if (x < 0.9) parts.push(requestHeader(0, CMD.READ, 1, 2, 0n, 4096).subarray(0, 1 + rng.int(27)))
    else {
      const g = rng.bytes(1 + rng.int(64))
      if (g.length >= 4 && g.readUInt32BE(0) === REQUEST_MAGIC) g[0] ^= 0xff
      parts.push(g)
    }
  }
  const l = rng.float()
  return { bytes: Buffer.concat(parts), leave: l < 0.94 ? 'end' : l < 0.97 ? 'destroy' : 'abandon' }
}

/**
 * Checks the server's bytes `got` against the spec for the client bytes `cl` followed by the
 * client's end of stream: the answer to each option in turn, then the close. Returns what is
 * wrong, or undefined; 'unmodeled' where the model does not say.
 */
function checkHandshake(cl: Buffer, got: Buffer, x: Facts, outcome: { end?: string } = {}): string | undefined {
  let p = 0
  const at = (): string => `at server byte ${p}: ${hex(got.subarray(p), 48)}`
  if (got.length < 18) return `a greeting of ${got.length} bytes: ${hex(got)}`
  if (got.readBigUInt64BE(0) !== NBDMAGIC || got.readBigUInt64BE(8) !== IHAVEOPT) return `a greeting of ${hex(got.subarray(0, 18))}`
  const sflags = got.readUInt16BE(16)
  if (!(sflags & 1)) return 'the greeting does not offer NBD_FLAG_FIXED_NEWSTYLE'
  p = 18
  const close = (why: string, end: string): string | undefined => {
    outcome.end = end
    return p === got.length ? undefined : `expected the server to close (${why}), but it sent more ${at()}`
  }
  if (cl.length < 4) return close('client flags cut short', 'cut short')
  const cf = cl.readUInt32BE(0)
  if (cf & ~3) return close(`unknown client flags 0x${cf.toString(16)} (the server MUST close)`, 'bad client flags')
  const noZeroes = (cf & 2) !== 0 && (sflags & 2) !== 0
  let c = 4
  let structured = false
  /** The next option reply to `opt`, or what is wrong. */
  const reply = (opt: number): { type: number; data: Buffer } | string => {
    if (p === got.length) return `the server closed the connection instead of answering ${optName(opt)}`
    if (got.length - p < 20) return `a cut option reply ${at()}`
    if (got.readBigUInt64BE(p) !== OPT_REPLY_MAGIC) return `an option reply with a bad magic ${at()}`
    if (got.readUInt32BE(p + 8) !== opt) return `a reply to ${optName(got.readUInt32BE(p + 8))} for ${optName(opt)} ${at()}`
    const type = got.readUInt32BE(p + 12)
    const len = got.readUInt32BE(p + 16)
    if (got.length - p - 20 < len) return `an option reply of ${len} bytes cut short ${at()}`
    const data = got.subarray(p + 20, p + 20 + len)
    p += 20 + len
    return { type, data }
  }
  /** One reply that must be an error of one of `types`. */
  const error = (opt: number, types: number[], why: string): string | undefined => {
    const r = reply(opt)
    if (typeof r === 'string') return r
    if (!types.includes(r.type)) return `${optName(opt)} (${why}): expected ${types.map(repName).join(' or ')}, got ${repName(r.type)}`
    return undefined
  }
  for (;;) {
    if (cl.length - c < 16) return close('an option header cut short', c === cl.length ? 'client ended' : 'cut short')
    if (cl.readBigUInt64BE(c) !== IHAVEOPT) return close('an option without the IHAVEOPT magic', 'bad option magic')
    const opt = cl.readUInt32BE(c + 8)
    const len = cl.readUInt32BE(c + 12)
    c += 16
    if (len > MAX_OPTION) {
      // Refused with an error reply and closed, or just closed.
      if (p < got.length) {
        const r = reply(opt)
        if (typeof r === 'string') return r
        if (!(r.type & 0x80000000)) return `${optName(opt)} with ${len} bytes of data: expected an error or a close, got ${repName(r.type)}`
      }
      return close(`${optName(opt)} with ${len} bytes of data`, 'option data over the cap')
    }
    if (cl.length - c < len) return close(`${optName(opt)} data cut short`, 'cut short')
    const data = cl.subarray(c, c + len)
    c += len
    switch (opt) {
      case OPT.ABORT: {
        const r = reply(opt)
        if (typeof r === 'string') return r
        if (r.type !== REP.ACK) return `NBD_OPT_ABORT: expected NBD_REP_ACK (the server MUST), got ${repName(r.type)}`
        return close('after NBD_OPT_ABORT', 'NBD_OPT_ABORT')
      }
      case OPT.LIST: {
        if (len !== 0) {
          const e = error(opt, [REP.ERR_INVALID], 'with data')
          if (e) return e
          break
        }
        let seen = false
        for (;;) {
          const r = reply(opt)
          if (typeof r === 'string') return r
          if (r.type === REP.ACK) break
          if (r.type !== REP.SERVER) return `NBD_OPT_LIST: ${repName(r.type)}`
          if (r.data.length < 4 || r.data.readUInt32BE(0) > r.data.length - 4) return `NBD_REP_SERVER with a bad name length: ${hex(r.data)}`
          if (r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)) === x.name) seen = true
        }
        if (!seen) return `NBD_OPT_LIST did not list '${x.name}'`
        break
      }
      case OPT.STARTTLS: {
        // No TLS configured: refused, and the handshake goes on.
        const e = error(opt, [REP.ERR_UNSUP, REP.ERR_POLICY, REP.ERR_INVALID], 'without TLS')
        if (e) return e
        break
      }
      case OPT.STRUCTURED_REPLY: {
        if (len !== 0) {
          const e = error(opt, [REP.ERR_INVALID], 'with data')
          if (e) return e
          break
        }
        const r = reply(opt)
        if (typeof r === 'string') return r
        if (r.type === REP.ACK) structured = true
        else if (!(structured && r.type === REP.ERR_INVALID)) return `NBD_OPT_STRUCTURED_REPLY: expected NBD_REP_ACK${structured ? ' or NBD_REP_ERR_INVALID (a repeat)' : ''}, got ${repName(r.type)}`
        break
      }
      case OPT.EXPORT_NAME: {
        if (!data.equals(Buffer.from(x.name))) return close('NBD_OPT_EXPORT_NAME of an unknown export (the server MUST close)', 'unknown NBD_OPT_EXPORT_NAME')
        const want = noZeroes ? 10 : 134
        if (got.length - p < want) return `NBD_OPT_EXPORT_NAME: ${got.length - p} bytes of its ${want}-byte answer ${at()}`
        const size = got.readBigUInt64BE(p)
        const tf = got.readUInt16BE(p + 8)
        if (size !== BigInt(x.size) || tf !== x.tflags) return `NBD_OPT_EXPORT_NAME: size ${size} flags 0x${tf.toString(16)} ${at()}`
        if (!noZeroes && got.subarray(p + 10, p + 134).some((b) => b !== 0)) return `NBD_OPT_EXPORT_NAME: the 124 reserved bytes are not zeros ${at()}`
        p += want
        return transmission(cl.subarray(c))
      }
      case OPT.INFO:
      case OPT.GO: {
        let valid = len >= 6
        let nameLen = 0
        if (valid) {
          nameLen = data.readUInt32BE(0)
          valid = nameLen <= len - 6 && len === 6 + nameLen + 2 * data.readUInt16BE(4 + nameLen)
        }
        if (!valid) {
          const e = error(opt, [REP.ERR_INVALID], 'with malformed data')
          if (e) return e
          break
        }
        if (!data.subarray(4, 4 + nameLen).equals(Buffer.from(x.name))) {
          const e = error(opt, [REP.ERR_UNKNOWN], 'of an unknown export')
          if (e) return e
          break
        }
        let sawExport = false
        for (;;) {
          const r = reply(opt)
          if (typeof r === 'string') return r
          if (r.type === REP.ACK) break
          if (r.type !== REP.INFO) return `${optName(opt)} of '${x.name}': expected NBD_REP_INFO or NBD_REP_ACK, got ${repName(r.type)}: ${r.data.toString()}`
          if (r.data.length < 2) return `an NBD_REP_INFO of ${r.data.length} bytes`
          const it = r.data.readUInt16BE(0)
          if (it === INFO.EXPORT) {
            if (r.data.length !== 12) return `NBD_INFO_EXPORT of ${r.data.length} bytes`
            if (r.data.readBigUInt64BE(2) !== BigInt(x.size) || r.data.readUInt16BE(10) !== x.tflags) return `NBD_INFO_EXPORT ${hex(r.data)}`
            sawExport = true
          } else if (it === INFO.BLOCK_SIZE) {
            if (r.data.length !== 14) return `NBD_INFO_BLOCK_SIZE of ${r.data.length} bytes`
            const [min, pref, max] = [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)]
            const pow2 = (v: number): boolean => v > 0 && (v & (v - 1)) === 0
            if (!pow2(min) || min > 65536 || !pow2(pref) || pref < Math.max(min, 512) || max < pref) return `NBD_INFO_BLOCK_SIZE ${min}/${pref}/${max}`
          }
        }
        if (!sawExport) return `${optName(opt)} succeeded without NBD_INFO_EXPORT`
        if (opt === OPT.GO) return transmission(cl.subarray(c))
        break
      }
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
      case OPT.EXTENDED_HEADERS: {
        const e = error(opt, [REP.ERR_UNSUP, REP.ERR_INVALID], 'not offered')
        if (e) return e
        break
      }
      default: {
        // "NBD_REP_ERR_UNSUP to mark use of an option not known by this server".
        const e = error(opt, [REP.ERR_UNSUP], 'unknown')
        if (e) return e
      }
    }
  }

  /** In transmission after the handshake: no reply is due to what follows, and the server closes. */
  function transmission(rest: Buffer): string | undefined {
    if (rest.length >= 28 && rest.readUInt32BE(0) === REQUEST_MAGIC) {
      if (rest.readUInt16BE(6) !== CMD.DISC || rest.readUInt16BE(4) !== 0) return 'unmodeled'
      return close('NBD_CMD_DISC after the handshake', 'transmission')
    }
    return close(rest.length === 0 ? 'the client ended after the handshake' : `${hex(rest, 16)} after the handshake (no request magic, or a cut header)`, 'transmission')
  }
}

/** Runs handshake case `i` on its own connection. */
async function handshakeCase(i: number, path: string, x: Facts, failures: Failures, counts: Ctx['counts']): Promise<void> {
  const rng = new Rng(SEED, 0x10000000 + i)
  const { bytes, leave } = genHandshake(rng, x)
  const w = new Wire(path)
  try {
    await w.connected()
  } catch (err) {
    failures.add('handshake: cannot connect', `case ${i}: ${(err as Error).message}`)
    return
  }
  if (leave === 'abandon') {
    w.sock.write(bytes.subarray(0, rng.int(bytes.length + 1)))
    await tick()
    w.sock.destroy()
    counts.handshakes++
    return
  }
  // The bytes in one write, or in pieces a turn of the event loop apart.
  if (rng.chance(0.7) || bytes.length < 2) w.sock.write(bytes)
  else {
    let at = 0
    while (at < bytes.length) {
      const n = 1 + rng.int(Math.max(24, bytes.length >> 4))
      w.sock.write(bytes.subarray(at, at + n))
      at += n
      await tick()
    }
  }
  if (leave === 'destroy') {
    w.sock.destroy()
    counts.handshakes++
    return
  }
  w.sock.end()
  const hang = 'handshake: the server did not close the connection after the client ended its side (a hang)'
  const closed = await w.waitEnd(failures.closeWait(hang))
  const got = w.takeAll()
  w.sock.destroy()
  counts.handshakes++
  const repro = `case ${i}: client sent ${hex(bytes, 160)}; server sent ${hex(got, 160)}`
  if (!closed) {
    failures.add(hang, repro)
    return
  }
  const outcome: { end?: string } = {}
  const wrong = checkHandshake(bytes, got, x, outcome)
  const end = outcome.end ?? 'other'
  counts.outcomes[end] = (counts.outcomes[end] ?? 0) + 1
  if (wrong === 'unmodeled') counts.unmodeled++
  else if (wrong !== undefined) failures.add(`handshake: ${wrong.replace(/ at server byte.*$/, '').replace(/\d{3,}/g, 'N')}`, `${wrong}; ${repro}`)
}

// ---------------------------------------------------------------------------------------

test('NBD protocol fuzzer: malformed handshakes and requests, then a well-formed client still works', async (t) => {
  if (!haveTools('nbdinfo', 'nbdcopy')) return t.pass('nbdinfo or nbdcopy missing')
  t.timeout(180_000 + CASES * 3)
  const started = Date.now()
  const d = makeDevices({ name: 'fuzz', cacheMiB: 64, backingMiB: 16 })
  const s = await serve(d.dir, [d.cache, d.backing])
  t.teardown(() => s.kill())
  t.is(s.verb('set', 'fuzz', 'cache_mode', 'writeback').status, 0)
  let exited: number | null | undefined
  void s.exited.then((code) => (exited = code))
  const alive = (): boolean => exited === undefined

  const info = JSON.parse(must('nbdinfo', ['--json', s.uri('fuzz')]))
  const e0 = info.exports[0]
  const size: number = e0['export-size']
  const minBlock: number = e0.block_size_minimum ?? 1
  const failures = new Failures()
  const counts: Ctx['counts'] = { requests: 0, connections: 0, terminal: 0, handshakes: 0, unmodeled: 0, replies: {}, outcomes: {} }
  // The layout: canaries at both ends, ranges that share blocks with their neighbours.
  const canA: [number, number] = [0, 256 * 1024 + 777]
  const canB: [number, number] = [size - 256 * 1024 - 333, size]
  const sentinel: [number, number] = [canA[1], canA[1] + 64 * 1024]
  const workers: [number, number][] = []
  const span = canB[0] - sentinel[1]
  for (let i = 0; i < WORKERS; i++) workers.push([sentinel[1] + Math.floor((i * span) / WORKERS), sentinel[1] + Math.floor(((i + 1) * span) / WORKERS)])
  const layout: Layout = { size, minBlock, name: 'fuzz', tflags: -1, canA, canB, sentinel, workers }
  const ctx: Ctx = { failures, shadow: new Shadow(size), layout, counts }

  // Learn the transmission flags from a GO, then read the whole export into the shadow and
  // write the canaries with random data.
  const setupRng = new Rng(SEED, 7)
  {
    const probe = new Wire(s.socket)
    await probe.connected()
    await probe.need(18)
    probe.sock.write(Buffer.concat([u32(1), optionBytes(OPT.GO, Buffer.concat([u32(4), Buffer.from('fuzz'), u16(0)]))]))
    for (;;) {
      const h = await probe.need(20)
      const data = await probe.need(h.readUInt32BE(16))
      if (h.readUInt32BE(12) === REP.ACK) break
      if (data.readUInt16BE(0) === INFO.EXPORT) layout.tflags = data.readUInt16BE(10)
    }
    probe.sock.destroy()
  }
  t.true(layout.tflags > 0 && (layout.tflags & TFLAG.HAS_FLAGS) !== 0, `transmission flags 0x${layout.tflags.toString(16)}`)
  const setup = await openClient(s.socket, setupRng, ctx, { structured: true, exportName: false })
  {
    const reqs: Req[] = []
    for (let off = 0; off < size; off += 4 * MiB) {
      const len = Math.min(4 * MiB, size - off)
      const lo = setup.nextLo()
      reqs.push({ kind: 'setup', type: CMD.READ, flags: 0, offset: BigInt(off), length: len, hi: setup.hi, lo, head: requestHeader(0, CMD.READ, setup.hi, lo, BigInt(off), len), ok: true, errs: [], onData: (b) => ctx.shadow.write(off, b) })
    }
    await setup.send(reqs, undefined, undefined)
    t.is(await setup.settle(), 'ok')
    const writes: Req[] = []
    for (const [a, b] of [canA, canB]) {
      const lo = setup.nextLo()
      writes.push({ kind: 'setup', type: CMD.WRITE, flags: 0, offset: BigInt(a), length: b - a, hi: setup.hi, lo, head: requestHeader(0, CMD.WRITE, setup.hi, lo, BigInt(a), b - a), payload: poolSlice(setupRng, b - a), ok: true, errs: [], mutate: 'write' })
    }
    await setup.send(writes, undefined, undefined)
    t.is(await setup.settle(), 'ok')
    setup.w.sock.write(requestHeader(0, CMD.DISC, setup.hi, setup.nextLo(), 0n, 0))
    t.true(await setup.w.waitEnd(HANG_MS))
  }
  t.is(failures.size, 0, failures.report())
  // The sentinel: a connection made before the fuzzing and used only after it.
  const sentinelConn = await openClient(s.socket, new Rng(SEED, 8), ctx, { structured: true, exportName: false })
  const setupSeconds = (Date.now() - started) / 1000

  // The fuzzing: handshakes and transmission at the same time.
  const fuzzStarted = Date.now()
  const handshakes = Math.round(CASES * HANDSHAKE_SHARE)
  const requests = CASES - handshakes
  const facts: Facts = { name: 'fuzz', size, tflags: layout.tflags }
  let nextHandshake = 0
  const handshakePool = Array.from({ length: HANDSHAKE_PARALLEL }, async () => {
    while (nextHandshake < handshakes && alive()) await handshakeCase(nextHandshake++, s.socket, facts, failures, counts)
  })
  const txWorkers = workers.map((_, i) => new TxFuzzer(i, ctx, s.socket).run(Math.floor(requests / WORKERS) + (i < requests % WORKERS ? 1 : 0), alive))
  await Promise.all([...handshakePool, ...txWorkers])
  const fuzzSeconds = (Date.now() - fuzzStarted) / 1000

  // After it: the daemon lives, the connection made before it all still works, a well-formed
  // client (nbdinfo, nbdcopy) works, the export holds what the shadow says, and the daemon
  // stops cleanly. Whatever fails is added to the one report.
  const afterwards = async (what: string, f: () => Promise<void> | void): Promise<void> => {
    try {
      await f()
    } catch (err) {
      failures.add(`afterwards: ${what}`, (err as Error).message.slice(0, 2000))
    }
  }
  if (exited !== undefined) failures.add('the daemon exited during the fuzzing', `exit code ${exited}; log tail:\n${s.log().slice(-4000)}`)
  await afterwards('the sentinel connection, made before the fuzzing, still works', async () => {
    const c = sentinelConn
    c.kind = 'sentinel'
    c.context = 'sentinel'
    const reqs: Req[] = []
    const add = (type: number, off: number, len: number, o: Partial<Req>): void => {
      const lo = c.nextLo()
      reqs.push({ kind: 'sentinel', type, flags: 0, offset: BigInt(off), length: len, hi: c.hi, lo, head: requestHeader(0, type, c.hi, lo, BigInt(off), len), ok: true, errs: [], ...o })
    }
    add(CMD.READ, canA[0], canA[1] - canA[0], { check: true })
    add(CMD.READ, canB[0], canB[1] - canB[0], { check: true })
    add(CMD.WRITE, sentinel[0], sentinel[1] - sentinel[0], { payload: poolSlice(new Rng(SEED, 9), sentinel[1] - sentinel[0]), mutate: 'write' })
    await c.send(reqs, undefined, undefined)
    let how = await c.settle()
    if (how !== 'ok') throw new Error(`its requests: ${how}`)
    add(CMD.READ, sentinel[0], sentinel[1] - sentinel[0], { check: true })
    add(CMD.FLUSH, 0, 0, {})
    await c.send(reqs.slice(3), undefined, undefined)
    how = await c.settle()
    if (how !== 'ok') throw new Error(`its read back: ${how}`)
    c.w.sock.write(requestHeader(0, CMD.DISC, c.hi, c.nextLo(), 0n, 0))
    if (!(await c.w.waitEnd(HANG_MS))) throw new Error('no close after NBD_CMD_DISC')
  })
  await afterwards('nbdinfo', () => {
    const e = JSON.parse(must('nbdinfo', ['--json', s.uri('fuzz')])).exports[0]
    if (e['export-size'] !== size || e['export-name'] !== 'fuzz') throw new Error(`nbdinfo says ${JSON.stringify(e)}`)
  })
  // The whole export read back by nbdcopy: every byte the shadow knows must match (no refused
  // or cut-short write landed, in a canary or anywhere else).
  let knownBytes = 0
  await afterwards('the export read back by nbdcopy differs from the shadow', () => {
    const out = join(d.dir, 'after.img')
    must('nbdcopy', [s.uri('fuzz'), out])
    const after = readFileSync(out)
    if (after.length !== size) throw new Error(`${after.length} bytes`)
    const sh = ctx.shadow
    const runs: string[] = []
    let lastEnd = -1
    for (let i = 0; i < size; i++) {
      if (!sh.known[i]) continue
      knownBytes++
      if (sh.data[i] === after[i]) continue
      // A run of differing bytes (gaps under 64 bytes of equal ones joined).
      let j = i + 1
      for (let k = j; k < size && k < j + 64; k++) if (sh.known[k] && sh.data[k] !== after[k]) j = k + 1
      if (i - lastEnd >= 64 || runs.length === 0) {
        if (runs.length < 12) runs.push(`${regionOf(layout, i)} at ${i}: read ${hex(after.subarray(i, i + 16))}, the shadow says ${hex(sh.data.subarray(i, i + 16))}`)
      }
      for (let k = i + 1; k < j; k++) if (sh.known[k]) knownBytes++
      lastEnd = j
      i = j - 1
    }
    if (runs.length) throw new Error(runs.join('\n        '))
  })
  if (knownBytes < size / 2) failures.add('the shadow knows too little to check', `${knownBytes} of ${size} bytes`)
  await afterwards('a round trip through nbdcopy', () => {
    const src = join(d.dir, 'src.img')
    writeFileSync(src, poolSlice(new Rng(SEED, 10), size))
    must('nbdcopy', [src, s.uri('fuzz')])
    const back = join(d.dir, 'back.img')
    must('nbdcopy', [s.uri('fuzz'), back])
    if (!readFileSync(src).equals(readFileSync(back))) throw new Error('what came out differs from what went in')
  })
  await afterwards('ubcache stop', async () => {
    const code = await s.stop()
    if (code !== 0) throw new Error(`exit code ${code}; log tail:\n${s.log().slice(-4000)}`)
  })

  t.log(
    `seed ${SEED}: ${CASES} cases in ${fuzzSeconds.toFixed(1)} s (setup ${setupSeconds.toFixed(1)} s): ` +
      `${counts.handshakes} handshakes on their own connections (${counts.unmodeled} unmodeled; ${Object.entries(counts.outcomes)
        .map(([k, v]) => `${v} ${k}`)
        .join(', ')}), ` +
      `${counts.requests} requests and ${counts.terminal} connection-ending cases on ${counts.connections} connections; ` +
      `replies ${JSON.stringify(counts.replies)}; the shadow checked ${knownBytes} bytes at the end`,
  )
  if (failures.size) t.fail(failures.report())
  else t.pass()
})
