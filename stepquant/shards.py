"""Writing checkpoints: size-capped safetensors shards, the index, atomic output and resume.

All work goes into `DST.partial/`, which becomes `DST` by one rename when everything is written. A
journal there records each finished shard (bytes, sha256), so `--resume` after a kill skips them and
writes the rest; since shard planning and tensor order are deterministic the result is byte-identical.

Tensors marked `late` (scalar scales that follow from what quantizing the others measured, or from the
calibration) go after all others in their shard where that keeps them aligned: a shard is written and
hashed in one pass up to them, and `ShardWriter` can write every shard that far while the calibration
runs, then finish them when it is done.
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
    late: bool = False  # a small scale made from what the others measured or from calibration: written last


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
    """Writes chunks to a file in one background thread and adds them to a running sha256 in another
    while the caller produces the next ones (file writes and sha256 release the GIL): reading,
    quantizing, writing and hashing overlap."""

    SYNC_BYTES = 256 << 20  # synced as it grows, so the disk works meanwhile and the last fsync is short

    def __init__(self, f, digest) -> None:
        self.f, self.unsynced = f, 0
        self.drains = [_Drain(self._write, "stepquant-write"), _Drain(digest.update, "stepquant-hash")]

    def _write(self, chunk) -> None:
        self.f.write(chunk)
        self.unsynced += len(chunk)
        if self.unsynced >= self.SYNC_BYTES:
            self.f.flush()
            os.fdatasync(self.f.fileno())
            self.unsynced = 0

    def put(self, chunk) -> None:
        for d in self.drains:
            d.put(chunk)

    def finish(self) -> None:
        """Wait for every chunk to be written and hashed."""
        for d in self.drains:
            d.join()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        for d in self.drains:  # stop both before the file closes; on the producer's error drop the rest
            if d.thread.is_alive():
                d.join(drop=exc_type is not None)


def shard_layout(shard: list[OutTensor]) -> list[OutTensor]:
    """A shard's tensors in file order: descending element size, which keeps every tensor aligned to
    its own, then natural names; the late ones after all others where they stay aligned there (else in
    their place, and the shard is written whole once they can be made)."""
    key = lambda t: (-DTYPES[t.dtype][1], natural_key(t.name))  # noqa: E731
    early = sorted((t for t in shard if not t.late), key=key)
    late = sorted((t for t in shard if t.late), key=key)
    if late and sum(t.nbytes for t in early) % DTYPES[late[0].dtype][1]:
        return sorted(shard, key=key)
    return early + late


class _Stopped(Exception):
    """The background writer was told to stop (the run failed elsewhere)."""


class _ShardFile:
    """One shard, as `NAME.tmp` in DST.partial until it is whole: `begin` writes it in file order up to
    its first late tensor, `end` the rest; then it is synced, renamed, and its record returned."""

    def __init__(self, folder: Path, name: str, tensors: list[OutTensor]) -> None:
        self.name = name
        self.order = shard_layout(tensors)
        self.split = next((i for i, t in enumerate(self.order) if t.late), len(self.order))
        self.tmp, self.path = folder / (name + ".tmp"), folder / name
        self.digest = hashlib.sha256()
        self.begun = False

    def begin(self, bar: tqdm, hook: _FaultHook, stop: threading.Event | None = None) -> None:
        header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in self.order], {"format": "pt"})
        with open(self.tmp, "wb") as f:
            self._write(f, header, self.order[: self.split], bar, hook, stop)
            f.flush()
            os.fsync(f.fileno())  # here, so that `end` only syncs the late bytes
        self.begun = True

    def end(self, bar: tqdm, hook: _FaultHook) -> dict:
        if not self.begun:
            self.begin(bar, hook)
        with open(self.tmp, "ab") as f:
            self._write(f, b"", self.order[self.split :], bar, hook)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(self.tmp, self.path)
        return {"bytes": size, "sha256": self.digest.hexdigest()}

    def _write(self, f, head: bytes, tensors: list[OutTensor], bar: tqdm, hook: _FaultHook,
               stop: threading.Event | None = None) -> None:  # fmt: skip
        with _Writer(f, self.digest) as writer:
            if head:
                writer.put(head)
            for t in tensors:
                written = 0
                for chunk in t.chunks():
                    if stop is not None and stop.is_set():
                        raise _Stopped
                    writer.put(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                    hook.wrote(len(chunk))
                if written != t.nbytes:
                    raise StepquantError(f"tensor '{t.name}': produced {written} bytes, expected {t.nbytes}")
            writer.finish()


class ShardWriter:
    """Writes tensors as the shards of an OutputDir (+ the index when more than one). `finish()` writes
    them one after the other; `start()` first writes every shard up to its late tensors in a background
    thread, so that work which the late ones wait for (the calibration) runs meanwhile, and `finish()`
    then does the rest. As a context manager it stops that thread when the caller fails."""

    def __init__(self, out: OutputDir, tensors: list[OutTensor], max_shard_size: int, desc: str = "writing") -> None:
        shards = plan_shards(tensors, max_shard_size)
        names = shard_names(len(shards))
        self.out = out
        self.total = sum(t.nbytes for t in tensors)
        self.weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        self.indexed = len(shards) > 1
        files = [_ShardFile(out.partial, n, s) for n, s in zip(names, shards)]
        self.todo = [f for f in files if not out._done(f.name)]
        self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=desc, disable=None)
        self.bar.update(self.total - sum(t.nbytes for f in self.todo for t in f.order))
        self.hook = _FaultHook()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> ShardWriter:
        def run() -> None:
            try:
                for f in self.todo:
                    f.begin(self.bar, self.hook, self.stop)
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - raised to the caller by finish()
                self.error = exc

        self.thread = threading.Thread(target=run, name="stepquant-shards", daemon=True)
        self.thread.start()
        return self

    def finish(self) -> dict[str, str]:
        """Write what is left of every shard, record each in the journal; tensor -> shard name."""
        self._join()
        for f in self.todo:
            self.out.files[f.name] = f.end(self.bar, self.hook)
            self.out._write_journal()
        if self.indexed:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            self.out.write_file(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        return self.weight_map

    def check(self) -> None:
        """Raise the background thread's error now if it has failed: a long calibration beside it stops
        at its next step instead of at its end."""
        if self.error is not None:
            raise self.error

    def _join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            self.check()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None and self.thread is not None:
            self.stop.set()
            self.thread.join()
        self.bar.close()


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
    def write_shards(self, tensors: list[OutTensor], max_shard_size: int, desc: str = "writing") -> dict[str, str]:
        """Write all tensors as shards (+ index when more than one), one shard after the other; returns
        tensor -> shard name."""
        with ShardWriter(self, tensors, max_shard_size, desc) as writer:
            return writer.finish()

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
