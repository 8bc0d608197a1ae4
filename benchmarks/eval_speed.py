"""Evaluator speed: batched exact_match (KV cache, length-sorted batches) against a per-example generate loop.

Both paths score the same model on the same examples with the same generation budget and stop rule
(newline or EOS); the per-example scores must be equal, else the script fails. Writes
benchmarks/results/eval.md.

    nice .venv/bin/python benchmarks/eval_speed.py --zoo runs/zoo-lm-small --size small

--zoo names a zoo dir: used as it is if it holds a zoo.json, else `evomerge.zoo.build("lm", ...)` builds it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evomerge.eval.evaluator import Evaluator
from evomerge.eval.generation import generate_one_by_one
from evomerge.eval.loading import load_model
from evomerge.eval.metrics import exact_match
from evomerge.eval.tasks import Example, Task, load_task

RESULTS = Path(__file__).parent / "results" / "eval.md"


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    model, tokenizer, task, source = _model_and_task(args)
    prompts, answers = [e.prompt for e in task.examples], [e.answer for e in task.examples]
    start = time.perf_counter()
    requested = args.max_new_tokens or (16 if args.random_model else None)
    evaluator = Evaluator([task], tokenizer=tokenizer, batch_size=args.batch_size, max_new_tokens=requested)
    setup_s = time.perf_counter() - start
    budget = evaluator.max_new_tokens
    args.start_load = _load()
    print(f"load average at the start {args.start_load}")
    print(f"{source}: {len(prompts)} examples, max_new_tokens={budget}", flush=True)

    batched_s = _best_of(args.repeats, lambda: evaluator.evaluate(model))
    result = evaluator.evaluate(model)
    with torch.inference_mode():
        loop_s = _best_of(
            args.loop_repeats, lambda: generate_one_by_one(model, tokenizer, prompts, max_new_tokens=budget)
        )
        loop_scores = exact_match(
            generate_one_by_one(model, tokenizer, prompts, max_new_tokens=budget), answers
        )
    if not result.ok or result.tasks[task.name].per_example != loop_scores:
        sys.exit(f"scores differ: batched {result.tasks[task.name].per_example} vs loop {loop_scores}")
    rows = [("batched Evaluator", batched_s), ("per-example model.generate", loop_s)]
    batch_rows = [
        (size, _time_batch_size(task, tokenizer, model, size, budget, args.repeats)) for size in (1, 16, 64)
    ]
    threads = [(n, _time_threads(evaluator, model, n, args.repeats)) for n in (1, 2) if args.device == "cpu"]
    report = _report(args, source, len(prompts), budget, result.score, setup_s, rows, batch_rows, threads)
    _write(args.results, report)
    print(report)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--zoo", type=Path, default=Path("runs/zoo-lm-small"), help="zoo dir (built if missing)"
    )
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--model", default="add", help="which zoo model: base or a skill name")
    parser.add_argument("--task", default="multi", help="which zoo task (its test split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest answer + 2")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the batched path (best kept)")
    parser.add_argument("--loop-repeats", type=int, default=2, help="timed runs of the per-example loop")
    parser.add_argument("--device", default="cpu", help="torch device (cuda: the thread table is skipped)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the markdown")
    parser.add_argument(
        "--random-model", action="store_true", help="skip the zoo: random Llama, char tokenizer"
    )
    return parser.parse_args()


def _model_and_task(args: argparse.Namespace) -> tuple[Any, Any, Task, str]:
    if args.random_model:
        return _random_model_and_task(args.device)
    from evomerge.zoo import ZooManifest, build

    if (args.zoo / "zoo.json").is_file():  # an existing zoo is used as it is (no rebuild)
        manifest = ZooManifest.load(args.zoo)
    else:
        manifest = build("lm", args.zoo, size=args.size, seed=0, progress=True)
    path = manifest.base if args.model == "base" else manifest.models[args.model]
    model, tokenizer = load_model(path, device=args.device)
    task = load_task(manifest.tasks[args.task].test, metric="exact_match", name=args.task)
    return (
        model,
        tokenizer,
        task,
        f"zoo lm --size {manifest.size}: model {args.model}, task {args.task} (test)",
    )


def _random_model_and_task(device: str) -> tuple[Any, Any, Task, str]:
    """Fallback without the zoo: a zoo-sized random Llama and char tokenizer (the tests' helpers).

    Its answers are left empty, so its scores mean nothing; what counts is that both paths agree.
    """
    spec = importlib.util.spec_from_file_location(
        "helpers", Path(__file__).parents[1] / "tests/eval/helpers.py"
    )
    assert spec is not None and spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    tokenizer = helpers.char_tokenizer()
    model = helpers.tiny_llama(len(tokenizer), layers=4).to(device)
    prompts = [f"what is {a} plus {b}? " for a in range(10) for b in range(10)]
    examples = [Example(prompt=p, answer="") for p in prompts]
    return model, tokenizer, Task("random", "exact_match", examples), "random Llama (4 layers, 32 wide)"


def _best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _time_batch_size(task: Task, tokenizer: Any, model: Any, size: int, budget: int, repeats: int) -> float:
    evaluator = Evaluator([task], tokenizer=tokenizer, batch_size=size, max_new_tokens=budget)
    return _best_of(repeats, lambda: evaluator.evaluate(model))


def _time_threads(evaluator: Evaluator, model: Any, threads: int, repeats: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _best_of(repeats, lambda: evaluator.evaluate(model))
    finally:
        torch.set_num_threads(previous)


def _report(
    args: argparse.Namespace,
    source: str,
    n: int,
    budget: int,
    score: float,
    setup_s: float,
    rows: list[tuple[str, float]],
    batch_rows: list[tuple[int, float]],
    threads: list[tuple[int, float]],
) -> str:
    batched, loop = rows[0][1], rows[1][1]
    lines = [
        "# Evaluator speed: batched exact_match vs per-example `model.generate`",
        "",
        f"- command: `nice .venv/bin/python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {_machine(args.device)}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- model and examples: {source}; {n} examples; max_new_tokens={budget}; "
        "stop at newline or EOS in both paths",
        f"- scores: equal per example in both paths (exact_match {score:.4f}); one torch thread unless noted",
        "",
        "| path | wall s | examples/s |",
        "|---|---:|---:|",
        *[f"| {name} | {seconds:.3f} | {n / seconds:.1f} |" for name, seconds in rows],
        "",
        f"**Speed-up: {loop / batched:.1f}x** (floor: 5x). Best of {args.repeats} runs (batched) and of "
        f"{args.loop_repeats} (loop); load average at the start {args.start_load}, at the end {_load()}; "
        f"the one-off set-up (tokenising prompts, finding stop tokens) took {setup_s:.3f} s and is not counted.",
        "",
        f"Batch size (batched Evaluator, best of {args.repeats}):",
        "",
        "| batch size | wall s | examples/s |",
        "|---:|---:|---:|",
        *[f"| {size} | {seconds:.3f} | {n / seconds:.1f} |" for size, seconds in batch_rows],
        "",
    ]
    if threads:
        lines += [
            f"Torch threads (batch size {args.batch_size}, best of {args.repeats}):",
            "",
            "| threads | wall s | examples/s |",
            "|---:|---:|---:|",
            *[f"| {count} | {seconds:.3f} | {n / seconds:.1f} |" for count, seconds in threads],
            "",
        ]
    return "\n".join(lines)


def _load() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg()) + " (1 / 5 / 15 min)"


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} ({platform.machine()} host, {os.cpu_count()} cores)"
    return f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)"


def _write(path: Path, report: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text(report, encoding="utf-8")
    temporary.replace(path)


if __name__ == "__main__":
    main()
