"""The black-box config: members, tasks, how to ask them, the record budget, the genome and the search.

Read from YAML with `BlackBoxConfig.from_yaml`; every mistake is one ConfigError naming the file and
field, and `check_config` refuses what needs the whole config (a cost budget with an unpriced member,
log-probability operators with a member that gives none) before any call is made.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from evomerge.backends.registry import LocalSettings
from evomerge.configfile import YamlConfig
from evomerge.errors import ConfigError
from evomerge.eval.endpoint import EndpointSpec
from evomerge.runs.config import BudgetConfig
from evomerge.search.base import OptimizerSettings
from evomerge.search.optimizers import CMAESSettings
from evomerge.search.registry import parse_settings

Operator = Literal["vote", "pool", "router", "cascade", "aggregate"]
OPERATORS: tuple[Operator, ...] = ("vote", "pool", "router", "cascade")  # aggregate makes calls: opt in
DEFAULT_TEMPLATE = "Answers proposed for the prompt below:\n{proposals}\n{prompt}"
NEEDS_LOGPROBS = ("pool", "cascade")  # operators that read each member's token log-probabilities
COST_OBJECTIVE = "behaviour:thrift"  # minus the cost per example: NSGA-II maximises it beside `score`


CONFIG_NAME = "blackbox.yaml"  # the config as a run dir (or an exported combination) keeps it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemberConfig(_Strict):
    """One member: an OpenAI-compatible endpoint, or a local model dir served in-process while recording.

    Prices are per token (input = prompt tokens, output = answer tokens), in any currency you like.
    `logprobs: false` marks an endpoint that gives no token log-probabilities (it is then asked for none).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    endpoint: EndpointSpec | None = None
    model_dir: Path | None = None
    price_input: float | None = Field(default=None, ge=0)
    price_output: float | None = Field(default=None, ge=0)
    logprobs: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> MemberConfig:
        if (self.endpoint is None) == (self.model_dir is None):
            raise ValueError(
                f"member {self.name!r}: give exactly one of endpoint (base_url, model, ...) or model_dir"
            )
        if self.model_dir is not None:
            if not (self.model_dir / "config.json").is_file():
                raise ValueError(f"member {self.name!r}: model_dir {self.model_dir} holds no config.json")
            self.model_dir = self.model_dir.resolve()
        return self

    @property
    def priced(self) -> bool:
        return self.model_dir is not None or (self.price_input is not None and self.price_output is not None)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """What a call with these token counts costs (a local model dir costs 0; no price: 0)."""
        return (self.price_input or 0.0) * input_tokens + (self.price_output or 0.0) * output_tokens

    def identity(self) -> str:
        """What the cache keys on: the endpoint's URL and model (never the key), or the weights' digest."""
        if self.endpoint is not None:
            return f"endpoint {self.endpoint.base_url} {self.endpoint.model}"
        assert self.model_dir is not None
        return f"model_dir {_dir_digest(self.model_dir)}"


def _dir_digest(directory: Path) -> str:
    """sha256 of the dir's config, tokenizer and weights files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".model", ".txt"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


class TaskConfig(_Strict):
    """An exact-match task: dev scores combinations while evolving, test is held out for the result."""

    name: str | None = None
    dev: Path
    test: Path
    weight: float = Field(default=1.0, ge=0)

    @field_validator("dev", "test")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(
                f"task file {value} does not exist; check the path (relative to the current dir)"
            )
        return value.resolve()

    @property
    def task_name(self) -> str:
        return self.name or self.dev.parent.name or self.dev.stem


class SamplingConfig(_Strict):
    """How every member is asked. `samples` answers per prompt when temperature > 0 (1 when it is 0)."""

    temperature: float = Field(default=0.0, ge=0)
    samples: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)  # None: the longest reference answer + 2
    top_logprobs: int = Field(default=5, ge=0, le=20)
    stop: list[str] = Field(default_factory=lambda: ["\n"])

    @property
    def k(self) -> int:
        return self.samples if self.temperature > 0 else 1


class RecordBudget(_Strict):
    """Hard limits of one `record` invocation's new calls (cache hits are free); None: no limit."""

    max_calls: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0)
    max_cost: float | None = Field(default=None, ge=0)


class RouterFeature(_Strict):
    """A prompt feature of the router: 1.0 when `regex` matches the prompt (re.search), else 0.0."""

    name: str
    regex: str


class EmbeddingFeature(_Strict):
    """Router features from a small local model: the mean of its last hidden states over the prompt's
    tokens, projected to `dims` numbers by a fixed random matrix (seeded) and scaled to unit length. The
    model is any causal LM dir evomerge loads (a zoo model, a merge); it runs once per prompt."""

    model: Path
    dims: int = Field(default=8, ge=1, le=64)  # each adds one router gene per member
    seed: int = 0

    @field_validator("model")
    @classmethod
    def _a_model_dir(cls, value: Path) -> Path:
        if not (value / "config.json").is_file():
            raise ValueError(
                f"{value} is not a model dir (no config.json); name a causal LM dir evomerge can load"
            )
        if not any((value / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ValueError(
                f"{value} has no tokenizer files (tokenizer.json, tokenizer_config.json) to read prompts with; "
                "save the model's tokenizer beside it"
            )
        return value.resolve()


class CombineConfig(_Strict):
    """The genome: which operators it may choose between, the router's prompt features, and the
    templates of propose-then-aggregate (`{proposals}`: one proposed answer a line; `{prompt}`)."""

    operators: list[Operator] = Field(default_factory=lambda: list(OPERATORS), min_length=1)
    features: list[RouterFeature] = Field(default_factory=list)
    confidence_member: str | None = None  # the cheap member whose confidence the router reads
    embedding: EmbeddingFeature | None = None  # prompt embeddings from a small local model, as features
    templates: list[str] = Field(default_factory=lambda: [DEFAULT_TEMPLATE], min_length=1)

    @field_validator("templates")
    @classmethod
    def _placeholders(cls, value: list[str]) -> list[str]:
        for index, template in enumerate(value):
            if "{prompt}" not in template or "{proposals}" not in template:
                raise ValueError(
                    f"templates.{index} must hold both {{prompt}} and {{proposals}}, got {template!r}"
                )
        return value

    @field_validator("operators")
    @classmethod
    def _unique(cls, value: list[Operator]) -> list[Operator]:
        if len(set(value)) != len(value):
            raise ValueError(f"operators must not repeat, got {value}")
        return value


class BlackBoxConfig(YamlConfig):
    """A whole black-box combination: record it (`blackbox record`), then evolve it (`blackbox evolve`)."""

    yaml_expected: ClassVar[str] = "members, tasks"
    unknown_field_hint: ClassVar[str] = "check its spelling against docs/blackbox.md"

    members: list[MemberConfig] = Field(min_length=2)
    tasks: list[TaskConfig] = Field(min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    record_budget: RecordBudget = Field(default_factory=RecordBudget)
    cache: Path = Path("blackbox-cache.sqlite")
    combine: CombineConfig = Field(default_factory=CombineConfig)
    optimizer: SerializeAsAny[OptimizerSettings] = Field(
        default_factory=lambda: CMAESSettings(start="best-source")
    )
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(max_evaluations=200))
    cost_penalty: float = Field(default=0.0, ge=0)  # fitness = dev score - cost_penalty * cost per example
    seed: int = 0
    out: Path = Path("runs/blackbox")
    # What the evolve loop reads beside the fields above, fixed for black-box runs: combinations are scored
    # from the cache in this process, one generation at a time, on every dev example (racing and subsets
    # do not apply to replayed answers yet). Class attributes, so a YAML cannot set them.
    backend: ClassVar[LocalSettings] = LocalSettings()
    racing: ClassVar[None] = None
    subset: ClassVar[None] = None

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_block(cls, value: Any) -> OptimizerSettings:
        settings = parse_settings({"start": "best-source", **value} if isinstance(value, dict) else value)
        if settings.start == "best-known":
            raise ValueError(
                "optimizer.start 'best-known' means the default merges; a black-box run starts from "
                "'best-source' (each member alone) or 'center'"
            )
        return settings

    @model_validator(mode="after")
    def _names(self) -> BlackBoxConfig:
        names = [member.name for member in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names must differ, got {names}")
        tasks = [task.task_name for task in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: names must differ, got {tasks}; give each a 'name'")
        chosen = self.combine.confidence_member
        if chosen is not None and chosen not in names:
            raise ValueError(f"combine.confidence_member: {chosen!r} is not a member ({', '.join(names)})")
        self.optimizer.check_tasks(tasks)
        self.cache, self.out = self.cache.resolve(), self.out.resolve()
        return self

    def member(self, name: str) -> MemberConfig:
        return next(member for member in self.members if member.name == name)

    def identity(self) -> dict[str, Any]:
        """What makes two evolve runs the same run (everything but where it is written and the budgets)."""
        return self.model_dump(mode="json", exclude={"out", "budget", "record_budget", "cache"})

    def optimizer_seed(self) -> int:
        return self.seed if self.optimizer.seed is None else self.optimizer.seed

    @property
    def models(self) -> list[str]:
        """The members' names: what the evolve loop labels the 'best-source' warm start with."""
        return [member.name for member in self.members]


def check_config(config: BlackBoxConfig) -> None:
    """Refuse what needs the whole config, naming the member: unpriced members under a cost budget or a
    cost objective, members without log-probabilities under operators that read them."""
    unpriced = [m.name for m in config.members if not m.priced]
    wants_cost = config.record_budget.max_cost is not None or config.cost_penalty > 0
    wants_cost = wants_cost or COST_OBJECTIVE in getattr(config.optimizer, "objectives", [])
    if wants_cost and unpriced:
        raise ConfigError(
            f"member(s) {', '.join(unpriced)}: no price_input/price_output, but the config counts cost "
            "(record_budget.max_cost, cost_penalty or a cost objective); give both prices (0 for a free one)"
        )
    blind = [m.name for m in config.members if not m.logprobs]
    readers = [op for op in config.combine.operators if op in NEEDS_LOGPROBS]
    if blind and readers:
        raise ConfigError(
            f"member(s) {', '.join(blind)} give no log-probabilities (logprobs: false), but operator(s) "
            f"{', '.join(readers)} read them; remove {', '.join(readers)} from combine.operators (vote and "
            "router need none) or drop the member"
        )
    chosen = config.combine.confidence_member
    if chosen is not None and not config.member(chosen).logprobs:
        raise ConfigError(f"combine.confidence_member: member {chosen!r} gives no log-probabilities")
