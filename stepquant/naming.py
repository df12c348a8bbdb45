"""Naming maps between the prefix conventions of SPEC §7, applied to tensor names and glob patterns.

One literal table; each row is a convention, each column a part of the model. A rename replaces the
longest matching prefix of the source convention by the same part's prefix in the target one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import StepquantError

PARTS = ("text", "vision", "projector", "head")

# convention -> part -> module prefix (no trailing dot). SGLang and vLLM use the same internal names.
NAMINGS: dict[str, dict[str, str]] = {
    "step-hub": {
        "text": "model",
        "vision": "vision_model",
        "projector": "vit_large_projector",
        "head": "lm_head",
    },
    "modelopt": {
        "text": "model.language_model",
        "vision": "model.vision_model",
        "projector": "model.vit_large_projector",
        "head": "lm_head",
    },
    "sglang": {
        "text": "language_model.model",
        "vision": "vision_model",
        "projector": "vit_large_projector",
        "head": "language_model.lm_head",
    },
    "vllm": {
        "text": "language_model.model",
        "vision": "vision_model",
        "projector": "vit_large_projector",
        "head": "language_model.lm_head",
    },
}

# Most specific first: a modelopt name also parses as step-hub (its text prefix is `model`).
DETECT_ORDER = ("modelopt", "sglang", "step-hub")
CHOICES = ("keep", *NAMINGS)


@dataclass(frozen=True)
class PrefixMap:
    """Longest-prefix rewriting. Keys ending in '.' also match the bare module name (`lm_head`)."""

    pairs: dict[str, str]
    label: str
    strict: bool = True  # built-in maps refuse names they do not know; user maps keep them

    def apply(self, name: str, strict: bool | None = None) -> str:
        probe = name + "."
        best = max((k for k in self.pairs if probe.startswith(k)), key=len, default=None)
        if best is None:
            if self.strict if strict is None else strict:
                raise StepquantError(f"tensor '{name}' matches no prefix of naming map {self.label}")
            return name
        return (self.pairs[best] + probe[len(best) :])[:-1]

    def apply_pattern(self, pattern: str) -> str:
        """Rename a glob pattern (exclude lists); patterns that start with a wildcard stay as they are."""
        return self.apply(pattern, strict=False)


def builtin_map(src: str, dst: str) -> PrefixMap:
    """The map from convention `src` to convention `dst` (both rows of NAMINGS)."""
    for n in (src, dst):
        if n not in NAMINGS:
            raise StepquantError(f"unknown naming '{n}' (choose from {', '.join(NAMINGS)})")
    pairs = {NAMINGS[src][p] + ".": NAMINGS[dst][p] + "." for p in PARTS}
    return PrefixMap(pairs, f"'{src}' -> '{dst}'")


def load_user_map(path: str | Path) -> PrefixMap:
    """A user map from YAML: `{rename: {"old.prefix.": "new.prefix."}}`; names it does not match stay."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StepquantError(f"{path}: cannot read naming map ({type(exc).__name__})") from None
    pairs = data.get("rename") if isinstance(data, dict) else None
    if not isinstance(pairs, dict) or not pairs or not all(
        isinstance(k, str) and isinstance(v, str) and k for k, v in pairs.items()
    ):
        raise StepquantError(f"{path}: a naming map needs 'rename:' mapping non-empty prefixes to prefixes")
    return PrefixMap(dict(pairs), f"'{path.name}'", strict=False)


def detect_naming(names: list[str] | set[str]) -> str | None:
    """Which convention the names use, or None when no row of the table fits them all."""
    names = list(names)
    for conv in DETECT_ORDER:
        table = builtin_map(conv, conv)
        text = NAMINGS[conv]["text"] + "."
        if any(n.startswith(text) for n in names) and all(_parses(table, n) for n in names):
            return conv
    return None


def _parses(table: PrefixMap, name: str) -> bool:
    probe = name + "."
    return any(probe.startswith(k) for k in table.pairs)


def canonical_names(names: list[str], canonical: str = "step-hub") -> tuple[str | None, PrefixMap | None, dict[str, str]]:
    """(detected naming, map source -> canonical or None when already canonical/unknown, canonical -> source)."""
    naming = detect_naming(names)
    to_canon = builtin_map(naming, canonical) if naming not in (None, canonical) else None
    return naming, to_canon, {(to_canon.apply(n) if to_canon else n): n for n in names}


def rename_all(names: list[str], mapping: PrefixMap) -> dict[str, str]:
    """old -> new for every name; a map that sends two names to one is an error."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        new = mapping.apply(name)
        if new in seen:
            raise StepquantError(
                f"naming map {mapping.label} sends both '{seen[new]}' and '{name}' to '{new}'"
            )
        seen[new] = name
        out[name] = new
    return out


def resolve_map(names: list[str], target: str, user_map: str | Path | None = None) -> PrefixMap | None:
    """The map a conversion applies: a user YAML map, a built-in convention, or None for `keep`."""
    if user_map is not None:
        return load_user_map(user_map)
    if target == "keep":
        return None
    if target not in NAMINGS:
        raise StepquantError(f"unknown naming '{target}' (choose from {', '.join(CHOICES)})")
    src = detect_naming(names)
    if src is None:
        raise StepquantError(
            "cannot tell which naming convention the source uses (none of "
            f"{', '.join(DETECT_ORDER)} fits every tensor name); use a YAML map with --naming-map"
        )
    return builtin_map(src, target)
