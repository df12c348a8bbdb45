"""Calibration (in-memory): run the transformers model of the family over calibration batches and record
the max |x| seen at the input of every Linear, of every routed expert's two projections, and of K and V
as attention consumes them (after k_norm and RoPE). Max calibration, as ModelOpt's default.

Fused experts (transformers 5 `experts.gate_up_proj` [E, 2I, H]) call `F.linear` twice per expert; the
expert index is recovered from the weight slice's storage offset into the 3-D parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import StepquantError

ATTN_NAME = "stepquant_calib"


@dataclass
class CalibStats:
    """Activation amax per in-memory module name; experts get [E] vectors and token counts."""

    linear: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> amax (0-dim, fp32)
    experts_in: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> [E] gate_up input amax
    experts_mid: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> [E] down input amax
    expert_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> [E] token counts
    k: dict[str, torch.Tensor] = field(default_factory=dict)  # attention module -> K amax
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float().cpu() if x.numel() else torch.zeros((), dtype=torch.float32)


def _update(store: dict, key: str, value: torch.Tensor) -> None:
    store[key] = torch.maximum(store[key], value) if key in store else value


def load_model(root: Path, config: dict, device: str = "cpu", trust_remote_code: bool = False):
    """The family's transformers model in BF16, eager fused experts (so F.linear sees every expert)."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        if not trust_remote_code:
            raise StepquantError(f"{root}: transformers has no model class {arch!r} (remote code is not run)")
        cls = transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(
            root,
            dtype=torch.bfloat16,
            experts_implementation="eager",
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise StepquantError(f"{root}: transformers cannot load the model ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()


def _is_fused_experts(module: torch.nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.nn.Parameter) and p.dim() == 3 and isinstance(getattr(module, "down_proj", None), torch.nn.Parameter)


@contextmanager
def _recording(model: torch.nn.Module, stats: CalibStats):
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = {m: n for n, m in model.named_modules()}
    handles = []

    def linear_hook(module, args):
        _update(stats.linear, names[module], _amax(args[0]))

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(linear_hook))

    experts = {m: names[m] for m in model.modules() if _is_fused_experts(m)}
    active: list[tuple[torch.nn.Module, list]] = []  # the experts module running now, and its toggle state
    orig_linear = F.linear

    def linear(input, weight, bias=None):
        if active:
            module, state = active[-1]
            name = experts[module]
            base = module.gate_up_proj
            n = module.gate_up_proj.shape[0]
            if not state[0]:
                e = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
                if weight.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() or not 0 <= e < n:
                    raise StepquantError(f"{name}: cannot tell which expert a projection belongs to")
                state[1] = e
                _vec_update(stats.experts_in, name, n, e, _amax(input))
                _vec_add(stats.expert_tokens, name, n, e, input.reshape(-1, input.shape[-1]).shape[0])
            else:
                _vec_update(stats.experts_mid, name, n, state[1], _amax(input))
            state[0] = not state[0]
        return orig_linear(input, weight, bias)

    def pre(module, args, kwargs):
        active.append((module, [False, 0]))

    def post(module, args, kwargs, out):
        active.pop()

    for m in experts:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))

    cfgs = [model.config] + [getattr(model.config, k) for k in ("text_config",) if getattr(model.config, k, None)]
    previous = [c._attn_implementation for c in cfgs]
    inner = ALL_ATTENTION_FUNCTIONS[previous[-1] or "sdpa"] if (previous[-1] or "sdpa") != "eager" else None

    def attention(module, query, key, value, *args, **kwargs):
        name = names[module]
        _update(stats.k, name, _amax(key))
        _update(stats.v, name, _amax(value))
        if inner is None:
            import importlib

            return importlib.import_module(type(module).__module__).eager_attention_forward(
                module, query, key, value, *args, **kwargs
            )
        return inner(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, attention)
    F.linear = linear
    try:
        for c in cfgs:
            c._attn_implementation = ATTN_NAME
        yield
    finally:
        F.linear = orig_linear
        for c, prev in zip(cfgs, previous):
            c._attn_implementation = prev
        for h in handles:
            h.remove()


def _vec_update(store: dict, key: str, n: int, e: int, value: torch.Tensor) -> None:
    vec = store.setdefault(key, torch.zeros(n, dtype=torch.float32))
    vec[e] = torch.maximum(vec[e], value)


def _vec_add(store: dict, key: str, n: int, e: int, count: int) -> None:
    vec = store.setdefault(key, torch.zeros(n, dtype=torch.int64))
    vec[e] += count


def calibrate(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> CalibStats:
    """Feed token batches ([B, T] ids) through the model in order; max-calibrate every input."""
    stats = CalibStats()
    device = next(model.parameters()).device
    with torch.no_grad(), _recording(model, stats):
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            stats.batches += 1
            stats.tokens += ids.numel()
    return stats
