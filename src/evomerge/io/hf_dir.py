"""The non-weight files of a Hugging Face model dir: config, generation config, tokenizer.

A merged model is only usable with `from_pretrained` if its dir also holds the config (updated, e.g.
with the new layer count after layer stacking) and the tokenizer of its tokenizer source. Every file is
written atomically (`evomerge.io.atomic`), so a reader never sees half a file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import SourceError
from evomerge.io.atomic import atomic_path, atomic_write_text

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
# Files a tokenizer may consist of, across fast, sentencepiece, BPE, WordPiece and tiktoken tokenizers.
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*\.(json|model)|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|spiece\.model|sentencepiece.*\.model|.*\.tiktoken|chat_template\.(jinja|json))$"
)
_TOKENIZER_DIRS = ("additional_chat_templates",)


def tokenizer_files(source_dir: Path) -> list[Path]:
    """The tokenizer files and dirs present in `source_dir`, sorted by name."""
    files = [path for path in source_dir.iterdir() if path.is_file() and _TOKENIZER_FILES.match(path.name)]
    dirs = [source_dir / name for name in _TOKENIZER_DIRS if (source_dir / name).is_dir()]
    return sorted(files + dirs)


def copy_hf_files(
    source_dir: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    config_updates: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Copy config.json (with `config_updates` merged in), generation_config.json and the tokenizer.

    `config_updates` is merged recursively (`{"text_config": {"num_hidden_layers": 5}}` changes one
    nested key). Absent files are skipped; returns the paths written in `dest_dir`.
    """
    source, dest = Path(source_dir), Path(dest_dir)
    if not source.is_dir():
        raise SourceError(f"{source}: tokenizer/config source dir does not exist; check tokenizer_source.")
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if (source / CONFIG).is_file() or config_updates:
        config = merge_config(
            read_json(source / CONFIG) if (source / CONFIG).is_file() else {}, config_updates
        )
        written.append(write_json(dest / CONFIG, config))
    for path in [source / GENERATION_CONFIG, *tokenizer_files(source)]:
        if path.exists():
            written.append(_copy(path, dest / path.name))
    return written


def merge_config(config: Mapping[str, Any], updates: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `config` with `updates` applied; dict values merge into dict values, others replace."""
    merged = copy.deepcopy(dict(config))
    for key, value in (updates or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dtype_updates(config: Mapping[str, Any], dtype: torch.dtype | str) -> dict[str, Any]:
    """Config updates that record the weights' dtype under the key(s) this config uses.

    transformers 5 writes `dtype`, older versions `torch_dtype`; a config with neither gets `dtype`
    and `torch_dtype` both, so any version reads it.
    """
    name = str(dtype).removeprefix("torch.")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype", "torch_dtype"]
    return dict.fromkeys(keys, name)


def read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: cannot read it as JSON ({error}).") from error
    if not isinstance(payload, dict):
        raise SourceError(f"{path}: expected a JSON object, got {type(payload).__name__}.")
    return payload


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as transformers does (indent 2, sorted keys), atomically."""
    return atomic_write_text(path, _dumps(payload))


def _dumps(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _copy(source: Path, dest: Path) -> Path:
    with atomic_path(dest) as temporary:
        if source.is_dir():
            shutil.copytree(source, temporary)
        else:
            shutil.copyfile(source, temporary)
    return dest


def write_chat_template(dest_dir: str | os.PathLike[str], template: str) -> list[Path]:
    """Make `template` the tokenizer's chat template in `dest_dir`: chat_template.jinja (what transformers 5
    reads first) and the `chat_template` entry of tokenizer_config.json (what older versions read). A
    copied processor template (chat_template.json) would disagree, so it is removed."""
    dest = Path(dest_dir)
    written = [atomic_write_text(dest / CHAT_TEMPLATE, template)]
    config = dest / TOKENIZER_CONFIG
    if config.is_file():
        written.append(write_json(config, {**read_json(config), "chat_template": template}))
    (dest / "chat_template.json").unlink(missing_ok=True)
    return written
