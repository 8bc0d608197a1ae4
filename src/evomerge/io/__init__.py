"""evomerge.io: lazy reading of model dirs, sharded atomic writing, HF dir files (config, tokenizer, card)."""

from __future__ import annotations

from evomerge.io.reader import ModelDir, TensorInfo
from evomerge.io.writer import ShardedWriter, atomic_output_dir

__all__ = ["ModelDir", "ShardedWriter", "TensorInfo", "atomic_output_dir"]
