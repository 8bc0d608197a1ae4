"""The `digits` zoo: MLP classifiers on scikit-learn's 8x8 digits, one specialist per half of the classes.

The M2N2 setting: both specialists start from one shared initialisation; one sees only digits 0-4, the
other only 5-9, so each is good on its half and blind on the other, and a merge must combine them.
Real data (1797 images) that ships with scikit-learn, so no download is needed. The `digits` task mixes
both halves, and each of its lines names its half as `group`, so its accuracy also comes out per half.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evomerge.errors import SourceError
from evomerge.zoo.manifest import TaskSplits, ZooManifest

MODEL_TYPE = "evomerge_mlp"
N_FEATURES = 64  # 8x8 pixels
N_CLASSES = 10
HALVES = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}
HALF_OF = {label: half for half, labels in HALVES.items() for label in labels}


class MLPClassifier(nn.Module):
    """A ReLU MLP from 64 pixel intensities (scaled to [0, 1]) to 10 class logits.

    Parameters are `layers.{i}.weight` / `layers.{i}.bias`, the same names in memory and in
    model.safetensors, so the merge engine can write merged tensors straight into a live model.
    """

    def __init__(self, layer_sizes: Sequence[int] = (N_FEATURES, 64, N_CLASSES)) -> None:
        super().__init__()
        sizes = [int(size) for size in layer_sizes]
        if len(sizes) < 2 or sizes[0] != N_FEATURES or sizes[-1] != N_CLASSES or min(sizes) < 1:
            raise ValueError(
                f"layer_sizes must start with {N_FEATURES} inputs, end with {N_CLASSES} classes and be positive; "
                f"got {sizes}"
            )
        self.layer_sizes = sizes
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    @property
    def config(self) -> dict[str, Any]:
        """What config.json holds: enough to rebuild the module."""
        return {"model_type": MODEL_TYPE, "layer_sizes": self.layer_sizes, "activation": "relu"}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features  # (B, 64)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index < len(self.layers) - 1:
                hidden = torch.relu(hidden)
        return hidden  # (B, 10)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), but from `generator`."""
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, nn.Linear)
                bound = 1.0 / math.sqrt(layer.in_features)
                for tensor in (layer.weight, layer.bias):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * 2 * bound - bound)

    def save_pretrained(self, directory: Path | str) -> None:
        """Write config.json and model.safetensors into `directory` (created if missing)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: Path | str) -> MLPClassifier:
        """Load a dir written by `save_pretrained`; SourceError names the dir and what is wrong."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = _read_config(directory)
        model = cls(config["layer_sizes"])
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise SourceError(
                f"{weights} not found: an {MODEL_TYPE} dir needs model.safetensors beside config.json"
            )
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as error:
            raise SourceError(
                f"{weights} does not fit layer_sizes {config['layer_sizes']}: {error}"
            ) from error
        return model


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise SourceError(f"{path} not found: expected a model dir written by MLPClassifier.save_pretrained")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != MODEL_TYPE or "layer_sizes" not in config:
        raise SourceError(
            f"{path}: expected model_type {MODEL_TYPE!r} with layer_sizes, got model_type "
            f"{config.get('model_type')!r}; this is not an evomerge MLP classifier"
        )
    return dict(config)


@dataclass(frozen=True)
class DigitsSize:
    """How big the classifiers are and how long each specialist trains."""

    hidden: tuple[int, ...]
    epochs: int
    batch_size: int = 32
    learning_rate: float = 3e-3


DIGITS_SIZES = {
    "tiny": DigitsSize(hidden=(32,), epochs=8),
    "small": DigitsSize(hidden=(64, 64), epochs=40),
}


@dataclass(frozen=True)
class DigitsData:
    """Features scaled to [0, 1] (N, 64) and labels (N,), one array pair per split."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def load(cls, seed: int) -> DigitsData:
        """Shuffle the 1797 images with `seed` and cut 60/20/20 into train/dev/test."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        features = (bunch.data / 16.0).astype(np.float32)
        order = np.random.default_rng(seed).permutation(len(features))
        cut_train, cut_dev = int(0.6 * len(order)), int(0.8 * len(order))
        parts = {"train": order[:cut_train], "dev": order[cut_train:cut_dev], "test": order[cut_dev:]}
        return cls({name: (features[idx], bunch.target[idx].astype(np.int64)) for name, idx in parts.items()})

    def subset(self, split: str, classes: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """The split, restricted to `classes` (all when None)."""
        features, labels = self.splits[split]
        if classes is None:
            return features, labels
        keep = np.isin(labels, classes)
        return features[keep], labels[keep]


def total_steps(size: str) -> int:
    """Progress units `build_digits` reports: one per training epoch of each specialist, plus data and init."""
    return 2 + 2 * DIGITS_SIZES[size].epochs


def build_digits(root: Path, *, size: str, seed: int, advance: Callable[[int], None]) -> ZooManifest:
    """Write the digits zoo into `root` (an empty dir) and return its manifest (not yet saved)."""
    spec = DIGITS_SIZES[size]
    data = DigitsData.load(seed)
    tasks = {name: _write_task(root, name, data, classes) for name, classes in _task_classes().items()}
    advance(1)
    generator = torch.Generator().manual_seed(seed)
    init = MLPClassifier((N_FEATURES, *spec.hidden, N_CLASSES))
    init.reset_parameters(generator)
    init.save_pretrained(root / "models" / "base")
    advance(1)
    models = {}
    for half, classes in HALVES.items():
        model = MLPClassifier(init.layer_sizes)
        model.load_state_dict(init.state_dict())
        train_classifier(
            model, *data.subset("train", classes), spec=spec, generator=generator, advance=advance
        )
        model.save_pretrained(root / "models" / half)
        models[half] = root / "models" / half
    return ZooManifest(
        root=root, name="digits", size=size, seed=seed, base=root / "models" / "base",
        models=models, tasks=tasks, targets=["digits"],
    )  # fmt: skip


def _task_classes() -> dict[str, tuple[int, ...] | None]:
    return {"digits": None, **HALVES}


def _write_task(root: Path, name: str, data: DigitsData, classes: Sequence[int] | None) -> TaskSplits:
    folder = root / "tasks" / name
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        features, labels = data.subset(split, classes)
        lines = [
            json.dumps(_record(row, int(label), grouped=classes is None))
            for row, label in zip(features, labels, strict=True)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return TaskSplits(
        metric="accuracy", train=folder / "train.jsonl", dev=folder / "dev.jsonl", test=folder / "test.jsonl"
    )


def _record(row: np.ndarray, label: int, *, grouped: bool) -> dict[str, Any]:
    """A task line; `grouped` (a task over both halves) adds the label's half as its group."""
    record: dict[str, Any] = {"features": [round(float(v), 4) for v in row], "label": label}
    if grouped:
        record["group"] = HALF_OF[label]
    return record


def train_classifier(
    model: MLPClassifier,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    spec: DigitsSize,
    generator: torch.Generator,
    advance: Callable[[int], None],
) -> None:
    """Minibatch Adam on cross-entropy; the batch order draws from `generator`."""
    inputs, targets = torch.from_numpy(features), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    for _ in range(spec.epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), spec.batch_size):
            batch = order[start : start + spec.batch_size]
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        advance(1)


def accuracy(model: MLPClassifier, features: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max logit is the label (a quick check; evomerge.eval has the real metric)."""
    with torch.no_grad():
        predicted = model(torch.from_numpy(features)).argmax(dim=-1).numpy()
    return float((predicted == labels).mean())
