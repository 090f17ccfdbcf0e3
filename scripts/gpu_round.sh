#!/usr/bin/env bash
# One GPU round on the lent machine, in one call: every bundle test suite (GPU arms), the benchmarks
# (bench_step, bench_layer, bench_attention) with PyTorch's SDPA as the peer in the same run, and
# compute-sanitizer (memcheck, racecheck) on the model kernels. Expects the bundle of
# `cargo xtask gpu-bundle` at target/gpu-bundle (carried); writes every log into $OUT/logs.tgz and
# prints the short results last. Usage: bash scripts/gpu_round.sh
set -u
B="$(pwd)/target/gpu-bundle"
L="$(mktemp -d)"
OUTDIR="${OUT:-/tmp/gpu-round-out}"; mkdir -p "$OUTDIR"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
step tests
OUT="$L" timeout 200 bash "$B/run.sh" tests > "$L/tests.txt" 2>&1; echo "rc=$?" >> "$L/tests.txt"
step bench_step
timeout 70 "$B/bench/lora-graph--bench_step" > "$L/bench_step.txt" 2>&1; echo "rc=$?" >> "$L/bench_step.txt"
step attention
OUT="$L" timeout 120 bash "$B/run.sh" attention > "$L/attention.txt" 2>&1; echo "rc=$?" >> "$L/attention.txt"
step memcheck
timeout 70 compute-sanitizer --tool memcheck --print-limit 20 "$B/tests/lora-gemm--device_model_kernels" --test-threads=1 gpu > "$L/memcheck.txt" 2>&1; echo "rc=$?" >> "$L/memcheck.txt"
step racecheck
timeout 50 compute-sanitizer --tool racecheck --print-limit 20 "$B/tests/lora-gemm--device_model_kernels" --test-threads=1 prefill > "$L/racecheck.txt" 2>&1; echo "rc=$?" >> "$L/racecheck.txt"
step bench_layer
timeout 40 "$B/bench/lora-gemm--bench_layer" > "$L/bench_layer.txt" 2>&1; echo "rc=$?" >> "$L/bench_layer.txt"
tar czf "$OUTDIR/logs.tgz" -C "$L" .
step summary
grep -E "^SUITE|bundle tests|panicked|FAILED" "$L/tests.txt" | head -40
tail -n 25 "$L/bench_step.txt"
tail -n 60 "$L/attention.txt"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|rc=" "$L/memcheck.txt" "$L/racecheck.txt"
tail -n 12 "$L/bench_layer.txt"
