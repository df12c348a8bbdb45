"""SASS instructions per weight element in the hot loop of the NVFP4 GEMV kernel, compiled for sm_90 on
any machine (no GPU: Triton ships ptxas and cuobjdump). How the third kernel version was tuned before
spending device time (BENCHMARKS.md).

Run: python benchmarks/sass_loop.py
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from stepquant.kernels import linear

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIG = {"a_ptr": "*bf16", "w_ptr": "*i32", "sf_ptr": "*i32", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
       "scalars_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_am": "i32",
       "stride_om": "i32", "SPLIT": "i32"}  # fmt: skip
DIV16 = ("K", "K_PER_SPLIT", "stride_am")  # what Triton's specialization knows at run time


def compile_sm90(fn, sig: dict, const: dict, warps: int, stages: int):
    names = list(fn.arg_names)
    full = sig | dict.fromkeys(const, "constexpr")
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in names if full[k].startswith("*") or k in DIV16}
    src = ASTSource(fn, {k: full[k] for k in names}, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def hot_loop(cubin: bytes) -> list[str]:
    """The instructions of the longest backward branch's body."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    at = {a: i for i, (a, _) in enumerate(ins)}
    best: tuple[int, int] = (0, 0)
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA (?:`\(.*?\) )?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at and i - at[int(m.group(1), 16)] > best[1] - best[0]:
            best = (at[int(m.group(1), 16)], i)
    return [t for _, t in ins[best[0] : best[1] + 1]]


def main() -> None:
    print("| BM | BN | BK | warps | loop instructions | per weight element | top opcodes |\n|---|---|---|---|---|---|---|")
    for bm, bn, bk, warps in ((8, 32, 128, 2), (16, 64, 128, 4), (16, 64, 64, 4), (16, 128, 64, 4), (1, 16, 256, 2), (1, 8, 256, 2)):
        stages = 5 if bm == 1 else 3  # BM 1: the one-row kernel, its loop pipelined by tl.range
        const = {"ALPHA_IDX": 0, "ASM": True, "EVEN_N": True, "BM": bm, "BN": bn, "BK": bk, "FMA": bm == 1, "STAGES": stages,
                 "BLOCKED": True}  # the Step shapes' weights are blocked (NVFP4Weight)
        k = compile_sm90(linear._nvfp4_gemv_kernel, SIG, const, warps, stages)
        print(f"| {bm} | {bn} | {bk} | {warps} | {_summary(hot_loop(k.asm['cubin']), bn * bk / (32 * warps))} |")
    # 2-16 rows: the mma.sync kernel, one loop turn = two 128-column steps of TR x TN tiles a warp
    for tr, tn in ((1, 1), (1, 2), (2, 2)):
        px = True  # activations a step ahead, as the rule mostly picks them (2 x 2: with two accumulator sets)
        step, load = linear._MMA_SYNC_PTX[tr, tn, px, linear._step_checks(tr, tn, 4)]
        sets = linear._sets(tr, px)
        const = {"ALPHA_IDX": 0, "ASM": True, "W": 4, "TR": tr, "TN": tn, "STEP": step, "LOAD": load, "KW": 4, "PX": px, "ODD": False,
                 "SUM": linear._warp_sum_ptx(4 * tr * tn, 4, 4), "SETS": sets, "SETS_SUM": linear._sets_sum_ptx(4 * tr * tn) if sets > 1 else ""}
        k = compile_sm90(linear._nvfp4_mma_sync_kernel, SIG, const, 4, 1)
        print(f"| {8 * tn} (mma.sync, {tr} x {tn} tiles) | {16 * tr} | 256 | 4 | {_summary(hot_loop(k.asm['cubin']), 128 * tr)} |")


def _summary(body: list[str], elements: float) -> str:
    """Loop instructions | per weight element a thread | the five most frequent opcodes."""
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    return f"{len(body)} | {len(body) / elements:.2f} | {', '.join(f'{o} {n}' for o, n in ops.most_common(5))}"


if __name__ == "__main__":
    main()
