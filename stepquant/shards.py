"""Writing checkpoints: size-capped safetensors shards, the index, atomic output and resume.

All work goes into `DST.partial/`, which becomes `DST` by one rename when everything is written. A
journal there records each finished shard (bytes, sha256), so `--resume` after a kill skips them and
writes the rest; since shard planning and tensor order are deterministic the result is byte-identical.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import StepquantError
from .stfile import DTYPES, build_header

INDEX_NAME = "model.safetensors.index.json"
JOURNAL = ".stepquant-journal.json"
LOCK = ".stepquant.lock"
SCRATCH = ".stepquant-work"  # in DST.partial: state a resumed run picks up (calibration), removed on commit
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its header fields and a function yielding its bytes in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[bytes | bytearray | memoryview]]


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes (decimal units, as the Hub uses)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise StepquantError(f"bad size {value!r}: use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def natural_key(name: str) -> list:
    """Sort key that orders layer 2 before layer 10, so each layer's tensors sit together."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy packing in natural name order; a tensor larger than the cap gets a shard of its own."""
    shards: list[list[OutTensor]] = []
    size = 0
    for t in sorted(tensors, key=lambda t: natural_key(t.name)):
        if shards and shards[-1] and size + t.nbytes <= max_shard_size:
            shards[-1].append(t)
            size += t.nbytes
        else:
            shards.append([t])
            size = t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _FaultHook:
    """Test hook: SIGKILL ourselves after writing STEPQUANT_FAULT_KILL_AFTER_BYTES bytes of shards."""

    def __init__(self) -> None:
        raw = os.environ.get("STEPQUANT_FAULT_KILL_AFTER_BYTES")
        self.limit = int(raw) if raw else None
        self.written = 0

    def wrote(self, n: int) -> None:
        self.written += n
        if self.limit is not None and self.written >= self.limit:
            os.kill(os.getpid(), signal.SIGKILL)


class _Drain:
    """A thread applying `fn` to queued chunks in order; at most QUEUE_BYTES wait, so memory stays
    bounded. Its error is raised to the producer at the next `put` or at `join`."""

    QUEUE_BYTES = 512 << 20

    def __init__(self, fn: Callable, name: str) -> None:
        self.fn = fn
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.queued = 0
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                chunk = self.queue.popleft()
            try:
                self.fn(chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                with self.cond:
                    self.error, self.closed = exc, True
                    self.queue.clear()
                    self.cond.notify_all()
                return
            with self.cond:
                self.queued -= len(chunk)
                self.cond.notify_all()

    def put(self, chunk) -> None:
        with self.cond:
            while self.queued > self.QUEUE_BYTES and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            self.queue.append(chunk)
            self.queued += len(chunk)
            self.cond.notify_all()

    def join(self, drop: bool = False) -> None:
        """Wait until every chunk is done (or, with `drop`, throw away what still waits)."""
        with self.cond:
            if drop:
                self.queue.clear()
            self.closed = True
            self.cond.notify_all()
        self.thread.join()
        if self.error is not None and not drop:
            raise self.error


class _Writer:
    """Writes a shard's chunks in one background thread and hashes them in another while the caller
    produces the next ones (file writes and sha256 release the GIL): reading, quantizing, writing and
    hashing overlap."""

    def __init__(self, f) -> None:
        self.digest = hashlib.sha256()
        self.drains = [_Drain(f.write, "stepquant-write"), _Drain(self.digest.update, "stepquant-hash")]

    def put(self, chunk) -> None:
        for d in self.drains:
            d.put(chunk)

    def finish(self) -> str:
        """Wait for every chunk to be written and hashed; the sha256 of all of them."""
        for d in self.drains:
            d.join()
        return self.digest.hexdigest()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        for d in self.drains:  # stop both before the file closes; on the producer's error drop the rest
            if d.thread.is_alive():
                d.join(drop=exc_type is not None)


class OutputDir:
    """DST.partial/ with its lock and journal; `commit()` turns it into DST.

    Use as a context manager. On an exception the partial folder stays (it is resumable and never
    mistaken for a result); the lock is released.
    """

    def __init__(self, dst: str | Path, fingerprint: str, resume: bool = False, overwrite: bool = False):
        self.dst = Path(dst).absolute()
        self.partial = self.dst.with_name(self.dst.name + ".partial")
        self.fingerprint = fingerprint
        self.resume = resume
        self.overwrite = overwrite
        self.files: dict[str, dict] = {}
        self._lock_fd: int | None = None

    # -- setup -------------------------------------------------------------------------------------
    def __enter__(self) -> OutputDir:
        if self.dst.exists() and not self.overwrite:
            raise StepquantError(f"{self.dst}: already exists (pass --overwrite to replace it)")
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StepquantError(f"{self.dst.parent}: cannot create ({exc.strerror})") from None
        journal = None
        self._created = not self.partial.exists()
        if self.partial.exists():
            if not self.resume and not self.overwrite:
                raise StepquantError(
                    f"{self.partial}: left by an interrupted run; pass --resume to continue it"
                    " or --overwrite to start over"
                )
            self._lock()
            journal = self._read_journal() if self.resume else None
            if journal is None or journal.get("fingerprint") != self.fingerprint:
                if self.resume and journal is not None:
                    self._unlock()
                    raise StepquantError(
                        f"{self.partial}: was started with other inputs or options; pass --overwrite"
                        " to start over"
                    )
                self._clear_partial()
                journal = None
        else:
            try:
                self.partial.mkdir()
            except OSError as exc:
                raise StepquantError(f"{self.partial}: cannot create ({exc.strerror})") from None
            self._lock()
        self.files = dict(journal["files"]) if journal else {}
        self._write_journal()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._created and not self.files and not any((self.partial / SCRATCH).glob("*/*")):
            shutil.rmtree(self.partial, ignore_errors=True)  # failed before writing anything: nothing to resume
        self._unlock()

    def _lock(self) -> None:
        fd = os.open(self.partial / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StepquantError(f"{self.partial}: another stepquant run is writing it") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clear_partial(self) -> None:
        for p in self.partial.iterdir():
            if p.name == LOCK:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def _read_journal(self) -> dict | None:
        try:
            data = json.loads((self.partial / JOURNAL).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None

    def _write_journal(self) -> None:
        body = {"fingerprint": self.fingerprint, "files": self.files}
        _fsync_write(self.partial / JOURNAL, json.dumps(body, indent=1, sort_keys=True).encode())

    def _done(self, name: str) -> bool:
        rec = self.files.get(name)
        path = self.partial / name
        return rec is not None and path.is_file() and path.stat().st_size == rec["bytes"]

    # -- writing -----------------------------------------------------------------------------------
    def write_shards(
        self, tensors: list[OutTensor], max_shard_size: int, desc: str = "writing"
    ) -> dict[str, str]:
        """Write all tensors as shards (+ index when more than one); returns tensor -> shard name."""
        shards = plan_shards(tensors, max_shard_size)
        names = shard_names(len(shards))
        total = sum(t.nbytes for t in tensors)
        hook = _FaultHook()
        weight_map: dict[str, str] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
            for name, shard in zip(names, shards):
                weight_map.update({t.name: name for t in shard})
                if self._done(name):
                    bar.update(sum(t.nbytes for t in shard))
                    continue
                self.files[name] = self._write_shard(name, shard, bar, hook)
                self._write_journal()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            self.write_file(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        return weight_map

    def _write_shard(self, name: str, shard: list[OutTensor], bar: tqdm, hook: _FaultHook) -> dict:
        # descending element size keeps every tensor aligned to its own element size
        order = sorted(shard, key=lambda t: (-DTYPES[t.dtype][1], natural_key(t.name)))
        header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in order], {"format": "pt"})
        tmp = self.partial / (name + ".tmp")
        with open(tmp, "wb") as f, _Writer(f) as writer:
            writer.put(header)
            for t in order:
                written = 0
                for chunk in t.chunks():
                    writer.put(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                    hook.wrote(len(chunk))
                if written != t.nbytes:
                    raise StepquantError(f"tensor '{t.name}': produced {written} bytes, expected {t.nbytes}")
            digest = writer.finish()
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, self.partial / name)
        return {"bytes": size, "sha256": digest}

    def write_file(self, name: str, data: bytes) -> None:
        _fsync_write(self.partial / name, data)

    def copy_file(self, src: Path, name: str) -> None:
        tmp = self.partial / (name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, self.partial / name)

    def scratch(self, name: str) -> Path:
        """A folder in DST.partial for work state that a resumed run reads (not part of the result)."""
        path = self.partial / SCRATCH / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self) -> Path:
        """Drop the journal, lock and work state, then rename DST.partial to DST (replacing DST with --overwrite)."""
        shutil.rmtree(self.partial / SCRATCH, ignore_errors=True)
        (self.partial / JOURNAL).unlink(missing_ok=True)
        (self.partial / LOCK).unlink(missing_ok=True)
        old = None
        if self.dst.exists():
            old = self.dst.with_name(f"{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
        os.replace(self.partial, self.dst)
        dir_fd = os.open(self.dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if old is not None:
            shutil.rmtree(old)
        return self.dst
