/**
 * CRC-32C (Castagnoli), for fio's `verify=crc32c`.
 * @module
 */

const TABLE = (() => {
  const t = new Int32Array(256)
  for (let i = 0; i < 256; i++) {
    let c = i
    for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1
    t[i] = c
  }
  return t
})()

/** CRC-32C of `data` (`crc32c("123456789") === 0xe3069283`). */
export function crc32c(data: Uint8Array): number {
  let c = -1
  for (let i = 0; i < data.length; i++) c = TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8)
  return (c ^ -1) >>> 0
}
