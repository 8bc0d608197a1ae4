"""`zoo.json`: what a built zoo holds (models, task files, targets) and the fingerprint that caches it.

Paths in the file are relative to the zoo dir so that a zoo can be moved or copied whole; `ZooManifest`
resolves them against the dir it was loaded from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_write_text

MANIFEST_FILE = "zoo.json"


class ZooError(EvomergeError, ValueError):
    """A zoo dir is missing, incomplete or was asked for with unknown arguments."""


@dataclass(frozen=True)
class TaskSplits:
    """One task's JSONL files. `train` is None for targets, which are only scored, never trained on."""

    metric: str
    dev: Path
    test: Path
    train: Path | None = None

    def split(self, name: str) -> Path:
        """The file of split `name` ("train", "dev" or "test")."""
        path = {"train": self.train, "dev": self.dev, "test": self.test}.get(name)
        if path is None:
            raise ZooError(
                f"task split {name!r} does not exist; expected one of train (skills only), dev, test"
            )
        return path


@dataclass(frozen=True)
class ZooManifest:
    """A built zoo: its base, its specialists by skill, its tasks and which tasks are merge targets."""

    root: Path
    name: str
    size: str
    seed: int
    base: Path
    models: dict[str, Path]
    tasks: dict[str, TaskSplits]
    targets: list[str]
    fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | str) -> ZooManifest:
        """Read `root/zoo.json`; raise ZooError naming the file when it is missing or malformed."""
        root = Path(root)
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise ZooError(
                f"{path} not found: expected a zoo built by `evomerge zoo build NAME --out {root}`"
            )
        try:
            return cls.from_dict(root, json.loads(path.read_text(encoding="utf-8")))
        except (KeyError, TypeError, ValueError) as error:
            raise ZooError(f"{path} is malformed ({error}); rebuild it with `evomerge zoo build`") from error

    @classmethod
    def from_dict(cls, root: Path, data: dict[str, Any]) -> ZooManifest:
        """Resolve the relative paths of a parsed zoo.json against `root`."""
        return cls(
            root=root,
            name=str(data["name"]),
            size=str(data["size"]),
            seed=int(data["seed"]),
            base=root / data["base"],
            models={skill: root / rel for skill, rel in data["models"].items()},
            tasks={task: _task_from_dict(root, splits) for task, splits in data["tasks"].items()},
            targets=list(data["targets"]),
            fingerprint=str(data.get("fingerprint", "")),
            info=dict(data.get("info", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        """The zoo.json content: every path relative to `root`."""
        return {
            "name": self.name,
            "size": self.size,
            "seed": self.seed,
            "base": self._rel(self.base),
            "models": {skill: self._rel(path) for skill, path in self.models.items()},
            "tasks": {task: self._task_to_dict(splits) for task, splits in self.tasks.items()},
            "targets": list(self.targets),
            "fingerprint": self.fingerprint,
            "info": self.info,
        }

    def save(self) -> Path:
        """Write zoo.json atomically (temp file, then rename)."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        return atomic_write_text(self.root / MANIFEST_FILE, text)

    def missing_files(self) -> list[Path]:
        """Files the manifest names that are not on disk (a partial or damaged zoo)."""
        wanted = [self.base / "config.json", *(path / "config.json" for path in self.models.values())]
        for splits in self.tasks.values():
            wanted += [p for p in (splits.train, splits.dev, splits.test) if p is not None]
        return [path for path in wanted if not path.is_file()]

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _task_to_dict(self, splits: TaskSplits) -> dict[str, str]:
        out = {"metric": splits.metric}
        if splits.train is not None:
            out["train"] = self._rel(splits.train)
        return {**out, "dev": self._rel(splits.dev), "test": self._rel(splits.test)}


def _task_from_dict(root: Path, data: dict[str, str]) -> TaskSplits:
    train = data.get("train")
    return TaskSplits(
        metric=data["metric"],
        dev=root / data["dev"],
        test=root / data["test"],
        train=None if train is None else root / train,
    )


def fingerprint(arguments: dict[str, Any], code_files: list[Path]) -> str:
    """A digest of the build arguments and the source of the code that builds: either changing rebuilds."""
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode())
    for path in sorted(code_files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
