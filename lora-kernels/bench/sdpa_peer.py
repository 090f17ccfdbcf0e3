#!/usr/bin/env python3
"""PyTorch peer of `bench_attention` (lora-gemm/examples/bench_attention.rs): times
torch.nn.functional.scaled_dot_product_attention on the same shapes, the same way (CUDA events, warm-up,
median of individually timed calls, L2 flushed before each by a read-only reduction over 512 MB).

Decode: q [B, 32, 1, 128] against K/V [B, 8, L, 128] (enable_gqa=True), B in 1/16/64, L in 512/1900/8192;
GB/s counts the K and V bytes (B x L x 8 x 128 x 2 x 2), as the Rust benchmark does.
Prefill: causal, q [N, 32, L, 128], K/V [N, 8, L, 128], N in 1/4/16, L in 512/2048/8192 (N x L capped at
65536 tokens); TFLOP/s counts 4 x N x 32 x L^2 x 128 / 2 (QK^T and PV, causal half).

Run on the GPU machine (torch is installed there): `python3 sdpa_peer.py` (or `run.sh sdpa` in the bundle).
"""
import statistics
import sys

import torch
import torch.nn.functional as F

WARMUP, REPS = 3, 25


def timed(fn, flush):
    for _ in range(WARMUP):
        fn()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
    for e0, e1 in evs:
        flush()
        e0.record()
        fn()
        e1.record()
    torch.cuda.synchronize()
    return statistics.median(e0.elapsed_time(e1) * 1e3 for e0, e1 in evs)  # µs


def main():
    if not torch.cuda.is_available():
        print("SKIP sdpa_peer: no CUDA device visible to torch")
        return 0
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}")
    flush_buf = torch.empty(128 << 20, dtype=torch.float32, device=dev).uniform_()
    sink = torch.empty((), dtype=torch.float32, device=dev)

    def flush():
        torch.amax(flush_buf, out=sink)

    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    bws = []
    for i in range(12):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        torch.cuda.synchronize()
        if i >= 2:
            bws.append(2 * src.numel() / (e0.elapsed_time(e1) * 1e-3) / 1e9)
    copy_bw = statistics.median(bws)
    del src, dst
    print(f"copy bandwidth: {copy_bw:.0f} GB/s (1 GiB device-to-device, read + write counted, median of 10)")

    nq, nkv, hd = 32, 8, 128
    print(f"\nSDPA decode: {nq} q / {nkv} kv heads of {hd}, bf16, enable_gqa; median of {REPS}, L2 flushed before each")
    print(f"{'batch':>5} {'context':>7} {'KV MB':>10} {'µs':>9} {'GB/s':>8} {'of copy':>7}")
    for b in (1, 16, 64):
        for L in (512, 1900, 8192):
            q = torch.randn(b, nq, 1, hd, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, nkv, L, hd, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, nkv, L, hd, device=dev, dtype=torch.bfloat16)
            us = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), flush)
            byts = b * L * nkv * hd * 2 * 2
            gbs = byts / (us * 1e-6) / 1e9
            print(f"{b:>5} {L:>7} {byts / 1e6:>10.1f} {us:>9.1f} {gbs:>8.0f} {100 * gbs / copy_bw:>6.0f}%")
            del q, k, v

    print(f"\nSDPA causal prefill: {nq} q / {nkv} kv heads of {hd}, bf16, enable_gqa; median of {REPS}, L2 flushed")
    print(f"{'seqs':>5} {'tokens':>7} {'TFLOP':>8} {'µs':>10} {'TFLOP/s':>8}")
    for n in (1, 4, 16):
        for L in (512, 2048, 8192):
            if n * L > 65536:
                continue
            q = torch.randn(n, nq, L, hd, device=dev, dtype=torch.bfloat16)
            k = torch.randn(n, nkv, L, hd, device=dev, dtype=torch.bfloat16)
            v = torch.randn(n, nkv, L, hd, device=dev, dtype=torch.bfloat16)
            us = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), flush)
            flop = 4 * n * nq * L * L * hd / 2
            print(f"{n:>5} {L:>7} {flop / 1e12:>8.3f} {us:>10.1f} {flop / (us * 1e-6) / 1e12:>8.1f}")
            del q, k, v
    return 0


if __name__ == "__main__":
    sys.exit(main())
