"""evomerge merge vs mergekit-yaml on a Llama-shaped 220M-parameter bf16 model: wall time and peak RSS.

TIES, density 0.5, a base and 3 fine-tunes (hidden 1024, intermediate 2816, 12 layers, 16 heads, vocab
32000, untied embeddings), the same files for both tools, each tool in its own child process (peak RSS
from `wait4`). The I/O floor (every input read once, the output written once, `benchmarks/io_floor.py`)
is measured in the same run. The models are built once and cached under `.bench/`. Run from the repo root:

    nice python -m benchmarks.merge_speed [--repeat 2] [--skip-mergekit]

and it writes `benchmarks/results/merge.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "merge_speed"
BIN = Path(sys.executable).parent
SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


@dataclass
class Run:
    tool: str
    seconds: float
    cpu_seconds: float  # user + system, of the child and its threads
    peak_rss_gb: float
    versus_mergekit: str = "-"  # how the output differs from mergekit's


def build_models() -> dict[str, Path]:
    """Base + 3 fine-tunes, bf16, built once (reused when `.bench/merge_speed/family` exists)."""
    from evomerge.zoo.random_models import FamilySpec, build_family

    family = BENCH / "family"
    names = ["base", "ft0", "ft1", "ft2"]
    if all((family / name / "model.safetensors").is_file() for name in names):
        return {name: family / name for name in names}
    shutil.rmtree(family, ignore_errors=True)
    started = time.perf_counter()
    spec = FamilySpec(n_finetunes=3, dtype=torch.bfloat16, overrides=SHAPE, delta_scale=0.002)
    paths = build_family(family, spec)
    print(f"built the models in {time.perf_counter() - started:.0f} s", flush=True)
    return paths


def write_config(models: dict[str, Path]) -> Path:
    lines = ["merge_method: ties", f"base_model: {models['base']}", "models:"]
    lines += [
        f"  - model: {models[name]}\n    parameters: {{weight: 1.0, density: 0.5}}"
        for name in ("ft0", "ft1", "ft2")
    ]
    lines += ["parameters: {normalize: true}", "dtype: bfloat16", ""]
    path = BENCH / "ties.yaml"
    path.write_text("\n".join(lines))
    return path


def timed_child(tool: str, command: list[str], env: dict[str, str]) -> Run:
    """Wall time and peak RSS (ru_maxrss of the child, via wait4) of one command."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{tool} failed: {child.stderr.read().decode()[-2000:] if child.stderr else ''}")
    return Run(tool, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e9)


def run_evomerge(config: Path, out: Path, *options: str, jit: bool = True) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    command = [str(BIN / "evomerge"), "merge", str(config), str(out), *options]
    label = " ".join(["evomerge merge", *options]) + ("" if jit else " (torch kernel: EVOMERGE_JIT=0)")
    return timed_child(label, command, dict(os.environ, EVOMERGE_JIT="1" if jit else "0"))


def run_mergekit(config: Path, out: Path) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # its default threads
    return timed_child("mergekit-yaml 0.1.5", [str(BIN / "mergekit-yaml"), str(config), str(out)], env)


def io_floor_seconds(models: dict[str, Path]) -> float:
    from benchmarks.io_floor import io_floor

    inputs = [models[name] for name in ("base", "ft0", "ft1", "ft2")]
    return io_floor(inputs, BENCH / "io_floor_out", threads=2)


def io_floor_child(models: dict[str, Path]) -> Run:
    """The I/O floor in a child process, as `evomerge merge` runs (both pay for starting Python and torch;
    `benchmarks/merge_7b.py` measures its floor this way)."""
    inputs = [str(models[name]) for name in ("base", "ft0", "ft1", "ft2")]
    command = [sys.executable, "-m", "benchmarks.io_floor", *inputs, "--out", str(BENCH / "io_floor_child")]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return timed_child(CHILD_FLOOR, command, env)


CHILD_FLOOR = "I/O floor in a child process (starts Python and torch, as the merge)"


def compare(ours: Path, theirs: Path) -> str:
    """Largest |ours - theirs| in bf16 ulp at that value, and the fraction of entries that differ at all."""
    from safetensors.torch import load_file

    def load(model_dir: Path) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(file))
        return state

    mine, other = load(ours), load(theirs)
    worst, differing, total = 0.0, 0, 0
    for name, tensor in mine.items():
        gap = (tensor.double() - other[name].double()).abs()
        larger = torch.maximum(tensor.double().abs(), other[name].double().abs()).clamp_min(1e-30)
        spacing = torch.exp2(torch.floor(torch.log2(larger)) - 7)  # bf16: 7 explicit mantissa bits
        worst = max(worst, float((gap / spacing).max()))
        differing += int((gap > 0).sum())
        total += gap.numel()
    return f"{worst:.0f} ulp max, {differing / total:.2%} of entries differ"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GB RAM, torch {torch.__version__}"


def report(runs: list[Run], floor: list[float], load: tuple[float, ...], command: str) -> str:
    ours = min((run for run in runs if run.tool == "evomerge merge"), key=lambda run: run.seconds)
    theirs = [run for run in runs if run.tool.startswith("mergekit")]
    rows = [
        f"| {run.tool} | {run.seconds:.1f} | {run.cpu_seconds:.1f} | {run.peak_rss_gb:.2f} | "
        f"{run.versus_mergekit} |"
        for run in runs
    ]
    rows += [
        f"| I/O floor (read all inputs once, write the output once) | {s:.1f} | - | - | - |" for s in floor
    ]
    lines = [
        "# Merge speed: evomerge vs mergekit-yaml",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine()}; load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(shared machine)",
        "- Workload: TIES, density 0.5, weight 1, base + 3 fine-tunes of a Llama-shaped 220M-parameter model in "
        "bf16 (hidden 1024, intermediate 2816, 12 layers, 16 heads, vocab 32000, untied); files in page cache.",
        f"- Command: `{command}`",
        "",
        "| run | wall (s) | CPU user+sys (s) | peak RSS (GB) | output vs mergekit's |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    children = [run.seconds for run in runs if run.tool == CHILD_FLOOR]
    lines.append(
        f"evomerge (exact mode, the faster run) vs the I/O floor: {ours.seconds / min(floor):.1f}x the faster "
        f"in-process floor ({min(floor):.1f} s)"
        + (
            f", {ours.seconds / min(children):.1f}x the faster child-process floor ({min(children):.1f} s)."
            if children
            else "."
        )
    )
    if theirs:
        best = min(theirs, key=lambda run: run.seconds)
        lines.append(
            f"evomerge (exact mode) vs mergekit-yaml: {best.seconds / ours.seconds:.1f}x less wall time, "
            f"{best.cpu_seconds / ours.cpu_seconds:.1f}x less CPU time, {ours.peak_rss_gb / best.peak_rss_gb:.2f}x "
            f"its peak RSS; {ours.seconds / min(floor):.0f}x the I/O floor's wall time."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="evomerge runs (mergekit runs once)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--torch-kernel", action="store_true", help="also run without the compiled path")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "merge.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    models = build_models()
    config = write_config(models)
    floor = [io_floor_seconds(models)]  # also warms the page cache for both tools
    runs = [io_floor_child(models)]
    runs += [run_evomerge(config, BENCH / "out_evomerge") for _ in range(args.repeat)]
    runs.append(run_evomerge(config, BENCH / "out_evomerge_stable", "--tie-break", "stable"))
    if args.torch_kernel:
        runs.append(run_evomerge(config, BENCH / "out_evomerge_torch", jit=False))
    if not args.skip_mergekit:
        runs.append(run_mergekit(config, BENCH / "out_mergekit"))
        runs[1].versus_mergekit = compare(BENCH / "out_evomerge", BENCH / "out_mergekit")
        runs[args.repeat + 1].versus_mergekit = compare(BENCH / "out_evomerge_stable", BENCH / "out_mergekit")
        if args.torch_kernel:
            runs[args.repeat + 2].versus_mergekit = compare(
                BENCH / "out_evomerge_torch", BENCH / "out_mergekit"
            )
    floor.append(io_floor_seconds(models))
    runs.append(io_floor_child(models))
    for run in runs:
        print(json.dumps(run.__dict__))
    text = report(runs, floor, load, "nice python -m benchmarks.merge_speed " + " ".join(sys.argv[1:]))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
