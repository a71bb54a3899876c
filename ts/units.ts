/**
 * Parsing of human sizes such as `512k`, `4KiB`, `1M`, `4096`.
 * @module
 */
import { InvalidArgumentError } from './errors'

const SUFFIX: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1 << 10,
  kb: 1 << 10,
  kib: 1 << 10,
  m: 1 << 20,
  mb: 1 << 20,
  mib: 1 << 20,
  g: 1 << 30,
  gb: 1 << 30,
  gib: 1 << 30,
  t: 2 ** 40,
  tb: 2 ** 40,
  tib: 2 ** 40,
}

/** A size in bytes: a number, or a string with an optional binary suffix (`512k`, `1MiB`). */
export type Size = number | string

/**
 * Parses a size in bytes. Suffixes are binary (k = 1024). `what` names the option in errors.
 * @throws InvalidArgumentError when the value is not a non-negative whole number of bytes.
 */
export function parseSize(value: Size, what: string): number {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new InvalidArgumentError(`${what}: ${value} is not a whole number of bytes`)
    }
    return value
  }
  const m = /^\s*(\d+)\s*([a-zA-Z]*)\s*$/.exec(String(value))
  const mult = m ? SUFFIX[m[2].toLowerCase()] : undefined
  if (!m || mult === undefined) {
    throw new InvalidArgumentError(`${what}: cannot parse size '${value}' (use e.g. 4096, 4k, 512k, 1M)`)
  }
  const bytes = Number(m[1]) * mult
  if (!Number.isSafeInteger(bytes)) throw new InvalidArgumentError(`${what}: '${value}' is too large`)
  return bytes
}

/** Whether `n` is a positive power of two. */
export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 31
}
