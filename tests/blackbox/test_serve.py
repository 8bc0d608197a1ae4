"""`blackbox serve`: the evolved combination answers through the openai client as it answered in evolve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.blackbox.stubs import WORDS, stub_config, write_tasks
from tests.blackbox.test_record import stubs

from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve
from evomerge.blackbox.record import record
from evomerge.blackbox.serve import create_combination_app
from evomerge.errors import ConfigError
from evomerge.serve.server import serve_in_thread

pytestmark = pytest.mark.slow


def test_served_combination_answers_each_prompt_right(tmp_path: Path) -> None:
    import openai

    with stubs() as urls:
        config = BlackBoxConfig.from_dict(stub_config(urls, write_tasks(tmp_path / "tasks"), tmp_path))
        record(config)
        evolve(config)
        assert json.loads((config.out / RESULT_NAME).read_text())["rows"]["evolved"]["test"] == 1.0
        with serve_in_thread(create_combination_app(config.out, name="combo")) as url:
            client = openai.OpenAI(base_url=url, api_key="none")
            unseen = ["up zebra: ", "rev zebra: "]  # never recorded: the members are asked live
            prompts = [f"up {WORDS[12]}: ", f"rev {WORDS[13]}: ", *unseen]
            texts = [
                client.completions.create(model="combo", prompt=p, max_tokens=8).choices[0].text
                for p in prompts
            ]
    assert texts == [WORDS[12].upper(), WORDS[13][::-1], "ZEBRA", "arbez"]


def test_serve_refuses_a_dir_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="blackbox evolve"):
        create_combination_app(tmp_path)
