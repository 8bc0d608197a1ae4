"""Per-skill scores of every merge method on an lm zoo: how much of each specialist's skill one merge keeps.

For each method (its registry defaults, with `weight: 1` where a weight is required and `density: 0.5`
where it sparsifies), one merge of all the zoo's specialists is scored on each skill's test split (first
`--limit` examples). `keeps` is the number that matters: min over skills of merged score / the
specialist's own score on its skill (1.0: every skill kept whole). `--evolve` methods are then evolved
with CMA-ES (the `cmaes` library, `--generations` x `--popsize`, genome: the method's parameters, one gene
per model or global, in the unit cube of evomerge's ParameterSpace) on the skills' dev splits (first
`--dev-limit`), fitness min share + 0.1 mean share (dev), and the best genome is scored on test.

Data-aware methods calibrate each specialist on the first `--calibration-limit` examples of its own
skill's train split (RegMean's setting: each model's inputs on its own task); statistics are cached in
`--cache`.

`--params NAME=VALUE` sets a global parameter in every recipe of a method that takes it (RegMean++'s
`own_targets=true`, say); `--seed` seeds CMA-ES.

    nice .venv/bin/python benchmarks/skills.py --zoo runs/demo/zoo --json runs/skills-small.json
    nice .venv/bin/python benchmarks/skills.py --zoo runs/zoo-hard --json runs/skills-hard.json
    nice .venv/bin/python benchmarks/skills.py --zoo runs/zoo-hard --dev-limit 100 --generations 20 \
        --popsize 8 --methods regmean_plusplus --evolve regmean_plusplus --params own_targets=true
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = [
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della",
    "sce", "model_stock", "karcher", "multislerp", "regmean", "regmean_plusplus", "prodistill", "fisher", "tsv", "iso_c",
]  # fmt: skip
EVOLVED: dict[str, dict[str, list[float] | None]] = {
    "task_arithmetic": {"weight": [0.0, 1.5]},
    "ties": {"weight": [0.0, 1.5], "density": [0.1, 1.0]},
    "regmean": {"weight": [0.05, 1.0], "alpha": [0.0, 1.0], "lambda": [0.5, 3.0]},
    "regmean_plusplus": {"weight": [0.05, 1.0], "alpha": [0.0, 1.0], "lambda": [0.5, 3.0]},
    "prodistill": {"weight": [0.05, 1.0], "init": [0.1, 1.0], "lr": [0.005, 0.2]},
    "fisher": {"weight": [0.05, 1.0], "lambda": [0.5, 3.0]},
    "tsv": {"weight": [0.0, 1.5], "lambda": [0.5, 2.0]},
    "iso_c": {"weight": [0.0, 1.5], "lambda": [0.5, 3.0]},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, required=True, help="a built lm zoo")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--evolve", nargs="*", default=["task_arithmetic", "ties", "regmean", "tsv", "iso_c"])
    parser.add_argument("--limit", type=int, default=100, help="test examples per skill")
    parser.add_argument("--dev-limit", type=int, default=40, help="dev examples per skill (evolution)")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--popsize", type=int, default=6)
    parser.add_argument("--granularity", default="model", help="evolution: model | group | layer")
    parser.add_argument(
        "--separate", nargs="*", default=[], help="evolution: own genes for attention/mlp/embedding"
    )
    parser.add_argument(
        "--params", nargs="*", default=[], metavar="NAME=VALUE",
        help="global parameters set in every recipe of a method that takes them (e.g. own_targets=true)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="CMA-ES seed")
    parser.add_argument("--calibration-limit", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path("runs/calibration-cache"))
    parser.add_argument("--json", type=Path, help="write every number here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    bench = Bench(args)
    report = bench.run()
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


class Bench:
    """One zoo: its specialists, a live model to merge into, and dev/test evaluators per skill."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer, LlamaForCausalLM

        from evomerge.zoo.manifest import ZooManifest

        self.args = args
        self.zoo = ZooManifest.load(args.zoo)
        self.skills = list(self.zoo.models)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.zoo.root / "tokenizer"))
        self.model = LlamaForCausalLM.from_pretrained(str(self.zoo.base)).eval()
        self.test = self._evaluator("test", args.limit)
        self.dev = self._evaluator("dev", args.dev_limit)

    def _evaluator(self, split: str, limit: int) -> Any:
        from evomerge.eval.evaluator import Evaluator
        from evomerge.eval.tasks import load_task

        tasks = [
            load_task(self.zoo.tasks[s].split(split), metric="exact_match", limit=limit, name=s)
            for s in self.skills
        ]
        return Evaluator(tasks, tokenizer=self.tokenizer, max_new_tokens=None)

    # ---- recipes -----------------------------------------------------------------------------------
    def recipe(self, method: str, per_model: dict[str, Any] | None = None) -> dict[str, Any]:
        """The default recipe of `method` over every specialist (base where the method takes one)."""
        from evomerge.merge.registry import get_method

        spec = get_method(method)
        params: dict[str, Any] = {}
        names = {p.name for p in spec.params}
        if "weight" in names and spec.param("weight").required:
            params["weight"] = 1.0
        if "density" in names:
            params["density"] = 0.5
        recipe: dict[str, Any] = {
            "merge_method": method,
            "models": [{"model": str(self.zoo.models[s])} for s in self.skills],
            "dtype": "float32",
        }
        if spec.accepts_base:
            recipe["base_model"] = str(self.zoo.base)
        if params:
            recipe["parameters"] = params
        return self.with_calibration(recipe)

    def with_calibration(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """`recipe` with the `--params` its method takes and, for a data-aware method, calibration."""
        from evomerge.merge.registry import get_method

        spec = get_method(recipe["merge_method"])
        names = {p.name for p in spec.params}
        fixed = {k: v for k, v in _fixed(self.args.params).items() if k in names}
        if fixed:
            recipe = {**recipe, "parameters": {**(recipe.get("parameters") or {}), **fixed}}
        if spec.statistics is None:
            return recipe
        own = {str(self.zoo.models[s]): str(self.zoo.tasks[s].train) for s in self.skills}
        calibration = {"models": own, "limit": self.args.calibration_limit, "cache": str(self.args.cache)}
        return {**recipe, "calibration": calibration}

    # ---- scoring -----------------------------------------------------------------------------------
    def score(self, recipe: dict[str, Any], evaluator: Any, sources: Any = None) -> dict[str, float]:
        from evomerge.merge.config import MergeConfig
        from evomerge.merge.engine import merge_into
        from evomerge.merge.sources import SourceSet

        config = MergeConfig.from_dict(recipe)
        owned = sources is None
        sources = sources or SourceSet.load(config)
        try:
            merge_into(self.model, config, sources, seed=0)
        finally:
            if owned:
                sources.close()
        result = evaluator.evaluate(self.model)
        return {s: result.tasks[s].score for s in self.skills}

    def source_scores(self, evaluator: Any) -> dict[str, dict[str, float]]:
        out = {}
        for name, path in {"base": self.zoo.base, **self.zoo.models}.items():
            recipe = {
                "merge_method": "linear",
                "models": [{"model": str(path), "parameters": {"weight": 1.0}}],
            }
            out[name] = self.score(recipe, evaluator)
        return out

    # ---- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        sources = self.source_scores(self.test)
        own = {s: sources[s][s] for s in self.skills}
        report: dict[str, Any] = {"zoo": str(self.zoo.root), "skills": self.skills, "args": _args(self.args)}
        report["sources"] = sources
        report["default"] = {}
        for method in self.args.methods:
            t = time.perf_counter()
            scores = self.score(self.recipe(method), self.test)
            report["default"][method] = {
                "scores": scores,
                "keeps": keeps(scores, own),
                "s": time.perf_counter() - t,
            }
            print(f"{method:18s} {_row(scores, own)}  [{time.perf_counter() - t:.1f} s]", flush=True)
        dev_own = {s: v[s] for s, v in self.source_scores(self.dev).items() if s in self.skills}
        report["evolved"] = {}
        for method in self.args.evolve:
            t = time.perf_counter()
            best = self.evolve(method, dev_own)
            scores = self.score(best["recipe"], self.test)
            best |= {"scores": scores, "keeps": keeps(scores, own), "s": time.perf_counter() - t}
            report["evolved"][method] = best
            print(
                f"{method + ' (evolved)':18s} {_row(scores, own)}  [{time.perf_counter() - t:.1f} s]",
                flush=True,
            )
        report["seconds"] = time.perf_counter() - start
        return report

    def evolve(self, method: str, dev_own: dict[str, float]) -> dict[str, Any]:
        """CMA-ES over the method's parameters in the unit cube; the best dev genome's recipe."""
        from cmaes import CMA

        from evomerge.merge.config import MergeConfig
        from evomerge.merge.sources import SourceSet
        from evomerge.search.space import ParameterSpace

        space = ParameterSpace.from_models(
            self.zoo.base, [self.zoo.models[s] for s in self.skills], method, parameters=EVOLVED[method],
            granularity=self.args.granularity, separate=self.args.separate,
        )  # fmt: skip
        optimizer = CMA(
            mean=np.full(space.dim, 0.5), sigma=0.25, bounds=np.array([[0.0, 1.0]] * space.dim),
            population_size=self.args.popsize, seed=self.args.seed,
        )  # fmt: skip
        default = self.recipe(method)
        sources = SourceSet.load(MergeConfig.from_dict(default))
        best: dict[str, Any] = {"fitness": -1.0}
        try:
            for _ in range(self.args.generations):
                told = []
                for _ in range(optimizer.population_size):
                    x = optimizer.ask()
                    recipe = self.with_calibration(space.decode_dict(x))
                    dev = self.score(recipe, self.dev, sources)
                    fitness = min(keeps(dev, dev_own).values()) + 0.1 * float(
                        np.mean(list(keeps(dev, dev_own).values()))
                    )
                    told.append((x, -fitness))
                    if fitness > best["fitness"]:
                        best = {"fitness": fitness, "recipe": recipe, "dev": dev}
                optimizer.tell(told)
        finally:
            sources.close()
        best["evaluations"] = self.args.generations * self.args.popsize
        return best


def _fixed(items: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs, the value read as YAML (true, 0.5, ...)."""
    import yaml

    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = yaml.safe_load(value)
    return out


def keeps(scores: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    """Per skill: merged score / the specialist's own score on it."""
    return {s: scores[s] / own[s] if own[s] > 0 else float("nan") for s in own}


def _row(scores: dict[str, float], own: dict[str, float]) -> str:
    share = keeps(scores, own)
    cells = " ".join(f"{s}={scores[s]:.2f}({share[s]:.0%})" for s in own)
    return f"{cells}  min share {min(share.values()):.0%}"


def _args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def print_report(report: dict[str, Any]) -> None:
    skills = report["skills"]
    own = {s: report["sources"][s][s] for s in skills}
    print(f"\n| model | {' | '.join(skills)} | min share |\n|---|{'---|' * (len(skills) + 1)}")
    for name, scores in report["sources"].items():
        print(f"| {name} | {' | '.join(f'{scores[s]:.2f}' for s in skills)} | |")
    for kind in ("default", "evolved"):
        for method, row in report[kind].items():
            share = row["keeps"]
            cells = " | ".join(f"{row['scores'][s]:.2f} ({share[s]:.0%})" for s in skills)
            label = method if kind == "default" else f"{method}, evolved"
            print(f"| {label} | {cells} | **{min(share.values()):.0%}** |")
    print(f"\n{report['seconds']:.0f} s; specialists' own scores {own}")


if __name__ == "__main__":
    main()
