"""load_model: HF causal LM dirs with their tokenizer, zoo classifiers, and clear errors for broken dirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.eval.evaluator import model_kind
from evomerge.eval.loading import ModelLoadError, load_model

from .helpers import save_lm_dir


def test_loads_a_causal_lm_with_its_tokenizer(tmp_path: Path, lm: Any, tokenizer: Any) -> None:
    path = save_lm_dir(tmp_path / "lm", lm, tokenizer)
    model, loaded_tokenizer = load_model(path)
    assert model_kind(model) == "lm" and not model.training and loaded_tokenizer is not None
    assert loaded_tokenizer("1+2=")["input_ids"] == tokenizer("1+2=")["input_ids"]
    ids = torch.tensor([tokenizer("abc")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_dir_without_tokenizer_is_a_clear_error(tmp_path: Path, lm: Any) -> None:
    path = save_lm_dir(tmp_path / "bare", lm, None)
    with pytest.raises(
        ModelLoadError, match=r"bare: no tokenizer found \(looked for tokenizer.json, tokenizer.model"
    ):
        load_model(path)


def test_missing_dir_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model dir not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: no config\.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"config.json: malformed JSON"):
        load_model(tmp_path / "broken")


def test_loads_a_zoo_classifier(tmp_path: Path) -> None:
    digits = pytest.importorskip("evomerge.zoo.digits", reason="the zoo's MLP classifier is not built yet")
    torch.manual_seed(0)
    original = digits.MLPClassifier()
    original.save_pretrained(tmp_path / "mlp")
    assert json.loads((tmp_path / "mlp" / "config.json").read_text())["model_type"] == "evomerge_mlp"
    model, tokenizer = load_model(tmp_path / "mlp")
    assert tokenizer is None and model_kind(model) == "classifier"
    features = torch.rand(3, 64)
    with torch.inference_mode():
        assert torch.equal(model(features), original(features))
