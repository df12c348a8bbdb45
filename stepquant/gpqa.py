"""GPQA exactly as openai/simple-evals runs it (SPEC §10): the multiple-choice template, `Random(0)`
permutations over the repeated rows, the answer regex; quantized and reference scored on the same
permutations, with a paired per-question difference and its standard error.

Questions never reach logs or reports: results carry row indices and letters only.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import StepquantError

TEMPLATE = """
Answer the following multiple choice question. The last line of your response should be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering.

{Question}

A) {A}
B) {B}
C) {C}
D) {D}
""".strip()
ANSWER_PATTERN = r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?"
# lm-eval's `gpqa_*_zeroshot` (the log-likelihood variant): this prompt, continuations " (A)" .. " (D)"
LOGLIK_TEMPLATE = "What is the correct answer to this question:{Question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\nAnswer:"
LOGLIK_CHOICES = ("(A)", "(B)", "(C)", "(D)")
COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
HF_DATASET = "Idavidrein/gpqa"
VARIANTS = {"diamond": "gpqa_diamond", "main": "gpqa_main", "extended": "gpqa_extended"}


@dataclass
class Example:
    row: int  # index of the question in the data
    question: str
    choices: list[str]  # in presentation order (A-D)
    answer: str  # the correct letter


def load_rows(spec: str) -> list[dict]:
    """GPQA rows from a local CSV, JSON (a list of objects) or JSONL file, or `hf:diamond|main|extended`
    (the gated dataset; needs a token with access)."""
    if spec.startswith("hf:"):
        return _hf_rows(spec[3:])
    path = Path(spec)
    if not path.is_file():
        raise StepquantError(f"{spec}: no such GPQA file (CSV, JSON or JSONL; or hf:diamond)")
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines(keepends=True)))
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif path.suffix == ".json":
            rows = json.loads(text)
        else:
            raise StepquantError(f"{spec}: a GPQA file must end in .csv, .json or .jsonl")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise StepquantError(f"{spec}: not a readable GPQA file ({type(exc).__name__})") from None
    return _validated(rows, spec)


def _hf_rows(variant: str) -> list[dict]:
    if variant not in VARIANTS:
        raise StepquantError(f"hf:{variant}: the GPQA variants are {', '.join(VARIANTS)}")
    try:
        import datasets

        ds = datasets.load_dataset(HF_DATASET, VARIANTS[variant], split="train")
    except Exception as exc:  # noqa: BLE001 - gated, offline, or not installed: all bad input here
        raise StepquantError(f"hf:{variant}: cannot load {HF_DATASET} ({type(exc).__name__}; it is gated: accept its terms and set HF_TOKEN)") from None
    return _validated([dict(r) for r in ds], f"hf:{variant}")


def _validated(rows, where: str) -> list[dict]:
    if not isinstance(rows, list) or not rows:
        raise StepquantError(f"{where}: no GPQA rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise StepquantError(f"{where}: row {i} is not an object")
        missing = [c for c in COLUMNS if not isinstance(r.get(c), str) or not r[c].strip()]
        if missing:
            raise StepquantError(f"{where}: row {i} lacks {missing[0]!r}")
    return [{c: r[c].strip() for c in COLUMNS} for r in rows]


def examples(rows: Sequence[dict], repeats: int) -> list[Example]:
    """simple-evals' order: the rows `repeats` times over, one `Random(0).sample(range(4), 4)` each."""
    if repeats < 1:
        raise StepquantError("--repeats must be at least 1")
    rng = random.Random(0)
    out = []
    for i, r in list(enumerate(rows)) * repeats:
        perm = rng.sample(range(4), 4)
        base = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
        choices = [base[j] for j in perm]
        out.append(Example(i, r["Question"], choices, "ABCD"[choices.index(r["Correct Answer"])]))
    return out


def prompt(ex: Example) -> str:
    return TEMPLATE.format(Question=ex.question, A=ex.choices[0], B=ex.choices[1], C=ex.choices[2], D=ex.choices[3])


def _lm_eval_clean(text: str) -> str:
    """lm-eval's GPQA text cleanup: trimmed, " [title]" -> ". ", bracketed spans dropped, double spaces halved."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def loglik_prompt(ex: Example) -> str:
    c = [_lm_eval_clean(x) for x in ex.choices]
    return LOGLIK_TEMPLATE.format(Question=_lm_eval_clean(ex.question), A=c[0], B=c[1], C=c[2], D=c[3])


def strip_thinking(text: str) -> str:
    """A reasoning model's answer without its thinking (`<think>...</think>`, or all before a lone `</think>`)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    return text.split("</think>")[-1]


def extract(text: str) -> str | None:
    m = re.search(ANSWER_PATTERN, strip_thinking(text))
    return m.group(1) if m else None  # as simple-evals: a lower-case letter does not count


def score(exs: Sequence[Example], responses: Sequence[str]) -> list[float]:
    return [1.0 if extract(r) == ex.answer else 0.0 for ex, r in zip(exs, responses, strict=True)]


def paired(exs: Sequence[Example], ref: Sequence[float], quant: Sequence[float]) -> dict:
    """Accuracies, the mean per-question difference (quant - ref, each question averaged over its
    repeats) with its standard error, and recovery = quant / ref accuracy (None when the reference
    scored nothing)."""
    per_q: dict[int, list[tuple[float, float]]] = {}
    for ex, r, q in zip(exs, ref, quant, strict=True):
        per_q.setdefault(ex.row, []).append((r, q))
    diffs = [sum(q - r for r, q in v) / len(v) for v in per_q.values()]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    acc_r, acc_q = sum(ref) / len(ref), sum(quant) / len(quant)
    return {"n": n, "samples": len(exs), "accuracy": {"ref": acc_r, "quant": acc_q}, "paired_diff": mean,
            "paired_se": se, "recovery": acc_q / acc_r if acc_r else None}  # fmt: skip


def run(exs: Sequence[Example], answer: Callable[[list[str]], list[str]], batch: int = 8,
        progress: Callable[[int], None] | None = None, make_prompt: Callable[[Example], str] = prompt) -> list[str]:  # fmt: skip
    """Responses for every example, `batch` prompts at a time through `answer` (prompts -> texts)."""
    out: list[str] = []
    for i in range(0, len(exs), batch):
        out += answer([make_prompt(e) for e in exs[i : i + batch]])
        if progress:
            progress(len(out))
    return out


def generator(model, tokenizer, device: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              seed: int = 0) -> Callable[[list[str]], list[str]]:  # fmt: skip
    """prompts -> responses through transformers' `generate` with the chat template, left-padded batches,
    KV cache; greedy at temperature 0."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def answer(prompts: list[str]) -> list[str]:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]  # fmt: skip
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if temperature > 0:
            kw |= dict(temperature=temperature, top_p=top_p)
            torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer


def loglik_chooser(model, tokenizer, device: str) -> Callable[[list[str]], list[str]]:
    """prompts (`loglik_prompt`) -> "Answer: X" for the continuation " (X)" of highest log-likelihood,
    lm-eval's way: no chat template; the continuation's tokens are those the whole text has beyond
    the prompt's own encoding; one forward pass over the four texts of a prompt."""
    import torch

    def choose(prompts: list[str]) -> list[str]:
        out = []
        for ctx in prompts:
            n_ctx = len(tokenizer(ctx)["input_ids"])
            seqs = [tokenizer(ctx + " " + c)["input_ids"] for c in LOGLIK_CHOICES]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], device=device)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            scores = [float(sum(logp[i, t - 1, s[t]] for t in range(n_ctx, len(s)))) for i, s in enumerate(seqs)]
            out.append("Answer: " + "ABCD"[max(range(4), key=scores.__getitem__)])
        return out

    return choose
