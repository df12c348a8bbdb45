import dataclasses
import hashlib
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from stepquant.errors import StepquantError
from stepquant.shards import INDEX_NAME, OutputDir, OutTensor, ShardWriter, parse_size, plan_shards, shard_layout


def _out(name, t):
    data = t.contiguous().view(torch.uint8).numpy().tobytes()
    dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}[t.dtype]
    return OutTensor(name, dtype, tuple(t.shape), len(data), lambda: [data[:7], data[7:]])


@pytest.mark.parametrize("text, n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                     ("1.5kb", 1500), ("123", 123), (77, 77)])  # fmt: skip
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_bad(text):
    with pytest.raises(StepquantError, match="bad size"):
        parse_size(text)


def test_plan_caps_shards_and_isolates_big_tensors():
    ts = [_out(f"model.layers.{i}.w", torch.zeros(25)) for i in range(10)]  # 100 B each
    ts.append(_out("model.layers.2.big", torch.zeros(1000)))
    shards = plan_shards(ts, 250)
    assert all(sum(t.nbytes for t in s) <= 250 or len(s) == 1 for s in shards)
    assert [len(s) for s in shards if any(t.name.endswith("big") for t in s)] == [1]
    # natural order: layer 2 before layer 10
    flat = [t.name for s in shards for t in s]
    assert flat.index("model.layers.2.w") < flat.index("model.layers.9.w")


def test_writes_loadable_shards_and_index(tmp_path):
    torch.manual_seed(0)
    src = {f"model.layers.{i}.{k}": torch.randn(8, 4).to(dt) for i in range(4)
           for k, dt in (("a", torch.float32), ("b", torch.bfloat16), ("c", torch.uint8))}  # fmt: skip
    with OutputDir(tmp_path / "out", "fp") as out:
        out.write_shards([_out(n, t) for n, t in src.items()], max_shard_size=200)
        out.commit()
    dst = tmp_path / "out"
    index = json.loads((dst / INDEX_NAME).read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values()))
    assert shards[0].endswith(f"-of-{len(shards):05d}.safetensors") and len(shards) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    back = {}
    for s in shards:
        back.update(load_file(dst / s))
    assert back.keys() == src.keys() and all(torch.equal(back[k], v) for k, v in src.items())
    assert not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith(".")) == []


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    with OutputDir(tmp_path / "o", "fp") as out:
        out.write_shards([_out("w", torch.ones(3))], 10**9)
        out.commit()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.safetensors"]


def test_existing_dst_and_partial_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(StepquantError, match="already exists"):
        OutputDir(tmp_path / "d", "fp").__enter__()
    (tmp_path / "e.partial").mkdir()
    with pytest.raises(StepquantError, match="--resume"):
        OutputDir(tmp_path / "e", "fp").__enter__()


def test_resume_refuses_other_inputs(tmp_path):
    with OutputDir(tmp_path / "d", "fp-1") as out:
        out.write_shards([_out("w", torch.ones(3))], 10**9)
    with pytest.raises(StepquantError, match="other inputs or options"):
        OutputDir(tmp_path / "d", "fp-2", resume=True).__enter__()


def test_resume_skips_finished_shards(tmp_path):
    ts = [_out(f"w{i}", torch.full((10,), float(i))) for i in range(4)]
    with OutputDir(tmp_path / "d", "fp") as out:
        out.write_shards(ts, 40)  # four shards, then "killed" before commit
    first = tmp_path / "d.partial" / "model-00001-of-00004.safetensors"
    stamp = first.stat().st_mtime_ns
    calls = []
    again = [OutTensor(t.name, t.dtype, t.shape, t.nbytes, (lambda t=t: calls.append(t.name) or t.chunks())) for t in ts]
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))
    with OutputDir(tmp_path / "d", "fp", resume=True) as out:
        out.write_shards(again, 40)
        out.commit()
    assert calls == []  # every shard was in the journal
    assert (tmp_path / "d" / first.name).stat().st_mtime_ns == stamp - 10**9


def test_second_writer_is_locked_out(tmp_path):
    with OutputDir(tmp_path / "d", "fp"):
        with pytest.raises(StepquantError, match="another stepquant run"):
            OutputDir(tmp_path / "d", "fp", resume=True).__enter__()


def test_overwrite_replaces(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "stale.txt").write_text("x")
    with OutputDir(tmp_path / "d", "fp", overwrite=True) as out:
        out.write_shards([_out("w", torch.ones(3))], 10**9)
        out.commit()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["model.safetensors"]
    assert not list(tmp_path.glob("d.old-*"))


def test_a_failing_write_is_raised_and_leaves_no_shard(tmp_path, monkeypatch):
    """The background writer's error (here: disk full) reaches the caller; the shard is not finished."""
    import stepquant.shards as shards

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, chunk):
            self.n += 1
            if self.n > 2:
                raise OSError(28, "No space left on device")
            return self.f.write(chunk)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = shards._Writer.__init__
    monkeypatch.setattr(shards._Writer, "__init__", lambda self, f, digest: real(self, Full(f), digest))
    t = torch.arange(64, dtype=torch.float32)
    with pytest.raises(OSError, match="No space left"):
        with OutputDir(tmp_path / "out", "fp") as out:
            out.write_shards([_out(f"t{i}", t) for i in range(4)], max_shard_size=1 << 20)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial" / "model.safetensors").exists()


def _late(name, t):
    return dataclasses.replace(_out(name, t), late=True)


def test_late_tensors_go_last_where_they_stay_aligned():
    early = [_out("a.weight", torch.zeros(8, dtype=torch.uint8)), _out("a.norm", torch.zeros(2, dtype=torch.bfloat16))]
    late = [_late("a.input_scale", torch.ones(1)), _late("a.weight_scale_2", torch.ones(1))]
    order = [t.name for t in shard_layout(early + late)]
    assert order == ["a.norm", "a.weight", "a.input_scale", "a.weight_scale_2"]
    # 8 + 4 + 2 bytes before them would leave the F32 scales unaligned: element-size order, names within
    odd = [*early, _out("a.bias", torch.zeros(1, dtype=torch.bfloat16))]
    order = [t.name for t in shard_layout(odd + late)]
    assert order == ["a.input_scale", "a.weight_scale_2", "a.bias", "a.norm", "a.weight"]


def test_background_writer_writes_up_to_the_late_tensors_then_finishes(tmp_path):
    """`start()` writes every shard up to its late tensors while the caller works (here: the late
    values do not exist yet); `finish()` adds them; the shards load and the journal has their sha256."""
    torch.manual_seed(0)
    values: dict[str, torch.Tensor] = {}
    big = {f"model.layers.{i}.w": torch.randn(16, 4) for i in range(3)}
    late_names = [f"model.layers.{i}.w_scale" for i in range(3)]

    def late_tensor(name):
        def chunks():
            yield values[name].numpy().tobytes()  # KeyError if made before the caller set it

        return OutTensor(name, "F32", (), 4, chunks, late=True)

    tensors = [_out(n, t) for n, t in big.items()] + [late_tensor(n) for n in late_names]
    with OutputDir(tmp_path / "o", "fp") as out:
        with ShardWriter(out, tensors, max_shard_size=300) as writer:
            writer.start()
            writer.thread.join(timeout=60)
            tmps = sorted((tmp_path / "o.partial").glob("*.tmp"))
            assert len(tmps) == 3 and not list((tmp_path / "o.partial").glob("*.safetensors"))
            for p in tmps:  # header and the early tensor, nothing of the late one yet
                n = int.from_bytes(p.read_bytes()[:8], "little")
                assert p.stat().st_size == 8 + n + 16 * 4 * 4
            values.update({n: torch.tensor(float(i + 1)) for i, n in enumerate(late_names)})
            weight_map = writer.finish()
        out.commit()
    back = {}
    for name in sorted(set(weight_map.values())):
        path = tmp_path / "o" / name
        back.update(load_file(path))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == out.files[name]["sha256"]
    assert all(torch.equal(back[n], t) for n, t in big.items())
    assert [back[n].item() for n in late_names] == [1.0, 2.0, 3.0]


def test_background_writer_stops_when_the_caller_fails(tmp_path):
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield b"\0" * 4

    tensors = [OutTensor("w", "F32", (1 << 20,), 4 << 20, endless), _late("s", torch.ones(1))]
    with pytest.raises(RuntimeError, match="calibration failed"):
        with OutputDir(tmp_path / "o", "fp") as out:
            with ShardWriter(out, tensors, 10**9) as writer:
                writer.start()
                while not produced:
                    time.sleep(0.01)
                raise RuntimeError("calibration failed")
    assert not writer.thread.is_alive() and len(produced) < 1 << 20
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial" / "model.safetensors").exists()


def test_background_writer_error_reaches_finish(tmp_path):
    def broken():
        yield b"\0" * 4
        raise StepquantError("tensor 'w': NaN or Inf")

    with OutputDir(tmp_path / "o", "fp") as out:
        with ShardWriter(out, [OutTensor("w", "F32", (2,), 8, broken)], 10**9) as writer:
            writer.start()
            with pytest.raises(StepquantError, match="NaN or Inf"):
                writer.finish()
