#!/usr/bin/env bash
# How wide should the LoRA branch beside the base GEMM be (issue 13)? One call (≤ 6 minutes): the capped-grid
# test's GPU arm (bits of capped grids = bits of the planned grids), the synthetic 32-layer step
# (bench_step) with the planner's grids and with every persistent LoRA grid cut to 132/66/33/16 blocks
# (`--grid-cap`), the layer alone (bench_layer, 16 tokens, rank 16, 1 and 16 adapters) with the same caps,
# then Nsight Compute on the layer's LoRA kernels (per-kernel time, cold caches) and on cuBLAS's decode
# GEMMs (grid, block, registers, shared memory: what the LoRA blocks must share an SM with).
# `lora_grid.sh BUNDLE OUT order` (≤ 8 minutes): the capture order of the branch (LORA_BRANCH_ORDER=base-first)
# with the planned grid and caps of 144/132/96 blocks in bench_step, then the engine (engine_bench.sh order).
# `lora_grid.sh BUNDLE OUT planned` (≤ 7 minutes): the group tests, the layer with the planner's expand item
# orders (decode and prefill), and Nsight Compute on the expand and the shrink at 16 distinct adapters.
# Usage: bash scripts/gpu/lora_grid.sh BUNDLE_DIR OUT_DIR [order|planned]
set -u
B="${1:?usage: lora_grid.sh BUNDLE_DIR OUT_DIR}"
O="${2:?usage: lora_grid.sh BUNDLE_DIR OUT_DIR}"
mkdir -p "$O"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
. "$(dirname "$0")/lib.sh"
LOG_DIR="$O"
CAPS="${GRID_CAPS:-132 66 33 16}"
if [ "${3:-}" = order ]; then
  # Second round: the capture order (LORA_BRANCH_ORDER) × grid caps in the step, then the engine.
  run step_lora_first 70 "$B/bench/lora-graph--bench_step"
  for c in ${ORDER_CAPS:-0 144 132 96}; do
    if [ "$c" = 0 ]; then a=(); else a=(--grid-cap "$c"); fi
    LORA_BRANCH_ORDER=base-first run "step_base_first_cap$c" 70 "$B/bench/lora-graph--bench_step" "${a[@]}"
  done
  run engine_order 330 bash scripts/gpu/engine_bench.sh "$B" "$O/engine" order
  step summary
  for f in "$O"/step_*.txt; do echo "-- $(basename "$f")"; grep -E "grid cap|order|no adapter|1 adapter|16 adapters|LoRA graph" "$f"; done
  tail -n 25 "$O/engine_order.txt"
  exit 0
fi
if [ "${3:-}" = planned ]; then
  # Third round: the planner's item orders (runs at decode, grid-stride at prefill) in the layer, and why
  # the expand at 16 distinct adapters is slow (Nsight Compute: warp states and memory of gate_up's expand).
  run groups 150 "$B/tests/lora-gemm--device_groups" --test-threads=1 gpu
  run layer_decode 90 "$B/bench/lora-gemm--bench_layer" --tokens 1,16,64 --ranks 16,64 --distinct 1,4,16
  run layer_prefill 60 "$B/bench/lora-gemm--bench_layer" --tokens 2048 --ranks 16 --distinct 1,16
  for k in 0 1 2 3; do
    run "ncu_expand16_$k" 90 ncu --clock-control none --section LaunchStats --section Occupancy \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section SpeedOfLight \
      --kernel-name lora_expand --launch-skip "$k" --launch-count 1 \
      "$B/bench/lora-gemm--bench_layer" --tokens 16 --ranks 16 --distinct 16
  done
  run ncu_shrink16 90 ncu --clock-control none --section WarpStateStats --section SpeedOfLight \
    --kernel-name regex:lora_shrink --launch-skip 2 --launch-count 1 \
    "$B/bench/lora-gemm--bench_layer" --tokens 16 --ranks 16 --distinct 16
  step summary
  grep -E "test result|panicked|rc=" "$O/groups.txt"
  for f in layer_decode layer_prefill; do echo "-- $f"; grep -E "^ +[0-9]+ +[0-9]+ +[0-9]+ \|" "$O/$f.txt"; done
  for f in "$O"/ncu_*.txt; do echo "-- $(basename "$f")"; grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Stall|Warp Cycles Per Issued|Issued Warp|L1/TEX Hit|L2 Hit|Registers|Grid Size|Waves" "$f" | head -24; done
  exit 0
fi
run capped_test 90 "$B/tests/lora-gemm--device_groups" --test-threads=1 capped_grids_match_planned_grids::gpu
run step_planned 70 "$B/bench/lora-graph--bench_step"
for c in $CAPS; do run "step_cap$c" 70 "$B/bench/lora-graph--bench_step" --grid-cap "$c"; done
layer=(--tokens 16 --ranks 16 --distinct 1,16)
run layer_planned 40 "$B/bench/lora-gemm--bench_layer" "${layer[@]}"
for c in $CAPS; do run "layer_cap$c" 40 "$B/bench/lora-gemm--bench_layer" "${layer[@]}" --grid-cap "$c"; done
M=gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers,launch__occupancy_limit_blocks,dram__bytes_read.sum,sm__cycles_active.avg
run ncu_lora 120 ncu --clock-control none --metrics "$M" --csv --kernel-name regex:'lora_' --launch-count 24 \
  "$B/bench/lora-gemm--bench_layer" --tokens 16 --ranks 16 --distinct 1
run ncu_lora16 120 ncu --clock-control none --metrics "$M" --csv --kernel-name regex:'lora_' --launch-count 24 \
  "$B/bench/lora-gemm--bench_layer" --tokens 16 --ranks 16 --distinct 16
run ncu_cublas 120 ncu --clock-control none --metrics "$M" --csv --kernel-name regex:'nvjet|cutlass|xmma|sm90_|gemv|splitK' \
  --launch-count 60 "$B/bench/lora-gemm--bench_skinny"
step summary
grep -E "test result|panicked|rc=" "$O/capped_test.txt"
for f in step_planned $(for c in $CAPS; do echo step_cap$c; done); do
  echo "-- $f"; grep -E "grid cap|no adapter|1 adapter|16 adapters|LoRA graph" "$O/$f.txt"; done
for f in layer_planned $(for c in $CAPS; do echo layer_cap$c; done); do
  echo "-- $f"; grep -E "^ +16 +16 +(1|16) \|" "$O/$f.txt"; done
for f in ncu_lora ncu_lora16 ncu_cublas; do
  echo "-- $f"; grep -c '"' "$O/$f.txt"; tail -n 3 "$O/$f.txt" | cut -c1-300; done
