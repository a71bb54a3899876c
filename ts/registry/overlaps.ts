/**
 * Submission order for a backing device served without its cache set. The cache set serves
 * overlapping requests in the order they were made; a device with no set goes straight to
 * the disk, which may reorder them. So that a cached device behaves the same whichever way
 * it is served, a request that overlaps one in flight where either writes (a write or a
 * discard) waits for it here; nothing else waits.
 * @internal
 * @module
 */

/** A request in flight (or waiting to go): its byte range, and when it settles. */
interface Entry {
  start: number
  end: number
  writes: boolean
  settled: Promise<unknown>
}

/** See the module docs. */
export class Overlaps {
  readonly #live = new Set<Entry>()
  #idle: (() => void)[] = []

  /** Requests in flight or waiting. */
  get size(): number {
    return this.#live.size
  }

  /**
   * Submits `submit` once every request in flight that conflicts with bytes `start..end`
   * (one of the two writes) has settled, and tracks it until it settles. Empty ranges
   * (flushes) conflict with nothing.
   */
  run<T>(start: number, end: number, writes: boolean, submit: () => Promise<T>): Promise<T> {
    const before: Promise<unknown>[] = []
    for (const e of this.#live) {
      if (start < e.end && e.start < end && (writes || e.writes)) before.push(e.settled)
    }
    const result = before.length === 0 ? submit() : Promise.all(before).then(submit)
    const entry: Entry = { start, end, writes, settled: result.then(noop, noop) }
    this.#live.add(entry)
    void entry.settled.then(() => this.#done(entry))
    return result
  }

  #done(entry: Entry): void {
    this.#live.delete(entry)
    if (this.#live.size > 0) return
    const waiting = this.#idle
    this.#idle = []
    for (const w of waiting) w()
  }

  /** Resolves once nothing is in flight or waiting. */
  idle(): Promise<void> {
    if (this.#live.size === 0) return Promise.resolve()
    return new Promise((resolve) => this.#idle.push(resolve))
  }
}

function noop(): void {}
