"""Zoo builds are cached by fingerprint: same arguments reuse, anything else rebuilds, foreign dirs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.zoo import ZooManifest, build
from evomerge.zoo import digits as digits_module
from evomerge.zoo.build import zoo_fingerprint
from evomerge.zoo.manifest import ZooError


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the zoo was rebuilt although a matching one was on disk")

    monkeypatch.setattr(digits_module, "build_digits", fail)


def test_second_build_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build("digits", tmp_path / "zoo", size="tiny", seed=1)
    stamp = (first.models["low"] / "model.safetensors").stat().st_mtime_ns
    _forbid_training(monkeypatch)
    second = build("digits", tmp_path / "zoo", size="tiny", seed=1)
    assert second.fingerprint == first.fingerprint == zoo_fingerprint("digits", "tiny", 1)
    assert (second.models["low"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_other_arguments_rebuild(tmp_path: Path) -> None:
    first = build("digits", tmp_path / "zoo", size="tiny", seed=1)
    second = build("digits", tmp_path / "zoo", size="tiny", seed=2)
    assert second.seed == 2 and second.fingerprint != first.fingerprint
    assert ZooManifest.load(tmp_path / "zoo").seed == 2
    assert not list(tmp_path.glob(".zoo.*"))  # no temp dirs left behind


def test_damaged_zoo_is_rebuilt(tmp_path: Path) -> None:
    first = build("digits", tmp_path / "zoo", size="tiny", seed=1)
    (first.models["high"] / "config.json").unlink()
    assert not build("digits", tmp_path / "zoo", size="tiny", seed=1).missing_files()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    one = build("digits", tmp_path / "a", size="tiny", seed=3)
    two = build("digits", tmp_path / "b", size="tiny", seed=3)
    for skill in one.models:
        assert (one.models[skill] / "model.safetensors").read_bytes() == (
            two.models[skill] / "model.safetensors"
        ).read_bytes()
    assert one.tasks["digits"].test.read_text() == two.tasks["digits"].test.read_text()


def test_foreign_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ZooError, match="not empty"):
        build("digits", tmp_path / "mine", size="tiny")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(root: Path, **kwargs: object) -> None:
        (root / "half-written").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(digits_module, "build_digits", explode)
    with pytest.raises(RuntimeError, match="boom"):
        build("digits", tmp_path / "zoo", size="tiny")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "size", "seed", "match"),
    [("gpt", "tiny", 0, "unknown zoo"), ("lm", "huge", 0, "size"), ("lm", "tiny", -1, "seed")],
)
def test_bad_arguments(tmp_path: Path, name: str, size: str, seed: int, match: str) -> None:
    with pytest.raises(ZooError, match=match):
        build(name, tmp_path / "zoo", size=size, seed=seed)  # type: ignore[arg-type]


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    manifest = build("digits", tmp_path / "zoo", size="tiny")
    data = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert data["base"] == "models/base" and data["tasks"]["low"]["dev"] == "tasks/low/dev.jsonl"
    assert ZooManifest.from_dict(tmp_path / "zoo", data) == manifest
    with pytest.raises(ZooError, match="not found"):
        ZooManifest.load(tmp_path / "nowhere")
    (tmp_path / "zoo" / "zoo.json").write_text("{}")
    with pytest.raises(ZooError, match="malformed"):
        ZooManifest.load(tmp_path / "zoo")
