/**
 * Typed errors. Every error ubcache throws is an {@link UbcacheError} (or a subclass) with a
 * stable `code` to branch on; the message names the device and what is wrong with it.
 * @module
 */

/** Base class of every error ubcache throws. */
export class UbcacheError extends Error {
  /** Stable machine-readable code, e.g. `BAD_CHECKSUM`, `ENOENT`, `INVALID_ARGUMENT`. */
  readonly code: string

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'UbcacheError'
    this.code = code
  }
}

/**
 * Codes of the superblock checks, one per check of the kernel's `read_super`, plus the
 * feature-word checks of superblock versions 5 and 6.
 */
export type SuperblockCheck =
  | 'NOT_BCACHE'
  | 'TOO_MANY_JOURNAL_BUCKETS'
  | 'BAD_CHECKSUM'
  | 'BAD_UUID'
  | 'BLOCK_SIZE_BELOW_DEVICE'
  | 'BAD_DATA_OFFSET'
  | 'UNSUPPORTED_VERSION'
  | 'UNSUPPORTED_FEATURE'
  | 'TOO_MANY_BUCKETS'
  | 'NOT_ENOUGH_BUCKETS'
  | 'BAD_BLOCK_SIZE'
  | 'BAD_BUCKET_SIZE'
  | 'DEVICE_TOO_SMALL'
  | 'BAD_DEVICE_NUMBER'
  | 'JOURNAL_NOT_SEQUENTIAL'
  | 'FIRST_BUCKET_TOO_EARLY'

/** A superblock failed one of the checks the kernel's `read_super` makes. */
export class SuperblockError extends UbcacheError {
  declare readonly code: SuperblockCheck
  /** The kernel's wording of the failed check, e.g. `Bad checksum`. */
  readonly check: string
  /** What exactly was wrong (values found and expected), if known. */
  readonly detail?: string
  /** The device or file whose superblock failed, if known. */
  readonly device?: string

  constructor(code: SuperblockCheck, check: string, detail?: string, device?: string) {
    super(code, [device, check, detail].filter(Boolean).join(': '))
    this.name = 'SuperblockError'
    this.check = check
    this.detail = detail
    this.device = device
  }

  /** The same failure, with the device named in the message. */
  withDevice(device: string): SuperblockError {
    return new SuperblockError(this.code, this.check, this.detail, device)
  }
}

/** An argument that can never be valid (bad size, conflicting options, label too long...). */
export class InvalidArgumentError extends UbcacheError {
  constructor(message: string) {
    super('INVALID_ARGUMENT', message)
    this.name = 'InvalidArgumentError'
  }
}

/** Wraps anything thrown by Node or the native addon into an {@link UbcacheError}. */
export function asUbcacheError(err: unknown, context?: string): UbcacheError {
  if (err instanceof UbcacheError) return err
  const e = err as { code?: unknown; message?: unknown }
  const code = typeof e?.code === 'string' ? e.code : 'EIO'
  let message = typeof e?.message === 'string' ? e.message : String(err)
  if (context && !message.includes(context)) message = `${context}: ${message}`
  return new UbcacheError(code, message, { cause: err })
}
