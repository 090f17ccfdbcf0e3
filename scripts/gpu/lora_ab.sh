#!/usr/bin/env bash
# A/B of a LoRA kernel change on the GPU, in one call (≤ 9 minutes): the LoRA group tests' GPU arm of the new
# bundle, then the layer benchmark (bench_layer: 1/16/64 tokens × ranks 16/64 × 1/4/16 adapters, and 2048
# tokens × rank 16 × 1/16 adapters; the new bundle also with --expand-order runs), the synthetic 32-layer step (bench_step) and the engine's three quick rows
# (engine_bench.sh quick: no LoRA, 1 adapter, 16 distinct), each for the old build (A: binaries in AB_DIR,
# `bench_layer_*`, `bench_step_*`, `lora-engine-*`) and the new bundle (B), interleaved in the same run.
# Usage: bash scripts/gpu/lora_ab.sh BUNDLE_DIR OUT_DIR AB_DIR
set -u
B="${1:?usage: lora_ab.sh BUNDLE_DIR OUT_DIR AB_DIR}"
O="${2:?usage: lora_ab.sh BUNDLE_DIR OUT_DIR AB_DIR}"
A="${3:?usage: lora_ab.sh BUNDLE_DIR OUT_DIR AB_DIR}"
mkdir -p "$O"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/lib.sh"
LOG_DIR="$O"
la=$(ls "$A"/bench_layer_* | head -1); sa=$(ls "$A"/bench_step_* | head -1); ea=$(ls "$A"/lora-engine-* | head -1)
run groups 150 "$B/tests/lora-gemm--device_groups" --test-threads=1 gpu
decode=(--tokens 1,16,64 --ranks 16,64 --distinct 1,4,16)
prefill=(--tokens 2048 --ranks 16 --distinct 1,16)
run layer_a 90 "$la" "${decode[@]}"
run layer_b 90 "$B/bench/lora-gemm--bench_layer" "${decode[@]}"
run prefill_a 60 "$la" "${prefill[@]}"
run prefill_b 60 "$B/bench/lora-gemm--bench_layer" "${prefill[@]}"
# The new bundle only (the flag is new): the expand's other item order at prefill.
run prefill_b_runs 60 "$B/bench/lora-gemm--bench_layer" "${prefill[@]}" --expand-order runs
run step_a 70 "$sa"
run step_b 70 "$B/bench/lora-graph--bench_step"
ENGINE_BIN="$ea" run engine_a 130 bash scripts/gpu/engine_bench.sh "$B" "$O/engine_a" quick
run engine_b 130 bash scripts/gpu/engine_bench.sh "$B" "$O/engine_b" quick
step summary
grep -E "^test .*(FAILED|ok)$|test result|panicked|rc=" "$O/groups.txt" | tail -n 25
for f in layer_a layer_b prefill_a prefill_b prefill_b_runs; do echo "-- $f"; grep -E "^ +[0-9]+ +[0-9]+ +[0-9]+ \|" "$O/$f.txt"; done
for f in step_a step_b; do echo "-- $f"; grep -E "no adapter|1 adapter r16|16 adapters r16|LoRA graph" "$O/$f.txt"; done
for f in engine_a engine_b; do echo "-- $f"; grep -E "^\| graph" "$O/$f/engine_bench.txt" | cut -d'|' -f2,12-15; done
