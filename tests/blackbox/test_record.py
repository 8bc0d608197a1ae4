"""Recording: faults give the fault-free answers, a budget stop leaves the cache consistent and resumes,
replay-only fails on a miss, and bad members are named before anything is evolved."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.blackbox.stubs import reverse_expert, stub_config, upper_expert, write_tasks
from tests.eval.endpoint_stub import FaultyEndpoint

from evomerge.blackbox.config import BlackBoxConfig, check_config
from evomerge.blackbox.evolve import RESULT_NAME, evolve
from evomerge.blackbox.record import CacheMissError, record
from evomerge.errors import ConfigError
from evomerge.eval.endpoint import EndpointError
from evomerge.serve.server import serve_in_thread


@contextlib.contextmanager
def stubs(
    plans: dict[str, list[str]] | None = None, seen: list[FaultyEndpoint] | None = None, **options: Any
) -> Iterator[dict[str, str]]:
    """Two rule-answering stub members ("upper", "reverse"); `seen` collects the stub objects."""
    plans = plans or {}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, rule in (("upper", upper_expert), ("reverse", reverse_expert)):
            stub = FaultyEndpoint(plans.get(name, []), answer=rule, **options)
            if seen is not None:
                seen.append(stub)
            urls[name] = stack.enter_context(serve_in_thread(stub.app()))
        yield urls


def _answers(cache: Path) -> dict[str, str]:
    with sqlite3.connect(cache) as db:
        return {
            key: json.loads(text)["text"] for key, text in db.execute("SELECT key, response FROM responses")
        }


def _config(urls: dict[str, str], tmp: Path, **extra: Any) -> BlackBoxConfig:
    return BlackBoxConfig.from_dict(stub_config(urls, write_tasks(tmp / "tasks"), tmp, **extra))


@pytest.mark.slow
def test_faults_give_the_fault_free_answers_and_result(tmp_path: Path) -> None:
    with stubs() as urls:
        clean = _config(urls, tmp_path / "clean")
        assert record(clean).complete
    # 20% of each member's 30 requests fail: 429 with Retry-After, 500, dropped, too slow (then retried).
    plan = [a for fault in ("429", "500", "drop", "slow", "429", "500") for a in ["ok"] * 4 + [fault]]
    seen: list[FaultyEndpoint] = []
    with stubs({"upper": plan, "reverse": plan[::-1]}, seen, retry_after="0", slow_s=1.5) as urls:
        faulty = _config(urls, tmp_path / "faulty")
        report = record(faulty)
    for stub in seen:  # every kind of fault was met, and each fault cost one more attempt
        faults = [fault for _, fault in stub.attempts if fault != "ok"]
        assert sorted(set(faults)) == ["429", "500", "drop", "slow"] and len(faults) >= 5
        assert len(stub.attempts) == 24 + len(faults)
    assert report.complete and not any(m.failures for m in report.members.values())
    clean_answers, faulty_answers = _answers(clean.cache), _answers(faulty.cache)
    assert len(clean_answers) == 2 * 2 * 12  # members x splits x prompts
    # The keys differ (they hold each stub's ephemeral port); the answers may not.
    assert sorted(clean_answers.values()) == sorted(faulty_answers.values())
    evolve(clean)
    evolve(faulty)
    rows = [json.loads((c.out / RESULT_NAME).read_text())["rows"] for c in (clean, faulty)]
    assert rows[0] == rows[1]
    assert (
        rows[0]["evolved"]["test"]
        == 1.0
        > max(rows[0]["member upper"]["test"], rows[0]["member reverse"]["test"])
    )


def test_budget_stop_leaves_cache_consistent_and_record_resumes(tmp_path: Path) -> None:
    with stubs() as urls:
        stopped = _config(urls, tmp_path, record_budget={"max_calls": 7})
        report = record(stopped)
        assert report.stopped_by == "max_calls" and not report.complete
        with sqlite3.connect(stopped.cache) as db:
            rows = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            calls = db.execute("SELECT SUM(calls) FROM ledger").fetchone()[0]
        assert rows == calls == 7
        with pytest.raises(CacheMissError, match="record"):
            evolve(stopped)  # refused before any evolving: the cache is incomplete
        resumed = record(_config(urls, tmp_path))
        assert resumed.complete and sum(m.spent.calls for m in resumed.members.values()) == 48 - 7
        assert sum(m.hits for m in resumed.members.values()) == 7
        with pytest.raises(CacheMissError):
            record(_config(urls, tmp_path / "other"), replay_only=True)


def test_cost_budget_needs_every_price(tmp_path: Path) -> None:
    data = stub_config(
        {"a": "http://127.0.0.1:9/v1", "b": "http://127.0.0.1:9/v1"}, write_tasks(tmp_path), tmp_path
    )
    del data["members"][1]["price_output"]
    config = BlackBoxConfig.from_dict({**data, "record_budget": {"max_cost": 1.0}})
    with pytest.raises(ConfigError, match=r"member.* b: no price"):
        check_config(config)


def test_logprob_operators_refuse_members_without_logprobs(tmp_path: Path) -> None:
    data = stub_config(
        {"a": "http://127.0.0.1:9/v1", "b": "http://127.0.0.1:9/v1"}, write_tasks(tmp_path), tmp_path
    )
    data["members"][0]["logprobs"] = True
    config = BlackBoxConfig.from_dict({**data, "combine": {"operators": ["vote", "pool"]}})
    with pytest.raises(ConfigError, match=r"member.* b give no log-probabilities.*pool"):
        check_config(config)


def test_member_that_claims_logprobs_and_gives_none_is_named(tmp_path: Path) -> None:
    with stubs() as urls:
        data = stub_config(urls, write_tasks(tmp_path), tmp_path)
        data["members"][0]["logprobs"] = True
        with pytest.raises(EndpointError, match=r"member 'upper'.*no log-probabilities"):
            record(BlackBoxConfig.from_dict(data))


def test_unreachable_endpoint_is_named(tmp_path: Path) -> None:
    with stubs() as urls:
        urls = {**urls, "reverse": "http://127.0.0.1:9/v1"}  # nothing listens on port 9
        with pytest.raises(EndpointError, match=r"member 'reverse'.*unreachable"):
            record(_config(urls, tmp_path))


def test_refused_key_is_named(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def refuse() -> Any:
        error = {"error": {"message": "bad key", "type": "auth", "param": None, "code": None}}
        return JSONResponse(error, status_code=401)

    with (
        stubs() as urls,
        serve_in_thread(app) as locked,
        pytest.raises(EndpointError, match=r"member 'upper'.*key was refused"),
    ):
        record(_config({**urls, "upper": locked}, tmp_path))


def test_money_budget_stops_and_the_ledger_matches_the_cache(tmp_path: Path) -> None:
    with stubs() as urls:
        config = _config(urls, tmp_path, record_budget={"max_cost": 1e-5})  # a call costs 2e-6
        report = record(config)
    assert report.stopped_by == "max_cost" and not report.complete
    with sqlite3.connect(config.cache) as db:
        rows = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        calls, cost = db.execute("SELECT SUM(calls), SUM(cost) FROM ledger").fetchone()
    spent = sum(m.spent.cost for m in report.members.values())
    assert rows == calls >= 5 and cost == pytest.approx(spent) == pytest.approx(2e-6 * rows)


def test_samples_at_temperature_are_keyed_and_seeded_by_index(tmp_path: Path) -> None:
    seeds: list[int] = []

    def answer(body: dict[str, Any]) -> str:
        seeds.append(body["seed"])
        return f"s{body['seed']}"

    with serve_in_thread(FaultyEndpoint(answer=answer).app()) as one, stubs() as urls:
        data = stub_config({"sampler": one, "upper": urls["upper"]}, write_tasks(tmp_path / "t"), tmp_path)
        data["members"][1]["endpoint"]["model"] = "upper"
        config = BlackBoxConfig.from_dict({**data, "sampling": {"temperature": 0.7, "samples": 3}})
        report = record(config)
    assert report.complete and report.planned == 2 * 24 * 3  # members x prompts x samples
    assert sorted(set(seeds)) == [0, 1, 2] and len(seeds) == 24 * 3
    assert len(_answers(config.cache)) == 2 * 24 * 3  # one row per sample: the index is in the key
