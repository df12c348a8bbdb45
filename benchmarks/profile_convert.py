"""Where a conversion of `benchmarks/vs_modelopt.py`'s model spends its time, each part alone in one process:
a first calibration (one-time costs: imports, CUDA and cuBLAS set-up, pinned memory), a second one timed and
under cProfile, then the quantization and writing of every shard, sequentially after it, under cProfile (top
functions by own time).

Run: python benchmarks/profile_convert.py WORKDIR   (after vs_modelopt.py generated WORKDIR/bf16)
"""

from __future__ import annotations

import cProfile
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch


def _profiled(what: str, fn) -> object:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.time()
    prof.enable()
    out = fn()
    torch.cuda.synchronize()
    prof.disable()
    print(f"{what}: {time.time() - t0:.2f} s (under cProfile)", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    return out


def main(root: Path) -> None:
    from stepquant.checkpoint import open_checkpoint
    from stepquant.convert import ConvertOptions, _calibrate, prepare
    from stepquant.quantize import Executor
    from stepquant.shards import OutputDir, ShardWriter

    opts = ConvertOptions(to="nvfp4", scope="all-linear", kv_cache="fp8", moe_layout="per-expert", naming="keep",
                          expert_input_scale="shared", calib_data=str(root / "calib.json"), device="cuda")  # fmt: skip
    with open_checkpoint(root / "bf16") as ckpt:
        prep = prepare(ckpt, opts)
        t0 = time.time()
        _calibrate(ckpt, prep, opts)
        print(f"first calibration in the process: {time.time() - t0:.2f} s", flush=True)
        t0 = time.time()
        acts = _calibrate(ckpt, prep, opts)
        print(f"second calibration: {time.time() - t0:.2f} s", flush=True)
        _profiled("third calibration", lambda: _calibrate(ckpt, prep, opts))
        for run in range(2):
            dst = root / f"profiled-{run}"
            shutil.rmtree(dst, ignore_errors=True)
            executor = Executor(ckpt, prep.plan, acts, prep.recipe.expert_input_scale, "cuda")

            def write(dst=dst, executor=executor):
                with OutputDir(dst, "profile") as out:
                    with ShardWriter(out, executor.outputs(), 5 * 10**9) as writer:
                        writer.finish()

            if run == 0:
                t0 = time.time()
                write()
                print(f"quantize + write, first: {time.time() - t0:.2f} s", flush=True)
            else:
                _profiled("quantize + write, second", write)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
