"""`blackbox serve RUN_DIR`: the run's best combination as one OpenAI-compatible model.

POST /v1/completions answers with the combination's choice, asking a member only when the operator reads
its answer (a router: the routed member and the confidence member; a cascade: members cheapest first
until one is confident; a vote or pool: the members it weighs; an aggregate: its proposers and the
aggregator). Each member is asked as `record` asks it (the same request, so a recorded prompt is
answered from the cache with no call, and a new answer is cached). GET /v1/models lists the one model.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from evomerge.blackbox.cache import Response, ResponseCache, request_key
from evomerge.blackbox.combine import EXPORT_NAME, Combination, Prompt, answer, proposers_of
from evomerge.blackbox.config import BlackBoxConfig, MemberConfig
from evomerge.blackbox.evolve import CONFIG_NAME, RESULT_NAME
from evomerge.blackbox.record import ask, base_request, max_tokens, open_clients, render
from evomerge.errors import ConfigError
from evomerge.extras import import_extra


def load_combination(run_dir: Path) -> tuple[BlackBoxConfig, Combination]:
    """The config and the combination to serve: a run's best (RUN_DIR/result.json) or an exported elite
    (OUT_DIR/combination.json, from `evomerge export RUN_DIR OUT_DIR --elite ID`); ConfigError when the
    dir holds neither."""
    config_path, result_path = Path(run_dir) / CONFIG_NAME, Path(run_dir) / RESULT_NAME
    exported = Path(run_dir) / EXPORT_NAME
    if config_path.is_file() and exported.is_file():
        config = BlackBoxConfig.from_yaml(config_path)
        return config, _combination(exported.read_text(), config, where=str(exported))
    if not config_path.is_file() or not result_path.is_file():
        raise ConfigError(
            f"{run_dir}: no {CONFIG_NAME} with {RESULT_NAME} (a finished run) or {EXPORT_NAME} (an exported "
            "elite); run `evomerge blackbox evolve CONFIG` first"
        )
    best = json.loads(result_path.read_text())["best"]
    if best is None:
        raise ConfigError(f"{run_dir}: the run has no successful evaluation to serve")
    config = BlackBoxConfig.from_yaml(config_path)
    return config, _combination(best, config, where=f"{result_path} (best)")


def _combination(text: str, config: BlackBoxConfig, *, where: str) -> Combination:
    """`text` as a combination of `config`'s members; ConfigError naming `where` when it is not one."""
    try:
        combination = Combination.from_text(text)
    except (ValueError, TypeError) as error:  # not JSON, or not a combination's fields
        raise ConfigError(
            f"{where}: not a combination ({error}); write it again with `evomerge export RUN_DIR OUT_DIR "
            "--elite ID` or `evomerge blackbox evolve CONFIG`"
        ) from None
    if len(combination.vote) != len(config.members):
        raise ConfigError(
            f"{where}: a combination of {len(combination.vote)} members, but {CONFIG_NAME} beside it lists "
            f"{len(config.members)}; export the combination with the config of the run it came from"
        )
    return combination


class LazyAnswers(Sequence[Sequence[Response]]):
    """`answers[m]`: member m's k samples, asked on first read (so a member the operator never reads is
    never asked); `asked` lists the members read, in order."""

    def __init__(self, n: int, fetch: Callable[[int], list[Response]]) -> None:
        self._n, self._fetch = n, fetch
        self._got: dict[int, list[Response]] = {}
        self.asked: list[int] = []

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, m: int) -> list[Response]:  # type: ignore[override]
        if not isinstance(m, int) or not -self._n <= m < self._n:
            raise IndexError(m)
        m %= self._n
        if m not in self._got:
            self._got[m] = self._fetch(m)
            self.asked.append(m)
        return self._got[m]


class CombinationModel:
    """Answers prompts with the combination, members reached through their clients and the cache."""

    def __init__(
        self, config: BlackBoxConfig, combination: Combination, clients: dict[str, Any], cache: ResponseCache
    ) -> None:
        self.config, self.combination, self.clients, self.cache = config, combination, clients, cache
        self.budget = max_tokens(config)

    def complete(self, text: str) -> str:
        return self.choose(text)[0]

    def choose(self, text: str) -> tuple[str, list[int]]:
        """The combination's answer to `text`, and the members whose answers it read (in order)."""
        k = self.config.sampling.k
        answers = LazyAnswers(
            len(self.config.members), lambda m: [self._answer(m, text, s) for s in range(k)]
        )
        spec = self.config.combine.embedding
        embedding: tuple[float, ...] = ()
        if spec is not None:
            from evomerge.blackbox.embed import embed_prompts

            embedding = tuple(float(v) for v in embed_prompts(spec, [text])[0])
        prompt = Prompt(text, answers, embedding=embedding)
        if self.combination.operator == "aggregate":  # ask the chosen aggregation only
            c = self.combination
            slot = (c.aggregator, c.template, proposers_of(c.proposers))
            member = self.config.members[c.aggregator]
            filled = render(
                self.config.combine.templates[c.template], text, [answers[m][0].text for m in slot[2]]
            )
            request = {**base_request(self.config, member, filled, 0, self.budget), "operator": "aggregate"}
            prompt.aggregated[slot] = self._ask(member, request, request_key(member.identity(), request))
        return answer(self.config, self.combination, prompt).text, list(answers.asked)

    def _answer(self, m: int, text: str, sample: int) -> Response:
        member = self.config.members[m]
        request = base_request(self.config, member, text, sample, self.budget)
        return self._ask(member, request, request_key(member.identity(), request))

    def _ask(self, member: MemberConfig, request: dict[str, Any], key: str) -> Response:
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        response = ask(member, self.clients[member.name], request)
        cost = member.cost(response.input_tokens, response.output_tokens)
        self.cache.put(key, member.name, request, response, cost)
        return response


def create_combination_app(run_dir: Path, *, name: str = "blackbox") -> Any:
    """The FastAPI app serving the run's combination as model `name`."""
    fastapi = import_extra("fastapi", who="evomerge blackbox serve", extra="serve")
    from fastapi.responses import JSONResponse

    config, combination = load_combination(run_dir)
    state: dict[str, CombinationModel] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        with ResponseCache(config.cache) as cache, open_clients(config, config.models) as clients:
            state["model"] = CombinationModel(config, combination, clients, cache)
            yield

    app = fastapi.FastAPI(title="evomerge blackbox serve", lifespan=lifespan)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "evomerge"}],
        }

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if (
            body.get("model") != name
            or not isinstance(prompts, list)
            or not all(isinstance(p, str) for p in prompts)
        ):
            error = f"expected model {name!r} and a prompt string or list of strings"
            return JSONResponse(
                {"error": {"message": error, "type": "invalid_request_error", "param": None, "code": None}},
                status_code=400,
            )
        texts = [state["model"].complete(p) for p in prompts]
        choices = [
            {"index": i, "text": t, "finish_reason": "stop", "logprobs": None} for i, t in enumerate(texts)
        ]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return {"id": "blackbox", "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": usage}  # fmt: skip

    return app
