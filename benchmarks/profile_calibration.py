"""Where the layer-streamed calibration of `benchmarks/vs_modelopt.py`'s model spends its time: the
calibration alone (no writer beside it), the first in a process under cProfile (top functions by own and by
cumulative time), then a second one's wall time.

Run: python benchmarks/profile_calibration.py WORKDIR   (after vs_modelopt.py generated WORKDIR/bf16)
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch


def main(root: Path) -> None:
    from stepquant.checkpoint import open_checkpoint
    from stepquant.convert import ConvertOptions, _calibrate, prepare

    opts = ConvertOptions(to="nvfp4", scope="all-linear", kv_cache="fp8", moe_layout="per-expert", naming="keep",
                          expert_input_scale="shared", calib_data=str(root / "calib.json"), device="cuda")  # fmt: skip
    with open_checkpoint(root / "bf16") as ckpt:
        prep = prepare(ckpt, opts)
        prof = cProfile.Profile()  # the first calibration in the process: one-time costs included
        torch.cuda.synchronize()
        t0 = time.time()
        prof.enable()
        _calibrate(ckpt, prep, opts)
        torch.cuda.synchronize()
        prof.disable()
        print(f"calibration, first in the process (under cProfile): {time.time() - t0:.2f} s", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(30)
        torch.cuda.synchronize()
        t0 = time.time()
        _calibrate(ckpt, prep, opts)
        torch.cuda.synchronize()
        print(f"calibration, second: {time.time() - t0:.2f} s", flush=True)

if __name__ == "__main__":
    main(Path(sys.argv[1]))
