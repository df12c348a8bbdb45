import pytest
import torch

from stepquant.bench import SHAPE_SETS, bench_kernels, bench_linear, format_kernels

from .conftest import run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_needs_cuda_and_says_so():
    proc = run_cli("bench", "kernels")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: stepquant bench needs a CUDA device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_kernels_reports_every_shape():
    r = bench_kernels("small")
    assert r["copy_tb_s"] > 0 and r["quantize"]["ms"] > 0
    rows = bench_linear("small", ms=(1, 16))
    assert {(x["shape"], x["M"], x["mode"]) for x in rows} == {
        (s, m, mode) for s in SHAPE_SETS["small"].linears for m in (1, 16) for mode in ("w4a16", "w4a4")
    }


def test_format_kernels_gives_each_row_its_speedup():
    r = {"device": "GPU", "copy_tb_s": 3.0, "quantize": {"experts": 64, "ms": 0.36, "tb_s": 2.4, "pct_copy": 79.0},
         "linear": [{"shape": "attn q", "M": 1, "mode": "w4a16", "ms": 0.01, "bf16_ms": 0.025, "speedup_vs_bf16": 2.5,
                     "gb_s": 2000.0, "pct_copy": 66.0, "tflops": 7.0}],
         "moe_shape": {"experts": 128, "topk": 8, "hidden": 2048, "inter": 768},
         "moe": [{"tokens": 1, "experts_touched": 8.0, "mode": "w4a16", "ms": 0.032, "bf16_ms": 0.106,
                  "pct_roofline": 73.0, "tflops": 7.7}]}  # fmt: skip
    text = format_kernels(r)
    assert "| attn q | 1 | w4a16 | 0.0100 | 0.0250 | 2.50 | 2000 | 66% | 7.0 |" in text
    assert "Fused MoE (128 experts, top-8, H 2048, I 768)" in text
    assert "| 1 | 8.0 | w4a16 | 0.0320 | 0.1060 | 3.31 | 73% | 7.7 |" in text
    dense = format_kernels(r | {"moe_shape": None, "moe": []})  # a dense model's set: no MoE table
    assert "attn q" in dense and "Fused MoE" not in dense


def test_every_shape_set_fits_the_kernels_it_names():
    """Each Linear goes through a decode GEMV kernel (K a multiple of 64; DeepSeek-V2-Lite's dense down, K 10944,
    is not blocked and takes the unblocked ones) and each MoE layer's experts are blocked (the mma.sync kernels)."""
    for name, s in SHAPE_SETS.items():
        for label, (n, k) in s.linears.items():
            assert n % 16 == 0 and k % 64 == 0, (name, label)
            assert f"{n}x{k}" in label, (name, label)  # the printed name says the shape
        if s.moe:
            assert s.moe.hidden % 128 == 0 and s.moe.inter % 128 == 0 and 0 < s.moe.topk <= s.moe.experts, name


def test_bench_convert_generates_once_and_times_each_device(tmp_path):
    from stepquant.bench import bench_convert
    from tests.test_synthetic import TINY

    lines = []
    r = bench_convert(tmp_path, devices=("cpu",), echo=lines.append, shape=TINY)
    assert r["source_bytes"] > 0 and r["runs"]["cpu"]["gb_s"] > 0 and r["shape"]["layers"] == 2
    assert r["runs"]["cpu"]["first_seconds"] > 0 and r["runs"]["cpu"]["first_gb_s"] > 0  # two runs, the second timed
    assert (tmp_path / "out-cpu" / "stepquant.json").is_file()
    assert any("generating" in x for x in lines)
    lines.clear()
    bench_convert(tmp_path, devices=("cpu",), echo=lines.append, shape=TINY)
    assert not any("generating" in x for x in lines)  # the source is reused
