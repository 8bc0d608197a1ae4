"""Black-box combination of the hetero zoo: evolved combination against each member and hand-set baselines.

The three members (llama, gpt2, qwen2: three families, three tokenizers) are each served by `evomerge
serve`'s app on localhost and reached through the openai client, priced cheapest to dearest. `record`
asks each member every dev and test prompt of `multi` once; then, with no further call:
- CMA-ES evolves the whole genome (vote, pool, router, cascade, aggregate), fitness = dev score;
- NSGA-II evolves it over (dev score, minus the cost per example);
- baselines: each member alone, a majority vote, and a RouteLLM-style router (one threshold on the cheap
  member's confidence: below it, ask the best member on dev), its threshold swept on dev.
A second CMA-ES `evolve` of the same run is timed and its HTTP requests counted (the servers count them).
Writes benchmarks/results/blackbox.md.

`--open-model DIR` (the open + closed case) instead adds a local model dir (an evolved merge from `evomerge
evolve` on the lm zoo, whose task format and world the hetero zoo shares) as a `model_dir` member beside
the three endpoints, evolves the combination of all four with CMA-ES and, from the same cache, the three
endpoints' combination alone; writes the "Open + closed" section of benchmarks/results/blackbox.md.

    evomerge zoo build hetero --size small --out runs/hetero
    .venv/bin/python benchmarks/blackbox.py --zoo runs/hetero --work /tmp/evomerge-blackbox
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.blackbox.combine import BlackBoxSpace, Combination
from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve, load_table, score
from evomerge.blackbox.record import record
from evomerge.zoo import ZooManifest

RESULTS = Path(__file__).parent / "results" / "blackbox.md"
PRICES = {"llama": (1e-6, 2e-6), "gpt2": (3e-6, 6e-6), "qwen2": (1e-5, 2e-5)}  # per input, output token
FEATURES = [
    {"name": "add", "regex": "plus"},
    {"name": "reverse", "regex": "backwards"},
    {"name": "translate", "regex": "greek"},
]


class Counter:
    """An ASGI wrapper that counts the HTTP requests an app receives."""

    def __init__(self, app: Any) -> None:
        self.app, self.requests = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


@contextlib.contextmanager
def served(zoo: ZooManifest) -> Iterator[tuple[dict[str, str], list[Counter]]]:
    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    with contextlib.ExitStack() as stack:
        urls, counters = {}, []
        for name, path in zoo.models.items():
            counter = Counter(create_app(load_served_model(path, name=name)))
            counters.append(counter)
            urls[name] = stack.enter_context(serve_in_thread(counter))
        yield urls, counters


def config(
    zoo: ZooManifest, urls: dict[str, str], work: Path, out: str, *, open_model: Path | None = None,
    operators: tuple[str, ...] = ("vote", "pool", "router", "cascade", "aggregate"), **extra: Any,
) -> BlackBoxConfig:  # fmt: skip
    members: list[dict[str, Any]] = [
        {
            "name": n,
            "endpoint": {"base_url": u, "model": n},
            "price_input": PRICES[n][0],
            "price_output": PRICES[n][1],
        }
        for n, u in urls.items()
    ]
    if open_model is not None:
        members.append({"name": "merge", "model_dir": str(open_model)})  # local: costs nothing a token
    multi = zoo.tasks["multi"]
    return BlackBoxConfig.from_dict(
        {
            "members": members,
            "tasks": [{"name": "multi", "dev": str(multi.dev), "test": str(multi.test)}],
            "cache": str(work / "cache.sqlite"),
            "combine": {
                "features": FEATURES,
                "confidence_member": "llama",
                "operators": list(operators),
            },
            "out": str(work / out),
            **extra,
        }
    )


def one_threshold_router(cfg: BlackBoxConfig, space: BlackBoxSpace) -> tuple[Combination, float]:
    """RouteLLM-style: the cheap member answers when its confidence reaches t, else the best member on dev."""
    dev = load_table(cfg, "dev")
    alone = {
        m: score(cfg, dev, space.decode(g)).behaviour["accuracy"]
        for m, g in enumerate(space.source_genomes())
    }
    strong, cheap = max(alone, key=lambda m: alone[m]), space.order[0]
    base = space.decode(space.source_genomes()[0])
    best: tuple[float, Combination] | None = None
    for t in np.linspace(0, 1, 41):
        c = Combination("cascade", base.vote, base.pool, base.floor, base.router, [float(t)], [cheap, strong])
        s = score(cfg, dev, c).behaviour["accuracy"]
        if best is None or s > best[0]:
            best = (s, c)
    assert best is not None
    return best[1], best[1].thresholds[0]


def _best_alone(cfg: BlackBoxConfig, space: BlackBoxSpace, dev: Any) -> int:
    scores = [score(cfg, dev, space.decode(g)).behaviour["accuracy"] for g in space.source_genomes()]
    return int(np.argmax(scores))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--evaluations", type=int, default=400)
    parser.add_argument("--open-model", type=Path, help="an evolved merge's dir: the open + closed case")
    parser.add_argument("--seen", type=Path, help="the open model's zoo: its train prompts count as seen")
    args = parser.parse_args()
    if args.open_model is not None:
        return open_closed(args)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    zoo = ZooManifest.load(args.zoo)
    load = os.getloadavg()
    budget = {"max_evaluations": args.evaluations}
    with served(zoo) as (urls, counters):
        cma = config(
            zoo, urls, args.work, "cma", budget=budget, optimizer={"name": "cma-es", "population_size": 12}
        )
        start = time.perf_counter()
        report = record(cma)
        record_s = time.perf_counter() - start
        calls_after_record = sum(c.requests for c in counters)
        start = time.perf_counter()
        evolve(cma)
        evolve_s = time.perf_counter() - start
        shutil.rmtree(cma.out)
        start = time.perf_counter()
        evolve(cma)  # a second evolve of the same config (fresh out dir): replay only
        second_s = time.perf_counter() - start
        nsga = config(
            zoo, urls, args.work, "nsga", budget=budget,
            optimizer={"name": "nsga2", "population_size": 16, "objectives": ["score", "behaviour:thrift"]},
        )  # fmt: skip
        evolve(nsga)
        http_during_evolves = sum(c.requests for c in counters) - calls_after_record
    space = BlackBoxSpace(cma)
    rows = json.loads((cma.out / RESULT_NAME).read_text())["rows"]
    router, threshold = one_threshold_router(cma, space)
    test = load_table(cma, "test")
    dev = load_table(cma, "dev")
    r_test, r_dev = score(cma, test, router), score(cma, dev, router)
    rows[f"one-threshold router (t={threshold:.3f})"] = {
        "operator": "cascade", "dev": r_dev.behaviour["accuracy"], "test": r_test.behaviour["accuracy"],
        "test_cost_per_example": -r_test.behaviour["thrift"], "test_calls": r_test.cost["calls"],
    }  # fmt: skip
    moa = dataclasses.replace(
        router,
        operator="aggregate",
        proposers=[1.0] * space.m,
        aggregator=_best_alone(cma, space, dev),
        template=0,
    )
    m_test, m_dev = score(cma, test, moa), score(cma, dev, moa)
    rows["MoA-style (all propose, best member aggregates)"] = {
        "operator": "aggregate", "dev": m_dev.behaviour["accuracy"], "test": m_test.behaviour["accuracy"],
        "test_cost_per_example": -m_test.behaviour["thrift"], "test_calls": m_test.cost["calls"],
    }  # fmt: skip
    front = _front(nsga, dev, test)
    _write(args, zoo, report, rows, front, record_s, evolve_s, second_s, http_during_evolves, load)


PENALTY = 2000.0  # per unit of money per example: the endpoints-only router's cost (1.8e-4) weighs 0.36
OPEN_HEADING = "## Open + closed: an evolved merge beside the endpoints"


def open_closed(args: Any) -> None:
    """The evolved merge (a local model_dir) beside the three endpoints, against each alone."""
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    zoo = ZooManifest.load(args.zoo)
    load = os.getloadavg()
    budget = {"max_evaluations": args.evaluations}
    operators = ("vote", "pool", "router", "cascade")
    cma = {"name": "cma-es", "population_size": 12}
    with served(zoo) as (urls, counters):
        both = config(zoo, urls, args.work, "open", open_model=args.open_model, operators=operators,
                      budget=budget, optimizer=cma)  # fmt: skip
        closed = config(zoo, urls, args.work, "closed", operators=operators, budget=budget, optimizer=cma)
        start = time.perf_counter()
        report = record(both)  # every member's answers; the closed run reads the same cache
        record_s = time.perf_counter() - start
        after_record = sum(c.requests for c in counters)
        penalised = [  # fitness = dev score - PENALTY x cost per example: the free merge now counts
            c.model_copy(update={"cost_penalty": PENALTY, "out": c.out.with_name(c.out.name + "-penalty")})
            for c in (both, closed)
        ]
        for run in (both, closed, *penalised):
            evolve(run)
        http = sum(c.requests for c in counters) - after_record
    rows = json.loads((both.out / RESULT_NAME).read_text())["rows"]
    evolved = {
        f"evolved{tag} ({label})": json.loads((run.out / RESULT_NAME).read_text())["rows"]["evolved"]
        for tag, runs in (("", (both, closed)), (f", cost penalty {PENALTY:g}", penalised))
        for run, label in zip(runs, ("endpoints + merge", "endpoints only"), strict=True)
    }
    rows = {**evolved, **{k: v for k, v in rows.items() if k != "evolved"}}
    runs = dict(zip(evolved, (both, closed, *penalised), strict=True))
    unseen = _unseen_scores(args, runs, zoo) if args.seen is not None else None
    lines = [
        OPEN_HEADING,
        "",
        f"Run {datetime.date.today()} (load average {load[0]:.1f}; shared machine). Command: `python "
        f"benchmarks/blackbox.py --zoo {args.zoo} --work {args.work} --evaluations {args.evaluations} "
        f"--open-model {args.open_model}" + (f" --seen {args.seen}`" if args.seen else "`"),
        "",
        "The member `merge` is a `model_dir`: the best model of `evomerge evolve examples/evolve_lm.yaml`",
        "(the lm zoo's add, reverse and translate specialists merged; 0.618 on the lm zoo's own multi test),",
        "served in-process while recording and priced 0 (a local model). The lm zoo and the hetero zoo",
        "share the task format and the world (the same prompts, numbers and Greek words), not the",
        "tokenizer or the architecture. Operators vote, pool, router, cascade; CMA-ES, "
        f"{args.evaluations} evaluations each, all from one cache, with fitness the dev score and then the dev "
        f"score minus {PENALTY:g} x the cost per example; record {record_s:.1f} s; "
        f"HTTP requests during the four evolves: **{http}**.",
        "",
        "| member | calls | cost |",
        "|---|---|---|",
        *(f"| {n} | {m.spent.calls} | {m.spent.cost:.5f} |" for n, m in report.members.items()),
        "",
        "| combination | operator | dev | test | calls on test | cost per test example |"
        + (" test, prompts unseen by the merge |" if unseen else ""),
        "|---|---|---|---|---|---|" + ("---|" if unseen else ""),
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['operator']} | {row['dev']:.3f} | {row['test']:.3f} | {row['test_calls']:.0f} | "
            f"{row['test_cost_per_example']:.3g} |" + (f" {unseen[name]:.3f} |" if unseen else "")
        )
    lines += [
        "",
        "Read the evolved rows in pairs (with and without the merge, the same search and budget): without",
        "a cost penalty both searches find a router that sends each skill to its specialist endpoint; with",
        "one, the free merge is what a cheap combination can lean on.",
    ]
    if unseen:
        lines += [
            "",
            f"{unseen['_seen']} of the {unseen['_total']} test prompts occur in the lm zoo's train sets, which",
            "the merge's sources were trained on; the last column scores only the others.",
        ]
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    text = text.split(OPEN_HEADING)[0].rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    print("\n".join(lines))


def _unseen_scores(args: Any, runs: dict[str, BlackBoxConfig], zoo: ZooManifest) -> dict[str, Any]:
    """Each row's test score on the prompts absent from the open model's zoo's train sets (cache hits only)."""
    from evomerge.blackbox.evolve import baselines

    seen_zoo = ZooManifest.load(args.seen)
    seen = {
        json.loads(line)["prompt"]
        for task in seen_zoo.tasks.values() if task.train is not None
        for line in task.train.read_text().splitlines()
    }  # fmt: skip
    test_file = zoo.tasks["multi"].test
    lines = test_file.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["prompt"] not in seen]
    subset = args.work / "multi" / "test.jsonl"  # the same prompts: the same requests, so cache hits
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text("\n".join(kept) + "\n")
    out: dict[str, Any] = {"_seen": len(lines) - len(kept), "_total": len(lines)}
    for i, (name, cfg) in enumerate(runs.items()):
        sub = cfg.model_copy(update={"tasks": [cfg.tasks[0].model_copy(update={"test": subset.resolve()})]})
        table = load_table(sub, "test")
        space = BlackBoxSpace(sub)
        best = json.loads((cfg.out / RESULT_NAME).read_text())["best"]
        out[name] = score(sub, table, space.from_text(best)).behaviour["accuracy"]
        if i == 0:  # the four-member run: each member alone, the majority vote
            for name, c in baselines(space).items():
                out[name] = score(sub, table, c).behaviour["accuracy"]
    return out


def _front(cfg: BlackBoxConfig, dev: Any, test: Any) -> list[dict[str, Any]]:
    from evomerge.runs.store import RunStore

    space = BlackBoxSpace(cfg)
    with RunStore.in_dir(cfg.out) as store:
        elites = store.elites()
    points = []
    for _, evaluation in elites:
        c = space.from_text(evaluation.recipe)
        t = score(cfg, test, c)
        points.append(
            {
                "operator": c.operator,
                "dev": evaluation.result.behaviour["accuracy"],
                "dev_cost": -evaluation.result.behaviour["thrift"],
                "test": t.behaviour["accuracy"],
                "test_cost": -t.behaviour["thrift"],
            }
        )
    unique = {json.dumps(p, sort_keys=True): p for p in points}
    return sorted(unique.values(), key=lambda p: p["dev_cost"])


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _write(args: Any, zoo: ZooManifest, report: Any, rows: dict[str, Any], front: list[dict[str, Any]],
           record_s: float, evolve_s: float, second_s: float, http: int, load: tuple[float, ...]) -> None:  # fmt: skip
    lines = [
        "# Black-box combination of the hetero zoo",
        "",
        f"Run {datetime.date.today()} on the shared 2-core CPU machine (load average {load[0]:.1f} at the start;",
        "other helpers' jobs ran alongside, so times are inflated; scores and calls are exact).",
        "",
        f"Command: `python benchmarks/blackbox.py --zoo {args.zoo} --work {args.work} --evaluations {args.evaluations}`",
        f"(zoo: `evomerge zoo build hetero --size small --seed {zoo.seed}`, task `multi`: dev "
        f"{_lines(zoo.tasks['multi'].dev)}, test {_lines(zoo.tasks['multi'].test)} prompts).",
        "",
        "## Record",
        "",
        "| member | calls | input tokens | output tokens | cost |",
        "|---|---|---|---|---|",
    ]
    for name, member in report.members.items():
        s = member.spent
        lines.append(f"| {name} | {s.calls} | {s.input_tokens} | {s.output_tokens} | {s.cost:.5f} |")
    lines += [
        "",
        f"Record took {record_s:.1f} s. CMA-ES evolve ({args.evaluations} evaluations) {evolve_s:.1f} s; the second "
        f"evolve of the same config {second_s:.1f} s; HTTP requests the servers received during both CMA-ES "
        f"evolves and the NSGA-II one: **{http}**.",
        "",
        "## Test score against calls and cost (task multi)",
        "",
        "| combination | operator | dev | test | calls on test | cost per test example |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['operator']} | {row['dev']:.3f} | {row['test']:.3f} | {row['test_calls']:.0f} | "
            f"{row['test_cost_per_example']:.3g} |"
        )
    lines += [
        "",
        "## NSGA-II front over (dev score, cost)",
        "",
        "| operator | dev | dev cost/example | test | test cost/example |",
        "|---|---|---|---|---|",
    ]
    for p in front:
        lines.append(
            f"| {p['operator']} | {p['dev']:.3f} | {p['dev_cost']:.3g} | {p['test']:.3f} | {p['test_cost']:.3g} |"
        )
    lines += [
        "",
        "The zoo's members were never trained to read proposals, so aggregation cannot help here: the",
        "MoA-style row and the aggregate operator are measured for cost and plumbing, not as a fair test of",
        "the idea. The open + closed case (an evolved merge from `evomerge evolve` beside the endpoints) is",
        "the section below (`--open-model`).",
    ]
    previous = RESULTS.read_text() if RESULTS.is_file() else ""
    kept = OPEN_HEADING + previous.split(OPEN_HEADING)[1] if OPEN_HEADING in previous else ""
    RESULTS.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
