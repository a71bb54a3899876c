/**
 * UUIDs as bcache stores them: 16 raw bytes, shown in the canonical 8-4-4-4-12 form.
 * @module
 */
import { randomUUID } from 'node:crypto'
import { InvalidArgumentError } from './errors'

const UUID_RE = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i

/** Canonical lower-case text form of 16 UUID bytes. */
export function uuidToString(bytes: Uint8Array): string {
  const h = Buffer.from(bytes.buffer, bytes.byteOffset, 16).toString('hex')
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

/** The 16 bytes of a UUID given as text (with or without dashes). */
export function uuidToBytes(text: string, what = 'uuid'): Buffer {
  if (!UUID_RE.test(text)) throw new InvalidArgumentError(`${what}: '${text}' is not a UUID`)
  return Buffer.from(text.replace(/-/g, ''), 'hex')
}

/** A fresh random (version 4) UUID in text form. */
export function newUuid(): string {
  return randomUUID()
}

/** Whether all 16 bytes are zero (bcache's "no UUID"). */
export function isNullUuid(text: string): boolean {
  return /^[0-]+$/.test(text)
}
