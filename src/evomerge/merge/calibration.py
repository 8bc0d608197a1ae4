"""Calibration statistics of data-aware merges: gathered once per source, cached on disk, read per tensor.

A merge config names its calibration data in a top-level block (mergekit's YAML has no such field):

    merge_method: regmean
    models: [{model: zoo/models/add}, {model: zoo/models/reverse}]
    calibration:
      task: zoo/tasks/multi/dev.jsonl     # JSONL, one example a line: {"prompt": ...[, "answer": ...]} or {"text": ...}
      models:                             # optional: a file per model (RegMean's setting: each model's own data)
        zoo/models/add: zoo/tasks/add/train.jsonl
      limit: 256                          # first N examples of each file
      cache: ~/.cache/evomerge/calibration

Each model's statistic is one forward (and, for Fisher, backward) pass per example over the model's own
copy, one example at a time (no padding): the text is the prompt followed by its answer where the file
has one, as the model reads them when it writes the answer. `gram`: for every `nn.Linear`, the mean over
tokens of x x^T of its input (in, in), stored under the layer's weight name; for every `nn.Embedding` (a
linear map of one-hot inputs, whose Gram matrix is diagonal) the diagonal only: the share of the tokens
that carried each id (num_embeddings,), under the embedding's weight name; `fisher`: the mean over
examples of the squared gradient of log p(y | x) with y drawn from the model's own predictions (the true
Fisher, one sample per position, from a fixed seed), stored under each parameter's name, with its mean
over all parameters in the file's metadata (the kernel sees F / mean(F)).

The cache key hashes the kind, the model dir (resolved path, names, sizes and mtimes of config.json and
its weight files), the calibration file's bytes, `limit` and this module's statistics version, so a
changed model or file is gathered again. Files are written atomically (temp file, then rename).

The planner asks `statistics_params` for every tensor of a data-aware merge; the first ask per source
gathers (or finds) its file, later asks only open it. The kernels get tensors: `with_statistics` wraps a
pure kernel so that the references the plan holds are read just before the kernel runs, one tensor at a
time, so the merge stays streaming.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_path
from evomerge.merge.registry import Kernel, KernelFn, MergeMethod, StatisticKind

STATISTICS_VERSION = 2  # bump when what a statistic means changes: old cache entries are then ignored
FISHER_SEED = 0
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


class CalibrationError(EvomergeError, ValueError):
    """Calibration data is missing or of the wrong kind, or statistics cannot be gathered from a model."""


class Calibration(BaseModel):
    """The `calibration:` block of a merge config: which prompts the data-aware statistics are gathered on."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = None  # one file for every model
    models: dict[str, str] | None = None  # model (as the config names it) -> its own file
    limit: int = Field(default=256, ge=1)
    cache: str | None = None  # default: $EVOMERGE_CACHE/calibration or ~/.cache/evomerge/calibration

    def file_for(self, model: str) -> str:
        """The calibration file of `model`: its own if given, else the shared `task`."""
        own = (self.models or {}).get(model)
        if own is not None:
            return own
        if self.task is None:
            raise CalibrationError(
                f"calibration: no file for model {model!r}; add it under calibration.models or give a "
                "calibration.task that every model uses"
            )
        return self.task

    def resolved(self) -> Calibration:
        """The same block with absolute paths (model keys too, as an evolve config resolves its models)."""
        models = {str(Path(m).resolve()): str(Path(f).resolve()) for m, f in (self.models or {}).items()}
        return Calibration(
            task=str(Path(self.task).resolve()) if self.task is not None else None,
            models=models or None,
            limit=self.limit,
            cache=str(self.cache_dir().resolve()),
        )

    def cache_dir(self) -> Path:
        if self.cache is not None:
            return Path(self.cache).expanduser()
        root = os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge"
        return Path(root) / "calibration"


# ---- the calibration file --------------------------------------------------------------------------


def read_texts(path: str | Path, limit: int, where: str = "calibration.task") -> list[str]:
    """The first `limit` calibration texts of a JSONL file (prompt + answer, or text); checked whole."""
    path = Path(path)
    if not path.is_file():
        found = "is a directory" if path.is_dir() else "does not exist"
        raise CalibrationError(
            f"{where}: {path} {found}; give a JSONL file with one example a line "
            '({"prompt": ..., "answer": ...} or {"text": ...}), e.g. a task\'s train or dev split'
        )
    texts: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                texts.append(_text_of(line, f"{where}: {path} line {number}"))
            if len(texts) >= limit:
                break
    if not texts:
        raise CalibrationError(f"{where}: {path} holds no example; give a JSONL file with at least one line")
    return texts


def _text_of(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CalibrationError(
            f"{where}: not JSON ({error.msg}); a calibration file is JSONL, one JSON object a line"
        ) from None
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("text"), str) and record["text"]:
        return str(record["text"])
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise CalibrationError(
            f"{where}: no 'prompt' (or 'text') string; a calibration example is "
            '{"prompt": ..., "answer": ...} or {"text": ...}'
        )
    answer = record.get("answer")
    return prompt + answer if isinstance(answer, str) else prompt


def check_calibration(
    calibration: Calibration | None, method: MergeMethod, kernel_models: Sequence[str]
) -> None:
    """Everything about `calibration` that can be checked before a model loads (raises CalibrationError)."""
    if method.statistics is None:
        if calibration is not None:
            raise CalibrationError(
                f"calibration: merge_method '{method.name}' reads no calibration data (only the data-aware "
                "methods regmean, regmean_plusplus, prodistill and fisher do); remove the calibration block"
            )
        return
    if calibration is None:
        raise CalibrationError(
            f"merge_method '{method.name}' is data-aware: it needs calibration data; add "
            "`calibration: {task: path/to/prompts.jsonl}` (a JSONL task file, e.g. a train split)"
        )
    for model in calibration.models or {}:
        if model not in kernel_models:
            raise CalibrationError(
                f"calibration.models: {model!r} is not a model this merge reads ({', '.join(kernel_models)}); "
                "name models exactly as in models/slices"
            )
    for model in kernel_models:
        _check_tokenizer(model)
        where = (
            f"calibration.models[{model!r}]" if model in (calibration.models or {}) else "calibration.task"
        )
        read_texts(calibration.file_for(model), calibration.limit, where)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_tokenizer(model: str) -> None:
    directory = Path(model)
    if directory.is_dir() and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise CalibrationError(
            f"calibration: {directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); a data-aware "
            "merge runs each model on the calibration texts: copy the model's tokenizer into its dir"
        )


# ---- gathering ---------------------------------------------------------------------------------------


def gather(
    model_dir: str | Path, texts: Sequence[str], kind: StatisticKind
) -> tuple[dict[str, torch.Tensor], float]:
    """(statistic by tensor name, scale): Gram matrices of linear inputs or the diagonal Fisher.

    `scale` is what the kernel divides by: 1 for Gram matrices, the mean Fisher over all parameters.
    """
    model, tokenizer = _load(Path(model_dir))
    ids = [_encode(tokenizer, text) for text in texts]
    if kind == "gram":
        return _grams(model, ids), 1.0
    fisher = _fisher(model, ids)
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    return fisher, max(total / max(count, 1), torch.finfo(torch.float32).tiny)


def _load(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per model load would drown the merge's own output
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise CalibrationError(
            f"calibration: cannot load {model_dir} with its tokenizer ({error}); a data-aware merge runs each "
            "model on the calibration texts, so every model dir needs a causal LM and its tokenizer files"
        ) from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    if ids.shape[1] == 0:
        raise CalibrationError(f"calibration: the text {text[:40]!r} encodes to no token")
    return cast(torch.Tensor, ids)


def _grams(model: torch.nn.Module, examples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over all tokens of x x^T for the input x of every nn.Linear, keyed `<module>.weight`, and the
    diagonal of that Gram matrix for every nn.Embedding (the share of tokens per id, one-hot inputs)."""
    return record_grams(model, lambda name: True, lambda: _run_all(model, examples))


def _run_all(model: torch.nn.Module, examples: Sequence[torch.Tensor]) -> None:
    for ids in examples:
        model(input_ids=ids)


def record_grams(
    model: torch.nn.Module,
    wanted: Callable[[str], bool],
    forward: Callable[[], None],
    keep: Callable[[], torch.Tensor | None] = lambda: None,
) -> dict[str, torch.Tensor]:
    """The Gram statistics (see `_grams`) of the modules whose weight name `wanted` accepts, over what
    `forward()` runs through `model`. `keep()`, if not None, is the bool mask (batch, tokens) of the
    tokens the running forward counts (padding excluded)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def tokens(x: torch.Tensor, width: int | None) -> torch.Tensor:
        mask = keep()
        if width is None:
            return x.reshape(-1) if mask is None else x[mask]
        return x.reshape(-1, width) if mask is None else x[mask]

    def add(name: str, value: torch.Tensor, tokens: int) -> None:
        sums[name] = sums[name] + value if name in sums else value
        counts[name] = counts.get(name, 0) + tokens

    def linear(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = tokens(inputs[0].detach(), inputs[0].shape[-1]).double()  # (tokens, in)
            add(name, x.T @ x, x.shape[0])  # (in, in)

        return record

    def embedding(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            ids = tokens(inputs[0].detach(), None)
            size = cast(torch.nn.Embedding, module).num_embeddings
            add(name, torch.bincount(ids, minlength=size).double(), ids.numel())  # diag of the one-hot Gram

        return record

    handles = []
    for name, module in model.named_modules():
        if not wanted(f"{name}.weight"):
            continue
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear(f"{name}.weight")))
        elif isinstance(module, torch.nn.Embedding):
            handles.append(module.register_forward_hook(embedding(f"{name}.weight")))
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / counts[name]).float() for name, total in sums.items()}


def _fisher(model: torch.nn.Module, examples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over examples of (d/dtheta sum_t log p(y_t | x_<t))^2, y_t drawn from the model (seeded)."""
    generator = torch.Generator().manual_seed(FISHER_SEED)
    parameters = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for ids in examples:
        logits = model(input_ids=ids).logits[0]  # (T, V)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        drawn = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)  # (T, 1)
        loss = log_probs.gather(1, drawn).sum()
        grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for (name, _), grad in zip(parameters.items(), grads, strict=True):
            if grad is not None:
                sums[name].add_(grad.detach() ** 2)
    return {name: total / len(examples) for name, total in sums.items()}


# ---- the cache ---------------------------------------------------------------------------------------


def cache_key(model_dir: str | Path, file: str | Path, limit: int, kind: StatisticKind) -> str:
    """A digest of everything a statistic depends on (see the module docstring)."""
    directory = Path(model_dir).resolve()
    files = sorted(p for p in directory.iterdir() if p.name in _WEIGHT_FILES or p.suffix == ".safetensors")
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    data = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    payload = json.dumps([STATISTICS_VERSION, kind, str(directory), stamp, data, limit])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


_LOCK = threading.Lock()
_KNOWN: dict[tuple[str, str, int, str, str], Path] = {}  # (model dir, file, limit, kind, cache) -> path


def statistics_file(model_dir: str | Path, calibration: Calibration, model: str, kind: StatisticKind) -> Path:
    """The cached statistics of `model` (gathered now if the cache lacks them)."""
    file = calibration.file_for(model)
    memo = (str(model_dir), file, calibration.limit, kind, str(calibration.cache_dir()))
    with _LOCK:
        if memo in _KNOWN and _KNOWN[memo].is_file():
            return _KNOWN[memo]
        path = (
            calibration.cache_dir()
            / f"{kind}-{cache_key(model_dir, file, calibration.limit, kind)}.safetensors"
        )
        if not path.is_file():
            texts = read_texts(file, calibration.limit)
            statistics, scale = gather(model_dir, texts, kind)
            _write(
                path, statistics, {"kind": kind, "scale": repr(scale), "model": str(model_dir), "file": file}
            )
        _KNOWN[memo] = path
        return path


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)


# ---- from the plan to the kernel -------------------------------------------------------------------


@dataclass(frozen=True)
class StatisticRef:
    """One tensor of a statistics file, read when the kernel is about to run."""

    path: Path
    name: str

    def load(self) -> torch.Tensor | None:
        """The statistic (divided by the file's scale), or None if this tensor has none (e.g. a norm)."""
        handle, names, scale = _open(self.path)
        if self.name not in names:
            return None
        tensor = handle.get_tensor(self.name)
        return tensor if scale == 1.0 else tensor / scale


_HANDLES: dict[Path, tuple[Any, frozenset[str], float]] = {}


def _open(path: Path) -> tuple[Any, frozenset[str], float]:
    """(safetensors handle, its tensor names, its scale), opened once per process."""
    from safetensors import safe_open

    with _LOCK:
        if path not in _HANDLES:
            handle = safe_open(str(path), framework="pt")
            scale = float((handle.metadata() or {}).get("scale", "1.0"))
            _HANDLES[path] = (handle, frozenset(handle.keys()), scale)
        return _HANDLES[path]


def statistics_params(
    method: MergeMethod, calibration: Any, inputs: Sequence[tuple[str, Path, str]]
) -> dict[str, Any]:
    """The `statistics` keyword of one tensor's kernel: a reference per (model, model dir, tensor name)."""
    if method.statistics is None:
        return {}
    if not isinstance(calibration, Calibration):
        raise CalibrationError(
            f"merge_method '{method.name}' needs calibration data; add a calibration block"
        )
    kind = method.statistics
    return {
        "statistics": [
            StatisticRef(statistics_file(directory, calibration, model, kind), name)
            for model, directory, name in inputs
        ]
    }


def with_statistics(kernel: KernelFn) -> Kernel:
    """`kernel` taking `statistics=[StatisticRef, ...]` as the plan gives them, as tensors (or None)."""

    @torch.no_grad()
    def run(
        tensors: Sequence[torch.Tensor], *, statistics: Sequence[Any] | None = None, **params: Any
    ) -> torch.Tensor:
        loaded = None
        if statistics is not None:
            loaded = [_as_tensor(item, tensors[0].device) for item in statistics]
        return kernel(tensors, statistics=loaded, **params)

    return cast(Kernel, run)


def _as_tensor(item: Any, device: torch.device) -> torch.Tensor | None:
    if isinstance(item, StatisticRef):
        item = item.load()
    return item.to(device) if isinstance(item, torch.Tensor) else None
