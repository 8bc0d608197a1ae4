"""`tokenizer_source: union`: one vocabulary holding every model's tokens, and each model's token-indexed
tensors (input embedding, output projection) re-indexed to it before they are merged.

The union is mergekit 0.1.5's: the base model's tokenizer (else the first model's), then the tokens of
the other models it lacks, added as tokens of the output tokenizer (plain ones first, then the models'
own added tokens, e.g. special tokens, with the settings of the first model that has each). A model's
tokens at ids >= its config's `vocab_size` do not count. mergekit takes the new tokens in the order of a
hash map (so its ids vary from run to run); here they come in model order, then id order, so the output is
the same on every run, and equal to mergekit's token by token.

A token a model lacks gets, in that model's aligned tensor, a row built as mergekit builds it:
- the row of the one model that has it, if only one has it;
- else the base model's row, if the base has it;
- else the mean of the rows of the models that have it (summed in model order, then divided);
- zeros if no model has it (it cannot happen for tokens taken from the models).
Then the method merges the aligned tensors as usual.

`tokenizer_source: base` or a model dir re-indexes the same way to that tokenizer's vocabulary (no tokens
added), as mergekit does, and only where some model differs from it (`build_target`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import SourceError
from evomerge.io import architecture

if TYPE_CHECKING:
    from evomerge.merge.sources import SourceSet


class UnionTokenizerError(SourceError):
    """The models' tokenizers cannot be joined into one vocabulary (or one cannot be read)."""


@dataclass(frozen=True)
class ModelVocab:
    """What one model's tokenizer holds, restricted to the ids its embedding has rows for."""

    tokens: dict[str, int]  # token -> id, ids < size
    added: dict[str, Any]  # content -> transformers AddedToken, in id order
    size: int  # the config's vocab_size (rows of its embedding that count)


@dataclass(frozen=True)
class VocabAlignment:
    """The output vocabulary (the union, or the target tokenizer's) and, per model, the row of its tensors
    behind each output id (-1: absent)."""

    tokenizer: Any  # union: the output tokenizer (transformers), saved with the merged model; else None
    size: int
    rows: dict[str, torch.Tensor]  # model -> (size,) int64

    def align(
        self, models: Sequence[str], tensors: Sequence[torch.Tensor], base: str | None
    ) -> list[torch.Tensor]:
        """Each model's tensor (vocabulary on axis 0, all of one dtype and device) re-indexed."""
        rows = {model: self.rows[model].to(tensors[0].device) for model in models}
        present = torch.stack([rows[model] >= 0 for model in models])  # (M, V)
        fill = _fill_rows(models, tensors, present, rows, base)
        aligned = []
        for model, tensor, has in zip(models, tensors, present, strict=True):
            out = fill.clone()
            out[has] = tensor[rows[model][has]]
            aligned.append(out)
        return aligned


def _fill_rows(
    models: Sequence[str],
    tensors: Sequence[torch.Tensor],
    present: torch.Tensor,
    rows: dict[str, torch.Tensor],
    base: str | None,
) -> torch.Tensor:
    """(V, ...) rows for the tokens some model lacks (zeros elsewhere): donor, base, mean, or zero."""
    first = tensors[0]
    fill = torch.zeros((present.shape[1], *first.shape[1:]), dtype=first.dtype, device=first.device)
    count = present.sum(dim=0)
    needed = count < len(models)
    by_base = needed & (count > 1) & (present[models.index(base)] if base in models else False)
    mean = needed & (count > 1) & ~by_base
    for index, (model, tensor) in enumerate(zip(models, tensors, strict=True)):
        own = needed & present[index] & ((count == 1) | (by_base if model == base else False))
        fill[own] = tensor[rows[model][own]]
    mean_ids = mean.nonzero().squeeze(1)
    if mean_ids.numel():
        fill[mean_ids] = _mean_rows(models, tensors, present, rows, mean_ids, count)
    return fill


def _mean_rows(
    models: Sequence[str],
    tensors: Sequence[torch.Tensor],
    present: torch.Tensor,
    rows: dict[str, torch.Tensor],
    ids: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """sum over the models that have each token (model order, in the tensors' dtype), / their count."""
    total = torch.zeros(
        (ids.numel(), *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=tensors[0].device
    )
    for index, (model, tensor) in enumerate(zip(models, tensors, strict=True)):
        has = present[index, ids]
        total[has] = total[has] + tensor[rows[model][ids[has]]]
    counts = count[ids]
    for value in counts.unique().tolist():  # divided by a Python int, as mergekit's `embed /= count`
        total[counts == value] /= value
    return total


# ---- building the union -------------------------------------------------------------------------------


def is_vocab_tensor(name: str) -> bool:
    """Tensors indexed by token on axis 0: the input embedding and the output projection."""
    return name in ("lm_head.weight", "embed_out.weight") or architecture.input_embedding_name([name]) == name


def build_target(
    models: Sequence[str], target: Path, donor: str | None, sources: SourceSet
) -> VocabAlignment | None:
    """`tokenizer_source: base` or a model dir: every model's token rows re-indexed to that tokenizer's
    vocabulary, as mergekit does, when they differ from it (other tokens, or padding rows); None when
    every model already matches it row for row (or when it cannot be loaded: its files are then copied
    as they are, and the shapes must agree). A model whose tokenizer cannot be loaded is taken to share
    the target's vocabulary, as mergekit assumes."""
    try:
        tokenizer = _load_tokenizer(target)
    except UnionTokenizerError:
        return None
    vocab = tokenizer.get_vocab()
    if donor is not None:
        _check_donor(tokenizer, read_vocab(target, _vocab_size(sources, donor)), target, union=False)
    size = len(vocab)
    shared = ModelVocab(tokens=dict(vocab), added={}, size=size)
    rows = {model: _rows(vocab, _vocab_or(sources, model, shared), size) for model in models}
    identity = torch.arange(size)
    if all(
        torch.equal(rows[model], identity) and _embedding_rows(sources, model) == size for model in models
    ):
        return None
    return VocabAlignment(tokenizer=None, size=size, rows=rows)


def _vocab_or(sources: SourceSet, model: str, fallback: ModelVocab) -> ModelVocab:
    size = _vocab_size(sources, model)
    try:
        return read_vocab(sources.path(model), size)
    except UnionTokenizerError:
        limit = size if size is not None else fallback.size
        return ModelVocab({t: i for t, i in fallback.tokens.items() if i < limit}, {}, limit)


def _embedding_rows(sources: SourceSet, model: str) -> int | None:
    name = architecture.input_embedding_name(sources.tensor_names(model))
    return None if name is None else sources.info(model, name).shape[0]


def build_union(models: Sequence[str], donor: str, sources: SourceSet) -> VocabAlignment:
    """The union vocabulary of `models`' tokenizers, extending `donor`'s, and every model's row map."""
    vocabs = {model: read_vocab(sources.path(model), _vocab_size(sources, model)) for model in models}
    tokenizer = _load_tokenizer(sources.path(donor))
    _check_donor(tokenizer, vocabs[donor], sources.path(donor))
    order = [donor, *(model for model in models if model != donor)]
    plain, added = _new_tokens([vocabs[model] for model in order], vocabs[donor])
    if plain:
        tokenizer.add_tokens(plain)
    for token in added:
        tokenizer.add_tokens(token)
    union = tokenizer.get_vocab()
    size = len(union)
    rows = {model: _rows(union, vocabs[model], size) for model in models}
    return VocabAlignment(tokenizer=tokenizer, size=size, rows=rows)


def _new_tokens(vocabs: Sequence[ModelVocab], donor: ModelVocab) -> tuple[list[str], list[Any]]:
    """Tokens the donor lacks: plain ones (model order, then id order), then added ones (first settings)."""
    added: dict[str, Any] = {}
    for vocab in vocabs:
        for content, token in vocab.added.items():
            added.setdefault(content, token)
    plain: dict[str, None] = {}
    for vocab in vocabs:
        for token, _ in sorted(vocab.tokens.items(), key=lambda item: item[1]):
            if token not in donor.tokens and token not in added:
                plain[token] = None
    return list(plain), [token for content, token in added.items() if content not in donor.tokens]


def _rows(union: dict[str, int], vocab: ModelVocab, size: int) -> torch.Tensor:
    rows = torch.full((size,), -1, dtype=torch.int64)
    for token, index in union.items():
        own = vocab.tokens.get(token)
        if own is not None:
            rows[index] = own
    return rows


def read_vocab(model_dir: Path, size: int | None) -> ModelVocab:
    """A model's tokens with ids below `size` (its config's vocab_size; None: all)."""
    tokenizer = _load_tokenizer(model_dir)
    vocab = tokenizer.get_vocab()
    limit = size if size is not None else len(vocab)
    decoder = tokenizer.added_tokens_decoder
    return ModelVocab(
        tokens={token: index for token, index in vocab.items() if index < limit},
        added={decoder[index].content: decoder[index] for index in sorted(decoder) if index < limit},
        size=limit,
    )


def _load_tokenizer(model_dir: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # transformers raises many kinds (OSError, ValueError, KeyError, ...)
        raise UnionTokenizerError(
            f"{model_dir}: tokenizer_source 'union' needs every model's tokenizer, and this one cannot be "
            f"loaded ({type(error).__name__}: {error}); add its tokenizer files or use tokenizer_source: base."
        ) from None


def _check_donor(tokenizer: Any, vocab: ModelVocab, model_dir: Path, union: bool = True) -> None:
    beyond = len(tokenizer.get_vocab()) - len(vocab.tokens)
    if beyond:
        use = "a union cannot extend" if union else "tokenizer_source cannot be"
        raise UnionTokenizerError(
            f"{model_dir}: its tokenizer has {beyond} token(s) at ids >= the config's vocab_size "
            f"({vocab.size}), which its embedding has no rows for; {use} such a tokenizer. Fix vocab_size "
            "in its config.json (or give tokenizer_source another model)."
        )


def _vocab_size(sources: SourceSet, model: str) -> int | None:
    config = sources.config(model)
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int):
            return int(holder["vocab_size"])
    return None


@dataclass(frozen=True)
class VocabTask:
    """One token-indexed output tensor of a union merge: the alignment and its group's models in config
    order (the order the mean of a missing token's rows is summed in)."""

    alignment: VocabAlignment
    models: tuple[str, ...]
    base: str | None

    def align(
        self,
        inputs: Sequence[tuple[str, torch.Tensor]],
        base: tuple[str, torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The kernel's inputs and base, each re-indexed to the union vocabulary."""
        tensors = dict(inputs)
        if base is not None:
            tensors[base[0]] = base[1]
        aligned = dict(
            zip(
                self.models,
                self.alignment.align(self.models, [tensors[m] for m in self.models], self.base),
                strict=True,
            )
        )
        return [aligned[model] for model, _ in inputs], None if base is None else aligned[base[0]]


def with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """A copy of a config.json with `vocab_size` (top level, and in `text_config` where it has one) set."""
    updated = dict(config)
    if isinstance(updated.get("text_config"), dict) and "vocab_size" in updated["text_config"]:
        updated["text_config"] = {**updated["text_config"], "vocab_size": size}
        if "vocab_size" not in updated:
            return updated
    updated["vocab_size"] = size
    return updated
