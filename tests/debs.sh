#!/usr/bin/env bash
# Install those of the Debian packages named that are not installed (apt-get update first,
# once, only when something is missing). Used by tests/run.sh and editors/vscode/test/setup.sh.
set -euo pipefail
need=()
for p in "$@"; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
fi
