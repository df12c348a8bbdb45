from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPQUANT_SHARED", ROOT.parent / "shared"))
REF = SHARED / "reference" / "modelopt-0.47" / "qwen3moe"


@pytest.fixture(scope="session")
def ref() -> Path:
    """The ModelOpt 0.47 reference exports (../shared beside the repo, or $STEPQUANT_SHARED)."""
    if not REF.is_dir():
        pytest.fail(f"reference outputs not found at {REF}; clone the repo beside shared/ or set STEPQUANT_SHARED")
    return REF


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory) -> Path:
    """The demo Step-3.7 checkpoint, built once per session."""
    from stepquant.demo import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "bf16")


def write_raw(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors-like file with a hand-made (possibly broken) header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `stepquant` command in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "stepquant", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stepquant {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc
