"""The real `stepquant convert` command: bad inputs, SIGKILL + --resume, refusals."""

import json
import signal

import pytest
import torch
from safetensors.torch import save_file

from ..conftest import run_cli, write_raw
from ..reliability.record import record


def _good(folder, shards=2):
    folder.mkdir()
    torch.manual_seed(0)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"model.layers.{s}.mlp.up_proj.weight": torch.randn(32, 16, dtype=torch.bfloat16)}
        save_file(part, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return folder / "model-00001-of-00002.safetensors"


def _truncate(src, shard):
    shard.write_bytes(shard.read_bytes()[:-100])


def _header_len(src, shard):
    data = shard.read_bytes()
    shard.write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _raw(header):
    def corrupt(src, shard):
        write_raw(shard, header, b"\0" * 1024)

    return corrupt


def _traversal(src, shard):
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "../../etc/passwd"
    idx.write_text(json.dumps(data))


def _missing(src, shard):
    shard.unlink()


def _pickle_only(src, shard):
    for p in src.glob("*.safetensors*"):
        p.unlink()
    torch.save({"model.w": torch.zeros(2)}, src / "pytorch_model.bin")


W = "model.layers.0.mlp.up_proj.weight"
BAD_INPUTS = {
    "truncated shard": (_truncate, "truncated"),
    "header length past the file": (_header_len, "runs past the end of the file"),
    "non-JSON header": (_raw(b"{this is not json"), "not valid JSON"),
    "offsets outside the data": (_raw({W: {"dtype": "BF16", "shape": [32, 16], "data_offsets": [4096, 5120]}}), "outside"),
    "unknown dtype": (_raw({W: {"dtype": "FP4X", "shape": [512], "data_offsets": [0, 1024]}}), "unknown dtype"),
    "shape/size mismatch": (_raw({W: {"dtype": "BF16", "shape": [32, 32], "data_offsets": [0, 1024]}}), "needs 2048 bytes"),
    "index path traversal": (_traversal, "escapes the checkpoint folder"),
    "missing shard": (_missing, "missing"),
    "pickle-only folder": (_pickle_only, "--allow-pickle"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case):
    corrupt, message = BAD_INPUTS[case]
    src = tmp_path / "src"
    corrupt(src, _good(src))
    dst = tmp_path / "dst"
    proc = run_cli("convert", src, dst, "--to", "bf16")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert str(src) in lines[0]  # names the file or folder at fault
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not dst.exists() and not (tmp_path / "dst.partial").exists()
    # inspect refuses the same input the same way
    proc = run_cli("inspect", src)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    record("bad input", case, exit_code=2, one_line=True, written=False)


def _multishard(folder):
    folder.mkdir()
    torch.manual_seed(1)
    tensors = {f"model.layers.{i}.mlp.{k}.weight": torch.randn(256, 256, dtype=torch.bfloat16)
               for i in range(8) for k in ("gate_proj", "up_proj")}  # fmt: skip  (16 x 128 KiB)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _files(folder):
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "stepquant.json":
            m = json.loads(data)
            m.pop("timings")
            data = json.dumps(m, sort_keys=True).encode()
        out[p.name] = data
    return out


@pytest.mark.parametrize("kill_after", [100_000, 700_000, 1_900_000])
def test_sigkill_then_resume_is_byte_identical(tmp_path, kill_after):
    src = _multishard(tmp_path / "src")
    args = ["convert", src, tmp_path / "dst", "--naming", "modelopt", "--max-shard-size", "600KB"]
    proc = run_cli(*args, env={"STEPQUANT_FAULT_KILL_AFTER_BYTES": str(kill_after)})
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "dst").exists()
    partial = tmp_path / "dst.partial"
    journal = json.loads((partial / ".stepquant-journal.json").read_text())
    assert len(journal["files"]) == kill_after // 524_288  # shards finished before the kill (4 tensors of 128 KiB each)
    # without --resume the leftover is refused, not silently reused or deleted
    proc = run_cli(*args)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    run_cli(*args, "--resume", check=True)
    assert not partial.exists()
    run_cli("convert", src, tmp_path / "clean", "--naming", "modelopt", "--max-shard-size", "600KB", check=True)
    resumed, clean = _files(tmp_path / "dst"), _files(tmp_path / "clean")
    assert list(resumed) == list(clean) and len([n for n in clean if n.endswith(".safetensors")]) == 4
    for name in clean:
        assert resumed[name] == clean[name], name


def test_existing_dst_refused_then_overwritten(tmp_path):
    src = _multishard(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    proc = run_cli("convert", src, tmp_path / "dst")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    run_cli("convert", src, tmp_path / "dst", "--overwrite", check=True)
    assert (tmp_path / "dst" / "model.safetensors").is_file()


def test_inspect_json_keys(tmp_path):
    src = _multishard(tmp_path / "src")
    proc = run_cli("inspect", "--json", src, check=True)
    r = json.loads(proc.stdout)
    for key in ("family", "naming", "moe_layout", "num_experts", "quant_algo", "kv_cache_quant_algo", "total_bytes", "tensors"):
        assert key in r
    assert r["family"] == "llama" and r["tensors"] == 16 and r["total_bytes"] == 16 * 256 * 256 * 2
