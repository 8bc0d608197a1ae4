"""Load a model dir for evaluation: a Hugging Face causal LM with its tokenizer, or a zoo MLP classifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import SourceError

# Any one of these makes a dir loadable by AutoTokenizer (fast JSON, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
MLP_MODEL_TYPE = "evomerge_mlp"
DATAFLOW_MODEL_TYPE = "evomerge_dataflow"  # evomerge.dataflow.modeling.MODEL_TYPE


class ModelLoadError(SourceError):
    """A model dir cannot be loaded for evaluation (missing, no config, no tokenizer)."""


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Any | None]:
    """(model in eval mode, tokenizer or None for a classifier) from a model dir."""
    path = Path(path)
    config = read_config(path)
    if config.get("model_type") == MLP_MODEL_TYPE:
        return _load_classifier(path, device, dtype), None
    if config.get("model_type") == DATAFLOW_MODEL_TYPE:  # an exported layer path with scales: our own class,
        from evomerge.dataflow.modeling import register  # so no remote code from the dir is run

        register()
    return _load_causal_lm(path, device, dtype), load_tokenizer(path)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model dir, with errors that name the dir."""
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model dir not found")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{path}: no config.json; expected a Hugging Face model dir or a zoo classifier dir"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_path}: malformed JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object")
    return config


def load_tokenizer(path: Path) -> Any:
    """The dir's tokenizer via AutoTokenizer; a dir without tokenizer files gets an error naming them."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path}: no tokenizer found (looked for {', '.join(TOKENIZER_FILES)}); a language model needs its "
            "tokenizer next to the weights: copy the tokenizer files of its source model into the dir"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load_causal_lm(path: Path, device: str | torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot load as a causal language model: {error}") from error
    model.to(device)
    model.eval()
    return model


def _load_classifier(path: Path, device: str | torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    try:
        from evomerge.zoo.digits import MLPClassifier
    except ImportError as error:
        raise ModelLoadError(
            f"{path}: a {MLP_MODEL_TYPE} classifier needs evomerge.zoo.digits, which cannot be imported: {error}"
        ) from error
    model = MLPClassifier.from_pretrained(path)
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    return model.eval()
