"""The pool: the models whose layers a path may take, described from their config.json alone.

Everything a config can get wrong about a pool is refused here, before any weight is read: a path
hands one model's hidden state to another's layer, so every model must have the owner's width (and
attention head size, since the owner's rotary embedding feeds every layer), and the owner's tokenizer
must mean the same ids as every other model's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, SourceError

# Decoder-only families whose model holds `model.layers` of decoder layers called as Llama's are (hidden
# state first, the cache as a keyword): what the path model and the export rely on. Tests run llama,
# mistral and qwen2; a scaled export (a Llama subclass) needs a llama owner.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class PoolModel:
    """One model of the pool: its dir, the name the report shows, its depth and the widths that must agree."""

    path: str
    name: str
    n_layers: int
    hidden_size: int
    head_dim: int
    vocab_size: int
    model_type: str
    vocab_digest: str | None = None  # a hash of tokenizer.json's vocabulary, where the dir has one

    @classmethod
    def read(
        cls, path: str | Path, *, config_from: str | Path | None = None, name: str | None = None
    ) -> PoolModel:
        """Describe the model dir `path` from its config.json (or from `config_from`'s, for a model that
        will exist later with that architecture: the parameter-space phase's best merge)."""
        from evomerge.io.hf_dir import read_json

        source = Path(config_from or path)
        config_path = source / "config.json"
        if not config_path.is_file():
            raise SourceError(
                f"search.dataflow: {source} has no config.json; a pool model must be a model dir."
            )
        config = read_json(config_path)
        dimensions = _dimensions(config, config_path)
        return cls(str(path), name or Path(path).name, *dimensions, vocab_digest=_vocab_digest(source))


def _vocab_digest(model_dir: Path) -> str | None:
    """A hash of the token -> id table in `model_dir/tokenizer.json` (None without one)."""
    import hashlib
    import json

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: cannot read it as JSON ({error}).") from error
    table = {
        "vocab": (tokenizer.get("model") or {}).get("vocab"),
        "added": [(t.get("id"), t.get("content")) for t in tokenizer.get("added_tokens") or []],
    }
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def _dimensions(config: dict[str, Any], where: Path) -> tuple[int, int, int, int, str]:
    model_type = str(config.get("model_type"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"search.dataflow: {where} is a {model_type!r} model; data-flow merging runs decoder layers of "
            f"the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}); use parameter-space merging for it."
        )
    try:
        hidden, layers, heads = (
            int(config[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")
        )
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise SourceError(f"{where}: lacks {error} (hidden_size, num_hidden_layers, vocab_size).") from None
    head_dim = int(config.get("head_dim") or hidden // heads)
    return layers, hidden, head_dim, vocab, model_type


def check_pool(pool: Sequence[PoolModel], owner: int) -> None:
    """Refuse a pool whose models cannot pass hidden states to each other (ConfigError naming both)."""
    if len(pool) < 1:
        raise ConfigError("search.dataflow.models: the pool is empty; name at least one model.")
    anchor = pool[owner]
    for model in pool:
        for field, what in (("hidden_size", "hidden size"), ("head_dim", "attention head size")):
            if getattr(model, field) != getattr(anchor, field):
                raise ConfigError(
                    f"search.dataflow.models: {model.path} has {what} {getattr(model, field)}, the owner "
                    f"{anchor.path} {getattr(anchor, field)}; data-flow merging passes one hidden state "
                    "between layers, so every model needs one width: leave this model out of the pool."
                )
        differs = model.vocab_digest is not None and anchor.vocab_digest is not None
        if differs and model.vocab_digest != anchor.vocab_digest:
            raise ConfigError(
                f"search.dataflow.models: {model.path}/tokenizer.json maps tokens to other ids than the owner "
                f"{anchor.path}'s tokenizer; the path reads the owner's token ids everywhere: leave it out "
                "of the pool, or choose another owner."
            )
        if model.vocab_size != anchor.vocab_size:
            raise ConfigError(
                f"search.dataflow.models: {model.path} has a vocabulary of {model.vocab_size} tokens, the "
                f"owner {anchor.path} (whose embeddings and tokenizer the path uses) {anchor.vocab_size}; "
                "every model must read the owner's token ids: leave it out, or choose another owner."
            )
