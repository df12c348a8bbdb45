"""OpenAI-compatible chat endpoints for GPQA (SPEC §10): a client that asks a server (vLLM, SGLang serving
a checkpoint on as many GPUs as it needs) with concurrency, retries with backoff and a resumable answer
cache, and a minimal server over a transformers model (loopback tests; machines without vLLM).

The cache is a JSONL file of {"key": sha256 of endpoint, model, sampling and prompt, "response": text}:
prompts (which hold the questions) are never written, and a rerun asks only what is not in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import StepquantError

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class Endpoint:
    """Where and how to ask: `url` is the API base (`http://host:port/v1`)."""

    url: str
    model: str
    max_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    concurrency: int = 8
    retries: int = 6
    backoff: float = 0.5  # seconds before the first retry; doubles, at most 30
    timeout: float = 900.0
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable and only sent to the server

    def key(self, prompt: str) -> str:
        spec = json.dumps([self.url.rstrip("/"), self.model, self.max_tokens, self.temperature, self.top_p, prompt])
        return hashlib.sha256(spec.encode()).hexdigest()


def ask(ep: Endpoint, prompt: str) -> str:
    """One chat completion, retried with exponential backoff on connection errors and retryable statuses."""
    body = json.dumps({"model": ep.model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": ep.max_tokens, "temperature": ep.temperature, "top_p": ep.top_p}).encode()  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if os.environ.get(ep.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[ep.api_key_env]}"
    url = ep.url.rstrip("/") + "/chat/completions"
    last = ""
    for attempt in range(ep.retries + 1):
        if attempt:
            time.sleep(min(30.0, ep.backoff * 2 ** (attempt - 1)))
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=ep.timeout) as resp:
                data = json.loads(resp.read())
            return data["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code not in RETRYABLE:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = type(exc).__name__
        except (KeyError, IndexError, ValueError):
            last = "a reply that is not a chat completion"
            break
    raise StepquantError(f"endpoint {url}: no answer from model {ep.model!r} ({last}) after {attempt + 1} tries")


def answerer(ep: Endpoint, cache: Path | None = None):
    """prompts -> responses through `ep`, `ep.concurrency` at a time; answers already in `cache` are not
    asked again, and each new one is appended as it arrives (an interrupted run loses nothing finished)."""
    done: dict[str, str] = {}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lines = cache.read_text().splitlines() if cache.exists() else []
        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec["response"]
            except (ValueError, KeyError, TypeError):
                if n < len(lines) - 1:
                    raise StepquantError(f"{cache}: line {n + 1} is not an answer record") from None
                # a torn last line is what an interruption leaves: drop it before appending
                cache.write_text("".join(kept + "\n" for kept in lines[:-1]))
    lock = threading.Lock()

    def one(key: str, prompt: str) -> None:
        text = ask(ep, prompt)
        with lock:
            done[key] = text
            if cache is not None:
                with cache.open("a") as f:
                    f.write(json.dumps({"key": key, "response": text}) + "\n")

    def answer(prompts: list[str]) -> list[str]:
        keys = [ep.key(p) for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts) if k not in done}
        with ThreadPoolExecutor(max(1, ep.concurrency)) as pool:
            for f in [pool.submit(one, k, p) for k, p in todo.items()]:
                f.result()
        return [done[k] for k in keys]

    return answer


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
          fail_first: int = 0, trust_remote_code: bool = False) -> ThreadingHTTPServer:  # fmt: skip
    """A minimal OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/stats`) over a
    transformers model: greedy or sampled `generate` with the chat template, one request at a time.
    `fail_first` answers that many requests with 503 first (to exercise clients' retries). Returns the
    server, not yet serving: call `serve_forever()`; `server_address` holds the port."""
    import torch
    from transformers import AutoTokenizer

    from .calibrate import load_model
    from .checkpoint import open_checkpoint

    with open_checkpoint(model_dir) as ckpt:
        model = load_model(ckpt.root, ckpt.config, device, trust_remote_code)
        tok = AutoTokenizer.from_pretrained(ckpt.root, trust_remote_code=trust_remote_code)
    name = Path(model_dir).name
    gen_lock = threading.Lock()
    stats = {"requests": 0, "completions": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # requests hold questions: no request log
            pass

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            elif self.path == "/stats":
                self._send(200, stats)
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            with gen_lock:
                stats["requests"] += 1
                if stats["requests"] <= fail_first:
                    return self._send(503, {"error": {"message": "warming up"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = req["messages"]
            except (ValueError, KeyError):
                return self._send(400, {"error": {"message": "expected a chat completion request"}})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
            temperature = float(req.get("temperature", 1.0) or 0.0)
            kw = dict(max_new_tokens=int(req.get("max_tokens") or 256), do_sample=temperature > 0,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)  # fmt: skip
            if temperature > 0:
                kw |= dict(temperature=temperature, top_p=float(req.get("top_p", 1.0)))
            with gen_lock, torch.no_grad():
                out = model.generate(**enc, **kw)
                stats["completions"] += 1
            content = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            self._send(200, {"object": "chat.completion", "model": req.get("model", name),
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "length"}]})  # fmt: skip

    return ThreadingHTTPServer((host, port), Handler)
