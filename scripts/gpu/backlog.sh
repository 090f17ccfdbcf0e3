#!/usr/bin/env bash
# Every pending GPU check of issue 13 in one call of ≤ 10 minutes, most decisive first, for sessions where
# device machines are scarce: each step writes its log straight into OUT_DIR (so a call cut at its limit
# still brings back what finished), under a timeout of its own.
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
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/lib.sh"
LOG_DIR="$O"
G="$B/tests/lora-gemm--device_groups"
S="$B/tests/lora-gemm--device_skinny"
L="$B/bench/lora-gemm--bench_layer"
la=$(ls "$A"/bench_layer_* | head -1); sa=$(ls "$A"/bench_step_* | head -1); ea=$(ls "$A"/lora-engine-* | head -1)
cs() { compute-sanitizer --tool "$1" --print-limit 20 "${@:2}"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader > "$O/card.txt"
run groups 120 "$G" --test-threads=1 --nocapture gpu
decode=(--tokens 1,16,64 --ranks 16,64 --distinct 1,4,16)
prefill=(--tokens 2048 --ranks 16 --distinct 1,16)
run layer_a 60 "$la" "${decode[@]}"
run layer_b 60 "$L" "${decode[@]}"
run prefill_a 45 "$la" "${prefill[@]}"
run prefill_b 45 "$L" "${prefill[@]}"
run prefill_b_runs 45 "$L" "${prefill[@]}" --expand-order runs
run step_a 50 "$sa"
run step_b 50 "$B/bench/lora-graph--bench_step"
run memcheck_expand 60 cs memcheck "$G" --test-threads=1 expand_item_orders_match::gpu
run racecheck_expand 60 cs racecheck "$G" --test-threads=1 expand_item_orders_match::gpu
run memcheck_fused 45 cs memcheck "$G" --test-threads=1 fused_matches_shrink_expand::gpu
run racecheck_fused 45 cs racecheck "$G" --test-threads=1 fused_matches_shrink_expand::gpu
run skinny_test 25 "$S" --test-threads=1 --nocapture gpu
run bench_skinny 120 "$B/bench/lora-gemm--bench_skinny"
run skinny_memcheck 45 cs memcheck "$S" --test-threads=1 gpu
run skinny_racecheck 55 cs racecheck "$S" --test-threads=1 gpu
run pdl_racecheck 60 cs racecheck "$G" --test-threads=1 programmatic_expand_matches::gpu
pdl=(--tokens 1,16,64 --ranks 16 --distinct 1,16)
run layer_normal 40 "$L" "${pdl[@]}"
run layer_pdl 40 "$L" "${pdl[@]}" --pdl
LORA_PDL=1 run step_pdl 50 "$B/bench/lora-graph--bench_step"
ENGINE_BIN="$ea" run engine_a 130 bash scripts/gpu/engine_bench.sh "$B" "$O/engine_a" quick
run engine_b 130 bash scripts/gpu/engine_bench.sh "$B" "$O/engine_b" quick
step summary
