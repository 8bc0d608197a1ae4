"""Without the `serve` extra the package still imports, and the server and client say what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from evomerge.extras import MissingExtraError


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_server_names_the_extra_when_a_dependency_is_missing(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    from evomerge.serve.app import create_app
    from evomerge.serve.server import serve_forever

    monkeypatch.setitem(sys.modules, module, None)  # import now raises ModuleNotFoundError
    with pytest.raises(MissingExtraError, match=r"pip install 'evomerge\[serve\]'"):
        if module == "fastapi":
            create_app(object())  # type: ignore[arg-type]
        else:
            serve_forever(object())


def test_endpoint_client_names_the_extra_when_openai_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from evomerge.eval.endpoint import EndpointClient, EndpointSpec

    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(MissingExtraError, match=r"openai.*pip install 'evomerge\[serve\]'"):
        EndpointClient(EndpointSpec(base_url="http://127.0.0.1:9/v1", model="m"))


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_core_modules_import_without_fastapi_uvicorn_or_openai() -> None:
    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'openai', 'starlette'): sys.modules[name] = None\n"
        "import evomerge, evomerge.serve.app, evomerge.serve.server, evomerge.eval.endpoint, evomerge.cli.serve\n"
        "from evomerge.cli import register_commands; register_commands()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
