"""Reading checkpoints: a local folder or a Hub repo, single-file or sharded safetensors.

Everything is validated before it is trusted (see `stfile.read_header` for the per-file checks; here:
the index, shard names, duplicates, config). Tensors are read lazily, one tensor or one leading-dim
slice (one expert of a stacked tensor) at a time, or streamed as byte chunks, so memory stays
bounded by the largest single read, never the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hub
from .errors import StepquantError
from .stfile import TORCH_TO_ST, TensorInfo, load_json_strict, read_bytes, read_header

INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
NOT_SIDECARS = {INDEX_NAME, "pytorch_model.bin.index.json", "stepquant.json"}
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class Checkpoint:
    """An opened, validated checkpoint. Use as a context manager to close its files."""

    root: Path
    source: str  # what the user named: a path or a repo id
    revision: str | None  # Hub commit, when the source is a repo
    config: dict
    tensors: dict[str, TensorInfo]
    shards: list[Path]
    sidecars: list[str]  # file names (relative to root) that are neither weights nor the index
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _pickled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # -- configs ---------------------------------------------------------------------------------
    @property
    def text_config(self) -> dict:
        """The language model's config: nested `text_config` for multimodal models, else the top level."""
        return self.config.get("text_config") or self.config

    def read_json(self, name: str) -> dict | None:
        """A sidecar JSON file (e.g. hf_quant_config.json), validated, or None if absent."""
        path = self.root / name
        if not path.is_file():
            return None
        data = load_json_strict(path.read_bytes(), str(path))
        if not isinstance(data, dict):
            raise StepquantError(f"{path}: expected a JSON object")
        if isinstance(data.get("quantization"), dict):  # hf_quant_config.json
            validate_fields(data["quantization"], QUANT_FIELDS, f"{path}: quantization")
        elif data.get("quantization") is not None:
            raise StepquantError(f"{path}: 'quantization' must be an object")
        return data

    def quantization(self) -> dict:
        """Existing quantization: quant_algo, kv_cache_quant_algo, group_size, exclude_modules (or None)."""
        hqc = (self.read_json("hf_quant_config.json") or {}).get("quantization")
        if isinstance(hqc, dict):
            return {
                "quant_algo": hqc.get("quant_algo"),
                "kv_cache_quant_algo": hqc.get("kv_cache_quant_algo"),
                "group_size": hqc.get("group_size"),
                "exclude_modules": hqc.get("exclude_modules"),
            }
        qc = self.config.get("quantization_config") or self.text_config.get("quantization_config") or {}
        algo = qc.get("quant_algo")
        if algo is None and qc.get("quant_method") == "fp8":
            algo = "FP8_BLOCK" if qc.get("weight_block_size") else "FP8"
        kv = qc.get("kv_cache_quant_algo")
        scheme = qc.get("kv_cache_scheme")
        if kv is None and isinstance(scheme, dict) and scheme.get("num_bits") == 8 and scheme.get("type") == "float":
            kv = "FP8"
        group = qc.get("group_size")
        if group is None:
            group = next(
                (g["weights"].get("group_size") for g in (qc.get("config_groups") or {}).values()
                 if isinstance(g, dict) and isinstance(g.get("weights"), dict)),
                None,
            )
        return {
            "quant_algo": algo,
            "kv_cache_quant_algo": kv,
            "group_size": group,
            "exclude_modules": qc.get("exclude_modules", qc.get("ignore", qc.get("modules_to_not_convert"))),
        }

    # -- tensors ---------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise StepquantError(f"{self.root}: no tensor named '{name}'") from None

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, freshly allocated (no file mapping is kept)."""
        if name in self._pickled:
            return self._pickled[name].clone()
        t = self.info(name)
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=t.torch_dtype)
        buf = read_bytes(self._fd(t.path), t.offset, t.nbytes, t.path)
        return torch.frombuffer(buf, dtype=torch.uint8).view(t.torch_dtype).reshape(t.shape)

    def read_slice(self, name: str, index: int) -> torch.Tensor:
        """`tensor[index]` along the leading dim (one expert of a stacked tensor), reading only it."""
        t = self.info(name)
        if not t.shape or not 0 <= index < t.shape[0]:
            raise StepquantError(f"{t.path}: tensor '{name}' has no leading index {index}")
        if name in self._pickled:
            return self._pickled[name][index].clone()
        step = t.nbytes // t.shape[0]
        if step == 0:
            return torch.empty(t.shape[1:], dtype=t.torch_dtype)
        buf = read_bytes(self._fd(t.path), t.offset + index * step, step, t.path)
        return torch.frombuffer(buf, dtype=torch.uint8).view(t.torch_dtype).reshape(t.shape[1:])

    def read_into(self, name: str, out: torch.Tensor, index: int | None = None, rows: slice = slice(None)) -> None:
        """Read `tensor[index][rows]` (or `tensor[rows]`) straight into `out`, a contiguous tensor of its
        dtype and shape: no intermediate buffer (the converter's staging of experts in pinned memory)."""
        t = self.info(name)
        if index is not None and not (t.shape and 0 <= index < t.shape[0]):
            raise StepquantError(f"{t.path}: tensor '{name}' has no leading index {index}")
        shape = t.shape[1:] if index is not None else t.shape
        if not shape:
            raise StepquantError(f"{t.path}: tensor '{name}' has no rows to read")
        start, stop, _ = rows.indices(shape[0])
        want = (stop - start, *shape[1:])
        if tuple(out.shape) != want or out.dtype != t.torch_dtype or not out.is_contiguous():
            raise StepquantError(f"{t.path}: tensor '{name}' is {t.dtype}{list(want)}, cannot read it into {out.dtype}{list(out.shape)}")
        if name in self._pickled:
            src = self._pickled[name]
            out.copy_((src if index is None else src[index])[start:stop])
            return
        step = t.nbytes // t.shape[0] if index is not None else 0
        row = out.nbytes // max(1, want[0])
        read_bytes(self._fd(t.path), t.offset + (index or 0) * step + start * row, out.nbytes, t.path,
                   into=out.view(-1).view(torch.uint8).numpy())  # fmt: skip

    def iter_bytes(self, name: str, chunk: int = CHUNK_BYTES) -> Iterator[bytes | bytearray]:
        """The tensor's raw bytes as chunks of at most `chunk` bytes, for copying without decoding."""
        if name in self._pickled:
            yield self._pickled[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            return
        t = self.info(name)
        fd = self._fd(t.path)
        for pos in range(0, t.nbytes, chunk):
            yield read_bytes(fd, t.offset + pos, min(chunk, t.nbytes - pos), t.path)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(src: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Open and validate a checkpoint folder, or a Hub repo id (downloaded through the HF cache)."""
    src_str = str(src)
    commit = None
    if hub.is_repo_id(src_str):
        root, commit = hub.snapshot(src_str, revision)
    else:
        root = Path(src_str)
        if not root.exists():
            raise StepquantError(f"{root}: no such folder (and not a Hub repo id of the form org/name)")
        if not root.is_dir():
            raise StepquantError(f"{root}: not a folder; point stepquant at the checkpoint's folder")
    root = root.resolve()
    config = _read_config(root)
    shards, tensors, pickled = _read_weights(root, allow_pickle)
    weight_files = {p.name for p in shards}
    entries = list(root.iterdir())
    for p in entries:
        if not _within(root, p):
            raise StepquantError(f"{p}: a link out of the checkpoint folder; refusing to read what it points to")
    sidecars = sorted(
        p.name
        for p in entries
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in weight_files
        and p.name not in NOT_SIDECARS
        and not p.name.endswith(WEIGHT_SUFFIXES)
    )
    ckpt = Checkpoint(root, src_str, commit or revision, config, tensors, shards, sidecars)
    ckpt._pickled.update(pickled)
    return ckpt


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


STRING = ("a string", lambda v: isinstance(v, str))
OBJECT = ("an object", lambda v: isinstance(v, dict))
COUNT = ("a count", _count)
NAMES = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))

# The config fields stepquant reads, at the top level, in text_config and in quantization_config, and
# what each must be (null is always allowed: it reads as absent).
CONFIG_FIELDS: dict[str, tuple] = {
    "architectures": NAMES, "model_type": STRING, "text_config": OBJECT, "vision_config": OBJECT,
    "quantization_config": OBJECT, "num_hidden_layers": COUNT, "num_nextn_predict_layers": COUNT,
    "n_routed_experts": COUNT, "moe_num_experts": COUNT, "num_experts": COUNT, "num_local_experts": COUNT,
    "num_experts_per_tok": COUNT,
}  # fmt: skip
QUANT_FIELDS: dict[str, tuple] = {
    "quant_algo": STRING, "quant_method": STRING, "kv_cache_quant_algo": STRING, "group_size": COUNT,
    "exclude_modules": NAMES, "ignore": NAMES, "modules_to_not_convert": NAMES, "config_groups": OBJECT,
    "kv_cache_scheme": OBJECT,
    "weight_block_size": ("a list of counts", lambda v: isinstance(v, list) and all(map(_count, v))),
}  # fmt: skip


def validate_fields(obj: dict, table: dict, where: str) -> None:
    """Refuse a field of `table` that is present with the wrong type, naming it."""
    for key, (what, ok) in table.items():
        if obj.get(key) is not None and not ok(obj[key]):
            raise StepquantError(f"{where}: '{key}' must be {what}")


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        return {}
    config = load_json_strict(path.read_bytes(), str(path))
    if not isinstance(config, dict):
        raise StepquantError(f"{path}: expected a JSON object")
    validate_fields(config, CONFIG_FIELDS, str(path))
    for key in ("text_config", "vision_config"):
        validate_fields(config.get(key) or {}, CONFIG_FIELDS, f"{path}: {key}")
    for holder, where in ((config, ""), (config.get("text_config") or {}, "text_config.")):
        validate_fields(holder.get("quantization_config") or {}, QUANT_FIELDS, f"{path}: {where}quantization_config")
    return config


def _inside(root: Path, name: object, what: str) -> Path:
    """Resolve a file name from an index, refusing anything that leaves the folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise StepquantError(f"{what}: shard name {name!r} is not a file name")
    if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise StepquantError(f"{what}: shard name {name!r} escapes the checkpoint folder")
    path = root / name
    if not _within(root, path):
        raise StepquantError(f"{what}: shard {name!r} resolves outside the checkpoint folder (symlink?)")
    return path


def _within(root: Path, path: Path) -> bool:
    """Whether `path`, links followed, stays in the checkpoint folder — or, for a Hugging Face cache
    snapshot (`models--org--name/snapshots/REV`), in the repo's `blobs/` its links point into."""
    resolved = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent / "blobs")
    return any(a in resolved.parents for a in allowed)


def _read_weights(root: Path, allow_pickle: bool) -> tuple[list[Path], dict[str, TensorInfo], dict]:
    index_path = root / INDEX_NAME
    if index_path.is_file():
        index = load_json_strict(index_path.read_bytes(), str(index_path))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise StepquantError(f"{index_path}: missing or empty 'weight_map'")
        shards: list[Path] = []
        for name in weight_map.values():
            path = _inside(root, name, str(index_path))
            if path not in shards:
                shards.append(path)
        for path in shards:
            if not path.is_file():
                raise StepquantError(f"{index_path}: shard '{path.name}' is listed but missing")
    else:
        shards = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        for path in shards:
            _inside(root, path.name, str(root))
        weight_map = None
    if not shards:
        pickles = sorted(p for pat in PICKLE_PATTERNS for p in root.glob(pat))
        if pickles and not allow_pickle:
            raise StepquantError(
                f"{root}: only pickle weights ({pickles[0].name}) found; pickles can run code,"
                " so they are loaded only with --allow-pickle"
            )
        if pickles:
            return _read_pickles(root, pickles)
        raise StepquantError(f"{root}: no *.safetensors weights found")
    tensors: dict[str, TensorInfo] = {}
    for path in shards:
        found, _ = read_header(path)
        for name, info in found.items():
            if name in tensors:
                raise StepquantError(
                    f"{path}: tensor '{name}' also appears in {tensors[name].path.name} (duplicate name)"
                )
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            info = tensors.get(name)
            if info is None or info.path.name != Path(shard).name:
                raise StepquantError(f"{index_path}: tensor '{name}' is not in its listed shard '{shard}'")
    return shards, tensors, {}


def _read_pickles(root: Path, files: list[Path]) -> tuple[list[Path], dict[str, TensorInfo], dict]:
    """Load pickle weights (only with --allow-pickle), restricted to tensors (`weights_only`)."""
    tensors: dict[str, TensorInfo] = {}
    data: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
            raise StepquantError(f"{path}: cannot load pickle ({type(exc).__name__})") from None
        if not isinstance(state, dict):
            raise StepquantError(f"{path}: pickle does not hold a state dict")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor) or t.dtype not in TORCH_TO_ST:
                raise StepquantError(f"{path}: entry '{name}' is not a tensor of a supported dtype")
            if name in tensors:
                raise StepquantError(f"{path}: tensor '{name}' appears twice (duplicate name)")
            tensors[name] = TensorInfo(
                name, path, TORCH_TO_ST[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size()
            )
            data[name] = t
    return files, tensors, data


def tensor_differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    """Where two checkpoints' tensors differ in names, dtypes, shapes or bytes (empty: identical)."""
    diffs = [f"only in {a.root.name}: {n}" for n in sorted(a.tensors.keys() - b.tensors.keys())]
    diffs += [f"only in {b.root.name}: {n}" for n in sorted(b.tensors.keys() - a.tensors.keys())]
    for name in sorted(a.tensors.keys() & b.tensors.keys()):
        ta, tb = a.tensors[name], b.tensors[name]
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            diffs.append(f"{name}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
        elif not same_tensor(a, name, b, name):
            diffs.append(f"{name}: bytes differ")
    return diffs


def same_tensor(a: Checkpoint, name_a: str, b: Checkpoint, name_b: str) -> bool:
    """Whether two tensors have the same dtype, shape and bytes (streamed, never held whole)."""
    ta, tb = a.tensors[name_a], b.tensors[name_b]
    if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
        return False
    return all(x == y for x, y in zip(a.iter_bytes(name_a), b.iter_bytes(name_b)))
