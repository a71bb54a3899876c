/**
 * Flash-only volumes of a cache set (see {@link FlashVolume}).
 * @module
 */
import type { WriteOptions } from '../cache-engine'
import type { CacheSet } from './cache-set'

/**
 * A flash-only volume (bcache's flash-only device, `bcache_flash_dev`): a thin volume that
 * lives only in its cache set's cache device, made by {@link CacheSet.createVolume} and
 * found again when the set is registered after a restart ({@link CacheSet.volumes}).
 *
 * It reads and writes like a {@link CachedDevice} in writeback mode with nothing behind it:
 * what was never written (or was discarded) reads as zeros, writes stay in the cache (dirty,
 * never written back), and {@link FlashVolume.flush} makes them durable. Its size may exceed
 * the cache: space is taken as data is written, and a write that finds the set full (95%
 * of its buckets in use) fails with `NO_SPACE`.
 */
export class FlashVolume {
  /** Its UUID in the set's UUID table. */
  readonly uuid: string
  /** Its label (up to 32 bytes). */
  readonly label: string
  /** Its size in bytes. */
  readonly size: number
  /** The set it lives in. */
  readonly set: CacheSet
  readonly #handle: number

  /** @internal Volumes are made by {@link CacheSet.createVolume} and found by {@link CacheSet.volumes}. */
  constructor(set: CacheSet, handle: number, uuid: string, label: string, size: number) {
    this.set = set
    this.#handle = handle
    this.uuid = uuid
    this.label = label
    this.size = size
  }

  /**
   * Reads `length` bytes at `offset` (whole blocks of the set): zeros where nothing was written.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `EIO`, `CLOSED`.
   */
  read(offset: number, length: number): Promise<Buffer> {
    return this.set._engine.read(this.#handle, offset, length)
  }

  /**
   * Writes `data` at `offset` (whole blocks) into the cache; durable after
   * {@link FlashVolume.flush}, or at once with `fua`.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `NO_SPACE` (the set is full), `EIO`, `CLOSED`.
   */
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.set._engine.write(this.#handle, offset, data, options)
  }

  /**
   * Makes every write completed before it durable (a journal entry covering them).
   * @throws {UbcacheError} `EIO`, `CLOSED`.
   */
  flush(): Promise<void> {
    return this.set._engine.flush(this.#handle)
  }

  /**
   * Drops `length` bytes at `offset` (whole blocks): they read as zeros, and their cache
   * space comes back at the next GC.
   * @throws {UbcacheError} `MISALIGNED`, `OUT_OF_RANGE`, `CLOSED`.
   */
  discard(offset: number, length: number): Promise<void> {
    return this.set._engine.discard(this.#handle, offset, length)
  }

  /** Bytes of the volume the cache holds now (what was written and not discarded). */
  cachedBytes(): number {
    return (this.set._engine.dirtySectors(this.#handle) ?? 0) * 512
  }
}
