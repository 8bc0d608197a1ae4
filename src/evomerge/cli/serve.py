"""`evomerge serve MODEL_DIR`: the model as an OpenAI-compatible endpoint (see docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli import app
from evomerge.cli._common import console, user_errors

API_KEY_ENV = "EVOMERGE_API_KEY"


@app.command("serve")
def serve_command(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face causal LM dir with its tokenizer.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every one).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV,
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/ routes (default: no key).",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The name clients ask for (default: the dir's name).")
    ] = None,
    chat_template: Annotated[
        Path | None,
        typer.Option(help="A Jinja chat template, for a tokenizer without one (needed by chat requests)."),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Most sequences per forward pass; 1 serves one request at a time.")
    ] = 32,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0.0, help="How long a batch waits for more requests before it starts.")
    ] = 5.0,
    device: Annotated[str, typer.Option(help="torch device to run on.")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 1,
) -> None:
    """Serve MODEL_DIR on /v1/completions, /v1/chat/completions, /v1/models and /health."""
    import torch

    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_forever

    torch.set_num_threads(threads)
    with user_errors():
        served = load_served_model(
            model_dir, name=model_name, chat_template_file=chat_template, device=device
        )
        web_app = create_app(
            served, api_key=api_key, max_batch_size=max_batch_size, max_wait_s=batch_wait_ms / 1000
        )
    context = served.context_length or "no limit"
    chat = "chat template: yes" if served.chat_template else "no chat template (chat requests get a 400)"
    console.print(
        f"serving {served.name!r} from {model_dir} at http://{host}:{port}/v1 (context {context}, {chat}, "
        f"key {'required' if api_key else 'not required'})",
        markup=False,
        highlight=False,
    )
    serve_forever(web_app, host=host, port=port, log_level="warning")
