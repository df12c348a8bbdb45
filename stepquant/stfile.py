"""The safetensors file format: dtype table, header validation and header construction.

We parse headers ourselves (rather than trusting a loader) so that every malformed file is refused
with a message that names the file and the fault, before any byte of data is used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StepquantError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
    "U16": (torch.uint16, 2),
    "I16": (torch.int16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "U32": (torch.uint32, 4),
    "I32": (torch.int32, 4),
    "F32": (torch.float32, 4),
    "U64": (torch.uint64, 8),
    "I64": (torch.int64, 8),
    "F64": (torch.float64, 8),
}
TORCH_TO_ST: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def load_json_strict(data: bytes | str, what: str) -> object:
    """Parse JSON, refusing duplicate keys; errors name `what`."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StepquantError(f"{what}: not valid JSON ({exc})") from None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors file's header against the file and return its tensors and metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StepquantError(f"{path}: file too short for a safetensors header ({size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise StepquantError(
                    f"{path}: header length {hlen} runs past the end of the file ({size} bytes)"
                )
            raw = f.read(hlen)
    except OSError as exc:
        raise StepquantError(f"{path}: cannot read ({exc.strerror})") from None
    header = load_json_strict(raw, f"{path}: header")
    if not isinstance(header, dict):
        raise StepquantError(f"{path}: header is not a JSON object")
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise StepquantError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_entry(path, name, entry, data_start, data_len)
    spans = sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes))
    for prev, cur in zip(spans, spans[1:]):
        if cur.offset < prev.offset + prev.nbytes and cur.nbytes and prev.nbytes:
            raise StepquantError(f"{path}: tensors '{prev.name}' and '{cur.name}' overlap")
    return tensors, metadata


def _tensor_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise StepquantError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise StepquantError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise StepquantError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise StepquantError(f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
    begin, end = offsets
    if end > data_len:
        raise StepquantError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section"
            " (truncated file or corrupt header)"
        )
    need = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != need:
        raise StepquantError(
            f"{where}: shape {shape} of {dtype} needs {need} bytes but data_offsets span {end - begin}"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, need)


def build_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Serialize a header for tensors written back to back in the given order; padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_bytes(fd: int, offset: int, nbytes: int, path: Path, into=None) -> bytearray:
    """Read exactly `nbytes` at `offset` (pread) into a new bytearray, or into the writable buffer
    `into`; refuses short reads."""
    buf = bytearray(nbytes) if into is None else into
    view = memoryview(buf).cast("B")
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise StepquantError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n
    return buf
