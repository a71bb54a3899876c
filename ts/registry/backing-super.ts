/**
 * A backing device's superblock as the registry keeps it: the copy last written (or read),
 * and changes to it written one at a time, in order, each durable before the next begins
 * (bcache's `bch_write_bdev_super` under `sb_write_mutex`).
 * @internal
 * @module
 */
import { asUbcacheError, type UbcacheError } from '../errors'
import { writeSuperblock } from '../super-io'
import type { Superblock } from '../superblock'

/** See the module docs. */
export class BackingSuper {
  /** The device the superblock belongs to. */
  readonly path: string
  #sb: Superblock
  /** The last write begun: the next one starts after it, whatever its outcome. */
  #tail: Promise<void> = Promise.resolve()

  constructor(path: string, sb: Superblock) {
    this.path = path
    this.#sb = copy(sb)
  }

  /** The superblock as it is on disk (the last write that succeeded, or what was read). */
  get sb(): Readonly<Superblock> {
    return this.#sb
  }

  /**
   * Writes the superblock with `change` applied, once the writes begun before it are done
   * (so it applies to what they wrote), with `seq` bumped; resolves once it is durable, and
   * only then does {@link BackingSuper.sb} show it. Rejects with the write's error, the
   * superblock on disk then being as before (or torn, if the device itself failed).
   */
  update(change: (sb: Superblock) => void): Promise<void> {
    const run = async (): Promise<void> => {
      const next = copy(this.#sb)
      change(next)
      next.seq = this.#sb.seq + 1n
      try {
        await writeSuperblock(this.path, next)
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

function copy(sb: Superblock): Superblock {
  return { ...sb, journalBuckets: [...sb.journalBuckets] }
}
