"""`convert`: read -> rename -> (plan -> quantize, in later work) -> lay out -> write.

This version does the lossless path: renaming between naming conventions and re-sharding, with the
exclude lists of the quantization configs renamed alongside. Tensor bytes are streamed, never decoded.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .errors import StepquantError
from .naming import PrefixMap, detect_naming, rename_all, resolve_map
from .shards import DEFAULT_MAX_SHARD, OutputDir, OutTensor, parse_size

FORMATS = ("keep", "bf16")
# Files of the source that are not carried over: they describe the source, not the output.
NOT_COPIED = {"config.json", "hf_quant_config.json", "README.md", ".gitattributes"}
MANIFEST = "stepquant.json"


@dataclass
class ConvertOptions:
    to: str = "keep"
    naming: str = "keep"
    naming_map: str | None = None
    max_shard_size: str | int = DEFAULT_MAX_SHARD
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    revision: str | None = None


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions | None = None) -> Path:
    """Convert the checkpoint at `src` (folder or Hub id) into a new folder `dst`; returns `dst`."""
    opts = opts or ConvertOptions()
    started = time.time()
    if opts.to not in FORMATS:
        raise StepquantError(f"unknown output format '{opts.to}' (this version writes: {', '.join(FORMATS)})")
    max_shard = parse_size(opts.max_shard_size)
    with open_checkpoint(src, opts.revision, opts.allow_pickle) as ckpt:
        quant = ckpt.quantization()
        if opts.to == "bf16" and quant["quant_algo"]:
            raise StepquantError(
                f"{ckpt.root}: is {quant['quant_algo']}-quantized; writing it as bf16 needs dequantization,"
                " which this version does not do yet (omit --to to rename/re-shard it as it is)"
            )
        names = list(ckpt.tensors)
        mapping = resolve_map(names, opts.naming, opts.naming_map)
        renamed = rename_all(names, mapping) if mapping else {n: n for n in names}
        tensors = [_copy_of(ckpt, old, new) for old, new in renamed.items()]
        fingerprint = _fingerprint(ckpt, opts, renamed)
        with OutputDir(dst, fingerprint, resume=opts.resume, overwrite=opts.overwrite) as out:
            out.write_shards(tensors, max_shard, desc=f"{Path(dst).name}")
            _write_configs(ckpt, out, mapping)
            for name in ckpt.sidecars:
                if name not in NOT_COPIED:
                    out.copy_file(ckpt.root / name, name)
            manifest = _manifest(ckpt, opts, names, mapping, out.files, time.time() - started)
            out.write_file(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            return out.commit()


def _copy_of(ckpt: Checkpoint, old: str, new: str) -> OutTensor:
    t = ckpt.tensors[old]
    return OutTensor(new, t.dtype, t.shape, t.nbytes, lambda: ckpt.iter_bytes(old))


def _write_configs(ckpt: Checkpoint, out: OutputDir, mapping: PrefixMap | None) -> None:
    """config.json and hf_quant_config.json, with exclude/ignore patterns renamed like the tensors."""
    if ckpt.config:
        config = json.loads(json.dumps(ckpt.config))
        for holder in (config, config.get("text_config") or {}):
            qc = holder.get("quantization_config")
            if isinstance(qc, dict):
                for key in ("ignore", "exclude_modules"):
                    if isinstance(qc.get(key), list) and mapping:
                        qc[key] = [mapping.apply_pattern(p) for p in qc[key]]
        out.write_file("config.json", (json.dumps(config, indent=2) + "\n").encode())
    hqc = ckpt.read_json("hf_quant_config.json")
    if hqc is not None:
        q = hqc.get("quantization")
        if isinstance(q, dict) and isinstance(q.get("exclude_modules"), list) and mapping:
            q["exclude_modules"] = [mapping.apply_pattern(p) for p in q["exclude_modules"]]
        out.write_file("hf_quant_config.json", (json.dumps(hqc, indent=4) + "\n").encode())


def _source_files(ckpt: Checkpoint) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in ckpt.shards}


def _fingerprint(ckpt: Checkpoint, opts: ConvertOptions, renamed: dict[str, str]) -> str:
    """Identifies one conversion: resuming is allowed only into a partial output with the same one."""
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in ckpt.shards}
    body = {
        "version": __version__,
        "source": str(ckpt.root),
        "files": stats,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite")},
        "tensors": sorted(renamed.items()),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _manifest(
    ckpt: Checkpoint,
    opts: ConvertOptions,
    names: list[str],
    mapping: PrefixMap | None,
    files: dict[str, dict],
    seconds: float,
) -> dict:
    return {
        "producer": {"name": "stepquant", "version": __version__},
        "command": "convert",
        "options": {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite")},
        "source": {
            "id": ckpt.source,
            "revision": ckpt.revision,
            "naming": detect_naming(names),
            "files": _source_files(ckpt),
            "total_bytes": ckpt.total_bytes,
        },
        "naming_map": {"label": mapping.label, "prefixes": mapping.pairs} if mapping else None,
        "outputs": dict(sorted(files.items())),
        # the only field that differs between two runs of the same conversion
        "timings": {"total_seconds": round(seconds, 3)},
    }
