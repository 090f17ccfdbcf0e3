#!/usr/bin/env bash
# Issue 13 on the GPU. `lora_kernels.sh BUNDLE OUT` (≤ 9 minutes): the LoRA group tests' GPU arm (the fused kernel against
# shrink + expand bit for bit, Llama widths, a 2304-token capacity forced onto the fused path), the
# engine on CUDA (fused vs two launches token for token), the layer benchmark on both LoRA paths
# (bench_layer --path shrink-expand | fused; 1/16/64 tokens, ranks 16/64, 1/4/16 adapters) and the
# synthetic 32-layer step on both paths (bench_step). `lora_kernels.sh BUNDLE OUT sanitize` (≤ 3 minutes):
# compute-sanitizer memcheck and racecheck on the fused test's and the expand-order test's GPU arms. Expects the bundle of `cargo xtask gpu-bundle`; one log per step in OUT_DIR,
# the short results printed last.
# Usage: bash scripts/gpu/lora_kernels.sh BUNDLE_DIR OUT_DIR [sanitize]
set -u
B="${1:?usage: lora_kernels.sh BUNDLE_DIR OUT_DIR}"
O="${2:?usage: lora_kernels.sh BUNDLE_DIR OUT_DIR}"
mkdir -p "$O"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
G="$B/tests/lora-gemm--device_groups"
. "$(dirname "$0")/lib.sh"
LOG_DIR="$O"
if [ "${3:-}" = sanitize ]; then
  run memcheck_fused 90 compute-sanitizer --tool memcheck --print-limit 20 "$G" --test-threads=1 fused_matches_shrink_expand::gpu
  run racecheck_fused 90 compute-sanitizer --tool racecheck --print-limit 20 "$G" --test-threads=1 fused_matches_shrink_expand::gpu
  # The expand in both item orders (runs and grid-stride), Llama widths included.
  run memcheck_expand 90 compute-sanitizer --tool memcheck --print-limit 20 "$G" --test-threads=1 expand_item_orders_match::gpu
  run racecheck_expand 90 compute-sanitizer --tool racecheck --print-limit 20 "$G" --test-threads=1 expand_item_orders_match::gpu
  step summary
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|rc=" "$O"/memcheck_*.txt "$O"/racecheck_*.txt
  exit 0
fi
run groups 150 "$G" --test-threads=1 --nocapture gpu
run gpu_engine 90 "$B/tests/lora-engine--gpu_engine" --test-threads=1 --nocapture
layer=(--tokens 1,16,64 --ranks 16,64 --distinct 1,4,16)
run layer_two 90 "$B/bench/lora-gemm--bench_layer" "${layer[@]}" --path shrink-expand
run layer_fused 90 "$B/bench/lora-gemm--bench_layer" "${layer[@]}" --path fused
run step_fused 60 "$B/bench/lora-graph--bench_step"
run step_two 60 "$B/bench/lora-graph--bench_step" --path shrink-expand
step summary
grep -E "^test |test result|panicked|rc=" "$O/groups.txt" | head -30
grep -E "test result|panicked|GPU vs CPU|rc=" "$O/gpu_engine.txt"
for f in layer_two layer_fused; do echo "-- $f"; grep -vE "^$" "$O/$f.txt" | tail -n 45; done
for f in step_fused step_two; do echo "-- $f"; tail -n 25 "$O/$f.txt"; done
