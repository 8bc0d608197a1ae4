"""Combination operators over recorded answers (pure functions), and the genome that sets them.

One genome, one slice per operator (BlackBoxSpace): the selector genes choose the operator (the largest
wins); the other slices hold each operator's numbers.
- vote: weight per member in [0, 1]; each normalised answer collects its members' weights (a sample
  counts 1/k); the heaviest wins. A member of weight below DROP is not asked (no cost).
- pool: weight per member and a floor log-probability; each candidate answer scores the weighted sum of
  each member's log-probability of it: a member's own answer's summed token log-probability, a
  single-token answer's log-probability among the member's first-token alternatives, else the floor.
- router: a weight row per member over the prompt features (regex flags, length / 100, the confidence
  member's confidence, the prompt's embedding by a small local model, 1); the member of the highest score
  answers.
- cascade: a confidence threshold per member but the last, members cheapest first; the first member whose
  confidence (exp of its mean token log-probability) reaches its threshold answers.
- aggregate (propose-then-aggregate): a gene per member (a proposer when >= 0.5), a gene per member (the
  largest is the aggregator) and one per template (the largest wins); the aggregator is asked the
  template filled with the proposers' answers (recorded by `record` under its own key) and answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evomerge.blackbox.cache import Response
from evomerge.blackbox.config import CONFIG_NAME, BlackBoxConfig, MemberConfig, Operator
from evomerge.blackbox.record import Slot
from evomerge.eval.metrics import normalize_answer
from evomerge.io.atomic import atomic_write_text

DROP = 0.01  # vote/pool weight under which a member is not asked
FLOOR_RANGE = (-20.0, 0.0)
ROUTER_RANGE = (-3.0, 3.0)
ALONE_BIAS = 0.3
EXPORT_NAME = "combination.json"  # an exported combination (BlackBoxSpace.export), next to blackbox.yaml  # a member alone, as a router: small, so one mutation step can route elsewhere


@dataclass(frozen=True)
class Combination:
    """A decoded genome: which operator answers and every operator's numbers (members in config order)."""

    operator: Operator
    vote: list[float]
    pool: list[float]
    floor: float
    router: list[list[float]]  # (members, features + 1)
    thresholds: list[float]  # (members - 1,), over `order`
    order: list[int] = field(default_factory=list)  # member indices, cheapest first
    proposers: list[float] = field(default_factory=list)  # (members,): a proposer when >= 0.5
    aggregator: int = 0
    template: int = 0

    def to_text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> Combination:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Prompt:
    """One prompt's recorded answers: `answers[m]` holds member m's k samples."""

    text: str
    answers: Sequence[Sequence[Response]]  # serve reads them lazily: a member is asked when read
    aggregated: dict[Slot, Response] = field(default_factory=dict)  # propose-then-aggregate's answers
    embedding: tuple[float, ...] = ()  # combine.embedding's features of `text` (blackbox.embed)


@dataclass(frozen=True)
class Choice:
    """What a combination answers to one prompt, which members it had to ask for it, and the calls of
    its own it made (member, response): an aggregator's."""

    text: str
    asked: tuple[int, ...]
    extra: tuple[tuple[int, Response], ...] = ()


def cost_order(members: Sequence[MemberConfig]) -> list[int]:
    """Member indices cheapest first (by output price, then input price; config order breaks ties)."""
    return sorted(
        range(len(members)), key=lambda i: (members[i].price_output or 0.0, members[i].price_input or 0.0, i)
    )


def features(config: BlackBoxConfig, prompt: Prompt) -> np.ndarray:
    """The router's inputs: regex flags, length / 100, the confidence member's confidence, the prompt's
    embedding, then 1."""
    flags = [1.0 if re.search(f.regex, prompt.text) else 0.0 for f in config.combine.features]
    values = [*flags, len(prompt.text) / 100]
    chosen = config.combine.confidence_member
    if chosen is not None:
        values.append(prompt.answers[config.models.index(chosen)][0].confidence())
    embedding = config.combine.embedding
    if embedding is not None:
        if len(prompt.embedding) != embedding.dims:
            raise ValueError(
                f"prompt {prompt.text[:40]!r} carries {len(prompt.embedding)} embedding features, the config "
                f"{embedding.dims} (combine.embedding.dims); embed prompts with blackbox.embed first"
            )
        values.extend(prompt.embedding)
    return np.array([*values, 1.0])


def n_features(config: BlackBoxConfig) -> int:
    embedding = config.combine.embedding
    dims = embedding.dims if embedding is not None else 0
    return len(config.combine.features) + 1 + (config.combine.confidence_member is not None) + dims + 1


def answer(config: BlackBoxConfig, combination: Combination, prompt: Prompt) -> Choice:
    """The combination's answer to `prompt` (see the module doc)."""
    operator = combination.operator
    if operator == "vote":
        return _vote(combination.vote, prompt)
    if operator == "pool":
        return _pool(combination.pool, combination.floor, prompt)
    if operator == "router":
        return _route(config, combination.router, prompt)
    if operator == "aggregate":
        return _aggregate(combination, prompt)
    return _cascade(combination.thresholds, combination.order, prompt)


def proposers_of(genes: Sequence[float]) -> tuple[int, ...]:
    """The members whose proposer gene is >= 0.5 (the highest one when none is)."""
    return tuple(m for m, g in enumerate(genes) if g >= 0.5) or (int(np.argmax(genes)),)


def _aggregate(combination: Combination, prompt: Prompt) -> Choice:
    proposers = proposers_of(combination.proposers)
    response = prompt.aggregated[(combination.aggregator, combination.template, proposers)]
    return Choice(response.text, proposers, ((combination.aggregator, response),))


def _vote(weights: Sequence[float], prompt: Prompt) -> Choice:
    asked = tuple(m for m, w in enumerate(weights) if w >= DROP) or (int(np.argmax(weights)),)
    tally: dict[str, float] = {}
    raw: dict[str, str] = {}
    for m in asked:
        samples = prompt.answers[m]
        for response in samples:
            key = normalize_answer(response.text)
            tally[key] = tally.get(key, 0.0) + weights[m] / len(samples)
            raw.setdefault(key, response.text)
    best = max(tally, key=lambda key: tally[key])  # first seen wins ties (dicts keep insertion order)
    return Choice(raw[best], asked)


def _pool(weights: Sequence[float], floor: float, prompt: Prompt) -> Choice:
    asked = tuple(m for m, w in enumerate(weights) if w >= DROP) or (int(np.argmax(weights)),)
    candidates: dict[str, str] = {}
    for m in asked:
        candidates.setdefault(normalize_answer(prompt.answers[m][0].text), prompt.answers[m][0].text)
    scores = {
        key: sum(weights[m] * _logprob_of(prompt.answers[m][0], key, floor) for m in asked)
        for key in candidates
    }
    best = max(scores, key=lambda key: scores[key])
    return Choice(candidates[best], asked)


def _logprob_of(response: Response, key: str, floor: float) -> float:
    """A member's log-probability of the normalised answer `key` (see the module doc), at least `floor`."""
    if normalize_answer(response.text) == key:
        return max(floor, response.logprob())
    if response.top_logprobs:
        for token, value in response.top_logprobs[0].items():
            if normalize_answer(token) == key:
                return max(floor, value)
    return floor


def _route(config: BlackBoxConfig, rows: Sequence[Sequence[float]], prompt: Prompt) -> Choice:
    scores = np.asarray(rows) @ features(config, prompt)  # (members,)
    chosen = int(np.argmax(scores))
    confidence = config.combine.confidence_member
    asked = {chosen} | ({config.models.index(confidence)} if confidence is not None else set())
    return Choice(prompt.answers[chosen][0].text, tuple(sorted(asked)))


def _cascade(thresholds: Sequence[float], order: Sequence[int], prompt: Prompt) -> Choice:
    for step, m in enumerate(order):
        response = prompt.answers[m][0]
        if step == len(order) - 1 or response.confidence() >= thresholds[step]:
            return Choice(response.text, tuple(order[: step + 1]))
    raise AssertionError("unreachable: the last member always answers")


# --- the genome -----------------------------------------------------------------------------------------
class BlackBoxSpace:
    """The SearchSpace of a combination: selector genes (one per operator, when there are several), then
    vote weights, pool weights and floor, router rows, cascade thresholds (search/base.py's protocol)."""

    def __init__(self, config: BlackBoxConfig) -> None:
        self.config = config
        self.operators = list(config.combine.operators)
        self.m = len(config.members)
        self.f = n_features(config)
        self.order = cost_order(config.members)
        self.t = len(config.combine.templates)
        self.slices: dict[str, slice] = {}
        lower: list[float] = []
        upper: list[float] = []
        sizes = {
            "select": (len(self.operators) if len(self.operators) > 1 else 0, (0.0, 1.0)),
            "vote": (self.m if "vote" in self.operators else 0, (0.0, 1.0)),
            "pool": (self.m if "pool" in self.operators else 0, (0.0, 1.0)),
            "floor": (1 if "pool" in self.operators else 0, FLOOR_RANGE),
            "router": (self.m * self.f if "router" in self.operators else 0, ROUTER_RANGE),
            "cascade": (self.m - 1 if "cascade" in self.operators else 0, (0.0, 1.0)),
            "proposers": (self.m if "aggregate" in self.operators else 0, (0.0, 1.0)),
            "aggregator": (self.m if "aggregate" in self.operators and self.m > 1 else 0, (0.0, 1.0)),
            "template": (self.t if "aggregate" in self.operators and self.t > 1 else 0, (0.0, 1.0)),
        }
        for name, (size, (low, high)) in sizes.items():
            self.slices[name] = slice(len(lower), len(lower) + size)
            lower += [low] * size
            upper += [high] * size
        self._bounds = (np.array(lower), np.array(upper))

    @property
    def dim(self) -> int:
        return int(self._bounds[0].shape[0])

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self._bounds

    def decode(self, x: np.ndarray) -> Combination:
        x = np.clip(np.asarray(x, dtype=float), *self._bounds)
        select = x[self.slices["select"]]
        operator = self.operators[int(np.argmax(select))] if select.size else self.operators[0]
        part = {name: x[s].tolist() for name, s in self.slices.items()}
        return Combination(
            operator=operator,
            vote=part["vote"] or [1.0] * self.m,
            pool=part["pool"] or [1.0] * self.m,
            floor=part["floor"][0] if part["floor"] else FLOOR_RANGE[0],
            router=np.reshape(part["router"], (self.m, self.f)).tolist()
            if part["router"]
            else [[0.0] * self.f] * self.m,
            thresholds=part["cascade"] or [0.5] * (self.m - 1),
            order=list(self.order),
            proposers=part["proposers"] or [1.0] * self.m,
            aggregator=int(np.argmax(part["aggregator"])) if part["aggregator"] else 0,
            template=int(np.argmax(part["template"])) if part["template"] else 0,
        )

    def encode(self, candidate: Combination) -> np.ndarray:
        x = np.zeros(self.dim)
        if self.slices["select"].stop > self.slices["select"].start:
            x[self.slices["select"].start + self.operators.index(candidate.operator)] = 1.0
        one_hot = {"aggregator": (candidate.aggregator, self.m), "template": (candidate.template, self.t)}
        hot = {k: [1.0 if i == v else 0.0 for i in range(n)] for k, (v, n) in one_hot.items()}
        for name, values in (("vote", candidate.vote), ("pool", candidate.pool), ("floor", [candidate.floor]),
                             ("router", np.ravel(candidate.router).tolist()), ("cascade", candidate.thresholds),
                             ("proposers", candidate.proposers), ("aggregator", hot["aggregator"]),
                             ("template", hot["template"])):  # fmt: skip
            s = self.slices[name]
            if s.stop > s.start:
                x[s] = values
        return np.clip(x, *self._bounds)

    def genome_of(self, candidate: object) -> np.ndarray | None:
        if not isinstance(candidate, Combination) or candidate.operator not in self.operators:
            return None
        x = self.encode(candidate)
        return x if self.decode(x) == candidate else None

    def source_genomes(self) -> np.ndarray:
        """Each member alone (the 'best-source' warm start): a router that always picks it (its bias at the
        top, every feature weight 0, so the search starts where routing is one step away), or, without
        the router, a vote that asks only that member."""
        centre = (self._bounds[0] + self._bounds[1]) / 2
        genomes = []
        for m in range(self.m):
            x = centre.copy()
            alone: Operator | None = (
                "router" if "router" in self.operators else "vote" if "vote" in self.operators else None
            )
            if alone is None:
                raise ValueError("'best-source' needs the vote or router operator among combine.operators")
            select = self.slices["select"]
            if select.stop > select.start:
                x[select] = 0.0
                x[select.start + self.operators.index(alone)] = 1.0
            if alone == "vote":
                x[self.slices["vote"]] = [1.0 if i == m else 0.0 for i in range(self.m)]
            else:
                rows = np.zeros((self.m, self.f))
                rows[m, -1] = ALONE_BIAS
                x[self.slices["router"]] = rows.ravel()
            genomes.append(x)
        return np.array(genomes)

    def to_text(self, candidate: Combination) -> str:
        return candidate.to_text()

    def from_text(self, text: str) -> Combination:
        return Combination.from_text(text)

    def describe(self) -> str:
        return (
            f"A black-box combination of {self.m} members ({', '.join(self.config.models)}): "
            f"operators {', '.join(self.operators)}; {self.dim} genes "
            + ", ".join(f"{name} {s.stop - s.start}" for name, s in self.slices.items() if s.stop > s.start)
            + "."
        )

    def per_layer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def export(self, text: str, out_dir: Path, *, seed: int, force: bool = False) -> Path:
        """Write the combination as `combination.json` with the config that recorded its members
        (`blackbox.yaml`): `evomerge blackbox serve OUT_DIR` serves it."""
        import yaml

        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()) and not force:
            from evomerge.errors import OutputExistsError

            raise OutputExistsError(f"{out_dir} exists; pass force to replace it")
        out_dir.mkdir(parents=True, exist_ok=True)
        config = self.config.model_dump(mode="json", exclude_none=True)
        atomic_write_text(out_dir / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False))
        atomic_write_text(out_dir / EXPORT_NAME, text)  # last: its presence marks a whole export
        return out_dir
