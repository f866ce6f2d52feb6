#!/usr/bin/env bash
# Local services shared by users, tests and CI: real servers as local processes.
#   deploy/local/services.sh up|down|status [service ...]
# Services: kafka pubsub gcs s3 bigquery (default: all). Each lives in
# deploy/local/svc_<name>.sh defining <name>_up, <name>_down, <name>_status.
# State (pids, logs, data) lives under $HEADWATER_LOCAL (default ./.local).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export HEADWATER_LOCAL="${HEADWATER_LOCAL:-$ROOT/.local}"
mkdir -p "$HEADWATER_LOCAL"
ALL=(kafka pubsub gcs s3 bigquery)

# shellcheck source=/dev/null
for f in "$HERE"/svc_*.sh; do [ -e "$f" ] && . "$f"; done

wait_port() {  # wait_port NAME PORT TIMEOUT_S LOGFILE
  local name=$1 port=$2 timeout=$3 log=$4 i
  for ((i = 0; i < timeout * 4; i++)); do
    if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.25
  done
  echo "services: $name did not listen on 127.0.0.1:$port within ${timeout}s; last log lines ($log):" >&2
  tail -n 30 "$log" >&2 || true
  return 1
}

wait_http() {  # wait_http NAME URL TIMEOUT_S DIR: until URL answers; else log tail, stop DIR/pid, fail
  local name=$1 url=$2 timeout=$3 dir=$4 i
  for ((i = 0; i < timeout * 4; i++)); do
    curl -fsS "$url" >/dev/null 2>&1 && return 0
    pid_alive "$dir/pid" || break
    sleep 0.25
  done
  echo "services: $name not ready at $url; last log lines ($dir/log):" >&2
  tail -n 30 "$dir/log" >&2 || true
  stop_pidfile "$name" "$dir/pid" >/dev/null
  return 1
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local pidf=$2
  if pid_alive "$pidf"; then
    local pid; pid=$(cat "$pidf")
    kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 -- -"$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
  echo "$1: stopped"
}

cmd=${1:-status}; shift || true
svcs=("$@"); [ ${#svcs[@]} -eq 0 ] && svcs=("${ALL[@]}")
rc=0
for s in "${svcs[@]}"; do
  if ! declare -F "${s}_up" >/dev/null; then echo "services: unknown service '$s' (have: ${ALL[*]})" >&2; rc=2; continue; fi
  case "$cmd" in
    up) "${s}_up" || rc=1 ;;
    down) "${s}_down" || rc=1 ;;
    status) "${s}_status" || rc=1 ;;
    *) echo "usage: $0 up|down|status [service ...]" >&2; exit 2 ;;
  esac
done
exit $rc
