"""Constant memory: renaming a 6 GB checkpoint stays under 1.5 GB peak RSS (STEPQUANT_SLOW=1)."""

import os
import re
import resource
import subprocess
import sys

import pytest
import torch

from stepquant.checkpoint import open_checkpoint
from stepquant.shards import OutputDir, OutTensor

pytestmark = pytest.mark.skipif(os.environ.get("STEPQUANT_SLOW") != "1", reason="slow: set STEPQUANT_SLOW=1")

E, I, H = 288, 1280, 4096  # Step-3.7 routed experts: one stacked projection is 3.02 GB in BF16
CHUNK = 64 * 1024 * 1024


def _synthetic(dst):
    """Two layers of Step-3.7-shaped stacked gate/up experts (6.04 GB), written in constant memory."""
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(CHUNK // 2, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    nbytes = E * I * H * 2

    def chunks(salt):
        for pos in range(0, nbytes, CHUNK):
            n = min(CHUNK, nbytes - pos)
            yield bytes([salt]) + block[1:n] if pos == 0 else block[:n]

    tensors = [
        OutTensor(f"model.layers.{layer}.moe.{proj}.weight", "BF16", (E, I, H), nbytes, lambda s=salt: chunks(s))
        for salt, (layer, proj) in enumerate([(3, "gate_proj")] + [(4, "up_proj")])
    ]
    with OutputDir(dst, "synthetic") as out:
        out.write_shards(tensors, 5 * 10**9)
        out.write_file("config.json", b'{"architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7"}')
        out.commit()
    return dst


def test_rename_6gb_peak_rss_under_1_5gb(tmp_path):
    src = _synthetic(tmp_path / "src")
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "stepquant", "convert", str(src), str(dst), "--naming", "modelopt"]
    if os.path.exists("/usr/bin/time"):
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    else:  # no GNU time on this machine: the kernel's own figure for the finished child
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"\nrenamed {total / 1e9:.2f} GB: peak RSS {peak_kb / 1024:.0f} MiB")
    assert total > 6 * 10**9
    assert peak_kb * 1024 < 1.5 * 10**9
    with open_checkpoint(src) as a, open_checkpoint(dst) as b:
        assert len(b.tensors) == 2 and len(b.shards) == 2  # each 3 GB tensor fits the 5 GB cap alone
        for layer, proj in ((3, "gate_proj"), (4, "up_proj")):
            old = f"model.layers.{layer}.moe.{proj}.weight"
            new = f"model.language_model.layers.{layer}.moe.{proj}.weight"
            for e in (0, 143, 287):
                assert torch.equal(a.read_slice(old, e), b.read_slice(new, e))
