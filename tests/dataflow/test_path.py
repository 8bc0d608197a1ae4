from __future__ import annotations

import pytest

from evomerge.dataflow.path import LayerPath, PathError, Step, is_path_text

MODELS = ("/m/a", "/m/b")


def path(*steps: tuple[int, int, float]) -> LayerPath:
    return LayerPath(MODELS, 0, tuple(Step(*s) for s in steps))


def test_a_good_path_passes_and_round_trips_through_text() -> None:
    good = path((0, 0, 1.0), (1, 2, 0.75), (0, 3, 1.0))
    assert good.check(max_length=3) is good
    text = good.to_text()
    assert is_path_text(text) and LayerPath.from_text(text) == good
    assert good.describe() == "a.0 > b.2 (x0.75) > a.3"
    assert not good.unit_scales and path((0, 0, 1.0)).unit_scales


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((), "empty"),
        (((1, 0, 1.0), (0, 3, 1.0)), "starts with a layer of /m/b"),
        (((0, 0, 1.0), (1, 3, 1.0)), "ends with a layer of /m/b"),
        (((0, 0, 1.0), (0, 1, 1.0), (0, 2, 1.0), (0, 3, 1.0)), "longer than max_path_length 3"),
    ],
)
def test_broken_rules_are_refused_by_name(steps: tuple[tuple[int, int, float], ...], message: str) -> None:
    with pytest.raises(PathError, match=message):
        path(*steps).check(max_length=3)


def test_damaged_text_is_a_clear_error() -> None:
    with pytest.raises(PathError, match="damaged"):
        LayerPath.from_text('{"space": "dataflow", "models": []}')
    assert not is_path_text("merge_method: linear")
