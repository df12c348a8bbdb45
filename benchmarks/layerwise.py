"""Calibrate and convert a generated Step-3.7-shaped checkpoint on one GPU with layer-streamed
calibration (issue 8): wall time, GB/s, peak GPU memory against one layer's BF16 weights plus the
hidden states, peak host RSS, and the extrapolation to the real 45-layer model.

Run: python benchmarks/layerwise.py WORKDIR [--layers 8] [--experts 96] [--samples 512] [--seq-len 2048]
Prints one JSON object; WORKDIR gets the source (deleted with --cleanup) and the output.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import threading
import time
from pathlib import Path

import torch

import stepquant.convert as sq_convert
from stepquant.convert import ConvertOptions, convert
from stepquant.layerwise import LayerLoader
from stepquant.synthetic import StepShape, generate, tensor_shapes

REAL_LAYERS = 45  # Step-3.7-Flash: 45 decoder layers, 288 experts each
REAL_BF16_BYTES = 392e9


def layer_bytes(shape: StepShape) -> int:
    """BF16 bytes of the largest decoder layer."""
    per: dict[str, int] = {}
    for name, shp in tensor_shapes(shape).items():
        if ".layers." in name:
            layer = name.split(".layers.")[1].split(".")[0]
            per[layer] = per.get(layer, 0) + 2 * int(torch.Size(shp).numel())
    return max(per.values())


class Meter:
    """Peak host RSS (sampled every 20 ms) and peak GPU memory, per phase: calibration (and within it, each
    layer's weights as loaded and the peak while its batches run; the writer quantizes meanwhile) versus what follows it."""

    def __init__(self) -> None:
        self.phase, self.rss, self.gpu, self.layers = "setup", {}, {}, []
        self.t0 = time.time()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * 4096
            self.rss[self.phase] = max(self.rss.get(self.phase, 0), rss)
            time.sleep(0.02)

    def enter(self, phase: str) -> None:
        torch.cuda.synchronize()
        self.gpu[self.phase] = max(self.gpu.get(self.phase, 0), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        self.phase = phase

    def install(self) -> None:
        calibrate, load = sq_convert._calibrate, LayerLoader.load
        meter = self

        def timed_calibrate(*a, **k):
            meter.enter("calibration")
            try:
                return calibrate(*a, **k)
            finally:
                meter.enter("after_calibration")

        def timed_load(self, module):
            if ".layers." not in self.names[module]:
                if meter.layers and "peak_running" not in meter.layers[-1]:  # the final norm, after the last layer
                    meter.layers[-1]["peak_running"] = torch.cuda.max_memory_allocated()
                return load(self, module)
            if meter.layers:  # the previous layer's batches
                meter.layers[-1]["peak_running"] = torch.cuda.max_memory_allocated()
                meter.gpu["calibration"] = max(meter.gpu.get("calibration", 0), meter.layers[-1]["peak_running"])
            before, t0 = torch.cuda.memory_allocated(), time.time()
            torch.cuda.reset_peak_memory_stats()
            load(self, module)
            torch.cuda.synchronize()
            meter.layers.append({"t": round(t0 - meter.t0, 2), "load_seconds": round(time.time() - t0, 2),
                                 "before_load": before, "loaded": torch.cuda.memory_allocated(),
                                 "peak_loading": torch.cuda.max_memory_allocated()})  # fmt: skip
            torch.cuda.reset_peak_memory_stats()  # from here: the peak while the batches run
            meter.gpu["calibration"] = max(meter.gpu.get("calibration", 0), meter.layers[-1]["peak_loading"])

        sq_convert._calibrate = timed_calibrate
        LayerLoader.load = timed_load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--cleanup", action="store_true")
    args = ap.parse_args()
    shape = StepShape(layers=args.layers, experts=args.experts)
    src, dst = args.work / "src", args.work / "nvfp4"
    t0 = time.time()
    generate(src, shape)
    gen_s = time.time() - t0
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (args.samples, args.seq_len), generator=g)
    tokens = args.work / "calib.json"
    tokens.write_text(json.dumps({"batches": [b.tolist() for b in ids.split(4)]}))
    torch.cuda.init()
    meter = Meter()
    meter.install()
    meter.enter("setup")
    t0 = time.time()
    convert(src, dst, ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_data=str(tokens), device="cuda",
                                     overwrite=True))  # fmt: skip
    wall = time.time() - t0
    meter.enter("done")
    manifest = json.loads((dst / "stepquant.json").read_text())
    one_layer = layer_bytes(shape)
    hidden = args.samples * args.seq_len * shape.hidden * 2
    peak = max(meter.gpu.values())
    layer_peak = max((max(m["peak_loading"], m.get("peak_running", 0)) for m in meter.layers), default=0)
    weights_peak = max((m["peak_loading"] - m["before_load"] for m in meter.layers), default=0)
    calib_s = manifest["timings"]["calibration_seconds"]
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": {"layers": args.layers, "experts": args.experts, "hidden": shape.hidden, "moe_inter": shape.moe_inter},
        "calibration": f"{args.samples} x {args.seq_len} tokens",
        "source_bytes": src_bytes,
        "generate_seconds": round(gen_s, 1),
        "wall_seconds": round(wall, 1),
        "calibration_seconds": calib_s,
        "after_calibration_seconds": round(wall - calib_s, 1),
        "GB_per_s": round(src_bytes / wall / 1e9, 3),
        "one_layer_bf16_bytes": one_layer,
        "hidden_state_bytes": hidden,
        "peak_gpu_allocated": peak,
        "peak_gpu_by_phase": meter.gpu,
        "peak_gpu_calibration_layer": layer_peak,
        # what loading a layer adds at its peak (its weights and any transient copy), over one layer's bytes
        "layer_load_peak_over_layer_bytes": round(weights_peak / one_layer, 3),
        "per_layer": meter.layers,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_host_rss_by_phase": meter.rss,
        "output_bytes": sum(p.stat().st_size for p in dst.iterdir() if p.is_file()),
        "experts_without_tokens": sum(len(v) for v in manifest["calibration"]["experts_without_tokens"].values()),
    }
    # the real model: the same per-layer work scaled by its BF16 bytes (weights read, experts calibrated)
    result["extrapolated_45_layer_hours"] = round(wall * REAL_BF16_BYTES / src_bytes / 3600, 2)
    print(json.dumps(result, indent=1))
    if args.cleanup:
        shutil.rmtree(src)
        shutil.rmtree(dst)


if __name__ == "__main__":
    main()
