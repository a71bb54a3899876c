/**
 * Stats and tunables in Prometheus's text exposition format (see {@link prometheusText}).
 * @module
 */
import type { StatWindow } from '../cache-engine'
import type { Registry } from '../registry'
import type { CachedDevice } from '../registry/cached-device'

/** `cacheHits` → `cache_hits`. */
function snake(s: string): string {
  return s.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)
}

function labels(l: Record<string, string>): string {
  const parts = Object.entries(l).map(([k, v]) => `${k}="${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`)
  return parts.length ? `{${parts.join(',')}}` : ''
}

/** Counters of sets (`CacheSetStats` fields that only grow); the rest are gauges. */
const COUNTER = /(Bytes|Entries|Preflushes|Checkpoints|Writes|Runs|Passes|Buckets|Sectors|Dropped|Promotions|Hits|Misses|Bypasses|Cutoffs|Collisions|Errors|Overlaps|Waits)$/

/**
 * The registry's sets and devices as metrics: each set's counters and gauges
 * (`ubcache_set_…{set}`), each cached device's total accounting, dirty and cached sectors
 * and numeric tunables (`ubcache_device_…{device,export,set}`), NBD connections.
 */
export function prometheusText(registry: Registry, exportOf: (d: CachedDevice) => string | undefined, connections: { export: string | undefined }[]): string {
  const families = new Map<string, { type: string; help: string; samples: string[] }>()
  const add = (name: string, type: string, help: string, l: Record<string, string>, v: number): void => {
    if (!Number.isFinite(v)) return
    let f = families.get(name)
    if (f === undefined) families.set(name, (f = { type, help, samples: [] }))
    f.samples.push(`${name}${labels(l)} ${v}`)
  }
  for (const s of registry.sets) {
    const l = { set: s.uuid }
    const st = s.stats() as unknown as Record<string, unknown>
    add('ubcache_set_up', 'gauge', 'Whether the cache set is running (1) or not (0).', l, st.state === 'running' ? 1 : 0)
    for (const [k, v] of Object.entries(st)) {
      if (typeof v !== 'number') continue
      const counter = COUNTER.test(k) && !k.startsWith('movingGcLast')
      add(`ubcache_set_${snake(k)}${counter ? '_total' : ''}`, counter ? 'counter' : 'gauge', `Cache set ${k} (CacheSetStats.${k}).`, l, v)
    }
    const cfg = s.congestionConfig()
    add('ubcache_set_congested_read_threshold_us', 'gauge', 'Tunable congested_read_threshold_us.', l, cfg.readThresholdUs)
    add('ubcache_set_congested_write_threshold_us', 'gauge', 'Tunable congested_write_threshold_us.', l, cfg.writeThresholdUs)
  }
  for (const d of registry.devices) {
    const l = { device: d.path, export: exportOf(d) ?? '', set: d.set?.uuid ?? '' }
    add('ubcache_device_dirty_sectors', 'gauge', 'Dirty sectors of the cached device in its cache set.', l, d.dirtySectors() ?? 0)
    add('ubcache_device_cached_sectors', 'gauge', 'Sectors of the cached device its cache set holds.', l, d.cachedSectors() ?? 0)
    const total: StatWindow | undefined = d.accounting()?.total
    if (total) {
      for (const [k, v] of Object.entries(total)) {
        const ratio = k === 'cacheHitRatio'
        add(`ubcache_device_${snake(k)}${ratio ? '' : '_total'}`, ratio ? 'gauge' : 'counter', `bcache stats_total/${snake(k)} of the cached device.`, l, v)
      }
    }
    const rate = d.writebackRate()
    if (rate) add('ubcache_device_writeback_rate', 'gauge', 'Writeback rate (sectors per second).', l, rate.rate)
    const wb = d.writebackConfig()
    add('ubcache_device_writeback_percent', 'gauge', 'Tunable writeback_percent.', l, wb.percent)
    add('ubcache_device_writeback_running', 'gauge', 'Tunable writeback_running.', l, wb.running ? 1 : 0)
    add('ubcache_device_sequential_cutoff_bytes', 'gauge', 'Tunable sequential_cutoff.', l, d.bypassConfig().sequentialCutoff)
  }
  const byExport = new Map<string, number>()
  for (const c of connections) if (c.export !== undefined) byExport.set(c.export, (byExport.get(c.export) ?? 0) + 1)
  add('ubcache_nbd_connections', 'gauge', 'NBD connections in transmission.', {}, connections.length)
  for (const [e, n] of byExport) add('ubcache_nbd_export_connections', 'gauge', 'NBD connections per export.', { export: e }, n)
  let out = ''
  for (const [name, f] of families) out += `# HELP ${name} ${f.help}\n# TYPE ${name} ${f.type}\n${f.samples.join('\n')}\n`
  return out
}
