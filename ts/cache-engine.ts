/**
 * The cache engine: one cache set (a cache device caching any number of backing devices)
 * and the devices it serves, driven by the JavaScript thread. This is the low-level layer
 * that the registry, cache sets and cached devices are built on: devices are known by
 * numeric handles, and every call maps to one operation of the native engine.
 *
 * ```ts
 * import { CacheEngine, makeBacking, makeCache } from 'ubcache'
 * await makeCache('cache.img')
 * const sb = await makeBacking('slow.img', { cacheMode: 'writeback' })
 * const engine = await CacheEngine.open('cache.img')     // reads the set back off the event loop
 * const dev = await engine.attach({ path: 'slow.img', uuid: sb.uuid, dataOffset: sb.dataOffset * 512, mode: sb.cacheMode })
 * await engine.write(dev, 0, Buffer.alloc(4096, 1))
 * await engine.flush(dev)                                 // durable: journal entry written
 * const data = await engine.read(dev, 0, 4096)            // a hit: served from the cache device
 * console.log(engine.stats())
 * await engine.close()                                    // final checkpoint, devices released
 * ```
 *
 * How it runs: {@link CacheEngine.open} reads the set back (superblock, journal, prio
 * chain, UUID table, checkpoint, replay, a first GC) on a libuv worker thread, so opening a
 * set of millions of extents does not hold up the event loop. From then on the JavaScript
 * thread drives the engine itself, as the raw-device API does in its default `inline`
 * mode: requests made in one tick go to the engine in one call through memory shared with
 * it, Node's event loop watches the engine's io_uring (or portable engine) for
 * completions, which come back in chunks of 8, and reads land in engine memory that the
 * result is a view on (no copy; {@link CacheEngine.readInto} reads into a buffer of
 * {@link CacheEngine.allocBuffer} again and again). Background work (the journal's delayed
 * writes, prio writes, garbage collection, checkpoints) runs from a libuv timer, in slices
 * of half a millisecond, whenever the engine says it is due. The engine keeps the process
 * alive only while requests are in flight or background work is due: an idle engine that
 * is never closed lets the process exit (its set is then recovered from the journal at the
 * next open, as after a crash).
 *
 * Durability is a disk's with a volatile write cache: a write resolves once its data is on
 * the cache (writeback) or backing device (other modes) and its key is in the index; it is
 * durable after a {@link CacheEngine.flush} of its device, or at once with `fua`.
 *
 * Requests are checked as bcache checks them: offsets and lengths must be whole blocks
 * (the larger of the set's block size and the backing device's logical block size;
 * `MISALIGNED` otherwise), inside the device (`OUT_OF_RANGE`); an unknown handle, or one
 * whose attach has not finished, is `INVALID_ARGUMENT`; a closed engine is `CLOSED`.
 * @module
 */
import { type EngineChoice, type IoEngineOptions, type IoEngineStats, checkRemoteOptions, nativeEngineOptions, type OpenDeviceOptions } from './device'
import { asUbcacheError, InvalidArgumentError, UbcacheError } from './errors'
import { checkCount, closedError, deviceRequests, InlineQueue, MAX_REQUEST } from './inline'
import native from './native'
import { BACKING_STATES, type BackingState, CACHE_MODES, type CacheMode, REPLACEMENTS, type Replacement } from './superblock'
import { newUuid, uuidToBytes, uuidToString } from './uuid'

type NativeCacheEngine = InstanceType<typeof native.NativeCacheEngine>

/** Options of {@link CacheEngine.open}: the engine's, and how to open the cache set. */
export interface CacheEngineOptions extends Omit<IoEngineOptions, 'mode'> {
  /** O_DIRECT policy of the cache device (see {@link OpenDeviceOptions.direct}). */
  direct?: 'auto' | 'require' | 'off'
  /** Refuse a cache device already open elsewhere (default true). */
  exclusive?: boolean
  /**
   * How long written data's index updates may wait for a journal write when nobody
   * flushes, in milliseconds (bcache's `journal_delay_ms`; default 100).
   */
  journalDelayMs?: number
  /** Journal entries are written with FUA rather than between two flushes (default true). */
  journalFua?: boolean
  /**
   * bcache's `io_error_limit` (default 8): at this many I/O errors of the cache device
   * (decayed by `ioErrorHalflife`) the set leaves service: writes are refused, clean data
   * is read from the backing devices.
   */
  ioErrorLimit?: number
  /**
   * bcache's `io_error_halflife` (default 0: errors are never forgotten): the cache-device
   * I/Os after which an error counts half.
   */
  ioErrorHalflife?: number
  /**
   * bcache's `congested_read_threshold_us`: cache-device reads slower than this count as
   * congestion, and while the cache is congested part of the traffic bypasses it (see
   * {@link CongestionConfig}). Default 0: reads untimed (bcache's default is 2000).
   */
  congestedReadThresholdUs?: number
  /** bcache's `congested_write_threshold_us`: the same for writes. Default 0 (bcache's: 20000). */
  congestedWriteThresholdUs?: number
  /** bcache's `gc_after_writeback`: a GC pass runs once writeback has left a device with nothing dirty (default false). */
  gcAfterWriteback?: boolean
  /**
   * bcache's `copy_gc_enabled`: after each GC pass, moving GC copies the live data of mostly
   * empty buckets (at most half full, emptiest first, up to a 32nd of the cache a pass) into
   * fresh buckets, so their space comes back. Default true.
   */
  copyGcEnabled?: boolean
  /**
   * Data checksums (bcache has the key field and leaves it unused): every extent written to
   * the cache carries a crc64 of its data in its key, and a hit is checked against it (the
   * whole extent is read, also for a read of part of it). A mismatch counts in
   * `stats().csumErrors` and is a cache read error: clean data is read from the backing
   * device instead (and dropped from the cache), dirty data fails the read with `EIO`.
   * Writeback never copies data that fails its checksum. Default false.
   */
  dataCsum?: boolean
  /**
   * A hit on an extent in a bucket past the middle of its life copies the extent into a
   * fresh bucket (as moving GC does) instead of making the whole old bucket young again, so
   * hot blocks gather in young buckets and LRU evicts buckets of cold ones. Costs a cache
   * write per such hit; in `bench:policies`' Zipf reads it raised the hit ratio from 86.1%
   * to 87.5%. Default false.
   */
  promoteHits?: boolean
}

/** A backing device to attach to the cache set ({@link CacheEngine.attach}). */
export interface AttachOptions {
  /** The backing device: a file or block device. */
  path: string
  /**
   * The backing device's UUID, as text or 16 bytes (its superblock's `uuid`): the set's
   * UUID table knows it by this, and finds its cached data again at the next attach.
   */
  uuid: string | Uint8Array
  /** Its label, at most 32 bytes of UTF-8 (default empty). */
  label?: string
  /** Byte offset of its data on the device: the superblock's `dataOffset` × 512. */
  dataOffset: number
  /** Its cache mode (default `writethrough`). */
  mode?: CacheMode
  /** Open read-only (default false). */
  readOnly?: boolean
  /** O_DIRECT policy (see {@link OpenDeviceOptions.direct}). */
  direct?: 'auto' | 'require' | 'off'
  /** Refuse a device already open elsewhere (default true). */
  exclusive?: boolean
  /** A remote backing device: see {@link OpenDeviceOptions.remoteTimeoutMs}. */
  remoteTimeoutMs?: number
  /** A remote backing device: see {@link OpenDeviceOptions.remoteConnections}. */
  remoteConnections?: number
  /**
   * Writeback tunables to start with, in place of bcache's defaults: set before the set
   * can start writing anything back ({@link CacheEngine.setWritebackConfig} later).
   */
  writeback?: Partial<WritebackConfig>
  /** Bypass tunables to start with, in place of bcache's defaults. */
  bypass?: Partial<BypassConfig>
  /**
   * Cached as it is, with no bcache superblock (`dataOffset` must be 0): the set's UUID
   * table records its size, cache mode and state ({@link CacheEngine.recordEntry}), and it
   * must be the size recorded when it attaches again (default false).
   */
  noSuperblock?: boolean
}

/** Options of a write ({@link CacheEngine.write}). */
export interface WriteOptions {
  /** Force unit access: the write is durable when it resolves, as if flushed (default false). */
  fua?: boolean
}

/** A device the engine serves ({@link CacheEngine.device}). */
export interface CachedDeviceInfo {
  /** Its handle, for requests. */
  handle: number
  /** The path it was opened from. */
  path: string
  /** Bytes of data: what lies past the data offset. */
  size: number
  /** The backing device's logical block size. */
  logicalBlockSize: number
  /** Opened with O_DIRECT. */
  direct: boolean
  /** A block device rather than a regular file. */
  isBlockDevice: boolean
  /** Opened for writing. */
  writable: boolean
  /** Attached to the cache set (false: served straight, {@link CacheEngine.attachPlain}). */
  cached: boolean
}

/**
 * Tunables of a cache set's cache device (bcache's sysfs `cache_replacement_policy` and
 * `discard`, which bcache also records in the cache superblock, as ubcache does).
 */
export interface CacheDeviceConfig {
  /** `cache_replacement_policy` (`lru`): which buckets are invalidated first: `lru`, `fifo` or `random`. */
  replacement: Replacement
  /** `discard` (false): buckets are discarded (TRIM) before reuse. */
  discard: boolean
}

/** A flash-only volume of a cache set, as its UUID table records it. */
export interface VolumeInfo {
  /** Its UUID, what it is known by. */
  uuid: string
  /** Its label (up to 32 bytes). */
  label: string
  /** Its size in bytes (thin: the cache holds only what was written). */
  size: number
}

/** A backing device the cache set caches without a superblock ({@link CacheEngine.existingDevices}). */
export interface ExistingDeviceInfo {
  /** Its UUID, what the set knows it by. */
  uuid: string
  /** Its label (up to 32 bytes). */
  label: string
  /** Its size in bytes when it was first attached. */
  size: number
  /** Its cache mode, as last recorded. */
  mode: CacheMode
  /** Its state as last recorded: `clean`, or `dirty` while the set may hold data it lacks. */
  state: BackingState
}

/** Where a cache set stands. */
export type CacheSetState =
  /** Making its opened state durable (prio write, superblock); requests wait. */
  | 'starting'
  /** Serving requests. */
  | 'running'
  /** A metadata write failed: flushes fail, writes are refused, clean data is read from the backing devices. */
  | 'failed'
  /** Draining requests and writing a final checkpoint; new requests are refused. */
  | 'closing'
  /** Closed cleanly: everything is on disk. */
  | 'closed'

/**
 * Writeback tunables of a cached device, with bcache's names and defaults
 * ({@link CachedDevice.writebackConfig}).
 */
export interface WritebackConfig {
  /** `writeback_running` (true): false pauses writeback; extents on their way finish. */
  running: boolean
  /**
   * `writeback_percent` (10, 0 to 40): the dirty data aimed at, as a percentage of the
   * cache shared by the cached devices in proportion to their size; 0 writes back at full
   * speed.
   */
  percent: number
  /** `writeback_delay` (30), in seconds: the wait after a pass over the whole device. */
  delaySeconds: number
  /** `writeback_rate_update_seconds` (5, 1 to 60): how often the controller runs. */
  rateUpdateSeconds: number
  /** `writeback_rate_p_term_inverse` (40): the proportional term is the excess dirty data over this. */
  ratePTermInverse: number
  /** `writeback_rate_i_term_inverse` (10000): the integral term is the accumulated excess over this. */
  rateITermInverse: number
  /** `writeback_rate_minimum` (8), in sectors per second. */
  rateMinimum: number
  /**
   * `stripe_size` (0: no stripes), in bytes, a multiple of 4096 up to 1 GiB: the backing
   * device's full stripe (a RAID's chunk size times its data disks). bcache reads it from
   * the device; here it is given.
   */
  stripeSize: number
  /**
   * `partial_stripes_expensive` (false): writes of part of a stripe cost the backing device
   * a read first (RAID 5/6). Writeback then writes fully dirty stripes back first, and a
   * write to a stripe already partly dirty goes to the cache even past the writeback cutoff
   * (up to 70% in use), so that stripes fill in the cache.
   */
  partialStripesExpensive: boolean
  /**
   * `writeback_consider_fragment` (true): past 50% of the cache in use, dirty data spread
   * thin over many buckets (more than three buckets' room per bucket's worth of dirty
   * data) raises the rate to the dirty sectors per bucket times a weight, so that such a
   * cache does not stay past the writeback cutoff (writes going writethrough) while its
   * dirty data is under `percent` and the rate at its minimum.
   */
  considerFragment: boolean
  /** `writeback_rate_fp_term_low` (1): the weight per point in use from 50% to 57%; below `rateFpTermMid`. */
  rateFpTermLow: number
  /** `writeback_rate_fp_term_mid` (10): the weight per point in use from 57% to 64%; below `rateFpTermHigh`. */
  rateFpTermMid: number
  /** `writeback_rate_fp_term_high` (1000): the weight per point in use past 64%. */
  rateFpTermHigh: number
}

/** The writeback controller's state (bcache's `writeback_rate_debug`), in 512-byte sectors. */
export interface WritebackRate {
  /** The rate, in sectors per second. */
  rate: number
  /** Dirty sectors of the device. */
  dirty: number
  /** The dirty sectors aimed at. */
  target: number
  /** The proportional term, sectors per second. */
  proportional: number
  /** The integral term, sectors per second. */
  integral: number
  /** Sectors written back and marked clean since the set was opened. */
  written: number
  /** Running at full speed: `percent` 0, or the set idle for six rate updates. */
  fullSpeed: boolean
}

/** bcache's defaults for {@link WritebackConfig}. */
export const DEFAULT_WRITEBACK: Readonly<WritebackConfig> = Object.freeze({
  running: true,
  percent: 10,
  delaySeconds: 30,
  rateUpdateSeconds: 5,
  ratePTermInverse: 40,
  rateITermInverse: 10000,
  rateMinimum: 8,
  stripeSize: 0,
  partialStripesExpensive: false,
  considerFragment: true,
  rateFpTermLow: 1,
  rateFpTermMid: 10,
  rateFpTermHigh: 1000,
})

/**
 * How a tunable is checked: bcache's name, and either a boolean (no `range`) or a whole
 * number in `range` (of `unit`), null allowed where `nullable`.
 */
export interface Tunable {
  name: string
  range?: [number, number]
  unit?: string
  nullable?: boolean
}

/** Throws `INVALID_ARGUMENT` naming the tunable for a key `table` does not have or a bad value. */
function checkTunables(group: string, table: Record<string, Tunable>, changes: object): void {
  if (typeof changes !== 'object' || changes === null) throw new InvalidArgumentError(`${group} changes must be an object`)
  for (const [k, v] of Object.entries(changes)) {
    const t = Object.hasOwn(table, k) ? table[k] : undefined
    if (!t) throw new InvalidArgumentError(`unknown ${group} tunable '${k}' (known: ${Object.keys(table).join(', ')})`)
    if (!t.range) {
      if (typeof v !== 'boolean') throw new InvalidArgumentError(`${t.name} (${k}) must be true or false, got ${String(v)}`)
      continue
    }
    if (v === null && t.nullable) continue
    const [lo, hi] = t.range
    if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi) {
      const what = `a whole number${t.unit ? ` of ${t.unit}` : ''} in ${lo}..${hi}${t.nullable ? ', or null' : ''}`
      throw new InvalidArgumentError(`${t.name} (${k}) must be ${what}, got ${String(v)}`)
    }
  }
}

/** Each writeback tunable: bcache's name and, for numbers, the whole numbers allowed. */
export const WRITEBACK_TUNABLES: Record<keyof WritebackConfig, Tunable> = {
  running: { name: 'writeback_running' },
  percent: { name: 'writeback_percent', range: [0, 40] },
  delaySeconds: { name: 'writeback_delay', range: [0, 2 ** 32 - 1] },
  rateUpdateSeconds: { name: 'writeback_rate_update_seconds', range: [1, 60] },
  ratePTermInverse: { name: 'writeback_rate_p_term_inverse', range: [1, 2 ** 31 - 1] },
  rateITermInverse: { name: 'writeback_rate_i_term_inverse', range: [1, 2 ** 31 - 1] },
  rateMinimum: { name: 'writeback_rate_minimum', range: [1, 1e9] },
  stripeSize: { name: 'stripe_size', range: [0, 2 ** 30], unit: 'bytes' },
  partialStripesExpensive: { name: 'partial_stripes_expensive' },
  considerFragment: { name: 'writeback_consider_fragment' },
  rateFpTermLow: { name: 'writeback_rate_fp_term_low', range: [1, 2 ** 32 - 1] },
  rateFpTermMid: { name: 'writeback_rate_fp_term_mid', range: [1, 2 ** 32 - 1] },
  rateFpTermHigh: { name: 'writeback_rate_fp_term_high', range: [1, 2 ** 32 - 1] },
}

/**
 * Throws `INVALID_ARGUMENT` naming the tunable for a key {@link WritebackConfig} does not
 * have, a value of the wrong type or one out of bcache's range.
 */
export function checkWritebackChanges(changes: Partial<WritebackConfig>): void {
  checkTunables('writeback', WRITEBACK_TUNABLES, changes)
}

/**
 * Bypass tunables of a cached device, with bcache's names and defaults
 * ({@link CachedDevice.bypassConfig}). A stream of requests (each starting where the one
 * before ended, within 5 s; 64 streams are remembered per device) that has moved the cutoff
 * in bytes, its current request included, bypasses the cache: reads are served from the
 * cache where it hits and from the backing device without filling where it misses; writes
 * go to the backing device and drop what the cache held for the range (data still dirty
 * there is overwritten in place). Random I/O between streams is never bypassed for them.
 */
export interface BypassConfig {
  /** `sequential_cutoff` (4 MiB), in bytes, 0 to 2^32 − 1; 0 turns the detector off. */
  sequentialCutoff: number
  /** A cutoff for reads of their own, in bytes (null: `sequentialCutoff`). */
  sequentialCutoffRead: number | null
  /** A cutoff for writes of their own, in bytes (null: `sequentialCutoff`). */
  sequentialCutoffWrite: number | null
  /**
   * `sequential_merge` (true): a request that starts where a recent stream ended continues
   * it; false counts each request alone (only a request as long as the cutoff bypasses).
   */
  sequentialMerge: boolean
  /**
   * bcache's `readahead` (0: off), in bytes, 0 to 2^32 − 1: a read miss that reaches the
   * request's end goes on into what the cache does not hold after it, up to this much, read
   * into the cache (not returned); not once 90% of the cache is in use.
   */
  readahead: number
}

/** bcache's defaults for {@link BypassConfig}. */
export const DEFAULT_BYPASS: Readonly<BypassConfig> = Object.freeze({
  sequentialCutoff: 4 << 20,
  sequentialCutoffRead: null,
  sequentialCutoffWrite: null,
  sequentialMerge: true,
  readahead: 0,
})

export const BYPASS_TUNABLES: Record<keyof BypassConfig, Tunable> = {
  sequentialCutoff: { name: 'sequential_cutoff', range: [0, 2 ** 32 - 1], unit: 'bytes' },
  sequentialCutoffRead: { name: 'sequential_cutoff_read', range: [0, 2 ** 32 - 1], unit: 'bytes', nullable: true },
  sequentialCutoffWrite: { name: 'sequential_cutoff_write', range: [0, 2 ** 32 - 1], unit: 'bytes', nullable: true },
  sequentialMerge: { name: 'sequential_merge' },
  readahead: { name: 'readahead', range: [0, 2 ** 32 - 1], unit: 'bytes' },
}

/**
 * Throws `INVALID_ARGUMENT` naming the tunable for a key {@link BypassConfig} does not
 * have or a value that is not a whole number of bytes in 0..2^32 − 1 (or null where allowed).
 */
export function checkBypassChanges(changes: Partial<BypassConfig>): void {
  checkTunables('bypass', BYPASS_TUNABLES, changes)
}

/** The native form of bypass changes: null (the shared cutoff) travels as -1. */
function nativeBypass(changes: Partial<BypassConfig>): native.NativeBypassConfig {
  const n = (v: number | null | undefined) => (v === null ? -1 : v)
  return {
    sequentialCutoff: changes.sequentialCutoff,
    sequentialCutoffRead: n(changes.sequentialCutoffRead),
    sequentialCutoffWrite: n(changes.sequentialCutoffWrite),
    sequentialMerge: changes.sequentialMerge,
    readahead: changes.readahead,
  }
}

/**
 * When a cache set's cache device counts as congested (bcache's `congested_*_threshold_us`,
 * {@link CacheSet.congestionConfig}). Each cache read or write slower than its threshold
 * lowers a congestion counter by its latency in milliseconds; faster ones and time raise it
 * again. While it is low, requests whose stream has moved at least a length that shrinks as
 * congestion grows bypass the cache; at the worst, all do.
 */
export interface CongestionConfig {
  /** `congested_read_threshold_us`, in microseconds; 0 (the default): reads are not timed. bcache's default: 2000. */
  readThresholdUs: number
  /** `congested_write_threshold_us`, in microseconds; 0 (the default): writes are not timed. bcache's default: 20000. */
  writeThresholdUs: number
}

/**
 * The defaults of {@link CongestionConfig}: off. Unlike bcache (2000 and 20000 µs): the engine
 * runs on the event loop and times a cache I/O up to the moment it handles the completion,
 * so a busy loop or a loaded machine reads as a congested cache device (with bcache's values,
 * a test on a loaded 2-core machine saw every read bypass the cache).
 */
export const DEFAULT_CONGESTION: Readonly<CongestionConfig> = Object.freeze({ readThresholdUs: 0, writeThresholdUs: 0 })

export const CONGESTION_TUNABLES: Record<keyof CongestionConfig, Tunable> = {
  readThresholdUs: { name: 'congested_read_threshold_us', range: [0, 2 ** 32 - 1], unit: 'microseconds' },
  writeThresholdUs: { name: 'congested_write_threshold_us', range: [0, 2 ** 32 - 1], unit: 'microseconds' },
}

/** Throws `INVALID_ARGUMENT` naming the tunable for an unknown key or a bad value. */
export function checkCongestionChanges(changes: Partial<CongestionConfig>): void {
  checkTunables('congestion', CONGESTION_TUNABLES, changes)
}

/** Counts of one accounting window ({@link Accounting}), with bcache's names. */
export interface StatWindow {
  /** Read requests served entirely from the cache. */
  cacheHits: number
  /** Read requests that needed the backing device. */
  cacheMisses: number
  /** Bypassed read requests served entirely from the cache. */
  cacheBypassHits: number
  /** Bypassed read requests that needed the backing device. */
  cacheBypassMisses: number
  /** Read-miss fills that lost (part of) their range to a write, or found no space. */
  cacheMissCollisions: number
  /** Sectors of requests that bypassed the cache (bcache's `bypassed`). */
  bypassedSectors: number
  /** Read misses extended by readahead (bcache's `cache_readaheads`). */
  cacheReadaheads: number
  /** Hits as a whole percentage of hits and misses (0 with neither). */
  cacheHitRatio: number
}

/**
 * Request accounting as bcache's `stats_total`, `stats_day`, `stats_hour` and
 * `stats_five_minute` keep it: every 5 s what was counted moves into each window, and the
 * windows decay by 31/32, the five-minute one every step, the hour one every 12th, the day
 * one every 288th; the total never decays. What was counted since the last step shows in
 * every window undecayed.
 */
export interface Accounting {
  fiveMinute: StatWindow
  hour: StatWindow
  day: StatWindow
  total: StatWindow
}

/** bcache's `priority_stats` of a cache device ({@link CacheEngine.priorityStats}). */
export interface PriorityStats {
  /** Buckets with nothing in them, percent. */
  unusedPercent: number
  /** Buckets holding clean (reclaimable) data, percent. */
  cleanPercent: number
  /** Buckets holding dirty data, percent. */
  dirtyPercent: number
  /** Metadata buckets, percent. */
  metadataPercent: number
  /** Mean age of the data buckets (initial prio − prio). */
  average: number
  /** Sectors each quantile stands for. */
  sectorsPerQuantile: number
  /** 31 quantiles of age, youngest first. */
  quantiles: number[]
}

/** Counters of a cache set since it was opened, and where it stands ({@link CacheEngine.stats}). */
export interface CacheSetStats {
  /** Where the set stands. */
  state: CacheSetState
  /** What took the set out of service, when `state` is `failed`. */
  failure?: string
  /** Data bytes written to the cache device (writes and read-miss fills). */
  dataBytes: number
  /** Journal entry bytes written. */
  journalBytes: number
  /** Checkpoint bytes written. */
  checkpointBytes: number
  /** Prio chain bytes written. */
  prioBytes: number
  /** UUID table and superblock bytes written. */
  otherMetaBytes: number
  /** All metadata bytes written. */
  metaBytes: number
  /** Journal entries written. */
  journalEntries: number
  /** Flushes of the cache device sent ahead of journal entries. */
  journalPreflushes: number
  /** Checkpoints recorded. */
  checkpoints: number
  /**
   * Of those, begun because many prio writes happened since the oldest checkpoint kept (so
   * that no bucket's gen can wrap within what replay would read).
   */
  prioDistanceCheckpoints: number
  /** Prio writes committed. */
  prioWrites: number
  /** GC passes finished. */
  gcRuns: number
  /** bcache's `btree_gc_average_duration_ms`: mean length of a pass, start to end (weighted 1/8 to the newest). */
  gcAverageDurationMs: number
  /** bcache's `btree_gc_max_duration_ms`. */
  gcMaxDurationMs: number
  /** bcache's `btree_gc_average_frequency_sec`, in ms: mean time between passes. */
  gcAverageIntervalMs: number
  /** bcache's `btree_gc_last_sec`, in ms: since the last pass ended (−1 before the first). */
  gcLastMsAgo: number
  /** Moving GC passes finished. */
  movingGcPasses: number
  /** Buckets moving GC chose to empty, over all passes. */
  movingGcBuckets: number
  /** Sectors moving GC copied to fresh buckets. */
  movingGcSectors: number
  /** Moves given up (no space, an I/O error, or the data changed meanwhile): the data stayed. */
  movingGcDropped: number
  /** The last moving GC pass: sectors moved. */
  movingGcLastSectors: number
  /** The last moving GC pass: how long it took, in ms. */
  movingGcLastMs: number
  /** Hits that moved their extent into a fresh bucket ({@link CacheEngineOptions.promoteHits}). */
  movingGcPromotions: number
  /** Sectors read from the cache (hits). */
  hitSectors: number
  /** Sectors read from backing devices because the cache did not hold them. */
  missSectors: number
  /** Read requests served entirely from the cache. */
  cacheHits: number
  /** Read requests that needed the backing device. */
  cacheMisses: number
  /** Bypassed read requests served entirely from the cache (bcache's `cache_bypass_hits`). */
  cacheBypassHits: number
  /** Bypassed read requests that needed the backing device (bcache's `cache_bypass_misses`). */
  cacheBypassMisses: number
  /** Sectors of requests that bypassed the cache, for any reason, mode `none` included (bcache's `bypassed`). */
  bypassedSectors: number
  /** Requests that bypassed because their stream passed the sequential cutoff. */
  sequentialBypasses: number
  /** Requests that bypassed because the cache device was congested. */
  congestedBypasses: number
  /** Requests that added nothing to the cache because more than 95% of it was in use (bcache's `CUTOFF_CACHE_ADD`). */
  cacheAddCutoffs: number
  /** Fills that lost part of their range to a write or invalidation meanwhile. */
  cacheMissCollisions: number
  /** Sectors of read misses inserted into the cache. */
  fillSectors: number
  /**
   * Read misses on data the cache held and evicted since (found by its stale keys, until GC
   * drops them): the replacement policy's ghost record. With `s3fifo` they fill buckets of
   * its main queue.
   */
  returningMisses: number
  /** Read misses `tinylfu`'s admission kept out of the cache: their data missed for the first time in its window. */
  admissionBypasses: number
  /** Writeback-mode writes sent through instead, because too much of the cache was dirty. */
  writebackCutoffs: number
  /** The cache device's I/O errors as `ioErrorLimit` counts them (decayed by `ioErrorHalflife`). */
  ioErrors: number
  /** Sectors written back to backing devices and marked clean. */
  writebackSectors: number
  /** Writeback extents that failed (a cache read, a backing write or its flush) and stay dirty for the next pass. */
  writebackErrors: number
  /** Writes that went to the cache because they overlapped dirty data, whatever the mode. */
  dirtyOverlaps: number
  /** Writes that waited for the allocator to free space. */
  spaceWaits: number
  /** Requests that waited for an earlier overlapping write. */
  orderedWaits: number
  /** Errors reading or writing the cache device's data. */
  cacheIoErrors: number
  /** Hit reads served again from the backing device after a cache read error. */
  rereadFromBacking: number
  /** Cache reads (hits, writeback) whose data did not match its checksum ({@link CacheEngineOptions.dataCsum}). */
  csumErrors: number
  /** Sectors read ahead past read misses into the cache (see {@link BypassConfig.readahead}). */
  readaheadSectors: number
  /**
   * bcache's `cache_read_races`: hits whose bucket was reused while they were read (read
   * again from the backing device, or failed if dirty). A hit pins its bucket, so this
   * stays 0 unless something is wrong.
   */
  cacheReadRaces: number
  /**
   * The longest the engine spent in one call of background work (a GC or checkpoint slice,
   * the allocator's steps, a prio write's encoding), in microseconds: how long background
   * work held up the JavaScript thread at most.
   */
  longestTickUs: number
  /** Percentage of buckets holding dirty data or metadata, as of the last GC (bcache's `in_use`). */
  inUsePercent: number
  /** bcache's `cache_available_percent`: 100 − `inUsePercent`, the share that could take new data. */
  cacheAvailablePercent: number
  /** Buckets free for allocation. */
  availableBuckets: number
  /** Requests (and read-miss fills) in flight in the set. */
  inFlight: number
}

/** What opening the cache set found and did ({@link CacheEngine.openReport}). */
export interface CacheSetOpenReport {
  /** The set had never run (`CACHE_SYNC` clear): it was initialized. */
  fresh: boolean
  /** Valid journal entries found. */
  journalEntries: number
  /** Sequence number of the newest valid journal entry. */
  headSeq: number
  /** Keys loaded from the checkpoint, and its sequence number. */
  checkpointKeys: number
  checkpointSeq: number
  /** The newest checkpoint was damaged: an older one was loaded and more journal replayed. */
  checkpointFallback: boolean
  /** Checkpoints kept from reuse because replay may still start from them. */
  checkpointsKept: number
  /** Keys and journal entries replayed after the checkpoint. */
  replayedKeys: number
  replayedEntries: number
  /** Keys whose pointers were all stale. */
  staleKeys: number
  /** Replay stopped before this missing sequence number (entries after it were ignored). */
  gapAt?: number
  /** Prio writes since the oldest checkpoint kept was begun. */
  prioDistance: number
  /** The set was closed cleanly last time. */
  cleanShutdown: boolean
  /** Clean keys dropped because the set was not closed cleanly (dirty data is kept). */
  cleanKeysDropped: number
  /** Milliseconds spent reading the journal, loading the checkpoint, replaying, and in the first GC. */
  journalReadMs: number
  checkpointMs: number
  replayMs: number
  gcMs: number
}

/** Settlers of a control operation waiting for its event. */
interface Waiter {
  resolve: (handle: number) => void
  reject: (e: Error) => void
}

/**
 * A cache engine: at most one cache set and the devices it serves, driven by the
 * JavaScript thread (see the module docs). Make one with {@link CacheEngine.open}.
 */
export class CacheEngine {
  readonly #native: NativeCacheEngine
  readonly #queue: InlineQueue<NativeCacheEngine>
  /** Control operations waiting for their event, by tag. */
  readonly #waiting = new Map<number, Waiter>()
  #nextTag = 0
  readonly #devices = new Map<number, CachedDeviceInfo>()
  readonly #hasCacheSet: boolean
  #closing: Promise<void> | undefined

  private constructor(nativeOptions: native.NativeEngineOptions, set: native.NativeLoadedSet | undefined) {
    try {
      this.#queue = new InlineQueue((onComplete) => new native.NativeCacheEngine(nativeOptions, set, onComplete, this.#event), {
        holdWhileBusy: true,
      })
    } catch (err) {
      // The set read back is let go now, not when it is collected: its device can be opened again.
      set?.release()
      throw asUbcacheError(err)
    }
    this.#native = this.#queue.native
    this.#hasCacheSet = set !== undefined
  }

  /**
   * Opens the cache set on the cache device at `cachePath` (formatted with
   * {@link makeCache}) and starts an engine running it; without a path, an engine with no
   * cache set, which serves backing devices straight ({@link CacheEngine.attachPlain}).
   * The set is read back on a libuv worker thread; its startup writes (a prio write, the
   * superblock) then begin, and requests wait for them.
   * @throws {UbcacheError} `ENOENT`; `EBUSY` (the cache device is open elsewhere, e.g. by
   *   another engine); `MAGIC_MISMATCH` (no bcache superblock); `CHECKSUM_MISMATCH`,
   *   `INVALID_ARGUMENT` (a superblock ubcache cannot run: not a cache device, several
   *   cache devices, bad sizes); `CORRUPT` (metadata that cannot be read back); `EIO`.
   */
  static async open(cachePath?: string, options: CacheEngineOptions = {}): Promise<CacheEngine> {
    const delay = options.journalDelayMs
    if (delay !== undefined && (checkCount('journalDelayMs', delay), delay > 0xffffffff)) {
      throw new InvalidArgumentError(`journalDelayMs must be at most ${0xffffffff}, got ${delay}`)
    }
    for (const k of ['gcAfterWriteback', 'copyGcEnabled', 'dataCsum', 'promoteHits'] as const) {
      const v = options[k]
      if (v !== undefined && typeof v !== 'boolean') throw new InvalidArgumentError(`${k} must be true or false, got ${String(v)}`)
    }
    for (const k of ['ioErrorLimit', 'ioErrorHalflife', 'congestedReadThresholdUs', 'congestedWriteThresholdUs'] as const) {
      const v = options[k]
      if (v !== undefined && (checkCount(k, v), v > 0xffffffff)) throw new InvalidArgumentError(`${k} must be at most ${0xffffffff}, got ${v}`)
    }
    const nativeOptions = nativeEngineOptions(options, true)
    let set: native.NativeLoadedSet | undefined
    if (cachePath !== undefined) {
      if (typeof cachePath !== 'string' || cachePath === '') throw new InvalidArgumentError('cachePath must be a non-empty string')
      try {
        set = await native.loadCacheSet(cachePath, {
          engine: options.engine,
          direct: options.direct,
          exclusive: options.exclusive,
          journalDelayMs: delay,
          journalFua: options.journalFua,
          ioErrorLimit: options.ioErrorLimit,
          ioErrorHalflife: options.ioErrorHalflife,
          congestedReadThresholdUs: options.congestedReadThresholdUs,
          congestedWriteThresholdUs: options.congestedWriteThresholdUs,
          gcAfterWriteback: options.gcAfterWriteback,
          copyGcEnabled: options.copyGcEnabled,
          dataCsum: options.dataCsum,
          promoteHits: options.promoteHits,
        })
      } catch (err) {
        throw asUbcacheError(err, cachePath)
      }
    }
    return new CacheEngine(nativeOptions, set)
  }

  /** The I/O engine underneath: `io_uring` or `psync`. */
  get kind(): 'io_uring' | 'psync' {
    return this.#native.kind as 'io_uring' | 'psync'
  }

  /** Whether the engine runs a cache set (false: it serves backing devices straight). */
  get hasCacheSet(): boolean {
    return this.#hasCacheSet
  }

  /** Where the cache set stands (an engine without one: `running`, then `closed`). */
  get state(): CacheSetState {
    return this.#native.state
  }

  /** What took the cache set out of service, when {@link CacheEngine.state} is `failed`. */
  get failure(): UbcacheError | undefined {
    const f = this.#native.failure
    return f ? new UbcacheError(f[0], f[1]) : undefined
  }

  /** Requests made and not yet settled. */
  get inFlight(): number {
    return this.#queue.slots.live
  }

  /** True once {@link CacheEngine.close} has been called. */
  get closed(): boolean {
    return this.#closing !== undefined
  }

  readonly #check = (): void => {
    if (this.#closing) throw closedError('the cache engine')
  }

  /** Starts a control operation under a fresh tag; resolves with its event. */
  #control(start: (tag: number) => void): Promise<number> {
    const tag = ++this.#nextTag
    return new Promise<number>((resolve, reject) => {
      this.#waiting.set(tag, { resolve, reject })
      try {
        start(tag)
      } catch (err) {
        this.#waiting.delete(tag)
        reject(asUbcacheError(err))
      }
    })
  }

  /**
   * A control operation finished (always from the event loop, never within a call). A
   * field, so it lives as long as the engine: the native engine holds it weakly while idle.
   */
  readonly #event = (tag: number, handle: number, error?: [string, string]): void => {
    const w = this.#waiting.get(tag)
    if (!w) return
    this.#waiting.delete(tag)
    if (error) w.reject(new UbcacheError(error[0], error[1]))
    else w.resolve(handle)
  }

  #remember(path: string, info: native.NativeDevice, cached: boolean): CachedDeviceInfo {
    const d: CachedDeviceInfo = {
      handle: info.id,
      path,
      size: info.size,
      logicalBlockSize: info.logicalBlockSize,
      direct: info.direct,
      isBlockDevice: info.blockDevice,
      writable: info.writable,
      cached,
    }
    this.#devices.set(d.handle, d)
    return d
  }

  /**
   * Attaches a backing device to the cache set; resolves to its handle once it can take
   * requests (its entry in the set's UUID table is durable). A device the set has seen
   * before (same UUID) finds its cached data again.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (bad options, a data offset past the device,
   *   an engine without a cache set); `ENOENT`, `EBUSY` (open elsewhere, or its UUID already
   *   attached), `EACCES`; `NO_SPACE` (the UUID table is full); the set's failure; `CLOSED`.
   */
  async attach(options: AttachOptions): Promise<number> {
    this.#check()
    const o = options
    if (typeof o?.path !== 'string' || o.path === '') throw new InvalidArgumentError('path must be a non-empty string')
    const uuid = typeof o.uuid === 'string' ? uuidToBytes(o.uuid) : o.uuid
    if (!(uuid instanceof Uint8Array) || uuid.length !== 16) throw new InvalidArgumentError('uuid must be a UUID string or 16 bytes')
    checkCount('dataOffset', o.dataOffset)
    if (o.mode !== undefined && !CACHE_MODES.includes(o.mode)) {
      throw new InvalidArgumentError(`cache mode '${String(o.mode)}' is not one of ${CACHE_MODES.join(', ')}`)
    }
    if (o.writeback !== undefined) checkWritebackChanges(o.writeback)
    if (o.bypass !== undefined) checkBypassChanges(o.bypass)
    checkRemoteOptions(o)
    if (o.noSuperblock !== undefined && typeof o.noSuperblock !== 'boolean') throw new InvalidArgumentError(`noSuperblock must be true or false, got ${String(o.noSuperblock)}`)
    let handle = -1
    try {
      return await this.#control((tag) => {
        const info = this.#native.attach(tag, {
          path: o.path,
          uuid,
          label: o.label,
          dataOffset: o.dataOffset,
          mode: o.mode,
          readOnly: o.readOnly,
          direct: o.direct,
          exclusive: o.exclusive,
          remoteTimeoutMs: o.remoteTimeoutMs,
          remoteConnections: o.remoteConnections,
          writeback: o.writeback,
          bypass: o.bypass === undefined ? undefined : nativeBypass(o.bypass),
          noSuperblock: o.noSuperblock,
        })
        handle = this.#remember(o.path, info, true).handle
      })
    } catch (err) {
      this.#devices.delete(handle)
      throw asUbcacheError(err, o.path)
    }
  }

  /**
   * Creates a flash-only volume of `size` bytes in the cache set (bcache's flash-only
   * device): a thin volume that lives only in the cache, in the set's UUID table, found again
   * after a restart ({@link CacheEngine.attachVolume}). Reads of what was never written are
   * zeros; writes stay in the cache (dirty, never written back); a flush makes them durable.
   * Resolves to its handle once its UUID-table entry is durable.
   * @param size - bytes, a whole number of the set's blocks; may exceed the cache (thin).
   * @param options - `uuid` (default: a new random one) and `label` (up to 32 bytes).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a bad size, a UUID already in the set, an
   *   engine without a cache set); `NO_SPACE` (the UUID table is full); the set's failure;
   *   `CLOSED`.
   */
  async createVolume(size: number, options: { uuid?: string; label?: string } = {}): Promise<number> {
    this.#check()
    checkCount('size', size)
    if (size === 0) throw new InvalidArgumentError('a volume of 0 bytes')
    const uuid = options.uuid ?? newUuid()
    const bytes = uuidToBytes(uuid)
    return this.#volume(uuid, size, (tag) => this.#native.createVolume(tag, bytes, options.label, size))
  }

  /**
   * Attaches the set's flash-only volume `uuid` (one created before a restart); resolves to
   * its handle.
   * @throws {UbcacheError} `ENOENT` (no such volume in the set), `EBUSY` (attached already),
   *   `INVALID_ARGUMENT`, `CLOSED`.
   */
  async attachVolume(uuid: string): Promise<number> {
    this.#check()
    const v = this.volumes().find((x) => x.uuid === uuid.toLowerCase())
    const bytes = uuidToBytes(uuid)
    return this.#volume(uuid, v?.size ?? 0, (tag) => this.#native.attachVolume(tag, bytes))
  }

  /** A volume's control operation: `start` returns its handle at once; resolves with it once done. */
  async #volume(uuid: string, size: number, start: (tag: number) => number): Promise<number> {
    let handle = -1
    try {
      return await this.#control((tag) => {
        handle = start(tag)
        this.#devices.set(handle, volumeInfo(handle, uuid, size))
      })
    } catch (err) {
      this.#devices.delete(handle)
      throw asUbcacheError(err)
    }
  }

  /**
   * bcache's `clear_stats`: empties the accounting windows of the cached device `handle`,
   * or, without one, of the set and every device.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (not a cached device, no cache set), `CLOSED`.
   */
  clearStats(handle?: number): void {
    this.#check()
    try {
      this.#native.clearStats(handle)
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * The ranges of a cached device whose current data only the cache holds (its dirty
   * extents, adjacent ones merged, in order; at most `max`), in bytes.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (not a cached device), `CLOSED`.
   */
  dirtyExtents(handle: number, max = 1 << 20): { offset: number; length: number }[] {
    this.#check()
    checkCount('max', max)
    try {
      return this.#native.dirtyExtents(handle, Math.min(max, 2 ** 32 - 1))
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /** The cache device's replacement policy and discard flag. @throws {UbcacheError} `INVALID_ARGUMENT` (no cache set). */
  cacheDeviceConfig(): CacheDeviceConfig {
    try {
      const p = this.#native.cachePolicy()
      return { replacement: p.replacement as Replacement, discard: p.discard === true }
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * Changes the cache device's replacement policy (from the next batch of buckets
   * invalidated) and discard flag (from the next bucket reused), and records them in the
   * cache superblock, as writing bcache's sysfs files does.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an unknown key or a bad value, naming it; no
   *   cache set), the set's failure, `CLOSED`.
   */
  setCacheDeviceConfig(changes: Partial<CacheDeviceConfig>): void {
    this.#check()
    if (typeof changes !== 'object' || changes === null) throw new InvalidArgumentError('cache device changes must be an object')
    for (const [k, v] of Object.entries(changes)) {
      if (k === 'replacement') {
        if (!REPLACEMENTS.includes(v as Replacement)) throw new InvalidArgumentError(`cache_replacement_policy (replacement) must be one of ${REPLACEMENTS.join(', ')}, got ${String(v)}`)
      } else if (k === 'discard') {
        if (typeof v !== 'boolean') throw new InvalidArgumentError(`discard must be true or false, got ${String(v)}`)
      } else {
        throw new InvalidArgumentError(`unknown cache device tunable '${k}' (known: replacement, discard)`)
      }
    }
    try {
      this.#native.setCachePolicy({ replacement: changes.replacement, discard: changes.discard })
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /** The backing devices the set caches without a superblock, attached or not (empty for an engine without a cache set). */
  existingDevices(): ExistingDeviceInfo[] {
    return this.#native.existingDevices().map((d) => ({
      uuid: uuidToString(Buffer.from(d.uuid)),
      label: d.label,
      size: d.size,
      mode: d.mode as CacheMode,
      state: BACKING_STATES[d.state] ?? 'none',
    }))
  }

  /**
   * Records the cache mode and state of the cached device `handle`, one attached with
   * `noSuperblock` (which has no superblock to hold them), in its UUID-table entry;
   * resolves once that is durable.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (not such a device, a bad mode or state), the
   *   set's failure, `CLOSED`.
   */
  async recordEntry(handle: number, mode: CacheMode, state: BackingState): Promise<void> {
    this.#check()
    if (!CACHE_MODES.includes(mode)) throw new InvalidArgumentError(`cache mode '${String(mode)}' is not one of ${CACHE_MODES.join(', ')}`)
    const n = BACKING_STATES.indexOf(state)
    if (n < 0) throw new InvalidArgumentError(`backing state '${String(state)}' is not one of ${BACKING_STATES.join(', ')}`)
    await this.#control((tag) => this.#native.recordEntry(tag, handle, mode, n))
  }

  /** The set's flash-only volumes (empty for an engine without a cache set). */
  volumes(): VolumeInfo[] {
    return this.#native.volumes().map((v) => ({
      uuid: uuidToString(Buffer.from(v.uuid)),
      label: v.label,
      size: v.size,
    }))
  }

  /**
   * Serves a backing device with no cache set: requests go straight to it, from
   * `dataOffset` (bytes) on. Resolves to its handle.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a data offset past the device or not a
   *   whole sector), `ENOENT`, `EBUSY`, `EACCES`, `CLOSED`.
   */
  async attachPlain(path: string, dataOffset: number, options: Omit<OpenDeviceOptions, 'createSize'> = {}): Promise<number> {
    this.#check()
    if (typeof path !== 'string' || path === '') throw new InvalidArgumentError('path must be a non-empty string')
    checkCount('dataOffset', dataOffset)
    checkRemoteOptions(options)
    try {
      const info = this.#native.attachPlain(path, dataOffset, {
        write: !options.readOnly,
        direct: options.direct,
        exclusive: options.exclusive,
        remoteTimeoutMs: options.remoteTimeoutMs,
        remoteConnections: options.remoteConnections,
      })
      return this.#remember(path, info, false).handle
    } catch (err) {
      throw asUbcacheError(err, path)
    }
  }

  /**
   * What the engine knows of the device `handle` names.
   * @throws {UbcacheError} `INVALID_ARGUMENT` for a handle the engine does not serve.
   */
  device(handle: number): CachedDeviceInfo {
    const d = this.#devices.get(handle)
    if (!d) throw new InvalidArgumentError(`no device ${handle} in this engine`)
    return { ...d }
  }

  /** Handles of the devices the engine serves, in the order they were attached. */
  get handles(): number[] {
    return [...this.#devices.keys()]
  }

  /**
   * Lets go of a device, releasing its exclusive open; a cached device's entry and cached
   * data stay in the set for its next attach. Nothing of it may be in flight, writeback
   * included: pause it first ({@link CacheEngine.setWritebackConfig} with `running: false`)
   * and retry once extents on their way have finished.
   * @throws {UbcacheError} `EBUSY` (requests or writeback in flight), `INVALID_ARGUMENT` (unknown handle), `CLOSED`.
   */
  detach(handle: number): void {
    this.#check()
    this.#queue.submitQueued()
    try {
      this.#native.detach(handle)
    } catch (err) {
      throw asUbcacheError(err)
    }
    this.#devices.delete(handle)
  }

  /**
   * Reads `length` bytes at `offset` of the device `handle` names: from the cache where it
   * holds them, else from the backing device (and, unless the mode is `none`, into the
   * cache). The result is a `Buffer` over the engine memory the data landed in, not a copy;
   * small results may share one `ArrayBuffer`.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `INVALID_ARGUMENT`, `EIO`, `CLOSED`.
   */
  read(handle: number, offset: number, length: number): Promise<Buffer> {
    return deviceRequests.read(this.#queue, this.#check, handle, offset, length)
  }

  /**
   * Reads `buffer.byteLength` bytes at `offset` into `buffer`; resolves to that count. A
   * buffer from {@link CacheEngine.allocBuffer} (from a 4 KiB boundary of it) is read into
   * directly, with no copy and no new memory; any other `Uint8Array` through one copy. Leave
   * the bytes alone until the read has resolved.
   * @throws {UbcacheError} as {@link CacheEngine.read}; `INVALID_ARGUMENT` for bytes a read is still landing in.
   */
  readInto(handle: number, buffer: Uint8Array, offset: number): Promise<number> {
    return deviceRequests.readInto(this.#queue, this.#check, handle, buffer, offset)
  }

  /**
   * A zeroed `Buffer` of `size` bytes of aligned engine memory, for
   * {@link CacheEngine.readInto} to read into again and again without copying.
   * @throws {UbcacheError} `INVALID_ARGUMENT`, `CLOSED`.
   */
  allocBuffer(size: number): Buffer {
    checkCount('size', size)
    if (size > MAX_REQUEST) throw new InvalidArgumentError(`size ${size} exceeds one request's limit (${MAX_REQUEST} bytes)`)
    this.#check()
    return size === 0 ? Buffer.alloc(0) : this.#queue.allocBuffer(size)
  }

  /**
   * Writes all of `data` at `offset` of the device `handle` names, as its cache mode says;
   * resolves once the data is on the cache (writeback) or backing device (other modes)
   * and indexed. It is durable after {@link CacheEngine.flush}, or at once with `fua`.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `INVALID_ARGUMENT`, `EACCES`,
   *   `NO_SPACE`, `EIO`, the set's failure, `CLOSED`.
   */
  write(handle: number, offset: number, data: Uint8Array, options: WriteOptions = {}): Promise<void> {
    return deviceRequests.write(this.#queue, this.#check, handle, offset, data, options.fua === true)
  }

  /**
   * Makes every write to the device `handle` names that completed so far durable: its
   * backing device flushed, and the journal entry covering its cached data written.
   * @throws {UbcacheError} `INVALID_ARGUMENT`, `EIO`, the set's failure, `CLOSED`.
   */
  flush(handle: number): Promise<void> {
    return deviceRequests.flush(this.#queue, this.#check, handle)
  }

  /**
   * Tells the engine `length` bytes at `offset` of the device `handle` names are unused:
   * the cache drops them and the discard goes on to the backing device.
   * @throws {UbcacheError} as {@link CacheEngine.write}.
   */
  discard(handle: number, offset: number, length: number): Promise<void> {
    return deviceRequests.discard(this.#queue, this.#check, handle, offset, length)
  }

  /**
   * Switches a cached device's cache mode; requests made from now on follow it (the
   * backing device's superblock is not changed).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown mode or handle, a device with no cache set), `CLOSED`.
   */
  setCacheMode(handle: number, mode: CacheMode): void {
    this.#check()
    if (!CACHE_MODES.includes(mode)) throw new InvalidArgumentError(`cache mode '${String(mode)}' is not one of ${CACHE_MODES.join(', ')}`)
    this.#queue.submitQueued()
    try {
      this.#native.setCacheMode(handle, mode)
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * A device's cache mode (undefined for a device served with no cache set).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown handle), `CLOSED`.
   */
  cacheMode(handle: number): CacheMode | undefined {
    try {
      return (this.#native.cacheMode(handle) as CacheMode | null) ?? undefined
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * Detaches a cached device from the set for good, as bcache's sysfs `detach`: its
   * requests bypass the cache from now on, its dirty data is written back at full speed
   * (paused or not), then what the set holds of it is dropped and its slot in the UUID
   * table freed; resolves once that is durable. The handle then serves the backing device
   * straight until {@link CacheEngine.detach} lets go of it. `onProgress` is called about
   * every `progressMs` (250) with the dirty sectors left; aborting `signal` cancels the
   * detach while it still writes back (the promise rejects with `CLOSED`, the device stays
   * attached with what it has cached).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown handle, a device with no cache set),
   *   `EBUSY` (already detaching), `CLOSED` (cancelled, or the set closed meanwhile), the
   *   set's failure.
   */
  async detachFromSet(handle: number, options: { signal?: AbortSignal; onProgress?: (dirtySectors: number) => void; progressMs?: number } = {}): Promise<void> {
    this.#check()
    const { signal, onProgress, progressMs = 250 } = options
    checkCount('progressMs', progressMs)
    if (progressMs < 1) throw new InvalidArgumentError(`progressMs must be at least 1, got ${progressMs}`)
    signal?.throwIfAborted()
    const timer = onProgress ? setInterval(() => onProgress(this.dirtySectors(handle) ?? 0), progressMs) : undefined
    const abort = () => {
      try {
        this.#native.detachCancel(handle)
      } catch {
        // Too late to cancel: the data is dropped already; the detach finishes.
      }
    }
    signal?.addEventListener('abort', abort, { once: true })
    try {
      await this.#control((tag) => this.#native.detachBegin(tag, handle))
      onProgress?.(0)
    } catch (err) {
      throw asUbcacheError(err)
    } finally {
      clearInterval(timer)
      signal?.removeEventListener('abort', abort)
    }
  }

  /**
   * A cached device's writeback tunables.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown handle, a device with no cache set), `CLOSED`.
   */
  writebackConfig(handle: number): WritebackConfig {
    try {
      return this.#native.writebackConfig(handle) as WritebackConfig
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * Changes the writeback tunables given (validated together; nothing changes if one is
   * out of range). Takes effect at once: a pause stops new extents, a new rate applies to
   * the next one.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a value out of range, naming the tunable;
   * unknown handle; a device with no cache set), `CLOSED`.
   */
  setWritebackConfig(handle: number, changes: Partial<WritebackConfig>): void {
    this.#check()
    checkWritebackChanges(changes)
    try {
      this.#native.setWritebackConfig(handle, changes)
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * A cached device's request accounting since it was attached (bcache's per-device
   * `stats_*` windows).
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown handle, a device with no cache set), `CLOSED`.
   */
  deviceAccounting(handle: number): Accounting {
    try {
      return this.#native.deviceAccounting(handle)
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /** The cache set's request accounting since it was opened (undefined without a set, or closed). */
  accounting(): Accounting | undefined {
    return this.#native.accounting() ?? undefined
  }

  /**
   * A cached device's bypass tunables.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown handle, a device with no cache set), `CLOSED`.
   */
  bypassConfig(handle: number): BypassConfig {
    try {
      const c = this.#native.bypassConfig(handle)
      return {
        sequentialCutoff: c.sequentialCutoff ?? DEFAULT_BYPASS.sequentialCutoff,
        sequentialCutoffRead: c.sequentialCutoffRead ?? null,
        sequentialCutoffWrite: c.sequentialCutoffWrite ?? null,
        sequentialMerge: c.sequentialMerge ?? DEFAULT_BYPASS.sequentialMerge,
        readahead: c.readahead ?? DEFAULT_BYPASS.readahead,
      }
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * Changes the bypass tunables given (validated together). Takes effect with the next
   * request; the streams seen so far are kept.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a value out of range, naming the tunable;
   * unknown handle; a device with no cache set), `CLOSED`.
   */
  setBypassConfig(handle: number, changes: Partial<BypassConfig>): void {
    this.#check()
    checkBypassChanges(changes)
    try {
      this.#native.setBypassConfig(handle, nativeBypass(changes))
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * Asks for a GC pass now (bcache's `trigger_gc`): it runs in slices between requests;
   * `stats().gcRuns` counts it when done. Does nothing while one runs.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an engine without a set), `CLOSED`.
   */
  triggerGc(): void {
    this.#check()
    try {
      this.#native.triggerGc()
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * The cache set's congestion thresholds.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (an engine without a set), `CLOSED`.
   */
  congestionConfig(): CongestionConfig {
    try {
      return this.#native.congestionConfig()
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * Changes the congestion thresholds given; takes effect with the next cache I/O.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (a bad value, naming the tunable; an engine
   *   without a set), `CLOSED`.
   */
  setCongestionConfig(changes: Partial<CongestionConfig>): void {
    this.#check()
    checkCongestionChanges(changes)
    try {
      this.#native.setCongestionConfig({ ...this.#native.congestionConfig(), ...changes })
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * A cached device's writeback controller state.
   * @throws {UbcacheError} `INVALID_ARGUMENT` (unknown handle, a device with no cache set), `CLOSED`.
   */
  writebackRate(handle: number): WritebackRate {
    try {
      return this.#native.writebackRate(handle)
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /**
   * bcache's `priority_stats` of the cache device (undefined for an engine without a set).
   * Sorts every bucket's prio: for an occasional look, not for every request.
   */
  priorityStats(): PriorityStats | undefined {
    try {
      return this.#native.priorityStats() ?? undefined
    } catch (err) {
      throw asUbcacheError(err)
    }
  }

  /** Counters of the cache set and where it stands (undefined for an engine without one). */
  stats(): CacheSetStats | undefined {
    const s = this.#native.stats()
    if (!s) return undefined
    const failure = this.#native.failure
    return { state: this.#native.state, ...(failure ? { failure: failure[1] } : {}), ...s }
  }

  /** Dirty sectors of a cached device: what writeback still has to copy (undefined for other handles). */
  dirtySectors(handle: number): number | undefined {
    return this.#native.dirtySectors(handle) ?? undefined
  }

  /** Sectors of a cached device that the cache holds (undefined for other handles). */
  cachedSectors(handle: number): number | undefined {
    return this.#native.cachedSectors(handle) ?? undefined
  }

  /** A one-line account of what the set is doing and waiting for, for diagnostics. */
  describe(): string | undefined {
    return this.#native.describe() ?? undefined
  }

  /** What opening the cache set found and did (undefined for an engine without one). */
  openReport(): CacheSetOpenReport | undefined {
    return this.#native.openReport() ?? undefined
  }

  /** Counters of the I/O engine underneath: event-loop wakeups, batches of completions, buffers. */
  engineStats(): IoEngineStats {
    return this.#native.engineStats()
  }

  /**
   * Closes the engine cleanly: requests already made finish, later ones fail with
   * `CLOSED`; the set writes a final checkpoint and marks its journal clean (so the next
   * open loads the checkpoint rather than replaying), and the devices are released.
   * Resolves once all of it is durable; rejects with the set's failure if it failed (the
   * devices are released all the same). Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close()
    return this.#closing
  }

  async #close(): Promise<void> {
    this.#queue.submitQueued()
    let failure: unknown
    try {
      await this.#control((tag) => this.#native.close(tag))
    } catch (err) {
      failure = err
    }
    await this.#queue.slots.whenIdle()
    this.#native.shutdown()
    for (const w of this.#waiting.values()) w.reject(closedError('the cache engine'))
    this.#waiting.clear()
    this.#devices.clear()
    if (failure !== undefined) throw asUbcacheError(failure)
  }
}

/** What {@link CacheEngine} remembers of a flash-only volume's handle. */
function volumeInfo(handle: number, uuid: string, size: number): CachedDeviceInfo {
  return { handle, path: `volume:${uuid}`, size, logicalBlockSize: 512, direct: false, isBlockDevice: false, writable: true, cached: true }
}
