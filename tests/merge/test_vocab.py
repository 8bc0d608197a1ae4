"""`tokenizer_source: union` and `chat_template` without mergekit: the row rules, whole merges, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.api import merge
from evomerge.merge.vocab import VocabAlignment, with_vocab_size
from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import VocabSpec, load_state, save_word_tokenizer, vocab_family, words, write_config

W = words(("w", 3, 96))
X = words(("w", 3, 90), ("x", 90, 96))


def _alignment(rows: dict[str, list[int]]) -> VocabAlignment:
    size = len(next(iter(rows.values())))
    return VocabAlignment(None, size, {m: torch.tensor(r) for m, r in rows.items()})


def test_rows_of_missing_tokens_come_from_the_one_holder_the_base_or_the_mean() -> None:
    #        token:  0  1   2   3   4
    rows = {"a": [0, 1, -1, -1, 2], "b": [0, -1, 1, 2, -1], "c": [0, -1, -1, 1, 2]}
    tensors = [
        torch.tensor([[1.0], [2.0], [3.0]]),
        torch.tensor([[10.0], [20.0], [30.0]]),
        torch.tensor([[5.0], [7.0], [9.0]]),
    ]
    a, b, c = _alignment(rows).align(["a", "b", "c"], tensors, base="a")
    # token 1: only a -> a's row; token 2: only b; token 3: b and c, no base -> mean (30 + 7) / 2;
    # token 4: a (the base) and c -> the base's row
    assert a.flatten().tolist() == [1.0, 2.0, 20.0, 18.5, 3.0]
    assert b.flatten().tolist() == [10.0, 2.0, 20.0, 30.0, 3.0]
    assert c.flatten().tolist() == [5.0, 2.0, 20.0, 7.0, 9.0]


def test_the_mean_is_summed_in_model_order_and_divided_once() -> None:
    rows = {"a": [-1], "b": [0], "c": [0], "d": [0]}
    values = [torch.tensor([[1.0]], dtype=torch.bfloat16)] + [
        torch.tensor([[v]], dtype=torch.bfloat16) for v in (1.0, 0.00390625, 0.00390625)
    ]
    (filled, *_) = _alignment(rows).align(["a", "b", "c", "d"], values, base=None)
    expected = ((torch.zeros(1, dtype=torch.bfloat16) + values[1][0] + values[2][0]) + values[3][0]) / 3
    assert torch.equal(filled[0], expected)


def test_vocab_size_is_set_where_the_config_keeps_it() -> None:
    assert with_vocab_size({"vocab_size": 5, "x": 1}, 9) == {"vocab_size": 9, "x": 1}
    nested = with_vocab_size({"text_config": {"vocab_size": 5}}, 9)
    assert nested == {"text_config": {"vocab_size": 9}}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    vocabs = {
        "base": VocabSpec(W),
        "ft0": VocabSpec(X, added=("<|im_start|>",)),
        "ft1": VocabSpec(W + words(("y", 96, 100))),
    }
    root = tmp_path_factory.getbasetemp() / "vocab_families"
    return vocab_family(root, "fast", FamilySpec(n_finetunes=2, seed=11), vocabs)


def _ties(family: dict[str, Path], extra: str) -> str:
    return (
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - {{model: {family['ft0']}, parameters: {{weight: 0.5, density: 0.6}}}}\n"
        f"  - {{model: {family['ft1']}, parameters: {{weight: 0.5, density: 0.6}}}}\n{extra}"
    )


def test_a_union_merge_holds_every_token_with_its_own_row(tmp_path: Path, family: dict[str, Path]) -> None:
    import transformers

    out = merge(write_config(tmp_path, _ties(family, "tokenizer_source: union\n")), tmp_path / "out")
    vocab = transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert set(vocab) == set(W) | set(X) | {
        "y96",
        "y97",
        "y98",
        "y99",
        "<|im_start|>",
        "<unk>",
        "<s>",
        "</s>",
    }
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab) == 107
    merged = load_state(out)["model.embed_tokens.weight"]
    ft0 = load_state(family["ft0"])["model.embed_tokens.weight"]
    ft0_vocab = transformers.AutoTokenizer.from_pretrained(str(family["ft0"])).get_vocab()
    for token in ("x93", "<|im_start|>"):  # only ft0 has them: every model gets its row, so it survives
        assert torch.equal(merged[vocab[token]], ft0[ft0_vocab[token]])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == 107


def test_chat_template_by_name_and_auto(tmp_path: Path, family: dict[str, Path]) -> None:
    import transformers

    out = merge(
        write_config(tmp_path, _ties(family, "tokenizer_source: union\nchat_template: llama3\n")),
        tmp_path / "named",
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (family["ft1"] / "chat_template.jinja").write_text(template)  # the only template among the models
    try:
        out = merge(
            write_config(
                tmp_path, _ties(family, "tokenizer_source: union\nchat_template: auto\n"), "auto.yaml"
            ),
            tmp_path / "auto",
        )
    finally:
        (family["ft1"] / "chat_template.jinja").unlink()
    assert (out / "chat_template.jinja").read_text() == template


def test_a_union_needs_rows_for_every_token(tmp_path: Path, family: dict[str, Path]) -> None:
    """A tokenizer with more tokens than the embedding rows its config claims is refused, named."""
    import shutil

    short = tmp_path / "short"
    shutil.copytree(family["ft1"], short)
    save_word_tokenizer(short, VocabSpec(W + words(("y", 96, 102))))  # ids up to 101, rows up to 99
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "vocab_size": 120}))
    text = _ties({**family, "ft1": short}, "tokenizer_source: union\n")
    with pytest.raises(
        EvomergeError, match=r"has 100 rows but its tokenizer has tokens up to id 101 .* vocab_size"
    ):
        merge(write_config(tmp_path, text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_union_cannot_extend_a_tokenizer_beyond_its_rows(tmp_path: Path, family: dict[str, Path]) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(family["base"], base)
    save_word_tokenizer(base, VocabSpec((*W, "extra")))  # 97 tokens, 96 rows
    text = _ties({**family, "base": base}, "tokenizer_source: union\n")
    with pytest.raises(EvomergeError, match=r"token\(s\) at ids >= the config's vocab_size \(96\)"):
        merge(write_config(tmp_path, text), tmp_path / "out")


def test_merge_into_a_live_union_model_equals_the_merge_on_disk(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    """Evolution's in-memory merge re-indexes the token rows too."""
    import transformers

    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import merge_into
    from evomerge.merge.sources import SourceSet

    config = MergeConfig.from_yaml(_ties(family, "tokenizer_source: union\n"))
    out = merge(config, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    with SourceSet.load(config) as sources:
        merge_into(model, config, sources)
    on_disk = load_state(out)
    for name, tensor in model.state_dict().items():
        if name in on_disk:
            assert torch.equal(tensor, on_disk[name]), name


def test_tokenizer_source_base_reindexes_to_the_bases_vocabulary(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    """ft0 lacks w90..w95 (it has x90..x95 there), ft1 has four words more: all go to the base's 96 rows."""
    import transformers

    out = merge(write_config(tmp_path, _ties(family, "tokenizer_source: base\n")), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 96
    merged = load_state(out)
    assert merged["model.embed_tokens.weight"].shape[0] == merged["lm_head.weight"].shape[0] == 96
    assert transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab() == {
        token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *W])
    }
