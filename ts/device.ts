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
import {
  checkCount,
  closedError,
  deviceRequests,
  InlineQueue,
  MAX_REQUEST,
  type Pending,
  RequestSlots,
  type RequestOp,
} from './inline'
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
  /**
   * Emulate a slow device, for benchmarks and tests: every request completes no sooner
   * than the model says (the data still comes from the real device). In a cache engine
   * (a registry's) only backing devices are slowed, never the cache device.
   */
  latency?: LatencyModel
}

/**
 * The cost of each request on an emulated slow device ({@link IoEngineOptions.latency}):
 * `fixedUs`, plus the transfer at `mibps`, plus a seek when the request does not start
 * where the last one ended (a tenth of `fullStrokeUs` for the shortest, growing with the
 * square root of the distance to all of it across the whole device).
 */
export interface LatencyModel {
  /** Microseconds every request costs (default 0): a rotation, or a network round trip. */
  fixedUs?: number
  /** Transfer rate in MiB/s (default: transfers cost nothing). */
  mibps?: number
  /** Microseconds of a seek across the whole device (default 0: no seeks). */
  fullStrokeUs?: number
  /** One request at a time, as a disk arm serves them (default false: all at once). */
  serial?: boolean
}

/** @internal Checks {@link OpenDeviceOptions.remoteTimeoutMs} and {@link OpenDeviceOptions.remoteConnections}. */
export function checkRemoteOptions(o: { remoteTimeoutMs?: number; remoteConnections?: number }): void {
  const ms = o.remoteTimeoutMs
  if (ms !== undefined && (typeof ms !== 'number' || !Number.isInteger(ms) || ms < 1 || ms > 0xffffffff)) {
    throw new InvalidArgumentError(`remoteTimeoutMs must be a whole number of milliseconds from 1 to ${0xffffffff}, got ${String(ms)}`)
  }
  const n = o.remoteConnections
  if (n !== undefined && (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > 16)) {
    throw new InvalidArgumentError(`remoteConnections must be a whole number from 1 to 16, got ${String(n)}`)
  }
}

/** The native form of `m`, checked. */
function nativeLatency(m: LatencyModel): native.NativeLatency {
  const us = (what: string, v: number | undefined): number => {
    if (v === undefined) return 0
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > 3.6e9) {
      throw new InvalidArgumentError(`latency.${what} must be a number of microseconds from 0 to 3600000000, got ${String(v)}`)
    }
    return Math.round(v)
  }
  if (m.mibps !== undefined && (typeof m.mibps !== 'number' || !(m.mibps > 0) || !Number.isFinite(m.mibps))) {
    throw new InvalidArgumentError(`latency.mibps must be a positive number of MiB/s, got ${String(m.mibps)}`)
  }
  for (const k of Object.keys(m)) {
    if (!['fixedUs', 'mibps', 'fullStrokeUs', 'serial'].includes(k)) throw new InvalidArgumentError(`latency: unknown key ${k}`)
  }
  return {
    fixedUs: us('fixedUs', m.fixedUs),
    bytesPerSec: m.mibps === undefined ? 0 : Math.max(1, Math.round(m.mibps * 1048576)),
    fullStrokeUs: us('fullStrokeUs', m.fullStrokeUs),
    serial: m.serial === true,
  }
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
  /**
   * A remote device (an NBD URI): milliseconds a request waits for its reply before it fails
   * with `ETIMEDOUT` naming the remote (default 30000). A lost connection is made again
   * meanwhile and the request sent again, so this is also how long an outage is ridden out.
   */
  remoteTimeoutMs?: number
  /**
   * A remote device whose server advertises `NBD_FLAG_CAN_MULTI_CONN` (a flush on one
   * connection covers writes answered on all): connections to open, 1 to 16 (default 4,
   * as nbdcopy opens). Requests go out on whichever is free. Servers without it get one.
   */
  remoteConnections?: number
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

type NativeBatch = Array<number | Buffer | [string, string] | undefined>

type NativeThread = InstanceType<typeof native.NativeIoEngine>
type NativeRing = InstanceType<typeof native.NativeRing>
/** Geometry of an open device, as the native engine reports it. */
type NativeDeviceInfo = native.NativeDevice

/** Request codes of the thread engine's batches (writes carry data and go by a call of their own). */
const OP_CODE = { read: 0, flush: 2, discard: 3 } as const

/**
 * @internal The native engine options `options` ask for, checked. `inline`: the engine is
 * driven from this thread (spinning defaults to adaptive polling).
 */
export function nativeEngineOptions(options: Omit<IoEngineOptions, 'mode'>, inline: boolean): native.NativeEngineOptions {
  if (options.queueDepth !== undefined) checkCount('queueDepth', options.queueDepth)
  if (options.psyncThreads !== undefined) checkCount('psyncThreads', options.psyncThreads)
  const spin = options.spinMicros ?? 'auto'
  if (spin !== 'auto') {
    if (typeof spin !== 'number') throw new InvalidArgumentError(`spinMicros must be 'auto' or a number of microseconds, got ${String(spin)}`)
    checkCount('spinMicros', spin)
    if (spin > 1_000_000) throw new InvalidArgumentError(`spinMicros must be at most 1000000, got ${spin}`)
  }
  return {
    engine: options.engine,
    queueDepth: options.queueDepth,
    psyncThreads: options.psyncThreads,
    spinMicros: spin === 'auto' ? undefined : spin,
    spinAuto: spin === 'auto' && inline,
    latency: options.latency === undefined ? undefined : nativeLatency(options.latency),
  }
}

/**
 * A native I/O engine that devices are opened in, driven by the JavaScript thread or by a
 * native thread (see {@link IoEngineOptions.mode}). One engine can drive many devices
 * (a cache set drives its cache and backing devices from one engine).
 */
export class IoEngine {
  readonly #native: NativeThread | NativeRing
  /** Inline mode: the requests to the ring driven from this thread. */
  readonly #inline: InlineQueue<NativeRing> | undefined
  /** Requests in flight (in inline mode, the queue's). */
  readonly #slots: RequestSlots
  #keepAlive: NodeJS.Timeout | undefined
  #closing: Promise<void> | undefined
  /** Thread mode: requests made this tick, five numbers each. */
  #queue: number[] = []

  constructor(options: IoEngineOptions = {}) {
    const mode = options.mode ?? 'inline'
    if (mode !== 'inline' && mode !== 'thread') throw new InvalidArgumentError(`mode must be inline or thread, got ${String(mode)}`)
    const nativeOptions = nativeEngineOptions(options, mode === 'inline')
    try {
      if (mode === 'inline') {
        this.#inline = new InlineQueue((onComplete) => new native.NativeRing(nativeOptions, onComplete))
        this.#native = this.#inline.native
        this.#slots = this.#inline.slots
      } else {
        // Requests in flight keep the process alive; an idle engine does not. (A ring does
        // this natively: its poll handle holds the event loop only while requests are in flight.)
        this.#slots = new RequestSlots(() => this.#keepAlive?.unref())
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
    return this.#inline ? 'inline' : 'thread'
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
    if (!this.#inline || size === 0) return Buffer.alloc(size)
    return this.#inline.allocBuffer(size)
  }

  /**
   * @internal Inline mode: reads `buffer.byteLength` bytes at `offset` straight into
   * `buffer`, when it is engine memory from {@link IoEngine.allocBuffer} starting on a
   * 4 KiB boundary; else returns undefined (the caller copies instead).
   */
  submitInto(dev: number, offset: number, buffer: Uint8Array): Promise<number> | undefined {
    if (!this.#inline) return undefined
    if (this.#closing) return Promise.reject(closedError('the I/O engine'))
    return this.#inline.submitInto(dev, offset, buffer)
  }

  /** Requests submitted and not yet completed. */
  get inFlight(): number {
    return this.#slots.live
  }

  /** True once {@link IoEngine.close} has been called. */
  get closed(): boolean {
    return this.#closing !== undefined
  }

  /**
   * Opens a regular file, a block device or an NBD export (`nbd://`, `nbd+unix://`, and
   * `nbds://`/`nbds+unix://` for TLS, with libnbd's `tls-psk-file=`, `tls-certificates=`
   * parameters) in this engine.
   * @throws {UbcacheError} `ENOENT`, `NOT_A_DEVICE`, `EBUSY` (open elsewhere), `EACCES`
   *   (also: the server requires TLS), `INVALID_ARGUMENT` (e.g. `direct: 'require'` where
   *   O_DIRECT is unsupported, or a bad URI), `TLS` (the server offers none, a wrong key, an
   *   untrusted certificate), `ETIMEDOUT`, `PROTOCOL`, `CLOSED`.
   */
  async open(path: string, options: OpenDeviceOptions = {}): Promise<RawDevice> {
    if (this.closed) throw closedError('the I/O engine')
    if (options.createSize !== undefined) checkCount('createSize', options.createSize)
    checkRemoteOptions(options)
    let info: NativeDeviceInfo
    try {
      info = this.#native.openDevice(path, {
        write: !options.readOnly,
        direct: options.direct,
        exclusive: options.exclusive,
        createSize: options.createSize,
        remoteTimeoutMs: options.remoteTimeoutMs,
        remoteConnections: options.remoteConnections,
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
    const inline = this.#inline
    if (inline) {
      // Requests in flight complete through the event loop; then the ring is let go.
      this.#closing = inline.slots.whenIdle().then(() => inline.native.close())
    } else {
      this.#closing = (this.#native as NativeThread).close().then(() => {
        clearInterval(this.#keepAlive)
      })
    }
    return this.#closing
  }

  /** @internal Submits one request and returns its completion. */
  submit(op: RequestOp, dev: number, offset: number, arg: number | Uint8Array): Promise<Buffer | number> {
    if (this.#closing) return Promise.reject(closedError('the I/O engine'))
    if (this.#inline) return this.#inline.submit(op, dev, offset, arg)
    let tag = 0
    const promise = new Promise<Buffer | number>((resolve, reject) => (tag = this.#slots.track({ resolve: resolve as Pending['resolve'], reject, empty: op !== 'read' })))
    if (this.#slots.live === 1) (this.#keepAlive ??= setInterval(() => {}, 1 << 30)).ref()
    if (op === 'write') {
      // Writes carry data and go alone, after everything queued before them.
      this.#submitQueued()
      try {
        ;(this.#native as NativeThread).write(tag, dev, offset, arg as Uint8Array)
      } catch (err) {
        this.#slots.fail([tag], err)
      }
    } else {
      // Requests made in one tick (e.g. from one batch of completions) go in one call.
      this.#queue.push(OP_CODE[op], tag, dev, offset, op === 'flush' ? 0 : (arg as number))
      if (this.#queue.length === 5) void Promise.resolve().then(this.#submitQueued)
    }
    return promise
  }

  /** Sends the queued requests to the native engine. */
  readonly #submitQueued = (): void => {
    if (this.#inline) return this.#inline.submitQueued()
    if (this.#queue.length === 0) return
    const q = this.#queue
    this.#queue = []
    try {
      ;(this.#native as NativeThread).submitBatch(new Float64Array(q))
    } catch (err) {
      this.#slots.fail(
        q.filter((_, i) => i % 5 === 1),
        err,
      )
    }
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
      const p = this.#slots.untrack(tag)
      if (!p) continue
      const result = batch[i + 1] as number
      const payload = batch[i + 2]
      if (result < 0) {
        const [code, message] = payload as [string, string]
        p.reject(new UbcacheError(code, message))
      } else {
        p.resolve((payload as Buffer | undefined) ?? (p.empty ? undefined : result))
      }
    }
    this.#slots.idle()
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

  readonly #check = (): void => {
    if (this.#closed) throw closedError(this.path)
  }

  /**
   * Reads `length` bytes at `offset`. The result is a `Buffer` over the engine's aligned
   * memory the data was read into, handed over without copying (in `thread` mode, results
   * up to 16 KiB are a copy). Small results may share one `ArrayBuffer` (see the module docs).
   * @throws {UbcacheError} `OUT_OF_RANGE`, `MISALIGNED`, `INVALID_ARGUMENT`, `EIO`, `CLOSED`.
   */
  read(offset: number, length: number): Promise<Buffer> {
    return deviceRequests.read(this.#engine, this.#check, this.#id, offset, length)
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
    return deviceRequests.readInto(this.#engine, this.#check, this.#id, buffer, offset)
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
  write(offset: number, data: Uint8Array): Promise<void> {
    return deviceRequests.write(this.#engine, this.#check, this.#id, offset, data)
  }

  /** Makes every write completed so far durable (fdatasync). */
  flush(): Promise<void> {
    return deviceRequests.flush(this.#engine, this.#check, this.#id)
  }

  /**
   * Tells the device `length` bytes at `offset` are unused: BLKDISCARD on a block device,
   * a punched hole on a file (which then reads as zeros).
   */
  discard(offset: number, length: number): Promise<void> {
    return deviceRequests.discard(this.#engine, this.#check, this.#id, offset, length)
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
