"""The `hetero` zoo: three models of three families with three tokenizers, each good at one skill only.

Models whose weights cannot be merged (different architectures, different vocabularies) for the
black-box combination (docs/blackbox.md):
    models/llama   LlamaForCausalLM, a byte-level BPE tokenizer trained on the corpus; mostly `add`
    models/gpt2    GPT2LMHeadModel, the zoo's character-level tokenizer; mostly `reverse`
    models/qwen2   Qwen2ForCausalLM, a byte-level BPE of another vocabulary size (300); mostly `translate`
Each is trained from scratch on its own skill's train split and a little of the other two (so it answers
them in the right format, usually wrongly): each is best on one kind of prompt and none is good on
`multi`, which mixes all three; combining the members is what scores there.

Every example is tokenised as prompt, then answer + newline, apart and joined, so training sees the same
token boundary as a server that continues the prompt (byte-level BPE would otherwise glue the prompt's
trailing space onto the answer's first token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.zoo.lm import LMSize, _quiet_transformers, draw_tasks, write_task
from evomerge.zoo.manifest import ZooManifest
from evomerge.zoo.skills import SKILLS, Example, World, WorldSize
from evomerge.zoo.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, build_tokenizer, save_tokenizer
from evomerge.zoo.train import IGNORE, Lines, Schedule, train

FAMILIES = {"llama": "add", "gpt2": "reverse", "qwen2": "translate"}  # member -> the skill it is best at


@dataclass(frozen=True)
class HeteroSize:
    """The data (world and split sizes, as the lm zoo draws them) and each member's shape and training."""

    data: LMSize  # only world, n_train, n_dev and n_test are read
    hidden: int
    layers: int
    steps: int
    batch: int
    rate: float
    other_share: float  # train examples of each other skill, per example of the member's own skill


def _data(world: WorldSize, n_train: int, n_dev: int, n_test: int) -> LMSize:
    return LMSize(
        world=world, hidden=0, layers=0, heads=0, intermediate=0, pretrain_steps=0, pretrain_batch=0,
        pretrain_rate=0.0, finetune_steps=0, finetune_batch=0, finetune_rate=0.0,
        n_train=n_train, n_dev=n_dev, n_test=n_test, corpus_lines=0,
    )  # fmt: skip


HETERO_SIZES = {
    "tiny": HeteroSize(
        data=_data(WorldSize(max_operand=9, reverse_lengths=(2, 3), n_words=8, sentence_lengths=(1, 3)),
                   n_train=40, n_dev=8, n_test=8),
        hidden=32, layers=2, steps=300, batch=16, rate=1e-2, other_share=0.2,
    ),
    "small": HeteroSize(
        data=_data(WorldSize(max_operand=19, reverse_lengths=(2, 4), n_words=12, sentence_lengths=(1, 3)),
                   n_train=300, n_dev=40, n_test=60),
        hidden=64, layers=2, steps=700, batch=32, rate=5e-3, other_share=0.15,
    ),
}  # fmt: skip


def total_steps(size: str) -> int:
    """Progress units of `build_hetero`: one per training step, plus one for the data."""
    return 1 + len(FAMILIES) * HETERO_SIZES[size].steps


def build_hetero(root: Path, *, size: str, seed: int, advance: Callable[[int], None]) -> ZooManifest:
    """Write the hetero zoo into `root` (an empty dir) and return its manifest (not yet saved)."""
    spec = HETERO_SIZES[size]
    world = World(spec.data.world, seed)
    examples = draw_tasks(world, spec.data, np.random.default_rng([seed, 2]))
    del examples["compose"]  # no member owns both halves of it; `multi` is the combination's target
    tasks = {name: write_task(root / "tasks" / name, splits) for name, splits in examples.items()}
    text = [e.text() for skill in SKILLS for e in examples[skill]["train"]]
    advance(1)
    models = {}
    for index, (family, skill) in enumerate(FAMILIES.items()):
        tokenizer = TOKENIZERS[family](text)
        rows = _training_examples(examples, skill, spec.other_share, np.random.default_rng([seed, 5, index]))
        model = new_model(family, spec, tokenizer, seed + index)
        generator = torch.Generator().manual_seed(seed * 7 + index)
        schedule = Schedule(steps=spec.steps, learning_rate=spec.rate, warmup=min(50, spec.steps // 5))
        train(
            model,
            [(encode_examples(tokenizer, rows), spec.batch)],
            schedule,
            generator=generator,
            advance=advance,
        )
        models[family] = root / "models" / family
        save_member(model, tokenizer, models[family])
    return ZooManifest(
        root=root, name="hetero", size=size, seed=seed, base=models["llama"], models=models, tasks=tasks,
        targets=["multi"], info={"best_at": dict(FAMILIES)},
    )  # fmt: skip


def _training_examples(
    examples: dict[str, dict[str, list[Example]]], skill: str, other_share: float, rng: np.random.Generator
) -> list[Example]:
    """The skill's whole train split plus `other_share` as many of each other skill's, drawn at random."""
    own = examples[skill]["train"]
    rows = list(own)
    for other in SKILLS:
        if other != skill:
            pool = examples[other]["train"]
            count = max(1, int(other_share * len(own)))
            rows += [pool[int(i)] for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False)]
    return rows


def encode_examples(tokenizer: Any, examples: list[Example]) -> Lines:
    """ids = prompt's ids + (answer + newline)'s ids + EOS; loss on the answer, the newline and EOS."""
    rows, starts = [], []
    for example in examples:
        prompt = _ids(tokenizer, example.prompt)
        rows.append([*prompt, *_ids(tokenizer, example.answer + "\n"), tokenizer.eos_token_id])
        starts.append(len(prompt))
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[index, : len(row)] = torch.tensor(row)
        labels[index, start : len(row)] = ids[index, start : len(row)]
    return Lines(ids, labels, torch.tensor([len(row) for row in rows]))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- tokenizers ----------------------------------------------------------------------------------------
def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE (GPT-2 style) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([*texts, "\n"], trainer=trainer)
    return _fast(core)


def _fast(core: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=256,
    )  # fmt: skip


TOKENIZERS: dict[str, Callable[[list[str]], Any]] = {
    "llama": byte_bpe_tokenizer,
    "gpt2": lambda texts: build_tokenizer(),
    "qwen2": lambda texts: byte_bpe_tokenizer(texts, vocab_size=300),
}


# --- models --------------------------------------------------------------------------------------------
def new_model(family: str, spec: HeteroSize, tokenizer: Any, seed: int) -> torch.nn.Module:
    """A freshly initialised model of `family`; the init draws from a forked RNG seeded with `seed`."""
    import transformers

    ids = {
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }  # fmt: skip
    config: Any
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=spec.hidden, n_layer=spec.layers, n_head=2, n_positions=128, **ids
        )
        cls: Any = transformers.GPT2LMHeadModel
    else:
        config_cls, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[family]
        config = config_cls(
            hidden_size=spec.hidden, intermediate_size=spec.hidden * 3, num_hidden_layers=spec.layers,
            num_attention_heads=2, num_key_value_heads=2 if family == "llama" else 1,
            max_position_embeddings=128, tie_word_embeddings=family == "qwen2", **ids,
        )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def save_member(model: Any, tokenizer: Any, directory: Path) -> None:
    """An HF model dir whose generation stops at EOS or a newline token (where the tokenizer has one)."""
    newline = _ids(tokenizer, "\n")
    stops = [tokenizer.eos_token_id, *(newline if len(newline) == 1 else [])]
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _quiet_transformers():
        model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(tokenizer, directory)
