#!/usr/bin/env bash
# Install Prism, Beam's Go portable runner (the local streaming runner headwater uses), into
# $HEADWATER_LOCAL/bin/prism if it is not there yet. Prism must match the Beam SDK version.
#   deploy/local/install_prism.sh            # version from the installed apache-beam
#   BEAM_VERSION=2.77.0 deploy/local/install_prism.sh
# Needs Go >= 1.23 (https://go.dev/dl/). With internet access to GitHub, Beam can instead
# download a released binary itself (omit --prism_location); this script works with only
# the Go module proxy reachable.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export HEADWATER_LOCAL="${HEADWATER_LOCAL:-$ROOT/.local}"
BIN="$HEADWATER_LOCAL/bin"
if [ -x "$BIN/prism" ]; then echo "prism: already installed at $BIN/prism"; exit 0; fi
if [ -z "${BEAM_VERSION:-}" ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"; [ -x "$PY" ] || PY=python3
  BEAM_VERSION=$("$PY" -c 'import apache_beam; print(apache_beam.__version__)' 2>/dev/null) || {
    echo "prism: cannot tell the Beam version (apache_beam not importable with $PY); set BEAM_VERSION" >&2; exit 1; }
fi
mkdir -p "$BIN"
# A binary already built by `go install` for the same version (e.g. in ~/go/bin) is reused.
GOBIN_DEFAULT="$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin/prism"
if [ -x "$GOBIN_DEFAULT" ] && go version -m "$GOBIN_DEFAULT" 2>/dev/null | grep -q "sdks/v2.*v$BEAM_VERSION"; then
  cp "$GOBIN_DEFAULT" "$BIN/prism"; echo "prism: copied $GOBIN_DEFAULT (v$BEAM_VERSION) to $BIN/prism"; exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "prism: 'go' not found on PATH; install Go >= 1.23 (https://go.dev/dl/) or put a prism v$BEAM_VERSION binary at $BIN/prism" >&2
  exit 1
fi
echo "prism: go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$BEAM_VERSION -> $BIN (takes a few minutes once)"
GOBIN="$BIN" go install "github.com/apache/beam/sdks/v2/go/cmd/prism@v$BEAM_VERSION"
echo "prism: installed $BIN/prism"
