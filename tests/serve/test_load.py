"""Load: many requests from 32 concurrent clients, no error, every answer the serial answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .helpers import PROMPTS, running_server
from .test_end_to_end import MAX_TOKENS, evaluator_answers

REQUESTS, CLIENTS = 300, 32


@pytest.mark.slow
def test_concurrent_load_gives_the_serial_answers(lm_dir: Path) -> None:
    import openai

    serial = dict(zip(PROMPTS, evaluator_answers(lm_dir, PROMPTS), strict=True))
    errors: list[str] = []
    answers: list[tuple[str, str]] = []

    async def drive(url: str) -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=60, max_retries=0)
        cursor = iter(range(REQUESTS))

        async def one_client() -> None:
            for index in cursor:
                prompt = PROMPTS[index % len(PROMPTS)]
                try:
                    answer = await client.completions.create(
                        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop="\n"
                    )
                except openai.OpenAIError as error:
                    errors.append(repr(error))
                    continue
                answers.append((prompt, answer.choices[0].text))

        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(CLIENTS))), timeout=600)
        await client.close()

    with running_server(lm_dir, name="tiny") as url:
        asyncio.run(drive(url))
    assert errors == []
    assert len(answers) == REQUESTS
    assert [answer for prompt, answer in answers if answer != serial[prompt]] == []
