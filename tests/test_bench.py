import pytest
import torch

from stepquant.bench import SHAPE_SETS, bench_kernels, bench_linear

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
        (s, m, mode) for s in SHAPE_SETS["small"] for m in (1, 16) for mode in ("w4a16", "w4a4")
    }


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
