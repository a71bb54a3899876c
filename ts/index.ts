/**
 * ubcache: bcache in user space. A fast device caches a slow block device for TypeScript
 * applications; the on-disk format is Linux bcache's.
 *
 * ```ts
 * import { makeCache, makeBacking, Registry } from 'ubcache'
 * const cache = await makeCache('cache.img', { bucketSize: '512k' })
 * await makeBacking('slow.img', { setUuid: cache.setUuid, cacheMode: 'writeback' })
 * const reg = new Registry()
 * await reg.registerCache('cache.img')
 * const dev = await reg.registerBacking('slow.img')
 * await dev.write(0, Buffer.alloc(4096, 1), { fua: true })
 * await reg.close()
 * ```
 * @module ubcache
 */
export {
  type Accounting,
  type AttachOptions,
  type BypassConfig,
  type CachedDeviceInfo,
  type VolumeInfo,
  type ExistingDeviceInfo,
  type CacheDeviceConfig,
  CacheEngine,
  type CacheEngineOptions,
  type CacheSetOpenReport,
  type CacheSetState,
  type CacheSetStats,
  type CongestionConfig,
  DEFAULT_BYPASS,
  DEFAULT_CONGESTION,
  DEFAULT_WRITEBACK,
  type PriorityStats,
  type StatWindow,
  type WriteOptions,
  type WritebackConfig,
  type WritebackRate,
} from './cache-engine'
export { Crc64, crc64, crc64Implementation } from './crc64'
export { BUCKET_MIN, BUCKET_POLICIES, type BucketPolicy, SIM_POLICIES, type SimPolicy, type SimResult, simulateCache } from './sim'
export {
  type EngineChoice,
  IoEngine,
  type EngineMode,
  type IoEngineOptions,
  type IoEngineStats,
  type LatencyModel,
  openDevice,
  type OpenDeviceOptions,
  RawDevice,
} from './device'
export { asUbcacheError, InvalidArgumentError, SuperblockError, type SuperblockCheck, UbcacheError } from './errors'
export {
  type BackingFormatOptions,
  type CacheFormatOptions,
  type CommonFormatOptions,
  type FormattedDevice,
  makeBacking,
  makeCache,
  makeSet,
  type SetFormatOptions,
} from './format'
export { CachedDevice, CacheSet, type ExistingDeviceOptions, FlashVolume, Registry, type RegistryOptions } from './registry'
export { type BlockTarget, type ExportInit, NbdExport, NbdRequestError } from './nbd/export'
export { type Listen, NbdServer, type NbdServerOptions, type TlsOptions } from './nbd/server'
export { Daemon, type DaemonConfig, type ExistingConfig, type ExportConfig } from './daemon/daemon'
export { controlRequest, defaultControlSocket, defaultNbdSocket, runtimeDir } from './daemon/control'
export { type LogFormat, Logger } from './daemon/log'
export { formatSuperblock, superblockJson, type SuperblockJson } from './show'
export { type DeviceDescription, describeDevice, readSuperblock, readSuperblockPage, writeSuperblock } from './super-io'
export {
  BACKING_STATES,
  type BackingState,
  BCACHE_MAGIC,
  BDEV_DATA_START_DEFAULT,
  CACHE_MODES,
  type CacheMode,
  type DeviceGeometry,
  encodeFlags,
  FEATURE_COMPAT_SUPP,
  FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE,
  FEATURE_INCOMPAT_OBSO_LARGE_BUCKET,
  FEATURE_INCOMPAT_SUPP,
  FEATURE_RO_COMPAT_SUPP,
  hasBcacheMagic,
  isBackingVersion,
  isCacheVersion,
  MAX_CACHES_PER_SET,
  MIN_BUCKETS,
  PAGE_SECTORS,
  type ParsedSuperblock,
  parseSuperblock,
  REPLACEMENTS,
  type Replacement,
  SB_FIELD_OFFSETS,
  SB_JOURNAL_BUCKETS,
  SB_LABEL_SIZE,
  SB_OFFSET,
  SB_SECTOR,
  SB_SIZE,
  SbVersion,
  serializeSuperblock,
  type Superblock,
  superblockCsum,
} from './superblock'
export { isPowerOfTwo, parseSize, type Size } from './units'
export { isNullUuid, newUuid, uuidToBytes, uuidToString } from './uuid'
