#!/usr/bin/env bash
# Programmatic dependent launch of the expand after its shrink (issue 13 item 3) on the GPU, in one call
# (≤ 6 minutes): the device tests' GPU arms (programmatic and normal launches give the same bits; captured,
# the shrink → expand edge is programmatic and the replay gives the eager bits), compute-sanitizer memcheck
# and racecheck on them, then the layer benchmark (bench_layer decode rows, normal vs --pdl) and the
# synthetic 32-layer step (bench_step, normal vs LORA_PDL=1), interleaved in the same run.
# Usage: bash scripts/gpu/lora_pdl.sh BUNDLE_DIR OUT_DIR
set -u
B="${1:?usage: lora_pdl.sh BUNDLE_DIR OUT_DIR}"
O="${2:?usage: lora_pdl.sh BUNDLE_DIR OUT_DIR}"
mkdir -p "$O"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/lib.sh"
LOG_DIR="$O"
G="$B/tests/lora-gemm--device_groups"
run tests 120 "$G" --test-threads=1 --nocapture programmatic
run memcheck 120 compute-sanitizer --tool memcheck --print-limit 20 "$G" --test-threads=1 programmatic
run racecheck 150 compute-sanitizer --tool racecheck --print-limit 20 "$G" --test-threads=1 programmatic_expand_matches::gpu
decode=(--tokens 1,16,64 --ranks 16 --distinct 1,16)
run layer_normal 60 "$B/bench/lora-gemm--bench_layer" "${decode[@]}"
run layer_pdl 60 "$B/bench/lora-gemm--bench_layer" "${decode[@]}" --pdl
run step_normal 70 "$B/bench/lora-graph--bench_step"
LORA_PDL=1 run step_pdl 70 "$B/bench/lora-graph--bench_step"
step summary
grep -E "^test .*(FAILED|ok)$|test result|panicked|graph edges|rc=" "$O/tests.txt" | tail -n 20
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|rc=" "$O/memcheck.txt" "$O/racecheck.txt"
for f in layer_normal layer_pdl; do echo "-- $f"; grep -E "^ +[0-9]+ +[0-9]+ +[0-9]+ \|" "$O/$f.txt"; done
for f in step_normal step_pdl; do echo "-- $f"; grep -E "no adapter|1 adapter r16|16 adapters r16|LoRA graph" "$O/$f.txt"; done
