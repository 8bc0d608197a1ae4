"""The response cache: one SQLite file, one row per answered request, keyed by a hash of member and request.

A row is written only for an answer (errors are never cached), in the same transaction as the spend it
adds to its member's ledger, so a record killed at any moment leaves cache and ledger consistent and the
next `record` asks only what is missing. Many threads may share one cache (one lock around the file).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY, member TEXT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    member TEXT PRIMARY KEY, calls INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cost REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Response:
    """One answer: its text, its tokens with their log-probabilities (empty when the member gives none),
    the top alternatives of each token, and the token counts the member billed."""

    text: str
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def has_logprobs(self) -> bool:
        return bool(self.token_logprobs) or (not self.text and self.output_tokens == 0)

    def logprob(self) -> float:
        """Summed log-probability of the answer's tokens (0.0 for an empty answer)."""
        return float(sum(self.token_logprobs))

    def confidence(self) -> float:
        """exp(mean token log-probability): 1.0 for a sure answer, near 0 for a guess."""
        import math

        if not self.token_logprobs:
            return 1.0
        return math.exp(sum(self.token_logprobs) / len(self.token_logprobs))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Response:
        return cls(**json.loads(text))


def request_key(member_identity: str, request: dict[str, Any]) -> str:
    """sha256 of the member's identity and the whole request (sample index included), canonical JSON."""
    canonical = json.dumps(
        {"member": member_identity, "request": request}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class Spend:
    """A member's bill: calls made, tokens in and out, and their cost."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

    def add(self, response: Response, cost: float) -> None:
        self.calls += 1
        self.input_tokens += response.input_tokens
        self.output_tokens += response.output_tokens
        self.cost += cost


class ResponseCache:
    """The SQLite response cache at `path` (created with its parent dir)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def get(self, key: str) -> Response | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else Response.from_json(row[0])

    def keys(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT key FROM responses")}

    def put(self, key: str, member: str, request: dict[str, Any], response: Response, cost: float) -> None:
        """Store an answer and add its spend to `member`'s ledger, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?)",
                    (key, member, json.dumps(request, sort_keys=True), response.to_json()),
                )
                self._db.execute(
                    "INSERT INTO ledger VALUES (?, 1, ?, ?, ?) ON CONFLICT(member) DO UPDATE SET "
                    "calls = calls + 1, input_tokens = input_tokens + excluded.input_tokens, "
                    "output_tokens = output_tokens + excluded.output_tokens, cost = cost + excluded.cost",
                    (member, response.input_tokens, response.output_tokens, cost),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def ledger(self) -> dict[str, Spend]:
        """Every member's total spend into this cache, over every `record` that filled it."""
        with self._lock:
            rows = self._db.execute("SELECT member, calls, input_tokens, output_tokens, cost FROM ledger")
            return {member: Spend(*values) for member, *values in rows}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
