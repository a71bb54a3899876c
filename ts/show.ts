/**
 * Presenting a superblock: the human form of `ubcache show` (bcache-super-show's fields and
 * wording, then ubcache's extra lines) and its `--json` form.
 * @module
 */
import { isCacheVersion, type ParsedSuperblock, REPLACEMENTS } from './superblock'

/** The `--json` form of `ubcache show`. Sizes are in 512-byte sectors. */
export interface SuperblockJson {
  path: string
  version: number
  kind: 'cache' | 'backing'
  csumOk: boolean
  csum: string
  uuid: string
  setUuid: string
  label: string
  blockSize: number
  bucketSize: number
  nbuckets: number
  firstBucket: number
  nrInSet: number
  nrThisDev: number
  journalBuckets: number[]
  dataOffset: number
  cacheMode: string
  state: string
  replacement: string
  discard: boolean
  cacheSync: boolean
  seq: number | string
  lastMount: number
  flags: string
  featureCompat: string
  featureIncompat: string
  featureRoCompat: string
}

const hex = (n: bigint) => `0x${n.toString(16)}`
const safeNumber = (n: bigint) => (n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n.toString())

/** The JSON object `ubcache show --json` prints. */
export function superblockJson(path: string, parsed: ParsedSuperblock): SuperblockJson {
  const { sb } = parsed
  return {
    path,
    version: sb.version,
    kind: isCacheVersion(sb.version) ? 'cache' : 'backing',
    csumOk: parsed.storedCsum === parsed.computedCsum,
    csum: parsed.storedCsum.toString(16).toUpperCase(),
    uuid: sb.uuid,
    setUuid: sb.setUuid,
    label: sb.label,
    blockSize: sb.blockSize,
    bucketSize: sb.bucketSize,
    nbuckets: sb.nbuckets,
    firstBucket: sb.firstBucket,
    nrInSet: sb.nrInSet,
    nrThisDev: sb.nrThisDev,
    journalBuckets: sb.journalBuckets,
    dataOffset: sb.dataOffset,
    cacheMode: sb.cacheMode,
    state: sb.state,
    replacement: sb.replacement,
    discard: sb.discard,
    cacheSync: sb.cacheSync,
    seq: safeNumber(sb.seq),
    lastMount: sb.lastMount,
    flags: hex(sb.flags),
    featureCompat: hex(sb.featureCompat),
    featureIncompat: hex(sb.featureIncompat),
    featureRoCompat: hex(sb.featureRoCompat),
  }
}

// bcache-super-show's names for the backing states.
const STATE_WORDS = { none: 'detached', clean: 'clean', dirty: 'dirty', stale: 'inconsistent' } as const

function ranges(ns: number[]): string {
  if (ns.length === 0) return '(none)'
  const out: string[] = []
  let start = ns[0]
  let prev = ns[0]
  for (const n of [...ns.slice(1), NaN]) {
    if (n === prev + 1) {
      prev = n
      continue
    }
    out.push(start === prev ? `${start}` : `${start}-${prev}`)
    start = prev = n
  }
  return out.join(',')
}

/**
 * The human form of `ubcache show`: bcache-super-show's lines, fields and wording first
 * (so the two can be compared line by line), then the fields it does not print.
 */
export function formatSuperblock(parsed: ParsedSuperblock): string {
  const { sb } = parsed
  const j = superblockJson('', parsed)
  const cache = j.kind === 'cache'
  const lines: [string, string][] = [
    ['sb.magic', 'ok'],
    ['sb.first_sector', '8 [match]'],
    ['sb.csum', `${j.csum} [${j.csumOk ? 'match' : 'expected ' + parsed.computedCsum.toString(16).toUpperCase()}]`],
    ['sb.version', `${sb.version} [${cache ? 'cache device' : 'backing device'}]`],
    ['', ''],
    ['dev.label', sb.label === '' ? '(empty)' : sb.label],
    ['dev.uuid', sb.uuid],
    ['dev.sectors_per_block', `${sb.blockSize}`],
    ['dev.sectors_per_bucket', `${sb.bucketSize}`],
  ]
  const modeIndex = ['writethrough', 'writeback', 'writearound', 'none'].indexOf(sb.cacheMode)
  const stateIndex = ['none', 'clean', 'dirty', 'stale'].indexOf(sb.state)
  const replIndex = REPLACEMENTS.indexOf(sb.replacement)
  if (cache) {
    lines.push(
      ['dev.cache.first_sector', `${sb.firstBucket * sb.bucketSize}`],
      ['dev.cache.cache_sectors', `${(sb.nbuckets - sb.firstBucket) * sb.bucketSize}`],
      ['dev.cache.total_sectors', `${sb.nbuckets * sb.bucketSize}`],
      ['dev.cache.ordered', sb.cacheSync ? 'yes' : 'no'],
      ['dev.cache.discard', sb.discard ? 'yes' : 'no'],
      ['dev.cache.pos', `${sb.nrThisDev}`],
      ['dev.cache.replacement', `${replIndex} [${sb.replacement}]`],
    )
  } else {
    lines.push(
      ['dev.data.first_sector', `${sb.dataOffset}`],
      ['dev.data.cache_mode', `${modeIndex} [${sb.cacheMode}]`],
      ['dev.data.cache_state', `${stateIndex} [${STATE_WORDS[sb.state]}]`],
    )
  }
  lines.push(['', ''], ['cset.uuid', sb.setUuid], ['', ''], ['sb.seq', `${sb.seq}`], [
    'dev.last_mount',
    sb.lastMount ? `${sb.lastMount} [${new Date(sb.lastMount * 1000).toISOString()}]` : '0 [never]',
  ])
  if (cache) {
    lines.push(
      ['dev.cache.nbuckets', `${sb.nbuckets}`],
      ['dev.cache.first_bucket', `${sb.firstBucket}`],
      ['dev.cache.nr_in_set', `${sb.nrInSet}`],
      ['dev.cache.journal_buckets', `${sb.journalBuckets.length} [${ranges(sb.journalBuckets)}]`],
    )
  }
  if (sb.version >= 5) {
    lines.push(['sb.features', `compat ${hex(sb.featureCompat)} ro_compat ${hex(sb.featureRoCompat)} incompat ${hex(sb.featureIncompat)}`])
  }
  return lines.map(([k, v]) => (k === '' ? '' : `${k}${'\t'.repeat(Math.max(1, 3 - Math.floor(k.length / 8)))}${v}`)).join('\n')
}
