"""One tiny model dir and one running server per module: starting a server costs about a second."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import CHAT_TEMPLATE, client, running_server, tiny_lm_dir

for _module in ("fastapi", "uvicorn", "openai"):  # the `serve` extra; without it these tests are skipped
    pytest.importorskip(_module)

API_KEY = "test-key"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(lm_dir: Path, template_file: Path) -> Iterator[str]:
    """The base URL of a server with a key and a chat template, batching up to 32 sequences."""
    with running_server(lm_dir, name="tiny", chat_template_file=template_file, api_key=API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def api(server: str) -> Any:
    return client(server, API_KEY)
