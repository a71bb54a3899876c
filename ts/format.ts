/**
 * Formatting devices for bcache, with make-bcache's options and defaults: cache devices
 * (`makeCache`), backing devices (`makeBacking`), or several of both forming one cache set
 * (`makeSet`).
 * @module
 */
import { InvalidArgumentError, UbcacheError } from './errors'
import { type DeviceDescription, describeDevice, readSuperblockPage, writeSuperblock } from './super-io'
import {
  BDEV_DATA_START_DEFAULT,
  CACHE_MODES,
  type CacheMode,
  hasBcacheMagic,
  MAX_CACHES_PER_SET,
  MIN_BUCKETS,
  PAGE_SECTORS,
  REPLACEMENTS,
  type Replacement,
  SB_JOURNAL_BUCKETS,
  SB_LABEL_SIZE,
  SbVersion,
  type Superblock,
} from './superblock'
import { isPowerOfTwo, parseSize, type Size } from './units'
import { isNullUuid, newUuid, uuidToBytes } from './uuid'

/** Options shared by cache and backing devices. */
export interface CommonFormatOptions {
  /**
   * Block size, the smallest unit of cache I/O: bytes or a size string (`4k`). Default: the
   * device's logical block size for block devices, 4 KiB for regular files (as make-bcache).
   * At least the device's logical block size, at most 4 KiB, a power of two.
   */
  blockSize?: Size
  /** Bucket size: bytes or a size string (`512k`). Default 512 KiB. A power of two, at least 4 KiB. */
  bucketSize?: Size
  /** Cache set UUID. Default: a fresh random one. */
  setUuid?: string
  /** Device UUID. Default: a fresh random one. */
  uuid?: string
  /** Label, at most 32 bytes of UTF-8. Default empty. */
  label?: string
  /** Overwrite an existing bcache superblock. Default false: refuse. */
  wipe?: boolean
}

/** Options of {@link makeCache}. */
export interface CacheFormatOptions extends CommonFormatOptions {
  /** Issue discards for buckets before reuse. Default false. */
  discard?: boolean
  /** Which buckets to reclaim first. Default `lru`. */
  replacement?: Replacement
  /** Cache devices in the set and this one's index; default 1 and 0. */
  nrInSet?: number
  nrThisDev?: number
}

/** Options of {@link makeBacking}. */
export interface BackingFormatOptions extends CommonFormatOptions {
  /** Cache mode once attached. Default `writethrough`. */
  cacheMode?: CacheMode
  /** Sector where the data begins (at least 16). Default 16. */
  dataOffset?: number
}

/** Options of {@link makeSet}: cache and backing devices formatted as one cache set. */
export interface SetFormatOptions extends CommonFormatOptions {
  /** Cache device paths. */
  caches?: string[]
  /** Backing device paths; they record the set's UUID so they attach to it. */
  backings?: string[]
  discard?: boolean
  replacement?: Replacement
  cacheMode?: CacheMode
  dataOffset?: number
}

/** A device that was formatted, and the superblock written to it. */
export interface FormattedDevice {
  path: string
  sb: Superblock
}

const DEFAULT_BUCKET_BYTES = 512 * 1024

function sectorsOf(bytes: number, what: string): number {
  if (bytes % 512 !== 0) throw new InvalidArgumentError(`${what}: ${bytes} bytes is not a multiple of 512`)
  return bytes / 512
}

function checkLabel(label: string | undefined): string {
  const l = label ?? ''
  const n = Buffer.byteLength(l, 'utf8')
  if (n > SB_LABEL_SIZE) throw new InvalidArgumentError(`label: ${n} bytes is longer than ${SB_LABEL_SIZE}`)
  if (l.includes('\0')) throw new InvalidArgumentError('label: must not contain NUL')
  return l
}

function checkUuid(text: string | undefined, what: string): string {
  if (text === undefined) return newUuid()
  uuidToBytes(text, what)
  if (isNullUuid(text)) throw new InvalidArgumentError(`${what}: the all-zero UUID is not allowed`)
  return text.length === 32 ? text.replace(/(.{8})(.{4})(.{4})(.{4})(.{12})/, '$1-$2-$3-$4-$5').toLowerCase() : text.toLowerCase()
}

interface Geometry {
  blockSize: number
  bucketSize: number
}

/** Block and bucket sizes in sectors, checked against each other and the device. */
function geometry(opts: CommonFormatOptions, devices: DeviceDescription[]): Geometry {
  const deviceBlock = Math.max(512, ...devices.map((d) => d.logicalBlockSize))
  const anyBlockDevice = devices.some((d) => d.isBlockDevice)
  const blockBytes = opts.blockSize !== undefined ? parseSize(opts.blockSize, 'block size') : anyBlockDevice ? deviceBlock : 4096
  const bucketBytes = opts.bucketSize !== undefined ? parseSize(opts.bucketSize, 'bucket size') : DEFAULT_BUCKET_BYTES
  if (!isPowerOfTwo(blockBytes) || blockBytes < 512) throw new InvalidArgumentError(`block size: ${blockBytes} bytes is not a power of two of at least 512`)
  if (blockBytes > PAGE_SECTORS * 512) throw new InvalidArgumentError(`block size: ${blockBytes} bytes is larger than the page size (4096)`)
  if (blockBytes < deviceBlock) {
    throw new InvalidArgumentError(`block size: ${blockBytes} bytes is smaller than the device's logical block size (${deviceBlock})`)
  }
  if (!isPowerOfTwo(bucketBytes)) throw new InvalidArgumentError(`bucket size: ${bucketBytes} bytes is not a power of two`)
  if (bucketBytes < PAGE_SECTORS * 512) throw new InvalidArgumentError(`bucket size: ${bucketBytes} bytes is below the page size (4096)`)
  if (bucketBytes < blockBytes) throw new InvalidArgumentError(`block size ${blockBytes} is larger than bucket size ${bucketBytes}`)
  const bucketSize = sectorsOf(bucketBytes, 'bucket size')
  if (bucketSize > 0xffff) throw new InvalidArgumentError(`bucket size: ${bucketBytes} bytes is above the largest supported (32 MiB - 512)`)
  return { blockSize: sectorsOf(blockBytes, 'block size'), bucketSize }
}

async function refuseExisting(path: string, wipe: boolean | undefined): Promise<void> {
  if (wipe) return
  const page = await readSuperblockPage(path)
  if (hasBcacheMagic(page)) {
    throw new UbcacheError('ALREADY_BCACHE', `${path}: already a bcache device, overwrite with --wipe-bcache (wipe: true)`)
  }
}

/** A superblock with bcache's defaults in every field but those given. @internal */
export function blankSuperblock(version: number, uuid: string, setUuid: string, label: string, g: Geometry): Superblock {
  return {
    version,
    uuid,
    setUuid,
    label,
    flags: 0n,
    seq: 0n,
    featureCompat: 0n,
    featureIncompat: 0n,
    featureRoCompat: 0n,
    blockSize: g.blockSize,
    bucketSize: g.bucketSize,
    nbuckets: 0,
    nrInSet: 0,
    nrThisDev: 0,
    dataOffset: 0,
    lastMount: 0,
    firstBucket: 0,
    journalBuckets: [],
    cacheSync: false,
    discard: false,
    replacement: 'lru',
    cacheMode: 'writethrough',
    state: 'none',
  }
}

/** The cache superblock for a device, with the journal laid out as the kernel does on first run. */
function cacheSuperblock(path: string, dev: DeviceDescription, g: Geometry, opts: CacheFormatOptions, setUuid: string): Superblock {
  const replacement = opts.replacement ?? 'lru'
  if (!REPLACEMENTS.includes(replacement)) {
    throw new InvalidArgumentError(`cache replacement policy: '${replacement}' is not one of ${REPLACEMENTS.join(', ')}`)
  }
  const nrInSet = opts.nrInSet ?? 1
  const nrThisDev = opts.nrThisDev ?? 0
  if (!Number.isInteger(nrInSet) || nrInSet < 1 || nrInSet > MAX_CACHES_PER_SET || !Number.isInteger(nrThisDev) || nrThisDev < 0 || nrThisDev >= nrInSet) {
    throw new InvalidArgumentError(`cache device ${nrThisDev} of ${nrInSet}: a set has 1 to ${MAX_CACHES_PER_SET} devices, numbered from 0`)
  }
  const nbuckets = Math.floor(dev.sectors / g.bucketSize)
  // make-bcache: the first bucket is the first one wholly after the superblock (sector 23).
  const firstBucket = Math.floor(23 / g.bucketSize) + 1
  // run_cache_set: one journal bucket per 128 buckets, between 2 and 256.
  const keys = Math.min(Math.max(nbuckets >> 7, 2), SB_JOURNAL_BUCKETS)
  if (nbuckets < MIN_BUCKETS || firstBucket + keys > nbuckets) {
    const need = Math.max(MIN_BUCKETS, firstBucket + keys) * g.bucketSize * 512
    throw new InvalidArgumentError(
      `${path}: too small for a cache: ${dev.bytes} bytes hold ${nbuckets} buckets of ${g.bucketSize * 512} bytes, need at least ${MIN_BUCKETS} (${need} bytes)`,
    )
  }
  const sb = blankSuperblock(SbVersion.CDEV_WITH_UUID, checkUuid(opts.uuid, 'uuid'), setUuid, checkLabel(opts.label), g)
  sb.nbuckets = nbuckets
  sb.nrInSet = nrInSet
  sb.nrThisDev = nrThisDev
  sb.firstBucket = firstBucket
  sb.journalBuckets = Array.from({ length: keys }, (_, i) => firstBucket + i)
  sb.discard = opts.discard ?? false
  sb.replacement = replacement
  return sb
}

function backingSuperblock(path: string, dev: DeviceDescription, g: Geometry, opts: BackingFormatOptions, setUuid: string): Superblock {
  const cacheMode = opts.cacheMode ?? 'writethrough'
  if (!CACHE_MODES.includes(cacheMode)) throw new InvalidArgumentError(`cache mode: '${cacheMode}' is not one of ${CACHE_MODES.join(', ')}`)
  const dataOffset = opts.dataOffset ?? BDEV_DATA_START_DEFAULT
  if (!Number.isSafeInteger(dataOffset) || dataOffset < BDEV_DATA_START_DEFAULT) {
    throw new InvalidArgumentError(`data offset: ${dataOffset} must be a whole number of sectors, at least ${BDEV_DATA_START_DEFAULT}`)
  }
  if (dataOffset >= dev.sectors) {
    throw new InvalidArgumentError(`${path}: too small for a backing device with data at sector ${dataOffset} (${dev.sectors} sectors)`)
  }
  const version = dataOffset === BDEV_DATA_START_DEFAULT ? SbVersion.BDEV : SbVersion.BDEV_WITH_OFFSET
  const sb = blankSuperblock(version, checkUuid(opts.uuid, 'uuid'), setUuid, checkLabel(opts.label), g)
  sb.dataOffset = dataOffset
  sb.cacheMode = cacheMode
  return sb
}

/**
 * Formats cache and backing devices as one cache set: every cache device gets the set's UUID
 * and its index in the set; every backing device records the set's UUID so it attaches to it.
 * All devices are checked before any is written.
 */
export async function makeSet(opts: SetFormatOptions): Promise<FormattedDevice[]> {
  const caches = opts.caches ?? []
  const backings = opts.backings ?? []
  if (caches.length === 0 && backings.length === 0) throw new InvalidArgumentError('nothing to format: give at least one cache or backing device')
  if (caches.length > MAX_CACHES_PER_SET) throw new InvalidArgumentError(`${caches.length} cache devices: a set has at most ${MAX_CACHES_PER_SET}`)
  const all = [...caches, ...backings]
  const dup = all.find((p, i) => all.indexOf(p) !== i)
  if (dup !== undefined) throw new InvalidArgumentError(`${dup}: given more than once`)
  if (opts.uuid !== undefined && all.length > 1) throw new InvalidArgumentError('uuid: a device UUID can only be given when formatting one device')
  const devices = all.map((p) => {
    if (!p) throw new InvalidArgumentError('empty device path')
    return describeDevice(p)
  })
  const g = geometry(opts, devices)
  const setUuid = checkUuid(opts.setUuid, 'set UUID')
  const sbs = all.map((path, i) => {
    const dev = devices[i]
    const sb =
      i < caches.length
        ? cacheSuperblock(path, dev, g, { ...opts, nrInSet: caches.length, nrThisDev: i }, setUuid)
        : backingSuperblock(path, dev, g, opts, setUuid)
    return { path, sb }
  })
  for (const { path } of sbs) await refuseExisting(path, opts.wipe)
  for (const { path, sb } of sbs) await writeSuperblock(path, sb)
  return sbs
}

/**
 * Formats `path` as a cache device (make-bcache -C): superblock version 3, journal buckets
 * right after the first bucket.
 * @returns the superblock written.
 * @throws InvalidArgumentError for bad sizes or a device too small for 128 buckets;
 *   UbcacheError `ALREADY_BCACHE` when the device already has a bcache superblock and
 *   `wipe` is not set.
 */
export async function makeCache(path: string, opts: CacheFormatOptions = {}): Promise<Superblock> {
  const dev = describeDevice(path)
  const g = geometry(opts, [dev])
  const sb = cacheSuperblock(path, dev, g, opts, checkUuid(opts.setUuid, 'set UUID'))
  await refuseExisting(path, opts.wipe)
  await writeSuperblock(path, sb)
  return sb
}

/**
 * Formats `path` as a backing device (make-bcache -B): superblock version 1, or 4 with a
 * data offset other than 16 sectors. The data area starts at `dataOffset`.
 * @returns the superblock written.
 */
export async function makeBacking(path: string, opts: BackingFormatOptions = {}): Promise<Superblock> {
  const dev = describeDevice(path)
  const g = geometry(opts, [dev])
  const sb = backingSuperblock(path, dev, g, opts, checkUuid(opts.setUuid, 'set UUID'))
  await refuseExisting(path, opts.wipe)
  await writeSuperblock(path, sb)
  return sb
}
