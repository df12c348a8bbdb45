"""Calibration across processes, one per GPU (`convert --gpus N`, or under `torchrun`).

Every rank reads the same plan and calibration batches and calibrates its share of the batches
(`batches[rank::world]`); the statistics are then reduced over torch.distributed — max of every amax,
sum of every count — which is exact, so the result is byte-identical to a one-process run (a batch
gives the same statistics on whichever GPU of one kind it runs). Rank 0 quantizes and writes.
NCCL for CUDA, gloo for CPU processes (which is how CI tests it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from .calibrate import AMAX_FIELDS, COUNT_FIELDS, CalibStats
from .errors import StepquantError

ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int

    def device(self, kind: str) -> str:
        return f"cuda:{self.local}" if kind == "cuda" else kind


def current() -> Rank | None:
    """This process's rank when it is one of several (torchrun's or `launch`'s environment), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return Rank(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def init(rank: Rank, kind: str) -> None:
    """Join the process group (once): NCCL on `cuda`, gloo on the CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if kind == "cuda":
        if rank.local >= torch.cuda.device_count():
            raise StepquantError(f"rank {rank.rank}: no CUDA device {rank.local} ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(rank.local)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank.rank, world_size=rank.world,
                            timeout=timedelta(hours=2))  # fmt: skip


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def share(batches: list, rank: Rank | None) -> list:
    """This rank's calibration batches."""
    return batches if rank is None else batches[rank.rank :: rank.world]


def reduce_stats(stats: CalibStats, kind: str) -> CalibStats:
    """Every rank's statistics combined: max of the amax values, sum of the counts (exact)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    shapes = {f: {k: (tuple(v.shape), v.dtype) for k, v in getattr(stats, f).items()} for f in AMAX_FIELDS + COUNT_FIELDS}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, shapes)
    union = {f: dict(sorted({k: s for other in every for k, s in other[f].items()}.items())) for f in shapes}

    def flat(fields: tuple[str, ...], dtype: torch.dtype) -> torch.Tensor:
        parts = [getattr(stats, f).get(k, torch.zeros(s, dtype=d)).to(device, dtype).reshape(-1)
                 for f in fields for k, (s, d) in union[f].items()]  # fmt: skip
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)

    amax = flat(AMAX_FIELDS, torch.float32)
    counts = torch.cat([flat(COUNT_FIELDS, torch.int64), torch.tensor([stats.batches, stats.tokens], device=device)])
    dist.all_reduce(amax, dist.ReduceOp.MAX)
    dist.all_reduce(counts, dist.ReduceOp.SUM)
    out = CalibStats()
    for fields, values in ((AMAX_FIELDS, amax.cpu()), (COUNT_FIELDS, counts.cpu())):
        at = 0
        for f in fields:
            store = getattr(out, f)
            for k, (s, d) in union[f].items():
                n = int(torch.Size(s).numel())
                store[k] = values[at : at + n].reshape(s).to(d)
                at += n
    out.batches, out.tokens = (int(x) for x in counts[-2:].tolist())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, env: dict[str, str], target: Callable, args: tuple) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    logging.getLogger("stepquant").setLevel(logging.ERROR)  # rank 0 says it once
    code = 0
    try:
        target(*args)
    except StepquantError as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except BaseException:  # noqa: BLE001 - reported, and the exit code tells rank 0
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter shutdown: the communication library's destructors could abort a finished worker
        os._exit(code)


def launch(n: int, target: Callable, *args: object) -> object:
    """`target(*args)` in `n` processes: this one as rank 0 and n - 1 spawned workers; rank 0's result."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n)}
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(r, env, target, args), daemon=True) for r in range(1, n)]
    saved = {k: os.environ.get(k) for k in ENV}
    for w in workers:
        w.start()
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    try:
        result = target(*args)
        for r, w in enumerate(workers, 1):
            w.join()
            if w.exitcode:
                raise StepquantError(f"calibration rank {r} failed (exit code {w.exitcode})")
        return result
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
