"""The I/O floor of a merge: read every tensor of every input once and write an output of the same size once.

No merge can be faster than this on the same files and machine (it does the merge's disk and memory
traffic and no arithmetic), so merge timings are stated against it. Import it as `benchmarks.io_floor`
(from the repository root) or run it:

    python -m benchmarks.io_floor MODEL_DIR [MODEL_DIR ...] --out /tmp/io-floor-out [--threads 2]

Reading goes through `evomerge.io.ModelDir.get` and writing through `ShardedWriter`, the same code a
merge uses; reads of one tensor name across the inputs run on `threads` threads, as the engine's do.
The page cache is not dropped: run it right after (or before) the merge it is compared with, so both
see the same cache state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from evomerge.io import ModelDir, ShardedWriter, atomic_output_dir
from evomerge.io.writer import DEFAULT_MAX_SHARD_BYTES


def io_floor(
    input_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    threads: int = 2,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    reader: Literal["pread", "mmap"] = "pread",
) -> float:
    """Seconds to read all of `input_dirs` once and write a model of the first input's size to `out_dir`.

    Every byte is really read: the first input's tensors are written (the write reads them), the
    others are copied into a reused per-thread buffer (reading without allocating). `out_dir` is
    replaced if it exists. Opening the dirs (parsing headers) is timed too, as in a merge.
    `reader="pread"` reads each tensor with large sequential `ModelDir.read_range` calls (what the
    streaming TIES path does); "mmap" maps it with `ModelDir.get` (the torch kernels' path), which is
    as fast from the page cache but several times slower from disk (page faults read little at a time).
    """
    start = time.perf_counter()
    models = [ModelDir(path) for path in input_dirs]
    staging = threading.local()
    read = _read_through if reader == "mmap" else _pread_through
    try:
        with atomic_output_dir(out_dir, force=True) as temporary, ThreadPoolExecutor(threads) as pool:
            writer = ShardedWriter(temporary, max_shard_bytes=max_shard_bytes)
            for name in models[0].tensor_names():
                for model in models:
                    model.prefetch(name)
                reads = pool.map(lambda model, name=name: read(model, name, staging), models[1:])
                writer.add(
                    name, models[0].get(name) if reader == "mmap" else _pread_whole(models[0], name, staging)
                )
                list(reads)
            writer.finish()
    finally:
        for model in models:
            model.close()
    return time.perf_counter() - start


_BLOCK_BYTES = 8 << 20


def _pread_through(model: ModelDir, name: str, staging: threading.local) -> None:
    """Read every byte of one tensor, block by block, into this thread's reused buffer."""
    buffer = getattr(staging, "block", None)
    if buffer is None:
        buffer = staging.block = np.empty(_BLOCK_BYTES, dtype=np.uint8)
    info = model.info(name)
    entries = _BLOCK_BYTES // info.dtype.itemsize
    view = buffer.view(_NUMPY_BY_SIZE[info.dtype.itemsize])
    for start in range(0, info.numel, entries):
        model.read_range(name, start, view[: min(entries, info.numel - start)])


def _pread_whole(model: ModelDir, name: str, staging: threading.local) -> torch.Tensor:
    """The tensor read with one `read_range` into a buffer reused across tensors (the write then reads
    it): fresh pages for every tensor would time page faults, not I/O."""
    info = model.info(name)
    buffer = getattr(staging, "whole", None)
    if buffer is None or buffer.size < info.nbytes:
        buffer = staging.whole = np.empty(info.nbytes, dtype=np.uint8)
    data = buffer[: info.nbytes].view(_NUMPY_BY_SIZE[info.dtype.itemsize])
    model.read_range(name, 0, data)
    return torch.from_numpy(data).view(info.dtype).reshape(info.shape)


_NUMPY_BY_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _read_through(model: ModelDir, name: str, staging: threading.local) -> None:
    """Read every byte of one tensor into this thread's reused buffer."""
    data = model.get(name).reshape(-1).view(torch.uint8)  # (nbytes,)
    buffer = getattr(staging, "buffer", None)
    if buffer is None or buffer.numel() < data.numel():
        buffer = staging.buffer = torch.empty(data.numel(), dtype=torch.uint8)
    buffer[: data.numel()].copy_(data)


def _bytes_of(model_dir: Path) -> int:
    with ModelDir(model_dir) as model:
        return sum(model.info(name).nbytes for name in model.tensor_names())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="model dirs to read")
    parser.add_argument("--out", type=Path, required=True, help="scratch output dir (replaced, then deleted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reader", choices=["pread", "mmap"], default="pread")
    parser.add_argument("--repeat", type=int, default=1, help="runs; each is printed")
    parser.add_argument("--keep", action="store_true", help="keep the output dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    read = sum(_bytes_of(path) for path in args.inputs)
    written = _bytes_of(args.inputs[0])
    for run in range(args.repeat):
        seconds = io_floor(args.inputs, args.out, threads=args.threads, reader=args.reader)
        rate = (read + written) / seconds / 1e9
        print(
            f"run {run}: {seconds:.3f} s  read {read / 1e9:.3f} GB  wrote {written / 1e9:.3f} GB  ({rate:.2f} GB/s)"
        )
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
