/**
 * bcache's checksum, `bch_crc64` (CRC-64/WE), computed natively with SIMD where the CPU has it.
 * @module
 */
import native from './native'

/**
 * CRC-64/WE of `data` (ECMA-182 polynomial, MSB-first, init and xorout all ones): the
 * checksum bcache stores in superblocks, prio buckets and journal entries.
 * `crc64(Buffer.from('123456789')) === 0x62ec59e3f1a4f00an`.
 */
export function crc64(data: Uint8Array): bigint {
  return native.crc64(data)
}

/**
 * Incremental CRC-64/WE for checksums built in pieces: feeding pieces in order with
 * {@link Crc64.update} gives the same {@link Crc64.digest} as {@link crc64} over their
 * concatenation.
 */
export class Crc64 {
  readonly #inner = new native.Crc64()

  /** Adds `data` after everything fed so far; returns `this` for chaining. */
  update(data: Uint8Array): this {
    this.#inner.update(data)
    return this
  }

  /** The checksum of everything fed so far; more may be fed afterwards. */
  digest(): bigint {
    return this.#inner.digest()
  }

  /** Forgets everything fed so far. */
  reset(): this {
    this.#inner.reset()
    return this
  }
}

/** Name of the crc64 kernel selected on this CPU (e.g. `x86-sse-pclmulqdq`). */
export function crc64Implementation(): string {
  return native.crc64Implementation()
}
