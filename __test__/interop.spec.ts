// Interop with bcache-tools, both ways: what make-bcache writes ubcache reads with every
// field equal to what bcache-super-show prints; what ubcache writes bcache-super-show
// accepts with "csum [match]" and the same fields.
import test from 'ava'
import { cli, have, mustHaveTools, run, sparseFile, superShowFields, tempDir } from './helpers'

const dir = tempDir()
const tools = have('make-bcache') && have('bcache-super-show')
const MiB = 1 << 20

function superShow(path: string): Map<string, string> {
  const r = run('bcache-super-show', [path])
  if (r.status !== 0) throw new Error(`bcache-super-show ${path} failed: ${r.stderr || r.stdout}`)
  return superShowFields(r.stdout)
}

/** bcache-super-show escapes label bytes as %XX. */
const unescapeLabel = (s: string) => (s === '(empty)' ? '' : decodeURIComponent(s))

function compareWithSuperShow(t: import('ava').ExecutionContext, path: string) {
  const theirs = superShow(path)
  const human = cli('show', path)
  t.is(human.status, 0, human.stderr)
  const ours = superShowFields(human.stdout)
  t.true(theirs.size >= 10, `bcache-super-show printed ${theirs.size} fields`)
  for (const [key, value] of theirs) {
    if (key === 'dev.label') t.is(unescapeLabel(value), ours.get(key) === '(empty)' ? '' : ours.get(key), `${path} ${key}`)
    else t.is(ours.get(key), value, `${path} ${key}`)
  }
  t.is(theirs.get('sb.csum')?.endsWith('[match]'), true)
  const json = JSON.parse(cli('show', '--json', path).stdout)
  t.true(json.csumOk)
  t.is(json.uuid, theirs.get('dev.uuid'))
  t.is(json.setUuid, theirs.get('cset.uuid'))
  t.is(json.blockSize, Number(theirs.get('dev.sectors_per_block')))
  t.is(json.bucketSize, Number(theirs.get('dev.sectors_per_bucket')))
  t.is(json.label, unescapeLabel(theirs.get('dev.label') ?? ''))
  if (json.kind === 'cache') {
    t.is(json.firstBucket * json.bucketSize, Number(theirs.get('dev.cache.first_sector')))
    t.is(json.nbuckets * json.bucketSize, Number(theirs.get('dev.cache.total_sectors')))
    t.is(json.nrThisDev, Number(theirs.get('dev.cache.pos')))
    t.is(json.discard, theirs.get('dev.cache.discard') === 'yes')
    t.is(json.cacheSync, theirs.get('dev.cache.ordered') === 'yes')
    t.is(json.replacement, /\[(\w+)\]/.exec(theirs.get('dev.cache.replacement') ?? '')?.[1])
  } else {
    t.is(json.dataOffset, Number(theirs.get('dev.data.first_sector')))
    t.is(json.cacheMode, /\[(\w+)\]/.exec(theirs.get('dev.data.cache_mode') ?? '')?.[1])
  }
  return json
}

const variants: { bucket: string; block: string; offset?: number; policy?: string; extra?: string[] }[] = [
  { bucket: '512k', block: '4k' },
  { bucket: '64k', block: '512', offset: 2048, policy: 'fifo', extra: ['--writeback'] },
  { bucket: '1M', block: '2k', offset: 64, extra: ['--discard'] },
  { bucket: '8k', block: '1k', policy: 'lru' },
  { bucket: '4M', block: '4k', offset: 16 },
]

function flags(v: (typeof variants)[number]): string[] {
  return [
    '--bucket', v.bucket,
    '--block', v.block,
    ...(v.offset !== undefined ? ['--data-offset', String(v.offset)] : []),
    ...(v.policy ? [`--cache_replacement_policy=${v.policy}`] : []),
    ...(v.extra ?? []),
  ]
}

test.serial('make-bcache output is read by ubcache with every field equal', (t) => {
  if (!tools) {
    if (mustHaveTools) t.fail('bcache-tools missing in CI')
    else t.pass('bcache-tools not installed; skipped')
    return
  }
  variants.forEach((v, i) => {
    const c = sparseFile(dir, `mb-c${i}.img`, 512 * MiB)
    const b = sparseFile(dir, `mb-b${i}.img`, 64 * MiB)
    const r = run('make-bcache', ['-C', c, '-B', b, ...flags(v)])
    t.is(r.status, 0, r.stderr)
    const cj = compareWithSuperShow(t, c)
    const bj = compareWithSuperShow(t, b)
    t.is(cj.setUuid, bj.setUuid)
    t.is(bj.dataOffset, v.offset ?? 16)
  })
})

test.serial('ubcache output is accepted by bcache-super-show with csum match', (t) => {
  if (!tools) {
    if (mustHaveTools) t.fail('bcache-tools missing in CI')
    else t.pass('bcache-tools not installed; skipped')
    return
  }
  const labels = ['', 'ssd0', 'a label, 32 bytes long, exactly!']
  variants.forEach((v, i) => {
    const c = sparseFile(dir, `ub-c${i}.img`, 512 * MiB)
    const b = sparseFile(dir, `ub-b${i}.img`, 64 * MiB)
    const label = labels[i % labels.length]
    const r = cli('make', '-C', c, '-B', b, ...flags(v), ...(label ? ['--label', label] : []))
    t.is(r.status, 0, r.stderr)
    const cj = compareWithSuperShow(t, c)
    compareWithSuperShow(t, b)
    t.is(cj.label, label)
    t.is(superShow(c).get('sb.version'), '3 [cache device]')
  })
})
