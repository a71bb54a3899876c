// `ubcache bench --report`: one self-contained HTML file, rendered by a real headless browser
// (Debian's chromium): it renders, every chart has data, the page fetches nothing.
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import test from 'ava'
import { cli, tempDir } from './helpers'
import { haveTools } from './nbd-helpers'

const dir = tempDir()

function chromium(args: string[]): { status: number | null; stdout: string } {
  const r = spawnSync('chromium', ['--headless', '--no-sandbox', '--disable-background-networking', '--disable-gpu', '--no-first-run', ...args], { encoding: 'utf8', timeout: 120_000, maxBuffer: 64 << 20 })
  return { status: r.status, stdout: r.stdout }
}

test('the HTML report renders in headless chromium, every chart has data, nothing is fetched', (t) => {
  if (!haveTools('chromium')) return t.pass('chromium missing')
  const report = join(dir, 'report.html')
  const job = join(dir, 'u.fio')
  writeFileSync(
    job,
    `[z]\nioengine=ubcache\ncache=${join(dir, 'c.img')}\nbacking=${join(dir, 'b.img')}\ncache_size=32M\nsize=128M\nbs=4k\niodepth=8\nrw=randread\nrandom_distribution=zipf:1.1\nnorandommap\nruntime=3\ntime_based\n[sim]\nstonewall\nioengine=sim\nbs=4k\ncache_size=2M\nreplay=${join(__dirname, '..', 'bench', 'jobs', 'traces', 'hot-and-scans.lis')}\n`,
  )
  const r = cli('bench', job, '--sweep', '--report', report)
  t.is(r.status, 0, r.stderr)
  const html = readFileSync(report, 'utf8')
  // Self-contained: no reference to anything outside the file, and a policy that forbids fetching.
  t.regex(html, /Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'"/)
  t.notRegex(html, /\b(src|href)\s*=|url\(|@import|<script|<link/i)
  t.true(html.includes('[sim]') && html.includes('replay='), 'the job file is in the report')
  // Charts: IOPS, latency, hit ratio over time, a clat histogram, the simulated comparison,
  // the sim job's hit ratios and its hit-ratio-vs-size curves.
  const netlog = join(dir, 'net.json')
  const dom = chromium([`--log-net-log=${netlog}`, '--dump-dom', `file://${report}`])
  t.is(dom.status, 0)
  const charts = [...dom.stdout.matchAll(/<svg class="chart" data-points="(\d+)"[^>]*aria-label="([^"]+)"/g)]
  t.true(charts.length >= 7, `${charts.length} charts rendered`)
  for (const [, points, label] of charts) t.true(Number(points) > 0, `chart '${label}' has no data`)
  for (const title of ['IOPS over time', 'Mean latency over time', 'Hit ratio over time', 'read completion latency (clat) histogram', 'Hit ratio against cache size']) {
    t.true(charts.some((c) => c[2] === title), `missing chart '${title}'`)
  }
  // Every request chromium made on the page's behalf (requests of the browser itself, such as
  // update checks, have no initiating origin).
  const log = JSON.parse(readFileSync(netlog, 'utf8')) as { constants: { logEventTypes: Record<string, number> }; events: { type: number; params?: { url?: string; initiator?: string } }[] }
  const start = log.constants.logEventTypes.URL_REQUEST_START_JOB
  const fromPage = log.events.filter((e) => e.type === start && e.params?.initiator !== 'not an origin' && e.params?.url !== undefined && !e.params.url.startsWith('file:'))
  t.deepEqual(
    fromPage.map((e) => e.params?.url),
    [],
  )
  // It draws: a screenshot of the page is made and is not blank.
  const png = join(dir, 'report.png')
  t.is(chromium([`--screenshot=${png}`, '--window-size=1000,3000', `file://${report}`]).status, 0)
  t.true(existsSync(png) && statSync(png).size > 20_000, 'a screenshot with content')
})
