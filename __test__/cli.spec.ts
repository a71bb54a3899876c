import { closeSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import test from 'ava'
import { CachedDevice, Registry, SB_FIELD_OFFSETS } from '../ts/index'
import { cli, sparseFile, tempDir } from './helpers'

const dir = tempDir()
const MiB = 1 << 20

/** Exit code 1, exactly one line on stderr, nothing that looks like a stack trace. */
function expectOneLineError(t: import('ava').ExecutionContext, args: string[], pattern: RegExp) {
  const r = cli(...args)
  t.is(r.status, 1, `ubcache ${args.join(' ')}: ${r.stdout}${r.stderr}`)
  const lines = r.stderr.trimEnd().split('\n')
  t.is(lines.length, 1, `one line expected, got:\n${r.stderr}`)
  t.regex(lines[0], pattern)
  t.notRegex(r.stderr, /\n\s+at |Error:/)
}

test('make then show --json prints the documented fields', (t) => {
  const c = sparseFile(dir, 'j-c.img', 128 * MiB)
  const b = sparseFile(dir, 'j-b.img', 32 * MiB)
  const made = cli('make', '-C', c, '-B', b, '--bucket', '256k', '--writeback', '--label', 'L1', '--cset-uuid', '12345678-1234-4234-8234-123456789abc', '--json')
  t.is(made.status, 0, made.stderr)
  const written = JSON.parse(made.stdout)
  t.is(written.length, 2)
  const r = cli('show', '--json', c)
  t.is(r.status, 0, r.stderr)
  const j = JSON.parse(r.stdout)
  for (const key of ['version', 'csumOk', 'uuid', 'setUuid', 'label', 'blockSize', 'bucketSize', 'nbuckets', 'firstBucket', 'nrInSet', 'nrThisDev', 'journalBuckets', 'dataOffset', 'cacheMode', 'state', 'replacement', 'discard', 'cacheSync', 'seq', 'lastMount']) {
    t.true(key in j, `missing ${key}`)
  }
  t.deepEqual(j, written[0])
  t.is(j.version, 3)
  t.true(j.csumOk)
  t.is(j.setUuid, '12345678-1234-4234-8234-123456789abc')
  t.is(j.bucketSize, 512)
  t.is(j.nbuckets, 512)
  t.deepEqual(j.journalBuckets, [1, 2, 3, 4])
  t.is(j.label, 'L1')
  const bj = JSON.parse(cli('show', '--json', b).stdout)
  t.is(bj.version, 1)
  t.is(bj.cacheMode, 'writeback')
  t.is(bj.dataOffset, 16)
  t.is(bj.state, 'none')
  t.is(bj.setUuid, j.setUuid)
})

test('show prints bcache-super-show style text', (t) => {
  const c = sparseFile(dir, 'h-c.img', 64 * MiB)
  t.is(cli('make', '-C', c).status, 0)
  const r = cli('show', c)
  t.is(r.status, 0)
  t.regex(r.stdout, /^sb\.magic\t\tok$/m)
  t.regex(r.stdout, /^sb\.csum\t\t\t[0-9A-F]+ \[match\]$/m)
  t.regex(r.stdout, /^sb\.version\t\t3 \[cache device\]$/m)
  t.regex(r.stdout, /^dev\.cache\.journal_buckets\t2 \[1-2\]$/m)
})

test('example formats a set, writes and reads through it, and reads it again from the warm cache after a restart', (t) => {
  const r = cli('example')
  t.is(r.status, 0, r.stderr)
  t.regex(r.stdout, /cache device .*, set /)
  t.regex(r.stdout, /mode writeback, superblock state dirty, 8192 dirty sectors/)
  const reads = [...r.stdout.matchAll(/read back identical: (\d+) hits, (\d+) misses/g)]
  t.is(reads.length, 2)
  t.is(reads[1][1], '64', 'after the restart every read hits')
  t.is(reads[1][2], '0')
  t.regex(r.stdout, /last shutdown clean: yes/)
  t.regex(r.stdout, /\d+ journal entries/)
  t.regex(r.stdout, /\[backing device\]/)
  t.regex(r.stdout, /dev\.data\.cache_mode\t1 \[writeback\]/)
  t.regex(r.stdout, /8192 sectors written back in [\d.]+ s, 0 dirty sectors left of 8192/)
  t.regex(r.stdout, /closed: the backing superblock says clean/)
  t.regex(r.stdout, /dev\.data\.cache_state\t1 \[clean\]/)
})

test('bad input to make: exit 1 with one line', (t) => {
  const f = sparseFile(dir, 'bad.img', 64 * MiB)
  const small = sparseFile(dir, 'small.img', 32 * MiB)
  const c = sparseFile(dir, 'ok.img', 64 * MiB)
  expectOneLineError(t, ['make'], /give at least one device/)
  expectOneLineError(t, ['make', '-C'], /argument missing|-C/)
  expectOneLineError(t, ['make', '-C', `${dir}/missing.img`], /missing\.img.*(No such file|ENOENT)/i)
  expectOneLineError(t, ['make', '-C', dir], /a directory/)
  expectOneLineError(t, ['make', '-C', small], /too small for a cache.*need at least 128/)
  expectOneLineError(t, ['make', '-C', f, '--bucket', '96k'], /not a power of two/)
  expectOneLineError(t, ['make', '-C', f, '--bucket', '2k'], /below the page size/)
  expectOneLineError(t, ['make', '-C', f, '--bucket', '4k', '--block', '8k'], /larger than (the page size|bucket size)/)
  expectOneLineError(t, ['make', '-B', f, '--bucket', '8k', '--block', '4k', '--discard'], /--discard applies to cache devices/)
  expectOneLineError(t, ['make', '-C', f, '--writeback'], /--writeback applies to backing devices/)
  expectOneLineError(t, ['make', '-C', f, '--data-offset', '64'], /--data-offset applies to backing devices/)
  expectOneLineError(t, ['make', '-C', f, '-B', f], /given more than once/)
  expectOneLineError(t, ['make', '-C', f, '--label', 'x'.repeat(33)], /label: 33 bytes is longer than 32/)
  expectOneLineError(t, ['make', '-C', f, '--cache_replacement_policy', 'mru'], /must be one of lru, fifo, random/)
  expectOneLineError(t, ['make', '-B', f, '--data-offset', 'ten'], /number of sectors/)
  expectOneLineError(t, ['make', '-C', f, '--frobnicate'], /Unknown option '--frobnicate'/)
  expectOneLineError(t, ['make', f], /unexpected argument/)
  // Nothing above wrote a superblock.
  expectOneLineError(t, ['show', f], /Not a bcache superblock/)
  t.is(cli('make', '-C', c).status, 0)
  expectOneLineError(t, ['make', '-C', c], /already a bcache device, overwrite with --wipe-bcache/)
  t.is(cli('make', '-B', c, '--wipe-bcache').status, 0)
})

test('show on bad input: exit 1, one line naming the check', (t) => {
  const plain = sparseFile(dir, 'plain.img', 8 * MiB)
  writeFileSync(`${dir}/text.txt`, 'hello')
  expectOneLineError(t, ['show', plain], /plain\.img: Not a bcache superblock \(bad offset\): offset field is 0, expected 8/)
  expectOneLineError(t, ['show', `${dir}/text.txt`], /Not a bcache superblock/)
  expectOneLineError(t, ['show', `${dir}/nothing`], /nothing.*No such file/)
  expectOneLineError(t, ['show', dir], /a directory/)
  expectOneLineError(t, ['show'], /give exactly one device path/)
  expectOneLineError(t, ['frob'], /unknown command 'frob'/)

  const c = sparseFile(dir, 'corrupt.img', 64 * MiB)
  t.is(cli('make', '-C', c).status, 0)
  // Flip a byte of the label: checksum no longer matches.
  const fd = openSync(c, 'r+')
  writeSync(fd, Buffer.from([0x41]), 0, 1, 4096 + SB_FIELD_OFFSETS.label)
  closeSync(fd)
  expectOneLineError(t, ['show', c], /corrupt\.img: Bad checksum: stored [0-9a-f]+, computed [0-9a-f]+/)
  const j = cli('show', '--json', c)
  t.is(j.status, 1)
  t.is(JSON.parse(j.stdout).error.code, 'BAD_CHECKSUM')
})

test('help prints usage', (t) => {
  const r = cli('help')
  t.is(r.status, 0)
  t.regex(r.stdout, /ubcache make/)
  t.regex(r.stdout, /--wipe-bcache/)
})

test('detach writes the dirty data back, detaches the device (state none), prints JSON; bad arguments get one line', async (t) => {
  const c = sparseFile(dir, 'd-c.img', 64 * MiB)
  const b = sparseFile(dir, 'd-b.img', 16 * MiB)
  t.is(cli('make', '-C', c, '-B', b, '--bucket', '64k', '--writeback').status, 0)
  const reg = new Registry({ writeback: { running: false } })
  await reg.registerCache(c)
  const dev = await reg.registerBacking(b)
  if (!(dev instanceof CachedDevice)) throw new Error('not a cached device')
  const data = Buffer.alloc(MiB)
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i)
  await dev.write(0, data)
  await dev.flush()
  t.is(dev.dirtySectors(), MiB / 512)
  const dataOffset = dev.dataOffset
  await reg.close()
  const r = cli('detach', c, b, '--json')
  t.is(r.status, 0, r.stderr)
  const j = JSON.parse(r.stdout)
  t.true(j.detached)
  // Writeback may have started on an extent while the registry registered the devices.
  t.true(j.dirtySectorsBefore > 0 && j.dirtySectorsBefore <= MiB / 512, String(j.dirtySectorsBefore))
  t.is(j.dirtySectorsLeft, 0)
  const sb = JSON.parse(cli('show', '--json', b).stdout)
  t.is(sb.state, 'none')
  const onDisk = Buffer.alloc(MiB)
  const fd = openSync(b, 'r')
  readSync(fd, onDisk, 0, MiB, dataOffset)
  closeSync(fd)
  t.true(onDisk.equals(data), 'the dirty data is on the backing device')
  // Detached already: not attached to the set any more.
  expectOneLineError(t, ['detach', c, b], /is not attached to the cache set/)
  // One device is the daemon's verb (nbd.spec.ts); three are a usage error.
  expectOneLineError(t, ['detach', c, b, c], /detach takes a cache device and a backing device/)
  expectOneLineError(t, ['detach', c, join(dir, 'missing.img')], /missing\.img/)
})
