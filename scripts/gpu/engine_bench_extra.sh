#!/usr/bin/env bash
# The rows of the engine benchmark that did not fit run 17's engine call: one tensor-parallel rank of
# Llama-3.3-70B (80 layers, 8 of 64 query heads, 1 of 8 KV heads, 1/8 of the MLP — what one of 8 GPUs
# computes, without the all-reduce) with no LoRA and with one rank-16 adapter, and the 8B churn row
# (64 adapters over 16 slots, 64 requests). Same workload as scripts/gpu/engine_bench.sh (16 concurrent,
# input 1600, output 600). Usage: bash scripts/gpu/engine_bench_extra.sh BUNDLE_DIR OUT_DIR (≈ 6 minutes).
set -u
bin="$(cd "${1:?usage: engine_bench_extra.sh BUNDLE_DIR OUT_DIR}" && pwd)/bin/lora-engine"
out="${2:?}"; mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
common=(bench --device cuda --json "$out/engine_bench.json" --copy-gbps 4150 --requests 16 --input-len 1600
  --output-len 600 --max-num-seqs 16 --max-num-batched-tokens 2048 --page-size 16 --gpu-memory-utilization 0.9
  --host-cache-mib 8192)
echo "== 70B TP rank ($(date -u +%H:%M:%S))"
timeout 60 "$bin" gen --shape llama-3.3-70b-tp8-rank --out /tmp/l70 > "$out/gen70.log" 2>&1 || echo "gen 70B rank failed rc=$?"
timeout 150 "$bin" "${common[@]}" --model /tmp/l70/model \
  --row name=70b-tp8-rank-graph-base,adapters=0,max_loras=0,max_rank=16 \
  --row name=70b-tp8-rank-graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16 \
  > "$out/bench70.txt" 2> "$out/bench70.log"; echo "bench 70B rank rc=$?"
cat "$out/bench70.txt"
rm -rf /tmp/l70
echo "== 8B churn ($(date -u +%H:%M:%S))"
timeout 70 "$bin" gen --shape llama-3.1-8b --out /tmp/llama8b > "$out/gen8.log" 2>&1 || echo "gen 8B failed rc=$?"
timeout 150 "$bin" "${common[@]}" --model /tmp/llama8b/model \
  --row name=graph-churn-64-over-16,adapters=64,ranks=16,max_loras=16,max_rank=16,requests=64 \
  > "$out/churn.txt" 2> "$out/churn.log"; echo "bench churn rc=$?"
cat "$out/churn.txt"
echo "== done ($(date -u +%H:%M:%S))"
