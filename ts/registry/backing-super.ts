/**
 * A backing device's superblock as the registry keeps it: the copy last written (or read),
 * and changes to it written one at a time, in order, each durable before the next begins
 * (bcache's `bch_write_bdev_super` under `sb_write_mutex`). It lives on the device
 * ({@link BackingSuper}), or, for a device cached as it is with no superblock, its cache
 * mode and state live in its entry of the set's UUID table ({@link TableSuper}).
 * @internal
 * @module
 */
import type { CacheEngine } from '../cache-engine'
import { asUbcacheError, type UbcacheError } from '../errors'
import { writeSuperblock } from '../super-io'
import { NULL_UUID, type Superblock } from '../superblock'

/** See the module docs. */
export abstract class SuperblockStore {
  /** The device the superblock belongs to. */
  readonly path: string
  #sb: Superblock
  /** The last write begun: the next one starts after it, whatever its outcome. */
  #tail: Promise<void> = Promise.resolve()

  constructor(path: string, sb: Superblock) {
    this.path = path
    this.#sb = copy(sb)
  }

  /** True when the superblock is on the device itself. */
  abstract readonly onDevice: boolean

  /** Where `next` goes; resolves once it is durable. */
  protected abstract write(next: Superblock): Promise<void>

  /** The device is now attached to a set's engine as `handle` (undefined: no longer). */
  attached(_engine: CacheEngine | undefined, _handle?: number): void {}

  /** The superblock as it is on disk (the last write that succeeded, or what was read). */
  get sb(): Readonly<Superblock> {
    return this.#sb
  }

  /**
   * Writes the superblock with `change` applied, once the writes begun before it are done
   * (so it applies to what they wrote), with `seq` bumped; resolves once it is durable, and
   * only then does {@link SuperblockStore.sb} show it. Rejects with the write's error, the
   * superblock on disk then being as before (or torn, if the device itself failed).
   */
  update(change: (sb: Superblock) => void): Promise<void> {
    const run = async (): Promise<void> => {
      const next = copy(this.#sb)
      change(next)
      next.seq = this.#sb.seq + 1n
      try {
        await this.write(next)
      } catch (err) {
        throw asUbcacheError(err, this.path) as UbcacheError
      }
      this.#sb = next
    }
    const p = this.#tail.then(run)
    this.#tail = p.catch(() => undefined)
    return p
  }

  /** Resolves once every write begun so far has finished, whatever its outcome. */
  idle(): Promise<void> {
    return this.#tail
  }
}

/** A superblock on the backing device, at sector 8 as bcache has it. */
export class BackingSuper extends SuperblockStore {
  readonly onDevice = true

  protected write(next: Superblock): Promise<void> {
    return writeSuperblock(this.path, next)
  }
}

/**
 * The superblock of a device with none: kept in memory, its cache mode and state recorded
 * in the device's UUID-table entry while a set serves it (the set itself records the state
 * at a clean close). Detached from its set (state `none`), the entry is gone and nothing is
 * recorded anywhere: the device is a plain disk.
 */
export class TableSuper extends SuperblockStore {
  readonly onDevice = false
  #engine: CacheEngine | undefined
  #handle = -1

  override attached(engine: CacheEngine | undefined, handle = -1): void {
    this.#engine = engine
    this.#handle = handle
  }

  protected async write(next: Superblock): Promise<void> {
    // Detached, or its set closed: the entry is gone, or the set recorded the state itself.
    if (!this.#engine || next.setUuid === NULL_UUID || next.state === 'none') return
    await this.#engine.recordEntry(this.#handle, next.cacheMode, next.state)
  }
}

function copy(sb: Superblock): Superblock {
  return { ...sb, journalBuckets: [...sb.journalBuckets] }
}
