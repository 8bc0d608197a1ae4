"""The `backend` block: names and blocks, Ray's settings refused before any model loads, per-node paths.

None of these starts Ray (they run in the default suite).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.backends.ray import RaySettings, map_path, map_recipe
from evomerge.backends.registry import (
    BackendSettings,
    LocalSettings,
    make_backend,
    parse_backend_settings,
    register_backend,
)
from evomerge.errors import ConfigError
from evomerge.merge.config import MergeConfig
from evomerge.runs.config import EvolveConfig
from evomerge.zoo.random_models import FamilySpec, build_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("ray-config") / "family", FamilySpec())


def config(root: Path, family: dict[str, Path], **overrides: Any) -> EvolveConfig:
    task = root / "dev.jsonl"
    task.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    data: dict[str, Any] = {
        "base_model": str(family["base"]),
        "models": [str(family["ft0"]), str(family["ft1"])],
        "merge_method": "linear",
        "fitness": [{"dev": str(task)}],
        "out": str(root / "run"),
        **overrides,
    }
    return EvolveConfig.from_dict(data)


def test_a_backend_name_still_reads_and_a_block_chooses_its_settings(tmp_path: Path, family: dict) -> None:
    assert config(tmp_path, family).backend == LocalSettings()
    assert config(tmp_path, family, backend="local").backend == LocalSettings()
    chosen = config(tmp_path, family, backend={"name": "ray", "workers": 3, "num_gpus": 0.25}).backend
    assert isinstance(chosen, RaySettings) and (chosen.workers, chosen.num_gpus, chosen.num_cpus) == (
        3,
        0.25,
        1,
    )


def test_a_saved_config_reads_back_with_its_backend_block(tmp_path: Path, family: dict) -> None:
    original = config(tmp_path, family, backend={"name": "ray", "workers": 2, "address": "auto"})
    saved = tmp_path / "evolve.yaml"
    saved.write_text(yaml.safe_dump(original.model_dump(mode="json")))
    assert EvolveConfig.from_yaml(saved).backend == original.backend


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"name": "ray", "workers": 0}, r"backend.workers: .*greater than or equal to 1"),
        ({"name": "ray", "num_gpus": -1}, r"backend.num_gpus: .*greater than or equal to 0"),
        ({"name": "ray", "gpus": 1}, r"backend.gpus: 'ray' has no setting 'gpus'"),
        (
            {"name": "local", "workers": 2},
            r"backend.workers: 'local' has no setting 'workers'; it is a setting of ray",
        ),
        ({"name": "local", "schedule": "steady-state"}, r"backend.schedule: .*'synchronous'"),
        ({"name": "ray", "schedule": "eager"}, r"backend.schedule: .*'steady-state'"),
        ({"name": "ray", "paths": {"models": "/mnt/models"}}, r"backend.paths: .*absolute path"),
        ({"name": "slurm"}, r"backend: unknown backend 'slurm'; known: local, ray"),
        (["ray"], r"backend: expected a backend name"),
    ],
)
def test_bad_backend_settings_are_located(tmp_path: Path, family: dict, backend: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, family, backend=backend)


def test_steady_state_needs_an_optimizer_told_one_result_at_a_time(tmp_path: Path, family: dict) -> None:
    steady = {"name": "ray", "workers": 2, "schedule": "steady-state"}
    with pytest.raises(ConfigError, match=r"'cma-es' cannot take .*natural-niches, random"):
        config(tmp_path, family, backend=steady)
    assert (
        config(tmp_path, family, backend=steady, optimizer={"name": "random"}).backend.schedule
        == "steady-state"
    )


def test_where_a_run_is_evaluated_is_not_part_of_its_identity_but_the_schedule_is(
    tmp_path: Path, family: dict
) -> None:
    local = config(tmp_path, family, optimizer={"name": "random"})
    on_ray = config(tmp_path, family, optimizer={"name": "random"}, backend={"name": "ray", "workers": 4})
    steady = config(
        tmp_path, family, optimizer={"name": "random"}, backend={"name": "ray", "schedule": "steady-state"}
    )
    assert local.identity() == on_ray.identity() != steady.identity()


def test_a_missing_ray_is_refused_naming_the_extra(
    tmp_path: Path, family: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'evomerge\[ray\]'"):
        config(tmp_path, family, backend="ray")


def test_a_registered_backend_is_chosen_by_name() -> None:
    made: list[Any] = []

    def factory(settings: BackendSettings, request: Any) -> Any:
        made.append(settings)
        return "a backend"

    register_backend("test-only", factory)
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("test-only", factory)
    assert make_backend("test-only", request=None) == "a backend"  # type: ignore[arg-type]
    assert made[0].name == "test-only"
    with pytest.raises(ConfigError, match="has no setting 'workers'"):
        make_backend({"name": "test-only", "workers": 2}, request=None)  # type: ignore[arg-type]


# --- per-node paths -------------------------------------------------------------------------------------
def test_paths_map_the_longest_prefix_on_whole_components() -> None:
    paths = {"/data": "/mnt/a", "/data/models": "/nvme/models"}
    assert map_path("/data/models/ft0", paths) == "/nvme/models/ft0"
    assert map_path("/data/other", paths) == "/mnt/a/other"
    assert map_path("/database/x", paths) == "/database/x"  # not a component of /data
    assert map_path("/data", paths) == "/mnt/a"


def test_a_recipe_reads_its_models_under_the_workers_paths(family: dict[str, Path]) -> None:
    recipe = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["ft0"]), "parameters": {"weight": 0.5}}],
        }
    )
    root = str(family["base"].parent)
    mapped = map_recipe(recipe, {root: "/elsewhere"})
    assert mapped.base_model == "/elsewhere/base" and mapped.models[0].model == "/elsewhere/ft0"
    assert mapped.models[0].parameters == recipe.models[0].parameters
    assert map_recipe(recipe, {}) is recipe
    assert map_recipe(0.5, {root: "/elsewhere"}) == 0.5  # not a recipe (a whole model, a number): as is


def test_the_example_configs_backend_blocks_validate() -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    blocks = [yaml.safe_load(path.read_text()).get("backend", "local") for path in examples]
    parsed = [parse_backend_settings(block) for block in blocks]
    assert any(
        isinstance(settings, RaySettings) and settings.schedule == "steady-state" for settings in parsed
    )
