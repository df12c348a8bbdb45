"""The floor of one kernel that only reads an NVFP4 weight's bytes (no decode, no math), timed the way `bench
kernels` times the GEMVs: HBM-cold (rotating copies), medians of CUDA-graph replays. For a 3 MB expert or k/v matrix
it shows what share of the copy bandwidth any single kernel can reach there (issue 4, BENCHMARKS.md).

Run: python benchmarks/read_floor.py
"""

from __future__ import annotations

import time
import torch
import triton
import triton.language as tl

from stepquant.bench import cold_copies, copy_bandwidth, graph_time


@triton.jit
def empty(x_ptr):
    """Nothing: the launch alone."""
    pass

@triton.jit
def read(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Each program sums ITERS blocks of int32 words (so that the loads cannot be dropped), one value out."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in tl.range(0, ITERS, num_stages=4):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(acc))


def main() -> None:
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, {time.strftime('%H:%M UTC', time.gmtime())}; copy {bw / 1e12:.2f} TB/s")
    x0 = torch.zeros(1, device="cuda")
    print(f"empty Triton kernel: {graph_time(lambda i: empty[(1,)](x0), reps=50) * 1e3:.2f} us per call")
    print(f"empty, 1024 programs: {graph_time(lambda i: empty[(1024,)](x0), reps=50) * 1e3:.2f} us per call")
    for name, n, k in (("expert gate 1280x4096", 1280, 4096), ("attn k/v 1024x4096", 1024, 4096), ("expert down 4096x1280", 4096, 1280), ("attn q 8192x4096", 8192, 4096)):
        nbytes = n * k // 2 + n * k // 16
        words = nbytes // 4
        c = cold_copies(nbytes)
        bufs = [torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32) for _ in range(c)]
        out = torch.empty(1 << 16, device="cuda", dtype=torch.int32)
        best = []
        for block in (512, 1024, 2048):
            for iters in (1, 2, 4, 8):
                grid = triton.cdiv(words, block * iters)
                for warps in (4, 8):
                    t = graph_time(lambda i: read[(grid,)](bufs[i % c], out, words, BLOCK=block, ITERS=iters, num_warps=warps), reps=max(20, c))
                    best.append((t, block, iters, warps, grid))
        best.sort()
        t = best[0][0]
        ts = graph_time(lambda i: bufs[i % c].sum(), reps=max(20, c))
        print(f"{name}: {nbytes / 1e6:.2f} MB; read-only kernel best {t * 1e3:.2f} us = {100 * nbytes / (t * 1e-3) / bw:.0f}% of copy bw "
              f"(BLOCK, ITERS, warps, grid = {best[0][1:]}); torch sum {ts * 1e3:.2f} us; 60% of roofline = {nbytes / (0.6 * bw) * 1e6:.2f} us")


if __name__ == "__main__":
    main()
