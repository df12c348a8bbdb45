"""Layer-streamed calibration: the family's transformers model is built on the meta device and only one
decoder layer at a time holds real weights, so a 196B MoE calibrates in the memory of one layer.

1. The decoder stack's own forward runs once per batch shape with every layer replaced by a recorder:
   that gives the embeddings (layer 0's input) and the exact arguments each layer receives (masks,
   rotary position embeddings), without any layer weight.
2. Layer by layer: its weights are materialized from the source shards (dequantized when the source is
   quantized; transformers' own conversion mapping renames and fuses the small tensors, the routed
   experts are read expert by expert into the fused parameters, so no second copy of them exists), all
   batches go through it under the same recording hooks as the in-memory calibration, and its outputs
   become the next layer's inputs. Then the layer goes back to the meta device.
3. The final norm's output is the input of `lm_head` (recorded without computing the logits).

The same ops run on the same inputs as `calibrate.calibrate`, so the statistics are identical to it.
Hidden states stay on the calibration device when they fit and live in host memory otherwise. With a
`state` folder the statistics and hidden states are checkpointed between layers: a killed run resumes
after the last layer saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from tqdm import tqdm

from .calibrate import (COMPUTE_DTYPES, COUNT_FIELDS, STATS_FIELDS, CalibStats, _amax, _is_fused_experts, _recording,
                        _update, canonical_layer, canonical_module, finite_weights)  # fmt: skip
from .errors import StepquantError
from .plan import Plan
from .quantize import Executor

log = logging.getLogger("stepquant")
# A layer's hidden states are saved for --resume when at least SAVE_SECONDS have passed since the last save
# (or the start) and at least SAVE_RATIO times what that save took (so saving costs at most about
# 1/SAVE_RATIO of the calibration time; a short calibration is simply run again).
SAVE_SECONDS = 60.0
SAVE_RATIO = 10


class _Stop(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers is needed."""


def build_meta_model(root: Path, config: dict, dtype: str = "bfloat16", trust_remote_code: bool = False) -> torch.nn.Module:
    """The family's transformers model with every parameter on the meta device (eager fused experts, as
    `calibrate.load_model` builds it)."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None and not trust_remote_code:
        raise StepquantError(f"{root}: transformers has no model class {arch!r} (remote code is not run)")
    try:
        cfg = transformers.AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            if cls is None:
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=COMPUTE_DTYPES[dtype], trust_remote_code=True)
            else:
                model = cls._from_config(cfg, dtype=COMPUTE_DTYPES[dtype], experts_implementation="eager")
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise StepquantError(f"{root}: transformers cannot build the model ({str(exc).splitlines()[0]})") from None
    return model.eval()


def _decoder(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """The text decoder stack, its in-memory name, and its layers."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if dec is None or not isinstance(layers, torch.nn.ModuleList) or getattr(dec, "embed_tokens", None) is None:
        raise StepquantError(f"{type(model).__name__}: no decoder stack with embed_tokens and layers to stream")
    name = next(n for n, m in model.named_modules() if m is dec)
    return dec, name, layers


class LayerLoader:
    """Materializes parts of the meta model from the source checkpoint, in the compute dtype."""

    def __init__(self, model: torch.nn.Module, executor: Executor, device: torch.device, dtype: torch.dtype,
                 allow_nonfinite: bool = False):  # fmt: skip
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.executor, self.device, self.dtype = model, executor, device, dtype
        self.allow_nonfinite = allow_nonfinite
        self.plan: Plan = executor.plan
        self.mapping = get_model_conversion_mapping(model)
        self.names = {m: n for n, m in model.named_modules()}
        self.experts = {ex.layer: ex for ex in self.plan.experts}
        by_canonical: dict[str, str] = {}
        for unit in self.plan.linears:
            for part in unit.parts.values():
                by_canonical[part] = unit.module
        self.linear_of = by_canonical  # canonical tensor -> the Linear it is a part of
        self.tensors = sorted(self.plan.canonical)

    def load(self, module: torch.nn.Module) -> None:
        """Give `module` (a decoder layer, or the embeddings / final norm) its weights."""
        name = self.names[module]
        prefix = canonical_module(name, self.plan.family.memory_names)
        fused = {m: self.experts.get(canonical_layer(self.names[m], self.plan.family.memory_names))
                 for m in module.modules() if _is_fused_experts(m)}  # fmt: skip
        expert_tensors = {p[0] for ex in fused.values() if ex for parts in ex.parts.values() for e in parts for p in e.values()}
        state: dict[str, torch.Tensor] = {}
        for t in self.tensors:
            if not t.startswith(prefix + ".") or t in expert_tensors:
                continue
            lin = self.executor.by_module.get(self.linear_of.get(t, ""))
            if lin is not None and lin.fmt_in.quant_algo:  # a quantized source Linear: its dequantized weight
                if t == lin.parts.get("weight"):
                    state[lin.module + ".weight"] = self.executor.linear_weight(lin, check=False)
                continue
            state[t] = self.executor.ckpt.read(self.plan.canonical[t])
        if state:
            self._convert_and_load(state)
        for m, ex in fused.items():
            if ex is None:
                raise StepquantError(f"{self.names[m]}: no routed experts in the source for this module")
            self._load_experts(m, ex)
        self._init_buffers(module)
        missing = [f"{name}.{n}" for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if missing:
            raise StepquantError(f"{missing[0]}: not found in the source checkpoint (layer-streamed calibration)")
        finite_weights(module, self.allow_nonfinite, name)

    def _convert_and_load(self, state: dict[str, torch.Tensor]) -> None:
        """transformers' own loader: renames, fusions and dtypes of its conversion mapping."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=self.mapping)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            convert_and_load_state_dict_in_model(self.model, state, config)
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    def _load_experts(self, module: torch.nn.Module, ex) -> None:
        """Fused `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I], filled from the
        source (dequantized) in batches of experts read ahead by a thread pool, straight into the one device
        copy."""
        n, (inter, hidden) = ex.num, ex.shapes["gate"]
        want = {"gate_up_proj": (n, 2 * inter, hidden), "down_proj": (n, hidden, inter)}
        for attr, shape in want.items():
            if tuple(getattr(module, attr).shape) != shape:
                raise StepquantError(f"{self.names[module]}.{attr}: shape {tuple(getattr(module, attr).shape)}, "
                                     f"expected {shape} from experts of {ex.layer}")  # fmt: skip
        gate_up = torch.empty(want["gate_up_proj"], dtype=self.dtype, device=self.device)
        down = torch.empty(want["down_proj"], dtype=self.dtype, device=self.device)
        read = self.executor
        for batch, bufs in read.expert_host_batches(ex, ("gate", "up"), read.bf16_source(ex, ("gate", "up"))):
            gate_up[batch.start : batch.stop, :inter].copy_(bufs["gate"], non_blocking=True)
            gate_up[batch.start : batch.stop, inter:].copy_(bufs["up"], non_blocking=True)
        for batch, bufs in read.expert_host_batches(ex, ("down",), read.bf16_source(ex, ("down",))):
            down[batch.start : batch.stop].copy_(bufs["down"], non_blocking=True)
        module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        module.down_proj = torch.nn.Parameter(down, requires_grad=False)

    def _init_buffers(self, module: torch.nn.Module) -> None:
        """Non-persistent buffers (rotary frequencies) are not in any checkpoint: transformers computes them."""
        for m in module.modules():
            meta = [k for k in m._non_persistent_buffers_set if m._buffers.get(k) is not None and m._buffers[k].is_meta]
            if meta:
                for k in meta:
                    m._buffers[k] = torch.empty_like(m._buffers[k], device=self.device)
                self.model._init_weights(m)


def layer_output(out) -> torch.Tensor:
    """A decoder layer's hidden states (some transformers layers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _release(module: torch.nn.Module) -> None:
    """Back to the meta device: the memory is freed, the structure stays."""
    module.to("meta")


@contextmanager
def _recorders(layers: torch.nn.ModuleList, sink: list):
    """Every layer returns its input unchanged and records its arguments (the hidden states only for the
    first: the embeddings); the last one stops the forward."""

    def recorder(i: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            sink.append((hidden_states if i == 0 else None, args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, loader: LayerLoader, batches: list[torch.Tensor], dev: torch.device
                 ) -> tuple[dict[tuple[int, ...], list[tuple[tuple, dict]]], list[torch.Tensor]]:  # fmt: skip
    """The decoder stack's own forward with recorders for layers: per batch shape, the arguments each
    layer gets (masks, position embeddings); and every batch's embeddings, layer 0's input. The
    embeddings and rotary modules are loaded for it and the embeddings released after."""
    dec, _, layers = _decoder(model)
    loader.load(dec.embed_tokens)
    for name, m in dec.named_children():
        if name not in ("layers", "embed_tokens", "norm"):
            loader.load(m)  # rotary embeddings: buffers only
    calls: dict[tuple[int, ...], list[tuple[tuple, dict]]] = {}
    hidden: list[torch.Tensor] = []
    for ids in batches:
        sink: list = []
        with _recorders(layers, sink):
            try:
                dec(input_ids=ids.to(dev), use_cache=False)
            except _Stop:
                pass
        if len(sink) != len(layers):
            raise StepquantError(f"{type(dec).__name__}: its forward did not call every layer once")
        hidden.append(sink[0][0])
        calls.setdefault(tuple(ids.shape), [(args, kwargs) for _, args, kwargs in sink])
    _release(dec.embed_tokens)
    return calls, hidden


def _batches_digest(batches: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(json.dumps(list(b.shape)).encode())
        h.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


class LayerState:
    """Statistics and hidden states after a layer, in `folder`: `L{i}.hidden` (the batches' raw bytes, one
    after another) then `L{i}.json` (written last: its presence marks the save complete)."""

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = folder, digest

    def latest(self) -> int | None:
        done = []
        for p in self.folder.glob("L*.json"):
            try:
                meta = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("batches") == self.digest and (self.folder / f"L{meta['layer']}.hidden").is_file():
                done.append(int(meta["layer"]))
        return max(done) if done else None

    def save(self, layer: int, stats: CalibStats, hidden: list[torch.Tensor]) -> None:
        self.folder.mkdir(exist_ok=True)
        raw = self.folder / f"L{layer}.hidden"
        with open(raw, "wb") as f:
            for h in hidden:
                f.write(memoryview(h.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()))
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "layer": layer,
            "batches": self.digest,
            "shapes": [list(h.shape) for h in hidden],
            "dtype": str(hidden[0].dtype).removeprefix("torch.") if hidden else "bfloat16",
            "stats": {f: {k: v.tolist() for k, v in getattr(stats, f).items()} for f in STATS_FIELDS},
            "stat_dtypes": {f: {k: str(v.dtype).removeprefix("torch.") for k, v in getattr(stats, f).items()} for f in STATS_FIELDS},
            "counts": [stats.batches, stats.tokens],
        }
        tmp = self.folder / f"L{layer}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.folder / f"L{layer}.json")
        for p in self.folder.glob("L*"):  # older saves
            if p.name.split(".")[0] != f"L{layer}":
                p.unlink(missing_ok=True)

    def load(self, layer: int, device: torch.device) -> tuple[CalibStats, list[torch.Tensor]]:
        meta = json.loads((self.folder / f"L{layer}.json").read_text())
        stats = CalibStats()
        for f in STATS_FIELDS:
            dtypes = meta["stat_dtypes"][f]
            setattr(stats, f, {k: torch.tensor(v, dtype=getattr(torch, dtypes[k]), device="cpu" if f in COUNT_FIELDS else device)
                               for k, v in meta["stats"][f].items()})  # fmt: skip
        stats.batches, stats.tokens = meta["counts"]
        dtype = getattr(torch, meta["dtype"])
        hidden = []
        with open(self.folder / f"L{layer}.hidden", "rb") as f:
            for shape in meta["shapes"]:
                t = torch.empty(shape, dtype=dtype)
                f.readinto(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
                hidden.append(t.to(device))
        return stats, hidden


def _hidden_device(device: torch.device, total: int, layer_bytes: int) -> torch.device:
    """Where the hidden states live: on the GPU when they fit beside two layers' weights, else host memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if total + 2 * layer_bytes + (2 << 30) < free else torch.device("cpu")


def calibrate_layers(model: torch.nn.Module, executor: Executor, batches: list[torch.Tensor], device: str = "cpu",
                     all_experts: bool = False, state: Path | None = None, allow_nonfinite: bool = False,
                     check: Callable[[], None] | None = None) -> CalibStats:  # fmt: skip
    """Max-calibrate `model` (built by `build_meta_model`) on `batches`, one decoder layer in memory at a
    time, weights from `executor`'s checkpoint and plan. Same statistics as `calibrate.calibrate`.
    `state`: a folder for the between-layer saves that let an interrupted run resume. `check`: called
    after every layer, raises to stop (the writer beside it failed)."""
    dev = torch.device(device)
    dtype = next(model.parameters()).dtype
    dec, _, layers = _decoder(model)
    loader = LayerLoader(model, executor, dev, dtype, allow_nonfinite)
    saver = LayerState(state, _batches_digest(batches)) if state is not None else None
    start = saver.latest() if saver else None
    stats = CalibStats()
    with torch.no_grad(), _recording(model, stats, all_experts):
        calls, hidden = layer_inputs(model, loader, batches, dev)
        if start is not None:
            stats_loaded, hidden = saver.load(start, dev)
            for f in STATS_FIELDS:
                getattr(stats, f).update(getattr(stats_loaded, f))
            stats.batches, stats.tokens = stats_loaded.batches, stats_loaded.tokens
            log.info(f"calibration resumes after layer {start}")
        else:
            stats.batches, stats.tokens = len(batches), sum(b.numel() for b in batches)
        layer_bytes = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0) * dtype.itemsize
        where = _hidden_device(dev, sum(h.numel() * h.element_size() for h in hidden), layer_bytes)
        hidden = [h.to(where) for h in hidden]
        kill_after = os.environ.get("STEPQUANT_FAULT_KILL_AFTER_LAYER")  # test hook: save layer N, then SIGKILL
        kill_after = int(kill_after) if kill_after else None
        last_save, save_cost = time.monotonic(), 0.0
        first = 0 if start is None else start + 1
        bar = tqdm(total=len(layers), initial=first, unit="layer", desc="calibration", disable=None)
        for i in range(first, len(layers)):
            layer = layers[i]
            loader.load(layer)
            for b, ids in enumerate(batches):
                args, kwargs = calls[tuple(ids.shape)][i]
                out = layer(hidden[b].to(dev), *args, **kwargs)
                hidden[b] = layer_output(out).to(where)
            _release(layer)
            bar.update()
            since = time.monotonic() - last_save
            due = since >= max(SAVE_SECONDS, SAVE_RATIO * save_cost) or i == kill_after
            if saver and i + 1 < len(layers) and due:
                t0 = time.monotonic()
                saver.save(i, stats, hidden)
                last_save, save_cost = time.monotonic(), time.monotonic() - t0
            if i == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if check is not None:
                check()
        bar.close()
        _final_norm(model, dec, loader, stats, hidden, dev)
    return stats.cpu()


def _final_norm(model, dec, loader: LayerLoader, stats: CalibStats, hidden: list[torch.Tensor], dev) -> None:
    """The final norm's output is what `lm_head` reads: its input amax, without computing the logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = getattr(dec, "norm", None)
    if not isinstance(head, torch.nn.Linear) or norm is None:
        return
    loader.load(norm)
    name = loader.names[head]
    for h in hidden:
        _update(stats.linear, name, _amax(norm(h.to(dev))))
    _release(norm)
