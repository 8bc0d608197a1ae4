"""Model dirs and running servers for the serve tests (the black-box tests can start endpoints the same way)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.eval import helpers as eval_helpers

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
PROMPTS = ["1+2=", "abc def", "9", "hello world, how are you?", "x", "12*34-5=", "the cat is", "é="]


def tiny_lm_dir(path: Path, *, seed: int = 0) -> Path:
    """A random Llama (decisive logits, context 256) with the char tokenizer, saved as a model dir."""
    tokenizer = eval_helpers.char_tokenizer()
    return eval_helpers.save_lm_dir(path, eval_helpers.tiny_llama(len(tokenizer), seed=seed), tokenizer)


@contextlib.contextmanager
def running_server(model_dir: Path, **options: Any) -> Iterator[str]:
    """`evomerge serve` on model_dir in this process on a free port; yields the base URL (.../v1).

    options: name, chat_template_file (load_served_model) and api_key, max_batch_size, max_wait_s (create_app).
    """
    from evomerge.serve.app import create_app, load_served_model
    from evomerge.serve.server import serve_in_thread

    load = {key: options.pop(key) for key in ("name", "chat_template_file") if key in options}
    served = load_served_model(model_dir, **load)
    with serve_in_thread(create_app(served, **options), startup_timeout_s=60) as url:
        yield url


def client(url: str, api_key: str = "test-key", **options: Any) -> Any:
    """The official openai client on `url`, with a bounded timeout and no retries (errors surface at once)."""
    import openai

    return openai.OpenAI(
        base_url=url, api_key=api_key, timeout=options.pop("timeout", 60), max_retries=0, **options
    )
