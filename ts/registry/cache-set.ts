/**
 * A cache set: a registered cache device, run by a cache engine of its own, and the
 * backing devices attached to it (see {@link CacheSet}).
 * @module
 */
import type { Accounting, CacheDeviceConfig, CacheEngine, CacheSetOpenReport, ExistingDeviceInfo, CacheSetState, CacheSetStats, CongestionConfig, PriorityStats } from '../cache-engine'
import { InvalidArgumentError } from '../errors'
import { newUuid } from '../uuid'
import type { Superblock } from '../superblock'
import { CachedDevice } from './cached-device'
import { FlashVolume } from './flash-volume'

/**
 * A cache set registered with a {@link Registry} (bcache's `cache_set`): its cache device,
 * opened by a cache engine of its own (which replays the journal, or initialises a set that
 * never ran), and the {@link CachedDevice}s attached to it. Backing devices whose superblock
 * records its UUID attach to it when registered, in either order.
 */
export class CacheSet {
  /** The cache device's path. */
  readonly path: string
  /** The cache set's UUID (the cache superblock's `setUuid`). */
  readonly uuid: string
  /** Bytes per block, the smallest unit of cache I/O: attached devices' blocks are at least this. */
  readonly blockSize: number
  /** Bytes per bucket, the unit of cache allocation. */
  readonly bucketSize: number
  /** @internal The engine running the set. */
  readonly _engine: CacheEngine
  readonly #sb: Superblock
  readonly #devices = new Set<CachedDevice>()
  readonly #volumes = new Map<string, FlashVolume>()
  #final: CacheSetStats | undefined
  #closed = false
  readonly #stopper: () => Promise<void>
  #stopping: Promise<void> | undefined

  /** @internal Sets are made by {@link Registry.register}. */
  constructor(path: string, sb: Superblock, engine: CacheEngine, stop: () => Promise<void>) {
    this.#stopper = stop
    this.path = path
    this.uuid = sb.setUuid
    this.blockSize = sb.blockSize * 512
    this.bucketSize = sb.bucketSize * 512
    this.#sb = { ...sb, journalBuckets: [...sb.journalBuckets] }
    this._engine = engine
  }

  /** The cache device's superblock as it was when registered (the engine then writes it with `CACHE_SYNC` set). */
  get superblock(): Superblock {
    return { ...this.#sb, journalBuckets: [...this.#sb.journalBuckets] }
  }

  /** The cached devices attached to the set, in the order they attached. */
  get devices(): CachedDevice[] {
    return [...this.#devices]
  }

  /** The set's flash-only volumes: those it had when registered, and those created since. */
  get volumes(): FlashVolume[] {
    return [...this.#volumes.values()]
  }

  /**
   * Creates a flash-only volume of `size` bytes in the set (bcache's `flash_vol_create`): a
   * thin volume that lives only in the cache device (see {@link FlashVolume}), recorded in
   * the set's UUID table, so it is among {@link CacheSet.volumes} when the set is registered
   * again. Resolves once that record is durable.
   * @param size - bytes, a whole number of the set's blocks; may exceed the cache.
   * @param options - `uuid` (default: a new random one), `label` (up to 32 bytes).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a bad size or label, a UUID already in the
   *   set), `NO_SPACE` (the UUID table is full), the set's failure, `CLOSED`.
   */
  async createVolume(size: number, options: { uuid?: string; label?: string } = {}): Promise<FlashVolume> {
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0 || size % this.blockSize !== 0) {
      throw new InvalidArgumentError(`volume size must be a positive whole number of ${this.blockSize}-byte blocks, got ${String(size)}`)
    }
    const uuid = (options.uuid ?? newUuid()).toLowerCase()
    const handle = await this._engine.createVolume(size, { ...options, uuid })
    const v = new FlashVolume(this, handle, uuid, options.label ?? '', size)
    this.#volumes.set(v.uuid, v)
    return v
  }

  /**
   * The devices the set caches as they are, with no superblock ({@link Registry.attachExisting}),
   * attached now or not: UUID, label, size, cache mode and state, as its UUID table records
   * them. One whose state is `dirty` has data only this set holds: attach it again (by its
   * UUID) before using it anywhere else.
   */
  existingDevices(): ExistingDeviceInfo[] {
    return this._engine.existingDevices()
  }

  /** @internal Attaches the volumes the set's UUID table records (at registration). */
  async _attachVolumes(): Promise<void> {
    for (const info of this._engine.volumes()) {
      const handle = await this._engine.attachVolume(info.uuid)
      this.#volumes.set(info.uuid, new FlashVolume(this, handle, info.uuid, info.label, info.size))
    }
  }

  /** Where the set stands: `starting`, `running`, `failed`, `closing` or `closed`. */
  get state(): CacheSetState {
    return this._engine.state
  }

  /** True once the registry began closing the set. */
  get closed(): boolean {
    return this.#closed
  }

  /**
   * Counters of the set since it was registered (hits, misses, journal entries, dirty
   * buckets...) and where it stands; after the registry closed, those of its last moment.
   */
  stats(): CacheSetStats {
    const s = this._engine.stats()
    if (s) return s
    return { ...(this.#final as CacheSetStats), state: this._engine.state }
  }

  /**
   * bcache's `priority_stats`: how the cache device's buckets are used (unused, clean,
   * dirty, metadata) and how old their data is; undefined once the registry closed.
   */
  priorityStats(): PriorityStats | undefined {
    return this._engine.priorityStats()
  }

  /**
   * Hits, misses and bypasses of every cached device of the set, in bcache's decaying
   * windows (five minutes, an hour, a day) and in total, since the set was registered;
   * undefined once the registry closed.
   */
  accounting(): Accounting | undefined {
    return this._engine.accounting()
  }

  /**
   * bcache's `clear_stats` of a cache set: empties the accounting windows of the set and of
   * every device attached to it.
   * @throws {UbcacheError} `CLOSED` once the registry closed.
   */
  clearStats(): void {
    this._engine.clearStats()
  }

  /**
   * Asks for a GC pass now, as writing to bcache's sysfs `trigger_gc` does; it runs in
   * slices between requests (`stats().gcRuns` counts it once done).
   * @throws {UbcacheError} `CLOSED` once the registry closed.
   */
  triggerGc(): void {
    this._engine.triggerGc()
  }

  /**
   * When the cache device counts as congested (bcache's `congested_read_threshold_us` and
   * `congested_write_threshold_us`); set at registration with the registry's
   * `congestedReadThresholdUs`/`congestedWriteThresholdUs` options.
   * @throws {UbcacheError} `CLOSED` once the registry closed.
   */
  congestionConfig(): CongestionConfig {
    return this._engine.congestionConfig()
  }

  /**
   * Changes the congestion thresholds given (0 leaves that direction untimed); takes effect
   * with the next cache I/O; not persisted.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an unknown tunable or a bad value, naming
   *   it), `CLOSED`.
   */
  configureCongestion(changes: Partial<CongestionConfig>): void {
    this._engine.setCongestionConfig(changes)
  }

  /**
   * The cache device's `cache_replacement_policy` and `discard` (bcache's sysfs files of a
   * cache device).
   * @throws {UbcacheError} `CLOSED` once the registry closed.
   */
  cacheDeviceConfig(): CacheDeviceConfig {
    return this._engine.cacheDeviceConfig()
  }

  /**
   * Changes the replacement policy and discard flag given; they take effect at once and are
   * recorded in the cache superblock (so they hold after a restart, as in bcache).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an unknown tunable or a bad value, naming
   *   it), the set's failure, `CLOSED`.
   */
  configureCacheDevice(changes: Partial<CacheDeviceConfig>): void {
    this._engine.setCacheDeviceConfig(changes)
  }

  /** What opening the set found and did: replayed journal entries, a clean last shutdown... */
  openReport(): CacheSetOpenReport | undefined {
    return this._engine.openReport()
  }

  /**
   * Attaches a registered backing device to the set, as writing the set's UUID to bcache's
   * sysfs `attach` does: the device's superblock then records the set's UUID and state
   * `clean`, and the set gives it a slot in its UUID table. A device the set held data of
   * from before it was written elsewhere has that data dropped first (see
   * {@link CachedDevice}). Requests to the device in flight finish first; requests made
   * meanwhile wait and then go through the set. Attaching a device already attached to the
   * set does nothing.
   * @throws {UbcacheError} `EBUSY` (attached to another set), `INVALID_ARGUMENT` (not a
   *   device of this registry, a block size below the set's, dirty data in another set),
   *   the engine's errors (`NO_SPACE`: the UUID table is full), `CLOSED`.
   */
  async attach(dev: CachedDevice): Promise<void> {
    if (!(dev instanceof CachedDevice)) throw new InvalidArgumentError('attach takes a CachedDevice (from Registry.register)')
    await dev._attach(this)
  }

  /** @internal A device attached. */
  _add(dev: CachedDevice): void {
    this.#devices.add(dev)
  }

  /** @internal A device detached. */
  _remove(dev: CachedDevice): void {
    this.#devices.delete(dev)
  }

  /**
   * Stops the set, as writing to bcache's sysfs `stop` does: its cached devices and volumes
   * stop taking requests (those in flight finish, later ones get `CLOSED`), the set closes
   * cleanly (writes flushed, a final checkpoint, so the next registration finds the cache
   * warm), the backing superblocks are brought up to date, and the registry forgets the
   * set and its devices, which may then be registered again. Idempotent; resolves once all
   * of it is durable.
   * @throws {UbcacheError} the set's failure, or a superblock write's, after doing the rest.
   */
  stop(): Promise<void> {
    this.#stopping ??= this.#stopper()
    return this.#stopping
  }

  /**
   * @internal Closes the set cleanly: once the requests made before have completed, keeps
   * each device's final counts, then closes the engine (flush, final checkpoint). Resolves to
   * the error that failed the set, or undefined; never rejects.
   */
  async _close(): Promise<unknown> {
    this.#closed = true
    const engine = this._engine
    // The devices refuse new requests: wait for those in flight, so the counts are final.
    while (engine.inFlight > 0) await new Promise((r) => setTimeout(r, 1))
    for (const d of this.#devices) d._snapshot()
    this.#final = engine.stats()
    try {
      await engine.close()
      return undefined
    } catch (err) {
      return err
    }
  }
}
