"""`convert --gpus 2` against `--gpus 1` on one machine (issue 8): a generated Step-3.7-shaped checkpoint,
calibrated and converted to NVFP4 (MoE only, FP8 KV cache) each way through the CLI; both wall times, and
whether the two outputs are byte-identical (every file, the manifest but for its timings).

Run: python benchmarks/multigpu.py WORKDIR [--layers 4] [--experts 96] [--samples 512] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from stepquant.convert import output_digest
from stepquant.synthetic import StepShape, generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    shape = StepShape(layers=args.layers, experts=args.experts)
    src = args.work / "src"
    generate(src, shape)
    ids = torch.randint(0, shape.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = args.work / "calib.json"
    tokens.write_text(json.dumps({"batches": [b.tolist() for b in ids.split(4)]}))
    result = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "shape": {"layers": args.layers, "experts": args.experts}, "calibration": f"{args.samples} x {args.seq_len}",
              "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors"))}  # fmt: skip
    outs = {}
    for gpus in (1, 2):
        dst = args.work / f"gpus{gpus}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "stepquant", "convert", str(src), str(dst), "--recipe",
                               "step3p7-nvfp4-moe-only-kvfp8", "--calib-data", str(tokens), "--device", "cuda",
                               "--gpus", str(gpus), "--overwrite"], capture_output=True, text=True)  # fmt: skip
        wall = time.time() - t0
        if proc.returncode:
            result[f"gpus{gpus}"] = {"error": proc.stderr[-2000:]}
            continue
        timings = json.loads((dst / "stepquant.json").read_text())["timings"]
        result[f"gpus{gpus}"] = {"wall_seconds": round(wall, 1), **timings}
        outs[gpus] = output_digest(dst)
    if len(outs) == 2:
        result["byte_identical"] = outs[1] == outs[2]
        result["files_compared"] = len(outs[1])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
