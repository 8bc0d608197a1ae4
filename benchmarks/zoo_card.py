"""The zoo card: build `lm --size small` and `digits`, score every model and the default merges on every task.

Run:  nice .venv/bin/python benchmarks/zoo_card.py            (writes docs/zoo.md and benchmarks/results/zoo.md)
      nice .venv/bin/python benchmarks/zoo_card.py --size tiny --no-write   (a quick look, floors not expected)

Default merges are made with `evomerge.merge.api.merge` from mergekit-style YAML (linear average, task
arithmetic and TIES with their default parameters, weight 1 per model); scores come from
`evomerge.eval.evaluator.Evaluator`. The compositional target is reported beside two controls (issue 4):
the add task vector alone at several scales, and add + noise of the reverse task vector's norm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from evomerge.eval.evaluator import Evaluator
from evomerge.eval.loading import load_model
from evomerge.eval.tasks import load_task
from evomerge.merge.api import merge
from evomerge.zoo import ZooManifest, build

SPLITS = ("dev", "test")
MERGES = ("linear", "task_arithmetic", "ties")
FLOOR_OWN, FLOOR_OTHER = 0.9, 0.2


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    _quiet()
    lines = [f"# The zoo card (`--size {args.size}`, seed {args.seed})", ""]
    lines += _intro(args)
    start = time.perf_counter()
    lm = build(
        "lm", args.zoo_dir / f"lm-{args.size}-{args.seed}", size=args.size, seed=args.seed, progress=True
    )
    lines += _zoo_section(lm, time.perf_counter() - start, args)
    if not args.no_digits:
        start = time.perf_counter()
        digits = build(
            "digits", args.zoo_dir / f"digits-{args.size}-{args.seed}", size=args.size, seed=args.seed
        )
        lines += _zoo_section(digits, time.perf_counter() - start, args)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        _write(text, args)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--zoo-dir", type=Path, default=Path("zoo-cache"), help="where the zoos are built (cached)"
    )
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/ and results/")
    return parser.parse_args()


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _intro(args: argparse.Namespace) -> list[str]:
    command = "nice .venv/bin/python benchmarks/zoo_card.py" + (
        f" --size {args.size}" if args.size != "small" else ""
    )
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"Command: `{command}` · machine: {platform.machine()}, {torch.get_num_threads()} torch thread, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__} · date: {when}.",
        "",
        "Scores are exact match (lm) or accuracy (digits), in [0, 1]. Merges: mergekit-style YAML through",
        "`evomerge.merge.api.merge` with default parameters and weight 1 per model (`linear` = the average of",
        "the specialists; `task_arithmetic` = base + the sum of the task vectors; `ties` = density 1, sign",
        "election, disjoint mean).",
        "",
    ]


def _zoo_section(manifest: ZooManifest, elapsed: float, args: argparse.Namespace) -> list[str]:
    built = manifest.info.get("build_seconds")
    lines = [f"## `{manifest.name}` zoo", ""]
    lines += [_sizes(manifest, built, elapsed), ""]
    with tempfile.TemporaryDirectory() as scratch:
        candidates = {"base": manifest.base, **manifest.models, **_default_merges(manifest, Path(scratch))}
        scores = {name: _score(manifest, path) for name, path in candidates.items()}
        lines += _table(manifest, scores)
        lines += _floors(manifest, scores)
        if "compose" in manifest.tasks:
            lines += _compose_controls(manifest)
    return lines


def _sizes(manifest: ZooManifest, built: float | None, elapsed: float) -> str:
    config = json.loads((manifest.base / "config.json").read_text())
    n_params = sum(t.numel() for t in load_model(manifest.base)[0].parameters())
    shape = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "layer_sizes") if k in config}
    took = f"built in {built:.0f} s" if built is not None else "build time not recorded"
    return (
        f"{len(manifest.models)} specialists ({', '.join(manifest.models)}) from one base; {n_params:,} parameters "
        f"each ({shape}); {took} (this run: {elapsed:.0f} s, 0 if cached)."
    )


def _default_merges(manifest: ZooManifest, scratch: Path) -> dict[str, Path]:
    """The three default merges of every specialist, written by the engine into `scratch`."""
    out = {}
    for method in MERGES:
        models = [{"model": str(path), "parameters": {"weight": 1.0}} for path in manifest.models.values()]
        config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
        if method != "linear":
            config["base_model"] = str(manifest.base)
        out[method] = merge(json.dumps(config), scratch / method)
    return out


def _score(manifest: ZooManifest, path: Path) -> dict[str, dict[str, float]]:
    """{split: {task: score}} of the model dir `path`."""
    model, tokenizer = load_model(path)
    if tokenizer is None and manifest.name == "lm":
        tokenizer = load_model(manifest.base)[1]
    out = {}
    for split in SPLITS:
        tasks = [load_task(s.split(split), metric=s.metric, name=n) for n, s in manifest.tasks.items()]
        result = Evaluator(tasks, tokenizer=tokenizer, batch_size=100, max_new_tokens=None).evaluate(model)
        if not result.ok:
            raise RuntimeError(f"evaluating {path} failed: {result.error}")
        out[split] = {name: score.score for name, score in result.tasks.items()}
    return out


def _table(manifest: ZooManifest, scores: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    tasks = list(manifest.tasks)
    header = "| model | " + " | ".join(f"{t} dev | {t} test" for t in tasks) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(tasks))]
    for name, by_split in scores.items():
        cells = [f"{by_split['dev'][t]:.2f} | {by_split['test'][t]:.2f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _floors(manifest: ZooManifest, scores: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The issue's floors on test scores, each with its verdict."""
    test = {name: by_split["test"] for name, by_split in scores.items()}
    skills = list(manifest.models)
    checks = []
    for skill in skills:
        others = max(test[skill][o] for o in skills if o != skill)
        checks.append(
            (
                f"{skill} specialist: own skill {test[skill][skill]:.2f} >= {FLOOR_OWN}",
                test[skill][skill] >= FLOOR_OWN,
            )
        )
        checks.append(
            (f"{skill} specialist: best other skill {others:.2f} <= {FLOOR_OTHER}", others <= FLOOR_OTHER)
        )
    base_best = max(test["base"][s] for s in skills)
    checks.append((f"base: best skill {base_best:.2f} <= {FLOOR_OTHER}", base_best <= FLOOR_OTHER))
    target = manifest.targets[0]
    own = min(test[s][s] for s in skills)
    for method in MERGES:
        checks.append(
            (
                f"{method} on `{target}` {test[method][target]:.2f} < specialists' own scores (min {own:.2f})",
                test[method][target] < own,
            )
        )
    lines = ["Floors (test split):", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    return [*lines, ""]


def _compose_controls(manifest: ZooManifest) -> list[str]:
    """Compose accuracy of add+reverse task arithmetic beside the controls the issue asks for."""
    base, tokenizer = load_model(manifest.base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    vectors = {s: _task_vector(manifest.models[s], base_state) for s in ("add", "reverse")}
    task = load_task(manifest.tasks["compose"].test, metric="exact_match", name="compose")
    evaluator = Evaluator([task], tokenizer=tokenizer, batch_size=100, max_new_tokens=None)
    generator = torch.Generator().manual_seed(0)
    noise = {k: _like_norm(v, generator) for k, v in vectors["reverse"].items()}
    variants = {f"base + {s} x add": {"add": s} for s in (0.5, 1.0, 1.5, 2.0)}
    rows = []
    for name, scales in variants.items():
        rows.append((name, _apply(base, base_state, [(vectors["add"], scales["add"])], evaluator)))
    rows.append(
        (
            "base + add + reverse",
            _apply(base, base_state, [(vectors["add"], 1.0), (vectors["reverse"], 1.0)], evaluator),
        )
    )
    rows.append(
        (
            "base + add + noise (reverse's norm)",
            _apply(base, base_state, [(vectors["add"], 1.0), (noise, 1.0)], evaluator),
        )
    )
    lines = [
        "Compositional target `compose` (test) and its controls:",
        "",
        "| model | compose |",
        "|---|---|",
    ]
    return [*lines, *(f"| {name} | {score:.2f} |" for name, score in rows), ""]


def _task_vector(path: Path, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = load_model(path)[0].state_dict()
    return {k: state[k] - base_state[k] for k in base_state}


def _like_norm(vector: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(vector.shape, generator=generator)
    return noise * (vector.norm() / noise.norm().clamp(min=1e-12))


def _apply(
    model: Any,
    base_state: dict[str, torch.Tensor],
    parts: list[tuple[dict[str, torch.Tensor], float]],
    evaluator: Evaluator,
) -> float:
    state = {k: v + sum(scale * vec[k] for vec, scale in parts) for k, v in base_state.items()}
    model.load_state_dict(state)
    return evaluator.evaluate(model).score


def _write(text: str, args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent
    (root / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (root / "benchmarks" / "results" / "zoo.md").write_text(text, encoding="utf-8")
    docs = root / "docs" / "zoo.md"
    head = docs.read_text(encoding="utf-8").split("<!-- zoo card -->")[0] if docs.exists() else ""
    docs.write_text(head + "<!-- zoo card -->\n" + text, encoding="utf-8")


if __name__ == "__main__":
    main()
