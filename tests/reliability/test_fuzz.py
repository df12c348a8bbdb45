"""Fuzzing every parser of untrusted input with hypothesis: only StepquantError escapes (one line), no
case hangs, and no header field makes a parser allocate beyond the file's size.

500 cases per parser in CI; STEPQUANT_SLOW=1 runs 10,000 (or STEPQUANT_FUZZ_CASES).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepquant import gpqa
from stepquant.calibrate import _texts, load_batches
from stepquant.checkpoint import open_checkpoint
from stepquant.inspect import inspect_checkpoint
from stepquant.recipes import load_recipe
from stepquant.stfile import read_header

from .record import Tally, record

SLOW = os.environ.get("STEPQUANT_SLOW") == "1"
CASES = int(os.environ.get("STEPQUANT_FUZZ_CASES", 10_000 if SLOW else 500))
MAX_SECONDS = 5.0  # no single case may take longer: nothing hangs
FUZZ = settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))  # fmt: skip

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
DTYPES = ["BF16", "F16", "F32", "F64", "I8", "U8", "I32", "I64", "F8_E4M3", "F8_E5M2", "BOOL", "U4", "bf16", "", "X"]
ints = st.integers(-3, 64) | st.integers(-(2**64), 2**64)


@pytest.fixture(scope="module")
def tally():
    tallies: dict[str, Tally] = {}
    yield tallies
    for name, t in tallies.items():
        record("fuzz", name, cases=t.cases, rejected=t.rejected, accepted=t.accepted, slowest_s=round(t.slowest, 4))


def finish(t: Tally, name: str, tallies: dict) -> None:
    tallies[name] = t
    assert t.cases >= min(CASES, 100) and t.slowest < MAX_SECONDS


@st.composite
def safetensors_files(draw) -> bytes:
    """Mostly well-formed headers with hostile fields, some raw garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    header: dict = {}
    for i in range(draw(st.integers(0, 4))):
        entry = {"dtype": draw(st.sampled_from(DTYPES) | st.text(max_size=5)),
                 "shape": draw(st.lists(ints, max_size=4) | json_values),
                 "data_offsets": draw(st.lists(ints, min_size=2, max_size=2) | json_values)}  # fmt: skip
        if draw(st.integers(0, 9)) == 0:
            entry = draw(json_values)
        header[draw(st.text(max_size=12)) if draw(st.booleans()) else f"t{i}"] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()
    data = draw(st.binary(max_size=256))
    hlen = len(raw) if draw(st.integers(0, 3)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", hlen) + raw + data


def test_fuzz_safetensors_header(tmp_path, tally):
    t = Tally()
    path = tmp_path / "model.safetensors"

    @FUZZ
    @given(safetensors_files())
    def run(blob):
        path.write_bytes(blob)
        tracemalloc.start()
        try:
            with t.case():
                read_header(path)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 64 * len(blob) + (1 << 20), f"{peak} bytes allocated for a {len(blob)}-byte file"

    run()
    finish(t, "safetensors header", tally)


@pytest.fixture
def folder(tmp_path, demo_ckpt) -> Path:
    """A small valid checkpoint (the demo's config and one tiny shard) whose index or config a case replaces."""
    from safetensors.torch import save_file
    import torch

    root = tmp_path / "ckpt"
    root.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}, root / "a.safetensors")
    shutil.copy(demo_ckpt / "config.json", root / "config.json")
    return root


@st.composite
def index_files(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    names = st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "b.safetensors", "", ".", "a.bin"]) | st.text(max_size=15)
    tensors = st.sampled_from(["model.embed_tokens.weight"]) | st.text(max_size=12)
    body = {"metadata": draw(json_values), "weight_map": draw(st.dictionaries(tensors, names | json_values, max_size=4) | json_values)}
    if draw(st.integers(0, 4)) == 0:
        body = draw(json_values)
    return json.dumps(body).encode()


def test_fuzz_index(folder, tally):
    t = Tally()

    @FUZZ
    @given(index_files())
    def run(blob):
        (folder / "model.safetensors.index.json").write_bytes(blob)
        with t.case():
            with open_checkpoint(folder) as ckpt:
                assert all(p.resolve().is_relative_to(folder.resolve()) for p in ckpt.shards)

    run()
    finish(t, "model.safetensors.index.json", tally)


@st.composite
def config_files(draw, base: dict) -> bytes:
    roll = draw(st.integers(0, 9))
    if roll == 0:
        return draw(st.binary(max_size=200))
    if roll == 1:
        return json.dumps(draw(json_values)).encode()
    config = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):  # replace some fields, at top level or in text_config
        holder = config.get("text_config") if draw(st.booleans()) and isinstance(config.get("text_config"), dict) else config
        key = draw(st.sampled_from(sorted(holder)) | st.text(max_size=8)) if holder else draw(st.text(max_size=8))
        holder[key] = draw(json_values)
    return json.dumps(config).encode()


def test_fuzz_config(folder, tally):
    t = Tally()
    base = json.loads((folder / "config.json").read_text())

    @FUZZ
    @given(config_files(base))
    def run(blob):
        (folder / "config.json").write_bytes(blob)
        with t.case():
            inspect_checkpoint(str(folder))

    run()
    finish(t, "config.json", tally)


RECIPE_KEYS = ["name", "description", "format", "scope", "kv_cache", "moe_layout", "naming", "expert_input_scale",
               "calib_data", "calib_samples", "calib_seq_len", "exclude", "unknown"]  # fmt: skip


@st.composite
def recipe_files(draw) -> str:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=200))
    body = draw(st.dictionaries(st.sampled_from(RECIPE_KEYS), json_values | st.sampled_from(["nvfp4", "fp8", "moe-only", "stacked"]), max_size=6))
    return yaml.safe_dump(body) if draw(st.booleans()) else json.dumps(body) + draw(st.text(max_size=5))


def test_fuzz_recipe(tmp_path, tally):
    t = Tally()
    path = tmp_path / "r.yaml"

    @FUZZ
    @given(recipe_files() | st.just("!!python/object/apply:os.system ['echo pwned']"))
    def run(text):
        path.write_text(text, errors="surrogatepass") if text.isascii() else path.write_bytes(text.encode("utf-8", "surrogatepass"))
        with t.case():
            load_recipe(str(path))

    run()
    finish(t, "recipe YAML", tally)


@st.composite
def calibration_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".json", ".jsonl", ".txt"]))
    if draw(st.integers(0, 4)) == 0:
        return suffix, draw(st.binary(max_size=200))
    if suffix == ".json":
        batches = draw(st.lists(st.lists(st.lists(st.integers(-5, 2**40) | st.integers(-(2**70), 2**70), max_size=5), max_size=3), max_size=3) | json_values)
        return suffix, json.dumps({"batches": batches} if draw(st.integers(0, 4)) else draw(json_values)).encode()
    if suffix == ".jsonl":
        rows = draw(st.lists(st.dictionaries(st.sampled_from(["text", "other"]), json_values, max_size=2) | json_values, max_size=4))
        return suffix, "\n".join(json.dumps(r) for r in rows).encode()
    return suffix, draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")


def test_fuzz_calibration_files(tmp_path, tally):
    t = Tally()

    @FUZZ
    @given(calibration_files())
    def run(case):
        suffix, blob = case
        path = tmp_path / f"calib{suffix}"
        path.write_bytes(blob)
        with t.case():
            if suffix == ".json":  # token ids: parsed into batches here; text goes to the tokenizer next
                load_batches(str(path), tmp_path, 2, 4)
            else:
                assert all(isinstance(x, str) for x in _texts(str(path), path))

    run()
    finish(t, "calibration files", tally)


@st.composite
def gpqa_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".csv", ".json", ".jsonl", ".txt"]))
    if draw(st.integers(0, 4)) == 0:
        return suffix, draw(st.binary(max_size=300))
    cols = st.sampled_from([*gpqa.COLUMNS, "Extra"]) | st.text(max_size=8)
    rows = draw(st.lists(st.dictionaries(cols, st.text(max_size=10) | json_values, max_size=6), max_size=4))
    if draw(st.booleans()):  # well-formed rows, to reach what comes after the column check
        cell = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
        rows = draw(st.lists(st.fixed_dictionaries(dict.fromkeys(gpqa.COLUMNS, cell)), min_size=1, max_size=4))
    if suffix == ".csv":
        keys = sorted({k for r in rows for k in r}) or list(gpqa.COLUMNS)
        lines = [",".join(json.dumps(k) for k in keys)] + [",".join(json.dumps(str(r.get(k, ""))) for k in keys) for r in rows]
        return suffix, ("\n".join(lines) + draw(st.text(max_size=10))).encode("utf-8", "surrogatepass")
    if suffix == ".jsonl":
        return suffix, "\n".join(json.dumps(r) for r in rows).encode()
    return suffix, json.dumps(rows if draw(st.integers(0, 3)) else draw(json_values)).encode()


def test_fuzz_gpqa_files(tmp_path, tally):
    t = Tally()

    @FUZZ
    @given(gpqa_files())
    def run(case):
        suffix, blob = case
        path = tmp_path / f"gpqa{suffix}"
        path.write_bytes(blob)
        with t.case():
            rows = gpqa.load_rows(str(path))
            assert rows and all(set(r) == set(gpqa.COLUMNS) for r in rows)

    run()
    finish(t, "GPQA files", tally)
