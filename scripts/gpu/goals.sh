#!/usr/bin/env bash
# Issue 13's goal rows on the card the goals are written for (the H200), from one bundle, in two calls of
# ≤ 10 minutes (a warm machine keeps /tmp/llama8b between them). Each step runs under its own timeout and,
# when it ends, every log so far is packed again into OUT_DIR/goals-PHASE.tgz (a call cut at its limit
# still brings back what finished).
#   decisions — every bundle suite's GPU arms (`run.sh tests`: the programmatic graph-edge test among them),
#               then the engine's quick rows with normal launches and with LORA_PDL=1 (engine_bench.sh pdl):
#               whether PDL becomes the planner's default.
#   rows      — the layer (bench_layer: decode rows, 2048 tokens; normal vs --pdl), the synthetic 32-layer
#               step (bench_step, normal vs LORA_PDL=1), the decode projection vs cuBLAS (bench_skinny), then
#               the engine's LoRA cost attributed (engine_bench.sh share: one adapter used by 16 or 1 of 16).
# Usage: bash scripts/gpu/goals.sh BUNDLE_DIR OUT_DIR decisions|rows
set -u
B="$(cd "${1:?usage: goals.sh BUNDLE_DIR OUT_DIR PHASE}" && pwd)"
O="${2:?usage: goals.sh BUNDLE_DIR OUT_DIR PHASE}"
PHASE="${3:?usage: goals.sh BUNDLE_DIR OUT_DIR decisions|rows}"
mkdir -p "$O"
TGZ="$O/goals-$PHASE.tgz"
LOG_DIR="$(mktemp -d)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/lib.sh"
# lib.sh's run, then the logs packed into $TGZ.
run_saved() { run "$@"; tar czf "$TGZ" -C "$LOG_DIR" .; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$LOG_DIR/card.txt"
L="$B/bench/lora-gemm--bench_layer"
S="$B/bench/lora-graph--bench_step"
case "$PHASE" in
decisions)
  OUT="$LOG_DIR/tests" run_saved tests 150 bash "$B/run.sh" tests
  run_saved engine_pdl 400 bash "$(dirname "$0")/engine_bench.sh" "$B" "$LOG_DIR/engine" pdl
  step summary
  grep -E "^SUITE|bundle tests|panicked|FAILED" "$LOG_DIR/tests.txt" | tail -n 20
  grep -E "^\| graph|^# " "$LOG_DIR/engine/engine_bench.txt"
  ;;
rows)
  decode=(--tokens 1,16,64 --ranks 16,64 --distinct 1,4,16)
  run_saved layer 70 "$L" "${decode[@]}"
  run_saved prefill 60 "$L" --tokens 2048 --ranks 16 --distinct 1,16
  run_saved step 60 "$S"
  LORA_PDL=1 run_saved step_pdl 60 "$S"
  pdl=(--tokens 1,16,64 --ranks 16 --distinct 1,16)
  run_saved layer_pdl 50 "$L" "${pdl[@]}" --pdl
  run_saved bench_skinny 150 "$B/bench/lora-gemm--bench_skinny"
  run_saved engine_share 300 bash "$(dirname "$0")/engine_bench.sh" "$B" "$LOG_DIR/engine" share
  step summary
  for f in layer prefill layer_pdl; do echo "-- $f"; grep -E "^ +[0-9]+ +[0-9]+ +[0-9]+ \||copy|rc=" "$LOG_DIR/$f.txt"; done
  for f in step step_pdl; do echo "-- $f"; grep -E "no adapter|1 adapter r16|16 adapters r16|LoRA graph|rc=" "$LOG_DIR/$f.txt"; done
  echo "-- bench_skinny"; tail -n 60 "$LOG_DIR/bench_skinny.txt"
  grep -E "^\| graph" "$LOG_DIR/engine/engine_bench.txt"
  ;;
*) echo "unknown phase $PHASE (decisions|rows)"; exit 2 ;;
esac
