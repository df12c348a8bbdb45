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

from stepquant.bench import SHAPE_SETS, bench_linear, copy_bandwidth, graph_time
from stepquant.bench import nvfp4_layer as layer
from stepquant.formats import FORMATS
from stepquant.formats import unpack_nibbles
from stepquant.kernels.linear import (
    NVFP4Weight,
    nvfp4_linear,
    nvfp4_linear_reference,
    nvfp4_quantize_activations,
    quantize_activations_reference,
)

SHAPES = SHAPE_SETS["step3p7"]


def accuracy() -> list[dict]:
    rows = []
    for name in ("expert gate 1280x4096", "attn o 4096x8192"):
        n, k = SHAPES[name]
        w, p = layer(n, k)
        for m in (1, 16, 256):
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
                rows.append({"shape": name, "M": m, "mode": mode, "rel_err_vs_fp64": rel,
                             "act_codes_moved_by_rcp_approx": moved if mode == "w4a4" else None})
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
        for bn in (64, 128):
            for bk in (128, 256):
                for warps in (4, 8):
                    for stages in (3,):
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
    print("\n| shape | M | mode | rel. error vs fp64 | act. codes moved by rcp.approx |\n|---|---|---|---|---|")
    for r in acc:
        moved = r["act_codes_moved_by_rcp_approx"]
        print(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['rel_err_vs_fp64']:.2e} | {'-' if moved is None else f'{moved:.1e}'} |")
    sp = bench_linear("step3p7", bandwidth=bw)
    print("\n| shape | M | mode | ms | torch bf16 ms | x bf16 | GB/s | % roofline | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    for r in sp:
        print(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['ms']:.4f} | {r['bf16_ms']:.4f} | {r['speedup_vs_bf16']:.2f} "
              f"| {r['gb_s']:.0f} | {r['pct_copy']:.0f}% | {r['tflops']:.1f} |")
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
