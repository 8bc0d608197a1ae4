"""The router's embedding features: a small local model's view of each prompt, embedded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.blackbox.stubs import stub_config, write_tasks
from tests.serve.helpers import tiny_lm_dir

from evomerge.blackbox.cache import Response
from evomerge.blackbox.combine import BlackBoxSpace, Combination, Prompt, answer, n_features
from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.embed import embed_prompts
from evomerge.blackbox.evolve import _embeddings
from evomerge.errors import ConfigError

PROMPTS = ["up abc: ", "down xyz: ", "up hello: ", "down a b c d e f: ", "up q: ", "down zz: "]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm_dir(tmp_path_factory.mktemp("embed") / "tiny")


def _config(tmp_path: Path, embedder: Path, dims: int = 4) -> BlackBoxConfig:
    urls = {name: "http://127.0.0.1:9/v1" for name in ("a", "b")}
    data = stub_config(urls, write_tasks(tmp_path), tmp_path)
    data["combine"] = {"operators": ["router"], "embedding": {"model": str(embedder), "dims": dims}}
    return BlackBoxConfig.from_dict(data)


def test_rows_are_unit_length_seeded_and_independent_of_the_batch(embedder: Path, tmp_path: Path) -> None:
    spec = _config(tmp_path, embedder).combine.embedding
    assert spec is not None
    rows = embed_prompts(spec, PROMPTS)  # (6, 4), one padded batch
    assert rows.shape == (len(PROMPTS), 4)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0)
    alone = np.stack([embed_prompts(spec, [text])[0] for text in PROMPTS])  # no padding
    assert np.allclose(rows, alone, atol=1e-5)
    assert len({tuple(np.round(row, 6)) for row in rows}) == len(PROMPTS)  # prompts differ, rows differ
    other = embed_prompts(spec.model_copy(update={"seed": 1}), PROMPTS)
    assert not np.allclose(rows, other)  # the projection is the seed's


def test_the_router_reads_embedding_genes(embedder: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, embedder)
    assert n_features(config) == 1 + 4 + 1  # length, four embedding dims, bias
    space = BlackBoxSpace(config)
    embedded = _embeddings(config, PROMPTS)
    centre = space.decode((space.bounds[0] + space.bounds[1]) / 2)
    # member a scores +embedding[0], member b -embedding[0]: the sign of the first dim routes
    rows = [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0, 0.0, 0.0]]
    router = Combination(**{**centre.__dict__, "operator": "router", "router": rows})
    chosen = []
    for text in PROMPTS:
        prompt = Prompt(
            text, [[Response("A", [], [], [])], [Response("B", [], [], [])]], embedding=embedded(text)
        )
        chosen.append(answer(config, router, prompt).text)
        assert chosen[-1] == ("A" if prompt.embedding[0] > 0 else "B")
    assert set(chosen) == {"A", "B"}  # the embeddings really vary across these prompts
    with pytest.raises(ValueError, match=r"carries 0 embedding features, the config 4"):
        answer(config, router, Prompt("up x: ", [[Response("A", [], [], [])], [Response("B", [], [], [])]]))


def test_an_embedding_model_that_is_not_a_model_dir_is_refused(embedder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"combine.embedding.model.*not a model dir"):
        _config(tmp_path, tmp_path / "nowhere")


def test_an_embedding_model_without_a_tokenizer_is_refused(embedder: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((embedder / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"combine.embedding.model.*has no tokenizer files"):
        _config(tmp_path, bare)
