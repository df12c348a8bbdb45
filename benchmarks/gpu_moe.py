"""Fused MoE on the GPU at Step-3.7 shapes (288 experts, top-8, H 4096, I 1280): the table of
`stepquant bench kernels` and a tiling sweep of the NVFP4 kernel at decode (issue 4). Prints Markdown.

Run: python benchmarks/gpu_moe.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stepquant.bench import bench_moe, bench_quantize, copy_bandwidth, graph_time, moe_layer
from stepquant.kernels.moe import MmaSync, fused_moe

# MmaSync(warps on gate_up's K, gate_up's activations ahead, down's[, routed, warps on down's K]); Triton's MMA over
# routed pairs: (BM, BN, BK, warps)
CONFIGS = ([MmaSync(w, a, d) for w in (1, 2, 4, 8) for a in (False, True) for d in (False, True)]
           + [MmaSync(w, False, False, True, dw) for w in (1, 2, 4) for dw in (1, 2)] + [(16, 64, 128, 4), (64, 128, 64, 4)])


def sweep(gu, dn, tokens=(1, 8, 16, 32, 64, 256, 2048)) -> list[dict]:
    rows = []
    hidden = gu.shape[2]
    for t in tokens:
        gen = torch.Generator(device="cuda").manual_seed(t)
        x = torch.randn(t, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        routes = [torch.rand(t, gu.shape[0], device="cuda", generator=gen).topk(8, -1) for _ in range(8)]
        for cfg in CONFIGS:
            if isinstance(cfg, MmaSync) and (t > 64 if not cfg.routed else t < 8):  # decode kernels read an expert a pair
                continue
            try:
                ms = graph_time(lambda i: fused_moe(x, routes[i % 8][1], routes[i % 8][0], gu, dn, "w4a16", config=cfg), reps=8)
            except Exception as exc:  # noqa: BLE001 - a tiling that does not compile or fit
                rows.append({"tokens": t, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            rows.append({"tokens": t, "config": cfg, "ms": ms})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name(0)
    print(f"{dev}; copy {bw / 1e12:.2f} TB/s")
    q = bench_quantize(bandwidth=bw)
    print(f"NVFP4 weight quantization, 64 Step experts: {q['ms']:.3f} ms, {q['tb_s']:.2f} TB/s, {q['pct_copy']:.0f}% of copy")
    (gu, dn), _ = moe_layer(with_bf16=False)
    sw = sweep(gu, dn)
    print("\n| tokens | config | ms |\n|---|---|---|")
    for r in sw:
        print(f"| {r['tokens']} | {r['config']} | {r['ms']:.4f} |" if "ms" in r else f"| {r['tokens']} | {r['config']} | {r['error']} |")
    del gu, dn
    torch.cuda.empty_cache()
    moe = bench_moe(bandwidth=bw)
    print("\n| tokens | experts touched | mode | ms | BF16 experts ms | x BF16 | % roofline | TFLOP/s |\n|---|---|---|---|---|---|---|---|")
    for r in moe:
        print(f"| {r['tokens']} | {r['experts_touched']} | {r['mode']} | {r['ms']:.3f} | {r['bf16_ms']:.3f} "
              f"| {r['bf16_ms'] / r['ms']:.2f} | {r['pct_roofline']:.0f}% | {r['tflops']:.1f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_moe.json").write_text(json.dumps({"device": dev, "copy_tb_s": bw / 1e12, "quantize": q,
                                                                 "sweep": sw, "moe": moe}, indent=2))


if __name__ == "__main__":
    main()
