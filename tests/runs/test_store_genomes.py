"""How the run store keeps genomes: exact JSON for recipes, compact exact blobs for whole models, and
large JSON genomes of earlier format-2 stores still read and found."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from evomerge.eval.result import EvalResult
from evomerge.runs.store import (
    BLOB_MIN_GENES,
    Evaluation,
    RunStore,
    genome_from_text,
    genome_text,
)

WHOLE_MODEL = np.random.default_rng(0).normal(0, 0.1, 8970).astype(np.float32).astype(np.float64)


def evaluation(index: int, genome: np.ndarray) -> Evaluation:
    return Evaluation(0, index, genome, "recipe", 0, EvalResult(0.5), 0.0)


def test_small_genomes_stay_readable_json() -> None:
    genome = np.array([0.1, 0.25, 1.0])
    assert genome_text(genome) == "[0.1, 0.25, 1.0]"
    assert genome_text(np.zeros(0)) == "[]"  # a warm-start candidate outside the space


def test_whole_models_are_exact_compact_blobs() -> None:
    text = genome_text(WHOLE_MODEL)
    assert text.startswith("f32:") and len(text) < 5.4 * WHOLE_MODEL.size  # JSON: ~20 characters a gene
    np.testing.assert_array_equal(genome_from_text(text), WHOLE_MODEL)
    full = np.linspace(0.0, 1.0, BLOB_MIN_GENES) + 1e-9  # not float32 values
    assert genome_text(full).startswith("f64:")
    np.testing.assert_array_equal(genome_from_text(genome_text(full)), full)
    assert genome_text(WHOLE_MODEL) == genome_text(genome_from_text(text))  # deterministic


def test_the_store_reads_and_finds_blob_genomes(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.sqlite") as store:
        store.add_evaluation(evaluation(0, np.array([0.5, 0.5])))
        store.add_evaluation(evaluation(1, WHOLE_MODEL))
        np.testing.assert_array_equal(store.evaluations()[1].genome, WHOLE_MODEL)
        assert store.key_of(WHOLE_MODEL) == (0, 1)
        assert store.key_of(WHOLE_MODEL + 1.0) is None
        assert store.key_of(np.array([0.5, 0.5])) == (0, 0)


def test_only_the_last_two_checkpoints_are_kept(tmp_path: Path) -> None:
    from evomerge.runs.store import Checkpoint

    with RunStore(tmp_path / "run.sqlite") as store:
        for generation in range(5):
            store.save_checkpoint(Checkpoint(generation, b"state", {}, 0.0))
        rows = store._db.execute("SELECT generation FROM checkpoints ORDER BY generation").fetchall()
        assert [r[0] for r in rows] == [3, 4]
        assert store.last_checkpoint().generation == 4  # type: ignore[union-attr]


def test_evaluation_keys_parse_back() -> None:
    from evomerge.runs.store import parse_key

    assert parse_key("g12c3") == (12, 3)
    assert parse_key("w4") == (-1, 4)
    assert parse_key("g1") is None and parse_key("x1c2") is None and parse_key("w-1") is None


def test_outcomes_read_scores_without_genomes_and_mark_failures(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.sqlite") as store:
        store.add_evaluation(evaluation(0, np.array([0.5, 0.5])))
        failed = evaluation(1, np.array([0.1, 0.2]))
        store.add_evaluation(replace(failed, result=EvalResult.failed("boom")))
        outcomes = store.outcomes()
    assert outcomes[0] == (0, 0.5) and outcomes[1][0] == 0 and np.isnan(outcomes[1][1])
