"""The per-tensor plan: which tensors form which Linear or expert group, what each becomes, and the
output names, dtypes and shapes — before any weight is read (this is what `--dry-run` prints).

Names here are canonical: the family's hub naming (`model.layers.N...`), whatever the source used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import StepquantError
from .families import Family
from .formats import Format, detect_format, get_format
from .recipes import SCOPES, Recipe
from .stfile import TensorInfo

SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "weight_scale_inv", "input_scale", "k_scale", "v_scale")

# canonical module name -> role; first match wins (MTP layers are found by index first)
ROLES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)embed_tokens$", "embedding"),
    (r"(^|\.)lm_head$", "lm_head"),
    (r"^vision_model\.", "vision"),
    (r"^vit_large_projector$", "projector"),
    (r"\.self_attn\.g_proj$", "attention"),
    (r"\.self_attn\.\w+$", "attention"),
    (r"\.(mlp|moe|block_sparse_moe)\.gate$", "router"),
    (r"\.(share_expert|shared_experts?)\.\w+$", "shared_expert"),
    (r"\.mlp\.\w+$", "dense_mlp"),
)
# Linear modules that share NVFP4 global scales: q/k/v of one attention, gate/up of one MLP.
FUSION: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^(.*\.self_attn)\.([qkv])_proj$", ("q_proj", "k_proj", "v_proj")),
    (r"^(.*\.(?:mlp|share_expert|shared_experts?))\.(gate|up)_proj$", ("gate_proj", "up_proj")),
)
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class Linear:
    module: str  # canonical module name
    role: str
    parts: dict[str, str]  # suffix -> source tensor name
    dtypes: dict[str, str]
    shape: tuple[int, int]  # [out, in] of the dequantized weight
    fmt_in: Format
    fmt_out: Format | None = None  # None: copied as it is

    @property
    def fusion_key(self) -> str | None:
        for pattern, _ in FUSION:
            m = re.match(pattern, self.module)
            if m:
                return m.group(1)
        return None


@dataclass
class Experts:
    """The routed experts of one layer: projection -> per-expert parts (suffix -> (tensor, index or None))."""

    layer: str  # canonical layer prefix, e.g. model.layers.3
    layout: str
    num: int
    parts: dict[str, list[dict[str, tuple[str, int | None]]]]  # proj (gate/up/down) -> [expert] -> suffix -> src
    shapes: dict[str, tuple[int, int]]  # proj -> [out, in]
    fmt_in: Format
    fmt_out: Format | None = None
    layout_out: str = "keep"


@dataclass
class Plan:
    family: Family
    linears: list[Linear] = field(default_factory=list)
    experts: list[Experts] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # canonical names of tensors copied as they are
    kv_layers: list[str] = field(default_factory=list)  # attention modules that get k/v scales
    canonical: dict[str, str] = field(default_factory=dict)  # canonical name -> source tensor name
    excluded: list[str] = field(default_factory=list)  # canonical module names/patterns left unquantized
    warnings: list[str] = field(default_factory=list)  # modules in scope kept unquantized, and why

    @property
    def quantizes(self) -> bool:
        return any(u.fmt_out is not None and u.fmt_out.quant_algo for u in [*self.linears, *self.experts])


def role_of(module: str, num_layers: int | None) -> str:
    m = LAYER.search(module)
    if m and num_layers is not None and int(m.group(1)) >= num_layers:
        return "mtp"
    for pattern, role in ROLES:
        if re.search(pattern, module):
            return role
    return "other"


def _expert_regexes(family: Family) -> list[tuple[str, re.Pattern[str]]]:
    gate, up, down = family.projections
    projs = "|".join(map(re.escape, dict.fromkeys((gate, up, down, "gate_proj", "up_proj", "down_proj"))))
    out = []
    for layout, template in family.experts.items():
        pat = re.escape(template).replace(re.escape("{L}"), r"(?P<L>.*?\.layers\.\d+)")
        pat = pat.replace(re.escape("{e}"), r"(?P<e>\d+)")
        if layout == "fused":
            pat = pat.replace(re.escape("{p}"), r"(?P<p>gate_up_proj|down_proj)") + r"(?:_(?P<s>[a-z_0-9]+))?$"
        else:
            pat = pat.replace(re.escape("{p}"), rf"(?P<p>{projs})") + r"\.(?P<s>[a-z_0-9]+)$"
        out.append((layout, re.compile("^" + pat)))
    return out


def build_plan(
    tensors: dict[str, TensorInfo],
    canonical: dict[str, str],
    family: Family,
    num_layers: int | None,
    recipe: Recipe,
    keep: dict[str, str] | None = None,
) -> Plan:
    """Group the (canonically named) tensors into Linears and expert groups and decide each one's fate.
    `keep`: modules (or expert layers) in scope to leave unquantized anyway -> why (a warning)."""
    plan = Plan(family, canonical=canonical)
    info = {c: tensors[s] for c, s in canonical.items()}
    gate, up, down = family.projections
    proj_key = {gate: "gate", up: "up", down: "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    groups: dict[str, dict] = {}
    used: set[str] = set()
    regexes = _expert_regexes(family)
    for name, t in info.items():
        for layout, rx in regexes:
            m = rx.match(name)
            if not m:
                continue
            suffix = m.group("s") or "weight"
            if suffix not in SUFFIXES:
                break
            if layout == "stacked" and suffix == "weight" and len(t.shape) != 3:
                break  # a 2-D moe.*_proj is an ordinary Linear
            g = groups.setdefault(m.group("L"), {"layout": layout, "items": []})
            if g["layout"] != layout:
                raise StepquantError(f"tensor '{name}': layer {m.group('L')} mixes expert layouts")
            g["items"].append((m.group("p"), m.groupdict().get("e"), suffix, name))
            used.add(name)
            break
    for layer, g in sorted(groups.items()):
        plan.experts.append(_experts_unit(layer, g, info, proj_key))
    # standalone Linears: `X.weight` with 2 dims (dequantized), plus their scale tensors
    modules: dict[str, dict[str, str]] = {}
    for name in info:
        if name in used:
            continue
        mod, _, suffix = name.rpartition(".")
        if suffix in SUFFIXES and mod:
            modules.setdefault(mod, {})[suffix] = name
    for mod, parts in sorted(modules.items()):
        w = info.get(parts.get("weight", ""))
        if w is None or len(w.shape) != 2 or role_of(mod, num_layers) == "embedding":
            if w is not None and len(w.shape) == 2:  # embeddings are no Linears, but engines want them listed
                plan.excluded.append(mod)
            continue  # copied below
        if recipe.kv_cache == "fp8":
            parts = {k: v for k, v in parts.items() if k not in ("k_scale", "v_scale")}
        dtypes = {s: info[n].dtype for s, n in parts.items()}
        fmt_in = detect_format(dtypes)
        shape = (w.shape[0], w.shape[1] * (2 if fmt_in.name == "nvfp4" else 1))
        plan.linears.append(Linear(mod, role_of(mod, num_layers), parts, dtypes, shape, fmt_in))
        used.update(parts.values())
    plan.copies += [n for n in info if n not in used and n not in plan.copies and not _is_stale_kv(n, recipe)]
    _decide(plan, recipe, num_layers, keep or {})
    return plan


def _is_stale_kv(name: str, recipe: Recipe) -> bool:
    return recipe.kv_cache == "fp8" and name.endswith((".k_scale", ".v_scale"))


def _experts_unit(layer: str, g: dict, info: dict[str, TensorInfo], proj_key: dict[str, str]) -> Experts:
    layout = g["layout"]
    parts: dict[str, dict[int, dict]] = {"gate": {}, "up": {}, "down": {}}
    num = 0
    for p, e, suffix, name in g["items"]:
        t = info[name]
        if layout == "per-expert":
            parts[proj_key[p]].setdefault(int(e), {})[suffix] = (name, None)
            num = max(num, int(e) + 1)
        elif layout == "stacked":
            n = t.shape[0] if t.shape else 0
            num = max(num, n)
            for i in range(n):
                parts[proj_key[p]].setdefault(i, {})[suffix] = (name, i)
        else:  # fused: gate_up_proj [E, 2I, H] holds gate rows then up rows
            n = t.shape[0]
            num = max(num, n)
            keys = ("gate", "up") if p == "gate_up_proj" else ("down",)
            for key in keys:
                for i in range(n):
                    parts[key].setdefault(i, {})[suffix] = (name, i)
    lists = {}
    for key, per in parts.items():
        if sorted(per) != list(range(num)):
            raise StepquantError(f"layer {layer}: {key} projections of experts {sorted(set(range(num)) - set(per))} are missing")
        lists[key] = [per[i] for i in range(num)]
    first = lists["gate"][0]
    dtypes = {s: info[n].dtype for s, (n, _) in first.items()}
    fmt_in = detect_format(dtypes)
    shapes = {}
    for key in ("gate", "up", "down"):
        name, idx = lists[key][0]["weight"]
        shape = info[name].shape[1:] if idx is not None else info[name].shape
        out, inp = shape
        if layout == "fused" and key in ("gate", "up"):
            out //= 2
        shapes[key] = (out, inp * (2 if fmt_in.name == "nvfp4" else 1))
    return Experts(layer, layout, num, lists, shapes, fmt_in)


def _decide(plan: Plan, recipe: Recipe, num_layers: int | None, keep: dict[str, str]) -> None:
    scope = SCOPES[recipe.scope]
    target = None if recipe.format == "keep" else get_format(recipe.format)
    if target is not None and target.quant_algo:
        keep = dict(keep)
        for lin in plan.linears:
            why = target.cannot_hold(lin.shape)
            if why and lin.role in scope:
                keep.setdefault(lin.module, why)
        for ex in plan.experts:
            why = next(filter(None, (target.cannot_hold(s) for s in ex.shapes.values())), None)
            if why:
                keep.setdefault(ex.layer, why)
        # fusion groups (q/k/v, gate/up) are quantized together or not at all: engines fuse them
        held = {lin.fusion_key for lin in plan.linears if lin.module in keep and lin.fusion_key}
        for lin in plan.linears:
            if lin.fusion_key in held and lin.module not in keep:
                keep[lin.module] = f"kept with the rest of {lin.fusion_key.rsplit('.', 1)[-1]} ({lin.fusion_key})"
    for lin in plan.linears:
        quantize = target is not None and target.quant_algo and lin.role in scope
        if quantize and lin.module in keep:
            plan.warnings.append(f"{lin.module}: kept in BF16 and excluded: {keep[lin.module]}")
            quantize = False
        if quantize and lin.fmt_in is target:
            pass  # already in the target format: bytes are copied, never re-quantized
        elif quantize:
            lin.fmt_out = target
        elif target is not None and lin.fmt_in.quant_algo:
            lin.fmt_out = get_format("bf16")  # out of scope but quantized at the source: dequantize
        if (lin.fmt_out or lin.fmt_in).quant_algo is None:
            plan.excluded.append(_exclusion(lin.module, lin.role))
    for ex in plan.experts:
        mtp = role_of(ex.layer + ".experts", num_layers) == "mtp"
        quantize = target is not None and target.quant_algo and "experts" in scope and not mtp
        if quantize and ex.layer in keep:
            plan.warnings.append(f"{ex.layer} experts: kept in BF16 and excluded: {keep[ex.layer]}")
            quantize = False
        if quantize and ex.fmt_in is target:
            pass
        elif quantize:
            ex.fmt_out = target
        elif target is not None and ex.fmt_in.quant_algo:
            ex.fmt_out = get_format("bf16")
        ex.layout_out = ex.layout if recipe.moe_layout == "keep" else recipe.moe_layout
        if ex.layout_out == "fused" and (ex.fmt_out or ex.fmt_in).quant_algo:
            raise StepquantError("the fused expert layout holds BF16 experts only; choose stacked or per-expert")
        if (ex.fmt_out or ex.fmt_in).quant_algo is None:
            plan.excluded.append(f"{ex.layer}.*" if mtp else f"{ex.layer}.*experts*")
    if recipe.kv_cache == "fp8":
        plan.kv_layers = sorted(
            {lin.module.rpartition(".")[0] for lin in plan.linears
             if re.search(r"\.self_attn\.k_proj$", lin.module) and lin.role != "mtp"},
            key=_natural,
        )  # fmt: skip
    plan.excluded = sorted(set(plan.excluded))


def _exclusion(module: str, role: str) -> str:
    """The exclude-list entry for an unquantized Linear: whole subtrees for the vision tower and MTP layers."""
    if role == "vision":
        return "vision_model.*"
    if role == "mtp":
        return module[: LAYER.search(module).end()].rstrip(".") + ".*"
    return module


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]
