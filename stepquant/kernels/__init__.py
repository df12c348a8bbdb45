"""Triton kernels: weight quantization (NVFP4, FP8, FP8-block), bit-identical to `stepquant.formats`.

Every kernel runs on CUDA, and at small sizes under the Triton interpreter (`TRITON_INTERPRET=1`) on
the CPU, which is how CI checks their logic.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
