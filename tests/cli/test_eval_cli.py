"""`evomerge eval` end to end: a model dir and task files in, a table and per-example JSONL out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.eval import helpers
from typer.testing import CliRunner

from evomerge.cli import app, register_commands
from evomerge.eval.generation import generate_one_by_one

register_commands()  # every command, as `evomerge` itself does (with one command typer would drop its name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tokenizer = helpers.char_tokenizer()
    model = helpers.tiny_llama(len(tokenizer))
    with torch.inference_mode():
        said = generate_one_by_one(model, tokenizer, ["1+2=", "abc", "9"], max_new_tokens=6)
    return helpers.save_lm_dir(tmp_path_factory.mktemp("cli") / "lm", model, tokenizer), said


def _tasks(tmp_path: Path, said: list[str]) -> tuple[Path, Path]:
    answers = [said[0], said[1] + "#", said[2]]  # two right, one wrong
    em = helpers.write_jsonl(
        tmp_path / "em.jsonl",
        [{"prompt": p, "answer": a} for p, a in zip(["1+2=", "abc", "9"], answers, strict=True)],
    )
    ppl = helpers.write_jsonl(
        tmp_path / "ppl.jsonl", [{"text": "hello world"}, {"prompt": "1+", "answer": "2"}]
    )
    return em, ppl


def test_eval_prints_scores_and_writes_per_example(model_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, said = model_dir
    em, ppl = _tasks(tmp_path, said)
    out = tmp_path / "results" / "per_example.jsonl"
    args = ["eval", str(path), "--task", str(em), "--metric", "exact_match", "--task", str(ppl), "--metric",
            "perplexity", "--max-new-tokens", "6", "--output", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0.6667" in result.output and "perplexity" in result.output and "ppl" in result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["task"], r["line"], r["score"]) for r in records[:3]] == [
        ("em", 1, 1.0),
        ("em", 2, 0.0),
        ("em", 3, 1.0),
    ]
    assert records[0]["prediction"] == said[0].strip() or records[0]["prediction"] == said[0]
    assert [r["task"] for r in records[3:]] == ["ppl", "ppl"] and 0 < records[3]["score"] <= 1
    assert not list(out.parent.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_eval_limit(model_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, said = model_dir
    em, _ = _tasks(tmp_path, said)
    result = CliRunner().invoke(
        app, ["eval", str(path), "-t", str(em), "-m", "exact_match", "--limit", "1", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "1.0000" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metric", "exact_match", "--metric", "perplexity"], "give one --metric per --task"),
        (["--metric", "bleu"], "unknown metric 'bleu'"),
        (["--metric", "accuracy"], "missing field 'features'"),
    ],
)
def test_eval_user_errors(
    model_dir: tuple[Path, list[str]], tmp_path: Path, args: list[str], expected: str
) -> None:
    path, said = model_dir
    em, _ = _tasks(tmp_path, said)
    result = CliRunner().invoke(app, ["eval", str(path), "--task", str(em), *args])
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())


def test_eval_without_tokenizer_and_malformed_task(model_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, said = model_dir
    em, _ = _tasks(tmp_path, said)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((path / name).read_bytes())
    result = CliRunner().invoke(app, ["eval", str(bare), "--task", str(em), "--metric", "exact_match"])
    assert result.exit_code == 2 and "no tokenizer found" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": \n', encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(path), "--task", str(bad), "--metric", "exact_match"])
    assert result.exit_code == 2 and "bad.jsonl:2: malformed JSON" in " ".join(result.output.split())


def test_eval_reports_a_broken_model_as_failed(model_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path, said = model_dir
    em, _ = _tasks(tmp_path, said)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in path.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    state: dict[str, Any] = load_file(str(path / "model.safetensors"))
    state = {name: torch.full_like(tensor, float("nan")) for name, tensor in state.items()}
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["eval", str(broken), "--task", str(em), "--metric", "exact_match"])
    assert result.exit_code == 1 and "evaluation failed" in result.output and "non-finite" in result.output


def test_eval_classifier_and_metric_mismatch(tmp_path: Path) -> None:
    digits = pytest.importorskip("evomerge.zoo.digits", reason="the zoo's MLP classifier is not built yet")
    torch.manual_seed(0)
    model = digits.MLPClassifier()
    model.save_pretrained(tmp_path / "mlp")
    features = torch.rand(4, 64)
    with torch.inference_mode():
        predicted = model(features).argmax(-1).tolist()
    labels = [predicted[0], predicted[1], (predicted[2] + 1) % 10, predicted[3]]  # three right
    rows = [{"features": f, "label": label} for f, label in zip(features.tolist(), labels, strict=True)]
    task = helpers.write_jsonl(tmp_path / "digits.jsonl", rows)
    out = tmp_path / "per_example.jsonl"
    args = ["eval", str(tmp_path / "mlp"), "--task", str(task), "--metric", "accuracy", "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0.7500" in result.output
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [1.0, 1.0, 0.0, 1.0]
    em = helpers.write_jsonl(tmp_path / "em.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "mlp"), "--task", str(em), "--metric", "exact_match"]
    )
    assert result.exit_code == 2
    assert "metric 'exact_match' needs a language model" in " ".join(result.output.split())
