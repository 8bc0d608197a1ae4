"""Time every merge kernel against mergekit 0.1.5's implementation of the same method, tensor level.

One Llama MLP-shaped weight (2816 x 1024 by default), a base and 3 fine-tunes, one torch thread.
Prints a Markdown table: best-of-N seconds (process CPU time by default, which other jobs on a shared
machine disturb far less than wall time; everything runs on one thread, so on an idle core the two
agree) for evomerge and mergekit, the speed-up, and whether the two results are bit-identical (random
methods: not compared, they draw different masks).

    nice .venv/bin/python benchmarks/methods.py [--rows 2816 --cols 1024 --repeat 3 --dtype float32]
        [--tie-break mergekit|stable] [--methods ties breadcrumbs ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from evomerge.merge.registry import get_method

W = [0.4, 0.35, 0.25]
CASES: list[tuple[str, int, bool, dict[str, Any]]] = [
    ("linear", 3, False, {"weight": W}),
    ("task_arithmetic", 3, True, {"weight": W}),
    ("ties", 3, True, {"weight": W, "density": [0.5] * 3}),
    ("breadcrumbs", 3, True, {"weight": W, "density": [0.5] * 3, "gamma": [0.01] * 3}),
    ("breadcrumbs_ties", 3, True, {"weight": W, "density": [0.5] * 3, "gamma": [0.01] * 3}),
    ("dare_ties", 3, True, {"weight": W, "density": [0.5] * 3}),
    ("dare_linear", 3, True, {"weight": W, "density": [0.5] * 3}),
    ("della", 3, True, {"weight": W, "density": [0.5] * 3, "epsilon": [0.1] * 3}),
    ("della_linear", 3, True, {"weight": W, "density": [0.5] * 3, "epsilon": [0.1] * 3}),
    ("slerp", 1, True, {"t": 0.4}),
    ("nuslerp", 2, True, {"weight": W[:2]}),
    ("multislerp", 3, True, {"weight": W}),
    ("karcher", 3, False, {}),
    ("model_stock", 3, True, {}),
    ("sce", 3, True, {"select_topk": 0.5}),
    ("passthrough", 1, False, {"scale": [1.0]}),
    ("nearswap", 1, True, {"t": 0.002}),
    ("arcee_fusion", 1, True, {}),
    ("ram", 3, True, {"epsilon": 0.002}),
    ("ramplus_tl", 3, True, {"epsilon": 0.002}),
]


def best_time(
    function: Callable[[], torch.Tensor], repeat: int, clock: Callable[[], float]
) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), torch.empty(0)
    for _ in range(repeat):
        start = clock()
        result = function()
        best = min(best, clock() - start)
    return best, result


def ours(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], tie_break: str
) -> torch.Tensor:
    method = get_method(name)
    full: dict[str, Any] = {}
    for spec in method.params:
        value = params.get(spec.name, spec.default)
        full["lambda_" if spec.name == "lambda" else spec.name] = (
            [value] * len(tensors) if spec.per_model and not isinstance(value, list) else value
        )
    if name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        full["tie_break"] = tie_break
    assert method.kernel is not None
    return method.kernel(tensors, base=base, generator=torch.Generator().manual_seed(0), **full)


def theirs(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any]
) -> torch.Tensor:
    from mergekit.merge_methods import merge_tensors

    if base is None:
        return merge_tensors(tensors, name, parameters=params)
    return merge_tensors([base, *tensors], name, parameters=params, base_index=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2816)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tie-break", choices=["mergekit", "stable"], default="mergekit")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="cpu: process CPU time, robust to other load"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    base32 = 0.02 * torch.randn(args.rows, args.cols, generator=g)
    models = [(base32 + 0.002 * torch.randn(args.rows, args.cols, generator=g)).to(dtype) for _ in range(3)]
    base = base32.to(dtype)
    print(
        f"| method | evomerge s | mergekit s | speed-up | bit-identical |  "
        f"({args.rows}x{args.cols} {args.dtype}, tie_break={args.tie_break}, {args.clock} time)"
    )
    print("|---|---|---|---|---|")
    for name, count, with_base, params in CASES:
        if args.methods and name not in args.methods:
            continue
        chosen, given = models[:count], base if with_base else None
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        t_ours, r_ours = best_time(
            partial(ours, name, chosen, given, params, args.tie_break), args.repeat, clock
        )
        t_theirs, r_theirs = best_time(partial(theirs, name, chosen, given, params), args.repeat, clock)
        same = "random" if get_method(name).randomized else str(torch.equal(r_ours, r_theirs))
        print(f"| {name} | {t_ours:.3f} | {t_theirs:.3f} | {t_theirs / t_ours:.1f}x | {same} |")


if __name__ == "__main__":
    main()
