"""Calibration (in-memory): run the transformers model of the family over calibration batches and record
the max |x| seen at the input of every Linear, of every routed expert's two projections, and of K and V
as attention consumes them (after k_norm and RoPE). Max calibration, as ModelOpt's default.

Fused experts (transformers 5 `experts.gate_up_proj` [E, 2I, H]) call `F.linear` twice per expert; the
expert index is recovered from the weight slice's storage offset into the 3-D parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import StepquantError
from .quantize import Activations, all_finite

ATTN_NAME = "stepquant_calib"
# CalibStats' tensor fields: amax values (combined by max) and token counts per expert (combined by sum)
AMAX_FIELDS = ("linear", "experts_in", "experts_mid", "k", "v")
COUNT_FIELDS = ("expert_tokens", "expert_seen")
STATS_FIELDS = AMAX_FIELDS + COUNT_FIELDS


@dataclass
class CalibStats:
    """Activation amax per in-memory module name; experts get [E] vectors and token counts."""

    linear: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> amax (0-dim, fp32)
    experts_in: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> [E] gate_up input amax
    experts_mid: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> [E] down input amax
    expert_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> [E] token counts
    # experts module -> [E] tokens each expert's statistics saw in the --calib-all-experts pass
    expert_seen: dict[str, torch.Tensor] = field(default_factory=dict)
    k: dict[str, torch.Tensor] = field(default_factory=dict)  # attention module -> K amax
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0

    def cpu(self) -> CalibStats:
        """The statistics moved to host memory (they are gathered on the forward's device, without syncs)."""
        for f in STATS_FIELDS:
            setattr(self, f, {k: v.cpu() for k, v in getattr(self, f).items()})
        return self


def _amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim fp32 tensor on x's device (one fused reduction, no copy of x, no sync)."""
    x = x.detach()
    return torch.linalg.vector_norm(x, float("inf")).float() if x.numel() else torch.zeros((), device=x.device)


def _update(store: dict, key: str, value: torch.Tensor) -> None:
    store[key] = torch.maximum(store[key], value) if key in store else value


COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_model(root: Path, config: dict, device: str = "cpu", trust_remote_code: bool = False, dtype: str = "bfloat16"):
    """The family's transformers model, eager fused experts (so F.linear sees every expert). In BF16, or
    in float32 to take BF16 rounding of everything but the quantized Linears out of a comparison (the
    BF16 weights are exact in fp32)."""
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
            dtype=COMPUTE_DTYPES[dtype],
            experts_implementation="eager",
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise StepquantError(f"{root}: transformers cannot load the model ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()


def finite_weights(module: torch.nn.Module, allow: bool, prefix: str = "") -> None:
    """A NaN or Inf weight would turn every activation after it into NaN: refuse it by name, or (with
    --allow-nonfinite, whose modules stay unquantized) let calibration see zeros in its place."""
    for name, p in module.named_parameters(prefix.rstrip(".")):
        if p.is_floating_point() and not p.is_meta and not all_finite(p):
            if not allow:
                raise StepquantError(f"{name}: NaN or Inf in the source weights (--allow-nonfinite keeps such modules unquantized)")
            with torch.no_grad():
                p.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _is_fused_experts(module: torch.nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.nn.Parameter) and p.dim() == 3 and isinstance(getattr(module, "down_proj", None), torch.nn.Parameter)


@contextmanager
def _recording(model: torch.nn.Module, stats: CalibStats, all_experts: bool = False):
    """Hooks recording the amax of every Linear input, each expert's inputs (per expert, counting the
    tokens routed to it) and K/V. `all_experts`: before each routed pass, the experts module also runs
    every token through every expert for the statistics alone (llm-compressor's behaviour); its output
    is dropped, so only the routed outputs flow on, and the token counts stay the routed ones."""
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def linear_hook(module, args):
        _update(stats.linear, names[module], _amax(args[0]))

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(linear_hook))

    experts = {m: names[m] for m in model.modules() if _is_fused_experts(m)}
    active: list[_ExpertPass] = []  # the experts module forward running now
    orig_linear = F.linear

    def linear(input, weight, bias=None):
        if active:
            active[-1].saw(input, weight)
        return orig_linear(input, weight, bias)

    def pre(module, args, kwargs):
        if all_experts:
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens, n = hidden.reshape(-1, hidden.shape[-1]).shape[0], module.gate_up_proj.shape[0]
            every = torch.arange(n, device=hidden.device).expand(tokens, n)
            active.append(_ExpertPass(module, experts[module], seen=True))
            try:
                module.forward(hidden, every, torch.zeros(every.shape, dtype=hidden.dtype, device=hidden.device))
            finally:
                active.pop().into(stats)
        active.append(_ExpertPass(module, experts[module], seen=False))

    def post(module, args, kwargs, out):
        active.pop().into(stats)

    for m in experts:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))

    def before(module, key, value):
        _update(stats.k, names[module], _amax(key))
        _update(stats.v, names[module], _amax(value))
        return key, value

    F.linear = linear
    try:
        with wrapped_attention(model, before):
            yield
    finally:
        F.linear = orig_linear
        for h in handles:
            h.remove()


@contextmanager
def wrapped_attention(model: torch.nn.Module, before):
    """While active, `before(module, key, value) -> (key, value)` sees and may replace the keys and values
    every attention layer consumes (after k_norm and RoPE), through transformers' attention interface;
    the model's own attention implementation then runs on them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfgs = [model.config] + [getattr(model.config, k) for k in ("text_config",) if getattr(model.config, k, None)]
    previous = [c._attn_implementation for c in cfgs]
    impl = previous[-1] or "sdpa"
    inner = ALL_ATTENTION_FUNCTIONS[impl] if impl != "eager" else None
    # the masks the wrapped implementation needs: transformers builds none at all for an attention name it
    # has no mask function for, which would silently drop sliding windows (and padding)
    AttentionMaskInterface.register(ATTN_NAME, AttentionMaskInterface._global_mapping[impl])

    def attention(module, query, key, value, *args, **kwargs):
        key, value = before(module, key, value)
        if inner is None:
            import importlib

            return importlib.import_module(type(module).__module__).eager_attention_forward(
                module, query, key, value, *args, **kwargs
            )
        return inner(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, attention)
    try:
        for c in cfgs:
            c._attn_implementation = ATTN_NAME
        yield
    finally:
        for c, prev in zip(cfgs, previous):
            c._attn_implementation = prev


class _ExpertPass:
    """One forward of a fused experts module, seen through its F.linear calls: they alternate gate_up
    (whose weight, a view of `gate_up_proj`, tells the expert) and down. Per expert the amax of both
    inputs and the rows routed; two operations a call, gathered into the [E] statistics when it ends.
    `seen`: the --calib-all-experts pass, whose rows count as seen, not routed."""

    def __init__(self, module: torch.nn.Module, name: str, seen: bool) -> None:
        self.module, self.name, self.seen = module, name, seen
        base = module.gate_up_proj
        self.n = base.shape[0]
        self.inp = torch.zeros(self.n, dtype=torch.float32, device=base.device)
        self.mid = torch.zeros(self.n, dtype=torch.float32, device=base.device)
        self.rows = [0] * self.n
        self.done: tuple[set[int], set[int]] = (set(), set())  # experts already in inp, in mid
        self.down_next, self.expert, self.calls = False, 0, 0

    def saw(self, input: torch.Tensor, weight: torch.Tensor) -> None:
        self.calls += 1
        if self.down_next:
            self._put(self.mid, self.done[1], self.expert, input)
        else:
            base = self.module.gate_up_proj
            e = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
            if weight.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() or not 0 <= e < self.n:
                raise StepquantError(f"{self.name}: cannot tell which expert a projection belongs to")
            self.expert = e
            self._put(self.inp, self.done[0], e, input)
            self.rows[e] += input.reshape(-1, input.shape[-1]).shape[0]
        self.down_next = not self.down_next

    @staticmethod
    def _put(vec: torch.Tensor, done: set[int], e: int, input: torch.Tensor) -> None:
        """vec[e] = max(vec[e], max |input|); the eager loop calls each expert once, so mostly a plain store."""
        if input.numel():
            amax = torch.linalg.vector_norm(input.detach(), float("inf"))
            vec[e] = torch.maximum(vec[e], amax.float()) if e in done else amax
            done.add(e)

    def into(self, stats: CalibStats) -> None:
        if not self.calls:
            return
        _update(stats.experts_in, self.name, self.inp)
        _update(stats.experts_mid, self.name, self.mid)
        store = stats.expert_seen if self.seen else stats.expert_tokens
        rows = torch.tensor(self.rows, dtype=torch.int64)
        store[self.name] = store[self.name] + rows if self.name in store else rows


def calibrate(model: torch.nn.Module, batches: Iterable[torch.Tensor], all_experts: bool = False,
              check: Callable[[], None] | None = None) -> CalibStats:  # fmt: skip
    """Feed token batches ([B, T] ids) through the model in order; max-calibrate every input (with
    `all_experts`, every expert's inputs over all tokens). `check`: called after every batch, raises to stop."""
    stats = CalibStats()
    device = next(model.parameters()).device
    with torch.no_grad(), _recording(model, stats, all_experts):
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            stats.batches += 1
            stats.tokens += ids.numel()
            if check is not None:
                check()
    return stats.cpu()


def coverage_png(expert_tokens: dict[str, torch.Tensor]) -> bytes:
    """A heat map, layers x experts, of the calibration tokens routed to each expert (log scale; the
    experts that got none stand out in white)."""
    import io

    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    layers = sorted(expert_tokens, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    counts = torch.stack([expert_tokens[n].float() for n in layers]).numpy()
    masked = counts.copy()
    masked[masked == 0] = float("nan")
    fig = Figure(figsize=(min(16, 2 + counts.shape[1] / 12), 1.5 + 0.25 * len(layers)), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=LogNorm(vmin=1, vmax=max(1.0, float(counts.max()))))  # fmt: skip
    ax.set_yticks(range(len(layers)), [n.rsplit(".", 1)[-1] for n in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"calibration tokens per expert ({int((counts == 0).sum())} experts got none: white)")
    fig.colorbar(im, ax=ax, label="tokens")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


# -- calibration data -----------------------------------------------------------------------------
CORPUS_DIR = Path(__file__).resolve().parent.parent / "calibration"
BATCH = 4
# Calibration datasets by Hub id -> (config, split, field). A `messages` field is a conversation, rendered
# with the model's chat template. Any other id is read as (None, "train", "text").
DATASETS: dict[str, tuple[str | None, str, str]] = {
    "cnn_dailymail": ("3.0.0", "train", "article"),
    "abisee/cnn_dailymail": ("3.0.0", "train", "article"),
    "HuggingFaceH4/ultrachat_200k": (None, "train_sft", "messages"),
    "wikitext": ("wikitext-2-raw-v1", "train", "text"),
    "Salesforce/wikitext": ("wikitext-2-raw-v1", "train", "text"),
}
DATASET_ROWS = 10_000  # read at most this many rows of a dataset (after a seeded shuffle)


def load_batches(spec: str, root: Path, samples: int, seq_len: int, trust_remote_code: bool = False,
                 seed: int = 0) -> tuple[list[torch.Tensor], str]:  # fmt: skip
    """Token batches for calibration, and a description of where they came from.

    `spec`: `embedded` (calibration/*.txt plus CPython's pydoc topics), a token-id JSON
    (`{"batches": [[[ids...]...]...]}`, fed batch by batch as given), a local .txt / .jsonl file, or a
    Hugging Face dataset id (through `datasets`, when installed and online; its rows shuffled with
    `seed`, see DATASETS for the field read).
    """
    path = Path(spec)
    if spec != "embedded" and path.suffix == ".json" and path.is_file():
        return _token_json(path), f"{path.name} (token ids)"
    return token_batches(_texts(spec, path, seed), root, samples, seq_len, spec, trust_remote_code)


def token_batches(texts: list[str | list[dict]], root: Path, samples: int, seq_len: int, label: str,
                  trust_remote_code: bool = False) -> tuple[list[torch.Tensor], str]:  # fmt: skip
    """`samples` rows of `seq_len` tokens from `texts` with the model's tokenizer (every other text in the
    chat template when it has one; conversations, lists of messages, always in it), in batches; and their
    description."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code)  # never None: that asks on a TTY
    except (OSError, ValueError) as exc:
        raise StepquantError(f"{root}: no usable tokenizer for text calibration data ({type(exc).__name__})") from None
    chat = bool(getattr(tok, "chat_template", None))
    if not chat and any(isinstance(t, list) for t in texts):
        raise StepquantError(f"calibration data {label!r}: conversations, but {root} has no chat template")
    if chat:
        texts = [
            tok.apply_chat_template(t, tokenize=False) if isinstance(t, list)
            else t if i % 2 else tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False)
            for i, t in enumerate(texts)
        ]  # fmt: skip
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= samples * seq_len:
            break
    if len(ids) < seq_len:
        raise StepquantError(f"calibration data {label!r}: only {len(ids)} tokens, fewer than --calib-seq-len {seq_len}")
    n = min(samples, len(ids) // seq_len)
    rows = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    return list(rows.split(BATCH)), f"{label} ({n} x {seq_len} tokens)"


def hash_order(text: str) -> str:
    """A fixed pseudo-random order (independent of PYTHONHASHSEED)."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _token_json(path: Path) -> list[torch.Tensor]:
    from .stfile import load_json_strict

    data = load_json_strict(path.read_bytes(), str(path))
    batches = data.get("batches") if isinstance(data, dict) else None
    try:
        out = [torch.tensor(b, dtype=torch.long) for b in batches]
    except (TypeError, ValueError, RuntimeError, OverflowError):  # not lists of ints, or ints past int64
        out = []
    if not out or any(b.dim() != 2 or b.numel() == 0 or (b < 0).any() for b in out):
        raise StepquantError(f"{path}: expected {{'batches': [[[token ids]]]}} with 2-D batches of ids")
    return out


def _texts(spec: str, path: Path, seed: int = 0) -> list[str | list[dict]]:
    if spec == "embedded":
        import pydoc_data.topics

        texts = [t for p in sorted(CORPUS_DIR.glob("*.txt")) for t in p.read_text().split("\n\n") if t.strip()]
        # interleave the sources so that a small sample still sees prose, code, math and chat
        texts = sorted(texts, key=lambda t: (hash_order(t), t))
        return texts + [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    if path.is_file():
        try:
            raw = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise StepquantError(f"{path}: cannot read calibration text ({type(exc).__name__})") from None
        if path.suffix == ".jsonl":
            import json

            texts = []
            for i, line in enumerate(raw.splitlines()):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise StepquantError(f"{path}: line {i + 1} is not JSON") from None
                    text = row.get("text") if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise StepquantError(f"{path}: line {i + 1} has no string 'text' field")
                    texts.append(text)
            return texts
        return [p for p in raw.split("\n\n") if p.strip()]
    try:
        import datasets
    except ImportError:
        raise StepquantError(f"calibration data {spec!r}: not a file, and `datasets` is not installed") from None
    config, split, field = DATASETS.get(spec, (None, "train", "text"))
    try:
        ds = datasets.load_dataset(spec, config, split=split, streaming=True).shuffle(seed=seed, buffer_size=DATASET_ROWS)
        rows = [row.get(field) for row, _ in zip(ds, range(DATASET_ROWS))]
    except Exception as exc:  # noqa: BLE001 - any failure of a remote dataset is bad input here
        raise StepquantError(f"calibration data {spec!r}: cannot load ({type(exc).__name__})") from None
    texts = [r for r in rows if isinstance(r, str) and r.strip() or _is_chat(r)]
    if not texts:
        raise StepquantError(f"calibration data {spec!r}: no rows with a {field!r} field of text or messages")
    return texts


def _is_chat(row: object) -> bool:
    return isinstance(row, list) and bool(row) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in row
    )


def canonical_module(name: str, memory_names: tuple[tuple[str, str], ...]) -> str:
    """A transformers in-memory module name -> the canonical checkpoint name (the family's table)."""
    import re

    for pattern, repl in memory_names:
        if re.search(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def canonical_layer(name: str, memory_names: tuple[tuple[str, str], ...]) -> str:
    """The canonical layer prefix (`model.layers.N`) of an in-memory module name, e.g. a fused experts module."""
    import re

    canon = canonical_module(name, memory_names)
    m = re.search(r"^(.*?\.layers\.\d+)\.", canon + ".")
    return m.group(1) if m else canon


def to_canonical(stats: CalibStats, memory_names: tuple[tuple[str, str], ...]):
    """Map in-memory module names to canonical checkpoint names (experts keyed by their layer prefix)."""

    def canon(name: str) -> str:
        return canonical_module(name, memory_names)

    def layer(name: str) -> str:
        return canonical_layer(name, memory_names)

    acts = Activations()
    acts.linear = {canon(n): v for n, v in stats.linear.items()}
    acts.experts_in = {layer(n): v for n, v in stats.experts_in.items()}
    acts.experts_mid = {layer(n): v for n, v in stats.experts_mid.items()}
    acts.expert_tokens = {layer(n): v for n, v in stats.expert_tokens.items()}
    acts.expert_seen = {layer(n): v for n, v in stats.expert_seen.items()}
    acts.k = {canon(n): v for n, v in stats.k.items()}
    acts.v = {canon(n): v for n, v in stats.v.items()}
    acts.tokens = stats.tokens
    return acts
