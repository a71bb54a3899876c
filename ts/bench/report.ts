/**
 * `ubcache bench --report out.html`: one self-contained HTML file (inline SVG charts, no
 * script, nothing fetched at view time) with a run's figures (see {@link htmlReport}).
 * @module
 */
import type { IoReport } from './io-run'
import type { SimReport } from './sim-run'

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf']

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;')
}

interface Series {
  name: string
  points: [number, number][]
}

/** A line chart as inline SVG; `data-points` counts the points drawn (the tests read it). */
function lineChart(title: string, xLabel: string, yLabel: string, series: Series[], opts: { logX?: boolean; yMax?: number } = {}): string {
  const W = 640
  const H = 300
  const L = 60
  const R = 150
  const T = 30
  const B = 45
  const all = series.flatMap((s) => s.points)
  const points = all.length
  const fx = (x: number): number => (opts.logX ? Math.log10(Math.max(x, 1e-12)) : x)
  const xs = all.map((p) => fx(p[0]))
  const x0 = Math.min(...xs, 0)
  const x1 = Math.max(...xs, x0 + 1e-9)
  const y1 = opts.yMax ?? Math.max(...all.map((p) => p[1]), 1e-9) * 1.05
  const px = (x: number): number => L + ((fx(x) - x0) / (x1 - x0 || 1)) * (W - L - R)
  const py = (y: number): number => H - B - (y / y1) * (H - T - B)
  let svg = `<svg class="chart" data-points="${points}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${esc(title)}">`
  svg += `<text x="${W / 2}" y="18" text-anchor="middle" class="title">${esc(title)}</text>`
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" class="axis"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" class="axis"/>`
  for (let i = 0; i <= 4; i++) {
    const y = (y1 * i) / 4
    svg += `<text x="${L - 6}" y="${py(y) + 4}" text-anchor="end" class="tick">${fmt(y)}</text><line x1="${L}" y1="${py(y)}" x2="${W - R}" y2="${py(y)}" class="grid"/>`
  }
  for (let i = 0; i <= 4; i++) {
    const v = x0 + ((x1 - x0) * i) / 4
    const x = opts.logX ? 10 ** v : v
    svg += `<text x="${px(x)}" y="${H - B + 16}" text-anchor="middle" class="tick">${fmt(x)}</text>`
  }
  svg += `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle" class="label">${esc(xLabel)}</text>`
  svg += `<text x="14" y="${(T + H - B) / 2}" text-anchor="middle" class="label" transform="rotate(-90 14 ${(T + H - B) / 2})">${esc(yLabel)}</text>`
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length]
    if (s.points.length) svg += `<polyline fill="none" stroke="${c}" stroke-width="2" points="${s.points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(' ')}"/>`
    for (const p of s.points.length <= 40 ? s.points : []) svg += `<circle cx="${px(p[0]).toFixed(1)}" cy="${py(p[1]).toFixed(1)}" r="2.5" fill="${c}"/>`
    svg += `<rect x="${W - R + 12}" y="${T + i * 18}" width="12" height="12" fill="${c}"/><text x="${W - R + 30}" y="${T + i * 18 + 10}" class="legend">${esc(s.name)}</text>`
  })
  return svg + '</svg>'
}

/** A bar chart (a histogram) as inline SVG. */
function barChart(title: string, bars: { label: string; value: number }[]): string {
  const W = 640
  const H = 260
  const L = 60
  const B = 60
  const T = 30
  const max = Math.max(...bars.map((b) => b.value), 1)
  const bw = (W - L - 20) / Math.max(bars.length, 1)
  let svg = `<svg class="chart" data-points="${bars.filter((b) => b.value > 0).length}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${esc(title)}">`
  svg += `<text x="${W / 2}" y="18" text-anchor="middle" class="title">${esc(title)}</text>`
  bars.forEach((b, i) => {
    const h = (b.value / max) * (H - T - B)
    const x = L + i * bw
    svg += `<rect x="${x + 1}" y="${H - B - h}" width="${Math.max(1, bw - 2)}" height="${h}" fill="${COLORS[0]}"><title>${esc(b.label)}: ${b.value}</title></rect>`
    if (bars.length <= 12) svg += `<text x="${x + bw / 2}" y="${H - B - h - 4}" text-anchor="middle" class="tick">${fmt(b.value)}</text>`
    if (bars.length <= 24 || i % 2 === 0) svg += `<text x="${x + bw / 2}" y="${H - B + 14}" text-anchor="end" class="tick" transform="rotate(-45 ${x + bw / 2} ${H - B + 14})">${esc(b.label)}</text>`
  })
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - 10}" y2="${H - B}" class="axis"/>`
  return svg + '</svg>'
}

function fmt(v: number): string {
  if (v === 0) return '0'
  const a = Math.abs(v)
  if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`
  if (a >= 1e4) return `${(v / 1e3).toFixed(0)}k`
  if (a >= 100) return v.toFixed(0)
  if (a >= 1) return v.toFixed(1)
  return v.toFixed(3)
}

function usLabel(ns: number): string {
  return ns >= 1e6 ? `${(ns / 1e6).toFixed(ns >= 1e7 ? 0 : 1)}ms` : ns >= 1e3 ? `${(ns / 1e3).toFixed(ns >= 1e4 ? 0 : 1)}us` : `${ns}ns`
}

/** The report of a run: every job's charts, then the job file. */
export function htmlReport(title: string, jobFile: string, ios: IoReport[], sims: SimReport[]): string {
  let body = ''
  for (const r of ios) {
    body += `<section><h2>${esc(r.job)} <small>ioengine=${r.engine}, iodepth ${r.iodepth}, ${r.numjobs} job(s)</small></h2>`
    const secs = r.runtimeMs / 1000
    body += '<table><tr><th></th><th>IOPS</th><th>MiB/s</th><th>clat avg (us)</th><th>clat p99 (us)</th></tr>'
    for (const [name, d] of [['read', r.read], ['write', r.write]] as const) {
      if (d.ios === 0) continue
      body += `<tr><td>${name}</td><td>${fmt(d.ios / secs)}</td><td>${(d.bytes / secs / 2 ** 20).toFixed(1)}</td><td>${(d.clat.mean / 1e3).toFixed(1)}</td><td>${(d.clat.percentile(99) / 1e3).toFixed(1)}</td></tr>`
    }
    body += '</table>'
    if (r.cache) body += `<p>Cache: ${r.cache.hits} hits, ${r.cache.misses} misses, hit ratio ${(r.cache.hitRatio * 100).toFixed(2)}% (per block ${(r.cache.blockHitRatio * 100).toFixed(2)}%), ${r.cache.bypassHits + r.cache.bypassMisses} bypassed.</p>`
    const tl = r.timeline
    body += lineChart('IOPS over time', 'seconds', 'IOPS', [
      { name: 'read', points: tl.map((p) => [p.t, p.readIops]) },
      { name: 'write', points: tl.map((p) => [p.t, p.writeIops]) },
    ])
    body += lineChart('Mean latency over time', 'seconds', 'microseconds', [{ name: 'latency', points: tl.map((p) => [p.t, p.meanLatUs]) }])
    if (r.cache) {
      body += lineChart('Hit ratio over time', 'seconds', 'hit ratio', [{ name: 'ubcache', points: tl.filter((p) => p.hitRatio !== null).map((p) => [p.t, p.hitRatio as number]) }], { yMax: 1 })
    }
    for (const [name, d] of [['read', r.read], ['write', r.write]] as const) {
      if (d.ios === 0) continue
      body += barChart(`${name} completion latency (clat) histogram`, d.clat.histogram().map((b) => ({ label: usLabel(b.fromNs), value: b.count })))
    }
    if (r.cache?.simulated) {
      const s = r.cache.simulated
      body += barChart(`Hit ratio on the same reads at ${s.cacheBlocks} blocks`, [{ label: 'ubcache', value: r.cache.blockHitRatio }, ...Object.entries(s.hitRatio).map(([p, v]) => ({ label: p, value: v }))])
    }
    body += '</section>'
  }
  for (const r of sims) {
    body += `<section><h2>${esc(r.job)} <small>ioengine=sim, ${r.requests} requests, ${r.accesses} block accesses</small></h2>`
    body += `<p>At ${r.cacheBlocks} blocks: ${r.policies.map((p) => `${p.policy} ${(p.hitRatio * 100).toFixed(2)}%`).join(', ')}.</p>`
    body += barChart(`Hit ratio at ${r.cacheBlocks} blocks`, r.policies.map((p) => ({ label: p.policy, value: p.hitRatio })))
    if (r.sweep) {
      body += lineChart(
        'Hit ratio against cache size',
        `cache size (blocks of ${r.blockSize} bytes, log scale)`,
        'hit ratio',
        r.policies.map((p) => ({ name: p.policy, points: (r.sweep ?? []).map((x) => [x.cacheBlocks, x.hitRatio[p.policy]] as [number, number]) })),
        { logX: true, yMax: 1 },
      )
    }
    body += '</section>'
  }
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>${esc(title)}</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:980px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}small{color:#666;font-weight:normal}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
svg.chart{display:block;margin:12px 0;background:#fafafa;border:1px solid #eee}
.title{font-size:14px;font-weight:600}.tick{font-size:11px;fill:#555}.label{font-size:12px;fill:#333}.legend{font-size:12px}
.axis{stroke:#333}.grid{stroke:#e5e5e5}pre{background:#f4f4f4;padding:10px;overflow:auto}
</style></head><body>
<h1>${esc(title)}</h1>
<p>Made by ubcache bench on ${esc(new Date().toISOString())}.</p>
${body}
<section><h2>Job file</h2><pre>${esc(jobFile)}</pre></section>
</body></html>
`
}
