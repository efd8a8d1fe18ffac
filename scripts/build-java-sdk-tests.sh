#!/usr/bin/env bash
# Builds the Java SDK scenarios once each, with Maven, into one self-contained
# jar apiece in the cache (default cache ~/.cache/squall):
#   tests/java/centrifuge (centrifuge-java) -> $SQUALL_CACHE/centrifuge-java-<hash>/scenario.jar
#   tests/java/pusher (pusher-java-client)  -> $SQUALL_CACHE/pusher-java-<hash>/scenario.jar
# where <hash> is of the project's pom.xml and sources. A second run with the
# same sources does nothing. tests/integration/test_sdk_centrifuge_java.py and
# test_sdk_pusher_java.py compute the same hash to find theirs, so they never
# run a stale build.
# Missing Java or Maven: a loud banner and exit 0 (those tests then skip, or
# fail under SQUALL_REQUIRE_SERVICES=1). A failed build: exit 1.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${SQUALL_CACHE:-$HOME/.cache/squall}"

# The key: pom.xml, then every source file in byte order of its path.
source_key() {
  { cat "$1/pom.xml"; find "$1/src" -type f -print0 | LC_ALL=C sort -z | xargs -0 cat; } \
    | sha256sum | cut -c1-16
}

# build NAME SRC: the scenario of SRC into $CACHE/NAME-<key>/scenario.jar.
build() {
  local name=$1 src=$2 out work
  out="$CACHE/$name-$(source_key "$src")"
  if [ -s "$out/scenario.jar" ]; then
    return 0
  fi
  echo "build-java-sdk-tests: building the $name scenario (first run only)"
  work=$(mktemp -d "${TMPDIR:-/tmp}/squall-java-sdk.XXXXXX")
  cp -r "$src/pom.xml" "$src/src" "$work/"
  if ! mvn -B -q -f "$work/pom.xml" package >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    echo "build-java-sdk-tests: building the $name scenario FAILED" >&2
    rm -rf "$work"
    return 1
  fi
  mkdir -p "$out"
  cp "$work/target/scenario.jar" "$out/scenario.jar.tmp" && mv "$out/scenario.jar.tmp" "$out/scenario.jar"
  rm -rf "$work"
  echo "build-java-sdk-tests: built $out/scenario.jar"
}

built=1
for pair in centrifuge-java:tests/java/centrifuge pusher-java:tests/java/pusher; do
  name=${pair%%:*} src=${pair#*:}
  [ -s "$CACHE/$name-$(source_key "$src")/scenario.jar" ] || built=0
done
if [ "$built" = 1 ]; then
  exit 0
fi
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-java-sdk-tests: Java 17+ and Maven are needed for the centrifuge-java" >&2
  echo "and pusher-java-client SDK tests: they will skip" >&2
  echo "(apt-get install default-jdk-headless maven)" >&2
  echo "############################################################################" >&2
  exit 0
fi

status=0
build centrifuge-java tests/java/centrifuge || status=1
build pusher-java tests/java/pusher || status=1
exit $status
