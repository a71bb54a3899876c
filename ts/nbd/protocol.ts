/**
 * The NBD protocol's numbers and wire layouts (NetworkBlockDevice/nbd `doc/proto.md`): the
 * fixed-newstyle handshake, options and their replies, transmission requests and the simple
 * and structured replies. Everything is big-endian on the wire.
 * @module
 */

/** `NBDMAGIC`: the first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n
/** `IHAVEOPT`: after the magic in newstyle, and before every option the client sends. */
export const IHAVEOPT = 0x49484156454f5054n
/** Magic of every option reply. */
export const OPT_REPLY_MAGIC = 0x3e889045565a9n
export const REQUEST_MAGIC = 0x25609513
export const SIMPLE_REPLY_MAGIC = 0x67446698
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef

/** Handshake flags (server). */
export const FLAG_FIXED_NEWSTYLE = 1
export const FLAG_NO_ZEROES = 2
/** Client flags. */
export const C_FIXED_NEWSTYLE = 1
export const C_NO_ZEROES = 2

/** Options. */
export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const

/** Option reply types; errors have bit 31 set. */
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const

/** Information types of `NBD_OPT_INFO` and `NBD_OPT_GO`. */
export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const

/** Transmission flags. */
export const TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_CACHE: 1 << 10,
} as const

/** Commands. */
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6 } as const

/** Command flags. */
export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2 } as const

/** Structured reply chunk flags and types. */
export const REPLY_FLAG_DONE = 1
export const REPLY_TYPE = { NONE: 0, OFFSET_DATA: 1, ERROR: 0x8001 } as const

/** Error values of replies (Linux errno numbers, as the protocol fixes them). */
export const ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const

/** Bytes of a request header; of a simple reply; of a structured reply chunk header. */
export const REQUEST_BYTES = 28
export const SIMPLE_REPLY_BYTES = 16
export const CHUNK_BYTES = 20

/** The largest payload the server accepts or sends in one request (the spec's 2^25). */
export const MAX_PAYLOAD = 32 << 20
/** The largest option payload read during the handshake (names are at most 4 KiB). */
export const MAX_OPTION_BYTES = 64 << 10
/** The preferred block size advertised: requests of whole 4 KiB are served without read-modify-write. */
export const PREFERRED_BLOCK = 4096

/** The header of one option reply (20 bytes) followed by its `data`. */
export function optionReply(option: number, type: number, data: Uint8Array = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(20 + data.byteLength)
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0)
  b.writeUInt32BE(option, 8)
  b.writeUInt32BE(type >>> 0, 12)
  b.writeUInt32BE(data.byteLength, 16)
  b.set(data, 20)
  return b
}

const EMPTY = new Uint8Array(0)

/** A simple reply header (16 bytes). */
export function simpleReply(error: number, handle: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES)
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0)
  b.writeUInt32BE(error, 4)
  b.writeBigUInt64BE(handle, 8)
  return b
}

/** A structured reply chunk header (20 bytes) for `length` bytes of payload. */
export function chunkHeader(flags: number, type: number, handle: bigint, length: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_BYTES)
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0)
  b.writeUInt16BE(flags, 4)
  b.writeUInt16BE(type, 6)
  b.writeBigUInt64BE(handle, 8)
  b.writeUInt32BE(length, 16)
  return b
}

/** A whole `NBD_REPLY_TYPE_ERROR` chunk, the last of its request. */
export function errorChunk(handle: bigint, error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 4000), 'utf8')
  const b = Buffer.allocUnsafe(CHUNK_BYTES + 6 + msg.byteLength)
  chunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.ERROR, handle, 6 + msg.byteLength).copy(b, 0)
  b.writeUInt32BE(error, CHUNK_BYTES)
  b.writeUInt16BE(msg.byteLength, CHUNK_BYTES + 4)
  msg.copy(b, CHUNK_BYTES + 6)
  return b
}

/** Names of commands, for logs and errors. */
export function commandName(type: number): string {
  for (const [name, v] of Object.entries(CMD)) if (v === type) return name
  return `command ${type}`
}

/** Names of options, for logs and errors. */
export function optionName(option: number): string {
  for (const [name, v] of Object.entries(OPT)) if (v === option) return `NBD_OPT_${name}`
  return `option ${option}`
}
