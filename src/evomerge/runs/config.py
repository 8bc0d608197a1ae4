"""The evolve config: which models, which method, what to search, how to score, how long.

Read from YAML with `EvolveConfig.from_yaml`; every problem becomes one ConfigError naming the file and
field. Relative paths (models, task files, out) are taken relative to the current directory, as
mergekit does, and stored resolved, so a run resumes from anywhere. `check_inputs` then validates against the disk (model shapes, task files) before any
evaluation starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from evomerge.backends.base import BackendSettings
from evomerge.backends.registry import LocalSettings, parse_backend_settings
from evomerge.configfile import YamlConfig
from evomerge.dataflow.pool import PoolModel
from evomerge.dataflow.space import DataflowSpace
from evomerge.errors import ConfigError, TensorMismatchError
from evomerge.merge.calibration import Calibration, check_calibration
from evomerge.merge.registry import get_method
from evomerge.search.base import OptimizerSettings, SearchSpace
from evomerge.search.optimizers import CMAESSettings
from evomerge.search.registry import parse_settings, steady_state_optimizers
from evomerge.search.space import GeneGroup, Granularity, ParameterSpace
from evomerge.search.weights import WeightsSpace

# Methods that select layers instead of mixing parameters cannot be searched in parameter space.
NOT_PARAMETER_SPACE = frozenset({"passthrough"})
DATAFLOW_SPACES = ("dataflow", "ps+dfs")  # spaces whose candidates are layer paths (search.dataflow)
PS_DIR, PS_BEST = "ps", "ps-best"  # ps+dfs: the parameter-space phase's run dir and its best merge, in out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_OLD_PS_SHARE = 0.75  # ps_share's default before 0.9 (benchmarks/results/dataflow.md)


class DataflowSettings(_Strict):
    """`search.dataflow`: the data-flow space (dataflow/space.py; docs/dataflow.md).

    `models`: the pool whose layers a path may take (default: `models`); `owner`: the model whose
    embeddings, head and tokenizer frame every path (default: the first of the pool; under ps+dfs the
    parameter-space phase's best merge, which joins the pool); `repeats`: r, the times each layer may
    appear; `scales`: W evolved or fixed to 1; `encoding`: mixed (scales only for kept layers) or joint
    (the whole M x M matrix); `dropped_scales: reset` sets the scale genes of slots a candidate drops
    back to scale 1 (mixed encoding; `DataflowSpace.repair`); `ps_share`: under ps+dfs, the share of the budget the parameter-space phase
    spends at most (evaluations and wall time alike), the path search getting the rest; `ps_patience`:
    the parameter-space phase also ends once its best on dev has not improved for this many evaluations
    (a plateau), handing what is left to the path search. `guard` (ps+dfs): the
    path search's best replaces ps-best as the run's result only if it beats it in a one-sided paired
    sign test with p < `guard_alpha` on up to `guard_examples` dev examples after each task's `limit`
    (None: as many as `limit`), scored after the search; their cost comes off the path search's budget
    (dataflow/guard.py; docs/dataflow.md).
    """

    models: list[Path] | None = None
    owner: Path | None = None
    repeats: int = 2
    scales: Literal["evolved", "fixed"] = "evolved"
    encoding: Literal["mixed", "joint"] = "mixed"
    max_path_length: int | None = Field(default=None, ge=1)
    scale_range: tuple[float, float] = (0.5, 1.5)
    dropped_scales: Literal["keep", "reset"] = "keep"
    ps_share: float = Field(default=0.9, gt=0, lt=1)
    ps_patience: int | None = Field(default=None, ge=1)
    guard: bool = True
    guard_examples: int | None = Field(default=None, ge=1)
    guard_alpha: float = Field(default=0.05, gt=0, lt=1)

    @field_validator("repeats")
    @classmethod
    def _at_least_once(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"r = {value}: every layer needs at least one slot; use repeats >= 1")
        return value

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"expected [low, high] with 0 <= low < high, got {list(value)}")
        return value


class SearchConfig(_Strict):
    """The genome: which parameters evolve, within which bounds, at which granularity.

    `space: parameter` evolves a merge method's parameters (the other fields shape that genome);
    `space: weights` evolves every float parameter of the sources' architecture itself (whole models, for
    natural niches), needs no merge_method and takes none of the other fields. `space: dataflow` evolves
    a layer path through the pool's models (the `dataflow` block); `space: ps+dfs` first searches the
    parameter space (merge_method and the fields above), then a path with its best merge in the pool.
    """

    space: Literal["parameter", "weights", "dataflow", "ps+dfs"] = "parameter"
    granularity: Granularity = "layer"
    group_size: int = Field(default=1, ge=1)
    separate: list[GeneGroup] = Field(default_factory=list)
    parameters: dict[str, tuple[float, float] | None] | None = None  # None: the method's usual ones
    fixed: dict[str, Any] = Field(default_factory=dict)
    dataflow: DataflowSettings = Field(default_factory=DataflowSettings)


class BudgetConfig(_Strict):
    """When a run stops: `max_evaluations`, `max_wall_seconds` (one at least), and `patience`: also stop
    once the best on dev has not improved for this many evaluations (checked between generations; the
    ps+dfs parameter-space phase uses it to hand a plateaued search's budget to the path search)."""

    max_evaluations: int | None = Field(default=None, ge=1)
    max_wall_seconds: float | None = Field(default=None, gt=0)
    patience: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.max_evaluations is None and self.max_wall_seconds is None:
            raise ValueError("give max_evaluations, max_wall_seconds or both")
        return self


class FitnessTask(_Strict):
    """One task: its dev split scores candidates, its test split is held out for the final table.

    A JSONL task names its files (`dev`, `test`); an lm-eval-harness task names the task (`lm_eval`, and
    `include_path` for a folder of local task YAMLs, `num_fewshot`), is scored on the split its YAML
    names, and `metric`, when given, picks one of its metrics (default: its first)."""

    name: str | None = None
    dev: Path | None = None
    test: Path | None = None
    lm_eval: str | None = None
    include_path: Path | None = None
    num_fewshot: int | None = Field(default=None, ge=0)
    metric: str = "exact_match"
    weight: float = Field(default=1.0, ge=0)
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> FitnessTask:
        if (self.dev is None) == (self.lm_eval is None):
            raise ValueError(
                "give a task file (dev: PATH) or an lm-eval-harness task (lm_eval: NAME), one of them"
            )
        if self.lm_eval is None and (self.include_path is not None or self.num_fewshot is not None):
            raise ValueError(
                "include_path and num_fewshot belong to lm_eval tasks; remove them or add lm_eval"
            )
        if self.lm_eval is not None and self.test is not None:
            raise ValueError(
                "test: an lm_eval task is scored on the split its YAML names; remove test (no held-out split)"
            )
        if self.include_path is not None and not self.include_path.is_dir():
            raise ValueError(f"include_path {self.include_path} is not a folder of lm-eval task YAMLs")
        return self

    @field_validator("dev", "test")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(
                f"task file {value} does not exist; check the path (relative to the current dir)"
            )
        return value

    @property
    def task_name(self) -> str:
        if self.dev is None:
            return self.name or str(self.lm_eval)
        return self.name or self.dev.parent.name or self.dev.stem

    @property
    def lm_eval_metric(self) -> str | None:
        """The lm-eval metric the config picks (None: the task's first); `metric` counts only when given."""
        return self.metric if "metric" in self.model_fields_set else None


class RacingConfig(_Strict):
    """Race candidates on growing slices of the fitness examples (docs/evolve.md, "Racing").

    Every candidate is scored on the first slice; after each slice, one whose score cannot reach the
    `against` quantile of the last `window` evaluations' scores (Hoeffding-Serfling bound at confidence
    `confidence`) stops there, and the optimiser is told that estimate with its example count."""

    slices: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    confidence: float = Field(default=0.95, gt=0, lt=1)
    against: float = Field(default=0.5, ge=0, le=1)  # 0.5: the median of recent scores
    window: int | None = Field(default=None, ge=1)  # None: the optimiser's population size

    @field_validator("slices")
    @classmethod
    def _growing(cls, value: list[float]) -> list[float]:
        ok = bool(value) and all(a < b for a, b in zip([0.0, *value], value, strict=False))
        if not ok or value[-1] != 1.0:
            raise ValueError(
                f"slices must grow strictly from above 0 to exactly 1.0 (fractions of the examples), got {value}"
            )
        return value


class SubsetConfig(_Strict):
    """Score fitness on `size` dev examples instead of all (docs/evolve.md, "Subset").

    The first `calibration` evaluations score the whole dev set. Then every candidate is scored on `size`
    anchor examples (drawn at random, or clustered from the calibration's per-example scores; split over
    the examples' groups), re-drawn every `refresh` evaluations, and told the paired estimate (the best
    whole-dev result so far plus its mean difference to it on the anchors). One that beats that incumbent
    by `margin` standard errors is scored on the whole dev set, and that score is the one stored."""

    size: int = Field(ge=1)
    # None: 1 with random anchors (the paired estimate's first reference); the warm start and the first
    # generation with clustered ones
    calibration: int | None = Field(default=None, ge=1)
    anchors: Literal["random", "cluster"] = "random"  # a seeded draw, or k-means on whole-dev scores
    # "paired": the best whole-dev result so far plus the candidate's mean difference to it on the same
    # anchors (a control variate); "anchors": the anchors' weighted mean alone
    estimate: Literal["paired", "anchors"] = "paired"
    refresh: int | None = Field(
        default=None, ge=1
    )  # re-pick the anchors every N evaluations; None: each generation
    stratify: bool = True  # split each task's anchors over its examples' groups (the `group` field)
    # A candidate whose estimate beats the best whole-dev score so far by `margin` standard errors of its
    # estimate is scored on the whole dev set, and that score is the one stored and told; one within the
    # margin is stored just below the incumbent's score. So the run's best is always a whole-dev score.
    promote: bool = True
    margin: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _enough_calibration(self) -> SubsetConfig:
        if self.anchors == "cluster" and self.calibration is not None and self.calibration < 2:
            raise ValueError(
                f"calibration: {self.calibration}, but anchors: cluster needs at least 2 whole-dev "
                "evaluations to cluster the examples by; raise it or use anchors: random"
            )
        return self


class EvaluationConfig(_Strict):
    batch_size: int = Field(default=64, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)  # None: sized from the longest answer
    # Where the sources, the live model and the evaluation live: "auto" is the first GPU if torch sees
    # one, else the CPU; or a torch device name ("cpu", "cuda", "cuda:1", "mps").
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(
                    f"{value!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps"
                ) from None
        return value

    def torch_device(self) -> torch.device:
        """The device to run on; a GPU the config names but torch cannot see is a clear error."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"evaluation.device: {self.device!r} but torch sees no CUDA device (torch "
                f"{torch.__version__}); use device: cpu, or install a CUDA build of torch."
            )
        return device


class EvolveConfig(YamlConfig):
    """A whole evolve run. `seed` decides everything random: the optimiser and every mask seed."""

    yaml_expected: ClassVar[str] = "base_model, models, merge_method, fitness"
    unknown_field_hint: ClassVar[str] = "check its spelling against docs/evolve.md"

    base_model: Path
    models: list[Path] = Field(min_length=2)
    merge_method: str | None = None  # required by search.space 'parameter'; 'weights' uses none
    search: SearchConfig = Field(default_factory=SearchConfig)
    # One settings block per optimiser, chosen by `name` (search.registry); see docs/evolve.md.
    optimizer: SerializeAsAny[OptimizerSettings] = Field(default_factory=CMAESSettings)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(max_evaluations=100))
    fitness: list[FitnessTask] = Field(min_length=1)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    racing: RacingConfig | None = None  # None: every candidate scores every dev example
    subset: SubsetConfig | None = None  # None: fitness is the whole dev set (up to each task's limit)
    seed: int = 0
    # A backend name (`local`) or its settings block (`{name: ray, workers: 2}`); see docs/ray.md.
    backend: SerializeAsAny[BackendSettings] = Field(default_factory=LocalSettings)
    out: Path = Path("runs/evolve")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    calibration: Calibration | None = None  # regmean, fisher: the prompts their statistics come from

    @field_validator("merge_method")
    @classmethod
    def _parameter_space_method(cls, value: str | None) -> str | None:
        if value is None:
            return None
        method = get_method(value)  # ConfigError (a ValueError) names the known methods
        if method.name in NOT_PARAMETER_SPACE:
            raise ValueError(f"'{value}' selects layers, it is not a parameter-space method; choose another")
        return method.name

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_block(cls, value: Any) -> OptimizerSettings:
        return parse_settings(value)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_block(cls, value: Any) -> BackendSettings:
        return parse_backend_settings(value)

    @field_validator("base_model", "models")
    @classmethod
    def _dirs_exist(cls, value: Any) -> Any:
        for path in value if isinstance(value, list) else [value]:
            if not Path(path).is_dir():
                raise ValueError(f"model dir {path} does not exist")
        return value

    @model_validator(mode="after")
    def _absolute_paths(self) -> EvolveConfig:
        """Resolve paths once, so `resume` from another directory finds the same files."""
        self.base_model = self.base_model.resolve()
        self.models = [model.resolve() for model in self.models]
        self.out = self.out.resolve()
        for task in self.fitness:
            task.dev = task.dev.resolve() if task.dev is not None else None
            task.include_path = task.include_path.resolve() if task.include_path is not None else None
            task.test = task.test.resolve() if task.test is not None else None
        flow = self.search.dataflow
        flow.models = [model.resolve() for model in flow.models] if flow.models is not None else None
        flow.owner = flow.owner.resolve() if flow.owner is not None else None
        if self.calibration is not None:
            self.calibration = self.calibration.resolved()
        return self

    @model_validator(mode="after")
    def _calibration_fits_the_method(self) -> EvolveConfig:
        if self.merge_method is not None:
            check_calibration(self.calibration, get_method(self.merge_method), [str(m) for m in self.models])
        return self

    @model_validator(mode="after")
    def _method_fits_the_space(self) -> EvolveConfig:
        if self.search.space == "parameter" and self.merge_method is None:
            raise ValueError(
                "merge_method: search.space 'parameter' evolves a merge method's parameters; name the method "
                "(e.g. merge_method: ties), or evolve whole models with search.space: weights"
            )
        if self.search.space == "weights":
            if self.merge_method is not None:
                raise ValueError(
                    f"merge_method: search.space 'weights' evolves the weights themselves and merges with no "
                    f"method; remove merge_method ({self.merge_method!r}) or use search.space: parameter"
                )
            defaults = SearchConfig(space="weights").model_dump()  # a saved config spells every field out
            unused = sorted(k for k, v in self.search.model_dump().items() if v != defaults[k])
            if unused:
                raise ValueError(
                    f"search: {', '.join(unused)} shape(s) a parameter-space genome; search.space 'weights' "
                    "takes none of them: remove them"
                )
        return self

    @model_validator(mode="after")
    def _dataflow_fits(self) -> EvolveConfig:
        flow, space = self.search.dataflow, self.search.space
        if space not in DATAFLOW_SPACES:
            # A run dir's evolve.yaml written before this version holds the whole block, with ps_share
            # at its default of then (0.75): that is not a block the user set.
            if flow.model_copy(update={"ps_share": DataflowSettings().ps_share}) != DataflowSettings() or (
                flow.ps_share not in (DataflowSettings().ps_share, _OLD_PS_SHARE)
            ):
                raise ValueError(
                    f"search.dataflow: set, but search.space is {space!r}; remove it or use dataflow"
                )
            return self
        if space == "dataflow" and self.merge_method is not None:
            raise ValueError(
                f"merge_method: search.space 'dataflow' merges no parameters; remove merge_method "
                f"({self.merge_method!r}), or use search.space: ps+dfs to search both"
            )
        if space == "ps+dfs" and self.merge_method is None:
            raise ValueError(
                "merge_method: search.space 'ps+dfs' searches the parameter space first; name the method"
            )
        if self.backend.name != "local":
            raise ValueError(
                f"backend: {self.backend.name!r}; layer paths are evaluated in-process only (backend: local)"
            )
        if self.optimizer.start == "best-source":
            raise ValueError(
                "optimizer.start: 'best-source' seeds a space of weights; a path space starts from "
                "best-known or center"
            )
        for model in flow.models or []:
            if not model.is_dir():
                raise ValueError(f"search.dataflow.models: model dir {model} does not exist")
        pool = flow.models if flow.models is not None else self.models
        if flow.owner is not None and flow.owner.resolve() not in [m.resolve() for m in pool]:
            raise ValueError(
                f"search.dataflow.owner: {flow.owner} is not in the pool ({', '.join(map(str, pool))})"
            )
        return self

    @model_validator(mode="after")
    def _warm_start_needs_weights(self) -> EvolveConfig:
        evolved = self.search.parameters
        if self.optimizer.start == "best-source" and evolved is not None and "weight" not in evolved:
            raise ValueError("optimizer.start 'best-source' needs 'weight' among search.parameters")
        return self

    @model_validator(mode="after")
    def _unique_task_names(self) -> EvolveConfig:
        names = [task.task_name for task in self.fitness]
        if len(set(names)) != len(names):
            raise ValueError(f"fitness: task names must differ, got {names}; give each a 'name'")
        self.optimizer.check_tasks(names)  # objectives and measures must name fitness tasks
        return self

    @model_validator(mode="after")
    def _steady_state_optimizer(self) -> EvolveConfig:
        if self.backend.schedule == "steady-state" and not self.optimizer.steady_state:
            able = ", ".join(steady_state_optimizers())
            raise ValueError(
                f"backend.schedule: 'steady-state' tells the optimiser one result at a time, which "
                f"'{self.optimizer.name}' cannot take (it is told whole generations); use schedule: "
                f"synchronous, or one of {able}"
            )
        if self.backend.schedule == "steady-state" and (
            self.budget.patience is not None or self.search.dataflow.ps_patience is not None
        ):
            raise ValueError(
                "budget.patience / search.dataflow.ps_patience: checked between generations, which a "
                "steady-state schedule does not have; remove it or use schedule: synchronous"
            )
        return self

    @model_validator(mode="after")
    def _fitness_layer_metrics(self) -> EvolveConfig:
        if self.racing is None and self.subset is None:
            return self
        block = "racing" if self.racing is not None else "subset"
        harness = [task.task_name for task in self.fitness if task.lm_eval is not None]
        if harness:
            raise ValueError(
                f"{block}: lm-eval tasks {harness} cannot be scored on a subset of their examples yet; "
                f"remove the {block} block or use JSONL tasks"
            )
        perplexity = [task.task_name for task in self.fitness if task.metric == "perplexity"]
        if perplexity:
            raise ValueError(
                f"{block}: tasks {perplexity} use perplexity, a corpus score that is not a mean of "
                f"per-example scores, so it cannot be estimated from a subset; remove the {block} block "
                "or use another metric"
            )
        return self

    # --- reading ------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: everything but where it is written, the budget and where it
        is evaluated (a run started locally may resume on Ray); the schedule counts, since steady-state
        changes what the optimiser is told."""
        ignored: dict[str, Any] = {"out": True, "budget": True, "backend": True} | self.unused_fields()
        identity = self.model_dump(mode="json", exclude=ignored)
        if self.backend.schedule != "synchronous":
            identity["schedule"] = self.backend.schedule
        return identity

    def unused_fields(self) -> dict[str, Any]:
        """Fields this run does not read (the data-flow block outside the data-flow spaces): left out of
        its identity and of the evolve.yaml it writes, so a later default does not make it another run."""
        return {} if self.search.space in DATAFLOW_SPACES else {"search": {"dataflow"}}

    # --- views --------------------------------------------------------------------------------------
    def optimizer_seed(self) -> int:
        return self.seed if self.optimizer.seed is None else self.optimizer.seed

    def search_space(self) -> SearchSpace:
        """The space `search.space` names, built from the models' metadata (no weights are read here).
        For ps+dfs it is the path space (the parameter-space phase has its own config: `ps_phase`)."""
        if self.search.space in DATAFLOW_SPACES:
            return self.dataflow_space()
        if self.search.space == "weights":
            return WeightsSpace.from_models(self.base_model, self.models, dtype=self.dtype)
        assert self.merge_method is not None  # _method_fits_the_space
        return ParameterSpace.from_models(
            self.base_model,
            [str(model) for model in self.models],
            self.merge_method,
            parameters=self.search.parameters,
            granularity=self.search.granularity,
            group_size=self.search.group_size,
            separate=self.search.separate,
            fixed=self.search.fixed,
            dtype=self.dtype,
            calibration=self.calibration.model_dump(exclude_none=True) if self.calibration else None,
        )

    def dataflow_space(self) -> DataflowSpace:
        """The path space over the pool (config.json files only). Under ps+dfs the pool starts with the
        parameter-space phase's best merge (`out/ps-best`, the base's architecture), its default owner."""
        flow = self.search.dataflow
        pool = [PoolModel.read(model) for model in (flow.models if flow.models is not None else self.models)]
        if self.search.space == "ps+dfs":
            pool.insert(0, PoolModel.read(self.out / PS_BEST, config_from=self.base_model, name=PS_BEST))
        paths = [Path(model.path).resolve() for model in pool]
        owner = paths.index(flow.owner.resolve()) if flow.owner is not None else 0
        return DataflowSpace(
            pool,
            owner=owner,
            repeats=flow.repeats,
            scales=flow.scales,
            encoding=flow.encoding,
            max_path_length=flow.max_path_length,
            scale_range=flow.scale_range,
            dtype=self.dtype,
            dropped_scales=flow.dropped_scales,
        )

    def ps_phase(self) -> EvolveConfig:
        """ps+dfs: the parameter-space phase as a run of its own (in `out/ps`, with its share of the budget
        at most, and `ps_patience` as its patience)."""
        flow = self.search.dataflow
        search = self.search.model_copy(update={"space": "parameter", "dataflow": DataflowSettings()})
        budget = _scaled_budget(self.budget, flow.ps_share).model_copy(update={"patience": flow.ps_patience})
        return self.model_copy(update={"search": search, "budget": budget, "out": self.out / PS_DIR})

    def dfs_phase(
        self, *, ps_spent: int | None = None, ps_seconds: float = 0.0, reserve: int = 0
    ) -> EvolveConfig:
        """ps+dfs: this config with what the parameter-space phase left of the budget: its evaluations
        (`ps_spent`; None: its whole share) and seconds, less `reserve` evaluations (what the guard's
        scoring is worth); at least one evaluation stays."""
        budget, flow = self.budget, self.search.dataflow
        ps_budget = _scaled_budget(budget, flow.ps_share)
        evaluations = seconds = None
        if budget.max_evaluations is not None:
            spent = ps_spent if ps_spent is not None else ps_budget.max_evaluations
            evaluations = max(1, budget.max_evaluations - int(spent or 0) - reserve)
        if budget.max_wall_seconds is not None:
            used = ps_seconds if ps_spent is not None else float(ps_budget.max_wall_seconds or 0.0)
            seconds = max(1e-3, budget.max_wall_seconds - used)
        update = BudgetConfig(max_evaluations=evaluations, max_wall_seconds=seconds)
        return self.model_copy(update={"budget": update})


def _scaled_budget(budget: BudgetConfig, share: float) -> BudgetConfig:
    evaluations = budget.max_evaluations
    seconds = budget.max_wall_seconds
    return BudgetConfig(
        max_evaluations=None if evaluations is None else max(1, round(evaluations * share)),
        max_wall_seconds=None if seconds is None else seconds * share,
    )


def check_inputs(config: EvolveConfig) -> SearchSpace:
    """Everything that can be checked before evaluating: the search space and the sources' shapes.
    A data-flow pool needs one width, not one architecture (its models may differ in depth)."""
    space = config.search_space()
    config.optimizer.check_space(space)
    config.evaluation.torch_device()
    if config.search.space == "ps+dfs":
        config.optimizer.check_space(config.ps_phase().search_space())
    if config.search.space != "dataflow":
        check_same_shapes(config.base_model, config.models)
    return space


def check_same_shapes(base: Path, models: list[Path]) -> None:
    """Every source must hold every base tensor with the base's shape (headers only, no data read)."""
    from evomerge.io.reader import ModelDir

    with ModelDir(base) as base_dir:
        shapes = {name: base_dir.info(name).shape for name in base_dir.tensor_names()}
    for model in models:
        with ModelDir(model) as model_dir:
            _compare(base, shapes, model, model_dir)


def _compare(base: Path, shapes: dict[str, tuple[int, ...]], model: Path, model_dir: Any) -> None:
    for name, shape in shapes.items():
        if not model_dir.has(name):
            raise TensorMismatchError(f"models: {model} has no tensor {name!r}, which base_model {base} has.")
        other = tuple(model_dir.info(name).shape)
        if other != shape:
            raise TensorMismatchError(
                f"models: tensor {name!r} has shape {list(other)} in {model} but {list(shape)} in base_model "
                f"{base}; every source must share the base's architecture."
            )
