import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepquant.checkpoint import open_checkpoint, tensor_differences
from stepquant.errors import StepquantError

from .conftest import run_cli


def _sharded(tmp_path, n_shards=3):
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(4, 8, 16, dtype=torch.bfloat16) for i in range(6)}
    tensors["lm_head.weight"] = torch.randn(32, 16)
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, tmp_path / fname)
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    return tensors


def test_sharded_read_slice_and_bytes(tmp_path):
    tensors = _sharded(tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        assert set(ckpt.tensors) == set(tensors)
        assert len(ckpt.shards) == 3
        assert ckpt.sidecars == ["config.json", "tokenizer.json"]
        for name, t in tensors.items():
            assert torch.equal(ckpt.read(name), t)
            assert b"".join(ckpt.iter_bytes(name, chunk=100)) == t.contiguous().view(torch.uint8).numpy().tobytes()
        w = tensors["model.layers.3.w"]
        for e in range(4):
            assert torch.equal(ckpt.read_slice("model.layers.3.w", e), w[e])
        with pytest.raises(StepquantError, match="no leading index 4"):
            ckpt.read_slice("model.layers.3.w", 4)
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_read_into_an_expert_and_a_row_range(tmp_path):
    tensors = _sharded(tmp_path)
    w = tensors["model.layers.2.w"]
    with open_checkpoint(tmp_path) as ckpt:
        out = torch.empty(8, 16, dtype=torch.bfloat16)
        ckpt.read_into("model.layers.2.w", out, 3)
        assert torch.equal(out, w[3])
        half = torch.empty(4, 16, dtype=torch.bfloat16)
        ckpt.read_into("model.layers.2.w", half, 1, slice(4, 8))  # the up half of a fused gate_up
        assert torch.equal(half, w[1, 4:])
        whole = torch.empty(32, 16)
        ckpt.read_into("lm_head.weight", whole)
        assert torch.equal(whole, tensors["lm_head.weight"])
        with pytest.raises(StepquantError, match=r"cannot read it into torch.float32\[8, 16\]"):
            ckpt.read_into("model.layers.2.w", torch.empty(8, 16), 0)
        with pytest.raises(StepquantError, match="no leading index 4"):
            ckpt.read_into("model.layers.2.w", out, 4)


def test_text_config_nested_and_flat(demo_ckpt, ref):
    with open_checkpoint(demo_ckpt) as ckpt:
        assert ckpt.text_config["n_routed_experts"] == 8
        assert ckpt.config["vision_config"]["hidden_size"] == 64
    with open_checkpoint(ref / "bf16") as ckpt:
        assert ckpt.text_config is ckpt.config


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda wm: wm.update({"lm_head.weight": "../outside.safetensors"}), "escapes"),
        (lambda wm: wm.update({"lm_head.weight": "/etc/passwd"}), "escapes"),
        (lambda wm: wm.update({"lm_head.weight": "model-00009-of-00009.safetensors"}), "missing"),
        (lambda wm: wm.update({"model.layers.0.w": "model-00001-of-00003.safetensors"}), "not in its listed shard"),
        (lambda wm: wm.update({"ghost": "model-00001-of-00003.safetensors"}), "not in its listed shard"),
        (lambda wm: wm.update({"lm_head.weight": 5}), "not a file name"),
    ],
)
def test_bad_index(tmp_path, mutate, message):
    _sharded(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    mutate(data["weight_map"])
    idx.write_text(json.dumps(data))
    with pytest.raises(StepquantError, match=message):
        open_checkpoint(tmp_path)


def test_symlinked_shard_outside_is_refused(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    save_file({"a": torch.zeros(2)}, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", src / "model.safetensors")
    with pytest.raises(StepquantError, match="outside the checkpoint folder"):
        open_checkpoint(src)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(StepquantError, match="duplicate"):
        open_checkpoint(tmp_path)


def test_pickles_need_allow_pickle(tmp_path):
    state = {"model.w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(StepquantError, match="--allow-pickle"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.read("model.w"), state["model.w"])
        assert ckpt.tensors["model.w"].dtype == "F32"
        assert b"".join(ckpt.iter_bytes("model.w")) == state["model.w"].numpy().tobytes()


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(StepquantError, match="no such folder"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(StepquantError, match="no \\*.safetensors"):
        open_checkpoint(tmp_path)


def test_hub_repo_offline_is_a_clear_error(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    proc = run_cli("inspect", "stepfun-ai/Step-3.7-Flash", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: stepfun-ai/Step-3.7-Flash: not in the local cache and the Hub cannot be reached"
        " (HF_HUB_OFFLINE or no network)"
    )


def test_hub_repo_from_cache(tmp_path):
    """A repo id resolves through the HF cache (offline), and its commit is recorded."""
    commit = "a" * 40
    cache = tmp_path / "cache"
    snap = cache / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    save_file({"model.w": torch.ones(3)}, snap / "model.safetensors")
    proc = run_cli("inspect", "--json", "org/tiny", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["revision"] == commit and report["tensors"] == 1


def test_tensor_differences(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_file({"x": torch.zeros(4), "y": torch.ones(2)}, a / "model.safetensors")
    save_file({"x": torch.zeros(4), "y": torch.tensor([1.0, 2.0]), "z": torch.ones(1)}, b / "model.safetensors")
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert tensor_differences(ca, cb) == ["only in b: z", "y: bytes differ"]
        assert tensor_differences(ca, ca) == []


def test_reads_do_not_keep_the_file_mapped(tmp_path):
    save_file({"w": torch.arange(10.0)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ckpt:
        t = ckpt.read("w")
    t.add_(1)  # a private, writable copy
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.arange(10.0))
