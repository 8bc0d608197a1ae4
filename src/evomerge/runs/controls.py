"""Controls that tell whether combining sources helped, not just moving away from the base.

An evolved merge of several sources can beat each source for a dull reason: any push of the right size
away from the base would have done. The control replaces one source by *noise of the same norm*: a model
whose task vector (its delta from the base) is random, rescaled per tensor to the norm of that source's
task vector. Running the same search with the noise model in place of the source measures what the
source's actual knowledge contributed (the issue's control for compositional targets).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from evomerge.io.hf_dir import copy_hf_files
from evomerge.io.reader import ModelDir
from evomerge.io.writer import ShardedWriter, atomic_output_dir
from evomerge.runs.config import check_same_shapes


def noise_like(delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with `delta`'s shape and exactly its L2 norm (float32 math, `delta`'s dtype back)."""
    noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32)
    norm = delta.float().norm()
    noise_norm = noise.norm()
    scale = norm / noise_norm if noise_norm > 0 else torch.zeros(())
    return (noise * scale).to(delta.dtype)


def write_noise_source(
    base_dir: str | os.PathLike[str],
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    force: bool = False,
) -> Path:
    """A model dir `base + noise`, the noise per tensor of the norm of `source - base`; atomic write.

    Config, generation config and tokenizer come from `source_dir`, so the noise model loads and
    evaluates exactly as the source does.
    """
    check_same_shapes(Path(base_dir), [Path(source_dir)])  # headers only, before anything is written
    generator = torch.Generator().manual_seed(seed)
    with (
        ModelDir(base_dir) as base,
        ModelDir(source_dir) as source,
        atomic_output_dir(out_dir, force=force) as temporary,
    ):
        with ShardedWriter(temporary) as writer:
            for name in source.tensor_names():
                base_tensor, source_tensor = base.get(name).float(), source.get(name)
                delta = source_tensor.float() - base_tensor
                writer.add(name, (base_tensor + noise_like(delta, generator)).to(source_tensor.dtype))
        copy_hf_files(source.path, temporary)
    return Path(out_dir)
