"""TIES of four 7B-shaped bf16 models (synthetic, ~54 GB in) on a 24 GB machine: wall time, peak RSS, I/O floor.

A base and 3 fine-tunes with Llama-2-7B's tensors (`benchmarks/synthetic.py`; `--layers` fewer for a
quick run) are generated into `--work`, then, in this order and in one run so the ratios compare like
with like: the I/O floor (`benchmarks/io_floor.py`: every input read once, an output of one model's size
written once), `evomerge merge` in a child process (peak RSS from `/usr/bin/time`), the I/O floor again, and
`mergekit-yaml` on the same files with a time limit (its output replaces ours on disk: there is no room
for both, so each output is hashed tensor by tensor and the hashes are compared). Everything under
`--work` is deleted at the end, also on failure. Run from the repo root:

    nice python -m benchmarks.merge_7b [--layers 32] [--mergekit-timeout 3600] [--skip-mergekit]

and it writes `benchmarks/results/merge_7b.md` (`--results` to change). Generating takes long on a busy
disk (23 min on the shared machine): `python -m benchmarks.synthetic DIR --layers N` beforehand and
`--models DIR` use those models instead (deleted at the end too, unless `--keep-models`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchmarks.merge_speed import machine
from benchmarks.synthetic import build, model_bytes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FINETUNES = 3


@dataclass
class Run:
    what: str
    seconds: float
    cpu_seconds: float = float("nan")
    peak_rss_gb: float = float("nan")
    note: str = ""
    output: str = ""
    load: float = float("nan")  # 1-minute load average when it started


def free_bytes(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.free


def write_config(models: dict[str, Path], work: Path) -> Path:
    lines = ["merge_method: ties", f"base_model: {models['base']}", "models:"]
    lines += [
        f"  - model: {models[name]}\n    parameters: {{weight: 1.0, density: 0.5}}"
        for name in models
        if name != "base"
    ]
    lines += ["parameters: {normalize: true}", "dtype: bfloat16", ""]
    path = work / "ties.yaml"
    path.write_text("\n".join(lines))
    return path


def timed_child(what: str, command: list[str], env: dict[str, str], timeout: float | None = None) -> Run:
    """Wall time, CPU time and peak RSS of a command; killed after `timeout` s.

    The command runs under /usr/bin/time, which reports the command's own peak RSS: a child forked
    from this (larger) process would inherit its high-water mark in `ru_maxrss`."""
    timing = Path(os.environ.get("TMPDIR", "/tmp")) / f"merge_7b_time_{os.getpid()}.txt"
    wrapped = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(timing), *command]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(wrapped, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    timer = threading.Timer(timeout, _kill_command, (child.pid,)) if timeout else None
    if timer is not None:
        timer.start()
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(child.stdout.read() if child.stdout else b""))
    reader.start()
    code = child.wait()
    seconds = time.perf_counter() - started
    if timer is not None:
        timer.cancel()
    reader.join()
    rss_kb, user, system = timing.read_text().split("\n")[-2].split()
    timing.unlink()
    run = Run(what, seconds, float(user) + float(system), float(rss_kb) * 1024 / 1e9, load=load)
    run.output = b"".join(output).decode(errors="replace")
    if code != 0:
        killed = timeout is not None and seconds >= timeout
        run.note = f"killed after {timeout:.0f} s (time limit)" if killed else f"failed (exit {code})"
        print(what, run.note, run.output[-3000:], flush=True)
    return run


def _kill_command(time_pid: int) -> None:
    """SIGKILL the command that /usr/bin/time runs (time itself then reports and exits)."""
    children = Path(f"/proc/{time_pid}/task/{time_pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        os.kill(int(pid), signal.SIGKILL)


def tensor_hashes(model_dir: Path) -> dict[str, str]:
    """blake2b of every tensor's bytes, by name (outputs are compared without holding two on disk)."""
    from evomerge.io import ModelDir

    hashes = {}
    with ModelDir(model_dir) as model:
        for name in model.tensor_names():
            data = model.get(name).reshape(-1).view(torch.uint8).numpy()
            hashes[name] = hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()
    return hashes


def compare(ours: dict[str, str], theirs: dict[str, str]) -> str:
    if set(ours) != set(theirs):
        return f"tensor names differ ({len(set(ours) ^ set(theirs))} not in both)"
    differing = [name for name in ours if ours[name] != theirs[name]]
    return (
        "bit-identical, every tensor" if not differing else f"{len(differing)} of {len(ours)} tensors differ"
    )


def floor_run(inputs: list[Path], work: Path, label: str) -> Run:
    """The I/O floor in a child process, like the merge (so both pay for starting Python and torch)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.io_floor",
        *map(str, inputs),
        "--out",
        str(work / "floor_out"),
    ]
    run = timed_child(label, command, dict(os.environ, OMP_NUM_THREADS="1"))
    inner = [line.split()[2] for line in run.output.splitlines() if line.startswith("run 0:")]
    run.note = run.note or (f"{float(inner[0]):.0f} s of it inside `io_floor`" if inner else "")
    shutil.rmtree(work / "floor_out", ignore_errors=True)
    return run


def benchmark(args: argparse.Namespace, work: Path) -> tuple[list[Run], list[str]]:
    runs: list[Run] = []
    notes: list[str] = []
    if args.models is not None:
        models = _generated(args.models)
        notes.append(f"the 4 models were generated beforehand into {args.models} (`benchmarks/synthetic.py`)")
    else:
        started = time.perf_counter()
        models = build(work / "models", layers=args.layers, finetunes=FINETUNES, shape=args.shape)
        notes.append(f"generating the 4 models took {time.perf_counter() - started:.0f} s")
    print(notes[-1], flush=True)
    inputs = list(models.values())
    config = write_config(models, work)
    runs.append(floor_run(inputs, work, "I/O floor (before)"))
    print(_line(runs[-1]), flush=True)
    ours_dir = work / "out_evomerge"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs.append(
        timed_child("evomerge merge", [str(BIN / "evomerge"), "merge", str(config), str(ours_dir)], env)
    )
    print(_line(runs[-1]), flush=True)
    ours = tensor_hashes(ours_dir) if not runs[1].note else {}
    shutil.rmtree(ours_dir, ignore_errors=True)  # before the next output: the disk holds one at a time
    runs.append(floor_run(inputs, work, "I/O floor (after)"))
    print(_line(runs[-1]), flush=True)
    if not args.skip_mergekit:
        theirs_dir = work / "out_mergekit"
        env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
        command = [str(BIN / "mergekit-yaml"), str(config), str(theirs_dir), "--quiet"]
        runs.append(timed_child("mergekit-yaml 0.1.5", command, env, timeout=_mergekit_timeout(args)))
        if not runs[-1].note and ours:
            runs[-1].note = "output vs evomerge's: " + compare(ours, tensor_hashes(theirs_dir))
        print(_line(runs[-1]), flush=True)
        shutil.rmtree(theirs_dir, ignore_errors=True)
    return runs, notes


def _generated(models_dir: Path) -> dict[str, Path]:
    """The base and fine-tunes `python -m benchmarks.synthetic DIR` wrote (its config.json comes last)."""
    names = ["base", *(f"ft{index}" for index in range(FINETUNES))]
    missing = [name for name in names if not (models_dir / name / "config.json").is_file()]
    if missing:
        raise SystemExit(
            f"{models_dir}: no finished model dir {missing}; run `python -m benchmarks.synthetic {models_dir}`."
        )
    return {name: models_dir / name for name in names}


def _line(run: Run) -> str:
    return f"{run.what}: {run.seconds:.1f} s wall, {run.cpu_seconds:.1f} s CPU, {run.peak_rss_gb:.2f} GB {run.note}"


def report(
    args: argparse.Namespace,
    runs: list[Run],
    notes: list[str],
    load: tuple[float, ...],
    end_load: tuple[float, ...],
) -> str:
    size = model_bytes(args.shape, args.layers)
    floor = min(run.seconds for run in runs if run.what.startswith("I/O floor"))
    rows = []
    for run in runs:
        ratio = f"{run.seconds / floor:.2f}x" if floor else "-"
        cpu = "-" if run.cpu_seconds != run.cpu_seconds else f"{run.cpu_seconds:.0f}"
        rss = "-" if run.peak_rss_gb != run.peak_rss_gb else f"{run.peak_rss_gb:.2f}"
        rows.append(
            f"| {run.what} | {run.seconds:.0f} | {ratio} | {cpu} | {rss} | {run.load:.1f} | {run.note or '-'} |"
        )
    merges = [run for run in runs if run.what == "evomerge merge" and not run.note]
    cores = os.cpu_count() or 1
    bound = (
        f"CPU-time bound: the merge's {merges[0].cpu_seconds:.0f} s of CPU spread over all {cores} cores "
        f"would take at least {merges[0].cpu_seconds / cores:.0f} s, "
        f"{merges[0].cpu_seconds / cores / floor:.2f}x the floor."
        if merges and floor
        else ""
    )
    command = "python -m benchmarks.merge_7b " + " ".join(sys.argv[1:])
    return "\n".join(
        [
            "# TIES at 7B scale: evomerge vs the I/O floor and mergekit-yaml",
            "",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {machine()}; load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            f"(shared with other jobs: wall times are disturbed; the floor, measured in the same run, "
            f"is disturbed alike); this benchmark ran at nice {os.nice(0)}",
            f"- Workload: TIES, density 0.5, weight 1, normalize, bf16; a base + {FINETUNES} fine-tunes with "
            f"{args.shape} 7B tensor shapes, {args.layers} layers, {size / 1e9:.2f} GB each "
            f"({(FINETUNES + 1) * size / 1e9:.1f} GB read, {size / 1e9:.1f} GB written); synthetic "
            "(`benchmarks/synthetic.py`), sharded at 5 GB; inputs larger than the page cache can hold "
            "at 32 layers.",
            f"- Command: `{command}`",
            *(f"- {note}" for note in notes),
            "",
            "| run | wall (s) | vs floor | CPU user+sys (s) | peak RSS (GB) | load at start | note |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Ratios are to the faster floor run ({floor:.0f} s). {bound}",
            f"Load average at the end {end_load[0]:.1f} / {end_load[1]:.1f} / {end_load[2]:.1f}.",
            "",
        ]
    )


def _mergekit_timeout(args: argparse.Namespace) -> float:
    """--mergekit-timeout, or less where --deadline (HH:MM UTC today) comes sooner."""
    if args.deadline is None:
        return float(args.mergekit_timeout)
    now = datetime.datetime.now(datetime.timezone.utc)
    hour, minute = (int(part) for part in args.deadline.split(":"))
    deadline = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return max(60.0, min(float(args.mergekit_timeout), (deadline - now).total_seconds()))


def _needed(shape: str, layers: int) -> float:
    """Disk for the inputs, one output at a time, and 3 GB left for everyone else."""
    return (FINETUNES + 2) * model_bytes(shape, layers) * 1.02 + 3e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shape", choices=["llama2", "mistral"], default="llama2")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "merge_7b")
    parser.add_argument("--mergekit-timeout", type=float, default=3600.0)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--deadline", help="HH:MM UTC by which mergekit is stopped (its timeout shrinks)")
    parser.add_argument("--fit", action="store_true", help="fewer layers if the disk cannot hold --layers")
    parser.add_argument(
        "--models",
        type=Path,
        help="use the models `python -m benchmarks.synthetic DIR --layers N` wrote there (same --layers); "
        "deleted at the end like --work (unless --keep-models)",
    )
    parser.add_argument("--keep-models", action="store_true", help="keep --models (to run again)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "merge_7b.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.fit and args.models is None:
        while args.layers > 1 and free_bytes(args.work) < _needed(args.shape, args.layers):
            args.layers -= 1
    needed = _needed(args.shape, args.layers) - (
        0 if args.models is None else (FINETUNES + 1) * model_bytes(args.shape, args.layers) * 1.02
    )
    if free_bytes(args.work) < needed:
        raise SystemExit(
            f"{args.work}: {free_bytes(args.work) / 1e9:.1f} GB free, the benchmark needs {needed / 1e9:.1f} GB; "
            "free some disk or pass fewer --layers."
        )
    load = os.getloadavg()
    try:
        runs, notes = benchmark(args, args.work)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
        if args.models is not None and not args.keep_models:
            shutil.rmtree(args.models, ignore_errors=True)
    text = report(args, runs, notes, load, os.getloadavg())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
