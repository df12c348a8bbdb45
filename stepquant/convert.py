"""`convert`: read -> rename -> plan -> (calibrate) -> quantize -> lay out -> write.

Names are first mapped to the canonical (hub) convention, planned and quantized there, then mapped to
the output convention. Copies and relayouts stream bytes; nothing is re-quantized unless the format
changes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .errors import StepquantError
from .families import GENERIC, detect_family
from .formats import get_format
from .naming import PrefixMap, builtin_map, canonical_names, load_user_map, rename_all
from .plan import Linear, Plan, build_plan
from .quantize import Activations, Executor, all_finite
from .recipes import Recipe, load_recipe
from .shards import DEFAULT_MAX_SHARD, OutputDir, ShardWriter, parse_size

MANIFEST = "stepquant.json"
COVERAGE = "expert_coverage.png"  # calibration tokens per layer and expert, beside the manifest
# Files of the source that are not carried over: they describe the source, not the output.
NOT_COPIED = {"config.json", "hf_quant_config.json", "README.md", ".gitattributes", MANIFEST, COVERAGE}
# Model-card metadata of the source that describes the converted model too.
CARRIED_METADATA = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name")
CANONICAL = "step-hub"
log = logging.getLogger("stepquant")


@dataclass
class ConvertOptions:
    recipe: str | None = None
    to: str | None = None
    scope: str | None = None
    kv_cache: str | None = None
    moe_layout: str | None = None
    naming: str | None = None
    naming_map: str | None = None
    calib_data: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    expert_input_scale: str | None = None
    device: str = "cpu"  # where weights are quantized (Triton kernels on cuda)
    calib_device: str | None = None  # where the calibration forward runs; default: device
    max_shard_size: str | int = DEFAULT_MAX_SHARD
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    allow_nonfinite: bool = False  # keep modules whose weights hold NaN/Inf unquantized (else refused)
    calib_all_experts: bool = False  # every token through every expert for statistics (routed outputs flow on)
    calib_seed: int = 0  # shuffles a calibration dataset given by Hub id (recorded in the manifest)
    calib_mode: str = "layers"  # "layers": one decoder layer in memory at a time; "model": the whole model
    gpus: int = 1  # processes (one per GPU) that each calibrate a share of the batches; rank 0 writes
    revision: str | None = None

    def resolve_recipe(self) -> Recipe:
        return load_recipe(self.recipe).with_overrides(
            format=self.to, scope=self.scope, kv_cache=self.kv_cache, moe_layout=self.moe_layout,
            naming=self.naming, calib_data=self.calib_data, calib_samples=self.calib_samples,
            calib_seq_len=self.calib_seq_len, expert_input_scale=self.expert_input_scale,
        )  # fmt: skip


@dataclass
class Prepared:
    """Everything decided before a weight is read: the plan, the output names and sizes."""

    ckpt: Checkpoint
    recipe: Recipe
    plan: Plan
    src_naming: str | None
    out_map: PrefixMap | None  # canonical -> output names
    to_canon: PrefixMap | None  # source -> canonical names
    outputs: dict[str, tuple[str, tuple[int, ...], int]]  # output name -> dtype, shape, bytes


def prepare(ckpt: Checkpoint, opts: ConvertOptions) -> Prepared:
    recipe = opts.resolve_recipe()
    family = detect_family(ckpt.config) or GENERIC
    src_naming, to_canon, canonical = canonical_names(list(ckpt.tensors), CANONICAL)
    if opts.naming_map:
        out_map = load_user_map(opts.naming_map)
        if to_canon:  # a user map is written against the source's names
            out_map = PrefixMap({to_canon.apply(k, strict=False): v for k, v in out_map.pairs.items()}, out_map.label, False)
    elif recipe.naming == "keep":
        out_map = builtin_map(CANONICAL, src_naming) if to_canon else None
    else:
        if src_naming is None:
            raise StepquantError(f"{ckpt.root}: cannot tell which naming convention it uses; --naming {recipe.naming} needs one")
        out_map = builtin_map(CANONICAL, recipe.naming)
    num_layers = ckpt.text_config.get(family.num_layers_key)
    plan = build_plan(ckpt.tensors, canonical, family, num_layers, recipe)
    if opts.allow_nonfinite and plan.quantizes:
        bad = nonfinite_modules(Executor(ckpt, plan, None, recipe.expert_input_scale))
        if bad:
            plan = build_plan(ckpt.tensors, canonical, family, num_layers, recipe, keep=bad)
    for warning in plan.warnings:
        log.warning(warning)
    executor = Executor(ckpt, plan, None, recipe.expert_input_scale)
    outs = executor.outputs_meta()
    final = rename_all([o[0] for o in outs], out_map) if out_map else {o[0]: o[0] for o in outs}
    outputs = {final[n]: (dt, shp, nb) for n, dt, shp, nb in outs}
    return Prepared(ckpt, recipe, plan, src_naming, out_map, to_canon, outputs)


def nonfinite_modules(executor: Executor) -> dict[str, str]:
    """Modules (expert layers) the plan quantizes whose source weights hold NaN or Inf -> why; reads
    every one of those weights once."""
    bad = {}
    for lin in executor.plan.linears:
        if lin.fmt_out is not None and lin.fmt_out.quant_algo and not all_finite(executor.linear_weight(lin, check=False)):
            bad[lin.module] = f"NaN or Inf in '{lin.parts['weight']}'"
    for ex in executor.plan.experts:
        if ex.fmt_out is not None and ex.fmt_out.quant_algo:
            where = next(((e, k) for k in ex.parts for e in range(ex.num)
                          if not all_finite(executor.expert_weight(ex, k, e, check=False))), None)  # fmt: skip
            if where:
                bad[ex.layer] = f"NaN or Inf in expert {where[0]} {where[1]}"
    return bad


def plan_conversion(src: str | Path, opts: ConvertOptions) -> dict:
    """What `convert` would do with `src`, per module, and the predicted output size; writes nothing."""
    with open_checkpoint(src, opts.revision, opts.allow_pickle) as ckpt:
        return dry_run_summary(prepare(ckpt, opts))


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions | None = None) -> Path | dict:
    """Convert the checkpoint at `src` (folder or Hub id) into a new folder `dst`; returns `dst`
    (or, with `dry_run`, the plan summary, writing nothing)."""
    from . import distributed

    opts = opts or ConvertOptions()
    if opts.dry_run:
        return plan_conversion(src, opts)
    if "cuda" in (opts.device, opts.calib_device):
        import torch

        if not torch.cuda.is_available():
            raise StepquantError("--device cuda: no CUDA device is visible to torch")
        if (opts.calib_device or opts.device) == "cuda" and torch.cuda.device_count() < opts.gpus:
            raise StepquantError(f"--gpus {opts.gpus}: only {torch.cuda.device_count()} CUDA devices are visible")
    if opts.gpus < 1:
        raise StepquantError(f"--gpus {opts.gpus}: expected 1 or more")
    rank = distributed.current()
    if opts.gpus > 1 and rank is None:
        return distributed.launch(opts.gpus, convert, src, dst, opts)
    if rank is not None and rank.rank > 0:
        return _calibrate_share(src, dst, opts)
    started = time.time()
    max_shard = parse_size(opts.max_shard_size)
    with open_checkpoint(src, opts.revision, opts.allow_pickle) as ckpt:
        prep = prepare(ckpt, opts)
        acts = None
        timings: dict = {"processes": rank.world if rank else 1}
        fingerprint = _fingerprint(ckpt, opts, prep)
        # DST.partial and its lock first: a second run on DST is refused before it calibrates
        with OutputDir(dst, fingerprint, resume=opts.resume, overwrite=opts.overwrite) as out:
            executor = Executor(ckpt, prep.plan, None, prep.recipe.expert_input_scale, opts.device)
            tensors = executor.outputs()
            final = rename_all([t.name for t in tensors], prep.out_map) if prep.out_map else None
            if final:
                tensors = [replace(t, name=final[t.name]) for t in tensors]
            with ShardWriter(out, tensors, max_shard, desc=Path(dst).name) as writer:
                if _needs_calibration(prep):
                    # the weights are quantized and written meanwhile: only the late scales need the statistics
                    writer.start()
                    if prep.plan.experts:  # the coverage heat map's plotting library, imported meanwhile too
                        threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True).start()
                    t0 = time.time()  # deterministic, so a resumed run recalibrates to the same scales
                    acts = executor.acts = _calibrate(ckpt, prep, opts, out.scratch("calibration"), writer.check)
                    timings["calibration_seconds"] = round(time.time() - t0, 3)
                executor.check_calibration()
                _warn_uncovered(acts)
                writer.finish()
            _write_configs(ckpt, out, prep)
            for name in ckpt.sidecars:
                if name not in NOT_COPIED:
                    out.copy_file(ckpt.root / name, name)
            if acts is not None and acts.expert_tokens:
                from .calibrate import coverage_png

                out.write_file(COVERAGE, coverage_png(acts.expert_tokens))
            timings["total_seconds"] = round(time.time() - started, 3)
            manifest = _manifest(ckpt, opts, prep, acts, out.files, timings)
            out.write_file(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            return out.commit()


def _needs_calibration(prep: Prepared) -> bool:
    units = [*prep.plan.linears, *prep.plan.experts]
    return bool(prep.plan.kv_layers) or any(u.fmt_out is not None and u.fmt_out.calibrated for u in units)


def _calibrate_share(src: str | Path, dst: str | Path, opts: ConvertOptions) -> None:
    """A rank other than 0: calibrate its share of the batches beside rank 0 (which writes DST)."""
    from .shards import SCRATCH

    with open_checkpoint(src, opts.revision, opts.allow_pickle) as ckpt:
        prep = prepare(ckpt, opts)
        if _needs_calibration(prep):
            _calibrate(ckpt, prep, opts, Path(dst).with_name(Path(dst).name + ".partial") / SCRATCH / "calibration")


def _calibrate(ckpt: Checkpoint, prep: Prepared, opts: ConvertOptions, state: Path | None = None,
               check: Callable[[], None] | None = None) -> Activations:  # fmt: skip
    """Calibration statistics in canonical names, layer-streamed (resumable through `state`) or with the
    whole model in memory: the same numbers either way. Among several ranks, each calibrates its share of
    the batches and all get the combined statistics. `check` is called between layers (or batches) and
    raises to stop."""
    from . import distributed
    from .calibrate import calibrate, finite_weights, load_batches, load_model, to_canonical

    r = prep.recipe
    batches, described = load_batches(r.calib_data, ckpt.root, r.calib_samples, r.calib_seq_len, opts.trust_remote_code,
                                      opts.calib_seed)  # fmt: skip
    kind = opts.calib_device or opts.device
    device, rank = kind, distributed.current()
    if rank is not None:
        distributed.init(rank, kind)
        distributed.barrier()  # rank 0 has taken DST.partial
        device = rank.device(kind)
        state = state / f"rank{rank.rank}" if state is not None else None
        if state is not None:
            state.mkdir(parents=True, exist_ok=True)
    mine = distributed.share(batches, rank)
    if opts.calib_mode == "model":
        model = load_model(ckpt.root, ckpt.config, device, opts.trust_remote_code)
        finite_weights(model, opts.allow_nonfinite)
        stats = calibrate(model, mine, opts.calib_all_experts, check)
    elif opts.calib_mode == "layers":
        from .layerwise import build_meta_model, calibrate_layers

        model = build_meta_model(ckpt.root, ckpt.config, trust_remote_code=opts.trust_remote_code)
        reader = Executor(ckpt, prep.plan, None, r.expert_input_scale, device)  # stages experts for it
        stats = calibrate_layers(model, reader, mine, device, opts.calib_all_experts, state, opts.allow_nonfinite, check)
    else:
        raise StepquantError(f"--calib-mode {opts.calib_mode!r}: expected 'layers' or 'model'")
    del model
    if rank is not None:
        stats = distributed.reduce_stats(stats, kind)
    acts = to_canonical(stats, prep.plan.family.memory_names)
    acts.source = described
    acts.samples = sum(b.shape[0] for b in batches)
    return acts


def _warn_uncovered(acts: Activations | None) -> None:
    """Name the experts that no calibration token reached, routed or (--calib-all-experts) not: they get
    their layer's largest input scale."""
    for layer, amax in sorted((acts.experts_in if acts else {}).items()):
        idle = [i for i, a in enumerate(amax.tolist()) if a == 0]
        if idle:
            log.warning(f"{layer}: experts {_ranges(idle)} saw no calibration tokens and take the layer's largest "
                        "input scale (more --calib-samples, or --calib-all-experts)")  # fmt: skip


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(ids):
        start = v if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v > start else str(v))
            start = None
    return ", ".join(out)


def dry_run_summary(prep: Prepared) -> dict:
    """The plan: per module group what happens, and the predicted output size."""
    rows = []
    rename = prep.out_map.apply if prep.out_map else (lambda n: n)
    for lin in prep.plan.linears:
        action = "copy" if lin.fmt_out is None else f"{'quantize' if lin.fmt_out.quant_algo else 'dequantize'} {lin.fmt_out.name}"
        rows.append({"module": rename(lin.module), "role": lin.role, "action": action, "from": lin.fmt_in.name})
    for ex in prep.plan.experts:
        fmt = ex.fmt_out or ex.fmt_in
        action = ("copy" if ex.fmt_out is None else f"quantize {fmt.name}") + f", {ex.layout} -> {ex.layout_out}"
        rows.append({"module": rename(ex.layer) + " experts", "role": "experts", "action": action,
                     "from": ex.fmt_in.name, "experts": ex.num})  # fmt: skip
    for attn in prep.plan.kv_layers:
        rows.append({"module": rename(attn), "role": "kv-cache", "action": "k_scale, v_scale (fp8)", "from": "-"})
    total = sum(nb for _, _, nb in prep.outputs.values())
    # headers (~ one JSON entry a tensor), copied sidecars and the configs we write
    headers = sum(len(n) + 64 for n in prep.outputs)
    sidecars = sum((prep.ckpt.root / n).stat().st_size for n in prep.ckpt.sidecars if n not in NOT_COPIED)
    configs = 2 * (prep.ckpt.root / "config.json").stat().st_size if prep.ckpt.config else 0
    return {
        "recipe": prep.recipe.as_dict(),
        "source_naming": prep.src_naming,
        "modules": rows,
        "copied_tensors": len(prep.plan.copies),
        "outputs": {n: {"dtype": dt, "shape": list(s), "bytes": nb} for n, (dt, s, nb) in sorted(prep.outputs.items())},
        "predicted_tensor_bytes": total,
        "predicted_bytes": total + headers + sidecars + configs,
        "exclude_modules": _exclude_list(prep),
        "warnings": prep.plan.warnings,
    }


def _exclude_list(prep: Prepared) -> list[str]:
    rename = prep.out_map.apply_pattern if prep.out_map else (lambda n: n)
    return sorted({rename(p) for p in prep.plan.excluded})


def quant_config(prep: Prepared) -> tuple[dict | None, dict | None]:
    """(`hf_quant_config.json`, `config.json["quantization_config"]`) for the output, SPEC §5."""
    plan = prep.plan
    producer = {"name": "stepquant", "version": __version__}
    units = [*plan.linears, *plan.experts]
    fmts = {u.fmt_out.name for u in units if u.fmt_out is not None and u.fmt_out.quant_algo}
    if not fmts:
        if all(u.fmt_out is None for u in units):
            return "source", "source"  # nothing re-encoded: the source's configs, patterns renamed
        return None, None  # dequantized: no quantization config at all
    if len(fmts) > 1:
        raise StepquantError(f"one checkpoint cannot mix output formats {sorted(fmts)}")
    fmt = get_format(fmts.pop())
    kv = "FP8" if plan.kv_layers else None
    exclude = _exclude_list(prep)
    if fmt.name == "fp8-block":
        return None, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": [fmt.config.block, fmt.config.block], "modules_to_not_convert": exclude}  # fmt: skip
    hq: dict = {"quant_algo": fmt.quant_algo}
    if kv or fmt.name.endswith("nvfp4"):
        hq["kv_cache_quant_algo"] = kv
    nvfp4 = fmt.name in ("nvfp4", "w4a16-nvfp4")
    if nvfp4:
        hq["group_size"] = fmt.config.group_size
    hq["exclude_modules"] = exclude
    bits = 4 if nvfp4 else 8
    desc = {"dynamic": False, "num_bits": bits, "type": "float", **({"group_size": fmt.config.group_size} if nvfp4 else {})}
    group = {"input_activations": desc, "weights": desc, "targets": ["Linear"]}
    if not fmt.calibrated:
        group = {"weights": desc, "targets": ["Linear"]}
    qc = {"config_groups": {"group_0": group}, "ignore": exclude, "quant_algo": fmt.quant_algo}
    if nvfp4:
        qc["group_size"] = fmt.config.group_size
        qc["kv_cache_quant_algo"] = kv
    if kv:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    qc.update({"producer": producer, "quant_method": "modelopt"})
    return {"producer": producer, "quantization": hq}, qc


def _write_configs(ckpt: Checkpoint, out: OutputDir, prep: Prepared) -> None:
    """config.json and hf_quant_config.json: ours when we quantized, else the source's with patterns renamed."""
    hqc, qc = quant_config(prep)

    def rename(pattern: str) -> str:  # a source pattern, to the output's naming
        if prep.to_canon:
            pattern = prep.to_canon.apply_pattern(pattern)
        return prep.out_map.apply_pattern(pattern) if prep.out_map else pattern

    config = json.loads(json.dumps(ckpt.config)) if ckpt.config else None
    passthrough = qc == "source"
    if qc is None and config is not None:
        for holder in (config, config.get("text_config") or {}):
            holder.pop("quantization_config", None)
    if passthrough:
        qc = hqc = None
    if qc is not None:
        if config is None:
            raise StepquantError(f"{ckpt.root}: no config.json to carry the quantization config")
        for holder in (config, config.get("text_config") or {}):
            holder.pop("quantization_config", None)
        config["quantization_config"] = qc  # top level, also for multimodal configs (SPEC §5)
    elif passthrough and config is not None:
        for holder in (config, config.get("text_config") or {}):
            q = holder.get("quantization_config")
            for key in ("ignore", "exclude_modules", "modules_to_not_convert"):
                if isinstance(q, dict) and isinstance(q.get(key), list):
                    q[key] = [rename(p) for p in q[key]]
    if config is not None:
        out.write_file("config.json", (json.dumps(config, indent=2) + "\n").encode())
    if passthrough:
        hqc = ckpt.read_json("hf_quant_config.json")
        q = (hqc or {}).get("quantization")
        if isinstance(q, dict) and isinstance(q.get("exclude_modules"), list):
            q["exclude_modules"] = [rename(p) for p in q["exclude_modules"]]
    if hqc is not None:
        out.write_file("hf_quant_config.json", (json.dumps(hqc, indent=4) + "\n").encode())


def _fingerprint(ckpt: Checkpoint, opts: ConvertOptions, prep: Prepared) -> str:
    """Identifies one conversion: resuming is allowed only into a partial output with the same one."""
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in ckpt.shards}
    body = {
        "version": __version__,
        "source": str(ckpt.root),
        "files": stats,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite", "gpus")},
        "outputs": sorted((n, dt, list(s)) for n, (dt, s, _) in prep.outputs.items()),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _module_summary(prep: Prepared) -> dict:
    """Per role, how many modules were quantized and how many kept as they are; and the tensors copied
    byte for byte from the source (what the model card says is identical to it)."""
    roles: dict[str, dict[str, int]] = {}
    copied = [prep.plan.canonical.get(n, n) for n in prep.plan.copies]  # source names, like the parts
    for unit in [*prep.plan.linears, *prep.plan.experts]:
        role, n = (unit.role, 1) if isinstance(unit, Linear) else ("experts", unit.num)
        key = "kept" if unit.fmt_out is None else "quantized"
        roles.setdefault(role, {"quantized": 0, "kept": 0})[key] += n
        if unit.fmt_out is None:
            parts = [unit.parts] if isinstance(unit, Linear) else [e for es in unit.parts.values() for e in es]
            copied += [p if isinstance(p, str) else p[0] for part in parts for p in part.values()]
    info = prep.ckpt.tensors
    names = set(copied)
    return {
        "roles": dict(sorted(roles.items())),
        "copied_tensors": len(names),
        "copied_bytes": sum(info[n].nbytes for n in names if n in info),
    }


def source_card(root: Path) -> dict:
    """The YAML metadata of `root/README.md` that a derived model keeps; {} when there is none."""
    path = root / "README.md"
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(path.read_text(errors="replace"), ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a broken card must not stop a conversion; it just carries nothing over
        return {}
    return {k: data[k] for k in CARRIED_METADATA if data.get(k)}


def output_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file below `folder`, the manifest without its timings (the one field in which two
    runs of the same conversion differ): equal digests mean byte-identical results."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == MANIFEST:
                manifest = json.loads(data)
                manifest.pop("timings", None)
                data = json.dumps(manifest, sort_keys=True).encode()
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def _header_sha256(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(n)).hexdigest()


def _manifest(ckpt: Checkpoint, opts: ConvertOptions, prep: Prepared, acts: Activations | None,
              files: dict[str, dict], timings: dict) -> dict:  # fmt: skip
    calib = None
    if acts is not None:
        calib = {
            "data": acts.source,
            "seed": opts.calib_seed,
            "samples": acts.samples,
            "tokens": acts.tokens,
            "expert_tokens": {k: v.tolist() for k, v in sorted(acts.expert_tokens.items())},
            "experts_without_tokens": {k: [i for i, n in enumerate(v.tolist()) if n == 0]
                                       for k, v in sorted(acts.expert_tokens.items()) if (v == 0).any()},
        }  # fmt: skip
        if acts.expert_seen:  # --calib-all-experts: what each expert's statistics saw besides its routed tokens
            calib["expert_statistics_tokens"] = {k: v.tolist() for k, v in sorted(acts.expert_seen.items())}
    return {
        "producer": {"name": "stepquant", "version": __version__},
        "command": "convert",
        "recipe": prep.recipe.as_dict(),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite", "dry_run", "gpus")},
        "source": {
            "id": ckpt.source,
            "revision": ckpt.revision,
            "naming": prep.src_naming,
            # identifies each source shard without re-reading its data: size and the sha256 of its header
            "files": {p.name: {"bytes": p.stat().st_size, "header_sha256": _header_sha256(p)} for p in ckpt.shards},
            "total_bytes": ckpt.total_bytes,
            # the source's model-card metadata (license, language, ...), which `push` carries over
            "card": source_card(ckpt.root),
        },
        "naming_map": {"label": prep.out_map.label, "prefixes": prep.out_map.pairs} if prep.out_map else None,
        "modules": _module_summary(prep),
        "warnings": prep.plan.warnings,
        "calibration": calib,
        "outputs": dict(sorted(files.items())),
        # the only field that differs between two runs of the same conversion (with how many processes)
        "timings": timings,
    }
