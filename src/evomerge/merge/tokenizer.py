"""The merged model's tokenizer files: the tokenizer source's copied, or the union tokenizer saved; then
the config's `chat_template`, if any (mergekit 0.1.5's rules: a built-in name, "auto" or a template)."""

from __future__ import annotations

import shutil
from pathlib import Path

from evomerge.io.chat_templates import resolve_chat_template
from evomerge.io.hf_dir import copy_hf_files, tokenizer_files, write_chat_template
from evomerge.merge.config import MergeConfig
from evomerge.merge.sources import SourceSet
from evomerge.merge.vocab import VocabAlignment


def tokenizer_dir(config: MergeConfig, sources: SourceSet) -> Path:
    """The dir whose tokenizer (or, for a union, whose generation config) the output takes."""
    model = config.tokenizer_model()
    return sources.path(model) if model in sources.models else Path(model)


def write_tokenizer(config: MergeConfig, sources: SourceSet, vocab: VocabAlignment | None, out: Path) -> None:
    """Tokenizer and generation config into `out` (config.json too, which the caller then overwrites)."""
    copy_hf_files(tokenizer_dir(config, sources), out)
    if vocab is not None and vocab.tokenizer is not None:
        _save_union(vocab, out)
    if config.chat_template:
        template = resolve_chat_template(config.chat_template, [sources.path(m) for m in sources.models])
        if template is not None:
            write_chat_template(out, template)


def _save_union(vocab: VocabAlignment, out: Path) -> None:
    """The union tokenizer as transformers saves it, in place of the copied donor's tokenizer files (`out`
    is the merge's temporary output dir, renamed into place only once complete)."""
    for path in tokenizer_files(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    vocab.tokenizer.save_pretrained(str(out))
