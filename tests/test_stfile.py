import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepquant.errors import StepquantError
from stepquant.stfile import build_header, read_header

from .conftest import write_raw


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.zeros(0, 7, dtype=torch.uint8),
        "s": torch.tensor(2.5),
        "f8": torch.randn(4, 16).to(torch.float8_e4m3fn),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    infos, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {
        "a": ("F32", (3, 4)), "b": ("BF16", (5,)), "c": ("U8", (0, 7)), "s": ("F32", ()), "f8": ("F8_E4M3", (4, 16)),
    }  # fmt: skip
    assert infos["a"].nbytes == 48


def test_build_header_is_read_by_safetensors(tmp_path):
    a = torch.arange(6, dtype=torch.int32)
    b = torch.arange(4, dtype=torch.bfloat16)
    entries = [("a", "I32", (6,), 24), ("b", "BF16", (4,), 8)]
    head = build_header(entries, {"format": "pt"})
    assert len(head) % 8 == 0
    (tmp_path / "y.safetensors").write_bytes(head + a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes())
    back = load_file(tmp_path / "y.safetensors")
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b)


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "header, data, hlen, message",
    [
        (GOOD, b"\0" * 4, None, "outside the 4-byte data section"),  # truncated
        (GOOD, b"\0" * 8, 10**6, "runs past the end of the file"),
        (b"{not json", b"", None, "not valid JSON"),
        (b'{"t": 1, "t": 2}', b"", None, "duplicate key"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 8, None, "outside"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "begin <= end"),
        ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "exactly dtype"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, "overlap",
        ),  # fmt: skip
        ({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 8, None, "__metadata__"),
    ],
)
def test_bad_headers_are_refused_with_the_file_named(tmp_path, header, data, hlen, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, hlen)
    with pytest.raises(StepquantError) as err:
        read_header(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_too_short_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(struct.pack("<I", 3))
    with pytest.raises(StepquantError, match="too short"):
        read_header(p)


def test_header_bound_does_not_allocate(tmp_path):
    # a header length of 2**63 must be refused from the file size, not by trying to read it
    p = write_raw(tmp_path / "huge.safetensors", json.dumps(GOOD).encode(), b"\0" * 8, 2**63)
    with pytest.raises(StepquantError, match="runs past"):
        read_header(p)
