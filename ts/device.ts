/**
 * Raw devices: read and write a file or block device at byte offsets through ubcache's
 * native I/O engine (io_uring, or a portable pread/pwrite thread pool where io_uring is
 * unavailable), with O_DIRECT and an exclusive open.
 *
 * ```ts
 * import { openDevice } from 'ubcache'
 * const dev = await openDevice('/dev/nvme0n1p3')
 * await dev.write(0, Buffer.alloc(4096, 1))
 * await dev.flush()
 * const data = await dev.read(0, 4096)
 * await dev.close()
 * ```
 *
 * By default the JavaScript thread drives the engine itself (`mode: 'inline'`): requests
 * made in one tick are written into memory shared with the engine and go to the kernel in
 * one `io_uring_enter` from the calling thread; Node's event loop watches the ring's own
 * descriptor and hands completions back in chunks of 8, so no thread handoff and no
 * per-request conversion sits on the I/O path. Reads land straight in engine memory that
 * JavaScript sees: the result is a `Buffer` view on it, never a copy (reads up to 16 KiB
 * share 64 KiB slabs, so a small result kept alive keeps its slab alive, as Node's own
 * pooled `Buffer`s do; larger reads get memory of their own). Written data is copied once
 * into aligned memory. `mode: 'thread'` runs the engine on a native thread of its own
 * instead (completions come back in batches, one cross-thread wakeup for many promises;
 * results up to 16 KiB are copied); it costs two handoffs per batch.
 *
 * Under O_DIRECT (the default where the filesystem supports it), offsets and lengths must
 * be multiples of {@link RawDevice.logicalBlockSize}; others are rejected with code
 * `MISALIGNED` (there is no bounce buffer). I/O past the end is rejected with
 * `OUT_OF_RANGE`, and using a closed device or engine with `CLOSED`.
 * @module
 */
import { asUbcacheError, InvalidArgumentError, UbcacheError } from './errors'
import native from './native'

/** Which engine runs the I/O. */
export type EngineChoice = 'auto' | 'io_uring' | 'psync'

/**
 * Which thread drives the engine: `inline`, the JavaScript thread (through its event loop),
 * or `thread`, a native engine thread.
 */
export type EngineMode = 'inline' | 'thread'

/** Options of an {@link IoEngine}. */
export interface IoEngineOptions {
  /** `auto` (default): io_uring, or the portable engine (with one warning) where it cannot be set up. */
  engine?: EngineChoice
  /**
   * `inline` (default): the JavaScript thread submits to the kernel itself and its event
   * loop watches for completions; fastest, since no request crosses threads (on a 2-core
   * VM it roughly halves the latency of a 4 KiB read compared with `thread`).
   * `thread`: a native engine thread runs the engine; requests and completions cross to it
   * and back, which frees the JavaScript thread from the submission system calls.
   */
  mode?: EngineMode
  /** io_uring submission-queue entries (default 256). */
  queueDepth?: number
  /** Worker threads of the portable engine (default 4). */
  psyncThreads?: number
  /**
   * Polling instead of sleeping: `'auto'` (default), or a number of microseconds (0: never;
   * at most 1000000).
   * - `inline`, `'auto'`: after a submission that leaves a single request in flight (a
   *   program waiting on one read at a time), the call polls for its completion up to twice
   *   the recent latency of such requests, at most 50 µs, before it returns to the event
   *   loop. A device slower than that (a SATA SSD, a disk) is never polled for, and neither
   *   are requests made side by side, which keep the device busy by themselves. On a 2-core
   *   VM this took a 4 KiB read at queue depth 1 from about 1.3-1.6 to about 1.1 times fio's
   *   latency, for 12-14% more CPU per read (the sleeping path's system calls already
   *   keep the thread about 70% busy at that depth).
   * - `inline`, a number: after every submission that finds nothing completed, the call
   *   keeps polling up to that long. It holds the JavaScript thread meanwhile (as `'auto'`
   *   does for its shorter budget), so it suits programs with little else to do while their
   *   reads are in flight.
   * - `thread`: the engine thread keeps polling for new requests this long after its last
   *   one completed, before it sleeps (`'auto'`: never).
   *
   * Either way, a chain of requests that keep completing within their calls still lets the
   * event loop run every 16 calls. {@link IoEngine.stats} counts the polls.
   */
  spinMicros?: number | 'auto'
}

/** Options of {@link IoEngine.open} and {@link openDevice}. */
export interface OpenDeviceOptions {
  /** Open read-only (default false). */
  readOnly?: boolean
  /**
   * O_DIRECT policy: `auto` (default) uses it where supported and falls back to buffered
   * I/O with one warning (e.g. on tmpfs); `require` fails where it is unsupported; `off`
   * always goes through the page cache.
   */
  direct?: 'auto' | 'require' | 'off'
  /** Refuse to open a device already open elsewhere (default true): flock, and O_EXCL for block devices. */
  exclusive?: boolean
  /** If the path does not exist, create a regular file of this many bytes. */
  createSize?: number
}

/** Counters of an {@link IoEngine} since it was made (see {@link IoEngine.stats}). */
export interface IoEngineStats {
  /** `thread`: requests that woke the sleeping engine thread; `inline`: event-loop wakeups for completions. */
  wakeups: number
  /** Batches of completions handed back. */
  batches: number
  /** I/O buffers handed out again after an earlier request (or read result) let go of them. */
  reusedBuffers: number
  /** I/O buffers that needed new memory. */
  freshBuffers: number
  /** `inline`: submissions that polled for a completion (see {@link IoEngineOptions.spinMicros}). */
  busyPolls: number
  /** `inline`: polls that got their completion before the budget ran out. */
  busyPollHits: number
}

interface Pending {
  resolve: (v: Buffer | number) => void
  reject: (e: Error) => void
  /** A read driven inline: the slab it lands in, and where. */
  slab?: ArrayBuffer
  at?: number
  /** A read into a caller's engine buffer ({@link IoEngine.allocBuffer}): its memory, freed for other reads once this one is done. */
  into?: ArrayBuffer
}

/** Numbers per request in the inline submission buffer: op, tag, dev, offset, length, slab, at. */
const DESC = 7
/** Small reads share slabs of this size; larger ones get a slab each. */
const SLAB_BYTES = 64 << 10
const OWN_SLAB_ABOVE = 16 << 10
/** Reads land on 4 KiB boundaries of a slab, as O_DIRECT wants. */
const SLAB_ALIGN = 4096
/** Bytes one request may move (Linux's limit for a single read or write). */
const MAX_REQUEST = 0x7ffff000
/**
 * Inline mode: after this many calls in a row that came back with completions (whose
 * promises then made the next requests, all in one chain of microtasks), the next call's
 * completions are settled after a turn of the event loop. Without it, a reader whose
 * requests keep completing by the time it submits (fast devices, `spinMicros`) would starve
 * timers and other I/O, and the finalizers that return read buffers to the pool (which run
 * from the event loop) would never run: every read would need new memory.
 */
const SYNC_ROUNDS = 16
/** Schedules microtasks: cheaper than queueMicrotask, which sets up an async resource per call. */
const RESOLVED = Promise.resolve()

type NativeBatch = Array<number | Buffer | [string, string] | undefined>

type NativeThread = InstanceType<typeof native.NativeIoEngine>
type NativeRing = InstanceType<typeof native.NativeRing>
/** Geometry of an open device, as the native engine reports it. */
type NativeDeviceInfo = native.NativeDevice

/** Request codes of the native descriptors (writes carry data and go by a call of their own). */
const OP_CODE = { read: 0, flush: 2, discard: 3 } as const

function checkCount(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new InvalidArgumentError(`${what} must be a non-negative integer, got ${v}`)
}

function closedError(what: string): UbcacheError {
  return new UbcacheError('CLOSED', `${what} is closed`)
}

/**
 * A native I/O engine that devices are opened in, driven by the JavaScript thread or by a
 * native thread (see {@link IoEngineOptions.mode}). One engine can drive many devices
 * (a cache set drives its cache and backing devices from one engine).
 */
export class IoEngine {
  readonly #native: NativeThread | NativeRing
  /** The native engine when it is a ring driven from this thread. */
  readonly #ring: NativeRing | undefined
  /** Called when the last pending request of a closing inline engine completes. */
  #drained: (() => void) | undefined
  /** Requests in flight by tag: a tag is a slot, reused once its request completed. */
  readonly #slots: (Pending | undefined)[] = []
  readonly #freeSlots: number[] = []
  #live = 0
  #keepAlive: NodeJS.Timeout | undefined
  #closing: Promise<void> | undefined
  /** Thread mode: requests made this tick, five numbers each. */
  #queue: number[] = []
  /** Inline mode: the buffers shared with the ring, requests written and not yet submitted. */
  #sq: Float64Array | undefined
  #cq: Float64Array | undefined
  #capacity = 0
  #chunk = 0
  #queued = 0
  /** Inline mode: the slab small reads land in, its id, and how much of it is handed out. */
  #slab: ArrayBuffer | undefined
  #slabId = 0
  #slabUsed = 0
  /**
   * Inline mode: calls in a row that returned completions, settled from the same chain of
   * microtasks without the event loop getting a turn (see {@link SYNC_ROUNDS}).
   */
  #syncRounds = 0
  /** Inline mode: the slab behind each buffer {@link IoEngine.allocBuffer} handed out. */
  readonly #engineBuffers = new WeakMap<ArrayBuffer, number>()
  /** Inline mode: byte ranges of engine buffers that reads are landing in (start, end pairs). */
  readonly #landing = new Map<ArrayBuffer, number[]>()

  constructor(options: IoEngineOptions = {}) {
    if (options.queueDepth !== undefined) checkCount('queueDepth', options.queueDepth)
    if (options.psyncThreads !== undefined) checkCount('psyncThreads', options.psyncThreads)
    const spin = options.spinMicros ?? 'auto'
    if (spin !== 'auto') {
      if (typeof spin !== 'number') throw new InvalidArgumentError(`spinMicros must be 'auto' or a number of microseconds, got ${String(spin)}`)
      checkCount('spinMicros', spin)
      if (spin > 1_000_000) throw new InvalidArgumentError(`spinMicros must be at most 1000000, got ${spin}`)
    }
    const mode = options.mode ?? 'inline'
    if (mode !== 'inline' && mode !== 'thread') throw new InvalidArgumentError(`mode must be inline or thread, got ${String(mode)}`)
    const nativeOptions = {
      engine: options.engine,
      queueDepth: options.queueDepth,
      psyncThreads: options.psyncThreads,
      spinMicros: spin === 'auto' ? undefined : spin,
      spinAuto: spin === 'auto' && mode === 'inline',
    }
    try {
      if (mode === 'inline') {
        const ring = new native.NativeRing(nativeOptions, (count, fatal) => {
          // The event loop had a turn: submissions may complete others synchronously again.
          this.#syncRounds = 0
          if (fatal) this.#fail(this.#liveTags(), new UbcacheError(fatal[0], fatal[1]))
          else this.#completeShared(count)
        })
        this.#ring = ring
        this.#native = ring
        this.#sq = new Float64Array(ring.submissionBuffer())
        this.#cq = new Float64Array(ring.completionBuffer())
        this.#capacity = ring.capacity
        this.#chunk = ring.chunk
      } else {
        this.#native = new native.NativeIoEngine(nativeOptions, (batch) => this.#complete(batch))
      }
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /** The engine in use: `io_uring` or `psync`. */
  get kind(): 'io_uring' | 'psync' {
    return this.#native.kind as 'io_uring' | 'psync'
  }

  /** Which thread drives the engine (see {@link IoEngineOptions.mode}). */
  get mode(): EngineMode {
    return this.#ring ? 'inline' : 'thread'
  }

  /**
   * Counters: how often the engine woke up for work (`thread`: requests waking the
   * sleeping engine thread; `inline`: the event loop waking for completions), and how many
   * batches of completions came back; how many I/O buffers were reused or needed new
   * memory (read results hold theirs until they are garbage-collected); and (`inline`)
   * how many submissions polled for a completion ({@link IoEngineOptions.spinMicros}) and
   * how many of those got one.
   */
  stats(): IoEngineStats {
    return this.#native.stats()
  }

  /**
   * A zeroed `Buffer` of `size` bytes to read into again and again with
   * {@link RawDevice.readInto}: in `inline` mode it is aligned engine memory, so reads land
   * in it directly, with no copy and no new memory per read (`thread` mode: an ordinary
   * `Buffer`, which reads are copied into). For a program that streams through large
   * reads, this saves what {@link RawDevice.read} costs on top of the I/O: fresh memory for
   * every result, and the garbage collection that takes it back.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (size not a non-negative integer, or over 2 GiB), `CLOSED`.
   */
  allocBuffer(size: number): Buffer {
    checkCount('size', size)
    if (size > MAX_REQUEST) throw new InvalidArgumentError(`size ${size} exceeds one request's limit (${MAX_REQUEST} bytes)`)
    if (this.closed) throw closedError('the I/O engine')
    const ring = this.#ring
    if (!ring || size === 0) return Buffer.alloc(size)
    let slab: [number, ArrayBuffer]
    try {
      slab = ring.slab(size)
    } catch (err) {
      throw asUbcacheError(err)
    }
    this.#engineBuffers.set(slab[1], slab[0])
    // Engine memory comes back from earlier reads: clear it, as Buffer.alloc would.
    return Buffer.from(slab[1], 0, size).fill(0)
  }

  /**
   * @internal Inline mode: reads `buffer.byteLength` bytes at `offset` straight into
   * `buffer`, when it is engine memory from {@link IoEngine.allocBuffer} starting on a
   * 4 KiB boundary; else returns undefined (the caller copies instead).
   */
  submitInto(dev: number, offset: number, buffer: Uint8Array): Promise<number> | undefined {
    const ring = this.#ring
    const ab = buffer.buffer as ArrayBuffer
    const slabId = this.#engineBuffers.get(ab)
    if (!ring || slabId === undefined || buffer.byteOffset % SLAB_ALIGN !== 0 || buffer.byteLength === 0) return undefined
    if (this.#closing) return Promise.reject(closedError('the I/O engine'))
    const start = buffer.byteOffset
    const end = start + buffer.byteLength
    const ranges = this.#landing.get(ab) ?? []
    for (let i = 0; i < ranges.length; i += 2) {
      if (start < ranges[i + 1] && ranges[i] < end) {
        return Promise.reject(
          new InvalidArgumentError(`bytes ${start}..${end} of this buffer overlap a read still landing in bytes ${ranges[i]}..${ranges[i + 1]}`),
        )
      }
    }
    ranges.push(start, end)
    this.#landing.set(ab, ranges)
    let pending: Pending | undefined
    const promise = new Promise<number>((resolve, reject) => {
      pending = { resolve: resolve as (v: Buffer | number) => void, reject, into: ab, at: start }
    })
    this.#queueRequest(OP_CODE.read, this.#track(pending as Pending), dev, offset, buffer.byteLength, slabId, start)
    return promise
  }

  /** Requests submitted and not yet completed. */
  get inFlight(): number {
    return this.#live
  }

  /** True once {@link IoEngine.close} has been called. */
  get closed(): boolean {
    return this.#closing !== undefined
  }

  /**
   * Opens a regular file or block device in this engine.
   * @throws {UbcacheError} `ENOENT`, `NOT_A_DEVICE`, `EBUSY` (open elsewhere), `EACCES`,
   *   `INVALID_ARGUMENT` (e.g. `direct: 'require'` where O_DIRECT is unsupported), `CLOSED`.
   */
  async open(path: string, options: OpenDeviceOptions = {}): Promise<RawDevice> {
    if (this.closed) throw closedError('the I/O engine')
    if (options.createSize !== undefined) checkCount('createSize', options.createSize)
    let info: NativeDeviceInfo
    try {
      info = this.#native.openDevice(path, {
        write: !options.readOnly,
        direct: options.direct,
        exclusive: options.exclusive,
        createSize: options.createSize,
      })
    } catch (err) {
      throw asUbcacheError(err)
    }
    return new RawDevice(this, path, info)
  }

  /** Stops taking requests; resolves once every request already made has completed. */
  close(): Promise<void> {
    this.#submitQueued()
    if (this.#closing) return this.#closing
    const ring = this.#ring
    if (ring) {
      // Requests in flight complete through the event loop; then the ring is let go.
      const drained = this.#live === 0 ? Promise.resolve() : new Promise<void>((r) => (this.#drained = r))
      this.#closing = drained.then(() => ring.close())
    } else {
      this.#closing = (this.#native as NativeThread).close().then(() => {
        clearInterval(this.#keepAlive)
      })
    }
    return this.#closing
  }

  /** @internal Submits one request and returns its completion. */
  submit(
    op: 'read' | 'write' | 'flush' | 'discard',
    dev: number,
    offset: number,
    arg: number | Uint8Array,
  ): Promise<Buffer | number> {
    if (this.#closing) return Promise.reject(closedError('the I/O engine'))
    const ring = this.#ring
    if (ring) return this.#submitInline(ring, op, dev, offset, arg)
    let tag = 0
    const promise = new Promise<Buffer | number>((resolve, reject) => (tag = this.#track({ resolve, reject })))
    // Requests in flight keep the process alive; an idle engine does not. (A ring does this
    // natively: its poll handle holds the event loop only while requests are in flight.)
    if (this.#live === 1) (this.#keepAlive ??= setInterval(() => {}, 1 << 30)).ref()
    if (op === 'write') {
      // Writes carry data and go alone, after everything queued before them.
      this.#submitQueued()
      try {
        ;(this.#native as NativeThread).write(tag, dev, offset, arg as Uint8Array)
      } catch (err) {
        this.#fail([tag], err)
      }
    } else {
      // Requests made in one tick (e.g. from one batch of completions) go in one call.
      this.#queue.push(OP_CODE[op], tag, dev, offset, op === 'flush' ? 0 : (arg as number))
      if (this.#queue.length === 5) void RESOLVED.then(this.#submitQueued)
    }
    return promise
  }

  /** Inline mode: the request goes into the shared submission buffer (reads get their window of a slab). */
  #submitInline(
    ring: NativeRing,
    op: 'read' | 'write' | 'flush' | 'discard',
    dev: number,
    offset: number,
    arg: number | Uint8Array,
  ): Promise<Buffer | number> {
    let pending: Pending | undefined
    const promise = new Promise<Buffer | number>((resolve, reject) => {
      pending = { resolve, reject }
    })
    const p = pending as Pending
    const tag = this.#track(p)
    if (op === 'write') {
      // Writes carry data and go alone, after everything queued before them.
      this.#submitQueued()
      try {
        this.#drain(ring, ring.write(tag, dev, offset, arg as Uint8Array))
      } catch (err) {
        this.#fail([tag], err)
      }
      return promise
    }
    let slabId = 0
    let at = 0
    const length = op === 'flush' ? 0 : (arg as number)
    if (op === 'read') {
      const size = Math.ceil(length / SLAB_ALIGN) * SLAB_ALIGN
      try {
        if (size > OWN_SLAB_ABOVE) {
          ;[slabId, p.slab] = ring.slab(size)
        } else {
          if (this.#slab === undefined || this.#slabUsed + size > SLAB_BYTES) {
            ;[this.#slabId, this.#slab] = ring.slab(SLAB_BYTES)
            this.#slabUsed = 0
          }
          slabId = this.#slabId
          p.slab = this.#slab
          at = this.#slabUsed
          this.#slabUsed += size
        }
      } catch (err) {
        this.#fail([tag], err)
        return promise
      }
      p.at = at
    }
    this.#queueRequest(OP_CODE[op], tag, dev, offset, length, slabId, at)
    return promise
  }

  /** Inline mode: writes one request into the shared submission buffer. */
  #queueRequest(
    op: number,
    tag: number,
    dev: number,
    offset: number,
    length: number,
    slabId: number,
    at: number,
  ): void {
    const sq = this.#sq as Float64Array
    const d = this.#queued * DESC
    sq[d] = op
    sq[d + 1] = tag
    sq[d + 2] = dev
    sq[d + 3] = offset
    sq[d + 4] = length
    sq[d + 5] = slabId
    sq[d + 6] = at
    // Requests made in one tick (e.g. from one batch of completions) go in one call.
    if (++this.#queued === 1) void RESOLVED.then(this.#submitQueued)
    else if (this.#queued === this.#capacity) this.#submitQueued()
  }

  /** @internal Sends the queued requests to the native engine. */
  readonly #submitQueued = (): void => {
    const ring = this.#ring
    if (ring) {
      const n = this.#queued
      if (n === 0) return
      this.#queued = 0
      try {
        // A ring reports the completions it already has (e.g. requests it rejected).
        this.#drain(ring, ring.submit(n))
      } catch (err) {
        const sq = this.#sq as Float64Array
        this.#fail(
          Array.from({ length: n }, (_, i) => sq[i * DESC + 1]),
          err,
        )
      }
      return
    }
    if (this.#queue.length === 0) return
    const q = this.#queue
    this.#queue = []
    try {
      ;(this.#native as NativeThread).submitBatch(new Float64Array(q))
    } catch (err) {
      this.#fail(
        q.filter((_, i) => i % 5 === 1),
        err,
      )
    }
  }

  /** Inline mode: handles `count` completions the ring just placed, and any more it has. */
  #drain(ring: NativeRing, count: number): void {
    if (count > 0) {
      if (++this.#syncRounds <= SYNC_ROUNDS) this.#completeShared(count)
      else this.#completeAfterTurn(count)
    }
    // Only a full chunk can leave more behind. Take it once the promises just settled have
    // run and their requests have gone out, so the device works while we handle the rest.
    if (count === this.#chunk) void RESOLVED.then(this.#drainMore)
  }

  readonly #drainMore = (): void => {
    const ring = this.#ring as NativeRing
    this.#submitQueued()
    this.#drain(ring, ring.more())
  }

  #track(p: Pending): number {
    const tag = this.#freeSlots.pop() ?? this.#slots.length
    this.#slots[tag] = p
    this.#live++
    return tag
  }

  #untrack(tag: number): Pending | undefined {
    const p = this.#slots[tag]
    if (p) {
      this.#slots[tag] = undefined
      this.#freeSlots.push(tag)
      this.#live--
      if (p.into) this.#landed(p.into, p.at as number)
    }
    return p
  }

  /** The read landing at `start` of an engine buffer is done: the bytes are free for the next. */
  #landed(ab: ArrayBuffer, start: number): void {
    const ranges = this.#landing.get(ab) as number[]
    if (ranges.length === 2) return void this.#landing.delete(ab)
    for (let i = 0; i < ranges.length; i += 2) {
      if (ranges[i] === start) return void ranges.splice(i, 2)
    }
  }

  #liveTags(): number[] {
    const tags: number[] = []
    this.#slots.forEach((p, tag) => p && tags.push(tag))
    return tags
  }

  #fail(tags: number[], err: unknown): void {
    const e = asUbcacheError(err)
    for (const tag of tags) {
      this.#untrack(tag)?.reject(e)
    }
    this.#idle()
  }

  #idle(): void {
    if (this.#live > 0) return
    this.#keepAlive?.unref()
    this.#drained?.()
    this.#drained = undefined
  }

  /** @internal Closes a device in the native engine, after the requests made before. */
  closeDevice(id: number): void {
    this.#submitQueued()
    this.#native.closeDevice(id)
  }

  /** Thread mode: a batch of `tag, result, payload` triples. */
  #complete(batch: NativeBatch): void {
    for (let i = 0; i < batch.length; i += 3) {
      const tag = batch[i] as number
      const p = this.#untrack(tag)
      if (!p) continue
      const result = batch[i + 1] as number
      const payload = batch[i + 2]
      if (result < 0) {
        const [code, message] = payload as [string, string]
        p.reject(new UbcacheError(code, message))
      } else {
        p.resolve((payload as Buffer | undefined) ?? result)
      }
    }
    this.#idle()
  }

  /** Inline mode: `count` `tag, result` pairs in the completion buffer. */
  #completeShared(count: number): void {
    this.#settle(this.#cq as Float64Array, count, undefined)
  }

  /**
   * Inline mode: settles `count` completions of the completion buffer after a turn of the
   * event loop (see {@link SYNC_ROUNDS}). They are copied now: the next call of the ring
   * reuses the buffer and the errors.
   */
  #completeAfterTurn(count: number): void {
    const cq = (this.#cq as Float64Array).slice(0, 2 * count)
    let errors: string[] | undefined
    for (let i = 1; i < 2 * count && !errors; i += 2) if (cq[i] < 0) errors = (this.#ring as NativeRing).takeErrors()
    setImmediate(() => {
      this.#syncRounds = 0
      this.#settle(cq, count, errors)
    })
  }

  /** Inline mode: settles the promises of `count` `tag, result` pairs of `cq`. */
  #settle(cq: Float64Array, count: number, errors: string[] | undefined): void {
    let e = 0
    for (let i = 0; i < count; i++) {
      const tag = cq[2 * i]
      const result = cq[2 * i + 1]
      const p = this.#untrack(tag)
      if (result < 0) {
        errors ??= (this.#ring as NativeRing).takeErrors()
        if (p) p.reject(new UbcacheError(errors[e] ?? 'EIO', errors[e + 1] ?? 'I/O error'))
        e += 2
      } else if (p) {
        p.resolve(p.slab ? Buffer.from(p.slab, p.at, result) : result)
      }
    }
    this.#idle()
  }
}

/** A file or block device open for raw I/O at byte offsets. */
export class RawDevice {
  /** The path it was opened from. */
  readonly path: string
  /** Capacity in bytes. */
  readonly size: number
  /** Offsets and lengths must be multiples of this when {@link RawDevice.direct} is true. */
  readonly logicalBlockSize: number
  /** Opened with O_DIRECT (false: buffered, through the page cache). */
  readonly direct: boolean
  /** A block device rather than a regular file. */
  readonly isBlockDevice: boolean
  /** Opened for writing. */
  readonly writable: boolean
  readonly #engine: IoEngine
  readonly #id: number
  #closed = false
  #ownsEngine = false

  /** @internal Use {@link IoEngine.open} or {@link openDevice}. */
  constructor(engine: IoEngine, path: string, info: NativeDeviceInfo) {
    this.#engine = engine
    this.#id = info.id
    this.path = path
    this.size = info.size
    this.logicalBlockSize = info.logicalBlockSize
    this.direct = info.direct
    this.isBlockDevice = info.blockDevice
    this.writable = info.writable
  }

  /** @internal The device closes its engine when it is closed itself. */
  ownEngine(): this {
    this.#ownsEngine = true
    return this
  }

  /** The engine that runs this device's I/O. */
  get engine(): IoEngine {
    return this.#engine
  }

  /** True once {@link RawDevice.close} has been called. */
  get closed(): boolean {
    return this.#closed
  }

  #check(): void {
    if (this.#closed) throw closedError(this.path)
  }

  /**
   * Reads `length` bytes at `offset`. The result is a `Buffer` over the engine's aligned
   * memory the data was read into, handed over without copying (in `thread` mode, results
   * up to 16 KiB are a copy). Small results may share one `ArrayBuffer` (see the module docs).
   * @throws {UbcacheError} `OUT_OF_RANGE`, `MISALIGNED`, `INVALID_ARGUMENT`, `EIO`, `CLOSED`.
   */
  read(offset: number, length: number): Promise<Buffer> {
    try {
      checkCount('offset', offset)
      checkCount('length', length)
      if (length > MAX_REQUEST) throw new InvalidArgumentError(`length ${length} exceeds one request's limit`)
      this.#check()
    } catch (err) {
      return Promise.reject(err)
    }
    return this.#engine.submit('read', this.#id, offset, length) as Promise<Buffer>
  }

  /**
   * Reads `buffer.byteLength` bytes at `offset` into `buffer`; resolves to that count. With a
   * buffer from {@link RawDevice.allocBuffer} (in `inline` mode, and starting on a 4 KiB
   * boundary of it) the data lands in it directly: no copy and no new memory per read,
   * which is what a program streaming through large reads wants (as fio does, reading
   * into the same buffers again and again). Any other `Uint8Array` works too, through one
   * copy. As with `fs.read`, leave the bytes alone until the read has resolved; a second
   * read into bytes that a read is still landing in is refused.
   * @throws {UbcacheError} `OUT_OF_RANGE`, `MISALIGNED`, `INVALID_ARGUMENT` (not a
   *   `Uint8Array`, or bytes a read is still landing in), `EIO`, `CLOSED`.
   */
  readInto(buffer: Uint8Array, offset: number): Promise<number> {
    try {
      if (!(buffer instanceof Uint8Array)) throw new InvalidArgumentError('buffer must be a Buffer or Uint8Array')
      checkCount('offset', offset)
      this.#check()
    } catch (err) {
      return Promise.reject(err)
    }
    return this.#engine.submitInto(this.#id, offset, buffer) ?? this.#readCopy(buffer, offset)
  }

  async #readCopy(buffer: Uint8Array, offset: number): Promise<number> {
    const data = await this.read(offset, buffer.byteLength)
    buffer.set(data)
    return data.length
  }

  /**
   * A zeroed `Buffer` of `size` bytes for {@link RawDevice.readInto} to read into without
   * copying (see {@link IoEngine.allocBuffer}). Under O_DIRECT, reads into it must still be
   * multiples of {@link RawDevice.logicalBlockSize}.
   * @throws {UbcacheError} `INVALID_ARGUMENT`, `CLOSED`.
   */
  allocBuffer(size: number): Buffer {
    this.#check()
    return this.#engine.allocBuffer(size)
  }

  /**
   * Writes all of `data` at `offset`; resolves once the device has it (durable after
   * {@link RawDevice.flush}).
   * @throws {UbcacheError} `OUT_OF_RANGE`, `MISALIGNED`, `EACCES` (read-only), `EIO`, `CLOSED`.
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    checkCount('offset', offset)
    if (!(data instanceof Uint8Array)) throw new InvalidArgumentError('data must be a Buffer or Uint8Array')
    this.#check()
    await this.#engine.submit('write', this.#id, offset, data)
  }

  /** Makes every write completed so far durable (fdatasync). */
  async flush(): Promise<void> {
    this.#check()
    await this.#engine.submit('flush', this.#id, 0, 0)
  }

  /**
   * Tells the device `length` bytes at `offset` are unused: BLKDISCARD on a block device,
   * a punched hole on a file (which then reads as zeros).
   */
  async discard(offset: number, length: number): Promise<void> {
    checkCount('offset', offset)
    checkCount('length', length)
    this.#check()
    await this.#engine.submit('discard', this.#id, offset, length)
  }

  /**
   * Closes the device: later requests fail with `CLOSED`; requests already made still
   * complete. Releases the exclusive open once they have. Idempotent.
   */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    if (!this.#engine.closed) this.#engine.closeDevice(this.#id)
    if (this.#ownsEngine) await this.#engine.close()
  }
}

/**
 * Opens a file or block device with an engine of its own, closed with the device.
 * @throws {UbcacheError} see {@link IoEngine.open}.
 */
export async function openDevice(path: string, options: OpenDeviceOptions & IoEngineOptions = {}): Promise<RawDevice> {
  const engine = new IoEngine(options)
  try {
    return (await engine.open(path, options)).ownEngine()
  } catch (err) {
    await engine.close()
    throw err
  }
}
