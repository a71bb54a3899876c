// What the registry's model, kill and kill-child tests write into a block: [id, device,
// block, check] as little-endian u32s, repeated in every 16-byte unit, so that a block read
// back names the write it came from, and a torn or misplaced block shows. Plain JavaScript
// (CommonJS), since kill-child.js runs without the TypeScript loader.
'use strict'

const BLOCK = 4096
const UNIT = 16
const CHECK = 0x9e3779b9

/** The check word of write `id`'s copy of `block` of device `dev`. */
function check(id, dev, block) {
  return (id ^ Math.imul(dev + 1, 0x01000193) ^ Math.imul(block, 0x45d9f3b) ^ CHECK) >>> 0
}

/**
 * `n` blocks written by write `id` to device `dev` from block `start` (id 0: the initial
 * content).
 * @param {number} id
 * @param {number} dev
 * @param {number} start
 * @param {number} n
 * @returns {Buffer}
 */
function blocks(id, dev, start, n) {
  const b = Buffer.alloc(n * BLOCK)
  for (let i = 0; i < n; i++) {
    const block = start + i
    const c = check(id, dev, block)
    for (let o = i * BLOCK; o < (i + 1) * BLOCK; o += UNIT) {
      b.writeUInt32LE(id, o)
      b.writeUInt32LE(dev, o + 4)
      b.writeUInt32LE(block, o + 8)
      b.writeUInt32LE(c, o + 12)
    }
  }
  return b
}

/**
 * The id of the write the block at index `i` of `data` came from, or undefined if it is not
 * a whole block of one write to `dev`'s `block`.
 * @param {Uint8Array} data
 * @param {number} i
 * @param {number} dev
 * @param {number} block
 * @returns {number | undefined}
 */
function writer(data, i, dev, block) {
  const b = Buffer.from(data.buffer, data.byteOffset + i * BLOCK, BLOCK)
  const id = b.readUInt32LE(0)
  if (b.readUInt32LE(4) !== dev || b.readUInt32LE(8) !== block || b.readUInt32LE(12) !== check(id, dev, block)) {
    return undefined
  }
  for (let o = UNIT; o < BLOCK; o += UNIT) if (b.compare(b, 0, UNIT, o, o + UNIT) !== 0) return undefined
  return id
}

/**
 * The writers of the units of the block at index `i` of `data`, run-length encoded: what a
 * bad block holds.
 * @param {Uint8Array} data
 * @param {number} i
 * @returns {string}
 */
function describe(data, i) {
  const b = Buffer.from(data.buffer, data.byteOffset + i * BLOCK, BLOCK)
  const runs = []
  for (let o = 0; o < BLOCK; ) {
    const id = b.readUInt32LE(o)
    const dev = b.readUInt32LE(o + 4)
    const block = b.readUInt32LE(o + 8)
    let e = o + UNIT
    while (e < BLOCK && b.compare(b, o, o + UNIT, e, e + UNIT) === 0) e += UNIT
    runs.push(`bytes ${o}..${e}: write ${id} dev ${dev} block ${block}`)
    o = e
  }
  return runs.join('; ')
}

module.exports = { BLOCK, blocks, writer, describe }
