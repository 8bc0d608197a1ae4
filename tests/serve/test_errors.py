"""Every error is OpenAI's JSON shape with the right status, and none takes the server down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import API_KEY
from .helpers import running_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"model": "tiny", "prompt": "1+2=", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(server: str, route: str, body: Any, headers: dict[str, str] | None = HEADERS) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else None
    return httpx.post(
        f"{server}/{route}",
        json=None if content is not None else body,
        content=content,
        headers={**(headers or {}), "Content-Type": "application/json"},
        timeout=30,
    )


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        (None, "No API key"),
        ({"Authorization": "Bearer wrong"}, "Incorrect API key"),
        ({"Authorization": "x"}, "No"),
    ],
)
def test_missing_or_wrong_key_is_401(server: str, headers: dict[str, str] | None, what: str) -> None:
    for route, body in (("completions", GOOD), ("chat/completions", CHAT)):
        error = error_of(post(server, route, body, headers=headers), 401)
        assert error["code"] == "invalid_api_key" and what in error["message"]
    assert httpx.get(f"{server}/models", timeout=10).status_code == 401


def test_unknown_model_is_404(server: str) -> None:
    for route, body in (("completions", GOOD), ("chat/completions", CHAT)):
        error = error_of(post(server, route, {**body, "model": "gpt-17"}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "'gpt-17'" in error["message"] and "'tiny'" in error["message"]
    assert httpx.get(f"{server}/models/gpt-17", headers=HEADERS, timeout=10).status_code == 404


def test_prompt_longer_than_the_context_is_400_with_both_lengths(server: str) -> None:
    prompt = "a" * 300  # 301 tokens with BOS; the model's context is 256
    error = error_of(post(server, "completions", {**GOOD, "prompt": prompt}), 400)
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"] and "301" in error["message"]
    chat = {**CHAT, "messages": [{"role": "user", "content": prompt}]}
    assert error_of(post(server, "chat/completions", chat), 400)["param"] == "messages"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"prompt": None}, "prompt"),
        ({"prompt": []}, None),
        ({"prompt": [[1, 2], [999999]]}, "prompt"),
        ({"frequency_penalty": 1.0}, None),
        ({"best_of": 3}, None),
        ({"model": None}, "model"),
        ({"seed": "x"}, "seed"),
        ({"prompt": ["a"] * 10, "n": 16}, "n"),
    ],
)
def test_invalid_completion_parameters_are_400(
    server: str, change: dict[str, Any], param: str | None
) -> None:
    body = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    error = error_of(post(server, "completions", body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error


@pytest.mark.parametrize(
    "change",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"top_logprobs": 3},  # without logprobs: true
        {"top_logprobs": 50, "logprobs": True},
        {"max_tokens": 0},
    ],
)
def test_invalid_chat_parameters_are_400(server: str, change: dict[str, Any]) -> None:
    error_of(post(server, "chat/completions", {**CHAT, **change}), 400)


@pytest.mark.parametrize("body", ['{"model": "tiny", "prompt": ', "[1, 2", "not json at all", ""])
def test_malformed_json_is_400(server: str, body: str) -> None:
    error = error_of(post(server, "completions", body), 400)
    assert "JSON" in error["message"] or "field required" in error["message"]


def test_unknown_route_is_404_in_the_same_shape(server: str) -> None:
    error_of(httpx.get(f"{server}/engines", headers=HEADERS, timeout=10), 404)


def test_the_server_lives_on_after_every_error(server: str) -> None:
    for body in ("{", {"model": "x"}, {**GOOD, "n": -3}, {**GOOD, "prompt": "a" * 500}):
        assert post(server, "completions", body).status_code >= 400
    assert post(server, "completions", GOOD).status_code == 200
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=10).status_code == 200


def test_chat_without_a_template_is_400_naming_the_flag(lm_dir: Path) -> None:
    with running_server(lm_dir, name="tiny") as url:  # the char tokenizer defines no chat template
        error = error_of(post(url, "chat/completions", CHAT, headers=None), 400)
        assert error["code"] == "missing_chat_template"
        assert "chat template" in error["message"] and "--chat-template" in error["message"]
        assert post(url, "completions", GOOD, headers=None).status_code == 200  # completions still work


def test_a_failing_model_fails_its_request_not_the_server(lm_dir: Path) -> None:
    """NaN logits for one prompt: that request gets a 500 in the error shape; others are answered."""
    from concurrent.futures import ThreadPoolExecutor

    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    served = load_served_model(lm_dir, name="tiny")
    inner, poison = served.engine.model, served.tokenizer("?")["input_ids"][-1]

    class Poisoned(type(inner)):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            output = super().__call__(*args, **kwargs)
            if bool((kwargs["input_ids"] == poison).any()):
                output.logits[:] = float("nan")
            return output

    inner.__class__ = Poisoned
    app = create_app(served, max_batch_size=8, max_wait_s=0.05)
    with serve_in_thread(app) as url:
        bodies = [{**GOOD, "prompt": prompt} for prompt in ("1+2=", "what?", "abc", "9")]
        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(lambda body: post(url, "completions", body, headers=None), bodies))
        assert [r.status_code for r in responses] == [200, 500, 200, 200]
        assert error_of(responses[1], 500)["type"] == "server_error"
        assert post(url, "completions", GOOD, headers=None).status_code == 200
