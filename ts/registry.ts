/**
 * The registry: cache sets and cached devices, registered as bcache registers them
 * (`register_bcache`), in bcache's vocabulary.
 *
 * ```ts
 * import { CachedDevice, makeBacking, makeCache, Registry } from 'ubcache'
 * const cache = await makeCache('cache.img')
 * await makeBacking('slow.img', { setUuid: cache.setUuid, cacheMode: 'writeback' })
 * const reg = new Registry()
 * const set = await reg.registerCache('cache.img')     // opens (replays) or initialises the set
 * const dev = await reg.registerBacking('slow.img')    // attached by the set UUID in its superblock
 * await dev.write(0, Buffer.alloc(4096, 1))
 * await dev.flush()                                    // durable
 * const data = await dev.read(0, 4096)                 // a hit
 * dev.cacheMode = 'writethrough'                        // at once; persisted in the superblock
 * await reg.close()                                    // flush, final checkpoint, superblocks
 * ```
 * @module
 */
import { stat } from 'node:fs/promises'
import { type BypassConfig, CacheEngine, type CacheEngineOptions, checkBypassChanges, checkWritebackChanges, type WritebackConfig } from './cache-engine'
import { asUbcacheError, InvalidArgumentError, UbcacheError } from './errors'
import { closedError } from './inline'
import { CacheSet } from './registry/cache-set'
import { checkRemoteOptions } from './device'
import { CachedDevice, type CachedDeviceInit } from './registry/cached-device'
import { describeDevice, isNbdUri, readSuperblock } from './super-io'
import { blankSuperblock } from './format'
import { CACHE_MODES, type CacheMode, isCacheVersion, NULL_UUID, type Superblock } from './superblock'
import { newUuid } from './uuid'

export { CacheSet } from './registry/cache-set'
export { CachedDevice } from './registry/cached-device'
export { FlashVolume } from './registry/flash-volume'

/**
 * Options of a {@link Registry}: those of the engines it starts (one per cache set, and one
 * serving backing devices without their set), and of the opens of its devices.
 */
export interface RegistryOptions extends CacheEngineOptions {
  /**
   * Writeback tunables every cached device registered here starts with, in place of
   * bcache's defaults ({@link CachedDevice.configureWriteback} changes them later):
   * `{ running: false }`, say, keeps dirty data in the cache until asked.
   */
  writeback?: Partial<WritebackConfig>
  /**
   * Bypass tunables every cached device registered here starts with, in place of bcache's
   * defaults ({@link CachedDevice.configureBypass} changes them later):
   * `{ sequentialCutoff: 0 }`, say, caches long sequential streams too.
   */
  bypass?: Partial<BypassConfig>
  /**
   * Remote backing devices (NBD URIs): how long a request waits for the server, an outage
   * included, before it fails with `ETIMEDOUT` naming it (default 30000 ms). Hits and
   * writeback writes do not wait for the server at all.
   */
  remoteTimeoutMs?: number
  /** Remote backing devices: see {@link OpenDeviceOptions.remoteConnections} (default 4). */
  remoteConnections?: number
}

/**
 * Cache sets and cached devices, registered by path in either order (bcache's
 * `register_bcache`). {@link Registry.register} reads the device's superblock with every
 * check the kernel makes: a cache device becomes a {@link CacheSet}, run by a cache engine
 * of its own; a backing device becomes a {@link CachedDevice}, attached to the registered set
 * whose UUID its superblock records, or served straight from its data offset until that set
 * is registered. {@link Registry.close} stops everything cleanly.
 *
 * Devices are opened exclusively: a device registered here, or open in another process (or
 * another registry), is refused with `EBUSY`. A refused registration leaves the registry as
 * it was; once the cause is fixed the same path registers.
 */
export class Registry {
  readonly #options: RegistryOptions
  /** Registered sets by set UUID (undefined: being registered). */
  readonly #sets = new Map<string, CacheSet | undefined>()
  /** Registered cached devices by UUID (undefined: being registered). */
  readonly #devices = new Map<string, CachedDevice | undefined>()
  /** Paths registered or being registered, by what the device is (device and inode). */
  readonly #paths = new Map<string, string>()
  readonly #registering = new Set<Promise<unknown>>()
  #plain: Promise<CacheEngine> | undefined
  #closing: Promise<void> | undefined

  /** A registry with no devices yet; `options` go to every engine it starts. */
  constructor(options: RegistryOptions = {}) {
    if (options.writeback !== undefined) checkWritebackChanges(options.writeback)
    if (options.bypass !== undefined) checkBypassChanges(options.bypass)
    checkRemoteOptions(options)
    this.#options = { ...options }
  }

  /** The options for the engines (the registry's own taken out). */
  #engineOptions(): CacheEngineOptions {
    const { writeback: _w, bypass: _b, remoteTimeoutMs: _r, remoteConnections: _c, ...engine } = this.#options
    return engine
  }

  /** The registered cache sets, in the order they were registered. */
  get sets(): CacheSet[] {
    return [...this.#sets.values()].filter((s) => s !== undefined)
  }

  /** The registered cached devices, in the order they were registered. */
  get devices(): CachedDevice[] {
    return [...this.#devices.values()].filter((d) => d !== undefined)
  }

  /** True once {@link Registry.close} has been called. */
  get closed(): boolean {
    return this.#closing !== undefined
  }

  /**
   * Registers the device at `path`: a cache device as a {@link CacheSet} (opened: its
   * journal replayed, or initialised if it never ran; backing devices registered before it
   * attach to it now), a backing device as a {@link CachedDevice} (attached to its set if
   * registered, else served straight until it is).
   * @throws {SuperblockError} `NOT_BCACHE` (no bcache superblock) or the code of another
   *   failed superblock check.
   * @throws {UbcacheError} `EBUSY` (already registered here, or open elsewhere: another
   *   process or registry), `INVALID_ARGUMENT` (a backing device whose block size is below its
   *   set's; a set the engine cannot run), `ENOENT`, `EACCES`, `CORRUPT`, `EIO`, `CLOSED`.
   */
  register(path: string): Promise<CacheSet | CachedDevice> {
    return this.#track(path, () => this.#register(path, undefined))
  }

  /**
   * {@link Registry.register} for a cache device.
   * @throws {UbcacheError} as {@link Registry.register}; `INVALID_ARGUMENT` for a backing device.
   */
  async registerCache(path: string): Promise<CacheSet> {
    const r = await this.#track(path, () => this.#register(path, 'cache'))
    return r as CacheSet
  }

  /**
   * {@link Registry.register} for a backing device.
   * @throws {UbcacheError} as {@link Registry.register}; `INVALID_ARGUMENT` for a cache device.
   */
  async registerBacking(path: string): Promise<CachedDevice> {
    const r = await this.#track(path, () => this.#register(path, 'backing'))
    return r as CachedDevice
  }

  /** Runs `start` as a registration of `path`: refused once closing, awaited by the close. */
  #track<T>(path: string, start: () => Promise<T>): Promise<T> {
    if (this.#closing) return Promise.reject(closedError('the registry'))
    if (typeof path !== 'string' || path === '') return Promise.reject(new InvalidArgumentError('path must be a non-empty string'))
    const p = start()
    this.#registering.add(p)
    const forget = (): void => void this.#registering.delete(p)
    p.then(forget, forget)
    return p
  }

  /** Claims `path` for a registration (`EBUSY` if already registered here); resolves to its identity key. */
  async #claim(path: string): Promise<string> {
    const key = await identity(path)
    const already = this.#paths.get(key)
    if (already !== undefined) {
      throw new UbcacheError('EBUSY', `${path}: already registered${already === path ? '' : ` (as ${already})`}`)
    }
    this.#paths.set(key, path)
    return key
  }

  async #register(path: string, kind: 'cache' | 'backing' | undefined): Promise<CacheSet | CachedDevice> {
    const key = await this.#claim(path)
    try {
      const { sb } = await readSuperblock(path)
      const isCache = isCacheVersion(sb.version)
      if (kind !== undefined && isCache !== (kind === 'cache')) {
        throw new InvalidArgumentError(`${path}: a ${isCache ? 'cache' : 'backing'} device, not a ${kind} device`)
      }
      if (this.#closing) throw closedError('the registry')
      return isCache ? await this.#registerCache(path, sb) : await this.#registerBacking(path, sb)
    } catch (err) {
      this.#paths.delete(key)
      throw err
    }
  }

  /** bcache's `register_cache`: one engine per set, then the devices waiting for it attach. */
  async #registerCache(path: string, sb: Superblock): Promise<CacheSet> {
    const uuid = sb.setUuid
    const other = this.#sets.get(uuid)
    if (this.#sets.has(uuid)) {
      throw new UbcacheError('EBUSY', `${path}: cache set ${uuid} is already registered${other ? ` (from ${other.path})` : ''}`)
    }
    this.#sets.set(uuid, undefined)
    let set: CacheSet
    try {
      const engine = await CacheEngine.open(path, this.#engineOptions())
      set = new CacheSet(path, sb, engine, () => this.#stop(set))
      await set._attachVolumes()
    } catch (err) {
      this.#sets.delete(uuid)
      throw asUbcacheError(err, path)
    }
    this.#sets.set(uuid, set)
    await this.#attachWaiting(set)
    return set
  }

  /** Devices registered before `set` whose superblock records it attach now (failures: their `attachError`). */
  async #attachWaiting(set: CacheSet): Promise<void> {
    const waiting = this.devices.filter((d) => d.set === null && d.superblock.setUuid === set.uuid)
    await Promise.all(waiting.map((d) => d._autoAttach(set)))
  }

  /** bcache's `register_bdev`: attached to its set if registered, else served straight. */
  async #registerBacking(path: string, sb: Superblock): Promise<CachedDevice> {
    const uuid = sb.uuid
    const other = this.#devices.get(uuid)
    if (this.#devices.has(uuid)) {
      throw new UbcacheError('EBUSY', `${path}: a backing device with UUID ${uuid} is already registered${other ? ` (${other.path})` : ''}`)
    }
    this.#devices.set(uuid, undefined)
    try {
      const size = describeDevice(path).bytes - sb.dataOffset * 512
      const dev = new CachedDevice({ path, sb, size, open: this.#openOptions(), writeback: this.#options.writeback, bypass: this.#options.bypass, plainEngine: () => this.#plainEngine() })
      const set = this.#sets.get(sb.setUuid)
      if (set) await dev._start(set)
      else await dev._startPlain(await this.#plainEngine())
      this.#devices.set(uuid, dev)
      // The set may have been registered while this device was: it did not see it.
      const now = this.#sets.get(sb.setUuid)
      if (now && dev.set === null) await dev._autoAttach(now)
      return dev
    } catch (err) {
      this.#devices.delete(uuid)
      throw asUbcacheError(err, path)
    }
  }

  /**
   * Caches the device at `path` as it is, with no bcache superblock and nothing written to
   * it but its own data (as Open CAS caches a "core" device): a disk, a partition, a file
   * or an NBD export that already holds data, its data at offset 0, attached to the
   * registered cache set `set` (the set or its UUID). Its identity lives in the set's UUID
   * table: UUID, label, size, cache mode and state ({@link CacheSet.existingDevices}).
   *
   * The first attach records a new entry (`options.uuid`, or a random UUID; `label`, or
   * the path's last 32 bytes). After a restart, register the set, then attach the device
   * again with the UUID it got (`dev.uuid`): its cached data (dirty data included) is found
   * again. The device must then be the size recorded. An attach without a UUID is refused
   * while the set has an entry not attached now with the same label or size, which may be
   * this device (its UUID is named in the error). Nothing on the device says it is
   * cached: while its set holds dirty data of it (`state` `dirty`), only this registry
   * may use it, and another program opening it meanwhile sees stale data.
   * {@link CachedDevice.detach} writes its dirty data back and forgets it.
   * @param options - `uuid` of an entry to attach again (or of a new one); `label` of a new
   *   one; `cacheMode` to switch to (default: the entry's, or `writethrough`).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a device with a bcache superblock: register it
   *   instead; an unregistered set; a size other than the one recorded; no UUID given while
   *   an entry may be this device; bad options), `EBUSY` (registered already, or
   *   open elsewhere), `NO_SPACE` (the UUID table is full), `ENOENT`, `EACCES`, `CLOSED`.
   */
  attachExisting(path: string, set: CacheSet | string, options: ExistingDeviceOptions = {}): Promise<CachedDevice> {
    return this.#track(path, () => this.#attachExisting(path, set, options))
  }

  async #attachExisting(path: string, target: CacheSet | string, options: ExistingDeviceOptions): Promise<CachedDevice> {
    checkExistingOptions(options)
    const setUuid = typeof target === 'string' ? target.toLowerCase() : target?.uuid
    const set = this.#sets.get(setUuid)
    if (set === undefined || (typeof target !== 'string' && target !== set)) {
      throw new InvalidArgumentError(`cache set ${String(setUuid)} is not registered here: register its cache device first`)
    }
    const key = await this.#claim(path)
    let uuid: string | undefined
    try {
      await refuseBcache(path)
      const info = describeDevice(path)
      const entries = set._engine.existingDevices()
      const label = options.label ?? defaultLabel(path)
      const entry = options.uuid === undefined ? undefined : entries.find((e) => e.uuid === options.uuid?.toLowerCase())
      if (options.uuid === undefined) {
        // After a restart, a device attached without its UUID would get a new entry and
        // miss what the old one holds (dirty data above all): one that may be it is named.
        const same = entries.find((e) => !this.#devices.has(e.uuid) && (e.label === label || e.size === info.bytes))
        if (same) {
          throw new InvalidArgumentError(
            `${path}: cache set ${set.uuid} caches a device not attached now that may be this one (UUID ${same.uuid}, label '${same.label}', ${same.size} bytes, ${same.state}): pass { uuid: '${same.uuid}' } to attach it again, or a new UUID to cache this one beside it`,
          )
        }
      }
      uuid = entry?.uuid ?? options.uuid?.toLowerCase() ?? newUuid()
      const other = this.#devices.get(uuid)
      if (this.#devices.has(uuid)) {
        throw new UbcacheError('EBUSY', `${path}: a device with UUID ${uuid} is already registered${other ? ` (${other.path})` : ''}`)
      }
      this.#devices.set(uuid, undefined)
      if (entry && entry.size !== info.bytes) {
        throw new InvalidArgumentError(`${path}: ${info.bytes} bytes, but cache set ${set.uuid} recorded ${entry.size} bytes for UUID ${uuid}: not the device it caches (detach a device before resizing it)`)
      }
      const blockSize = Math.max(set.blockSize, info.logicalBlockSize, 512)
      // What the entry does not hold is bcache's default.
      const sb: Superblock = {
        ...blankSuperblock(1, uuid, entry ? set.uuid : NULL_UUID, entry?.label ?? label, { blockSize: blockSize / 512, bucketSize: 0 }),
        cacheMode: entry?.mode ?? options.cacheMode ?? 'writethrough',
        state: entry?.state ?? 'none',
      }
      const dev = new CachedDevice({ path, sb, size: info.bytes, open: this.#openOptions(), writeback: this.#options.writeback, bypass: this.#options.bypass, plainEngine: () => this.#plainEngine(), noSuperblock: true })
      await dev._start(set)
      this.#devices.set(uuid, dev)
      if (options.cacheMode !== undefined) dev.cacheMode = options.cacheMode
      return dev
    } catch (err) {
      if (uuid !== undefined && this.#devices.get(uuid) === undefined) this.#devices.delete(uuid)
      this.#paths.delete(key)
      throw asUbcacheError(err, path)
    }
  }

  /**
   * bcache's cache-set `stop`: the set's cached devices stop taking requests (those in
   * flight finish; later ones get `CLOSED`), the set closes cleanly (flush, final
   * checkpoint), their superblocks are brought up to date, and the registry forgets the set
   * and them, so they can be registered again.
   */
  async #stop(set: CacheSet): Promise<void> {
    const failures: unknown[] = []
    const note = (p: Promise<unknown>): Promise<unknown> => p.catch((err) => void failures.push(err))
    const devices = this.devices.filter((d) => d.set === set)
    await Promise.all(devices.map((d) => note(d._close())))
    const outcome = await set._close()
    if (outcome !== undefined) failures.push(outcome)
    await Promise.all(devices.map((d) => note(d._closeSuper(outcome === undefined))))
    this.#sets.delete(set.uuid)
    for (const d of devices) this.#devices.delete(d.superblock.uuid)
    const gone = new Set([set.path, ...devices.map((d) => d.path)])
    for (const [key, path] of this.#paths) if (gone.has(path)) this.#paths.delete(key)
    if (failures.length > 0) throw asUbcacheError(failures[0])
  }

  /** The options of the opens of cached devices. */
  #openOptions(): CachedDeviceInit['open'] {
    const { direct, exclusive, remoteTimeoutMs, remoteConnections } = this.#options
    return { direct, exclusive, remoteTimeoutMs, remoteConnections }
  }

  /** The engine serving backing devices without their set, started on first use. */
  #plainEngine(): Promise<CacheEngine> {
    if (!this.#plain) {
      const p = CacheEngine.open(undefined, this.#engineOptions())
      this.#plain = p
      p.catch(() => {
        if (this.#plain === p) this.#plain = undefined
      })
    }
    return this.#plain
  }

  /**
   * Stops everything cleanly, as bcache does at shutdown: requests already made finish and
   * later ones fail with `CLOSED`; every set is closed (its devices' writes flushed, a final
   * checkpoint written, the journal marked clean, so the next registration finds the cache
   * warm); then each backing superblock is brought up to date (`clean` unless the set holds
   * dirty data of the device) and devices served without a set are flushed. Resolves once
   * all of it is durable; rejects with the first failure (a set that failed, a superblock
   * write), after doing all the rest. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close()
    return this.#closing
  }

  async #close(): Promise<void> {
    const failures: unknown[] = []
    const note = (p: Promise<unknown>): Promise<unknown> => p.catch((err) => void failures.push(err))
    // Devices refuse requests from now on; those registered meanwhile, once they are.
    const closing = new Map<CachedDevice, Promise<unknown>>()
    const closeDevices = (): void => {
      for (const d of this.devices) if (!closing.has(d)) closing.set(d, note(d._close()))
    }
    closeDevices()
    await Promise.allSettled([...this.#registering])
    closeDevices()
    await Promise.all(closing.values())
    const devices = this.devices
    const sets = this.sets
    const outcomes = await Promise.all(sets.map((s) => s._close()))
    sets.forEach((s, i) => {
      if (outcomes[i] !== undefined) failures.push(outcomes[i])
    })
    await Promise.all(
      devices.map((d) => {
        const i = d.set ? sets.indexOf(d.set) : -1
        return note(d._closeSuper(i >= 0 && outcomes[i] === undefined))
      }),
    )
    if (this.#plain) {
      const plain = await this.#plain.catch(() => undefined)
      if (plain) await note(plain.close())
    }
    this.#paths.clear()
    if (failures.length > 0) throw asUbcacheError(failures[0])
  }
}

/** Options of {@link Registry.attachExisting}. */
export interface ExistingDeviceOptions {
  /** The UUID the set knows the device by: one it got before, to attach it again (default: a new one). */
  uuid?: string
  /** A new device's label, at most 32 bytes of UTF-8 (default: the path's last 32 bytes). */
  label?: string
  /** The cache mode to switch to (default: the one recorded, or `writethrough` for a new device). */
  cacheMode?: CacheMode
}

function checkExistingOptions(o: ExistingDeviceOptions): void {
  if (typeof o !== 'object' || o === null) throw new InvalidArgumentError('options must be an object')
  for (const k of Object.keys(o)) {
    if (!['uuid', 'label', 'cacheMode'].includes(k)) throw new InvalidArgumentError(`unknown option '${k}' (known: uuid, label, cacheMode)`)
  }
  if (o.uuid !== undefined && (typeof o.uuid !== 'string' || !UUID_RE.test(o.uuid) || o.uuid === NULL_UUID)) {
    throw new InvalidArgumentError(`uuid must be a non-zero UUID such as 0f3c…-…, got ${String(o.uuid)}`)
  }
  if (o.label !== undefined && (typeof o.label !== 'string' || Buffer.byteLength(o.label) > 32)) {
    throw new InvalidArgumentError(`label must be a string of at most 32 bytes, got ${String(o.label)}`)
  }
  if (o.cacheMode !== undefined && !CACHE_MODES.includes(o.cacheMode)) {
    throw new InvalidArgumentError(`cache mode '${String(o.cacheMode)}' is not one of ${CACHE_MODES.join(', ')}`)
  }
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** The last 32 bytes of `path` (whole characters). */
function defaultLabel(path: string): string {
  let label = path
  while (Buffer.byteLength(label) > 32) label = label.slice(1)
  return label
}

/** A device that holds a bcache superblock is registered, never cached as it is (its superblock would read as data). */
async function refuseBcache(path: string): Promise<void> {
  try {
    await readSuperblock(path)
  } catch (err) {
    if (asUbcacheError(err).code === 'NOT_BCACHE') return
    throw err
  }
  throw new InvalidArgumentError(`${path}: holds a bcache superblock: register it (Registry.register) instead of attaching it as an existing device`)
}

/** What the device at `path` is, whatever path names it: its device number for a block device, else device and inode. */
async function identity(path: string): Promise<string> {
  // A remote device is known by its URI (two URIs may name one export: the server decides).
  if (isNbdUri(path)) return `u:${path}`
  try {
    const st = await stat(path, { bigint: true })
    return st.isBlockDevice() ? `b:${st.rdev}` : `f:${st.dev}:${st.ino}`
  } catch (err) {
    throw asUbcacheError(err, path)
  }
}
