"""The digits zoo: MLPClassifier save/load, task files, specialists that each master their half."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.errors import SourceError
from evomerge.eval.evaluator import Evaluator
from evomerge.eval.tasks import load_task
from evomerge.zoo import ZooManifest, build
from evomerge.zoo.digits import HALVES, DigitsData, MLPClassifier, accuracy


@pytest.fixture(scope="module")
def digits_zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooManifest:
    return build("digits", tmp_path_factory.mktemp("zoo") / "digits", size="tiny", seed=0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = MLPClassifier((64, 16, 10))
    model.reset_parameters(torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "evomerge_mlp" and config["layer_sizes"] == [64, 16, 10]
    loaded = MLPClassifier.from_pretrained(tmp_path)
    features = torch.rand(5, 64)
    assert torch.equal(loaded(features), model(features))
    assert loaded(features).shape == (5, 10)


def test_parameter_names_are_stable() -> None:
    names = list(MLPClassifier((64, 8, 10)).state_dict())
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]


def test_bad_dirs_are_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"config\.json"):
        MLPClassifier.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SourceError, match="evomerge_mlp"):
        MLPClassifier.from_pretrained(tmp_path)


def test_bad_layer_sizes() -> None:
    with pytest.raises(ValueError, match="layer_sizes"):
        MLPClassifier((10, 10))


def test_manifest_and_task_files(digits_zoo: ZooManifest) -> None:
    assert set(digits_zoo.models) == set(HALVES) and digits_zoo.targets == ["digits"]
    assert not digits_zoo.missing_files()
    rows = [json.loads(line) for line in digits_zoo.tasks["low"].test.read_text().splitlines()]
    assert rows and all(len(row["features"]) == 64 and row["label"] in HALVES["low"] for row in rows)
    # the splits are disjoint cuts of the 1797 images
    sizes = [
        len(digits_zoo.tasks["digits"].split(s).read_text().splitlines()) for s in ("train", "dev", "test")
    ]
    assert sum(sizes) == 1797


def test_the_mixed_task_groups_its_lines_by_half(digits_zoo: ZooManifest) -> None:
    rows = [json.loads(line) for line in digits_zoo.tasks["digits"].test.read_text().splitlines()]
    assert {row["group"] for row in rows} == set(HALVES)
    assert all(row["label"] in HALVES[row["group"]] for row in rows)
    halves = [
        json.loads(line) for half in HALVES for line in digits_zoo.tasks[half].test.read_text().splitlines()
    ]
    assert all("group" not in row for row in halves)  # a single-half task has nothing to split


def test_a_specialist_scores_its_own_half_of_the_mixed_task(digits_zoo: ZooManifest) -> None:
    task = load_task(digits_zoo.tasks["digits"].test, metric="accuracy", name="digits")
    model = MLPClassifier.from_pretrained(digits_zoo.models["low"])
    groups = Evaluator([task]).evaluate(model).tasks["digits"].groups
    assert set(groups) == set(HALVES) and groups["low"] > 0.85 and groups["high"] < 0.2


def test_specialists_master_their_half(digits_zoo: ZooManifest) -> None:
    data = DigitsData.load(digits_zoo.seed)
    for half, classes in HALVES.items():
        model = MLPClassifier.from_pretrained(digits_zoo.models[half])
        other = HALVES["high" if half == "low" else "low"]
        assert accuracy(model, *data.subset("test", classes)) > 0.85
        assert accuracy(model, *data.subset("test", other)) < 0.2
    base = MLPClassifier.from_pretrained(digits_zoo.base)
    assert accuracy(base, *data.subset("test", None)) < 0.3
