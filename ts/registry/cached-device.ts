/**
 * A cached device: a registered backing device, read and written through its cache set
 * when one serves it, straight from its data offset otherwise (see {@link CachedDevice}).
 * @module
 */
import { type Accounting, type AttachOptions, type BypassConfig, type CacheEngine, checkBypassChanges, checkWritebackChanges, DEFAULT_BYPASS, DEFAULT_WRITEBACK, type WriteOptions, type WritebackConfig, type WritebackRate } from '../cache-engine'
import { asUbcacheError, InvalidArgumentError, UbcacheError } from '../errors'
import { closedError } from '../inline'
import { CACHE_MODES, type BackingState, type CacheMode, NULL_UUID, type Superblock } from '../superblock'
import { BackingSuper, type SuperblockStore, TableSuper } from './backing-super'
import type { CacheSet } from './cache-set'
import { Overlaps } from './overlaps'
import { merge, purgeCached } from './purge'

/** Where a cached device's requests go. */
interface Route {
  engine: CacheEngine
  handle: number
  /** The set serving it, or null: the backing device straight, through the registry's set-less engine. */
  set: CacheSet | null
}

/** The registry's set-less engine and the device's handle in it. */
interface PlainHandle {
  engine: CacheEngine
  handle: number
}

type Kind = 'read' | 'write' | 'flush' | 'discard' | 'control'

/**
 * A request (or control operation) waiting behind a gate: see {@link CachedDevice} on
 * ordering. Requests carry their byte range; `go` submits them to a route synchronously.
 */
interface Waiting {
  kind: Kind
  start: number
  end: number
  go: (route: Route | undefined) => Promise<unknown>
  /** Control operations only: work to do before `go` (once). */
  needs?: () => (() => Promise<void>) | undefined
  resolve: (v: unknown) => void
  reject: (e: unknown) => void
}

/** What the registry knows of a backing device when it registers it. */
export interface CachedDeviceInit {
  path: string
  sb: Superblock
  /** Bytes of data past the data offset. */
  size: number
  /** Options for the engines' opens. */
  open: Pick<AttachOptions, 'direct' | 'exclusive' | 'remoteTimeoutMs' | 'remoteConnections'>
  /** Writeback tunables to start with, in place of bcache's defaults. */
  writeback?: Partial<WritebackConfig>
  /** Bypass tunables to start with, in place of bcache's defaults. */
  bypass?: Partial<BypassConfig>
  /** The registry's set-less engine, which serves the device once it detaches from its set. */
  plainEngine: () => Promise<CacheEngine>
  /** Cached as it is, with no superblock: `sb` is made up, its set's UUID table keeps the rest. */
  noSuperblock?: boolean
}

/** The dirty and cached sector counts of a device when its set closed. */
interface Final {
  dirty: number | undefined
  cached: number | undefined
}

const RESOLVED = Promise.resolve()
const noop = (): void => {}
/** Ranges written away from the set are merged once there are this many. */
const AWAY_MERGE = 4096

/**
 * A backing device registered with a {@link Registry}: a block device (or file) whose data
 * lies past its superblock at its data offset, read and written through the cache set whose
 * UUID its superblock records once that set is registered (bcache's `cached_dev`).
 *
 * Requests take byte offsets and lengths in whole blocks of {@link CachedDevice.blockSize}
 * (`MISALIGNED` otherwise) inside {@link CachedDevice.size} (`OUT_OF_RANGE`); after the
 * registry closed they fail with `CLOSED`. Requests that overlap are served in the order
 * they were made, whichever way the device is served: a read returns what the newest write
 * made before it wrote (or, after a discard and until the next write, anything).
 *
 * Durability is a disk's with a volatile write cache: a write resolves once its data is on
 * the device its cache mode sends it to and indexed; it is durable once a later
 * {@link CachedDevice.flush} resolves, or at once when written with `fua`.
 *
 * Served without its set (registered before it), the device is read and written straight
 * at its data offset; when the set is registered the device attaches to it: requests in
 * flight finish, requests made meanwhile wait and then go through the set. A device whose
 * superblock says `dirty` holds data only its set has: it is not served until the set is
 * registered (bcache does not run it either), and its requests wait for that.
 *
 * The superblock's `state` follows bcache: `clean` once attached, `dirty` (written durably
 * before the first write that can leave dirty data is sent) while the set may hold dirty
 * data of it, `clean` again at a clean stop that leaves none; `stale` once written without
 * its set, so that the set's copy is dropped when it attaches again.
 */
export class CachedDevice {
  /** The path it was registered from. */
  readonly path: string
  /** Its UUID (the backing superblock's `uuid`): the cache set knows it by this. */
  readonly uuid: string
  /** Its label, from the superblock. */
  readonly label: string
  /** Bytes of data: the backing device's size less the data offset. */
  readonly size: number
  /**
   * Bytes per block: requests are whole blocks. The backing superblock's block size, which
   * is at least the device's logical block size and the cache set's block size.
   */
  readonly blockSize: number
  /** Byte offset of the data on the backing device (the superblock's `dataOffset` × 512). */
  readonly dataOffset: number
  /**
   * False for a device cached as it is ({@link Registry.attachExisting}): it has no bcache
   * superblock, its data starts at offset 0, and its cache mode and state live in its
   * entry of the set's UUID table ({@link CachedDevice.superblock} is then made up).
   */
  readonly hasSuperblock: boolean

  readonly #super: SuperblockStore
  readonly #plainEngine: () => Promise<CacheEngine>
  readonly #open: Pick<AttachOptions, 'direct' | 'exclusive' | 'remoteTimeoutMs' | 'remoteConnections'>
  /** Where requests go now: undefined while waiting for its set, and when it cannot be served. */
  #route: Route | undefined
  /** The set-less engine's handle of a device not served until its set comes (state `dirty`). */
  #hold: PlainHandle | undefined
  /** The registry's set-less engine, once the device was served by it. */
  #plain: CacheEngine | undefined
  /** Requests may go straight to the route: it is a set's, nothing waits, nothing to report. */
  #fast = false
  /** Writes may go straight too: they create no dirty data the superblock does not admit to. */
  #fastWrite = false
  /** The cache mode as last set. */
  #mode: CacheMode
  /** The mode requests submitted now follow (behind {@link CachedDevice.cacheMode} while requests wait). */
  #engineMode: CacheMode
  /** Writeback tunables changed from bcache's defaults: applied whenever a set serves the device. */
  #writeback: Partial<WritebackConfig> = {}
  /** Bypass tunables changed from bcache's defaults: applied whenever a set serves the device. */
  #bypass: Partial<BypassConfig> = {}
  /** A cache-mode write to the superblock is queued and has not picked its mode yet. */
  #modeQueued = false
  /** Requests and control operations waiting for a gate, in order; undefined when none is closed. */
  #queue: Waiting[] | undefined
  /** Resolved when the queue next empties. */
  #drainWaiters: (() => void)[] = []
  /** Opens the gate of a device waiting for its set. */
  #wake: { resolve: () => void; reject: (e: Error) => void } | undefined
  readonly #overlaps = new Overlaps()
  /** Byte ranges written without the set `set`, since the device was last known clean in it. */
  #away: { set: string; ranges: [number, number][] } | undefined
  /** Transitions to a set in progress. */
  readonly #attaching = new Map<CacheSet, Promise<void>>()
  #attachError: UbcacheError | undefined
  /** Why requests cannot be served (no route): they fail with it. */
  #refusal: UbcacheError | undefined
  /** A superblock write that failed, reported by the next call. */
  #error: UbcacheError | undefined
  #closed = false
  #final: Final | undefined

  /** @internal Devices are made by {@link Registry.register}. */
  constructor(init: CachedDeviceInit) {
    const { sb } = init
    this.path = init.path
    this.uuid = sb.uuid
    this.label = sb.label
    this.size = init.size
    this.blockSize = sb.blockSize * 512
    this.dataOffset = sb.dataOffset * 512
    this.hasSuperblock = init.noSuperblock !== true
    this.#super = this.hasSuperblock ? new BackingSuper(init.path, sb) : new TableSuper(init.path, sb)
    this.#open = init.open
    this.#mode = sb.cacheMode
    this.#engineMode = sb.cacheMode
    this.#writeback = { ...init.writeback }
    this.#plainEngine = init.plainEngine
    this.#bypass = { ...init.bypass }
  }

  /** The cache set serving the device, or null when it is served without one. */
  get set(): CacheSet | null {
    return this.#route?.set ?? null
  }

  /** The backing superblock's state as on disk: `none`, `clean`, `dirty` or `stale`. */
  get state(): BackingState {
    return this.#super.sb.state
  }

  /** A copy of the backing superblock as on disk. */
  get superblock(): Superblock {
    const sb = this.#super.sb
    return { ...sb, journalBuckets: [...sb.journalBuckets] }
  }

  /** True once the registry closed (requests fail with `CLOSED`). */
  get closed(): boolean {
    return this.#closed
  }

  /**
   * Why the device did not attach to its set when the set was registered (it is then served
   * without it, or, holding dirty data, not at all); undefined if it did or was never tried.
   */
  get attachError(): UbcacheError | undefined {
    return this.#attachError
  }

  /**
   * The cache mode: `writethrough`, `writeback`, `writearound` or `none`. Setting it switches
   * at once (requests made from then on follow it) and starts writing it to the backing
   * superblock's `cache_mode`; if that write fails, the next call on the device (or the
   * registry's close) reports it.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (not a mode), `CLOSED`.
   */
  get cacheMode(): CacheMode {
    return this.#mode
  }

  set cacheMode(mode: CacheMode) {
    if (!CACHE_MODES.includes(mode)) throw new InvalidArgumentError(`cache mode '${String(mode)}' is not one of ${CACHE_MODES.join(', ')}`)
    if (this.#closed) throw this.#closedError()
    if (mode === this.#mode) return
    this.#mode = mode
    const apply = (): void => {
      this.#engineMode = mode
      const r = this.#route
      if (r?.set) r.engine.setCacheMode(r.handle, mode)
    }
    if (this.#queue) {
      this.#queue.push({ kind: 'control', start: 0, end: 0, go: () => (apply(), RESOLVED), resolve: noop, reject: noop })
    } else {
      apply()
      this.#refresh()
    }
    if (!this.#modeQueued) {
      this.#modeQueued = true
      this.#update(() => void (this.#modeQueued = false)).catch((err) => this.#failed(err))
    }
  }

  /**
   * The writeback tunables (bcache's `writeback_*`, see {@link WritebackConfig}): its
   * defaults until changed with {@link CachedDevice.configureWriteback}. Like bcache's
   * sysfs tunables they are not persisted: a new registration starts from the defaults.
   */
  writebackConfig(): WritebackConfig {
    return { ...DEFAULT_WRITEBACK, ...this.#writeback }
  }

  /**
   * Changes writeback tunables (those given; all checked before any changes). Applies at
   * once when a set serves the device (a pause stops new extents, a new rate applies to the
   * next one), else when one does. `{ running: false }` pauses writeback, `{ percent: 0 }`
   * writes dirty data back at full speed.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an unknown tunable, a wrong type, a value
   * out of bcache's range, naming it), `CLOSED`.
   */
  configureWriteback(changes: Partial<WritebackConfig>): void {
    if (this.#closed) throw this.#closedError()
    checkWritebackChanges(changes)
    const r = this.#route
    if (r?.set) r.engine.setWritebackConfig(r.handle, changes)
    this.#writeback = { ...this.#writeback, ...changes }
  }

  /**
   * The device's hits, misses and bypasses in bcache's decaying windows (five minutes, an
   * hour, a day) and in total, since a set last began serving it; undefined when no set
   * serves it.
   */
  accounting(): Accounting | undefined {
    const r = this.#route
    if (!r?.set || this.#closed) return undefined
    return r.engine.deviceAccounting(r.handle)
  }

  /**
   * The bypass tunables (bcache's `sequential_cutoff`, and cutoffs for reads and writes of
   * their own; see {@link BypassConfig}): bcache's defaults until changed with
   * {@link CachedDevice.configureBypass}; not persisted.
   */
  bypassConfig(): BypassConfig {
    return { ...DEFAULT_BYPASS, ...this.#bypass }
  }

  /**
   * Changes bypass tunables (those given; all checked before any changes). Applies to the
   * next request when a set serves the device, else when one does. `{ sequentialCutoff: 0 }`
   * caches every stream, however long.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an unknown tunable or a bad value, naming
   *   it), `CLOSED`.
   */
  configureBypass(changes: Partial<BypassConfig>): void {
    if (this.#closed) throw this.#closedError()
    checkBypassChanges(changes)
    const r = this.#route
    if (r?.set) r.engine.setBypassConfig(r.handle, changes)
    this.#bypass = { ...this.#bypass, ...changes }
  }

  /**
   * Detaches the device from its cache set for good, as writing 1 to bcache's sysfs
   * `detach` does: from now on its requests bypass the cache; its dirty data is written
   * back at full speed (paused or not); then what the set holds of it is dropped and its
   * slot in the set's UUID table freed, and its superblock says state `none` with no set
   * UUID. Requests go on throughout; afterwards the device is served straight, as one
   * registered without a set (attach it again with {@link CacheSet.attach}). `onProgress`
   * gets the dirty sectors left about every 250 ms; aborting `signal` cancels the detach
   * while it still writes back (it rejects with `CLOSED`, the device stays attached as it
   * was). A device with nothing dirty detaches at once.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (not attached to a set), `EBUSY` (already
   *   detaching), `CLOSED` (cancelled, or the registry closed meanwhile), the set's
   *   failure, a superblock write's error.
   */
  async detach(options: { signal?: AbortSignal; onProgress?: (dirtySectors: number) => void } = {}): Promise<void> {
    if (this.#closed) throw this.#closedError()
    const r = this.#route
    if (!r?.set) throw new InvalidArgumentError(`${this.path}: not attached to a cache set`)
    const set = r.set
    await r.engine.detachFromSet(r.handle, options)
    // Passed straight through the set's engine now: over to the set-less one, with requests
    // held at the gate meanwhile.
    await this.#atGate(() => this.#leave(set))
  }

  /**
   * Runs `work` once the requests made before have completed, holding later ones at the
   * gate until it is done; settles as `work` does (the requests' outcome is theirs).
   */
  #atGate(work: () => Promise<void>): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let started = false
      this.#control({
        kind: 'control',
        start: 0,
        end: 0,
        needs: () => {
          if (started) return undefined
          started = true
          return () => work().then(resolve, reject)
        },
        go: () => RESOLVED,
        resolve: noop,
        reject: noop,
      })
    })
  }

  /** Moves a device detached from `set` to the registry's set-less engine. */
  async #leave(set: CacheSet): Promise<void> {
    const r = this.#route as Route
    try {
      await this.#overlaps.idle()
      await r.engine.flush(r.handle)
      // Requests sent before the gate closed may still be in flight: the engine lets go of
      // the device once they are done.
      for (const end = Date.now() + 60_000; ; ) {
        try {
          r.engine.detach(r.handle)
          break
        } catch (err) {
          if (asUbcacheError(err).code !== 'EBUSY' || Date.now() > end) throw err
          await new Promise((resolve) => setTimeout(resolve, 1))
        }
      }
      this.#route = undefined
      this.#super.attached(undefined)
      set._remove(this)
      await this.#update((s) => {
        s.setUuid = NULL_UUID
        s.state = 'none'
      })
      const engine = await this.#plainEngine()
      const handle = await engine.attachPlain(this.path, this.dataOffset, this.#open)
      this.#plain = engine
      this.#route = { engine, handle, set: null }
    } catch (err) {
      this.#refusal = asUbcacheError(err, this.path)
      throw this.#refusal
    } finally {
      this.#refresh()
    }
  }

  /**
   * The writeback controller's state (bcache's `writeback_rate_debug`); undefined when no
   * set serves the device.
   */
  writebackRate(): WritebackRate | undefined {
    const r = this.#route
    if (!r?.set || this.#closed) return undefined
    return r.engine.writebackRate(r.handle)
  }

  /**
   * Sectors of the device the cache set holds dirty (not yet on the backing device);
   * undefined when no set serves it. After the registry closed: the count at the close.
   */
  dirtySectors(): number | undefined {
    if (this.#final) return this.#final.dirty
    const r = this.#route
    return r?.set ? r.engine.dirtySectors(r.handle) : undefined
  }

  /**
   * bcache's `clear_stats`: empties the device's accounting windows ({@link CachedDevice.accounting}).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (no set serves the device), `CLOSED`.
   */
  clearStats(): void {
    const r = this.#route
    if (this.#closed) throw this.#closedError()
    if (!r?.set) throw new InvalidArgumentError(`${this.path}: not attached to a cache set`)
    r.engine.clearStats(r.handle)
  }

  /**
   * The ranges of the device whose current data only its cache set holds (dirty extents,
   * adjacent ones merged, in order, at most `max`), in bytes: what would be lost with the
   * cache device, and what a set out of service (past `ioErrorLimit`) reports so. Empty
   * when no set serves the device.
   */
  dirtyExtents(max?: number): { offset: number; length: number }[] {
    const r = this.#route
    if (!r?.set || this.#closed) return []
    return r.engine.dirtyExtents(r.handle, max)
  }

  /** Sectors of the device the cache set holds, as {@link CachedDevice.dirtySectors}. */
  cachedSectors(): number | undefined {
    if (this.#final) return this.#final.cached
    const r = this.#route
    return r?.set ? r.engine.cachedSectors(r.handle) : undefined
  }

  /**
   * A zeroed `Buffer` of aligned engine memory for {@link CachedDevice.readInto} to read
   * into without copying (engine memory of the engine serving the device now; after the
   * device moves to its set, reads into it take one copy).
   * @throws {UbcacheError} `INVALID_ARGUMENT`, `CLOSED`.
   */
  allocBuffer(size: number): Buffer {
    if (this.#closed) throw this.#closedError()
    // While the device moves to its set, memory of the engine it leaves will do (one copy).
    const engine = (this.#route ?? this.#hold)?.engine ?? this.#plain
    if (engine === undefined) throw this.#refusal ?? this.#closedError()
    return engine.allocBuffer(size)
  }

  /**
   * Reads `length` bytes at `offset`: from the cache where it holds them, else from the
   * backing device. The result is a `Buffer` over the engine memory the data landed in.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `INVALID_ARGUMENT`, `EIO`, `CLOSED`.
   */
  read(offset: number, length: number): Promise<Buffer> {
    const r = this.#route
    if (this.#fast && this.#fits(offset, length)) return (r as Route).engine.read((r as Route).handle, offset, length)
    return this.#slow('read', offset, length, (to) => to.engine.read(to.handle, offset, length)) as Promise<Buffer>
  }

  /**
   * Reads `buffer.byteLength` bytes at `offset` into `buffer`; resolves to that count.
   * Memory from {@link CachedDevice.allocBuffer} is read into directly; any other
   * `Uint8Array` through one copy. Leave the bytes alone until the read has resolved.
   * @throws {UbcacheError} as {@link CachedDevice.read}.
   */
  readInto(buffer: Uint8Array, offset: number): Promise<number> {
    const r = this.#route
    if (this.#fast && buffer instanceof Uint8Array && this.#fits(offset, buffer.byteLength)) {
      return (r as Route).engine.readInto((r as Route).handle, buffer, offset)
    }
    if (!(buffer instanceof Uint8Array)) return Promise.reject(new InvalidArgumentError('buffer must be a Buffer or Uint8Array'))
    return this.#slow('read', offset, buffer.byteLength, (to) => to.engine.readInto(to.handle, buffer, offset)) as Promise<number>
  }

  /**
   * Writes all of `data` at `offset`, as the cache mode says; resolves once the data is on
   * the cache (writeback) or backing device (other modes) and indexed. Durable after a
   * {@link CachedDevice.flush}, or at once with `fua`.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `INVALID_ARGUMENT`, `NO_SPACE`,
   *   `EIO`, the set's failure, a failed superblock write, `CLOSED`.
   */
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    const r = this.#route
    if (this.#fastWrite && data instanceof Uint8Array && this.#fits(offset, data.byteLength)) {
      return (r as Route).engine.write((r as Route).handle, offset, data, options)
    }
    if (!(data instanceof Uint8Array)) return Promise.reject(new InvalidArgumentError('data must be a Buffer or Uint8Array'))
    return this.#slow('write', offset, data.byteLength, (to) => to.engine.write(to.handle, offset, data, options)) as Promise<void>
  }

  /**
   * Makes every write that resolved before this call durable: the backing device flushed,
   * and the journal entry covering the device's cached data written.
   * @throws {UbcacheError} `EIO`, the set's failure, `CLOSED`.
   */
  flush(): Promise<void> {
    const r = this.#route
    if (this.#fast) return (r as Route).engine.flush((r as Route).handle)
    return this.#slow('flush', 0, 0, (to) => to.engine.flush(to.handle)) as Promise<void>
  }

  /**
   * Tells the device `length` bytes at `offset` are unused: the cache drops them and the
   * discard goes on to the backing device. What they read as is undefined until written.
   * @throws {UbcacheError} as {@link CachedDevice.write}.
   */
  discard(offset: number, length: number): Promise<void> {
    const r = this.#route
    if (this.#fast && this.#fits(offset, length)) return (r as Route).engine.discard((r as Route).handle, offset, length)
    return this.#slow('discard', offset, length, (to) => to.engine.discard(to.handle, offset, length)) as Promise<void>
  }

  // --- requests: checks, gates, routes -------------------------------------------------------

  /** Whether a request of `length` bytes at `offset` is whole blocks inside the device. */
  #fits(offset: number, length: number): boolean {
    const bs = this.blockSize
    return offset % bs === 0 && length % bs === 0 && length > 0 && offset + length <= this.size
  }

  #closedError(): UbcacheError {
    return closedError(`cached device ${this.path}`)
  }

  /** The first of: closed, a superblock write failure not yet reported, a bad range. */
  #check(kind: Kind, offset: number, length: number): UbcacheError | undefined {
    if (this.#closed) return this.#closedError()
    const failed = this.#error
    if (failed) {
      this.#error = undefined
      this.#refresh()
      return failed
    }
    if (kind === 'flush') return undefined
    if (!Number.isSafeInteger(offset) || offset < 0) return new InvalidArgumentError(`${this.path}: offset must be a non-negative integer, got ${offset}`)
    if (length === 0) return new InvalidArgumentError(`${this.path}: ${kind} of 0 bytes at ${offset}`)
    if (!Number.isSafeInteger(length) || length < 0) return new InvalidArgumentError(`${this.path}: length must be a non-negative integer, got ${length}`)
    const bs = this.blockSize
    if (offset % bs !== 0 || length % bs !== 0) {
      return new UbcacheError('MISALIGNED', `${this.path}: ${kind} of ${length} bytes at ${offset}: not whole blocks of ${bs} bytes`)
    }
    if (offset + length > this.size) {
      return new UbcacheError('OUT_OF_RANGE', `${this.path}: ${kind} of ${length} bytes at ${offset} passes the end of the device (${this.size} bytes)`)
    }
    return undefined
  }

  /** A request off the fast path: checked, then submitted or queued behind a gate. */
  #slow(kind: Kind, offset: number, length: number, go: (to: Route) => Promise<unknown>): Promise<unknown> {
    const err = this.#check(kind, offset, length)
    if (err) return Promise.reject(err)
    const w: Waiting = {
      kind,
      start: offset,
      end: offset + length,
      go: (to) => (to ? go(to) : Promise.reject(this.#refusal ?? this.#closedError())),
      resolve: noop,
      reject: noop,
    }
    if (this.#queue === undefined) {
      const work = this.#needs(w)
      if (work === undefined) return this.#go(w)
      this.#queue = []
      this.#refresh()
      this.#gate(work)
    }
    return new Promise((resolve, reject) => {
      w.resolve = resolve
      w.reject = reject
      ;(this.#queue as Waiting[]).push(w)
    })
  }

  /**
   * What must be done before `w` can go: the superblock marked `dirty` before a write that
   * can leave dirty data, `stale` before the first write of a clean device served without its set.
   */
  #needs(w: Waiting): (() => Promise<void>) | undefined {
    if (w.kind === 'control') return w.needs?.()
    const r = this.#route
    if (r === undefined) return undefined
    const state = this.#super.sb.state
    if (r.set !== null) {
      return w.kind === 'write' && this.#engineMode === 'writeback' && state !== 'dirty' ? this.#markDirty : undefined
    }
    return (w.kind === 'write' || w.kind === 'discard') && state === 'clean' ? this.#markStale : undefined
  }

  readonly #markDirty = (): Promise<void> => this.#update((sb) => void (sb.state = 'dirty'))
  readonly #markStale = (): Promise<void> => this.#update((sb) => void (sb.state = 'stale'))

  /** Writes the superblock with `change` applied, and the cache mode as last set. */
  #update(change: (sb: Superblock) => void): Promise<void> {
    return this.#super.update((sb) => {
      change(sb)
      sb.cacheMode = this.#mode
    })
  }

  /** Submits `w` to the route now. */
  #go(w: Waiting): Promise<unknown> {
    const r = this.#route
    if (r === undefined || r.set !== null || w.kind === 'control') return w.go(r)
    const writes = w.kind === 'write' || w.kind === 'discard'
    if (writes && this.#away) {
      const ranges = this.#away.ranges
      ranges.push([w.start, w.end])
      if (ranges.length >= AWAY_MERGE) this.#away.ranges = merge(ranges)
    }
    return this.#overlaps.run(w.start, w.end, writes, () => w.go(r))
  }

  /** Closes the gate until `work` is done, then lets the queue go. */
  #gate(work: () => Promise<void>): void {
    let p: Promise<void>
    try {
      p = work()
    } catch (err) {
      p = Promise.reject(err)
    }
    p.then(
      () => this.#release(undefined),
      (err) => this.#release(asUbcacheError(err, this.path)),
    )
  }

  /**
   * The gate's work is done: submit what waits, in order, until something needs another
   * gate. If the work failed, the requests that waited fail with its error (control
   * operations still run).
   */
  #release(err: UbcacheError | undefined): void {
    let q = this.#queue as Waiting[]
    if (err) {
      for (const w of q) if (w.kind !== 'control') w.reject(err)
      q = this.#queue = q.filter((w) => w.kind === 'control')
    }
    while (q.length > 0) {
      const w = q[0]
      const work = this.#needs(w)
      if (work !== undefined) return this.#gate(work)
      q.shift()
      this.#go(w).then(w.resolve, w.reject)
    }
    this.#queue = undefined
    this.#refresh()
    const waiters = this.#drainWaiters
    this.#drainWaiters = []
    for (const resolve of waiters) resolve()
  }

  /** Recomputes which requests may skip the slow path. */
  #refresh(): void {
    const r = this.#route
    this.#fast = r !== undefined && r.set !== null && this.#queue === undefined && !this.#closed && this.#error === undefined
    this.#fastWrite = this.#fast && (this.#engineMode !== 'writeback' || this.#super.sb.state === 'dirty')
  }

  /** A superblock write that nobody awaited failed: the next call reports it. */
  #failed(err: unknown): void {
    this.#error = asUbcacheError(err, this.path)
    this.#refresh()
  }

  /**
   * Runs the control operation `op` ahead of the requests waiting (they have gone nowhere
   * yet, so they follow it), opening the gate of a device waiting for its set.
   */
  #control(op: Waiting): void {
    if (this.#queue) {
      this.#queue.unshift(op)
      const wake = this.#wake
      this.#wake = undefined
      wake?.resolve()
      return
    }
    const work = this.#needs(op)
    if (work === undefined) return void op.go(this.#route)
    this.#queue = [op]
    this.#refresh()
    this.#gate(work)
  }

  // --- registration, attach, close (the registry's side) -----------------------------------

  /** @internal Registration with the set registered: attaches to it at once. */
  async _start(set: CacheSet): Promise<void> {
    this._checkAttach(set)
    await this.#attachTo(set)
    this.#refresh()
  }

  /**
   * @internal Registration without its set: served straight by the registry's set-less
   * engine, or, holding dirty data, opened (exclusively) and held until the set comes.
   */
  async _startPlain(engine: CacheEngine): Promise<void> {
    const handle = await engine.attachPlain(this.path, this.dataOffset, this.#open)
    this.#plain = engine
    const sb = this.#super.sb
    if (sb.state === 'dirty') {
      this.#hold = { engine, handle }
      this.#queue = []
      this.#gate(
        () =>
          new Promise<void>((resolve, reject) => {
            this.#wake = { resolve, reject }
          }),
      )
    } else {
      this.#route = { engine, handle, set: null }
      // What is written from now on is all the set can be missing (see purge.ts).
      if (sb.state === 'clean') this.#away = { set: sb.setUuid, ranges: [] }
    }
    this.#refresh()
  }

  /**
   * @internal Refusals of an attach to `set`, as bcache's `bch_cached_dev_attach` makes
   * them, plus a device whose dirty data lives in another set.
   * @throws {UbcacheError} `CLOSED`, `EBUSY`, `INVALID_ARGUMENT`.
   */
  _checkAttach(set: CacheSet): void {
    if (this.#closed) throw this.#closedError()
    if (set.closed) throw closedError(`cache set ${set.uuid}`)
    const at = this.#route?.set
    if (at && at !== set) throw new UbcacheError('EBUSY', `${this.path}: already attached to cache set ${at.uuid} (${at.path})`)
    if (this.blockSize < set.blockSize) {
      throw new InvalidArgumentError(
        `${this.path}: block size ${this.blockSize} bytes is below the block size of cache set ${set.uuid} (${set.blockSize} bytes): format it with a block size of at least ${set.blockSize}`,
      )
    }
    const sb = this.#super.sb
    if (sb.state === 'dirty' && sb.setUuid !== set.uuid) {
      throw new InvalidArgumentError(
        `${this.path}: holds dirty data in cache set ${sb.setUuid}, which attaching it to cache set ${set.uuid} would lose; register that set instead`,
      )
    }
  }

  /**
   * @internal Attaches the device to `set` (bcache's attach): requests in flight finish,
   * requests made meanwhile go to the set once it is done. Resolves once attached.
   */
  _attach(set: CacheSet): Promise<void> {
    if (this.#route?.set === set) return RESOLVED
    const pending = this.#attaching.get(set)
    if (pending) return pending
    try {
      this._checkAttach(set)
    } catch (err) {
      return Promise.reject(err)
    }
    const done = this.#atGate(() => this.#moveTo(set))
    this.#attaching.set(set, done)
    const forget = (): void => void this.#attaching.delete(set)
    done.then(forget, forget)
    return done
  }

  /**
   * @internal The device's set was registered: attach to it. A failure is kept in
   * {@link CachedDevice.attachError}; a device waiting for the set then fails its requests.
   */
  async _autoAttach(set: CacheSet): Promise<void> {
    try {
      await this._attach(set)
      this.#attachError = undefined
    } catch (err) {
      this.#attachError = asUbcacheError(err, this.path)
      const wake = this.#wake
      if (wake) {
        this.#refusal = this.#attachError
        this.#wake = undefined
        wake.resolve()
      }
    }
  }

  /** Moves the device from the set-less engine (or its hold there) to `set`. */
  async #moveTo(set: CacheSet): Promise<void> {
    if (this.#route?.set === set) return
    this._checkAttach(set)
    const route = this.#route
    const plain = route ?? this.#hold
    if (plain) {
      await this.#overlaps.idle()
      // What was written straight must be durable before the set takes over the device:
      // the set's flushes cover only what went through it.
      if (route) await plain.engine.flush(plain.handle)
      plain.engine.detach(plain.handle)
      this.#route = undefined
      this.#hold = undefined
    }
    try {
      await this.#attachTo(set)
    } catch (err) {
      if (plain) {
        try {
          const handle = await plain.engine.attachPlain(this.path, this.dataOffset, this.#open)
          if (route) this.#route = { engine: plain.engine, handle, set: null }
          else this.#hold = { engine: plain.engine, handle }
        } catch (again) {
          this.#refusal = asUbcacheError(again, this.path)
        }
      }
      // Holding dirty data, the device cannot be served without its set: say why.
      if (!this.#route) this.#refusal ??= asUbcacheError(err, this.path)
      throw err
    }
  }

  /**
   * Attaches to `set`'s engine; drops what the set holds of the device from before, if the
   * device was written without it (see purge.ts); records the set and the state in the
   * superblock as bcache does (set UUID, `clean`, or `dirty` if the set holds dirty data).
   */
  async #attachTo(set: CacheSet): Promise<void> {
    const engine = set._engine
    const handle = await engine.attach({ path: this.path, uuid: this.uuid, label: this.label, dataOffset: this.dataOffset, mode: this.#engineMode, writeback: this.#writeback, bypass: this.#bypass, noSuperblock: !this.hasSuperblock, ...this.#open })
    this.#super.attached(engine, handle)
    try {
      const sb = this.#super.sb
      const foreign = sb.state === 'none' || sb.state === 'stale' || sb.setUuid !== set.uuid
      if (foreign && (engine.cachedSectors(handle) ?? 0) > 0) {
        const ranges = this.#away?.set === set.uuid ? this.#away.ranges : undefined
        const size = this.size - (this.size % this.blockSize)
        await purgeCached({ engine, handle, path: this.path, dataOffset: this.dataOffset, size, mode: this.#engineMode }, ranges)
      }
      const state: BackingState = (engine.dirtySectors(handle) ?? 0) > 0 || (sb.state === 'dirty' && sb.setUuid === set.uuid) ? 'dirty' : 'clean'
      if (sb.setUuid !== set.uuid || sb.state !== state) {
        await this.#update((s) => {
          s.setUuid = set.uuid
          s.state = state
        })
      }
    } catch (err) {
      this.#super.attached(undefined)
      engine.detach(handle)
      throw err
    }
    this.#route = { engine, handle, set }
    this.#away = undefined
    this.#refusal = undefined
    set._add(this)
  }

  /**
   * @internal The registry is closing: new requests fail with `CLOSED`, a device waiting
   * for its set fails the requests that waited. Resolves once the requests made before
   * have been submitted (and, served straight, completed and flushed).
   */
  async _close(): Promise<void> {
    this.#closed = true
    this.#refresh()
    const wake = this.#wake
    this.#wake = undefined
    wake?.reject(this.#closedError())
    while (this.#queue) await new Promise<void>((resolve) => this.#drainWaiters.push(resolve))
    await this.#overlaps.idle()
    const r = this.#route
    if (r && r.set === null) await r.engine.flush(r.handle)
    // A device with no superblock records its cache mode in its set: while the set runs.
    if (!this.#super.onDevice) await this.#super.idle()
  }

  /** @internal Where the device's requests are, for reports of a stall in tests. */
  _describe(): string {
    const q = this.#queue
    const r = this.#route
    return [
      `route ${r ? (r.set ? `set (in flight ${r.engine.inFlight})` : `straight (in flight ${r.engine.inFlight})`) : 'none'}`,
      `hold ${this.#hold ? `yes (in flight ${this.#hold.engine.inFlight})` : 'no'}`,
      `queue ${q ? `${q.length} [${q.slice(0, 4).map((w) => w.kind).join(',')}]` : 'none'}`,
      `overlaps ${this.#overlaps.size}`,
      `attaching ${this.#attaching.size}`,
      `waiting for set ${this.#wake ? 'yes' : 'no'}`,
      `fast ${this.#fast}`,
      `superblock ${this.#super.sb.state}`,
    ].join(', ')
  }

  /** @internal Its set is about to close, nothing of it in flight: keeps the final counts. */
  _snapshot(): void {
    const r = this.#route
    this.#final = r?.set ? { dirty: r.engine.dirtySectors(r.handle), cached: r.engine.cachedSectors(r.handle) } : { dirty: undefined, cached: undefined }
  }

  /**
   * @internal After its set closed (`cleanly`: without failing): the superblock goes back to
   * `clean` if the set holds no dirty data of it. Resolves once every superblock write is
   * done; rejects with a failure of one that nobody has been told of.
   */
  async _closeSuper(cleanly: boolean): Promise<void> {
    const r = this.#route
    const sb = this.#super.sb
    const clean = r?.set && cleanly && sb.state === 'dirty' && this.#final?.dirty === 0
    // A cache mode whose write failed (and was reported) is written again. A device with no
    // superblock: its set recorded the state at the close; this updates the copy in memory.
    if (!this.#super.onDevice) this.#super.attached(undefined)
    if (clean || sb.cacheMode !== this.#mode) {
      await this.#update((s) => void (clean && (s.state = 'clean'))).catch((err) => this.#failed(err))
    }
    await this.#super.idle()
    const failed = this.#error
    this.#error = undefined
    if (failed) throw failed
  }
}
