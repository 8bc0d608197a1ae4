"""The tiny hetero zoo (built once per session) and its members served by `evomerge serve` on localhost."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evomerge.zoo import ZooManifest, build

FEATURES = [
    {"name": "add", "regex": "plus"},
    {"name": "reverse", "regex": "backwards"},
    {"name": "translate", "regex": "greek"},
]


@pytest.fixture(scope="session")
def hetero_zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooManifest:
    import torch

    torch.set_num_threads(1)
    return build("hetero", tmp_path_factory.mktemp("zoo") / "hetero", size="tiny", seed=0)


@contextlib.contextmanager
def served_members(zoo: ZooManifest) -> Iterator[dict[str, str]]:
    """Each member of `zoo` behind its own `evomerge serve` app on a free port: name -> base URL."""
    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    with contextlib.ExitStack() as stack:
        urls = {}
        for name, path in zoo.models.items():
            app = create_app(load_served_model(path, name=name))
            urls[name] = stack.enter_context(serve_in_thread(app))
        yield urls


def config_dict(
    zoo: ZooManifest, urls: dict[str, str], tmp: Path, *, concurrency: int = 4, **extra: Any
) -> dict[str, Any]:
    """A black-box config over the zoo's served members on its `multi` task (priced, cheapest first).

    `concurrency` 1 serves each prompt alone: a batch's padding may round a tiny model's logits another
    way, so only then are the recorded answers the same from run to run."""
    prices = {"llama": 1e-6, "gpt2": 2e-6, "qwen2": 3e-6}
    members = [
        {
            "name": name,
            "endpoint": {"base_url": url, "model": name, "max_concurrency": concurrency, "timeout_s": 10},
            "price_input": prices[name],
            "price_output": 2 * prices[name],
        }
        for name, url in urls.items()
    ]
    multi = zoo.tasks["multi"]
    return {
        "members": members,
        "tasks": [{"name": "multi", "dev": str(multi.dev), "test": str(multi.test)}],
        "cache": str(tmp / "cache.sqlite"),
        "combine": {"features": FEATURES, "operators": ["vote", "router"]},
        "optimizer": {"name": "cma-es", "population_size": 8},
        "budget": {"max_evaluations": 200},
        "out": str(tmp / "run"),
        **extra,
    }
