"""verify --endpoint against a real OpenAI-compatible server process on loopback (`stepquant serve`
over the demo model): retries, the paired GPQA report, and a resumed run that asks only the rest."""

import json
import subprocess
import sys
import urllib.request

import pytest

from stepquant.endpoint import Endpoint, answerer
from stepquant.errors import StepquantError

from .conftest import run_cli
from .test_gpqa import write_csv


@pytest.fixture(scope="module")
def server(demo_ckpt):
    """`stepquant serve` on a free loopback port; its first request is answered 503 (to be retried)."""
    proc = subprocess.Popen([sys.executable, "-m", "stepquant", "serve", str(demo_ckpt), "--port", "0", "--fail-first", "1"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = ""
    for line in proc.stderr:  # loading progress first, then the address
        seen += line
        if line.startswith("serving ") and " at http://" in line:
            break
    else:
        proc.kill()
        pytest.fail(f"server did not start:\n{seen}")
    yield line.strip().split(" at ")[-1]
    proc.terminate()
    proc.wait(timeout=30)


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/stats", timeout=30) as r:
        return json.loads(r.read())


def test_interrupted_run_resumes_without_asking_again(server, demo_ckpt, tmp_path):
    data = write_csv(tmp_path / "gpqa.csv")
    rep = tmp_path / "report"
    args = ["verify", demo_ckpt, "--ref", demo_ckpt, "--endpoint", server, "--model", "demo", "--gpqa", data,
            "--repeats", "2", "--max-new-tokens", "4", "--report", rep, "--min-recovery", "0"]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    s = _stats(server)
    assert s["completions"] == 6 and s["requests"] == 7  # one 503, retried
    # as if the run had been killed after four answers, the fifth half written
    cache = rep / "gpqa-answers.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 6
    cache.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert _stats(server)["completions"] == 8  # only the two missing answers were asked
    assert [json.loads(x)["key"] for x in cache.read_text().splitlines()][:4] == [json.loads(x)["key"] for x in lines[:4]]
    assert len(cache.read_text().splitlines()) == 6  # the torn line gone, the two answers appended
    r = json.loads((rep / "report.json").read_text())
    assert r["gpqa"]["n"] == 3 and r["gpqa"]["samples"] == 6 and r["kl"] is None and r["verdict"] == "pass"
    assert "right0" not in (rep / "gpqa-answers.jsonl").read_text() + (rep / "report.md").read_text()


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    ep = Endpoint("http://127.0.0.1:9/v1", "m", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(StepquantError, match=r"endpoint http://127.0.0.1:9/v1/chat/completions: no answer from model 'm'"):
        answerer(ep)(["q"])


def test_a_torn_last_cache_line_is_ignored_and_others_are_errors(tmp_path):
    ep = Endpoint("http://127.0.0.1:9/v1", "m", retries=0)
    cache = tmp_path / "c.jsonl"
    cache.write_text(json.dumps({"key": ep.key("q"), "response": "Answer: A"}) + '\n{"key": "ab')
    assert answerer(ep, cache)(["q"]) == ["Answer: A"]  # from the cache, the server is never asked
    cache.write_text('{"key": "ab\n' + json.dumps({"key": ep.key("q"), "response": "x"}) + "\n")
    with pytest.raises(StepquantError, match="line 1 is not an answer record"):
        answerer(ep, cache)
