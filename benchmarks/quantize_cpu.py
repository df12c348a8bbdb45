"""CPU weight-quantization throughput (MB/s of BF16 input) for Step-3.7 shapes, per format.

Run: .venv/bin/python benchmarks/quantize_cpu.py   (prints a Markdown table for BENCHMARKS.md)
"""

from __future__ import annotations

import platform
import time

import torch

from stepquant.formats import FORMATS

SHAPES = {
    "expert gate/up 1280x4096": (1280, 4096),
    "expert down 4096x1280": (4096, 1280),
    "attention q 8192x4096": (8192, 4096),
    "dense MLP 11264x4096": (11264, 4096),
}


def measure(fmt: str, shape: tuple[int, int], seconds: float = 2.0) -> float:
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    amax = w.float().abs().amax()
    handler = FORMATS[fmt]
    handler.quantize(w, amax)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        handler.quantize(w, amax)
        n += 1
    return w.numel() * 2 * n / (time.perf_counter() - start) / 1e6


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    fmts = ("nvfp4", "fp8", "fp8-block")
    print("| shape | " + " | ".join(f"{f} MB/s" for f in fmts) + " |")
    print("|---|" + "---|" * len(fmts))
    for label, shape in SHAPES.items():
        print(f"| {label} | " + " | ".join(f"{measure(f, shape):.0f}" for f in fmts) + " |")


if __name__ == "__main__":
    main()
