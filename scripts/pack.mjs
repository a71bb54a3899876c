// Packs the npm tarballs a release publishes, into ./pack/:
//   ubcache-<version>.tgz                 the JavaScript package (dist/ and the binding loader)
//   ubcache-linux-x64-gnu-<version>.tgz   the prebuilt addon for this platform
// With --verify, installs both into an empty directory with cargo removed from PATH and
// checks that require(), import and the installed `ubcache` command work.
// Run `npm run build` first.
import { execFileSync } from 'node:child_process'
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join, resolve } from 'node:path'

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..')
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const platform = 'linux-x64-gnu'
const nodeFile = `${pkg.napi.binaryName}.${platform}.node`
const outDir = join(root, 'pack')
const npmEnv = { ...process.env, npm_config_update_notifier: 'false', npm_config_fund: 'false', npm_config_audit: 'false' }

function sh(cmd, args, opts = {}) {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], env: npmEnv, ...opts })
}

function fail(msg) {
  console.error(`pack: ${msg}`)
  process.exit(1)
}

if (process.platform !== 'linux' || process.arch !== 'x64') fail(`this script packs ${platform} only, not ${process.platform}-${process.arch}`)
for (const f of ['dist/index.js', 'dist/index.mjs', 'dist/cli.js', `binding/${nodeFile}`, 'binding/index.js']) {
  if (!existsSync(join(root, f))) fail(`${f} is missing: run \`npm run build\` first`)
}

rmSync(outDir, { recursive: true, force: true })
mkdirSync(outDir)

// The platform package: its package.json comes from `napi create-npm-dirs`.
const platformDir = join(root, 'npm', platform)
copyFileSync(join(root, 'binding', nodeFile), join(platformDir, nodeFile))

// The main package, staged as `napi prepublish` leaves it: optionalDependencies on every
// platform package, and no scripts or devDependencies that need this repository.
const stage = mkdtempSync(join(tmpdir(), 'ubcache-stage-'))
try {
  const dirs = readdirSync(join(root, 'npm')).sort()
  if (dirs.length !== pkg.napi.targets.length) fail(`napi.targets (${pkg.napi.targets.join(', ')}) and npm/ (${dirs.join(', ')}) disagree`)
  const optional = Object.fromEntries(dirs.map((d) => [`${pkg.name}-${d}`, pkg.version]))
  const staged = { ...pkg, optionalDependencies: optional }
  delete staged.devDependencies
  delete staged.scripts
  delete staged.ava
  writeFileSync(join(stage, 'package.json'), JSON.stringify(staged, null, 2) + '\n')
  cpSync(join(root, 'dist'), join(stage, 'dist'), { recursive: true })
  mkdirSync(join(stage, 'binding'))
  for (const f of ['index.js', 'index.d.ts']) copyFileSync(join(root, 'binding', f), join(stage, 'binding', f))
  for (const f of ['README.md', 'LICENSE']) if (existsSync(join(root, f))) copyFileSync(join(root, f), join(stage, f))
  sh('npm', ['pack', '--silent', '--pack-destination', outDir], { cwd: stage })
  sh('npm', ['pack', '--silent', '--pack-destination', outDir], { cwd: platformDir })
} finally {
  rmSync(stage, { recursive: true, force: true })
  rmSync(join(platformDir, nodeFile), { force: true })
}
const main = join(outDir, `${pkg.name}-${pkg.version}.tgz`)
const native = join(outDir, `${pkg.name}-${platform}-${pkg.version}.tgz`)
for (const f of [main, native]) if (!existsSync(f)) fail(`${f} was not written`)
const listing = sh('tar', ['tzf', main])
if (/\.node$/m.test(listing)) fail('the main tarball must not carry a .node file')
console.log(`pack: wrote ${main}\npack: wrote ${native}`)

if (process.argv.includes('--verify')) {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-install-'))
  try {
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'ubcache-install-check', private: true }) + '\n')
    // No Rust toolchain: the prebuilt binary must be all it needs.
    const PATH = (process.env.PATH ?? '').split(delimiter).filter((p) => !existsSync(join(p, 'cargo'))).join(delimiter)
    const env = { ...npmEnv, PATH }
    try {
      execFileSync('sh', ['-c', 'command -v cargo'], { env, stdio: 'ignore' })
      fail('cargo is still on PATH')
    } catch {
      // expected: cargo is gone
    }
    sh('npm', ['install', '--silent', '--offline', '--no-package-lock', main, native], { cwd: dir, env })
    const cjs = sh(process.execPath, ['-e', "const u = require('ubcache'); console.log(u.crc64(Buffer.from('123456789')).toString(16))"], { cwd: dir, env })
    if (cjs.trim() !== '62ec59e3f1a4f00a') fail(`require('ubcache') gave ${cjs}`)
    const esm = sh(process.execPath, ['--input-type=module', '-e', "import { crc64, makeCache } from 'ubcache'; console.log(typeof makeCache, crc64(Buffer.from('123456789')).toString(16))"], { cwd: dir, env })
    if (esm.trim() !== 'function 62ec59e3f1a4f00a') fail(`import from 'ubcache' gave ${esm}`)
    const img = join(dir, 'cache.img')
    writeFileSync(img, '')
    execFileSync('truncate', ['-s', '64M', img])
    const bin = join(dir, 'node_modules', '.bin', 'ubcache')
    sh(bin, ['make', '-C', img], { cwd: dir, env })
    const shown = JSON.parse(sh(bin, ['show', '--json', img], { cwd: dir, env }))
    if (!shown.csumOk || shown.version !== 3) fail(`installed ubcache show printed ${JSON.stringify(shown)}`)
    console.log('pack: installed both tarballs without cargo; require, import and `ubcache show` work')
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
