"""Stand-in members for fast black-box tests: FaultyEndpoint stubs that answer by rule, and task files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = ["cat", "dog", "sun", "sea", "fox", "owl", "bee", "elk", "yak", "ram", "hen", "cod",
         "ant", "bat", "cow", "eel", "gnu", "jay", "kid", "pig", "rat", "ape", "emu", "doe"]  # fmt: skip


def write_tasks(folder: Path) -> dict[str, str]:
    """dev and test files of 12 prompts each: 'up WORD: ' (answer WORD upper-cased) or 'rev WORD: '."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, words in (("dev", WORDS[:12]), ("test", WORDS[12:])):
        lines = []
        for i, word in enumerate(words):
            kind = "up" if i % 2 == 0 else "rev"
            answer = word.upper() if kind == "up" else word[::-1]
            lines.append(json.dumps({"prompt": f"{kind} {word}: ", "answer": answer}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        paths[split] = str(folder / f"{split}.jsonl")
    return paths


def upper_expert(body: dict[str, Any]) -> str:
    """Right on 'up' prompts; answers 'rev' prompts upper-cased too (wrong)."""
    return body["prompt"].split()[1].rstrip(":").upper()


def reverse_expert(body: dict[str, Any]) -> str:
    """Right on 'rev' prompts; reverses 'up' prompts too (wrong)."""
    return body["prompt"].split()[1].rstrip(":")[::-1]


def stub_config(urls: dict[str, str], tasks: dict[str, str], tmp: Path, **extra: Any) -> dict[str, Any]:
    members = [
        {
            "name": name,
            "endpoint": {
                "base_url": url,
                "model": name,
                "timeout_s": 1.0,
                "max_retries": 6,
                "max_concurrency": 4,
            },
            "price_input": 1e-6,
            "price_output": 1e-6,
            "logprobs": False,
        }
        for name, url in urls.items()
    ]
    return {
        "members": members,
        "tasks": [{"name": "mix", "dev": tasks["dev"], "test": tasks["test"]}],
        "cache": str(tmp / "cache.sqlite"),
        "combine": {"operators": ["vote", "router"], "features": [{"name": "up", "regex": "^up "}]},
        "budget": {"max_evaluations": 120},
        "out": str(tmp / "run"),
        **extra,
    }
