#!/usr/bin/env bash
# Fresh-machine set-up in one command: the system tools the tests use (bcache-tools, fio,
# the NBD clients and servers),
# npm dependencies, the native addon and TypeScript build, then the built-in example
# (formats two temporary files as a cache set and shows their superblocks).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

# libssl-dev and pkg-config: the build links OpenSSL (TLS to nbds:// remotes);
# nbdkit, libnbd-bin (nbdinfo, nbdcopy, nbdfuse), qemu-utils, e2fsprogs, fuse3: the NBD tests' clients;
# chromium renders the bench harness's HTML report in its test.
packages=(libssl-dev pkg-config bcache-tools fio nbdkit libnbd-bin qemu-utils e2fsprogs fuse3 openssl chromium)
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

# libCacheSim, the independent cache simulator the simulators are checked against (PyPI).
if ! python3 -c 'import libcachesim' 2>/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    fi
  fi
  echo "setup: installing libcachesim (pip)"
  python3 -m pip install -q --break-system-packages libcachesim 2>/dev/null || python3 -m pip install -q libcachesim || echo "setup: please pip install libcachesim (the simulator cross-check needs it)" >&2
fi

npm ci --no-audit --no-fund
npm run build
node dist/cli.js example
# The bench harness's main example, briefly: 60 s of simulated Zipf reads over 100 GiB.
echo
echo '$ ubcache bench example:zipf-sim'
node dist/cli.js bench example:zipf-sim
