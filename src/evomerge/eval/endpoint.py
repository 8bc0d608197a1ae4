"""OpenAI-compatible endpoints as models: the client, the model view the metrics need, and its evaluator.

Three layers, each usable alone (the black-box combination builds on the first two):
- `EndpointSpec`: where a member lives (base URL, model name, API-key variable, concurrency cap, timeout,
  retries); a pydantic model, so a config block can hold it.
- `EndpointClient`: the official `openai` client with that timeout and its retries (exponential backoff
  with jitter, honouring `Retry-After`, on 408/409/429/5xx, timeouts and dropped connections), at most
  `max_concurrency` calls in flight across every thread that shares it, and `map` to fan calls out.
- `EndpointModel`: what the metrics ask of a model: greedy answers (completions, or chat) and the
  log-likelihood of a continuation (completions with `echo` and `logprobs`, the legacy way).

`EndpointEvaluator` scores an EndpointModel on the same tasks with the same metrics as `Evaluator` scores a
live model. A wrong key, an unknown model or an endpoint without prompt log-probabilities is a
configuration mistake (EndpointError); an endpoint that fails after its retries gives a failed result.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import ConfigError, EvaluationError
from evomerge.eval.evaluator import (
    choice_scores,
    combine_scores,
    exact_match_scores,
    mean_task_score,
    perplexity_score,
)
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.eval.tasks import CLASSIFIER_METRICS, Task
from evomerge.extras import import_extra

T = TypeVar("T")
R = TypeVar("R")
NO_KEY = "no-key"  # what the client sends when no key is configured (the openai client insists on one)


class EndpointError(EvaluationError):
    """An endpoint refused us for a reason retries cannot fix: key, model name, missing capability."""


class EndpointSpec(BaseModel):
    """An OpenAI-compatible endpoint and how to call it.

    `api_key_env` names the environment variable that holds the key (never the key itself, so configs and
    run stores hold no secret); None sends no real key (a local `evomerge serve` without --api-key).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="the model name the endpoint serves")
    api_key_env: str | None = None
    api: Literal["completions", "chat"] = "completions"  # how to ask for an answer
    max_concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)

    @field_validator("base_url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {url!r} (e.g. http://127.0.0.1:8000/v1)"
            )
        return url.rstrip("/")

    def api_key(self) -> str:
        """The key from `api_key_env`; ConfigError naming the variable when it is unset."""
        if self.api_key_env is None:
            return NO_KEY
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"endpoint {self.base_url} ({self.model}): environment variable {self.api_key_env} is not set; "
                f"export {self.api_key_env}=<your key>, or leave api_key_env out for an endpoint without a key"
            )
        return key


class EndpointClient:
    """The `openai` client for one endpoint, safe to share between threads, with a concurrency cap."""

    def __init__(self, spec: EndpointSpec, *, client: Any = None) -> None:
        openai = import_extra("openai", who="an endpoint (evomerge eval --endpoint)", extra="serve")
        self.spec = spec
        self.client = client or openai.OpenAI(
            base_url=spec.base_url,
            api_key=spec.api_key(),
            timeout=spec.timeout_s,
            max_retries=spec.max_retries,
        )
        self._slots = threading.BoundedSemaphore(spec.max_concurrency)
        self.calls = 0  # successful calls (each may have been retried inside the client)

    def complete(self, **params: Any) -> Any:
        """POST /completions with `params` (the model is filled in); retried by the client."""
        return self._call(self.client.completions.create, params)

    def chat(self, **params: Any) -> Any:
        """POST /chat/completions with `params` (the model is filled in); retried by the client."""
        return self._call(self.client.chat.completions.create, params)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`fn` over `items` on up to max_concurrency threads, results in order; the first error is raised."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.spec.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        self.client.close()

    def _call(self, create: Callable[..., Any], params: dict[str, Any]) -> Any:
        with self._slots:
            try:
                response = create(model=self.spec.model, **params)
            except Exception as error:
                refusal = _configuration_error(error, self.spec)
                if refusal is None:
                    raise
                raise refusal from error
        self.calls += 1
        return response


def _configuration_error(error: Exception, spec: EndpointSpec) -> EndpointError | None:
    """An EndpointError for refusals no retry mends (401, 403, 404), else None."""
    import openai

    where = f"endpoint {spec.base_url} model {spec.model!r}"
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        variable = spec.api_key_env or "(none: set api_key_env / --api-key-env)"
        return EndpointError(f"{where}: the key was refused ({error}); check the key in {variable}")
    if isinstance(error, openai.NotFoundError):
        return EndpointError(
            f"{where}: not found ({error}); check the URL and the model name (GET /v1/models)"
        )
    return None


class EndpointModel:
    """An endpoint seen as a model: greedy answers and continuation log-likelihoods."""

    def __init__(self, endpoint: EndpointSpec | EndpointClient) -> None:
        self.client = endpoint if isinstance(endpoint, EndpointClient) else EndpointClient(endpoint)

    @property
    def spec(self) -> EndpointSpec:
        return self.client.spec

    def generate(
        self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str] = ("\n",)
    ) -> list[str]:
        """The greedy answer to each prompt (temperature 0), cut at the first stop string."""
        return self.client.map(lambda prompt: self._answer(prompt, max_tokens, list(stop)), prompts)

    def continuation_logliks(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(summed log-likelihood in nats, scored tokens) of each continuation given its context."""
        return self.client.map(lambda pair: self._loglik(*pair), pairs)

    def _answer(self, prompt: str, max_tokens: int, stop: list[str]) -> str:
        if self.spec.api == "chat":
            response = self.client.chat(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                stop=stop,
            )
            text = response.choices[0].message.content or ""
        else:
            response = self.client.complete(prompt=prompt, max_tokens=max_tokens, temperature=0, stop=stop)
            text = response.choices[0].text or ""
        for marker in stop:  # a server that ignores `stop` is cut here, as the local evaluator cuts
            text = text.split(marker, 1)[0] if marker else text
        return text

    def _loglik(self, context: str, continuation: str) -> tuple[float, int]:
        if self.spec.api == "chat":
            raise EndpointError(_no_logprobs(self.spec, "the chat API returns no prompt log-probabilities"))
        prompt = context + continuation
        response = self.client.complete(prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0)
        logprobs = response.choices[0].logprobs
        if logprobs is None or not logprobs.token_logprobs or not logprobs.text_offset:
            raise EndpointError(_no_logprobs(self.spec, "its answer to an echo request held no logprobs"))
        return continuation_sum(logprobs.token_logprobs, logprobs.text_offset, len(context), len(prompt))


def continuation_sum(
    token_logprobs: Sequence[float | None], text_offsets: Sequence[int], start: int, end: int
) -> tuple[float, int]:
    """(sum, count) of the log-probabilities of the tokens that lie in text[start:end].

    A token counts when it begins at or after `start`, before `end`, and covers at least one character
    (a BOS shares its offset with the next token). Tokens without a log-probability (the first of the
    text: nothing precedes it) do not count, as the local evaluator does not score them either.
    """
    total, count = 0.0, 0
    n = min(len(token_logprobs), len(text_offsets))
    for index in range(n):
        begin = text_offsets[index]
        after = text_offsets[index + 1] if index + 1 < n else end
        logprob = token_logprobs[index]
        if start <= begin < end and after > begin and logprob is not None:
            total, count = total + float(logprob), count + 1
    return total, count


def _no_logprobs(spec: EndpointSpec, why: str) -> str:
    return (
        f"endpoint {spec.base_url} model {spec.model!r} cannot score choice_accuracy or perplexity: {why}. "
        "These metrics need prompt log-probabilities (/v1/completions with echo=true and logprobs=0, as "
        "`evomerge serve` and vLLM give); score this endpoint with exact_match only"
    )


class EndpointEvaluator:
    """Scores EndpointModels on tasks with the local Evaluator's metrics; `evaluate` as in Evaluator.

    `max_new_tokens=None` allows the longest reference answer's characters plus two: a token holds at
    least one character, so no answer is cut short (the local evaluator counts tokens instead).
    """

    def __init__(self, tasks: list[Task], *, max_new_tokens: int | None = None) -> None:
        classifier = [task.name for task in tasks if task.metric in CLASSIFIER_METRICS]
        if classifier:
            raise EvaluationError(
                f"tasks {classifier}: an endpoint is a language model; accuracy needs a classifier"
            )
        if not tasks:
            raise EvaluationError("EndpointEvaluator needs at least one task")
        self.tasks = list(tasks)
        answers = [len(e.answer) for t in tasks if t.metric == "exact_match" for e in t.examples]
        self.max_new_tokens = max_new_tokens or max(answers, default=1) + 2
        self.last_predictions: dict[str, list[str]] = {}

    def evaluate(self, model: EndpointModel) -> EvalResult:
        """Score `model`; EndpointError for a configuration mistake, a failed result for a failing endpoint."""
        start, calls = time.perf_counter(), model.client.calls
        behaviour: dict[str, float] = {}
        try:
            scores = {task.name: self._score(model, task, behaviour) for task in self.tasks}
            result = combine_scores(self.tasks, scores, behaviour)
        except EndpointError:
            raise
        except Exception as error:  # the endpoint failed after its retries: a failed result, not a crash
            result = EvalResult.failed(f"{type(error).__name__}: {error}")
        result.cost = {
            **result.cost,
            "wall_s": time.perf_counter() - start,
            "examples": float(sum(len(task.examples) for task in self.tasks)),
            "requests": float(model.client.calls - calls),
        }
        return result

    def _score(self, model: EndpointModel, task: Task, behaviour: dict[str, float]) -> TaskScore:
        examples = task.examples
        if task.metric == "exact_match":
            predictions = model.generate([e.prompt for e in examples], max_tokens=self.max_new_tokens)
            self.last_predictions[task.name] = predictions
            return mean_task_score(task, exact_match_scores(task, predictions))
        if task.metric == "perplexity":
            return perplexity_score(
                task, model.continuation_logliks([(e.prompt, e.answer) for e in examples]), behaviour
            )
        pairs = [(e.prompt, choice) for e in examples for choice in e.choices]
        logliks = [total for total, _ in model.continuation_logliks(pairs)]
        return mean_task_score(task, choice_scores(task, logliks))
