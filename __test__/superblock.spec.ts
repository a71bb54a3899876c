import test from 'ava'
import {
  BCACHE_MAGIC,
  FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE,
  FEATURE_INCOMPAT_OBSO_LARGE_BUCKET,
  parseSuperblock,
  SB_FIELD_OFFSETS as O,
  SbVersion,
  serializeSuperblock,
  type Superblock,
  superblockCsum,
  SuperblockError,
} from '../ts/index'
import native = require('../ts/native')
import { uuidToString } from '../ts/uuid'

function cacheSb(over: Partial<Superblock> = {}): Superblock {
  return {
    version: SbVersion.CDEV_WITH_UUID,
    uuid: '0f0e0d0c-0b0a-4908-8706-050403020100',
    setUuid: 'a1a2a3a4-b1b2-4c1c-8d1d-e1e2e3e4e5e6',
    label: 'fast',
    flags: 0n,
    seq: 7n,
    featureCompat: 0n,
    featureIncompat: 0n,
    featureRoCompat: 0n,
    blockSize: 8,
    bucketSize: 1024,
    nbuckets: 512,
    nrInSet: 1,
    nrThisDev: 0,
    dataOffset: 0,
    lastMount: 1700000000,
    firstBucket: 1,
    journalBuckets: [1, 2, 3, 4],
    cacheSync: true,
    discard: true,
    replacement: 'fifo',
    cacheMode: 'writethrough',
    state: 'none',
    ...over,
  }
}

function backingSb(over: Partial<Superblock> = {}): Superblock {
  return cacheSb({
    version: SbVersion.BDEV_WITH_OFFSET,
    label: 'slow',
    nbuckets: 0,
    nrInSet: 0,
    firstBucket: 0,
    journalBuckets: [],
    dataOffset: 2048,
    cacheSync: false,
    discard: false,
    replacement: 'lru',
    cacheMode: 'writeback',
    state: 'dirty',
    ...over,
  })
}

const device = { sectors: 512 * 1024, logicalBlockSize: 512 }

/** Patches raw bytes then fixes the checksum, so the check under test is the one that fails. */
function patched(sb: Superblock, patch: (buf: Buffer) => void, fixCsum = true): Buffer {
  const buf = serializeSuperblock(sb)
  patch(buf)
  if (fixCsum) buf.writeBigUInt64LE(superblockCsum(buf, Math.min(buf.readUInt16LE(O.keys), 256)), O.csum)
  return buf
}

function expectCheck(t: import('ava').ExecutionContext, buf: Buffer, code: string, text: RegExp, dev = device) {
  const err = t.throws(() => parseSuperblock(buf, dev), { instanceOf: SuperblockError })
  t.is(err?.code, code)
  t.regex(err?.message ?? '', text)
}

const roundTrips: [string, Superblock][] = [
  ['v0 cache', cacheSb({ version: SbVersion.CDEV })],
  ['v1 backing', backingSb({ version: SbVersion.BDEV, dataOffset: 16 })],
  ['v3 cache', cacheSb()],
  ['v4 backing', backingSb()],
  ['v5 cache, log large bucket', cacheSb({ version: SbVersion.CDEV_WITH_FEATURES, featureIncompat: FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE, bucketSize: 1 << 17, nbuckets: 200 })],
  ['v5 cache, obsolete large bucket', cacheSb({ version: SbVersion.CDEV_WITH_FEATURES, featureIncompat: FEATURE_INCOMPAT_OBSO_LARGE_BUCKET, bucketSize: 1 << 16, nbuckets: 200 })],
  ['v6 backing', backingSb({ version: SbVersion.BDEV_WITH_FEATURES, state: 'stale', cacheMode: 'none' })],
  ['256 journal buckets', cacheSb({ nbuckets: 40000, bucketSize: 8, journalBuckets: Array.from({ length: 256 }, (_, i) => 3 + i), firstBucket: 3 })],
  ['random replacement, writearound', cacheSb({ replacement: 'random', label: 'x'.repeat(32) })],
]

for (const [name, sb] of roundTrips) {
  test(`round trip: ${name}`, (t) => {
    const dev = { sectors: 200 * (1 << 17), logicalBlockSize: 512 }
    const { sb: back, storedCsum, computedCsum } = parseSuperblock(serializeSuperblock(sb), dev)
    t.is(storedCsum, computedCsum)
    const expected = { ...sb, flags: back.flags }
    if (sb.version === SbVersion.BDEV) expected.dataOffset = 16
    t.deepEqual(back, expected)
    // Serializing what was parsed gives the same bytes.
    t.deepEqual(serializeSuperblock(back), serializeSuperblock(sb))
  })
}

test('flags bits sit where bcache puts them', (t) => {
  const cache = parseSuperblock(serializeSuperblock(cacheSb({ cacheSync: true, discard: true, replacement: 'random' })), device).sb
  t.is(cache.flags, 0b1011n)
  const backing = parseSuperblock(serializeSuperblock(backingSb({ cacheMode: 'writearound', state: 'clean' })), device).sb
  t.is(backing.flags, (1n << 61n) | 2n)
  // Unknown flag bits survive a round trip.
  const odd = parseSuperblock(serializeSuperblock(cacheSb({ flags: 1n << 40n })), device).sb
  t.is(odd.flags & (1n << 40n), 1n << 40n)
})

test('layout: magic at 24, offset field 8, keys at 206, journal at 208', (t) => {
  const buf = serializeSuperblock(cacheSb())
  t.deepEqual(buf.subarray(24, 40), BCACHE_MAGIC)
  t.is(buf.readBigUInt64LE(8), 8n)
  t.is(buf.readUInt16LE(206), 4)
  t.is(buf.readBigUInt64LE(208), 1n)
  t.is(buf.readBigUInt64LE(184), 512n)
  t.is(buf.readUInt16LE(192), 8)
  t.is(buf.readUInt16LE(194), 1024)
})

test('not bcache: bad offset field', (t) => {
  expectCheck(t, patched(cacheSb(), (b) => b.writeBigUInt64LE(9n, O.offset), false), 'NOT_BCACHE', /bad offset/)
})

test('not bcache: bad magic, or an all-zero page', (t) => {
  expectCheck(t, patched(cacheSb(), (b) => (b[O.magic + 3] ^= 1)), 'NOT_BCACHE', /bad magic/)
  const zeros = Buffer.alloc(4096)
  zeros.writeBigUInt64LE(8n, 8)
  expectCheck(t, zeros, 'NOT_BCACHE', /bad magic/)
  expectCheck(t, Buffer.alloc(100), 'NOT_BCACHE', /Not a bcache superblock/)
})

test('too many journal buckets in keys', (t) => {
  expectCheck(t, patched(cacheSb(), (b) => b.writeUInt16LE(257, O.keys), false), 'TOO_MANY_JOURNAL_BUCKETS', /Too many journal buckets/)
})

test('bad checksum', (t) => {
  expectCheck(t, patched(cacheSb(), (b) => (b[O.label] ^= 0x20), false), 'BAD_CHECKSUM', /Bad checksum: stored [0-9a-f]{16}, computed/)
  // Bytes past d[keys] are not covered by the checksum.
  const buf = serializeSuperblock(cacheSb())
  buf[O.d + 8 * 4 + 3] = 0xff
  t.notThrows(() => parseSuperblock(buf, device))
})

test('bad UUID: zero device UUID, zero set UUID on a cache', (t) => {
  expectCheck(t, patched(cacheSb(), (b) => b.fill(0, O.uuid, O.uuid + 16)), 'BAD_UUID', /Bad UUID: device/)
  expectCheck(t, patched(cacheSb(), (b) => b.fill(0, O.setUuid, O.setUuid + 16)), 'BAD_UUID', /Bad UUID: cache set/)
  // A backing device without a set is fine.
  t.notThrows(() => parseSuperblock(patched(backingSb(), (b) => b.fill(0, O.setUuid, O.setUuid + 16)), device))
})

test('block size smaller than the device block size', (t) => {
  expectCheck(t, serializeSuperblock(cacheSb({ blockSize: 1 })), 'BLOCK_SIZE_BELOW_DEVICE', /smaller than device block size/, {
    sectors: device.sectors,
    logicalBlockSize: 4096,
  })
})

test('bad data offset', (t) => {
  expectCheck(t, serializeSuperblock(backingSb({ dataOffset: 15 })), 'BAD_DATA_OFFSET', /Bad data offset/)
  expectCheck(t, serializeSuperblock(backingSb({ version: 6, dataOffset: 3 })), 'BAD_DATA_OFFSET', /Bad data offset/)
  expectCheck(t, serializeSuperblock(backingSb({ dataOffset: device.sectors + 1 })), 'BAD_DATA_OFFSET', /past the end/)
})

test('unsupported version', (t) => {
  for (const v of [2, 7, 1000]) {
    expectCheck(t, patched(cacheSb(), (b) => b.writeBigUInt64LE(BigInt(v), O.version)), 'UNSUPPORTED_VERSION', /Unsupported superblock version/)
  }
})

test('too many buckets / not enough buckets', (t) => {
  expectCheck(t, patched(cacheSb(), (b) => b.writeBigUInt64LE(1n << 63n, O.nbuckets)), 'TOO_MANY_BUCKETS', /Too many buckets/)
  expectCheck(t, serializeSuperblock(cacheSb({ nbuckets: 127 })), 'NOT_ENOUGH_BUCKETS', /Not enough buckets: 127 < 128/)
})

test('bad block size and bad bucket size', (t) => {
  expectCheck(t, serializeSuperblock(cacheSb({ blockSize: 3 })), 'BAD_BLOCK_SIZE', /not power of 2/)
  expectCheck(t, serializeSuperblock(cacheSb({ blockSize: 16 })), 'BAD_BLOCK_SIZE', /larger than page size/)
  expectCheck(t, serializeSuperblock(cacheSb({ bucketSize: 1000 })), 'BAD_BUCKET_SIZE', /not power of 2/)
  expectCheck(t, serializeSuperblock(cacheSb({ bucketSize: 4, blockSize: 1 })), 'BAD_BUCKET_SIZE', /smaller than page size/)
  expectCheck(
    t,
    patched(cacheSb({ version: 5, featureIncompat: FEATURE_INCOMPAT_LOG_LARGE_BUCKET_SIZE }), (b) => b.writeUInt16LE(40, O.bucketSize)),
    'BAD_BUCKET_SIZE',
    /log2 bucket size 40/,
  )
})

test('device too small for its buckets', (t) => {
  expectCheck(t, serializeSuperblock(cacheSb()), 'DEVICE_TOO_SMALL', /device too small.*device has 1000/, { sectors: 1000, logicalBlockSize: 512 })
})

test('bad cache device number in set', (t) => {
  for (const [nrInSet, nrThisDev] of [[0, 0], [2, 2], [9, 0], [1, 5]]) {
    expectCheck(t, serializeSuperblock(cacheSb({ nrInSet, nrThisDev })), 'BAD_DEVICE_NUMBER', /Bad cache device number in set/)
  }
  t.notThrows(() => parseSuperblock(serializeSuperblock(cacheSb({ nrInSet: 8, nrThisDev: 7 })), device))
})

test('journal buckets not sequential, or past the end', (t) => {
  expectCheck(t, serializeSuperblock(cacheSb({ journalBuckets: [1, 2, 4] })), 'JOURNAL_NOT_SEQUENTIAL', /d\[2\] is 4, expected 3/)
  expectCheck(t, serializeSuperblock(cacheSb({ journalBuckets: [2, 3] })), 'JOURNAL_NOT_SEQUENTIAL', /not sequential/)
  const many = Array.from({ length: 200 }, (_, i) => 1 + i)
  expectCheck(t, serializeSuperblock(cacheSb({ nbuckets: 150, journalBuckets: many })), 'TOO_MANY_JOURNAL_BUCKETS', /first bucket 1 \+ 200 > 150/)
})

test('first bucket before the end of the superblock', (t) => {
  expectCheck(t, serializeSuperblock(cacheSb({ firstBucket: 1, bucketSize: 8, journalBuckets: [1, 2] })), 'FIRST_BUCKET_TOO_EARLY', /first bucket comes before end of super/)
  expectCheck(t, serializeSuperblock(cacheSb({ firstBucket: 0, journalBuckets: [] })), 'FIRST_BUCKET_TOO_EARLY', /first bucket/)
})

test('unknown feature bits are refused, known ones accepted', (t) => {
  const v5 = { version: SbVersion.CDEV_WITH_FEATURES }
  expectCheck(t, serializeSuperblock(cacheSb({ ...v5, featureIncompat: 0x4n })), 'UNSUPPORTED_FEATURE', /Unsupported incompatible feature found: 0x4/)
  expectCheck(t, serializeSuperblock(cacheSb({ ...v5, featureCompat: 0x1n })), 'UNSUPPORTED_FEATURE', /Unsupported compatible feature/)
  expectCheck(t, serializeSuperblock(cacheSb({ ...v5, featureRoCompat: 0x8n })), 'UNSUPPORTED_FEATURE', /read-only compatible/)
  expectCheck(t, serializeSuperblock(backingSb({ version: 6, featureIncompat: 1n << 40n })), 'UNSUPPORTED_FEATURE', /incompatible/)
  // Versions without feature words ignore those bytes.
  const v3 = patched(cacheSb(), (b) => b.writeBigUInt64LE(0xffn, O.featureIncompat))
  t.is(parseSuperblock(v3, device).sb.featureIncompat, 0n)
})

test('labels: UTF-8 up to 32 bytes; longer refused on write', (t) => {
  const sb = parseSuperblock(serializeSuperblock(cacheSb({ label: 'caché-ü' })), device).sb
  t.is(sb.label, 'caché-ü')
  t.throws(() => serializeSuperblock(cacheSb({ label: 'x'.repeat(33) })), { message: /label is 33 bytes/ })
})

// ts/superblock.ts is the full parser and writer; the Rust core reads the cache superblock
// fields it needs on its own (crates/core/src/cache_set/superblock.rs), patches CACHE_SYNC
// and seq, and formats pages for its tests. These hold the two against each other.
const cacheCases = roundTrips.filter(([, sb]) => sb.version === SbVersion.CDEV || sb.version === SbVersion.CDEV_WITH_UUID || sb.version === SbVersion.CDEV_WITH_FEATURES)

for (const [name, sb] of cacheCases) {
  test(`Rust and TypeScript agree: ${name}`, (t) => {
    const page = serializeSuperblock(sb)
    const dev = { sectors: 200 * (1 << 17), logicalBlockSize: 512 }
    const ts = parseSuperblock(page, dev).sb
    const rs = native.parseCacheSuperblock(page)
    t.is(uuidToString(rs.setUuid), ts.setUuid)
    t.is(rs.flags, ts.flags)
    t.is(rs.seq, ts.seq)
    t.deepEqual([rs.nbuckets, rs.blockSize, rs.bucketSize, rs.nrInSet, rs.nrThisDev, rs.firstBucket], [ts.nbuckets, ts.blockSize, ts.bucketSize, ts.nrInSet, ts.nrThisDev, ts.firstBucket])
    t.deepEqual(rs.journalBuckets, ts.journalBuckets)
    // The core's CACHE_SYNC patch: TypeScript reads it back with only those fields changed.
    const synced = parseSuperblock(native.markCacheSuperblockSync(page), dev).sb
    t.deepEqual(synced, { ...ts, cacheSync: true, flags: ts.flags | 1n, seq: ts.seq + 1n })
  })
}

test('Rust and TypeScript agree: a page the core formats parses in TypeScript as formatted', (t) => {
  for (const [nbuckets, bucketSize, blockSize, journal] of [
    [512, 1024, 8, 4],
    [40000, 8, 1, 256],
    [300, 128, 8, 2],
  ]) {
    const uuid = Buffer.alloc(16, 0x11)
    const setUuid = Buffer.alloc(16, 0x22)
    const page = native.formatCacheSuperblock(uuid, setUuid, nbuckets, bucketSize, blockSize, journal)
    const ts = parseSuperblock(page, { sectors: nbuckets * bucketSize + 64, logicalBlockSize: 512 }).sb
    const first = Math.floor(23 / bucketSize) + 1
    t.is(ts.version, SbVersion.CDEV_WITH_UUID)
    t.is(ts.uuid, uuidToString(uuid))
    t.is(ts.setUuid, uuidToString(setUuid))
    t.deepEqual([ts.nbuckets, ts.bucketSize, ts.blockSize, ts.firstBucket, ts.cacheSync], [nbuckets, bucketSize, blockSize, first, false])
    t.deepEqual(ts.journalBuckets, Array.from({ length: journal }, (_, i) => first + i))
    // And the core reads back what TypeScript writes of it.
    const again = native.parseCacheSuperblock(serializeSuperblock(ts))
    t.deepEqual(again.journalBuckets, ts.journalBuckets)
  }
})

test('Rust and TypeScript agree on what is not a valid cache superblock', (t) => {
  const page = serializeSuperblock(cacheSb())
  const badMagic = Buffer.from(page)
  badMagic[24] ^= 1
  const badCsum = Buffer.from(page)
  badCsum[190] ^= 1
  for (const [buf, rust] of [
    [badMagic, /not a bcache device/],
    [badCsum, /checksum/],
  ] as const) {
    t.throws(() => parseSuperblock(buf, device), { instanceOf: SuperblockError })
    t.throws(() => native.parseCacheSuperblock(buf), { message: rust })
  }
})
