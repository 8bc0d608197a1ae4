"""`zoo build lm --hard / --finetune-steps / --finetune-rate`: a harder fine-tune, cached under its own key."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.zoo import build
from evomerge.zoo.build import HARD, Finetune, zoo_fingerprint
from evomerge.zoo.lm import LM_SIZES, lm_size, total_steps
from evomerge.zoo.manifest import ZooError


def test_overrides_replace_only_the_finetune() -> None:
    spec = lm_size("small", 1000, 2e-3)
    assert (spec.finetune_steps, spec.finetune_rate) == (1000, 2e-3)
    assert spec.pretrain_steps == LM_SIZES["small"].pretrain_steps and spec.world == LM_SIZES["small"].world
    assert lm_size("small") == LM_SIZES["small"]
    assert total_steps("tiny", 100) - total_steps("tiny") == 3 * (100 - LM_SIZES["tiny"].finetune_steps)


def test_a_harder_finetune_is_another_zoo() -> None:
    plain = zoo_fingerprint("lm", "tiny", 0)
    assert zoo_fingerprint("lm", "tiny", 0, Finetune()) == plain  # unset: the default zoo keeps its key
    assert zoo_fingerprint("lm", "tiny", 0, HARD) != plain
    assert zoo_fingerprint("lm", "tiny", 0, Finetune(steps=HARD.steps)) != zoo_fingerprint(
        "lm", "tiny", 0, HARD
    )


@pytest.mark.parametrize(
    ("name", "finetune", "message"),
    [
        ("digits", HARD, "apply to the lm zoo only"),
        ("lm", Finetune(steps=0), "--finetune-steps must be a positive integer, got 0"),
        ("lm", Finetune(rate=2.0), r"--finetune-rate must be in \(0, 1\), got 2.0"),
    ],
)
def test_bad_finetune_arguments(tmp_path: Path, name: str, finetune: Finetune, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        build(name, tmp_path / "zoo", finetune=finetune)  # type: ignore[arg-type]
    assert not (tmp_path / "zoo").exists()
