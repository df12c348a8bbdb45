"""NVFP4 linear on the GPU: accuracy against fp64 references at Step-3.7 shapes, and speed against
torch BF16 and the HBM roofline (issue 4). Prints Markdown tables.

Run: python benchmarks/gpu_linear.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from stepquant.formats import FORMATS
from stepquant.kernels.linear import NVFP4Weight, nvfp4_linear, nvfp4_linear_reference

SHAPES = {  # name: (N, K) of the weight
    "attn q (full) 8192x4096": (8192, 4096),
    "attn k/v 1024x4096": (1024, 4096),
    "attn o 4096x8192": (4096, 8192),
    "dense up 11264x4096": (11264, 4096),
    "expert gate 1280x4096": (1280, 4096),
    "expert down 4096x1280": (4096, 1280),
}
MS = (1, 8, 16, 64, 256, 2048)


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def graph_time(fn, reps: int = 20) -> float:
    """Median ms of one call, from CUDA-graph replays of `reps` calls (launch gaps shrink alike for all)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") / reps


def layer(n: int, k: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    parts = FORMATS["nvfp4"].quantize(w, w.float().abs().amax())
    return w, parts


def accuracy() -> list[dict]:
    rows = []
    for name in ("expert gate 1280x4096", "attn o 4096x8192"):
        n, k = SHAPES[name]
        w, p = layer(n, k)
        for m in (1, 16, 256):
            x = (torch.randn(m, k, device="cuda") * 1.5).to(torch.bfloat16)
            isc = FORMATS["nvfp4"].input_scale(x.float().abs().amax())
            lin = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
            for mode in ("w4a16", "w4a4"):
                out = nvfp4_linear(x, lin, mode, torch.float32)
                ref = nvfp4_linear_reference(x, p["weight"], p["weight_scale"], p["weight_scale_2"], isc, mode)
                rel = float((out.double() - ref).norm() / ref.norm())
                rows.append({"shape": name, "M": m, "mode": mode, "rel_err_vs_fp64": rel})
    return rows


def speed(bw: float) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        w, p = layer(n, k)
        wbytes = n * k // 2 + n * k // 16
        for m in MS:
            xs = [(torch.randn(m, k, device="cuda")).to(torch.bfloat16) for _ in range(4)]
            isc = FORMATS["nvfp4"].input_scale(xs[0].float().abs().amax())
            lin = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
            t = {"bf16": graph_time(lambda: xs[0] @ w.T)}
            for mode in ("w4a16", "w4a4"):
                t[mode] = graph_time(lambda: nvfp4_linear(xs[1], lin, mode))
            moved = wbytes + 2 * m * k + 2 * m * n
            for mode in ("w4a16", "w4a4"):
                rows.append({"shape": name, "M": m, "mode": mode, "ms": t[mode], "bf16_ms": t["bf16"],
                             "speedup_vs_bf16": t["bf16"] / t[mode], "gb_s": moved / (t[mode] * 1e-3) / 1e9,
                             "pct_roofline": 100 * moved / (t[mode] * 1e-3) / bw,
                             "tflops": 2 * m * n * k / (t[mode] * 1e-3) / 1e12})  # fmt: skip
    return rows


def sweep() -> list[dict]:
    """Decode tilings for two shapes: which (BM, BN, BK, warps, splits, stages) is fastest."""
    rows = []
    for name in ("expert gate 1280x4096", "attn o 4096x8192"):
        n, k = SHAPES[name]
        w, p = layer(n, k)
        lin = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], torch.tensor(0.01))
        x = torch.randn(16, k, device="cuda").to(torch.bfloat16)
        bf = graph_time(lambda: x @ w.T)
        for bn in (32, 64, 128):
            for bk in (128, 256, 512):
                for warps in (4, 8):
                    for stages in (2, 4):
                        tiles = triton.cdiv(n, bn)
                        split = 1
                        while tiles * split < 264 and k // (split * 2) >= 2 * bk:
                            split *= 2
                        cfg = (16, bn, bk, warps, split, stages)
                        try:
                            ms = graph_time(lambda: nvfp4_linear(x, lin, "w4a16", config=cfg))
                        except Exception as exc:  # noqa: BLE001 - a tiling that does not compile
                            rows.append({"shape": name, "config": cfg, "error": type(exc).__name__})
                            continue
                        rows.append({"shape": name, "config": cfg, "ms": ms, "x_bf16": bf / ms})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{dev.name}, torch {torch.__version__}, triton {triton.__version__}; copy {bw / 1e12:.2f} TB/s")
    acc = accuracy()
    print("\n| shape | M | mode | rel. error vs fp64 |\n|---|---|---|---|")
    for r in acc:
        print(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['rel_err_vs_fp64']:.2e} |")
    sp = speed(bw)
    print("\n| shape | M | mode | ms | torch bf16 ms | x bf16 | GB/s | % roofline | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    for r in sp:
        print(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['ms']:.4f} | {r['bf16_ms']:.4f} | {r['speedup_vs_bf16']:.2f} "
              f"| {r['gb_s']:.0f} | {r['pct_roofline']:.0f}% | {r['tflops']:.1f} |")
    sw = sweep()
    best = {}
    for r in sw:
        if "ms" in r and (r["shape"] not in best or r["ms"] < best[r["shape"]]["ms"]):
            best[r["shape"]] = r
    print("\ndecode tiling sweep (M=16, w4a16), best per shape:")
    for r in best.values():
        print(f"  {r['shape']}: (BM, BN, BK, warps, splits, stages) = {r['config']}: {r['ms']:.4f} ms, {r['x_bf16']:.2f}x bf16")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_linear.json").write_text(json.dumps({"device": dev.name, "copy_tb_s": bw / 1e12,
                                                                    "accuracy": acc, "speed": sp, "sweep": sw}, indent=2))


if __name__ == "__main__":
    main()
