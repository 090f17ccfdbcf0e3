#!/usr/bin/env bash
# The serving benchmark over HTTP on the GPU (issue 11 item 7): lora-server on the random Llama-3.1-8B
# checkpoint with one random adapter, then lora-serve-bench (streaming /v1/completions, random token-id
# prompts, ignore_eos) at concurrency 1, 16 and 64, for the base model and for the adapter.
#
# Usage: bash scripts/gpu/serve_bench.sh BUNDLE_DIR OUT_DIR
#   BUNDLE_DIR holds the binaries lora-server, lora-serve-bench (and lora-engine, for `gen` when the
#   checkpoint or the adapter is missing) in bin/ (gzipped as `cargo xtask gpu-bundle` ships them:
#   unpacked here) or at its top; OUT_DIR gets serve_bench.json (one JSON object per level, JSON lines),
#   serve_bench.txt (the tables) and serve_bench_server.log.
# Inputs: the checkpoint at /tmp/llama8b/model (gen's layout, written by scripts/gpu/engine_bench.sh
#   earlier in the round; /tmp/llama8b itself also works) and a PEFT adapter: the first under
#   /tmp/llama8b-adapters or /tmp/llama8b/adapters (engine_bench.sh writes adapter-0 there); when there
#   is none this script writes one rank-16 adapter to /tmp/llama8b-adapters with
#   `lora-engine gen --no-model --adapters 1` (a few seconds); the checkpoint is generated here when
#   missing (not counted in the budget below: ~16 GB written, a minute or two).
# Overrides for a smoke run elsewhere: SERVE_BENCH_MODEL, SERVE_BENCH_ADAPTER (folders),
#   SERVE_BENCH_DEVICE (cuda), SERVE_BENCH_VOCAB (128000: prompt ids are drawn below it),
#   SERVE_BENCH_LEN_DIV (1: input and output lengths are divided by it), SERVE_BENCH_MAX_MODEL_LEN (4096).
#
# Budget, ≤ 4 minutes on one H200 (estimates from an 8B bf16 decode step of ~8 ms at batch 1, ~12 ms at
# 16 and ~25 ms at 64, prefill ~2k tokens per step at ~60 ms; every step is capped by `timeout`, so a
# slower engine loses a level rather than overrunning):
#   server start (load 16 GB from the page cache, KV allocation, graphs)   ≤ 60 s
#   per model (base, adapter):
#     c=1 :  3 prompts, 1600 in / 600 out   3 × (0.1 s + 600 × 8 ms)      ≈ 15 s, cap 25 s
#     c=16: 32 prompts, 1600 in / 600 out   2 waves × 600 × 12 ms + 25 s of prefill/…  ≈ 20 s, cap 35 s
#     c=64: 64 prompts, 1600 in / 300 out   300 × 25 ms + 50 prefill steps ≈ 12 s, cap 30 s
#   → ≤ 60 + 2 × 90 = 240 s. Env overrides: SERVE_BENCH_C16_PROMPTS, SERVE_BENCH_MAX_BATCHED.
set -u
B="$(cd "${1:?usage: serve_bench.sh BUNDLE_DIR OUT_DIR}" && pwd)"
O="${2:?usage: serve_bench.sh BUNDLE_DIR OUT_DIR}"
mkdir -p "$O"
O="$(cd "$O" && pwd)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
PORT="${SERVE_BENCH_PORT:-8011}"
URL="http://127.0.0.1:$PORT"
JSON="$O/serve_bench.json"
TXT="$O/serve_bench.txt"
SLOG="$O/serve_bench_server.log"
: > "$JSON"
: > "$TXT"
step() { echo "== serve_bench: $1 ($(date -u +%H:%M:%S))" | tee -a "$TXT"; }

# The binaries: BUNDLE_DIR/bin/NAME (gunzipped in place when shipped as NAME.gz) or BUNDLE_DIR/NAME.
for bin in lora-server lora-serve-bench lora-engine; do
  if [ -e "$B/bin/$bin.gz" ]; then gzip -d -f "$B/bin/$bin.gz" && chmod +x "$B/bin/$bin"; fi
done
if [ -x "$B/bin/lora-server" ]; then B="$B/bin"; fi
for bin in lora-server lora-serve-bench; do
  if [ ! -x "$B/$bin" ]; then echo "serve_bench: $B/$bin is missing (add it to the bundle)" | tee -a "$TXT"; exit 2; fi
done

# The checkpoint: /tmp/llama8b itself, or gen's layout /tmp/llama8b/model.
MODEL="${SERVE_BENCH_MODEL:-}"
if [ -z "$MODEL" ]; then
  for m in /tmp/llama8b /tmp/llama8b/model; do
    if [ -f "$m/config.json" ]; then MODEL="$m"; break; fi
  done
fi
if [ -z "$MODEL" ]; then
  step "no checkpoint at /tmp/llama8b: lora-engine gen --shape llama-3.1-8b --out /tmp/llama8b"
  "$B/lora-engine" gen --shape llama-3.1-8b --out /tmp/llama8b >> "$TXT" 2>&1 || { echo "gen failed" | tee -a "$TXT"; exit 2; }
  MODEL=/tmp/llama8b/model
fi
# One adapter: the first PEFT folder under /tmp/llama8b-adapters (gen writes OUT/adapters/adapter-{i}).
ADAPTER="$(find ${SERVE_BENCH_ADAPTER:-/tmp/llama8b-adapters /tmp/llama8b/adapters} -name adapter_config.json 2>/dev/null | sort | head -n 1)"
if [ -z "$ADAPTER" ]; then
  step "no adapter: lora-engine gen --shape llama-3.1-8b --out /tmp/llama8b-adapters --no-model --adapters 1"
  "$B/lora-engine" gen --shape llama-3.1-8b --out /tmp/llama8b-adapters --no-model --adapters 1 >> "$TXT" 2>&1
  ADAPTER="$(find /tmp/llama8b-adapters -name adapter_config.json 2>/dev/null | sort | head -n 1)"
  [ -n "$ADAPTER" ] || { echo "adapter gen failed" | tee -a "$TXT"; exit 2; }
fi
ADAPTER="$(dirname "$ADAPTER")"
echo "model $MODEL, adapter lora0=$ADAPTER" | tee -a "$TXT"

# Flags another engineer is adding to the CLI are passed only when this build has them.
HELP="$("$B/lora-server" --help 2>&1)"
EXTRA=()
has() { grep -q -- "$1" <<< "$HELP"; }
has "--device" && EXTRA+=(--device "${SERVE_BENCH_DEVICE:-cuda}")
has "--gpu-memory-utilization" && EXTRA+=(--gpu-memory-utilization 0.9)
echo "lora-server extra flags: ${EXTRA[*]:-none}" | tee -a "$TXT"

step "start lora-server"
"$B/lora-server" --model "$MODEL" --served-model-name base --lora-modules "lora0=$ADAPTER" \
  --host 127.0.0.1 --port "$PORT" --max-model-len "${SERVE_BENCH_MAX_MODEL_LEN:-4096}" --max-num-seqs 64 \
  --max-num-batched-tokens "${SERVE_BENCH_MAX_BATCHED:-2048}" --shutdown-timeout 2 "${EXTRA[@]}" \
  > "$SLOG" 2>&1 &
SPID=$!
stop_server() {
  if kill -0 "$SPID" 2>/dev/null; then
    kill -TERM "$SPID" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$SPID" 2>/dev/null
  fi
  wait "$SPID" 2>/dev/null
}
trap stop_server EXIT

# Waits for /health and one short request (the bench's own poll: no curl needed); gives up after 60 s
# or as soon as the server process is gone.
ready=0
for _ in $(seq 1 40); do
  if ! kill -0 "$SPID" 2>/dev/null; then break; fi
  if timeout 10 "$B/lora-serve-bench" --base-url "$URL" --model base --wait-for-server 4 --num-prompts 1 \
      --concurrency 1 --input-len 16 --output-len 4 --warmup 0 --vocab-size 250 --return-token-ids >> "$TXT" 2>&1; then
    ready=1; break
  fi
done
if [ "$ready" != 1 ]; then
  echo "serve_bench: the server did not become ready in time (or exited); server log tail:" | tee -a "$TXT"
  grep -v '^  ' "$SLOG" | tail -n 40 | tee -a "$TXT"
  exit 1
fi
echo "server ready" | tee -a "$TXT"

# One level: NAME CONCURRENCY PROMPTS INPUT OUTPUT CAP_SECONDS.
level() {
  local div="${SERVE_BENCH_LEN_DIV:-1}"
  set -- "$1" "$2" "$3" "$(($4 / div))" "$(($5 / div))" "$6"
  step "$1 concurrency $2: $3 prompts, $4 in / $5 out (cap $6 s)"
  timeout "$6" "$B/lora-serve-bench" --base-url "$URL" --model "$1" --concurrency "$2" --num-prompts "$3" \
    --input-len "$4" --output-len "$5" --vocab-size "${SERVE_BENCH_VOCAB:-128000}" --seed 1 --warmup 1 --return-token-ids --request-timeout "$6" \
    --json "$JSON" >> "$TXT" 2>&1
  echo "rc=$?" >> "$TXT"
}
for model in base lora0; do
  level "$model" 1 3 1600 600 25
  level "$model" 16 "${SERVE_BENCH_C16_PROMPTS:-32}" 1600 600 35
  level "$model" 64 64 1600 300 30
done

step "stop lora-server"
stop_server
trap - EXIT
step summary
grep -E "^==|Successful|Failed requests|Output token throughput|Mean TTFT|Median TTFT|P99 TTFT|Mean ITL|Median ITL|P99 ITL|^error|rc=" "$TXT"
echo "levels recorded: $(wc -l < "$JSON") of 6 ($JSON)"
