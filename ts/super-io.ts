/**
 * Reading and writing the superblock of a file or block device.
 * @module
 */
import { open } from 'node:fs/promises'
import { openDevice } from './device'
import { asUbcacheError, SuperblockError, UbcacheError } from './errors'
import native from './native'
import { type DeviceGeometry, type ParsedSuperblock, parseSuperblock, SB_OFFSET, SB_SIZE, serializeSuperblock, type Superblock } from './superblock'

/** Size and geometry of a file or block device, from `stat` or BLKGETSIZE64/BLKSSZGET. */
export interface DeviceDescription extends DeviceGeometry {
  /** Capacity in bytes. */
  bytes: number
  /** True for a block device, false for a regular file. */
  isBlockDevice: boolean
}

/**
 * Describes the regular file or block device at `path`.
 * @throws UbcacheError `ENOENT` for a missing path, `NOT_A_DEVICE` for a directory or other non-device.
 */
export function describeDevice(path: string): DeviceDescription {
  try {
    const info = native.deviceInfo(path)
    return {
      bytes: info.sizeBytes,
      sectors: Math.floor(info.sizeBytes / 512),
      logicalBlockSize: info.logicalBlockSize,
      isBlockDevice: info.isBlockDevice,
    }
  } catch (err) {
    throw asUbcacheError(err, path)
  }
}

/**
 * True when `path` is an NBD URI (`nbd://host/export`, `nbd+unix:///export?socket=PATH`,
 * `nbds://`...): a remote device, read and written through ubcache's NBD client.
 */
export function isNbdUri(path: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(path)
}

/** Reads the raw superblock page (4096 bytes at byte 4096); shorter if the device is. */
export async function readSuperblockPage(path: string): Promise<Buffer> {
  if (isNbdUri(path)) {
    const dev = await openDevice(path, { readOnly: true, exclusive: false, direct: 'off' })
    try {
      const n = Math.max(0, Math.min(SB_SIZE, dev.size - SB_OFFSET))
      return n === 0 ? Buffer.alloc(0) : Buffer.from(await dev.read(SB_OFFSET, n))
    } finally {
      await dev.close()
    }
  }
  const fh = await open(path, 'r').catch((err) => {
    throw asUbcacheError(err, path)
  })
  try {
    const buf = Buffer.alloc(SB_SIZE)
    const { bytesRead } = await fh.read(buf, 0, SB_SIZE, SB_OFFSET)
    return buf.subarray(0, bytesRead)
  } finally {
    await fh.close()
  }
}

/**
 * Reads and validates the superblock of `path` with every check of the kernel's `read_super`,
 * including the ones that need the device's size and block size.
 * @throws SuperblockError naming the failed check (its message starts with the path).
 */
export async function readSuperblock(path: string): Promise<ParsedSuperblock> {
  const geometry = describeDevice(path)
  const page = await readSuperblockPage(path)
  try {
    return parseSuperblock(page, geometry)
  } catch (err) {
    throw err instanceof SuperblockError ? err.withDevice(path) : err
  }
}

/** Writes `sb` at byte 4096 of `path` and waits until it is durable. */
export async function writeSuperblock(path: string, sb: Superblock): Promise<void> {
  const page = serializeSuperblock(sb)
  if (isNbdUri(path)) {
    const dev = await openDevice(path, { exclusive: false, direct: 'off' })
    try {
      await dev.write(SB_OFFSET, page)
      await dev.flush()
    } catch (err) {
      throw asUbcacheError(err, path)
    } finally {
      await dev.close()
    }
    return
  }
  const fh = await open(path, 'r+').catch((err) => {
    throw asUbcacheError(err, path)
  })
  try {
    const { bytesWritten } = await fh.write(page, 0, page.length, SB_OFFSET)
    if (bytesWritten !== page.length) throw new UbcacheError('EIO', `${path}: short superblock write (${bytesWritten} bytes)`)
    await fh.datasync()
  } catch (err) {
    throw asUbcacheError(err, path)
  } finally {
    await fh.close()
  }
}
