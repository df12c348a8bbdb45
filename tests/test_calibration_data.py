"""Calibration data from a Hub dataset id: the field each known dataset keeps its text in, conversations
through the chat template, and a seeded shuffle (a stand-in `datasets` module; no network in CI)."""

from __future__ import annotations

import random
import sys
import types

import pytest

from stepquant.calibrate import load_batches
from stepquant.convert import ConvertOptions, convert
from stepquant.errors import StepquantError

ARTICLES = [f"Article {i}: the committee met on day {i} and approved budget line {i * 7}." for i in range(40)]
CHATS = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer number {i}."}]
         for i in range(40)]  # fmt: skip


class FakeStream:
    def __init__(self, rows, seed=None):
        self.rows, self.seed = rows, seed

    def shuffle(self, seed, buffer_size):
        rows = list(self.rows)
        random.Random(seed).shuffle(rows)
        return FakeStream(rows, seed)

    def __iter__(self):
        return iter(self.rows)


@pytest.fixture
def hub_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "cnn_dailymail":
            return FakeStream([{"article": a, "highlights": "x"} for a in ARTICLES])
        if name == "HuggingFaceH4/ultrachat_200k":
            return FakeStream([{"prompt": "p", "messages": m} for m in CHATS])
        return FakeStream([{"content": "no text field"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _decode(batches, root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root)
    return " ".join(tok.decode(row) for b in batches for row in b)


def test_known_datasets_read_their_own_field(hub_datasets, demo_ckpt):
    batches, described = load_batches("cnn_dailymail", demo_ckpt, 4, 16)
    assert hub_datasets[-1] == ("cnn_dailymail", "3.0.0", "train", True)
    assert "committee" in _decode(batches, demo_ckpt) and "cnn_dailymail (4 x 16 tokens)" == described
    batches, _ = load_batches("HuggingFaceH4/ultrachat_200k", demo_ckpt, 4, 16)
    assert hub_datasets[-1][1:3] == (None, "train_sft")
    text = _decode(batches, demo_ckpt)
    assert "Question" in text and "Answer number" in text  # both turns, through the chat template


def test_the_seed_picks_the_sample(hub_datasets, demo_ckpt):
    a = load_batches("cnn_dailymail", demo_ckpt, 2, 16, seed=0)[0]
    b = load_batches("cnn_dailymail", demo_ckpt, 2, 16, seed=0)[0]
    c = load_batches("cnn_dailymail", demo_ckpt, 2, 16, seed=1)[0]
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))


def test_a_dataset_without_the_field_is_refused(hub_datasets, demo_ckpt):
    with pytest.raises(StepquantError, match="no rows with a 'text' field"):
        load_batches("someone/other", demo_ckpt, 2, 16)


def test_the_seed_is_in_the_manifest(hub_datasets, demo_ckpt, tmp_path):
    import json

    dst = convert(demo_ckpt, tmp_path / "dst", ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_data="cnn_dailymail",
                                                              calib_samples=4, calib_seq_len=16, calib_seed=7))  # fmt: skip
    cal = json.loads((dst / "stepquant.json").read_text())["calibration"]
    assert cal["seed"] == 7 and cal["data"].startswith("cnn_dailymail")
