#!/usr/bin/env bash
# Every pending GPU check of issue 13 in one call of ≤ 10 minutes, most decisive first, for sessions where
# device machines are scarce: each step runs under a timeout of its own and, when it ends, every log so far
# is packed again into OUT_DIR/backlog.tgz (one file: the device tool brings back only a few files per call,
# and a call cut at its limit still brings back what finished).
#  1. the LoRA group tests' GPU arms (the pipelined expand with 16-byte epilogue, the skinny tests are
#     in step 5, the programmatic-launch tests are among these);
#  2. layer A/B (bench_layer, old binaries in AB_DIR vs the bundle): decode rows and 2048 tokens, the bundle
#     also with --expand-order runs; 3. the synthetic step A/B (bench_step);
#  4. compute-sanitizer memcheck + racecheck on the expand (both item orders) and the fused kernel;
#  5. the skinny projection: device test, bench_skinny, memcheck + racecheck;
#  6. PDL: racecheck on the programmatic test, layer and step with and without it;
#  7. the engine's quick rows, old binary vs the bundle.
# Usage: bash scripts/gpu/backlog.sh BUNDLE_DIR OUT_DIR AB_DIR
set -u
B="${1:?usage: backlog.sh BUNDLE_DIR OUT_DIR AB_DIR}"
O="${2:?usage: backlog.sh BUNDLE_DIR OUT_DIR AB_DIR}"
A="${3:?usage: backlog.sh BUNDLE_DIR OUT_DIR AB_DIR}"
mkdir -p "$O"
TGZ="$O/backlog.tgz"
O="$(mktemp -d)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/lib.sh"
LOG_DIR="$O"
# lib.sh's run, then the logs packed into $TGZ.
run_saved() { run "$@"; tar czf "$TGZ" -C "$O" .; }
G="$B/tests/lora-gemm--device_groups"
S="$B/tests/lora-gemm--device_skinny"
L="$B/bench/lora-gemm--bench_layer"
la=$(ls "$A"/bench_layer_* | head -1); sa=$(ls "$A"/bench_step_* | head -1); ea=$(ls "$A"/lora-engine-* | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader > "$O/card.txt"
run_saved groups 120 "$G" --test-threads=1 --nocapture gpu
decode=(--tokens 1,16,64 --ranks 16,64 --distinct 1,4,16)
prefill=(--tokens 2048 --ranks 16 --distinct 1,16)
run_saved layer_a 60 "$la" "${decode[@]}"
run_saved layer_b 60 "$L" "${decode[@]}"
run_saved prefill_a 45 "$la" "${prefill[@]}"
run_saved prefill_b 45 "$L" "${prefill[@]}"
run_saved prefill_b_runs 45 "$L" "${prefill[@]}" --expand-order runs
run_saved step_a 50 "$sa"
run_saved step_b 50 "$B/bench/lora-graph--bench_step"
run_saved memcheck_expand 60 compute-sanitizer --tool memcheck --print-limit 20 "$G" --test-threads=1 expand_item_orders_match::gpu
run_saved racecheck_expand 60 compute-sanitizer --tool racecheck --print-limit 20 "$G" --test-threads=1 expand_item_orders_match::gpu
run_saved memcheck_fused 45 compute-sanitizer --tool memcheck --print-limit 20 "$G" --test-threads=1 fused_matches_shrink_expand::gpu
run_saved racecheck_fused 45 compute-sanitizer --tool racecheck --print-limit 20 "$G" --test-threads=1 fused_matches_shrink_expand::gpu
run_saved skinny_test 25 "$S" --test-threads=1 --nocapture gpu
run_saved bench_skinny 120 "$B/bench/lora-gemm--bench_skinny"
run_saved skinny_memcheck 45 compute-sanitizer --tool memcheck --print-limit 20 "$S" --test-threads=1 gpu
run_saved skinny_racecheck 55 compute-sanitizer --tool racecheck --print-limit 20 "$S" --test-threads=1 gpu
run_saved pdl_racecheck 60 compute-sanitizer --tool racecheck --print-limit 20 "$G" --test-threads=1 programmatic_expand_matches::gpu
pdl=(--tokens 1,16,64 --ranks 16 --distinct 1,16)
run_saved layer_normal 40 "$L" "${pdl[@]}"
run_saved layer_pdl 40 "$L" "${pdl[@]}" --pdl
LORA_PDL=1 run_saved step_pdl 50 "$B/bench/lora-graph--bench_step"
ENGINE_BIN="$ea" run_saved engine_a 130 bash scripts/gpu/engine_bench.sh "$B" "$O/engine_a" quick
run_saved engine_b 130 bash scripts/gpu/engine_bench.sh "$B" "$O/engine_b" quick
step summary
