import test from 'ava'
import { Crc64, crc64, crc64Implementation } from '../ts/index'

test('check value of "123456789"', (t) => {
  t.is(crc64(Buffer.from('123456789')), 0x62ec59e3f1a4f00an)
})

// Bit-at-a-time CRC-64/WE, the definition itself: a second implementation to compare with.
function reference(data: Uint8Array): bigint {
  const poly = 0x42f0e1eba9ea3693n
  const mask = (1n << 64n) - 1n
  let crc = mask
  for (const byte of data) {
    crc ^= BigInt(byte) << 56n
    for (let i = 0; i < 8; i++) crc = crc & (1n << 63n) ? ((crc << 1n) ^ poly) & mask : (crc << 1n) & mask
  }
  return crc ^ mask
}

test('matches the bitwise definition over assorted lengths', (t) => {
  const buf = Buffer.alloc(1500)
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 131 + 7) & 0xff
  for (const len of [0, 1, 2, 7, 8, 15, 16, 17, 31, 64, 100, 255, 256, 1000, 1500]) {
    t.is(crc64(buf.subarray(0, len)), reference(buf.subarray(0, len)), `len ${len}`)
  }
})

test('incremental digest equals one-shot', (t) => {
  const buf = Buffer.alloc(100000)
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 2654435761) >>> 24
  const c = new Crc64()
  for (let i = 0; i < buf.length; i += 4093) c.update(buf.subarray(i, i + 4093))
  t.is(c.digest(), crc64(buf))
  t.is(c.reset().update(Buffer.from('123456789')).digest(), 0x62ec59e3f1a4f00an)
})

test('names the kernel in use', (t) => {
  t.regex(crc64Implementation(), /\S/)
})
