#!/usr/bin/env bash
# Fresh-machine set-up in one command: the system tools the tests use (bcache-tools, fio,
# the NBD clients and servers),
# npm dependencies, the native addon and TypeScript build, then the built-in example
# (formats two temporary files as a cache set and shows their superblocks).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

# nbdkit, libnbd-bin (nbdinfo, nbdcopy, nbdfuse), qemu-utils, e2fsprogs, fuse3: the NBD tests' clients.
packages=(bcache-tools fio nbdkit libnbd-bin qemu-utils e2fsprogs fuse3 openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else apt=(); fi
  if [ ${#apt[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]}"
    "${apt[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (needed by the interop tests)" >&2
  fi
fi

npm ci --no-audit --no-fund
npm run build
node dist/cli.js example
