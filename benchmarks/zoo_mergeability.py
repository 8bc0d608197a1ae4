"""How mergeable are an lm zoo's specialists? Task-vector sizes and overlaps, and simple merges per skill.

For a built zoo (or a variant of the small zoo built here with other training settings), prints:
the norm of each specialist's task vector over the base's norm, the pairwise cosines of the task
vectors, and each skill's dev score (first `--limit` examples) for the base, each specialist, uniform
task arithmetic of all three at several weights, and every pair at weight 1.

    nice .venv/bin/python benchmarks/zoo_mergeability.py --zoo runs/demo/zoo
    nice .venv/bin/python benchmarks/zoo_mergeability.py --build /tmp/zoo-variant --task-share 0 --finetune-rate 2e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--zoo", type=Path, help="an lm zoo dir to analyse")
    where.add_argument("--build", type=Path, help="build a variant of the small zoo here, then analyse it")
    parser.add_argument("--task-share", type=float, default=None, help="variant: LMSize.task_share")
    parser.add_argument("--finetune-rate", type=float, default=None, help="variant: LMSize.finetune_rate")
    parser.add_argument("--limit", type=int, default=100, help="dev examples per skill")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    root = args.zoo or _build_variant(args.build, args.task_share, args.finetune_rate)
    analyse(root, args.limit)


def _build_variant(root: Path, task_share: float | None, finetune_rate: float | None) -> Path:
    """The small zoo (seed 0) with other pre-training task share and/or fine-tuning rate."""
    import time

    from evomerge.zoo import lm

    changes = {"task_share": task_share, "finetune_rate": finetune_rate}
    lm.LM_SIZES["variant"] = dataclasses.replace(
        lm.LM_SIZES["small"], **{k: v for k, v in changes.items() if v is not None}
    )
    root.mkdir(parents=True, exist_ok=False)
    start = time.perf_counter()
    lm.build_lm(root, size="variant", seed=0, advance=lambda steps: None)
    print(f"built {root} with {changes} in {time.perf_counter() - start:.0f} s")
    return root


def analyse(root: Path, limit: int) -> None:
    from safetensors.torch import load_file

    from evomerge.zoo.skills import SKILLS

    weights = {n: load_file(str(root / "models" / n / "model.safetensors")) for n in ("base", *SKILLS)}
    base = weights["base"]
    vectors = {s: {k: weights[s][k] - base[k] for k in base} for s in SKILLS}
    flat = {s: torch.cat([v.flatten() for v in vectors[s].values()]) for s in SKILLS}
    base_norm = torch.cat([v.flatten() for v in base.values()]).norm()
    for skill in SKILLS:
        print(f"|tau_{skill}| / |base| = {float(flat[skill].norm() / base_norm):.3f}")
    for a, b in itertools.combinations(SKILLS, 2):
        print(
            f"cos(tau_{a}, tau_{b}) = {float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)):.3f}"
        )
    score = _scorer(root, limit, base, vectors)
    merges = {"base": {}, **{s: {s: 1.0} for s in SKILLS}}
    merges |= {f"all three, weight {w}": dict.fromkeys(SKILLS, w) for w in (0.3, 0.5, 0.7, 1.0)}
    merges |= {f"{a} + {b}, weight 1": {a: 1.0, b: 1.0} for a, b in itertools.combinations(SKILLS, 2)}
    print(f"\n| model | {' | '.join(SKILLS)} |\n|---|{'---|' * len(SKILLS)}")
    for name, recipe in merges.items():
        scores = score(recipe)
        print(f"| {name} | {' | '.join(f'{scores[s]:.2f}' for s in SKILLS)} |")


def _scorer(root: Path, limit: int, base: dict, vectors: dict):  # type: ignore[no-untyped-def,type-arg]
    """score({skill: weight}) -> per-skill dev scores of base + sum of weight * task vector."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = LlamaForCausalLM.from_pretrained(str(root / "models" / "base")).eval()
    tasks = [
        load_task(root / "tasks" / s / "dev.jsonl", metric="exact_match", limit=limit, name=s)
        for s in vectors
    ]
    evaluator = Evaluator(tasks, tokenizer=tokenizer, max_new_tokens=None)

    def score(recipe: dict[str, float]) -> dict[str, float]:
        state = {k: base[k] + sum(w * vectors[s][k] for s, w in recipe.items()) for k in base}
        model.load_state_dict(state, strict=False)
        return {name: task.score for name, task in evaluator.evaluate(model).tasks.items()}

    return score


if __name__ == "__main__":
    main()
