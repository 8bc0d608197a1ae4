"""Atomic single-file writes: a reader (or the next run after a crash) sees the old file or the new one,
never half of one.

Every file evomerge writes outside a temporary output dir goes through here: the content is written to a
hidden temporary name beside the target (same dir, so the same filesystem) and renamed over it, which
POSIX makes atomic. A failure removes the temporary; a process killed mid-write leaves at most a stray
`.{name}.<random>.tmp`, never a damaged target. (No fsync: this guards against crashes and kills of the
process, not against the machine losing power.) Whole output dirs use `writer.atomic_output_dir`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; when the block succeeds, rename it over `path`.

    Whatever the block creates at the temporary path (a file, or a dir such as `shutil.copytree` makes)
    replaces `path`; an existing dir at `path` is removed first (that step alone is not atomic). On an
    error the temporary is removed and `path` is left as it was.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        if target.is_dir() and not target.is_symlink() and temporary.is_dir():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (no newline translation: the bytes written are the text's)."""
    return atomic_write_bytes(path, text.encode(encoding))
