"""Calibration over several processes (`convert --gpus N`): each calibrates a share of the batches and the
statistics are reduced exactly, so the checkpoint is byte-identical to a one-process run. On the CPU the
processes talk through gloo, which is how CI runs this; on GPUs the same code runs over NCCL."""

from __future__ import annotations

import json

import pytest
import torch

from stepquant.calibrate import CalibStats
from stepquant.convert import ConvertOptions, convert
from stepquant.convert import output_digest as digest
from stepquant.distributed import Rank, share



def test_shares_cover_every_batch_once():
    batches = list(range(7))
    parts = [share(batches, Rank(r, 3, r)) for r in range(3)]
    assert sorted(b for p in parts for b in p) == batches and parts[0] == [0, 3, 6]
    assert share(batches, None) == batches


@pytest.mark.parametrize("calib_mode", ["layers", "model"])
def test_two_processes_byte_identical(demo_ckpt, tmp_path, calib_mode):
    args = dict(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=8, calib_seq_len=32, calib_mode=calib_mode)
    one = convert(demo_ckpt, tmp_path / "one", ConvertOptions(**args))
    two = convert(demo_ckpt, tmp_path / "two", ConvertOptions(**args, gpus=2))
    assert digest(one) == digest(two)  # the manifest too, but for its timings
    m1, m2 = (json.loads((p / "stepquant.json").read_text()) for p in (one, two))
    assert (m1["timings"]["processes"], m2["timings"]["processes"]) == (1, 2)
    assert m2["calibration"]["samples"] == 8 and not (two / ".stepquant-work").exists()


def test_split_changes_nothing_only_because_reduction_is_exact(demo_ckpt, tmp_path, monkeypatch):
    """The check above can fail: a reduction that averaged instead of taking the max would change the scales."""
    import stepquant.distributed as d

    real = d.reduce_stats

    def averaging(stats: CalibStats, kind: str) -> CalibStats:
        out = real(stats, kind)
        for f in ("linear", "k", "v"):
            setattr(out, f, {k: v * torch.tensor(0.75) for k, v in getattr(out, f).items()})
        return out

    monkeypatch.setattr(d, "reduce_stats", averaging)  # rank 0 runs in this process
    args = dict(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=8, calib_seq_len=32)
    one = convert(demo_ckpt, tmp_path / "one", ConvertOptions(**args))
    two = convert(demo_ckpt, tmp_path / "two", ConvertOptions(**args, gpus=2))
    assert digest(one) != digest(two)


def test_bad_gpus(demo_ckpt, tmp_path):
    from stepquant.errors import StepquantError

    with pytest.raises(StepquantError, match="--gpus 0"):
        convert(demo_ckpt, tmp_path / "x", ConvertOptions(gpus=0))
