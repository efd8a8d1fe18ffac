#!/usr/bin/env bash
# Builds the reference server for the Centrifugo-protocol tests once and
# caches it outside the repository (in $SQUALL_CACHE, default ~/.cache/squall):
#   - centrifugo-v6.9.1/centrifugo: Centrifugo v6.9.1, `go install`ed from the
#     Go module proxy (tests/centrifuge_servers.py runs it on loopback).
# A missing toolchain is reported loudly and skipped here; the tests that need
# the server then skip too, or fail under SQUALL_REQUIRE_SERVICES=1 (CI).
# A build already running (started in the background, e.g. by a provisioning
# step logging to /tmp/centrifugo-build.log) is waited for, not duplicated.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${SQUALL_CACHE:-$HOME/.cache/squall}"
VERSION="v6.9.1"
MODULE="github.com/centrifugal/centrifugo/v6"
DIR="$CACHE/centrifugo-$VERSION"
BIN="$DIR/centrifugo"
# How long to wait for a build someone else started (seconds).
WAIT_TIMEOUT="${SQUALL_CENTRIFUGO_WAIT:-1800}"
mkdir -p "$DIR"

# A `go install` of this very module and version, running now (ours or not):
# a process whose command line starts with go (not a shell that mentions it).
other_build_running() {
  pgrep -f "^([^ ]*/)?go install ${MODULE//./\\.}@${VERSION//./\\.}( |\$)" >/dev/null 2>&1
}

wait_for_other_build() {
  local waited=0
  if other_build_running; then
    echo "build-centrifugo: a build of Centrifugo $VERSION is already running" \
      "(log: /tmp/centrifugo-build.log); waiting for it (up to ${WAIT_TIMEOUT}s)"
  fi
  while other_build_running; do
    if [ "$waited" -ge "$WAIT_TIMEOUT" ]; then
      echo "build-centrifugo: gave up waiting for the running build after ${WAIT_TIMEOUT}s" >&2
      return 1
    fi
    sleep 2
    waited=$((waited + 2))
  done
  return 0
}

# Two runs of this script at once: the second waits on the first (flock).
exec 9>"$DIR/.build.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

wait_for_other_build || exit 1

if [ -x "$BIN" ]; then
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-centrifugo: Go is not installed: the Centrifugo-protocol reference tests" >&2
  echo "(Centrifugo $VERSION) will skip (install Go >= 1.26 to run them)" >&2
  echo "############################################################################" >&2
  exit 0
fi

echo "build-centrifugo: building Centrifugo $VERSION (first run only, ~3-10 min)"
# Installed into a directory of its own, then moved: the cached path only
# ever holds a whole binary.
staging="$DIR/.staging-$$"
rm -rf "$staging"
mkdir -p "$staging"
if GOBIN="$staging" go install "$MODULE@$VERSION" && [ -x "$staging/centrifugo" ]; then
  mv "$staging/centrifugo" "$BIN"
  rm -rf "$staging"
  echo "build-centrifugo: built $BIN"
  exit 0
fi
rm -rf "$staging"
echo "build-centrifugo: Centrifugo $VERSION build FAILED" >&2
exit 1
