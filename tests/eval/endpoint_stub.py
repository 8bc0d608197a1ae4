"""A stand-in OpenAI endpoint that misbehaves on purpose: rate limits, server errors, dropped connections,
timeouts, answers without logprobs. Tests of endpoint clients (and of the black-box combination) run it
in-process with `evomerge.serve.server.serve_in_thread`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

FAULTS = ("ok", "429", "500", "drop", "slow")


class FaultyEndpoint:
    """Answers POST /v1/completions and /v1/chat/completions; request i meets fault `plan[i]` (then "ok").

    "429": Retry-After `retry_after` seconds; "500": a server error; "drop": the connection closes in the
    middle of the answer; "slow": the answer comes after `slow_s` seconds (past the client's timeout).
    `answer(body) -> text` makes the text of an "ok" answer; it comes without logprobs.
    """

    def __init__(
        self,
        plan: Sequence[str] = (),
        *,
        answer: Callable[[dict[str, Any]], str] | None = None,
        retry_after: str = "1",
        slow_s: float = 3.0,
        delay_s: float = 0.0,
    ) -> None:
        assert all(fault in FAULTS for fault in plan), plan
        self.plan, self.retry_after, self.slow_s, self.delay_s = list(plan), retry_after, slow_s, delay_s
        self.answer = answer or (lambda body: f"echo:{body.get('prompt', '')}")
        self.attempts: list[tuple[float, str]] = []  # (monotonic time, fault met)
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def app(self) -> Any:
        app = FastAPI()

        async def handle(request: Request) -> Any:
            body = await request.json()
            fault = self._next_fault()
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if fault == "429":
                    error = {
                        "error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}
                    }
                    return JSONResponse(error, status_code=429, headers={"Retry-After": self.retry_after})
                if fault == "500":
                    error = {
                        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
                    }
                    return JSONResponse(error, status_code=500)
                if fault == "drop":
                    return StreamingResponse(_broken_body(), media_type="application/json")
                await asyncio.sleep(self.slow_s if fault == "slow" else self.delay_s)
                return JSONResponse(self._completion(request.url.path, body))
            finally:
                with self._lock:
                    self.in_flight -= 1

        app.post("/v1/completions")(handle)
        app.post("/v1/chat/completions")(handle)
        return app

    def _next_fault(self) -> str:
        with self._lock:
            fault = self.plan[len(self.attempts)] if len(self.attempts) < len(self.plan) else "ok"
            self.attempts.append((time.monotonic(), fault))
            return fault

    def _completion(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        text = self.answer(body)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        if path.endswith("chat/completions"):
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [choice], "usage": usage}  # fmt: skip
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": usage}  # fmt: skip


async def _broken_body() -> Any:
    yield b'{"id": "c", "choi'
    raise ConnectionResetError("the stub drops the connection mid-answer")
