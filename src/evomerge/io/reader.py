"""Lazy reading of Hugging Face model dirs: tensor metadata from headers, tensor data only on request.

A `ModelDir` validates the whole dir at construction (weights present, index consistent, every header
readable), so a merge fails before any output is written. Each `get` maps just that tensor's bytes
(a private, copy-on-write mmap) and the mapping is released when the tensor is garbage-collected, so
memory is bounded by the tensors the caller holds. `safe_open` instead maps the whole file once and its
touched pages stay resident until it is closed: peak memory then grows with the model (docs/io.md has
the measurement). Mapping and `os.preadv` (the `use_mmap=False` fallback) both release the GIL, so
several threads read at once without a lock.

Pickle checkpoints (`pytorch_model.bin`) can run arbitrary code when unpickled; they are refused unless
the caller opts in, and then loaded with `torch.load(weights_only=True)`, which unpickles tensors and
plain containers only.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import numpy as np
import torch

from evomerge.errors import SourceError, TensorMismatchError, UnsafeCheckpointError
from evomerge.io.hf_dir import read_json

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
LOOKED_FOR = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, PICKLE_INDEX, PICKLE_SINGLE)

# safetensors' dtype codes (the header's "dtype" field) and the torch dtype each one stores.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger "header" means a corrupt file


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: enough to plan a merge without reading any data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _MappingBudget:
    """Counts live tensor mappings; each holds a file descriptor (Python's mmap dups the one it is given).

    Past the budget (a quarter of the process's descriptor limit) `get` reads copies instead, so a caller
    holding thousands of tensors never runs the process out of descriptors.
    """

    def __init__(self) -> None:
        self.limit = max(16, _descriptor_limit() // 4)
        self.live = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.live >= self.limit:
                return False
            self.live += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.live -= 1


def _descriptor_limit() -> int:
    try:
        import resource  # not on Windows
    except ImportError:
        return 1024
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1024 if soft_limit == resource.RLIM_INFINITY else soft_limit


_MAPPINGS = _MappingBudget()


@dataclass(frozen=True)
class _Location:
    """Where a safetensors tensor's bytes lie in its file (absolute offsets)."""

    start: int
    end: int


class _SafetensorsFile:
    """One safetensors file: its parsed header and a lazily opened descriptor shared by all threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos, self.locations = _parse_header(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self, name: str, *, use_mmap: bool = True) -> torch.Tensor:
        info, location = self.infos[name], self.locations[name]
        aligned = location.start % info.dtype.itemsize == 0
        raw = (
            self._map(location)
            if use_mmap and aligned and location.end > location.start
            else self._copy(location)
        )
        return raw.view(info.dtype).reshape(info.shape)

    def read_range(self, name: str, start: int, out: np.ndarray) -> None:
        """Copy entries [start, start + out.size) of the flattened tensor into `out` (same item size)."""
        info, location = self.infos[name], self.locations[name]
        itemsize = info.dtype.itemsize
        if out.itemsize != itemsize or start < 0 or start + out.size > info.numel:
            raise ValueError(
                f"{self.path}: tensor '{name}' ({info.numel} x {itemsize} bytes) cannot fill "
                f"[{start}, {start + out.size}) x {out.itemsize} bytes."
            )
        if out.size:
            self._read_into(
                torch.from_numpy(out.reshape(-1).view(np.uint8)), location.start + start * itemsize
            )

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading the tensor's bytes into the page cache (returns at once)."""
        location = self.locations[name]
        if hasattr(os, "posix_fadvise") and location.end > location.start:
            os.posix_fadvise(
                self._descriptor(), location.start, location.end - location.start, os.POSIX_FADV_WILLNEED
            )

    def _map(self, location: _Location) -> torch.Tensor:
        """A private (copy-on-write) mapping of just this tensor's bytes, unmapped when the tensor dies."""
        if not _MAPPINGS.acquire():
            return self._copy(location)
        page_start = location.start - location.start % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(
                self._descriptor(), location.end - page_start, access=mmap.ACCESS_COPY, offset=page_start
            )
        except OSError:  # e.g. a filesystem without mmap support: read instead
            _MAPPINGS.release()
            return self._copy(location)
        weakref.finalize(mapping, _MAPPINGS.release)
        # frombuffer holds a reference to the mapping; the last view of the tensor releases it.
        return torch.frombuffer(
            mapping,
            dtype=torch.uint8,
            offset=location.start - page_start,
            count=location.end - location.start,
        )  # (nbytes,)

    def _copy(self, location: _Location) -> torch.Tensor:
        buffer = torch.empty(location.end - location.start, dtype=torch.uint8)  # (nbytes,)
        if buffer.numel():
            self._read_into(buffer, location.start)
        return buffer

    def _read_into(self, buffer: torch.Tensor, offset: int) -> None:
        view = memoryview(cast(Any, buffer.numpy()))  # numpy arrays are buffers; its stubs disagree
        done = 0
        while done < len(view):  # preadv may return short on very large reads
            got = os.preadv(self._descriptor(), [view[done:]], offset + done)
            if got <= 0:
                raise SourceError(f"{self.path}: file ended early at byte {offset + done}; it is truncated.")
            done += got

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, _Location]]:
    """Read and check a safetensors header: 8 bytes little-endian length, then that many bytes of JSON."""
    header, data_start, file_size = _read_header_json(path)
    infos: dict[str, TensorInfo] = {}
    locations: dict[str, _Location] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name], locations[name] = _parse_entry(path, name, entry, data_start, file_size)
    return infos, locations


def _read_header_json(path: Path) -> tuple[dict[str, Any], int, int]:
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            file_size = os.fstat(handle.fileno()).st_size
            if len(prefix) < 8:
                raise SourceError(f"{path}: {file_size} bytes is too short for a safetensors file.")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER_BYTES, file_size - 8):
                raise SourceError(
                    f"{path}: header length {length} does not fit the file ({file_size} bytes)."
                )
            header = json.loads(handle.read(length))
    except OSError as error:
        raise SourceError(f"{path}: cannot read the safetensors header ({error}).") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: the safetensors header is not valid JSON ({error}).") from error
    if not isinstance(header, dict):
        raise SourceError(f"{path}: the safetensors header is not a JSON object.")
    return header, 8 + length, file_size


def _parse_entry(
    path: Path, name: str, entry: Any, data_start: int, file_size: int
) -> tuple[TensorInfo, _Location]:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(size) for size in entry["shape"])
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise SourceError(
            f"{path}: header entry for tensor '{name}' is malformed or has an unsupported dtype ({entry!r})."
        ) from error
    info = TensorInfo(name, shape, dtype, path)
    location = _Location(data_start + begin, data_start + end)
    if end - begin != info.nbytes or location.end > file_size or begin < 0:
        raise SourceError(
            f"{path}: tensor '{name}' claims bytes [{begin}, {end}) of data but shape {list(shape)} "
            f"{entry['dtype']} needs {info.nbytes} and the file holds {file_size - data_start}; "
            "the file is truncated or corrupt."
        )
    return info, location


class _PickleFile:
    """One pickle checkpoint, loaded (memory-mapped, tensors only) on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def state(self) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._state is None:
                self._state = _load_pickle(self.path)
            return self._state

    def read(self, name: str) -> torch.Tensor:
        return self.state()[name]

    def close(self) -> None:
        with self._lock:
            self._state = None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as error:  # torch raises many types for a bad or unsafe pickle
        raise SourceError(
            f"{path}: cannot load the checkpoint with torch.load(weights_only=True): {error}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise SourceError(
            f"{path}: expected a state dict (tensor name -> tensor), got {type(state).__name__}."
        )
    return state


_File = _SafetensorsFile | _PickleFile


class ModelDir:
    """A Hugging Face model dir opened for lazy reading: names, shapes and dtypes now, data on `get`.

    `get` is safe to call from several threads at once.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, allow_pickle: bool = False, use_mmap: bool = True
    ) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.use_mmap = use_mmap
        _check_dir(self.path)
        self.config: dict[str, Any] = _read_config(self.path)
        self._files: dict[str, _File] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._infos: dict[str, TensorInfo] = {}
        self._open_weights()

    # ---- discovery -------------------------------------------------------------------------------
    def _open_weights(self) -> None:
        if (self.path / SAFETENSORS_INDEX).is_file():
            self._open_safetensors(_read_index(self.path / SAFETENSORS_INDEX))
        elif (self.path / SAFETENSORS_SINGLE).is_file():
            self._open_safetensors(None)
        elif (self.path / PICKLE_INDEX).is_file():
            self._open_pickles(_read_index(self.path / PICKLE_INDEX))
        elif (self.path / PICKLE_SINGLE).is_file():
            self._open_pickles(None)
        else:
            raise SourceError(
                f"{self.path}: no model weights found; looked for {', '.join(LOOKED_FOR)}. "
                "Point to a Hugging Face model dir saved with save_pretrained()."
            )

    def _open_safetensors(self, weight_map: dict[str, str] | None) -> None:
        if weight_map is None:
            single = _SafetensorsFile(self.path / SAFETENSORS_SINGLE)
            self._files[SAFETENSORS_SINGLE] = single
            weight_map = dict.fromkeys(single.infos, SAFETENSORS_SINGLE)
        for file_name in sorted(set(weight_map.values()) - set(self._files)):
            self._files[file_name] = _SafetensorsFile(self.path / file_name)
        for name, file_name in weight_map.items():
            shard = self._files[file_name]
            assert isinstance(shard, _SafetensorsFile)
            if name not in shard.infos:
                raise SourceError(
                    f"{self.path / SAFETENSORS_INDEX}: lists tensor '{name}' in {file_name}, "
                    "but that file does not hold it; the index and the shards disagree."
                )
            self._where[name] = file_name
            self._infos[name] = shard.infos[name]

    def _open_pickles(self, weight_map: dict[str, str] | None) -> None:
        file_names = sorted(set(weight_map.values())) if weight_map is not None else [PICKLE_SINGLE]
        if not self.allow_pickle:
            raise UnsafeCheckpointError(
                f"{self.path / file_names[0]}: this checkpoint is a Python pickle, and unpickling a file can "
                "run arbitrary code from whoever made it. evomerge reads safetensors by default. If you trust "
                "the source, pass --allow-pickle (allow_pickle=True) to load it with "
                "torch.load(weights_only=True), or convert it to safetensors first."
            )
        for file_name in file_names:
            pickle_file = _PickleFile(self.path / file_name)
            self._files[file_name] = pickle_file
            for name, tensor in pickle_file.state().items():
                if weight_map is None or weight_map.get(name) == file_name:
                    self._where[name] = file_name
                    self._infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, pickle_file.path)
        missing = sorted(set(weight_map or {}) - set(self._infos))
        if missing:
            raise SourceError(
                f"{self.path / PICKLE_INDEX}: lists tensors no checkpoint file holds: {missing[:5]}."
            )

    # ---- public API ------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """Every tensor name, in the order the index or header lists them."""
        return list(self._infos)

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and file of a tensor, from the header (no data is read)."""
        self._check_name(name)
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor's data as stored (its own dtype, on CPU); a fresh tensor the caller may modify."""
        self._check_name(name)
        weights_file = self._files[self._where[name]]
        if isinstance(weights_file, _PickleFile):
            return weights_file.read(name).clone()  # the loaded state dict is shared: hand out a copy
        return weights_file.read(name, use_mmap=self.use_mmap)

    def read_range(self, name: str, start: int, out: np.ndarray) -> bool:
        """Copy entries [start, start + out.size) of the flattened tensor into `out` (an array of the
        tensor's item size), without mapping the file: memory stays at `out` whatever the tensor's size.
        False (nothing read) for pickle checkpoints, which have no byte ranges."""
        self._check_name(name)
        weights_file = self._files[self._where[name]]
        if isinstance(weights_file, _PickleFile):
            return False
        weights_file.read_range(name, start, out)
        return True

    def prefetch(self, name: str) -> None:
        """Start reading the tensor into the page cache in the background (a hint; safetensors only)."""
        self._check_name(name)
        weights_file = self._files[self._where[name]]
        if isinstance(weights_file, _SafetensorsFile):
            weights_file.prefetch(name)

    def _check_name(self, name: str) -> None:
        if name not in self._infos:
            raise TensorMismatchError(
                f"{self.path}: has no tensor '{name}' ({len(self._infos)} tensors present). "
                "All models merged together must share tensor names; check the sources are one architecture."
            )

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {len(self._infos)} tensors, {len(self._files)} files)"

    def close(self) -> None:
        for weights_file in self._files.values():
            weights_file.close()

    def __enter__(self) -> ModelDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise SourceError(
            f"{path}: model dir does not exist. Check the path (relative paths start from {Path.cwd()})."
        )
    if not path.is_dir():
        raise SourceError(f"{path}: expected a model dir (config.json + weights), got a file.")


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    return read_json(config_path) if config_path.is_file() else {}


def _read_index(index_path: Path) -> dict[str, str]:
    """The index's weight map (tensor name -> shard file name), with every shard checked to exist."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{index_path}: cannot read the shard index as JSON ({error}).") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise SourceError(
            f'{index_path}: expected {{"weight_map": {{tensor name: shard file name, ...}}}}; '
            "the index is malformed. Re-save the model with save_pretrained()."
        )
    for file_name in sorted(set(weight_map.values())):
        if not (index_path.parent / file_name).is_file():
            raise SourceError(
                f"{index_path}: names shard '{file_name}', which is missing from {index_path.parent}. "
                "The download is incomplete; fetch the missing shard."
            )
    return weight_map
