"""Endpoints scored like model dirs: the same scores as the local evaluator, and faults survived."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evomerge.errors import ConfigError
from evomerge.eval.endpoint import (
    EndpointClient,
    EndpointError,
    EndpointEvaluator,
    EndpointModel,
    EndpointSpec,
    continuation_sum,
)
from evomerge.eval.evaluator import Evaluator
from evomerge.eval.loading import load_model
from evomerge.eval.tasks import Example, Task
from evomerge.serve.server import serve_in_thread

from .helpers import char_tokenizer, save_lm_dir, tiny_llama

for _module in ("fastapi", "uvicorn", "openai"):  # the `serve` extra; without it these tests are skipped
    pytest.importorskip(_module)

from .endpoint_stub import FaultyEndpoint  # noqa: E402 (needs fastapi)

PROMPTS = ["1+2=", "abc", "9", "hello world", "x", "12*34-5=", "the cat is", "é="]


def _zoo_tokenizer() -> Any:
    from evomerge.zoo.tokenizer import build_tokenizer

    return build_tokenizer()  # the lm zoo's: no BOS, so a text's first token is never scored


@pytest.fixture(scope="module", params=["bos", "no-bos"])
def lm_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = char_tokenizer() if request.param == "bos" else _zoo_tokenizer()
    return save_lm_dir(tmp_path_factory.mktemp("endpoint") / "lm", tiny_llama(len(tokenizer)), tokenizer)


@pytest.fixture(scope="module")
def served(lm_dir: Path) -> Iterator[str]:
    from evomerge.serve.app import create_app, load_served_model

    with serve_in_thread(create_app(load_served_model(lm_dir, name="lm"))) as url:
        yield url


def tasks(said: list[str]) -> list[Task]:
    """exact_match (half right), choice accuracy (raw and normalised), perplexity in both forms, groups."""
    answers = [text if index % 2 else text + "#" for index, text in enumerate(said)]
    em = [
        Example(prompt=p, answer=a, group=f"g{i % 3}")
        for i, (p, a) in enumerate(zip(PROMPTS, answers, strict=True))
    ]
    choices = [
        Example(prompt=p, answer=options[i % 2 - 1], choices=options, group=f"g{i % 2}")
        for i, p in enumerate(PROMPTS)
        for options in [("a", "bb", "c d", "zz z")[: 2 + i % 3]]
    ]  # the answer is the first choice or the last: neither metric gets everything right
    ppl = [Example(prompt=p, answer="2+2=4") for p in PROMPTS[:4]] + [Example(answer="hello there")]
    ppl += [Example(prompt="", answer="abc d", group="text")]
    return [
        Task("em", "exact_match", em),
        Task("choice", "choice_accuracy", choices),
        Task("choice_norm", "choice_accuracy_norm", choices, weight=2.0),
        Task("ppl", "perplexity", ppl),
    ]


def test_endpoint_scores_equal_model_dir_scores(lm_dir: Path, served: str) -> None:
    model, tokenizer = load_model(lm_dir)
    probe = Evaluator(
        [Task("p", "exact_match", [Example(prompt=p) for p in PROMPTS])],
        tokenizer=tokenizer,
        max_new_tokens=8,
    )
    probe.evaluate(model)
    all_tasks = tasks(probe.last_predictions["p"])
    local = Evaluator(all_tasks, tokenizer=tokenizer, max_new_tokens=8).evaluate(model)
    remote = EndpointEvaluator(all_tasks, max_new_tokens=8).evaluate(
        EndpointModel(EndpointSpec(base_url=served, model="lm"))
    )
    assert local.ok and remote.ok, (local.error, remote.error)
    for name, score in local.tasks.items():
        other = remote.tasks[name]
        assert other.per_example == pytest.approx(score.per_example, rel=1e-4), name
        assert other.groups == pytest.approx(score.groups, rel=1e-4), name
        assert other.score == pytest.approx(score.score, rel=1e-4), name
    assert remote.score == pytest.approx(local.score, rel=1e-4)
    assert remote.behaviour == pytest.approx(local.behaviour, rel=1e-4)
    for name in ("em", "choice", "choice_norm"):  # right and wrong answers: the equality has teeth
        assert 0 < local.tasks[name].score < 1, name
    assert remote.cost["requests"] > len(PROMPTS)


def test_continuation_sum_counts_the_continuations_tokens() -> None:
    # "<s>" at 0 (no width), "a" 0, "b" 1, "c" 2: context "ab", continuation "c"
    assert continuation_sum([None, -1.0, -2.0, -3.0], [0, 0, 1, 2], 2, 3) == (-3.0, 1)
    # no BOS: the first token has no logprob and is not counted even when it is the continuation's
    assert continuation_sum([None, -2.0, -3.0], [0, 1, 2], 0, 3) == (-5.0, 2)
    # a generated token after the prompt (a server that ignores max_tokens=0) is not counted
    assert continuation_sum([None, -2.0, -3.0, -9.0], [0, 1, 2, 3], 1, 3) == (-5.0, 2)


def _stub(endpoint: FaultyEndpoint) -> Any:
    return serve_in_thread(endpoint.app())


def test_an_endpoint_without_logprobs_gives_a_clear_error() -> None:
    endpoint = FaultyEndpoint(answer=lambda body: "4")
    with _stub(endpoint) as url:
        model = EndpointModel(EndpointSpec(base_url=url, model="closed"))
        em = Task("em", "exact_match", [Example(prompt="2+2=", answer="4")])
        assert EndpointEvaluator([em]).evaluate(model).score == 1.0  # generation works
        choice = Task("c", "choice_accuracy", [Example(prompt="2+2=", answer="4", choices=("4", "5"))])
        with pytest.raises(EndpointError, match=r"logprobs.*exact_match"):
            EndpointEvaluator([choice]).evaluate(model)


def test_chat_endpoints_answer_exact_match() -> None:
    endpoint = FaultyEndpoint(answer=lambda body: body["messages"][0]["content"].upper() + "\nmore")
    with _stub(endpoint) as url:
        model = EndpointModel(EndpointSpec(base_url=url, model="m", api="chat"))
        assert model.generate(["abc", "x"], max_tokens=4) == ["ABC", "X"]  # cut at the first newline
        with pytest.raises(EndpointError, match="chat API"):
            model.continuation_logliks([("a", "b")])


@pytest.mark.parametrize("fault", ["429", "500", "drop", "slow"])
def test_faults_are_retried(fault: str) -> None:
    endpoint = FaultyEndpoint([fault], slow_s=3.0)
    with _stub(endpoint) as url:
        spec = EndpointSpec(base_url=url, model="m", timeout_s=1.0, max_retries=2)
        assert EndpointModel(spec).generate(["hi"], max_tokens=3) == ["echo:hi"]
    assert [met for _, met in endpoint.attempts] == [fault, "ok"]


def test_retry_after_is_honoured() -> None:
    endpoint = FaultyEndpoint(["429", "429"], retry_after="1")
    with _stub(endpoint) as url:
        EndpointModel(EndpointSpec(base_url=url, model="m", max_retries=3)).generate(["hi"], max_tokens=3)
    times = [at for at, _ in endpoint.attempts]
    assert len(times) == 3
    assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(times))  # waited as told


def test_an_endpoint_failing_past_its_retries_is_a_failed_result() -> None:
    endpoint = FaultyEndpoint(["500"] * 10)
    with _stub(endpoint) as url:
        model = EndpointModel(EndpointSpec(base_url=url, model="m", max_retries=1))
        result = EndpointEvaluator([Task("em", "exact_match", [Example(prompt="a", answer="b")])]).evaluate(
            model
        )
    assert not result.ok and "500" in str(result.error)
    assert len(endpoint.attempts) == 2  # one call and one retry


def test_concurrency_is_capped() -> None:
    endpoint = FaultyEndpoint(delay_s=0.1)
    with _stub(endpoint) as url:
        client = EndpointClient(EndpointSpec(base_url=url, model="m", max_concurrency=3))
        answers = EndpointModel(client).generate([str(i) for i in range(12)], max_tokens=2)
    assert answers == [f"echo:{i}" for i in range(12)]
    assert 1 < endpoint.max_in_flight <= 3


def test_a_refused_key_or_unknown_model_is_an_endpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evomerge.serve.app import create_app, load_served_model

    tokenizer = char_tokenizer()
    lm = save_lm_dir(tmp_path / "lm", tiny_llama(len(tokenizer)), tokenizer)
    task = Task("em", "exact_match", [Example(prompt="a", answer="b")])
    with serve_in_thread(create_app(load_served_model(lm, name="lm"), api_key="sesame")) as url:
        monkeypatch.setenv("MY_KEY", "wrong")
        with pytest.raises(EndpointError, match="MY_KEY"):
            EndpointEvaluator([task]).evaluate(
                EndpointModel(EndpointSpec(base_url=url, model="lm", api_key_env="MY_KEY"))
            )
        monkeypatch.setenv("MY_KEY", "sesame")
        with pytest.raises(EndpointError, match="GET /v1/models"):
            EndpointEvaluator([task]).evaluate(
                EndpointModel(EndpointSpec(base_url=url, model="nope", api_key_env="MY_KEY"))
            )
        assert (
            EndpointEvaluator([task])
            .evaluate(EndpointModel(EndpointSpec(base_url=url, model="lm", api_key_env="MY_KEY")))
            .ok
        )


def test_spec_checks_its_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        EndpointSpec(base_url="http://x/v1", model="m", api_key_env="NOT_SET_ANYWHERE").api_key()
    for bad in (
        {"max_concurrency": 0},
        {"timeout_s": 0},
        {"model": ""},
        {"colour": "red"},
        {"base_url": "x:1"},
    ):
        with pytest.raises(ValidationError):
            EndpointSpec(**{"base_url": "http://x/v1", "model": "m", **bad})
    with pytest.raises(Exception, match="accuracy"):
        EndpointEvaluator([Task("digits", "accuracy", [Example(features=(1.0,), label=0)])])
