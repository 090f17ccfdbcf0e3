#!/usr/bin/env bash
# The issue-10 engine benchmark on the H200, from the GPU bundle (`cargo xtask gpu-bundle`).
# Usage: engine_bench.sh BUNDLE_DIR OUT_DIR   (called by scripts/gpu_round.sh with the bundle and $OUT)
#
# 1. `lora-engine gen --shape llama-3.1-8b` writes the random-weight 8B checkpoint (HF safetensors, bf16,
#    16.1 GB) to /tmp/llama8b/model and one rank-16 PEFT adapter to /tmp/llama8b/adapters/adapter-0 (for
#    scripts/gpu/serve_bench.sh); kept if already there.
# 2. Two `lora-engine bench` processes, each loading the model once and running several rows on fresh
#    engines over the same host weights (16 concurrent requests, input 1600, output 600, greedy,
#    ignore_eos, max_num_batched_tokens 2048); adapters are random rank-r LoRAs on all 7 modules, made in
#    memory on every core (the same writer `gen --adapters` uses):
#      A (the reference table): graph + 1 adapter r16, eager + 1 adapter r16, graph + no LoRA (max_loras 0)
#      B: graph + 16 distinct r16, mixed ranks 8/16/64 (16 adapters), 64 adapters r16 over 16 slots
#         (64 requests, 16 at a time: 4 waves, each wave new adapters → slot churn)
#    Every row appends one JSON object to $OUT/engine_bench.json and prints a table line; logs go to
#    $OUT/engine_bench_*.log.
#
# Time estimate (wall, H200, 16 cores): gen ≈ 30–60 s (8.0 G random values on 16 cores + 16 GB written to
# /tmp); each model load ≈ 10–30 s (16 GB read from the page cache into host memory); per row: backend
# ≈ 2–5 s (16 GB H2D + KV allocation), adapters ≈ 1–5 s (generation + pinned registration), warm-up
# < 1 s, prefill 25,600 tokens ≈ 1–3 s, decode 600 steps × 7–10 ms ≈ 5–6 s (eager with LoRA maybe 2–3×).
# A ≈ 20 + 3 × 15 ≈ 65–90 s; B ≈ 20 + 15 + 20 + 45 (4 waves) ≈ 100–130 s. Total ≈ 3–4.5 min; the timeouts
# below (gen 100 s, A 120 s, B 130 s) cap it at 6 min in the worst case (rows done before a timeout
# are already in the JSON).
set -u
bundle="$(cd "${1:?usage: engine_bench.sh BUNDLE_DIR OUT_DIR}" && pwd)"
out="${2:-${OUT:-$bundle/logs}}"
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export RUST_LOG="${RUST_LOG:-info}"
bin="$bundle/bin/lora-engine"
[ -x "$bin" ] || bin="$bundle/lora-engine"   # the bundle, or its bin/ folder
model_root="${LLAMA8B_DIR:-/tmp/llama8b}"
json="$out/engine_bench.json"
start=$(date +%s)
rc=0
stamp() { echo "[engine_bench +$(( $(date +%s) - start ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee "$out/engine_bench_gpu.txt"
if [ ! -f "$model_root/model/model.safetensors" ]; then
  stamp "gen llama-3.1-8b → $model_root"
  timeout 100 "$bin" gen --shape llama-3.1-8b --out "$model_root" --adapters 1 --ranks 16 >"$out/engine_bench_gen.log" 2>&1
  grc=$?
  if [ "$grc" -ne 0 ]; then
    stamp "gen failed (rc $grc, 124 = timeout), see engine_bench_gen.log"; tail -n 20 "$out/engine_bench_gen.log"
    exit 1
  fi
fi
du -sh "$model_root/model" 2>/dev/null
stamp "gen done"

common=(bench --model "$model_root/model" --device cuda --json "$json" --copy-gbps 4150
  --requests 16 --input-len 1600 --output-len 600 --max-num-seqs 16 --max-num-batched-tokens 2048
  --page-size 16 --gpu-memory-utilization 0.9 --host-cache-mib 8192)

stamp "bench A: graph+lora1, eager+lora1, graph+base"
timeout 120 "$bin" "${common[@]}" \
  --row name=graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16 \
  --row name=eager-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16,eager=1 \
  --row name=graph-base,adapters=0,max_loras=0,max_rank=16 \
  >"$out/engine_bench_A.txt" 2>"$out/engine_bench_A.log" || { rc=1; stamp "bench A failed or timed out"; tail -n 20 "$out/engine_bench_A.log"; }
cat "$out/engine_bench_A.txt"
stamp "bench A done"

stamp "bench B: 16 distinct r16, mixed ranks 8/16/64, 64 adapters over 16 slots"
timeout 130 "$bin" "${common[@]}" \
  --row name=graph-16distinct-r16,adapters=16,ranks=16,max_loras=16,max_rank=16 \
  --row name=graph-mixed-8-16-64,adapters=16,ranks=8/16/64,max_loras=16,max_rank=64 \
  --row name=graph-churn-64-over-16,adapters=64,ranks=16,max_loras=16,max_rank=16,requests=64 \
  >"$out/engine_bench_B.txt" 2>"$out/engine_bench_B.log" || { rc=1; stamp "bench B failed or timed out"; tail -n 20 "$out/engine_bench_B.log"; }
cat "$out/engine_bench_B.txt"
stamp "bench B done; $(wc -l <"$json" 2>/dev/null || echo 0) rows in $json"
exit $rc
