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

import torch

from evomerge.io import ModelDir, ShardedWriter, atomic_output_dir
from evomerge.io.writer import DEFAULT_MAX_SHARD_BYTES


def io_floor(
    input_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    threads: int = 2,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> float:
    """Seconds to read all of `input_dirs` once and write a model of the first input's size to `out_dir`.

    Every byte is really read: the first input's tensors are written (the write reads them), the
    others are copied into a reused per-thread buffer (reading without allocating). `out_dir` is
    replaced if it exists. Opening the dirs (parsing headers) is timed too, as in a merge.
    """
    start = time.perf_counter()
    models = [ModelDir(path) for path in input_dirs]
    staging = threading.local()
    try:
        with atomic_output_dir(out_dir, force=True) as temporary, ThreadPoolExecutor(threads) as pool:
            writer = ShardedWriter(temporary, max_shard_bytes=max_shard_bytes)
            for name in models[0].tensor_names():
                reads = pool.map(lambda model, name=name: _read_through(model, name, staging), models[1:])
                writer.add(name, models[0].get(name))
                list(reads)
            writer.finish()
    finally:
        for model in models:
            model.close()
    return time.perf_counter() - start


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
    parser.add_argument("--repeat", type=int, default=1, help="runs; each is printed")
    parser.add_argument("--keep", action="store_true", help="keep the output dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    read = sum(_bytes_of(path) for path in args.inputs)
    written = _bytes_of(args.inputs[0])
    for run in range(args.repeat):
        seconds = io_floor(args.inputs, args.out, threads=args.threads)
        rate = (read + written) / seconds / 1e9
        print(
            f"run {run}: {seconds:.3f} s  read {read / 1e9:.3f} GB  wrote {written / 1e9:.3f} GB  ({rate:.2f} GB/s)"
        )
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
