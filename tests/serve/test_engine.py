"""The engine: per-job sampling that does not depend on the batch, stops, budgets, log-probabilities."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.eval import helpers as eval_helpers

from evomerge.serve.engine import Engine, Job, _sample, find_stop, held_back

from .helpers import PROMPTS


@pytest.fixture(scope="module")
def engine() -> Engine:
    helpers = eval_helpers
    tokenizer = helpers.char_tokenizer()
    return Engine(helpers.tiny_llama(len(tokenizer)), tokenizer, context_length=256)


def job(engine: Engine, prompt: str, **options: Any) -> Job:
    return Job(prompt_ids=list(engine.tokenizer(prompt)["input_ids"]), **options)


def test_a_seeded_sample_does_not_depend_on_its_batch(engine: Engine) -> None:
    alone = engine.run([job(engine, "the cat is", seed=5, max_tokens=10)])[0]
    crowd = [job(engine, prompt, seed=index, max_tokens=10) for index, prompt in enumerate(PROMPTS)]
    together = engine.run([*crowd, job(engine, "the cat is", seed=5, max_tokens=10)])[-1]
    assert together.token_ids == alone.token_ids
    other = engine.run([job(engine, "the cat is", seed=6, max_tokens=10)])[0]
    assert other.token_ids != alone.token_ids


def test_temperature_zero_is_the_argmax_and_logprobs_are_log_softmax(engine: Engine) -> None:
    result = engine.run([job(engine, "1+2=", temperature=0, max_tokens=4, top_logprobs=2)])[0]
    ids = list(engine.tokenizer("1+2=")["input_ids"])
    for token in result.tokens:
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        assert token.token_id == int(logits.argmax())
        assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token.token_id]), abs=1e-4)
        assert [index for index, _ in token.top] == logits.topk(2).indices.tolist()
        ids.append(token.token_id)


def test_eos_stops_a_row_and_is_left_out_of_the_text(engine: Engine) -> None:
    first = engine.run([job(engine, "abc", temperature=0, max_tokens=1)])[0].token_ids[0]
    saved = engine.eos_ids
    engine.eos_ids = frozenset({first})  # pretend the greedy first token is EOS
    try:
        result = engine.run([job(engine, "abc", temperature=0, max_tokens=10)])[0]
    finally:
        engine.eos_ids = saved
    assert result.token_ids == [first] and result.finish_reason == "stop"


def test_stop_strings_end_the_row_and_are_cut_from_the_text(engine: Engine) -> None:
    free = engine.run([job(engine, "hello", temperature=0, max_tokens=12)])[0]
    assert free.finish_reason == "length" and len(free.tokens) == 12
    stop = free.text[3:5]
    stopped = engine.run([job(engine, "hello", temperature=0, max_tokens=12, stop=(stop,))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert len(stopped.tokens) < 12


def test_the_budget_ends_at_the_context(engine: Engine) -> None:
    long = job(engine, "a" * 250, max_tokens=100)  # 251 tokens of 256
    assert engine.budget(long) == 5
    assert len(engine.run([long])[0].tokens) == 5
    assert engine.run([job(engine, "abc", max_tokens=0, echo_logprobs=True)])[0].tokens == []


def test_listener_sees_every_token_in_order(engine: Engine) -> None:
    seen: list[int] = []
    result = engine.run(
        [job(engine, "9", max_tokens=6, seed=1, on_token=lambda info: seen.append(info.token_id))]
    )
    assert seen == result[0].token_ids


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    generator = torch.Generator().manual_seed(0)
    narrow = {_sample(logits, Job([1], top_p=0.5), generator) for _ in range(100)}
    wide = {_sample(logits, Job([1], top_p=0.8), generator) for _ in range(200)}
    everything = {_sample(logits, Job([1], top_p=1.0), generator) for _ in range(300)}
    assert narrow == {0} and wide == {0, 1} and everything == {0, 1, 2}


@pytest.mark.parametrize(
    ("text", "stops", "found", "hold"),
    [("hello world", ("wor",), 6, 0), ("hello wo", ("world",), -1, 2), ("abc", (), -1, 0),
     ("abcac", ("b", "ca"), 1, 1), ("x\ufffd", ("zz",), -1, 1), ("", ("a",), -1, 0)],
)  # fmt: skip
def test_find_stop_and_held_back(text: str, stops: tuple[str, ...], found: int, hold: int) -> None:
    assert find_stop(text, stops) == found
    assert held_back(text, stops) == hold
