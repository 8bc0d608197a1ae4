"""The hetero zoo: three families, three tokenizers, each member best at its own skill."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.zoo import build
from evomerge.zoo.hetero import FAMILIES

pytestmark = pytest.mark.slow


def test_three_families_three_tokenizers_each_best_at_its_skill(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.loading import load_model
    from evomerge.eval.tasks import load_task

    torch.set_num_threads(1)
    zoo = build("hetero", tmp_path / "zoo", size="tiny", seed=0)
    assert sorted(zoo.models) == sorted(FAMILIES) and zoo.targets == ["multi"]
    types = {AutoConfig.from_pretrained(path).model_type for path in zoo.models.values()}
    assert types == {"llama", "gpt2", "qwen2"}
    vocabularies = {len(AutoTokenizer.from_pretrained(path)) for path in zoo.models.values()}
    assert len(vocabularies) == 3
    skills = {
        skill: load_task(zoo.tasks[skill].dev, metric="exact_match", name=skill)
        for skill in FAMILIES.values()
    }
    scores = {}
    for family, path in zoo.models.items():
        model, tokenizer = load_model(path)
        result = Evaluator(list(skills.values()), tokenizer=tokenizer).evaluate(model)
        scores[family] = {name: task.score for name, task in result.tasks.items()}
    # gpt2 (the char-level member) is the clear best at reversing on the tiny zoo; the others are weak.
    assert scores["gpt2"]["reverse"] > max(scores["llama"]["reverse"], scores["qwen2"]["reverse"])
