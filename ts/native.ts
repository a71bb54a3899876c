/**
 * The native addon, loaded through the loader napi-rs generates (which finds the prebuilt
 * `.node` of this platform, in this package or in its per-platform package).
 * @internal
 * @module
 */
// eslint-disable-next-line @typescript-eslint/no-require-imports
import native = require('../binding/index.js')

export = native
