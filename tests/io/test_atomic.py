"""Atomic single-file writes: after any failure, even a killed process, the old file or nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evomerge.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    assert atomic_write_text(path, "one\n") == path
    atomic_write_bytes(path, b"two\r\n")
    assert path.read_bytes() == b"two\r\n"
    assert atomic_write_text(path, "caf\u00e9\n") and path.read_bytes() == "café\n".encode()
    assert _siblings(path) == ["a.json"]


@pytest.mark.parametrize("existing", [True, False])
def test_an_error_mid_write_leaves_the_old_file_or_nothing(tmp_path: Path, existing: bool) -> None:
    path = tmp_path / "report.html"
    if existing:
        path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("disk full")
    assert (path.read_text() if existing else path.exists()) == ("old" if existing else False)
    assert _siblings(path) == (["report.html"] if existing else [])


@pytest.mark.parametrize("existing", [True, False])
def test_a_process_killed_mid_write_leaves_the_old_file_or_nothing(tmp_path: Path, existing: bool) -> None:
    path = tmp_path / "config.yaml"
    if existing:
        path.write_text("old: 1\n")
    script = textwrap.dedent(
        f"""
        import os
        from evomerge.io.atomic import atomic_path
        with atomic_path({str(path)!r}) as temporary:
            with open(temporary, "w") as stream:
                stream.write("new: ")
                stream.flush()
                os._exit(9)  # killed: no cleanup, no rename
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, check=False, capture_output=True)
    assert done.returncode == 9, done.stderr
    assert (path.read_text() if existing else path.exists()) == ("old: 1\n" if existing else False)
    strays = [name for name in _siblings(path) if name != path.name]
    assert len(strays) == 1 and strays[0].startswith(".config.yaml.") and strays[0].endswith(".tmp")


def test_a_dir_made_at_the_temporary_path_replaces_a_dir(tmp_path: Path) -> None:
    target = tmp_path / "templates"
    target.mkdir()
    (target / "old.jinja").write_text("x")
    with atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "new.jinja").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.jinja"]
    assert _siblings(target) == ["templates"]
