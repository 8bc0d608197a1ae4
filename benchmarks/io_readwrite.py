"""I/O benchmarks behind evomerge.io's design choices, on Llama-220M-shaped bf16 files (issue 3's model).

    nice python -m benchmarks.io_readwrite --work /tmp/evomerge-io-bench [--models 4]

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own:
- read, modeldir: `ModelDir.get` (default: a private mmap of the one tensor), then `.float()` as the engine does;
- read, pread:  `ModelDir(use_mmap=False).get` (os.preadv into a fresh buffer), then `.float()`;
- read, mmap:   safetensors `safe_open(...).get_tensor` (a view of one mmap of the whole file), then `.float()`;
- write, streaming: `ShardedWriter` (bytes to disk as tensors arrive);
- write, save_file: the whole state dict in memory, then `safetensors.torch.save_file`;
- floor: `benchmarks.io_floor.io_floor` (read all inputs once, write one output), 1 and 2 threads.
The input files are synthetic (random bf16 tensors with the model's names and shapes): I/O does not
depend on the values. The page cache is warm (the files were just written or read).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 1024, 2816, 12, 32000


def llama_shapes() -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the untied Llama-220M of issue 3 (hidden 1024, 12 layers, 16 heads, vocab 32000)."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{prefix}.self_attn.{proj}.weight", (HIDDEN, HIDDEN)
        yield f"{prefix}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)
        yield f"{prefix}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)
        yield f"{prefix}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)
        yield f"{prefix}.input_layernorm.weight", (HIDDEN,)
        yield f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def build_inputs(work: Path, count: int) -> list[Path]:
    """`count` synthetic model dirs (cached: an existing dir is reused)."""
    from evomerge.io import ShardedWriter, atomic_output_dir

    dirs = [work / f"model{index}" for index in range(count)]
    for index, model_dir in enumerate(dirs):
        if model_dir.exists():
            continue
        generator = torch.Generator().manual_seed(index)
        with atomic_output_dir(model_dir) as temporary:
            writer = ShardedWriter(temporary)
            for name, shape in llama_shapes():
                writer.add(name, torch.randn(shape, generator=generator).to(torch.bfloat16))
            writer.finish()
    return dirs


# ---- the measured jobs (each runs in its own process) ---------------------------------------------------


def job_read_modeldir(dirs: list[Path]) -> None:
    from evomerge.io import ModelDir

    models = [ModelDir(path) for path in dirs]
    for name in models[0].tensor_names():
        for model in models:
            model.get(name).float()


def job_read_pread(dirs: list[Path]) -> None:
    from evomerge.io import ModelDir

    models = [ModelDir(path, use_mmap=False) for path in dirs]
    for name in models[0].tensor_names():
        for model in models:
            model.get(name).float()


def job_read_mmap(dirs: list[Path]) -> None:
    from safetensors import safe_open

    handles = [safe_open(path / "model.safetensors", framework="pt") for path in dirs]
    for name in handles[0].keys():  # noqa: SIM118 (safe_open is not a mapping)
        for handle in handles:
            handle.get_tensor(name).float()


def job_write_streaming(dirs: list[Path]) -> None:
    from evomerge.io import ModelDir, ShardedWriter

    out = dirs[0].parent / "out-streaming"
    with ModelDir(dirs[0]) as model, ShardedWriter(out) as writer:
        for name in model.tensor_names():
            writer.add(name, model.get(name))


def job_write_save_file(dirs: list[Path]) -> None:
    from safetensors.torch import save_file

    from evomerge.io import ModelDir

    out = dirs[0].parent / "out-save-file"
    out.mkdir(exist_ok=True)
    with ModelDir(dirs[0]) as model:
        state = {name: model.get(name) for name in model.tensor_names()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def job_floor_1(dirs: list[Path]) -> None:
    from benchmarks.io_floor import io_floor

    io_floor(dirs, dirs[0].parent / "out-floor", threads=1)


def job_floor_2(dirs: list[Path]) -> None:
    from benchmarks.io_floor import io_floor

    io_floor(dirs, dirs[0].parent / "out-floor", threads=2)


JOBS = {name[4:]: function for name, function in globals().items() if name.startswith("job_")}


def run_job(name: str, dirs: list[Path]) -> dict[str, float]:
    """Run one job in a fresh interpreter; return its wall seconds, CPU seconds and peak RSS in MB."""
    command = [sys.executable, "-m", "benchmarks.io_readwrite", "--job", name, *map(str, dirs)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def _child(name: str, dirs: list[Path]) -> None:
    torch.set_num_threads(1)
    import evomerge.io  # noqa: F401  (import cost is not part of the job)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    JOBS[name](dirs)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    peak_mb = usage.ru_maxrss / 1024
    print(
        json.dumps(
            {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "peak_rss_mb": round(peak_mb, 1)}
        )
    )


def _baseline_rss() -> float:
    """Peak RSS of an interpreter that only imports torch and evomerge.io (subtract it to see the job's own)."""
    code = "import torch, resource, evomerge.io; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-io-bench"))
    parser.add_argument("--models", type=int, default=4, help="inputs (issue 3: 3 fine-tunes + base = 4)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("dirs", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        _child(args.job, args.dirs)
        return
    torch.set_num_threads(1)
    dirs = build_inputs(args.work, args.models)
    size_gb = sum((path / "model.safetensors").stat().st_size for path in dirs) / 1e9
    print(f"inputs: {len(dirs)} x {size_gb / len(dirs):.3f} GB; baseline RSS {_baseline_rss():.0f} MB")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in JOBS}
    for repeat in range(args.repeat):  # interleaved, so a burst of load from elsewhere hits every job
        for name in JOBS:
            runs[name].append(run_job(name, dirs))
            print(f"{name:16s} run {repeat}: {runs[name][-1]}", flush=True)
    print("\n| job | wall s, min | wall s, median | CPU s, min | peak RSS MB, max |\n|---|---|---|---|---|")
    for name, results in runs.items():
        seconds = sorted(result["seconds"] for result in results)
        cpu = min(result["cpu_seconds"] for result in results)
        peak = max(result["peak_rss_mb"] for result in results)
        print(f"| {name} | {seconds[0]:.2f} | {seconds[len(seconds) // 2]:.2f} | {cpu:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
