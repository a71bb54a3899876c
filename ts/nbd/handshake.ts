/**
 * The NBD handshake (fixed newstyle): option haggling up to `NBD_OPT_GO` or
 * `NBD_OPT_EXPORT_NAME`, with `NBD_OPT_STARTTLS` when TLS is configured.
 * @module
 */
import type { Duplex } from 'node:stream'
import { TLSSocket, type SecureContext } from 'node:tls'
import type { NbdExport } from './export'
import {
  C_FIXED_NEWSTYLE,
  C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  MAX_OPTION_BYTES,
  MAX_PAYLOAD,
  NBD_MAGIC,
  OPT,
  optionName,
  optionReply,
  PREFERRED_BLOCK,
  REP,
  TFLAG,
} from './protocol'

/** A protocol violation that ends the connection, with what was wrong for the log. */
export class HandshakeClosed extends Error {}

/** Reads exact byte counts from a stream, until {@link Reader.detach}. */
export class Reader {
  readonly #stream: Duplex
  #chunks: Buffer[] = []
  #have = 0
  #want = 0
  #resolve: ((b: Buffer) => void) | undefined
  #reject: ((e: Error) => void) | undefined
  #ended: Error | undefined

  constructor(stream: Duplex) {
    this.#stream = stream
    stream.on('data', this.#onData)
    stream.on('end', this.#onEnd)
    stream.on('close', this.#onEnd)
    stream.on('error', this.#onError)
  }

  readonly #onData = (chunk: Buffer): void => {
    this.#chunks.push(chunk)
    this.#have += chunk.byteLength
    this.#deliver()
  }

  readonly #onEnd = (): void => this.#fail(new HandshakeClosed('the client closed the connection'))
  readonly #onError = (err: Error): void => this.#fail(new HandshakeClosed(`connection error: ${err.message}`))

  #fail(err: Error): void {
    this.#ended ??= err
    const reject = this.#reject
    this.#resolve = this.#reject = undefined
    reject?.(this.#ended)
  }

  #deliver(): void {
    if (this.#resolve === undefined || this.#have < this.#want) return
    const all = this.#chunks.length === 1 ? this.#chunks[0] : Buffer.concat(this.#chunks)
    const out = all.subarray(0, this.#want)
    const rest = all.subarray(this.#want)
    this.#chunks = rest.byteLength ? [rest] : []
    this.#have = rest.byteLength
    const resolve = this.#resolve
    this.#resolve = this.#reject = undefined
    resolve(out)
  }

  /** The next `n` bytes. */
  read(n: number): Promise<Buffer> {
    if (n === 0) return Promise.resolve(Buffer.alloc(0))
    return new Promise((resolve, reject) => {
      this.#want = n
      this.#resolve = resolve
      this.#reject = reject
      if (this.#have >= n) this.#deliver()
      else if (this.#ended) this.#fail(this.#ended)
    })
  }

  /** Stops reading the stream; returns the bytes read from it and not consumed. */
  detach(): Buffer {
    this.#stream.off('data', this.#onData)
    this.#stream.off('end', this.#onEnd)
    this.#stream.off('close', this.#onEnd)
    this.#stream.off('error', this.#onError)
    const rest = Buffer.concat(this.#chunks)
    this.#chunks = []
    this.#have = 0
    return rest
  }
}

/** TLS as the server offers it: see {@link NbdServerOptions.tls}. */
export interface TlsSetup {
  /** `require`: every option but `STARTTLS` and `ABORT` is refused before TLS (nbdkit's `--tls=require`). */
  mode: 'on' | 'require'
  context: SecureContext
  /** Pre-shared keys by identity, when TLS-PSK is used. */
  psk?: Map<string, Buffer>
}

/** What the handshake agreed on. */
export interface Agreed {
  export: NbdExport
  /** The stream to carry on with: the socket, or the TLS session over it. */
  stream: Duplex
  /** Bytes the client sent after the handshake, already read. */
  rest: Buffer
  structured: boolean
  tls: boolean
}

/** What the handshake needs of the server. */
export interface HandshakeHost {
  lookup(name: string): NbdExport | undefined
  list(): NbdExport[]
  tls: TlsSetup | undefined
  /** Set once the server stops: options get `NBD_REP_ERR_SHUTDOWN`. */
  stopping(): boolean
}

/** The transmission flags of an export. */
export function transmissionFlags(e: NbdExport): number {
  let f = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_FUA | TFLAG.SEND_CACHE | TFLAG.CAN_MULTI_CONN
  // A flush covers every write to the device that completed, whichever connection made it.
  if (e.readOnly) f |= TFLAG.READ_ONLY
  else f |= TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES
  return f
}

/**
 * Runs the handshake on `socket` to transmission; rejects with {@link HandshakeClosed} when
 * the connection is to end (the client aborted, a protocol violation, a refusal).
 */
export async function handshake(socket: Duplex, host: HandshakeHost): Promise<Agreed> {
  let stream: Duplex = socket
  let reader = new Reader(stream)
  let tls = false
  let structured = false
  const send = (b: Buffer): void => void stream.write(b)
  try {
    const hello = Buffer.allocUnsafe(18)
    hello.writeBigUInt64BE(NBD_MAGIC, 0)
    hello.writeBigUInt64BE(IHAVEOPT, 8)
    hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16)
    send(hello)
    const clientFlags = (await reader.read(4)).readUInt32BE(0)
    if (clientFlags & ~(C_FIXED_NEWSTYLE | C_NO_ZEROES)) throw new HandshakeClosed(`unknown client flags 0x${clientFlags.toString(16)}`)
    const noZeroes = (clientFlags & C_NO_ZEROES) !== 0
    for (;;) {
      const head = await reader.read(16)
      if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new HandshakeClosed('an option without the IHAVEOPT magic')
      const option = head.readUInt32BE(8)
      const length = head.readUInt32BE(12)
      if (length > MAX_OPTION_BYTES) {
        send(optionReply(option, REP.ERR_TOO_BIG, Buffer.from(`option data of ${length} bytes is over ${MAX_OPTION_BYTES}`)))
        throw new HandshakeClosed(`${optionName(option)} with ${length} bytes of data`)
      }
      const data = await reader.read(length)
      const error = (type: number, message: string): void => send(optionReply(option, type, Buffer.from(message)))
      if (host.stopping() && option !== OPT.ABORT) {
        if (option === OPT.EXPORT_NAME) throw new HandshakeClosed('the server is stopping')
        error(REP.ERR_SHUTDOWN, 'the server is stopping')
        continue
      }
      if (host.tls?.mode === 'require' && !tls && option !== OPT.STARTTLS && option !== OPT.ABORT) {
        if (option === OPT.EXPORT_NAME) throw new HandshakeClosed('NBD_OPT_EXPORT_NAME before TLS, which this server requires')
        error(REP.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first')
        continue
      }
      switch (option) {
        case OPT.ABORT:
          send(optionReply(option, REP.ACK))
          throw new HandshakeClosed('the client aborted the handshake')
        case OPT.LIST: {
          if (length !== 0) {
            error(REP.ERR_INVALID, 'NBD_OPT_LIST takes no data')
            break
          }
          for (const e of host.list()) {
            const name = Buffer.from(e.name)
            const desc = Buffer.from(e.description)
            const b = Buffer.allocUnsafe(4 + name.byteLength + desc.byteLength)
            b.writeUInt32BE(name.byteLength, 0)
            name.copy(b, 4)
            desc.copy(b, 4 + name.byteLength)
            send(optionReply(option, REP.SERVER, b))
          }
          send(optionReply(option, REP.ACK))
          break
        }
        case OPT.STRUCTURED_REPLY:
          if (length !== 0) error(REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data')
          else if (structured) error(REP.ERR_INVALID, 'structured replies were already negotiated')
          else {
            structured = true
            send(optionReply(option, REP.ACK))
          }
          break
        case OPT.STARTTLS: {
          if (host.tls === undefined) {
            error(REP.ERR_UNSUP, 'this server has no TLS configured')
            break
          }
          if (length !== 0 || tls) {
            error(REP.ERR_INVALID, tls ? 'TLS is already on' : 'NBD_OPT_STARTTLS takes no data')
            break
          }
          send(optionReply(option, REP.ACK))
          const rest = reader.detach()
          if (rest.byteLength) throw new HandshakeClosed('data sent after NBD_OPT_STARTTLS before the TLS handshake')
          stream = await startTls(socket, host.tls)
          reader = new Reader(stream)
          tls = true
          // Nothing negotiated before TLS carries over (the spec).
          structured = false
          break
        }
        case OPT.EXPORT_NAME: {
          const name = data.toString('utf8')
          const e = host.lookup(name)
          if (e === undefined) throw new HandshakeClosed(`NBD_OPT_EXPORT_NAME of unknown export '${name}'`)
          const b = Buffer.alloc(noZeroes ? 10 : 134)
          b.writeBigUInt64BE(BigInt(e.size), 0)
          b.writeUInt16BE(transmissionFlags(e), 8)
          send(b)
          return { export: e, stream, rest: reader.detach(), structured, tls }
        }
        case OPT.INFO:
        case OPT.GO: {
          const parsed = parseInfoRequest(data)
          if (typeof parsed === 'string') {
            error(REP.ERR_INVALID, parsed)
            break
          }
          const e = host.lookup(parsed.name)
          if (e === undefined) {
            error(REP.ERR_UNKNOWN, `no export named '${parsed.name}'`)
            break
          }
          const ex = Buffer.allocUnsafe(12)
          ex.writeUInt16BE(INFO.EXPORT, 0)
          ex.writeBigUInt64BE(BigInt(e.size), 2)
          ex.writeUInt16BE(transmissionFlags(e), 10)
          send(optionReply(option, REP.INFO, ex))
          const bs = Buffer.allocUnsafe(14)
          bs.writeUInt16BE(INFO.BLOCK_SIZE, 0)
          bs.writeUInt32BE(e.blockSize, 2)
          bs.writeUInt32BE(Math.max(PREFERRED_BLOCK, e.blockSize), 6)
          bs.writeUInt32BE(MAX_PAYLOAD, 10)
          send(optionReply(option, REP.INFO, bs))
          if (parsed.infos.includes(INFO.NAME)) send(optionReply(option, REP.INFO, Buffer.concat([u16(INFO.NAME), Buffer.from(e.name)])))
          if (parsed.infos.includes(INFO.DESCRIPTION) && e.description) {
            send(optionReply(option, REP.INFO, Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(e.description)])))
          }
          send(optionReply(option, REP.ACK))
          if (option === OPT.GO) return { export: e, stream, rest: reader.detach(), structured, tls }
          break
        }
        default:
          error(REP.ERR_UNSUP, `${optionName(option)} is not supported`)
      }
    }
  } catch (err) {
    reader.detach()
    throw err instanceof HandshakeClosed ? err : new HandshakeClosed((err as Error).message)
  }
}

function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2)
  b.writeUInt16BE(v, 0)
  return b
}

/** The export name and information types of `NBD_OPT_INFO`/`GO`, or what is wrong with them. */
function parseInfoRequest(data: Buffer): { name: string; infos: number[] } | string {
  if (data.byteLength < 6) return `option data of ${data.byteLength} bytes is too short (at least 6)`
  const nameLength = data.readUInt32BE(0)
  if (nameLength > data.byteLength - 6) return `export name length ${nameLength} passes the option's ${data.byteLength} bytes`
  const name = data.toString('utf8', 4, 4 + nameLength)
  const count = data.readUInt16BE(4 + nameLength)
  if (data.byteLength !== 6 + nameLength + 2 * count) return `${count} information requests do not fit the option's ${data.byteLength} bytes`
  const infos: number[] = []
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLength + 2 * i))
  return { name, infos }
}

/** The server side of a TLS session over `socket`, once its handshake is done. */
function startTls(socket: Duplex, setup: TlsSetup): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const psk = setup.psk
    const tls = new TLSSocket(socket as never, {
      isServer: true,
      secureContext: setup.context,
      ...(psk ? { pskCallback: (_s: TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
    } as never)
    const fail = (err: Error): void => {
      tls.destroy()
      reject(new HandshakeClosed(`TLS handshake failed: ${err.message}`))
    }
    tls.once('secure', () => {
      tls.off('error', fail)
      resolve(tls)
    })
    tls.once('error', fail)
  })
}
