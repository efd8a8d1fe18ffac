#!/usr/bin/env bash
# Builds Toxiproxy, the TCP fault-injection proxy of the chaos campaign
# (`python -m reliability.chaos`), once and caches it outside the repository
# (in $SQUALL_CACHE, default ~/.cache/squall):
#   - toxiproxy-<version>/toxiproxy-server: Shopify's Toxiproxy server,
#     `go install`ed from the Go module proxy (reliability/chaos/toxiproxy.py
#     runs it on a loopback port and drives it over its HTTP API).
# The version is pinned (TOXIPROXY_VERSION overrides it; "latest" resolves the
# newest release through the module proxy) so that the cached path names
# exactly what was built.
# A missing toolchain is reported loudly and skipped here; the chaos campaign
# and its test then skip too, or fail under SQUALL_REQUIRE_SERVICES=1 (CI).
# Two runs at once: the second waits on the first (flock), then finds the
# binary already built and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${SQUALL_CACHE:-$HOME/.cache/squall}"
MODULE="github.com/Shopify/toxiproxy/v2"
VERSION="${TOXIPROXY_VERSION:-v2.5.0}"

if ! command -v go >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-toxiproxy: Go is not installed: the chaos campaign (make chaos) and" >&2
  echo "tests/integration/test_chaos_short.py will skip (install Go >= 1.22)" >&2
  echo "############################################################################" >&2
  exit 0
fi

if [ "$VERSION" = "latest" ]; then
  VERSION=$(cd /tmp && go list -m "$MODULE@latest" 2>/dev/null | awk '{print $2}')
  if [ -z "$VERSION" ]; then
    echo "build-toxiproxy: could not resolve the latest Toxiproxy version" >&2
    exit 1
  fi
fi

DIR="$CACHE/toxiproxy-$VERSION"
BIN="$DIR/toxiproxy-server"
mkdir -p "$DIR"

exec 9>"$DIR/.build.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

if [ -x "$BIN" ]; then
  ln -sfn "$BIN" "$CACHE/toxiproxy-server" 2>/dev/null || true
  exit 0
fi

echo "build-toxiproxy: building Toxiproxy $VERSION (first run only, ~1-3 min)"
# Installed into a directory of its own, then moved: the cached path only
# ever holds a whole binary. `go install` names the binary after its package
# directory (cmd/server), hence "server".
staging="$DIR/.staging-$$"
rm -rf "$staging"
mkdir -p "$staging"
if GOBIN="$staging" go install "$MODULE/cmd/server@$VERSION" && [ -x "$staging/server" ]; then
  mv "$staging/server" "$BIN"
  rm -rf "$staging"
  ln -sfn "$BIN" "$CACHE/toxiproxy-server" 2>/dev/null || true
  echo "build-toxiproxy: built $BIN"
  exit 0
fi
rm -rf "$staging"
echo "build-toxiproxy: Toxiproxy $VERSION build FAILED" >&2
exit 1
