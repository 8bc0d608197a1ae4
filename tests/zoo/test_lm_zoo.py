"""The lm zoo: a tiny one is built once per session; its files load with transformers and its specialists learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.eval.tasks import load_task
from evomerge.zoo import ZooManifest, build
from evomerge.zoo.lm import LM_SIZES
from evomerge.zoo.skills import SKILLS, World


@pytest.fixture(scope="session")
def lm_zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooManifest:
    """About 10 s on one thread: 150 pre-training steps, 3 x 40 fine-tuning steps of a 2-layer, 32-wide Llama."""
    return build("lm", tmp_path_factory.mktemp("zoo") / "lm", size="tiny", seed=0)


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _exact_match(model_dir: Path, rows: list[dict[str, str]]) -> float:
    """Greedy decoding until newline, one prompt at a time (independent of evomerge.eval on purpose)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hits = 0
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        hits += (
            tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0] == row["answer"]
        )
    return hits / len(rows)


def test_manifest_lists_everything(lm_zoo: ZooManifest) -> None:
    assert lm_zoo.name == "lm" and set(lm_zoo.models) == set(SKILLS)
    assert set(lm_zoo.tasks) == {*SKILLS, "multi", "compose"} and lm_zoo.targets == ["multi", "compose"]
    assert not lm_zoo.missing_files()
    assert lm_zoo.tasks["multi"].train is None and lm_zoo.tasks["add"].train is not None


def test_model_dirs_are_hf_dirs(lm_zoo: ZooManifest) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    for directory in [lm_zoo.base, *lm_zoo.models.values()]:
        assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
            p.name for p in directory.iterdir()
        }
        assert isinstance(AutoModelForCausalLM.from_pretrained(directory), LlamaForCausalLM)
        assert AutoTokenizer.from_pretrained(directory).eos_token == "<eos>"


def test_task_files(lm_zoo: ZooManifest) -> None:
    for skill in SKILLS:
        splits = {s: _rows(lm_zoo.tasks[skill].split(s)) for s in ("train", "dev", "test")}
        prompts = [{row["prompt"] for row in rows} for rows in splits.values()]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
        assert all(row["answer"] and "\n" not in row["answer"] for rows in splits.values() for row in rows)
    multi = _rows(lm_zoo.tasks["multi"].test)
    assert len(multi) == sum(len(_rows(lm_zoo.tasks[s].test)) for s in SKILLS)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_multi_lines_name_their_skill(lm_zoo: ZooManifest, split: str) -> None:
    rows = _rows(lm_zoo.tasks["multi"].split(split))
    for skill in SKILLS:  # each line's group is the skill file it came from, and every skill line is there
        own = {(row["prompt"], row["answer"]) for row in _rows(lm_zoo.tasks[skill].split(split))}
        assert {(row["prompt"], row["answer"]) for row in rows if row["group"] == skill} == own
    assert all("group" not in row for s in SKILLS for row in _rows(lm_zoo.tasks[s].split(split)))
    task = load_task(lm_zoo.tasks["multi"].split(split), metric="exact_match")
    assert {example.group for example in task.examples} == set(SKILLS)


def test_compose_needs_both_skills(lm_zoo: ZooManifest) -> None:
    """The answer is the sum reversed and never the plain sum, so the add specialist alone cannot be right."""
    for row in _rows(lm_zoo.tasks["compose"].test):
        a, b = (int(word) for word in row["prompt"].split() if word.isdigit())
        assert row["answer"] == str(a + b)[::-1] != str(a + b)


def test_world_is_deterministic() -> None:
    one, two = World(LM_SIZES["small"].world, 5), World(LM_SIZES["small"].world, 5)
    assert one.dictionary == two.dictionary != World(LM_SIZES["small"].world, 6).dictionary
    assert one.add(np.random.default_rng(1)) == two.add(np.random.default_rng(1))


@pytest.mark.parametrize("skill", ["add", "translate"])
def test_specialist_beats_base_on_its_skill(lm_zoo: ZooManifest, skill: str) -> None:
    rows = _rows(lm_zoo.tasks[skill].test)
    assert _exact_match(lm_zoo.models[skill], rows) > _exact_match(lm_zoo.base, rows)


@pytest.mark.slow  # a second tiny build (~10 s)
def test_same_seed_same_zoo(lm_zoo: ZooManifest, tmp_path: Path) -> None:
    again = build("lm", tmp_path / "lm", size="tiny", seed=0)
    for name in ["base", *SKILLS]:
        one = lm_zoo.base if name == "base" else lm_zoo.models[name]
        two = again.base if name == "base" else again.models[name]
        assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes(), name
    assert lm_zoo.tasks["multi"].test.read_text() == again.tasks["multi"].test.read_text()
