"""search.space dataflow and ps+dfs in the evolve config and loop: bad input refused before any model
loads; real runs over a tiny pool (store, resume, report, export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.runs.config import EvolveConfig, check_inputs
from evomerge.runs.loop import evolve, resume
from evomerge.runs.store import RunStore
from evomerge.zoo.random_models import FamilySpec, build_family


def config(family: dict[str, Path], out: Path, **overrides: Any) -> EvolveConfig:
    data: dict[str, Any] = {
        "base_model": str(family["base"]),
        "models": [str(family["ft0"]), str(family["ft1"])],
        "search": {"space": "dataflow", "dataflow": {"repeats": 2, "max_path_length": 6}},
        "optimizer": {"name": "cma-es", "population_size": 4, "sigma0": 0.3},
        "budget": {"max_evaluations": 10},
        "fitness": [
            {"name": "sums", "dev": str(family["dev"]), "test": str(family["test"]), "metric": "perplexity"}
        ],
        "evaluation": {"device": "cpu"},
        "out": str(out),
    }
    data.update(overrides)
    return EvolveConfig.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"merge_method": "ties"}, r"merge_method: .*'dataflow' merges no parameters"),
        (
            {"search": {"space": "dataflow", "dataflow": {"repeats": 0}}},
            r"search.dataflow.repeats: .*r = 0.*repeats >= 1",
        ),
        ({"search": {"space": "ps+dfs"}}, r"merge_method: .*'ps\+dfs' searches the parameter space first"),
        (
            {"search": {"space": "parameter", "dataflow": {"repeats": 3}}, "merge_method": "ties"},
            r"search.dataflow: set",
        ),
        (
            {"search": {"space": "dataflow", "dataflow": {"owner": "/elsewhere"}}},
            r"search.dataflow.owner: .*not in the pool",
        ),
        ({"search": {"space": "dataflow", "dataflow": {"max_path_length": 0}}}, r"max_path_length"),
        (
            {"optimizer": {"name": "cma-es", "start": "best-source"}},
            r"optimizer.start: .*best-known or center",
        ),
    ],
)
def test_bad_dataflow_configs_are_refused_when_read(
    family: dict[str, Path], tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config(family, tmp_path / "run", **overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hidden_size": 48}, r"hidden size 48, the owner .* 32.*one width"),
        ({"vocab_size": 120}, r"vocabulary of 120 tokens, the owner .* 96"),
    ],
)
def test_a_pool_that_cannot_share_hidden_states_is_refused_before_any_model_loads(
    family: dict[str, Path], tmp_path: Path, override: dict[str, int], message: str
) -> None:
    other = build_family(tmp_path / "other", FamilySpec(n_finetunes=0, overrides=override))["base"]
    bad = config(family, tmp_path / "run", models=[str(family["ft0"]), str(other)])
    with pytest.raises(ConfigError, match=message):
        check_inputs(bad)
    assert not (tmp_path / "run").exists()


def test_the_depths_of_a_pool_may_differ(family: dict[str, Path], tmp_path: Path) -> None:
    deeper = build_family(tmp_path / "deep", FamilySpec(n_finetunes=0, overrides={"num_hidden_layers": 6}))[
        "base"
    ]
    space = check_inputs(config(family, tmp_path / "run", models=[str(family["ft0"]), str(deeper)]))
    assert len(space.slots) == (4 + 6) * 2  # type: ignore[attr-defined]


def stored(run_dir: Path) -> list[tuple[int, int, list[float], str, float | None]]:
    with RunStore.in_dir(run_dir) as store:
        return [
            (e.generation, e.index, e.genome.tolist(), e.recipe, e.result.score) for e in store.evaluations()
        ]


@pytest.mark.slow
def test_a_dataflow_run_resumes_like_one_long_run_and_writes_its_outputs(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from evomerge.runs.finalize import finalize
    from evomerge.runs.outputs import export_elite, read_results

    short = config(family, tmp_path / "short", budget={"max_evaluations": 6})
    evolve(short)
    resumed = resume(short.out, max_evaluations=10)
    straight = evolve(config(family, tmp_path / "straight"))
    assert stored(resumed.run_dir) == stored(straight.run_dir) and len(stored(straight.run_dir)) == 10
    with RunStore.in_dir(straight.run_dir) as store:
        labels = [e.label for e in store.evaluations() if e.label]
    assert labels == ["source ft0", "source ft1"]  # the warm start: each pool model alone

    written = finalize(straight.run_dir)
    report = written["report"].read_text()
    best = straight.best
    assert best is not None
    if best.genome.size:  # a path (the owner alone included): drawn
        assert "<svg" in report and 'fill="#4c72b0"' in report
    else:  # another pool model alone, outside the space
        assert "outside the search space" in report
    assert {row.kind for row in read_results(straight.run_dir) or []} >= {"evolved", "source", "baseline"}
    with RunStore.in_dir(straight.run_dir) as store:
        evolved = next(e for e in store.evaluations() if e.generation >= 0 and e.result.ok)
    from evomerge.eval.loading import load_model

    out = export_elite(straight.run_dir, evolved.key, tmp_path / "exported")
    model, _ = load_model(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == len(straight_space(straight.run_dir).from_text(evolved.recipe))


def straight_space(run_dir: Path) -> Any:
    from evomerge.runs.loop import load_run_config

    return load_run_config(run_dir).search_space()


@pytest.mark.slow
def test_ps_then_dfs_merges_the_parameter_space_best_into_the_pool(
    family: dict[str, Path], tmp_path: Path
) -> None:
    both = config(
        family,
        tmp_path / "both",
        merge_method="linear",
        search={"space": "ps+dfs", "granularity": "model", "dataflow": {"repeats": 1, "ps_share": 0.5}},
        budget={"max_evaluations": 16},
        optimizer={"name": "cma-es", "population_size": 4, "sigma0": 0.3, "start": "center"},
    )
    summary = evolve(both)
    assert (both.out / "ps-best" / "config.json").is_file()
    assert len(stored(both.out / "ps")) == 8 and summary.evaluations == 8
    with RunStore.in_dir(both.out) as store:
        first = store.evaluations()[0]
    space = both.search_space()
    assert space.pool[space.owner].name == "ps-best"  # type: ignore[attr-defined]
    assert first.recipe == space.to_text(
        space.decode(first.genome)
    )  # a path over the pool with the merge in it


def test_a_tokenizer_with_other_ids_is_refused_even_at_the_same_size(
    family: dict[str, Path], tmp_path: Path
) -> None:
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(family["ft1"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match=r"tokenizer.json maps tokens to other ids than the owner"):
        check_inputs(config(family, tmp_path / "run", models=[str(family["ft0"]), str(other)]))


class Crash(BaseException):
    """Escapes every `except Exception`, like a kill would: the run stops where it is."""


def scores(run_dir: Path) -> list[tuple[int, int, list[float], float | None]]:
    with RunStore.in_dir(run_dir) as store:
        return [(e.generation, e.index, e.genome.tolist(), e.result.score) for e in store.evaluations()]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["parameter phase", "path phase"])
def test_a_ps_dfs_run_killed_in_either_phase_resumes_like_an_uninterrupted_one(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from evomerge.backends.local import LocalBackend
    from evomerge.dataflow.backend import PathBackend

    def both(out: Path) -> EvolveConfig:
        search = {"space": "ps+dfs", "granularity": "model", "dataflow": {"repeats": 2, "ps_share": 0.5}}
        return config(family, out, merge_method="linear", search=search, budget={"max_evaluations": 20})

    target = LocalBackend if where == "parameter phase" else PathBackend
    original, calls = target.evaluate, {"n": 0}

    def crashing(self: Any, candidate: Any, seed: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 6:
            raise Crash
        return original(self, candidate, seed)

    monkeypatch.setattr(target, "evaluate", crashing)
    with pytest.raises(Crash):
        evolve(both(tmp_path / "killed"))
    monkeypatch.setattr(target, "evaluate", original)
    resume(tmp_path / "killed")
    evolve(both(tmp_path / "straight"))
    for run in ("ps", "."):
        assert scores(tmp_path / "killed" / run) == scores(tmp_path / "straight" / run)
    assert len(scores(tmp_path / "killed" / "ps")) == 10 and len(scores(tmp_path / "killed")) == 10
    with RunStore.in_dir(tmp_path / "killed") as killed, RunStore.in_dir(tmp_path / "straight") as straight:
        assert killed.chosen() == straight.chosen()  # the guard's verdict (on the searched lines: no limit)
        one, other = killed.best(), straight.best()
        assert one is not None and other is not None and (one.key, one.score) == (other.key, other.score)


@pytest.mark.slow
def test_the_guard_judges_the_path_search_best_on_held_out_dev_lines_and_pays_for_them(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from evomerge.dataflow.guard import HELD_OUT, GuardVerdict

    fitness = [{"name": "sums", "dev": str(family["dev"]), "metric": "perplexity", "limit": 6}]
    search = {"space": "ps+dfs", "granularity": "model", "dataflow": {"repeats": 2, "ps_share": 0.5}}
    both = config(
        family,
        tmp_path / "both",
        merge_method="linear",
        search=search,
        fitness=fitness,
        budget={"max_evaluations": 20},
    )
    summary = evolve(both)
    # The path search's 10 evaluations less the guard's two scorings of 6 held-out lines (2 candidates' worth).
    assert summary.evaluations == 8 and len(scores(both.out / "ps")) == 10
    with RunStore.in_dir(both.out) as store:
        raw, chosen = store.best_on_dev(), store.chosen()
        reference = next(e for e in store.evaluations() if e.label == "source ps-best")
    assert raw is not None and summary.best is not None
    # The path search's warm start begins with ps-best alone, as the identity path inside the space.
    space = both.search_space()
    assert reference.key == "w0" and space.decode(reference.genome) == space.identity()  # type: ignore[attr-defined]
    if raw.key == reference.key:  # ps-best alone is the best on dev: nothing to judge
        assert chosen is None and summary.best.key == reference.key
        return
    assert chosen is not None
    verdict = GuardVerdict.from_dict(chosen[1])
    assert verdict.examples == HELD_OUT and verdict.n == 6 and verdict.reference == reference.key
    assert summary.best.key == verdict.chosen == (raw.key if verdict.accepted else reference.key)
    from evomerge.runs.outputs import run_elites
    from evomerge.runs.report import write_report

    assert "guard: the path search" in write_report(both.out).read_text()
    first, second = run_elites(both.out)[:2]
    if not verdict.accepted:  # both listed: the result (ps-best) first, then the refused best on dev
        assert (first.id, second.id) == (reference.key, raw.key) and "refused" in second.niche


@pytest.mark.slow
def test_a_plateaued_parameter_space_phase_hands_the_rest_of_the_budget_to_the_path_search(
    family: dict[str, Path], tmp_path: Path
) -> None:
    search = {
        "space": "ps+dfs",
        "granularity": "model",
        "dataflow": {"repeats": 1, "ps_share": 0.8, "ps_patience": 1},
    }
    both = config(
        family, tmp_path / "both", merge_method="linear", search=search, budget={"max_evaluations": 30}
    )
    summary = evolve(both)
    spent = len(scores(both.out / "ps"))
    assert spent < 24  # stopped by its patience before its share (24)
    assert summary.evaluations == 30 - spent  # no limit on the task: the guard costs nothing


def test_an_evolve_yaml_written_with_the_old_ps_share_default_still_loads(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from evomerge.runs.config import DataflowSettings
    from evomerge.runs.loop import load_run_config, prepare_run_dir

    old_dump = DataflowSettings().model_dump(mode="json") | {"ps_share": 0.75}  # every parameter run wrote it
    search = {"space": "parameter", "dataflow": old_dump}
    loaded = config(family, tmp_path / "run", merge_method="linear", search=search)
    assert loaded.identity() == config(family, tmp_path / "run", merge_method="linear", search={}).identity()
    with pytest.raises(ConfigError, match=r"search.dataflow: set"):  # a share the user set is still refused
        config(family, tmp_path / "run", merge_method="linear", search={"dataflow": {"ps_share": 0.6}})
    run_dir = prepare_run_dir(loaded, force=False)  # this version writes no data-flow block for it
    assert "ps_share" not in (run_dir / "evolve.yaml").read_text()
    assert load_run_config(run_dir).identity() == loaded.identity()
