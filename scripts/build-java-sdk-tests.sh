#!/usr/bin/env bash
# Builds the centrifuge-java SDK scenario (tests/java/centrifuge) once, with
# Maven, into one self-contained jar in the cache:
#   $SQUALL_CACHE/centrifuge-java-<hash of pom.xml and sources>/scenario.jar
# (default cache ~/.cache/squall). A second run with the same sources does
# nothing. tests/integration/test_sdk_centrifuge_java.py computes the same
# hash to find it, so it never runs a stale build.
# Missing Java or Maven: a loud banner and exit 0 (those tests then skip, or
# fail under SQUALL_REQUIRE_SERVICES=1). A failed build: exit 1.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${SQUALL_CACHE:-$HOME/.cache/squall}"
SRC=tests/java/centrifuge

# The key: pom.xml, then every source file in byte order of its path.
key=$( { cat "$SRC/pom.xml"; find "$SRC/src" -type f -print0 | LC_ALL=C sort -z | xargs -0 cat; } \
  | sha256sum | cut -c1-16)
out="$CACHE/centrifuge-java-$key"
if [ -s "$out/scenario.jar" ]; then
  exit 0
fi
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-java-sdk-tests: Java 17+ and Maven are needed for the centrifuge-java" >&2
  echo "SDK tests: they will skip (apt-get install default-jdk-headless maven)" >&2
  echo "############################################################################" >&2
  exit 0
fi

echo "build-java-sdk-tests: building the centrifuge-java scenario (first run only)"
work=$(mktemp -d "${TMPDIR:-/tmp}/squall-java-sdk.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r "$SRC/pom.xml" "$SRC/src" "$work/"
if ! mvn -B -q -f "$work/pom.xml" package >"$work/build.log" 2>&1; then
  cat "$work/build.log" >&2
  echo "build-java-sdk-tests: building the centrifuge-java scenario FAILED" >&2
  exit 1
fi
mkdir -p "$out"
cp "$work/target/scenario.jar" "$out/scenario.jar.tmp" && mv "$out/scenario.jar.tmp" "$out/scenario.jar"
echo "build-java-sdk-tests: built $out/scenario.jar"
