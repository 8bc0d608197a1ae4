"""Every bad evolve input fails with one clear error before any evaluation starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.errors import ConfigError, TensorMismatchError
from evomerge.runs.config import EvolveConfig, check_inputs
from evomerge.runs.loop import evolve
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import make_config, quadratic_backend


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("config") / "family", FamilySpec())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"merge_method": "tiez"}, r"merge_method: .*unknown method 'tiez'"),
        ({"merge_method": "passthrough"}, r"merge_method: .*not a parameter-space method"),
        ({"models": ["/nonexistent/model"]}, r"models: .*at least 2|models.*does not exist"),
        ({"base_model": "/nonexistent/base"}, r"base_model: .*model dir /nonexistent/base does not exist"),
        (
            {"fitness": [{"dev": "/nonexistent/dev.jsonl"}]},
            r"fitness.0.dev: .*/nonexistent/dev.jsonl does not exist",
        ),
        ({"optimizer": {"name": "nsga3"}}, r"optimizer.name: .*unknown optimizer 'nsga3'"),
        # refused when the config is read, before any model loads or any run dir is made
        (
            {"optimizer": {"name": "cma-es", "population_size": 2}},
            r"optimizer.population_size: .*greater than or equal to 4",
        ),
        (
            {"optimizer": {"name": "random", "sigma0": 0.3}},
            r"optimizer.sigma0: 'random' has no setting 'sigma0'; it is a setting of cma-es",
        ),
        ({"optimizer": {"name": "cma-es", "restarts": "sometimes"}}, r"optimizer.restarts: .*'ipop'"),
        ({"optimizer": {"start": "anywhere"}}, r"optimizer.start: .*'best-known'"),
        ({"optimizer": "cma-es"}, r"optimizer: expected a mapping"),
        ({"backend": "slurm"}, r"backend: unknown backend 'slurm'; known: local, ray"),
        # issue 8's bad inputs, each refused when the config is read
        (
            {"optimizer": {"name": "map-elites", "measures": ["toy", "nope"]}},
            r"optimizer.measures.*'nope'",
        ),
        (
            {"optimizer": {"name": "map-elites", "measures": ["toy"], "resolution": 0}},
            r"optimizer.resolution",
        ),
        ({"optimizer": {"name": "nsga2", "objectives": ["toy"]}}, r"optimizer.objectives: .*at least 2"),
        ({"optimizer": {"name": "nsga2", "objectives": ["toy", "nope"]}}, r"optimizer.objectives.*'nope'"),
        (
            {"optimizer": {"name": "natural-niches", "sigma0": 0.2}},
            r"optimizer.sigma0: 'natural-niches' has no setting 'sigma0'; it is a setting of cma-es",
        ),
        ({"budget": {}}, r"budget: .*max_evaluations, max_wall_seconds"),
        ({"serach": {}}, r"unknown field 'serach'"),
        ({"search": {"granularity": "layers"}}, r"search.granularity"),
        ({"evaluation": {"device": "gpu"}}, r"evaluation.device: .*'gpu' is not a device torch knows"),
    ],
)
def test_bad_config_fields_are_located(
    tmp_path: Path, family: dict[str, Path], overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, family, **overrides)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"parameters": {"weight": [0, 1], "gamma": [0, 0.1]}}, r"takes no parameter 'gamma'"),
        (
            {"parameters": {"weight": [0, 1], "density": [0.0, 1.0]}},
            r"search.parameters.density.*outside \(0, 1\]",
        ),
        (
            {"parameters": {"weight": [0, 1], "density": [0.5, 2.0]}},
            r"search.parameters.density.*2.0 is outside",
        ),
    ],
)
def test_bad_search_space_fails_before_any_evaluation(
    tmp_path: Path, family: dict[str, Path], search: dict, message: str
) -> None:
    assert_refused_before_any_evaluation(make_config(tmp_path, family, search=search), message)


def test_sources_with_other_shapes_name_the_tensor_and_both_shapes(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    other = build_family(tmp_path / "wide", FamilySpec(overrides={"vocab_size": 128}))
    config = make_config(tmp_path, family, models=[str(family["ft0"]), str(other["ft0"])])
    with pytest.raises(
        TensorMismatchError,
        match=r"'(lm_head|model.embed_tokens).weight' has shape \[128, 32\] .* but \[96, 32\]",
    ):
        check_inputs(config)


def test_from_yaml_names_the_file(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert EvolveConfig.from_yaml(good) == config
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config.model_dump(mode="json"), "seed": "many"}))
    with pytest.raises(ConfigError, match=r"bad.yaml: seed: "):
        EvolveConfig.from_yaml(bad)
    (tmp_path / "broken.yaml").write_text("models: [a, b\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML"):
        EvolveConfig.from_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        EvolveConfig.from_yaml(tmp_path / "missing.yaml")


def test_default_search_parameters_for_ties(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family, search={"granularity": "model"})
    assert set(config.search_space().parameters) == {"weight", "density"}


def _spy(calls: list[Any]):  # type: ignore[no-untyped-def]
    from evomerge.backends.base import FunctionBackend

    return FunctionBackend(lambda recipe, seed: calls.append(recipe) or 0.0)


def test_the_spy_would_see_evaluations(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 2})
    calls: list[Any] = []
    evolve(config, backend=_spy(calls))
    assert len(calls) == 2
    assert quadratic_backend  # the shared problem module imports cleanly


def test_device_auto_is_the_cpu_without_a_gpu_and_an_unseen_gpu_is_refused(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert make_config(tmp_path, family).evaluation.torch_device() == torch.device("cpu")
    config = make_config(tmp_path, family, evaluation={"device": "cuda:0"})
    with pytest.raises(ConfigError, match=r"evaluation.device: 'cuda:0' but torch sees no CUDA device"):
        evolve(config, backend=quadratic_backend(config.search_space()))
    assert not config.out.exists()  # refused before anything was written


# --- search.space: weights (whole models) -------------------------------------------------------------
def weights_config(tmp_path: Path, family: dict[str, Path], **overrides: Any) -> EvolveConfig:
    return make_config(
        tmp_path,
        family,
        merge_method=None,
        search={"space": "weights"},
        optimizer={"name": "natural-niches", "population_size": 4},
        **overrides,
    )


def test_the_weights_space_needs_no_merge_method(tmp_path: Path, family: dict[str, Path]) -> None:
    from evomerge.search.weights import WeightsSpace

    space = weights_config(tmp_path, family).search_space()
    assert isinstance(space, WeightsSpace) and space.dim > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"merge_method": None},
            r"merge_method: search.space 'parameter' evolves a merge method's parameters",
        ),
        (
            {"merge_method": "ties", "search": {"space": "weights"}},
            r"merge_method: search.space 'weights' .* remove merge_method \('ties'\)",
        ),
        (
            {"merge_method": None, "search": {"space": "weights", "granularity": "model"}},
            r"search: granularity .* 'weights' takes none of them",
        ),
        (
            {"search": {"space": "recipes"}},
            r"search.space: .*'parameter', 'weights', 'dataflow' or 'ps\+dfs'",
        ),
    ],
)
def test_the_merge_method_fits_the_space(
    tmp_path: Path, family: dict[str, Path], overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, family, **overrides)


def test_natural_niches_over_sources_of_other_shapes_is_refused_before_any_weights_are_read(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from evomerge.io.reader import ModelDir

    other = build_family(tmp_path / "wide", FamilySpec(overrides={"vocab_size": 128}))
    config = weights_config(tmp_path, family, models=[str(family["ft0"]), str(other["ft0"])])
    read: list[str] = []
    monkeypatch.setattr(ModelDir, "get", lambda self, name: read.append(name))
    calls: list[Any] = []
    with pytest.raises(TensorMismatchError, match=r"has shape \[128, 32\] .* but \[96, 32\]"):
        evolve(config, backend=_spy(calls))
    assert read == [] and calls == [] and not config.out.exists()


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (
            {"name": "map-elites", "measures": ["toy"], "mutation": "svd"},
            r"optimizer.mutation: 'svd'.*weights",
        ),
    ],
)
def test_an_optimiser_that_cannot_search_the_space_fails_before_any_evaluation(
    tmp_path: Path, family: dict[str, Path], optimizer: dict, message: str
) -> None:
    assert_refused_before_any_evaluation(make_config(tmp_path, family, optimizer=optimizer), message)


def assert_refused_before_any_evaluation(config: EvolveConfig, message: str) -> None:
    calls: list[Any] = []
    with pytest.raises(ConfigError, match=message):
        evolve(config, backend=_spy(calls))
    assert calls == [] and not config.out.exists()
