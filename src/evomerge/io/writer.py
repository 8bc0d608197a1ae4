"""Writing merged weights: sharded safetensors named as transformers names them, into an atomic output dir.

`ShardedWriter` streams: each tensor's bytes go to disk when it is added, so the writer holds no tensor
data in memory (a merge's peak memory is then a few tensors, whatever the shard size). A safetensors file
starts with a header listing every tensor it holds, which is only known once the shard is full, so each
shard file starts with a reserved header region (the format allows the header JSON to be padded with
spaces); the header is written into it when the shard closes. A shard whose header would outgrow the
region is closed early, so the layout stays valid whatever is added. This avoids holding a shard in
memory (what `safetensors.torch.save_file` needs) and, for large shards, copying the data a second
time; small shards, where the padding would be a visible share of the file, get a tight header.

`atomic_output_dir` gives a temporary dir next to the output and renames it into place only when the
block succeeds, so a failed merge never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

import torch

from evomerge.errors import OutputExistsError
from evomerge.io.atomic import atomic_path, atomic_write_text
from evomerge.io.reader import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size="5GB"
MAX_PADDING_SHARE = 0.01  # unused header room allowed, as a share of the shard's data; more is compacted
_HEADER_OPEN = '{"__metadata__":{"format":"pt"}'  # transformers marks its files "pt" too


def header_room_for(max_shard_bytes: int) -> int:
    """Bytes reserved for a shard's header: 1/1000 of the shard, at least 4 KiB, at most 1 MiB.

    A Llama tensor's entry is about 100 bytes, so 1 MiB holds ~10k tensors; smaller shards hold fewer.
    """
    room = min(max(max_shard_bytes // 1000, 4096), 1 << 20)
    return room - room % 8  # the data then starts 8-byte aligned, as safetensors' own writer keeps it


@dataclass
class _Shard:
    """A shard being filled: the open file (data written past the reserved header) and its entries."""

    path: Path
    handle: BinaryIO
    header_room: int
    pieces: list[bytes] = field(default_factory=lambda: [_HEADER_OPEN.encode()])
    header_bytes: int = len(_HEADER_OPEN) + 1  # + the closing brace
    nbytes: int = 0
    count: int = 0

    def entry(self, name: str, tensor: torch.Tensor, nbytes: int) -> bytes:
        """The header entry the tensor would get as the next one in this shard."""
        meta = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape)}
        meta["data_offsets"] = [self.nbytes, self.nbytes + nbytes]
        return f",{json.dumps(name)}:{json.dumps(meta, separators=(',', ':'))}".encode()

    def fits(self, entry: bytes) -> bool:
        return self.header_bytes + len(entry) <= self.header_room

    def append(self, entry: bytes, data: memoryview) -> None:
        self.handle.write(data)
        self.pieces.append(entry)
        self.header_bytes += len(entry)
        self.nbytes += len(data)
        self.count += 1

    def close(self) -> None:
        """Write the length prefix and the space-padded header into the reserved region.

        When the unused room would be over 1% of the file (small shards), the data is moved up behind
        a tight header instead: a copy of at most ~100 MB, so small models do not carry a padded header.
        """
        header = b"".join([*self.pieces, b"}"])
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors' writer keeps it
        if self.header_room - len(header) > MAX_PADDING_SHARE * self.nbytes:
            self.handle.close()
            self._compact(header)
            return
        self.handle.seek(0)
        self.handle.write(struct.pack("<Q", self.header_room) + header.ljust(self.header_room, b" "))
        self.handle.close()

    def _compact(self, header: bytes) -> None:
        with atomic_path(self.path) as compact, open(self.path, "rb") as source, open(compact, "wb") as dest:
            dest.write(struct.pack("<Q", len(header)) + header)
            source.seek(8 + self.header_room)
            shutil.copyfileobj(source, dest, 16 << 20)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order; views, non-contiguous and shared tensors are all fine."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return memoryview(cast(Any, flat.view(torch.uint8).numpy()))  # numpy arrays are buffers; stubs disagree


class ShardedWriter:
    """Adds tensors one by one; `finish()` names the shards and writes the index.

    Shards are filled in the order tensors are added; a shard closes when the next tensor would push it
    past `max_shard_bytes` (a larger tensor gets a shard of its own), as transformers does.
    Safe to call `add` from several threads (calls are serialised).
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], *, max_shard_bytes: int | float = DEFAULT_MAX_SHARD_BYTES
    ):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = int(max_shard_bytes)
        self._token = secrets.token_hex(4)
        self._closed: list[Path] = []  # complete shard files under temporary names
        self._weight_map: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self._total_bytes = 0
        self._shard: _Shard | None = None
        self._lock = threading.Lock()
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes now; the caller may drop the tensor as soon as this returns."""
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(f"tensor '{name}': dtype {tensor.dtype} cannot be stored in safetensors.")
        data = _tensor_bytes(tensor)  # outside the lock: making a view contiguous may copy
        nbytes = len(data)
        with self._lock:
            self._check_open(name)
            shard = self._shard_for(name, tensor, nbytes)
            shard.append(shard.entry(name, tensor, nbytes), data)
            self._weight_map[name] = len(self._closed)
            self._total_bytes += nbytes

    def _shard_for(self, name: str, tensor: torch.Tensor, nbytes: int) -> _Shard:
        """The open shard if the tensor fits (bytes and header), else a new one."""
        shard = self._shard
        if shard is not None and shard.count:
            full = shard.nbytes + nbytes > self.max_shard_bytes
            if full or not shard.fits(shard.entry(name, tensor, nbytes)):
                self._close_shard()
                shard = None
        if shard is None:
            # A header entry longer than the usual room (absurdly long names) widens this shard's room.
            entry_size = len(json.dumps(name)) + 64 + 24 * tensor.dim()
            shard = self._open_shard(max(header_room_for(self.max_shard_bytes), 8 * (entry_size // 4 + 64)))
        return shard

    def _check_open(self, name: str) -> None:
        if self._finished:
            raise RuntimeError(f"tensor '{name}' added after finish(); create a new ShardedWriter.")
        if name in self._weight_map:
            raise ValueError(f"tensor '{name}' was added twice; every tensor name must be unique.")

    def _open_shard(self, header_room: int) -> _Shard:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f".shard-{len(self._closed) + 1:05d}.{self._token}.safetensors.tmp"
        handle = open(path, "wb")  # noqa: SIM115 (closed by _Shard.close or abort)
        handle.seek(8 + header_room)
        self._shard = _Shard(path, handle, header_room)
        return self._shard

    def _close_shard(self) -> None:
        assert self._shard is not None
        self._shard.close()
        self._closed.append(self._shard.path)
        self._shard = None

    def finish(self) -> list[Path]:
        """Close the last shard, give the shards their final names, write the index; return the files."""
        with self._lock:
            if self._finished:
                raise RuntimeError(f"{self.out_dir}: finish() was already called.")
            if self._shard is None and not self._closed:
                self._open_shard(header_room_for(0))  # a model with no tensors: one valid, empty file
            if self._shard is not None:
                self._close_shard()
            self._finished = True
            return self._publish()

    def _publish(self) -> list[Path]:
        names = _shard_names(len(self._closed))
        files = [self.out_dir / name for name in names]
        for temporary, final in zip(self._closed, files, strict=True):
            os.replace(temporary, final)
        if len(files) > 1:
            weight_map = {tensor: names[shard] for tensor, shard in sorted(self._weight_map.items())}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            files.append(_write_json(self.out_dir / SAFETENSORS_INDEX, index))
        return files

    def abort(self) -> None:
        """Delete every temporary file this writer made (used when a merge fails)."""
        with self._lock:
            if self._shard is not None:
                self._shard.handle.close()
                self._closed.append(self._shard.path)
                self._shard = None
            for temporary in self._closed:
                temporary.unlink(missing_ok=True)
            self._finished = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._finished:
            self.finish()


def _shard_names(count: int) -> list[str]:
    """transformers' names: model.safetensors alone, else model-00001-of-00003.safetensors, ..."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


# ---- atomic output dir --------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary dir beside `out_dir`; on success it becomes `out_dir`, on error it is removed.

    An existing `out_dir` is refused up front (before any work) unless `force`, in which case it is
    replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    _refuse_existing(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = _make_sibling(out_dir, "tmp")
    try:
        yield temporary
        _refuse_existing(out_dir, force)  # something may have created it while we worked
        _move_into_place(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _refuse_existing(out_dir: Path, force: bool) -> None:
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise OutputExistsError(
            f"{out_dir}: output dir already exists; nothing was written. "
            "Pass --force (force=True) to replace it, or choose another output dir."
        )


def _make_sibling(out_dir: Path, kind: str) -> Path:
    """A new empty dir `.{name}.{kind}-<random>` next to `out_dir` (same filesystem, so rename is atomic)."""
    while True:
        candidate = out_dir.parent / f".{out_dir.name}.{kind}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            candidate.mkdir()  # mode 0o777 & ~umask, like any dir the user makes
            return candidate


def _move_into_place(temporary: Path, out_dir: Path) -> None:
    """Rename `temporary` to `out_dir`; an existing `out_dir` is set aside first and deleted afterwards."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(temporary, out_dir)
        return
    aside = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, aside)
    try:
        os.rename(temporary, out_dir)
    except BaseException:
        os.rename(aside, out_dir)  # put the old output back: the user keeps what they had
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
