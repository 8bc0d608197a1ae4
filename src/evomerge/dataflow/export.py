"""A layer path as a model dir transformers loads, and as a mergekit passthrough recipe.

Every path is written laid out in order: `model.layers.{i}` holds the source layer at path position i (a
layer the path runs twice is stored twice), the embeddings, final norm and head are the owner's, and
config.json is the owner's with `num_hidden_layers` = path length. When every scale is 1 that is all: a
plain model of the source architecture. Otherwise config.json also names the scales and the
`evomerge_dataflow` model class, whose file (`modeling.py`, copied beside the weights) transformers loads
with `trust_remote_code=True`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.dataflow import modeling
from evomerge.dataflow.path import LayerPath, PathError

LAYER_PREFIX = "model.layers."
MODELING_FILE = "modeling_evomerge_dataflow.py"
MERGEKIT_FILE = "mergekit_config.yml"


def export_path(
    path: LayerPath,
    out_dir: Path,
    *,
    dtype: str = "float32",
    force: bool = False,
    max_length: int | None = None,
) -> Path:
    """Write `path` as a model dir (see the module doc); the dir appears whole or not at all."""
    from evomerge.io.hf_dir import copy_hf_files, read_json
    from evomerge.io.writer import ShardedWriter, atomic_output_dir

    path.check(max_length=max_length)
    owner = Path(path.models[path.owner])
    config = read_json(owner / "config.json")
    updates = config_updates(path, config, dtype)
    with atomic_output_dir(out_dir, force=force) as temporary:
        copy_hf_files(owner, temporary, config_updates=updates)
        if not path.unit_scales:
            shutil.copyfile(modeling.__file__, temporary / MODELING_FILE)
        else:
            (temporary / MERGEKIT_FILE).write_text(mergekit_yaml(path, dtype), encoding="utf-8")
        with ShardedWriter(temporary) as writer:  # finished on success, removed on error
            for name, tensor in path_tensors(path):
                writer.add(name, tensor.to(getattr(torch, dtype)))
    return Path(out_dir)


def config_updates(path: LayerPath, config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """What changes in the owner's config.json: the depth and dtype; for scaled paths the model class."""
    from evomerge.io.hf_dir import dtype_updates, read_json

    updates: dict[str, Any] = {"num_hidden_layers": len(path), **dtype_updates(config, dtype)}
    if "layer_types" in config:  # per-layer attention kinds (sliding windows) follow the path
        kinds = [read_json(Path(model) / "config.json").get("layer_types") for model in path.models]
        updates["layer_types"] = [kinds[s.model][s.layer] for s in path.steps]  # type: ignore[index]
    if path.unit_scales:
        return updates
    if config.get("model_type") != "llama":
        raise PathError(
            f"export: a path with scales other than 1 is written as an `{modeling.MODEL_TYPE}` model, a "
            f"Llama subclass; the owner {path.models[path.owner]} is a {config.get('model_type')!r} model. "
            "Evolve with search.dataflow.scales: fixed to export it as a plain stack of layers."
        )
    stem = MODELING_FILE.removesuffix(".py")
    return {
        **updates,
        "model_type": modeling.MODEL_TYPE,
        "architectures": ["DataflowLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{stem}.DataflowLlamaConfig",
            "AutoModelForCausalLM": f"{stem}.DataflowLlamaForCausalLM",
        },
        "dataflow_scales": [float(step.scale) for step in path.steps],
        "dataflow_path": [[Path(path.models[s.model]).name, s.layer] for s in path.steps],
    }


def path_tensors(path: LayerPath) -> Any:
    """(name, tensor) of the exported model: the owner's outer tensors, then each position's layer."""
    from evomerge.io.reader import ModelDir

    dirs: dict[int, Any] = {}
    try:
        for index in {path.owner, *(s.model for s in path.steps)}:
            dirs[index] = ModelDir(path.models[index])
        owner = dirs[path.owner]
        for name in owner.tensor_names():
            if not name.startswith(LAYER_PREFIX):
                yield name, owner.get(name)
        for position, step in enumerate(path.steps):
            prefix = f"{LAYER_PREFIX}{step.layer}."
            source = dirs[step.model]
            for name in (n for n in source.tensor_names() if n.startswith(prefix)):
                yield f"{LAYER_PREFIX}{position}.{name.removeprefix(prefix)}", source.get(name)
    finally:
        for opened in dirs.values():
            opened.close()


def mergekit_yaml(path: LayerPath, dtype: str) -> str:
    """The path as a mergekit passthrough recipe (every scale must be 1): one slice per run of
    consecutive layers of one model. The first and last slices are the owner's, so mergekit takes the
    embeddings from the first and the norm and head from the last, as the path model does."""
    if not path.unit_scales:
        raise PathError("mergekit passthrough stacks layers as they are; this path scales some inputs.")
    slices: list[list[int]] = []  # [model, first layer, end layer)
    for step in path.steps:
        last = slices[-1] if slices else None
        if last is not None and last[0] == step.model and last[2] == step.layer:
            last[2] += 1
        else:
            slices.append([step.model, step.layer, step.layer + 1])
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": path.models[m], "layer_range": [start, end]}]} for m, start, end in slices
        ],
        "dtype": dtype,
    }
    return yaml.safe_dump(recipe, sort_keys=False)
