"""`stepquant bench kernels`: the device's copy bandwidth, then NVFP4 linear (w4a16, w4a4) against torch
BF16 at one model's shapes (SHAPE_SETS: Step-3.7 by default, Qwen3-MoE, Mixtral, DeepSeek-V2-Lite, Llama-3),
its fused MoE, and the NVFP4 weight-quantization kernel against the copy bandwidth.

Timings are medians of CUDA-graph replays (`triton.testing.do_bench`), so launch gaps shrink alike for
every variant. Needs a CUDA device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import StepquantError

@dataclass(frozen=True)
class MoEShape:
    """A fused MoE layer to time: routed experts, top-k, hidden and intermediate (per expert) sizes."""

    experts: int
    topk: int
    hidden: int
    inter: int

    def describe(self) -> str:
        return f"{self.experts} experts, top-{self.topk}, H {self.hidden}, I {self.inter}"


@dataclass(frozen=True)
class ShapeSet:
    """What `bench kernels --shapes NAME` times: Linear weights by name (N, K) and the model's MoE layer, if any."""

    linears: dict[str, tuple[int, int]]
    moe: MoEShape | None


# From each model's config.json (Step: SPEC section 7). Attention q/o follow the heads x head_dim of each kind of
# layer; MoE experts are listed both alone (as Linears) and as the fused layer.
SHAPE_SETS: dict[str, ShapeSet] = {
    "step3p7": ShapeSet({  # Step-3.7-Flash's language model (= Step-3.5-Flash): hidden 4096, head_dim 128
        "attn q (full) 8192x4096": (8192, 4096),  # the full-attention layers (every 4th): 64 heads
        "attn q (sliding) 12288x4096": (12288, 4096),  # the sliding-window layers (the other 3 of 4): 96 heads
        "attn k/v 1024x4096": (1024, 4096),  # 8 KV groups
        "attn qkv fused 10240x4096": (10240, 4096),  # q, k and v as one GEMM, as vLLM and SGLang run them
        "attn o 4096x8192": (4096, 8192),
        "attn o (sliding) 4096x12288": (4096, 12288),
        "dense up 11264x4096": (11264, 4096),  # layers 0-2
        "dense down 4096x11264": (4096, 11264),
        "expert gate 1280x4096": (1280, 4096),
        "expert down 4096x1280": (4096, 1280),
    }, MoEShape(288, 8, 4096, 1280)),
    "qwen3moe": ShapeSet({  # Qwen3-30B-A3B: hidden 2048, 32 heads / 4 KV of 128
        "attn q 4096x2048": (4096, 2048),
        "attn k/v 512x2048": (512, 2048),
        "attn o 2048x4096": (2048, 4096),
        "expert gate 768x2048": (768, 2048),
        "expert down 2048x768": (2048, 768),
    }, MoEShape(128, 8, 2048, 768)),
    "mixtral": ShapeSet({  # Mixtral-8x7B: hidden 4096, 32 heads / 8 KV of 128
        "attn q/o 4096x4096": (4096, 4096),
        "attn k/v 1024x4096": (1024, 4096),
        "expert gate 14336x4096": (14336, 4096),
        "expert down 4096x14336": (4096, 14336),
    }, MoEShape(8, 2, 4096, 14336)),
    "deepseek-v2-lite": ShapeSet({  # DeepSeek-V2-Lite: hidden 2048, MLA (16 heads, kv rank 512), layer 0 dense
        "attn q 3072x2048": (3072, 2048),
        "attn kv_a 576x2048": (576, 2048),
        "attn kv_b 4096x512": (4096, 512),
        "attn o 2048x2048": (2048, 2048),
        "dense up 10944x2048": (10944, 2048),
        "dense down 2048x10944": (2048, 10944),
        "expert gate 1408x2048": (1408, 2048),
        "expert down 2048x1408": (2048, 1408),
    }, MoEShape(64, 6, 2048, 1408)),
    "llama3-8b": ShapeSet({  # Llama-3-8B (dense): hidden 4096, 32 heads / 8 KV of 128
        "attn q/o 4096x4096": (4096, 4096),
        "attn k/v 1024x4096": (1024, 4096),
        "mlp up 14336x4096": (14336, 4096),
        "mlp down 4096x14336": (4096, 14336),
    }, None),
    "small": ShapeSet({"expert gate 1280x4096": (1280, 4096)}, MoEShape(32, 8, 4096, 1280)),  # for tests
}
MS = (1, 8, 16, 64, 256, 2048)


def shape_set(name: str) -> ShapeSet:
    """SHAPE_SETS[name], or a one-line error naming the choices."""
    if name not in SHAPE_SETS:
        raise StepquantError(f"unknown shape set {name!r} (choose from {', '.join(SHAPE_SETS)})")
    return SHAPE_SETS[name]


def _cuda() -> None:
    if not torch.cuda.is_available():
        raise StepquantError("stepquant bench needs a CUDA device")


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy: bytes read + written per second (the practical HBM ceiling)."""
    import triton

    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def graph_time(fn, reps: int = 20) -> float:
    """Median ms of one call, from CUDA-graph replays of `reps` calls `fn(i)`, i = 0..reps-1 (callers
    rotate through copies of their operands with it, so that they come from HBM, not L2)."""
    import triton

    fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") / reps


def cold_copies(nbytes: int) -> int:
    """How many copies of an operand of `nbytes` make a rotation that does not fit in twice the L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, -(-2 * l2 // max(nbytes, 1)))


def nvfp4_layer(n: int, k: int, seed: int = 0):
    """A random BF16 weight [n, k] on the GPU and its NVFP4 parts."""
    from .formats import FORMATS

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    return w, FORMATS["nvfp4"].quantize(w, w.float().abs().amax())


def bench_linear(shapes: str = "step3p7", ms: tuple[int, ...] = MS, bandwidth: float | None = None) -> list[dict]:
    """Per shape and M: torch BF16, w4a16 and w4a4 times, GB/s, % of copy bandwidth, TFLOP/s."""
    from .formats import FORMATS
    from .kernels.linear import NVFP4Weight, nvfp4_linear

    _cuda()
    linears = shape_set(shapes).linears
    bw = bandwidth or copy_bandwidth()
    rows = []
    for name, (n, k) in linears.items():
        w, p = nvfp4_layer(n, k)
        wbytes = n * k // 2 + n * k // 16
        c16, c4 = cold_copies(2 * n * k), cold_copies(wbytes)
        ws = [w] + [w.clone() for _ in range(c16 - 1)]
        parts = [p] + [{key: v.clone() for key, v in p.items()} for _ in range(c4 - 1)]
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            isc = FORMATS["nvfp4"].input_scale(x.float().abs().amax())
            lins = [NVFP4Weight.from_parts(q["weight"], q["weight_scale"], q["weight_scale_2"], isc) for q in parts]
            t = {"bf16": graph_time(lambda i: x @ ws[i % c16].T, reps=max(20, c16))}
            for mode in ("w4a16", "w4a4"):
                t[mode] = graph_time(lambda i: nvfp4_linear(x, lins[i % c4], mode), reps=max(20, c4))
            moved = wbytes + 2 * m * k + 2 * m * n
            for mode in ("w4a16", "w4a4"):
                rows.append({"shape": name, "M": m, "mode": mode, "ms": t[mode], "bf16_ms": t["bf16"],
                             "speedup_vs_bf16": t["bf16"] / t[mode], "gb_s": moved / (t[mode] * 1e-3) / 1e9,
                             "pct_copy": 100 * moved / (t[mode] * 1e-3) / bw,
                             "tflops": 2 * m * n * k / (t[mode] * 1e-3) / 1e12})  # fmt: skip
    return rows


def bench_quantize(experts: int = 64, bandwidth: float | None = None) -> dict:
    """The NVFP4 weight-quantization kernel on `experts` Step experts (1280x4096), against the copy bandwidth."""
    import triton

    from .kernels.quantize import nvfp4_quantize

    _cuda()
    bw = bandwidth or copy_bandwidth()
    w = (torch.randn(experts, 1280, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    ws2 = (w.float().abs().amax(dim=(1, 2)) / 2688.0).contiguous()
    ms = triton.testing.do_bench(lambda: nvfp4_quantize(w, ws2), warmup=25, rep=200, return_mode="median")
    moved = w.numel() * (2 + 0.5 + 1 / 16)
    return {"experts": experts, "ms": ms, "tb_s": moved / (ms * 1e-3) / 1e12, "pct_copy": 100 * moved / (ms * 1e-3) / bw}


MOE_TOKENS = (1, 8, 16, 64, 256, 2048, 4096)


def moe_layer(experts: int = 288, hidden: int = 4096, inter: int = 1280, seed: int = 0, with_bf16: bool = True):
    """A random MoE layer (Step-3.7's sizes by default) on the GPU as NVFP4 (gate_up, down) and BF16 (gate_up,
    down) experts."""
    from .kernels.moe import Experts
    from .kernels.quantize import nvfp4_quantize

    g = torch.Generator(device="cuda").manual_seed(seed)
    nv, bf = [], []
    for n, k in ((2 * inter, hidden), (hidden, inter)):
        w = (torch.randn(experts, n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        ws2 = (w.float().abs().amax(dim=(1, 2)) / 2688.0).contiguous()  # gate and up share it
        q, sf = nvfp4_quantize(w, ws2)
        nv.append(Experts.nvfp4(q, sf, ws2, torch.tensor(0.5 / 2688.0)))
        bf.append(Experts.bf16(w) if with_bf16 else None)
        del w
    return nv, bf


def bench_moe(tokens: tuple[int, ...] = MOE_TOKENS, shape: MoEShape = SHAPE_SETS["step3p7"].moe,
              bandwidth: float | None = None) -> list[dict]:  # fmt: skip
    """Fused MoE (Step-3.7's by default) per token count: BF16 experts, w4a16 and w4a4 times, and the % of the copy
    bandwidth that the bytes of the experts actually touched need."""
    from .kernels.moe import fused_moe

    _cuda()
    bw = bandwidth or copy_bandwidth()
    experts, topk = shape.experts, shape.topk
    (gu, dn), (gu16, dn16) = moe_layer(experts, shape.hidden, shape.inter)
    _, two_i, hidden = gu.shape
    per_expert = (two_i * hidden + hidden * two_i // 2) * (0.5 + 1 / 16)
    rows = []
    for t in tokens:
        gen = torch.Generator(device="cuda").manual_seed(t)
        x = torch.randn(t, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        # several routings in turn, so that one call's experts are not in L2 from the call before
        routes = [torch.rand(t, experts, device="cuda", generator=gen).topk(topk, -1) for _ in range(8)]
        touched = sum(int(ids.unique().numel()) for _, ids in routes) / len(routes)
        moved = touched * per_expert + 2 * t * hidden * 2
        times = {"bf16": graph_time(lambda i: fused_moe(x, routes[i % 8][1], routes[i % 8][0], gu16, dn16, "bf16"), reps=8)}
        for mode in ("w4a16", "w4a4"):
            times[mode] = graph_time(lambda i: fused_moe(x, routes[i % 8][1], routes[i % 8][0], gu, dn, mode), reps=8)
        for mode in ("w4a16", "w4a4"):
            rows.append({"tokens": t, "experts_touched": round(touched, 1), "mode": mode, "ms": times[mode],
                         "bf16_ms": times["bf16"], "pct_roofline": 100 * moved / (times[mode] * 1e-3) / bw,
                         "tflops": 2 * t * topk * per_expert / (0.5 + 1 / 16) / (times[mode] * 1e-3) / 1e12})  # fmt: skip
    return rows


def bench_kernels(shapes: str = "step3p7") -> dict:
    """Everything `stepquant bench kernels` prints, as one JSON-ready dict."""
    _cuda()
    moe = shape_set(shapes).moe
    bw = copy_bandwidth()
    return {
        "device": torch.cuda.get_device_name(0),
        "shapes": shapes,
        "copy_tb_s": bw / 1e12,
        "quantize": bench_quantize(bandwidth=bw),
        "linear": bench_linear(shapes, bandwidth=bw),
        "moe_shape": asdict(moe) if moe else None,
        "moe": bench_moe(shape=moe, bandwidth=bw) if moe else [],
    }


def bench_convert(workdir: str | Path, layers: int = 1, devices: tuple[str, ...] = ("cuda", "cpu"),
                  echo=print, shape=None) -> dict:  # fmt: skip
    """End-to-end conversion of a generated Step-3.7-shaped checkpoint (`layers` full-width MoE layers,
    ~9.3 GB each) on each device: the NVFP4 weight path of the release recipe (routed experts, stacked,
    ModelOpt naming) without calibration, from a warm page cache and an idle disk (synced first), twice in
    this process (garbage collected before each): the second run is the rate a large checkpoint sees
    layer after layer, the first also pays one-time set-up (CUDA, kernel compiles, pinning host buffers;
    reported as `first_seconds`). Outputs compared byte for byte.
    `shape` (a `StepShape`) replaces the full-width one, for tests."""
    import gc
    import hashlib
    import json
    import os
    import time

    from .convert import convert
    from .synthetic import StepShape

    if "cuda" in devices:
        _cuda()
    work = Path(workdir)
    shape = shape or StepShape(layers=layers)
    src = _generated(work / "src", shape, echo)
    shards = sorted(src.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in shards)
    for p in shards:  # into the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    result: dict = {"source_bytes": nbytes, "shape": asdict(shape), "runs": {}}
    digests = {}
    for dev in devices:
        out = work / f"out-{dev}"
        opts = convert_options(dev)
        secs = []
        for _ in range(2):
            gc.collect()  # the last run's buffers (pinned ones included) freed for reuse, as between layers
            os.sync()  # the disk idle first: no writeback of the generated source or an earlier output competes
            t0 = time.perf_counter()
            convert(src, out, opts)
            secs.append(time.perf_counter() - t0)
        digests[dev] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}
        result["runs"][dev] = {"seconds": secs[1], "gb_s": nbytes / secs[1] / 1e9, "first_seconds": secs[0],
                               "first_gb_s": nbytes / secs[0] / 1e9}  # fmt: skip
        echo(f"{dev}: {secs[1]:.1f} s, {nbytes / secs[1] / 1e9:.2f} GB/s of BF16 input (the first run in this process: "
             f"{secs[0]:.1f} s, {nbytes / secs[0] / 1e9:.2f} GB/s)")
    if len(digests) > 1:
        result["identical"] = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
    if "cuda" in result["runs"] and "cpu" in result["runs"]:
        result["speedup"] = result["runs"]["cpu"]["seconds"] / result["runs"]["cuda"]["seconds"]
        result["first_speedup"] = result["runs"]["cpu"]["first_seconds"] / result["runs"]["cuda"]["first_seconds"]
    return result


def convert_options(device: str):
    """What `bench convert` runs on `device`: the release recipe's NVFP4 weight path (routed experts,
    stacked, ModelOpt naming), no calibration, replacing the last output."""
    from .convert import ConvertOptions

    return ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", to="w4a16-nvfp4", kv_cache="none", device=device,
                          overwrite=True)  # fmt: skip


def _generated(folder: Path, shape, echo) -> Path:
    """`folder` holding a generated checkpoint of `shape` (made once, reused while the shape is the same)."""
    import json

    from .synthetic import generate

    meta = folder / "synthetic.json"
    if not (meta.is_file() and json.loads(meta.read_text()) == asdict(shape)):
        echo(f"generating a {shape.layers}-layer Step-3.7-shaped checkpoint in {folder}")
        generate(folder, shape)
    return folder


def format_kernels(r: dict) -> str:
    q = r["quantize"]
    lines = [
        f"{r['device']}: copy bandwidth {r['copy_tb_s']:.2f} TB/s (read + written)",
        f"NVFP4 weight quantization, {q['experts']} Step experts: {q['ms']:.3f} ms, {q['tb_s']:.2f} TB/s,"
        f" {q['pct_copy']:.0f}% of copy",
        "",
        "| shape | M | mode | ms | torch bf16 ms | x bf16 | GB/s | % of copy | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["linear"]:
        lines.append(f"| {x['shape']} | {x['M']} | {x['mode']} | {x['ms']:.4f} | {x['bf16_ms']:.4f} | "
                     f"{x['speedup_vs_bf16']:.2f} | {x['gb_s']:.0f} | {x['pct_copy']:.0f}% | {x['tflops']:.1f} |")  # fmt: skip
    if not r.get("moe_shape"):
        return "\n".join(lines)
    lines += ["", f"Fused MoE ({MoEShape(**r['moe_shape']).describe()}); roofline = bytes of the experts touched",
              "", "| tokens | experts touched | mode | ms | BF16 experts ms | x bf16 | % roofline | TFLOP/s |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in r["moe"]:
        lines.append(f"| {x['tokens']} | {x['experts_touched']} | {x['mode']} | {x['ms']:.4f} | {x['bf16_ms']:.4f} | "
                     f"{x['bf16_ms'] / x['ms']:.2f} | {x['pct_roofline']:.0f}% | {x['tflops']:.1f} |")  # fmt: skip
    return "\n".join(lines)
