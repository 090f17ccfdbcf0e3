#!/usr/bin/env bash
# Helpers the GPU round scripts source (`. scripts/gpu/lib.sh`): `step NAME` prints a timestamped header;
# `run NAME TIMEOUT COMMAND…` prints the header and runs COMMAND under `timeout`, its stdout and stderr in
# "$LOG_DIR/NAME.txt" followed by a line `rc=<exit status>` (124: timed out). The caller sets LOG_DIR.
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }
run() { # name timeout command...
  local name="$1" t="$2"; shift 2
  step "$name"
  timeout "$t" "$@" > "$LOG_DIR/$name.txt" 2>&1; echo "rc=$?" >> "$LOG_DIR/$name.txt"
}
