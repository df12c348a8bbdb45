"""Executing a plan: the output tensors (canonical names) with functions that produce their bytes.

Copies stream source bytes; relayouts stream one expert at a time; quantized tensors are computed per
Linear or per expert projection and kept in a small byte-bounded cache, so memory stays bounded by one
layer's projection, never the model.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .checkpoint import Checkpoint
from .errors import StepquantError
from .formats import E4M3_MAX, Format
from .plan import FUSION, Experts, Linear, Plan
from .shards import OutTensor
from .stfile import DTYPES, TORCH_TO_ST

CACHE_BYTES = 4 * 1024**3  # bound on kept results whose readers were skipped (a resumed run); see _cached
BATCH_BYTES = 256 * 1024**2  # experts quantized per step
_READERS = ThreadPoolExecutor(8, thread_name_prefix="stepquant-read")  # pread releases the GIL


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every value is finite, in slices: `torch.isfinite` of a whole tensor makes several
    temporaries its size (a 2 GB expert parameter would cost ~5 GB more)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already on the CPU and contiguous (the view keeps
    its storage alive)."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class Activations:
    """Calibrated amax per canonical module: Linear inputs, experts ([E] in/mid + token counts), K/V."""

    def __init__(self) -> None:
        self.linear: dict[str, torch.Tensor] = {}
        self.experts_in: dict[str, torch.Tensor] = {}
        self.experts_mid: dict[str, torch.Tensor] = {}
        self.expert_tokens: dict[str, torch.Tensor] = {}  # layer -> [E] routed calibration tokens
        self.expert_seen: dict[str, torch.Tensor] = {}  # layer -> [E] tokens of the --calib-all-experts pass
        self.k: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.source = ""
        self.samples = 0
        self.tokens = 0


class Executor:
    def __init__(self, ckpt: Checkpoint, plan: Plan, acts: Activations | None, expert_input_scale: str,
                 device: str = "cpu") -> None:  # fmt: skip
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.plan = plan
        self.acts = acts
        self.per_expert_scales = expert_input_scale == "per-expert"
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._readers: Counter[tuple] = Counter()  # cache key -> output readers still to come
        self._expert_amax: dict[tuple[str, str], torch.Tensor] = {}  # (layer, projection) -> [E] weight amax
        self._scales: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, projection) -> scalar scales
        self._amax: dict[str, torch.Tensor] = {}
        self.by_module = {lin.module: lin for lin in plan.linears}
        self._staged: dict[int, torch.Tensor] = {}
        # its own CUDA stream: its GPU work overlaps a calibration running meanwhile on the default one
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _on_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    # -- reading ----------------------------------------------------------------------------------
    def _src(self, canonical: str) -> str:
        return self.plan.canonical[canonical]

    def _read_part(self, ref: tuple[str, int | None]) -> torch.Tensor:
        name, idx = ref
        src = self._src(name)
        return self.ckpt.read(src) if idx is None else self.ckpt.read_slice(src, idx)

    def linear_weight(self, lin: Linear, check: bool = True) -> torch.Tensor:
        parts = {s: self.ckpt.read(self._src(n)) for s, n in lin.parts.items() if s != "input_scale"}
        w = lin.fmt_in.dequantize(parts)
        if check and not all_finite(w):
            raise _nonfinite_weight(lin)
        return w

    def expert_part(self, ex: Experts, key: str, e: int, suffix: str) -> torch.Tensor:
        """One expert's `suffix` tensor of projection `key`, in any source layout."""
        t = self._read_part(ex.parts[key][e][suffix])
        return t[_rows(ex, key, t.shape[0])] if t.dim() else t

    def expert_weight(self, ex: Experts, key: str, e: int, check: bool = True) -> torch.Tensor:
        parts = {s: self.expert_part(ex, key, e, s) for s in ex.parts[key][e] if s != "input_scale"}
        w = ex.fmt_in.dequantize(parts)
        if check and not all_finite(w):
            raise _nonfinite_expert(ex, e, key)
        return w

    def bf16_source(self, ex: Experts, keys: tuple[str, ...]) -> bool:
        """Whether the experts of `keys` are plain BF16 tensors in the source, which can be read straight
        into the staging buffers."""
        if ex.fmt_in.quant_algo:
            return False
        refs = [ex.parts[k][0] for k in keys]
        return all(set(r) <= {"weight", "input_scale"} and self.ckpt.info(self._src(r["weight"][0])).dtype == "BF16" for r in refs)

    def _read_expert_into(self, ex: Experts, key: str, e: int, out: torch.Tensor) -> None:
        name, idx = ex.parts[key][e]["weight"]
        src = self._src(name)
        info = self.ckpt.info(src)
        rows = info.shape[1 if idx is not None else 0]
        self.ckpt.read_into(src, out, idx, _rows(ex, key, rows))

    def _staging(self, slot: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """BF16 buffers for one batch of experts, two slots (one is read into while the other is
        quantized), allocated once and reused; pinned for a CUDA device (pinning is slow)."""
        need = sum(math.prod(s) for s in shapes.values())
        buf = self._staged.get(slot)
        if buf is None or buf.numel() < need:
            buf = self._staged[slot] = torch.empty(need, dtype=torch.bfloat16, pin_memory=self.device.type == "cuda")
        out, at = {}, 0
        for k, s in shapes.items():
            out[k] = buf[at : at + math.prod(s)].view(s)
            at += math.prod(s)
        return out

    def weight_amax(self, module: str) -> torch.Tensor:
        if module not in self._amax:
            self._device_weight(self.by_module[module])
        return self._amax[module]

    def _device_weight(self, lin: Linear) -> torch.Tensor:
        """`lin`'s weight on the device; its amax (taken there) recorded, non-finite weights refused."""
        w = self.linear_weight(lin, check=False).to(self.device)
        amax = w.abs().amax().float().cpu()  # NaN and Inf propagate into the amax
        if not torch.isfinite(amax):
            raise _nonfinite_weight(lin)
        self._amax[lin.module] = amax
        return w

    def _group(self, lin: Linear) -> list[Linear]:
        for pattern, members in FUSION:
            m = re.match(pattern, lin.module)
            if m:
                group = [self.by_module.get(f"{m.group(1)}.{p}") for p in members]
                return [g for g in group if g is not None and g.fmt_out is lin.fmt_out]
        return [lin]

    # -- producing --------------------------------------------------------------------------------
    def _cached(self, key: tuple, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A result several output tensors read (a module's weight and scales; gate and up, quantized
        together). Kept while readers of it are still to come (`_read_done` drops it after the last),
        within CACHE_BYTES."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = make()
        if self._readers[key] > 0:
            self._cache[key] = value
        while len(self._cache) > 1 and sum(t.numel() * t.element_size() for v in self._cache.values() for t in v.values()) > CACHE_BYTES:
            self._cache.popitem(last=False)
        return value

    def _reader(self, key: tuple) -> tuple:
        self._readers[key] += 1
        return key

    def _read_done(self, key: tuple) -> None:
        self._readers[key] -= 1
        if self._readers[key] <= 0:
            self._cache.pop(key, None)

    def _input_amax(self, modules: list[str]) -> torch.Tensor:
        vals = [self.acts.linear[m] for m in modules if self.acts and m in self.acts.linear]
        if not vals:
            raise StepquantError(f"no calibration data reached {modules[0]}; it cannot get an input_scale")
        return torch.stack(vals).amax()

    def _group_amax(self, lin: Linear) -> torch.Tensor:
        """The weight amax that `lin`'s scales follow from: its fusion group's where the format shares it."""
        group = self._group(lin) if lin.fmt_out.shares_fusion_amax else [lin]
        with self._on_stream():
            return torch.stack([self.weight_amax(g.module) for g in group]).amax()

    def quantize_linear(self, lin: Linear) -> dict[str, torch.Tensor]:
        """The quantized weight and its scales (input_scale is not here: `_linear_scales` makes it)."""
        with self._on_stream():
            w = self._device_weight(lin)
            out = {s: t.cpu() for s, t in lin.fmt_out.quantize(w, self._group_amax(lin)).items()}
        return _checked(out, lin.module)

    def _linear_scales(self, lin: Linear) -> dict[str, torch.Tensor]:
        """A quantized Linear's scalar scales that need no quantized weight: the format's amax scales
        and input_scale (calibration), checked like every scale."""
        fmt = lin.fmt_out
        out = dict(fmt.amax_scales(self._group_amax(lin))) if fmt.amax_scale_names else {}
        if fmt.calibrated:
            out["input_scale"] = fmt.input_scale(self._input_amax([g.module for g in self._group(lin)]))
        return _checked(out, lin.module)

    def expert_host_batches(self, ex: Experts, keys: tuple[str, ...], direct: bool) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
        """The experts of `keys` in host memory, ~BATCH_BYTES a batch, read by a thread pool while the
        previous batch is used. `direct`: BF16 sources read into two reused staging buffers (pinned for a
        CUDA device), so a batch is only valid until the caller resumes; asynchronous copies out of it that
        the caller started on the current stream are waited for before its buffer is read into again."""
        per_expert = 2 * max(math.prod(ex.shapes[k]) for k in keys)
        size = max(1, BATCH_BYTES // per_expert)
        batches = [range(s, min(s + size, ex.num)) for s in range(0, ex.num, size)]
        cuda = self.device.type == "cuda"

        def load(batch: range, slot: int, used: torch.cuda.Event | None) -> dict[str, torch.Tensor]:
            if not direct:
                return {k: torch.stack(list(_READERS.map(lambda e, k=k: self.expert_weight(ex, k, e, check=False), batch)))
                        for k in keys}  # fmt: skip
            if used is not None:
                used.synchronize()
            bufs = self._staging(slot, {k: (len(batch), *ex.shapes[k]) for k in keys})
            jobs = [(k, e, bufs[k][j]) for k in keys for j, e in enumerate(batch)]
            list(_READERS.map(lambda job: self._read_expert_into(ex, *job), jobs))
            return bufs

        with ThreadPoolExecutor(1) as prefetch:
            pending = prefetch.submit(load, batches[0], 0, None)
            for i, batch in enumerate(batches):
                bufs = pending.result()
                if i + 1 < len(batches):  # its slot held batch i - 1, whose copies were started before now
                    used = torch.cuda.Event() if cuda else None
                    if used is not None:
                        used.record()
                    pending = prefetch.submit(load, batches[i + 1], (i + 1) % 2, used)
                yield batch, bufs

    def _expert_batches(self, ex: Experts, keys: tuple[str, ...]) -> Iterator[tuple[range, dict[str, torch.Tensor], torch.Tensor]]:
        """The experts of `keys` in batches on the device; with each batch the per-expert amax shared by
        `keys` (gate and up of one expert share it, fused in memory). Finite weights only."""
        # staging is reused only where the results are new tensors: quantized
        direct = ex.fmt_out is not None and bool(ex.fmt_out.quant_algo) and self.bf16_source(ex, keys)
        for batch, bufs in self.expert_host_batches(ex, keys, direct):
            ws = {k: w.to(self.device, non_blocking=True) for k, w in bufs.items()}
            amax = {k: w.abs().amax(dim=tuple(range(1, w.dim()))).float().cpu() for k, w in ws.items()}
            for k, a in amax.items():
                if not torch.isfinite(a).all():
                    e = batch[int((~torch.isfinite(a)).nonzero()[0])]
                    raise _nonfinite_expert(ex, e, k)
            yield batch, ws, torch.stack(list(amax.values())).amax(0)

    def _pair(self, ex: Experts, key: str) -> tuple[str, ...]:
        """Gate and up share a global scale per expert, so they are quantized together."""
        return ("gate", "up") if key in ("gate", "up") and ex.fmt_out.quant_algo else (key,)

    def quantize_experts(self, ex: Experts, key: str) -> dict[str, torch.Tensor]:
        """All experts of one projection, quantized (one stacked kernel call per batch on the GPU). The
        partner's result (gate for up, up for gate) goes into the cache, as both are read once."""
        fmt = ex.fmt_out
        keys = self._pair(ex, key)
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
        bad: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}  # per scale: NaN/Inf/zero seen, on the device
        shared_all = torch.empty(ex.num, dtype=torch.float32)
        pinned = self._stream is not None  # then the copies out are asynchronous, waited for once at the end
        with self._on_stream():
            for batch, ws, shared in self._expert_batches(ex, keys):
                shared_all[batch.start : batch.stop] = shared
                for k, w in ws.items():
                    parts = fmt.quantize_stacked(w, shared)
                    for s, flag in _scale_flags(parts).items():
                        bad[k][s] = bad[k][s] | flag if s in bad[k] else flag
                    for s, t in parts.items():  # into one host tensor per suffix
                        if s not in out[k]:
                            out[k][s] = torch.empty((ex.num, *t.shape[1:]), dtype=t.dtype, pin_memory=pinned)
                        out[k][s][batch.start : batch.stop].copy_(t, non_blocking=pinned)
            if pinned:
                torch.cuda.current_stream().synchronize()
        for k in keys:  # input_scale is not here: the writer takes it, like the amax scales, from _expert_scales
            self._expert_amax[(ex.layer, k)] = shared_all
            _checked(out[k], f"{ex.layer} experts {k}", bad[k])
        for k in keys:
            if k != key:
                self._cached(("ex", ex.layer, k), lambda k=k: out[k])
        return out[key]

    def expert_amax(self, ex: Experts, key: str) -> torch.Tensor:
        """[E] amax per expert that `key`'s scales follow from (shared by gate and up): recorded by
        `quantize_experts`, which the late scales of a shard come after; else a read pass without quantizing."""
        if (ex.layer, key) not in self._expert_amax:
            keys = self._pair(ex, key)
            shared_all = torch.empty(ex.num, dtype=torch.float32)
            with self._on_stream():
                for batch, _, shared in self._expert_batches(ex, keys):
                    shared_all[batch.start : batch.stop] = shared
            for k in keys:
                self._expert_amax[(ex.layer, k)] = shared_all
        return self._expert_amax[(ex.layer, key)]

    def _expert_scales(self, ex: Experts, key: str) -> dict[str, torch.Tensor]:
        """The per-expert scalar scales of `key` that need no quantized weight: input_scale (calibration)
        and the format's amax scales, checked like every scale."""
        if (ex.layer, key) not in self._scales:
            fmt = ex.fmt_out
            out = dict(fmt.amax_scales(self.expert_amax(ex, key))) if fmt.amax_scale_names else {}
            if fmt.calibrated:
                out["input_scale"] = self.expert_input_scales(ex, key, fmt)
            self._scales[(ex.layer, key)] = _checked(out, f"{ex.layer} experts {key}")
        return self._scales[(ex.layer, key)]

    def expert_input_scales(self, ex: Experts, key: str, fmt: Format) -> torch.Tensor:
        store = (self.acts.experts_mid if key == "down" else self.acts.experts_in) if self.acts else {}
        amax = store.get(ex.layer)
        if amax is None:
            raise StepquantError(f"no calibration data reached the experts of {ex.layer}")
        amax = amax.clone()
        # an expert that saw no tokens gets the layer's max (ModelOpt's policy)
        amax[amax == 0] = amax.max()
        if not self.per_expert_scales:
            amax = amax.max().expand(ex.num).clone()
        return torch.stack([fmt.input_scale(a) for a in amax])

    # -- the output list --------------------------------------------------------------------------
    def outputs(self) -> list[OutTensor]:
        outs: list[OutTensor] = []
        self._readers.clear()
        for name in self.plan.copies:
            t = self.ckpt.tensors[self._src(name)]
            outs.append(OutTensor(name, t.dtype, t.shape, t.nbytes, _stream(self.ckpt, t.name)))
        for lin in self.plan.linears:
            outs += self._linear_outputs(lin)
        for ex in self.plan.experts:
            outs += self._expert_outputs(ex)
        for attn in self.plan.kv_layers:
            for kv in ("k", "v"):
                get = lambda attn=attn, kv=kv: {"s": self.kv_scale(attn, kv)}  # noqa: E731
                outs.append(_lazy(f"{attn}.{kv}_proj.{kv}_scale", "F32", (), get, "s", late=True))
        return outs

    def check_calibration(self) -> None:
        """Before anything is written: every calibrated module must have been reached by the data."""
        for lin in self.plan.linears:
            if lin.fmt_out is not None and lin.fmt_out.calibrated:
                self._input_amax([g.module for g in self._group(lin)])
        for ex in self.plan.experts:
            if ex.fmt_out is not None and ex.fmt_out.calibrated:
                for key in ("gate", "down"):
                    self.expert_input_scales(ex, key, ex.fmt_out)
        for attn in self.plan.kv_layers:
            self.kv_scale(attn, "k"), self.kv_scale(attn, "v")

    def outputs_meta(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """(name, dtype, shape, bytes) of every output tensor, reading no weight."""
        return [(t.name, t.dtype, tuple(t.shape), t.nbytes) for t in self.outputs()]

    def kv_scale(self, attn: str, kv: str) -> torch.Tensor:
        store = (self.acts.k if kv == "k" else self.acts.v) if self.acts else {}
        if attn not in store:
            raise StepquantError(f"no calibration data reached {attn}; it cannot get a {kv}_scale")
        return _checked({"s": (store[attn].float() / E4M3_MAX).reshape(())}, attn)["s"]

    def _linear_outputs(self, lin: Linear) -> list[OutTensor]:
        if lin.fmt_out is None:
            return [_copy(self.ckpt, f"{lin.module}.{s}", self.ckpt.tensors[self._src(n)]) for s, n in lin.parts.items()]
        fmt = lin.fmt_out
        specs = dict(fmt.specs(lin.shape))
        if fmt.calibrated:
            specs["input_scale"] = ("F32", ())
        key = ("lin", lin.module)
        get = lambda: self._cached(key, lambda: self.quantize_linear(lin))  # noqa: E731
        outs = []
        for s, (dt, shp) in specs.items():
            if _late(fmt, s):
                outs.append(_lazy(f"{lin.module}.{s}", dt, shp, lambda: self._linear_scales(lin), s, late=True))
                continue
            self._reader(key)
            outs.append(_lazy(f"{lin.module}.{s}", dt, shp, get, s, lambda: self._read_done(key)))
        return outs

    def _expert_outputs(self, ex: Experts) -> list[OutTensor]:
        fam = self.plan.family
        proj = dict(zip(("gate", "up", "down"), fam.projections))
        layout = ex.layout_out
        outs = []
        if ex.fmt_out is None and layout == ex.layout and layout != "fused":
            # same layout, same format: every source tensor as it is
            names = {ref[0] for key in ex.parts for e in ex.parts[key] for ref in e.values()}
            return [_copy(self.ckpt, n, self.ckpt.tensors[self._src(n)]) for n in sorted(names)]
        if layout == "fused":
            return self._fused_outputs(ex)
        for key in ("gate", "up", "down"):
            if ex.fmt_out is None:
                suffixes = {s: self._part_meta(ex, key, s) for s in ex.parts[key][0]}
            else:
                suffixes = dict(ex.fmt_out.specs(ex.shapes[key]))
                if ex.fmt_out.calibrated:
                    suffixes["input_scale"] = ("F32", ())
            for s, (dt, shp) in suffixes.items():
                late = _late(ex.fmt_out, s)
                if layout == "stacked":
                    name = fam.experts["stacked"].format(L=ex.layer, p=proj[key]) + f".{s}"
                    outs.append(OutTensor(name, dt, (ex.num, *shp), ex.num * _nbytes(dt, shp),
                                          self._expert_chunks(ex, key, s, range(ex.num)), late))  # fmt: skip
                else:
                    for e in range(ex.num):
                        name = fam.experts["per-expert"].format(L=ex.layer, e=e, p=proj[key]) + f".{s}"
                        outs.append(OutTensor(name, dt, shp, _nbytes(dt, shp), self._expert_chunks(ex, key, s, [e]), late))
        return outs

    def _part_meta(self, ex: Experts, key: str, suffix: str) -> tuple[str, tuple[int, ...]]:
        name, idx = ex.parts[key][0][suffix]
        t = self.ckpt.tensors[self._src(name)]
        shape = t.shape[1:] if idx is not None else t.shape
        if shape:
            shape = (len(range(shape[0])[_rows(ex, key, shape[0])]), *shape[1:])
        return t.dtype, tuple(shape)

    def _expert_chunks(self, ex: Experts, key: str, suffix: str, experts) -> Callable[[], Iterator[bytes]]:
        small = _late(ex.fmt_out, suffix)
        cache_key = self._reader(("ex", ex.layer, key)) if ex.fmt_out is not None and not small else None

        def chunks() -> Iterator[bytes]:
            if small:
                values = self._expert_scales(ex, key)[suffix]
                for e in experts:
                    yield _bytes(values[e])
                return
            if cache_key is not None:
                full = self._cached(cache_key, lambda: self.quantize_experts(ex, key))[suffix]
                for e in experts:
                    yield _bytes(full[e])
                del full
                self._read_done(cache_key)
                return
            for e in experts:  # relayout only: bytes of one expert at a time
                yield _bytes(self.expert_part(ex, key, e, suffix))

        return chunks

    def _fused_outputs(self, ex: Experts) -> list[OutTensor]:
        fam = self.plan.family
        outs = []
        for fused, keys in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
            dt, shp = self._part_meta(ex, keys[0], "weight")
            rows = shp[0] * len(keys)
            name = fam.experts["fused"].format(L=ex.layer, p=fused)

            def chunks(keys=keys):
                for e in range(ex.num):
                    for k in keys:
                        yield from self._expert_chunks(ex, k, "weight", [e])()

            outs.append(OutTensor(name, dt, (ex.num, rows, *shp[1:]), ex.num * len(keys) * _nbytes(dt, shp), chunks))
        return outs


def _rows(ex: Experts, key: str, rows: int) -> slice:
    """Which rows of a source tensor belong to projection `key`: fused `gate_up_proj` holds the gate's
    rows, then the up's; every other tensor is the projection's own."""
    if ex.layout == "fused" and key in ("gate", "up") and rows == 2 * ex.shapes[key][0]:
        return slice(0, rows // 2) if key == "gate" else slice(rows // 2, rows)
    return slice(None)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[dtype][1]
    for d in shape:
        n *= d
    return n


def _stream(ckpt: Checkpoint, src: str) -> Callable[[], Iterator]:
    return lambda: ckpt.iter_bytes(src)


def _copy(ckpt: Checkpoint, name: str, t) -> OutTensor:
    return OutTensor(name, t.dtype, t.shape, t.nbytes, _stream(ckpt, t.name))


def _lazy(name: str, dtype: str, shape, get: Callable[[], dict], suffix: str,
          done: Callable[[], None] = lambda: None, late: bool = False) -> OutTensor:  # fmt: skip
    """An output computed on demand by `get`; `done` is told when its bytes have been handed on."""
    def chunks():
        t = get()[suffix]
        if TORCH_TO_ST[t.dtype] != dtype or tuple(t.shape) != tuple(shape):
            raise StepquantError(f"tensor '{name}': planned {dtype}{list(shape)}, got {TORCH_TO_ST[t.dtype]}{list(t.shape)}")
        yield _bytes(t)
        del t
        done()

    return OutTensor(name, dtype, tuple(shape), _nbytes(dtype, shape), chunks, late)


def _late(fmt: Format | None, suffix: str) -> bool:
    """Scalar scales of a quantized output that need no quantized weight (input_scale from calibration, the
    format's amax scales): made on their own and written after the weights (late)."""
    return fmt is not None and (suffix == "input_scale" or suffix in fmt.amax_scale_names)


def _nonfinite_weight(lin: Linear) -> StepquantError:
    return StepquantError(f"tensor '{lin.parts['weight']}': NaN or Inf in the weight (--allow-nonfinite keeps it unquantized)")


def _nonfinite_expert(ex: Experts, e: int, key: str) -> StepquantError:
    return StepquantError(f"experts of {ex.layer}: NaN or Inf in expert {e} {key} (--allow-nonfinite keeps them unquantized)")


def _scale_flags(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per scale tensor of `parts`, whether it holds NaN, Inf or zero: a bool on its device (no sync)."""
    flags = {}
    for s, t in parts.items():
        if "scale" in s or s == "s":
            f = t.float()
            flags[s] = (~torch.isfinite(f) | (f == 0)).any()
    return flags


def _checked(parts: dict[str, torch.Tensor], where: str, flags: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Refuse NaN/Inf/zero scales: engines load them silently and produce garbage. `flags`: from
    `_scale_flags`, when they were taken already (on the device, batch by batch)."""
    for s, flag in (_scale_flags(parts) if flags is None else flags).items():
        if flag:
            raise StepquantError(f"{where}: {s} would be NaN, Inf or zero; refusing to write it")
    return parts
