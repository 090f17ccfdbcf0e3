#!/usr/bin/env bash
# One GPU round on the lent machine, in three calls of ≤ 10 minutes each (files of earlier calls stay on a
# warm machine): `checks` — every bundle test suite (GPU arms: device layer, LoRA groups, model kernels,
# device forward, LoRA on the device, decode graphs, the engine on CUDA), SmolLM2-135M on the GPU against
# the transformers reference (scripts/gpu/smollm2.sh: needs target/smol-a and target/smol-b carried in
# earlier calls), the attention benchmark beside PyTorch's SDPA, and compute-sanitizer (memcheck on the
# model kernels, racecheck and synccheck on decode attention, memcheck on the graph-replayed forward);
# `skinny` — the skinny decode GEMM benchmark; `lora` — issue 13's LoRA kernels (scripts/gpu/lora_kernels.sh:
# group tests, both LoRA paths in bench_layer and bench_step); `lora-sanitize` — memcheck and racecheck
# on the fused kernel; `grid` — the LoRA grids' width beside the base GEMM (scripts/gpu/lora_grid.sh); `order` — its capture order, in the step and the engine; `planned` — the planner's expand item orders, ncu on the
# expand, and the bundle's tests; `ab` — old (target/ab) vs new LoRA kernels in the
# layer, the step and the engine;
# `pdl` — the expand as a programmatic dependent launch of its shrink (scripts/gpu/lora_pdl.sh), and
# `pdl-engine` the same in the engine (engine_bench.sh pdl);
# `priority` — the LoRA branch's stream priority in bench_step and two engine rows; `engine` — the engine's reference table on the Llama-3.1-8B
# shape (scripts/gpu/engine_bench.sh); `serve` — the HTTP serving benchmark (scripts/gpu/serve_bench.sh,
# on the checkpoint the engine phase wrote).
# Expects the bundle of `cargo xtask gpu-bundle` at target/gpu-bundle (carried in the `checks` call);
# writes every log into $OUT/<phase>-logs.tgz, the JSON results into $OUT, and prints the short results.
# Usage: bash scripts/gpu_round.sh checks|engine|serve|skinny|projection|final|lora|lora-sanitize|grid|order|planned|ab|pdl|pdl-engine|priority
set -u
PHASE="${1:-checks}"
B="$(pwd)/target/gpu-bundle"
L="$(mktemp -d)"
OUTDIR="${OUT:-/tmp/gpu-round-out}"; mkdir -p "$OUTDIR"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/gpu/lib.sh"
LOG_DIR="$L"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv,noheader
case "$PHASE" in
checks)
  OUT="$L" run tests 200 bash "$B/run.sh" tests
  run smollm2 90 bash scripts/gpu/smollm2.sh "$B" "$L"
  run attention 200 bash "$B/run.sh" attention
  K="$B/tests/lora-gemm--device_model_kernels"
  run memcheck_kernels 90 compute-sanitizer --tool memcheck --print-limit 20 "$K" --test-threads=1 gpu
  run racecheck_decode 90 compute-sanitizer --tool racecheck --print-limit 20 "$K" --test-threads=1 decode_attention_matches_f64::gpu
  run synccheck_decode 90 compute-sanitizer --tool synccheck --print-limit 20 "$K" --test-threads=1 decode_attention_matches_f64::gpu
  run memcheck_graphs 60 compute-sanitizer --tool memcheck --print-limit 20 "$B/tests/lora-model--device_graphs" --test-threads=1 gpu
  step summary
  grep -E "^SUITE|bundle tests|panicked|FAILED|SKIP" "$L/tests.txt" | head -60
  tail -n 30 "$L/smollm2.txt"
  head -n 70 "$L/attention.txt"
  for f in memcheck_kernels racecheck_decode synccheck_decode memcheck_graphs; do echo "-- $f"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|rc=" "$L/$f.txt"; done
  ;;
lora)
  run lora_kernels 560 bash scripts/gpu/lora_kernels.sh "$B" "$L"
  tail -n 160 "$L/lora_kernels.txt"
  ;;
grid)
  run lora_grid 380 bash scripts/gpu/lora_grid.sh "$B" "$L"
  tail -n 80 "$L/lora_grid.txt"
  ;;
planned)
  run lora_planned 420 bash scripts/gpu/lora_grid.sh "$B" "$L" planned
  OUT="$L/tests" run tests 230 bash "$B/run.sh" tests
  tail -n 90 "$L/lora_planned.txt"
  grep -E "^SUITE|bundle tests|panicked|FAILED" "$L/tests.txt" | tail -n 45
  ;;
ab)
  # A/B of a LoRA kernel change: old binaries carried in target/ab (see scripts/gpu/lora_ab.sh).
  run lora_ab 570 bash scripts/gpu/lora_ab.sh "$B" "$L" "$(pwd)/target/ab"
  tail -n 100 "$L/lora_ab.txt"
  ;;
order)
  run lora_order 560 bash scripts/gpu/lora_grid.sh "$B" "$L" order
  cp "$L"/engine/*.json "$OUTDIR"/ 2>/dev/null
  tail -n 80 "$L/lora_order.txt"
  ;;
pdl)
  # Programmatic dependent launch of the expand (scripts/gpu/lora_pdl.sh): tests, sanitizers, layer and step A/B.
  run lora_pdl 380 bash scripts/gpu/lora_pdl.sh "$B" "$L/pdl"
  tail -n 60 "$L/lora_pdl.txt"
  ;;
pdl-engine)
  # The engine with the expand as a programmatic dependent launch (LORA_PDL=1) against normal launches.
  run engine_pdl 330 bash scripts/gpu/engine_bench.sh "$B" "$L/engine" pdl
  cp "$L"/engine/*.json "$OUTDIR"/ 2>/dev/null
  grep -E "^\| graph|^# " "$L/engine/engine_bench.txt"
  ;;
lora-sanitize)
  run lora_sanitize 200 bash scripts/gpu/lora_kernels.sh "$B" "$L" sanitize
  tail -n 20 "$L/lora_sanitize.txt"
  ;;
skinny)
  run skinny 480 bash scripts/gpu/skinny.sh "$B" "$L"
  tail -n 50 "$L/skinny.txt"
  ;;
projection)
  # The LoRA projection (issue 13 item 4): its tests, bench_skinny (base and LoRA tables), sanitizers, then
  # the engine A/B (planned path vs lora_kernels=projection).
  run skinny 330 bash scripts/gpu/skinny.sh "$B" "$L"
  run device_lora 120 "$B/tests/lora-model--device_lora" --test-threads=1 --nocapture
  run engine_projection 230 bash scripts/gpu/engine_bench.sh "$B" "$L" projection
  cp "$L"/*.json "$OUTDIR"/ 2>/dev/null
  step summary
  tail -n 75 "$L/skinny.txt"
  grep -E "^test |test result|panicked" "$L/device_lora.txt"
  tail -n 8 "$L/engine_projection.txt"
  ;;
engine)
  run engine_bench_run 440 bash scripts/gpu/engine_bench.sh "$B" "$L"
  cp "$L"/*.json "$OUTDIR"/ 2>/dev/null
  step summary
  tail -n 40 "$L/engine_bench_run.txt"
  ;;
priority)
  # The LoRA branch's stream priority (LORA_BRANCH_PRIORITY): the synthetic step and two engine rows.
  for p in normal high low; do
    LORA_BRANCH_PRIORITY=$p run "step_$p" 60 "$B/bench/lora-graph--bench_step"
  done
  run engine_priority 300 bash scripts/gpu/engine_bench.sh "$B" "$L" priority
  cp "$L"/*.json "$OUTDIR"/ 2>/dev/null
  step summary
  for p in normal high low; do echo "-- step $p"; grep -E "no adapter|1 adapter|16 adapters" "$L/step_$p.txt"; done
  tail -n 12 "$L/engine_priority.txt"
  ;;
serve)
  run serve_bench 400 bash scripts/gpu/serve_bench.sh "$B" "$L"
  cp "$L"/*.json "$OUTDIR"/ 2>/dev/null
  step summary
  tail -n 60 "$L/serve_bench.txt"
  ;;
final)
  # Every bundle suite, then the engine's projection A/B with the projection on some groups only.
  OUT="$L" run tests 260 bash "$B/run.sh" tests
  PROJ_GROUP_SETTINGS="0,1 0,1,3" run engine_projection 300 bash scripts/gpu/engine_bench.sh "$B" "$L" projection
  cp "$L"/*.json "$OUTDIR"/ 2>/dev/null
  step summary
  grep -E "^SUITE|bundle tests|panicked|FAILED|SKIP" "$L/tests.txt" | head -40
  cut -d'|' -f2,12-15 "$L/engine_bench.txt"
  ;;
*) echo "unknown phase $PHASE (checks | engine | serve | skinny | lora | lora-sanitize | priority)"; exit 2 ;;
esac
tar czf "$OUTDIR/$PHASE-logs.tgz" -C "$L" .
