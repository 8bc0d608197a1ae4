"""A run's elites: listed best first, each exportable as a model dir; old run dirs refused with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evomerge.io.reader import ModelDir
from evomerge.runs.loop import RunStateError, evolve, resume
from evomerge.runs.outputs import UnknownEliteError, export_elite, find_evaluation, run_elites
from evomerge.runs.store import RunStore
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import make_config, quadratic_backend

FORMAT1 = Path(__file__).parent / "data" / "format1_run"  # written by evomerge 0.1.0 (commit c1c6170)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("elites") / "family", FamilySpec())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, family: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("run")
    optimizer = {"name": "cma-es", "population_size": 4}  # the default warm start: best-known
    config = make_config(root, family, optimizer=optimizer, budget={"max_evaluations": 15})
    evolve(config, backend=quadratic_backend(config.search_space()))
    return config.out


def test_the_best_on_dev_comes_first_among_everything_evaluated(finished: Path) -> None:
    elites = run_elites(finished)
    with RunStore.in_dir(finished) as store:
        best = max((e for e in store.evaluations() if e.result.ok), key=lambda e: e.score)
        stored = store.elites()
    assert elites[0].niche == "best on dev" and elites[0].id == best.key
    assert stored, "the optimiser's elites are kept with every checkpoint"
    assert len({e.id for e in elites}) == len(elites)


def test_warm_start_evaluations_carry_labels_and_ids(finished: Path) -> None:
    with RunStore.in_dir(finished) as store:
        warm = [e for e in store.evaluations() if e.generation == -1]
    labels = [e.label for e in warm]
    assert labels[:2] == ["source ft0", "source ft1"]
    assert "default ties (weight 1, density 0.5)" in labels and labels[-1] == "centre of the search space"
    assert [e.key for e in warm] == [f"w{i}" for i in range(len(warm))]
    assert all(e.genome.size == 0 for e in warm if e.label and e.label.startswith("default linear"))


def test_export_writes_a_model_dir_with_its_recipe(finished: Path, tmp_path: Path) -> None:
    for elite in run_elites(finished)[:2]:
        out = export_elite(finished, elite.id, tmp_path / elite.id)
        assert (out / "mergekit_config.yml").read_text() == elite.evaluation.recipe
        assert elite.id in (out / "README.md").read_text()  # the card names what it is
        with ModelDir(out) as model:
            assert model.tensor_names()


def test_export_refuses_an_existing_dir_and_unknown_ids(finished: Path, tmp_path: Path) -> None:
    best = run_elites(finished)[0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(Exception, match="exists"):
        export_elite(finished, best.id, tmp_path / "taken")
    with pytest.raises(UnknownEliteError, match=rf"no evaluation 'g99c0'.*{best.id}"):
        find_evaluation(finished, "g99c0")


def test_a_format_1_run_is_refused_for_resume_but_its_elites_read(tmp_path: Path) -> None:
    run_dir = tmp_path / "old"
    shutil.copytree(FORMAT1, run_dir)
    with pytest.raises(RunStateError, match=r"older evomerge \(run store format 1.*evomerge elites"):
        resume(run_dir)
    elites = run_elites(run_dir)
    assert elites[0].id == "g1c0" and elites[0].evaluation.score == pytest.approx(0.54170425860067)


def test_the_report_places_elites_that_carry_measures(finished: Path) -> None:
    from evomerge.runs.report import write_report
    from evomerge.runs.store import StoredElite

    with RunStore.in_dir(finished) as store:
        keys = [(e.generation, e.index) for e in store.evaluations()[-3:]]
        checkpoint = store.last_checkpoint()
        assert checkpoint is not None
        elites = [
            StoredElite(g, i, f"cell ({n}, 0)", {"toy": 0.1 * n, "toy2": 0.5})
            for n, (g, i) in enumerate(keys)
        ]
        store.save_checkpoint(checkpoint, elites)
    page = write_report(finished).read_text()
    section = page[page.index("Elites (dev split)") :]
    assert "<img" in section.split("</section>")[0]  # the elites placed at their measures
    assert "cell (2, 0)" in section


@pytest.mark.parametrize(
    ("optimizer", "stat"),
    [
        ({"name": "map-elites", "population_size": 4, "resolution": 4}, "coverage"),
        ({"name": "nsga2", "population_size": 4, "objectives": ["toy", "toy2"]}, "hypervolume"),
    ],
)
def test_archive_and_front_stats_are_kept_per_generation_and_plotted(
    tmp_path: Path, family: dict[str, Path], optimizer: dict[str, object], stat: str
) -> None:
    from evomerge.runs.report import write_report

    config = make_config(tmp_path, family, optimizer=optimizer, budget={"max_evaluations": 23})
    evolve(config, backend=quadratic_backend(config.search_space()))
    with RunStore.in_dir(config.out) as store:
        stats = store.stats()
    assert len(stats) >= 3 and all(stat in values for _, values in stats)
    done = [evaluations for evaluations, _ in stats]
    assert done == sorted(done) and done[0] == 7  # the first checkpoint follows the 7-point warm start
    values = [v[stat] for _, v in stats]
    assert values[-1] >= values[0] > 0  # an archive only fills, a front's hypervolume only grows
    page = write_report(config.out).read_text()
    assert "archive or front against evaluations" in page


def test_map_elites_archives_are_read_back_as_heatmap_cells(tmp_path: Path, family: dict[str, Path]) -> None:
    from evomerge.runs.report import archive_cells

    optimizer = {"name": "map-elites", "population_size": 4, "resolution": 4}
    config = make_config(tmp_path, family, optimizer=optimizer, budget={"max_evaluations": 23})
    evolve(config, backend=quadratic_backend(config.search_space()))
    elites = run_elites(config.out)[1:]  # the optimiser's, without the run's best on dev
    archives = archive_cells(elites)
    assert set(archives) == {"toy", "toy2"}  # CycleQD: one archive per task, the other task the measure
    names, cells = archives["toy"]
    assert names == ["toy2"] or len(names) == 1
    archived = [e for e in elites if e.niche.startswith("quality toy,")]
    assert len(cells) == len(archived) > 0
    assert max(cells.values()) == max(e.evaluation.result.tasks["toy"].score for e in archived)
