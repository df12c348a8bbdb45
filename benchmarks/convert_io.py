"""Where `stepquant bench convert`'s GPU run spends its time: the host's page-cache read, sha256 and
write(+fdatasync) rates, then the GPU conversion of the same generated checkpoint timed again in one
process, with syncing or hashing switched off (monkeypatched), to see which host work bounds it
(BENCHMARKS.md, ninth session).

Run: python benchmarks/convert_io.py [--workdir /tmp/bc] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stepquant import shards
from stepquant.bench import bench_convert, convert_options
from stepquant.convert import convert


def _read_range(job: tuple[Path, int, int]) -> int:
    path, off, length = job
    fd = os.open(path, os.O_RDONLY)
    view = memoryview(bytearray(min(length, 64 << 20)))
    done = 0
    while done < length:
        done += os.preadv(fd, [view[: min(len(view), length - done)]], off + done)
    os.close(fd)
    return done


def _no_sync(fd: int) -> None:
    pass


def host_rates(src: list[Path]) -> dict[str, float]:
    """GB/s of page-cache reads (1-16 threads), sha256 (one stream, four) and writes (with and without syncing)."""
    res: dict[str, float] = {}
    jobs = [(p, o, min(256 << 20, p.stat().st_size - o)) for p in src for o in range(0, p.stat().st_size, 256 << 20)]
    for threads in (1, 4, 8, 16):
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            n = sum(ex.map(_read_range, jobs))
        res[f"read_{threads}_threads"] = n / (time.perf_counter() - t) / 1e9
    data = os.urandom(1 << 30)
    t = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    res["sha256_one_stream"] = len(data) / (time.perf_counter() - t) / 1e9
    with ThreadPoolExecutor(4) as ex:
        t = time.perf_counter()
        list(ex.map(lambda _: hashlib.sha256(data).hexdigest(), range(4)))
        res["sha256_four_streams"] = 4 * len(data) / (time.perf_counter() - t) / 1e9
    for sync in (False, True):
        t = time.perf_counter()
        with open("/tmp/stepquant-write-test", "wb") as f:
            for _ in range(4):
                f.write(data)
                if sync:
                    f.flush()
                    os.fdatasync(f.fileno())
        res[f"write_{'synced' if sync else 'unsynced'}"] = 4 * len(data) / (time.perf_counter() - t) / 1e9
        os.unlink("/tmp/stepquant-write-test")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/bc")
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.workdir)
    res: dict = {"bench_convert": bench_convert(work, layers=1, devices=("cuda",))["runs"]["cuda"]}
    src = sorted((work / "src").glob("*.safetensors"))
    res |= host_rates(src)
    nbytes = sum(p.stat().st_size for p in src)
    opts = convert_options("cuda")
    real_sync, real_fsync, real_writer = os.fdatasync, os.fsync, shards._Writer.__init__

    def no_hash(self, f, digest):
        real_writer(self, f, digest)
        self.drains[1].join()
        self.drains = self.drains[:1]

    for label, sync, hashing in (("again", True, True), ("no_sync", False, True), ("no_hash", True, False),
                                 ("no_hash_no_sync", False, False)):  # fmt: skip
        os.fdatasync, os.fsync = (real_sync, real_fsync) if sync else (_no_sync, _no_sync)
        shards._Writer.__init__ = real_writer if hashing else no_hash
        os.sync()
        t = time.perf_counter()
        convert(work / "src", work / "out-io", opts)
        res[label] = time.perf_counter() - t
    os.fdatasync, os.fsync, shards._Writer.__init__ = real_sync, real_fsync, real_writer
    print(f"source {nbytes / 1e9:.2f} GB")
    for k, v in res.items():
        print(f"{k}: {v}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "convert_io.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
