# shellcheck shell=bash
# The Google Cloud Pub/Sub emulator (Google's own, a Java server).
# Sourced by deploy/local/services.sh; defines pubsub_up, pubsub_down, pubsub_status.
#
#   HEADWATER_PUBSUB_PORT      listen port on 127.0.0.1 (default 8085)
#   HEADWATER_PUBSUB_EMULATOR  path of the cloud-pubsub-emulator launcher (default: found
#                              in the Debian package google-cloud-cli-pubsub-emulator or
#                              in the gcloud SDK after `gcloud components install pubsub-emulator`)
#
# Clients reach it with PUBSUB_EMULATOR_HOST=127.0.0.1:8085. It keeps state in
# memory only (data dir $HEADWATER_LOCAL/pubsub holds its config), wants project
# ids like 'test-project' and topic/subscription names of 3+ characters.

_pubsub_dir() { echo "$HEADWATER_LOCAL/pubsub"; }
_pubsub_port() { echo "${HEADWATER_PUBSUB_PORT:-8085}"; }

_pubsub_find() {
  local c root
  for c in "${HEADWATER_PUBSUB_EMULATOR:-}" \
    /usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator \
    /usr/share/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  if command -v gcloud >/dev/null 2>&1; then
    root=$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)
    c="$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
    if [ -n "$root" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  fi
  return 1
}

pubsub_up() {
  local dir pidf log port emu major
  dir=$(_pubsub_dir); pidf="$dir/pubsub.pid"; log="$dir/pubsub.log"; port=$(_pubsub_port)
  mkdir -p "$dir"
  if pid_alive "$pidf"; then echo "pubsub: already running (pid $(cat "$pidf")) on 127.0.0.1:$port"; return 0; fi
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "pubsub: 127.0.0.1:$port is already in use by another process; stop it or set HEADWATER_PUBSUB_PORT" >&2
    return 1
  fi
  if ! emu=$(_pubsub_find); then
    echo "pubsub: the Pub/Sub emulator is not installed. Install it with 'gcloud components install pubsub-emulator'" >&2
    echo "pubsub:   (or the Debian/Ubuntu package google-cloud-cli-pubsub-emulator), or point HEADWATER_PUBSUB_EMULATOR at bin/cloud-pubsub-emulator" >&2
    return 1
  fi
  if ! command -v java >/dev/null 2>&1; then
    echo "pubsub: 'java' not found on PATH; the Pub/Sub emulator needs a JDK/JRE 17+" >&2
    return 1
  fi
  major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    echo "pubsub: Java ${major:-?} found, the Pub/Sub emulator needs Java 17+" >&2
    return 1
  fi
  : >"$log"
  # setsid: the launcher script and its JVM share a process group that pubsub_down stops whole.
  # -Xmx1g: with 256 MB the emulator ran out of heap (OutOfMemoryError, then no answers) after a few full
  # suites of messages that tests leave unacked in their subscriptions.
  JAVA_TOOL_OPTIONS="${JAVA_TOOL_OPTIONS:-} -Xmx1g -XX:+UseSerialGC" \
    setsid "$emu" --host=127.0.0.1 --port="$port" --data-dir="$dir" >"$log" 2>&1 </dev/null &
  echo $! >"$pidf"
  wait_port pubsub "$port" 60 "$log" || { stop_pidfile pubsub "$pidf" >/dev/null; return 1; }
  # Readiness: the emulator answers "Ok" on its HTTP root once the gRPC server is serving.
  local i
  for ((i = 0; i < 120; i++)); do
    if [ "$(curl -s --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null)" = "Ok" ]; then
      echo "pubsub: ready on 127.0.0.1:$port (pid $(cat "$pidf"), log $log); export PUBSUB_EMULATOR_HOST=127.0.0.1:$port"
      return 0
    fi
    if ! pid_alive "$pidf"; then break; fi
    sleep 0.25
  done
  echo "pubsub: emulator did not answer on http://127.0.0.1:$port/; last log lines ($log):" >&2
  tail -n 30 "$log" >&2
  stop_pidfile pubsub "$pidf" >/dev/null
  return 1
}

pubsub_down() { stop_pidfile pubsub "$(_pubsub_dir)/pubsub.pid"; }

pubsub_status() {
  local pidf; pidf="$(_pubsub_dir)/pubsub.pid"
  if pid_alive "$pidf" && [ "$(curl -s --max-time 2 "http://127.0.0.1:$(_pubsub_port)/" 2>/dev/null)" = "Ok" ]; then
    echo "pubsub: running (pid $(cat "$pidf")) on 127.0.0.1:$(_pubsub_port)"
  else
    echo "pubsub: not running"; return 1
  fi
}
