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

from stepquant.bench import SHAPE_SETS, bench_linear, cold_copies, copy_bandwidth, graph_time
from stepquant.bench import nvfp4_layer as layer
from stepquant.formats import FORMATS
from stepquant.formats import unpack_nibbles
from stepquant.kernels.linear import (
    GEMV_MAX_M,
    NVFP4Weight,
    Tiling,
    _dequant_matmul,
    _gemv_blocks,
    nvfp4_linear,
    nvfp4_linear_reference,
    nvfp4_quantize_activations,
    quantize_activations_reference,
)

SHAPES = SHAPE_SETS["step3p7"].linears


def accuracy() -> list[dict]:
    rows = []
    for name in ("expert gate 1280x4096", "attn o 4096x8192"):
        n, k = SHAPES[name]
        w, p = layer(n, k)
        for m in (1, 16, 256, 2048):
            x = (torch.randn(m, k, device="cuda") * 1.5).to(torch.bfloat16)
            isc = FORMATS["nvfp4"].input_scale(x.float().abs().amax())
            lin = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
            # how often rcp.approx moves an activation code against exact reciprocals
            q, _ = nvfp4_quantize_activations(x, isc)
            rq, _ = quantize_activations_reference(x.cpu(), float(isc))
            moved = float((unpack_nibbles(q.cpu()) != unpack_nibbles(rq)).float().mean())
            for mode in ("w4a16", "w4a4"):
                out = nvfp4_linear(x, lin, mode, torch.float32)
                ref = nvfp4_linear_reference(x, p["weight"], p["weight_scale"], p["weight_scale_2"], isc, mode)
                rel = float((out.double() - ref).norm() / ref.norm())
                out16 = nvfp4_linear(x, lin, mode)
                rel16 = float((out16.double() - ref).norm() / ref.norm())
                rows.append({"shape": name, "M": m, "mode": mode, "rel_err_vs_fp64": rel, "rel_err_bf16_out": rel16,
                             "path": "gemv" if m <= GEMV_MAX_M else "cublas",
                             "act_codes_moved_by_rcp_approx": moved if mode == "w4a4" else None})
    return rows


def _split(m: int, n: int, k: int, bm: int, bn: int, bk: int, fill: int) -> int:
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split < fill and k // (split * 2) >= 2 * bk:
        split *= 2
    return split


def sweep(which: str = "all") -> list[dict]:
    """GEMV tilings (w4a16): the one-row FMA kernel at M = 1 and the MMA kernels (Triton's and mma.sync's 2 x 2
    tiles) at M = 16 (`which`: one-row, mma or all) -- which Tiling is fastest -- and (all) where the GEMV kernel
    and the dequantize + cuBLAS path cross."""
    rows = []
    for name in ("expert gate 1280x4096", "expert down 4096x1280", "attn o 4096x8192", "attn q (full) 8192x4096"):
        n, k = SHAPES[name]
        w, p = layer(n, k)
        c16, c4 = cold_copies(2 * n * k), cold_copies(n * k * 9 // 16)
        ws = [w] + [w.clone() for _ in range(c16 - 1)]
        lins = [NVFP4Weight.from_parts(p["weight"].clone(), p["weight_scale"].clone(), p["weight_scale_2"], torch.tensor(0.01))
                for _ in range(c4)]
        configs = {1: [], 16: []}
        if which in ("all", "one-row"):
            for bn in (8, 16, 32):
                for bk in (256, 512):
                    for warps in (2, 4):
                        for stages in (5, 8):
                            for fill in (0, 512):
                                configs[1].append(Tiling("fma", 1, bn, bk, warps, _split(1, n, k, 1, bn, bk, fill), stages))
        if which in ("all", "mma"):
            for bn, warps in ((32, 2), (64, 4), (128, 4)):
                for bk in (128, 256):
                    for split in (1, 2, 8):
                        for stages in (3, 4, 6):
                            configs[16].append(Tiling("dot", 16, bn, bk, warps, split, stages))
            for warps in (1, 2, 4):
                for split in (1, 2, 4, 8, 16):
                    if k % 256 == 0 and n % 32 == 0 and k // split >= 256:
                        configs[16].append(Tiling("mma.sync", 16, 32 * warps, 256, warps, split))
        for m, cfgs in configs.items():
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            bf = graph_time(lambda i: x @ ws[i % c16].T, reps=max(20, c16)) if cfgs else 0.0
            for cfg in dict.fromkeys(cfgs):
                try:
                    ms = graph_time(lambda i: nvfp4_linear(x, lins[i % c4], "w4a16", config=cfg), reps=max(20, c4))
                except Exception as exc:  # noqa: BLE001 - a tiling that does not compile or fit
                    rows.append({"shape": name, "M": m, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                rows.append({"shape": name, "M": m, "config": cfg, "ms": ms, "x_bf16": bf / ms})
        for m in (32, 64, 128, 256) if which == "all" else ():
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            bf = graph_time(lambda i: x @ ws[i % c16].T, reps=max(20, c16))
            cfg = _gemv_blocks(m, n, k)
            g = graph_time(lambda i: nvfp4_linear(x, lins[i % c4], "w4a16", config=cfg), reps=max(20, c4))
            c = graph_time(lambda i: _dequant_matmul(x, lins[i % c4], 0, torch.bfloat16), reps=max(20, c4))
            rows.append({"shape": name, "M": m, "crossover": True, "gemv_ms": g, "cublas_ms": c, "bf16_ms": bf})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep", choices=("all", "one-row", "mma"), default="all",
                    help="which tilings to sweep: the one-row kernel's (M = 1), the MMA kernel's (M = 16), or both and the crossover")
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{dev.name}, torch {torch.__version__}, triton {triton.__version__}; copy {bw / 1e12:.2f} TB/s")
    acc = [] if args.sweep_only else accuracy()
    print("\n| shape | M | mode | path | rel. error vs fp64 (fp32 out) | (bf16 out) | act. codes moved by rcp.approx |\n|---|---|---|---|---|---|---|")
    for r in acc:
        moved = r["act_codes_moved_by_rcp_approx"]
        print(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['path']} | {r['rel_err_vs_fp64']:.2e} | {r['rel_err_bf16_out']:.2e} "
              f"| {'-' if moved is None else f'{moved:.1e}'} |")
    sp = [] if args.sweep_only else bench_linear("step3p7", bandwidth=bw)
    print("\n| shape | M | mode | ms | torch bf16 ms | x bf16 | GB/s | % roofline | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    for r in sp:
        print(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['ms']:.4f} | {r['bf16_ms']:.4f} | {r['speedup_vs_bf16']:.2f} "
              f"| {r['gb_s']:.0f} | {r['pct_copy']:.0f}% | {r['tflops']:.1f} |")
    sw = [] if args.no_sweep else sweep(args.sweep)
    best = {}
    for r in sw:
        key = (r["shape"], r["M"])
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print("\nGEMV tiling sweep (w4a16), best per shape and M:")
    for (shape, m), r in best.items():
        print(f"  {shape} M={m}: (BM, BN, BK, warps, splits, stages) = {r['config']}: {r['ms']:.4f} ms, {r['x_bf16']:.2f}x bf16")
    errors = [r for r in sw if "error" in r]
    print(f"  ({len(errors)} tilings failed{': ' + errors[0]['error'] if errors else ''})")
    print("\n| shape | M | GEMV ms | dequantize + cuBLAS ms | torch bf16 ms |\n|---|---|---|---|---|")
    for r in sw:
        if r.get("crossover"):
            print(f"| {r['shape']} | {r['M']} | {r['gemv_ms']:.4f} | {r['cublas_ms']:.4f} | {r['bf16_ms']:.4f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_linear.json").write_text(json.dumps({"device": dev.name, "copy_tb_s": bw / 1e12,
                                                                    "accuracy": acc, "speed": sp, "sweep": sw}, indent=2))


if __name__ == "__main__":
    main()
