/**
 * bcache's superblock (`struct cache_sb`): parsing, the kernel's `read_super` checks, and
 * serialization, bit-compatible with Linux bcache and bcache-tools. The byte layout is in
 * `docs/format.md`.
 * @module
 */
import { SuperblockError } from './errors'
import native from './native'
import { uuidToBytes, uuidToString } from './uuid'

/** The superblock lives at sector 8 (byte 4096) of every bcache device. */
export const SB_SECTOR = 8
/** Byte offset of the superblock. */
export const SB_OFFSET = SB_SECTOR * 512
/** Bytes ubcache reads and writes for a superblock (one page; the struct uses 2258 of them). */
export const SB_SIZE = 4096
/** Bytes in the label field. */
export const SB_LABEL_SIZE = 32
/** Most journal buckets a superblock can list in `d[]`. */
export const SB_JOURNAL_BUCKETS = 256
/** Default data offset of a backing device, in sectors. */
export const BDEV_DATA_START_DEFAULT = 16
/** Most cache devices in one cache set. */
export const MAX_CACHES_PER_SET = 8
/** Sectors per page: bucket sizes must be at least this, block sizes at most this. */
export const PAGE_SECTORS = 8
/** Fewest buckets a cache device may have. */
export const MIN_BUCKETS = 128

/** bcache's magic, bytes 24..40 of the superblock. */
export const BCACHE_MAGIC = Buffer.from([
  0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
])

/** Superblock versions the kernel reads. */
export const SbVersion = {
  /** Cache device, original layout. */
  CDEV: 0,
  /** Backing device, data at sector 16. */
  BDEV: 1,
  /** Cache device with a set UUID (what current tools write). */
  CDEV_WITH_UUID: 3,
  /** Backing device with an explicit data offset. */
  BDEV_WITH_OFFSET: 4,
  /** Cache device with feature words. */
  CDEV_WITH_FEATURES: 5,
  /** Backing device with feature words. */
  BDEV_WITH_FEATURES: 6,
} as const

/** Incompatible feature: bucket size stored as a 32-bit value split over two fields (obsolete). */
export const FEATURE_INCOMPAT_OBSO_LARGE_BUCKET = 0x1n
/** Incompatible feature: `bucket_size` holds log2 of the bucket size in sectors. */
export const FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE = 0x2n
/** Incompatible features this implementation understands. */
export const FEATURE_INCOMPAT_SUPP = FEATURE_INCOMPAT_OBSO_LARGE_BUCKET | FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE
/** Compatible features this implementation understands (none are defined). */
export const FEATURE_COMPAT_SUPP = 0n
/** Read-only-compatible features this implementation understands (none are defined). */
export const FEATURE_RO_COMPAT_SUPP = 0n

/**
 * Cache replacement policy of a cache device (flags bits 2..4): bcache's `lru`, `fifo` and
 * `random` (0, 1, 2), and ubcache's `s3fifo` and `tinylfu` (3 and 4: bcache does not know them).
 */
export type Replacement = 'lru' | 'fifo' | 'random' | 's3fifo' | 'tinylfu'
/** Cache mode of a backing device (flags bits 0..3). */
export type CacheMode = 'writethrough' | 'writeback' | 'writearound' | 'none'
/** State of a backing device (flags bits 61..62). */
export type BackingState = 'none' | 'clean' | 'dirty' | 'stale'

export const REPLACEMENTS: readonly Replacement[] = ['lru', 'fifo', 'random', 's3fifo', 'tinylfu']
export const CACHE_MODES: readonly CacheMode[] = ['writethrough', 'writeback', 'writearound', 'none']
/** The all-zero UUID: a backing device attached to no set records it as its set UUID. */
export const NULL_UUID = '00000000-0000-0000-0000-000000000000'

export const BACKING_STATES: readonly BackingState[] = ['none', 'clean', 'dirty', 'stale']

// Field offsets within struct cache_sb (little endian).
const O = {
  csum: 0,
  offset: 8,
  version: 16,
  magic: 24,
  uuid: 40,
  setUuid: 56,
  label: 72,
  flags: 104,
  seq: 112,
  featureCompat: 120,
  featureIncompat: 128,
  featureRoCompat: 136,
  nbuckets: 184, // cache; the same bytes are data_offset on a backing device
  dataOffset: 184,
  blockSize: 192,
  bucketSize: 194,
  nrInSet: 196,
  nrThisDev: 198,
  lastMount: 200,
  firstBucket: 204,
  keys: 206,
  d: 208,
  obsoBucketSizeHi: 208 + 8 * SB_JOURNAL_BUCKETS,
} as const

/** A decoded bcache superblock. Sizes are in 512-byte sectors, as on disk. */
export interface Superblock {
  /** On-disk version: 0, 3, 5 (cache) or 1, 4, 6 (backing). */
  version: number
  /** Device UUID. */
  uuid: string
  /** Cache set UUID (for a backing device: the set it is attached to or meant for). */
  setUuid: string
  /** Up to 32 bytes of UTF-8. */
  label: string
  /** Raw flags word; the decoded fields below are the meaning of its known bits. */
  flags: bigint
  /** Superblock sequence number, bumped on every superblock write. */
  seq: bigint
  /** Feature words (versions 5 and 6 only; zero otherwise). */
  featureCompat: bigint
  featureIncompat: bigint
  featureRoCompat: bigint
  /** Block size in sectors (smallest I/O unit of the cache). */
  blockSize: number
  /** Bucket size in sectors (cache devices; also recorded on backing devices). */
  bucketSize: number
  /** Buckets on this cache device (0 on backing devices). */
  nbuckets: number
  /** Cache devices in the set, and this one's index. */
  nrInSet: number
  nrThisDev: number
  /** Sector where a backing device's data begins. */
  dataOffset: number
  /** Seconds since the epoch at last registration (0 if never). */
  lastMount: number
  /** First bucket usable for data and metadata (the ones before hold the superblock). */
  firstBucket: number
  /** Bucket numbers of the journal, `d[0..keys]`. */
  journalBuckets: number[]
  /** Decoded flags of a cache device. */
  cacheSync: boolean
  discard: boolean
  replacement: Replacement
  /** Decoded flags of a backing device. */
  cacheMode: CacheMode
  state: BackingState
}

/** Checksum and identity facts learnt while parsing, beside the superblock itself. */
export interface ParsedSuperblock {
  sb: Superblock
  /** Checksum stored in the superblock. */
  storedCsum: bigint
  /** Checksum computed over the bytes it covers. */
  computedCsum: bigint
}

/** Device facts the size checks of `read_super` need. */
export interface DeviceGeometry {
  /** Capacity in 512-byte sectors. */
  sectors: number
  /** Logical block size in bytes. */
  logicalBlockSize: number
}

/** Whether `version` is a cache device version. */
export function isCacheVersion(version: number): boolean {
  return version === SbVersion.CDEV || version === SbVersion.CDEV_WITH_UUID || version === SbVersion.CDEV_WITH_FEATURES
}

/** Whether `version` is a backing device version. */
export function isBackingVersion(version: number): boolean {
  return version === SbVersion.BDEV || version === SbVersion.BDEV_WITH_OFFSET || version === SbVersion.BDEV_WITH_FEATURES
}

function bits(word: bigint, shift: number, width: number): number {
  return Number((word >> BigInt(shift)) & ((1n << BigInt(width)) - 1n))
}

function setBits(word: bigint, shift: number, width: number, value: number): bigint {
  const mask = ((1n << BigInt(width)) - 1n) << BigInt(shift)
  return (word & ~mask) | ((BigInt(value) << BigInt(shift)) & mask)
}

// bcache's BITMASK() definitions for cache_sb.flags.
const CACHE_SYNC = [0, 1] as const
const CACHE_DISCARD = [1, 1] as const
const CACHE_REPLACEMENT = [2, 3] as const
const BDEV_CACHE_MODE = [0, 4] as const
const BDEV_STATE = [61, 2] as const

/** The crc64 bcache stores in `csum`: over bytes 8 .. end of `d[keys]`. */
export function superblockCsum(buf: Buffer, keys: number): bigint {
  return native.crc64(buf.subarray(O.offset, O.d + 8 * keys))
}

function isZero(b: Buffer): boolean {
  for (const x of b) if (x !== 0) return false
  return true
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0
}

/**
 * Parses and validates a superblock read from byte 4096 of a device, making every check of
 * the kernel's `read_super` in the kernel's order. `device` enables the checks that need
 * the device's size and logical block size; without it they are skipped.
 * @throws SuperblockError naming the first failed check.
 */
export function parseSuperblock(buf: Buffer, device?: DeviceGeometry): ParsedSuperblock {
  if (buf.length < O.obsoBucketSizeHi + 2) {
    throw new SuperblockError('NOT_BCACHE', 'Not a bcache superblock', `need ${SB_SIZE} bytes, got ${buf.length}`)
  }
  const offset = buf.readBigUInt64LE(O.offset)
  if (offset !== BigInt(SB_SECTOR)) {
    throw new SuperblockError('NOT_BCACHE', 'Not a bcache superblock (bad offset)', `offset field is ${offset}, expected ${SB_SECTOR}`)
  }
  if (!buf.subarray(O.magic, O.magic + 16).equals(BCACHE_MAGIC)) {
    throw new SuperblockError('NOT_BCACHE', 'Not a bcache superblock (bad magic)')
  }
  const keys = buf.readUInt16LE(O.keys)
  if (keys > SB_JOURNAL_BUCKETS) {
    throw new SuperblockError('TOO_MANY_JOURNAL_BUCKETS', 'Too many journal buckets', `${keys} > ${SB_JOURNAL_BUCKETS}`)
  }
  const storedCsum = buf.readBigUInt64LE(O.csum)
  const computedCsum = superblockCsum(buf, keys)
  if (storedCsum !== computedCsum) {
    throw new SuperblockError(
      'BAD_CHECKSUM',
      'Bad checksum',
      `stored ${storedCsum.toString(16).padStart(16, '0')}, computed ${computedCsum.toString(16).padStart(16, '0')}`,
    )
  }
  if (isZero(buf.subarray(O.uuid, O.uuid + 16))) throw new SuperblockError('BAD_UUID', 'Bad UUID', 'device UUID is all zero')

  const version = Number(buf.readBigUInt64LE(O.version))
  const blockSize = buf.readUInt16LE(O.blockSize)
  if (device && blockSize * 512 < device.logicalBlockSize) {
    throw new SuperblockError(
      'BLOCK_SIZE_BELOW_DEVICE',
      'Superblock block size smaller than device block size',
      `${blockSize * 512} < ${device.logicalBlockSize} bytes`,
    )
  }

  const flags = buf.readBigUInt64LE(O.flags)
  const hasFeatures = version === SbVersion.CDEV_WITH_FEATURES || version === SbVersion.BDEV_WITH_FEATURES
  const featureCompat = hasFeatures ? buf.readBigUInt64LE(O.featureCompat) : 0n
  const featureIncompat = hasFeatures ? buf.readBigUInt64LE(O.featureIncompat) : 0n
  const featureRoCompat = hasFeatures ? buf.readBigUInt64LE(O.featureRoCompat) : 0n
  const firstBucket = buf.readUInt16LE(O.firstBucket)
  const journalBuckets: number[] = []
  for (let i = 0; i < keys; i++) journalBuckets.push(Number(buf.readBigUInt64LE(O.d + 8 * i)))

  let dataOffset = 0
  let nbuckets = 0
  let bucketSize = buf.readUInt16LE(O.bucketSize)
  const nrInSet = buf.readUInt16LE(O.nrInSet)
  const nrThisDev = buf.readUInt16LE(O.nrThisDev)

  if (version === SbVersion.BDEV) {
    dataOffset = BDEV_DATA_START_DEFAULT
  } else if (version === SbVersion.BDEV_WITH_OFFSET || version === SbVersion.BDEV_WITH_FEATURES) {
    const raw = buf.readBigUInt64LE(O.dataOffset)
    if (raw < BigInt(BDEV_DATA_START_DEFAULT)) {
      throw new SuperblockError('BAD_DATA_OFFSET', 'Bad data offset', `${raw} < ${BDEV_DATA_START_DEFAULT} sectors`)
    }
    if (raw > BigInt(Number.MAX_SAFE_INTEGER) || (device && raw > BigInt(device.sectors))) {
      throw new SuperblockError('BAD_DATA_OFFSET', 'Bad data offset', `${raw} sectors is past the end of the device`)
    }
    dataOffset = Number(raw)
  } else if (isCacheVersion(version)) {
    if (version === SbVersion.CDEV_WITH_FEATURES) {
      if (featureIncompat & FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE) {
        if (bucketSize > 31) {
          throw new SuperblockError('BAD_BUCKET_SIZE', 'Bad bucket size (not power of 2)', `log2 bucket size ${bucketSize} > 31`)
        }
        bucketSize = 2 ** bucketSize
      } else if (featureIncompat & FEATURE_INCOMPAT_OBSO_LARGE_BUCKET) {
        bucketSize += buf.readUInt16LE(O.obsoBucketSizeHi) * 65536
      }
    }
    const rawBuckets = buf.readBigUInt64LE(O.nbuckets)
    if (rawBuckets > 0x7fffffffffffffffn) {
      throw new SuperblockError('TOO_MANY_BUCKETS', 'Too many buckets', `${rawBuckets}`)
    }
    if (rawBuckets < BigInt(MIN_BUCKETS)) {
      throw new SuperblockError('NOT_ENOUGH_BUCKETS', 'Not enough buckets', `${rawBuckets} < ${MIN_BUCKETS}`)
    }
    if (!isPow2(blockSize)) throw new SuperblockError('BAD_BLOCK_SIZE', 'Bad block size (not power of 2)', `${blockSize} sectors`)
    if (blockSize > PAGE_SECTORS) {
      throw new SuperblockError('BAD_BLOCK_SIZE', 'Bad block size (larger than page size)', `${blockSize} > ${PAGE_SECTORS} sectors`)
    }
    if (!isPow2(bucketSize)) throw new SuperblockError('BAD_BUCKET_SIZE', 'Bad bucket size (not power of 2)', `${bucketSize} sectors`)
    if (bucketSize < PAGE_SECTORS) {
      throw new SuperblockError('BAD_BUCKET_SIZE', 'Bad bucket size (smaller than page size)', `${bucketSize} < ${PAGE_SECTORS} sectors`)
    }
    const needed = BigInt(bucketSize) * rawBuckets
    if (needed > BigInt(Number.MAX_SAFE_INTEGER) || (device && BigInt(device.sectors) < needed)) {
      throw new SuperblockError(
        'DEVICE_TOO_SMALL',
        'Invalid superblock: device too small',
        `${rawBuckets} buckets of ${bucketSize} sectors need ${needed} sectors${device ? `, device has ${device.sectors}` : ''}`,
      )
    }
    nbuckets = Number(rawBuckets)
    if (isZero(buf.subarray(O.setUuid, O.setUuid + 16))) throw new SuperblockError('BAD_UUID', 'Bad UUID', 'cache set UUID is all zero')
    if (!nrInSet || nrInSet <= nrThisDev || nrInSet > MAX_CACHES_PER_SET) {
      throw new SuperblockError(
        'BAD_DEVICE_NUMBER',
        'Bad cache device number in set',
        `device ${nrThisDev} of ${nrInSet} (at most ${MAX_CACHES_PER_SET} per set)`,
      )
    }
    for (let i = 0; i < keys; i++) {
      if (journalBuckets[i] !== firstBucket + i) {
        throw new SuperblockError(
          'JOURNAL_NOT_SEQUENTIAL',
          'Journal buckets not sequential',
          `d[${i}] is ${journalBuckets[i]}, expected ${firstBucket + i}`,
        )
      }
    }
    if (firstBucket + keys > nbuckets) {
      throw new SuperblockError('TOO_MANY_JOURNAL_BUCKETS', 'Too many journal buckets', `first bucket ${firstBucket} + ${keys} > ${nbuckets} buckets`)
    }
    if (firstBucket * bucketSize < 16) {
      throw new SuperblockError(
        'FIRST_BUCKET_TOO_EARLY',
        'Invalid superblock: first bucket comes before end of super',
        `bucket ${firstBucket} starts at sector ${firstBucket * bucketSize}, the superblock ends at sector 16`,
      )
    }
  } else {
    throw new SuperblockError('UNSUPPORTED_VERSION', 'Unsupported superblock version', `${version}`)
  }

  if (hasFeatures) {
    const compat = featureCompat & ~FEATURE_COMPAT_SUPP
    if (compat) throw new SuperblockError('UNSUPPORTED_FEATURE', 'Unsupported compatible feature found', `0x${compat.toString(16)}`)
    const ro = featureRoCompat & ~FEATURE_RO_COMPAT_SUPP
    if (ro) throw new SuperblockError('UNSUPPORTED_FEATURE', 'Unsupported read-only compatible feature found', `0x${ro.toString(16)}`)
    const incompat = featureIncompat & ~FEATURE_INCOMPAT_SUPP
    if (incompat) throw new SuperblockError('UNSUPPORTED_FEATURE', 'Unsupported incompatible feature found', `0x${incompat.toString(16)}`)
  }

  const cache = isCacheVersion(version)
  const labelBytes = buf.subarray(O.label, O.label + SB_LABEL_SIZE)
  const nul = labelBytes.indexOf(0)
  const sb: Superblock = {
    version,
    uuid: uuidToString(buf.subarray(O.uuid, O.uuid + 16)),
    setUuid: uuidToString(buf.subarray(O.setUuid, O.setUuid + 16)),
    label: labelBytes.subarray(0, nul === -1 ? SB_LABEL_SIZE : nul).toString('utf8'),
    flags,
    seq: buf.readBigUInt64LE(O.seq),
    featureCompat,
    featureIncompat,
    featureRoCompat,
    blockSize,
    bucketSize,
    nbuckets,
    nrInSet,
    nrThisDev,
    dataOffset,
    lastMount: buf.readUInt32LE(O.lastMount),
    firstBucket,
    journalBuckets,
    // The flags word means different things on cache and backing devices; the fields of
    // the other kind keep their defaults.
    cacheSync: cache && bits(flags, ...CACHE_SYNC) === 1,
    discard: cache && bits(flags, ...CACHE_DISCARD) === 1,
    replacement: (cache && REPLACEMENTS[bits(flags, ...CACHE_REPLACEMENT)]) || 'lru',
    cacheMode: (!cache && CACHE_MODES[bits(flags, ...BDEV_CACHE_MODE)]) || 'writethrough',
    state: cache ? 'none' : BACKING_STATES[bits(flags, ...BDEV_STATE)],
  }
  return { sb, storedCsum, computedCsum }
}

/**
 * Encodes the decoded flag fields into the flags word, keeping any other bits of `sb.flags`.
 */
export function encodeFlags(sb: Superblock): bigint {
  let f = sb.flags
  if (isCacheVersion(sb.version)) {
    f = setBits(f, ...CACHE_SYNC, sb.cacheSync ? 1 : 0)
    f = setBits(f, ...CACHE_DISCARD, sb.discard ? 1 : 0)
    f = setBits(f, ...CACHE_REPLACEMENT, REPLACEMENTS.indexOf(sb.replacement))
  } else {
    f = setBits(f, ...BDEV_CACHE_MODE, CACHE_MODES.indexOf(sb.cacheMode))
    f = setBits(f, ...BDEV_STATE, BACKING_STATES.indexOf(sb.state))
  }
  return f
}

/**
 * Serializes `sb` into a 4096-byte page to be written at byte 4096, with the checksum
 * filled in. The flags word is rebuilt from the decoded fields. Bucket sizes above 65535
 * sectors need version 5 with the log-large-bucket feature.
 */
export function serializeSuperblock(sb: Superblock): Buffer {
  const buf = Buffer.alloc(SB_SIZE)
  const label = Buffer.from(sb.label, 'utf8')
  if (label.length > SB_LABEL_SIZE) throw new RangeError(`label is ${label.length} bytes, at most ${SB_LABEL_SIZE}`)
  if (sb.journalBuckets.length > SB_JOURNAL_BUCKETS) throw new RangeError(`${sb.journalBuckets.length} journal buckets, at most ${SB_JOURNAL_BUCKETS}`)
  buf.writeBigUInt64LE(BigInt(SB_SECTOR), O.offset)
  buf.writeBigUInt64LE(BigInt(sb.version), O.version)
  BCACHE_MAGIC.copy(buf, O.magic)
  uuidToBytes(sb.uuid).copy(buf, O.uuid)
  uuidToBytes(sb.setUuid, 'setUuid').copy(buf, O.setUuid)
  label.copy(buf, O.label)
  buf.writeBigUInt64LE(encodeFlags(sb), O.flags)
  buf.writeBigUInt64LE(sb.seq, O.seq)
  if (sb.version === SbVersion.CDEV_WITH_FEATURES || sb.version === SbVersion.BDEV_WITH_FEATURES) {
    buf.writeBigUInt64LE(sb.featureCompat, O.featureCompat)
    buf.writeBigUInt64LE(sb.featureIncompat, O.featureIncompat)
    buf.writeBigUInt64LE(sb.featureRoCompat, O.featureRoCompat)
  }
  if (isBackingVersion(sb.version)) {
    if (sb.version !== SbVersion.BDEV) buf.writeBigUInt64LE(BigInt(sb.dataOffset), O.dataOffset)
  } else {
    buf.writeBigUInt64LE(BigInt(sb.nbuckets), O.nbuckets)
  }
  buf.writeUInt16LE(sb.blockSize, O.blockSize)
  let bucketField = sb.bucketSize
  if (sb.version === SbVersion.CDEV_WITH_FEATURES && sb.featureIncompat & FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE) {
    bucketField = Math.log2(sb.bucketSize)
  } else if (sb.version === SbVersion.CDEV_WITH_FEATURES && sb.featureIncompat & FEATURE_INCOMPAT_OBSO_LARGE_BUCKET) {
    buf.writeUInt16LE(Math.floor(sb.bucketSize / 65536), O.obsoBucketSizeHi)
    bucketField = sb.bucketSize % 65536
  }
  if (!Number.isInteger(bucketField) || bucketField > 0xffff) {
    throw new RangeError(`bucket size ${sb.bucketSize} sectors does not fit version ${sb.version} (use version 5 with large buckets)`)
  }
  buf.writeUInt16LE(bucketField, O.bucketSize)
  buf.writeUInt16LE(sb.nrInSet, O.nrInSet)
  buf.writeUInt16LE(sb.nrThisDev, O.nrThisDev)
  buf.writeUInt32LE(sb.lastMount >>> 0, O.lastMount)
  buf.writeUInt16LE(sb.firstBucket, O.firstBucket)
  buf.writeUInt16LE(sb.journalBuckets.length, O.keys)
  sb.journalBuckets.forEach((b, i) => buf.writeBigUInt64LE(BigInt(b), O.d + 8 * i))
  buf.writeBigUInt64LE(superblockCsum(buf, sb.journalBuckets.length), O.csum)
  return buf
}

/** Whether the page at byte 4096 carries bcache's magic (valid or not). */
export function hasBcacheMagic(buf: Buffer): boolean {
  return buf.length >= O.magic + 16 && buf.subarray(O.magic, O.magic + 16).equals(BCACHE_MAGIC)
}

/** Byte offsets of the superblock's fields, for tests and tools that patch raw bytes. */
export const SB_FIELD_OFFSETS = O
