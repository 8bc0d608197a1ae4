"""`evomerge serve` and `evomerge eval --endpoint` from the command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.eval import helpers as eval_helpers
from typer.testing import CliRunner

from evomerge.cli import app, register_commands

from .helpers import PROMPTS, running_server

register_commands()
runner = CliRunner()


def _tasks(tmp_path: Path) -> list[str]:
    write = eval_helpers.write_jsonl
    em = write(tmp_path / "em.jsonl", [{"prompt": p, "answer": "1"} for p in PROMPTS])
    ppl = write(tmp_path / "ppl.jsonl", [{"text": "hello world"}, {"prompt": "1+", "answer": "2"}])
    return ["--task", str(em), "--metric", "exact_match", "--task", str(ppl), "--metric", "perplexity"]


def _per_example(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _same_results(first: Path, second: Path) -> None:
    a, b = _per_example(first), _per_example(second)
    assert [{k: v for k, v in r.items() if k != "score"} for r in a] == [
        {k: v for k, v in r.items() if k != "score"} for r in b
    ]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], rel=1e-4)
    assert any("prediction" in r for r in a)


def test_eval_endpoint_equals_eval_model_dir(lm_dir: Path, tmp_path: Path) -> None:
    tasks = _tasks(tmp_path)
    local = runner.invoke(
        app, ["eval", str(lm_dir), *tasks, "--max-new-tokens", "8", "--output", str(tmp_path / "a.jsonl")]
    )
    assert local.exit_code == 0, local.output
    with running_server(lm_dir, name="tiny") as url:
        args = ["eval", "--endpoint", url, "--model", "tiny", *tasks, "--max-new-tokens", "8"]
        remote = runner.invoke(app, [*args, "--output", str(tmp_path / "b.jsonl")])
    assert remote.exit_code == 0, remote.output
    _same_results(tmp_path / "a.jsonl", tmp_path / "b.jsonl")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval"], "not both and not neither"),
        (["eval", "DIR", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"], "not both"),
        (["eval", "--endpoint", "http://127.0.0.1:9/v1"], "--model NAME"),
        (["eval", "DIR", "--model", "m"], "--endpoint URL"),
    ],
)
def test_eval_refuses_a_wrong_target(lm_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(lm_dir) if arg == "DIR" else arg for arg in args]
    result = runner.invoke(app, [*args, *_tasks(tmp_path)])
    assert result.exit_code == 2 and message in result.output


def test_serve_refuses_bad_input_before_serving(tmp_path: Path, lm_dir: Path) -> None:
    missing = runner.invoke(app, ["serve", str(tmp_path / "nowhere"), "--port", "9"])
    assert missing.exit_code == 2 and "not found" in missing.output
    template = runner.invoke(app, ["serve", str(lm_dir), "--chat-template", str(tmp_path / "t.jinja")])
    assert template.exit_code == 2 and "--chat-template" in template.output
    assert "--api-key" in runner.invoke(app, ["serve", "--help"]).output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_real_cli_serve_and_eval_endpoint(lm_dir: Path, tmp_path: Path) -> None:
    """`evomerge serve` as a process, `evomerge eval --endpoint` as another: the scores of `eval MODEL_DIR`."""
    evomerge = [sys.executable, "-c", "from evomerge.cli import main; main()"]
    port, env = _free_port(), {**os.environ, "EVOMERGE_API_KEY": "k", "SERVE_KEY": "k"}
    server = subprocess.Popen(
        [*evomerge, "serve", str(lm_dir), "--port", str(port), "--model-name", "tiny"], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # bounded wait for the server to come up
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert server.poll() is None, "evomerge serve exited"
        tasks = _tasks(tmp_path)
        url = f"http://127.0.0.1:{port}/v1"
        remote = [
            *evomerge,
            "eval",
            "--endpoint",
            url,
            "--model",
            "tiny",
            "--api-key-env",
            "SERVE_KEY",
            *tasks,
        ]
        subprocess.run(
            [*remote, "--max-new-tokens", "8", "--output", str(tmp_path / "b.jsonl")],
            env=env,
            check=True,
            timeout=120,
        )
        local = [
            *evomerge,
            "eval",
            str(lm_dir),
            *tasks,
            "--max-new-tokens",
            "8",
            "--output",
            str(tmp_path / "a.jsonl"),
        ]
        subprocess.run(local, env=env, check=True, timeout=120)
        refused = subprocess.run(
            [*remote[: -len(tasks)], *tasks],
            env={**env, "SERVE_KEY": "wrong"},
            timeout=120,
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and "SERVE_KEY" in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    _same_results(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
