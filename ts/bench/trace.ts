/**
 * Block traces for `replay=` (see {@link readTrace}): blkparse text, SPC, MSR Cambridge CSV
 * and ARC `.lis`.
 * @module
 */
import { readFileSync } from 'node:fs'
import { JobFileError } from './jobfile'

/** One request of a trace: seconds from the trace's start, and what it did. */
export interface TraceIo {
  time: number
  op: 'read' | 'write' | 'trim'
  offset: number
  length: number
}

export type TraceFormat = 'blkparse' | 'spc' | 'msr' | 'lis'

/** The trace formats by what their first data line looks like. */
export function detectFormat(line: string): TraceFormat | undefined {
  const l = line.trim()
  if (/^\d+,\d+\s+\d+\s+\d+\s+\d+\.\d+\s+\d+\s+[A-Z]{1,2}\s+\S+/.test(l)) return 'blkparse'
  if (/^\d{15,},[^,]*,\d+,(Read|Write),\d+,\d+(,\d+)?$/i.test(l)) return 'msr'
  if (/^\d+,\d+,\d+,[rRwW],\d+(\.\d+)?$/.test(l)) return 'spc'
  if (/^\d+\s+\d+\s+\d+\s+\d+$/.test(l)) return 'lis'
  return undefined
}

/**
 * Reads a trace file: the format is recognised from its first data line (`#` and blank
 * lines skipped). Units: blkparse sectors of 512 bytes (queue events, `Q`, where the trace
 * has them; else dispatches, `D`), SPC `ASU,LBA,size,opcode,timestamp` (LBA in sectors, size
 * in bytes; each ASU its own 2^44-byte space), MSR `Timestamp,Hostname,Disk,Type,Offset,
 * Size,ResponseTime` (offset and size in bytes, time in 100 ns ticks; each disk its own
 * space), ARC `.lis` `start count 0 reqno` (`count` blocks from block `start`, a block being
 * `blockSize` bytes; every request a read, one a time unit apart).
 * @throws {JobFileError} naming the file and line of the first line it cannot read.
 */
export function readTrace(path: string, blockSize: number, text: string = readFileSync(path, 'utf8')): TraceIo[] {
  const lines = text.split(/\r?\n/)
  let format: TraceFormat | undefined
  const out: TraceIo[] = []
  let t0: number | undefined
  const anyQ = /\sQ\s/.test(text)
  for (const [i, raw] of lines.entries()) {
    const line = raw.trim()
    if (line === '' || line.startsWith('#')) continue
    format ??= detectFormat(line)
    if (format === undefined) throw new JobFileError(`${path}:${i + 1}: not a trace line of a known format (blkparse, SPC, MSR, ARC .lis): '${line.slice(0, 80)}'`)
    const bad = (): never => {
      throw new JobFileError(`${path}:${i + 1}: not a ${format} line: '${line.slice(0, 80)}'`)
    }
    let io: TraceIo | undefined
    switch (format) {
      case 'blkparse': {
        const f = line.split(/\s+/)
        if (f.length < 7) {
          // blkparse's summary lines at the end.
          continue
        }
        const action = f[5]
        if (action !== (anyQ ? 'Q' : 'D')) continue
        const rwbs = f[6]
        const m = /^(\d+)\s*\+\s*(\d+)/.exec(f.slice(7).join(' '))
        if (!m) continue
        const op = rwbs.includes('D') ? 'trim' : rwbs.includes('W') ? 'write' : rwbs.includes('R') ? 'read' : undefined
        if (op === undefined || Number(m[2]) === 0) continue
        io = { time: Number(f[3]), op, offset: Number(m[1]) * 512, length: Number(m[2]) * 512 }
        break
      }
      case 'spc': {
        const f = line.split(',')
        if (f.length < 5) bad()
        const asu = Number(f[0])
        const lba = Number(f[1])
        const size = Number(f[2])
        if (!(size > 0)) continue
        io = { time: Number(f[4]), op: /w/i.test(f[3]) ? 'write' : 'read', offset: asu * 2 ** 44 + lba * 512, length: size }
        break
      }
      case 'msr': {
        const f = line.split(',')
        if (f.length < 6) bad()
        const size = Number(f[5])
        if (!(size > 0)) continue
        io = { time: Number(f[0]) / 1e7, op: /^w/i.test(f[3]) ? 'write' : 'read', offset: Number(f[2]) * 2 ** 44 + Number(f[4]), length: size }
        break
      }
      case 'lis': {
        const f = line.split(/\s+/).map(Number)
        if (f.length !== 4 || f.some((x) => !Number.isSafeInteger(x) || x < 0)) bad()
        if (f[1] === 0) continue
        io = { time: out.length, op: 'read', offset: f[0] * blockSize, length: f[1] * blockSize }
        break
      }
    }
    if (io === undefined) continue
    if (!Number.isFinite(io.time) || !Number.isSafeInteger(io.offset) || !Number.isSafeInteger(io.length)) bad()
    t0 ??= io.time
    io.time -= t0
    out.push(io)
  }
  if (out.length === 0) throw new JobFileError(`${path}: no requests in the trace`)
  return out
}
