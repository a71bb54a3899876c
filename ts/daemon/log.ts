/**
 * The daemon's log: one line per event on stderr, as text or JSON (see {@link Logger}).
 * @module
 */

/** How log lines are written. */
export type LogFormat = 'text' | 'json'

/**
 * One line per event: `2026-12-07T10:00:00.000Z client connected client=3` in text, or
 * `{"time":…,"event":"client connected","client":3}` in JSON.
 */
export class Logger {
  constructor(
    readonly format: LogFormat = 'text',
    readonly write: (line: string) => void = (line) => void process.stderr.write(line + '\n'),
  ) {}

  event(event: string, fields: Record<string, unknown> = {}): void {
    const time = new Date().toISOString()
    if (this.format === 'json') {
      this.write(JSON.stringify({ time, event, ...fields }))
      return
    }
    const parts = Object.entries(fields).map(([k, v]) => `${k}=${typeof v === 'string' && !/\s/.test(v) ? v : JSON.stringify(v)}`)
    this.write([time, event, ...parts].join(' '))
  }
}
