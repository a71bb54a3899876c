/**
 * Tunables by their bcache sysfs names, as `ubcache set <device> <tunable> <value>` takes
 * them (see {@link setTunable}).
 * @module
 */
import { BYPASS_TUNABLES, CONGESTION_TUNABLES, type Tunable, WRITEBACK_TUNABLES } from '../cache-engine'
import { InvalidArgumentError } from '../errors'
import type { CachedDevice } from '../registry/cached-device'
import type { CacheSet } from '../registry/cache-set'
import { CACHE_MODES, type CacheMode, REPLACEMENTS, type Replacement } from '../superblock'
import { parseSize } from '../units'

type Group = 'writeback' | 'bypass' | 'congestion'

/** Every tunable a cached device (`device`) or cache set (`set`) has, by sysfs name. */
const BY_NAME = new Map<string, { on: 'device' | 'set'; group: Group; key: string; t: Tunable }>()
for (const [group, table, on] of [
  ['writeback', WRITEBACK_TUNABLES, 'device'],
  ['bypass', BYPASS_TUNABLES, 'device'],
  ['congestion', CONGESTION_TUNABLES, 'set'],
] as const) {
  for (const [key, t] of Object.entries(table)) BY_NAME.set(t.name, { on, group, key, t })
}

/** The names `ubcache set` knows, for messages and `--help`. */
export function tunableNames(): { device: string[]; set: string[] } {
  const device = ['cache_mode']
  const set = ['cache_replacement_policy', 'discard']
  for (const [name, x] of BY_NAME) (x.on === 'device' ? device : set).push(name)
  return { device, set }
}

function parseValue(name: string, t: Tunable, raw: string): number | boolean | null {
  if (!t.range) {
    if (['1', 'true', 'on', 'yes'].includes(raw)) return true
    if (['0', 'false', 'off', 'no'].includes(raw)) return false
    throw new InvalidArgumentError(`${name} must be 1 or 0, got '${raw}'`)
  }
  if (t.nullable && (raw === 'none' || raw === 'null' || raw === '')) return null
  if (t.unit === 'bytes') return parseSize(raw, name)
  if (!/^\d+$/.test(raw)) throw new InvalidArgumentError(`${name} must be a whole number, got '${raw}'`)
  return Number(raw)
}

/**
 * Sets the tunable `name` (bcache's sysfs name, e.g. `writeback_percent`, `cache_mode`,
 * `sequential_cutoff`) of a cached device or cache set to `raw` (sizes take suffixes: `4M`).
 * @throws {InvalidArgumentError} naming the tunable for an unknown name, one the target
 *   does not have, or a bad value.
 */
export function setTunable(target: CachedDevice | CacheSet, kind: 'device' | 'set', name: string, raw: string): void {
  if (name === 'cache_mode') {
    if (kind !== 'device') throw new InvalidArgumentError('cache_mode is a tunable of cached devices, not of cache sets')
    if (!CACHE_MODES.includes(raw as CacheMode)) throw new InvalidArgumentError(`cache_mode must be one of ${CACHE_MODES.join(', ')}, got '${raw}'`)
    ;(target as CachedDevice).cacheMode = raw as CacheMode
    return
  }
  if (name === 'cache_replacement_policy' || name === 'discard') {
    if (kind !== 'set') throw new InvalidArgumentError(`${name} is a tunable of cache sets, not of cached devices`)
    const set = target as CacheSet
    if (name === 'discard') {
      const v = parseValue(name, { name }, raw) as boolean
      set.configureCacheDevice({ discard: v })
    } else {
      if (!REPLACEMENTS.includes(raw as Replacement)) throw new InvalidArgumentError(`cache_replacement_policy must be one of ${REPLACEMENTS.join(', ')}, got '${raw}'`)
      set.configureCacheDevice({ replacement: raw as Replacement })
    }
    return
  }
  const x = BY_NAME.get(name)
  if (x === undefined) {
    const names = tunableNames()
    throw new InvalidArgumentError(`unknown tunable '${name}' (cached devices: ${names.device.join(', ')}; cache sets: ${names.set.join(', ')})`)
  }
  if (x.on !== kind) throw new InvalidArgumentError(`${name} is a tunable of ${x.on === 'device' ? 'cached devices' : 'cache sets'}, not of ${kind === 'device' ? 'cached devices' : 'cache sets'}`)
  const change = { [x.key]: parseValue(name, x.t, raw) }
  if (x.group === 'writeback') (target as CachedDevice).configureWriteback(change)
  else if (x.group === 'bypass') (target as CachedDevice).configureBypass(change)
  else (target as CacheSet).configureCongestion(change)
}

/** Every tunable of a cached device or set with its current value, by sysfs name. */
export function readTunables(target: CachedDevice | CacheSet, kind: 'device' | 'set'): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  if (kind === 'device') {
    const d = target as CachedDevice
    out.cache_mode = d.cacheMode
    const wb = d.writebackConfig() as unknown as Record<string, unknown>
    for (const [k, t] of Object.entries(WRITEBACK_TUNABLES)) out[t.name] = wb[k]
    const by = d.bypassConfig() as unknown as Record<string, unknown>
    for (const [k, t] of Object.entries(BYPASS_TUNABLES)) out[t.name] = by[k]
  } else {
    const s = target as CacheSet
    const c = s.congestionConfig() as unknown as Record<string, unknown>
    for (const [k, t] of Object.entries(CONGESTION_TUNABLES)) out[t.name] = c[k]
    const cd = s.cacheDeviceConfig()
    out.cache_replacement_policy = cd.replacement
    out.discard = cd.discard
  }
  return out
}
