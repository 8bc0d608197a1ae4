"""`evomerge serve` driven by the official openai client: the answers are the model's own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.eval.evaluator import Evaluator
from evomerge.eval.loading import load_model
from evomerge.eval.tasks import Example, Task

from .conftest import API_KEY
from .helpers import PROMPTS, client

MAX_TOKENS = 12


def evaluator_answers(model_dir: Path, prompts: list[str]) -> list[str]:
    """What `evomerge eval` generates for the prompts (its exact_match predictions)."""
    model, tokenizer = load_model(model_dir)
    task = Task("t", "exact_match", [Example(prompt=p, answer="?") for p in prompts])
    evaluator = Evaluator([task], tokenizer=tokenizer, max_new_tokens=MAX_TOKENS)
    assert evaluator.evaluate(model).ok
    return evaluator.last_predictions["t"]


def greedy(api: Any, prompt: str, model: str = "tiny") -> str:
    answer = api.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop="\n"
    )
    return str(answer.choices[0].text)


def test_greedy_answers_equal_evaluators_concurrent_and_in_one_request(api: Any, lm_dir: Path) -> None:
    expected = evaluator_answers(lm_dir, PROMPTS)
    with ThreadPoolExecutor(max_workers=8) as pool:  # arrive together: served in shared batches
        concurrent = list(pool.map(lambda prompt: greedy(api, prompt), PROMPTS))
    listed = api.completions.create(
        model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, stop="\n"
    )
    assert concurrent == expected
    assert [choice.text for choice in sorted(listed.choices, key=lambda c: c.index)] == expected
    assert len(set(expected)) > 3  # the prompts get different answers: the comparison has teeth


def test_answer_carries_usage_and_finish_reason(api: Any) -> None:
    answer = api.completions.create(model="tiny", prompt="1+2=", max_tokens=3, temperature=0, logprobs=0)
    assert answer.usage.prompt_tokens == 5  # BOS + 4 characters
    assert answer.usage.completion_tokens == len(answer.choices[0].logprobs.tokens) <= 3
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.choices[0].finish_reason in ("length", "stop")
    long = api.completions.create(
        model="tiny", prompt="1+2=", max_tokens=40, temperature=0, stop=["1", "2", "3"]
    )
    assert long.choices[0].finish_reason == "stop"
    assert not any(digit in long.choices[0].text for digit in "123")


@pytest.mark.parametrize("stop", [None, ["a", " t"]])
def test_streaming_equals_non_streaming_completions(api: Any, stop: list[str] | None) -> None:
    params = dict(
        model="tiny", prompt=PROMPTS[:3], max_tokens=10, temperature=0.9, seed=7, n=2, stop=stop, logprobs=2
    )
    whole = api.completions.create(**params)
    texts: dict[int, str] = {}
    logprobs: dict[int, list[float]] = {}
    finish: dict[int, str] = {}
    offsets: dict[int, list[int]] = {}
    chunks = 0
    for chunk in api.completions.create(**params, stream=True):
        chunks += 1
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs is not None:
                logprobs.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
                offsets.setdefault(choice.index, []).extend(choice.logprobs.text_offset)
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert chunks > len(whole.choices)  # token by token, not one piece per choice
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    for choice in whole.choices:
        assert logprobs[choice.index] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert offsets[choice.index] == choice.logprobs.text_offset


def test_streaming_equals_non_streaming_chat(api: Any) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    params = dict(model="tiny", messages=messages, max_tokens=12, temperature=0.8, seed=3, n=2, stop=["e"])
    whole = api.chat.completions.create(**params)
    texts: dict[int, str] = {}
    roles = set()
    for chunk in api.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
        for choice in chunk.choices:
            roles.add(choice.delta.role)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert "assistant" in roles
    assert all(c.message.role == "assistant" for c in whole.choices)


def _own_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """The model's log-softmax at every position of `ids` (T, V): row t predicts token t + 1."""
    model, _ = load_model(model_dir)
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_equal_the_models_log_softmax(api: Any, lm_dir: Path) -> None:
    _, tokenizer = load_model(lm_dir)
    prompt = "12*34-5="
    answer = api.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0.7, seed=1, logprobs=3
    )
    logprobs = answer.choices[0].logprobs
    prompt_ids = tokenizer(prompt)["input_ids"]
    new_ids = tokenizer.convert_tokens_to_ids(logprobs.tokens)
    table = _own_logprobs(lm_dir, prompt_ids + new_ids)
    for step, (token, logprob, top) in enumerate(
        zip(new_ids, logprobs.token_logprobs, logprobs.top_logprobs, strict=True)
    ):
        row = table[len(prompt_ids) - 1 + step]
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        values, indices = row.topk(3)
        assert list(top) == [tokenizer.decode([i]) for i in indices.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    shown = [token if token != tokenizer.eos_token else "" for token in logprobs.tokens]  # EOS: no text
    assert logprobs.text_offset == [len("".join(shown[:step])) for step in range(len(shown))]


def test_echo_gives_the_prompts_logprobs(api: Any, lm_dir: Path) -> None:
    _, tokenizer = load_model(lm_dir)
    prompt = "hello world"
    answer = api.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    logprobs = answer.choices[0].logprobs
    ids = tokenizer(prompt)["input_ids"]
    table = _own_logprobs(lm_dir, ids)
    assert answer.choices[0].text == prompt
    assert logprobs.token_logprobs[0] is None  # nothing before the first token
    expected = [float(table[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert logprobs.text_offset == [0, *range(len(prompt))]  # BOS and the first character both at 0


def test_chat_logprobs_equal_the_models_log_softmax(api: Any, lm_dir: Path) -> None:
    _, tokenizer = load_model(lm_dir)
    answer = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "2+2"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    content = answer.choices[0].logprobs.content
    rendered = "user: 2+2\nassistant: "
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    new_ids = tokenizer.convert_tokens_to_ids([entry.token for entry in content])
    table = _own_logprobs(lm_dir, prompt_ids + new_ids)
    for step, entry in enumerate(content):
        row = table[len(prompt_ids) - 1 + step]
        assert entry.logprob == pytest.approx(float(row[new_ids[step]]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), abs=1e-4
        )
        assert new_ids[step] == int(row.argmax())  # temperature 0: the top token


def test_n_and_seed_are_reproducible(api: Any) -> None:
    params = dict(model="tiny", prompt="the cat is", max_tokens=8, temperature=1.0, n=4)
    first = [c.text for c in api.completions.create(**params, seed=11).choices]
    with ThreadPoolExecutor(max_workers=4) as pool:  # the same request again, in batches with others
        again = list(
            pool.map(
                lambda s: [c.text for c in api.completions.create(**params, seed=s).choices], [11, 12, 11, 13]
            )
        )
    assert again[0] == first and again[2] == first
    assert len(first) == 4
    draws = {tuple(first), *(tuple(texts) for texts in again)}
    assert len(draws) == 3  # seeds 11, 12, 13: different samples
    assert len(set(first)) > 1  # the n choices are different draws


def test_tiny_top_p_is_greedy(api: Any) -> None:
    sampled = api.completions.create(
        model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.5, top_p=1e-6, seed=5
    )
    assert (
        sampled.choices[0].text
        == api.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0)
        .choices[0]
        .text
    )


def test_models_and_health(api: Any, server: str) -> None:
    import httpx

    assert [model.id for model in api.models.list().data] == ["tiny"]
    assert api.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server.removesuffix("/v1") + "/health", timeout=10)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_batching_shares_forward_passes(lm_dir: Path) -> None:
    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    app = create_app(load_served_model(lm_dir, name="tiny"), max_batch_size=32, max_wait_s=0.05)
    with serve_in_thread(app) as url:
        api = client(url, "none")
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda prompt: greedy(api, prompt), PROMPTS * 2))
    scheduler = app.state.scheduler
    assert scheduler.jobs_run == 16
    assert scheduler.batches_run < 16  # requests that arrived together went through the model together


def test_serial_mode_runs_one_request_at_a_time(lm_dir: Path) -> None:
    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    app = create_app(load_served_model(lm_dir, name="tiny"), max_batch_size=1)
    with serve_in_thread(app) as url:
        api = client(url, "none")
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda prompt: greedy(api, prompt), PROMPTS))
    assert app.state.scheduler.batches_run == len(PROMPTS)
    assert answers == evaluator_answers(lm_dir, PROMPTS)


def test_a_server_with_key_refuses_the_openai_client_without_it(server: str) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert client(server, API_KEY).completions.create(model="tiny", prompt="x", max_tokens=1).choices
