#!/usr/bin/env bash
# The issue-10 engine benchmark on the H200, from the GPU bundle (`cargo xtask gpu-bundle`).
# Usage: engine_bench.sh BUNDLE_DIR OUT_DIR [table|quick|order|priority|projection|pdl|share]   (called by scripts/gpu_round.sh with the bundle and $OUT)
#
# 1. `lora-engine gen --shape llama-3.1-8b` writes the random-weight 8B checkpoint (HF safetensors, bf16,
#    16.1 GB) to /tmp/llama8b/model and one rank-16 PEFT adapter to /tmp/llama8b/adapters/adapter-0 (for
#    scripts/gpu/serve_bench.sh); kept if already there.
# 2. One `lora-engine bench` process: the model is loaded once, then each row runs on a fresh engine and
#    backend over the same host weights (16 concurrent requests, input 1600, output 600, greedy,
#    ignore_eos, max_num_batched_tokens 2048, KV from 0.9 of the free memory); adapters are random rank-r
#    LoRAs on all 7 modules, made in memory on every core. Rows, in this order:
#      graph + 1 adapter r16, graph + no LoRA (max_loras 0), graph + 1 adapter r16 on the fused LoRA
#      kernel (`lora_kernels=fused`, its A/B), eager + 1 adapter r16,
#      graph + 16 distinct r16, the same on the fused kernel, mixed ranks 8/16/64 (16 adapters), 64 adapters r16 over 16 slots
#      (64 requests, 16 at a time: 4 waves, each wave needs new adapters → slot churn).
#    Every row appends one JSON object to $OUT/engine_bench.json and prints a table line
#    ($OUT/engine_bench.txt); the log is $OUT/engine_bench.log.
#
# Time estimate (wall, H200 host with 16 cores). Measured on the 2-core dev box (shared, busy):
# `gen --shape llama-3.2-1b` 2.47 GB in 19 s; load_model of it 9.7 s (0.25 GB/s, one thread).
#   gen 8B: 8.0 G values on 16 cores + 16 GB written                      ≈ 20–40 s (cap 80 s)
#   load 8B once: 16 GB at 0.25–1 GB/s (the loader is single-threaded)    ≈ 16–65 s
#   per row: backend 16 GB converted + H2D ≈ 5–10 s, adapters ≈ 1–5 s, warm-up < 1 s,
#            prefill 25,600 tokens ≈ 1–3 s, decode 600 steps × 7–10 ms ≈ 5–6 s (eager + LoRA maybe 2–3×)
#   rows: 5 × ≈ 15–25 s + churn (4 waves) ≈ 35–50 s                        ≈ 110–175 s
#   measured: run 18 ≈ 30 s per row, 25 of them the backend build; since run 20 the build takes 2–3 s,
#   so 8 rows ≈ 1.5–2 min after the 15 s model load;
#   the caps (gen 80 s, bench 330 s) bound it at 7 min.
set -u
bundle="$(cd "${1:?usage: engine_bench.sh BUNDLE_DIR OUT_DIR}" && pwd)"
out="${2:-${OUT:-$bundle/logs}}"
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export RUST_LOG="${RUST_LOG:-info}"
bin="${ENGINE_BIN:-$bundle/bin/lora-engine}"   # ENGINE_BIN: another build, for A/B runs
[ -x "$bin" ] || bin="$bundle/lora-engine"   # the bundle, or its bin/ folder
model_root="${LLAMA8B_DIR:-/tmp/llama8b}"
json="$out/engine_bench.json"
start=$(date +%s)
rc=0
stamp() { echo "[engine_bench +$(( $(date +%s) - start ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee "$out/engine_bench_gpu.txt"
if [ ! -f "$model_root/model/model.safetensors" ]; then
  stamp "gen llama-3.1-8b → $model_root"
  timeout 80 "$bin" gen --shape llama-3.1-8b --out "$model_root" --adapters 1 --ranks 16 >"$out/engine_bench_gen.log" 2>&1
  grc=$?
  if [ "$grc" -ne 0 ]; then
    stamp "gen failed (rc $grc, 124 = timeout), see engine_bench_gen.log"; tail -n 20 "$out/engine_bench_gen.log"
    rm -rf "$model_root/model"   # never leave a partial checkpoint for the next run
    exit 1
  fi
fi
du -sh "$model_root/model" 2>/dev/null
stamp "gen done"

common=(bench --model "$model_root/model" --device cuda --json "$json" --copy-gbps 4150
  --requests 16 --input-len 1600 --output-len 600 --max-num-seqs 16 --max-num-batched-tokens 2048
  --page-size 16 --gpu-memory-utilization 0.9 --host-cache-mib 8192)

# One process, one model load; rows in order of importance (each appends its JSON line when done, so a
# timeout loses only the rows not yet run). ROWSET (third argument): `table` (default, the reference table
# with the fused-kernel A/B rows), `quick` (no LoRA, one adapter, 16 distinct), `order` (the LoRA branch's capture
# order and grid cap: ORDER_SETTINGS="order:cap …", cap 0 = planned) or `priority` (the LoRA branch's stream priority: two rows at normal
# priority, then a second process with LORA_BRANCH_PRIORITY=high for the same two rows) or `projection` (the
# LoRA projection's A/B: no LoRA, then 1 adapter and 16 distinct, each planned and `lora_kernels=projection`)
# or `pdl` (the three quick rows, then a second process with LORA_PDL=1 for the two LoRA rows) or `share`
# (the quick rows and one adapter used by one request of 16).
rowset="${3:-table}"
# The quick rows: no LoRA, one adapter, 16 distinct (the `quick` rowset, and the baseline of `pdl`).
quick_rows=(--row name=graph-base,adapters=0,max_loras=0,max_rank=16
            --row name=graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16
            --row name=graph-16distinct-r16,adapters=16,ranks=16,max_loras=16,max_rank=16)
if [ "$rowset" = quick ]; then
  stamp "bench: 3 rows (no LoRA, 1 adapter, 16 distinct)"
  timeout 150 "$bin" "${common[@]}" "${quick_rows[@]}" >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
  brc=$?
elif [ "$rowset" = share ]; then
  # Attribution of the LoRA cost at one adapter: the quick rows (the adapter used by all 16 requests), then
  # the same adapter used by one of them (share 1/16: every LoRA kernel runs with one one-token tile).
  stamp "bench: 4 rows (no LoRA, 1 adapter, 16 distinct, 1 adapter on 1 of 16 requests)"
  timeout 200 "$bin" "${common[@]}" "${quick_rows[@]}" \
    --row name=graph-lora1-r16-1of16,adapters=1,ranks=16,max_loras=1,max_rank=16,share=0.0625 \
    >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
  brc=$?
elif [ "$rowset" = projection ]; then
  # The LoRA projection (base projection and LoRA in one launch at decode) against the planner's path.
  stamp "bench: 5 rows (no LoRA; 1 adapter and 16 distinct, planned and lora_kernels=projection)"
  timeout 200 "$bin" "${common[@]}" --row name=graph-base,adapters=0,max_loras=0,max_rank=16 \
    --row name=graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16 \
    --row name=graph-lora1-r16-projection,adapters=1,ranks=16,max_loras=1,max_rank=16,lora_kernels=projection \
    --row name=graph-16distinct-r16,adapters=16,ranks=16,max_loras=16,max_rank=16 \
    --row name=graph-16distinct-r16-projection,adapters=16,ranks=16,max_loras=16,max_rank=16,lora_kernels=projection \
    >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
  brc=$?
  # PROJ_GROUP_SETTINGS="0,1 0,1,3": one more process per setting, the projection on those groups only.
  for groups in ${PROJ_GROUP_SETTINGS:-}; do
    stamp "bench: projection on groups $groups"
    echo "# LORA_PROJECTION_GROUPS=$groups" >>"$out/engine_bench.txt"
    LORA_PROJECTION_GROUPS=$groups timeout 90 "$bin" "${common[@]}" \
      --row name=graph-lora1-r16-projection-g${groups//,/-},adapters=1,ranks=16,max_loras=1,max_rank=16,lora_kernels=projection \
      --row name=graph-16distinct-r16-projection-g${groups//,/-},adapters=16,ranks=16,max_loras=16,max_rank=16,lora_kernels=projection \
      >>"$out/engine_bench.txt" 2>>"$out/engine_bench.log"
    brc=$(( brc | $? ))
  done
elif [ "$rowset" = pdl ]; then
  # The expand as a programmatic dependent launch of its shrink (LORA_PDL=1) against normal launches.
  stamp "bench: 3 rows with normal launches"
  timeout 150 "$bin" "${common[@]}" "${quick_rows[@]}" >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
  brc=$?
  stamp "bench: 2 rows with LORA_PDL=1"
  echo "# LORA_PDL=1" >>"$out/engine_bench.txt"
  LORA_PDL=1 timeout 130 "$bin" "${common[@]}" \
    --row name=graph-lora1-r16-pdl,adapters=1,ranks=16,max_loras=1,max_rank=16 \
    --row name=graph-16distinct-r16-pdl,adapters=16,ranks=16,max_loras=16,max_rank=16 \
    >>"$out/engine_bench.txt" 2>>"$out/engine_bench.log"
  brc=$(( brc | $? ))
elif [ "$rowset" = priority ]; then
  rows=(--row name=graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16
        --row name=graph-16distinct-r16,adapters=16,ranks=16,max_loras=16,max_rank=16)
  stamp "bench: 2 rows at normal branch priority"
  timeout 150 "$bin" "${common[@]}" --row name=graph-base,adapters=0,max_loras=0,max_rank=16 "${rows[@]}" \
    >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
  brc=$?
  stamp "bench: 2 rows at high branch priority"
  rows=(--row name=graph-lora1-r16-high,adapters=1,ranks=16,max_loras=1,max_rank=16
        --row name=graph-16distinct-r16-high,adapters=16,ranks=16,max_loras=16,max_rank=16)
  LORA_BRANCH_PRIORITY=high timeout 130 "$bin" "${common[@]}" "${rows[@]}" \
    >>"$out/engine_bench.txt" 2>>"$out/engine_bench.log"
  brc=$(( brc | $? ))
elif [ "$rowset" = order ]; then
  # The LoRA branch's capture order and grid width (LORA_BRANCH_ORDER, LORA_GRID_CAP): one process per
  # setting, the same two LoRA rows each, the no-LoRA row once.
  rows=(--row name=graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16
        --row name=graph-16distinct-r16,adapters=16,ranks=16,max_loras=16,max_rank=16)
  stamp "bench: lora-first (default)"
  timeout 110 "$bin" "${common[@]}" --row name=graph-base,adapters=0,max_loras=0,max_rank=16 "${rows[@]}" \
    >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
  brc=$?
  for setting in ${ORDER_SETTINGS:-base-first:0 base-first:132}; do
    order="${setting%%:*}"; cap="${setting##*:}"; [ "$cap" = 0 ] && cap=""
    stamp "bench: order $order, grid cap ${cap:-planned}"
    echo "# LORA_BRANCH_ORDER=$order LORA_GRID_CAP=${cap:-planned}" >>"$out/engine_bench.txt"
    LORA_BRANCH_ORDER=$order LORA_GRID_CAP=$cap timeout 90 "$bin" "${common[@]}" "${rows[@]}" \
      >>"$out/engine_bench.txt" 2>>"$out/engine_bench.log"
    brc=$(( brc | $? ))
  done
else
stamp "bench: 8 rows"
timeout 330 "$bin" "${common[@]}" \
  --row name=graph-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16 \
  --row name=graph-base,adapters=0,max_loras=0,max_rank=16 \
  --row name=graph-lora1-r16-fused,adapters=1,ranks=16,max_loras=1,max_rank=16,lora_kernels=fused \
  --row name=eager-lora1-r16,adapters=1,ranks=16,max_loras=1,max_rank=16,eager=1 \
  --row name=graph-16distinct-r16,adapters=16,ranks=16,max_loras=16,max_rank=16 \
  --row name=graph-16distinct-r16-fused,adapters=16,ranks=16,max_loras=16,max_rank=16,lora_kernels=fused \
  --row name=graph-mixed-8-16-64,adapters=16,ranks=8/16/64,max_loras=16,max_rank=64 \
  --row name=graph-churn-64-over-16,adapters=64,ranks=16,max_loras=16,max_rank=16,requests=64 \
  >"$out/engine_bench.txt" 2>"$out/engine_bench.log"
brc=$?
fi
[ "$brc" -ne 0 ] && { rc=1; stamp "bench failed (rc $brc, 124 = timeout)"; grep -E "ERROR|error|panicked" "$out/engine_bench.log" | head -n 20; }
cat "$out/engine_bench.txt"
grep -E "model loaded|backend cuda|random adapters|warm-up" "$out/engine_bench.log" | sed 's/\x1b\[[0-9;]*m//g' | head -n 30
stamp "bench done; $(wc -l <"$json" 2>/dev/null || echo 0) rows in $json"
exit $rc
