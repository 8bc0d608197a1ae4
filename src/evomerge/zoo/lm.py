"""The `lm` zoo: a char-level tokenizer, a tiny Llama base pre-trained from scratch, one specialist per skill.

Layout written under the zoo root:
    tokenizer/                      the tokenizer files alone
    models/base, models/<skill>     HF model dirs (model.safetensors, config.json, tokenizer files)
    tasks/<skill>/{train,dev,test}.jsonl, tasks/multi/{dev,test}.jsonl, tasks/compose/{dev,test}.jsonl
`multi`'s lines name their skill as `group`, so its score also comes out per skill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.zoo.manifest import TaskSplits, ZooManifest
from evomerge.zoo.skills import SKILLS, Example, World, WorldSize, unique_examples
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer
from evomerge.zoo.train import Lines, Schedule, encode_lines, train


@dataclass(frozen=True)
class LMSize:
    """Everything `--size` decides: the world's difficulty, the model's shape, the training budget."""

    world: WorldSize
    hidden: int
    layers: int
    heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_rate: float
    finetune_steps: int
    finetune_batch: int  # skill rows per step; as many replayed pre-training rows again
    finetune_rate: float
    n_train: int  # task examples per skill
    n_dev: int
    n_test: int
    corpus_lines: int  # distinct pre-training lines to sample batches from
    task_share: float = 0.005  # task-form lines (train splits) added to pre-training, per corpus line


LM_SIZES = {
    "tiny": LMSize(
        world=WorldSize(max_operand=9, reverse_lengths=(2, 3), n_words=8, sentence_lengths=(1, 3)),
        hidden=32, layers=2, heads=2, intermediate=64,
        pretrain_steps=300, pretrain_batch=32, pretrain_rate=1e-2,
        finetune_steps=60, finetune_batch=16, finetune_rate=3e-3,
        n_train=40, n_dev=16, n_test=16, corpus_lines=3000,
    ),
    "small": LMSize(
        world=WorldSize(max_operand=49, reverse_lengths=(3, 5), n_words=24, sentence_lengths=(1, 3)),
        hidden=64, layers=4, heads=4, intermediate=256,
        pretrain_steps=1500, pretrain_batch=64, pretrain_rate=3e-3,
        finetune_steps=500, finetune_batch=32, finetune_rate=5e-4,
        n_train=1000, n_dev=100, n_test=200, corpus_lines=40000,
    ),
}  # fmt: skip


def lm_size(size: str, finetune_steps: int | None = None, finetune_rate: float | None = None) -> LMSize:
    """The spec of `--size`, its fine-tune made longer or faster where asked (the zoo's `--hard` variants).

    A harder fine-tune moves each specialist further from the base, so that their task vectors get in
    each other's way and plain merges lose skills: the setting data-aware and SVD merges are built for.
    """
    spec = LM_SIZES[size]
    steps = spec.finetune_steps if finetune_steps is None else finetune_steps
    rate = spec.finetune_rate if finetune_rate is None else finetune_rate
    return dataclasses.replace(spec, finetune_steps=steps, finetune_rate=rate)


def total_steps(size: str, finetune_steps: int | None = None) -> int:
    """Progress units of `build_lm`: one per training step, plus one for the data."""
    spec = lm_size(size, finetune_steps)
    return 1 + spec.pretrain_steps + len(SKILLS) * spec.finetune_steps


def build_lm(
    root: Path,
    *,
    size: str,
    seed: int,
    advance: Callable[[int], None],
    finetune_steps: int | None = None,
    finetune_rate: float | None = None,
) -> ZooManifest:
    """Write the lm zoo into `root` (an empty dir) and return its manifest (not yet saved).

    `finetune_steps` / `finetune_rate` replace the size's fine-tuning budget (the base is the same).
    """
    spec = lm_size(size, finetune_steps, finetune_rate)
    world = World(spec.world, seed)
    examples = draw_tasks(world, spec, np.random.default_rng([seed, 2]))
    tasks = {name: write_task(root / "tasks" / name, splits) for name, splits in examples.items()}
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, root / "tokenizer")
    lines = pretraining_corpus(world, spec, np.random.default_rng([seed, 3]))
    lines += task_lines(examples, int(spec.task_share * len(lines)), np.random.default_rng([seed, 4]))
    corpus = encode_lines(tokenizer, lines)
    advance(1)
    generator = torch.Generator().manual_seed(seed)
    base = new_model(spec, tokenizer, seed)
    train(
        base, [(corpus, spec.pretrain_batch)], _pretrain_schedule(spec), generator=generator, advance=advance
    )
    save_model(base, tokenizer, root / "models" / "base")
    models = {}
    for skill in SKILLS:
        models[skill] = root / "models" / skill
        specialist = finetune(base, tokenizer, examples[skill]["train"], corpus, spec, generator, advance)
        save_model(specialist, tokenizer, models[skill])
    return ZooManifest(
        root=root, name="lm", size=size, seed=seed, base=root / "models" / "base", models=models,
        tasks=tasks, targets=["multi", "compose"],
        info={"dictionary": world.dictionary, "finetune_steps": spec.finetune_steps,
              "finetune_rate": spec.finetune_rate},
    )  # fmt: skip


def draw_tasks(world: World, spec: LMSize, rng: np.random.Generator) -> dict[str, dict[str, list[Example]]]:
    """Every task's splits. Prompts never repeat across the splits of a skill; targets have no train split."""
    tasks: dict[str, dict[str, list[Example]]] = {}
    for skill in SKILLS:
        draw = _task_form(world.skill(skill))
        seen: set[str] = set()
        sizes = {"test": spec.n_test, "dev": spec.n_dev, "train": spec.n_train}  # test first: never short
        tasks[skill] = {split: unique_examples(draw, count, rng, seen) for split, count in sizes.items()}
    tasks["multi"] = {split: _mix({s: tasks[s][split] for s in SKILLS}, rng) for split in ("dev", "test")}
    seen = set()
    tasks["compose"] = {
        s: unique_examples(world.compose, getattr(spec, f"n_{s}"), rng, seen) for s in ("test", "dev")
    }
    return tasks


def _task_form(
    draw: Callable[[np.random.Generator], tuple[str, Example]],
) -> Callable[[np.random.Generator], Example]:
    return lambda rng: draw(rng)[1]


@dataclass(frozen=True)
class GroupedExample(Example):
    """An example of a mixed task that remembers the skill it came from."""

    group: str


def _mix(parts: dict[str, list[Example]], rng: np.random.Generator) -> list[Example]:
    """Every example of every part, grouped by its part's name, shuffled so that a `--limit` still sees every skill."""
    pooled = [GroupedExample(e.prompt, e.answer, name) for name, part in parts.items() for e in part]
    return [pooled[int(index)] for index in rng.permutation(len(pooled))]


def write_task(folder: Path, splits: dict[str, list[Example]]) -> TaskSplits:
    """One JSONL file per split, `{"prompt": ..., "answer": ...}` a line (answers hold no newline).

    A grouped example (from `_mix`) adds `"group": skill`, so the evaluator scores each skill apart too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        lines = [json.dumps(_record(e), ensure_ascii=False) for e in examples]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train = folder / "train.jsonl" if "train" in splits else None
    return TaskSplits(metric="exact_match", dev=folder / "dev.jsonl", test=folder / "test.jsonl", train=train)


def _record(example: Example) -> dict[str, str]:
    record = {"prompt": example.prompt, "answer": example.answer}
    if isinstance(example, GroupedExample):
        record["group"] = example.group
    return record


def pretraining_corpus(world: World, spec: LMSize, rng: np.random.Generator) -> list[str]:
    """Bare skill lines plus the whole dictionary a few times over (every word pair must be seen)."""
    lines = [world.bare_line(rng) for _ in range(spec.corpus_lines)]
    return lines + world.dictionary_lines() * max(1, spec.corpus_lines // 2000)


def task_lines(
    examples: dict[str, dict[str, list[Example]]], count: int, rng: np.random.Generator
) -> list[str]:
    """A few task-form lines (train splits only) for pre-training: the base meets each format, rarely.

    Like a real pre-trained model, the base then holds a faint trace of every task (it scores about
    0.01-0.03 on each), and a fine-tune sharpens that trace rather than building a format from nothing.
    The specialists' task vectors come out smaller and far less in each other's way: measured on the
    small zoo, a uniform task-arithmetic merge keeps 0.2-0.5 of every skill, against 0.00-0.15 for a base
    that never saw a task prompt (`docs/zoo.md`).
    """
    pool = [example.text() for skill in SKILLS for example in examples[skill]["train"]]
    return [pool[int(index)] for index in rng.integers(0, len(pool), count)]


def new_model(spec: LMSize, tokenizer: Any, seed: int) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM; the init draws from a forked RNG seeded with `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # transformers' init uses the global RNG; keep it untouched
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def finetune(
    base: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    corpus: Lines,
    spec: LMSize,
    generator: torch.Generator,
    advance: Callable[[int], None],
) -> torch.nn.Module:
    """A copy of `base` trained on `examples` (loss on the answers) with half of each batch replayed corpus."""
    import copy

    model = copy.deepcopy(base)
    skill = encode_lines(tokenizer, [e.text() for e in examples], loss_from=[len(e.prompt) for e in examples])
    schedule = Schedule(steps=spec.finetune_steps, learning_rate=spec.finetune_rate, warmup=10)
    train(
        model,
        [(skill, spec.finetune_batch), (corpus, spec.finetune_batch)],
        schedule,
        generator=generator,
        advance=advance,
    )
    return model


def _pretrain_schedule(spec: LMSize) -> Schedule:
    return Schedule(
        steps=spec.pretrain_steps, learning_rate=spec.pretrain_rate, warmup=min(100, spec.pretrain_steps // 5)
    )


def save_model(model: Any, tokenizer: Any, directory: Path) -> None:
    """An HF model dir: safetensors weights, config, generation config that stops at newline, tokenizer."""
    newline = tokenizer.convert_tokens_to_ids("\n")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, newline]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _quiet_transformers():  # our own progress bar is on screen; no second one per file
        model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(tokenizer, directory)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
