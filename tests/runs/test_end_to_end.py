"""A real run on a tiny random family: evolve in memory, then every output, checked against mergekit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.api import merge
from evomerge.runs.config import EvolveConfig
from evomerge.runs.finalize import finalize
from evomerge.runs.loop import evolve
from evomerge.runs.outputs import BEST_MERGEKIT, BEST_RECIPE, read_results, run_elites

from .fake_problem import build_scoreable_family

pytestmark = pytest.mark.slow

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    family = build_scoreable_family(root)
    config = EvolveConfig.from_dict(
        {
            "base_model": str(family["base"]),
            "models": [str(family["ft0"]), str(family["ft1"])],
            "merge_method": "ties",
            "search": {
                "granularity": "layer",
                "separate": ["attention"],
                "parameters": {"weight": [0, 1], "density": [0.3, 1]},
            },
            "optimizer": {"population_size": 4},
            "budget": {"max_evaluations": 15},
            "fitness": [
                {
                    "name": "sums",
                    "dev": str(family["dev"]),
                    "test": str(family["test"]),
                    "metric": "perplexity",
                }
            ],
            "out": str(root / "run"),
        }
    )
    summary = evolve(config)
    assert summary.evaluations == 15 and summary.best is not None
    finalize(summary.run_dir)
    return summary.run_dir


def test_outputs_are_written(finished_run: Path) -> None:
    for name in (
        BEST_RECIPE,
        BEST_MERGEKIT,
        "best_model/config.json",
        "best_model/README.md",
        "report.html",
        "results.md",
    ):
        assert (finished_run / name).is_file(), name
    rows = read_results(finished_run)
    assert rows is not None
    assert [row.kind for row in rows].count("baseline") == 4 and {"base", "ft0", "ft1", "evolved"} <= {
        r.name for r in rows
    }
    html = (finished_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "evolved" in html


def test_evomerge_yaml_rebuilds_the_best_model(finished_run: Path, tmp_path: Path) -> None:
    seed = int((finished_run / BEST_RECIPE).read_text().split("random_seed: ")[1].split()[0])
    rebuilt = merge(finished_run / BEST_RECIPE, tmp_path / "again", random_seed=seed)
    expected = load_file(finished_run / "best_model" / "model.safetensors")
    got = load_file(rebuilt / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.oracle
def test_mergekit_yaml_reproduces_the_best_model(finished_run: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [
        str(MERGEKIT_YAML),
        str(finished_run / BEST_MERGEKIT),
        str(tmp_path / "mk"),
        "--no-cuda",
        "--quiet",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = load_file(finished_run / "best_model" / "model.safetensors")
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_a_front_of_score_against_sparsity(tmp_path: Path) -> None:
    """nsga2 over a fitness task and the built-in sparsity measure, through the real local backend."""
    family = build_scoreable_family(tmp_path)
    config = EvolveConfig.from_dict(
        {
            "base_model": str(family["base"]),
            "models": [str(family["ft0"]), str(family["ft1"])],
            "merge_method": "ties",
            "search": {"granularity": "model", "parameters": {"weight": [0, 1], "density": [0.1, 1]}},
            "optimizer": {
                "name": "nsga2",
                "population_size": 4,
                "objectives": ["sums", "behaviour:sparsity"],
            },
            "budget": {"max_evaluations": 15},
            "fitness": [{"name": "sums", "dev": str(family["dev"]), "metric": "perplexity"}],
            "out": str(tmp_path / "run"),
        }
    )
    assert config.optimizer.measures_needed() == ("sparsity",)
    summary = evolve(config)
    front = [e for e in run_elites(summary.run_dir) if e.niche == "front 0"]
    assert front and all(0.0 <= e.measures["behaviour:sparsity"] <= 1.0 for e in front)
    sparsities = [e.measures["behaviour:sparsity"] for e in front]
    assert max(sparsities) > 0.3  # low-density TIES merges keep much of the base, and the front keeps one
