/**
 * The JavaScript side of an engine that the JavaScript thread drives itself: the raw-device
 * engine's `NativeRing` (`IoEngine` in `inline` mode) and the cache engine's
 * `NativeCacheEngine` (`CacheEngine`) share it, as they share their native glue.
 *
 * Each request gets a promise and a tag (its slot in a table, reused once it completed).
 * Requests made in one tick are written into a submission buffer shared with the engine
 * and go to it in one call; completions come back as `tag, result` pairs in a shared
 * completion buffer, in chunks of 8, through the engine's callback or as the return value
 * of a call that already had some. Reads land in slabs of engine memory that JavaScript
 * holds as `ArrayBuffer`s, and resolve to views on them, never copies: small reads share
 * 64 KiB slabs, larger ones get one each, and {@link InlineQueue.allocBuffer} hands out
 * slabs to read into again and again. Written data is copied once into aligned memory.
 * @internal
 * @module
 */
import { asUbcacheError, InvalidArgumentError, UbcacheError } from './errors'

/** What the inline machinery needs of a native engine driven from this thread. */
export interface InlineNative {
  submissionBuffer(): ArrayBuffer
  completionBuffer(): ArrayBuffer
  readonly capacity: number
  readonly chunk: number
  slab(bytes: number): [number, ArrayBuffer]
  submit(count: number): number
  stage(dev: number, offset: number, data: Uint8Array, fua?: boolean | null): number
  more(): number
  takeErrors(): string[]
}

/** The native engine's completion callback: a chunk of `count` completions, or the engine broke. */
export type CompleteFn = (count: number, fatal?: [string, string]) => void

/** What a request does. */
export type RequestOp = 'read' | 'write' | 'flush' | 'discard'

/** A request in flight: its promise's settlers, and for reads where they land. */
export interface Pending {
  resolve: (v: Buffer | number | undefined) => void
  reject: (e: Error) => void
  /** Resolves with nothing (a write, flush or discard), so the API can hand its promise out as is. */
  empty?: boolean
  /** A read driven inline: the slab it lands in, and where. */
  slab?: ArrayBuffer
  at?: number
  /** Called when the request is done (a read into an engine buffer frees its bytes). */
  release?: () => void
}

/** Bytes one request may move (Linux's limit for a single read or write). */
export const MAX_REQUEST = 0x7ffff000
/** Numbers per request in the submission buffer: op, tag, dev, offset, length, slab, at. */
const DESC = 7
/** Small reads share slabs of this size; larger ones get a slab each. */
const SLAB_BYTES = 64 << 10
const OWN_SLAB_ABOVE = 16 << 10
/** Reads land on 4 KiB boundaries of a slab, as O_DIRECT wants. */
const SLAB_ALIGN = 4096
/**
 * After this many calls in a row that came back with completions (whose promises then made
 * the next requests, all in one chain of microtasks), the next call's completions are
 * settled after a turn of the event loop. Without it, a reader whose requests keep
 * completing by the time it submits (fast devices, `spinMicros`) would starve timers and
 * other I/O, and the finalizers that return read buffers to the pool (which run from the
 * event loop) would never run: every read would need new memory.
 */
const SYNC_ROUNDS = 16
/**
 * Batching while busy ({@link InlineQueue}'s `holdWhileBusy`): with at least this many
 * requests in the engine, fewer than {@link HOLD_BELOW} new ones wait for the next
 * completions (bound to come soon) and go out with the requests those make. A device kept
 * busy completes one request at a time, each making one more: sent alone, every one costs
 * a system call and a doorbell on each device it reaches (on a virtual disk, an exit to
 * the hypervisor). Held, they go a few at a time, at a cost of a few tens of microseconds
 * on requests that would have waited behind the busy ones anyway.
 */
const HOLD_IN_FLIGHT = 16
const HOLD_BELOW = 4
/** Schedules microtasks: cheaper than queueMicrotask, which sets up an async resource per call. */
const RESOLVED = Promise.resolve()
/** Request codes of the submission buffer (a write names the slot its data was staged in). */
const OP_CODE = { read: 0, write: 1, flush: 2, discard: 3 } as const

/** Throws `INVALID_ARGUMENT` unless `v` is a non-negative safe integer. */
export function checkCount(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new InvalidArgumentError(`${what} must be a non-negative integer, got ${v}`)
}

/** The error of a request made to something closed. */
export function closedError(what: string): UbcacheError {
  return new UbcacheError('CLOSED', `${what} is closed`)
}

/** Requests in flight by tag: a tag is a slot, reused once its request completed. */
export class RequestSlots {
  readonly #slots: (Pending | undefined)[] = []
  readonly #free: number[] = []
  readonly #onIdle: (() => void) | undefined
  #live = 0
  #waiters: (() => void)[] = []

  /** `onIdle` runs whenever the last request in flight has been settled. */
  constructor(onIdle?: () => void) {
    this.#onIdle = onIdle
  }

  /** Requests in flight. */
  get live(): number {
    return this.#live
  }

  /** Takes a slot for `p`; returns its tag. */
  track(p: Pending): number {
    const tag = this.#free.pop() ?? this.#slots.length
    this.#slots[tag] = p
    this.#live++
    return tag
  }

  /** Frees the slot of `tag`; returns what was in it. */
  untrack(tag: number): Pending | undefined {
    const p = this.#slots[tag]
    if (p) {
      this.#slots[tag] = undefined
      this.#free.push(tag)
      this.#live--
      p.release?.()
    }
    return p
  }

  /** Tags of every request in flight. */
  liveTags(): number[] {
    const tags: number[] = []
    this.#slots.forEach((p, tag) => p && tags.push(tag))
    return tags
  }

  /** Rejects the requests of `tags` with `err`. */
  fail(tags: number[], err: unknown): void {
    const e = asUbcacheError(err)
    for (const tag of tags) this.untrack(tag)?.reject(e)
    this.idle()
  }

  /** Call after settling requests: tells whoever waits for the last one. */
  idle(): void {
    if (this.#live > 0) return
    this.#onIdle?.()
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }

  /** Resolves once nothing is in flight. */
  whenIdle(): Promise<void> {
    if (this.#live === 0) return Promise.resolve()
    return new Promise<void>((r) => this.#waiters.push(r))
  }
}

/** Requests to a native engine driven from this thread (see the module docs). */
export class InlineQueue<N extends InlineNative> {
  /** The native engine. */
  readonly native: N
  /** Requests in flight. */
  readonly slots = new RequestSlots()
  readonly #sq: Float64Array
  readonly #cq: Float64Array
  readonly #capacity: number
  readonly #chunk: number
  /** Requests written into the submission buffer and not yet submitted. */
  #queued = 0
  /** Small batches wait for the next completions while the engine is busy. */
  readonly #holdWhileBusy: boolean
  /** Times the queued requests were held back since the last submission. */
  #holds = 0
  /** Sends held requests if no completion came for a millisecond (all in flight stalled). */
  #holdTimer: ReturnType<typeof setTimeout> | undefined
  /** The slab small reads land in, its id, and how much of it is handed out. */
  #slab: ArrayBuffer | undefined
  #slabId = 0
  #slabUsed = 0
  /**
   * Calls in a row that returned completions, settled from the same chain of microtasks
   * without the event loop getting a turn (see {@link SYNC_ROUNDS}).
   */
  #syncRounds = 0
  /** The slab behind each buffer {@link InlineQueue.allocBuffer} handed out. */
  readonly #engineBuffers = new WeakMap<ArrayBuffer, number>()
  /** Byte ranges of engine buffers that reads are landing in (start, end pairs). */
  readonly #landing = new Map<ArrayBuffer, number[]>()

  /**
   * The completion callback. The native engine holds it weakly while idle (so that an
   * engine nobody refers to can be collected): this field keeps it alive as long as the
   * queue.
   */
  readonly #onComplete: CompleteFn = (count, fatal) => {
    // The event loop had a turn: submissions may complete others synchronously again.
    this.#syncRounds = 0
    if (fatal) this.slots.fail(this.slots.liveTags(), new UbcacheError(fatal[0], fatal[1]))
    else this.#settle(this.#cq, count, undefined)
  }

  /**
   * `make` builds the native engine around the completion callback it is given. With
   * `holdWhileBusy`, small batches of requests wait for the next completions while many
   * are in flight (see {@link HOLD_IN_FLIGHT}).
   */
  constructor(make: (onComplete: CompleteFn) => N, options: { holdWhileBusy?: boolean } = {}) {
    this.#holdWhileBusy = options.holdWhileBusy === true
    this.native = make(this.#onComplete)
    this.#sq = new Float64Array(this.native.submissionBuffer())
    this.#cq = new Float64Array(this.native.completionBuffer())
    this.#capacity = this.native.capacity
    this.#chunk = this.native.chunk
  }

  /**
   * A zeroed `Buffer` of `size` (> 0) bytes of aligned engine memory, which
   * {@link InlineQueue.submitInto} reads into without copying.
   */
  allocBuffer(size: number): Buffer {
    let slab: [number, ArrayBuffer]
    try {
      slab = this.native.slab(size)
    } catch (err) {
      throw asUbcacheError(err)
    }
    this.#engineBuffers.set(slab[1], slab[0])
    // Engine memory comes back from earlier reads: clear it, as Buffer.alloc would.
    return Buffer.from(slab[1], 0, size).fill(0)
  }

  /**
   * Reads `buffer.byteLength` bytes at `offset` straight into `buffer`, when it is engine
   * memory from {@link InlineQueue.allocBuffer} starting on a 4 KiB boundary; else returns
   * undefined (the caller copies instead).
   */
  submitInto(dev: number, offset: number, buffer: Uint8Array): Promise<number> | undefined {
    const ab = buffer.buffer as ArrayBuffer
    const slabId = this.#engineBuffers.get(ab)
    if (slabId === undefined || buffer.byteOffset % SLAB_ALIGN !== 0 || buffer.byteLength === 0) return undefined
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
      pending = { resolve: resolve as Pending['resolve'], reject, release: () => this.#landed(ab, start) }
    })
    this.#queueRequest(OP_CODE.read, this.slots.track(pending as Pending), dev, offset, buffer.byteLength, slabId, start)
    return promise
  }

  /** The read landing at `start` of an engine buffer is done: the bytes are free for the next. */
  #landed(ab: ArrayBuffer, start: number): void {
    const ranges = this.#landing.get(ab) as number[]
    if (ranges.length === 2) return void this.#landing.delete(ab)
    for (let i = 0; i < ranges.length; i += 2) {
      if (ranges[i] === start) return void ranges.splice(i, 2)
    }
  }

  /**
   * Submits one request and returns its completion: a read's data (a view on engine
   * memory), or the byte count. A write with `fua` is durable when it completes.
   */
  submit(op: RequestOp, dev: number, offset: number, arg: number | Uint8Array, fua = false): Promise<Buffer | number> {
    let pending: Pending | undefined
    const promise = new Promise<Buffer | number>((resolve, reject) => {
      pending = { resolve: resolve as Pending['resolve'], reject, empty: op !== 'read' }
    })
    const p = pending as Pending
    const tag = this.slots.track(p)
    if (op === 'write') {
      // The data is copied now (the caller may reuse its buffer); the write goes out with
      // the other requests of this tick, so that writes made side by side reach the device
      // together (and a lone one is not polled for while the others wait to be made).
      const data = arg as Uint8Array
      let slot: number
      try {
        slot = this.native.stage(dev, offset, data, fua)
      } catch (err) {
        this.slots.fail([tag], err)
        return promise
      }
      this.#queueRequest(OP_CODE.write, tag, dev, offset, data.byteLength, slot, 0)
      return promise
    }
    let slabId = 0
    let at = 0
    const length = op === 'flush' ? 0 : (arg as number)
    if (op === 'read') {
      const size = Math.ceil(length / SLAB_ALIGN) * SLAB_ALIGN
      try {
        if (size > OWN_SLAB_ABOVE) {
          ;[slabId, p.slab] = this.native.slab(size)
        } else {
          if (this.#slab === undefined || this.#slabUsed + size > SLAB_BYTES) {
            ;[this.#slabId, this.#slab] = this.native.slab(SLAB_BYTES)
            this.#slabUsed = 0
          }
          slabId = this.#slabId
          p.slab = this.#slab
          at = this.#slabUsed
          this.#slabUsed += size
        }
      } catch (err) {
        this.slots.fail([tag], err)
        return promise
      }
      p.at = at
    }
    this.#queueRequest(OP_CODE[op], tag, dev, offset, length, slabId, at)
    return promise
  }

  /** Writes one request into the shared submission buffer. */
  #queueRequest(op: number, tag: number, dev: number, offset: number, length: number, slabId: number, at: number): void {
    const sq = this.#sq
    const d = this.#queued * DESC
    sq[d] = op
    sq[d + 1] = tag
    sq[d + 2] = dev
    sq[d + 3] = offset
    sq[d + 4] = length
    sq[d + 5] = slabId
    sq[d + 6] = at
    // Requests made in one tick (e.g. from one batch of completions) go in one call.
    if (++this.#queued === 1) void RESOLVED.then(this.submitQueued)
    else if (this.#queued === this.#capacity) this.submitQueued()
  }

  /** Sends the queued requests to the native engine. */
  readonly submitQueued = (): void => {
    const n = this.#queued
    if (n === 0) return
    // Released by the next completions (#settle), which the busy engine owes us: a few
    // times at most, so that requests nobody follows up wait little, and after 1 ms if
    // nothing completes (requests stalled on a device must not hold up the others).
    if (this.#holdWhileBusy && n < HOLD_BELOW && this.#holds < HOLD_BELOW && this.slots.live - n >= HOLD_IN_FLIGHT) {
      this.#holds++
      if (this.#holdTimer === undefined) this.#holdTimer = setTimeout(this.#submitHeld, 1).unref()
      else this.#holdTimer.refresh()
      return
    }
    this.#holds = 0
    this.#queued = 0
    try {
      // The engine reports the completions it already has (e.g. requests it rejected).
      this.#drain(this.native.submit(n))
    } catch (err) {
      this.slots.fail(
        Array.from({ length: n }, (_, i) => this.#sq[i * DESC + 1]),
        err,
      )
    }
  }

  readonly #submitHeld = (): void => {
    if (this.#queued === 0) return
    this.#holds = HOLD_BELOW
    this.submitQueued()
  }

  /** Handles `count` completions the engine just placed, and any more it has. */
  #drain(count: number): void {
    if (count > 0) {
      if (++this.#syncRounds <= SYNC_ROUNDS) this.#settle(this.#cq, count, undefined)
      else this.#settleAfterTurn(count)
    }
    // Only a full chunk can leave more behind. Take it once the promises just settled have
    // run and their requests have gone out, so the device works while we handle the rest.
    if (count === this.#chunk) void RESOLVED.then(this.#drainMore)
  }

  readonly #drainMore = (): void => {
    this.submitQueued()
    this.#drain(this.native.more())
  }

  /**
   * Settles `count` completions of the completion buffer after a turn of the event loop
   * (see {@link SYNC_ROUNDS}). They are copied now: the next call of the engine reuses the
   * buffer and the errors.
   */
  #settleAfterTurn(count: number): void {
    const cq = this.#cq.slice(0, 2 * count)
    let errors: string[] | undefined
    for (let i = 1; i < 2 * count && !errors; i += 2) if (cq[i] < 0) errors = this.native.takeErrors()
    setImmediate(() => {
      this.#syncRounds = 0
      this.#settle(cq, count, errors)
    })
  }

  /** Settles the promises of `count` `tag, result` pairs of `cq`. */
  #settle(cq: Float64Array, count: number, errors: string[] | undefined): void {
    let e = 0
    for (let i = 0; i < count; i++) {
      const tag = cq[2 * i]
      const result = cq[2 * i + 1]
      const p = this.slots.untrack(tag)
      if (result < 0) {
        errors ??= this.native.takeErrors()
        if (p) p.reject(new UbcacheError(errors[e] ?? 'EIO', errors[e + 1] ?? 'I/O error'))
        e += 2
      } else if (p) {
        p.resolve(p.slab ? Buffer.from(p.slab, p.at, result) : p.empty ? undefined : result)
      }
    }
    // Requests held back while busy go out with those the settled promises make.
    if (this.#queued > 0) void RESOLVED.then(this.submitQueued)
    this.slots.idle()
  }
}

/** Where validated device requests go: an engine, with a check that it is still open. */
export interface RequestTarget {
  /** Submits one request (see {@link InlineQueue.submit}). */
  submit(op: RequestOp, dev: number, offset: number, arg: number | Uint8Array, fua?: boolean): Promise<Buffer | number>
  /** Reads into engine memory, or undefined when `buffer` is not (see {@link InlineQueue.submitInto}). */
  submitInto(dev: number, offset: number, buffer: Uint8Array): Promise<number> | undefined
}

/**
 * The requests of a device's public API, validated the same way whichever engine serves
 * them; `check` throws when the device or its engine is closed.
 */
export const deviceRequests = {
  /** Reads `length` bytes at `offset`. */
  read(t: RequestTarget, check: () => void, dev: number, offset: number, length: number): Promise<Buffer> {
    try {
      checkCount('offset', offset)
      checkCount('length', length)
      if (length > MAX_REQUEST) throw new InvalidArgumentError(`length ${length} exceeds one request's limit`)
      check()
    } catch (err) {
      return Promise.reject(err)
    }
    return t.submit('read', dev, offset, length) as Promise<Buffer>
  },

  /** Reads `buffer.byteLength` bytes at `offset` into `buffer` (directly when it is engine memory). */
  readInto(t: RequestTarget, check: () => void, dev: number, buffer: Uint8Array, offset: number): Promise<number> {
    try {
      if (!(buffer instanceof Uint8Array)) throw new InvalidArgumentError('buffer must be a Buffer or Uint8Array')
      checkCount('offset', offset)
      check()
    } catch (err) {
      return Promise.reject(err)
    }
    return t.submitInto(dev, offset, buffer) ?? deviceRequests.readCopy(t, check, dev, buffer, offset)
  },

  async readCopy(t: RequestTarget, check: () => void, dev: number, buffer: Uint8Array, offset: number): Promise<number> {
    const data = await deviceRequests.read(t, check, dev, offset, buffer.byteLength)
    buffer.set(data)
    return data.length
  },

  // Writes, flushes and discards resolve with nothing (`Pending.empty`): their promises are
  // handed out as they are, without a wrapper promise and its extra turns of the microtask
  // queue on every request.

  /** Writes all of `data` at `offset`. */
  write(t: RequestTarget, check: () => void, dev: number, offset: number, data: Uint8Array, fua = false): Promise<void> {
    try {
      checkCount('offset', offset)
      if (!(data instanceof Uint8Array)) throw new InvalidArgumentError('data must be a Buffer or Uint8Array')
      check()
    } catch (err) {
      return Promise.reject(err)
    }
    return t.submit('write', dev, offset, data, fua) as Promise<unknown> as Promise<void>
  },

  /** Makes every write completed so far durable. */
  flush(t: RequestTarget, check: () => void, dev: number): Promise<void> {
    try {
      check()
    } catch (err) {
      return Promise.reject(err)
    }
    return t.submit('flush', dev, 0, 0) as Promise<unknown> as Promise<void>
  },

  /** Discards `length` bytes at `offset`. */
  discard(t: RequestTarget, check: () => void, dev: number, offset: number, length: number): Promise<void> {
    try {
      checkCount('offset', offset)
      checkCount('length', length)
      check()
    } catch (err) {
      return Promise.reject(err)
    }
    return t.submit('discard', dev, offset, length) as Promise<unknown> as Promise<void>
  },
}
