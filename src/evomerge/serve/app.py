"""The OpenAI-compatible HTTP API of `evomerge serve`, as a FastAPI app over one model.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions.
Every error is OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, and a bad request
never reaches the model: names, parameters, prompt lengths and the chat template are checked first.
Requests are queued on the BatchScheduler, so requests that arrive together share forward passes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.extras import import_extra
from evomerge.serve.engine import Engine, Generated, Job, TokenLogprob, find_stop, held_back
from evomerge.serve.protocol import ChatRequest, CompletionRequest
from evomerge.serve.scheduler import BatchScheduler

if TYPE_CHECKING:
    from fastapi import FastAPI, Request, Response


MAX_CHOICES = 128  # sequences one request may ask for (prompts x n)


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """A loaded model with what the API needs around it."""

    name: str
    engine: Engine
    chat_template: str | None  # None: chat requests are refused with a 400

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int | None:
        return self.engine.context_length


def load_served_model(
    model_dir: str | Path,
    *,
    name: str | None = None,
    chat_template_file: str | Path | None = None,
    device: str = "cpu",
) -> ServedModel:
    """Load a causal LM dir (with its tokenizer) for serving; ConfigError for a classifier or a bad template."""
    from evomerge.eval.loading import load_model

    model_dir = Path(model_dir)
    template = _read_template(chat_template_file) if chat_template_file is not None else None
    model, tokenizer = load_model(model_dir, device=device)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: a classifier cannot be served; evomerge serve needs a causal LM dir")
    engine = Engine(model, tokenizer, context_length=context_length(model.config, tokenizer))
    template = template or getattr(tokenizer, "chat_template", None)
    return ServedModel(name or model_dir.resolve().name, engine, template)


def _read_template(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--chat-template {path}: file not found (expected a Jinja chat template)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty (expected a Jinja chat template)")
    return text


def context_length(config: Any, tokenizer: Any) -> int | None:
    """The longest sequence the model takes: its position limit, else the tokenizer's, else None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else None


def create_app(
    served: ServedModel, *, api_key: str | None = None, max_batch_size: int = 32, max_wait_s: float = 0.005
) -> FastAPI:
    """The FastAPI app serving `served`; its lifespan starts and stops the batching worker."""
    fastapi = import_extra("fastapi", who="evomerge serve", extra="serve")
    scheduler = BatchScheduler(served.engine, max_batch_size=max_batch_size, max_wait_s=max_wait_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = fastapi.FastAPI(title="evomerge serve", lifespan=lifespan)
    app.state.scheduler = scheduler
    _install_errors(app)
    if api_key:
        _install_auth(app, api_key)
    api = _Api(served, scheduler)
    app.get("/health")(api.health)
    app.get("/v1/models")(api.models)
    app.get("/v1/models/{model_id:path}")(api.model)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat)
    return app


def _install_errors(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def api_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        return JSONResponse(error.body(), status_code=error.status)

    async def invalid(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return JSONResponse(_validation_error(error.errors()).body(), status_code=400)

    async def http(_: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(
            APIError(error.status_code, str(error.detail), code=code).body(), error.status_code
        )

    async def internal(_: Request, error: Exception) -> Response:
        failure = APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")
        return JSONResponse(failure.body(), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, internal)


def _validation_error(errors: Sequence[Any]) -> APIError:
    """The first pydantic error as a 400: malformed JSON, or the parameter and what is wrong with it."""
    first: dict[str, Any] = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(
            400, f"malformed JSON in the request body: {detail}".rstrip(": "), code="invalid_json"
        )
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "field required"
    shown = f"{param}: {message}" if param else message
    return APIError(400, f"invalid request: {shown}", param=param, code="invalid_value")


def _install_auth(app: Any, api_key: str) -> None:
    from fastapi.responses import JSONResponse

    expected = api_key.encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Response:
        if request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not given or not hmac.compare_digest(given.encode(), expected):
                what = "Incorrect API key provided" if given else "No API key provided"
                error = APIError(
                    401, f"{what}; send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
                return JSONResponse(error.body(), status_code=401)
        response: Response = await call_next(request)
        return response


@dataclass
class _Prompt:
    text: str
    ids: list[int]
    offsets: list[int]  # character offset in `text` where each token starts


class _Api:
    """The route handlers over one served model."""

    def __init__(self, served: ServedModel, scheduler: BatchScheduler) -> None:
        self.served, self.scheduler = served, scheduler
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.served.name}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "evomerge"}

    async def completions(self, body: CompletionRequest) -> Any:
        self._check_model(body.model)
        if body.echo and body.stream:
            raise APIError(400, "echo with stream is not supported; drop one of them", param="echo")
        items = _prompt_items(body.prompt)
        if len(items) * body.choices_per_prompt > MAX_CHOICES:
            raise APIError(
                400,
                f"{len(items)} prompts x n={body.choices_per_prompt} asks for more than {MAX_CHOICES} "
                "sequences in one request; split it",
                param="n",
            )
        prompts = [self._encode_prompt(item) for item in items]
        budget = body.max_tokens if body.max_tokens is not None else 16
        for prompt in prompts:
            self._check_length(prompt, budget, param="prompt")
        jobs = self._jobs(
            body, prompts, budget, body.logprobs, echo=bool(body.echo and body.logprobs is not None)
        )
        if body.stream:
            return self._stream(body, jobs, prompts, chat=False)
        results = await self._run(jobs)
        choices = [
            self._completion_choice(body, index, prompts, result) for index, result in enumerate(results)
        ]
        return self._answer("text_completion", "cmpl", choices, prompts, results)

    async def chat(self, body: ChatRequest) -> Any:
        self._check_model(body.model)
        prompt = self._render_chat(body)
        room = self.served.context_length - len(prompt.ids) if self.served.context_length else 256
        budget = body.token_budget or max(1, room)  # no budget asked: up to the end of the context
        self._check_length(prompt, budget, param="messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        jobs = self._jobs(body, [prompt], budget, top, echo=False)
        if body.stream:
            return self._stream(body, jobs, [prompt], chat=True)
        results = await self._run(jobs)
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": {"content": self._chat_logprobs(result.tokens)} if top is not None else None,
                "finish_reason": result.finish_reason,
            }
            for index, result in enumerate(results)
        ]
        return self._answer("chat.completion", "chatcmpl", choices, [prompt], results)

    # -- checks and inputs -------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.served.name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.served.name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _check_length(self, prompt: _Prompt, budget: int, *, param: str) -> None:
        if not prompt.ids:
            raise APIError(400, "the prompt encodes to no token at all; give a non-empty prompt", param=param)
        limit = self.served.context_length
        if limit is None:
            return
        if len(prompt.ids) > limit or (budget > 0 and len(prompt.ids) >= limit):
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt is {len(prompt.ids)} "
                f"tokens{' (no room left to generate)' if len(prompt.ids) == limit else ''}; shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )

    def _encode_prompt(self, item: str | list[int]) -> _Prompt:
        tokenizer = self.served.tokenizer
        if isinstance(item, list):
            if any(not 0 <= token < len(tokenizer) for token in item):
                raise APIError(400, f"prompt holds token ids outside 0..{len(tokenizer) - 1}", param="prompt")
            return _Prompt(self.served.engine.decode(item), item, self._decoded_offsets(item, 0))
        try:
            encoded = tokenizer(item, return_offsets_mapping=True)
            offsets = [start for start, _ in encoded["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
            encoded = tokenizer(item)
            offsets = self._decoded_offsets(list(encoded["input_ids"]), 0)
        return _Prompt(item, list(encoded["input_ids"]), offsets)

    def _render_chat(self, body: ChatRequest) -> _Prompt:
        template = self.served.chat_template
        if template is None:
            raise APIError(
                400,
                f"model {self.served.name!r} has no chat template (its tokenizer defines none), so chat "
                "requests cannot be formatted; restart the server with --chat-template FILE (a Jinja "
                "template), or use /v1/completions",
                param="messages",
                code="missing_chat_template",
            )
        messages = [{"role": message.role, "content": message.text} for message in body.messages]
        try:
            text = self.served.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except (
            Exception
        ) as error:  # a template that raises (e.g. on a role it refuses) is the request's fault
            raise APIError(
                400, f"the chat template failed on these messages: {error}", param="messages"
            ) from error
        ids = list(self.served.tokenizer(str(text), add_special_tokens=False)["input_ids"])
        return _Prompt(str(text), ids, self._decoded_offsets(ids, 0))

    def _jobs(
        self, body: Any, prompts: list[_Prompt], budget: int, top: int | None, *, echo: bool
    ) -> list[Job]:
        """n jobs per prompt, each with its own seed drawn from the request's (or a random) seed."""
        base = body.seed if body.seed is not None else secrets.randbits(63)
        n = body.choices_per_prompt
        temperature = 1.0 if body.temperature is None else body.temperature
        return [
            Job(
                prompt_ids=prompt.ids,
                max_tokens=budget,
                temperature=temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=_choice_seed(base, index),
                stop=body.stops,
                top_logprobs=top,
                echo_logprobs=echo,
            )
            for index, prompt in enumerate(p for p in prompts for _ in range(n))
        ]

    async def _run(self, jobs: list[Job]) -> list[Generated]:
        return await self.scheduler.submit(jobs)

    # -- answers ------------------------------------------------------------------------------------

    def _answer(
        self,
        kind: str,
        prefix: str,
        choices: list[dict[str, Any]],
        prompts: list[_Prompt],
        results: list[Generated],
    ) -> Response:
        """The answer as a JSONResponse: plain JSON types already, so FastAPI's encoder is skipped."""
        from fastapi.responses import JSONResponse

        body = {
            "id": f"{prefix}-{secrets.token_hex(12)}",
            "object": kind,
            "created": int(time.time()),
            "model": self.served.name,
            "choices": choices,
            "usage": _usage(prompts, results),
        }
        return JSONResponse(body)

    def _completion_choice(
        self,
        body: CompletionRequest,
        index: int,
        prompts: list[_Prompt],
        result: Generated,
    ) -> dict[str, Any]:
        """Choice `index` (prompt index // n) in the completions shape; with echo, the prompt comes first."""
        prompt = prompts[index // body.choices_per_prompt]
        text, logprobs = result.text, None
        start = len(prompt.text) if body.echo else 0
        if body.logprobs is not None:
            logprobs = self._legacy_logprobs(result.tokens, self._decoded_offsets(result.token_ids, start))
            if body.echo:
                echoed = self._legacy_logprobs(result.prompt_logprobs or [], prompt.offsets, prompt.ids)
                logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
        if body.echo:
            text = prompt.text + text
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": result.finish_reason}

    def _legacy_logprobs(
        self, tokens: Sequence[TokenLogprob | None], offsets: list[int], ids: Sequence[int] | None = None
    ) -> dict[str, list[Any]]:
        """The completions API's logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        ids = ids if ids is not None else [t.token_id for t in tokens if t is not None]
        return {
            "tokens": [self._text_of(token) for token in ids],
            "token_logprobs": [t.logprob if t is not None else None for t in tokens],
            "top_logprobs": [
                {self._text_of(i): v for i, v in t.top} if t is not None and t.top else None for t in tokens
            ],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._text_of(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in tokens
        ]

    def _text_of(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = str(self.served.tokenizer.decode([token_id]))
        return self._token_text[token_id]

    def _decoded_offsets(self, ids: Sequence[int], start: int) -> list[int]:
        """Where each token starts in the decoded text of `ids`, shifted by `start`."""
        decode = self.served.engine.decode
        return [start + len(decode(ids[:index])) for index in range(len(ids))]

    # -- streaming ----------------------------------------------------------------------------------

    def _stream(self, body: Any, jobs: list[Job], prompts: list[_Prompt], *, chat: bool) -> Any:
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self._events(body, jobs, prompts, chat=chat), media_type="text/event-stream")

    async def _events(
        self, body: Any, jobs: list[Job], prompts: list[_Prompt], *, chat: bool
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per new token, a last chunk per choice with its finish_reason."""
        import asyncio

        loop, events = asyncio.get_running_loop(), asyncio.Queue[tuple[int, TokenLogprob] | None]()

        def listener(index: int) -> Callable[[TokenLogprob], None]:
            def on_token(info: TokenLogprob) -> None:  # in the worker thread: hand over to the event loop
                loop.call_soon_threadsafe(events.put_nowait, (index, info))

            return on_token

        for index, job in enumerate(jobs):
            job.on_token = listener(index)
        task = asyncio.ensure_future(self._run(jobs))
        task.add_done_callback(lambda _: events.put_nowait(None))  # after every token already queued
        chunk = _ChunkMaker(self, body, chat=chat)
        if chat:
            for index in range(len(jobs)):
                yield chunk.sse(index, "", role=True)
        streams = [_TextStream(self.served.engine, job.stop) for job in jobs]
        while (event := await events.get()) is not None:
            index, info = event
            yield chunk.sse(index, streams[index].push(info.token_id), token=info)
        try:
            results = task.result()
        except Exception as error:  # the answer has begun: the error goes in the stream
            failure = APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")
            yield f"data: {json.dumps(failure.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        for index, result in enumerate(results):
            yield chunk.sse(index, streams[index].finish(result.text), finish=result.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk.usage(_usage(prompts, results))
        yield "data: [DONE]\n\n"


class _TextStream:
    """The text of one choice released as its tokens arrive; the pieces add up to the final text."""

    def __init__(self, engine: Engine, stops: Sequence[str]) -> None:
        self.engine, self.stops = engine, stops
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.engine.decode(self.ids)
        cut = find_stop(text, self.stops)
        visible = text[:cut] if cut >= 0 else text[: len(text) - held_back(text, self.stops)]
        return self._release(visible)

    def finish(self, final_text: str) -> str:
        return self._release(final_text)

    def _release(self, visible: str) -> str:
        if not visible.startswith(self.sent) or len(visible) <= len(self.sent):
            return ""
        delta, self.sent = visible[len(self.sent) :], visible
        return delta


class _ChunkMaker:
    """SSE lines in the streaming shapes of the completions and chat APIs."""

    def __init__(self, api: _Api, body: Any, *, chat: bool) -> None:
        self.api, self.body, self.chat = api, body, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}

    def sse(
        self, index: int, text: str, *, token: TokenLogprob | None = None, finish: str | None = None,
        role: bool = False,
    ) -> str:  # fmt: skip
        choice: dict[str, Any] = {
            "index": index,
            "finish_reason": finish,
            "logprobs": self._logprobs(index, token),
        }
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text
        return self._line({"choices": [choice]})

    def usage(self, usage: dict[str, int]) -> str:
        return self._line({"choices": [], "usage": usage})

    def _logprobs(self, index: int, token: TokenLogprob | None) -> Any:
        if token is None or self.body.logprobs in (None, False):
            return None
        if self.chat:
            return {"content": self.api._chat_logprobs([token])}
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + len(self.api.served.engine.decode([token.token_id]))  # as non-streamed
        return self.api._legacy_logprobs([token], [offset])

    def _line(self, payload: dict[str, Any]) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.api.served.name,
            **payload,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions request: one string, strings, one token-id list, or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _usage(prompts: list[_Prompt], results: list[Generated]) -> dict[str, int]:
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    completion_tokens = sum(len(result.tokens) for result in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice_seed(base: int, index: int) -> int:
    """A distinct, reproducible seed for choice `index` of a request seeded with `base`."""
    return (base * 6364136223846793005 + index * 1442695040888963407 + 1) % 2**63
