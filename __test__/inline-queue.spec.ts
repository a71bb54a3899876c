// The inline queue's batching while busy, against a stand-in for the native engine that
// records each submission and completes requests only when told to.
import test from 'ava'
import { type CompleteFn, type InlineNative, InlineQueue } from '../ts/inline'

const DESC = 7

class FakeNative implements InlineNative {
  readonly capacity = 256
  readonly chunk = 64
  readonly sq = new ArrayBuffer(256 * DESC * 8)
  readonly cq = new ArrayBuffer(64 * 2 * 8)
  /** Tags of each submission, in order. */
  readonly batches: number[][] = []
  readonly inFlight: number[] = []
  constructor(readonly onComplete: CompleteFn) {}
  submissionBuffer(): ArrayBuffer {
    return this.sq
  }
  completionBuffer(): ArrayBuffer {
    return this.cq
  }
  slab(bytes: number): [number, ArrayBuffer] {
    return [1, new ArrayBuffer(bytes)]
  }
  submit(count: number): number {
    const sq = new Float64Array(this.sq)
    const tags = Array.from({ length: count }, (_, i) => sq[i * DESC + 1])
    this.batches.push(tags)
    this.inFlight.push(...tags)
    return 0
  }
  stage(): number {
    return 0
  }
  more(): number {
    return 0
  }
  takeErrors(): string[] {
    return []
  }
  /** Completes the `n` oldest requests in flight, as the event loop would hear of them. */
  complete(n: number): void {
    const cq = new Float64Array(this.cq)
    const done = this.inFlight.splice(0, n)
    done.forEach((tag, i) => {
      cq[2 * i] = tag
      cq[2 * i + 1] = 0
    })
    this.onComplete(done.length)
  }
}

/** Lets every queued microtask run, and no timer: a held request's 1 ms timer cannot fire. */
async function turn(): Promise<void> {
  for (let i = 0; i < 20; i++) await Promise.resolve()
}

function queue(hold: boolean): { q: InlineQueue<FakeNative>; native: FakeNative } {
  let native: FakeNative | undefined
  const q = new InlineQueue((onComplete) => (native = new FakeNative(onComplete)), { holdWhileBusy: hold })
  return { q, native: native as FakeNative }
}

test('while 16 or more are in flight, a lone request waits for the next completions and goes out with what they make', async (t) => {
  const { q, native } = queue(true)
  const busy = Array.from({ length: 20 }, () => q.submit('flush', 0, 0, 0))
  await turn()
  t.is(native.batches.length, 1, 'a batch of 20 goes out at once')
  const lone = q.submit('flush', 0, 0, 0)
  await turn()
  t.is(native.batches.length, 1, 'the lone request is held')
  // A completion: its promise's follow-up makes one more request, which goes out together
  // with the held one.
  void busy[0].then(() => q.submit('flush', 0, 0, 0))
  native.complete(1)
  await turn()
  t.is(native.batches.length, 1, 'two are still held (fewer than 4)')
  // Completions that make nothing new: the held pair goes out after a few at most.
  let completions = 1
  while (native.batches.length === 1 && completions < 10) {
    native.complete(1)
    completions++
    await turn()
  }
  t.true(completions <= 4, `held through ${completions} completions`)
  t.deepEqual(
    native.batches.map((b) => b.length),
    [20, 2],
    'the held request went with the one the completion made',
  )
  native.complete(native.inFlight.length)
  await Promise.all([...busy, lone])
  t.is(q.slots.live, 0)
})

test('held requests go out after a millisecond when nothing completes', async (t) => {
  const { q, native } = queue(true)
  for (let i = 0; i < 20; i++) void q.submit('flush', 0, 0, 0)
  await turn()
  void q.submit('flush', 0, 0, 0)
  await turn()
  t.is(native.batches.length, 1, 'held')
  await new Promise((r) => setTimeout(r, 20))
  t.is(native.batches.length, 2, 'sent by the timer')
  native.complete(native.inFlight.length)
})

test('without holdWhileBusy, or with few in flight, every request goes out at its tick', async (t) => {
  for (const [hold, inFlight] of [
    [false, 20],
    [true, 8],
  ] as const) {
    const { q, native } = queue(hold)
    for (let i = 0; i < inFlight; i++) void q.submit('flush', 0, 0, 0)
    await turn()
    void q.submit('flush', 0, 0, 0)
    await turn()
    t.is(native.batches.length, 2, `hold ${hold}, ${inFlight} in flight`)
    native.complete(native.inFlight.length)
  }
})
