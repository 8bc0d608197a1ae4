"""`build(name, out, ...)`: build a zoo once, into a temp dir renamed into place, and reuse it after.

A zoo is a pure function of (name, size, seed, the zoo's code): zoo.json stores a fingerprint of those,
and a second call whose fingerprint matches returns the zoo on disk without training anything.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import evomerge
from evomerge.zoo.manifest import MANIFEST_FILE, ZooError, ZooManifest, fingerprint

ZooName = Literal["lm", "digits", "hetero"]
ZooSize = Literal["tiny", "small"]
_HERE = Path(__file__).parent
_CODE = {
    "digits": ["digits.py", "manifest.py", "build.py"],
    "lm": ["lm.py", "skills.py", "tokenizer.py", "train.py", "manifest.py", "build.py"],
    "hetero": ["hetero.py", "lm.py", "skills.py", "tokenizer.py", "train.py", "manifest.py", "build.py"],
}


class _Builder(Protocol):
    def __call__(
        self, root: Path, *, size: str, seed: int, advance: Callable[[int], None]
    ) -> ZooManifest: ...


@dataclass(frozen=True)
class Finetune:
    """The `lm` zoo's fine-tuning budget, where it differs from the size's (None: the size's own)."""

    steps: int | None = None
    rate: float | None = None

    def changed(self) -> dict[str, int | float]:
        """The overrides that are set, by LMSize field name (what the fingerprint and the manifest record)."""
        return {
            k: v
            for k, v in {"finetune_steps": self.steps, "finetune_rate": self.rate}.items()
            if v is not None
        }


HARD = Finetune(steps=1000, rate=2e-3)  # `--hard`: specialists that drift apart (benchmarks/skills.py)


def build(
    name: ZooName,
    out: Path | str,
    *,
    size: ZooSize = "tiny",
    seed: int = 0,
    progress: bool = False,
    finetune: Finetune = Finetune(),
) -> ZooManifest:
    """Build zoo `name` into `out` (or reuse the one there if it was built with the same arguments and code).

    `out` may be missing, empty, or hold an older zoo (which is replaced); any other non-empty dir is
    refused so that a typo cannot wipe a user's files. `progress` shows a rich progress bar on stderr.
    `finetune` (lm only) fine-tunes the specialists longer or faster than the size does.
    """
    _check_arguments(name, size, seed, finetune)
    out = Path(out)
    digest = zoo_fingerprint(name, size, seed, finetune)
    cached = cached_zoo(out, digest)
    if cached is not None:
        return cached
    _refuse_foreign_dir(out)
    builder, total = _builder(name, size, finetune)
    label = f"zoo {name} ({size}{', ' if finetune.changed() else ''}{_describe(finetune)})"
    with _temporary_dir(out) as temporary, _progress_bar(progress, label, total) as advance:
        start = time.perf_counter()
        manifest = builder(temporary, size=size, seed=seed, advance=advance)
        data = manifest.to_dict()
        data["info"] = {**data["info"], "build_seconds": round(time.perf_counter() - start, 1)}
        manifest = ZooManifest.from_dict(temporary, {**data, "fingerprint": digest})
        manifest.save()
        _move_into_place(temporary, out)
    return ZooManifest.load(out)


def zoo_fingerprint(name: str, size: str, seed: int, finetune: Finetune = Finetune()) -> str:
    """The cache key: arguments, package version and the source of the modules that build this zoo."""
    arguments = {"name": name, "size": size, "seed": seed, "version": evomerge.__version__}
    arguments |= finetune.changed()  # absent when unset: the default zoo keeps its key
    return fingerprint(arguments, [_HERE / file for file in _CODE[name]])


def cached_zoo(out: Path, digest: str) -> ZooManifest | None:
    """The zoo in `out` if it is complete and its fingerprint is `digest`, else None."""
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = ZooManifest.load(out)
    except ZooError:
        return None
    if manifest.fingerprint != digest or manifest.missing_files():
        return None
    return manifest


def _describe(finetune: Finetune) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in finetune.changed().items())


def _check_arguments(name: str, size: str, seed: int, finetune: Finetune = Finetune()) -> None:
    if name not in get_args(ZooName):
        raise ZooError(f"unknown zoo {name!r}: expected one of {', '.join(get_args(ZooName))}")
    if size not in get_args(ZooSize):
        raise ZooError(f"unknown zoo size {size!r}: expected one of {', '.join(get_args(ZooSize))}")
    if not isinstance(seed, int) or seed < 0:
        raise ZooError(f"zoo seed must be a non-negative integer, got {seed!r}")
    if finetune.changed() and name != "lm":
        raise ZooError(f"--finetune-steps/--finetune-rate/--hard apply to the lm zoo only, not {name!r}")
    if finetune.steps is not None and finetune.steps < 1:
        raise ZooError(f"--finetune-steps must be a positive integer, got {finetune.steps}")
    if finetune.rate is not None and not 0 < finetune.rate < 1:
        raise ZooError(f"--finetune-rate must be in (0, 1), got {finetune.rate} (the size's own: 5e-4)")


def _refuse_foreign_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out} exists and is not a directory: pass an --out dir to build the zoo in")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ZooError(
            f"{out} is not empty and holds no {MANIFEST_FILE}: refusing to replace a dir that is not a zoo; "
            "pass an empty or new --out dir"
        )


def _builder(name: str, size: str, finetune: Finetune) -> tuple[_Builder, int]:
    """The build function of zoo `name` and the number of progress units it will report."""
    if name == "digits":
        from evomerge.zoo import digits

        return digits.build_digits, digits.total_steps(size)
    if name == "hetero":
        from evomerge.zoo import hetero

        return hetero.build_hetero, hetero.total_steps(size)
    from evomerge.zoo import lm

    builder = functools.partial(lm.build_lm, finetune_steps=finetune.steps, finetune_rate=finetune.rate)
    return builder, lm.total_steps(size, finetune.steps)


@contextlib.contextmanager
def _temporary_dir(out: Path) -> Iterator[Path]:
    """A fresh dir beside `out` (same filesystem, so the final rename is atomic); removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _move_into_place(temporary: Path, out: Path) -> None:
    """Replace `out` (absent, empty or a stale zoo) with the finished build."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, out)


@contextlib.contextmanager
def _progress_bar(show: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`: a rich progress bar on stderr when `show`, else a no-op."""
    if not show:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
