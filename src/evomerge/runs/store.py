"""The run store: one SQLite file per run holding the config, every evaluation and optimiser checkpoints.

Durability is the point: WAL with synchronous=FULL, one transaction per evaluation, so after a kill -9
everything the loop committed is on disk. Evaluations are keyed by (generation, index): a resumed run
looks each asked genome up and re-evaluates nothing that was committed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.eval.result import EvalResult

STORE_NAME = "run.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    generation INTEGER NOT NULL,
    "index" INTEGER NOT NULL,
    genome TEXT NOT NULL,
    recipe TEXT NOT NULL,
    seed INTEGER NOT NULL,
    score REAL,
    result TEXT NOT NULL,
    wall_s REAL NOT NULL,
    error TEXT,
    created REAL NOT NULL,
    UNIQUE (generation, "index")
);
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    elapsed_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    generation INTEGER PRIMARY KEY,
    optimizer BLOB NOT NULL,
    rng_state TEXT NOT NULL,
    elapsed_s REAL NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Evaluation:
    """One committed evaluation: which genome, its recipe (YAML), the mask seed and the result."""

    generation: int
    index: int
    genome: np.ndarray
    recipe: str
    seed: int
    result: EvalResult
    wall_s: float

    @property
    def score(self) -> float:
        return self.result.score


@dataclass(frozen=True)
class Checkpoint:
    """The optimiser as it was before asking `generation`'s genomes."""

    generation: int
    optimizer: bytes
    rng_state: dict[str, Any]
    elapsed_s: float


class RunStore:
    """Read and append a run's SQLite file. Use as a context manager, or call close()."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def in_dir(cls, run_dir: Path) -> RunStore:
        return cls(Path(run_dir) / STORE_NAME)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- run ----------------------------------------------------------------------------------------
    def init_run(self, config: dict[str, Any], seed: int) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO run (id, config, seed, created) VALUES (1, ?, ?, ?)",
                (json.dumps(config, sort_keys=True), seed, time.time()),
            )

    def run_config(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT config FROM run WHERE id = 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    # --- evaluations --------------------------------------------------------------------------------
    def add_evaluation(self, evaluation: Evaluation) -> None:
        result = evaluation.result
        with self._transaction():
            self._db.execute(
                'INSERT INTO evaluations (generation, "index", genome, recipe, seed, score, result, wall_s,'
                " error, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    evaluation.generation,
                    evaluation.index,
                    json.dumps([float(v) for v in evaluation.genome]),
                    evaluation.recipe,
                    evaluation.seed,
                    _finite_or_none(result.score),
                    json.dumps(result.to_dict(), allow_nan=True),
                    evaluation.wall_s,
                    result.error,
                    time.time(),
                ),
            )

    def evaluation(self, generation: int, index: int) -> Evaluation | None:
        row = self._db.execute(
            f'SELECT {_EVAL_COLUMNS} FROM evaluations WHERE generation = ? AND "index" = ?',
            (generation, index),
        ).fetchone()
        return None if row is None else _row_to_evaluation(row)

    def evaluations(self) -> list[Evaluation]:
        """Every evaluation in the order it was asked (generation, then index)."""
        rows = self._db.execute(f'SELECT {_EVAL_COLUMNS} FROM evaluations ORDER BY generation, "index"')
        return [_row_to_evaluation(row) for row in rows]

    def count_evaluations(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])

    def best(self) -> Evaluation | None:
        """The highest-scoring successful evaluation; the first asked wins a tie."""
        row = self._db.execute(
            f"SELECT {_EVAL_COLUMNS} FROM evaluations WHERE error IS NULL AND score IS NOT NULL "
            'ORDER BY score DESC, generation, "index" LIMIT 1'
        ).fetchone()
        return None if row is None else _row_to_evaluation(row)

    # --- wall clock ---------------------------------------------------------------------------------
    def save_elapsed(self, seconds: float) -> None:
        """The run's wall time so far, kept after every committed batch (checkpoints come per generation)."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO clock (id, elapsed_s) VALUES (1, ?)", (seconds,))

    def elapsed(self) -> float:
        row = self._db.execute("SELECT elapsed_s FROM clock WHERE id = 1").fetchone()
        return 0.0 if row is None else float(row[0])

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints (generation, optimizer, rng_state, elapsed_s, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    checkpoint.generation,
                    checkpoint.optimizer,
                    json.dumps(checkpoint.rng_state),
                    checkpoint.elapsed_s,
                    time.time(),
                ),
            )

    def last_checkpoint(self) -> Checkpoint | None:
        row = self._db.execute(
            "SELECT generation, optimizer, rng_state, elapsed_s FROM checkpoints ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return Checkpoint(int(row[0]), bytes(row[1]), dict(json.loads(row[2])), float(row[3]))

    # --- plumbing -----------------------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


_EVAL_COLUMNS = 'generation, "index", genome, recipe, seed, result, wall_s'


def _row_to_evaluation(row: tuple[Any, ...]) -> Evaluation:
    generation, index, genome, recipe, seed, result, wall_s = row
    return Evaluation(
        generation=int(generation),
        index=int(index),
        genome=np.array(json.loads(genome), dtype=float),
        recipe=str(recipe),
        seed=int(seed),
        result=EvalResult.from_dict(json.loads(result)),
        wall_s=float(wall_s),
    )


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one durable unit of work."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def iter_scores(evaluations: list[Evaluation]) -> Iterator[float]:
    """Scores in asking order, failed ones as NaN (for plots)."""
    for evaluation in evaluations:
        yield evaluation.score if evaluation.result.ok else float("nan")
