"""The run store: one SQLite file per run holding the config, every evaluation and optimiser checkpoints.

Durability is the point: WAL with synchronous=FULL, one transaction per evaluation, so after a kill -9
everything the loop committed is on disk. Evaluations are keyed by (generation, index): a resumed run
looks each asked genome up and re-evaluates nothing that was committed. The warm start is generation -1;
its evaluations carry a label ("source add", "default ties (weight 1, density 0.5)", ...) and, when they
lie outside the search space, an empty genome.

Format 2 (this version) adds the labels, a hash of each genome, the `meta` table, the `elites` table (the
optimiser's elites as of its last checkpoint, as keys of evaluations) and the `stats` table (the
optimiser's stats at each checkpoint). A format-1 store (evomerge 0.1.0) is still read
(evaluations, best, elites); its checkpoints pickle optimiser classes this version no longer has, so it
cannot be resumed (the loop says so).

Genomes are stored exactly, as text: a JSON list of floats up to `BLOB_MIN_GENES` genes (recipes stay
readable), and above it (a whole model's weights) as "f32:"/"f64:" + base64 of the little-endian values
(`floats_to_text`: 5.3 characters a gene when every gene is a float32, which whole models are, 10.7
otherwise, instead of ~20 as JSON). `key_of` finds a genome through the SHA-1 of that text (indexed;
an index over the texts themselves would copy every whole model once more) and compares the text.
Only the last two checkpoints are kept: resume reads the last one, and a whole-model archive makes each
checkpoint large.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.eval.result import EvalResult
from evomerge.search.weights import floats_from_text, floats_to_text, is_float_text

STORE_NAME = "run.sqlite"
FORMAT = 2
WARM_START_GENERATION = -1
BLOB_MIN_GENES = 256  # genomes with this many genes or more are stored as a base64 blob

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
    label TEXT,
    genome_sha TEXT,
    UNIQUE (generation, "index")
);
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    elapsed_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS elites (
    rank INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    "index" INTEGER NOT NULL,
    niche TEXT NOT NULL,
    measures TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    generation INTEGER PRIMARY KEY,
    evaluations INTEGER NOT NULL,
    "values" TEXT NOT NULL
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
    label: str | None = None  # what a warm-start evaluation is ("source add", "default ties ...")

    @property
    def score(self) -> float:
        return self.result.score

    @property
    def key(self) -> str:
        """The evaluation's id for users: `g{generation}c{index}`, `w{index}` in the warm start."""
        if self.generation == WARM_START_GENERATION:
            return f"w{self.index}"
        return f"g{self.generation}c{self.index}"

    @property
    def name(self) -> str:
        return self.label or self.key


def parse_key(key: str) -> tuple[int, int] | None:
    """(generation, index) of an evaluation key (`g12c3`, `w4`), None when `key` is not one."""
    match = re.fullmatch(r"g(\d+)c(\d+)|w(\d+)", key)
    if match is None:
        return None
    if match.group(3) is not None:
        return WARM_START_GENERATION, int(match.group(3))
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class StoredElite:
    """One of the optimiser's elites, as the key of the evaluation it is."""

    generation: int
    index: int
    niche: str
    measures: dict[str, float]


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
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(evaluations)")}
        for column in ("label", "genome_sha"):  # a format-1 store: additive, its rows have none
            if column not in columns:
                self._db.execute(f"ALTER TABLE evaluations ADD COLUMN {column} TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS evaluations_by_genome_sha ON evaluations (genome_sha)")

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
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?)", (str(FORMAT),))

    def format(self) -> int | None:
        """The store format of the run in this file (1: evomerge 0.1.0, before `meta`); None: no run yet."""
        if self.run_config() is None:
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        return 1 if row is None else int(row[0])

    def run_config(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT config FROM run WHERE id = 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    # --- evaluations --------------------------------------------------------------------------------
    def add_evaluation(self, evaluation: Evaluation) -> None:
        result, text = evaluation.result, genome_text(evaluation.genome)
        with self._transaction():
            self._db.execute(
                'INSERT INTO evaluations (generation, "index", genome, recipe, seed, score, result, wall_s,'
                " error, created, label, genome_sha) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    evaluation.generation,
                    evaluation.index,
                    text,
                    evaluation.recipe,
                    evaluation.seed,
                    _finite_or_none(result.score),
                    json.dumps(result.to_dict(), allow_nan=True),
                    evaluation.wall_s,
                    result.error,
                    time.time(),
                    evaluation.label,
                    _sha(text),
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

    def outcomes(self) -> list[tuple[int, float]]:
        """(generation, dev score) of every evaluation in asking order, NaN where it failed; reads no
        genomes, recipes or results (a whole-model run's store holds ~100 KB per evaluation)."""
        rows = self._db.execute(
            'SELECT generation, score, error FROM evaluations ORDER BY generation, "index"'
        )
        return [
            (int(g), float(score) if error is None and score is not None else math.nan)
            for g, score, error in rows
        ]

    def warm_start(self) -> list[tuple[str, int]]:
        """(label, mask seed) of every labelled warm-start evaluation (no genomes or results read)."""
        rows = self._db.execute(
            'SELECT label, seed FROM evaluations WHERE label IS NOT NULL ORDER BY generation, "index"'
        )
        return [(str(row[0]), int(row[1])) for row in rows]

    def key_of(self, genome: np.ndarray) -> tuple[int, int] | None:
        """(generation, index) of the first evaluation of exactly this genome, None if never evaluated."""
        text = genome_text(genome)
        row = self._db.execute(
            'SELECT generation, "index" FROM evaluations WHERE genome_sha = ? AND genome = ? '
            'ORDER BY generation, "index" LIMIT 1',
            (_sha(text), text),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def count_evaluations(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])

    def best(self) -> Evaluation | None:
        """The run's result: the evaluation a guard chose (`choose`), else `best_on_dev`."""
        chosen = self.chosen()
        if chosen is not None:
            found = self.evaluation(*chosen[0])
            if found is not None:
                return found
        return self.best_on_dev()

    def best_on_dev(self) -> Evaluation | None:
        """The highest-scoring successful evaluation; the first asked wins a tie."""
        row = self._db.execute(
            f"SELECT {_EVAL_COLUMNS} FROM evaluations WHERE error IS NULL AND score IS NOT NULL "
            'ORDER BY score DESC, generation, "index" LIMIT 1'
        ).fetchone()
        return None if row is None else _row_to_evaluation(row)

    def evaluations_since_best(self) -> int:
        """How many evaluations were asked after the best on dev (all of them when none succeeded yet)."""
        best = self.best_on_dev()
        if best is None:
            return self.count_evaluations()
        row = self._db.execute(
            'SELECT COUNT(*) FROM evaluations WHERE generation > ? OR (generation = ? AND "index" > ?)',
            (best.generation, best.generation, best.index),
        ).fetchone()
        return int(row[0])

    def choose(self, key: tuple[int, int] | None, note: dict[str, Any] | None = None) -> None:
        """Make evaluation `key` (generation, index) the run's result whatever its dev score, with `note`
        (why: a guard's verdict); None clears the choice (the best on dev is the result again)."""
        with self._transaction():
            if key is None:
                self._db.execute("DELETE FROM meta WHERE key = 'chosen'")
                return
            value = json.dumps({"generation": key[0], "index": key[1], "note": note or {}})
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('chosen', ?)", (value,))

    def chosen(self) -> tuple[tuple[int, int], dict[str, Any]] | None:
        """((generation, index), note) of the evaluation `choose` made the result; None if none."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'chosen'").fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return (int(value["generation"]), int(value["index"])), dict(value["note"])

    # --- wall clock ---------------------------------------------------------------------------------
    def save_elapsed(self, seconds: float) -> None:
        """The run's wall time so far, kept after every committed batch (checkpoints come per generation)."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO clock (id, elapsed_s) VALUES (1, ?)", (seconds,))

    def elapsed(self) -> float:
        row = self._db.execute("SELECT elapsed_s FROM clock WHERE id = 1").fetchone()
        return 0.0 if row is None else float(row[0])

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        checkpoint: Checkpoint,
        elites: list[StoredElite] | None = None,
        stats: dict[str, float] | None = None,
    ) -> None:
        """The optimiser before `checkpoint.generation`, and (when given) its elites and stats, in one
        transaction; checkpoints older than the one before it are dropped (stats are all kept)."""
        with self._transaction():
            if stats:
                self._db.execute(
                    'INSERT OR REPLACE INTO stats (generation, evaluations, "values") VALUES (?, ?, ?)',
                    (checkpoint.generation, self.count_evaluations(), json.dumps(stats)),
                )
            if elites is not None:
                self._db.execute("DELETE FROM elites")
                self._db.executemany(
                    'INSERT INTO elites (rank, generation, "index", niche, measures) VALUES (?, ?, ?, ?, ?)',
                    [
                        (rank, e.generation, e.index, e.niche, json.dumps(e.measures))
                        for rank, e in enumerate(elites)
                    ],
                )
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
            # Resume reads the last; the one before stays in case the newest is ever unreadable.
            self._db.execute("DELETE FROM checkpoints WHERE generation < ?", (checkpoint.generation - 1,))

    def last_checkpoint(self) -> Checkpoint | None:
        row = self._db.execute(
            "SELECT generation, optimizer, rng_state, elapsed_s FROM checkpoints ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return Checkpoint(int(row[0]), bytes(row[1]), dict(json.loads(row[2])), float(row[3]))

    def stats(self) -> list[tuple[int, dict[str, float]]]:
        """(evaluations so far, the optimiser's stats) at every checkpoint that had stats, in order."""
        rows = self._db.execute('SELECT evaluations, "values" FROM stats ORDER BY generation')
        return [(int(row[0]), dict(json.loads(row[1]))) for row in rows]

    def elites(self) -> list[tuple[StoredElite, Evaluation]]:
        """The optimiser's elites as of its last checkpoint, in its order, with their evaluations."""
        rows = self._db.execute(
            f'SELECT e.generation, e."index", e.niche, e.measures, {_eval_columns("v")} FROM elites e '
            'JOIN evaluations v ON v.generation = e.generation AND v."index" = e."index" ORDER BY e.rank'
        ).fetchall()
        return [
            (StoredElite(int(r[0]), int(r[1]), str(r[2]), dict(json.loads(r[3]))), _row_to_evaluation(r[4:]))
            for r in rows
        ]

    # --- plumbing -----------------------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


_COLUMNS = ("generation", "index", "genome", "recipe", "seed", "result", "wall_s", "label")


def _eval_columns(table: str = "evaluations") -> str:
    return ", ".join(f'{table}."{column}"' for column in _COLUMNS)


_EVAL_COLUMNS = _eval_columns()


def genome_text(genome: np.ndarray) -> str:
    """How a genome is stored: exact and deterministic (the loop and `key_of` compare these texts)."""
    values = np.asarray(genome, dtype=float).ravel()
    return _json_text(values) if values.size < BLOB_MIN_GENES else floats_to_text(values)


def genome_from_text(text: str) -> np.ndarray:
    """Inverse of genome_text."""
    return floats_from_text(text) if is_float_text(text) else np.array(json.loads(text), dtype=float)


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("ascii")).hexdigest()


def _json_text(values: np.ndarray) -> str:
    return json.dumps([float(v) for v in values])  # exact: JSON floats round-trip


def _row_to_evaluation(row: tuple[Any, ...]) -> Evaluation:
    generation, index, genome, recipe, seed, result, wall_s, label = row
    return Evaluation(
        generation=int(generation),
        index=int(index),
        genome=genome_from_text(genome),
        recipe=str(recipe),
        seed=int(seed),
        result=EvalResult.from_dict(json.loads(result)),
        wall_s=float(wall_s),
        label=None if label is None else str(label),
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
