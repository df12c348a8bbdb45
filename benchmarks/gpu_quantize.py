"""GPU weight quantization: correctness against the CPU formats at real sizes, and speed against the
device's copy bandwidth. One run on the device machine checks and times everything (issue 4).

Run: python benchmarks/gpu_quantize.py [--gb 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

from stepquant.bench import copy_bandwidth
from stepquant.formats import FORMATS
from stepquant.kernels import quantize as kq


def experts(e: int, i: int = 1280, h: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(e, i, h, device="cuda", generator=g, dtype=torch.float32).mul_(0.02)
    w.view(-1)[::997] *= 40  # outliers
    return w.to(torch.bfloat16)


def check_bit_identical(total_gb: float) -> dict:
    """Quantize >= total_gb of Step-shaped experts on the GPU and on the CPU; compare every byte."""
    per = 1280 * 4096 * 2
    n = int(total_gb * 1e9 // per) + 1
    done, mismatches, t_gpu, t_cpu = 0, 0, 0.0, 0.0
    nv = FORMATS["nvfp4"]
    for start in range(0, n, 32):
        w = experts(min(32, n - start), seed=start)
        for e in range(w.shape[0]):
            amax = w[e].float().abs().amax()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g = nv.quantize(w[e], amax)
            torch.cuda.synchronize()
            t_gpu += time.perf_counter() - t0
            cpu_w = w[e].cpu()
            t0 = time.perf_counter()
            c = nv.quantize(cpu_w, amax.cpu())
            t_cpu += time.perf_counter() - t0
            same = torch.equal(g["weight"].cpu(), c["weight"]) and torch.equal(
                g["weight_scale"].cpu().view(torch.uint8), c["weight_scale"].view(torch.uint8)
            )
            if e % 8 == 0:  # and the fast division against div_rn, on the GPU
                slow = kq.nvfp4_quantize(w[e], g["weight_scale_2"], fast_div=False)
                same &= torch.equal(slow[0], g["weight"]) and torch.equal(slow[1].view(torch.uint8), g["weight_scale"].view(torch.uint8))
            mismatches += not same
            done += 1
    fp8_ok = True
    for fmt in ("fp8", "fp8-block"):
        w = experts(4, seed=99)
        for e in range(4):
            amax = w[e].float().abs().amax()
            g, c = FORMATS[fmt].quantize(w[e], amax), FORMATS[fmt].quantize(w[e].cpu(), amax.cpu())
            fp8_ok &= all(torch.equal(g[s].cpu().view(torch.uint8) if g[s].element_size() == 1 else g[s].cpu(),
                                      c[s].view(torch.uint8) if c[s].element_size() == 1 else c[s]) for s in c)  # fmt: skip
    return {"experts": done, "gb": done * per / 1e9, "nvfp4_mismatching_experts": mismatches,
            "fp8_and_block_identical": bool(fp8_ok), "gpu_s": t_gpu, "cpu_s": t_cpu}  # fmt: skip


def time_kernel(shape, block_r, block_c, warps, fast=True) -> float:
    w = experts(shape[0], shape[1], shape[2])
    ws2 = (w.float().abs().amax(dim=(1, 2)) / 2688.0).contiguous()
    rows = w.reshape(-1, shape[2]).view(torch.int32)
    q = torch.empty(rows.shape[0], shape[2] // 2, dtype=torch.uint8, device="cuda")
    sf = torch.empty(rows.shape[0], shape[2] // 16, dtype=torch.uint8, device="cuda")
    grid = (triton.cdiv(rows.shape[0], block_r), triton.cdiv(shape[2], block_c))

    def run():
        kq._nvfp4_weight_kernel[grid](rows, ws2, q, sf, rows.shape[0], shape[2], shape[1],
                                      BLOCK_R=block_r, BLOCK_C=block_c, FAST_DIV=fast, num_warps=warps)  # fmt: skip

    return triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    print(f"{dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth()
    print(f"copy bandwidth (read+write): {bw / 1e12:.2f} TB/s")
    result = {"device": dev.name, "copy_tb_s": bw / 1e12}
    shape = (64, 1280, 4096)  # 64 Step experts, 671 MB of BF16
    moved = shape[0] * shape[1] * shape[2] * (2 + 0.5 + 1 / 16)
    rows = []
    variants = [(8, 512, 4, False), (8, 512, 4, True), (16, 512, 8, True), (16, 512, 4, True), (8, 1024, 8, True),
                (4, 1024, 4, True), (16, 256, 4, True), (32, 256, 8, True), (16, 1024, 8, True), (32, 512, 8, True),
                (8, 256, 2, True), (4, 512, 2, True)]  # fmt: skip
    for br, bc, wp, fast in variants:
        ms = time_kernel(shape, br, bc, wp, fast)
        rows.append({"block_r": br, "block_c": bc, "warps": wp, "fast_div": fast, "ms": ms,
                     "tb_s": moved / (ms * 1e-3) / 1e12, "pct_copy": 100 * moved / (ms * 1e-3) / bw})  # fmt: skip
    print("\n| BLOCK_R | BLOCK_C | warps | division | ms | TB/s | % of copy |\n|---|---|---|---|---|---|---|")
    for r in rows:
        div = "rcp+Newton" if r["fast_div"] else "div_rn"
        print(f"| {r['block_r']} | {r['block_c']} | {r['warps']} | {div} | {r['ms']:.3f} | {r['tb_s']:.2f} | {r['pct_copy']:.0f}% |")
    result["variants"] = rows
    check = check_bit_identical(args.gb)
    print(f"\nbit-identical check: {json.dumps(check)}")
    result["check"] = check
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_quantize.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
