"""copy_hf_files (config with updates, generation config, tokenizer) and write_model_card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import SourceError
from evomerge.io.hf_dir import copy_hf_files, dtype_updates, merge_config, tokenizer_files
from evomerge.io.model_card import render_model_card, write_model_card
from evomerge.io.reader import ModelDir
from evomerge.io.writer import ShardedWriter, atomic_output_dir
from evomerge.zoo.random_models import FamilySpec

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _save_tokenizer(model_dir: Path, vocab_size: int = 96) -> None:
    """A tiny word-level fast tokenizer with a chat template, saved the way transformers saves one."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


@pytest.fixture
def source(make_family) -> Path:  # type: ignore[no-untyped-def]
    base: Path = make_family(FamilySpec(n_finetunes=0))["base"]
    _save_tokenizer(base)
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"):
        (base / name).write_text(f"fake {name}")
    (base / "training_args.bin").write_bytes(b"not a tokenizer")
    (base / "README.md").write_text("the source's card")
    return base


def test_copies_config_generation_config_and_tokenizer(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    written = copy_hf_files(source, dest)
    names = sorted(path.name for path in dest.iterdir())
    assert names == sorted(path.name for path in written)
    assert "config.json" in names and "generation_config.json" in names
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"} <= set(
        names
    )
    assert {"added_tokens.json"} <= set(names)
    assert not {"model.safetensors", "training_args.bin", "README.md"} & set(names)
    assert [path.name for path in tokenizer_files(dest)] == [path.name for path in tokenizer_files(source)]
    for name in ("generation_config.json", "tokenizer.json", "merges.txt"):
        assert (dest / name).read_bytes() == (source / name).read_bytes()
    assert not list(dest.glob(".*"))  # no temporary files left


def test_tokenizer_loads_identically(source: Path, tmp_path: Path) -> None:
    import transformers

    for name in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"):
        (source / name).unlink()  # the fakes would confuse the loader
    copy_hf_files(source, tmp_path / "dest")
    original = transformers.AutoTokenizer.from_pretrained(source)
    copied = transformers.AutoTokenizer.from_pretrained(tmp_path / "dest")
    text = "w3 w7 w50 unknownword"
    assert copied(text)["input_ids"] == original(text)["input_ids"] == [3, 7, 50, 0]
    assert copied.chat_template == CHAT_TEMPLATE


def test_config_updates(source: Path, tmp_path: Path) -> None:
    import transformers

    before = (source / "config.json").read_text()
    original = json.loads(before)
    updates = {"num_hidden_layers": 6, **dtype_updates(original, torch.bfloat16)}
    copy_hf_files(source, tmp_path / "dest", config_updates=updates)
    config = json.loads((tmp_path / "dest" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert {key: value for key, value in config.items() if key not in updates} == {
        key: value for key, value in original.items() if key not in updates
    }
    assert (source / "config.json").read_text() == before  # the source is untouched
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "dest")
    assert loaded.num_hidden_layers == 6 and loaded.dtype == torch.bfloat16


def test_merge_config_is_recursive_and_copies() -> None:
    config = {"text_config": {"num_hidden_layers": 2, "hidden_size": 8}, "model_type": "x"}
    merged = merge_config(config, {"text_config": {"num_hidden_layers": 5}, "new": [1]})
    assert merged == {
        "text_config": {"num_hidden_layers": 5, "hidden_size": 8},
        "model_type": "x",
        "new": [1],
    }
    assert config["text_config"]["num_hidden_layers"] == 2


def test_dtype_updates_keys() -> None:
    assert dtype_updates({"dtype": "float32"}, torch.bfloat16) == {"dtype": "bfloat16"}
    assert dtype_updates({"torch_dtype": "float32"}, "float16") == {"torch_dtype": "float16"}
    assert dtype_updates({}, torch.float32) == {"dtype": "float32", "torch_dtype": "float32"}


def test_source_without_tokenizer_or_config(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    assert copy_hf_files(tmp_path / "src", tmp_path / "dest") == []
    written = copy_hf_files(tmp_path / "src", tmp_path / "dest2", config_updates={"num_hidden_layers": 1})
    assert [path.name for path in written] == ["config.json"]


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nowhere.*does not exist"):
        copy_hf_files(tmp_path / "nowhere", tmp_path / "dest")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match=r"bad/config\.json.*JSON"):
        copy_hf_files(tmp_path / "bad", tmp_path / "dest")


def test_written_dir_loads_in_transformers(source: Path, tmp_path: Path) -> None:
    """ModelDir -> ShardedWriter -> copy_hf_files inside atomic_output_dir gives a loadable model dir."""
    import transformers

    out = tmp_path / "merged"
    with atomic_output_dir(out) as temporary, ModelDir(source) as model:
        writer = ShardedWriter(temporary, max_shard_bytes=30_000)
        for name in model.tensor_names():
            writer.add(name, model.get(name))
        writer.finish()
        for name in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"):
            (source / name).unlink()
        copy_hf_files(source, temporary)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = transformers.AutoModelForCausalLM.from_pretrained(source)
    tokens = transformers.AutoTokenizer.from_pretrained(out)("w3 w4 w5", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected(tokens).logits)


# ---- model card -----------------------------------------------------------------------------------------

RECIPE = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/ft0\n    parameters: {weight: 0.5, density: 0.5}\n"


def _front_matter(text: str) -> dict[str, object]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])  # type: ignore[no-any-return]


def test_model_card(tmp_path: Path) -> None:
    path = write_model_card(
        tmp_path,
        title="my-merge",
        sources=["org/base", "org/ft0", "org/ft: with colon"],
        method="ties",
        recipe_yaml=RECIPE,
        scores={"arith": 0.8125, "copy": 0.5},
        extra="Trained nothing; merged everything.",
    )
    assert path == tmp_path / "README.md"
    text = path.read_text()
    meta = _front_matter(text)
    assert meta == {
        "base_model": ["org/base", "org/ft0", "org/ft: with colon"],
        "library_name": "transformers",
        "tags": ["merge", "evomerge"],
    }
    assert "# my-merge" in text and "evomerge" in text.split("# my-merge")[1]
    assert "- org/ft0\n" in text
    assert "`ties`" in text and "arxiv.org/abs/2306.01708" in text
    assert f"```yaml\n{RECIPE.strip()}\n```" in text
    assert yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])["merge_method"] == "ties"
    assert "| arith | 0.8125 |" in text and "| copy | 0.5000 |" in text
    assert text.rstrip().endswith("Trained nothing; merged everything.")
    assert [entry.name for entry in tmp_path.iterdir()] == ["README.md"]


def test_model_card_without_scores() -> None:
    text = render_model_card(title="t", sources=["a"], method="slerp", recipe_yaml="merge_method: slerp")
    assert "## Scores" not in text and "1 model with" in text
    assert _front_matter(text)["base_model"] == ["a"]
