/**
 * What the CLI's commands share: usage errors, output, the progress bar.
 * @module
 */

/** A command-line error: printed as one line, exit code 1. */
export class UsageError extends Error {}

/** Prints one line to stdout. */
export function print(line: string): void {
  process.stdout.write(line + '\n')
}

/** A one-line progress bar on stderr (when `on`: stderr is a terminal). */
export function progressBar(on: boolean): { update(total: number, left: number): void; done(): void } {
  let shown = false
  return {
    update(total, left) {
      if (!on) return
      const frac = total === 0 ? 1 : (total - left) / total
      const width = 30
      const fill = Math.round(frac * width)
      const mib = ((left * 512) / (1 << 20)).toFixed(1)
      process.stderr.write(`\rwriting back [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${(frac * 100).toFixed(0).padStart(3)}%  ${mib} MiB dirty `)
      shown = true
    },
    done() {
      if (shown) process.stderr.write('\n')
      shown = false
    },
  }
}

