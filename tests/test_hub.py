"""`stepquant push` against a Hub stand-in on loopback, through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepquant.convert import ConvertOptions, convert
from stepquant.hub import NEVER_UPLOADED, upload_plan

from .conftest import run_cli
from .hub_server import LFS_MIN_BYTES, FakeHub

TOKEN = "hf_stepquantTESTtokenDoNotPrint0123456789"
REPO = "stepquant-test/demo-nvfp4"


@pytest.fixture(scope="module")
def nvfp4_build(demo_ckpt, tmp_path_factory) -> Path:
    """The demo's NVFP4 release build, in 1 MB shards so the upload has several LFS files."""
    dst = tmp_path_factory.mktemp("push") / "nvfp4"
    opts = ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=4, calib_seq_len=32, max_shard_size="1MB")
    return convert(demo_ckpt, dst, opts)


@pytest.fixture
def build(nvfp4_build, tmp_path) -> Path:
    """A fresh copy, with leftovers that must never be uploaded."""
    dst = shutil.copytree(nvfp4_build, tmp_path / "nvfp4")
    (dst / "model-00001-of-00004.safetensors.partial").write_bytes(b"half")
    (dst / ".stepquant-journal.json").write_text("{}")
    (dst / ".cache" / "huggingface").mkdir(parents=True)
    (dst / ".cache" / "huggingface" / "upload.lock").write_text("")
    return dst


@pytest.fixture
def hub():
    server = FakeHub(TOKEN)
    yield server
    server.close()


def hub_env(hub: FakeHub, token: str = TOKEN) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(Path(os.environ.get("TMPDIR", "/tmp")) / "sq-hf-home")}  # fmt: skip


def shipped(dst: Path) -> dict[str, bytes]:
    """What should arrive: every file of the folder minus the leftovers."""
    return {rel: p.read_bytes() for rel, p in upload_plan(dst, None)}


def lfs_oids(dst: Path) -> set[str]:
    """sha256 of the files the stand-in takes through LFS (as the Hub does: weights and large files)."""
    return {hashlib.sha256(b).hexdigest() for p, b in shipped(dst).items()
            if p.endswith(".safetensors") or len(b) >= LFS_MIN_BYTES}  # fmt: skip


def test_dry_run_lists_shards_and_sidecars_and_writes_the_card(build):
    from huggingface_hub import ModelCard

    proc = run_cli("push", build, REPO, "--dry-run", "--base-model", "stepquant-test/demo-bf16", check=True)
    listed = [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()][:-1]
    shards = sorted(p.name for p in build.glob("model-*.safetensors"))
    assert len(shards) == 4
    for name in [*shards, "model.safetensors.index.json", "config.json", "hf_quant_config.json", "tokenizer.json",
                 "chat_template.jinja", "stepquant.json", "README.md"]:  # fmt: skip
        assert name in listed, name
    assert not [n for n in listed if n.endswith(".partial") or "journal" in n or n.startswith(".cache")]
    sizes = {line.split()[-1]: int(line.split()[0].replace(",", "")) for line in proc.stdout.splitlines()
             if line.strip()[:1].isdigit() and not line.rstrip().endswith("nothing uploaded)")}  # fmt: skip
    assert sizes[shards[0]] == (build / shards[0]).stat().st_size
    card = ModelCard.load(build / "README.md")
    assert card.data.base_model == "stepquant-test/demo-bf16"
    assert card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0"  # carried from the demo source's card
    assert {"nvfp4", "modelopt", "stepquant"} <= set(card.data.tags)


def test_never_uploaded_patterns_cover_what_convert_leaves(build):
    names = [rel for rel, _ in upload_plan(build, None)]
    assert ".stepquant-journal.json" not in names and not any(n.endswith(".partial") for n in names)
    assert ".stepquant.lock" in NEVER_UPLOADED


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "stepquant.json").unlink(), "no stepquant.json"),
    (lambda d: (d / "model-00002-of-00004.safetensors").write_bytes(b"x"), "not the size"),
    (lambda d: (d / "hf_quant_config.json").unlink(), "check finds"),
])  # fmt: skip
def test_refuses_an_unfinished_or_defective_folder_unless_forced(build, damage, message):
    damage(build)
    proc = run_cli("push", build, REPO, "--dry-run", "--base-model", "o/n")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (build / "README.md").exists()
    if message == "not the size":  # a shard that cannot be read stops even a forced push
        return
    assert run_cli("push", build, REPO, "--dry-run", "--base-model", "o/n", "--force").returncode == 0
    assert (build / "README.md").is_file()


def test_push_uploads_everything_once(build, hub):
    env = hub_env(hub)
    proc = run_cli("push", build, REPO, "--base-model", "stepquant-test/demo-bf16", "--commit-message", "NVFP4 build",
                   env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert hub.tree(REPO) == shipped(build)
    assert [c["summary"] for c in hub.repos[REPO].commits] == ["NVFP4 build"]
    assert hub.unauthorized == []
    assert sorted(hub.puts) == sorted(lfs_oids(build)) and len(hub.puts) >= 4
    assert TOKEN not in proc.stdout + proc.stderr
    for path in build.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    # a second push finds everything there: no upload, no commit
    again = run_cli("push", build, REPO, "--base-model", "stepquant-test/demo-bf16", env=env)
    assert again.returncode == 0, again.stderr
    assert "0 of" in again.stdout and len(hub.puts) == len(lfs_oids(build)) and len(hub.repos[REPO].commits) == 1


def test_rerun_after_an_interrupted_upload_sends_only_what_is_missing(build, hub):
    env = {**os.environ, **hub_env(hub)}
    hub.hold_after(2)  # the third LFS upload hangs; then the client is killed
    args = [sys.executable, "-m", "stepquant", "push", str(build), REPO, "--base-model", "stepquant-test/demo-bf16"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if not hub.wait_held(120):
            proc.kill()
            raise AssertionError(f"the upload never reached the held request: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.5)  # let in-flight uploads of other threads land or hang too
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    hub.release()
    first = list(hub.puts)
    assert 2 <= len(first) < len(lfs_oids(build)) and REPO in hub.repos and hub.repos[REPO].commits == []
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    second = hub.puts[len(first):]
    assert set(second).isdisjoint(first) and set(first) | set(second) == lfs_oids(build)
    assert hub.tree(REPO) == shipped(build)


def test_branch_and_pull_request(build, hub):
    env = hub_env(hub)
    base = ("push", build, REPO, "--base-model", "stepquant-test/demo-bf16")
    assert run_cli(*base, "--revision", "nvfp4", env=env).returncode == 0
    assert hub.tree(REPO, "nvfp4") == shipped(build) and hub.tree(REPO) == {}
    proc = run_cli(*base, "--create-pr", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.tree(REPO, "refs/pr/1") == shipped(build) and "/discussions/1" in proc.stdout
    assert len(hub.puts) == len(lfs_oids(build))  # the PR reused the LFS objects the branch push stored


def test_bad_token_and_offline_give_one_line_errors(build, hub):
    wrong = "hf_wrongTokenThatMustNotAppear987654321"
    proc = run_cli("push", build, REPO, "--base-model", "o/n", env=hub_env(hub, wrong))
    assert proc.returncode == 2 and "refused" in proc.stderr and wrong not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("push", build, REPO, "--base-model", "o/n", env={**hub_env(hub), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr
    assert hub.repos == {}


def test_existing_card_is_kept_unless_regenerated(build):
    (build / "README.md").write_text("---\nlicense: mit\n---\n\nmy own card\n")
    run_cli("push", build, REPO, "--dry-run", "--base-model", "o/n", check=True)
    assert "my own card" in (build / "README.md").read_text()
    run_cli("push", build, REPO, "--dry-run", "--base-model", "o/n", "--regenerate-card", check=True)
    assert "my own card" not in (build / "README.md").read_text()
    assert json.loads((build / "stepquant.json").read_text())["source"]["card"]["license"] == "apache-2.0"
