"""Faults injected into `stepquant convert`: SIGKILL at random points, disk full, a read-only
destination, a source shard that disappears, two runs on one DST. After each: the source is
untouched, no DST exists unless it is complete, and `--resume` gives a byte-identical result."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepquant.convert import ConvertOptions, convert
from stepquant.convert import output_digest as digest
from stepquant.errors import StepquantError

from ..conftest import run_cli
from .record import record

TRIALS = 10  # per model: 20 random SIGKILLs in all
NVFP4 = ("--recipe", "step3p7-nvfp4-moe-only-kvfp8", "--calib-samples", "4", "--calib-seq-len", "32", "--max-shard-size", "1MB")
RENAME = ("--naming", "modelopt", "--max-shard-size", "600KB")


@pytest.fixture(scope="module")
def sources(demo_ckpt, tmp_path_factory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Two sources and their conversions: the demo to NVFP4 (calibration, 4 output shards), and a
    4-shard BF16 model renamed (streamed copies, 5 output shards)."""
    root = tmp_path_factory.mktemp("faults")
    multi = convert(demo_ckpt, root / "multishard", ConvertOptions(max_shard_size="1MB"))
    return {"demo nvfp4": (demo_ckpt, NVFP4), "multi-shard rename": (multi, RENAME)}


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for name, (src, args) in sources.items():
        dst = root / name.replace(" ", "-")
        run_cli("convert", src, dst, *args, check=True)
        out[name] = digest(dst)
        assert sum(n.endswith(".safetensors") for n in out[name]) >= 4
    return out


def _spawn(src: Path, dst: Path, args: tuple[str, ...], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stepquant", "convert", str(src), str(dst), *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None or time.time() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


def _after_fault(name: str, src: Path, src_digest: dict, dst: Path, args, reference: dict) -> str:
    """The invariants after a fault, then a resume; returns how the run had ended."""
    assert digest(src) == src_digest, "the source changed"
    partial = dst.with_name(dst.name + ".partial")
    if dst.exists():  # finished before the fault hit: it must be complete
        assert digest(dst) == reference and not partial.exists()
        return "finished first"
    proc = run_cli("convert", src, dst, *args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert digest(dst) == reference and not partial.exists(), f"{name}: resumed result differs"
    assert digest(src) == src_digest
    return "resumed"


@pytest.mark.parametrize("model", ["demo nvfp4", "multi-shard rename"])
def test_random_sigkill_then_resume_is_byte_identical(model, sources, references, tmp_path):
    """TRIALS kills that land while the run is under way (calibrating, quantizing or writing), each
    followed by --resume; a kill that came too late to interrupt anything is tried again elsewhere."""
    src, args = sources[model]
    reference = references[model]
    src_digest = digest(src)
    rng = random.Random(f"sigkill {model}")
    # a probe run: how long the work takes once DST.partial (taken before calibration) exists
    probe = tmp_path / "probe"
    proc = _spawn(src, probe, args)
    assert _wait_for(probe.with_name("probe.partial"), proc)
    t0 = time.time()
    proc.communicate(timeout=300)
    busy = time.time() - t0
    written = sum((probe / n).stat().st_size for n in reference if n.endswith(".safetensors"))
    interrupted, late = 0, 0
    while interrupted < TRIALS:
        assert late < 4 * TRIALS, "kills keep landing after the run finished"
        dst = tmp_path / f"t{interrupted}-{late}"
        if interrupted % 2 == 0 or model == "multi-shard rename":  # by bytes: in the shard writer, at any byte
            # (a rename only writes: after DST.partial exists it is done in a blink, so only bytes aim well)
            proc = _spawn(src, dst, args, env={"STEPQUANT_FAULT_KILL_AFTER_BYTES": str(rng.randrange(1, written))})
            assert _wait_for(dst.with_name(dst.name + ".partial"), proc) or proc.poll() is not None
        else:  # by time: anywhere after DST.partial exists, calibration included
            proc = _spawn(src, dst, args)
            assert _wait_for(dst.with_name(dst.name + ".partial"), proc)
            time.sleep(rng.uniform(0, 0.8 * busy))
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL)
        outcome = _after_fault(model, src, src_digest, dst, args, reference)
        interrupted += outcome == "resumed"
        late += outcome == "finished first"
    record("fault", f"SIGKILL at random points, {model}", trials=TRIALS, survived=TRIALS,
           resumed_byte_identical=interrupted, kills_after_the_end_retried=late)  # fmt: skip


def test_sigkill_at_random_layers_then_resume(sources, references, tmp_path):
    """Killed right after the calibration state of a random decoder layer is saved; --resume picks the
    calibration up after that layer and gives the byte-identical checkpoint."""
    src, args = sources["demo nvfp4"]
    layers = json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    rng = random.Random("sigkill at a layer")
    for trial, layer in enumerate(rng.sample(range(layers - 1), 2)):
        dst = tmp_path / f"layer{trial}"
        proc = _spawn(src, dst, args, env={"STEPQUANT_FAULT_KILL_AFTER_LAYER": str(layer)})
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        work = dst.with_name(dst.name + ".partial") / ".stepquant-work" / "calibration"
        assert sorted(p.name for p in work.iterdir()) == [f"L{layer}.hidden", f"L{layer}.json"]
        assert _after_fault("demo nvfp4", src, digest(src), dst, args, references["demo nvfp4"]) == "resumed"
    record("fault", "SIGKILL after a random layer's calibration, demo nvfp4", trials=2, survived=2)


def test_disk_full_then_resume(sources, references, tmp_path):
    src, args = sources["multi-shard rename"]
    src_digest = digest(src)
    dst = tmp_path / "dst"
    limit = 300_000  # RLIMIT_FSIZE: a file past 300 kB (shards are ~600 kB) fails with EFBIG, as on a full disk

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _spawn(src, dst, args, preexec_fn=small_files)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err.decode(), err.decode()
    assert not dst.exists()
    assert _after_fault("disk full", src, src_digest, dst, args, references["multi-shard rename"]) == "resumed"
    record("fault", "disk full (RLIMIT_FSIZE)", trials=1, survived=1)


def test_read_only_destination(sources, tmp_path, monkeypatch):
    src, _ = sources["multi-shard rename"]
    src_digest = digest(src)
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *a, **kw):  # what a read-only mount answers (root ignores chmod, so inject it)
        if Path(self).parent == parent:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises((StepquantError, OSError)) as err:
        convert(src, parent / "dst", ConvertOptions(naming="modelopt"))
    assert "Read-only" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.undo()
    assert list(parent.iterdir()) == [] and digest(src) == src_digest
    if os.geteuid() != 0:  # and a real one, where permissions apply
        parent.chmod(0o555)
        try:
            proc = run_cli("convert", src, parent / "dst", "--naming", "modelopt")
            assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
        finally:
            parent.chmod(0o755)
    record("fault", "read-only destination", trials=1, survived=1)


def test_source_shard_disappears_mid_run(sources, tmp_path):
    src0, args = sources["multi-shard rename"]
    src = shutil.copytree(src0, tmp_path / "src")  # a copy, as a shard of it is deleted
    src_digest = digest(src)
    run_cli("convert", src, tmp_path / "ref", *args, check=True)
    reference = digest(tmp_path / "ref")
    victim = sorted(src.glob("model-*.safetensors"))[2]
    keep, stat = victim.read_bytes(), victim.stat()
    outcomes = []
    for trial, delay in enumerate((0.0, 0.05, 0.2)):
        dst = tmp_path / f"dst{trial}"
        proc = _spawn(src, dst, args)
        assert _wait_for(dst.with_name(dst.name + ".partial"), proc) or dst.exists()
        time.sleep(delay)
        victim.unlink()
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:  # refused: one line naming the shard, nothing that looks like a result
            lines = err.decode().strip().splitlines()
            assert len(lines) == 1 and victim.name in lines[0], err.decode()
            assert not dst.exists()
        victim.write_bytes(keep)  # put back as it was (a resume refuses a source whose files changed)
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        outcomes.append(_after_fault("disappearing shard", src, src_digest, dst, args, reference))
    record("fault", "a source shard disappears mid-run", trials=3, survived=3, outcomes=outcomes)


def test_two_runs_on_one_dst(sources, references, tmp_path):
    src, args = sources["demo nvfp4"]
    dst = tmp_path / "dst"
    first = _spawn(src, dst, args)
    assert _wait_for(dst.with_name("dst.partial"), first)  # the lock is taken before calibration
    with pytest.raises(StepquantError, match="another stepquant run"):
        convert(src, dst, ConvertOptions(recipe=NVFP4[1], calib_samples=4, calib_seq_len=32, max_shard_size="1MB", resume=True))
    first.communicate(timeout=300)
    assert first.returncode == 0 and digest(dst) == references["demo nvfp4"]
    record("fault", "two runs on one DST", trials=1, survived=1)
