# shellcheck shell=bash
# S3 emulator: moto's server (moto[server]) on 127.0.0.1:${HEADWATER_S3_PORT:-5000}, in-memory.
# Credentials are not checked; use any key (tests use "testing"/"testing").
# Beam: --s3_endpoint_url=http://127.0.0.1:5000 --s3_access_key_id=testing --s3_secret_access_key=testing
#       --s3_region_name=us-east-1 (ingest/objectstore.py builds these).

_s3_port() { echo "${HEADWATER_S3_PORT:-5000}"; }

s3_up() {
  local dir="$HEADWATER_LOCAL/s3" port
  port=$(_s3_port)
  mkdir -p "$dir"
  if pid_alive "$dir/pid"; then echo "s3: already running (pid $(cat "$dir/pid"), http://127.0.0.1:$port)"; return 0; fi
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "s3: port $port is taken by another process; set HEADWATER_S3_PORT" >&2; return 1
  fi
  command -v moto_server >/dev/null || { echo "s3: 'moto_server' not on PATH (activate .venv; pip install 'moto[server]')" >&2; return 1; }
  setsid moto_server -H 127.0.0.1 -p "$port" >"$dir/log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  wait_port s3 "$port" 30 "$dir/log" || { stop_pidfile s3 "$dir/pid" >/dev/null; return 1; }
  wait_http s3 "http://127.0.0.1:$port/moto-api/" 20 "$dir" || return 1
  echo "s3: up at http://127.0.0.1:$port (moto)"
}

s3_down() { stop_pidfile s3 "$HEADWATER_LOCAL/s3/pid"; }

s3_status() {
  local port; port=$(_s3_port)
  if pid_alive "$HEADWATER_LOCAL/s3/pid" && curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
    echo "s3: up (pid $(cat "$HEADWATER_LOCAL/s3/pid"), http://127.0.0.1:$port)"
  else
    echo "s3: down"; return 1
  fi
}
