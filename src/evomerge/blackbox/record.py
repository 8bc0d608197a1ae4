"""`record`: ask every member every dev and test prompt once (k samples), into the response cache.

What is already cached is never asked again, so a second `record` is free and an interrupted one (killed,
or stopped by its budget) resumes where it stopped. A request that fails after the client's retries is
not cached and is reported with its member; a refusal no retry mends (wrong key, unknown model, a member
that should give log-probabilities and gives none) stops the whole record with the member named.
Local model dirs are served in-process by `evomerge serve`'s app for the duration, so every member is
reached the same way, through the `openai` client.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from evomerge.blackbox.cache import Response, ResponseCache, Spend, request_key
from evomerge.blackbox.config import BlackBoxConfig, MemberConfig
from evomerge.errors import EvomergeError
from evomerge.eval.endpoint import EndpointClient, EndpointError, EndpointSpec
from evomerge.eval.tasks import Task, load_task

SPLITS = ("dev", "test")


class CacheMissError(EvomergeError):
    """Replay-only mode met a request the cache does not hold."""


@dataclass(frozen=True)
class Planned:
    """One request to a member: where it comes from (split, task, example, sample) and its cache key."""

    member: str
    split: str
    task: str
    example: int
    sample: int
    request: dict[str, Any]
    key: str


@dataclass
class MemberReport:
    """One member in one `record`: new calls and their bill, cache hits and what they would have cost."""

    spent: Spend = field(default_factory=Spend)
    hits: int = 0
    hit_value: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass
class RecordReport:
    members: dict[str, MemberReport]
    planned: int
    missing_after: int
    stopped_by: str | None = None  # "max_calls", "max_tokens", "max_cost" when the budget stopped it

    @property
    def complete(self) -> bool:
        return self.missing_after == 0


def load_split(config: BlackBoxConfig, split: str) -> list[Task]:
    """The config's tasks, from their `split` files ("dev" or "test")."""
    return [
        load_task(getattr(t, split), metric="exact_match", name=t.task_name, weight=t.weight)
        for t in config.tasks
    ]


def max_tokens(config: BlackBoxConfig) -> int:
    """The answer budget: sampling.max_tokens, else the longest reference answer (any split) + 2."""
    if config.sampling.max_tokens is not None:
        return config.sampling.max_tokens
    answers = [len(e.answer) for split in SPLITS for t in load_split(config, split) for e in t.examples]
    return max(answers, default=1) + 2


def plan(config: BlackBoxConfig) -> list[Planned]:
    """Every request of the config: members x splits x tasks x examples x samples, in that order."""
    budget = max_tokens(config)
    tasks = {split: load_split(config, split) for split in SPLITS}
    planned = []
    for member in config.members:
        identity = member.identity()
        for split, task_list in tasks.items():
            for task in task_list:
                for index, example in enumerate(task.examples):
                    for sample in range(config.sampling.k):
                        request = base_request(config, member, example.prompt, sample, budget)
                        key = request_key(identity, request)
                        planned.append(Planned(member.name, split, task.name, index, sample, request, key))
    return planned


def base_request(
    config: BlackBoxConfig, member: MemberConfig, prompt: str, sample: int, budget: int
) -> dict[str, Any]:
    """What `record` sends a member for one prompt and sample (the cache key hashes all of it)."""
    sampling = config.sampling
    return {
        "prompt": prompt, "max_tokens": budget, "temperature": sampling.temperature, "stop": sampling.stop,
        "sample": sample, "top_logprobs": sampling.top_logprobs if member.logprobs else None,
    }  # fmt: skip


# --- propose-then-aggregate: the only operator that makes calls of its own -----------------------------
Slot = tuple[int, int, tuple[int, ...]]  # (aggregator member, template, proposer members)


def proposer_sets(members: int) -> list[tuple[int, ...]]:
    """Every non-empty set of members, smallest first."""
    sets = [tuple(m for m in range(members) if mask >> m & 1) for mask in range(1, 1 << members)]
    return sorted(sets, key=lambda s: (len(s), s))


def render(template: str, prompt: str, proposals: Sequence[str]) -> str:
    """The aggregator's prompt: the template with one proposal a line and the original prompt."""
    lines = "\n".join(f"- {proposal}" for proposal in proposals)
    return template.replace("{proposals}", lines).replace("{prompt}", prompt)


def aggregate_requests(
    config: BlackBoxConfig, prompt: str, greedy: Sequence[str], budget: int
) -> list[tuple[Slot, MemberConfig, dict[str, Any], str]]:
    """Every aggregation of `prompt` (members' greedy answers `greedy`): slot, aggregator, request, key.

    The request is marked `operator: aggregate`, so it is cached under its own key."""
    out = []
    for a, member in enumerate(config.members):
        for t, template in enumerate(config.combine.templates):
            for proposers in proposer_sets(len(config.members)):
                text = render(template, prompt, [greedy[m] for m in proposers])
                request = {**base_request(config, member, text, 0, budget), "operator": "aggregate"}
                out.append(((a, t, proposers), member, request, request_key(member.identity(), request)))
    return out


def aggregate_plan(
    config: BlackBoxConfig, cache: ResponseCache, base: list[Planned]
) -> tuple[list[Planned], int]:
    """The aggregations whose proposals are all recorded, and how many more wait for missing proposals."""
    greedy: dict[tuple[str, str, int], dict[str, Planned]] = {}
    for p in base:
        if p.sample == 0:
            greedy.setdefault((p.split, p.task, p.example), {})[p.member] = p
    budget, planned, waiting = max_tokens(config), [], 0
    per_prompt = len(config.members) * len(config.combine.templates) * ((1 << len(config.members)) - 1)
    for (split, task, example), by_member in greedy.items():
        answers = [cache.get(by_member[name].key) for name in config.models]
        if any(answer is None for answer in answers):
            waiting += per_prompt
            continue
        prompt = by_member[config.models[0]].request["prompt"]
        texts = [answer.text for answer in answers if answer is not None]
        for _, member, request, key in aggregate_requests(config, prompt, texts, budget):
            planned.append(Planned(member.name, split, task, example, 0, request, key))
    return planned, waiting


class _Budget:
    """The record budget, shared by the calling threads: calls are reserved before they start; tokens and
    cost are counted when answers come (calls in flight when a limit is reached still finish and count)."""

    def __init__(self, config: BlackBoxConfig) -> None:
        self.limits = config.record_budget
        self.calls = self.tokens = 0
        self.cost = 0.0
        self.stopped_by: str | None = None
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        with self._lock:
            limits = self.limits
            for name, used, limit in (
                ("max_calls", self.calls, limits.max_calls),
                ("max_tokens", self.tokens, limits.max_tokens),
                ("max_cost", self.cost, limits.max_cost),
            ):
                if limit is not None and used >= limit:
                    self.stopped_by = self.stopped_by or name
                    return False
            self.calls += 1
            return True

    def settle(self, response: Response, cost: float) -> None:
        with self._lock:
            self.tokens += response.input_tokens + response.output_tokens
            self.cost += cost


def record(
    config: BlackBoxConfig, *, replay_only: bool = False, progress: Callable[[int, int], None] | None = None
) -> RecordReport:
    """Fill the cache with every planned answer still missing; see the module doc. `progress(done, total)`.

    With the aggregate operator, the aggregations are asked after the members' own answers (they hold them)."""
    planned = plan(config)
    budget = _Budget(config)
    with ResponseCache(config.cache) as cache:
        report = RecordReport({m.name: MemberReport() for m in config.members}, len(planned), 0)
        _record_phase(config, cache, planned, report, budget, replay_only, progress)
        waiting = 0
        if "aggregate" in config.combine.operators:
            aggregations, waiting = aggregate_plan(config, cache, planned)
            report.planned += len(aggregations) + waiting
            _record_phase(config, cache, aggregations, report, budget, replay_only, progress)
            planned = planned + aggregations
        done = cache.keys()
        report.missing_after = waiting + len([p for p in planned if p.key not in done])
    report.stopped_by = budget.stopped_by
    return report


def _record_phase(
    config: BlackBoxConfig,
    cache: ResponseCache,
    planned: list[Planned],
    report: RecordReport,
    budget: _Budget,
    replay_only: bool,
    progress: Callable[[int, int], None] | None,
) -> None:
    have = cache.keys()
    missing = [p for p in planned if p.key not in have]
    _count_hits(config, cache, [p for p in planned if p.key in have], report)
    if missing and replay_only:
        raise CacheMissError(_miss_message(missing))
    if missing:
        with open_clients(config, sorted({p.member for p in missing})) as clients:
            _call_all(config, cache, clients, missing, report, budget, progress)


def _count_hits(
    config: BlackBoxConfig, cache: ResponseCache, hits: list[Planned], report: RecordReport
) -> None:
    for planned in hits:
        response = cache.get(planned.key)
        assert response is not None
        member = report.members[planned.member]
        member.hits += 1
        member.hit_value += config.member(planned.member).cost(response.input_tokens, response.output_tokens)


def _miss_message(missing: list[Planned]) -> str:
    counts: dict[str, int] = {}
    for planned in missing:
        counts[planned.member] = counts.get(planned.member, 0) + 1
    listed = ", ".join(f"{member}: {count}" for member, count in counts.items())
    return (
        f"replay-only: the cache lacks {len(missing)} answer(s) ({listed}); run `evomerge blackbox record "
        "CONFIG` without --replay-only to ask for them"
    )


def _call_all(
    config: BlackBoxConfig,
    cache: ResponseCache,
    clients: dict[str, EndpointClient],
    missing: list[Planned],
    report: RecordReport,
    budget: _Budget,
    progress: Callable[[int, int], None] | None,
) -> None:
    workers = sum(client.spec.max_concurrency for client in clients.values())
    refusal: EndpointError | None = None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {
            pool.submit(_call_one, config.member(p.member), clients[p.member], cache, p, budget): p
            for p in missing
        }
        for done, future in enumerate(as_completed(futures), 1):
            planned = futures[future]
            try:
                answered = future.result()
            except EndpointError as error:  # a refusal: stop asking, report it with the member named
                refusal = refusal or error
                for other in futures:
                    other.cancel()
                continue
            except Exception as error:  # failed after its retries: not cached, asked again next record
                report.members[planned.member].failures.append(f"{type(error).__name__}: {error}")
                continue
            if answered is not None:
                report.members[planned.member].spent.add(*answered)
            if progress is not None:
                progress(done, len(missing))
    if refusal is not None:
        raise refusal


def _call_one(
    member: MemberConfig, client: EndpointClient, cache: ResponseCache, planned: Planned, budget: _Budget
) -> tuple[Response, float] | None:
    """Ask one request (unless the budget is spent) and cache its answer; None when not asked."""
    if not budget.reserve():
        return None
    response = ask(member, client, planned.request)
    cost = member.cost(response.input_tokens, response.output_tokens)
    cache.put(planned.key, planned.member, planned.request, response, cost)
    budget.settle(response, cost)
    return response, cost


def ask(member: MemberConfig, client: EndpointClient, request: dict[str, Any]) -> Response:
    """One request to a member through the openai client, as a Response (text cut at the stop strings)."""
    top = request["top_logprobs"]
    params: dict[str, Any] = {
        "max_tokens": request["max_tokens"], "temperature": request["temperature"], "stop": request["stop"],
    }  # fmt: skip
    if request["temperature"] > 0:
        params["seed"] = request["sample"]
    if client.spec.api == "chat":
        if top is not None:
            params |= {"logprobs": True, "top_logprobs": top}
        raw = client.chat(messages=[{"role": "user", "content": request["prompt"]}], **params)
        response = _from_chat(raw)
    else:
        if top is not None:
            params["logprobs"] = top
        raw = client.complete(prompt=request["prompt"], **params)
        response = _from_completion(raw)
    if top is not None and not response.has_logprobs:
        raise EndpointError(
            f"member {member.name!r}: its answer held no log-probabilities; mark it `logprobs: false` in the "
            "config (the pool and cascade operators then cannot use it)"
        )
    return _cut(response, request["stop"])


def _from_completion(raw: Any) -> Response:
    choice = raw.choices[0]
    usage = raw.usage
    logprobs = choice.logprobs
    tokens, values, tops = [], [], []
    if logprobs is not None and logprobs.token_logprobs:
        tokens = list(logprobs.tokens or [])
        values = [float(v) for v in logprobs.token_logprobs]
        tops = [dict(top or {}) for top in (logprobs.top_logprobs or [])]
    return Response(
        choice.text or "", tokens, values, tops,
        usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
    )  # fmt: skip


def _from_chat(raw: Any) -> Response:
    choice = raw.choices[0]
    usage = raw.usage
    content = choice.logprobs.content if choice.logprobs is not None else None
    tokens = [item.token for item in content or []]
    values = [float(item.logprob) for item in content or []]
    tops = [{top.token: float(top.logprob) for top in item.top_logprobs or []} for item in content or []]
    return Response(
        choice.message.content or "", tokens, values, tops,
        usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
    )  # fmt: skip


def _cut(response: Response, stops: list[str]) -> Response:
    """The answer up to its first stop string (a server that ignores `stop` is cut here)."""
    text = response.text
    for marker in stops:
        text = text.split(marker, 1)[0] if marker else text
    if text == response.text:
        return response
    return Response(text, response.tokens, response.token_logprobs, response.top_logprobs,
                    response.input_tokens, response.output_tokens)  # fmt: skip


# --- members as clients ---------------------------------------------------------------------------------
@contextlib.contextmanager
def open_clients(config: BlackBoxConfig, names: list[str]) -> Iterator[dict[str, EndpointClient]]:
    """An EndpointClient per named member, each checked reachable; model dirs served in-process meanwhile."""
    with contextlib.ExitStack() as stack:
        clients = {}
        for name in names:
            member = config.member(name)
            spec = member.endpoint or stack.enter_context(_served(member))
            clients[name] = EndpointClient(spec)
            stack.callback(clients[name].close)
            check_reachable(name, clients[name])
        yield clients


@contextlib.contextmanager
def _served(member: MemberConfig) -> Iterator[EndpointSpec]:
    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    assert member.model_dir is not None
    served = load_served_model(member.model_dir, name=member.name)
    with serve_in_thread(create_app(served)) as url:
        yield EndpointSpec(base_url=url, model=member.name, max_concurrency=4)


def check_reachable(name: str, client: EndpointClient) -> None:
    """GET /models once, quickly: EndpointError naming the member when the endpoint is down, refuses the
    key or does not serve the model. An endpoint without /models (404) is given the benefit of the doubt."""
    import openai

    spec = client.spec
    where = f"member {name!r} (endpoint {spec.base_url}, model {spec.model!r})"
    quick = client.client.with_options(max_retries=1, timeout=min(10.0, spec.timeout_s))
    try:
        served = [model.id for model in quick.models.list()]
    except openai.NotFoundError:
        return
    except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
        variable = spec.api_key_env or "(none: set endpoint.api_key_env)"
        raise EndpointError(f"{where}: the key was refused ({error}); check the key in {variable}") from None
    except openai.APIConnectionError as error:
        raise EndpointError(f"{where}: unreachable ({error}); is the server running at that URL?") from None
    if served and spec.model not in served:
        raise EndpointError(f"{where}: the endpoint serves {served}, not {spec.model!r}; fix endpoint.model")
