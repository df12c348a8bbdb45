"""The README's workflow commands, run as written on the demo checkpoint (the push against a loopback
Hub stand-in)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT
from .hub_server import FakeHub
from .test_hub import TOKEN, hub_env


def workflow_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- workflows:start -->")[1].split("<!-- workflows:end -->")[0]
    return [line for block in re.findall(r"```sh\n(.*?)```", section, re.S) for line in block.splitlines() if line.strip()]


def test_workflows_cover_what_the_guide_promises():
    cmds = " ".join(workflow_commands())
    for needle in ("--recipe step3p7-nvfp4-moe-only-kvfp8", "--recipe step3p7-fp8", "--naming sglang",
                   "--moe-layout per-expert", "--gpqa", "--endpoint", "push", "--dry-run"):  # fmt: skip
        assert needle in cmds, needle


def test_readme_workflows_run_as_written(demo_ckpt, tmp_path):
    from huggingface_hub import ModelCard

    shutil.copytree(demo_ckpt, tmp_path / "build" / "demo" / "bf16")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    script = "set -euo pipefail\n" + "\n".join(workflow_commands()) + "\n"
    hub = FakeHub(TOKEN)
    try:
        env = {**os.environ, **hub_env(hub), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=900)
        finally:  # a failed step leaves the background server running: stop the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        tree = hub.tree("your-org/step-demo-NVFP4")
    finally:
        hub.close()
    guide = tmp_path / "build" / "guide"
    for name in ("nvfp4", "fp8", "nvfp4-sglang", "nvfp4-vllm", "endpoint"):
        assert (guide / name).is_dir(), name
    assert {"README.md", "model.safetensors", "stepquant.json", "verify/report.json", "verify/sqnr.png"} <= set(tree)
    card = ModelCard(tree["README.md"].decode())
    assert card.data.base_model == "your-org/step-demo" and "nvfp4" in card.data.tags
    assert "GPQA accuracy" in card.text and "![sqnr](verify/sqnr.png)" in card.text
    assert TOKEN not in out + err
