#!/usr/bin/env bash
# The skinny decode projection and the LoRA decode projection on the GPU, in one call (≤ 5 minutes): their
# device tests (GPU arms), the benchmark against cuBLAS (bench_skinny: the four Llama-3.1-8B projections ×
# m 1/4/16/32/64, then the LoRA table: projection + LoRA vs cuBLAS + shrink + expand), then
# compute-sanitizer memcheck and racecheck on both device tests' GPU arms. Expects the bundle of
# `cargo xtask gpu-bundle`; writes one log per step into OUT_DIR and prints the short results last.
# PROJECTION_SANITIZE=0 skips the sanitizers on the LoRA projection (unchanged kernels: saves ~3 device minutes).
# Usage: bash scripts/gpu/skinny.sh BUNDLE_DIR OUT_DIR
set -u
B="${1:?usage: skinny.sh BUNDLE_DIR OUT_DIR}"
O="${2:?usage: skinny.sh BUNDLE_DIR OUT_DIR}"
mkdir -p "$O"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
T="$B/tests/lora-gemm--device_skinny"
P="$B/tests/lora-gemm--device_groups"
PT=projection_matches_the_reference::gpu
. "$(dirname "$0")/lib.sh"
step test
timeout 25 "$T" --test-threads=1 --nocapture gpu > "$O/skinny_test.txt" 2>&1; echo "rc=$?" >> "$O/skinny_test.txt"
step projection-test
timeout 60 "$P" --test-threads=1 --nocapture "$PT" > "$O/projection_test.txt" 2>&1; echo "rc=$?" >> "$O/projection_test.txt"
step bench
timeout 120 "$B/bench/lora-gemm--bench_skinny" > "$O/bench_skinny.txt" 2>&1; echo "rc=$?" >> "$O/bench_skinny.txt"
step memcheck
timeout 45 compute-sanitizer --tool memcheck --print-limit 20 "$T" --test-threads=1 gpu > "$O/skinny_memcheck.txt" 2>&1
echo "rc=$?" >> "$O/skinny_memcheck.txt"
step racecheck
timeout 55 compute-sanitizer --tool racecheck --print-limit 20 "$T" --test-threads=1 gpu > "$O/skinny_racecheck.txt" 2>&1
echo "rc=$?" >> "$O/skinny_racecheck.txt"
if [ "${PROJECTION_SANITIZE:-1}" != 0 ]; then
step projection-memcheck
timeout 90 compute-sanitizer --tool memcheck --print-limit 20 "$P" --test-threads=1 "$PT" > "$O/projection_memcheck.txt" 2>&1
echo "rc=$?" >> "$O/projection_memcheck.txt"
step projection-racecheck
timeout 120 compute-sanitizer --tool racecheck --print-limit 20 "$P" --test-threads=1 "$PT" > "$O/projection_racecheck.txt" 2>&1
echo "rc=$?" >> "$O/projection_racecheck.txt"
fi
step summary
grep -E "test result|panicked|rel error|rc=" "$O/projection_test.txt" | head -30
grep -E "test result|panicked|worst error|rc=" "$O/skinny_test.txt" | head -30
cat "$O/bench_skinny.txt"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|rc=" "$O/skinny_memcheck.txt" "$O/skinny_racecheck.txt" \
  "$O/projection_memcheck.txt" "$O/projection_racecheck.txt" 2>/dev/null
