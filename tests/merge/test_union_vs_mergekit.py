"""`tokenizer_source: union` (and `base` or a model, whose vocabulary the others are re-indexed to) against
mergekit 0.1.5: the same vocabulary, and the same embedding and output rows for every token (within one
ulp of the output dtype), on tiny models whose tokenizers differ.

mergekit numbers the tokens it adds in the order of a hash map, which changes from run to run; we number
them in model order. So rows are compared token by token, not id by id. Without a base model, mergekit
also extends a model drawn from a set (its `referenced_models()`), and we extend the first one listed:
which tokens count as added ones then differs, the vocabulary, the special tokens and the rows do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.merge.api import merge
from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import (
    VocabSpec,
    assert_within_one_ulp,
    config_dict,
    load_state,
    run_mergekit_batch,
    vocab_family,
    words,
    write_config,
)

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

W = words(("w", 3, 96))  # the base's words
X = words(("w", 3, 90), ("x", 90, 96))  # six words replaced
Y = words(("y", 96, 100))  # four words more
FAMILIES = {
    # base, a model with other words and a special token, a model with more words
    "fp32": (
        FamilySpec(n_finetunes=2),
        {"base": VocabSpec(W), "ft0": VocabSpec(X, added=("<|im_start|>",)), "ft1": VocabSpec(W + Y)},
    ),
    # x words in three models (a mean of three rows), y words in two, w90.. in one; ft2 padded to 106 rows
    "bf16_four": (
        FamilySpec(n_finetunes=3, dtype=torch.bfloat16, seed=5),
        {
            "base": VocabSpec(W),
            "ft0": VocabSpec(X),
            "ft1": VocabSpec(X + Y, added=("<tool>",)),
            "ft2": VocabSpec(X + Y, added=("<tool>", "<|im_end|>"), rows=106),
        },
    ),
    "bf16_tied": (
        FamilySpec(n_finetunes=1, dtype=torch.bfloat16, tie_word_embeddings=True, seed=6),
        {"base": VocabSpec(W), "ft0": VocabSpec(words(("w", 3, 80), ("z", 80, 110)), added=("<|eot|>",))},
    ),
}

CONFIGS = {
    ("ties_base", "fp32"): """merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.6, density: 0.7}}}}
  - {{model: {ft1}, parameters: {{weight: [0.2, 0.8], density: 0.5}}}}
tokenizer_source: union
chat_template: chatml
""",
    ("linear_no_base", "bf16_four"): """merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.4}}}}
  - {{model: {ft0}, parameters: {{weight: 0.3}}}}
  - {{model: {ft1}, parameters: {{weight: 0.2}}}}
  - {{model: {ft2}, parameters: {{weight: 0.1}}}}
tokenizer_source: union
""",
    ("task_arithmetic", "bf16_four"): """merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5}}}}
tokenizer_source: union
dtype: float32
out_dtype: bfloat16
""",
    ("ties_tokenizer_base", "bf16_four"): """merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.5, density: 0.7}}}}
  - {{model: {ft1}, parameters: {{weight: 0.3, density: 0.7}}}}
  - {{model: {ft2}, parameters: {{weight: 0.2, density: 0.7}}}}
tokenizer_source: base
""",
    ("linear_tokenizer_of_a_model", "fp32"): """merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.5}}}}
  - {{model: {ft0}, parameters: {{weight: 0.3}}}}
  - {{model: {ft1}, parameters: {{weight: 0.2}}}}
tokenizer_source: {ft1}
""",
    ("slerp_tied", "bf16_tied"): """merge_method: slerp
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {ft0}}}
parameters: {{t: 0.3}}
tokenizer_source: union
""",
}


def _fill(template: str, paths: dict[str, Path]) -> str:
    for key, path in paths.items():
        template = template.replace("{" + key + "}", str(path))
    return template.replace("{{", "{").replace("}}", "}")


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("union")
    families = {
        key: vocab_family(tmp_path_factory.getbasetemp() / "vocab_families", key, spec, vocabs)
        for key, (spec, vocabs) in FAMILIES.items()
    }
    jobs, result = [], {}
    for name, key in CONFIGS:
        config = write_config(root / "configs", _fill(CONFIGS[(name, key)], families[key]), f"{name}.yaml")
        ours, theirs = root / "evomerge" / name, root / "mergekit" / name
        merge(config, ours, threads=2)
        jobs.append((config, theirs))
        result[name] = (ours, theirs)
    run_mergekit_batch(jobs)
    return result


def _by_token(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, int], object]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return load_state(model_dir), tokenizer.get_vocab(), tokenizer


def _specials(tokenizer: Any) -> set[str]:
    return {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}


@pytest.mark.parametrize("name", [name for name, _ in CONFIGS])
def test_union_equal_to_mergekit_token_by_token(merged: dict[str, tuple[Path, Path]], name: str) -> None:
    ours, theirs = merged[name]
    our_state, our_vocab, our_tokenizer = _by_token(ours)
    their_state, their_vocab, their_tokenizer = _by_token(theirs)
    assert set(our_vocab) == set(their_vocab)
    assert config_dict(ours)["vocab_size"] == config_dict(theirs)["vocab_size"] == len(our_vocab)
    tokens = sorted(their_vocab)
    ours_order = torch.tensor([our_vocab[token] for token in tokens])
    theirs_order = torch.tensor([their_vocab[token] for token in tokens])
    for tensor_name in our_state:
        if tensor_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            our_state[tensor_name] = our_state[tensor_name][ours_order]
            their_state[tensor_name] = their_state[tensor_name][theirs_order]
    assert_within_one_ulp(our_state, their_state)
    assert _specials(our_tokenizer) == _specials(their_tokenizer)
    text = " ".join(tokens[:: max(1, len(tokens) // 40)])
    ours_tokens = our_tokenizer.convert_ids_to_tokens(our_tokenizer(text).input_ids)  # type: ignore[attr-defined]
    assert ours_tokens == their_tokenizer.convert_ids_to_tokens(their_tokenizer(text).input_ids)  # type: ignore[attr-defined]


def test_chat_template_renders_as_mergekit(merged: dict[str, tuple[Path, Path]]) -> None:
    ours, theirs = merged["ties_base"]
    _, _, our_tokenizer = _by_token(ours)
    _, _, their_tokenizer = _by_token(theirs)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    render = {"tokenize": False, "add_generation_prompt": True}
    assert our_tokenizer.apply_chat_template(messages, **render) == their_tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, **render
    )
