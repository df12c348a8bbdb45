"""Recipes: YAML files in `recipes/` (or any path), validated here and only here.

A recipe fixes what a conversion does; CLI flags override single fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from .errors import StepquantError
from .formats import FORMATS
from .naming import CHOICES as NAMINGS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# scope -> the module roles (see plan.ROLES) it quantizes; the vision tower, projector, routers, MTP
# layers, embeddings and lm_head are in none of them
SCOPES: dict[str, frozenset[str]] = {
    "moe-only": frozenset({"experts"}),
    "mlp-only": frozenset({"experts", "dense_mlp"}),
    "all-linear": frozenset({"experts", "dense_mlp", "shared_expert", "attention"}),
}
LAYOUTS = ("keep", "stacked", "per-expert", "fused")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    format: str = "keep"  # an output format, or keep: copy what the source has
    scope: str = "all-linear"
    kv_cache: str = "none"  # fp8 | none
    moe_layout: str = "keep"
    naming: str = "keep"
    expert_input_scale: str = "shared"  # shared | per-expert
    calib_data: str = "embedded"
    calib_samples: int = 64
    calib_seq_len: int = 512

    def validate(self, where: str) -> Recipe:
        checks = {
            "format": ("keep", *FORMATS),
            "scope": tuple(SCOPES),
            "kv_cache": ("fp8", "none"),
            "moe_layout": LAYOUTS,
            "naming": NAMINGS,
            "expert_input_scale": ("shared", "per-expert"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise StepquantError(f"{where}: {key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("calib_samples", "calib_seq_len"):
            value = getattr(self, key)
            if type(value) is not int or value <= 0:
                raise StepquantError(f"{where}: {key} must be a positive integer")
        return self

    def with_overrides(self, **overrides: object) -> Recipe:
        """CLI flags win over the recipe's fields (None means 'not given')."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given).validate("command line")

    def as_dict(self) -> dict:
        return asdict(self)


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | None) -> Recipe:
    """A recipe by name (a file in recipes/) or path; None gives the defaults."""
    if name_or_path is None:
        return Recipe().validate("defaults")
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise StepquantError(f"recipe {name_or_path!r} not found (built in: {', '.join(available())})")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StepquantError(f"{path}: cannot read recipe ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise StepquantError(f"{path}: a recipe is a YAML mapping")
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(map(str, set(data) - known))  # YAML keys need not be strings
    if unknown:
        raise StepquantError(f"{path}: unknown recipe field(s) {', '.join(unknown)}")
    return Recipe(**{"name": path.stem, **data}).validate(str(path))
