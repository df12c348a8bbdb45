"""Security: links out of the source, pickles, remote code, unsafe YAML, and tokens that must never be
written anywhere."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from stepquant.checkpoint import open_checkpoint
from stepquant.errors import StepquantError
from stepquant.recipes import load_recipe

from ..conftest import run_cli
from .record import record


def test_links_out_of_the_source_are_refused_but_hf_cache_blobs_are_fine(demo_ckpt, tmp_path):
    src = shutil.copytree(demo_ckpt, tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, src / "notes.txt")  # a sidecar that would be copied into DST
    proc = run_cli("convert", src, tmp_path / "dst", "--naming", "modelopt")
    assert proc.returncode == 2 and "a link out of the checkpoint folder" in proc.stderr
    assert not (tmp_path / "dst").exists()
    # the Hugging Face cache keeps files in blobs/ and links to them from snapshots/REV: that is fine
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / ("b" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    save_file({"model.w": torch.ones(3)}, blobs / "abc")
    os.symlink("../../blobs/abc", snap / "model.safetensors")
    with open_checkpoint(snap) as ck:
        assert list(ck.tensors) == ["model.w"]
    record("security", "links out of the source folder", refused=True)


def test_pickles_are_never_loaded_without_the_flag(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.w": torch.zeros(2), "x": Evil()}, src / "pytorch_model.bin")
    proc = run_cli("inspect", src)
    assert proc.returncode == 2 and "--allow-pickle" in proc.stderr and not marker.exists()
    record("security", "pickle weights without --allow-pickle", unpickled=False)


def test_remote_code_is_never_run_without_the_flag(demo_ckpt, tmp_path):
    src = shutil.copytree(demo_ckpt, tmp_path / "src")
    marker = tmp_path / "pwned"
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    config["architectures"] = ["EvilModel"]
    config["model_type"] = "evil"
    (src / "config.json").write_text(json.dumps(config))
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    proc = run_cli("convert", src, tmp_path / "dst", "--to", "nvfp4", "--scope", "all-linear", "--calib-samples", "2",
                   "--calib-seq-len", "16")  # fmt: skip
    assert proc.returncode == 2 and not marker.exists()
    assert "remote code is not run" in proc.stderr and "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    record("security", "remote code without --trust-remote-code", executed=False)


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "r.yaml"
    path.write_text(f"format: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(StepquantError):
        load_recipe(str(path))
    assert not marker.exists()
    record("security", "YAML with a python tag", executed=False)


def test_a_planted_token_is_written_nowhere(demo_ckpt, tmp_path):
    token = "hf_plantedSecretTokenABCDEFGHIJKLMNOPQRSTUV"
    env = {"HF_TOKEN": token, "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": token}
    out = tmp_path / "out"
    procs = [run_cli("convert", demo_ckpt, out / "nvfp4", "--recipe", "step3p7-nvfp4-moe-only-kvfp8", "--calib-samples", "4",
                     "--calib-seq-len", "32", env=env),
             run_cli("check", out / "nvfp4", env=env),
             run_cli("verify", out / "nvfp4", "--ref", demo_ckpt, "--eval-samples", "2", "--eval-seq-len", "32",
                     "--report", out / "report", env=env),
             run_cli("push", out / "nvfp4", "org/name", "--base-model", "org/base", "--dry-run", env=env),
             run_cli("push", out / "nvfp4", "org/name", "--base-model", "org/base", env=env),  # offline: refused
             run_cli("convert", "org/not-cached", out / "x", env=env)]  # fmt: skip
    assert [p.returncode for p in procs] == [0, 0, 0, 0, 2, 2]
    for p in procs:
        assert token not in p.stdout + p.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert token.encode() not in path.read_bytes(), path
    record("security", "a planted HF_TOKEN in outputs, manifests, reports and messages", files_checked=len(files), found=0)
