/**
 * What an NBD export serves (see {@link NbdExport}): a cached device or flash-only volume,
 * with requests of any alignment made whole blocks by read-modify-write.
 * @module
 */
import type { WriteOptions } from '../cache-engine'
import type { UbcacheError } from '../errors'
import { ERR } from './protocol'

/**
 * The block device under an export: {@link CachedDevice} and {@link FlashVolume} both are
 * one. Requests to it are whole blocks of `blockSize` inside `size`, and overlapping ones are
 * served in the order they were made.
 */
export interface BlockTarget {
  readonly size: number
  read(offset: number, length: number): Promise<Buffer>
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void>
  flush(): Promise<void>
  discard(offset: number, length: number): Promise<void>
}

/** How an export is made: see {@link NbdExport}. */
export interface ExportInit {
  /** The export name clients ask for. */
  name: string
  /** Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`. */
  description?: string
  target: BlockTarget
  /** Bytes per block of the target. */
  blockSize: number
  /** Writes, trims and zeroing refused with `EPERM`, and `NBD_FLAG_READ_ONLY` advertised. */
  readOnly?: boolean
  /** A discarded range reads as zeros (flash-only volumes): zeroing may discard. */
  discardZeroes?: boolean
}

/** An error for the client: its NBD error number and a message for structured replies and logs. */
export class NbdRequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message)
  }
}

/** The NBD error number for an error of the target. */
export function errnoOf(err: unknown): number {
  if (err instanceof NbdRequestError) return err.errno
  const code = (err as UbcacheError)?.code
  switch (code) {
    case 'NO_SPACE':
      return ERR.ENOSPC
    case 'OUT_OF_RANGE':
    case 'MISALIGNED':
    case 'INVALID_ARGUMENT':
      return ERR.EINVAL
    case 'CLOSED':
      return ERR.ESHUTDOWN
    default:
      return ERR.EIO
  }
}

/** A range held by a read-modify-write from its read until its write is submitted. */
interface Held {
  start: number
  end: number
  release: Promise<void>
}

/** Zeros for `WRITE_ZEROES`, shared and never written to. */
const ZERO_CHUNK = 1 << 20
let zeros: Buffer | undefined

/**
 * One export: a name for a {@link BlockTarget}, and the requests clients make of it with
 * byte offsets and lengths of any alignment.
 *
 * Requests of whole blocks go straight to the target. Others are made whole blocks: a read
 * reads the blocks it touches; a write reads its partial first and last blocks, merges them
 * with its data and writes the blocks whole. From that read until that write is submitted the
 * blocks are held, and any write, trim or zeroing that overlaps them waits, so that none is
 * overwritten by the stale bytes of a merge (the target orders what follows).
 */
export class NbdExport {
  readonly name: string
  readonly description: string
  readonly target: BlockTarget
  readonly blockSize: number
  readonly readOnly: boolean
  readonly #discardZeroes: boolean
  readonly #held: Held[] = []

  constructor(init: ExportInit) {
    this.name = init.name
    this.description = init.description ?? ''
    this.target = init.target
    this.blockSize = init.blockSize
    this.readOnly = init.readOnly === true
    this.#discardZeroes = init.discardZeroes === true
  }

  /** Bytes of the export. */
  get size(): number {
    return this.target.size
  }

  #aligned(offset: number, length: number): boolean {
    return offset % this.blockSize === 0 && length % this.blockSize === 0
  }

  /**
   * What is wrong with a request's range, if anything: past the end is `ENOSPC` for writes
   * and zeroing, `EINVAL` for reads and trims, as the spec says; writes and trims of a
   * read-only export are `EPERM`.
   */
  check(offset: number, length: number, kind: 'read' | 'write' | 'trim'): NbdRequestError | undefined {
    if (offset + length > this.size || offset > this.size) {
      return new NbdRequestError(kind === 'write' ? ERR.ENOSPC : ERR.EINVAL, `${length} bytes at ${offset} pass the end of export '${this.name}' (${this.size} bytes)`)
    }
    if (kind !== 'read' && this.readOnly) return new NbdRequestError(ERR.EPERM, `export '${this.name}' is read-only`)
    return undefined
  }

  /** Reads `length` bytes at `offset`. */
  read(offset: number, length: number): Promise<Buffer> {
    if (this.#aligned(offset, length)) return this.target.read(offset, length)
    const bs = this.blockSize
    const start = offset - (offset % bs)
    const end = Math.ceil((offset + length) / bs) * bs
    return this.target.read(start, end - start).then((b) => b.subarray(offset - start, offset - start + length))
  }

  /** Writes `data` at `offset`. */
  write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    const options = fua ? FUA : undefined
    if (this.#aligned(offset, data.byteLength)) return this.#unheld(offset, offset + data.byteLength, () => this.target.write(offset, data, options))
    return this.#merge(offset, data, options)
  }

  /** Read-modify-write of a write not in whole blocks. */
  async #merge(offset: number, data: Uint8Array, options: WriteOptions | undefined): Promise<void> {
    const bs = this.blockSize
    const start = offset - (offset % bs)
    const end = Math.ceil((offset + data.byteLength) / bs) * bs
    const release = await this.#hold(start, end)
    let write: Promise<void>
    try {
      const whole = Buffer.alloc(end - start)
      const headBlock = start
      const tailBlock = end - bs
      const reads: Promise<void>[] = []
      if (offset !== start) reads.push(this.target.read(headBlock, bs).then((b) => void b.copy(whole, 0)))
      if (offset + data.byteLength !== end && (tailBlock !== headBlock || offset === start)) {
        reads.push(this.target.read(tailBlock, bs).then((b) => void b.copy(whole, tailBlock - start)))
      }
      await Promise.all(reads)
      whole.set(data, offset - start)
      write = this.target.write(start, whole, options)
    } finally {
      release()
    }
    return write
  }

  /** Zeros `length` bytes at `offset`; may discard whole blocks unless `noHole`. */
  async writeZeroes(offset: number, length: number, noHole: boolean, fua: boolean): Promise<void> {
    const bs = this.blockSize
    if (!noHole && this.#discardZeroes) {
      const start = Math.ceil(offset / bs) * bs
      const end = Math.floor((offset + length) / bs) * bs
      if (end > start) {
        const parts: Promise<void>[] = [this.#discardWhole(start, end)]
        if (offset < start) parts.push(this.#zero(offset, start - offset, false))
        if (offset + length > end) parts.push(this.#zero(end, offset + length - end, false))
        await Promise.all(parts)
        if (fua) await this.target.flush()
        return
      }
    }
    await this.#zero(offset, length, fua)
  }

  async #zero(offset: number, length: number, fua: boolean): Promise<void> {
    zeros ??= Buffer.alloc(ZERO_CHUNK)
    const parts: Promise<void>[] = []
    for (let at = offset; at < offset + length; at += ZERO_CHUNK) {
      parts.push(this.write(at, zeros.subarray(0, Math.min(ZERO_CHUNK, offset + length - at)), fua))
    }
    await Promise.all(parts)
  }

  /** Tells the target the whole blocks inside the range are unused (the partial ones are left). */
  trim(offset: number, length: number): Promise<void> {
    const bs = this.blockSize
    const start = Math.ceil(offset / bs) * bs
    const end = Math.floor((offset + length) / bs) * bs
    if (end <= start) return Promise.resolve()
    return this.#discardWhole(start, end)
  }

  #discardWhole(start: number, end: number): Promise<void> {
    return this.#unheld(start, end, () => this.target.discard(start, end - start))
  }

  /** Runs `go` now, or once no held range overlaps [start, end). */
  #unheld(start: number, end: number, go: () => Promise<void>): Promise<void> {
    const wait = this.#held.length ? this.#waitFor(start, end) : undefined
    return wait === undefined ? go() : wait.then(go)
  }

  /** Reads the range into the cache, the data dropped (`NBD_CMD_CACHE`). */
  async cache(offset: number, length: number): Promise<void> {
    const step = 1 << 20
    for (let at = offset; at < offset + length; at += step) await this.read(at, Math.min(step, offset + length - at))
  }

  flush(): Promise<void> {
    return this.target.flush()
  }

  /** Resolves once no held range overlaps [start, end); undefined if none does now. */
  #waitFor(start: number, end: number): Promise<void> | undefined {
    const h = this.#held.find((x) => x.start < end && start < x.end)
    if (h === undefined) return undefined
    return h.release.then(() => this.#waitFor(start, end))
  }

  /** Holds [start, end) once no other hold overlaps it; resolves to its release. */
  async #hold(start: number, end: number): Promise<() => void> {
    for (let wait = this.#waitFor(start, end); wait; wait = this.#waitFor(start, end)) await wait
    let release!: () => void
    const held: Held = { start, end, release: new Promise<void>((r) => (release = r)) }
    this.#held.push(held)
    return () => {
      this.#held.splice(this.#held.indexOf(held), 1)
      release()
    }
  }
}

const FUA: WriteOptions = { fua: true }
