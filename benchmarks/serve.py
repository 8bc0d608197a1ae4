"""`evomerge serve` throughput and latency: batched serving against one request at a time, plus a load test.

Two servers run the same zoo model side by side, each as its own `evomerge serve` process: the batched one
(`--max-batch-size 32`) and the serial one (`--max-batch-size 1`: every request alone through the model).
Clients are the official `openai` async client in this process. For 1, 8 and 32 concurrent clients each
server answers the same greedy completions (the zoo task's prompts, 16 new tokens each by default); the script reports
requests per second and latency p50/p95 of both, and the ratio. The load test then sends 1,000 requests
from 32 concurrent clients to the batched server and checks every answer against the serial server's
answer to the same prompt. Writes benchmarks/results/serve.md.

    .venv/bin/python benchmarks/serve.py --model runs/demo/zoo/models/add --task runs/demo/zoo/tasks/add/dev.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from evomerge.eval.tasks import load_task

RESULTS = Path(__file__).parent / "results" / "serve.md"


def main() -> None:
    args = _parse()
    STOP[0] = args.stop.encode().decode("unicode_escape") if args.stop else None
    CLIENT[0] = args.client
    prompts = [example.prompt for example in load_task(args.task, metric="exact_match").examples]
    load_start = os.getloadavg()
    with _server(args, batch=args.max_batch_size) as batched, _server(args, batch=1) as serial:
        rows = []
        for clients in args.clients:
            count = max(args.requests, clients * 4)
            best: dict[str, dict[str, Any]] = {}
            for repeat in range(args.repeats):  # side by side, same prompts, the order alternating
                modes = [("serial", serial), ("batched", batched)]
                for name, url in modes if repeat % 2 == 0 else modes[::-1]:
                    stats = {
                        "mode": name,
                        "clients": clients,
                        **asyncio.run(_drive(url, prompts, count, clients, args.max_tokens)),
                    }
                    print(_row(stats), flush=True)
                    if name not in best or stats["rps"] > best[name]["rps"]:
                        best[name] = stats
            rows += [best["serial"], best["batched"]]
        reference = asyncio.run(_answers(serial, sorted(set(prompts)), 1, args.max_tokens))
        load = asyncio.run(_load(batched, prompts, reference, args))
    engine = _engine_only(args, prompts)
    _write(args, rows, load, load_start, len(set(prompts)), engine)
    print(f"load: {load}")
    if load["errors"] or load["mismatches"]:
        sys.exit("the load test failed: see benchmarks/results/serve.md")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("runs/demo/zoo/models/add"))
    parser.add_argument("--task", type=Path, default=Path("runs/demo/zoo/tasks/add/dev.jsonl"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="requests per (mode, clients) cell")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per cell, the order alternating; best kept"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--client", choices=["openai", "httpx"], default="openai")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--stop",
        default=None,
        help='a stop string, e.g. "\\n" (default: none, every answer runs to max_tokens or EOS)',
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--load-requests", type=int, default=1000)
    parser.add_argument("--load-clients", type=int, default=32)
    return parser.parse_args()


class _server:
    """`evomerge serve` in a subprocess on a free port; the base URL while it runs."""

    def __init__(self, args: argparse.Namespace, *, batch: int) -> None:
        self.args, self.batch = args, batch

    def __enter__(self) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-c", "from evomerge.cli import main; main()", "serve", str(self.args.model),
                   "--port", str(port), "--model-name", "zoo", "--max-batch-size", str(self.batch),
                   "--batch-wait-ms", str(self.args.batch_wait_ms), "--threads", "1"]  # fmt: skip
        self.process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return f"http://127.0.0.1:{port}/v1"
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.process.poll() is not None:
                raise RuntimeError("evomerge serve exited before it started")
        raise RuntimeError("evomerge serve did not start within 120 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


STOP: list[str | None] = [None]
CLIENT: list[str] = ["openai"]


class _Client:
    """The official `openai` async client, or plain httpx (less client-side work per request)."""

    def __init__(self, url: str) -> None:
        import openai

        self.url = url
        if CLIENT[0] == "openai":
            self.openai = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=120, max_retries=0)
        else:
            self.http = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64))

    async def ask(self, prompt: str, max_tokens: int) -> str:
        body = {"model": "zoo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": STOP[0]}
        if CLIENT[0] == "openai":
            answer = await self.openai.completions.create(**body)
            return str(answer.choices[0].text)
        response = await self.http.post(f"{self.url}/completions", json=body)
        response.raise_for_status()
        return str(response.json()["choices"][0]["text"])

    async def close(self) -> None:
        await (self.openai.close() if CLIENT[0] == "openai" else self.http.aclose())


def _client(url: str) -> _Client:
    return _Client(url)


async def _ask(client: _Client, prompt: str, max_tokens: int) -> str:
    return await client.ask(prompt, max_tokens)


async def _drive(url: str, prompts: list[str], count: int, clients: int, max_tokens: int) -> dict[str, float]:
    """`count` requests from `clients` concurrent clients: requests/s and latency percentiles (ms)."""
    client, latencies, cursor = _client(url), [], iter(range(count))

    async def one_client() -> None:
        for index in cursor:
            start = time.perf_counter()
            await _ask(client, prompts[index % len(prompts)], max_tokens)
            latencies.append(time.perf_counter() - start)

    await _ask(client, prompts[0], max_tokens)  # warm-up
    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "requests": count,
        "rps": count / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * cuts[18],
    }


async def _answers(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, str]:
    client = _client(url)
    answers = {prompt: await _ask(client, prompt, max_tokens) for prompt in prompts}
    await client.close()
    return answers


async def _load(
    url: str, prompts: list[str], reference: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    """args.load_requests requests from args.load_clients clients; errors and answers unlike the serial ones."""
    client, cursor = _client(url), iter(range(args.load_requests))
    errors: list[str] = []
    mismatches: list[str] = []

    async def one_client() -> None:
        for index in cursor:
            prompt = prompts[(index * 7) % len(prompts)]
            try:
                answer = await _ask(client, prompt, args.max_tokens)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            if answer != reference[prompt]:
                mismatches.append(f"{prompt!r}: {answer!r} != {reference[prompt]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(args.load_clients)))
    wall = time.perf_counter() - start
    await client.close()
    return {"requests": args.load_requests, "clients": args.load_clients, "errors": len(errors),
            "mismatches": len(mismatches), "wall_s": wall, "examples": (errors + mismatches)[:5]}  # fmt: skip


def _engine_only(args: argparse.Namespace, prompts: list[str]) -> dict[str, float]:
    """The model side alone, in this process: seconds per request run one at a time, and in batches of 32."""
    import torch

    from evomerge.serve.app import load_served_model
    from evomerge.serve.engine import Job

    torch.set_num_threads(1)
    engine = load_served_model(args.model).engine
    stop = (STOP[0],) if STOP[0] else ()
    jobs = [
        Job(list(engine.tokenizer(p)["input_ids"]), max_tokens=args.max_tokens, temperature=0, stop=stop)
        for p in prompts[:32]
    ]
    engine.run(jobs[:1])  # warm-up
    start = time.perf_counter()
    for job in jobs:
        engine.run([job])
    serial = (time.perf_counter() - start) / len(jobs)
    start = time.perf_counter()
    engine.run(jobs)
    batched = (time.perf_counter() - start) / len(jobs)
    tokens = sum(len(result.tokens) for result in engine.run(jobs)) / len(jobs)
    return {"serial_ms": 1000 * serial, "batched_ms": 1000 * batched, "tokens": tokens}


def _row(row: dict[str, Any]) -> str:
    return (f"| {row['clients']} | {row['mode']} | {row['requests']} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} |")  # fmt: skip


def _write(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    load: dict[str, Any],
    load_start: Any,
    unique: int,
    engine: dict[str, float],
) -> None:
    by = {(row["mode"], row["clients"]): row for row in rows}
    ratios = [
        f"| {c} | {by[('batched', c)]['rps'] / by[('serial', c)]['rps']:.2f}x | "
        f"{by[('serial', c)]['p50_ms'] / by[('batched', c)]['p50_ms']:.2f}x | "
        f"{by[('serial', c)]['p95_ms'] / by[('batched', c)]['p95_ms']:.2f}x |"
        for c in args.clients
    ]
    command = " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]])
    text = f"""# `evomerge serve`: batched serving against one request at a time

Run on {datetime.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} cores, torch at 1 thread in
each server. **The machine was shared** with other jobs (load average at the start
{", ".join(f"{x:.1f}" for x in load_start)}, at the end {", ".join(f"{x:.1f}" for x in os.getloadavg())}): compare the
two modes, which ran side by side, more than the absolute numbers. Clients ({"the official `openai` async client" if args.client == "openai" else "plain `httpx.AsyncClient`"})
ran in the benchmark's own process, on the same cores as the servers.

    {command}

Each cell is the best (highest requests/s) of {args.repeats} runs, serial and batched alternating in order.
Model `{args.model}`, prompts from `{args.task}` ({unique} distinct), greedy (`temperature=0`),
`max_tokens={args.max_tokens}`, `stop={STOP[0]!r}`. `batched`: `evomerge serve --max-batch-size {args.max_batch_size}
--batch-wait-ms {args.batch_wait_ms}`; `serial`: `--max-batch-size 1`, every request alone through the model.

| clients | mode | requests | requests/s | p50 ms | p95 ms |
|---|---|---|---|---|---|
{chr(10).join(_row(row) for row in rows)}

Batched over serial:

| clients | requests/s | p50 latency | p95 latency |
|---|---|---|---|
{chr(10).join(ratios)}

The model side alone (the engine in this process, no HTTP): {engine["serial_ms"]:.1f} ms per request one at a
time, {engine["batched_ms"]:.1f} ms per request in one batch of 32 ({engine["serial_ms"] / engine["batched_ms"]:.1f}x); answers average
{engine["tokens"]:.1f} new tokens (the zoo model ends its answer with a newline and EOS).

## Load

{load["requests"]} requests from {load["clients"]} concurrent clients to the batched server in {load["wall_s"]:.1f} s
({load["requests"] / load["wall_s"]:.1f} requests/s): **{load["errors"]} errors, {load["mismatches"]} answers unlike the
serial server's** answer to the same prompt (each prompt asked once of the serial server, one client).
"""
    if load["examples"]:
        text += "\nFirst problems:\n\n" + "\n".join(f"- {example}" for example in load["examples"]) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
