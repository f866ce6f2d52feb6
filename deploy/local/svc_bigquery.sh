# shellcheck shell=bash
# BigQuery emulator: bqemulator (PyPI, DuckDB-backed) on 127.0.0.1:${HEADWATER_BQ_PORT:-9050} (REST)
# and 127.0.0.1:${HEADWATER_BQ_GRPC_PORT:-9060} (Storage Read/Write gRPC). Ephemeral (in-memory):
# a restart starts from an empty catalog.
#
# bqemulator runs `INSTALL spatial` (required) and `INSTALL avro` (best effort) at boot, which
# would download from extensions.duckdb.org. This machine cannot reach it, so bigquery_up first
# copies the extension files shipped in the PyPI wheels duckdb-extension-spatial==1.5.5 and
# duckdb-extension-avro==1.5.5 into DuckDB's extension directory
# (~/.duckdb/extensions/v<duckdb version>/<platform>/), where INSTALL finds them and does not
# touch the network. The wheel version must equal the duckdb version (pinned 1.5.5).

_bq_port() { echo "${HEADWATER_BQ_PORT:-9050}"; }
_bq_grpc_port() { echo "${HEADWATER_BQ_GRPC_PORT:-9060}"; }
_bq_py() { command -v python3 || command -v python; }

bigquery_install_extensions() {
  # Prints the extension directory; fails with a clear message if a wheel is missing.
  "$(_bq_py)" - <<'PY'
import filecmp, importlib.util, pathlib, shutil, sys
try:
    import duckdb
except ImportError:
    sys.exit("bigquery: python package duckdb is not installed (pip install duckdb==1.5.5)")
ver = duckdb.__version__
plat = duckdb.connect().sql("PRAGMA platform").fetchone()[0]
dest = pathlib.Path.home() / ".duckdb" / "extensions" / f"v{ver}" / plat
dest.mkdir(parents=True, exist_ok=True)
for ext in ("spatial", "avro"):
    spec = importlib.util.find_spec(f"duckdb_extension_{ext}")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"bigquery: missing PyPI package duckdb-extension-{ext}=={ver} "
                 f"(pip install duckdb-extension-{ext}=={ver})")
    pkg = pathlib.Path(list(spec.submodule_search_locations)[0])
    src = pkg / "extensions" / f"v{ver}" / f"{ext}.duckdb_extension"
    if not src.is_file():
        found = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.duckdb_extension"))
        sys.exit(f"bigquery: {src} not found: duckdb-extension-{ext} does not match duckdb {ver} (has {found})")
    target = dest / src.name
    if not (target.is_file() and filecmp.cmp(src, target, shallow=False)):
        shutil.copyfile(src, target)
# Prove DuckDB can load them offline before the emulator tries.
con = duckdb.connect()
for ext in ("spatial", "avro"):
    try:
        con.execute(f"INSTALL {ext}"); con.execute(f"LOAD {ext}")
    except duckdb.Error as exc:
        sys.exit(f"bigquery: DuckDB cannot load {ext} from {dest}: {exc}")
print(dest)
PY
}

bigquery_up() {
  local dir="$HEADWATER_LOCAL/bigquery" port grpc extdir
  port=$(_bq_port); grpc=$(_bq_grpc_port)
  mkdir -p "$dir"
  if pid_alive "$dir/pid"; then echo "bigquery: already running (pid $(cat "$dir/pid"), http://127.0.0.1:$port)"; return 0; fi
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "bigquery: port $port is taken by another process; set HEADWATER_BQ_PORT" >&2; return 1
  fi
  command -v bqemulator >/dev/null || { echo "bigquery: 'bqemulator' not on PATH (activate .venv; pip install bqemulator)" >&2; return 1; }
  extdir=$(bigquery_install_extensions) || return 1
  setsid bqemulator start --rest-host 127.0.0.1 --rest-port "$port" --grpc-host 127.0.0.1 --grpc-port "$grpc" \
    --ephemeral --log-level warning >"$dir/log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  wait_port bigquery "$port" 60 "$dir/log" || { stop_pidfile bigquery "$dir/pid" >/dev/null; return 1; }
  # Listening is not ready: wait for the REST API to answer a project-scoped list.
  wait_http bigquery "http://127.0.0.1:$port/bigquery/v2/projects/headwater-local/datasets" 30 "$dir" || return 1
  echo "bigquery: up at http://127.0.0.1:$port (gRPC 127.0.0.1:$grpc, extensions $extdir)"
}

bigquery_down() { stop_pidfile bigquery "$HEADWATER_LOCAL/bigquery/pid"; }

bigquery_status() {
  local port; port=$(_bq_port)
  if pid_alive "$HEADWATER_LOCAL/bigquery/pid" &&
     curl -fsS "http://127.0.0.1:$port/bigquery/v2/projects/headwater-local/datasets" >/dev/null 2>&1; then
    echo "bigquery: up (pid $(cat "$HEADWATER_LOCAL/bigquery/pid"), http://127.0.0.1:$port)"
  else
    echo "bigquery: down"; return 1
  fi
}
