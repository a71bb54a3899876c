/**
 * The transmission phase of one NBD connection: requests parsed as they arrive, many in
 * flight, each answered as it completes (see {@link Transmission}).
 * @module
 */
import type { Duplex } from 'node:stream'
import { errnoOf, type NbdExport, NbdRequestError } from './export'
import {
  CHUNK_BYTES,
  CMD,
  CMD_FLAG,
  commandName,
  ERR,
  errorChunk,
  MAX_PAYLOAD,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_BYTES,
  REQUEST_MAGIC,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './protocol'

/** Flags each command may carry; any other is `EINVAL`. FUA is valid on every command (the spec). */
const ALLOWED_FLAGS: Record<number, number> = {
  [CMD.READ]: CMD_FLAG.FUA,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.DISC]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE,
}

/** Requests in flight past which the connection stops reading until half have completed. */
const MAX_IN_FLIGHT = 256
/** Replies of one tick up to this many bytes in all are copied into one write. */
const COALESCE_BYTES = 256 << 10
/** After a stop, how long a client has to see `ESHUTDOWN` and disconnect before it is ended. */
const SHUTDOWN_GRACE_MS = 200
/** Reply bytes queued on the socket past which reading stops until they drain. */
const MAX_QUEUED = 64 << 20

/** What a connection tells its server. */
export interface TransmissionHooks {
  /** A request failed (logged by the server). */
  onError(command: string, offset: number, length: number, err: unknown): void
  /** The connection ended: `reason` says why when it was not a clean `NBD_CMD_DISC`. */
  onClose(reason: string | undefined): void
}

/** Counts of one connection, for stats. */
export interface TransmissionCounts {
  requests: number
  readBytes: number
  writtenBytes: number
  errors: number
}

/** A write whose payload is still arriving. */
interface Pending {
  hi: number
  lo: number
  flags: number
  offset: number
  data: Buffer
  filled: number
  /** Answer with this error once the payload is in, instead of writing it. */
  refuse: NbdRequestError | undefined
}

/**
 * One connection in transmission. Requests are read as they arrive and started at once;
 * replies go out as requests complete, in whatever order that is, several per system call
 * (those of one tick are written together). `NBD_CMD_DISC` stops reading, and the
 * connection ends once every request in flight has been answered; so does
 * {@link Transmission.stop}. A request that breaks the framing (bad magic, a write over the
 * maximum payload) is answered where it can be and ends the connection the same way; no
 * write is applied unless its whole payload arrived.
 */
export class Transmission {
  readonly export: NbdExport
  readonly counts: TransmissionCounts = { requests: 0, readBytes: 0, writtenBytes: 0, errors: 0 }
  readonly #stream: Duplex
  readonly #structured: boolean
  readonly #hooks: TransmissionHooks
  #head: Buffer | undefined
  #pending: Pending | undefined
  #inFlight = 0
  #paused = false
  /** Bytes queued this tick: see {@link Transmission.#send}. */
  #out: Buffer[] = []
  #outBytes = 0
  /** No more requests are read: a `DISC`, a framing error, a stop; the reason if not `DISC`. */
  #ending = false
  /** Set by {@link Transmission.stop}: new requests are answered with `ESHUTDOWN`. */
  #shutdown: string | undefined
  #reason: string | undefined
  #closed = false

  constructor(stream: Duplex, exp: NbdExport, structured: boolean, rest: Buffer, hooks: TransmissionHooks) {
    this.#stream = stream
    this.export = exp
    this.#structured = structured
    this.#hooks = hooks
    stream.on('data', this.#onData)
    stream.on('drain', this.#onDrain)
    stream.on('error', (err: Error) => this.#close(`connection error: ${err.message}`))
    stream.on('close', () => this.#close(this.#ending ? this.#reason : 'the client closed the connection'))
    stream.on('end', () => this.#end(this.#ending ? this.#reason : 'the client closed the connection'))
    if (rest.byteLength) this.#onData(rest)
  }

  /** Requests in flight now. */
  get inFlight(): number {
    return this.#inFlight
  }

  /** Stops reading requests; resolves once those in flight are answered and the connection closed. */
  stop(reason: string): Promise<void> {
    if (this.#closed) return Promise.resolve()
    const closed = new Promise<void>((r) => this.#stream.once('close', () => r()))
    if (this.#ending || this.#shutdown !== undefined) return closed
    // Requests that arrive from now on get ESHUTDOWN (the client should then disconnect);
    // once those in flight are answered and the client has had a moment, the connection ends.
    this.#shutdown = reason
    const tryEnd = (): void => {
      if (this.#inFlight > 0) {
        setTimeout(tryEnd, 10).unref()
        return
      }
      this.#end(reason)
    }
    setTimeout(tryEnd, SHUTDOWN_GRACE_MS).unref()
    return closed
  }

  readonly #onData = (chunk: Buffer): void => {
    if (this.#ending) return
    let pos = 0
    const len = chunk.byteLength
    while (pos < len && !this.#ending) {
      const p = this.#pending
      if (p !== undefined) {
        const n = Math.min(p.data.byteLength - p.filled, len - pos)
        chunk.copy(p.data, p.filled, pos, pos + n)
        p.filled += n
        pos += n
        if (p.filled === p.data.byteLength) {
          this.#pending = undefined
          this.#startWrite(p.hi, p.lo, p.flags, p.offset, p.data, p.refuse)
        }
        continue
      }
      let head: Buffer
      let at: number
      if (this.#head !== undefined) {
        const need = REQUEST_BYTES - this.#head.byteLength
        const take = Math.min(need, len - pos)
        this.#head = Buffer.concat([this.#head, chunk.subarray(pos, pos + take)])
        pos += take
        if (this.#head.byteLength < REQUEST_BYTES) {
          this.#checkPartial()
          break
        }
        head = this.#head
        at = 0
        this.#head = undefined
      } else if (len - pos < REQUEST_BYTES) {
        this.#head = Buffer.from(chunk.subarray(pos))
        this.#checkPartial()
        break
      } else {
        head = chunk
        at = pos
        pos += REQUEST_BYTES
      }
      if (head.readUInt32BE(at) !== REQUEST_MAGIC) {
        this.#end(`a request with magic 0x${head.readUInt32BE(at).toString(16)} (not 0x${REQUEST_MAGIC.toString(16)})`)
        break
      }
      const flags = head.readUInt16BE(at + 4)
      const type = head.readUInt16BE(at + 6)
      const hi = head.readUInt32BE(at + 8)
      const lo = head.readUInt32BE(at + 12)
      const offset = head.readUInt32BE(at + 16) * 0x100000000 + head.readUInt32BE(at + 20)
      const length = head.readUInt32BE(at + 24)
      this.counts.requests++
      if (type === CMD.WRITE) {
        if (length > MAX_PAYLOAD) {
          this.#reply(hi, lo, ERR.EINVAL, `a write of ${length} bytes is over the maximum payload (${MAX_PAYLOAD})`)
          this.#end(`a write of ${length} bytes, over the maximum payload`)
          break
        }
        const refuse = this.#refusal(type, flags, offset, length)
        if (len - pos >= length) {
          const data = chunk.subarray(pos, pos + length)
          pos += length
          this.#startWrite(hi, lo, flags, offset, data, refuse)
        } else {
          this.#pending = { hi, lo, flags, offset, data: Buffer.allocUnsafe(length), filled: 0, refuse }
        }
        continue
      }
      this.#start(hi, lo, type, flags, offset, length)
    }
  }

  /**
   * A header still arriving whose magic is already wrong (an option sent after `GO`, say)
   * ends the connection now: the client may be waiting for an answer to it.
   */
  #checkPartial(): void {
    const h = this.#head
    if (h === undefined || h.byteLength < 4 || h.readUInt32BE(0) === REQUEST_MAGIC) return
    this.#head = undefined
    this.#end(`a request with magic 0x${h.readUInt32BE(0).toString(16)} (not 0x${REQUEST_MAGIC.toString(16)})`)
  }

  readonly #onDrain = (): void => this.#maybeResume()

  /** Why a request is refused before it starts, if it is. */
  #refusal(type: number, flags: number, offset: number, length: number): NbdRequestError | undefined {
    if (this.#shutdown !== undefined && type !== CMD.DISC) return new NbdRequestError(ERR.ESHUTDOWN, `the server is stopping (${this.#shutdown})`)
    const allowed = ALLOWED_FLAGS[type]
    if (allowed === undefined) return new NbdRequestError(ERR.EINVAL, `unknown command ${type}`)
    if (flags & ~allowed) return new NbdRequestError(ERR.EINVAL, `flags 0x${flags.toString(16)} are not valid on ${commandName(type)}`)
    const e = this.export
    switch (type) {
      case CMD.READ:
      case CMD.CACHE:
        if (type === CMD.READ && length > MAX_PAYLOAD) {
          return new NbdRequestError(this.#structured ? ERR.EOVERFLOW : ERR.EINVAL, `a read of ${length} bytes is over the maximum payload (${MAX_PAYLOAD})`)
        }
        if (length === 0) return new NbdRequestError(ERR.EINVAL, `${commandName(type)} of 0 bytes`)
        return e.check(offset, length, 'read')
      case CMD.TRIM:
        if (length === 0) return new NbdRequestError(ERR.EINVAL, `${commandName(type)} of 0 bytes`)
        return e.check(offset, length, 'trim')
      case CMD.WRITE:
      case CMD.WRITE_ZEROES:
        if (length === 0) return new NbdRequestError(ERR.EINVAL, `${commandName(type)} of 0 bytes`)
        return e.check(offset, length, 'write')
      default:
        return undefined
    }
  }

  #start(hi: number, lo: number, type: number, flags: number, offset: number, length: number): void {
    if (type === CMD.DISC) {
      // No reply, whatever its flags: the client is going.
      this.#end(undefined)
      return
    }
    const refuse = this.#refusal(type, flags, offset, length)
    if (refuse !== undefined) {
      this.#refuse(hi, lo, refuse)
      return
    }
    const e = this.export
    switch (type) {
      case CMD.READ:
        this.#track(hi, lo, type, offset, length, e.read(offset, length))
        return
      case CMD.FLUSH:
        this.#track(hi, lo, type, offset, length, e.flush())
        return
      case CMD.TRIM:
        this.#track(
          hi,
          lo,
          type,
          offset,
          length,
          e.trim(offset, length).then(() => (flags & CMD_FLAG.FUA ? e.flush() : undefined)),
        )
        return
      case CMD.CACHE:
        this.#track(hi, lo, type, offset, length, e.cache(offset, length))
        return
      case CMD.WRITE_ZEROES:
        this.#track(hi, lo, type, offset, length, e.writeZeroes(offset, length, (flags & CMD_FLAG.NO_HOLE) !== 0, (flags & CMD_FLAG.FUA) !== 0))
        return
    }
  }

  #startWrite(hi: number, lo: number, flags: number, offset: number, data: Buffer, refuse: NbdRequestError | undefined): void {
    if (refuse !== undefined) {
      this.#refuse(hi, lo, refuse)
      return
    }
    const length = data.byteLength
    const done = this.export.write(offset, data, (flags & CMD_FLAG.FUA) !== 0).then(() => {
      this.counts.writtenBytes += length
    })
    this.#track(hi, lo, CMD.WRITE, offset, length, done)
  }

  /** Answers a request refused before it started. */
  #refuse(hi: number, lo: number, err: NbdRequestError): void {
    this.counts.errors++
    this.#reply(hi, lo, err.errno, err.message)
  }

  /** Answers `work` when it settles. */
  #track(hi: number, lo: number, type: number, offset: number, length: number, work: Promise<Buffer | void>): void {
    this.#inFlight++
    if (this.#inFlight >= MAX_IN_FLIGHT && !this.#paused) {
      this.#paused = true
      this.#stream.pause()
    }
    work.then(
      (data) => {
        this.#inFlight--
        if (data !== undefined) {
          this.counts.readBytes += data.byteLength
          this.#replyData(hi, lo, offset, data)
        } else this.#reply(hi, lo, 0, '')
        this.#settled()
      },
      (err: unknown) => {
        this.#inFlight--
        this.counts.errors++
        this.#hooks.onError(commandName(type), offset, length, err)
        const message = err instanceof Error ? err.message : String(err)
        this.#reply(hi, lo, errnoOf(err), message)
        this.#settled()
      },
    )
  }

  #settled(): void {
    if (this.#ending) {
      if (this.#inFlight === 0) this.#finish()
      return
    }
    this.#maybeResume()
  }

  #maybeResume(): void {
    if (this.#paused && !this.#ending && this.#inFlight <= MAX_IN_FLIGHT / 2 && this.#stream.writableLength < MAX_QUEUED) {
      this.#paused = false
      this.#stream.resume()
    }
  }

  /**
   * Queues bytes for the socket. Replies made in one tick go out together at its end: small
   * ones copied into one buffer (one write, one system call), large reads as they are.
   */
  #send(a: Buffer, b?: Buffer): void {
    if (this.#closed) return
    if (this.#out.length === 0) process.nextTick(this.#flushOut)
    this.#out.push(a)
    this.#outBytes += a.byteLength
    if (b !== undefined) {
      this.#out.push(b)
      this.#outBytes += b.byteLength
    }
  }

  readonly #flushOut = (): void => {
    const out = this.#out
    const bytes = this.#outBytes
    this.#out = []
    this.#outBytes = 0
    if (this.#closed || out.length === 0) return
    const s = this.#stream
    if (out.length === 1) s.write(out[0])
    else if (bytes <= COALESCE_BYTES) s.write(Buffer.concat(out, bytes))
    else {
      s.cork()
      for (const b of out) s.write(b)
      s.uncork()
    }
    if (!this.#paused && s.writableLength >= MAX_QUEUED) {
      this.#paused = true
      s.pause()
    }
  }

  /** A reply without data: simple, or an error chunk for a read under structured replies. */
  #reply(hi: number, lo: number, errno: number, message: string): void {
    if (this.#structured && errno !== 0) {
      const b = errorChunk(0n, errno, message)
      b.writeUInt32BE(hi, 8)
      b.writeUInt32BE(lo, 12)
      this.#send(b)
      return
    }
    const h = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES)
    h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0)
    h.writeUInt32BE(errno, 4)
    h.writeUInt32BE(hi, 8)
    h.writeUInt32BE(lo, 12)
    this.#send(h)
  }

  /** A successful read's reply: one simple reply, or one `OFFSET_DATA` chunk flagged done. */
  #replyData(hi: number, lo: number, offset: number, data: Buffer): void {
    if (!this.#structured) {
      const h = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES)
      h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0)
      h.writeUInt32BE(0, 4)
      h.writeUInt32BE(hi, 8)
      h.writeUInt32BE(lo, 12)
      this.#send(h, data)
      return
    }
    const h = Buffer.allocUnsafe(CHUNK_BYTES + 8)
    h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0)
    h.writeUInt16BE(REPLY_FLAG_DONE, 4)
    h.writeUInt16BE(REPLY_TYPE.OFFSET_DATA, 6)
    h.writeUInt32BE(hi, 8)
    h.writeUInt32BE(lo, 12)
    h.writeUInt32BE(8 + data.byteLength, 16)
    h.writeUInt32BE(Math.floor(offset / 0x100000000), 20)
    h.writeUInt32BE(offset >>> 0, 24)
    this.#send(h, data)
  }

  /** Stops reading requests; the connection closes once every one in flight is answered. */
  #end(reason: string | undefined): void {
    if (this.#ending) return
    this.#ending = true
    this.#reason = reason
    this.#pending = undefined
    this.#stream.pause()
    if (this.#inFlight === 0) this.#finish()
  }

  #finish(): void {
    if (this.#closed) return
    this.#flushOut()
    this.#stream.end()
    // A client that never reads its replies must not hold the connection open forever.
    const timer = setTimeout(() => this.#stream.destroy(), 10_000)
    timer.unref()
    this.#stream.once('close', () => clearTimeout(timer))
  }

  #close(reason: string | undefined): void {
    if (this.#closed) return
    this.#closed = true
    this.#ending = true
    this.#reason ??= reason
    this.#hooks.onClose(this.#reason)
  }
}
