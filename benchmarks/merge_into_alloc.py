"""In-memory `merge_into` with and without `retain_freed_memory` (glibc keeps freed temporaries).

`mallopt` settings are process-wide, so each measurement runs in a fresh child process; the two kinds
alternate, pair by pair, so that both see the same machine load. Per child: load the sources once, merge
per-layer task-arithmetic weights of two fine-tunes into the live model `--calls` times, report the
fastest call (the first call warms up and is left out).

    nice .venv/bin/python benchmarks/merge_into_alloc.py --hidden 1024 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024, help="8-layer random Llama of this hidden size")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--family", type=Path, default=None, help="reuse this family dir (built if missing)")
    parser.add_argument("--child", choices=["plain", "retain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    family = args.family or Path(tempfile.gettempdir()) / f"evomerge-merge-into-{args.hidden}"
    if args.child:
        print(json.dumps(_child(family, args.child, args.calls)))
        return
    _build(family, args.hidden)
    rows = []
    for _ in range(args.pairs):
        pair = {kind: _spawn(family, kind, args) for kind in ("plain", "retain")}
        rows.append(pair)
        print(f"plain {pair['plain']:.3f} s   retain {pair['retain']:.3f} s   "
              f"{pair['plain'] / pair['retain']:.2f}x", flush=True)  # fmt: skip
    ratios = [row["plain"] / row["retain"] for row in rows]
    print(
        f"merge_into, best call per process: retain_freed_memory is {min(ratios):.2f}-{max(ratios):.2f}x faster"
    )


def _build(family: Path, hidden: int) -> None:
    from evomerge.zoo.random_models import FamilySpec, build_family

    if not (family / "ft1").exists():
        sizes = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": 8}
        build_family(
            family, FamilySpec(overrides={**sizes, "num_attention_heads": 8, "num_key_value_heads": 8})
        )


def _spawn(family: Path, kind: str, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--child", kind, "--family", str(family), "--calls", str(args.calls)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["best_s"])


def _child(family: Path, kind: str, calls: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.allocator import retain_freed_memory
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import merge_into
    from evomerge.merge.sources import SourceSet

    torch.set_num_threads(1)
    if kind == "retain":
        retain_freed_memory()
    weights = [0.3, 0.5, 0.7, 0.2, 0.4, 0.6, 0.8, 0.9]
    config = MergeConfig.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(family / "base"),
        "models": [{"model": str(family / "ft0"), "parameters": {"weight": weights}},
                   {"model": str(family / "ft1"), "parameters": {"weight": 0.5}}],
    })  # fmt: skip
    sources = SourceSet.load(config)
    model = AutoModelForCausalLM.from_pretrained(family / "base", dtype=torch.float32)
    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        merge_into(model, config, sources, threads=1)
        times.append(time.perf_counter() - start)
    return {"best_s": min(times[1:])}


if __name__ == "__main__":
    main()
